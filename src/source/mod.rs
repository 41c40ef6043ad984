//! Backup sources, and what each must provide ([`Source`]): directory trees
//! ([`files::FilesSource`]), one stream from stdin or a command ([`stream::StreamBackup`]),
//! a PostgreSQL base backup ([`postgres::PgSource`]) and an InfluxDB server
//! ([`influx::InfluxSource`]). A source reads itself into the write pipeline and says what
//! the snapshot records; [`crate::backup::run_backup`] does the rest for all of them (lock,
//! parent, pipeline, index, commit).
//!
//! A new source is one module here implementing [`Source`], plus its arm in the CLI and
//! policy parser that builds it; its restore goes where its data goes (a directory:
//! [`crate::restore`]; a server: its own module, as [`crate::restore::influx`]).

pub mod files;
pub mod influx;
pub mod meta;
pub mod postgres;
mod reader;
pub mod stream;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::pipeline::stages::BlobSaver;
use crate::pipeline::BlobId;
use crate::postgres::PgError;
use crate::repo::{Index, InfluxMeta, PostgresMeta, Repository, Snapshot};

use self::files::{FilesError, FilesStats};
use self::influx::InfluxError;
use self::stream::StreamError;

/// What every source must provide to be backed up.
pub trait Source {
    /// The snapshot's `source`: `files`, `stdin`, `command`, `postgres`, `influxdb`.
    fn kind(&self) -> &'static str;

    /// The snapshot's `paths`: what was backed up, as a user would name it.
    fn paths(&self) -> Vec<String>;

    /// The snapshot's `command`, for a command's output.
    fn command(&self) -> Option<Vec<String>> {
        None
    }

    /// For the repository lock: the PostgreSQL cluster a base backup reads (prune keeps
    /// its WAL while the backup runs).
    fn postgres_system_id(&self) -> Option<u64> {
        None
    }

    /// Whether `snap` is an earlier backup of this source on `host`: the newest such is
    /// the parent, whose unchanged parts are taken without reading them again.
    fn is_parent(&self, host: &str, snap: &Snapshot) -> bool;

    /// Reads the source into the pipeline; returns the tree and what the snapshot records.
    ///
    /// # Errors
    /// Whatever stops the source; nothing is committed by a source.
    fn read(&self, ctx: &ReadContext<'_>) -> Result<SourceOutput, SourceError>;

    /// Runs after the pipeline is flushed and before the snapshot is written: what must
    /// hold for the snapshot to restore (a base backup's WAL archived).
    ///
    /// # Errors
    /// What keeps the snapshot from being committed.
    fn before_commit(&self, _repo: &Repository, _out: &SourceOutput) -> Result<(), SourceError> {
        Ok(())
    }
}

/// What a source gets to read itself.
pub struct ReadContext<'a> {
    /// The repository.
    pub repo: &'a Repository,
    /// Its index (what is stored already; the parent's trees).
    pub index: Arc<Index>,
    /// The pipeline.
    pub saver: &'a BlobSaver,
    /// The parent snapshot, if any.
    pub parent: Option<&'a Snapshot>,
    /// Stop flag.
    pub cancel: &'a CancelToken,
    /// Live counters.
    pub stats: &'a Arc<FilesStats>,
    /// Reader threads for files.
    pub readers: usize,
}

/// What a source produced.
#[derive(Debug, Default)]
pub struct SourceOutput {
    /// The root tree.
    pub tree: BlobId,
    /// Entries that could not be read, with why.
    pub unreadable: Vec<(String, String)>,
    /// Special files skipped.
    pub skipped_special: Vec<String>,
    /// Files that changed while they were read.
    pub changed: Vec<String>,
    /// What a version-1 repository could not hold.
    pub not_kept: Vec<String>,
    /// Format features its trees use.
    pub features: BTreeSet<&'static str>,
    /// For a PostgreSQL base backup.
    pub postgres: Option<PostgresMeta>,
    /// For an InfluxDB backup.
    pub influxdb: Option<InfluxMeta>,
}

impl SourceOutput {
    /// Only a tree.
    pub fn tree_only(tree: BlobId) -> Self {
        SourceOutput {
            tree,
            ..SourceOutput::default()
        }
    }
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Directory trees.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// stdin or a command.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// PostgreSQL.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// Files of a database that could not be read: the backup would not restore.
    #[error("cannot read {0}; no snapshot was written")]
    PgUnreadable(String),
    /// InfluxDB.
    #[error(transparent)]
    Influx(#[from] InfluxError),
}

impl SourceError {
    /// Whether it stopped because it was asked to (SIGINT/SIGTERM).
    pub fn is_interrupt(&self) -> bool {
        matches!(
            self,
            SourceError::Files(FilesError::Interrupted)
                | SourceError::Stream(StreamError::Interrupted)
                | SourceError::Influx(InfluxError::Interrupted)
        )
    }
}

/// Set by SIGINT/SIGTERM; sources stop at the next chunk and no snapshot is written.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The flag, for signal handlers.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}
