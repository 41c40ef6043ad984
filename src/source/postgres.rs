//! A PostgreSQL base backup as a source: `pg_backup_start()`, the data directory and each
//! tablespace walked as files (with the rules of [`PgWalkPolicy`]: what a base backup
//! leaves out or empties, relation files in fixed blocks), `pg_backup_stop()`; committed
//! only once the backup's WAL is in the repository.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::files::{backup_files, Excludes, FilesJob, Layout, WalkOptions};
use super::{ReadContext, Source, SourceError, SourceOutput};
use crate::pipeline::BlobId;
use crate::postgres::basebackup::{wait_for_wal, PgSession, PgWalkPolicy};
use crate::repo::{PgTablespace, PostgresMeta, Repository, Snapshot};

/// A PostgreSQL base backup to take.
pub struct PgSource {
    /// A connected session (checked).
    pub session: PgSession,
    /// Label for `pg_backup_start()`.
    pub label: String,
    /// Ask for an immediate checkpoint instead of a spread one.
    pub fast_checkpoint: bool,
    /// How long to wait for the backup's WAL to reach the repository.
    pub wal_wait: Duration,
}

impl Source for PgSource {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn paths(&self) -> Vec<String> {
        let info = &self.session.info;
        std::iter::once(info.data_directory.display().to_string())
            .chain(
                info.tablespaces
                    .iter()
                    .map(|(_, _, l)| l.display().to_string()),
            )
            .collect()
    }

    fn postgres_system_id(&self) -> Option<u64> {
        Some(self.session.info.system_identifier)
    }

    fn is_parent(&self, host: &str, s: &Snapshot) -> bool {
        let sysid = self.session.info.system_identifier;
        s.host == host
            && s.source == "postgres"
            && s.postgres
                .as_ref()
                .is_some_and(|m| m.system_identifier == sysid)
    }

    fn read(&self, ctx: &ReadContext<'_>) -> Result<SourceOutput, SourceError> {
        let info = &self.session.info;
        let parent = ctx.parent;
        let pmeta = parent.and_then(|s| s.postgres.as_ref());
        let parent_time_ns = parent.and_then(|s| s.time.timestamp_nanos_opt());
        let started = self.session.start(&self.label, self.fast_checkpoint)?;
        let walk = |dir: PathBuf,
                    tablespace_dir: Option<String>,
                    parent_tree: Option<BlobId>|
         -> Result<
            (
                BlobId,
                Vec<String>,
                std::collections::BTreeSet<&'static str>,
            ),
            SourceError,
        > {
            let job = FilesJob {
                repo: ctx.repo,
                index: ctx.index.clone(),
                paths: vec![dir],
                excludes: Excludes::default(),
                parent_tree,
                readers: ctx.readers,
                cancel: ctx.cancel.clone(),
                stats: ctx.stats.clone(),
                // Relation files are rewritten in place at constant size: one modified
                // around the parent's start is read again rather than trusted.
                parent_time_ns,
                layout: Layout::Contents,
                policy: Some(Arc::new(PgWalkPolicy { tablespace_dir })),
                options: WalkOptions {
                    format2: ctx.repo.config().is_v2(),
                    parent_has_attributes: parent.is_some_and(|s| s.format >= 2),
                    parent_same_user: parent
                        .is_some_and(|s| s.username == crate::host::current_username()),
                    ..WalkOptions::default()
                },
            };
            let out = backup_files(job, ctx.saver.clone())?;
            if !out.unreadable.is_empty() {
                let list: Vec<String> = out
                    .unreadable
                    .iter()
                    .map(|(p, why)| format!("{p} ({why})"))
                    .collect();
                return Err(SourceError::PgUnreadable(list.join(", ")));
            }
            Ok((out.tree, out.skipped_special, out.features))
        };
        let (tree, mut skipped, mut features) =
            walk(info.data_directory.clone(), None, parent.map(|s| s.tree))?;
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
        let stopped = self.session.stop()?;
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
            label: self.label.clone(),
            data_directory: info.data_directory.display().to_string(),
            backup_label: stopped.backup_label,
            tablespace_map: stopped.tablespace_map,
            tablespaces,
        };
        Ok(SourceOutput {
            skipped_special: skipped,
            postgres: Some(meta),
            features,
            ..SourceOutput::tree_only(tree)
        })
    }

    fn before_commit(&self, repo: &Repository, out: &SourceOutput) -> Result<(), SourceError> {
        // The backup restores only with its WAL: commit it once that is archived.
        if let Some(meta) = &out.postgres {
            wait_for_wal(
                repo,
                &self.session.info,
                meta.timeline,
                meta.start_lsn,
                meta.stop_lsn,
                self.wal_wait,
            )?;
        }
        Ok(())
    }
}
