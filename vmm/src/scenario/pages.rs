//! Sets of guest pages in scenario files: `dirty-pages` expects either a
//! count (`pages = 3`) or the exact set, written as runs of pages
//! (`pages = ["0x100000000+3", "0x100008000"]`: three pages from
//! `0x1_0000_0000`, and one page), with the pages that may or may not be
//! reported in `maybe-pages`. Runs are kept as runs (never expanded), so a
//! run of 2^40 pages costs 16 bytes.
//!
//! ```
//! use std::collections::BTreeSet;
//! use vmm::scenario::pages::PageSet;
//! let must: PageSet = ["0x100000000+3", "0x100008000"].iter().map(|s| s.parse().unwrap()).collect();
//! assert_eq!(must.len(), 4);
//! assert_eq!(must.to_strings(), ["0x100000000+3", "0x100008000"]);
//! let maybe = PageSet::default();
//! let reported: BTreeSet<u64> = [0x100000, 0x100001, 0x100002, 0x100008].into();
//! assert!(must.judge(&maybe, &reported).is_ok());
//! // The right number of pages, but one of them the wrong page.
//! let wrong: BTreeSet<u64> = [0x100000, 0x100001, 0x100002, 0x100009].into();
//! let e = must.judge(&maybe, &wrong).unwrap_err();
//! assert!(e.contains("0x100008000") && e.contains("0x100009000"), "{e}");
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::num::parse_num;

/// The page size of guest frames.
const PAGE: u64 = 4096;

/// A run of guest frames: `count` frames from frame `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageRun {
    /// The first frame number (guest-physical address / 4096).
    pub first: u64,
    /// Frames in the run (at least 1).
    pub count: u64,
}

impl PageRun {
    fn end(self) -> u64 {
        self.first.saturating_add(self.count)
    }
}

/// A page run that is not `GPA` or `GPA+PAGES`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad page run {text:?}: {problem} (expected \"GPA\" or \"GPA+PAGES\", e.g. \"0x100000000+3\")"
)]
pub struct PageRunError {
    /// The run as written.
    pub text: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FromStr for PageRun {
    type Err = PageRunError;
    fn from_str(s: &str) -> Result<Self, PageRunError> {
        let bad = |problem: String| PageRunError {
            text: s.to_string(),
            problem,
        };
        let (gpa, count) = match s.split_once('+') {
            Some((g, n)) => (g.trim(), parse_num(n.trim()).map_err(bad)?),
            None => (s.trim(), 1),
        };
        let gpa = parse_num(gpa).map_err(bad)?;
        if gpa % PAGE != 0 {
            return Err(bad(format!("{gpa:#x} is not 4 KiB aligned")));
        }
        if count == 0 {
            return Err(bad("a run has at least one page".into()));
        }
        let first = gpa / PAGE;
        if first
            .checked_add(count)
            .is_none_or(|e| e > u64::MAX / PAGE + 1)
        {
            return Err(bad("the run wraps around the address space".into()));
        }
        Ok(PageRun { first, count })
    }
}

impl fmt::Display for PageRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.first * PAGE)?;
        if self.count > 1 {
            write!(f, "+{}", self.count)?;
        }
        Ok(())
    }
}

/// A set of guest frames as sorted, disjoint, non-adjacent runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    runs: Vec<PageRun>,
}

impl FromIterator<PageRun> for PageSet {
    /// Runs in any order, overlapping or not: normalized.
    fn from_iter<I: IntoIterator<Item = PageRun>>(iter: I) -> Self {
        let mut all: Vec<PageRun> = iter.into_iter().collect();
        all.sort();
        let mut runs: Vec<PageRun> = Vec::with_capacity(all.len());
        for r in all {
            match runs.last_mut() {
                Some(last) if r.first <= last.end() => {
                    last.count = last.count.max(r.end() - last.first);
                }
                _ => runs.push(r),
            }
        }
        Self { runs }
    }
}

impl PageSet {
    /// The set of `frames` (frame numbers, any order).
    pub fn from_frames(frames: impl IntoIterator<Item = u64>) -> Self {
        frames
            .into_iter()
            .map(|first| PageRun { first, count: 1 })
            .collect()
    }

    /// Its runs, ascending.
    pub fn runs(&self) -> &[PageRun] {
        &self.runs
    }

    /// Frames in the set (saturating).
    pub fn len(&self) -> u64 {
        self.runs
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(r.count))
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether frame `f` is in the set.
    pub fn contains(&self, f: u64) -> bool {
        let i = self.runs.partition_point(|r| r.end() <= f);
        self.runs.get(i).is_some_and(|r| r.first <= f)
    }

    /// How many of `frames` (a set) are in this set.
    pub fn count_in(&self, frames: &BTreeSet<u64>) -> u64 {
        self.runs
            .iter()
            .map(|r| frames.range(r.first..r.end()).count() as u64)
            .sum()
    }

    /// Its runs as the scenario file writes them.
    pub fn to_strings(&self) -> Vec<String> {
        self.runs.iter().map(ToString::to_string).collect()
    }

    /// Whether `reported` is allowed when this set must be reported and
    /// `maybe` may be: `self ⊆ reported ⊆ self ∪ maybe`. The error names
    /// the first missing and the first unexpected pages.
    pub fn judge(&self, maybe: &PageSet, reported: &BTreeSet<u64>) -> Result<(), String> {
        let extra: Vec<u64> = reported
            .iter()
            .copied()
            .filter(|&f| !self.contains(f) && !maybe.contains(f))
            .take(4)
            .collect();
        let missing: Vec<u64> = if self.count_in(reported) == self.len() {
            Vec::new()
        } else {
            self.runs
                .iter()
                .flat_map(|r| r.first..r.end())
                .filter(|f| !reported.contains(f))
                .take(4)
                .collect()
        };
        if extra.is_empty() && missing.is_empty() {
            return Ok(());
        }
        let list = |v: &[u64]| {
            v.iter()
                .map(|f| format!("{:#x}", f * PAGE))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("not reported: {}", list(&missing)));
        }
        if !extra.is_empty() {
            parts.push(format!("not expected: {}", list(&extra)));
        }
        Err(parts.join("; "))
    }
}

impl Serialize for PageSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.to_strings())
    }
}

impl<'de> Deserialize<'de> for PageSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .map(|t| t.parse::<PageRun>().map_err(de::Error::custom))
            .collect()
    }
}

/// What a `dirty-pages` step expects in `pages`: how many pages (the older
/// form), or exactly which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyWant {
    /// `pages = 3`: the number of pages reported.
    Count(u64),
    /// `pages = ["0x100000000+3"]`: the pages reported (with the step's
    /// `maybe-pages`, which may be reported too).
    Set(PageSet),
}

impl Serialize for DirtyWant {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            DirtyWant::Count(n) => s.serialize_u64(*n),
            DirtyWant::Set(set) => set.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for DirtyWant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = DirtyWant;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a page count (3) or a list of page runs ([\"0x100000000+3\"])")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DirtyWant, E> {
                u64::try_from(v)
                    .map(DirtyWant::Count)
                    .map_err(|_| E::custom("a page count must not be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DirtyWant, E> {
                Ok(DirtyWant::Count(v))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<DirtyWant, A::Error> {
                PageSet::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(DirtyWant::Set)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(runs: &[&str]) -> PageSet {
        runs.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn test_runs_normalize_and_write_back() {
        let s = set(&["0x3000", "0x1000+2", "0x2000+3", "0x9000"]);
        assert_eq!(s.to_strings(), ["0x1000+4", "0x9000"]);
        assert_eq!(s.len(), 5);
        assert!(s.contains(4) && !s.contains(5) && s.contains(9) && !s.contains(0));
        assert_eq!(
            PageSet::from_frames([5, 3, 4, 9]).to_strings(),
            ["0x3000+3", "0x9000"]
        );
    }

    #[test]
    fn test_bad_runs_are_refused_naming_the_problem() {
        for (bad, why) in [
            ("0x1001", "aligned"),
            ("0x1000+0", "at least one"),
            ("0xfffffffffffff000+2", "wraps"),
            ("nope", "nope"),
            ("0x1000+x", "x"),
        ] {
            let e = bad.parse::<PageRun>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn test_a_huge_run_is_not_expanded() {
        let s = set(&["0x0+0x10000000000"]);
        assert_eq!(s.len(), 1 << 40);
        let reported: BTreeSet<u64> = [0, 1].into();
        let e = s.judge(&PageSet::default(), &reported).unwrap_err();
        assert!(e.contains("not reported: 0x2000"), "{e}");
    }

    #[test]
    fn test_judge_is_must_subset_reported_subset_must_and_maybe() {
        let must = set(&["0x1000+2"]);
        let maybe = set(&["0x5000"]);
        let ok = |r: &[u64]| must.judge(&maybe, &r.iter().copied().collect()).is_ok();
        assert!(ok(&[1, 2]));
        assert!(ok(&[1, 2, 5]));
        assert!(!ok(&[1]), "a must page missing");
        assert!(!ok(&[1, 2, 6]), "a page neither must nor maybe");
        assert!(!ok(&[1, 6]), "same count, wrong page");
    }
}
