//! One backup run, start to commit: load the index, pick the parent, run the source
//! through the write pipeline, then make it durable in order — packs, index, snapshot.
//! The snapshot is written last and only on success, so an interrupted or failed backup
//! leaves no snapshot (its finished packs are indexed, so the next run reuses them).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::pipeline::stages::{BlobSaver, SaveError, SaverOptions};
use crate::pipeline::BlobId;
use crate::repo::{BackupSummary, RepoError, Repository, Snapshot};
use crate::source::files::{backup_files, Excludes, FilesError, FilesJob, FilesStats};
use crate::source::stream::{backup_stream, StreamError, StreamSource};
use crate::source::CancelToken;

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Files source.
    #[error(transparent)]
    Files(#[from] FilesError),
    /// Stream source.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Repository.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Pipeline.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// SIGINT/SIGTERM: no snapshot written.
    #[error("interrupted; no snapshot was written")]
    Interrupted,
}

/// What to back up.
pub enum BackupSource {
    /// Directory trees and files.
    Files {
        /// Absolute paths.
        paths: Vec<PathBuf>,
        /// Exclude globs.
        excludes: Vec<String>,
    },
    /// A single stream.
    Stream {
        /// stdin or command.
        source: StreamSource,
        /// File name in the snapshot.
        name: String,
    },
}

/// A backup request.
pub struct BackupRequest {
    /// The source.
    pub source: BackupSource,
    /// Host recorded in the snapshot.
    pub host: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Read everything (no parent).
    pub force: bool,
    /// Explicit parent snapshot (id or prefix).
    pub parent: Option<String>,
    /// Policy name, if run by one.
    pub policy: Option<String>,
    /// Stop flag.
    pub cancel: CancelToken,
    /// Reader threads for files.
    pub readers: usize,
    /// Live counters (progress).
    pub stats: Arc<FilesStats>,
}

/// The result of a successful backup.
pub struct BackupReport {
    /// Snapshot id.
    pub snapshot_id: BlobId,
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Files that could not be read.
    pub unreadable: Vec<(String, String)>,
    /// Special files skipped.
    pub skipped_special: Vec<String>,
}

/// Root tree, unreadable paths (with why), skipped special files.
type SourceOutcome = (BlobId, Vec<(String, String)>, Vec<String>);

fn paths_key(paths: &[String]) -> Vec<String> {
    let mut p = paths.to_vec();
    p.sort();
    p
}

/// Runs one backup to its commit.
///
/// # Errors
/// Any source, pipeline or repository failure, or an interrupt; none leaves a snapshot.
pub fn run_backup(repo: &Repository, req: BackupRequest) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let time = chrono::Utc::now();
    let index = Arc::new(repo.load_index()?);
    let (paths, source_kind, command) = match &req.source {
        BackupSource::Files { paths, .. } => (
            paths.iter().map(|p| p.display().to_string()).collect(),
            "files",
            None,
        ),
        BackupSource::Stream { source, name } => (
            vec![format!("/{name}")],
            match source {
                StreamSource::Stdin => "stdin",
                StreamSource::Command(_) => "command",
            },
            match source {
                StreamSource::Command(c) => Some(c.clone()),
                StreamSource::Stdin => None,
            },
        ),
    };
    let parent: Option<(BlobId, Snapshot)> = match (&req.source, &req.parent, req.force) {
        (_, _, true) => None,
        (_, Some(spec), _) => Some(repo.resolve_snapshot(spec)?),
        (BackupSource::Files { .. }, None, _) => {
            let key = paths_key(&paths);
            repo.snapshots()?.into_iter().rev().find(|(_, s)| {
                s.host == req.host && s.source == "files" && paths_key(&s.paths) == key
            })
        }
        _ => None,
    };
    let opts = SaverOptions {
        pack_size: repo.config().pack_size as usize,
        zstd_level: repo.config().zstd_level,
        // A remote store is latency-bound: keep several packs in flight (each one is
        // memory, so at most four).
        uploaders: repo.backend().connections().map_or(1, |n| n.clamp(1, 4)),
        ..SaverOptions::default()
    };
    let (saver, threads) = BlobSaver::start(
        repo.keys().clone(),
        index.clone(),
        repo.backend().clone(),
        opts,
    );
    let stats = req.stats.clone();
    let result: Result<SourceOutcome, BackupError> = match req.source {
        BackupSource::Files { paths, excludes } => (|| {
            let job = FilesJob {
                repo,
                index: index.clone(),
                paths,
                excludes: Excludes::new(&excludes)?,
                parent_tree: parent.as_ref().map(|(_, s)| s.tree),
                readers: req.readers,
                cancel: req.cancel.clone(),
                stats: stats.clone(),
            };
            let out = backup_files(job, saver.clone())?;
            Ok((out.tree, out.unreadable, out.skipped_special))
        })(),
        BackupSource::Stream { source, name } => {
            stats.files_new.fetch_add(1, Ordering::Relaxed);
            backup_stream(repo, &saver, &source, &name, &req.cancel, &stats.bytes_read)
                .map(|(tree, size)| {
                    stats.bytes_total.fetch_add(size, Ordering::Relaxed);
                    (tree, vec![], vec![])
                })
                .map_err(BackupError::from)
        }
    };
    let saved = saver.finish(threads);
    let packs = saved.packs;
    let save_err = saved.error;
    let saver_stats = (saved.blobs_new, saved.bytes_added);
    let bytes_stored = saved.bytes_stored;
    // Index what was stored even when the backup fails, so a retry reuses it.
    if !packs.is_empty() {
        repo.save_index(&packs)?;
    }
    if req.cancel.is_cancelled() {
        return Err(BackupError::Interrupted);
    }
    let (tree, unreadable, skipped_special) = match (result, save_err) {
        (_, Some(e)) => return Err(e.into()),
        (Err(BackupError::Files(FilesError::Interrupted)), _)
        | (Err(BackupError::Stream(StreamError::Interrupted)), _) => {
            return Err(BackupError::Interrupted)
        }
        (Err(e), None) => return Err(e),
        (Ok(r), None) => r,
    };
    let bytes_total = stats.bytes_total.load(Ordering::Relaxed);
    let summary = BackupSummary {
        files_new: stats.files_new.load(Ordering::Relaxed),
        files_changed: stats.files_changed.load(Ordering::Relaxed),
        files_unchanged: stats.files_unchanged.load(Ordering::Relaxed),
        dirs: stats.dirs.load(Ordering::Relaxed),
        bytes_read: stats.bytes_read.load(Ordering::Relaxed),
        bytes_total,
        bytes_added: saver_stats.1,
        bytes_stored,
        blobs_new: saver_stats.0,
        dedup_ratio: if bytes_total == 0 {
            0.0
        } else {
            1.0 - (saver_stats.1.min(bytes_total) as f64 / bytes_total as f64)
        },
        duration_secs: started.elapsed().as_secs_f64(),
    };
    let snapshot = Snapshot {
        time,
        host: req.host,
        username: crate::cli::current_username(),
        paths,
        tags: req.tags,
        tree,
        parent: parent.map(|(id, _)| id),
        source: source_kind.into(),
        command,
        policy: req.policy,
        summary,
        program_version: env!("CARGO_PKG_VERSION").into(),
    };
    let snapshot_id = repo.save_snapshot(&snapshot)?;
    Ok(BackupReport {
        snapshot_id,
        snapshot,
        unreadable,
        skipped_special,
    })
}
