//! PostgreSQL: base backups read from the data directory between `pg_backup_start()` and
//! `pg_backup_stop()`, the WAL archive (`wal-push`, `wal-fetch`), and point-in-time
//! restore (`restore --at`).

pub mod archive;
pub mod basebackup;
pub mod checks;
pub mod conn;
pub mod history;
pub mod plan;
pub mod recovery;
pub mod replication;
pub mod rpo;
pub mod streamed;
pub mod walname;
pub mod walscan;
pub mod walstream;

use std::time::Duration;

/// Why a PostgreSQL operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// Could not connect.
    #[error("cannot connect to PostgreSQL ({target}): {why}")]
    Connect {
        /// Settings used (no password).
        target: String,
        /// Why.
        why: String,
    },
    /// A query failed.
    #[error("{what}: {why}")]
    Query {
        /// What we were doing.
        what: String,
        /// The server's message.
        why: String,
    },
    /// The server cannot give a restorable backup this way.
    #[error("{0}")]
    Unsupported(String),
    /// WAL archiving is off.
    #[error("{0}")]
    NotArchiving(String),
    /// `--pg-data` is not the server's data directory.
    #[error("--pg-data {given} is not the server's data directory {server}")]
    DataDirMismatch {
        /// Given.
        given: String,
        /// The server's.
        server: String,
    },
    /// The WAL a backup needs did not reach the repository.
    #[error("WAL segment {segment} needed by this backup did not reach the repository within {}s (archive_command = {archive_command:?}; it must be backupd wal-push with this repository, and the server log says why it fails); no snapshot was written", waited.as_secs())]
    WalNotArchived {
        /// First missing segment.
        segment: String,
        /// How long we waited.
        waited: Duration,
        /// The server's archive_command.
        archive_command: String,
    },
    /// The WAL archive failed.
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] crate::repo::RepoError),
    /// The restored server did not come up or did not finish recovery.
    #[error("{0}")]
    Server(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}
