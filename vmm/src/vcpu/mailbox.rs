//! A vCPU's mailbox page in the boot region, read and written through the
//! VMM's vm-memory view ([`BootMemory`]): the commands the VMM posts, the
//! results, console text and exception records the guest leaves there.

use guest_image::protocol::{layout, mailbox_offset, ExceptionRecord, CONSOLE_BYTES};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::boot::memory::BootMemory;
use crate::plan::Command;

/// The mailbox of one vCPU.
#[derive(Debug)]
pub(super) struct Mailbox {
    boot: BootMemory,
    base: u64,
}

impl Mailbox {
    /// The mailbox of vCPU `index`.
    pub(super) fn new(boot: BootMemory, index: u64) -> Self {
        Self {
            boot,
            base: layout::mailbox(index),
        }
    }

    /// Guest-physical address of the DMA descriptor slot of this mailbox.
    pub(super) fn dma_descriptor(&self) -> u64 {
        self.base + mailbox_offset::DMA
    }

    fn read<T: ByteValued>(&self, offset: u64) -> T {
        // The mailbox lies in the boot region, which is always mapped: a failure
        // here is a VMM bug.
        self.boot
            .memory()
            .read_obj(GuestAddress(self.base + offset))
            .expect("mailbox is inside the boot region")
    }

    fn write<T: ByteValued>(&self, offset: u64, v: T) {
        self.boot
            .memory()
            .write_obj(v, GuestAddress(self.base + offset))
            .expect("mailbox is inside the boot region");
    }

    /// Posts `cmd` (arguments first, then the command word the guest polls).
    pub(super) fn post(&self, cmd: &Command) {
        self.write(mailbox_offset::ARGS, cmd.args);
        self.write(mailbox_offset::COMMAND, cmd.code);
    }

    /// The results of the command that just ended.
    pub(super) fn results(&self) -> [u64; 6] {
        self.read(mailbox_offset::RESULTS)
    }

    /// The exception the guest reported.
    pub(super) fn exception(&self) -> ExceptionRecord {
        let at = mailbox_offset::EXCEPTION;
        ExceptionRecord {
            vector: self.read(at),
            error_code: self.read(at + 8),
            rip: self.read(at + 16),
            cr2: self.read(at + 24),
            rsp: self.read(at + 32),
        }
    }

    /// The first `len` bytes of console text (at most the buffer's size).
    pub(super) fn console(&self, len: usize) -> String {
        let mut buf = vec![0u8; len.min(CONSOLE_BYTES)];
        self.boot
            .memory()
            .read_slice(&mut buf, GuestAddress(self.base + mailbox_offset::CONSOLE))
            .expect("mailbox is inside the boot region");
        String::from_utf8_lossy(&buf).into_owned()
    }
}
