//! The raw program: the fewest KVM calls that run the same guest writes and
//! dirty-log ioctls, as KVM's `dirty_log_perf_test` does them. No slot map,
//! no memory manager: a VM built by hand (boot region, firmware, the same
//! guest runtime), the area as plain memslots 1..=S, one thread per vCPU
//! running mailbox commands, and for each mode its own collect:
//! - bitmap: `KVM_GET_DIRTY_LOG` per slot (reads, clears and re-protects);
//! - manual: `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with initially-set enabled
//!   before any slot logs; `KVM_GET_DIRTY_LOG` per slot reads only, and
//!   `KVM_CLEAR_DIRTY_LOG` with the bitmap just read re-protects;
//! - ring: `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` enabled before the vCPUs exist,
//!   each vCPU's ring mapped from its fd; a harvest walks every ring from
//!   its fetch index while entries are marked dirty (acquire), marks each
//!   harvested (release), and `KVM_RESET_DIRTY_RINGS` re-protects.
//!
//! Every collect turns what KVM returned into a list of GFNs, the form the
//! memory manager hands out.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_image::protocol::{command, layout, mailbox_offset, status, REG_DOORBELL, REG_EXCEPTION};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET,
    KVM_EXIT_DIRTY_RING_FULL, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::config::{DirtyError, DirtyMode};
use super::{Area, AREA_BASE};
use crate::boot::elf::ElfImage;
use crate::boot::tables::write_boot_tables;
use crate::mm::addr::{Gpa, GpaRange, HUGE_1G, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::manager::MemslotBackend;
use crate::mm::slot_map::SlotId;
use crate::plan::Command;

/// A ring entry KVM has published (uapi `KVM_DIRTY_GFN_F_DIRTY`).
const GFN_DIRTY: u32 = 1;
/// A ring entry the VMM has harvested (uapi `KVM_DIRTY_GFN_F_RESET`).
const GFN_RESET: u32 = 2;
/// Bytes of one `struct kvm_dirty_gfn`.
const GFN_BYTES: u64 = 16;
/// Entries KVM keeps free at the end of a ring before it exits with
/// "ring full" (its soft limit; generous).
const RING_SLACK: u64 = 1024;

mod nr {
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_CLEAR_DIRTY_LOG,
        kvm_bindings::KVMIO,
        0xc0,
        kvm_bindings::kvm_clear_dirty_log
    );
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> DirtyError {
    let what = what.into();
    move |e| DirtyError::Kvm {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// What the host's KVM offers: (manual with initially-set, largest ring in
/// entries or 0).
pub fn host_modes(kvm: &Kvm) -> (bool, u64) {
    let want = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    let manual =
        kvm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) as u64 & want == want;
    let ring = kvm
        .check_extension_raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into())
        .max(0) as u64;
    (manual, ring / GFN_BYTES)
}

/// The ring entries to ask for: a power of two holding `pages` plus slack,
/// at most `max`.
pub fn ring_entries(pages: u64, max: u64) -> Result<u64, DirtyError> {
    let want = (pages + RING_SLACK)
        .next_power_of_two()
        .max(PAGE_SIZE / GFN_BYTES);
    if want > max {
        return Err(DirtyError::RingTooSmall {
            pages,
            entries: max,
        });
    }
    Ok(want)
}

/// One vCPU's dirty ring, mapped from its fd.
struct Ring {
    base: *mut u8,
    entries: u64,
    fetch: u64,
}

// SAFETY: the ring is shared memory KVM writes; the main thread alone reads
// it (the vCPU thread only runs KVM_RUN), so moving the handle is sound.
unsafe impl Send for Ring {}

impl Ring {
    fn map(fd: &VcpuFd, entries: u64) -> Result<Self, DirtyError> {
        let len = (entries * GFN_BYTES) as usize;
        // SAFETY: maps the vCPU's dirty ring (KVM's documented offset and
        // size); nothing else is touched; unmapped in Drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE_SIZE as i64,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyError::Kvm {
                what: "mmap of a vCPU's dirty ring".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            base: p.cast(),
            entries,
            fetch: 0,
        })
    }

    /// Harvests every published entry into `out` as (slot, offset).
    fn harvest(&mut self, out: &mut Vec<(u32, u64)>) {
        loop {
            let at = (self.fetch & (self.entries - 1)) * GFN_BYTES;
            // SAFETY: `at` is inside the mapped ring; `flags` is the entry's
            // first, 4-byte aligned u32, which KVM and we access atomically.
            let flags = unsafe { &*(self.base.add(at as usize) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return;
            }
            // SAFETY: inside the entry; KVM published it (the acquire above
            // orders these reads after its writes).
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(self.base.add(at as usize + 4) as *const u32),
                    std::ptr::read_volatile(self.base.add(at as usize + 8) as *const u64),
                )
            };
            out.push((slot, offset));
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch += 1;
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.base.cast(), (self.entries * GFN_BYTES) as usize) };
    }
}

struct Worker {
    jobs: Option<Sender<Vec<Command>>>,
    done: Receiver<Result<(), String>>,
    thread: Option<JoinHandle<()>>,
}

/// The raw program's VM.
pub struct RawVm {
    mode: DirtyMode,
    // Field order is drop order: vCPU threads end, rings unmap, the VM fd
    // closes (KVM drops its memslots) and only then the memory unmaps.
    workers: Vec<Worker>,
    rings: Vec<Ring>,
    vm: VmFd,
    area: Area,
    bitmaps: Vec<Vec<u64>>,
    _boot: HostMapping,
    _kvm: Kvm,
}

impl RawVm {
    /// Builds the VM for `mode` over `area`, with `vcpus` vCPUs and, in
    /// ring mode, rings of `ring_entries` entries.
    pub fn new(
        mode: DirtyMode,
        area: Area,
        vcpus: u64,
        ring_entries: u64,
    ) -> Result<Self, DirtyError> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let phys = crate::vm::phys_bits(&cpuid);
        let identity_end = (1u64 << phys.min(40)).min(layout::IDENTITY_END) & !(HUGE_1G - 1);
        let boot = HostMapping::new(&BackingKind::Anon, layout::BOOT_SIZE)?;
        // SAFETY: `boot` is BOOT_SIZE bytes, mapped, not yet shared with KVM.
        let mem =
            unsafe { std::slice::from_raw_parts_mut(boot.as_ptr(), layout::BOOT_SIZE as usize) };
        let setup = |e: String| DirtyError::RawGuest { vcpu: 0, detail: e };
        write_boot_tables(mem, vcpus, identity_end).map_err(|e| setup(e.to_string()))?;
        let window = |a, b| GpaRange::from_bounds(Gpa(a), Gpa(b)).expect("layout is ordered");
        ElfImage::parse(
            guest_image::FIRMWARE_ELF,
            window(layout::FIRMWARE, layout::IMAGE_START),
        )
        .map_err(|e| setup(e.to_string()))?
        .load_into(mem, Gpa(0));
        let image = ElfImage::parse(
            guest_image::RUNTIME_ELF,
            window(layout::IMAGE_START, layout::IMAGE_END),
        )
        .map_err(|e| setup(e.to_string()))?;
        image.load_into(mem, Gpa(0));
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        match mode {
            DirtyMode::Bitmap => {}
            DirtyMode::Manual => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] =
                    u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
                vm.enable_cap(&cap)
                    .map_err(kvm_err("KVM_ENABLE_CAP MANUAL_DIRTY_LOG_PROTECT2"))?;
            }
            DirtyMode::Ring => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
                    ..Default::default()
                };
                cap.args[0] = ring_entries * GFN_BYTES;
                vm.enable_cap(&cap)
                    .map_err(kvm_err("KVM_ENABLE_CAP DIRTY_LOG_RING_ACQ_REL"))?;
            }
        }
        let set = |slot: u32, gpa: u64, len: u64, hva: u64| {
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: hva,
            };
            // SAFETY: the boot and area mappings are fields of the RawVm
            // built below, declared after `vm`, so they are unmapped only
            // after the VM fd closed; they serve as nothing but guest memory.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err(format!("KVM_SET_USER_MEMORY_REGION slot {slot}")))
        };
        set(0, 0, layout::BOOT_SIZE, boot.hva().0)?;
        for (i, s) in area.slots.iter().enumerate() {
            set(
                i as u32 + 1,
                AREA_BASE + s.gpa_offset,
                s.len,
                area.mapping.hva().0 + s.host_offset,
            )?;
        }
        let bitmaps = area
            .slots
            .iter()
            .map(|s| vec![0u64; (s.len / PAGE_SIZE).div_ceil(64) as usize])
            .collect();
        let mut rings = Vec::new();
        let mut workers = Vec::new();
        for i in 0..vcpus {
            let fd = vm.create_vcpu(i).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            crate::vm::setup_vcpu_registers(&fd, i, vcpus, image.entry)
                .map_err(|e| setup(e.to_string()))?;
            if mode == DirtyMode::Ring {
                rings.push(Ring::map(&fd, ring_entries)?);
            }
            let (jobs_tx, jobs_rx) = mpsc::channel();
            let (done_tx, done_rx) = mpsc::channel();
            let mailbox = boot.hva().0 + layout::mailbox(i);
            let thread = std::thread::Builder::new()
                .name(format!("raw-dirty-vcpu{i}"))
                .spawn(move || vcpu_loop(fd, mailbox, jobs_rx, done_tx))
                .map_err(|e| setup(format!("spawning a vCPU thread: {e}")))?;
            workers.push(Worker {
                jobs: Some(jobs_tx),
                done: done_rx,
                thread: Some(thread),
            });
        }
        Ok(Self {
            mode,
            workers,
            rings,
            vm,
            area,
            bitmaps,
            _boot: boot,
            _kvm: kvm,
        })
    }

    /// Runs `commands[i]` on vCPU `i`; returns the time until all finished.
    pub fn phase(&mut self, commands: Vec<Vec<Command>>) -> Result<Duration, DirtyError> {
        let t = Instant::now();
        for (w, c) in self.workers.iter().zip(commands) {
            if w.jobs.as_ref().map(|j| j.send(c).is_ok()) != Some(true) {
                return Err(DirtyError::RawGuest {
                    vcpu: 0,
                    detail: "a vCPU thread ended".into(),
                });
            }
        }
        for (i, w) in self.workers.iter().enumerate() {
            let r = w
                .done
                .recv()
                .unwrap_or_else(|_| Err("the vCPU thread ended".into()));
            r.map_err(|detail| DirtyError::RawGuest { vcpu: i, detail })?;
        }
        Ok(t.elapsed())
    }

    fn set_logging(&self, on: bool) -> Result<Duration, DirtyError> {
        let t = Instant::now();
        for (i, s) in self.area.slots.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: i as u32 + 1,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: AREA_BASE + s.gpa_offset,
                memory_size: s.len,
                userspace_addr: self.area.mapping.hva().0 + s.host_offset,
            };
            // SAFETY: the same slot with only its flags changed: the same
            // memory, mapped as long as the VM (see `new`).
            unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err(format!(
                "KVM_SET_USER_MEMORY_REGION flags of slot {}",
                i + 1
            )))?;
        }
        Ok(t.elapsed())
    }

    /// Turns dirty logging on for every area slot.
    pub fn enable(&self) -> Result<Duration, DirtyError> {
        self.set_logging(true)
    }

    /// Turns it off.
    pub fn disable(&self) -> Result<Duration, DirtyError> {
        self.set_logging(false)
    }

    /// Collects the dirty GFNs into `out` (cleared first).
    pub fn collect(&mut self, out: &mut Vec<u64>) -> Result<Duration, DirtyError> {
        out.clear();
        let t = Instant::now();
        if self.mode == DirtyMode::Ring {
            let mut entries = Vec::new();
            for r in &mut self.rings {
                r.harvest(&mut entries);
            }
            for (slot, offset) in entries {
                let start = self.area.slots[(slot & 0xffff) as usize - 1].gpa_offset;
                out.push((AREA_BASE + start) / PAGE_SIZE + offset);
            }
            return Ok(t.elapsed());
        }
        for (i, s) in self.area.slots.iter().enumerate() {
            let bitmap = &mut self.bitmaps[i];
            // SAFETY: `bitmap` holds ceil(pages / 64) words for the slot's
            // pages, as KVM writes them.
            unsafe {
                self.vm
                    .get_dirty_log_into(SlotId(i as u32 + 1), bitmap.as_mut_ptr())
            }
            .map_err(|e| DirtyError::Kvm {
                what: format!("KVM_GET_DIRTY_LOG slot {}", i + 1),
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
            let first = (AREA_BASE + s.gpa_offset) / PAGE_SIZE;
            for (w, &word) in bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    out.push(first + w as u64 * 64 + u64::from(bits.trailing_zeros()));
                    bits &= bits - 1;
                }
            }
        }
        Ok(t.elapsed())
    }

    /// Whether the collect also re-protects (bitmap: `KVM_GET_DIRTY_LOG`
    /// clears as it reads).
    pub fn clears_in_collect(&self) -> bool {
        self.mode == DirtyMode::Bitmap
    }

    /// Re-protects what the last collect read: nothing in bitmap mode
    /// (`KVM_GET_DIRTY_LOG` did), `KVM_CLEAR_DIRTY_LOG` per slot in manual
    /// mode, `KVM_RESET_DIRTY_RINGS` in ring mode.
    pub fn clear(&mut self) -> Result<Duration, DirtyError> {
        let t = Instant::now();
        match self.mode {
            DirtyMode::Bitmap => return Ok(Duration::ZERO),
            DirtyMode::Manual => {
                for (i, s) in self.area.slots.iter().enumerate() {
                    let log = kvm_clear_dirty_log {
                        slot: i as u32 + 1,
                        num_pages: (s.len / PAGE_SIZE) as u32,
                        first_page: 0,
                        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                            dirty_bitmap: self.bitmaps[i].as_mut_ptr().cast(),
                        },
                    };
                    // SAFETY: a VM fd; KVM reads `log` and the slot's bitmap
                    // (ceil(pages / 64) words, owned by `self`).
                    let r = unsafe {
                        libc::ioctl(self.vm.as_raw_fd(), nr::KVM_CLEAR_DIRTY_LOG(), &log)
                    };
                    if r != 0 {
                        return Err(DirtyError::Kvm {
                            what: format!("KVM_CLEAR_DIRTY_LOG slot {}", i + 1),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                }
            }
            DirtyMode::Ring => {
                // SAFETY: a VM fd; the ioctl takes no argument.
                let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), nr::KVM_RESET_DIRTY_RINGS()) };
                if r < 0 {
                    return Err(DirtyError::Kvm {
                        what: "KVM_RESET_DIRTY_RINGS".into(),
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
        }
        Ok(t.elapsed())
    }
}

impl Drop for RawVm {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.jobs = None;
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// A vCPU thread: runs each job's commands, then STOP when the jobs end.
fn vcpu_loop(
    mut fd: VcpuFd,
    mailbox: u64,
    jobs: Receiver<Vec<Command>>,
    done: Sender<Result<(), String>>,
) {
    let post = |cmd: &Command| {
        // SAFETY: the mailbox lies in the boot mapping, which outlives the
        // vCPU threads (joined before it unmaps); the vCPU is parked in its
        // doorbell exit while we write.
        unsafe {
            std::ptr::write_volatile((mailbox + mailbox_offset::ARGS) as *mut [u64; 6], cmd.args);
            std::ptr::write_volatile((mailbox + mailbox_offset::COMMAND) as *mut u64, cmd.code);
        }
    };
    if let Err(e) = doorbell(&mut fd).and_then(|s| {
        (s == status::READY)
            .then_some(())
            .ok_or(format!("first doorbell status {s:#x}"))
    }) {
        let _ = done.send(Err(e));
        return;
    }
    for cmds in jobs {
        let mut result = Ok(());
        for c in &cmds {
            post(c);
            match doorbell(&mut fd) {
                Ok(status::OK) => {}
                Ok(s) => result = Err(format!("{} ended with status {s:#x}", c.describe())),
                Err(e) => result = Err(format!("{}: {e}", c.describe())),
            }
            if result.is_err() {
                break;
            }
        }
        let failed = result.is_err();
        let _ = done.send(result);
        if failed {
            return;
        }
    }
    post(&Command::new(command::STOP, [0; 6]));
    let _ = doorbell(&mut fd);
}

/// Runs until the guest rings the doorbell; returns its status.
fn doorbell(fd: &mut VcpuFd) -> Result<u32, String> {
    loop {
        match fd.run() {
            Ok(VcpuExit::MmioWrite(REG_DOORBELL, data)) => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                return Ok(u32::from_le_bytes(b));
            }
            Ok(VcpuExit::MmioWrite(REG_EXCEPTION, _)) => return Err("guest exception".into()),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                return Err("the dirty ring filled up within one iteration".into())
            }
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
}
