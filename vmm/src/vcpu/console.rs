//! Console lines from vCPU threads (and the scenario driver) to the run's
//! event loop: a channel plus an eventfd that wakes the loop; or, for a vCPU
//! that runs on the thread that prints, straight to a sink.

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

/// A function that prints a console line where it is called.
pub type ConsoleSink = Box<dyn Fn(ConsoleLine) + Send>;

/// Where a [`ConsoleSender`] puts lines.
enum Route {
    /// Nowhere.
    Discard,
    /// Into the event loop's channel, then its eventfd.
    Loop(mpsc::Sender<ConsoleLine>, EventFd),
    /// Into a sink on the sending thread.
    Sink(ConsoleSink),
}

/// Sends console lines to the event loop or a sink, or drops them.
pub struct ConsoleSender {
    to: Route,
}

impl std::fmt::Debug for ConsoleSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let to = match self.to {
            Route::Discard => "discard",
            Route::Loop(..) => "event loop",
            Route::Sink(_) => "sink",
        };
        f.debug_struct("ConsoleSender").field("to", &to).finish()
    }
}

impl ConsoleSender {
    /// A sender that signals `event` after each line.
    pub fn new(tx: mpsc::Sender<ConsoleLine>, event: EventFd) -> Self {
        Self {
            to: Route::Loop(tx, event),
        }
    }

    /// A sender that hands each line to `sink` on the sending thread (for a
    /// vCPU that runs on the thread that prints: nothing to wake).
    pub fn to_sink(sink: ConsoleSink) -> Self {
        Self {
            to: Route::Sink(sink),
        }
    }

    /// A sender that drops every line (for a quiet run: no thread is woken
    /// for text nobody prints).
    pub fn discard() -> Self {
        Self { to: Route::Discard }
    }

    /// Sends `text` attributed to vCPU `vcpu`'s guest, or to the VMM's
    /// thread of that vCPU if `from_vmm`.
    pub(super) fn send(&self, vcpu: u64, text: String, from_vmm: bool) {
        let source = format!("vcpu{vcpu} {}", if from_vmm { "vmm" } else { "guest" });
        self.line(source, text);
    }

    /// Sends `text` attributed to `source`.
    pub fn line(&self, source: String, text: String) {
        match &self.to {
            Route::Discard => {}
            Route::Loop(tx, event) => {
                // A closed receiver means the run is ending; dropping the line is fine.
                let _ = tx.send(ConsoleLine { source, text });
                let _ = event.write(1);
            }
            Route::Sink(sink) => sink(ConsoleLine { source, text }),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn line_buffer_sends_whole_lines_and_flushes_the_rest() {
        let (tx, rx) = mpsc::channel();
        let console = ConsoleSender::new(tx, EventFd::new(EFD_NONBLOCK).unwrap());
        let mut buffer = LineBuffer::default();
        buffer.push("hello\nwor", 3, &console);
        buffer.push("ld\npartial", 3, &console);
        buffer.flush(3, &console);
        let lines: Vec<(String, String)> = rx.try_iter().map(|l| (l.source, l.text)).collect();
        let expected = [
            ("vcpu3 guest", "hello"),
            ("vcpu3 guest", "world"),
            ("vcpu3 guest", "partial"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(s, t)| (s.to_string(), t.to_string()))
            .collect();
        assert_eq!(lines, expected);
    }

    #[test]
    fn a_sink_sender_hands_lines_over_on_the_sending_thread() {
        let (tx, rx) = mpsc::channel();
        let here = std::thread::current().id();
        let console = ConsoleSender::to_sink(Box::new(move |line| {
            assert_eq!(std::thread::current().id(), here);
            tx.send(line.text).unwrap();
        }));
        let mut buffer = LineBuffer::default();
        buffer.push("one\ntw", 0, &console);
        buffer.flush(0, &console);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), ["one", "tw"]);
    }

    #[test]
    fn a_discarding_sender_sends_nothing() {
        let mut buffer = LineBuffer::default();
        buffer.push("dropped\n", 0, &ConsoleSender::discard());
        buffer.flush(0, &ConsoleSender::discard());
    }
}
