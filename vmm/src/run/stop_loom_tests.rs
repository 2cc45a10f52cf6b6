//! Loom models of the stop protocol of a vCPU that runs on the calling
//! thread (`stop_signals.rs`): the vCPU loop checks its stop flag, then
//! enters `KVM_RUN`; a stop request sets the flag, then `immediate_exit`,
//! then kicks the vCPU thread.
//!
//! The kernel and KVM are modelled as they treat a signal sent to the vCPU
//! thread: taken while the thread runs in user space, its handler runs
//! there and nothing stays pending (modelled at the one point that matters,
//! between the flag check and the ioctl); taken in `KVM_RUN`, it makes the
//! ioctl return EINTR. `KVM_RUN` returns EINTR at once if `immediate_exit`
//! is set; otherwise the guest (one that spins) runs until a signal comes.
//!
//! - A request from another thread (SIGINT delivered elsewhere): flag,
//!   `immediate_exit`, kick.
//! - A request from the timer's handler on the vCPU thread itself.
//!
//! Checked: the vCPU loop ends, in every interleaving; `KVM_RUN` never
//! waits for a signal once the last one that will ever come was taken (that
//! wait would never end; the model fails it at once rather than
//! deadlocking). Broken: the request without `immediate_exit` (what a kick
//! alone does): a signal taken between the check and the ioctl is lost.
//!
//! Run: `RUSTFLAGS="--cfg vmm_loom" cargo test -p vmm --lib --release -- run::stop_loom`.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::mm::sync::{thread, Arc, AtomicBool, Condvar, Mutex, Ordering};

/// A signal sent to the vCPU thread and not yet taken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    /// The kick: a no-op handler.
    Kick,
    /// The timeout timer: its handler makes the stop request.
    Timer,
}

/// The kernel's signal state of the vCPU thread.
struct Signals {
    pending: Pending,
    /// The other thread (requester or timer) has sent its last signal.
    no_more: bool,
}

/// The vCPU's stop flag, its `kvm_run.immediate_exit`, and the kernel's
/// signal state of its thread.
struct Vcpu {
    stop: AtomicBool,
    immediate_exit: AtomicBool,
    signals: Mutex<Signals>,
    signalled: Condvar,
    /// Whether requests set `immediate_exit` (false: the broken variant).
    with_immediate_exit: bool,
}

impl Vcpu {
    fn new(with_immediate_exit: bool) -> Self {
        Self {
            stop: AtomicBool::new(false),
            immediate_exit: AtomicBool::new(false),
            signals: Mutex::new(Signals {
                pending: Pending::None,
                no_more: false,
            }),
            signalled: Condvar::new(),
            with_immediate_exit,
        }
    }

    /// `Target::request`: flag, `immediate_exit`, kick.
    fn request(&self) {
        self.stop.store(true, Ordering::Release);
        if self.with_immediate_exit {
            // Release: a store after the flag's (x86 keeps stores in order),
            // read by KVM_RUN's entry (a syscall: a full barrier).
            self.immediate_exit.store(true, Ordering::Release);
        }
        self.send(Pending::Kick, false);
    }

    /// The kernel queues `signal` for the vCPU thread and wakes it; `last`:
    /// the other thread sends nothing after it.
    fn send(&self, signal: Pending, last: bool) {
        let mut signals = self.signals.lock().unwrap();
        if signals.pending == Pending::None {
            signals.pending = signal;
        }
        signals.no_more |= last;
        self.signalled.notify_all();
    }

    /// Runs the handler of a signal taken by the vCPU thread.
    fn handle(&self, signal: Pending) {
        if signal == Pending::Timer {
            self.request();
        }
    }

    /// The vCPU thread in user space: pending signals are taken here,
    /// including one a handler sent to its own thread.
    fn user_space(&self) {
        loop {
            let taken = self.take(&mut self.signals.lock().unwrap());
            if taken == Pending::None {
                return;
            }
            self.handle(taken);
        }
    }

    /// `KVM_RUN` of a guest that never exits by itself: EINTR at once with
    /// `immediate_exit`, else once a signal is pending (its handler runs
    /// on the way out).
    fn kvm_run(&self) {
        if self.immediate_exit.load(Ordering::Acquire) {
            return;
        }
        let mut signals = self.signals.lock().unwrap();
        while signals.pending == Pending::None {
            if signals.no_more {
                drop(signals);
                panic!("lost stop: KVM_RUN waits for a signal and none will come");
            }
            signals = self.signalled.wait(signals).unwrap();
        }
        let taken = self.take(&mut signals);
        drop(signals);
        self.handle(taken);
    }

    fn take(&self, signals: &mut Signals) -> Pending {
        std::mem::replace(&mut signals.pending, Pending::None)
    }

    /// The vCPU loop (`VcpuLoop::enter_guest`): check the flag, enter.
    fn run_loop(&self) {
        while !self.stop.load(Ordering::Acquire) {
            self.user_space();
            self.kvm_run();
        }
    }
}

/// A stop requested by another thread (SIGINT taken elsewhere).
fn request_from_another_thread(with_immediate_exit: bool) {
    loom::model(move || {
        let vcpu = Arc::new(Vcpu::new(with_immediate_exit));
        let v = vcpu.clone();
        let requester = thread::spawn(move || {
            v.request();
            v.send(Pending::None, true);
        });
        vcpu.run_loop();
        requester.join().unwrap();
    });
}

/// A stop requested by the timer's handler on the vCPU thread.
fn request_from_the_timer(with_immediate_exit: bool) {
    loom::model(move || {
        let vcpu = Arc::new(Vcpu::new(with_immediate_exit));
        let v = vcpu.clone();
        let timer = thread::spawn(move || v.send(Pending::Timer, true));
        vcpu.run_loop();
        timer.join().unwrap();
    });
}

/// Runs a model that must fail, and checks it failed on a lost stop.
fn expect_lost_stop(model: impl FnOnce()) {
    let err = catch_unwind(AssertUnwindSafe(model)).expect_err("loom found no lost stop");
    let msg = crate::mm::model_support::panic_message(&*err);
    assert!(
        msg.contains("lost stop"),
        "caught for another reason: {msg}"
    );
}

#[test]
fn loom_stop_from_another_thread_always_ends_the_vcpu_loop() {
    request_from_another_thread(true);
}

#[test]
fn loom_stop_from_the_timer_always_ends_the_vcpu_loop() {
    request_from_the_timer(true);
}

#[test]
fn loom_broken_stop_without_immediate_exit_from_another_thread_is_caught() {
    expect_lost_stop(|| request_from_another_thread(false));
}

#[test]
fn loom_broken_stop_without_immediate_exit_from_the_timer_is_caught() {
    expect_lost_stop(|| request_from_the_timer(false));
}
