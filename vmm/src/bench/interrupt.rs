//! SIGINT and SIGTERM during `vmm bench`: recorded instead of killing the
//! process, so the bench stops at its next check (between configurations
//! and rounds, and every 100 ms while a phase runs), reports what it
//! measured and exits 1, as `vmm run` does. Nothing is left behind either
//! way: the bench's temporary files have no name.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use signal_hook::consts::{SIGINT, SIGTERM};

/// One flag per signal, set by signal-hook's async-signal-safe handler.
static FLAGS: OnceLock<[(i32, &str, Arc<AtomicBool>); 2]> = OnceLock::new();

/// Catches SIGINT and SIGTERM for the rest of the process (the `vmm bench`
/// command exits after the bench).
///
/// # Errors
/// Installing a handler failed.
pub fn install() -> std::io::Result<()> {
    let flags = FLAGS.get_or_init(|| {
        [
            (SIGINT, "SIGINT", Arc::new(AtomicBool::new(false))),
            (SIGTERM, "SIGTERM", Arc::new(AtomicBool::new(false))),
        ]
    });
    for (signal, _, flag) in flags {
        signal_hook::flag::register(*signal, Arc::clone(flag))?;
    }
    Ok(())
}

/// The signal that asked the bench to stop, if any (SIGINT first when both
/// came, the order the kernel delivers them in).
pub fn caught() -> Option<&'static str> {
    FLAGS
        .get()?
        .iter()
        .find(|(_, _, flag)| flag.load(Ordering::Relaxed))
        .map(|(_, name, _)| *name)
}
