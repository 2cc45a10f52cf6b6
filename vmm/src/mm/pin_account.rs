//! Pinned-page and DMA-mapping accounting against hard limits.
//!
//! Device passthrough pins guest pages so that a device can DMA into them; the
//! host must bound how much memory one VM can pin. [`Budget`] is one such bound:
//! an atomic counter with a fixed limit. [`PinAccount`] holds the two budgets a
//! VM needs: pinned pages and DMA mappings.
//!
//! # Invariants
//!
//! - `0 <= charged <= limit` at every instant, as seen by any observer.
//! - A charge of `n` succeeds iff `charged + n <= limit` at the moment of its
//!   exchange. A failure is never caused by another charger's *transient*
//!   value: the counter only ever holds committed totals.
//! - An uncharge never wraps: uncharging more than is charged is reported as
//!   [`PinAccountError::Underflow`] and leaves the counter unchanged.
//! - `peak` is the largest value the counter held (it may lag the counter for
//!   the instant between a charge's exchange and its `fetch_max`; snapshots
//!   report `max(peak, charged)`).
//!
//! # Why a compare-and-swap loop and not add-then-rollback
//!
//! The kernel's `mm->locked_vm` conversion (seed thread 000) first did
//! `atomic_add_return`, checked the new value against the limit, and subtracted
//! again on failure. Between the add and the subtract the counter holds a value
//! nobody committed; any other charger that reads it in that window fails even
//! though the committed total left room for it, so one thread charging a lot
//! makes many small chargers fail. The fix adopted there, and used by
//! `io_uring/rsrc.c` `__io_account_mem` and iommufd's `incr_user_locked_vm`,
//! is the loop used here: read the counter, compute the new total, check it
//! against the limit, and install it with a compare-and-swap; if the swap
//! fails, retry with the value it returned. The counter is written only by a
//! successful exchange, so it never holds an uncommitted value. (memcg's
//! `page_counter_try_charge` still uses add-then-rollback and accepts the
//! false failures for speed; this module's tests show the difference.)
//!
//! # Memory ordering
//!
//! The limit arithmetic depends only on the modification order of the single
//! counter, which every read-modify-write respects whatever its ordering, so
//! `Relaxed` would be enough for the invariants above. Successful exchanges use
//! `AcqRel` anyway, like the kernel's fully ordered `cmpxchg`: a charger that
//! succeeds because of an uncharge then happens-after whatever the uncharging
//! thread did before (for example `munlock` of the pages it gave back). Plain
//! loads, failed exchanges, `peak` and the failure counter are `Relaxed`: they
//! publish nothing. There are no locks, so there is no lock order.
//!
//! # Limits
//!
//! The default pinned-page limit is the `RLIMIT_MEMLOCK` soft limit in pages
//! ([`PinAccount::from_rlimit`]), as vfio and io_uring use. Note that the VMM
//! runs as root here, and `CAP_IPC_LOCK` makes the kernel skip the
//! `RLIMIT_MEMLOCK` check for `mlock` and VFIO pinning: the kernel will not
//! enforce this limit for us, so [`Budget`] must hold it by itself. The
//! default DMA-mapping limit is [`DEFAULT_DMA_ENTRY_LIMIT`], vfio type1's
//! `dma_entry_limit`.
//!
//! ```
//! use vmm::mm::pin_account::{PinAccount, PinLimit};
//!
//! let account = PinAccount::new(PinLimit::Pages(512));
//! let pinned = account.pinned().try_charge_guard(512).expect("fits exactly");
//! assert!(account.pinned().try_charge(1).is_err());
//! drop(pinned);
//! assert_eq!(account.pinned().charged(), 0);
//! assert_eq!(account.snapshot().pinned_pages.peak, 512);
//! ```

use std::str::FromStr;

use serde::Serialize;

use crate::mm::addr::PAGE_SIZE;
use crate::mm::sync::{AtomicU64, Ordering};

/// vfio type1's default `dma_entry_limit` (`U16_MAX`): the most DMA mappings
/// one container may hold.
pub const DEFAULT_DMA_ENTRY_LIMIT: u64 = 65_535;

/// Errors of pin accounting. Each names the budget and the values involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinAccountError {
    /// The charge would take the budget above its limit.
    #[error("{budget}: charging {requested} exceeds the limit: {observed} charged, limit {limit}")]
    OverLimit {
        /// Which budget refused.
        budget: &'static str,
        /// The amount asked for.
        requested: u64,
        /// The charged total the refusing exchange saw.
        observed: u64,
        /// The budget's limit.
        limit: u64,
    },
    /// `charged + requested` does not fit in a `u64`.
    #[error("{budget}: charging {requested} overflows u64 with {observed} charged")]
    Overflow {
        /// Which budget refused.
        budget: &'static str,
        /// The amount asked for.
        requested: u64,
        /// The charged total the refusing exchange saw.
        observed: u64,
    },
    /// More was uncharged than is charged: an accounting bug in the caller.
    /// The counter is left unchanged.
    #[error("{budget}: uncharging {requested} with only {charged} charged (accounting bug)")]
    Underflow {
        /// Which budget refused.
        budget: &'static str,
        /// The amount asked to give back.
        requested: u64,
        /// The charged total the refusing exchange saw.
        charged: u64,
    },
    /// `getrlimit(RLIMIT_MEMLOCK)` failed.
    #[error("getrlimit(RLIMIT_MEMLOCK) failed with errno {errno}")]
    Rlimit {
        /// The `errno` it set.
        errno: i32,
    },
    /// A `--pin-limit` value could not be parsed.
    #[error(
        "invalid pin limit {input:?}: expected bytes with an optional K/M/G/T suffix, \
         pages ending in 'p', or 'unlimited'"
    )]
    InvalidLimit {
        /// The text given.
        input: String,
    },
}

/// One bounded, lock-free counter: pinned pages, DMA mappings, ...
///
/// ```
/// use vmm::mm::pin_account::{Budget, PinAccountError};
///
/// let budget = Budget::new("pinned pages", 10);
/// assert_eq!(budget.try_charge(7), Ok(7));
/// assert_eq!(
///     budget.try_charge(4),
///     Err(PinAccountError::OverLimit { budget: "pinned pages", requested: 4, observed: 7, limit: 10 })
/// );
/// assert_eq!(budget.uncharge(7), Ok(0));
/// assert!(budget.uncharge(1).is_err()); // nothing left: a bug, not a wrap
/// assert_eq!((budget.peak(), budget.charge_failures()), (7, 1));
/// ```
#[derive(Debug)]
pub struct Budget {
    name: &'static str,
    limit: u64,
    charged: AtomicU64,
    peak: AtomicU64,
    failures: AtomicU64,
}

impl Budget {
    /// A budget named `name` (used in errors and reports) allowing at most
    /// `limit` units to be charged at once.
    pub fn new(name: &'static str, limit: u64) -> Self {
        Self {
            name,
            limit,
            charged: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Charges `n` units iff `charged + n <= limit` at the moment of the
    /// exchange, and returns the new charged total.
    ///
    /// On failure nothing changes except the failure count, and the error
    /// carries the total the refusing exchange saw. A charge of 0 always
    /// succeeds.
    pub fn try_charge(&self, n: u64) -> Result<u64, PinAccountError> {
        let mut current = self.charged.load(Ordering::Relaxed);
        if n == 0 {
            return Ok(current);
        }
        loop {
            let new = match current.checked_add(n) {
                Some(new) if new <= self.limit => new,
                Some(_) => return Err(self.refuse_over_limit(n, current)),
                None => return Err(self.refuse_overflow(n, current)),
            };
            match self.charged.compare_exchange_weak(
                current,
                new,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(new, Ordering::Relaxed);
                    return Ok(new);
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Like [`try_charge`](Self::try_charge), but returns a guard that
    /// uncharges the amount when dropped.
    pub fn try_charge_guard(&self, n: u64) -> Result<Charge<'_>, PinAccountError> {
        self.try_charge(n)?;
        Ok(Charge {
            budget: self,
            amount: n,
        })
    }

    /// Gives back `n` units and returns the new charged total.
    ///
    /// Uncharging more than is charged is an accounting bug: it returns
    /// [`PinAccountError::Underflow`] and leaves the counter unchanged.
    pub fn uncharge(&self, n: u64) -> Result<u64, PinAccountError> {
        let mut current = self.charged.load(Ordering::Relaxed);
        if n == 0 {
            return Ok(current);
        }
        loop {
            let Some(new) = current.checked_sub(n) else {
                return Err(PinAccountError::Underflow {
                    budget: self.name,
                    requested: n,
                    charged: current,
                });
            };
            match self.charged.compare_exchange_weak(
                current,
                new,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(new),
                Err(actual) => current = actual,
            }
        }
    }

    /// The budget's name, as used in errors and reports.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The most that may be charged at once.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The currently charged total (a racy sample under concurrent use).
    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::Relaxed)
    }

    /// The largest total ever charged.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// How many charges were refused (over the limit or overflowing).
    pub fn charge_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// A serializable sample of the counters.
    pub fn stats(&self) -> BudgetStats {
        let charged = self.charged();
        BudgetStats {
            charged,
            peak: self.peak().max(charged),
            limit: self.limit,
            charge_failures: self.charge_failures(),
        }
    }

    fn refuse_over_limit(&self, requested: u64, observed: u64) -> PinAccountError {
        self.failures.fetch_add(1, Ordering::Relaxed);
        PinAccountError::OverLimit {
            budget: self.name,
            requested,
            observed,
            limit: self.limit,
        }
    }

    fn refuse_overflow(&self, requested: u64, observed: u64) -> PinAccountError {
        self.failures.fetch_add(1, Ordering::Relaxed);
        PinAccountError::Overflow {
            budget: self.name,
            requested,
            observed,
        }
    }
}

/// A successful charge that is given back when dropped.
///
/// ```
/// use vmm::mm::pin_account::Budget;
///
/// let budget = Budget::new("dma mappings", 4);
/// {
///     let charge = budget.try_charge_guard(3).unwrap();
///     assert_eq!((charge.amount(), budget.charged()), (3, 3));
/// }
/// assert_eq!(budget.charged(), 0);
/// ```
#[derive(Debug)]
#[must_use = "dropping the guard uncharges at once"]
pub struct Charge<'a> {
    budget: &'a Budget,
    amount: u64,
}

impl Charge<'_> {
    /// The amount this guard holds.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// Gives up the guard without uncharging and returns the amount; the
    /// caller now owns it and must give it back with [`Budget::uncharge`].
    pub fn into_raw(self) -> u64 {
        let amount = self.amount;
        std::mem::forget(self);
        amount
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        let result = self.budget.uncharge(self.amount);
        // The guard's amount is still charged unless someone else uncharged
        // what they did not own; that bug is theirs, and a destructor cannot
        // report it, so it is only caught in debug builds.
        debug_assert!(result.is_ok(), "charge guard drop: {result:?}");
    }
}

/// How much memory may be pinned: the value of a `--pin-limit SIZE` flag.
///
/// Parses from `unlimited`, `<n>p` (pages), or `<n>` bytes with an optional
/// binary suffix `K`, `M`, `G` or `T` (optionally followed by `iB` or `B`).
/// Byte limits round down to whole pages, like the kernel's
/// `rlimit(RLIMIT_MEMLOCK) >> PAGE_SHIFT`.
///
/// ```
/// use vmm::mm::pin_account::PinLimit;
///
/// assert_eq!("8M".parse::<PinLimit>().unwrap().pages(), 2048);
/// assert_eq!("4097".parse::<PinLimit>().unwrap().pages(), 1);
/// assert_eq!("300p".parse::<PinLimit>().unwrap(), PinLimit::Pages(300));
/// assert_eq!("unlimited".parse::<PinLimit>().unwrap().pages(), u64::MAX);
/// assert!("8X".parse::<PinLimit>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinLimit {
    /// At most this many bytes (rounded down to pages).
    Bytes(u64),
    /// At most this many pages.
    Pages(u64),
    /// No limit.
    Unlimited,
}

impl PinLimit {
    /// The limit in pages of [`PAGE_SIZE`].
    pub fn pages(self) -> u64 {
        match self {
            Self::Bytes(bytes) => bytes / PAGE_SIZE,
            Self::Pages(pages) => pages,
            Self::Unlimited => u64::MAX,
        }
    }

    /// The soft `RLIMIT_MEMLOCK` of this process; `RLIM_INFINITY` is
    /// [`PinLimit::Unlimited`].
    pub fn from_rlimit() -> Result<Self, PinAccountError> {
        let mut rlim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `rlim` is a valid, writable `struct rlimit` that outlives the
        // call; getrlimit writes only into it.
        let ret = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rlim) };
        if ret != 0 {
            return Err(PinAccountError::Rlimit {
                errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            });
        }
        if rlim.rlim_cur == libc::RLIM_INFINITY {
            Ok(Self::Unlimited)
        } else {
            Ok(Self::Bytes(rlim.rlim_cur))
        }
    }
}

impl FromStr for PinLimit {
    type Err = PinAccountError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = || PinAccountError::InvalidLimit {
            input: input.to_owned(),
        };
        let text = input.trim();
        if text.eq_ignore_ascii_case("unlimited") {
            return Ok(Self::Unlimited);
        }
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, suffix) = text.split_at(digits_end);
        let value: u64 = digits.parse().map_err(|_| invalid())?;
        let shift = match suffix.to_ascii_lowercase().as_str() {
            "p" => return Ok(Self::Pages(value)),
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(invalid()),
        };
        let bytes = value.checked_mul(1u64 << shift).ok_or_else(invalid)?;
        Ok(Self::Bytes(bytes))
    }
}

/// A serializable sample of one [`Budget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetStats {
    /// Currently charged.
    pub charged: u64,
    /// Largest total ever charged.
    pub peak: u64,
    /// The limit.
    pub limit: u64,
    /// Charges refused so far.
    pub charge_failures: u64,
}

/// A serializable sample of a [`PinAccount`], for the JSON report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PinStats {
    /// Pinned guest pages (units of [`PAGE_SIZE`]).
    pub pinned_pages: BudgetStats,
    /// DMA mappings (one per mapped IOVA range).
    pub dma_mappings: BudgetStats,
}

/// The pin accounting of one VM: pinned pages and DMA mappings.
///
/// The budgets are independent; a caller that pins pages for a new DMA
/// mapping charges both (take [`Charge`] guards so an error on the second
/// gives back the first).
#[derive(Debug)]
pub struct PinAccount {
    pinned: Budget,
    dma_mappings: Budget,
}

impl PinAccount {
    /// An account limited to `pin_limit` pinned pages and
    /// [`DEFAULT_DMA_ENTRY_LIMIT`] DMA mappings.
    pub fn new(pin_limit: PinLimit) -> Self {
        Self::with_limits(pin_limit, DEFAULT_DMA_ENTRY_LIMIT)
    }

    /// An account with explicit limits for both budgets.
    pub fn with_limits(pin_limit: PinLimit, dma_mapping_limit: u64) -> Self {
        Self {
            pinned: Budget::new("pinned pages", pin_limit.pages()),
            dma_mappings: Budget::new("dma mappings", dma_mapping_limit),
        }
    }

    /// The default account: pinned pages limited by this process's soft
    /// `RLIMIT_MEMLOCK` (which the kernel does not enforce for a root VMM, see
    /// the module docs), DMA mappings by [`DEFAULT_DMA_ENTRY_LIMIT`].
    pub fn from_rlimit() -> Result<Self, PinAccountError> {
        Ok(Self::new(PinLimit::from_rlimit()?))
    }

    /// The pinned-page budget, in pages of [`PAGE_SIZE`].
    pub fn pinned(&self) -> &Budget {
        &self.pinned
    }

    /// The DMA-mapping budget, in mappings.
    pub fn dma_mappings(&self) -> &Budget {
        &self.dma_mappings
    }

    /// A serializable sample of both budgets.
    pub fn snapshot(&self) -> PinStats {
        PinStats {
            pinned_pages: self.pinned.stats(),
            dma_mappings: self.dma_mappings.stats(),
        }
    }
}

/// The broken pattern this module avoids, kept only so the tests can show they
/// tell the two apart: speculatively add, check, subtract again on failure.
#[cfg(test)]
mod rollback {
    use super::{Budget, PinAccountError};
    use crate::mm::sync::Ordering;

    /// Add-then-rollback charge (seed 000's `atomic_add_return` version, and
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
}

#[cfg(all(test, not(vmm_loom)))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn test_budget_charge_exact_limit_succeeds() {
        let budget = Budget::new("b", 100);
        assert_eq!(budget.try_charge(60), Ok(60));
        assert_eq!(budget.try_charge(40), Ok(100));
        assert_eq!(budget.charged(), 100);
    }

    #[test]
    fn test_budget_charge_one_over_limit_fails_and_changes_nothing() {
        let budget = Budget::new("b", 100);
        budget.try_charge(60).unwrap();
        assert_eq!(
            budget.try_charge(41),
            Err(PinAccountError::OverLimit {
                budget: "b",
                requested: 41,
                observed: 60,
                limit: 100
            })
        );
        assert_eq!((budget.charged(), budget.peak()), (60, 60));
    }

    #[test]
    fn test_budget_charge_above_limit_from_empty_fails() {
        let budget = Budget::new("b", 100);
        assert!(matches!(
            budget.try_charge(101),
            Err(PinAccountError::OverLimit { observed: 0, .. })
        ));
        assert_eq!(budget.charged(), 0);
    }

    #[test]
    fn test_budget_zero_charge_succeeds_at_limit() {
        let budget = Budget::new("b", 5);
        budget.try_charge(5).unwrap();
        assert_eq!(budget.try_charge(0), Ok(5));
        assert_eq!(budget.uncharge(0), Ok(5));
        assert_eq!(budget.charge_failures(), 0);
    }

    #[test]
    fn test_budget_uncharge_more_than_charged_reports_underflow() {
        let budget = Budget::new("b", 100);
        budget.try_charge(10).unwrap();
        assert_eq!(
            budget.uncharge(11),
            Err(PinAccountError::Underflow {
                budget: "b",
                requested: 11,
                charged: 10
            })
        );
        assert_eq!(budget.charged(), 10);
        assert_eq!(budget.uncharge(10), Ok(0));
    }

    #[test]
    fn test_budget_charge_overflowing_u64_reports_overflow() {
        let budget = Budget::new("b", u64::MAX);
        assert_eq!(budget.try_charge(u64::MAX - 1), Ok(u64::MAX - 1));
        assert_eq!(
            budget.try_charge(2),
            Err(PinAccountError::Overflow {
                budget: "b",
                requested: 2,
                observed: u64::MAX - 1
            })
        );
        assert_eq!(budget.charged(), u64::MAX - 1);
        assert_eq!(budget.try_charge(1), Ok(u64::MAX));
    }

    #[test]
    fn test_budget_peak_keeps_highest_total() {
        let budget = Budget::new("b", 100);
        budget.try_charge(30).unwrap();
        budget.try_charge(50).unwrap();
        budget.uncharge(70).unwrap();
        budget.try_charge(20).unwrap();
        assert_eq!((budget.charged(), budget.peak()), (30, 80));
    }

    #[test]
    fn test_budget_failure_counter_counts_refused_charges_only() {
        let budget = Budget::new("b", 10);
        budget.try_charge(11).unwrap_err();
        budget.try_charge(10).unwrap();
        budget.try_charge(1).unwrap_err();
        budget.uncharge(11).unwrap_err();
        assert_eq!(budget.charge_failures(), 2);
        let overflow = Budget::new("o", u64::MAX);
        overflow.try_charge(u64::MAX).unwrap();
        overflow.try_charge(1).unwrap_err();
        assert_eq!(overflow.charge_failures(), 1);
    }

    #[test]
    fn test_charge_guard_drop_uncharges() {
        let budget = Budget::new("b", 10);
        let guard = budget.try_charge_guard(10).unwrap();
        assert_eq!((guard.amount(), budget.charged()), (10, 10));
        assert!(budget.try_charge_guard(1).is_err());
        drop(guard);
        assert_eq!(budget.charged(), 0);
        assert_eq!(budget.peak(), 10);
    }

    #[test]
    fn test_charge_guard_into_raw_keeps_charge() {
        let budget = Budget::new("b", 10);
        let amount = budget.try_charge_guard(4).unwrap().into_raw();
        assert_eq!((amount, budget.charged()), (4, 4));
        assert_eq!(budget.uncharge(amount), Ok(0));
    }

    #[test]
    fn test_pin_account_error_messages_name_values() {
        let budget = Budget::new("pinned pages", 8);
        let over = budget.try_charge(9).unwrap_err().to_string();
        assert!(over.contains("pinned pages") && over.contains('9') && over.contains("limit 8"));
        let under = budget.uncharge(3).unwrap_err().to_string();
        assert!(under.contains("uncharging 3") && under.contains("only 0 charged"));
    }

    #[test]
    fn test_pin_limit_parse_accepts_suffixes() {
        let parse = |s: &str| s.parse::<PinLimit>().unwrap();
        assert_eq!(parse("4096"), PinLimit::Bytes(4096));
        assert_eq!(parse("64k"), PinLimit::Bytes(64 << 10));
        assert_eq!(parse("8MiB"), PinLimit::Bytes(8 << 20));
        assert_eq!(parse("2G"), PinLimit::Bytes(2 << 30));
        assert_eq!(parse("1TB"), PinLimit::Bytes(1 << 40));
        assert_eq!(parse("12p"), PinLimit::Pages(12));
        assert_eq!(parse(" Unlimited "), PinLimit::Unlimited);
        assert_eq!(parse("8M").pages(), 2048);
        assert_eq!(parse("8191").pages(), 1);
    }

    #[test]
    fn test_pin_limit_parse_rejects_garbage_and_overflow() {
        for bad in [
            "",
            "M",
            "-1",
            "1.5G",
            "8X",
            "4 K",
            "18446744073709551616",
            "16777216T",
        ] {
            assert_eq!(
                bad.parse::<PinLimit>(),
                Err(PinAccountError::InvalidLimit {
                    input: bad.to_owned()
                }),
                "{bad:?}"
            );
        }
    }

    /// The soft "Max locked memory" of this process per /proc/self/limits: an
    /// oracle independent of `getrlimit`.
    fn proc_memlock_soft_limit() -> PinLimit {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max locked memory"))
            .unwrap();
        let soft = line["Max locked memory".len()..]
            .split_whitespace()
            .next()
            .unwrap();
        if soft == "unlimited" {
            PinLimit::Unlimited
        } else {
            PinLimit::Bytes(soft.parse().unwrap())
        }
    }

    #[test]
    fn test_pin_account_from_rlimit_uses_soft_memlock_in_pages() {
        let account = PinAccount::from_rlimit().unwrap();
        assert_eq!(PinLimit::from_rlimit().unwrap(), proc_memlock_soft_limit());
        assert_eq!(account.pinned().limit(), proc_memlock_soft_limit().pages());
        assert_eq!(account.dma_mappings().limit(), DEFAULT_DMA_ENTRY_LIMIT);
    }

    #[test]
    fn test_pin_account_with_limits_rounds_bytes_down_to_pages() {
        let account = PinAccount::with_limits(PinLimit::Bytes(3 * PAGE_SIZE + 5), 7);
        assert_eq!(account.pinned().limit(), 3);
        assert_eq!(account.dma_mappings().limit(), 7);
        assert_eq!(
            PinAccount::new(PinLimit::Unlimited).pinned().limit(),
            u64::MAX
        );
    }

    #[test]
    fn test_pin_account_snapshot_serializes_both_budgets() {
        let account = PinAccount::with_limits(PinLimit::Pages(10), 2);
        let _pages = account.pinned().try_charge_guard(6).unwrap();
        account.pinned().try_charge(5).unwrap_err();
        account.dma_mappings().try_charge(1).unwrap();
        let json = serde_json::to_value(account.snapshot()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "pinned_pages": {"charged": 6, "peak": 6, "limit": 10, "charge_failures": 1},
                "dma_mappings": {"charged": 1, "peak": 1, "limit": 2, "charge_failures": 0},
            })
        );
    }

    /// The concurrent load shared by the CAS test and the add-then-rollback
    /// demonstration. The load is built so that every request's fate is known
    /// in advance, whatever the interleaving:
    ///
    /// - `BASE` is charged for the whole run, so `charged >= BASE` always and a
    ///   "doomed" request of more than `LIMIT - BASE` must always fail;
    /// - each small charger keeps at most `SMALL_BOUND` outstanding, and the big
    ///   charger holds at most one "fitting" request of at most `FIT_MAX`, with
    ///   `BASE + SMALL_THREADS * SMALL_BOUND + FIT_MAX == LIMIT`, so the
    ///   committed total always leaves room for any small or fitting request:
    ///   such a request failing is a false failure, with no room for doubt.
    ///
    /// The committed total reaches the limit exactly when everyone is full.
    mod load {
        use super::super::{rollback, Budget, PinAccountError};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::time::{Duration, Instant};

        pub(super) type ChargeFn = fn(&Budget, u64) -> Result<u64, PinAccountError>;
        pub(super) const CAS: ChargeFn = Budget::try_charge;
        pub(super) const ROLLBACK: ChargeFn = rollback::try_charge;

        pub(super) const LIMIT: u64 = 10_000;
        pub(super) const BASE: u64 = 1_000;
        const SMALL_THREADS: u64 = 3;
        const SMALL_BOUND: u64 = 1_000;
        const SMALL_MAX: u64 = 64;
        pub(super) const FIT_MAX: u64 = LIMIT - BASE - SMALL_THREADS * SMALL_BOUND;
        pub(super) const FIT_MIN: u64 = FIT_MAX / 2;
        const DOOM_MIN: u64 = LIMIT - BASE + 1;
        /// The big charger must have tried at least this often before a
        /// bounded run may end.
        const MIN_BIG_ATTEMPTS: u64 = 20_000;

        /// xorshift64*: deterministic per-thread randomness without a crate.
        struct Rng(u64);
        impl Rng {
            fn below(&mut self, n: u64) -> u64 {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
            }
            fn between(&mut self, lo: u64, hi: u64) -> u64 {
                lo + self.below(hi - lo + 1)
            }
        }

        #[derive(Debug, Default, Clone, Copy)]
        pub(super) struct Tally {
            pub(super) ok: u64,
            pub(super) legit_failures: u64,
            /// Failures of requests the load guarantees room for, or failures
            /// whose observed value left room.
            pub(super) false_failures: u64,
            /// Successes above the limit or of doomed requests.
            pub(super) overshoots: u64,
        }

        impl Tally {
            fn add(&mut self, o: Tally) {
                self.ok += o.ok;
                self.legit_failures += o.legit_failures;
                self.false_failures += o.false_failures;
                self.overshoots += o.overshoots;
            }

            /// Classifies one charge result; `fits` says whether the load
            /// guarantees room for it. Returns whether it was a false failure.
            fn record(&mut self, n: u64, fits: bool, result: Result<u64, PinAccountError>) -> bool {
                match result {
                    Ok(new) => {
                        self.ok += 1;
                        if new > LIMIT || !fits {
                            self.overshoots += 1;
                        }
                        false
                    }
                    Err(PinAccountError::OverLimit { observed, .. }) => {
                        if fits || observed + n <= LIMIT {
                            self.false_failures += 1;
                            true
                        } else {
                            self.legit_failures += 1;
                            false
                        }
                    }
                    Err(other) => panic!("unexpected error under load: {other}"),
                }
            }
        }

        #[derive(Debug)]
        pub(super) struct Report {
            pub(super) tally: Tally,
            pub(super) big_fit_successes: u64,
            pub(super) watcher_max: u64,
            pub(super) watcher_overshoots: u64,
            pub(super) elapsed: Duration,
        }

        struct Shared<'a> {
            budget: &'a Budget,
            charge: ChargeFn,
            stop: AtomicBool,
            smalls_done: AtomicU64,
            big_attempts: AtomicU64,
            false_seen: AtomicU64,
        }

        fn small_charger(s: &Shared<'_>, seed: u64, max_iters: Option<u64>) -> Tally {
            let mut rng = Rng(seed);
            let mut tally = Tally::default();
            let mut held: Vec<u64> = Vec::new();
            let mut held_sum = 0;
            let mut iters = 0;
            while !s.stop.load(Ordering::Relaxed) && max_iters.is_none_or(|m| iters < m) {
                iters += 1;
                let n = rng.between(1, SMALL_MAX);
                if held_sum + n <= SMALL_BOUND {
                    let result = (s.charge)(s.budget, n);
                    if result.is_ok() {
                        held.push(n);
                        held_sum += n;
                    }
                    if tally.record(n, true, result) {
                        s.false_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if !held.is_empty() && rng.below(2) == 0 {
                    let n = held.swap_remove(rng.below(held.len() as u64) as usize);
                    held_sum -= n;
                    s.budget.uncharge(n).unwrap();
                }
            }
            for n in held {
                s.budget.uncharge(n).unwrap();
            }
            s.smalls_done.fetch_add(1, Ordering::Relaxed);
            tally
        }

        /// Mostly doomed requests that nearly fill the limit (the transient
        /// an add-then-rollback charger exposes), sometimes fitting ones.
        fn big_charger(s: &Shared<'_>) -> (Tally, u64) {
            let mut rng = Rng(0xb16_b16);
            let mut tally = Tally::default();
            let mut fit_successes = 0;
            while !s.stop.load(Ordering::Relaxed) {
                s.big_attempts.fetch_add(1, Ordering::Relaxed);
                let fits = rng.below(4) == 0;
                let n = if fits {
                    rng.between(FIT_MIN, FIT_MAX)
                } else {
                    rng.between(DOOM_MIN, LIMIT)
                };
                let result = (s.charge)(s.budget, n);
                let ok = result.is_ok();
                if tally.record(n, fits, result) {
                    s.false_seen.fetch_add(1, Ordering::Relaxed);
                }
                if ok {
                    fit_successes += u64::from(fits);
                    s.budget.uncharge(n).unwrap();
                }
            }
            (tally, fit_successes)
        }

        fn watcher(s: &Shared<'_>) -> (u64, u64) {
            let (mut max, mut overshoots) = (0, 0);
            while !s.stop.load(Ordering::Relaxed) {
                let v = s.budget.charged();
                max = max.max(v);
                overshoots += u64::from(v > LIMIT);
            }
            (max, overshoots)
        }

        /// Runs the load on `budget` (limit `LIMIT`, `BASE` already charged)
        /// until every small charger did `max_iters` iterations (and the big
        /// one tried often enough), or a false failure was seen if
        /// `stop_on_false_failure`, or `deadline` passed.
        pub(super) fn run(
            budget: &Budget,
            charge: ChargeFn,
            max_iters: Option<u64>,
            stop_on_false_failure: bool,
            deadline: Duration,
        ) -> Report {
            assert_eq!((budget.limit(), budget.charged()), (LIMIT, BASE));
            let shared = Shared {
                budget,
                charge,
                stop: AtomicBool::new(false),
                smalls_done: AtomicU64::new(0),
                big_attempts: AtomicU64::new(0),
                false_seen: AtomicU64::new(0),
            };
            let start = Instant::now();
            std::thread::scope(|scope| {
                let s = &shared;
                let smalls: Vec<_> = (0..SMALL_THREADS)
                    .map(|i| scope.spawn(move || small_charger(s, 0x9e37_79b9 + i, max_iters)))
                    .collect();
                let big = scope.spawn(move || big_charger(s));
                let watch = scope.spawn(move || watcher(s));
                loop {
                    std::thread::sleep(Duration::from_millis(1));
                    let finished = s.smalls_done.load(Ordering::Relaxed) == SMALL_THREADS
                        && s.big_attempts.load(Ordering::Relaxed) >= MIN_BIG_ATTEMPTS;
                    let found = stop_on_false_failure && s.false_seen.load(Ordering::Relaxed) > 0;
                    if finished || found || start.elapsed() > deadline {
                        break;
                    }
                }
                s.stop.store(true, Ordering::Relaxed);
                let mut tally = Tally::default();
                for small in smalls {
                    tally.add(small.join().unwrap());
                }
                let (big_tally, big_fit_successes) = big.join().unwrap();
                tally.add(big_tally);
                let (watcher_max, watcher_overshoots) = watch.join().unwrap();
                Report {
                    tally,
                    big_fit_successes,
                    watcher_max,
                    watcher_overshoots,
                    elapsed: start.elapsed(),
                }
            })
        }
    }

    fn loaded_budget() -> Budget {
        let budget = Budget::new("pinned pages", load::LIMIT);
        budget.try_charge(load::BASE).unwrap();
        budget
    }

    #[test]
    fn test_budget_concurrent_charges_never_overshoot_or_fail_falsely() {
        let budget = loaded_budget();
        let report = load::run(
            &budget,
            load::CAS,
            Some(200_000),
            false,
            Duration::from_millis(1500),
        );
        eprintln!("cas load, {:?}: {report:?}", report.elapsed);
        let t = report.tally;
        assert_eq!(t.false_failures, 0, "{report:?}");
        assert_eq!(t.overshoots, 0, "{report:?}");
        assert_eq!(report.watcher_overshoots, 0, "{report:?}");
        assert!(report.watcher_max <= load::LIMIT, "{report:?}");
        // The load was real: many charges, doomed ones refused, big fitting
        // ones accepted while the small chargers held their share.
        assert!(t.ok > 10_000 && t.legit_failures > 100, "{report:?}");
        assert!(report.big_fit_successes > 0, "{report:?}");
        assert!(budget.peak() >= load::BASE + load::FIT_MIN && budget.peak() <= load::LIMIT);
        // Every refusal was counted, and nothing else was.
        assert_eq!(budget.charge_failures(), t.legit_failures);
        assert_eq!(budget.charged(), load::BASE);
        assert_eq!(budget.uncharge(load::BASE), Ok(0));
    }

    #[test]
    fn test_rollback_charge_under_same_load_fails_falsely() {
        let budget = loaded_budget();
        // Stops at the first false failure; usually within milliseconds. The
        // bound is generous for a busy 2-core machine.
        let report = load::run(&budget, load::ROLLBACK, None, true, Duration::from_secs(20));
        eprintln!("rollback load, {:?}: {report:?}", report.elapsed);
        assert!(
            report.tally.false_failures > 0,
            "no false failure found: {report:?}"
        );
        assert_eq!(budget.charged(), load::BASE, "{report:?}");
        assert_eq!(budget.uncharge(load::BASE), Ok(0));
    }
}

#[cfg(all(test, vmm_loom))]
mod loom_tests {
    use super::*;
    use crate::mm::sync::{thread, Arc};
    use loom::model::Builder;

    type ChargeFn = fn(&Budget, u64) -> Result<u64, PinAccountError>;

    fn builder() -> Builder {
        let mut builder = Builder::new();
        builder.preemption_bound = Some(3);
        builder
    }

    /// What one execution of [`fitting_charges_model`] got wrong.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Violations {
        /// Fitting charges that failed, or failures whose observed value
        /// left room.
        false_failures: u64,
        /// Anything else: a doomed charge that succeeded, a success above the
        /// limit, an observed value above the limit, a wrong final count or
        /// peak.
        other: u64,
    }

    /// Limit 4 with 1 charged throughout. A doomed charge of 4 (1 + 4 > 4)
    /// races fitting charges of 2 and 1 (1 + 2 + 1 = 4: always room).
    fn fitting_charges_model(charge: ChargeFn) -> Violations {
        let budget = Arc::new(Budget::new("model", 4));
        budget.try_charge(1).unwrap();
        // (false failures, other violations) of a charge the model knows fits.
        let fitting = move |budget: &Budget, n: u64| match charge(budget, n) {
            Ok(new) => {
                budget.uncharge(n).unwrap();
                (0, u64::from(new > 4))
            }
            Err(_) => (1, 0),
        };
        let doomed_budget = Arc::clone(&budget);
        let doomed = thread::spawn(move || match charge(&doomed_budget, 4) {
            Err(PinAccountError::OverLimit { observed, .. }) => {
                (u64::from(observed + 4 <= 4), u64::from(observed > 4))
            }
            _ => (0, 1),
        });
        let fit_budget = Arc::clone(&budget);
        let fit = thread::spawn(move || fitting(&fit_budget, 2));
        let results = [
            fitting(&budget, 1),
            doomed.join().unwrap(),
            fit.join().unwrap(),
        ];
        let mut v = Violations::default();
        for (false_failures, other) in results {
            v.false_failures += false_failures;
            v.other += other;
        }
        v.other += u64::from(budget.charged() != 1 || budget.peak() > 4);
        v
    }

    #[test]
    fn test_loom_cas_charge_fitting_never_fails_doomed_always_fails() {
        builder().check(|| {
            assert_eq!(
                fitting_charges_model(Budget::try_charge),
                Violations::default()
            );
        });
    }

    #[test]
    fn test_loom_rollback_charge_same_model_fails_falsely() {
        use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};
        let found = std::sync::Arc::new(AtomicBool::new(false));
        let seen = std::sync::Arc::clone(&found);
        builder().check(move || {
            let v = fitting_charges_model(rollback::try_charge);
            // Add-then-rollback never commits too much; its only fault is
            // refusing charges that fit.
            assert_eq!(v.other, 0, "{v:?}");
            if v.false_failures > 0 {
                seen.store(true, StdOrdering::Relaxed);
            }
        });
        assert!(
            found.load(StdOrdering::Relaxed),
            "loom found no interleaving where add-then-rollback fails falsely"
        );
    }

    #[test]
    fn test_loom_budget_last_room_exactly_one_charge_wins() {
        builder().check(|| {
            let budget = Arc::new(Budget::new("model", 2));
            let other = Arc::clone(&budget);
            let racer = thread::spawn(move || other.try_charge(2));
            let mine = budget.try_charge(2);
            let theirs = racer.join().unwrap();
            let refused = PinAccountError::OverLimit {
                budget: "model",
                requested: 2,
                observed: 2,
                limit: 2,
            };
            match (mine, theirs) {
                (Ok(2), Err(e)) | (Err(e), Ok(2)) => assert_eq!(e, refused),
                other => panic!("exactly one must win: {other:?}"),
            }
            assert_eq!(
                (budget.charged(), budget.peak(), budget.charge_failures()),
                (2, 2, 1)
            );
            assert_eq!(budget.uncharge(2), Ok(0));
        });
    }

    #[test]
    fn test_loom_budget_concurrent_uncharges_never_underflow() {
        builder().check(|| {
            let budget = Arc::new(Budget::new("model", 2));
            budget.try_charge(2).unwrap();
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    let b = Arc::clone(&budget);
                    thread::spawn(move || b.uncharge(1))
                })
                .collect();
            // Fits unless both uncharges are still to come.
            let guard = match budget.try_charge_guard(1) {
                Ok(guard) => Some(guard),
                Err(e) => {
                    assert!(
                        matches!(e, PinAccountError::OverLimit { observed: 2, .. }),
                        "{e}"
                    );
                    None
                }
            };
            for handle in handles {
                assert!(handle.join().unwrap().is_ok());
            }
            assert_eq!(budget.charged(), u64::from(guard.is_some()));
            drop(guard);
            assert_eq!(budget.charged(), 0);
            assert!(matches!(
                budget.uncharge(1),
                Err(PinAccountError::Underflow { charged: 0, .. })
            ));
            assert_eq!(budget.charged(), 0);
        });
    }
}
