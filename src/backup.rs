//! One backup run, start to commit: load the index, pick the parent, run the source
//! through the write pipeline, then make it durable in order — packs, index, snapshot.
//! The snapshot is written last and only on success, so an interrupted or failed backup
//! leaves no snapshot (its finished packs are indexed, so the next run reuses them).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pipeline::stages::{BlobSaver, SaveError, SaverOptions};
use crate::pipeline::BlobId;
use crate::postgres::basebackup::{wait_for_wal, PgSession, PgWalkPolicy};
use crate::postgres::PgError;
use crate::repo::{
    BackupSummary, InfluxMeta, PgTablespace, PostgresMeta, RepoError, Repository, Snapshot,
};
use crate::source::files::{
    backup_files, Excludes, FilesError, FilesJob, FilesStats, Layout, WalkOptions,
};
use crate::source::influx::{backup_influx, InfluxError, InfluxJob, InfluxSource};
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
    /// PostgreSQL.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// InfluxDB.
    #[error(transparent)]
    Influx(#[from] InfluxError),
    /// Files of a database that could not be read: the backup would not restore.
    #[error("cannot read {0}; no snapshot was written")]
    PgUnreadable(String),
    /// The repository lock could not be taken.
    #[error(transparent)]
    Lock(#[from] crate::repo::lock::LockError),
    /// The lock was not refreshed for so long that a prune may have taken it for dead.
    #[error("the repository lock was not refreshed for too long (was the process stopped?); no snapshot was written")]
    LockStale,
}

/// A PostgreSQL base backup to take.
pub struct PgSource {
    /// A connected session (checked).
    pub session: PgSession,
    /// Label for `pg_backup_start()`.
    pub label: String,
    /// Ask for an immediate checkpoint instead of a spread one.
    pub fast_checkpoint: bool,
    /// How long to wait for the backup's WAL to reach the repository.
    pub archive_timeout: Duration,
}

/// What to back up.
pub enum BackupSource {
    /// Directory trees and files.
    Files {
        /// Absolute paths.
        paths: Vec<PathBuf>,
        /// Exclude globs.
        excludes: Vec<String>,
        /// Walk options (`format2` is set from the repository).
        options: WalkOptions,
    },
    /// A single stream.
    Stream {
        /// stdin or command.
        source: StreamSource,
        /// File name in the snapshot.
        name: String,
    },
    /// A PostgreSQL base backup.
    Postgres(Box<PgSource>),
    /// An InfluxDB server's databases.
    Influx(Box<InfluxSource>),
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

/// What a source produced.
struct SourceOutcome {
    tree: BlobId,
    unreadable: Vec<(String, String)>,
    skipped_special: Vec<String>,
    postgres: Option<PostgresMeta>,
    influxdb: Option<InfluxMeta>,
    changed: Vec<String>,
    not_kept: Vec<String>,
    features: std::collections::BTreeSet<&'static str>,
}

impl SourceOutcome {
    fn tree_only(tree: BlobId) -> Self {
        SourceOutcome {
            tree,
            unreadable: vec![],
            skipped_special: vec![],
            postgres: None,
            influxdb: None,
            changed: vec![],
            not_kept: vec![],
            features: Default::default(),
        }
    }
}

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
    let time = req.time.unwrap_or_else(chrono::Utc::now);
    // The lock first, then the marks: a prune deletes a marked pack only when no backup
    // that started before the mark is running, and this one sees every mark made before it.
    let lock = crate::repo::lock::RepoLock::acquire(
        repo.backend().clone(),
        repo.keys().clone(),
        crate::repo::lock::LockKind::Backup,
        &crate::cli::hostname(),
        match &req.source {
            BackupSource::Postgres(pg) => Some(pg.session.info.system_identifier),
            _ => None,
        },
    )?;
    let (marked, _) = crate::repo::prune::load_marks(repo)?;
    let index = Arc::new(repo.load_index_excluding(&marked.keys().copied().collect())?);
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
        BackupSource::Postgres(pg) => (
            std::iter::once(pg.session.info.data_directory.display().to_string())
                .chain(
                    pg.session
                        .info
                        .tablespaces
                        .iter()
                        .map(|(_, _, l)| l.display().to_string()),
                )
                .collect(),
            "postgres",
            None,
        ),
        BackupSource::Influx(ix) => (crate::source::influx::snapshot_paths(ix), "influxdb", None),
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
        (BackupSource::Postgres(pg), None, _) => {
            let sysid = pg.session.info.system_identifier;
            repo.snapshots()?.into_iter().rev().find(|(_, s)| {
                s.host == req.host
                    && s.source == "postgres"
                    && s.postgres
                        .as_ref()
                        .is_some_and(|m| m.system_identifier == sysid)
            })
        }
        (BackupSource::Influx(ix), None, _) => repo
            .snapshots()?
            .into_iter()
            .rev()
            .find(|(_, s)| crate::source::influx::is_parent(s, &req.host, ix)),
        _ => None,
    };
    let parent_time_ns = parent
        .as_ref()
        .and_then(|(_, s)| s.time.timestamp_nanos_opt());
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
        BackupSource::Files {
            ref paths,
            ref excludes,
            ref options,
        } => (|| {
            let job = FilesJob {
                repo,
                index: index.clone(),
                paths: paths.clone(),
                excludes: Excludes::new(excludes)?,
                parent_tree: parent.as_ref().map(|(_, s)| s.tree),
                readers: req.readers,
                cancel: req.cancel.clone(),
                stats: stats.clone(),
                // Files sources trust (size, mtime, ctime, inode) as restic does.
                parent_time_ns: None,
                layout: Layout::Absolute,
                policy: None,
                options: WalkOptions {
                    format2: repo.config().is_v2(),
                    parent_has_attributes: parent.as_ref().is_some_and(|(_, s)| s.format >= 2),
                    ..options.clone()
                },
            };
            let out = backup_files(job, saver.clone())?;
            Ok(SourceOutcome {
                tree: out.tree,
                unreadable: out.unreadable,
                skipped_special: out.skipped_special,
                postgres: None,
                influxdb: None,
                changed: out.changed,
                not_kept: out.not_kept,
                features: out.features,
            })
        })(),
        BackupSource::Postgres(ref pg) => (|| {
            let info = &pg.session.info;
            let pmeta = parent.as_ref().and_then(|(_, s)| s.postgres.as_ref());
            let started = pg.session.start(&pg.label, pg.fast_checkpoint)?;
            let walk = |dir: PathBuf,
                        tablespace_dir: Option<String>,
                        parent_tree: Option<BlobId>|
             -> Result<
                (
                    BlobId,
                    Vec<String>,
                    std::collections::BTreeSet<&'static str>,
                ),
                BackupError,
            > {
                let job = FilesJob {
                    repo,
                    index: index.clone(),
                    paths: vec![dir],
                    excludes: Excludes::default(),
                    parent_tree,
                    readers: req.readers,
                    cancel: req.cancel.clone(),
                    stats: stats.clone(),
                    parent_time_ns,
                    layout: Layout::Contents,
                    policy: Some(Arc::new(PgWalkPolicy { tablespace_dir })),
                    options: WalkOptions {
                        format2: repo.config().is_v2(),
                        parent_has_attributes: parent.as_ref().is_some_and(|(_, s)| s.format >= 2),
                        ..WalkOptions::default()
                    },
                };
                let out = backup_files(job, saver.clone())?;
                if !out.unreadable.is_empty() {
                    let list: Vec<String> = out
                        .unreadable
                        .iter()
                        .map(|(p, why)| format!("{p} ({why})"))
                        .collect();
                    return Err(BackupError::PgUnreadable(list.join(", ")));
                }
                Ok((out.tree, out.skipped_special, out.features))
            };
            let (tree, mut skipped, mut features) = walk(
                info.data_directory.clone(),
                None,
                parent.as_ref().map(|(_, s)| s.tree),
            )?;
            let mut tablespaces = vec![];
            for (oid, name, location) in &info.tablespaces {
                let ptree = pmeta.and_then(|m| {
                    m.tablespaces
                        .iter()
                        .find(|t| t.oid == *oid && t.location == location.display().to_string())
                        .map(|t| t.tree)
                });
                let (t, s, f) = walk(location.clone(), Some(info.tablespace_version_dir()), ptree)?;
                skipped.extend(s);
                features.extend(f);
                tablespaces.push(PgTablespace {
                    oid: *oid,
                    name: name.clone(),
                    location: location.display().to_string(),
                    tree: t,
                });
            }
            let stopped = pg.session.stop()?;
            let meta = PostgresMeta {
                system_identifier: info.system_identifier,
                timeline: started.timeline,
                start_lsn: started.lsn,
                stop_lsn: stopped.lsn,
                start_time: started.time,
                stop_time: stopped.time,
                server_version: info.version.clone(),
                server_version_num: info.version_num,
                wal_segment_size: info.wal_segment_size,
                label: pg.label.clone(),
                data_directory: info.data_directory.display().to_string(),
                backup_label: stopped.backup_label,
                tablespace_map: stopped.tablespace_map,
                tablespaces,
            };
            Ok(SourceOutcome {
                skipped_special: skipped,
                postgres: Some(meta),
                features,
                ..SourceOutcome::tree_only(tree)
            })
        })(),
        BackupSource::Influx(ref ix) => backup_influx(
            InfluxJob {
                repo,
                index: index.clone(),
                source: ix,
                parent: parent.as_ref().map(|(_, s)| s),
                cancel: req.cancel.clone(),
                stats: stats.clone(),
            },
            &saver,
        )
        .map(|(tree, meta)| SourceOutcome {
            influxdb: Some(meta),
            ..SourceOutcome::tree_only(tree)
        })
        .map_err(BackupError::from),
        BackupSource::Stream {
            ref source,
            ref name,
        } => {
            stats.files_new.fetch_add(1, Ordering::Relaxed);
            backup_stream(repo, &saver, source, name, &req.cancel, &stats.bytes_read)
                .map(|(tree, size)| {
                    stats.bytes_total.fetch_add(size, Ordering::Relaxed);
                    SourceOutcome::tree_only(tree)
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
    let out = match (result, save_err) {
        (_, Some(e)) => return Err(e.into()),
        (Err(BackupError::Files(FilesError::Interrupted)), _)
        | (Err(BackupError::Stream(StreamError::Interrupted)), _)
        | (Err(BackupError::Influx(InfluxError::Interrupted)), _) => {
            return Err(BackupError::Interrupted)
        }
        (Err(e), None) => return Err(e),
        (Ok(r), None) => r,
    };
    if let (Some(meta), BackupSource::Postgres(pg)) = (&out.postgres, &req.source) {
        // The backup restores only with its WAL: commit it once that is archived.
        wait_for_wal(
            repo,
            &pg.session.info,
            meta.timeline,
            meta.start_lsn,
            meta.stop_lsn,
            pg.archive_timeout,
        )?;
    }
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
        username: crate::cli::current_username(),
        paths,
        tags: req.tags,
        tree: out.tree,
        parent: parent.map(|(id, _)| id),
        source: source_kind.into(),
        command,
        policy: req.policy,
        summary,
        postgres: out.postgres,
        influxdb: out.influxdb,
        program_version: env!("CARGO_PKG_VERSION").into(),
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
