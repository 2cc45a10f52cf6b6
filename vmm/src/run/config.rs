//! What `vmm run` is asked to do: [`RunConfig`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::mm::backing::BackingKind;
use crate::plan::BuiltinGuest;
use crate::scenario::Scenario;

/// Which guest program to run.
#[derive(Debug, Clone)]
pub enum GuestSource {
    /// A built-in program over the built-in runtime.
    Builtin(BuiltinGuest),
    /// An ELF image file speaking the mailbox protocol; driven by the default plan.
    Image {
        /// Where it came from.
        path: PathBuf,
        /// Its bytes.
        bytes: Arc<[u8]>,
    },
}

impl GuestSource {
    /// Its name in reports: the built-in's, or the image file's path.
    pub(super) fn name(&self) -> String {
        match self {
            GuestSource::Builtin(b) => b.to_string(),
            GuestSource::Image { path, .. } => path.display().to_string(),
        }
    }
}

/// How much the run prints on the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    /// Only errors.
    Quiet,
    /// Guest console and a summary.
    Normal,
    /// Also per-command progress.
    Verbose,
}

/// Everything `vmm run` needs, validated.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPU count.
    pub vcpus: u64,
    /// Backing of guest RAM.
    pub backing: BackingKind,
    /// The guest.
    pub guest: GuestSource,
    /// Stop the guest after this long.
    pub timeout: Duration,
    /// Seed of the memory pattern.
    pub seed: u64,
    /// Console verbosity.
    pub verbosity: Verbosity,
    /// A scenario to run instead of the guest's built-in plan.
    pub scenario: Option<Arc<Scenario>>,
    /// Limit of pinned guest memory; `None`: the RLIMIT_MEMLOCK soft limit.
    pub pin_limit: Option<crate::mm::pin_account::PinLimit>,
    /// The dirty-log mode (a scenario's `dirty_log` overrides `--dirty-log`).
    pub dirty_log: crate::mm::manager::DirtyLogMode,
    /// Bytes of each vCPU's dirty ring in ring mode.
    pub dirty_ring_bytes: u32,
    /// Whether the report carries KVM's stats (`kvm_stats`, the summary's
    /// `pf_fixed`). `vmm run -q` without `--json` prints no report and
    /// turns them off: the launch then opens no stats fds.
    pub kvm_stats: bool,
    /// What a memslot move or delete invalidates in KVM's page tables.
    pub memslot_zap: crate::kvm::zap::MemslotZap,
}

impl RunConfig {
    /// The default run: 256 MiB anonymous RAM, 2 vCPUs, the default guest, 60 s.
    pub fn default_guest() -> Self {
        Self {
            mem_size: 256 << 20,
            vcpus: 2,
            backing: BackingKind::Anon,
            guest: GuestSource::Builtin(BuiltinGuest::Default),
            timeout: Duration::from_secs(60),
            seed: 0x005E_ED0F_CAFE,
            verbosity: Verbosity::Normal,
            scenario: None,
            pin_limit: None,
            dirty_log: crate::mm::manager::DirtyLogMode::Bitmap,
            dirty_ring_bytes: crate::kvm::memslots::DEFAULT_RING_BYTES,
            kvm_stats: true,
            memslot_zap: crate::kvm::zap::MemslotZap::Slot,
        }
    }
}

impl RunConfig {
    /// Whether the guest may use devices: scenarios pin and program the DMA
    /// engine, and an image file may; the built-in programs never do.
    pub(super) fn may_use_devices(&self) -> bool {
        self.scenario.is_some() || matches!(self.guest, GuestSource::Image { .. })
    }

    /// The built-in program whose plan drives the guest.
    pub(super) fn builtin(&self) -> BuiltinGuest {
        match &self.guest {
            GuestSource::Builtin(b) => *b,
            GuestSource::Image { .. } => BuiltinGuest::Default,
        }
    }
}
