//! `vmm fuzz`: a memory-hotplug fuzzer with a model oracle and replayable,
//! shrunk reproducers.
//!
//! - [`gen`]: seeded, biased generation of typed scenario actions;
//! - [`model`]: the reference model predicting every step's outcome and the
//!   state after it (slots, access, contents, pins, dirty logging);
//! - [`timeline`]: actions + predictions = scenario steps; the final sweep;
//! - [`real`]: the timeline as a scenario on a real KVM VM with vCPUs;
//! - [`sim`]: the pure tier on [`SimKvm`](crate::mm::manager::SimKvm) with
//!   per-step invariants;
//! - [`shrink`]: delta debugging and argument simplification;
//! - [`campaign`]: the command: chunks, findings, reproducers, the report.
//!
//! A finding is written as a scenario file that `vmm run --scenario FILE`
//! (real tier) or `vmm fuzz --replay FILE --backend sim` replays; the guide
//! is `docs/fuzzing.md`.

pub mod campaign;
pub mod gen;
pub mod model;
pub mod real;
pub mod shrink;
pub mod sim;
pub mod timeline;

#[cfg(test)]
mod tests;

use serde::Serialize;

pub use campaign::{main, FuzzArgs};

/// A step that did not do what the model predicted, or an invariant that
/// broke after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// 1-based step number.
    pub step: usize,
    /// Its `do`.
    pub kind: String,
    /// The step in words.
    pub what: String,
    /// The outcomes the model allowed.
    pub expected: String,
    /// What happened.
    pub actual: String,
    /// What must stay the same while shrinking: kind and outcome, or the
    /// invariant's name.
    pub signature: String,
}
