//! Scenario files: a documented TOML timeline of memory ops, guest commands
//! and expectations, run against a live guest by `vmm run --scenario FILE`.
//!
//! - [`step`]: the typed step ([`Step`], [`step::Action`]), the one language
//!   of scenario files and the library API; reads and writes TOML.
//! - [`read`]: steps from TOML tables, refusals with the field's position.
//! - [`expect`]: outcomes and expectations, one name per meaning.
//! - [`num`]: numbers and durations as written in files.
//! - [`pages`]: sets of guest pages as page runs (`dirty-pages`' expectation).
//! - [`file`](mod@file): the file format and its validation (a bad file is rejected
//!   before any VM exists, naming `file:line:column`, step and field).
//! - [`ops`]: memory-op steps through the memory manager, with the consistency
//!   check after every op.
//! - [`guest`]: the vCPU side: one batch per guest step, repeated and judged there.
//! - [`invariants`]: what must hold after every memory op (map, mirror, KVM
//!   probes, hub, IOMMU leaves), on either backend.
//! - [`driver`]: the timeline thread, the vCPUs' channel plans, the report.
//!
//! The user's guide and the examples are in `scenarios/`.

pub mod driver;
pub mod expect;
pub mod file;
pub mod guest;
pub mod invariants;
pub mod num;
pub mod ops;
pub mod pages;
pub mod read;
pub mod step;

#[cfg(test)]
mod tests;

pub use driver::{ScenarioReport, StepReport};
pub use expect::{Expect, Outcome};
pub use file::{Scenario, ScenarioError};
pub use step::{Action, Step};
