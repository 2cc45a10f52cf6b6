//! Scenario files: a documented TOML timeline of memory ops, guest commands
//! and expectations, run against a live guest by `vmm run --scenario FILE`.
//!
//! - [`file`]: the format and its validation (a bad file is rejected before
//!   any VM exists).
//! - [`ops`]: memory-op steps through the KVM applier, with the consistency
//!   check after every op and stable error kinds.
//! - [`driver`]: the timeline thread, the vCPUs' channel plans, the report.
//!
//! The user's guide and the examples are in `scenarios/`.

pub mod driver;
pub mod file;
pub mod ops;

pub use driver::{ScenarioReport, StepReport};
pub use file::{Scenario, ScenarioError};
