//! `vmm fuzz`: a memory-hotplug fuzzer with a model oracle and replayable,
//! shrunk reproducers.
//!
//! - [`bytes`]: the coverage-guided tier's input format (libFuzzer bytes
//!   to steps), its runner and its conversion to a scenario file;
//! - [`gen`]: seeded, biased generation of typed scenario actions
//!   ([`weights`]: how often each family);
//! - [`model`]: the reference model predicting every step's outcome and the
//!   state after it (slots, access, contents, pins, dirty logging);
//! - [`timeline`]: actions + predictions = scenario steps; the final sweep;
//! - [`real`]: the timeline as a scenario on a real KVM VM with vCPUs;
//! - [`sim`]: the pure tier on [`SimKvm`](crate::mm::manager::SimKvm) (guest
//!   writes simulated, DMA, dirty-page sets, injected memslot failures) with
//!   per-step invariants; [`sim_dma`]: its DMA steps;
//! - [`shrink`]: delta debugging and argument simplification;
//! - [`campaign`]: the command: chunks, findings, reproducers, the report;
//! - [`finding`]: what a finding says;
//! - [`leaks`]: host mappings and descriptors a torn-down VM left behind;
//! - [`locked`]: which host pages are mlocked (the sim tier's pin check);
//! - [`reader`]: a device thread holding a guard across each op (`--guard-reader`).
//!
//! A finding is written as a scenario file that `vmm run --scenario FILE`
//! (real tier) or `vmm fuzz --replay FILE --backend sim` replays; the guide
//! is `docs/fuzzing.md`.

pub mod args;
pub mod bytes;
pub mod campaign;
pub mod finding;
pub mod gen;
pub mod leaks;
pub mod locked;
pub mod model;
pub mod reader;
pub mod real;
pub mod shrink;
pub mod sim;
pub mod sim_dma;
pub mod timeline;
pub mod weights;

#[cfg(test)]
mod tests;

pub use finding::Finding;
