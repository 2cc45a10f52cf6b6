//! Shuttle model of the raw baseline's barrier and abort ([`RawStop`]):
//! parties meet at a barrier twice, as the raw vCPUs do between passes,
//! and one of them fails before its second meeting and aborts instead.
//!
//! Property: every party returns (no schedule leaves one waiting), and the
//! ones that did not fail return the failure's reason. Broken variant the
//! model must catch: an abort that records the reason but does not wake
//! the waiters (a party already waiting sleeps for ever: a deadlock).
//!
//! Run: `RUSTFLAGS="--cfg vmm_shuttle" cargo test -p vmm --lib --release shuttle_raw_stop`.

use super::raw_stop::RawStop;
use crate::mm::model_support::{assert_caught, pct};
use crate::mm::sync::{thread, Arc};

const ITERATIONS: usize = 3_000;

fn model(notify: bool) {
    let stop = Arc::new(RawStop::new(3));
    let parties: Vec<_> = (0..3)
        .map(|i| {
            let stop = stop.clone();
            thread::spawn(move || {
                // The first meeting: all three arrive.
                stop.meet().expect("nobody failed yet");
                if i == 2 {
                    // This party fails before the second meeting.
                    stop.abort_for_model("vCPU 2 failed".into(), notify);
                    return Ok(false);
                }
                stop.meet()
            })
        })
        .collect();
    for p in parties {
        match p.join().unwrap() {
            Ok(false) => {}
            Ok(true) => panic!("a leader at a meeting one party never reached"),
            Err(reason) => assert_eq!(reason, "vCPU 2 failed"),
        }
    }
}

#[test]
fn shuttle_raw_stop_every_party_returns_after_an_abort() {
    pct(|| model(true), ITERATIONS);
}

#[test]
fn shuttle_raw_stop_abort_without_wakeup_is_caught() {
    assert_caught("deadlock", ITERATIONS, || model(false));
}
