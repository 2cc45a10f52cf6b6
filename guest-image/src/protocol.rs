// The guest<->VMM protocol. This file is compiled twice: into the VMM (as
// `guest_image::protocol`) and into the freestanding guest programs (by
// `include!`), so both sides share one definition of every constant and layout.
// It must stay `core`-only. The prose description lives in guest-image/PROTOCOL.md.

/// The VMM's registers: a guest-physical page with no memory behind it, so
/// every guest store to it exits to the VMM (`KVM_EXIT_MMIO`) with the value.
/// Port I/O is not used: under PVM-style nested KVM, ring-3 `out` raises #GP
/// even with IOPL=3, while an MMIO store exits on every KVM host.
pub const MMIO_BASE: u64 = 0x3000_0000;
/// 32-bit store: the guest finished a command or is ready for the first one.
/// The value is a `status::*` code. When the store returns, the next command
/// is in the mailbox.
pub const REG_DOORBELL: u64 = MMIO_BASE;
/// 32-bit store: print `mailbox.console[..value]`.
pub const REG_CONSOLE: u64 = MMIO_BASE + 0x8;
/// 32-bit store (value = vector) by the firmware's exception handlers after
/// filling `mailbox.exception`. The vCPU is not resumed after it, except
/// under a scenario, where the VMM resets the guest to its command loop.
pub const REG_EXCEPTION: u64 = MMIO_BASE + 0x10;
/// 32-bit store: submit the DMA descriptor at guest-physical `value` (the
/// vCPU's `Mailbox::dma`) to the DMA engine. The store returns at once; the
/// engine works on a host thread and sets `DmaDescriptor::status` when done.
pub const REG_DMA_SUBMIT: u64 = MMIO_BASE + 0x18;
/// Size of the register page.
pub const MMIO_SIZE: u64 = 0x1000;

/// DMA engine operations (`DmaDescriptor::op`).
pub mod dma_op {
    /// Copy `len` bytes from `src` to `dst`.
    pub const COPY: u64 = 1;
    /// Fill `len` bytes at `dst` with the 8-byte `value`.
    pub const FILL: u64 = 2;
    /// Sum the `u64` words of `[src, src + len)` (wrapping) into `result`.
    pub const CHECKSUM: u64 = 3;
}

/// DMA completion codes (`DmaDescriptor::status`).
pub mod dma_status {
    /// Written by the guest before submitting; the engine has not finished.
    pub const PENDING: u64 = 0;
    /// Done.
    pub const DONE: u64 = 1;
    /// A range is not (or no longer) plugged, or not writable.
    pub const FAULT: u64 = 2;
    /// Pinning was refused: the pin limit would be exceeded.
    pub const NO_PIN: u64 = 3;
    /// Memory changed under the transfer (unplug, move, protect) and the
    /// engine's pin was revoked; the transfer stopped part-way.
    pub const REVOKED: u64 = 4;
    /// Bad op, misaligned or overflowing arguments.
    pub const INVALID: u64 = 5;
}

/// A DMA request, written by the guest into its mailbox.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaDescriptor {
    /// A `dma_op` code.
    pub op: u64,
    /// Source guest-physical address.
    pub src: u64,
    /// Destination guest-physical address.
    pub dst: u64,
    /// Bytes (a multiple of 8).
    pub len: u64,
    /// FILL's value.
    pub value: u64,
    /// CHECKSUM's result.
    pub result: u64,
    /// A `dma_status` code; set last by the engine (release), polled by the guest.
    pub status: u64,
}

/// Guest-physical layout of the boot region, which is never unplugged.
pub mod layout {
    /// Global descriptor table (one page).
    pub const GDT: u64 = 0x1000;
    /// Interrupt descriptor table (256 gates of 16 bytes: one page).
    pub const IDT: u64 = 0x2000;
    /// Task-state segments, one per vCPU, `TSS_STRIDE` bytes apart (two pages).
    pub const TSS: u64 = 0x4000;
    /// Distance between two vCPUs' TSSes.
    pub const TSS_STRIDE: u64 = 128;
    /// Page-map level 4 table.
    pub const PML4: u64 = 0x8000;
    /// The page-directory-pointer table (covers 0..512 GiB).
    pub const PDPT: u64 = 0x9000;
    /// Page directories, one page per GiB of the identity map (2 MiB pages):
    /// GiB `i` uses the page at `PDS + i * 0x1000`.
    pub const PDS: u64 = 0x1_0000;
    /// Where the firmware (exception stubs) is loaded; after the last PD.
    pub const FIRMWARE: u64 = 0x8_0000;
    /// Distance between two exception stubs in the firmware.
    pub const STUB_STRIDE: u64 = 16;
    /// The guest program image may occupy `[IMAGE_START, IMAGE_END)`.
    pub const IMAGE_START: u64 = 0x10_0000;
    /// End of the image window.
    pub const IMAGE_END: u64 = 0x40_0000;
    /// Per-vCPU areas start here, `VCPU_AREA_SIZE` bytes each: mailbox page,
    /// exception (ring-0) stack page, then the ring-3 stack.
    pub const VCPU_AREAS: u64 = 0x40_0000;
    /// Size of one per-vCPU area.
    pub const VCPU_AREA_SIZE: u64 = 0x8000;
    /// Offset of the ring-0 stack page in a vCPU area (RSP0 = its end).
    pub const KSTACK_OFFSET: u64 = 0x1000;
    /// Maximum number of vCPUs the boot region has room for.
    pub const MAX_VCPUS: u64 = 64;
    /// Size of the boot region: `[0, BOOT_SIZE)`.
    pub const BOOT_SIZE: u64 = VCPU_AREAS + MAX_VCPUS * VCPU_AREA_SIZE;
    /// Default guest RAM starts here (1 GiB, so 1 GiB guest pages can cover it).
    pub const RAM_BASE: u64 = 0x4000_0000;
    /// The identity map covers `[0, IDENTITY_END)` with 2 MiB pages (1 GiB
    /// pages need CPUID pdpe1gb, which KVM's shadow MMU may not offer), unless
    /// the host's guest-physical width is smaller.
    pub const IDENTITY_END: u64 = 64 << 30;
    /// GDT selectors.
    pub const KERNEL_CS: u16 = 0x08;
    /// Ring-0 data selector.
    pub const KERNEL_DS: u16 = 0x10;
    /// Ring-3 data selector (RPL 3).
    pub const USER_DS: u16 = 0x18 | 3;
    /// Ring-3 64-bit code selector (RPL 3).
    pub const USER_CS: u16 = 0x20 | 3;
    /// First TSS selector; vCPU `i` uses `TSS_SEL0 + 16 * i`.
    pub const TSS_SEL0: u16 = 0x28;

    /// Guest-physical address of vCPU `index`'s mailbox.
    pub const fn mailbox(index: u64) -> u64 {
        VCPU_AREAS + index * VCPU_AREA_SIZE
    }
    /// Initial ring-3 stack pointer of vCPU `index`.
    pub const fn user_stack_top(index: u64) -> u64 {
        VCPU_AREAS + (index + 1) * VCPU_AREA_SIZE
    }
    /// Ring-0 stack pointer (TSS.RSP0) of vCPU `index`.
    pub const fn kernel_stack_top(index: u64) -> u64 {
        mailbox(index) + KSTACK_OFFSET + 0x1000
    }
}

/// Commands the VMM writes into `Mailbox::command`.
pub mod command {
    /// End the program: the guest rings the doorbell with `STATUS_STOPPED` and
    /// never asks again.
    pub const STOP: u64 = 0;
    /// Write the pattern of `args[2]` (seed) over `[args[0], args[0] + args[1])`.
    /// If `args[3]` (origin) is non-zero, the pattern is the one a FILL at
    /// `args[3]` would write: word `i` gets `pattern_word(seed, origin + 8 * i)`.
    pub const FILL: u64 = 1;
    /// Check the pattern of `args[2]` over `[args[0], args[0] + args[1])`,
    /// with the same `args[3]` origin rule as FILL (so contents moved from
    /// `origin` can be checked at their new address); on mismatch
    /// `results[0..3]` = (address, expected, actual).
    pub const VERIFY: u64 = 2;
    /// Touch one byte every `args[2]` bytes of `[args[0], args[0] + args[1])`,
    /// writing if `args[3] != 0`. `results[0]` = accesses done.
    pub const TOUCH: u64 = 3;
    /// Like TOUCH, and store each access's `rdtsc` delta as a `u64` at
    /// `args[4] + 8 * i`; if `args[5]` is non-zero, also store the access's
    /// start stamp (the first `rdtsc`, absolute) at `args[5] + 8 * i`.
    /// `results[0]` = accesses, `results[1]` = total ticks.
    pub const TIMED_TOUCH: u64 = 4;
    /// Spin `args[0]` iterations (0 = forever).
    pub const SPIN: u64 = 5;
    /// Read the `u64` at `args[0]` into `results[0]` (a probe: may fault or exit).
    pub const READ: u64 = 6;
    /// Write `args[1]` as a `u64` at `args[0]`.
    pub const WRITE: u64 = 7;
    /// Execute an invalid instruction (`ud2`).
    pub const BAD_INSN: u64 = 8;
    /// Print `args[0]` (a small number) in a greeting on the console.
    pub const HELLO: u64 = 9;
    /// Check every `u64` of `[args[0], args[0] + args[1])` equals `args[2]`;
    /// on mismatch status MISMATCH with results (address, expected, actual).
    pub const VERIFY_CONST: u64 = 10;
    /// Program the DMA engine: op `args[0]` (a `dma_op`), src `args[1]`, dst
    /// `args[2]`, len `args[3]`, value `args[4]`; wait for completion.
    /// `results[0]` = the `dma_status`, `results[1]` = CHECKSUM's result.
    /// The command's status is OK whatever the DMA's outcome.
    pub const DMA: u64 = 11;
}

/// Status codes the guest writes to `REG_DOORBELL`.
pub mod status {
    /// First ring: the guest is ready for its first command.
    pub const READY: u32 = 0x100;
    /// The command completed.
    pub const OK: u32 = 0;
    /// VERIFY found a mismatch (see `results`).
    pub const MISMATCH: u32 = 1;
    /// The command code is unknown.
    pub const BAD_COMMAND: u32 = 2;
    /// The command's arguments are invalid (e.g. misaligned).
    pub const BAD_ARGS: u32 = 3;
    /// Answer to STOP: the program ends.
    pub const STOPPED: u32 = 0x200;
}

/// Bytes of console text a mailbox can carry in one `REG_CONSOLE` write.
pub const CONSOLE_BYTES: usize = 3072;

/// What the firmware records about a guest exception.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ExceptionRecord {
    /// Interrupt vector (14 = #PF, 6 = #UD, 13 = #GP...).
    pub vector: u64,
    /// Error code pushed by the CPU, 0 for vectors without one.
    pub error_code: u64,
    /// Faulting instruction pointer.
    pub rip: u64,
    /// CR2 (the faulting address of a #PF).
    pub cr2: u64,
    /// Stack pointer at the time of the fault.
    pub rsp: u64,
}

/// The per-vCPU mailbox: one page at `layout::mailbox(index)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Mailbox {
    /// Command to execute (see [`command`]); written by the VMM.
    pub command: u64,
    /// Command arguments; written by the VMM.
    pub args: [u64; 6],
    /// Command results; written by the guest before ringing the doorbell.
    pub results: [u64; 6],
    /// Filled by the firmware before an exception report.
    pub exception: ExceptionRecord,
    /// The vCPU's DMA descriptor (see `REG_DMA_SUBMIT`).
    pub dma: DmaDescriptor,
    /// Console text; the length goes with the `REG_CONSOLE` write.
    pub console: [u8; CONSOLE_BYTES],
}

/// Byte offsets of mailbox fields, for the firmware's assembly and the VMM.
pub mod mailbox_offset {
    /// `Mailbox::command`.
    pub const COMMAND: u64 = 0;
    /// `Mailbox::args`.
    pub const ARGS: u64 = 8;
    /// `Mailbox::results`.
    pub const RESULTS: u64 = 56;
    /// `Mailbox::exception`.
    pub const EXCEPTION: u64 = 104;
    /// `Mailbox::dma`.
    pub const DMA: u64 = 144;
    /// `Mailbox::console`.
    pub const CONSOLE: u64 = 200;
}

const _: () = assert!(core::mem::size_of::<Mailbox>() <= 4096);
const _: () = assert!(core::mem::offset_of!(Mailbox, args) as u64 == mailbox_offset::ARGS);
const _: () = assert!(core::mem::offset_of!(Mailbox, results) as u64 == mailbox_offset::RESULTS);
const _: () = assert!(core::mem::offset_of!(Mailbox, exception) as u64 == mailbox_offset::EXCEPTION);
const _: () = assert!(core::mem::offset_of!(Mailbox, dma) as u64 == mailbox_offset::DMA);
const _: () = assert!(core::mem::offset_of!(Mailbox, console) as u64 == mailbox_offset::CONSOLE);

/// The value FILL writes and VERIFY expects at the 8-byte word at `addr`.
/// Every word of every page differs, and a different seed changes them all.
#[inline(always)]
pub const fn pattern_word(seed: u64, addr: u64) -> u64 {
    (addr ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (addr >> 12)
}

const _: () = assert!(layout::PDS + (layout::IDENTITY_END >> 30) * 0x1000 <= layout::FIRMWARE);
