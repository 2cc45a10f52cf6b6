//! Leaks across a VM's life: after a VM of a campaign is torn down, the
//! process must hold exactly the host mappings and the descriptors of the
//! kinds a VM creates that it held before the VM was built.
//!
//! - **mappings**: [`HostMapping::live_count`], the process's live host
//!   mappings of guest memory (every plug, grow, the boot region, guest
//!   RAM, the manager's dirty-bitmap buffer);
//! - **descriptors**: `/proc/self/fd`, those whose target a VM creates:
//!   `/memfd:` (memfd backings), `anon_inode:kvm-vm` and
//!   `anon_inode:kvm-vcpu` (VM, vCPU and their stats fds), `/dev/kvm`,
//!   and files shown `(deleted)` (unnamed file backings).
//!
//! The campaign snapshots both before each VM and compares after it; a
//! difference is a finding (`invariant:leaked-mappings`,
//! `invariant:leaked-fds`) naming what is left. It runs between VMs, not
//! during one: while a VM lives, threads with a cached snapshot of the slot
//! map (guest readers, the DMA engine) legitimately keep mappings of slots
//! an op already took away alive until they next look.

use std::collections::BTreeMap;

use crate::mm::backing::HostMapping;

/// What a VM may leave behind: live host mappings and descriptors of the
/// kinds a VM creates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// [`HostMapping::live_count`].
    pub mappings: usize,
    /// Descriptor number -> target, of the kinds a VM creates.
    pub fds: BTreeMap<i32, String>,
}

/// Whether a descriptor's target is of a kind a VM creates.
pub fn vm_kind(target: &str) -> bool {
    target.starts_with("memfd:")
        || target.starts_with("/memfd:")
        || target.starts_with("anon_inode:kvm")
        || target == "/dev/kvm"
        || target.ends_with(" (deleted)")
}

impl Snapshot {
    /// The process now.
    pub fn now() -> Self {
        let mut fds = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            for entry in dir.flatten() {
                let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                // The directory's own descriptor is gone by now: no target.
                let Ok(target) = std::fs::read_link(entry.path()) else {
                    continue;
                };
                let target = target.to_string_lossy().into_owned();
                if vm_kind(&target) {
                    fds.insert(fd, target);
                }
            }
        }
        Self {
            mappings: HostMapping::live_count(),
            fds,
        }
    }

    /// What `self` (after a VM) holds that `before` did not: the leak's
    /// invariant name and a description.
    pub fn leaked_since(&self, before: &Snapshot) -> Option<(&'static str, String)> {
        if self.mappings > before.mappings {
            return Some((
                "leaked-mappings",
                format!(
                    "{} host mappings of guest memory live after the VM was torn down, {} before it was built",
                    self.mappings, before.mappings
                ),
            ));
        }
        let new: Vec<String> = self
            .fds
            .iter()
            .filter(|(fd, t)| before.fds.get(fd) != Some(t))
            .map(|(fd, t)| format!("{fd} -> {t}"))
            .collect();
        if !new.is_empty() {
            return Some((
                "leaked-fds",
                format!(
                    "descriptors the VM opened are still open after its teardown: {}",
                    new.join(", ")
                ),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::backing::BackingKind;

    #[test]
    fn test_descriptor_kinds_a_vm_creates() {
        assert!(vm_kind("/memfd:vmm-guest (deleted)"));
        assert!(vm_kind("anon_inode:kvm-vm"));
        assert!(vm_kind("anon_inode:kvm-vcpu:0"));
        assert!(vm_kind("/dev/kvm"));
        assert!(vm_kind("/tmp/#123 (deleted)"));
        assert!(!vm_kind("pipe:[123]"));
        assert!(!vm_kind("/dev/null"));
    }

    #[test]
    fn test_a_leaked_memfd_mapping_is_found_by_both_counts() {
        let before = Snapshot::now();
        let leaked = HostMapping::new(&BackingKind::Memfd, 0x1000).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(leaked.fd().unwrap());
        let after = Snapshot::now();
        // Other tests map and unmap concurrently: the count may move either
        // way, but our descriptor is there for sure.
        assert!(after.fds.contains_key(&fd), "{after:?}");
        let fds_only = Snapshot {
            mappings: before.mappings,
            ..after.clone()
        };
        let (name, detail) = fds_only.leaked_since(&before).unwrap();
        assert_eq!(name, "leaked-fds");
        assert!(detail.contains(&format!("{fd} -> /memfd:")), "{detail}");
        let more = Snapshot {
            mappings: before.mappings + 1,
            ..before.clone()
        };
        assert_eq!(more.leaked_since(&before).unwrap().0, "leaked-mappings");
        assert_eq!(before.leaked_since(&before), None);
        drop(leaked);
    }
}
