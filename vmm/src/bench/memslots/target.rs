//! The two implementations every test runs, on VMs built alike: [`Ours`],
//! the project's code path (the VM's [`MemoryManager`]: one `apply` per
//! memslot change; host access through slot guards), and [`Raw`], a minimal
//! loop of the same KVM ioctls and host calls on a table of slots, as KVM's
//! `memslot_perf_test` does them.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

use super::config::{MemslotsError, RawMove};
use super::layout::SlotLayout;
use crate::mm::addr::{Gpa, GpaRange, PAGE_SIZE};
use crate::mm::backing::{BackingKind, HostMapping};
use crate::mm::guard::Visit;
use crate::mm::manager::MemoryManager;
use crate::mm::slot_map::{PlugSpec, SlotFlags};

/// What a test does to guest memory from the host.
pub trait Target {
    /// Registers the area's slots; returns how long that took.
    fn populate(&mut self) -> Result<Duration, MemslotsError>;
    /// Discards (`MADV_DONTNEED`) pages `[page, page + count)` of the area,
    /// one call per piece inside one slot, `chunk` pages at most per call.
    fn discard(&mut self, page: u64, count: u64, chunk: u64) -> Result<(), MemslotsError>;
    /// Moves slot `index` to guest-physical `to`.
    fn move_slot(&mut self, index: u64, to: u64) -> Result<(), MemslotsError>;
    /// For every page: checks the byte the guest's TOUCH wrote at its start
    /// (page `i` of vCPU part starting at page `first` holds `(i - first) as
    /// u8`, see `parts`), then writes a word in the page's second half.
    fn read_write(&mut self, parts: &[(u64, u64)]) -> Result<(), MemslotsError>;
}

/// The value the host writes in every page in the rw test.
pub const HOST_VALUE: u64 = 0x99AA_BBCC_DDEE_FF00;

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MemslotsError {
    let what = what.into();
    move |source| MemslotsError::Os { what, source }
}

/// `madvise(MADV_DONTNEED)` of `len` bytes at `hva`.
///
/// # Safety
/// `[hva, hva + len)` must be guest memory of this bench, mapped for the
/// call's duration, whose contents the caller may lose.
unsafe fn dont_need(hva: u64, len: u64) -> Result<(), MemslotsError> {
    // SAFETY: our caller guarantees the range is mapped and disposable;
    // DONTNEED only drops its pages (later reads see zeros).
    let r = unsafe { libc::madvise(hva as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(MemslotsError::Os {
            what: format!("madvise({hva:#x}, {len:#x}, MADV_DONTNEED)"),
            source: std::io::Error::last_os_error(),
        })
    }
}

/// The manager's path.
pub struct Ours {
    memory: Arc<MemoryManager>,
    layout: SlotLayout,
    mapping: Arc<HostMapping>,
    /// Slots moved away from their place: index -> where they are now.
    moved: std::collections::HashMap<u64, u64>,
}

impl Ours {
    /// The area `layout`, backed by one fresh anonymous mapping, on `memory`.
    /// Slot `i` starts `i` pages further into the mapping than into the
    /// area: the unused page between two slots' host windows keeps the map
    /// from merging them (it merges neighbours contiguous in both spaces,
    /// as the kernel merges VMAs).
    pub fn new(memory: Arc<MemoryManager>, layout: SlotLayout) -> Result<Self, MemslotsError> {
        let len = layout.len() + layout.slots * PAGE_SIZE;
        let mapping = Arc::new(HostMapping::new(&BackingKind::Anon, len)?);
        Ok(Self {
            memory,
            layout,
            mapping,
            moved: std::collections::HashMap::new(),
        })
    }
}

impl Target for Ours {
    fn populate(&mut self) -> Result<Duration, MemslotsError> {
        let plugs: Vec<PlugSpec> = (0..self.layout.slots)
            .map(|i| {
                let (gpa, pages) = self.layout.slot(i);
                PlugSpec {
                    gpa: Gpa(gpa),
                    size: pages * PAGE_SIZE,
                    mapping: self.mapping.clone(),
                    offset: gpa - self.layout.base + i * PAGE_SIZE,
                    flags: SlotFlags::NONE,
                }
            })
            .collect();
        let t = Instant::now();
        self.memory
            .apply(|m| m.plug_many(plugs))
            .map_err(|source| MemslotsError::Memory {
                what: format!("plugging {} slots", self.layout.slots),
                source,
            })?;
        Ok(t.elapsed())
    }

    fn discard(&mut self, page: u64, count: u64, chunk: u64) -> Result<(), MemslotsError> {
        let end = (page + count).min(self.layout.pages);
        if page >= end {
            return Ok(());
        }
        // One walk over the range: each slot guarded while its pieces are
        // discarded (what keeps its memory mapped meanwhile), found by one
        // step of the map's iterator instead of a lookup per slot.
        self.walk(page, end - page, |_, hva, pages| {
            let mut done = 0;
            while done < pages {
                let n = (pages - done).min(chunk);
                // SAFETY: the walk's guard keeps the slot, and so its host
                // memory, mapped while we are called; `walk` checked that
                // `[hva, hva + pages)` lies in it; the bench's guest memory
                // is disposable.
                unsafe { dont_need(hva + done * PAGE_SIZE, n * PAGE_SIZE)? };
                done += n;
            }
            Ok(())
        })
    }

    fn move_slot(&mut self, index: u64, to: u64) -> Result<(), MemslotsError> {
        let (home, pages) = self.layout.slot(index);
        let now = self.moved.get(&index).copied().unwrap_or(home);
        self.memory
            .apply(|m| m.move_range(Gpa(now), pages * PAGE_SIZE, Gpa(to)))
            .map_err(|source| MemslotsError::Memory {
                what: format!("moving slot {index} from {now:#x} to {to:#x}"),
                source,
            })?;
        if to == home {
            self.moved.remove(&index);
        } else {
            self.moved.insert(index, to);
        }
        Ok(())
    }

    fn read_write(&mut self, parts: &[(u64, u64)]) -> Result<(), MemslotsError> {
        for &(first, count) in parts {
            // One walk per vCPU part: each slot guarded while its pages are
            // checked and written, one translation per slot.
            self.walk(
                first,
                count,
                #[inline(always)]
                |gpa, base, pages| {
                    let page = (gpa.0 - self.layout.base) / PAGE_SIZE;
                    for k in 0..pages {
                        let hva = base + k * PAGE_SIZE;
                        // SAFETY: `[base, base + pages)` lies in the slot
                        // (checked by the walk), whose host memory its guard
                        // keeps mapped while we are called; the guest writes
                        // only a page's first byte and no vCPU runs during this
                        // pass.
                        let word = unsafe { std::ptr::read_volatile(hva as *const u64) };
                        check_touched(gpa.0 + k * PAGE_SIZE, word, page + k - first)?;
                        // SAFETY: as above, the page's second half (the slot is
                        // writable: the area is plugged without read-only).
                        unsafe {
                            std::ptr::write_volatile((hva + PAGE_SIZE / 2) as *mut u64, HOST_VALUE)
                        };
                    }
                    Ok(())
                },
            )?;
        }
        Ok(())
    }
}

impl Ours {
    /// Walks pages `[page, page + count)` of the area slot by slot with a
    /// [`GuestReader::walk`](crate::mm::guard::GuestReader::walk), calling
    /// `each(gpa, hva, pages)` for every slot's part (first address, its
    /// host address, pages) while the slot is guarded. A hole is an error:
    /// the whole area is plugged.
    fn walk(
        &self,
        page: u64,
        count: u64,
        mut each: impl FnMut(Gpa, u64, u64) -> Result<(), MemslotsError>,
    ) -> Result<(), MemslotsError> {
        let start = Gpa(self.layout.base + page * PAGE_SIZE);
        let range = GpaRange::new(start, count * PAGE_SIZE)
            .ok_or_else(|| MemslotsError::Mismatch(format!("pages {page}+{count} of the area")))?;
        let mut reader = self.memory.reader();
        // The visitor (and `each` in it) inlined into the walk's loop over
        // a batch of slots: the pass over their pages then runs as one
        // loop, as the raw loop's does, instead of a call per slot.
        let flow = reader
            .walk(
                range,
                #[inline(always)]
                |visit| {
                    let (slot, part) = match visit {
                        Visit::Slot { slot, part } => (slot, part),
                        Visit::Hole(hole) => {
                            return ControlFlow::Break(MemslotsError::Mismatch(format!(
                                "guest-physical {hole} of the area is not plugged"
                            )))
                        }
                    };
                    let hva = match slot.hva(part.start(), part.len()) {
                        Ok(hva) => hva.0,
                        Err(source) => {
                            return ControlFlow::Break(MemslotsError::Guard {
                                what: format!("host address of {part}"),
                                source,
                            })
                        }
                    };
                    match each(part.start(), hva, part.len() / PAGE_SIZE) {
                        Ok(()) => ControlFlow::Continue(()),
                        Err(e) => ControlFlow::Break(e),
                    }
                },
            )
            .map_err(|source| MemslotsError::Guard {
                what: format!("walk over {range}"),
                source,
            })?;
        match flow {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(e) => Err(e),
        }
    }
}

/// The low byte of the first word of a touched page is the guest's access
/// number.
fn check_touched(gpa: u64, word: u64, index: u64) -> Result<(), MemslotsError> {
    if word as u8 != index as u8 {
        return Err(MemslotsError::Mismatch(format!(
            "guest-physical {gpa:#x}: the host read {word:#x}, the guest wrote {:#x} there",
            index as u8
        )));
    }
    Ok(())
}

/// The raw loop: ioctls on the VM fd with ids from the top of KVM's range
/// (the manager of the same VM holds only the lowest ids), a table of slot
/// host addresses, no checks.
pub struct Raw {
    fd: Arc<VmFd>,
    layout: SlotLayout,
    mapping: Arc<HostMapping>,
    first_id: u32,
    registered: bool,
    moves: RawMove,
}

impl Raw {
    /// The area `layout` on `fd`, slot ids `max_slots - slots ..`, moving
    /// slots as `moves` says.
    pub fn new(
        fd: Arc<VmFd>,
        layout: SlotLayout,
        max_slots: u32,
        moves: RawMove,
    ) -> Result<Self, MemslotsError> {
        let len = layout.len() + layout.slots * PAGE_SIZE;
        let mapping = Arc::new(HostMapping::new(&BackingKind::Anon, len)?);
        Ok(Self {
            fd,
            first_id: max_slots - layout.slots as u32,
            layout,
            mapping,
            registered: false,
            moves,
        })
    }

    /// Host address of page `page` of the area: the same layout as
    /// `Ours` (a page between slots), so both discard and touch the same
    /// shape of host memory.
    fn hva(&self, page: u64) -> u64 {
        self.mapping.hva().0 + (page + self.layout.slot_of_page(page)) * PAGE_SIZE
    }

    fn region(&self, index: u64, gpa: u64) -> kvm_userspace_memory_region {
        let (start, pages) = self.layout.slot(index);
        kvm_userspace_memory_region {
            slot: self.first_id + index as u32,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: pages * PAGE_SIZE,
            userspace_addr: self.hva((start - self.layout.base) / PAGE_SIZE),
        }
    }

    fn set(&self, region: kvm_userspace_memory_region) -> Result<(), MemslotsError> {
        // SAFETY: a create or move registers a window of `self.mapping`,
        // which lives until `Drop` has deleted every slot (or leaks it if a
        // delete fails); the mapping serves as nothing but this guest's
        // memory.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| MemslotsError::Os {
            what: format!(
                "KVM_SET_USER_MEMORY_REGION slot {} at {:#x} size {:#x}",
                region.slot, region.guest_phys_addr, region.memory_size
            ),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })
    }
}

impl Target for Raw {
    fn populate(&mut self) -> Result<Duration, MemslotsError> {
        let t = Instant::now();
        for i in 0..self.layout.slots {
            let region = self.region(i, self.layout.slot(i).0);
            self.set(region)?;
            self.registered = true;
        }
        Ok(t.elapsed())
    }

    fn discard(&mut self, page: u64, count: u64, chunk: u64) -> Result<(), MemslotsError> {
        for (first, n) in self.layout.pieces(page, count) {
            let mut at = first;
            while at < first + n {
                let len = chunk.min(first + n - at);
                // SAFETY: inside `self.mapping`, which lives as long as
                // `self`; the bench's guest memory is disposable.
                unsafe { dont_need(self.hva(at), len * PAGE_SIZE)? };
                at += len;
            }
        }
        Ok(())
    }

    fn move_slot(&mut self, index: u64, to: u64) -> Result<(), MemslotsError> {
        if self.moves == RawMove::DeleteCreate {
            let mut delete = self.region(index, 0);
            delete.memory_size = 0;
            self.set(delete)?;
        }
        self.set(self.region(index, to))
    }

    fn read_write(&mut self, parts: &[(u64, u64)]) -> Result<(), MemslotsError> {
        for &(first, count) in parts {
            for page in first..first + count {
                let hva = self.hva(page);
                // SAFETY: page `page` of the area lies in `self.mapping`,
                // mapped while `self` lives; the guest writes only the first
                // byte of the page, and no vCPU runs during this pass.
                let word = unsafe { std::ptr::read_volatile(hva as *const u64) };
                check_touched(self.layout.base + page * PAGE_SIZE, word, page - first)?;
                // SAFETY: as above, the page's second half.
                unsafe { std::ptr::write_volatile((hva + PAGE_SIZE / 2) as *mut u64, HOST_VALUE) };
            }
        }
        Ok(())
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        for i in 0..self.layout.slots {
            let mut region = self.region(i, 0);
            region.memory_size = 0;
            if self.set(region).is_err() {
                // KVM may still map it: never unmap memory under KVM.
                std::mem::forget(self.mapping.clone());
                return;
            }
        }
    }
}

/// Raw modification op for the stress mode: create and delete one slot.
pub fn raw_add_delete(fd: &VmFd, id: u32, gpa: u64, hva: u64) -> Result<(), MemslotsError> {
    let mut region = kvm_userspace_memory_region {
        slot: id,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: PAGE_SIZE,
        userspace_addr: hva,
    };
    // SAFETY: `hva` is a page of a mapping the caller keeps alive until the
    // delete below succeeded (or forever); deleting registers nothing.
    unsafe { fd.set_user_memory_region(region) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        .map_err(os(format!("KVM_SET_USER_MEMORY_REGION create slot {id}")))?;
    region.memory_size = 0;
    // SAFETY: a delete registers no memory.
    unsafe { fd.set_user_memory_region(region) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        .map_err(os(format!("KVM_SET_USER_MEMORY_REGION delete slot {id}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::manager::SimKvm;
    use crate::mm::slot_map::{MemslotChange, SlotMapConfig};

    fn ours_on_sim(pages: u64, slots: u64) -> (Arc<SimKvm>, Ours) {
        let kvm = Arc::new(SimKvm::new());
        let memory = Arc::new(MemoryManager::new(kvm.clone(), SlotMapConfig::default()).unwrap());
        let layout = SlotLayout::new(0x1_0000_0000, pages, slots).unwrap();
        let mut ours = Ours::new(memory, layout).unwrap();
        ours.populate().unwrap();
        (kvm, ours)
    }

    #[test]
    fn test_populate_registers_one_memslot_per_area_slot() {
        let (kvm, ours) = ours_on_sim(64, 7);
        assert_eq!(kvm.memslots().len(), 7);
        assert_eq!(ours.memory.registered().len(), 7);
        ours.memory.check_consistency().unwrap();
    }

    #[test]
    fn test_moving_the_last_slot_touches_only_that_slot() {
        let (kvm, mut ours) = ours_on_sim(64, 7);
        let layout = ours.layout;
        let (home, pages) = layout.slot(6);
        let to = 0x2_0000_0000;
        let applied = ours
            .memory
            .apply(|m| m.move_range(Gpa(home), pages * PAGE_SIZE, Gpa(to)))
            .unwrap();
        let touched: Vec<u64> = applied
            .changes
            .iter()
            .map(|c| match c {
                MemslotChange::Delete { slot }
                | MemslotChange::Create { slot }
                | MemslotChange::SetFlags { slot, .. } => slot.range().start().0,
            })
            .collect();
        assert!(
            touched.iter().all(|&g| g == home || g == to),
            "{touched:#x?}"
        );
        ours.moved.insert(6, to);
        ours.move_slot(6, home).unwrap();
        assert_eq!(kvm.memslots().len(), 7);
        ours.memory.check_consistency().unwrap();
    }
}
