//! One clock for the guest and the host: the guest's `rdtsc` at CPL3 reads
//! the host TSC plus KVM's per-vCPU TSC offset (times a scaling ratio when
//! the guest frequency differs from the host's; KVM gives a fresh vCPU the
//! host frequency, so the ratio is 1 unless `KVM_SET_TSC_KHZ` changed it,
//! which the bench never does).
//!
//! The offset is read from KVM, not estimated: `KVM_GET_DEVICE_ATTR` on the
//! vCPU with group `KVM_VCPU_TSC_CTRL`, attribute `KVM_VCPU_TSC_OFFSET`
//! (Linux 5.16+). With it, a host `rdtsc` stamp `h` is the guest instant
//! `h + offset`, and a guest stamp `g` the host instant `g - offset`.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_device_attr, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET};
use kvm_ioctls::VcpuFd;

/// `_IOW(KVMIO, 0xe2, struct kvm_device_attr)`.
const KVM_GET_DEVICE_ATTR: libc::c_ulong =
    ((1 << 30) | (std::mem::size_of::<kvm_device_attr>() << 16) | (0xAE << 8) | 0xE2)
        as libc::c_ulong;

/// KVM's TSC offset of `vcpu` (guest TSC = host TSC + offset), or why it
/// cannot be read (a kernel without `KVM_VCPU_TSC_CTRL`).
pub fn vcpu_tsc_offset(vcpu: &VcpuFd) -> Result<i64, String> {
    let mut offset: u64 = 0;
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: &raw mut offset as u64,
    };
    // SAFETY: KVM_GET_DEVICE_ATTR reads a `struct kvm_device_attr` (which
    // `attr` is, repr(C)) and writes one u64 at `attr.addr`, which points at
    // `offset`, alive and writable for the duration of the call.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_DEVICE_ATTR, &attr) };
    if rc != 0 {
        return Err(format!(
            "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(offset as i64)
}

/// The host TSC now (`lfence; rdtsc`, the guest's own sequence).
pub fn host_tsc() -> u64 {
    // SAFETY: lfence and rdtsc have no memory effects; both are available
    // on every x86-64 CPU KVM runs on.
    unsafe {
        std::arch::x86_64::_mm_lfence();
        std::arch::x86_64::_rdtsc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_host_tsc_advances() {
        let a = host_tsc();
        let b = host_tsc();
        assert!(b >= a);
    }
}
