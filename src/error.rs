//! Exit codes scripts can rely on (restic's), and the mapping from errors to them.

use crate::backend::BackendError;
use crate::backup::BackupError;
use crate::repo::RepoError;

/// Success.
pub const EXIT_OK: i32 = 0;
/// Any fatal error.
pub const EXIT_FATAL: i32 = 1;
/// Backup written, but some files could not be read.
pub const EXIT_PARTIAL: i32 = 3;
/// No repository at the given location.
pub const EXIT_NO_REPOSITORY: i32 = 10;
/// The repository is locked.
pub const EXIT_LOCKED: i32 = 11;
/// No key opens with the password.
pub const EXIT_WRONG_PASSWORD: i32 = 12;
/// SIGINT or SIGTERM.
pub const EXIT_INTERRUPTED: i32 = 130;

/// A command finished but wants a specific non-zero exit code (partial backup, failed
/// check); its message has been printed already.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitWith {
    /// Exit code.
    pub code: i32,
    /// What to print.
    pub message: String,
}

fn backend_code(e: &BackendError) -> Option<i32> {
    match e {
        BackendError::BucketMissing { .. } => Some(EXIT_NO_REPOSITORY),
        _ => None,
    }
}

fn repo_code(e: &RepoError) -> Option<i32> {
    match e {
        RepoError::NotARepository { .. } => Some(EXIT_NO_REPOSITORY),
        RepoError::WrongPassword { .. } => Some(EXIT_WRONG_PASSWORD),
        // Transparent: the chain skips the backend error inside, so look at it here.
        RepoError::Backend(b) => backend_code(b),
        RepoError::Lock(crate::repo::lock::LockError::Locked { .. }) => Some(EXIT_LOCKED),
        _ => None,
    }
}

/// The exit code for an error chain.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ExitWith>() {
            return e.code;
        }
        if let Some(c) = cause.downcast_ref::<BackendError>().and_then(backend_code) {
            return c;
        }
        if let Some(e) = cause.downcast_ref::<RepoError>() {
            if let Some(c) = repo_code(e) {
                return c;
            }
        }
        if let Some(crate::repo::lock::LockError::Locked { .. }) =
            cause.downcast_ref::<crate::repo::lock::LockError>()
        {
            return EXIT_LOCKED;
        }
        // Errors that hold a lock error transparently (the chain skips it).
        if let Some(crate::repo::prune::PruneError::Lock(crate::repo::lock::LockError::Locked {
            ..
        })) = cause.downcast_ref::<crate::repo::prune::PruneError>()
        {
            return EXIT_LOCKED;
        }
        if let Some(e) = cause.downcast_ref::<BackupError>() {
            match e {
                BackupError::Interrupted => return EXIT_INTERRUPTED,
                BackupError::Lock(crate::repo::lock::LockError::Locked { .. }) => {
                    return EXIT_LOCKED
                }
                BackupError::Repo(r) => {
                    if let Some(c) = repo_code(r) {
                        return c;
                    }
                }
                _ => {}
            }
        }
    }
    EXIT_FATAL
}
