//! Which host pages are mlocked, from the kernel's view of this process:
//! `/proc/self/smaps` lists every VMA with its `VmFlags`, where `lo` is
//! `VM_LOCKED` (`mlock` splits a VMA at the locked range's edges, so a
//! page is locked exactly when the VMA holding it carries the flag).

use std::io;

/// The `[start, end)` host ranges of the VMAs carrying `VM_LOCKED`,
/// sorted.
pub fn locked_ranges() -> io::Result<Vec<(u64, u64)>> {
    Ok(parse_smaps(&std::fs::read_to_string("/proc/self/smaps")?))
}

/// The locked VMAs of an smaps text.
fn parse_smaps(text: &str) -> Vec<(u64, u64)> {
    let mut locked = Vec::new();
    let mut vma = None;
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(range) = vma.take() {
                if flags.split_whitespace().any(|f| f == "lo") {
                    locked.push(range);
                }
            }
            continue;
        }
        // A VMA header: "start-end perms offset dev inode [path]".
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = head.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                vma = Some((a, b));
            }
        }
    }
    locked.sort_unstable();
    locked
}

/// Whether the page at `hva` lies in one of `ranges` (sorted, disjoint).
pub fn is_locked(ranges: &[(u64, u64)], hva: u64) -> bool {
    let i = ranges.partition_point(|r| r.1 <= hva);
    ranges.get(i).is_some_and(|r| r.0 <= hva)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_smaps_keeps_only_locked_vmas() {
        let text = "\
7f0000000000-7f0000002000 rw-p 00000000 00:00 0
Size:                  8 kB
VmFlags: rd wr mr mw me ac
7f0000002000-7f0000003000 rw-p 00000000 00:00 0
Locked:                4 kB
VmFlags: rd wr mr mw me lo ac
";
        let r = parse_smaps(text);
        assert_eq!(r, vec![(0x7f00_0000_2000, 0x7f00_0000_3000)]);
        assert!(is_locked(&r, 0x7f00_0000_2000));
        assert!(!is_locked(&r, 0x7f00_0000_1000));
        assert!(!is_locked(&r, 0x7f00_0000_3000));
    }

    #[test]
    fn test_an_mlocked_page_is_seen_locked_and_unlocked_after_munlock() {
        let len = 4 * 4096;
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as u64;
        // SAFETY: the second page of the mapping made above.
        let ret = unsafe { libc::mlock((base + 4096) as *const libc::c_void, 4096) };
        if ret != 0 {
            eprintln!("skipped: mlock refused (RLIMIT_MEMLOCK)");
            // SAFETY: the mapping made above, unused after this.
            unsafe { libc::munmap(p, len) };
            return;
        }
        let r = locked_ranges().unwrap();
        assert!(is_locked(&r, base + 4096));
        assert!(!is_locked(&r, base));
        assert!(!is_locked(&r, base + 2 * 4096));
        // SAFETY: the page locked above.
        unsafe { libc::munlock((base + 4096) as *const libc::c_void, 4096) };
        assert!(!is_locked(&locked_ranges().unwrap(), base + 4096));
        // SAFETY: the mapping made above, unused after this.
        unsafe { libc::munmap(p, len) };
    }
}
