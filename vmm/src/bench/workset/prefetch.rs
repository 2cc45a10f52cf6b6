//! Prefetching a replayed working set before the timed pass: each run of
//! consecutive recorded pages in one call, `MADV_POPULATE_WRITE` or
//! `UFFDIO_COPY` (from the same source the uffd-copy handler copies from,
//! so prefetch and demand paging move the same bytes).

use std::time::Instant;

use super::Workset;
use crate::bench::host::Prefill;
use crate::bench::uffd::{Armed, UffdError};
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

/// `UFFDIO_COPY` of every run of `set` from the copy source of `armed`
/// (uffd-copy) at the same offsets, one call per run (per uffd the run
/// crosses with `--uffd-per-vcpu`); timed.
pub fn copy(armed: &Armed, set: &Workset) -> Result<Prefill, PrefetchError> {
    let runs = set.runs();
    let t = Instant::now();
    for &(off, len) in &runs {
        armed.copy(off, len)?;
    }
    Ok(Prefill::new(
        "UFFDIO_COPY per run",
        set.pages.len() as u64,
        runs.len(),
        t,
    ))
}
