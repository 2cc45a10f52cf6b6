use std::sync::mpsc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use super::*;
use crate::mm::addr::Gpa;

fn r(start: u64, len: u64) -> GpaRange {
    GpaRange::new(Gpa(start), len).unwrap()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Check(&'static str, GpaRange),
    Start(&'static str, GpaRange, Reason),
    End(&'static str, GpaRange),
    Added(&'static str, GpaRange, Reason),
    Reshaped(&'static str, GpaRange, bool),
    Teardown,
}

type Log = Arc<StdMutex<Vec<Ev>>>;

/// Records every callback into a log shared by several subscribers.
struct Rec {
    name: &'static str,
    log: Log,
    veto: Option<&'static str>,
    /// For `reshaped`: whether a fault's retry check sees the bracket.
    hub: std::sync::OnceLock<(Arc<InvalidationHub>, ReadSeq)>,
}

impl Rec {
    fn new(name: &'static str, log: &Log) -> Arc<Self> {
        Arc::new(Self {
            name,
            log: Arc::clone(log),
            veto: None,
            hub: std::sync::OnceLock::new(),
        })
    }
    fn push(&self, ev: Ev) {
        self.log.lock().unwrap().push(ev);
    }
}

impl Subscriber for Rec {
    fn invalidate_start(&self, range: GpaRange, reason: Reason) {
        self.push(Ev::Start(self.name, range, reason));
    }
    fn invalidate_end(&self, range: GpaRange) {
        self.push(Ev::End(self.name, range));
    }
    fn memory_added(&self, range: GpaRange, reason: Reason) {
        self.push(Ev::Added(self.name, range, reason));
    }
    fn reshaped(&self, range: GpaRange) {
        let retry = self.hub.get().is_some_and(|(h, seq)| h.retry(*seq, range));
        self.push(Ev::Reshaped(self.name, range, retry));
    }
    fn check(&self, range: GpaRange, _reason: Reason) -> Result<(), String> {
        self.push(Ev::Check(self.name, range));
        match self.veto {
            Some(msg) => Err(msg.to_string()),
            None => Ok(()),
        }
    }
}

fn starts_and_ends(log: &Log) -> Vec<Ev> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|e| !matches!(e, Ev::Check(..)))
        .cloned()
        .collect()
}

#[test]
fn test_hub_begin_end_clips_and_orders_across_subscribers() {
    let hub = InvalidationHub::new();
    let log = Log::default();
    hub.subscribe(Interest::All, Rec::new("all", &log), Replay::None)
        .unwrap();
    let low = Interest::Range(r(0x0, 0x2000));
    hub.subscribe(low, Rec::new("low", &log), Replay::None)
        .unwrap();
    let high = Interest::Range(r(0x3000, 0x4000));
    hub.subscribe(high, Rec::new("high", &log), Replay::None)
        .unwrap();

    let t = hub.begin(r(0x1000, 0x3000), Reason::Shrink).unwrap();
    log.lock().unwrap().push(Ev::Teardown);
    hub.end(t);

    assert_eq!(
        starts_and_ends(&log),
        vec![
            Ev::Start("all", r(0x1000, 0x3000), Reason::Shrink),
            Ev::Start("low", r(0x1000, 0x1000), Reason::Shrink),
            Ev::Start("high", r(0x3000, 0x1000), Reason::Shrink),
            Ev::Teardown,
            Ev::End("all", r(0x1000, 0x3000)),
            Ev::End("low", r(0x1000, 0x1000)),
            Ev::End("high", r(0x3000, 0x1000)),
        ]
    );
    assert_eq!(hub.in_progress(), 0);
}

#[test]
fn test_hub_disjoint_interest_hears_nothing() {
    let hub = InvalidationHub::new();
    let log = Log::default();
    let far = Interest::Range(r(0x10_0000, 0x1000));
    hub.subscribe(far, Rec::new("far", &log), Replay::None)
        .unwrap();
    // Adjacent but not overlapping on both sides.
    hub.begin(r(0x0, 0x10_0000), Reason::Unplug).unwrap().end();
    hub.begin(r(0x10_1000, 0x1000), Reason::Discard)
        .unwrap()
        .end();
    hub.added(r(0x20_0000, 0x1000), Reason::Plug).unwrap();
    assert!(log.lock().unwrap().is_empty());
}

/// A hub with a recording subscriber on everything ("dev") and a vetoing one
/// on `pinned` ("pin"); returns the pin's subscription id.
fn hub_with_dev_and_pin(pinned: GpaRange) -> (InvalidationHub, Log, SubscriptionId) {
    let hub = InvalidationHub::new();
    let log = Log::default();
    hub.subscribe(Interest::All, Rec::new("dev", &log), Replay::None)
        .unwrap();
    let pin = Arc::new(Rec {
        name: "pin",
        log: Arc::clone(&log),
        veto: Some("DMA buffer pinned"),
        hub: std::sync::OnceLock::new(),
    });
    let pin_id = hub
        .subscribe(Interest::Range(pinned), pin, Replay::None)
        .unwrap();
    (hub, log, pin_id)
}

#[test]
fn test_hub_veto_refuses_and_nothing_is_delivered() {
    let (hub, log, pin_id) = hub_with_dev_and_pin(r(0x2000, 0x1000));
    let seq = hub.read_begin();

    let err = hub.begin(r(0x0, 0x10000), Reason::Unplug).unwrap_err();

    assert_eq!(
        err,
        NotifierError::Vetoed {
            subscription: pin_id,
            range: r(0x2000, 0x1000),
            reason: Reason::Unplug,
            message: "DMA buffer pinned".into(),
        }
    );
    assert!(err.to_string().contains("DMA buffer pinned"));
    assert!(starts_and_ends(&log).is_empty());
    assert_eq!(hub.in_progress(), 0);
    assert!(!hub.retry(seq, r(0x0, 0x10000)));
    // Outside the pinned range the change goes through.
    hub.begin(r(0x4000, 0x1000), Reason::Unplug).unwrap().end();
    assert_eq!(starts_and_ends(&log).len(), 2);
}

#[test]
fn test_hub_begin_all_checks_every_range_before_any_start() {
    let (hub, log, pin_id) = hub_with_dev_and_pin(r(0x8000, 0x1000));
    let changes = [
        (r(0x0, 0x2000), Reason::Unplug),
        (r(0x8000, 0x2000), Reason::Protect),
    ];

    // The second range is refused: nothing at all is started.
    let err = hub.begin_all(&changes).unwrap_err();
    assert!(
        matches!(err, NotifierError::Vetoed { subscription, .. } if subscription == pin_id),
        "{err}"
    );
    assert!(
        starts_and_ends(&log).is_empty(),
        "{:?}",
        starts_and_ends(&log)
    );
    assert_eq!(hub.in_progress(), 0);

    // A bad range anywhere refuses the whole call before any veto runs.
    log.lock().unwrap().clear();
    let bad = [
        (r(0x0, 0x1000), Reason::Unplug),
        (r(0x4000, 0), Reason::Unplug),
    ];
    assert!(matches!(
        hub.begin_all(&bad),
        Err(NotifierError::EmptyRange { .. })
    ));
    assert!(log.lock().unwrap().is_empty());

    // Without the pin: started in order, each ended on its own.
    hub.unsubscribe(pin_id).unwrap();
    let seq = hub.read_begin();
    let started = hub.begin_all(&changes).unwrap();
    assert_eq!(started.len(), 2);
    assert_eq!(hub.in_progress(), 2);
    assert!(hub.retry(seq, r(0x9000, 0x1000)));
    for invalidation in started {
        invalidation.end();
    }
    assert_eq!(
        starts_and_ends(&log),
        [
            Ev::Start("dev", r(0x0, 0x2000), Reason::Unplug),
            Ev::Start("dev", r(0x8000, 0x2000), Reason::Protect),
            Ev::End("dev", r(0x0, 0x2000)),
            Ev::End("dev", r(0x8000, 0x2000)),
        ]
    );
    assert_eq!(hub.in_progress(), 0);
}

#[test]
fn test_hub_empty_range_is_error_and_not_delivered() {
    let hub = InvalidationHub::new();
    let log = Log::default();
    hub.subscribe(Interest::All, Rec::new("all", &log), Replay::None)
        .unwrap();
    let empty = r(0x1000, 0);
    assert!(matches!(
        hub.begin(empty, Reason::Unplug),
        Err(NotifierError::EmptyRange { .. })
    ));
    assert!(matches!(
        hub.added(empty, Reason::Plug),
        Err(NotifierError::EmptyRange { .. })
    ));
    assert!(matches!(
        hub.subscribe(Interest::Range(empty), Rec::new("e", &log), Replay::None),
        Err(NotifierError::EmptyRange { .. })
    ));
    assert!(log.lock().unwrap().is_empty());
    assert_eq!(hub.subscriber_count(), 1);
}

#[test]
fn test_hub_wrong_reason_is_error() {
    let hub = InvalidationHub::new();
    assert!(matches!(
        hub.begin(r(0, 0x1000), Reason::Plug),
        Err(NotifierError::NotAnInvalidation { .. })
    ));
    assert!(matches!(
        hub.added(r(0, 0x1000), Reason::Discard),
        Err(NotifierError::NotAnAddition { .. })
    ));
}

#[test]
fn test_hub_added_overlapping_plugged_is_error() {
    let hub = InvalidationHub::new();
    hub.added(r(0x1000, 0x2000), Reason::Plug).unwrap();
    let err = hub.added(r(0x2000, 0x2000), Reason::Grow).unwrap_err();
    assert_eq!(
        err,
        NotifierError::AlreadyPlugged {
            range: r(0x2000, 0x2000),
            reason: Reason::Grow,
            existing: r(0x1000, 0x2000),
        }
    );
    assert_eq!(hub.plugged(), vec![r(0x1000, 0x2000)]);
}

#[test]
fn test_hub_subscribe_during_invalidation_gets_start_then_end() {
    let hub = InvalidationHub::new();
    let log = Log::default();
    let t = hub.begin(r(0x0, 0x4000), Reason::Protect).unwrap();

    let late = Interest::Range(r(0x3000, 0x4000));
    hub.subscribe(late, Rec::new("late", &log), Replay::None)
        .unwrap();
    assert_eq!(
        starts_and_ends(&log),
        vec![Ev::Start("late", r(0x3000, 0x1000), Reason::Protect)]
    );
    hub.end(t);

    assert_eq!(
        starts_and_ends(&log),
        vec![
            Ev::Start("late", r(0x3000, 0x1000), Reason::Protect),
            Ev::End("late", r(0x3000, 0x1000)),
        ]
    );
}

#[test]
fn test_hub_subscribe_during_invalidation_sees_retry_true() {
    let hub = InvalidationHub::new();
    let t = hub.begin(r(0x0, 0x1000), Reason::Discard).unwrap();
    let log = Log::default();
    hub.subscribe(Interest::All, Rec::new("late", &log), Replay::None)
        .unwrap();
    let seq = hub.read_begin();
    assert!(hub.retry(seq, r(0x0, 0x1000)));
    hub.end(t);
    assert!(hub.retry(seq, r(0x0, 0x1000)));
}

#[test]
fn test_hub_unsubscribe_during_invalidation_from_thread_gets_no_end() {
    let hub = InvalidationHub::new();
    let log = Log::default();
    let id = hub
        .subscribe(Interest::All, Rec::new("gone", &log), Replay::None)
        .unwrap();
    hub.subscribe(Interest::All, Rec::new("stay", &log), Replay::None)
        .unwrap();
    let t = hub.begin(r(0x0, 0x1000), Reason::Unplug).unwrap();

    std::thread::scope(|s| {
        s.spawn(|| hub.unsubscribe(id).unwrap());
    });
    hub.end(t);

    assert_eq!(
        starts_and_ends(&log),
        vec![
            Ev::Start("gone", r(0x0, 0x1000), Reason::Unplug),
            Ev::Start("stay", r(0x0, 0x1000), Reason::Unplug),
            Ev::End("stay", r(0x0, 0x1000)),
        ]
    );
    assert_eq!(
        hub.unsubscribe(id),
        Err(NotifierError::UnknownSubscription { id })
    );
}

/// Blocks in `invalidate_start` until released; reports entry and exit.
struct Blocker {
    entered: StdMutex<mpsc::Sender<()>>,
    release: StdMutex<mpsc::Receiver<()>>,
    inside: std::sync::atomic::AtomicBool,
}

impl Subscriber for Blocker {
    fn invalidate_start(&self, _: GpaRange, _: Reason) {
        self.inside.store(true, std::sync::atomic::Ordering::SeqCst);
        self.entered.lock().unwrap().send(()).unwrap();
        self.release.lock().unwrap().recv().unwrap();
        self.inside
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
    fn invalidate_end(&self, _: GpaRange) {
        panic!("end delivered after unsubscribe");
    }
}

#[test]
fn test_hub_unsubscribe_waits_for_running_callback() {
    let hub = InvalidationHub::new();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let blocker = Arc::new(Blocker {
        entered: StdMutex::new(entered_tx),
        release: StdMutex::new(release_rx),
        inside: false.into(),
    });
    let id = hub
        .subscribe(Interest::All, blocker.clone(), Replay::None)
        .unwrap();

    std::thread::scope(|s| {
        let writer = s.spawn(|| hub.begin(r(0, 0x1000), Reason::Unplug).unwrap().end());
        entered_rx.recv().unwrap();
        let unsub = s.spawn(|| {
            hub.unsubscribe(id).unwrap();
            // After unsubscribe returns the callback has finished.
            assert!(!blocker.inside.load(std::sync::atomic::Ordering::SeqCst));
        });
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !unsub.is_finished(),
            "unsubscribe returned during a callback"
        );
        release_tx.send(()).unwrap();
        unsub.join().unwrap();
        writer.join().unwrap();
    });
    assert_eq!(hub.subscriber_count(), 0);
}

/// Unsubscribes itself from inside `invalidate_start`.
struct SelfRemover {
    hub: Arc<InvalidationHub>,
    id: StdMutex<Option<SubscriptionId>>,
    calls: std::sync::atomic::AtomicUsize,
}

impl Subscriber for SelfRemover {
    fn invalidate_start(&self, _: GpaRange, _: Reason) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = self.id.lock().unwrap().take();
        if let Some(id) = id {
            self.hub.unsubscribe(id).unwrap();
        }
    }
    fn invalidate_end(&self, _: GpaRange) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn test_hub_unsubscribe_from_own_callback_does_not_deadlock() {
    let hub = Arc::new(InvalidationHub::new());
    let sub = Arc::new(SelfRemover {
        hub: Arc::clone(&hub),
        id: StdMutex::new(None),
        calls: 0.into(),
    });
    let id = hub
        .subscribe(Interest::All, sub.clone(), Replay::None)
        .unwrap();
    *sub.id.lock().unwrap() = Some(id);

    hub.begin(r(0, 0x1000), Reason::Unplug).unwrap().end();
    hub.begin(r(0, 0x1000), Reason::Unplug).unwrap().end();

    // Only the first start: no end, no second start.
    assert_eq!(sub.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(hub.subscriber_count(), 0);
}

#[test]
fn test_hub_replay_delivers_plugged_ranges_clipped() {
    let hub = InvalidationHub::new();
    hub.added(r(0x0, 0x4000), Reason::Plug).unwrap();
    hub.added(r(0x8000, 0x2000), Reason::Plug).unwrap();
    hub.added(r(0xa000, 0x1000), Reason::Grow).unwrap();
    hub.begin(r(0x1000, 0x1000), Reason::Unplug).unwrap().end();
    hub.begin(r(0x3000, 0x1000), Reason::Protect).unwrap().end();
    assert_eq!(
        hub.plugged(),
        vec![r(0x0, 0x1000), r(0x2000, 0x2000), r(0x8000, 0x3000)]
    );

    let log = Log::default();
    let window = Interest::Range(r(0x800, 0x8000));
    hub.subscribe(window, Rec::new("new", &log), Replay::Plugged)
        .unwrap();
    hub.subscribe(Interest::All, Rec::new("quiet", &log), Replay::None)
        .unwrap();

    assert_eq!(
        *log.lock().unwrap(),
        vec![
            Ev::Added("new", r(0x800, 0x800), Reason::Plug),
            Ev::Added("new", r(0x2000, 0x2000), Reason::Plug),
            Ev::Added("new", r(0x8000, 0x800), Reason::Plug),
        ]
    );
}

#[test]
fn test_hub_replay_during_unplug_gives_added_then_start_then_end() {
    let hub = InvalidationHub::new();
    hub.added(r(0x0, 0x2000), Reason::Plug).unwrap();
    let t = hub.begin(r(0x0, 0x2000), Reason::Unplug).unwrap();
    let log = Log::default();
    hub.subscribe(Interest::All, Rec::new("new", &log), Replay::Plugged)
        .unwrap();
    hub.end(t);
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            Ev::Added("new", r(0x0, 0x2000), Reason::Plug),
            Ev::Start("new", r(0x0, 0x2000), Reason::Unplug),
            Ev::End("new", r(0x0, 0x2000)),
        ]
    );
    assert!(hub.plugged().is_empty());
}

#[test]
fn test_hub_retry_overlapping_in_progress_is_true() {
    let hub = InvalidationHub::new();
    let seq = hub.read_begin();
    let _t = hub.begin(r(0x1000, 0x1000), Reason::Discard).unwrap();
    assert!(hub.retry(seq, r(0x1800, 0x1000)));
    assert!(hub.retry(hub.read_begin(), r(0x1800, 0x1000)));
}

#[test]
fn test_hub_retry_disjoint_in_progress_is_false() {
    let hub = InvalidationHub::new();
    let _t = hub.begin(r(0x1000, 0x1000), Reason::Discard).unwrap();
    let seq = hub.read_begin();
    assert!(!hub.retry(seq, r(0x2000, 0x1000)));
    assert!(!hub.retry(seq, r(0x0, 0x1000)));
}

#[test]
fn test_hub_retry_after_seq_change_is_true() {
    let hub = InvalidationHub::new();
    let seq = hub.read_begin();
    hub.begin(r(0x1000, 0x1000), Reason::Discard).unwrap().end();
    // Even for a range the (finished) invalidation did not touch.
    assert!(hub.retry(seq, r(0x9000, 0x1000)));
    assert!(!hub.retry(hub.read_begin(), r(0x1000, 0x1000)));
}

#[test]
fn test_hub_dropped_invalidation_keeps_the_range_plugged_ended_one_removes_it() {
    let hub = InvalidationHub::new();
    hub.added(r(0, 0x4000), Reason::Plug).unwrap();
    // A refused or rolled-back op: nothing was unplugged.
    drop(hub.begin(r(0, 0x1000), Reason::Unplug).unwrap());
    assert_eq!(hub.plugged(), vec![r(0, 0x4000)]);
    hub.begin(r(0, 0x1000), Reason::Unplug).unwrap().end();
    assert_eq!(hub.plugged(), vec![r(0x1000, 0x3000)]);
}

#[test]
fn test_hub_dropped_invalidation_is_ended() {
    let hub = InvalidationHub::new();
    let log = Log::default();
    hub.subscribe(Interest::All, Rec::new("all", &log), Replay::None)
        .unwrap();
    drop(hub.begin(r(0, 0x1000), Reason::Move).unwrap());
    assert_eq!(hub.in_progress(), 0);
    assert_eq!(
        starts_and_ends(&log).last(),
        Some(&Ev::End("all", r(0, 0x1000)))
    );
}

struct PanicsAtStart;
impl Subscriber for PanicsAtStart {
    fn invalidate_start(&self, _: GpaRange, _: Reason) {
        panic!("subscriber bug");
    }
    fn invalidate_end(&self, _: GpaRange) {}
}

#[test]
fn test_hub_panicking_start_callback_still_ends_invalidation() {
    let hub = InvalidationHub::new();
    let log = Log::default();
    hub.subscribe(Interest::All, Rec::new("ok", &log), Replay::None)
        .unwrap();
    let bad = hub
        .subscribe(Interest::All, Arc::new(PanicsAtStart), Replay::None)
        .unwrap();

    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        hub.begin(r(0, 0x1000), Reason::Unplug).map(|t| t.end())
    }));

    assert!(caught.is_err());
    assert_eq!(hub.in_progress(), 0);
    assert_eq!(
        starts_and_ends(&log).last(),
        Some(&Ev::End("ok", r(0, 0x1000)))
    );
    // The hub is still usable; the gate of the panicked subscriber is clear.
    hub.unsubscribe(bad).unwrap();
    hub.begin(r(0, 0x1000), Reason::Unplug).unwrap().end();
}

#[test]
fn test_hub_concurrent_subscribe_during_end_gets_matched_pairs() {
    // Many rounds of a subscriber registering while a writer ends: every
    // start it receives is followed by exactly one end, never reversed.
    for _ in 0..50 {
        let hub = InvalidationHub::new();
        let log = Log::default();
        let t = hub.begin(r(0, 0x1000), Reason::Unplug).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| hub.end(t));
            s.spawn(|| {
                hub.subscribe(Interest::All, Rec::new("new", &log), Replay::None)
                    .unwrap()
            });
        });
        let evs = starts_and_ends(&log);
        assert!(
            evs.is_empty()
                || evs
                    == vec![
                        Ev::Start("new", r(0, 0x1000), Reason::Unplug),
                        Ev::End("new", r(0, 0x1000)),
                    ],
            "{evs:?}"
        );
    }
}

/// `reshaped` reaches the subscribers whose interest overlaps (clipped), and
/// is bracketed on the sequence count: a fault that read it before sees
/// `retry` during the delivery and after it, none is left in progress, and
/// nothing counts as an invalidation start or end.
#[test]
fn test_hub_reshaped_is_delivered_clipped_inside_a_sequence_bracket() {
    let hub = Arc::new(InvalidationHub::new());
    let log = Log::default();
    let all = Rec::new("all", &log);
    let seq = hub.read_begin();
    let _ = all.hub.set((Arc::clone(&hub), seq));
    hub.subscribe(Interest::All, all, Replay::None).unwrap();
    hub.subscribe(
        Interest::Range(r(0x3000, 0x1000)),
        Rec::new("high", &log),
        Replay::None,
    )
    .unwrap();
    hub.subscribe(
        Interest::Range(r(0x9000, 0x1000)),
        Rec::new("far", &log),
        Replay::None,
    )
    .unwrap();
    hub.reshaped(r(0x1000, 0x3000));
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            Ev::Reshaped("all", r(0x1000, 0x3000), true),
            Ev::Reshaped("high", r(0x3000, 0x1000), false),
        ]
    );
    assert_eq!(hub.in_progress(), 0);
    assert!(hub.retry(seq, r(0x1000, 0x1000)));
    assert!(!hub.retry(hub.read_begin(), r(0x1000, 0x1000)));
}
