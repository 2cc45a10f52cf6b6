//! What a vCPU thread reports when it ends.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::failure::GuestFailure;

/// What one completed command reported.
#[derive(Debug, Clone, Serialize)]
pub struct CommandReport {
    /// Human description.
    pub command: String,
    /// Guest status.
    pub status: u32,
    /// Guest results.
    pub results: [u64; 6],
    /// Wall time from resuming the guest with it to its doorbell.
    pub micros: u64,
}

/// Everything a vCPU thread reports when it ends.
#[derive(Debug, Serialize)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: u64,
    /// `None` on success.
    pub failure: Option<GuestFailure>,
    /// Completed commands, in order.
    pub commands: Vec<CommandReport>,
    /// Exits counted by reason.
    pub exits: BTreeMap<&'static str, u64>,
}
