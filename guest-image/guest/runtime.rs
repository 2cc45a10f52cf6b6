//! The guest runtime: a ring-3 command loop. Every built-in guest program is
//! this loop driven by a different command plan from the VMM.
//!
//! Entry ABI (set by the VMM): RIP = `_start`, RSP = the vCPU's ring-3 stack,
//! RDI = vCPU index, RSI = guest-physical address of its mailbox. The guest runs
//! at CPL3 with IOPL=3 over an identity map, so a guest-physical address is
//! also the pointer to use. It talks to the VMM by storing to the MMIO
//! register page (`REG_*`): each store exits to the VMM.
//!
//! Loop: ring the doorbell with a status, read the command the VMM left in the
//! mailbox when the store returned, execute it, repeat.
#![no_std]
#![no_main]

#[allow(dead_code)]
mod protocol {
    include!("../src/protocol.rs");
}

use core::arch::{asm, global_asm};
use core::ptr::{read_volatile, write_volatile};
use protocol::{
    command, dma_status, pattern_word, status, DmaDescriptor, Mailbox, CONSOLE_BYTES, REG_CONSOLE, REG_DMA_SUBMIT,
    REG_DOORBELL,
};

global_asm!(
    ".section .text.entry, \"ax\"",
    ".globl _start",
    "_start:",
    "call {main}",
    "ud2",
    main = sym guest_main,
);

/// Stores `value` to a VMM register: the store exits to the VMM, which acts
/// on it before the guest continues.
fn write_reg(reg: u64, value: u32) {
    // SAFETY: the register page has no memory behind it; the store is an exit
    // to the VMM and changes no guest memory.
    unsafe { write_volatile(reg as *mut u32, value) };
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: lfence;rdtsc only reads the time-stamp counter (CR4.TSD is clear).
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

struct Console {
    mailbox: *mut Mailbox,
    len: usize,
}

impl Console {
    fn new(mailbox: *mut Mailbox) -> Self {
        Self { mailbox, len: 0 }
    }
    fn byte(&mut self, b: u8) {
        if self.len == CONSOLE_BYTES {
            self.flush();
        }
        // SAFETY: the mailbox page is identity-mapped and owned by this vCPU;
        // `len < CONSOLE_BYTES` keeps the write inside `console`.
        unsafe { write_volatile(&mut (*self.mailbox).console[self.len], b) };
        self.len += 1;
    }
    fn str(&mut self, s: &str) -> &mut Self {
        for b in s.bytes() {
            self.byte(b);
        }
        self
    }
    fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while n > 0 {
            n -= 1;
            self.byte(digits[n]);
        }
        self
    }
    fn flush(&mut self) {
        if self.len > 0 {
            write_reg(REG_CONSOLE, self.len as u32);
            self.len = 0;
        }
    }
}

/// Reads command and arguments, which the VMM wrote before resuming us.
fn read_command(mb: *mut Mailbox) -> (u64, [u64; 6]) {
    // SAFETY: the mailbox is identity-mapped; volatile because the VMM writes it
    // while this vCPU is stopped in an exit.
    unsafe { (read_volatile(&(*mb).command), read_volatile(&(*mb).args)) }
}

fn set_results(mb: *mut Mailbox, results: [u64; 6]) {
    // SAFETY: as in `read_command`.
    unsafe { write_volatile(&mut (*mb).results, results) };
}

/// The address whose pattern word belongs at `a` in a range starting at
/// `start`, for a pattern laid out from `origin` (0: from `start` itself).
fn pattern_addr(a: u64, start: u64, origin: u64) -> u64 {
    if origin == 0 {
        a
    } else {
        a - start + origin
    }
}

fn fill(start: u64, len: u64, seed: u64, origin: u64) -> u32 {
    if start % 8 != 0 || len % 8 != 0 {
        return status::BAD_ARGS;
    }
    let mut a = start;
    while a < start + len {
        // SAFETY: the VMM asked for this range; it is identity-mapped. A range
        // without memory behind it exits to the VMM, which reports it.
        unsafe { write_volatile(a as *mut u64, pattern_word(seed, pattern_addr(a, start, origin))) };
        a += 8;
    }
    status::OK
}

fn verify(mb: *mut Mailbox, start: u64, len: u64, expect: impl Fn(u64) -> u64) -> u32 {
    if start % 8 != 0 || len % 8 != 0 {
        return status::BAD_ARGS;
    }
    let mut a = start;
    while a < start + len {
        // SAFETY: as in `fill`.
        let got = unsafe { read_volatile(a as *const u64) };
        let want = expect(a);
        if got != want {
            set_results(mb, [a, want, got, 0, 0, 0]);
            return status::MISMATCH;
        }
        a += 8;
    }
    set_results(mb, [len / 8, 0, 0, 0, 0, 0]);
    status::OK
}

fn touch(mb: *mut Mailbox, args: [u64; 6], timed: bool) -> u32 {
    let [start, len, stride, write, results_at, stamps_at] = args;
    if stride == 0 {
        return status::BAD_ARGS;
    }
    let (mut n, mut total) = (0u64, 0u64);
    let mut a = start;
    while a < start + len {
        let t0 = if timed { rdtsc() } else { 0 };
        // SAFETY: as in `fill`.
        unsafe {
            if write != 0 {
                write_volatile(a as *mut u8, n as u8);
            } else {
                read_volatile(a as *const u8);
            }
        }
        if timed {
            let dt = rdtsc().wrapping_sub(t0);
            total += dt;
            // SAFETY: the VMM provides a prefaulted result buffer of one u64 per access.
            unsafe { write_volatile((results_at + 8 * n) as *mut u64, dt) };
            if stamps_at != 0 {
                // SAFETY: a non-zero `stamps_at` is a second prefaulted buffer
                // of one u64 per access, provided by the VMM like the first.
                unsafe { write_volatile((stamps_at + 8 * n) as *mut u64, t0) };
            }
        }
        n += 1;
        a += stride;
    }
    set_results(mb, [n, total, 0, 0, 0, 0]);
    status::OK
}

/// Programs the DMA engine through this vCPU's descriptor and polls (at ring
/// 3, natively) until the engine reports completion.
fn dma(mb: *mut Mailbox, args: [u64; 6]) -> u32 {
    let desc = DmaDescriptor {
        op: args[0],
        src: args[1],
        dst: args[2],
        len: args[3],
        value: args[4],
        result: 0,
        status: dma_status::PENDING,
    };
    // SAFETY: the mailbox is identity-mapped and owned by this vCPU; the engine
    // reads the descriptor only after the submit store below.
    let slot = unsafe { &raw mut (*mb).dma };
    // SAFETY: as above.
    unsafe { write_volatile(slot, desc) };
    write_reg(REG_DMA_SUBMIT, slot as u64 as u32);
    loop {
        // SAFETY: as above; the engine writes `status` last.
        let st = unsafe { read_volatile(&raw const (*slot).status) };
        if st != dma_status::PENDING {
            // SAFETY: as above.
            let result = unsafe { read_volatile(&raw const (*slot).result) };
            set_results(mb, [st, result, 0, 0, 0, 0]);
            return status::OK;
        }
        core::hint::spin_loop();
    }
}

fn execute(mb: *mut Mailbox, vcpu: u64, cmd: u64, args: [u64; 6]) -> u32 {
    match cmd {
        command::FILL => fill(args[0], args[1], args[2], args[3]),
        command::VERIFY => verify(mb, args[0], args[1], |a| {
            pattern_word(args[2], pattern_addr(a, args[0], args[3]))
        }),
        command::VERIFY_CONST => verify(mb, args[0], args[1], |_| args[2]),
        command::DMA => dma(mb, args),
        command::TOUCH => touch(mb, args, false),
        command::TIMED_TOUCH => touch(mb, args, true),
        command::SPIN => {
            let mut i = 0u64;
            while args[0] == 0 || i < args[0] {
                i = i.wrapping_add(1);
                core::hint::spin_loop();
            }
            status::OK
        }
        command::READ => {
            // SAFETY: a deliberate probe; whatever it does is reported by the VMM.
            let v = unsafe { read_volatile(args[0] as *const u64) };
            set_results(mb, [v, 0, 0, 0, 0, 0]);
            status::OK
        }
        command::WRITE => {
            // SAFETY: a deliberate probe, as READ.
            unsafe { write_volatile(args[0] as *mut u64, args[1]) };
            status::OK
        }
        command::BAD_INSN => {
            // SAFETY: raises #UD on purpose; the firmware reports it.
            unsafe { asm!("ud2", options(nostack)) };
            status::OK
        }
        command::HELLO => {
            let mut c = Console::new(mb);
            c.str("hello from vCPU ").dec(vcpu).str(" (ring 3)\n").flush();
            status::OK
        }
        _ => status::BAD_COMMAND,
    }
}

#[no_mangle]
extern "C" fn guest_main(vcpu: u64, mailbox: *mut Mailbox) -> ! {
    let mut st = status::READY;
    loop {
        write_reg(REG_DOORBELL, st);
        let (cmd, args) = read_command(mailbox);
        if cmd == command::STOP {
            loop {
                write_reg(REG_DOORBELL, status::STOPPED);
            }
        }
        st = execute(mailbox, vcpu, cmd, args);
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: raises #UD; the firmware reports the RIP of the panic site.
    unsafe { asm!("ud2", options(noreturn, nostack)) }
}

// The compiler may emit calls to these; there is no libc in the guest. They use
// string instructions so the compiler cannot turn them back into calls.

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint.
    unsafe { asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags)) };
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst is below src or disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with DF set, restored after; ranges valid per caller.
    unsafe {
        asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, options(nostack))
    };
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe { asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags)) };
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges hold n bytes.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// `core` is prebuilt with unwind tables that name this symbol; with
/// panic=abort nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
