//! The progress bar of a timed phase (`indicatif`), drawn on stderr only when
//! it is a terminal and the user did not ask for quiet.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One phase's bar: `label [#####.....]  42%`, cleared when done.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
    base: u64,
}

impl Progress {
    /// A bar over `total` commands; `base` is the shared counter's value at
    /// the phase start. Hidden unless `enabled` and stderr is a terminal.
    pub fn new(enabled: bool, label: String, total: u64, base: u64) -> Self {
        let bar = if enabled && std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(
                Some(total.max(1)),
                ProgressDrawTarget::stderr_with_hz(10),
            );
            bar.set_style(
                ProgressStyle::with_template("{msg:<28} [{bar:30}] {percent:>3}%")
                    .expect("a valid template")
                    .progress_chars("#."),
            );
            bar.set_message(label);
            bar
        } else {
            ProgressBar::hidden()
        };
        Self { bar, base }
    }

    /// The shared counter now reads `done`.
    pub fn tick(&self, done: u64) {
        self.bar.set_position(done.saturating_sub(self.base));
    }

    /// Clears the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_progress_counts_from_its_base_and_hides_when_disabled() {
        let p = Progress::new(false, "anon first-touch".into(), 10, 5);
        assert!(p.bar.is_hidden());
        p.tick(8);
        assert_eq!(p.bar.position(), 3);
        p.finish();
    }
}
