//! The tool's side of a measurement: a [`Vm`] built by `Vm::new` with a small
//! RAM (page tables and per-vCPU result buffers), the test range plugged at
//! [`TEST_BASE`] through the slot map, and one thread per vCPU that runs the
//! commands of a phase and then parks at the doorbell exit.
//!
//! Phases: the main thread hands every vCPU a list of commands, waits until
//! all have finished, and reads KVM statistics while every vCPU is parked, so
//! counter deltas belong to exactly one phase.
//!
//! A phase can also run in the background ([`GuestBench::start_phase`] with
//! `repeat`): each vCPU runs its list again and again while the main thread
//! changes memory under it, until [`GuestBench::finish_phase`] clears the
//! flag (each vCPU ends its current pass; the jobs channel orders the flag's
//! setting before the vCPU sees the list). MMIO exits inside a window
//! declared with [`GuestBench::expect_mmio`] (memory moved away meanwhile)
//! are absorbed (stores dropped, loads read 0), as KVM's memslot_perf_test
//! allows them in its move-active test.
//!
//! Guest RAM layout (at `RAM_BASE`): 4 KiB page tables for the test range
//! (when `--guest-page 4K`), then vCPU `i`'s result buffer, one `u64` per
//! access, page-aligned.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_image::protocol::{
    command, layout, mailbox_offset, status, REG_CONSOLE, REG_DOORBELL, REG_EXCEPTION,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::config::{FaultsConfig, GuestPage, TEST_BASE};
use super::error::BenchError;
use crate::boot::paging::{apply_patches, gig_leaf, tables_len, write_4k_tables};
use crate::mm::addr::{Gpa, PAGE_SIZE};
use crate::mm::backing::HostMapping;
use crate::mm::slot_map::SlotFlags;
use crate::plan::Command;
use crate::vm::{Counters, DirtyLogConfig, Vm, VmSpec};

/// Where things live in guest RAM.
#[derive(Debug, Clone)]
pub struct RamLayout {
    /// Guest-physical address of the 4 KiB page tables (if any).
    pub tables_gpa: u64,
    /// Bytes of page tables.
    pub tables_len: u64,
    /// Per vCPU: (result buffer gpa, bytes).
    pub results: Vec<(u64, u64)>,
    /// Per vCPU: (start-stamp buffer gpa, bytes), one absolute `rdtsc` per
    /// access; empty unless the run needs stamps (churn, working-set record).
    pub stamps: Vec<(u64, u64)>,
    /// Total RAM size.
    pub size: u64,
}

impl RamLayout {
    /// The layout for `cfg`.
    pub fn new(cfg: &FaultsConfig) -> Self {
        let tables = if cfg.guest_page == GuestPage::Size4K {
            tables_len(cfg.size)
        } else {
            0
        };
        let mut at = layout::RAM_BASE + tables;
        let mut results = Vec::new();
        for i in 0..cfg.vcpus {
            let len = (cfg.accesses(i) * 8).div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
            results.push((at, len));
            at += len;
        }
        let mut stamps = Vec::new();
        if cfg.wants_stamps() {
            for &(_, len) in &results {
                stamps.push((at, len));
                at += len;
            }
        }
        Self {
            tables_gpa: layout::RAM_BASE,
            tables_len: tables,
            results,
            stamps,
            size: at - layout::RAM_BASE,
        }
    }
}

/// A phase's outcome for one vCPU: the results of each command.
type PhaseResult = Result<Vec<[u64; 6]>, String>;

struct Worker {
    jobs: Option<Sender<Vec<Command>>>,
    done: Receiver<PhaseResult>,
    thread: Option<JoinHandle<()>>,
}

/// A VM ready to run measurement phases.
pub struct GuestBench {
    vm: Vm,
    workers: Vec<Worker>,
    stop: Arc<AtomicBool>,
    /// While set, a vCPU that finished its phase's commands runs them again.
    repeat: Arc<AtomicBool>,
    /// Guest-physical `[start, end)` whose MMIO exits are expected (memory
    /// taken away under a running guest): stores are dropped, loads read 0.
    mmio_ok: Arc<[AtomicU64; 2]>,
    /// Commands completed by all vCPUs (for the progress bar).
    pub progress: Arc<AtomicU64>,
    /// The layout of guest RAM.
    pub ram: RamLayout,
    ram_hva: u64,
    /// Per vCPU: KVM's TSC offset (guest TSC = host TSC + offset), read with
    /// `KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET)`, or why
    /// it could not be read.
    pub tsc_offsets: Vec<Result<i64, String>>,
    /// Whether a vCPU re-enters the guest when `KVM_RUN` fails with EFAULT
    /// (a write to a host page a churn op made read-only for a while).
    retry_efault: Arc<AtomicBool>,
    /// `KVM_RUN` calls that failed with EFAULT and were retried.
    pub efault_retries: Arc<AtomicU64>,
    /// Each vCPU thread's kernel thread id (set when it starts): userfaultfd
    /// messages name the faulting thread by it.
    tids: Arc<Vec<AtomicU32>>,
}

impl std::fmt::Debug for GuestBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestBench")
            .field("ram", &self.ram)
            .finish()
    }
}

impl GuestBench {
    /// Builds the VM, plugs `test` at [`TEST_BASE`], writes the guest page
    /// tables for `cfg.guest_page` and starts the vCPU threads (vCPU `i`
    /// pinned to `cpus[i]` when given). Dirty pages are logged in bitmap
    /// mode; see [`with_dirty_log`](Self::with_dirty_log).
    pub fn new(
        cfg: &FaultsConfig,
        test: Arc<HostMapping>,
        cpus: &[Option<usize>],
    ) -> Result<Self, BenchError> {
        Self::with_dirty_log(cfg, test, cpus, DirtyLogConfig::default())
    }

    /// [`new`](Self::new) with the VM logging dirty pages as `dirty` says
    /// (`Vm::with_dirty_log`: in ring mode each vCPU's ring is attached
    /// before its thread starts). A vCPU thread answers
    /// `KVM_EXIT_DIRTY_RING_FULL` as `vmm run` does: it harvests every ring
    /// into the manager's pending pages and enters the guest again.
    pub fn with_dirty_log(
        cfg: &FaultsConfig,
        test: Arc<HostMapping>,
        cpus: &[Option<usize>],
        dirty: DirtyLogConfig,
    ) -> Result<Self, BenchError> {
        let ram = RamLayout::new(cfg);
        let spec = VmSpec {
            vcpus: cfg.vcpus,
            mem_size: ram.size,
            backing: crate::mm::backing::BackingKind::Anon,
            image: Arc::from(guest_image::RUNTIME_ELF),
            pin_limit: None,
            hotplug: true,
            // The fault counts of every pass come from here.
            kvm_stats: true,
            memslot_zap: cfg.memslot_zap,
        };
        let mut vm = Vm::with_dirty_log(&spec, dirty)?;
        let size = test.len();
        vm.memory
            .apply(|m| m.plug(Gpa(TEST_BASE), size, test, 0, SlotFlags::NONE))?;
        let ram_hva = vm
            .memory
            .load()
            .translate(Gpa(layout::RAM_BASE))
            .map(|(hva, _)| hva.0)
            .ok_or(BenchError::Setup(
                "guest RAM is not plugged after Vm::new".into(),
            ))?;
        // SAFETY: the boot mapping is BOOT_SIZE bytes and alive as long as
        // `vm`; no vCPU has run yet, so nothing else reads or writes it now.
        let boot = unsafe {
            std::slice::from_raw_parts_mut(vm.boot_mapping().as_ptr(), layout::BOOT_SIZE as usize)
        };
        match cfg.guest_page {
            GuestPage::Size2M => {}
            GuestPage::Size1G => apply_patches(boot, &[gig_leaf(TEST_BASE)?]),
            GuestPage::Size4K => {
                // SAFETY: the tables lie at the start of guest RAM, a live
                // mapping of `ram.size` bytes owned by the VM's slot map; no
                // vCPU runs yet.
                let tables = unsafe {
                    std::slice::from_raw_parts_mut(ram_hva as *mut u8, ram.tables_len as usize)
                };
                let patches = write_4k_tables(tables, ram.tables_gpa, TEST_BASE, cfg.size)?;
                apply_patches(boot, &patches);
            }
        }
        crate::vcpu::install_kick_handler()
            .map_err(|e| BenchError::Setup(format!("installing the kick handler: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let repeat = Arc::new(AtomicBool::new(false));
        let mmio_ok = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let progress = Arc::new(AtomicU64::new(0));
        let retry_efault = Arc::new(AtomicBool::new(false));
        let efault_retries = Arc::new(AtomicU64::new(0));
        let tids: Arc<Vec<AtomicU32>> =
            Arc::new((0..cfg.vcpus).map(|_| AtomicU32::new(0)).collect());
        let mut workers = Vec::new();
        let mut tsc_offsets = Vec::new();
        for (index, fd) in vm.take_vcpus().into_iter().enumerate() {
            tsc_offsets.push(super::tsc::vcpu_tsc_offset(&fd));
            let (jobs_tx, jobs_rx) = mpsc::channel();
            let (done_tx, done_rx) = mpsc::channel();
            let ctx = VcpuThread {
                index: index as u64,
                mailbox: vm.boot.clone(),
                stop: stop.clone(),
                repeat: repeat.clone(),
                mmio_ok: mmio_ok.clone(),
                progress: progress.clone(),
                cpu: cpus.get(index).copied().flatten(),
                retry_efault: retry_efault.clone(),
                efault_retries: efault_retries.clone(),
                tids: tids.clone(),
                memory: vm.memory.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("bench-vcpu{index}"))
                .spawn(move || ctx.run(fd, jobs_rx, done_tx))
                .map_err(|e| BenchError::Setup(format!("spawning a vCPU thread: {e}")))?;
            workers.push(Worker {
                jobs: Some(jobs_tx),
                done: done_rx,
                thread: Some(thread),
            });
        }
        Ok(Self {
            vm,
            workers,
            stop,
            repeat,
            mmio_ok,
            progress,
            ram,
            ram_hva,
            tsc_offsets,
            retry_efault,
            efault_retries,
            tids,
        })
    }

    /// Whether a `KVM_RUN` failing with EFAULT re-enters the guest (the
    /// faulting access waits) instead of failing the phase.
    pub fn set_retry_efault(&self, on: bool) {
        self.retry_efault.store(on, Ordering::Release);
    }

    /// vCPU `index`'s first `n` start stamps (absolute guest `rdtsc`), or
    /// nothing when the layout has no stamp buffers.
    pub fn stamps(&self, index: usize, n: u64) -> Vec<u64> {
        let Some(&(gpa, len)) = self.ram.stamps.get(index) else {
            return Vec::new();
        };
        self.read_u64s(gpa, len, n)
    }

    /// The kernel thread ids of the vCPU threads, by vCPU index (0 for a
    /// thread that has not started; after the first phase all have).
    pub fn vcpu_tids(&self) -> Vec<u32> {
        self.tids
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .collect()
    }

    /// Guest TSC frequency.
    pub fn tsc_khz(&self) -> u32 {
        self.vm.tsc_khz
    }

    /// KVM counters now: the VM's, then the vCPUs' summed, merged in one map.
    pub fn counters(&self) -> Result<Counters, BenchError> {
        let (mut vm, vcpu) = self.vm.read_stats()?;
        vm.extend(vcpu);
        Ok(vm)
    }

    /// The VM's memory manager (the bench's memory ops, and churn's ops on
    /// neighbouring slots, go through it).
    pub fn memory(&self) -> &Arc<crate::mm::manager::MemoryManager> {
        &self.vm.memory
    }

    /// What memslot moves and deletes invalidate in this VM.
    pub fn zap_policy(&self) -> crate::kvm::zap::ZapPolicy {
        self.vm.zap_policy
    }

    /// The VM fd, for baselines that issue KVM's ioctls themselves on ids
    /// the memory manager does not use.
    pub fn vm_fd(&self) -> &Arc<kvm_ioctls::VmFd> {
        self.vm.fd()
    }

    /// Declares `[start, end)` as memory that may vanish under the guest:
    /// its MMIO exits are absorbed instead of failing the phase (`0, 0`:
    /// none).
    pub fn expect_mmio(&self, start: u64, end: u64) {
        self.mmio_ok[0].store(start, Ordering::Relaxed);
        self.mmio_ok[1].store(end, Ordering::Relaxed);
    }

    /// Runs one phase: `commands[i]` on vCPU `i`, all at once; waits for all
    /// (up to `timeout`, calling `tick` about every 100 ms).
    pub fn phase(
        &mut self,
        commands: Vec<Vec<Command>>,
        timeout: Duration,
        tick: impl FnMut(u64),
    ) -> Result<Vec<Vec<[u64; 6]>>, BenchError> {
        self.start_phase(commands, false)?;
        self.finish_phase(timeout, tick)
    }

    /// Starts a phase without waiting: `commands[i]` on vCPU `i`; with
    /// `repeat`, each vCPU runs its list again and again until
    /// [`finish_phase`](Self::finish_phase) (background guest activity).
    pub fn start_phase(
        &mut self,
        commands: Vec<Vec<Command>>,
        repeat: bool,
    ) -> Result<(), BenchError> {
        self.repeat.store(repeat, Ordering::Release);
        for (w, cmds) in self.workers.iter().zip(commands) {
            let sent = w.jobs.as_ref().map(|j| j.send(cmds).is_ok());
            if sent != Some(true) {
                return Err(BenchError::Setup("a vCPU thread has ended".into()));
            }
        }
        Ok(())
    }

    /// Ends a repeating phase at the end of each vCPU's current pass (or
    /// waits for a plain one) and returns each vCPU's results of its last
    /// pass; waits up to `timeout`, calling `tick` about every 100 ms.
    pub fn finish_phase(
        &mut self,
        timeout: Duration,
        mut tick: impl FnMut(u64),
    ) -> Result<Vec<Vec<[u64; 6]>>, BenchError> {
        self.repeat.store(false, Ordering::Release);
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            loop {
                if let Some(signal) = super::interrupt::caught() {
                    return Err(BenchError::Interrupted(signal));
                }
                tick(self.progress.load(Ordering::Relaxed));
                let left = deadline.saturating_duration_since(Instant::now());
                match w.done.recv_timeout(left.min(Duration::from_millis(100))) {
                    Ok(Ok(r)) => {
                        out.push(r);
                        break;
                    }
                    Ok(Err(detail)) => {
                        return Err(BenchError::Guest {
                            vcpu: i as u64,
                            detail,
                        })
                    }
                    Err(RecvTimeoutError::Timeout) if !left.is_zero() => {}
                    Err(RecvTimeoutError::Timeout) => {
                        return Err(BenchError::Timeout {
                            vcpu: i as u64,
                            after: timeout,
                        })
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(BenchError::Guest {
                            vcpu: i as u64,
                            detail: "the vCPU thread ended".into(),
                        })
                    }
                }
            }
        }
        Ok(out)
    }

    /// vCPU `index`'s first `n` result-buffer entries (TSC ticks).
    pub fn results(&self, index: usize, n: u64) -> Vec<u64> {
        let (gpa, len) = self.ram.results[index];
        self.read_u64s(gpa, len, n)
    }

    fn read_u64s(&self, gpa: u64, len: u64, n: u64) -> Vec<u64> {
        let n = n.min(len / 8);
        let base = self.ram_hva + (gpa - layout::RAM_BASE);
        (0..n)
            .map(|i| {
                // SAFETY: inside a buffer of `len` bytes at `gpa` in guest
                // RAM (a result or stamp buffer of the layout), which the VM
                // keeps mapped; every vCPU is parked.
                unsafe { std::ptr::read_volatile((base + 8 * i) as *const u64) }
            })
            .collect()
    }

    /// Stops every vCPU thread: STOP to each guest if it is parked, or a kick
    /// out of KVM_RUN after a timeout; threads that do not end within a
    /// second are left behind (they hold no reference to our memory besides
    /// the VM fd).
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        for w in &mut self.workers {
            w.jobs = None;
        }
        let until = Instant::now() + Duration::from_secs(1);
        for w in &mut self.workers {
            let Some(t) = w.thread.take() else { continue };
            while !t.is_finished() && Instant::now() < until {
                use std::os::unix::thread::JoinHandleExt;
                // SAFETY: the thread is alive (not finished, not joined); the
                // kick signal has a no-op handler installed in `new`.
                unsafe { libc::pthread_kill(t.as_pthread_t(), crate::vcpu::kick_signal()) };
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        drop(self.vm);
    }
}

struct VcpuThread {
    index: u64,
    mailbox: crate::boot::memory::BootMemory,
    stop: Arc<AtomicBool>,
    repeat: Arc<AtomicBool>,
    mmio_ok: Arc<[AtomicU64; 2]>,
    progress: Arc<AtomicU64>,
    cpu: Option<usize>,
    retry_efault: Arc<AtomicBool>,
    efault_retries: Arc<AtomicU64>,
    tids: Arc<Vec<AtomicU32>>,
    /// Harvests the dirty rings on `KVM_EXIT_DIRTY_RING_FULL`.
    memory: Arc<crate::mm::manager::MemoryManager>,
}

impl VcpuThread {
    fn mb_write<T: vm_memory::ByteValued>(&self, offset: u64, v: T) {
        // The mailbox is in the boot region, always mapped: failure is a bug.
        self.mailbox
            .memory()
            .write_obj(v, GuestAddress(layout::mailbox(self.index) + offset))
            .expect("mailbox is inside the boot region");
    }

    fn mb_read<T: vm_memory::ByteValued>(&self, offset: u64) -> T {
        self.mailbox
            .memory()
            .read_obj(GuestAddress(layout::mailbox(self.index) + offset))
            .expect("mailbox is inside the boot region")
    }

    fn run(self, mut fd: VcpuFd, jobs: Receiver<Vec<Command>>, done: Sender<PhaseResult>) {
        if let Some(cpu) = self.cpu {
            super::host::pin_current_thread(cpu);
        }
        // SAFETY: gettid has no preconditions and cannot fail.
        let tid = unsafe { libc::gettid() };
        self.tids[self.index as usize].store(tid as u32, Ordering::Release);
        match self.to_doorbell(&mut fd) {
            Ok(status::READY) => {}
            Ok(st) => {
                let _ = done.send(Err(format!(
                    "first doorbell status {st:#x}, expected READY"
                )));
                return;
            }
            Err(e) => {
                let _ = done.send(Err(e));
                return;
            }
        }
        for cmds in jobs {
            let mut results = Vec::with_capacity(cmds.len());
            let mut failed = None;
            let mut again = true;
            while again && failed.is_none() {
                results.clear();
                self.pass(&mut fd, &cmds, &mut results, &mut failed);
                again = !cmds.is_empty() && self.repeat.load(Ordering::Acquire);
            }
            let end = failed.is_some();
            let _ = done.send(failed.map_or(Ok(results), Err));
            if end {
                return;
            }
        }
        // Jobs closed: the guest is parked at its doorbell; end its program.
        self.mb_write(mailbox_offset::COMMAND, command::STOP);
        let _ = self.to_doorbell(&mut fd);
    }

    /// Runs `cmds` once, appending each command's results; stops at the
    /// first failure, described in `failed`.
    fn pass(
        &self,
        fd: &mut VcpuFd,
        cmds: &[Command],
        results: &mut Vec<[u64; 6]>,
        failed: &mut Option<String>,
    ) {
        for &cmd in cmds {
            self.mb_write(mailbox_offset::ARGS, cmd.args);
            self.mb_write(mailbox_offset::COMMAND, cmd.code);
            match self.to_doorbell(fd) {
                Ok(status::OK) => {
                    results.push(self.mb_read::<[u64; 6]>(mailbox_offset::RESULTS));
                    self.progress.fetch_add(1, Ordering::Relaxed);
                }
                Ok(st) => {
                    let r: [u64; 6] = self.mb_read(mailbox_offset::RESULTS);
                    *failed = Some(format!(
                        "{} ended with guest status {st:#x} (results {:#x?})",
                        cmd.describe(),
                        &r[..3]
                    ));
                    break;
                }
                Err(e) => {
                    *failed = Some(format!("{}: {e}", cmd.describe()));
                    break;
                }
            }
        }
    }

    /// Whether `gpa` lies in the window whose MMIO exits are expected.
    fn mmio_expected(&self, gpa: u64) -> bool {
        let start = self.mmio_ok[0].load(Ordering::Relaxed);
        let end = self.mmio_ok[1].load(Ordering::Relaxed);
        (start..end).contains(&gpa)
    }

    /// A guest write hit a host page a churn op made read-only: KVM cannot
    /// map it writable and fails `KVM_RUN` with EFAULT. The access waits, as
    /// it would behind a real host fault, until the op restores the
    /// protection; the vCPU re-enters the guest and retries it.
    fn wait_out_efault(&self) -> Result<(), String> {
        if self.stop.load(Ordering::Acquire) {
            return Err("stopped".into());
        }
        self.efault_retries.fetch_add(1, Ordering::Relaxed);
        std::thread::yield_now();
        Ok(())
    }

    /// Runs the guest until it rings the doorbell; returns the status.
    fn to_doorbell(&self, fd: &mut VcpuFd) -> Result<u32, String> {
        loop {
            let exit = match fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if self.stop.load(Ordering::Acquire) {
                        return Err("stopped".into());
                    }
                    continue;
                }
                Err(e)
                    if e.errno() == libc::EFAULT && self.retry_efault.load(Ordering::Acquire) =>
                {
                    self.wait_out_efault()?;
                    continue;
                }
                Err(e) => return Err(format!("KVM_RUN failed: {e}")),
            };
            match exit {
                VcpuExit::MmioWrite(REG_DOORBELL, data) => {
                    let mut b = [0u8; 4];
                    let n = data.len().min(4);
                    b[..n].copy_from_slice(&data[..n]);
                    return Ok(u32::from_le_bytes(b));
                }
                VcpuExit::MmioWrite(REG_CONSOLE, _) => {}
                VcpuExit::MmioWrite(REG_EXCEPTION, _) => {
                    let at = mailbox_offset::EXCEPTION;
                    let (vector, code, rip, cr2): (u64, u64, u64, u64) = (
                        self.mb_read(at),
                        self.mb_read(at + 8),
                        self.mb_read(at + 16),
                        self.mb_read(at + 24),
                    );
                    return Err(format!(
                        "guest exception vector {vector} (error code {code:#x}) at RIP {rip:#x}, CR2 {cr2:#x}"
                    ));
                }
                VcpuExit::MmioRead(gpa, data) if self.mmio_expected(gpa) => data.fill(0),
                VcpuExit::MmioWrite(gpa, _) if self.mmio_expected(gpa) => {}
                VcpuExit::MmioRead(gpa, _) | VcpuExit::MmioWrite(gpa, _) => {
                    return Err(format!("guest access to unplugged guest-physical {gpa:#x}"))
                }
                VcpuExit::Intr => {}
                VcpuExit::MemoryFault { .. } if self.retry_efault.load(Ordering::Acquire) => {
                    self.wait_out_efault()?;
                }
                VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
                    // KVM enters the guest again only once the ring is
                    // reset; the harvested pages wait in the manager.
                    self.memory.harvest_dirty_rings().map_err(|e| {
                        format!("KVM_EXIT_DIRTY_RING_FULL, and harvesting failed: {e}")
                    })?;
                }
                other => return Err(format!("unexpected exit {other:?}")),
            }
        }
    }
}
