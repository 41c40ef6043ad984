//! One backup run, start to commit, the same for every source ([`Source`]): lock, marks
//! and index; the parent (the newest earlier backup of the source, unless forced or
//! named); the source read through the write pipeline; then made durable in order —
//! packs, index, snapshot. The snapshot is written last and only on success, so an
//! interrupted or failed backup leaves no snapshot (its finished packs are indexed, so the
//! next run reuses them).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::pipeline::stages::{BlobSaver, SaveError, SaverOptions};
use crate::pipeline::BlobId;
use crate::repo::{BackupSummary, RepoError, Repository, Snapshot};
use crate::source::files::FilesStats;
use crate::source::{CancelToken, ReadContext, Source, SourceError};

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The source.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Repository.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Pipeline.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// SIGINT/SIGTERM: no snapshot written.
    #[error("interrupted; no snapshot was written")]
    Interrupted,
    /// The repository lock could not be taken.
    #[error(transparent)]
    Lock(#[from] crate::repo::lock::LockError),
    /// The lock was not refreshed for so long that a prune may have taken it for dead.
    #[error("the repository lock was not refreshed for too long (was the process stopped?); no snapshot was written")]
    LockStale,
}

/// A backup request.
pub struct BackupRequest {
    /// The source.
    pub source: Box<dyn Source>,
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
    /// The snapshot's time instead of now (`--time`, for importing old backups).
    pub time: Option<chrono::DateTime<chrono::Utc>>,
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
    /// Files that changed while they were read (backed up as read).
    pub changed: Vec<String>,
    /// What a version-1 repository could not hold.
    pub not_kept: Vec<String>,
}

/// Runs one backup to its commit.
///
/// # Errors
/// Any source, pipeline or repository failure, or an interrupt; none leaves a snapshot.
pub fn run_backup(repo: &Repository, req: BackupRequest) -> Result<BackupReport, BackupError> {
    let started = Instant::now();
    let time = req.time.unwrap_or_else(chrono::Utc::now);
    let source = &*req.source;
    // The lock first, then the marks: a prune deletes a marked pack only when no backup
    // that started before the mark is running, and this one sees every mark made before it.
    let lock = crate::repo::lock::RepoLock::acquire(
        repo.backend().clone(),
        repo.live_keys().clone(),
        crate::repo::lock::LockKind::Backup,
        &crate::host::hostname(),
        source.postgres_system_id(),
    )?;
    // With the lock visible, the newest generation: a `key retire` that did not see the
    // lock already made it, and this backup seals with it.
    repo.live_keys().refresh()?;
    let (marked, _) = crate::repo::prune::load_marks(repo)?;
    let index = Arc::new(repo.load_index_excluding(&marked.keys().copied().collect())?);
    let parent: Option<(BlobId, Snapshot)> = match (&req.parent, req.force) {
        (_, true) => None,
        (Some(spec), _) => Some(repo.resolve_snapshot(spec)?),
        (None, _) => repo
            .snapshots()?
            .into_iter()
            .rev()
            .find(|(_, s)| source.is_parent(&req.host, s)),
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
    let result = source.read(&ReadContext {
        repo,
        index: index.clone(),
        saver: &saver,
        parent: parent.as_ref().map(|(_, s)| s),
        cancel: &req.cancel,
        stats: &stats,
        readers: req.readers,
    });
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
    let out = match (result, save_err) {
        (_, Some(e)) => return Err(e.into()),
        (Err(e), None) if e.is_interrupt() => return Err(BackupError::Interrupted),
        (Err(e), None) => return Err(e.into()),
        (Ok(r), None) => r,
    };
    source.before_commit(repo, &out)?;
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
        features: out.features.iter().map(|f| f.to_string()).collect(),
        format: repo.config().version,
        time,
        host: req.host,
        username: crate::host::current_username(),
        paths: source.paths(),
        tags: req.tags,
        tree: out.tree,
        parent: parent.map(|(id, _)| id),
        source: source.kind().into(),
        command: source.command(),
        policy: req.policy,
        summary,
        postgres: out.postgres,
        influxdb: out.influxdb,
        program_version: env!("CARGO_PKG_VERSION").into(),
        original_id: None,
    };
    if !lock.is_fresh() {
        return Err(BackupError::LockStale);
    }
    let snapshot_id = repo.save_snapshot(&snapshot)?;
    drop(lock);
    Ok(BackupReport {
        snapshot_id,
        snapshot,
        unreadable: out.unreadable,
        skipped_special: out.skipped_special,
        changed: out.changed,
        not_kept: out.not_kept,
    })
}
