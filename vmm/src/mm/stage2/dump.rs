//! A compact listing of what the table maps, for reports and tests.

use serde::ser::{Serialize, SerializeStruct, Serializer};

use super::entry::{level_size, Decoded, Entry, PageSize, Perms, ENTRIES, ROOT_LEVEL};
use super::reclaim::{self, TablePage};
use super::slot;
use super::table::{corrupt, Stage2Table};
use crate::mm::addr::{Gpa, GpaRange, Hva};

/// A run of leaves of one size and permission mapping contiguous guest-
/// physical memory to contiguous host-virtual memory.
///
/// Serializes as `{"gpa": "0x…", "len": n, "hva": "0x…", "page_size": "2M",
/// "perms": "rw-"}`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MappedRun {
    /// The guest-physical range of the run.
    pub range: GpaRange,
    /// The host-virtual address of the run's first byte.
    pub hva: Hva,
    /// The size of every leaf in the run.
    pub page_size: PageSize,
    /// The permissions of every leaf in the run.
    pub perms: Perms,
}

impl MappedRun {
    /// Whether `next` continues this run (adjacent in both address spaces,
    /// same leaf size and permissions).
    fn continued_by(&self, next: &MappedRun) -> bool {
        self.page_size == next.page_size
            && self.perms == next.perms
            && self.range.end() == next.range.start()
            && self.hva.checked_add(self.range.len()) == Some(next.hva)
    }
}

impl Serialize for MappedRun {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("MappedRun", 5)?;
        st.serialize_field("gpa", &format!("{:#x}", self.range.start().0))?;
        st.serialize_field("len", &self.range.len())?;
        st.serialize_field("hva", &format!("{:#x}", self.hva.0))?;
        st.serialize_field("page_size", self.page_size.name())?;
        st.serialize_field("perms", &self.perms.to_string())?;
        st.end()
    }
}

impl Stage2Table {
    /// Every mapping, ascending by guest-physical address, with adjacent
    /// leaves merged into runs. Taken under the exclusive writer lock, so it
    /// is a consistent snapshot (walkers may still set A/D bits meanwhile).
    ///
    /// ```
    /// use vmm::mm::addr::{Gpa, Hva};
    /// use vmm::mm::stage2::{PageSize, Perms, Stage2Table};
    /// let t = Stage2Table::new();
    /// t.map(Gpa(0x0000), Hva(0x10_0000), PageSize::Size4K, Perms::RW).unwrap();
    /// t.map(Gpa(0x1000), Hva(0x10_1000), PageSize::Size4K, Perms::RW).unwrap();
    /// let runs = t.dump();
    /// assert_eq!(runs.len(), 1);
    /// assert_eq!(runs[0].range.len(), 0x2000);
    /// let json = serde_json::to_string(&runs).unwrap();
    /// assert!(json.contains(r#""page_size":"4K""#));
    /// ```
    pub fn dump(&self) -> Vec<MappedRun> {
        let _excl = self.lock_exclusive();
        let mut runs: Vec<MappedRun> = Vec::new();
        self.with_root(|root, guard| {
            visit(
                root,
                ROOT_LEVEL,
                0,
                guard,
                &mut |run| match runs.last_mut() {
                    Some(last) if last.continued_by(&run) => {
                        let len = last.range.len() + run.range.len();
                        // The merged run ends where `run` ends, inside the
                        // 48-bit space, so the range cannot overflow.
                        if let Some(r) = GpaRange::new(last.range.start(), len) {
                            last.range = r;
                        }
                    }
                    _ => runs.push(run),
                },
            );
        });
        runs
    }
}

fn visit(
    table: &TablePage,
    level: u8,
    base: u64,
    guard: &crossbeam_epoch::Guard,
    out: &mut impl FnMut(MappedRun),
) {
    let size = level_size(level);
    // Under the exclusive lock: empty entries stay empty, and cache lines
    // of them are passed over.
    for i in table.used(0, ENTRIES - 1) {
        let gpa = base + i as u64 * size;
        let raw = slot::read(table.slot(i));
        match Entry(raw).decode(level) {
            Decoded::Empty | Decoded::Frozen => {}
            Decoded::Corrupt => corrupt(raw, gpa, level),
            Decoded::Table(addr) => {
                // SAFETY: a table pointer read while pinned.
                let child = unsafe { reclaim::page_at(addr, guard) };
                visit(child, level - 1, gpa, guard, out);
            }
            Decoded::Leaf(leaf) => {
                let Some(page_size) = PageSize::from_level(level) else {
                    corrupt(raw, gpa, level)
                };
                if let Some(range) = GpaRange::new(Gpa(gpa), size) {
                    out(MappedRun {
                        range,
                        hva: leaf.hva,
                        page_size,
                        perms: leaf.perms,
                    });
                }
            }
        }
    }
}
