//! The launch-cost baseline: the fewest KVM calls that run the `hello` guest
//! to its end (1 vCPU, 2 MiB RAM), with no event loop, threads, stats or
//! report. `scripts/bench-launch.sh` times it against `vmm run --guest hello`.
//!
//! It shares only pure code with the VMM (boot tables, ELF loading, register
//! values), so the ratio measures what the VMM adds around the KVM calls.

use guest_image::protocol::{command, layout, mailbox_offset, status, REG_CONSOLE, REG_DOORBELL};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use vmm::boot::{elf::ElfImage, tables::write_boot_tables};
use vmm::mm::addr::{Gpa, GpaRange};
use vmm::mm::backing::{BackingKind, HostMapping};

fn main() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let boot = HostMapping::new(&BackingKind::Anon, layout::BOOT_SIZE).expect("boot memory");
    let ram = HostMapping::new(&BackingKind::Anon, 2 << 20).expect("guest RAM");
    // SAFETY: `boot` is BOOT_SIZE bytes, mapped, and not yet shared with KVM.
    let mem = unsafe { std::slice::from_raw_parts_mut(boot.as_ptr(), layout::BOOT_SIZE as usize) };
    write_boot_tables(mem, 1, 4 << 30).expect("boot tables");
    let window = |a, b| GpaRange::from_bounds(Gpa(a), Gpa(b)).unwrap();
    ElfImage::parse(
        guest_image::FIRMWARE_ELF,
        window(layout::FIRMWARE, layout::IMAGE_START),
    )
    .unwrap()
    .load_into(mem, Gpa(0));
    let image = ElfImage::parse(
        guest_image::RUNTIME_ELF,
        window(layout::IMAGE_START, layout::IMAGE_END),
    )
    .unwrap();
    image.load_into(mem, Gpa(0));
    for (slot, gpa, m) in [(0, 0, &boot), (1, layout::RAM_BASE, &ram)] {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: m.len(),
            userspace_addr: m.hva().0,
        };
        // SAFETY: the mappings outlive `vm` (declared before it is dropped at
        // the end of main, and never unmapped earlier).
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    }
    let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    vmm::vm::setup_vcpu_registers(&vcpu, 0, 1, image.entry).unwrap();

    let mailbox = boot.as_ptr() as u64 + layout::mailbox(0);
    let post = |code: u64| {
        // SAFETY: the mailbox is inside the boot mapping; the vCPU is stopped
        // in an exit while we write it.
        unsafe { std::ptr::write_volatile((mailbox + mailbox_offset::COMMAND) as *mut u64, code) }
    };
    let mut said_hello = false;
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::MmioWrite(REG_DOORBELL, data) => {
                match u32::from_le_bytes(data[..4].try_into().unwrap()) {
                    status::READY => post(command::HELLO),
                    status::OK if !said_hello => {
                        said_hello = true;
                        post(command::STOP);
                    }
                    status::STOPPED => break,
                    other => panic!("guest status {other:#x}"),
                }
            }
            VcpuExit::MmioWrite(REG_CONSOLE, data) => {
                let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
                // SAFETY: the console buffer is inside the mailbox page.
                let text = unsafe {
                    std::slice::from_raw_parts(
                        (mailbox + mailbox_offset::CONSOLE) as *const u8,
                        len,
                    )
                };
                print!("{}", String::from_utf8_lossy(text));
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
}
