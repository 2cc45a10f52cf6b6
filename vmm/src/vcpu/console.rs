//! Console lines from vCPU threads (and the scenario driver) to the run's
//! event loop: a channel plus an eventfd that wakes the loop.

use std::sync::mpsc;

use vmm_sys_util::eventfd::EventFd;

/// A line of console output.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// Who wrote it: `vcpu0 guest`, `vcpu1 vmm`, `scenario`.
    pub source: String,
    /// Text (without trailing newline).
    pub text: String,
}

/// Sends console lines to the event loop, or drops them.
#[derive(Debug)]
pub struct ConsoleSender {
    to: Option<(mpsc::Sender<ConsoleLine>, EventFd)>,
}

impl ConsoleSender {
    /// A sender that signals `event` after each line.
    pub fn new(tx: mpsc::Sender<ConsoleLine>, event: EventFd) -> Self {
        Self {
            to: Some((tx, event)),
        }
    }

    /// A sender that drops every line (for a quiet run: no thread is woken
    /// for text nobody prints).
    pub fn discard() -> Self {
        Self { to: None }
    }

    /// Sends `text` attributed to vCPU `vcpu`'s guest, or to the VMM's
    /// thread of that vCPU if `from_vmm`.
    pub(super) fn send(&self, vcpu: u64, text: String, from_vmm: bool) {
        let source = format!("vcpu{vcpu} {}", if from_vmm { "vmm" } else { "guest" });
        self.line(source, text);
    }

    /// Sends `text` attributed to `source`.
    pub fn line(&self, source: String, text: String) {
        let Some((tx, event)) = &self.to else {
            return;
        };
        // A closed receiver means the run is ending; dropping the line is fine.
        let _ = tx.send(ConsoleLine { source, text });
        let _ = event.write(1);
    }
}

/// Console text of one vCPU's guest, cut into lines.
#[derive(Debug, Default)]
pub(super) struct LineBuffer {
    pending: String,
}

impl LineBuffer {
    /// Appends `text`; sends every completed line.
    pub(super) fn push(&mut self, text: &str, vcpu: u64, console: &ConsoleSender) {
        self.pending.push_str(text);
        while let Some(nl) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=nl).collect();
            console.send(vcpu, line.trim_end().to_string(), false);
        }
    }

    /// Sends what is left of an unfinished line.
    pub(super) fn flush(&mut self, vcpu: u64, console: &ConsoleSender) {
        if !self.pending.is_empty() {
            console.send(vcpu, std::mem::take(&mut self.pending), false);
        }
    }
}
