//! Error kinds that decide the process exit code (0 done, 1 run-time failure,
//! 2 bad usage or invalid recipe, 130 interrupted). Everything else travels as
//! `anyhow::Error` with context; `main` looks for these kinds in the chain.

use thiserror::Error;

/// A user-facing failure with a fixed exit code.
#[derive(Debug, Error)]
pub enum Failure {
    /// Bad command-line usage or an invalid recipe: exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The user interrupted the run (Ctrl-C): exit code 130.
    #[error("interrupted: {0}")]
    Interrupted(String),
}

impl Failure {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Interrupted(_) => 130,
        }
    }
}

/// The exit code for any error: a [`Failure`] anywhere in the chain decides it, else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.chain().find_map(|e| e.downcast_ref::<Failure>()).map(Failure::exit_code).unwrap_or(1)
}

/// Err([`Failure::Interrupted`]) once `flag` (set by Ctrl-C) is set: `what` says what stopped.
pub fn check_interrupted(flag: &std::sync::atomic::AtomicBool, what: &str) -> anyhow::Result<()> {
    if flag.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Failure::Interrupted(format!(
            "{what}; finished work is kept, run the same command again to resume"
        ))
        .into());
    }
    Ok(())
}
