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
    for bad in ["", "M", "-1", "1.5G", "8X", "4 K"] {
        assert_eq!(
            bad.parse::<PinLimit>(),
            Err(PinAccountError::InvalidLimit {
                input: bad.to_owned()
            }),
            "{bad:?}"
        );
    }
    for big in [
        "18446744073709551616",
        "16777216T",
        "99999999999999999999999p",
    ] {
        let err = big.parse::<PinLimit>().unwrap_err();
        assert_eq!(
            err,
            PinAccountError::LimitTooLarge {
                input: big.to_owned()
            }
        );
        let text = err.to_string();
        assert!(
            text.contains("too large") && text.contains("18446744073709551615"),
            "{text}"
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
