//! What the fuzzer reports when a step misses the model's prediction.

use serde::Serialize;

/// A step that did not do what the model predicted, or an invariant that
/// broke after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// 1-based step number.
    pub step: usize,
    /// Its `do`.
    pub kind: String,
    /// The step in words.
    pub what: String,
    /// The outcomes the model allowed.
    pub expected: String,
    /// What happened.
    pub actual: String,
    /// What must stay the same while shrinking: kind and outcome, or the
    /// invariant's name.
    pub signature: String,
}
