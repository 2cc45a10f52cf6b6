//! Command plans: what each vCPU's guest runtime is told to do, one mailbox
//! command at a time. A built-in guest program is a plan over the one guest
//! runtime (see guest-image/PROTOCOL.md).
//!
//! ```
//! use vmm::plan::{BuiltinGuest, Command};
//! assert_eq!("default".parse::<BuiltinGuest>().unwrap(), BuiltinGuest::Default);
//! assert!("nonesuch".parse::<BuiltinGuest>().is_err());
//! assert_eq!(Command::hello().describe(), "hello");
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use guest_image::protocol::command;

use crate::mm::addr::{GpaRange, PAGE_SIZE};

/// One mailbox command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// A `protocol::command` code.
    pub code: u64,
    /// Its arguments.
    pub args: [u64; 6],
}

impl Command {
    /// Greet on the console.
    pub fn hello() -> Self {
        Self::new(command::HELLO, [0; 6])
    }
    /// Write the pattern of `seed` over `range`.
    pub fn fill(range: GpaRange, seed: u64) -> Self {
        Self::new(command::FILL, [range.start().0, range.len(), seed, 0, 0, 0])
    }
    /// Write over `range` the pattern a fill of `seed` at `origin` writes.
    pub fn fill_from(range: GpaRange, seed: u64, origin: u64) -> Self {
        Self::new(
            command::FILL,
            [range.start().0, range.len(), seed, origin, 0, 0],
        )
    }
    /// Check the pattern of `seed` over `range`.
    pub fn verify(range: GpaRange, seed: u64) -> Self {
        Self::new(
            command::VERIFY,
            [range.start().0, range.len(), seed, 0, 0, 0],
        )
    }
    /// Check over `range` the pattern a fill of `seed` at `origin` wrote (for
    /// contents moved from `origin`).
    pub fn verify_from(range: GpaRange, seed: u64, origin: u64) -> Self {
        Self::new(
            command::VERIFY,
            [range.start().0, range.len(), seed, origin, 0, 0],
        )
    }
    /// Check every word of `range` equals `value`.
    pub fn verify_const(range: GpaRange, value: u64) -> Self {
        Self::new(
            command::VERIFY_CONST,
            [range.start().0, range.len(), value, 0, 0, 0],
        )
    }
    /// Touch one byte every `stride` bytes of `range`, writing if `write`.
    pub fn touch(range: GpaRange, stride: u64, write: bool) -> Self {
        Self::new(
            command::TOUCH,
            [range.start().0, range.len(), stride, u64::from(write), 0, 0],
        )
    }
    /// Write `value` as a `u64` at `gpa`.
    pub fn write(gpa: u64, value: u64) -> Self {
        Self::new(command::WRITE, [gpa, value, 0, 0, 0, 0])
    }
    /// Program the DMA engine: `op` is a `protocol::dma_op` code.
    pub fn dma(op: u64, src: u64, dst: u64, len: u64, value: u64) -> Self {
        Self::new(command::DMA, [op, src, dst, len, value, 0])
    }
    /// Read a `u64` at `gpa` (a probe).
    pub fn read(gpa: u64) -> Self {
        Self::new(command::READ, [gpa, 0, 0, 0, 0, 0])
    }
    /// Spin `iterations` times, 0 = forever.
    pub fn spin(iterations: u64) -> Self {
        Self::new(command::SPIN, [iterations, 0, 0, 0, 0, 0])
    }
    /// Execute `ud2`.
    pub fn bad_insn() -> Self {
        Self::new(command::BAD_INSN, [0; 6])
    }
    /// A raw command.
    pub fn new(code: u64, args: [u64; 6]) -> Self {
        Self { code, args }
    }

    /// A short human description, e.g. `fill [0x40000000, 0x48000000)`.
    pub fn describe(&self) -> String {
        let range = || {
            GpaRange::new(crate::mm::addr::Gpa(self.args[0]), self.args[1])
                .map_or_else(|| "[overflow]".to_string(), |r| r.to_string())
        };
        match self.code {
            command::HELLO => "hello".into(),
            command::DMA => format!(
                "dma op {} src {:#x} dst {:#x} len {:#x}",
                self.args[0], self.args[1], self.args[2], self.args[3]
            ),
            command::FILL => format!("fill {} seed {:#x}", range(), self.args[2]),
            command::VERIFY if self.args[3] != 0 => format!(
                "verify {} seed {:#x} as filled at {:#x}",
                range(),
                self.args[2],
                self.args[3]
            ),
            command::VERIFY => format!("verify {} seed {:#x}", range(), self.args[2]),
            command::VERIFY_CONST => format!("verify {} == {:#x}", range(), self.args[2]),
            command::TOUCH => format!("touch {} stride {:#x}", range(), self.args[2]),
            command::TIMED_TOUCH => format!("timed-touch {} stride {:#x}", range(), self.args[2]),
            command::SPIN if self.args[0] == 0 => "spin forever".into(),
            command::SPIN => format!("spin {}", self.args[0]),
            command::READ => format!("read {:#x}", self.args[0]),
            command::WRITE => format!("write {:#x}", self.args[0]),
            command::BAD_INSN => "bad-insn (ud2)".into(),
            command::STOP => "stop".into(),
            c => format!("command {c}"),
        }
    }
}

/// What a vCPU does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Run this command.
    Run(Command),
    /// End the guest program on this vCPU.
    Stop,
}

/// The run was aborted while a vCPU waited at a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("aborted while waiting for the other vCPUs")]
pub struct Aborted;

/// How a command ended, as told to its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The guest reported `OK` with these results.
    Done {
        /// `Mailbox::results`.
        results: [u64; 6],
    },
    /// The command failed (only reported when the plan is recoverable;
    /// otherwise the failure ends the vCPU's run).
    Failed(crate::failure::GuestFailure),
}

/// A source of commands for one vCPU.
pub trait VcpuPlan: Send {
    /// The next step. May block (for example at a barrier between phases).
    fn next(&mut self) -> Result<Step, Aborted>;

    /// Called when the current command ended.
    fn completed(&mut self, _outcome: &CommandOutcome) {}

    /// Whether a guest fault (exception, mismatch, access to unplugged or
    /// read-only memory) ends only the command, with the guest reset to its
    /// command loop, instead of the whole run.
    fn recoverable(&self) -> bool {
        false
    }
}

/// A reusable barrier across vCPU threads that a stopping run can abort.
#[derive(Debug)]
pub struct PhaseBarrier {
    parties: usize,
    state: Mutex<(usize, u64)>,
    cv: Condvar,
    aborted: AtomicBool,
}

impl PhaseBarrier {
    /// A barrier for `parties` threads.
    pub fn new(parties: usize) -> Self {
        Self {
            parties,
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            aborted: AtomicBool::new(false),
        }
    }

    /// Waits until all parties arrive, or the barrier is aborted.
    pub fn wait(&self) -> Result<(), Aborted> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let generation = st.1;
        st.0 += 1;
        if st.0 == self.parties {
            *st = (0, generation + 1);
            self.cv.notify_all();
            return Ok(());
        }
        while st.1 == generation {
            if self.aborted.load(Ordering::Acquire) {
                return Err(Aborted);
            }
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    /// Releases every waiter with [`Aborted`], now and for later waits.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
        let _guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }
}

/// An element of a [`ScriptPlan`].
#[derive(Debug, Clone, Copy)]
pub enum ScriptItem {
    /// Run a command.
    Run(Command),
    /// Wait for every vCPU to get here.
    Barrier,
}

/// A fixed list of commands and barriers.
#[derive(Debug)]
pub struct ScriptPlan {
    items: VecDeque<ScriptItem>,
    barrier: Arc<PhaseBarrier>,
}

impl ScriptPlan {
    /// A plan running `items` in order, synchronizing on `barrier`.
    pub fn new(items: impl IntoIterator<Item = ScriptItem>, barrier: Arc<PhaseBarrier>) -> Self {
        Self {
            items: items.into_iter().collect(),
            barrier,
        }
    }
}

impl VcpuPlan for ScriptPlan {
    fn next(&mut self) -> Result<Step, Aborted> {
        loop {
            match self.items.pop_front() {
                None => return Ok(Step::Stop),
                Some(ScriptItem::Run(c)) => return Ok(Step::Run(c)),
                Some(ScriptItem::Barrier) => self.barrier.wait()?,
            }
        }
    }
}

/// The built-in guest programs, named in kebab case (`page-fault`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::Display, strum::EnumString, strum::VariantNames,
)]
#[strum(serialize_all = "kebab-case")]
pub enum BuiltinGuest {
    /// Every vCPU fills its share of RAM with a per-page pattern, then verifies
    /// its neighbour's share, then ends.
    Default,
    /// Greets and ends (the trivial guest the launch benchmark runs).
    Hello,
    /// Reads an address past the identity map: a #PF the VMM reports.
    PageFault,
    /// Executes `ud2`: a #UD the VMM reports.
    BadInsn,
    /// Spins forever (for `--timeout`).
    Spin,
    /// Fills its share with one seed and verifies it against another: shows
    /// how a verify mismatch is reported.
    VerifyMismatch,
}

impl BuiltinGuest {
    /// The names, comma separated, for messages.
    pub fn names() -> String {
        <Self as strum::VariantNames>::VARIANTS.join(", ")
    }

    /// The address the page-fault program reads: the second page past the
    /// largest identity map a guest can have (`layout::IDENTITY_END`), so it
    /// is never mapped, whatever the VM's map covers.
    pub fn fault_address() -> u64 {
        guest_image::protocol::layout::IDENTITY_END + 0x1000
    }

    /// The plan of vCPU `index` of `vcpus` over guest RAM `ram`.
    pub fn plan(
        self,
        index: u64,
        vcpus: u64,
        ram: GpaRange,
        seed: u64,
        barrier: Arc<PhaseBarrier>,
    ) -> ScriptPlan {
        use ScriptItem::{Barrier, Run};
        let items = match self {
            BuiltinGuest::Default => {
                let share = |i: u64| ram_share(ram, i, vcpus);
                let mut v = vec![Run(Command::hello())];
                if let Some(own) = share(index) {
                    v.push(Run(Command::fill(own, seed)));
                }
                v.push(Barrier);
                if let Some(next) = share((index + 1) % vcpus) {
                    v.push(Run(Command::verify(next, seed)));
                }
                v
            }
            BuiltinGuest::Hello => vec![Run(Command::hello())],
            BuiltinGuest::PageFault => vec![Run(Command::read(Self::fault_address()))],
            BuiltinGuest::BadInsn => vec![Run(Command::bad_insn())],
            BuiltinGuest::Spin => vec![Run(Command::spin(0))],
            BuiltinGuest::VerifyMismatch => match ram_share(ram, index, vcpus) {
                Some(own) => vec![
                    Run(Command::fill(own, seed)),
                    Run(Command::verify(own, seed ^ 1)),
                ],
                None => vec![],
            },
        };
        ScriptPlan::new(items, barrier)
    }
}

/// vCPU `index`'s page-aligned share of `ram` among `vcpus`; the last vCPU
/// takes the remainder. `None` if the share is empty.
pub fn ram_share(ram: GpaRange, index: u64, vcpus: u64) -> Option<GpaRange> {
    let pages = ram.len() / PAGE_SIZE;
    let per = pages / vcpus;
    let first = index * per;
    let count = if index + 1 == vcpus {
        pages - first
    } else {
        per
    };
    (count > 0).then(|| {
        GpaRange::new(
            ram.start()
                .checked_add(first * PAGE_SIZE)
                .expect("inside ram"),
            count * PAGE_SIZE,
        )
        .expect("inside ram")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::addr::Gpa;
    use guest_image::protocol::layout;

    #[test]
    fn test_ram_share_covers_ram_exactly_once() {
        let ram = GpaRange::new(Gpa(layout::RAM_BASE), 10 * PAGE_SIZE).unwrap();
        let shares: Vec<_> = (0..3).map(|i| ram_share(ram, i, 3).unwrap()).collect();
        assert_eq!(shares[0].start(), ram.start());
        assert_eq!(shares[0].end(), shares[1].start());
        assert_eq!(shares[2].end(), ram.end());
        assert_eq!(shares[2].len(), 4 * PAGE_SIZE);
    }

    #[test]
    fn test_ram_share_more_vcpus_than_pages_leaves_some_empty() {
        let ram = GpaRange::new(Gpa(layout::RAM_BASE), PAGE_SIZE).unwrap();
        assert_eq!(ram_share(ram, 0, 2), None);
        assert_eq!(ram_share(ram, 1, 2), Some(ram));
    }

    #[test]
    fn test_barrier_abort_releases_waiter() {
        let b = Arc::new(PhaseBarrier::new(2));
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.wait());
        std::thread::sleep(std::time::Duration::from_millis(20));
        b.abort();
        assert_eq!(t.join().unwrap(), Err(Aborted));
    }

    #[test]
    fn test_default_plan_fills_own_share_then_verifies_neighbour() {
        let ram = GpaRange::new(Gpa(layout::RAM_BASE), 8 * PAGE_SIZE).unwrap();
        let barrier = Arc::new(PhaseBarrier::new(1));
        let mut p = BuiltinGuest::Default.plan(0, 1, ram, 7, barrier);
        assert_eq!(p.next(), Ok(Step::Run(Command::hello())));
        assert_eq!(p.next(), Ok(Step::Run(Command::fill(ram, 7))));
        assert_eq!(p.next(), Ok(Step::Run(Command::verify(ram, 7))));
        assert_eq!(p.next(), Ok(Step::Stop));
    }
}
