//! Prefetching a replayed working set before the timed pass: each run of
//! consecutive recorded pages in one call, `MADV_POPULATE_WRITE` or
//! `UFFDIO_COPY` (reading the run from the same source the uffd-copy
//! handler copies from, so prefetch and demand paging move the same bytes).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use super::Workset;
use crate::bench::host::Prefill;
use crate::bench::uffd::{UffdError, Userfault};
use crate::mm::backing::{BackingError, HostMapping};

/// Errors of a prefetch.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// Populating failed.
    #[error("prefetch: {0}")]
    Backing(#[from] BackingError),
    /// Copying failed.
    #[error("prefetch: {0}")]
    Uffd(#[from] UffdError),
    /// Reading the copy source failed.
    #[error("prefetch: reading the copy source at offset {offset:#x}: {source}")]
    Source {
        /// Offset in the source.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// `MADV_POPULATE_WRITE` of every run of `set` on `test`, timed.
pub fn populate(test: &HostMapping, set: &Workset) -> Result<Prefill, PrefetchError> {
    let runs = set.runs();
    let t = Instant::now();
    for &(off, len) in &runs {
        test.populate_write(off, len)?;
    }
    Ok(Prefill::new(
        "MADV_POPULATE_WRITE per run",
        set.pages.len() as u64,
        runs.len(),
        t,
    ))
}

/// `UFFDIO_COPY` of every run of `set` from `source` (at the same offsets)
/// into the range registered with `uffd`, which starts at host address
/// `base`; timed, reading the source included.
pub fn copy(
    uffd: &Userfault,
    base: u64,
    source: &File,
    set: &Workset,
) -> Result<Prefill, PrefetchError> {
    let runs = set.runs();
    let longest = runs.iter().map(|r| r.1).max().unwrap_or(0);
    let mut buf = vec![0u8; longest as usize];
    let t = Instant::now();
    for &(off, len) in &runs {
        let chunk = &mut buf[..len as usize];
        source
            .read_exact_at(chunk, off)
            .map_err(|source| PrefetchError::Source {
                offset: off,
                source,
            })?;
        uffd.copy(base + off, chunk)?;
    }
    Ok(Prefill::new(
        "UFFDIO_COPY per run",
        set.pages.len() as u64,
        runs.len(),
        t,
    ))
}
