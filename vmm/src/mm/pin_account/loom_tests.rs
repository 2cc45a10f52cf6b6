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
