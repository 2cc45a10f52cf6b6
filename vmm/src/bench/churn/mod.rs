//! Faults under churn: a writer thread runs memory ops next to and on the
//! test range while the guest is timed, stamping each op's `[start, end)`
//! with the host TSC; the guest stamps each access's start with its own
//! `rdtsc`, which is the host TSC plus KVM's TSC offset (read from KVM, see
//! `super::tsc`). Every access above the pass's p99 is then charged to the
//! op whose window overlaps it ([`attribution`]).
//!
//! KVM's memslot_modification_stress_test reports the total slowdown of a
//! guest under memslot churn; this says which op cost what.
//!
//! Modules: `ops` (the op kinds and one op each), `attribution` (outliers to
//! ops, the table), this one (flags and the writer thread).

pub mod attribution;
pub mod ops;
#[cfg(all(test, vmm_shuttle))]
mod shuttle_tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use clap::Args;

use self::attribution::OpWindow;
use self::ops::{ChurnOp, ChurnState, ChurnTarget};
use super::tsc::host_tsc;
use crate::units::parse_duration;

fn parse_op(s: &str) -> Result<ChurnOp, String> {
    s.parse().map_err(|e: ops::ChurnError| e.to_string())
}

/// `--churn` and its pacing.
#[derive(Debug, Clone, Args)]
pub struct ChurnOptions {
    /// Ops a writer thread runs, round robin, while the guest is timed: plug, protect, dontneed, collapse, dirty-log (comma separated); every access above p99 is attributed to the op overlapping it.
    #[arg(long = "churn", value_name = "OP,OP,...", value_delimiter = ',', value_parser = parse_op)]
    pub ops: Vec<ChurnOp>,
    /// Pause of the churn writer between two ops.
    #[arg(long, value_name = "DURATION", default_value = "1ms", value_parser = parse_duration)]
    pub churn_gap: Duration,
}

impl Default for ChurnOptions {
    fn default() -> Self {
        Self {
            ops: Vec::new(),
            churn_gap: Duration::from_millis(1),
        }
    }
}

impl ChurnOptions {
    /// Whether some op can leave host pages read-only under a guest write.
    pub fn makes_read_only(&self) -> bool {
        self.ops.iter().any(|o| o.makes_read_only())
    }
}

/// What the writer did in one pass.
#[derive(Debug, Default)]
pub struct WriterLog {
    /// Every op, in order, on the host TSC.
    pub windows: Vec<OpWindow>,
    /// The first error of each failing op kind (an op failing does not stop
    /// the writer: e.g. `MADV_COLLAPSE` refuses when THP is off).
    pub errors: Vec<String>,
}

/// The writer thread of one timed pass.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<WriterLog>>,
}

impl Writer {
    /// Starts running `opts.ops` round robin on `target`, `opts.churn_gap`
    /// apart, until [`Writer::finish`].
    pub fn start(target: ChurnTarget, opts: &ChurnOptions) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_rx = stop.clone();
        let ops = opts.ops.clone();
        let gap = opts.churn_gap;
        let thread = std::thread::Builder::new()
            .name("churn-writer".into())
            .spawn(move || run(&target, &ops, gap, &stop_rx))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the writer after its current op, undoes what ops left behind
    /// (neighbour plugged, dirty logging on) and returns its log.
    pub fn finish(mut self) -> WriterLog {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_else(|| WriterLog {
                errors: vec!["the churn writer panicked".into()],
                ..WriterLog::default()
            })
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn note(log: &mut WriterLog, e: &ops::ChurnError) {
    let text = e.to_string();
    let kind = text.split(':').next().unwrap_or_default().to_string();
    if !log
        .errors
        .iter()
        .any(|x| x.split(':').next() == Some(&kind))
    {
        log.errors.push(text);
    }
}

fn run(target: &ChurnTarget, ops: &[ChurnOp], gap: Duration, stop: &AtomicBool) -> WriterLog {
    let state = std::cell::RefCell::new(ChurnState::default());
    run_ops(
        ops,
        gap,
        || stop.load(Ordering::Acquire),
        |op| target.run(op, &mut state.borrow_mut()),
        || target.restore(&mut state.borrow_mut()),
    )
}

/// The writer's loop: `ops` round robin, each stamped `[start, end)` on the
/// host TSC, `gap` apart, until `stopped()`; then `restore`.
///
/// The protocol with the vCPUs and the main thread (checked by the shuttle
/// model in `shuttle_tests`): `stopped` is read only between whole ops, so
/// an op that makes pages read-only always restores them before the writer
/// can end; the vCPUs wait out EFAULT from before the writer starts until
/// after it ended; `restore` runs after the last op, so no neighbour stays
/// plugged and dirty logging does not stay on.
pub(crate) fn run_ops(
    ops: &[ChurnOp],
    gap: Duration,
    stopped: impl Fn() -> bool,
    mut one: impl FnMut(ChurnOp) -> Result<(), ops::ChurnError>,
    restore: impl FnOnce() -> Result<(), ops::ChurnError>,
) -> WriterLog {
    let mut log = WriterLog::default();
    'ops: for op in ops.iter().cycle() {
        if stopped() {
            break;
        }
        let start = host_tsc();
        let r = one(*op);
        let end = host_tsc();
        log.windows.push(OpWindow {
            kind: op.name(),
            start,
            end,
            ok: r.is_ok(),
        });
        if let Err(e) = &r {
            note(&mut log, e);
        }
        // Sleep in short steps so a stop is seen promptly.
        let mut left = gap;
        while !left.is_zero() {
            if stopped() {
                break 'ops;
            }
            let step = left.min(Duration::from_millis(5));
            std::thread::sleep(step);
            left -= step;
        }
    }
    if let Err(e) = restore() {
        note(&mut log, &e);
    }
    log
}
