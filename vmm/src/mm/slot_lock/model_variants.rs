//! Broken variants of the slot lock shared by the loom and shuttle models:
//! each model must catch them.
use super::*;

/// BROKEN: checks EXCLUDE with a load, then increments separately.
pub(super) fn read_check_then_inc(
    cell: &SlotCell,
    shard: usize,
    generation: u64,
    gpa: Gpa,
) -> Result<SlotReadGuard<'_>, SlotLockError> {
    let refcnt = &cell.shards[shard].refcnt;
    let word = refcnt.load(Ordering::Acquire);
    if word == 0 {
        return Err(SlotLockError::Detached { slot: cell.id });
    }
    if word & EXCLUDE != 0 {
        return Err(SlotLockError::Excluded { slot: cell.id });
    }
    refcnt.fetch_add(1, Ordering::Acquire);
    let guard = SlotReadGuard {
        cell,
        shard,
        identity: cell.load_identity(shard),
    };
    validate(&guard, generation, gpa)?;
    Ok(guard)
}

/// BROKEN: releases without ever notifying the writer.
pub(super) fn put_no_notify(guard: SlotReadGuard<'_>) {
    let (cell, shard) = (guard.cell, guard.shard);
    std::mem::forget(guard);
    cell.shards[shard].refcnt.fetch_sub(1, Ordering::Release);
}
