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

/// BROKEN: takes the reference, then trusts the caller's snapshot instead of
/// re-validating the cell's identity (a walker that loaded its map once and
/// assumes every cell still holds that map's slot).
#[cfg_attr(vmm_loom, allow(dead_code))]
pub(crate) fn read_trusting_snapshot(
    cell: &SlotCell,
    shard: usize,
    generation: u64,
    gpa: Gpa,
) -> Result<SlotReadGuard<'_>, SlotLockError> {
    let shard = shard % SHARDS;
    cell.get_ref(shard)?;
    let mut identity = cell.load_identity(shard);
    identity.generation = generation;
    if !identity.range.contains(gpa) {
        identity.range = GpaRange::from_valid_parts(gpa, 1);
    }
    Ok(SlotReadGuard {
        cell,
        shard,
        identity,
    })
}
