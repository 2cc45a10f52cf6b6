//! What KVM drops from its stage-2 page tables when a memslot is moved or
//! deleted.
//!
//! On x86, KVM's default VM type keeps an old behaviour as a quirk,
//! `KVM_X86_QUIRK_SLOT_ZAP_ALL`: removing or moving any memslot
//! invalidates **every** shadow/TDP page of the VM (`kvm_mmu_zap_all_fast`),
//! so every vCPU then faults its whole working set back in, and the next
//! memslot change has all of that to zap again. With the quirk disabled
//! (`KVM_CAP_DISABLE_QUIRKS2`, Linux 6.12 and later) KVM zaps only the leaf
//! entries inside the slot that changed (`kvm_mmu_zap_memslot_leafs`), as it
//! always does for its other VM types.
//!
//! The zap-all behaviour exists for one old report of instability with
//! assigned GPUs; this VMM assigns no host devices and reshapes memory all
//! the time, so [`MemslotZap::Slot`] is the default, and `All` is kept for
//! comparison (`--memslot-zap all`). A host whose KVM cannot disable the
//! quirk keeps zapping everything; [`apply`] then says why.
//!
//! Measured on this host (`vmm bench memslots --slots 8194 --tests
//! move-inactive`, docs/bench-memslots.md): one `KVM_MR_MOVE` took 40 us
//! with zap-all and 27 us with slot-only zaps on the raw loop, while the
//! guest wrote memory next to the slot.

use std::fmt;

use kvm_bindings::{kvm_enable_cap, KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL};
use kvm_ioctls::VmFd;

/// What a memslot move or delete invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MemslotZap {
    /// Only the translations inside the changed slot.
    #[default]
    Slot,
    /// Every translation of the VM (KVM's default-VM quirk).
    All,
}

impl MemslotZap {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            MemslotZap::Slot => "slot",
            MemslotZap::All => "all",
        }
    }
}

impl fmt::Display for MemslotZap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a VM got: the behaviour in force, and why it differs from the one
/// asked for (if it does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZapPolicy {
    /// The behaviour in force.
    pub zap: MemslotZap,
    /// Why `zap` is not what was asked for.
    pub fallback: Option<&'static str>,
}

impl fmt::Display for ZapPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fallback {
            None => write!(f, "{}", self.zap),
            Some(why) => write!(f, "{} ({why})", self.zap),
        }
    }
}

/// Sets what memslot moves and deletes of `vm` invalidate, before any
/// memslot exists. Asking for [`MemslotZap::All`] changes nothing (it is
/// KVM's default); [`MemslotZap::Slot`] disables the zap-all quirk where
/// this host's KVM can, and otherwise falls back to `All` with the reason.
pub fn apply(vm: &VmFd, want: MemslotZap) -> ZapPolicy {
    let fallback = |why| ZapPolicy {
        zap: MemslotZap::All,
        fallback: Some(why),
    };
    if want == MemslotZap::All {
        return ZapPolicy {
            zap: MemslotZap::All,
            fallback: None,
        };
    }
    // KVM_CHECK_EXTENSION on the VM returns the quirks it may disable.
    let mask = vm.check_extension_raw(u64::from(KVM_CAP_DISABLE_QUIRKS2));
    if mask <= 0 {
        return fallback("this host's KVM lacks KVM_CAP_DISABLE_QUIRKS2");
    }
    if mask as u64 & u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL) == 0 {
        return fallback("this host's KVM cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL");
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_DISABLE_QUIRKS2,
        args: [u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL), 0, 0, 0],
        ..Default::default()
    };
    match vm.enable_cap(&cap) {
        Ok(()) => ZapPolicy {
            zap: MemslotZap::Slot,
            fallback: None,
        },
        Err(_) => fallback("KVM refused to disable KVM_X86_QUIRK_SLOT_ZAP_ALL"),
    }
}
