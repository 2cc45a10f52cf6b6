//! The commands a vCPU runs in one timed pass, and the offsets they touch, in
//! order. The tool, the raw baseline and the host floor all derive their
//! accesses from here, so the three measure the identical pattern.

use guest_image::protocol::command;

use super::config::{Access, FaultsConfig, Pattern, TEST_BASE};
use crate::mm::addr::PAGE_SIZE;
use crate::plan::Command;

/// Most commands an ascending pass is split into (each completed command
/// advances the progress bar; the exits between them are outside every
/// timed window).
pub const MAX_CHUNKS: u64 = 32;

/// Fewest accesses per command of an ascending pass.
pub const MIN_CHUNK: u64 = 256;

/// splitmix64: a small, well-mixed PRNG step (no dependency needed).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Offsets from [`TEST_BASE`] that vCPU `index` touches in one pass, in order.
pub fn touched_offsets(cfg: &FaultsConfig, index: u64) -> Vec<u64> {
    let (start, len) = cfg.part(index);
    match cfg.pattern {
        Pattern::Random => {
            let mut pages: Vec<u64> = (0..len / PAGE_SIZE)
                .map(|p| start + p * PAGE_SIZE)
                .collect();
            let mut state = cfg.seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407);
            for i in (1..pages.len()).rev() {
                let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
                pages.swap(i, j);
            }
            pages
        }
        p => (0..p.accesses(len))
            .map(|i| start + i * p.stride())
            .collect(),
    }
}

fn timed_touch(gpa: u64, len: u64, stride: u64, access: Access, results: u64) -> Command {
    let write = u64::from(access == Access::Write);
    Command::new(command::TIMED_TOUCH, [gpa, len, stride, write, results, 0])
}

/// The guest commands of vCPU `index`'s timed pass; access `i` stores its
/// `rdtsc` delta at `results_gpa + 8 * i`.
pub fn pass_commands(cfg: &FaultsConfig, index: u64, results_gpa: u64) -> Vec<Command> {
    match cfg.pattern {
        Pattern::Random => touched_offsets(cfg, index)
            .into_iter()
            .enumerate()
            .map(|(i, off)| {
                timed_touch(
                    TEST_BASE + off,
                    1,
                    PAGE_SIZE,
                    cfg.access,
                    results_gpa + 8 * i as u64,
                )
            })
            .collect(),
        p => {
            let (start, len) = cfg.part(index);
            let stride = p.stride();
            let accesses = p.accesses(len);
            let per_chunk = accesses.div_ceil(MAX_CHUNKS).max(MIN_CHUNK);
            (0..accesses)
                .step_by(per_chunk as usize)
                .map(|first| {
                    let n = per_chunk.min(accesses - first);
                    let from = first * stride;
                    let chunk_len = (n * stride).min(len - from);
                    timed_touch(
                        TEST_BASE + start + from,
                        chunk_len,
                        stride,
                        cfg.access,
                        results_gpa + 8 * first,
                    )
                })
                .collect()
        }
    }
}

/// The same commands storing each access's absolute start stamp too: an
/// access whose delta goes to `results_gpa + 8 * i` gets its stamp at
/// `stamps_gpa + 8 * i` (TIMED_TOUCH's `args[5]`).
pub fn with_stamps(mut cmds: Vec<Command>, results_gpa: u64, stamps_gpa: u64) -> Vec<Command> {
    for c in &mut cmds {
        c.args[5] = stamps_gpa + (c.args[4] - results_gpa);
    }
    cmds
}

/// A write TOUCH of every page of `[gpa, gpa + len)`: faults a result buffer
/// in (host and KVM) before the timed pass writes to it.
pub fn prefault_command(gpa: u64, len: u64) -> Command {
    Command::new(command::TOUCH, [gpa, len, PAGE_SIZE, 1, 0, 0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::config::Backing;

    #[test]
    fn test_small_sequential_pass_is_one_command_over_each_page() {
        let cfg = FaultsConfig::small(16 << 10, Backing::ANON);
        assert_eq!(touched_offsets(&cfg, 0), vec![0, 4096, 8192, 12288]);
        assert_eq!(pass_commands(&cfg, 0, 0x4000_0000).len(), 1);
    }

    #[test]
    fn test_random_offsets_are_a_permutation_of_the_pages() {
        let mut cfg = FaultsConfig::small(64 * PAGE_SIZE, Backing::ANON);
        cfg.pattern = Pattern::Random;
        let offs = touched_offsets(&cfg, 0);
        let mut sorted = offs.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..64).map(|p| p * PAGE_SIZE).collect::<Vec<_>>());
        assert_ne!(offs, sorted, "shuffled");
    }

    #[test]
    fn test_chunked_commands_cover_every_access_once() {
        let mut cfg = FaultsConfig::small(1000 * PAGE_SIZE, Backing::ANON);
        cfg.pattern = Pattern::Stride(3 * PAGE_SIZE);
        let cmds = pass_commands(&cfg, 0, 0x1000);
        assert!(cmds.len() as u64 <= MAX_CHUNKS);
        let mut touched = Vec::new();
        for c in &cmds {
            let [gpa, len, stride, _, results, _] = c.args;
            assert_eq!((results - 0x1000) / 8, touched.len() as u64);
            let mut a = gpa;
            while a < gpa + len {
                touched.push(a - TEST_BASE);
                a += stride;
            }
        }
        assert_eq!(touched, touched_offsets(&cfg, 0));
    }
}
