//! The raw baseline: the fewest KVM calls that run the identical access
//! pattern (same guest runtime, same commands from [`super::plan`], same
//! memory kinds and guest page tables), with no slot map, no memslot
//! memory, no statistics and no phase channels: plain
//! `KVM_SET_USER_MEMORY_REGION`, one loop per vCPU thread, a barrier
//! between passes. A failing vCPU or handler, or `--timeout`, stops the
//! whole baseline with its reason ([`super::raw_stop`]). `vmm bench faults` runs it in the same invocation and
//! prints the ratio of its own median to this one (the tool should add
//! nothing: the timed window is inside the guest).
//!
//! It shares only pure code with the tool (boot tables, ELF loading, register
//! values, page-table writers, the command plan) and `HostMapping`.

use std::sync::Arc;
use std::time::Instant;

use guest_image::protocol::{command, layout, mailbox_offset, status, REG_DOORBELL, REG_EXCEPTION};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use super::config::{Backing, FaultsConfig, GuestPage, TEST_BASE};
use super::guest::RamLayout;

use super::error::BenchError;
use super::plan::{pass_commands, prefault_command};
use super::raw_stop::RawStop;
use super::raw_uffd::RawHandlers;
use super::uffd::{Armed, Mode};
use crate::boot::elf::ElfImage;
use crate::boot::paging::{apply_patches, gig_leaf, write_4k_tables};
use crate::boot::tables::write_boot_tables;
use crate::mm::addr::{Gpa, GpaRange, HUGE_1G};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::plan::Command;

/// Per-access TSC ticks of every vCPU, concatenated, per pass.
#[derive(Debug, Clone, Default)]
pub struct RawResult {
    /// The first-touch pass.
    pub first: Vec<u64>,
    /// The re-fault pass (empty without `refault`).
    pub refault: Vec<u64>,
    /// Guest TSC frequency.
    pub tsc_khz: u32,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BenchError {
    move |e| BenchError::Setup(format!("raw baseline: {what}: {e}"))
}

struct Shared {
    boot: HostMapping,
    test: HostMapping,
    /// The backing: a re-fault pass prefills again as the tool does.
    backing: Backing,
    /// The userfaultfd registration of a uffd kind.
    armed: Option<Arc<Armed>>,
}

/// Runs the raw baseline of `cfg` on `backing`; the uffd kinds get the
/// minimal handler of the `raw_uffd` module.
pub fn run(cfg: &FaultsConfig, backing: &Backing) -> Result<RawResult, BenchError> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let phys = crate::vm::phys_bits(&cpuid);
    let identity_end = (1u64 << phys.min(40)).min(layout::IDENTITY_END) & !(HUGE_1G - 1);
    let ram = RamLayout::new(cfg);
    let boot = HostMapping::new(&BackingKind::Anon, layout::BOOT_SIZE)?;
    let ram_map = HostMapping::new(&BackingKind::Anon, ram.size)?;
    let test = super::host::map_fresh(backing, cfg.size)?;
    let armed = Mode::of(backing)
        .map(|mode| Armed::new(mode, &test, &cfg.uffd_parts(), cfg.seed, false).map(Arc::new))
        .transpose()?;
    // SAFETY: `boot` is BOOT_SIZE bytes, mapped, not yet shared with KVM.
    let mem = unsafe { std::slice::from_raw_parts_mut(boot.as_ptr(), layout::BOOT_SIZE as usize) };
    write_boot_tables(mem, cfg.vcpus, identity_end)?;
    let window = |a, b| GpaRange::from_bounds(Gpa(a), Gpa(b)).expect("layout is ordered");
    ElfImage::parse(
        guest_image::FIRMWARE_ELF,
        window(layout::FIRMWARE, layout::IMAGE_START),
    )?
    .load_into(mem, Gpa(0));
    let image = ElfImage::parse(
        guest_image::RUNTIME_ELF,
        window(layout::IMAGE_START, layout::IMAGE_END),
    )?;
    image.load_into(mem, Gpa(0));
    match cfg.guest_page {
        GuestPage::Size2M => {}
        GuestPage::Size1G => apply_patches(mem, &[gig_leaf(TEST_BASE)?]),
        GuestPage::Size4K => {
            // SAFETY: the tables are the first `tables_len` bytes of the RAM
            // mapping, not yet shared with KVM.
            let t = unsafe {
                std::slice::from_raw_parts_mut(ram_map.as_ptr(), ram.tables_len as usize)
            };
            apply_patches(
                mem,
                &write_4k_tables(t, ram.tables_gpa, TEST_BASE, cfg.size)?,
            );
        }
    }
    let shared = Arc::new(Shared {
        boot,
        test,
        backing: backing.clone(),
        armed,
    });
    crate::vcpu::install_kick_handler()
        .map_err(|e| BenchError::Setup(format!("raw baseline: the vCPU kick signal: {e}")))?;
    let stop = Arc::new(RawStop::new(cfg.vcpus as usize));
    let handlers = shared
        .armed
        .as_ref()
        .map(|a| {
            RawHandlers::start(
                a,
                cfg.uffd_handlers as usize,
                cfg.handler_delay,
                &super::host::uffd_handler_cpus(cfg),
                stop.clone(),
            )
        })
        .transpose()?;
    // Created after the mappings, so it is dropped before them on every
    // path (locals drop in reverse order): KVM drops its memslots first.
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    for (slot, gpa, m) in [
        (0, 0, &shared.boot),
        (1, layout::RAM_BASE, &ram_map),
        (2, TEST_BASE, &shared.test),
    ] {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: m.len(),
            userspace_addr: m.hva().0,
        };
        // SAFETY: the mappings outlive `vm`: `vm` was created after them, so
        // it is dropped first on every path (and explicitly at the end, after
        // the vCPU threads are joined).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpus {
        let vcpu = vm.create_vcpu(i).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        crate::vm::setup_vcpu_registers(&vcpu, i, cfg.vcpus, image.entry)?;
        vcpus.push(vcpu);
    }
    let tsc_khz = vcpus[0].get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;

    let ram_base = ram_map.as_ptr() as u64;
    let deadline = Instant::now() + cfg.timeout;
    let outcome: Vec<Result<Passes, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, fd)| {
                let (shared, stop) = (shared.clone(), &*stop);
                let (res_gpa, res_len) = ram.results[i];
                let job = Job {
                    index: i as u64,
                    prefault: prefault_command(res_gpa, res_len),
                    pass: pass_commands(cfg, i as u64, res_gpa),
                    refault: cfg.refault,
                    results_hva: ram_base + (res_gpa - layout::RAM_BASE),
                    accesses: cfg.accesses(i as u64),
                    cpu: super::host::vcpu_cpu(cfg, i as u64),
                };
                s.spawn(move || {
                    let _party = stop.enter();
                    let r = job.run(fd, &shared, stop);
                    if let Err(e) = &r {
                        stop.abort(format!("vCPU {i}: {e}"));
                    }
                    r
                })
            })
            .collect();
        stop.supervise(deadline, cfg.timeout);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("raw vCPU thread panicked".into()))
            })
            .collect()
    });
    if let Some(h) = handlers {
        h.finish()
            .map_err(|detail| BenchError::Setup(format!("raw baseline: {detail}")))?;
    }
    if let Some(reason) = stop.aborted() {
        return Err(BenchError::Setup(format!("raw baseline stopped: {reason}")));
    }
    let mut result = RawResult {
        tsc_khz,
        ..RawResult::default()
    };
    for (i, r) in outcome.into_iter().enumerate() {
        let (first, refault) = r.map_err(|detail| BenchError::Guest {
            vcpu: i as u64,
            detail: format!("raw baseline: {detail}"),
        })?;
        result.first.extend(first);
        result.refault.extend(refault);
    }
    drop(vm);
    Ok(result)
}

/// First-pass and re-fault-pass ticks of one vCPU.
type Passes = (Vec<u64>, Vec<u64>);

struct Job {
    index: u64,
    prefault: Command,
    pass: Vec<Command>,
    refault: bool,
    results_hva: u64,
    accesses: u64,
    /// The CPU to pin this vCPU thread to (as the tool pins its vCPUs).
    cpu: Option<usize>,
}

impl Job {
    fn post(&self, shared: &Shared, cmd: &Command) {
        let mb = shared.boot.as_ptr() as u64 + layout::mailbox(self.index);
        // SAFETY: the mailbox is inside the boot mapping; this vCPU is parked
        // in its doorbell exit while the VMM writes it.
        unsafe {
            std::ptr::write_volatile((mb + mailbox_offset::ARGS) as *mut [u64; 6], cmd.args);
            std::ptr::write_volatile((mb + mailbox_offset::COMMAND) as *mut u64, cmd.code);
        }
    }

    fn run_cmd(
        &self,
        fd: &mut VcpuFd,
        shared: &Shared,
        stop: &RawStop,
        cmd: &Command,
    ) -> Result<(), String> {
        self.post(shared, cmd);
        match doorbell(fd, stop)? {
            status::OK => Ok(()),
            st => Err(format!("{} ended with status {st:#x}", cmd.describe())),
        }
    }

    fn ticks(&self) -> Vec<u64> {
        (0..self.accesses)
            .map(|k| {
                // SAFETY: inside this vCPU's result buffer in the RAM mapping,
                // alive for the whole run; the vCPU is parked.
                unsafe { std::ptr::read_volatile((self.results_hva + 8 * k) as *const u64) }
            })
            .collect()
    }

    fn run(&self, mut fd: VcpuFd, shared: &Shared, stop: &RawStop) -> Result<Passes, String> {
        if let Some(cpu) = self.cpu {
            super::host::pin_current_thread(cpu);
        }
        if doorbell(&mut fd, stop)? != status::READY {
            return Err("first doorbell is not READY".into());
        }
        self.run_cmd(&mut fd, shared, stop, &self.prefault)?;
        stop.meet()?;
        for c in &self.pass {
            self.run_cmd(&mut fd, shared, stop, c)?;
        }
        let first = self.ticks();
        let mut refault = Vec::new();
        if self.refault {
            let mut discarded = Ok(());
            if stop.meet()? {
                discarded = match &shared.armed {
                    Some(a) => a.rearm().map_err(|e| e.to_string()),
                    None => shared
                        .test
                        .discard(0, shared.test.len())
                        .map_err(|e| e.to_string()),
                };
                if discarded.is_ok() {
                    // As the tool's re-fault: touch or MADV_POPULATE_WRITE
                    // again (nothing for the other backings).
                    discarded = super::host::prefill(&shared.backing, &shared.test)
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                }
            }
            stop.meet()?;
            discarded?;
            for c in &self.pass {
                self.run_cmd(&mut fd, shared, stop, c)?;
            }
            refault = self.ticks();
        }
        self.post(shared, &Command::new(command::STOP, [0; 6]));
        doorbell(&mut fd, stop)?;
        Ok((first, refault))
    }
}

/// Runs until the guest rings the doorbell; returns its status. An
/// interrupted `KVM_RUN` (a kick) ends it if the run was aborted.
fn doorbell(fd: &mut VcpuFd, stop: &RawStop) -> Result<u32, String> {
    loop {
        match fd.run() {
            Ok(VcpuExit::MmioWrite(REG_DOORBELL, data)) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                return Ok(u32::from_le_bytes(b));
            }
            Ok(VcpuExit::MmioWrite(REG_EXCEPTION, _)) => {
                return Err("guest exception (see the tool's run for details)".into())
            }
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if let Some(reason) = stop.aborted() {
                    return Err(format!("stopped: {reason}"));
                }
            }
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
}
