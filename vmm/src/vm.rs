//! Creating a test VM: host memory, KVM memslots, the boot region's contents
//! and each vCPU's starting state (64-bit long mode, CPL3, IOPL=3).
//!
//! All guest memory goes through the slot map and its memory manager
//! ([`MemoryManager`]): the boot region is a `fixed` slot at 0, guest RAM a
//! normal slot at `RAM_BASE` that ops may reshape while vCPUs run. The
//! memory owns the mappings it registered until KVM has dropped them.
//!
//! vm-memory wraps the boot region (mailboxes, image) for the VMM's own
//! accesses. Dynamic slots are not a vm-memory `GuestRegionCollection`:
//! inserting or removing a region there builds a new collection in O(n),
//! while our slot map is persistent (O(log n) per op).

use std::collections::BTreeMap;
use std::sync::Arc;

use guest_image::protocol::layout;
use kvm_bindings::{kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::boot::elf::{ElfError, ElfImage};
use crate::boot::memory::{BootMemory, BootMemoryError};
use crate::boot::tables::{gdt_size, tss_addr, write_boot_tables, TablesError};
use crate::kvm::memslots::{DirtyLogError, KvmMemslots, DEFAULT_RING_BYTES};
use crate::kvm::stats::{StatsError, StatsReader};
use crate::kvm::zap::{MemslotZap, ZapPolicy};
use crate::mm::addr::{Gpa, GpaRange, HUGE_1G};
use crate::mm::backing::{BackingError, BackingKind, HostMapping};
use crate::mm::manager::{DirtyLogMode, MemoryManager, MemslotError};
use crate::mm::pin_account::{PinAccount, PinAccountError, PinLimit};
use crate::mm::slot_map::{SlotFlags, SlotMapConfig, MAX_MEMSLOT_PAGES};

/// KVM statistics by name.
pub type Counters = BTreeMap<String, u64>;

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Host memory could not be set up.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The guest image is invalid.
    #[error("guest image: {0}")]
    Image(#[from] ElfError),
    /// Boot tables could not be written.
    #[error(transparent)]
    Tables(#[from] TablesError),
    /// Guest RAM does not fit the guest-physical window.
    #[error("--mem {mem:#x} does not fit: guest RAM at {base:#x} must end by {limit:#x} (the identity-mapped window of this host)")]
    RamTooLarge {
        /// Requested size.
        mem: u64,
        /// RAM base.
        base: u64,
        /// Window end.
        limit: u64,
    },
    /// vm-memory refused the boot region.
    #[error(transparent)]
    GuestMemory(#[from] BootMemoryError),
    /// KVM statistics unavailable.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// The pin limit could not be determined.
    #[error("pin account: {0}")]
    Pins(#[from] PinAccountError),
    /// Registering guest memory failed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemslotError),
    /// The dirty-log mode cannot be set up on this host.
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
}

/// How the VM logs dirty pages: the mode, and each vCPU's ring size in
/// ring mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyLogConfig {
    /// The dirty-log interface.
    pub mode: DirtyLogMode,
    /// Bytes of each vCPU's dirty ring (ring mode): a power of two, at
    /// least 4096, at most what KVM offers.
    pub ring_bytes: u32,
}

impl Default for DirtyLogConfig {
    fn default() -> Self {
        Self {
            mode: DirtyLogMode::Bitmap,
            ring_bytes: DEFAULT_RING_BYTES,
        }
    }
}

impl From<DirtyLogMode> for DirtyLogConfig {
    fn from(mode: DirtyLogMode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Number of vCPUs.
    pub vcpus: u64,
    /// Guest RAM size in bytes, placed at `layout::RAM_BASE`.
    pub mem_size: u64,
    /// Host memory kind behind guest RAM.
    pub backing: BackingKind,
    /// The guest program (an ELF image).
    pub image: Arc<[u8]>,
    /// Limit of pinned guest memory; `None`: the RLIMIT_MEMLOCK soft limit.
    pub pin_limit: Option<PinLimit>,
    /// Whether memory may be plugged outside guest RAM while the guest runs
    /// (a scenario, a benchmark's test range). The guest's identity map then
    /// covers the whole guest-physical window (up to 64 GiB, 64 page
    /// directories); otherwise only guest RAM, rounded up to a GiB and at
    /// least 2 GiB, which is cheaper to build at launch.
    pub hotplug: bool,
    /// Whether to open KVM's binary stats of the VM and its vCPUs
    /// ([`Vm::read_stats`]); without them the reads return no counters and
    /// a launch saves two fds and the stats descriptors' parsing.
    pub kvm_stats: bool,
    /// What a memslot move or delete invalidates in KVM's page tables
    /// ([`crate::kvm::zap`]).
    pub memslot_zap: MemslotZap,
}

/// A built VM, ready to run. vCPU fds are handed to threads with
/// [`Vm::take_vcpus`].
#[derive(Debug)]
pub struct Vm {
    /// The guest memory manager: slot map + KVM memslots.
    pub memory: Arc<MemoryManager>,
    /// Pinned-page and DMA-mapping accounting for device passthrough.
    pub pins: Arc<PinAccount>,
    vcpus: Vec<VcpuFd>,
    /// Stats of the VM, if [`VmSpec::kvm_stats`] asked for them.
    pub vm_stats: Option<StatsReader>,
    /// Per-vCPU stats readers, by index (none without [`VmSpec::kvm_stats`]).
    pub vcpu_stats: Vec<StatsReader>,
    /// The VMM's own view of the boot region (mailboxes, image), through
    /// vm-memory.
    pub boot: BootMemory,
    /// Guest RAM.
    pub ram: GpaRange,
    /// Guest TSC frequency in kHz.
    pub tsc_khz: u32,
    /// End of the guest's identity map.
    pub identity_end: u64,
    /// The guest program's entry point.
    pub entry: Gpa,
    /// What memslot moves and deletes invalidate here, and why it is not
    /// what [`VmSpec::memslot_zap`] asked for (if it is not).
    pub zap_policy: ZapPolicy,
    boot_mapping: Arc<HostMapping>,
    memslots: Arc<KvmMemslots>,
    fd: Arc<VmFd>,
    _kvm: Kvm,
}

/// The boot region: boot tables for `spec.vcpus` vCPUs and an identity map
/// up to `identity_end`, the firmware and the guest image. Returns it with
/// the image's entry point.
fn boot_region(spec: &VmSpec, identity_end: u64) -> Result<(Arc<HostMapping>, Gpa), VmError> {
    let image_window = GpaRange::from_bounds(Gpa(layout::IMAGE_START), Gpa(layout::IMAGE_END))
        .expect("layout constants are ordered");
    let image = ElfImage::parse(&spec.image, image_window)?;
    let firmware_window = GpaRange::new(
        Gpa(layout::FIRMWARE),
        layout::IMAGE_START - layout::FIRMWARE,
    )
    .expect("layout constants are ordered");
    let firmware = ElfImage::parse(guest_image::FIRMWARE_ELF, firmware_window)?;

    let mapping = Arc::new(HostMapping::new(&BackingKind::Anon, layout::BOOT_SIZE)?);
    // SAFETY: the boot mapping is BOOT_SIZE bytes, freshly mapped and not
    // yet visible to the guest or any other thread.
    let boot =
        unsafe { std::slice::from_raw_parts_mut(mapping.as_ptr(), layout::BOOT_SIZE as usize) };
    write_boot_tables(boot, spec.vcpus, identity_end)?;
    firmware.load_into(boot, Gpa(0));
    image.load_into(boot, Gpa(0));
    Ok((mapping, image.entry))
}

/// Creates `count` vCPUs starting at `entry`, with their stats readers.
fn create_vcpus(
    vm_fd: &VmFd,
    cpuid: &CpuId,
    count: u64,
    entry: Gpa,
    kvm_stats: bool,
) -> Result<(Vec<VcpuFd>, Vec<StatsReader>), VmError> {
    let mut vcpus = Vec::new();
    let mut stats = Vec::new();
    for index in 0..count {
        let vcpu = vm_fd
            .create_vcpu(index)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        setup_vcpu_registers(&vcpu, index, count, entry)?;
        if kvm_stats {
            stats.push(StatsReader::open(&vcpu)?);
        }
        vcpus.push(vcpu);
    }
    Ok((vcpus, stats))
}

/// The guest-physical address width KVM supports, from CPUID 0x80000008
/// (36 if KVM does not say).
pub fn phys_bits(cpuid: &CpuId) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map_or(36, |e| e.eax & 0xFF)
}

impl Vm {
    /// Creates the VM: memory, memslots, boot tables, firmware, image, vCPUs.
    pub fn new(spec: &VmSpec) -> Result<Self, VmError> {
        Self::with_dirty_log(spec, DirtyLogConfig::default())
    }

    /// Creates the VM as [`new`](Self::new) does, logging dirty pages as
    /// `dirty` says (a mode the host lacks is refused with the reason).
    pub fn with_dirty_log(spec: &VmSpec, dirty: DirtyLogConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let window = 1u64 << phys_bits(&cpuid).min(40);
        let window_end = window.min(layout::IDENTITY_END) & !(HUGE_1G - 1);
        let ram = GpaRange::new(Gpa(layout::RAM_BASE), spec.mem_size)
            .filter(|r| r.end().0 <= window_end)
            .ok_or(VmError::RamTooLarge {
                mem: spec.mem_size,
                base: layout::RAM_BASE,
                limit: window_end,
            })?;
        let identity_end = if spec.hotplug {
            window_end
        } else {
            ram.end().0.next_multiple_of(HUGE_1G).max(2 * HUGE_1G)
        };
        let (boot_mapping, entry) = boot_region(spec, identity_end)?;
        let ram_mapping = Arc::new(HostMapping::new(&spec.backing, spec.mem_size)?);

        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        // Before the first memslot, so every memslot change of this VM
        // follows the policy.
        let zap_policy = crate::kvm::zap::apply(&vm_fd, spec.memslot_zap);
        let config = SlotMapConfig {
            max_slots: kvm.get_nr_memslots() as u32,
            max_gpa: Gpa(1u64 << phys_bits(&cpuid)),
            read_only_supported: kvm.check_extension(Cap::ReadonlyMem),
            // Guest stores to the register page must exit: no memory there.
            reserved: GpaRange::new(
                Gpa(guest_image::protocol::MMIO_BASE),
                guest_image::protocol::MMIO_SIZE,
            ),
            // KVM_MEM_MAX_NR_PAGES is fixed in KVM, not a capability.
            max_slot_pages: MAX_MEMSLOT_PAGES,
        };
        let memslots = Arc::new(KvmMemslots::new(
            vm_fd.clone(),
            dirty.mode,
            dirty.ring_bytes,
        )?);
        let memory = Arc::new(MemoryManager::new(memslots.clone(), config)?);
        let fixed = SlotFlags {
            fixed: true,
            ..SlotFlags::NONE
        };
        let boot_slot = boot_mapping.clone();
        memory.apply(|map| map.plug(Gpa(0), layout::BOOT_SIZE, boot_slot, 0, fixed))?;
        memory
            .apply(|map| map.plug(ram.start(), spec.mem_size, ram_mapping, 0, SlotFlags::NONE))?;
        let boot = BootMemory::new(boot_mapping.clone())?;

        let (vcpus, vcpu_stats) = create_vcpus(&vm_fd, &cpuid, spec.vcpus, entry, spec.kvm_stats)?;
        for (index, vcpu) in vcpus.iter().enumerate() {
            memslots.attach_vcpu(index, vcpu)?;
        }
        let tsc_khz = vcpus[0].get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        let vm_stats = if spec.kvm_stats {
            Some(StatsReader::open(&vm_fd)?)
        } else {
            None
        };
        let pins = Arc::new(match spec.pin_limit {
            Some(limit) => PinAccount::new(limit),
            None => PinAccount::from_rlimit()?,
        });
        Ok(Self {
            memory,
            pins,
            vcpus,
            vm_stats,
            vcpu_stats,
            boot,
            ram,
            tsc_khz,
            identity_end,
            entry,
            zap_policy,
            boot_mapping,
            memslots,
            fd: vm_fd,
            _kvm: kvm,
        })
    }

    /// Hands the vCPU fds over (to their threads). Returns them once.
    pub fn take_vcpus(&mut self) -> Vec<VcpuFd> {
        std::mem::take(&mut self.vcpus)
    }

    /// The VM's KVM stats, and the sum of all vCPUs' stats (both empty
    /// unless [`VmSpec::kvm_stats`] opened them).
    pub fn read_stats(&self) -> Result<(Counters, Counters), StatsError> {
        let mut vcpu = BTreeMap::new();
        for r in &self.vcpu_stats {
            crate::kvm::stats::accumulate(&mut vcpu, &r.read()?);
        }
        let vm = match &self.vm_stats {
            Some(r) => r.read()?,
            None => Counters::new(),
        };
        Ok((vm, vcpu))
    }

    /// The memory manager's KVM backend (dirty-log mode, memslot ioctl).
    pub fn memslots(&self) -> &Arc<KvmMemslots> {
        &self.memslots
    }

    /// The VM fd (its memslots belong to [`Vm::memory`]; a caller issuing
    /// memslot ioctls itself must use ids the manager does not).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Host mapping behind the boot region.
    pub fn boot_mapping(&self) -> &Arc<HostMapping> {
        &self.boot_mapping
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: (selector & 3) as u8,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode, paging, SSE enabled; CS/SS at ring 3; TR = this vCPU's TSS.
pub fn setup_vcpu_registers(
    vcpu: &VcpuFd,
    index: u64,
    vcpus: u64,
    entry: Gpa,
) -> Result<(), VmError> {
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    const RFLAGS_IOPL3: u64 = 3 << 12;

    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.cr3 = layout::PML4;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.cs = segment(layout::USER_CS, true);
    let data = segment(layout::USER_DS, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    let tss = tss_addr(index);
    sregs.tr = kvm_segment {
        base: tss,
        limit: 103,
        selector: layout::TSS_SEL0 + 16 * index as u16,
        type_: 0xB,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = layout::GDT;
    sregs.gdt.limit = (gdt_size(vcpus) - 1) as u16;
    sregs.idt.base = layout::IDT;
    sregs.idt.limit = 32 * 16 - 1;
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;

    let mut regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    regs.rip = entry.0;
    regs.rsp = layout::user_stack_top(index);
    regs.rdi = index;
    regs.rsi = layout::mailbox(index);
    regs.rflags = 0x2 | RFLAGS_IOPL3;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}
