//! The oracle's coverage counters, cleared after every input.
//!
//! Sanitizer coverage gives every instrumented basic block an 8-bit
//! counter in the `__sancov_cntrs` section and, in the same order, its
//! address in `__sancov_pcs`; libFuzzer turns every counter an input made
//! non-zero into features, one bookkeeping step each (a third of the time
//! this target runs). About a quarter of the counters an input hits are in
//! the code that judges it, whose branches restate the code under test's
//! or always pass, so they are little signal for the cost. rustc can leave
//! out instrumentation only per crate, and the oracle reads the memory
//! manager's private state, so it stays compiled in `vmm`; instead, at
//! startup the symbol table of this executable tells which counters lie in
//! the oracle's functions (by module path, in the mangled name, so generic
//! code instantiated for the oracle's types counts too), and after every
//! input those runs of counters are set to zero. Every check still runs;
//! only the feedback from the checking code is dropped.

use std::sync::LazyLock;

use crate::elf;

/// Module paths of the oracle as they appear in a mangled symbol (v0
/// and legacy mangling both spell a path as length-prefixed names).
const ORACLE: [&str; 5] = [
    "3vmm4fuzz5model",
    "3vmm4fuzz3sim",
    "3vmm4fuzz5bytes",
    "3vmm8scenario10invariants",
    "3vmm2mm7manager5check",
];

extern "C" {
    /// glibc's auxiliary vector: `AT_ENTRY` gives where the entry
    /// point was loaded, hence the executable's load bias.
    fn getauxval(kind: std::ffi::c_ulong) -> std::ffi::c_ulong;
}
const AT_ENTRY: std::ffi::c_ulong = 9;

/// The oracle's counters: where the counter section was loaded, and the
/// runs (first index, length) of counters in oracle functions.
struct Oracle {
    counters: usize,
    runs: Vec<(usize, usize)>,
}

static ORACLE_COUNTERS: LazyLock<Oracle> = LazyLock::new(|| {
    let kept = Oracle {
        counters: 0,
        runs: Vec::new(),
    };
    if std::env::var_os("VMM_FUZZ_ORACLE_COVERAGE").is_some_and(|v| v == "1") {
        return kept;
    }
    // Without a symbol table (a stripped binary) the fuzzer still works,
    // steered by every counter as before.
    let oracle = find().unwrap_or_else(|e| {
        eprintln!("WARNING: oracle coverage kept: {e}");
        kept
    });
    eprintln!(
        "INFO: oracle coverage: {} counters in {} runs cleared after every input",
        oracle.runs.iter().map(|r| r.1).sum::<usize>(),
        oracle.runs.len()
    );
    oracle
});

/// Sets the oracle's counters to zero.
pub fn clear() {
    let oracle = &*ORACLE_COUNTERS;
    let counters = oracle.counters as *mut u8;
    for &(first, len) in &oracle.runs {
        // SAFETY: every run lies inside `__sancov_cntrs` (`find` takes its
        // indices from the PC table of as many entries), writable data of
        // this process: plain bytes that the instrumentation increments and
        // libFuzzer zeroes before every input in the same way.
        unsafe { std::ptr::write_bytes(counters.add(first), 0, len) };
    }
}

/// The oracle's counters, from this executable's symbol table.
fn find() -> Result<Oracle, String> {
    // (The sections are found in the file, not through the linker's
    // `__start___sancov_cntrs` symbols: naming those here would clash
    // with the sanitizer-coverage pass's own declarations of them.)
    let exe = std::fs::read("/proc/self/exe").map_err(|e| format!("/proc/self/exe: {e}"))?;
    let image = elf::Image::parse(&exe)?;
    // SAFETY: getauxval only reads the process's auxiliary vector.
    let entry = unsafe { getauxval(AT_ENTRY) } as usize;
    let bias = entry.wrapping_sub(image.entry as usize);
    let (counters, n) = image.section(b"__sancov_cntrs")?;
    let (pcs, pcs_size) = image.section(b"__sancov_pcs")?;
    if pcs_size != 16 * n {
        return Err(format!("{n} counters but a PC table of {pcs_size} bytes"));
    }
    let pcs = bias.wrapping_add(pcs as usize) as *const usize;
    // SAFETY: `__sancov_pcs` is loaded (the file's section at the load
    // bias) and holds a (pc, flags) pair for each counter of
    // `__sancov_cntrs`, in the same order (LLVM's sanitizer coverage,
    // `-sanitizer-coverage-pc-table`); the loader relocated the pcs.
    let pcs = unsafe { std::slice::from_raw_parts(pcs, 2 * n) };
    let symbols = &image.symbols;
    let mut oracle: Vec<(usize, usize)> = symbols
        .iter()
        .filter(|s| s.func && ORACLE.iter().any(|p| contains(s.name, p.as_bytes())))
        .map(|s| (bias.wrapping_add(s.value as usize), s.size as usize))
        .collect();
    oracle.sort_unstable();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for i in 0..n {
        let pc = pcs[2 * i];
        let at = oracle.partition_point(|&(addr, _)| addr <= pc);
        let inside = at > 0 && pc < oracle[at - 1].0 + oracle[at - 1].1;
        if !inside {
            continue;
        }
        match runs.last_mut() {
            Some((first, len)) if *first + *len == i => *len += 1,
            _ => runs.push((i, 1)),
        }
    }
    Ok(Oracle {
        counters: bias.wrapping_add(counters as usize),
        runs,
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
