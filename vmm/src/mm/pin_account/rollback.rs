use super::{Budget, PinAccountError};
use crate::mm::sync::Ordering;

/// Add-then-rollback charge (the `atomic_add_return` then undo version of the pinned-page patch, and
/// memcg's `page_counter_try_charge`). Test loads stay far from `u64::MAX`.
pub(super) fn try_charge(budget: &Budget, n: u64) -> Result<u64, PinAccountError> {
    let old = budget.charged.fetch_add(n, Ordering::AcqRel);
    let new = old + n;
    if new > budget.limit {
        budget.charged.fetch_sub(n, Ordering::AcqRel);
        return Err(budget.refuse_over_limit(n, old));
    }
    budget.peak.fetch_max(new, Ordering::Relaxed);
    Ok(new)
}
