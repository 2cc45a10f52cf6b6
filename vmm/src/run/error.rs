//! Why a run could not start: [`RunError`].

use crate::vm::VmError;

/// Errors that prevent a run from starting.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The event loop or a thread could not be set up.
    #[error("{what}: {detail}")]
    Setup {
        /// The step.
        what: &'static str,
        /// The error.
        detail: String,
    },
}

pub(super) fn setup_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> RunError {
    move |e| RunError::Setup {
        what,
        detail: e.to_string(),
    }
}
