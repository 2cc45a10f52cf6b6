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
//!
//! [`PinLimit`] parses by hand (not with a strum derive): it carries a size or
//! a page count (`256M`, `4096p`, `unlimited`).

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
    /// A pin limit past `u64::MAX` bytes (or pages).
    #[error(
        "pin limit {input:?} is too large: the maximum is {max} bytes (16 EiB - 1) or {max}p; \
         use 'unlimited' for no limit",
        max = u64::MAX
    )]
    LimitTooLarge {
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
        let value: u64 = match digits.parse() {
            Ok(v) => v,
            Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => {
                return Err(PinAccountError::LimitTooLarge {
                    input: input.to_owned(),
                })
            }
            Err(_) => return Err(invalid()),
        };
        let shift = match suffix.to_ascii_lowercase().as_str() {
            "p" => return Ok(Self::Pages(value)),
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(invalid()),
        };
        let bytes =
            value
                .checked_mul(1u64 << shift)
                .ok_or_else(|| PinAccountError::LimitTooLarge {
                    input: input.to_owned(),
                })?;
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
#[cfg(all(test, not(vmm_shuttle)))]
mod rollback;

#[cfg(all(test, not(vmm_loom), not(vmm_shuttle)))]
mod tests;

#[cfg(all(test, vmm_loom))]
mod loom_tests;
