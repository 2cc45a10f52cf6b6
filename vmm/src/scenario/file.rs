//! The scenario file format (TOML) and its validation: a header and a
//! timeline of [`Step`]s. See `scenarios/README.md` for the user's guide.
//! Everything that can be checked without a VM is checked here, and a
//! refusal names the place (`file:line:column`), the step and the field.
//!
//! ```
//! use vmm::scenario::Scenario;
//! let s = Scenario::parse(r#"
//!     name = "plug, fill, verify"
//!     [[step]]
//!     do = "plug"
//!     gpa = "0x1_0000_0000"
//!     size = "2M"
//!     [[step]]
//!     do = "fill"
//!     gpa = "0x1_0000_0000"
//!     size = "2M"
//!     seed = 7
//! "#).unwrap();
//! assert_eq!(s.steps.len(), 2);
//! let e = Scenario::parse("[[step]]\ndo = \"dance\"").unwrap_err().to_string();
//! assert!(e.starts_with("scenario:2:6: step 1") && e.contains("dance"), "{e}");
//! ```

use std::io::Read;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::num::{DurationText, Num};
use super::step::Step;

/// The largest scenario file read: 1 MiB.
pub const MAX_FILE_SIZE: u64 = 1 << 20;

/// Why a scenario file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read scenario {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a regular file (a device, a FIFO, a directory).
    #[error("scenario {path} is not a regular file but {what}; scenario files are regular files of at most {MAX_FILE_SIZE} bytes (1 MiB)")]
    NotAFile {
        /// The path.
        path: String,
        /// What it is.
        what: &'static str,
    },
    /// Larger than [`MAX_FILE_SIZE`].
    #[error("scenario {path} is too large: {size} bytes or more, the size limit is {MAX_FILE_SIZE} bytes (1 MiB)")]
    TooLarge {
        /// The path.
        path: String,
        /// Its size (at least).
        size: u64,
    },
    /// Invalid content, at a place in the text.
    #[error("{0}")]
    Invalid(Box<Invalid>),
}

/// Where a scenario's text is invalid, and why. Shown as
/// `file:line:column: step N (kind): `field`: problem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The file's name.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// 1-based step number, if a step is at fault.
    pub step: Option<usize>,
    /// Its `do`, if known.
    pub kind: Option<String>,
    /// The field at fault, if one is.
    pub field: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file,
            self.line,
            self.column,
            step_prefix(self.step, self.kind.as_deref())
        )?;
        if let Some(field) = &self.field {
            write!(f, "`{field}`: ")?;
        }
        f.write_str(&self.problem)
    }
}

fn step_prefix(step: Option<usize>, kind: Option<&str>) -> String {
    match (step, kind) {
        (Some(n), Some(k)) => format!("step {n} ({k}): "),
        (Some(n), None) => format!("step {n}: "),
        _ => String::new(),
    }
}

/// A scenario: optional VM settings and a timeline of steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scenario {
    /// Title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What it shows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Guest RAM (overrides `--mem`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem: Option<Num>,
    /// vCPUs (overrides `--vcpus`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    /// Backing of guest RAM and of plugs without their own (overrides `--backing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// The run's timeout when `--timeout` is not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationText>,
    /// The dirty-log mode: `bitmap`, `manual` or `ring` (overrides
    /// `--dirty-log`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_log: Option<String>,
    /// Limit of pinned guest memory, as `--pin-limit` takes it (`256M`,
    /// `4096p`, `unlimited`; overrides `--pin-limit`). Reproducers carry
    /// the limit they ran with, so they replay alike on any host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_limit: Option<String>,
    /// Memory ops between two full consistency checks (the others get the
    /// incremental check; see [`crate::mm::manager::Checker`]). Default
    /// [`DEFAULT_FULL_EVERY`](crate::mm::manager::DEFAULT_FULL_EVERY); 1:
    /// a full check after every op.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_check_every: Option<u32>,
    /// Memory ops between two probes of KVM's own memslots (a sampled slot
    /// must refuse an overlapping create with `EEXIST`, a sampled hole must
    /// take a 1-page slot; see [`crate::scenario::invariants`]). Default
    /// [`DEFAULT_PROBE_EVERY`](crate::scenario::invariants::DEFAULT_PROBE_EVERY);
    /// 0: never.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_kvm_every: Option<u32>,
    /// The timeline.
    #[serde(rename = "step")]
    pub steps: Vec<Step>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: Option<String>,
    description: Option<String>,
    mem: Option<Num>,
    vcpus: Option<u64>,
    backing: Option<String>,
    timeout: Option<DurationText>,
    #[serde(alias = "dirty-log")]
    dirty_log: Option<String>,
    #[serde(alias = "pin-limit")]
    pin_limit: Option<String>,
    full_check_every: Option<u32>,
    probe_kvm_every: Option<u32>,
}

/// Positions in the text being parsed.
struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn error(
        &self,
        offset: usize,
        step: Option<(usize, Option<String>)>,
        field: Option<&str>,
        problem: impl ToString,
    ) -> ScenarioError {
        let mut end = offset.min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let before = &self.text[..end];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let (step, kind) = step.map_or((None, None), |(n, k)| (Some(n), k));
        ScenarioError::Invalid(Box::new(Invalid {
            file: self.file.to_string(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
            step,
            kind,
            field: field.map(str::to_string),
            problem: problem.to_string().replace('\n', " "),
        }))
    }
}

fn key_span(table: &DeTable<'_>, key: &str) -> Option<Range<usize>> {
    table
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(k, _)| k.span())
}

impl Scenario {
    /// Reads and validates a scenario file: a regular file of at most
    /// [`MAX_FILE_SIZE`] bytes (a device or FIFO is refused without reading it).
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let name = path.display().to_string();
        let read_err = |source| ScenarioError::Read {
            path: name.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let ft = meta.file_type();
        if !ft.is_file() {
            use std::os::unix::fs::FileTypeExt;
            let what = if ft.is_dir() {
                "a directory"
            } else if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_char_device() {
                "a character device"
            } else if ft.is_block_device() {
                "a block device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a file"
            };
            return Err(ScenarioError::NotAFile { path: name, what });
        }
        if meta.len() > MAX_FILE_SIZE {
            return Err(ScenarioError::TooLarge {
                path: name,
                size: meta.len(),
            });
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes))
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_FILE_SIZE {
            return Err(ScenarioError::TooLarge {
                path: name,
                size: bytes.len() as u64,
            });
        }
        let text = String::from_utf8(bytes).map_err(|e| {
            read_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not UTF-8: {e}"),
            ))
        })?;
        Self::parse_named(&text, &name)
    }

    /// Parses and validates scenario text; errors name the file `scenario`.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        Self::parse_named(text, "scenario")
    }

    /// Parses and validates scenario text read from `file` (named in errors).
    pub fn parse_named(text: &str, file: &str) -> Result<Self, ScenarioError> {
        let src = Source { file, text };
        let doc = DeTable::parse(text)
            .map_err(|e| src.error(e.span().map_or(0, |s| s.start), None, None, e.message()))?;
        let doc_span = doc.span();
        let mut header = doc.into_inner();
        let step_entry = header.remove_entry("step");
        let table = header.clone();
        let h: Header = Header::deserialize(ValueDeserializer::from(Spanned::new(
            doc_span,
            DeValue::Table(header),
        )))
        .map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            let field = table
                .iter()
                .find(|(k, v)| k.span().contains(&at) || v.span().contains(&at))
                .map(|(k, _)| k.get_ref().to_string());
            src.error(at, None, field.as_deref(), e.message())
        })?;
        let header_err = |field: &str, problem: String| {
            src.error(
                key_span(&table, field).map_or(0, |s| s.start),
                None,
                Some(field),
                problem,
            )
        };
        let max_vcpus = guest_image::protocol::layout::MAX_VCPUS;
        if let Some(mem) = h.mem {
            crate::units::parse_mem(&mem.0.to_string()).map_err(|e| header_err("mem", e))?;
        }
        if let Some(v) = h.vcpus {
            if !(1..=max_vcpus).contains(&v) {
                return Err(header_err(
                    "vcpus",
                    format!("{v} is not in 1..={max_vcpus}"),
                ));
            }
        }
        if let Some(b) = &h.backing {
            b.parse::<crate::mm::backing::BackingKind>()
                .map_err(|e| header_err("backing", e.to_string()))?;
        }
        if let Some(m) = &h.dirty_log {
            m.parse::<crate::mm::manager::DirtyLogMode>()
                .map_err(|e| header_err("dirty_log", e))?;
        }
        if let Some(l) = &h.pin_limit {
            l.parse::<crate::mm::pin_account::PinLimit>()
                .map_err(|e| header_err("pin_limit", e.to_string()))?;
        }
        let raw = match step_entry {
            None => Vec::new(),
            Some((key, value)) => match value.into_inner() {
                DeValue::Array(a) => a.into_iter().collect(),
                _ => {
                    return Err(src.error(
                        key.span().start,
                        None,
                        Some("step"),
                        "steps are written as [[step]] tables",
                    ))
                }
            },
        };
        if raw.is_empty() {
            return Err(src.error(text.len(), None, None, "no [[step]] given"));
        }
        let vcpus = h.vcpus.unwrap_or(max_vcpus);
        let mut steps = Vec::with_capacity(raw.len());
        // Outcomes come back in order on one channel per vCPU, so a vCPU's
        // async commands must be collected (`wait`) before it runs anything
        // else, and before the end.
        // vCPU -> (step, its text offset, its repeat) of async commands not
        // yet collected.
        let mut pending: std::collections::BTreeMap<u64, (usize, usize, u64)> = Default::default();
        for (i, value) in raw.iter().enumerate() {
            let number = i + 1;
            let span = value.span();
            let DeValue::Table(t) = value.get_ref() else {
                return Err(src.error(span.start, Some((number, None)), None, "not a table"));
            };
            let kind = t
                .iter()
                .find(|(k, _)| k.get_ref() == "do")
                .and_then(|(_, v)| v.get_ref().as_str().map(str::to_string));
            let at = |field: &str, problem: String| {
                src.error(
                    key_span(t, field).map_or(span.start, |s| s.start),
                    Some((number, kind.clone())),
                    Some(field),
                    problem,
                )
            };
            let step = Step::from_table(t, span.clone()).map_err(|e| {
                src.error(
                    e.span.map_or(span.start, |s| s.start),
                    Some((number, kind.clone())),
                    e.field.as_deref(),
                    e.problem,
                )
            })?;
            if let Some(vcpu) = step.action.vcpu() {
                if vcpu >= vcpus {
                    let why = match h.vcpus {
                        Some(n) => format!(
                            "vCPU {vcpu} does not exist: the scenario has {n} (vcpus = {n})"
                        ),
                        None => format!("vCPU {vcpu} does not exist: at most {max_vcpus}"),
                    };
                    return Err(at("vcpu", why));
                }
                if let super::step::Action::Wait(super::step::Wait {
                    completed: Some(k), ..
                }) = step.action
                {
                    // Waits for part of the batch and collects nothing.
                    match pending.get(&vcpu) {
                        None => return Err(at(
                            "completed",
                            format!("vCPU {vcpu} has no async commands in flight to wait for (`completed` waits for part of an earlier `async = true` step)"),
                        )),
                        Some((from, _, repeat)) if k > *repeat => return Err(at(
                            "completed",
                            format!("{k} commands can never finish: step {from} runs {repeat}"),
                        )),
                        Some(_) => {}
                    }
                } else if matches!(step.action, super::step::Action::Wait(_)) {
                    pending.remove(&vcpu);
                } else if let Some((from, _, _)) = pending.get(&vcpu) {
                    return Err(at(
                        "vcpu",
                        format!("vCPU {vcpu} still has async commands from step {from}; add a `wait` step for it first"),
                    ));
                } else if let Some((_, repeat, true)) = step.action.guest() {
                    pending.insert(vcpu, (number, span.start, repeat));
                }
            }
            steps.push(step);
        }
        if let Some((vcpu, (from, offset, _))) = pending.into_iter().next() {
            return Err(src.error(
                offset,
                Some((from, None)),
                Some("async"),
                format!("the async commands on vCPU {vcpu} are never collected: add a `wait` step"),
            ));
        }
        Ok(Scenario {
            name: h.name,
            description: h.description,
            mem: h.mem,
            vcpus: h.vcpus,
            backing: h.backing,
            timeout: h.timeout,
            dirty_log: h.dirty_log,
            pin_limit: h.pin_limit,
            full_check_every: h.full_check_every,
            probe_kvm_every: h.probe_kvm_every,
            steps,
        })
    }

    /// The title to show.
    pub fn title(&self) -> &str {
        self.name.as_deref().unwrap_or("scenario")
    }

    /// The scenario as TOML; [`Scenario::parse`] reads it back as the same.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot write scenario: {e}"))
    }
}
