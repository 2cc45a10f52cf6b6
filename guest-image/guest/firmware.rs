//! Guest firmware: the ring-0 exception stubs every guest gets, whatever its
//! image. Loaded by the VMM at `layout::FIRMWARE`; the IDT points vector `v` at
//! `FIRMWARE + v * STUB_STRIDE`. Each stub pushes a dummy error code where the
//! CPU pushes none, pushes the vector, and jumps to a common handler that fills
//! `Mailbox::exception` of the faulting vCPU and reports to `REG_EXCEPTION`.
//!
//! The handler finds the mailbox without any per-vCPU state: TSS.RSP0 is the
//! end of the ring-0 stack page that follows the vCPU's mailbox page, so
//! `(rsp & !0xfff) - 0x1000` is the mailbox.
#![no_std]
#![no_main]

#[allow(dead_code)]
mod protocol {
    include!("../src/protocol.rs");
}

use core::arch::global_asm;
use protocol::{mailbox_offset::EXCEPTION, REG_EXCEPTION};

global_asm!(
    ".section .text.stubs, \"ax\"",
    ".globl exception_stubs",
    "exception_stubs:",
    ".set vec, 0",
    ".rept 32",
    ".balign 16",
    // Vectors 8, 10-14, 17, 21, 29, 30 push an error code; the others get a 0.
    ".if (vec - 8) && (vec - 10) && (vec - 11) && (vec - 12) && (vec - 13) && (vec - 14) && (vec - 17) && (vec - 21) && (vec - 29) && (vec - 30)",
    ".byte 0x6a, 0", // push 0
    ".endif",
    ".byte 0x6a, vec", // push vec
    "jmp exception_common",
    ".set vec, vec + 1",
    ".endr",
    "exception_common:",
    "mov rax, rsp",
    "and rax, -4096",
    "sub rax, 4096",
    "pop rcx",
    "mov [rax + {exc}], rcx",      // vector
    "pop rcx",
    "mov [rax + {exc} + 8], rcx",  // error code
    "mov rcx, [rsp]",
    "mov [rax + {exc} + 16], rcx", // rip
    "mov rcx, cr2",
    "mov [rax + {exc} + 24], rcx", // cr2
    "mov rcx, [rsp + 24]",
    "mov [rax + {exc} + 32], rcx", // rsp
    "mov rax, [rax + {exc}]",
    "mov rdx, {reg}",
    "mov [rdx], eax",
    "2:",
    "hlt",
    "jmp 2b",
    exc = const EXCEPTION,
    reg = const REG_EXCEPTION,
);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
