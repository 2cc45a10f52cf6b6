//! The scenario file format (TOML) and its validation. See `scenarios/README.md`
//! for the user's guide; every field is listed on [`StepSpec`].
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
//! assert!(Scenario::parse("[[step]]\ndo = \"dance\"").unwrap_err().to_string().contains("dance"));
//! ```

use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer};
use serde::Deserialize;

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
    /// Not valid TOML, or a field of the wrong type or unknown.
    #[error("scenario is not valid: {0}")]
    Toml(String),
    /// A step is missing a field its kind needs, or has a value out of range.
    #[error("step {index} ({kind}): {problem}")]
    Step {
        /// 1-based step number.
        index: usize,
        /// Its `do`.
        kind: String,
        /// What is wrong.
        problem: String,
    },
}

/// A number written as a TOML integer or a string: `4096`, `"0x1_0000_0000"`,
/// `"2M"`, `"1G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Num(pub u64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number: 4096, \"0x1000\" or \"2M\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
                u64::try_from(v)
                    .map(Num)
                    .map_err(|_| E::custom("must not be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Num, E> {
                parse_num(s).map(Num).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `0x…` (underscores allowed), or a decimal with an optional K/M/G/T suffix.
pub fn parse_num(s: &str) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| format!("{s:?} is not a hex number"));
    }
    if t == "0" {
        return Ok(0);
    }
    crate::units::parse_size(&t)
}

/// One step as written in the file (`[[step]]`). `do` selects the kind; the
/// other fields are used by the kinds that need them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Kind: plug, unplug, protect, move, resize, dirty-log, dirty-pages,
    /// plug-many, check, stage2-dump, fill, verify, verify-const, touch, read, write, spin,
    /// wait, sleep.
    #[serde(rename = "do")]
    pub kind: String,
    /// Guest-physical address of the range.
    pub gpa: Option<Num>,
    /// Size of the range in bytes.
    pub size: Option<Num>,
    /// move: destination address.
    pub to: Option<Num>,
    /// resize: new size of the slot starting at `gpa`.
    pub new_size: Option<Num>,
    /// protect: "ro" or "rw".
    pub access: Option<String>,
    /// dirty-log: on or off.
    pub on: Option<bool>,
    /// plug: backing kind (default: the scenario's).
    pub backing: Option<String>,
    /// plug: slot flags ("readonly", "dirty-log").
    pub flags: Option<Vec<String>>,
    /// plug-many: how many 4 KiB slots, or omitted to fill the budget.
    pub count: Option<Num>,
    /// Guest steps: which vCPU (default 0).
    pub vcpu: Option<u64>,
    /// fill/verify: pattern seed.
    pub seed: Option<Num>,
    /// fill/verify: the pattern as a fill at this address lays it out
    /// (contents moved or copied from there).
    pub origin: Option<Num>,
    /// verify-const: the value; write: the value; read: the value expected.
    pub value: Option<Num>,
    /// touch: stride in bytes (default 4096).
    pub stride: Option<Num>,
    /// touch: write instead of read.
    pub write: Option<bool>,
    /// spin: iterations.
    pub iterations: Option<Num>,
    /// Guest steps: run the command this many times (default 1).
    pub repeat: Option<u64>,
    /// Guest steps: don't wait; a later `wait` step collects the outcomes.
    #[serde(rename = "async")]
    pub is_async: Option<bool>,
    /// dirty-pages: expected number of dirty pages; check: expected number
    /// of pinned pages.
    pub pages: Option<u64>,
    /// stage2-dump: expected number of runs (adjacent equal leaves merged).
    pub runs: Option<u64>,
    /// stage2-dump: expected bytes mapped (in `gpa`/`size` if given).
    pub mapped: Option<Num>,
    /// pin: whether a memory change may revoke the pin (default true); a
    /// non-revocable pin vetoes changes of its range instead.
    pub revocable: Option<bool>,
    /// pin/unpin: the pin's name.
    pub name: Option<String>,
    /// sleep: duration ("10ms").
    pub duration: Option<String>,
    /// What must happen: "ok" (default), an error kind for memory ops, or
    /// for guest steps "mismatch", "unplugged", "read-only", "exception",
    /// "failed", "ok-or-unplugged".
    pub expect: Option<String>,
    /// Free text shown with the step.
    pub note: Option<String>,
}

/// A scenario: optional VM settings and a timeline of steps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Title.
    pub name: Option<String>,
    /// What it shows.
    pub description: Option<String>,
    /// Guest RAM (overrides `--mem`).
    pub mem: Option<Num>,
    /// vCPUs (overrides `--vcpus`).
    pub vcpus: Option<u64>,
    /// Backing of guest RAM and of plugs without their own (overrides `--backing`).
    pub backing: Option<String>,
    /// The timeline.
    #[serde(rename = "step", default)]
    pub steps: Vec<StepSpec>,
}

/// Memory-op kinds.
pub const OP_KINDS: [&str; 12] = [
    "pin",
    "unpin",
    "plug",
    "unplug",
    "protect",
    "move",
    "resize",
    "dirty-log",
    "dirty-pages",
    "plug-many",
    "check",
    "stage2-dump",
];
/// Guest-command kinds.
pub const GUEST_KINDS: [&str; 11] = [
    "fill",
    "verify",
    "verify-const",
    "touch",
    "read",
    "write",
    "spin",
    "wait",
    "dma-copy",
    "dma-fill",
    "dma-checksum",
];

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates scenario text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Toml(e.to_string()))?;
        // Outcomes come back in order on one channel per vCPU, so a vCPU's
        // async commands must be collected (`wait`) before it runs anything
        // else, and before the end.
        let mut pending: std::collections::BTreeMap<u64, usize> = Default::default();
        for (i, step) in s.steps.iter().enumerate() {
            let err = |problem: String| ScenarioError::Step {
                index: i + 1,
                kind: step.kind.clone(),
                problem,
            };
            step.validate().map_err(err)?;
            if !step.is_guest() {
                continue;
            }
            let vcpu = step.vcpu.unwrap_or(0);
            if step.kind == "wait" {
                pending.remove(&vcpu);
            } else if let Some(from) = pending.get(&vcpu) {
                return Err(err(format!(
                    "vCPU {vcpu} still has async commands from step {from}; add a `wait` step for it first"
                )));
            } else if step.is_async == Some(true) {
                pending.insert(vcpu, i + 1);
            }
        }
        if let Some((vcpu, from)) = pending.into_iter().next() {
            return Err(ScenarioError::Toml(format!(
                "the async commands of step {from} on vCPU {vcpu} are never collected: add a `wait` step"
            )));
        }
        if s.steps.is_empty() {
            return Err(ScenarioError::Toml("no [[step]] given".into()));
        }
        let bad =
            |field: &str, problem: String| ScenarioError::Toml(format!("`{field}`: {problem}"));
        if let Some(mem) = s.mem {
            crate::units::parse_mem(&mem.0.to_string()).map_err(|e| bad("mem", e))?;
        }
        if let Some(v) = s.vcpus {
            let max = guest_image::protocol::layout::MAX_VCPUS;
            if !(1..=max).contains(&v) {
                return Err(bad("vcpus", format!("{v} is not in 1..={max}")));
            }
        }
        if let Some(b) = &s.backing {
            b.parse::<crate::mm::backing::BackingKind>()
                .map_err(|e| bad("backing", e.to_string()))?;
        }
        Ok(s)
    }

    /// The title to show.
    pub fn title(&self) -> &str {
        self.name.as_deref().unwrap_or("scenario")
    }
}

impl StepSpec {
    fn need<T: Copy>(&self, v: Option<T>, field: &str) -> Result<T, String> {
        v.ok_or_else(|| format!("needs `{field}`"))
    }

    fn validate(&self) -> Result<(), String> {
        let k = self.kind.as_str();
        if !OP_KINDS.contains(&k) && !GUEST_KINDS.contains(&k) && k != "sleep" {
            return Err(format!(
                "unknown step kind {k:?}; expected one of {}, {}, sleep",
                OP_KINDS.join(", "),
                GUEST_KINDS.join(", ")
            ));
        }
        match k {
            "plug" | "unplug" | "dirty-pages" | "fill" | "verify" | "verify-const" | "touch" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.size, "size")?;
            }
            "protect" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.size, "size")?;
                match self.access.as_deref() {
                    Some("ro" | "rw") => {}
                    _ => return Err("needs `access = \"ro\"` or `\"rw\"`".into()),
                }
            }
            "move" | "dma-copy" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.size, "size")?;
                self.need(self.to, "to")?;
            }
            "dma-fill" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.size, "size")?;
                self.need(self.value, "value")?;
            }
            "dma-checksum" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.size, "size")?;
            }
            "pin" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.size, "size")?;
                self.name.as_ref().ok_or("needs `name`")?;
            }
            "unpin" => {
                self.name.as_ref().ok_or("needs `name`")?;
            }
            "resize" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.new_size, "new_size")?;
            }
            "dirty-log" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.size, "size")?;
                self.need(self.on, "on")?;
            }
            "stage2-dump" if self.gpa.is_some() != self.size.is_some() => {
                return Err("`gpa` and `size` go together (the window to list)".into());
            }
            "plug-many" | "read" => {
                self.need(self.gpa, "gpa")?;
            }
            "write" => {
                self.need(self.gpa, "gpa")?;
                self.need(self.value, "value")?;
            }
            "spin" => {
                self.need(self.iterations, "iterations")?;
            }
            "sleep" => {
                let d = self.duration.as_deref().ok_or("needs `duration`")?;
                crate::units::parse_duration(d)?;
            }
            _ => {}
        }
        if matches!(k, "fill" | "verify") {
            self.need(self.seed, "seed")?;
        }
        if k == "verify-const" {
            self.need(self.value, "value")?;
        }
        if self.repeat == Some(0) {
            return Err("`repeat` must be at least 1".into());
        }
        Ok(())
    }

    /// Whether this step drives a vCPU.
    pub fn is_guest(&self) -> bool {
        GUEST_KINDS.contains(&self.kind.as_str())
    }
}
