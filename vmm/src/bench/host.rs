//! The host side of the bench: facts about the host that decide what kind of
//! faults were measured, thread pinning, fresh memory of a [`Backing`], and
//! the host-only first-touch floor (the same access pattern on the same kind
//! of memory, no VM).

use std::arch::x86_64::_rdtsc;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;
use serde::Serialize;

use super::config::{Access, Backing, FaultsConfig, UffdCpu};
use crate::mm::backing::{meminfo, BackingError, HostMapping};

/// What a reader needs to tell which faults were measured.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// `uname -r`.
    pub kernel: String,
    /// `/sys/kernel/mm/transparent_hugepage/enabled`.
    pub thp_enabled: String,
    /// `/sys/kernel/mm/transparent_hugepage/defrag`.
    pub thp_defrag: String,
    /// `HugePages_Total` of /proc/meminfo.
    pub hugepages_total: u64,
    /// `HugePages_Free`.
    pub hugepages_free: u64,
    /// CPU model name.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Guest TSC frequency (KVM_GET_TSC_KHZ).
    pub tsc_khz: u32,
    /// Whether KVM's supported CPUID offers 1 GiB pages (pdpe1gb).
    pub kvm_pdpe1gb: bool,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether KVM's supported CPUID has pdpe1gb (leaf 0x80000001, EDX bit 26).
pub fn kvm_has_pdpe1gb(kvm: &Kvm) -> bool {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map(|c| {
            c.as_slice()
                .iter()
                .any(|e| e.function == 0x8000_0001 && e.edx & (1 << 26) != 0)
        })
        .unwrap_or(false)
}

/// Online CPUs of this host.
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl HostFacts {
    /// Reads the facts now.
    pub fn collect(tsc_khz: u32, kvm_pdpe1gb: bool) -> Self {
        let uts = read_trim("/proc/sys/kernel/osrelease");
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            kernel: uts,
            thp_enabled: read_trim("/sys/kernel/mm/transparent_hugepage/enabled"),
            thp_defrag: read_trim("/sys/kernel/mm/transparent_hugepage/defrag"),
            hugepages_total: meminfo("HugePages_Total").unwrap_or(0),
            hugepages_free: meminfo("HugePages_Free").unwrap_or(0),
            cpu_model,
            cpus: online_cpus(),
            tsc_khz,
            kvm_pdpe1gb,
        }
    }
}

/// Pins the calling thread to `cpu` (best effort: a failure leaves it unpinned).
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: `set` is a plain bitmask initialised by CPU_ZERO/CPU_SET and
    // passed by pointer with its size; pid 0 means the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu % online_cpus(), &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The CPU vCPU `index` is pinned to: none with `--uffd-cpu any`, else
/// vCPU `i` on CPU `i` (modulo the CPUs).
pub fn vcpu_cpu(cfg: &FaultsConfig, index: u64) -> Option<usize> {
    (cfg.uffd_cpu != UffdCpu::Any).then_some(index as usize % online_cpus())
}

/// The CPU the handler threads of uffd `k` are pinned to: the CPU of the
/// vCPU the uffd serves (`same`; vCPU 0 for the one uffd of the whole
/// range, vCPU `k` with `--uffd-per-vcpu`), the next CPU (`other`), or none
/// (`any`).
pub fn uffd_handler_cpu(cfg: &FaultsConfig, k: usize) -> Option<usize> {
    let ncpu = online_cpus();
    match cfg.uffd_cpu {
        UffdCpu::Same => Some(k % ncpu),
        UffdCpu::Other => Some((k + 1) % ncpu),
        UffdCpu::Any => None,
    }
}

/// [`uffd_handler_cpu`] of every uffd of `cfg`.
pub fn uffd_handler_cpus(cfg: &FaultsConfig) -> Vec<Option<usize>> {
    (0..cfg.uffd_parts().len())
        .map(|k| uffd_handler_cpu(cfg, k))
        .collect()
}

/// Maps `size` bytes of `backing`'s memory, fresh: `file` is an unnamed
/// file (nothing to clean up, even after a crash), `prefault` is populated,
/// a user's `file=PATH` is used as is.
pub fn map_fresh(backing: &Backing, size: u64) -> Result<HostMapping, BackingError> {
    map_prefilled(backing, size).map(|(m, _)| m)
}

/// The host-only floor: the same offsets touched in the same order on fresh
/// memory of the same kind (plain anonymous memory for the uffd kinds), each
/// access timed with `rdtsc` like the guest does. Returns ticks per access.
pub fn first_touch(
    backing: &Backing,
    size: u64,
    offsets: &[u64],
    access: Access,
) -> Result<Vec<u64>, BackingError> {
    let m = map_fresh(backing, size)?;
    let mut ticks = Vec::with_capacity(offsets.len());
    for (n, &off) in offsets.iter().enumerate() {
        // SAFETY: every offset is below `size` (built from the same plan as
        // the guest's); the mapping is alive and private to this function.
        let p = unsafe { m.as_ptr().add(off as usize) };
        // SAFETY: rdtsc has no memory effects.
        let t0 = unsafe { _rdtsc() };
        match access {
            // SAFETY: `p` is inside the mapping (see above).
            Access::Write => unsafe { std::ptr::write_volatile(p, n as u8) },
            // SAFETY: as above.
            Access::Read => unsafe {
                std::ptr::read_volatile(p);
            },
        }
        // SAFETY: as above.
        ticks.push(unsafe { _rdtsc() }.wrapping_sub(t0));
    }
    Ok(ticks)
}

/// Host memory filled before the guest runs: how, how much, how long.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prefill {
    /// The method (`touch`, `MADV_POPULATE_WRITE`, `UFFDIO_COPY per run`...).
    pub method: &'static str,
    /// 4 KiB pages filled.
    pub pages: u64,
    /// System calls (or runs) it took; 0 for touching.
    pub calls: u64,
    /// Wall time, ms.
    pub ms: f64,
}

impl Prefill {
    /// A fill of `pages` pages in `calls` calls that started at `t`.
    pub fn new(method: &'static str, pages: u64, calls: usize, t: std::time::Instant) -> Self {
        Self {
            method,
            pages,
            calls: calls as u64,
            ms: t.elapsed().as_secs_f64() * 1e3,
        }
    }

    /// Adds another round's prefill.
    pub fn merge(&mut self, other: &Prefill) {
        self.pages += other.pages;
        self.calls += other.calls;
        self.ms += other.ms;
    }
}

/// Fills the host side of a `prefault` (one write per page from this
/// thread) or `populate` (`MADV_POPULATE_WRITE` over the whole range, one
/// call) mapping, timed; `None` for every other backing.
pub fn prefill(backing: &Backing, m: &HostMapping) -> Result<Option<Prefill>, BackingError> {
    let (method, calls) = match backing {
        Backing::Prefault => ("touch", 0),
        Backing::Populate => ("MADV_POPULATE_WRITE", 1),
        _ => return Ok(None),
    };
    let t = std::time::Instant::now();
    if *backing == Backing::Prefault {
        m.touch_pages(0, m.len())?;
    } else {
        m.populate_write(0, m.len())?;
    }
    Ok(Some(Prefill {
        method,
        pages: m.len() / crate::mm::addr::PAGE_SIZE,
        calls,
        ms: t.elapsed().as_secs_f64() * 1e3,
    }))
}

/// Fresh memory of `backing` for the test range, prefilled as the backing
/// says, with the prefill's timing.
pub fn map_prefilled(
    backing: &Backing,
    size: u64,
) -> Result<(HostMapping, Option<Prefill>), BackingError> {
    let m = match backing.host_kind() {
        Some(kind) => HostMapping::new(kind, size)?,
        None => HostMapping::new_unnamed_file(&std::env::temp_dir(), size)?,
    };
    let p = prefill(backing, &m)?;
    Ok((m, p))
}

/// Whether this host's KVM offers `KVM_PRE_FAULT_MEMORY`
/// (`KVM_CHECK_EXTENSION(KVM_CAP_PRE_FAULT_MEMORY)`, capability 236).
pub fn kvm_has_pre_fault_memory(kvm: &Kvm) -> bool {
    const KVM_CAP_PRE_FAULT_MEMORY: i32 = 236;
    kvm.check_extension_raw(KVM_CAP_PRE_FAULT_MEMORY as libc::c_ulong) > 0
}
