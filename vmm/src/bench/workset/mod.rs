//! Working-set record and replay, as users restoring snapshots with
//! userfaultfd do it: `--record FILE` writes the pages a first-touch pass
//! faulted, in the order the guest first touched them, with the time of
//! that touch; `--replay FILE --prefetch copy|populate|none` prefetches that
//! set before the timed pass and reports the faults and time saved against
//! a run of the same configuration without prefetch, in the same
//! invocation.
//!
//! The file ([`Workset`]) is JSON lines, version 1: a header line
//!
//! ```text
//! {"format":"vmm-workset","version":1,"page_size":4096,"range_size":8388608,"pages":2048}
//! ```
//!
//! then one line per page, sorted by `t_ns` (time of the first access since
//! the first access of the pass, on the guest TSC), each page once:
//!
//! ```text
//! {"offset":0,"t_ns":0,"latency_ns":5120,"vcpu":0}
//! ```
//!
//! `offset` is the page's byte offset in the test range (a multiple of
//! `page_size`); `latency_ns` the recorded access's latency. Reading checks
//! the header, every offset against the range, duplicates, and the file's
//! size against the most pages the range can hold before reading it, so a
//! wrong file is refused with its line number and costs bounded memory.
//!
//! Modules: this one (flags, the file), `prefetch` (populate and batched
//! `UFFDIO_COPY` of the set) and `replay` (the comparison reported).

pub mod prefetch;
pub mod replay;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::mm::addr::PAGE_SIZE;

/// The `format` of a working-set file's header.
pub const FORMAT: &str = "vmm-workset";
/// The version this build reads and writes.
pub const VERSION: u32 = 1;
/// Longest line a version-1 file has (the per-page lines are ~70 bytes).
const MAX_LINE: u64 = 256;

/// How to prefetch a replayed working set before the timed pass.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, strum::Display, Serialize,
)]
#[strum(serialize_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    /// Batched `UFFDIO_COPY` of each run of consecutive recorded pages
    /// (needs `--backing uffd-copy`).
    Copy,
    /// `MADV_POPULATE_WRITE` of each run of consecutive recorded pages.
    Populate,
    /// Nothing: a control with the same structure.
    #[default]
    None,
}

/// `--record`, `--replay`, `--prefetch`.
#[derive(Debug, Clone, Default, Args)]
pub struct WorksetOptions {
    /// Write the pages the first-touch pass faulted, in order and with their times, to FILE (JSON lines; one backing only).
    #[arg(long, value_name = "FILE", conflicts_with = "replay")]
    pub record: Option<PathBuf>,
    /// Replay the working set of FILE (from --record): prefetch it before the timed pass and report faults and time saved against no prefetch.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// How --replay prefetches: copy (batched UFFDIO_COPY, with --backing uffd-copy), populate (MADV_POPULATE_WRITE) or none.
    #[arg(long, value_enum, default_value_t = Prefetch::None, requires = "replay")]
    pub prefetch: Prefetch,
}

/// Errors of reading or writing a working-set file.
#[derive(Debug, thiserror::Error)]
pub enum WorksetError {
    /// The file cannot be opened, read or written.
    #[error("working-set file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's contents are wrong.
    #[error("working-set file {path}, line {line}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line number (0: the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The header line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    format: String,
    version: u32,
    page_size: u64,
    range_size: u64,
    pages: u64,
}

/// One page of a working set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorksetPage {
    /// Byte offset of the page in the test range.
    pub offset: u64,
    /// Time of its first access since the pass's first access, ns.
    pub t_ns: u64,
    /// Latency of that access, ns.
    pub latency_ns: u64,
    /// The vCPU that made it.
    pub vcpu: u64,
}

/// The pages a pass faulted, in the order of their first access.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workset {
    /// Size of the range recorded.
    pub range_size: u64,
    /// The pages, sorted by `t_ns`, each once.
    pub pages: Vec<WorksetPage>,
}

/// One timed access as recorded: vCPU, byte offset in the range, start
/// (guest TSC, already on one clock for every vCPU), latency ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    /// vCPU index.
    pub vcpu: u64,
    /// Byte offset in the range.
    pub offset: u64,
    /// Start stamp, TSC ticks.
    pub start: u64,
    /// Duration, TSC ticks.
    pub ticks: u64,
}

impl Workset {
    /// The set of a pass: the first access of each 4 KiB page, ordered by
    /// start time; `tsc_khz` converts ticks.
    pub fn from_touches(range_size: u64, touches: &[Touch], tsc_khz: u32) -> Self {
        let ns = |t: u64| (t as u128 * 1_000_000 / u128::from(tsc_khz.max(1))) as u64;
        let mut sorted: Vec<&Touch> = touches.iter().collect();
        sorted.sort_by_key(|t| t.start);
        let t0 = sorted.first().map_or(0, |t| t.start);
        let mut seen = std::collections::HashSet::new();
        let pages = sorted
            .into_iter()
            .filter(|t| seen.insert(t.offset / PAGE_SIZE))
            .map(|t| WorksetPage {
                offset: t.offset & !(PAGE_SIZE - 1),
                t_ns: ns(t.start - t0),
                latency_ns: ns(t.ticks),
                vcpu: t.vcpu,
            })
            .collect();
        Self { range_size, pages }
    }

    /// Runs of consecutive pages as (offset, len), ascending: what one
    /// batched prefetch call covers.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut offs: Vec<u64> = self.pages.iter().map(|p| p.offset).collect();
        offs.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for o in offs {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == o => *len += PAGE_SIZE,
                _ => runs.push((o, PAGE_SIZE)),
            }
        }
        runs
    }

    /// Writes the file (see the module docs for the format).
    pub fn write(&self, file: &mut File, path: &Path) -> Result<(), WorksetError> {
        let io = |source| WorksetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let header = Header {
            format: FORMAT.into(),
            version: VERSION,
            page_size: PAGE_SIZE,
            range_size: self.range_size,
            pages: self.pages.len() as u64,
        };
        let mut out = std::io::BufWriter::new(file);
        writeln!(out, "{}", json_line(&header)).map_err(io)?;
        for p in &self.pages {
            writeln!(out, "{}", json_line(p)).map_err(io)?;
        }
        out.flush().map_err(io)
    }

    /// Reads and checks a file recorded on a range of `range_size` bytes.
    pub fn read(path: &Path, range_size: u64) -> Result<Self, WorksetError> {
        let invalid = |line: usize, reason: String| WorksetError::Invalid {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let io = |source| WorksetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let max_pages = range_size / PAGE_SIZE;
        let limit = (max_pages + 1) * MAX_LINE;
        let len = file.metadata().map_err(io)?.len();
        if len > limit {
            return Err(invalid(0, format!("{len} bytes is more than a working set of a {range_size}-byte range can be ({limit} bytes at most): not a working-set file, or recorded on a larger --size")));
        }
        let mut lines = BufReader::new(file).lines();
        let first = lines
            .next()
            .ok_or_else(|| invalid(1, "empty file: expected the header line".into()))?
            .map_err(io)?;
        let header: Header = serde_json::from_str(&first)
            .map_err(|e| invalid(1, format!("not a working-set header ({e})")))?;
        if header.format != FORMAT || header.version != VERSION {
            return Err(invalid(
                1,
                format!(
                    "format {:?} version {}: this build reads {FORMAT:?} version {VERSION}",
                    header.format, header.version
                ),
            ));
        }
        if header.page_size != PAGE_SIZE {
            return Err(invalid(
                1,
                format!("page_size {} is not {PAGE_SIZE}", header.page_size),
            ));
        }
        if header.range_size > range_size {
            return Err(invalid(
                1,
                format!(
                    "recorded on a range of {} bytes, larger than --size ({range_size})",
                    header.range_size
                ),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        let mut pages = Vec::new();
        for (i, l) in lines.enumerate() {
            let line_no = i + 2;
            let l = l.map_err(io)?;
            if l.trim().is_empty() {
                continue;
            }
            let p: WorksetPage = serde_json::from_str(&l)
                .map_err(|e| invalid(line_no, format!("not a page line ({e})")))?;
            if p.offset % PAGE_SIZE != 0 || p.offset >= range_size {
                return Err(invalid(
                    line_no,
                    format!(
                        "offset {:#x} is not a page of the {range_size:#x}-byte range",
                        p.offset
                    ),
                ));
            }
            if !seen.insert(p.offset) {
                return Err(invalid(
                    line_no,
                    format!("page {:#x} listed twice", p.offset),
                ));
            }
            pages.push(p);
        }
        if pages.len() as u64 != header.pages {
            return Err(invalid(
                0,
                format!(
                    "the header announces {} pages, the file has {}",
                    header.pages,
                    pages.len()
                ),
            ));
        }
        Ok(Self {
            range_size: header.range_size,
            pages,
        })
    }
}

/// The `--record` file. Written to a new temporary file beside `path`,
/// created before anything is measured (a bad path fails at once), and
/// renamed over `path` only when the run completes ([`RecordOutput::keep`]):
/// a failed or interrupted run leaves no file behind and never truncates an
/// earlier recording at `path` (which may be the run's own `--replay` file).
#[derive(Debug)]
pub struct RecordOutput {
    file: File,
    path: PathBuf,
    temp: PathBuf,
    keep: bool,
}

impl RecordOutput {
    /// Creates the temporary file beside `path`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let mut name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("the path names no file"))?
            .to_os_string();
        name.push(format!(".partial-{}", std::process::id()));
        let temp = path.with_file_name(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            temp,
            keep: false,
        })
    }

    /// Writes `set` as the file's contents.
    pub fn write(&mut self, set: &Workset) -> Result<(), WorksetError> {
        set.write(&mut self.file, &self.path)
    }

    /// The run completed: the recording replaces `path`.
    pub fn keep(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.temp, &self.path)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for RecordOutput {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// One line of JSON.
fn json_line<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain structs of integers and strings always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-workset-{}-{name}", std::process::id()))
    }

    fn set() -> Workset {
        let touches = [
            Touch {
                vcpu: 0,
                offset: 0x3000,
                start: 500,
                ticks: 10,
            },
            Touch {
                vcpu: 0,
                offset: 0x1000,
                start: 100,
                ticks: 20,
            },
            Touch {
                vcpu: 1,
                offset: 0x1008,
                start: 300,
                ticks: 5,
            },
            Touch {
                vcpu: 1,
                offset: 0x2000,
                start: 400,
                ticks: 7,
            },
        ];
        Workset::from_touches(0x10000, &touches, 1_000_000)
    }

    /// A run that does not complete leaves an earlier recording at the
    /// path as it was (it used to be truncated, then deleted) and no
    /// temporary file; a completed one replaces it.
    #[test]
    fn test_record_output_replaces_the_file_only_when_kept() {
        let path = tmp("keep");
        std::fs::write(&path, "earlier recording").unwrap();
        let dir = path.parent().unwrap();
        let partials = |d: &Path| {
            std::fs::read_dir(d)
                .unwrap()
                .filter(|e| {
                    let name = e.as_ref().unwrap().file_name();
                    let name = name.to_string_lossy();
                    name.starts_with(&*path.file_name().unwrap().to_string_lossy())
                        && name.contains(".partial-")
                })
                .count()
        };
        let mut out = RecordOutput::create(&path).unwrap();
        out.write(&set()).unwrap();
        assert_eq!(partials(dir), 1);
        drop(out);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "earlier recording");
        assert_eq!(partials(dir), 0);
        let mut out = RecordOutput::create(&path).unwrap();
        out.write(&set()).unwrap();
        out.keep().unwrap();
        assert_eq!(partials(dir), 0);
        assert!(Workset::read(&path, 0x10000).is_ok());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn test_workset_keeps_first_touch_per_page_in_time_order() {
        let w = set();
        let offs: Vec<u64> = w.pages.iter().map(|p| p.offset).collect();
        assert_eq!(offs, vec![0x1000, 0x2000, 0x3000]);
        assert_eq!(w.pages[1].t_ns, 300);
        assert_eq!(w.pages[0].latency_ns, 20);
        assert_eq!(w.runs(), vec![(0x1000, 0x3000)]);
    }

    #[test]
    fn test_workset_file_roundtrips() {
        let p = tmp("roundtrip");
        let w = set();
        w.write(&mut File::create(&p).unwrap(), &p).unwrap();
        let r = Workset::read(&p, 0x10000).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(r, w);
    }

    #[test]
    fn test_workset_bad_files_are_refused_with_the_line() {
        let p = tmp("bad");
        let header =
            r#"{"format":"vmm-workset","version":1,"page_size":4096,"range_size":65536,"pages":1}"#;
        let cases = [
            ("", "line 1: empty file"),
            ("hello\n", "line 1: not a working-set header"),
            (&header.replace("\"version\":1", "\"version\":9"), "version 9"),
            (&format!("{header}\n{{\"offset\":65536,\"t_ns\":0,\"latency_ns\":1,\"vcpu\":0}}\n"), "line 2: offset 0x10000"),
            (&format!("{header}\n{{\"offset\":12,\"t_ns\":0,\"latency_ns\":1,\"vcpu\":0}}\n"), "line 2: offset 0xc"),
            (&format!("{header}\n{{\"offset\":0,\"t_ns\":0,\"latency_ns\":1,\"vcpu\":0}}\n{{\"offset\":0,\"t_ns\":0,\"latency_ns\":1,\"vcpu\":0}}\n"), "line 3: page 0x0 listed twice"),
            (&format!("{header}\n"), "announces 1 pages, the file has 0"),
            (&"x".repeat(100_000), "more than a working set"),
        ];
        for (text, want) in cases {
            std::fs::write(&p, text).unwrap();
            let e = Workset::read(&p, 0x10000).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        std::fs::remove_file(&p).unwrap();
        let e = Workset::read(&p, 0x10000).unwrap_err().to_string();
        assert!(e.contains("working-set file"), "{e}");
    }
}
