//! Base backups read straight from the data directory, as pgBackRest does: a session
//! calls `pg_backup_start()` (a fast checkpoint), the files walk reads PGDATA and each
//! tablespace on parallel readers, reusing unchanged files from the parent snapshot and
//! reading relation files in page-aligned blocks, then `pg_backup_stop()` returns the
//! `backup_label` and `tablespace_map` contents, which the snapshot keeps. The snapshot is
//! committed only once every WAL segment from the start to the stop LSN is in the
//! repository's archive: a backup that cannot be made consistent is never recorded.
//!
//! What is left out follows PostgreSQL's own `BASE_BACKUP` (basebackup.c): pg_wal's
//! contents, the contents of pg_replslot, pg_dynshmem, pg_notify, pg_serial,
//! pg_snapshots, pg_subtrans and pg_stat_tmp, temporary files and relations,
//! postmaster.pid/.opts, pg_internal.init, old backup_label/tablespace_map, signal files,
//! and the main forks of unlogged relations (their init forks are kept).

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use tokio_postgres::{Client, NoTls};

use super::archive::WalArchive;
use super::conn::Resolved;
use super::walname::{Lsn, Segment};
use super::PgError;
use crate::repo::Repository;
use crate::source::files::{EntryRule, WalkPolicy};

/// Relation files are chunked in blocks of this many bytes (4 pages of 8 KiB): a page
/// changed in place re-stores one block, not a whole content-defined chunk
/// (docs/decisions/0007-postgres-base-backups.md has the measurements).
pub const RELATION_BLOCK: usize = 32 * 1024;

/// What the server says about itself.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// `pg_control_system().system_identifier`.
    pub system_identifier: u64,
    /// `server_version_num`.
    pub version_num: u32,
    /// `server_version`.
    pub version: String,
    /// `data_directory`.
    pub data_directory: PathBuf,
    /// `wal_segment_size` in bytes.
    pub wal_segment_size: u64,
    /// `block_size`.
    pub block_size: u32,
    /// `archive_mode`.
    pub archive_mode: String,
    /// `archive_command`.
    pub archive_command: String,
    /// `archive_timeout`, seconds (0: off).
    pub archive_timeout_secs: u64,
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// `pg_control_system().catalog_version_no`.
    pub catalog_version: u32,
    /// User tablespaces: oid, name, location.
    pub tablespaces: Vec<(u32, String, PathBuf)>,
}

impl ServerInfo {
    /// Its archiving settings.
    pub fn archive_settings(&self) -> crate::postgres::rpo::ArchiveSettings {
        crate::postgres::rpo::ArchiveSettings {
            archive_mode: self.archive_mode.clone(),
            archive_command: self.archive_command.clone(),
            archive_timeout_secs: self.archive_timeout_secs,
        }
    }

    /// The tablespace sub-directory this server version writes (`PG_15_202209061`).
    pub fn tablespace_version_dir(&self) -> String {
        format!("PG_{}_{}", self.version_num / 10000, self.catalog_version)
    }
}

/// Where a base backup started.
#[derive(Clone, Debug)]
pub struct Started {
    /// Start LSN (the checkpoint's redo point).
    pub lsn: Lsn,
    /// Timeline of the checkpoint.
    pub timeline: u32,
    /// Server time at the start.
    pub time: DateTime<Utc>,
}

/// Where it stopped.
#[derive(Clone, Debug)]
pub struct Stopped {
    /// Stop LSN: recovery must replay to here to be consistent.
    pub lsn: Lsn,
    /// Server time at the stop.
    pub time: DateTime<Utc>,
    /// Contents of `backup_label`.
    pub backup_label: String,
    /// Contents of `tablespace_map` (empty without tablespaces).
    pub tablespace_map: String,
}

/// A connection that takes one base backup. Dropping it before `stop` ends the session,
/// and PostgreSQL aborts the backup it started.
pub struct PgSession {
    rt: tokio::runtime::Runtime,
    client: Client,
    /// The server.
    pub info: ServerInfo,
    target: String,
}

fn query_err(what: &str) -> impl Fn(tokio_postgres::Error) -> PgError + '_ {
    move |e| PgError::Query {
        what: what.to_string(),
        why: db_error_text(&e),
    }
}

/// The server's message for a database error, else the client's.
pub fn db_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
    }
}

fn micros_to_time(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

impl PgSession {
    /// Connects and reads the server's facts.
    ///
    /// # Errors
    /// `Connect` naming the server, or a failed query.
    pub fn connect(config: tokio_postgres::Config, resolved: &Resolved) -> Result<Self, PgError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pg-session")
            .enable_all()
            .build()
            .map_err(|e| PgError::Connect {
                target: resolved.to_string(),
                why: e.to_string(),
            })?;
        let target = resolved.to_string();
        let client = rt.block_on(async {
            let (client, conn) = config.connect(NoTls).await.map_err(|e| PgError::Connect {
                target: target.clone(),
                why: db_error_text(&e),
            })?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!("postgres connection ended: {e}");
                }
            });
            Ok::<_, PgError>(client)
        })?;
        let info = rt.block_on(read_info(&client))?;
        Ok(PgSession {
            rt,
            client,
            info,
            target,
        })
    }

    /// The server, for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether the server has a replication slot of this name.
    ///
    /// # Errors
    /// The query failing.
    pub fn slot_exists(&self, slot: &str) -> Result<bool, PgError> {
        self.rt.block_on(async {
            let row = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(|e| PgError::Query {
                    what: "reading pg_replication_slots".into(),
                    why: db_error_text(&e),
                })?;
            Ok(row.get::<_, i64>(0) > 0)
        })
    }

    /// Refuses servers that cannot give a restorable backup: a standby, archiving off, an
    /// old version, or a data directory other than the one given.
    ///
    /// # Errors
    /// Why not.
    pub fn check(&self, pg_data: Option<&Path>) -> Result<(), PgError> {
        let i = &self.info;
        if i.version_num < 100000 {
            return Err(PgError::Unsupported(format!(
                "PostgreSQL {} is too old (10 or later is supported)",
                i.version
            )));
        }
        if i.in_recovery {
            return Err(PgError::Unsupported(
                "the server is a standby; take base backups from the primary".into(),
            ));
        }
        if i.archive_mode == "off" {
            return Err(PgError::NotArchiving(format!(
                "archive_mode is off on {}; set archive_mode = on and archive_command = 'backupd wal-push %p' (with this repository), then restart the server",
                self.target
            )));
        }
        if !i.archive_command.contains("wal-push") {
            tracing::warn!(
                "archive_command is {:?}, not backupd wal-push: the backup will wait for its WAL to appear in this repository",
                i.archive_command
            );
        }
        if let Some(d) = pg_data {
            let given = d.canonicalize().unwrap_or_else(|_| d.to_path_buf());
            let server = i
                .data_directory
                .canonicalize()
                .unwrap_or_else(|_| i.data_directory.clone());
            if given != server {
                return Err(PgError::DataDirMismatch {
                    given: d.display().to_string(),
                    server: i.data_directory.display().to_string(),
                });
            }
        }
        if !i.data_directory.join("global/pg_control").exists() {
            return Err(PgError::DataDirMismatch {
                given: i.data_directory.display().to_string(),
                server: format!(
                    "{} (not readable here: run backupd on the database host, as the postgres user or root)",
                    i.data_directory.display()
                ),
            });
        }
        Ok(())
    }

    /// `pg_backup_start(label, fast)`.
    ///
    /// # Errors
    /// The server refuses.
    pub fn start(&self, label: &str, fast: bool) -> Result<Started, PgError> {
        let sql = if self.info.version_num >= 150000 {
            "select pg_backup_start($1, $2)::text"
        } else {
            "select pg_start_backup($1, $2, false)::text"
        };
        self.rt.block_on(async {
            let row = self
                .client
                .query_one(sql, &[&label, &fast])
                .await
                .map_err(query_err("starting the backup"))?;
            let lsn: String = row.get(0);
            let row = self
                .client
                .query_one(
                    "select timeline_id::int4, (extract(epoch from clock_timestamp()) * 1000000)::int8 from pg_control_checkpoint()",
                    &[],
                )
                .await
                .map_err(query_err("reading the timeline"))?;
            let timeline: i32 = row.get(0);
            let us: i64 = row.get(1);
            Ok(Started {
                lsn: lsn.parse().map_err(|e: String| PgError::Query {
                    what: "starting the backup".into(),
                    why: e,
                })?,
                timeline: timeline as u32,
                time: micros_to_time(us),
            })
        })
    }

    /// `pg_backup_stop()` without waiting for the archive (the caller waits for the
    /// segments in the repository itself, with a timeout).
    ///
    /// # Errors
    /// The server refuses.
    pub fn stop(&self) -> Result<Stopped, PgError> {
        let sql = if self.info.version_num >= 150000 {
            "select lsn::text, labelfile, spcmapfile, (extract(epoch from clock_timestamp()) * 1000000)::int8 from pg_backup_stop(false)"
        } else {
            "select lsn::text, labelfile, spcmapfile, (extract(epoch from clock_timestamp()) * 1000000)::int8 from pg_stop_backup(false, false)"
        };
        self.rt.block_on(async {
            let row = self
                .client
                .query_one(sql, &[])
                .await
                .map_err(query_err("stopping the backup"))?;
            let lsn: String = row.get(0);
            let label: Option<String> = row.get(1);
            let map: Option<String> = row.get(2);
            let us: i64 = row.get(3);
            Ok(Stopped {
                lsn: lsn.parse().map_err(|e: String| PgError::Query {
                    what: "stopping the backup".into(),
                    why: e,
                })?,
                time: micros_to_time(us),
                backup_label: label.unwrap_or_default(),
                tablespace_map: map.unwrap_or_default(),
            })
        })
    }
}

async fn read_info(client: &Client) -> Result<ServerInfo, PgError> {
    let row = client
        .query_one(
            "select s.system_identifier::text, current_setting('server_version_num')::int4,
                    current_setting('server_version'), current_setting('data_directory'),
                    pg_size_bytes(current_setting('wal_segment_size'))::int8,
                    current_setting('block_size')::int4, current_setting('archive_mode'),
                    current_setting('archive_command'), pg_is_in_recovery(),
                    s.catalog_version_no::int4,
                    (select setting::int8 from pg_settings where name = 'archive_timeout')
             from pg_control_system() s",
            &[],
        )
        .await
        .map_err(query_err(
            "reading the server's settings (the user needs superuser or pg_read_all_settings and backup rights)",
        ))?;
    let sysid: String = row.get(0);
    let version_num: i32 = row.get(1);
    let data_directory: String = row.get(3);
    let seg: i64 = row.get(4);
    let block: i32 = row.get(5);
    let catalog: i32 = row.get(9);
    let rows = client
        .query(
            "select oid::int8, spcname::text, pg_tablespace_location(oid) from pg_tablespace
             where spcname not in ('pg_default', 'pg_global') order by oid",
            &[],
        )
        .await
        .map_err(query_err("listing tablespaces"))?;
    let tablespaces = rows
        .iter()
        .map(|r| {
            let oid: i64 = r.get(0);
            let name: String = r.get(1);
            let loc: String = r.get(2);
            (oid as u32, name, PathBuf::from(loc))
        })
        .collect();
    Ok(ServerInfo {
        system_identifier: sysid.parse().map_err(|_| PgError::Query {
            what: "reading the system identifier".into(),
            why: format!("{sysid:?} is not a number"),
        })?,
        version_num: version_num as u32,
        version: row.get(2),
        data_directory: PathBuf::from(data_directory),
        wal_segment_size: seg as u64,
        block_size: block as u32,
        archive_mode: row.get(6),
        archive_command: row.get(7),
        archive_timeout_secs: row.get::<_, Option<i64>>(10).unwrap_or(0).max(0) as u64,
        in_recovery: row.get(8),
        catalog_version: catalog as u32,
        tablespaces,
    })
}

/// Waits until every segment from `start` to `stop` on `timeline` is in the archive.
///
/// # Errors
/// `WalNotArchived` naming the first missing segment after `timeout`, or the store
/// failing.
pub fn wait_for_wal(
    repo: &Repository,
    info: &ServerInfo,
    timeline: u32,
    start: Lsn,
    stop: Lsn,
    timeout: Duration,
) -> Result<(), PgError> {
    let archive = WalArchive::new(repo, info.system_identifier);
    let seg = info.wal_segment_size;
    let mut next = Segment::of(timeline, start, seg);
    let last = Segment::of(timeline, Lsn(stop.0.saturating_sub(1).max(start.0)), seg);
    let deadline = Instant::now() + timeout;
    while next <= last {
        let name = next.name(seg);
        if archive.contains(&name)? {
            next = next.next();
            continue;
        }
        if Instant::now() >= deadline {
            return Err(PgError::WalNotArchived {
                segment: name,
                waited: timeout,
                archive_command: info.archive_command.clone(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// PostgreSQL's data-directory rules for the files walk.
pub struct PgWalkPolicy {
    /// For a tablespace walk: the only top-level directory to keep (`PG_15_...`).
    pub tablespace_dir: Option<String>,
}

/// The directories whose contents a base backup leaves out (one list with the restore,
/// which makes them real directories).
const EXCLUDE_CONTENTS: [&str; 8] = super::recovery::EMPTIED_DIRS;

const EXCLUDE_ROOT_FILES: [&str; 11] = [
    // What backupd's own restore leaves there for recovery (secrets).
    super::recovery::RECOVERY_PASSWORD_FILE,
    super::recovery::RECOVERY_S3_FILE,
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    "recovery.signal",
    "standby.signal",
];

fn is_digits(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(u8::is_ascii_digit)
}

/// `<relfilenode>[_fork][.segment]` → (relfilenode, fork).
fn relation_parts(name: &[u8]) -> Option<(&[u8], &[u8])> {
    let base = match name.iter().position(|&b| b == b'.') {
        Some(i) if is_digits(&name[i + 1..]) => &name[..i],
        Some(_) => return None,
        None => name,
    };
    let (node, fork) = match base.iter().position(|&b| b == b'_') {
        Some(i) => (&base[..i], &base[i + 1..]),
        None => (base, &b""[..]),
    };
    (is_digits(node) && matches!(fork, b"" | b"fsm" | b"vm" | b"init")).then_some((node, fork))
}

/// `t<backend>_<relfilenode>...`: a temporary relation.
fn is_temp_relation(name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(b"t") else {
        return false;
    };
    let Some(us) = rest.iter().position(|&b| b == b'_') else {
        return false;
    };
    is_digits(&rest[..us]) && relation_parts(&rest[us + 1..]).is_some()
}

/// True for a database directory: `base/<oid>` in PGDATA, `PG_x_y/<oid>` in a tablespace.
fn is_database_dir(rel_dir: &Path, tablespace: bool) -> bool {
    let parts: Vec<&[u8]> = rel_dir
        .components()
        .map(|c| c.as_os_str().as_bytes())
        .collect();
    match parts.as_slice() {
        [b"base", db] => is_digits(db),
        [ver, db] if tablespace => ver.starts_with(b"PG_") && is_digits(db),
        _ => false,
    }
}

impl WalkPolicy for PgWalkPolicy {
    fn rules(&self, rel_dir: &Path, names: &[OsString]) -> Vec<EntryRule> {
        let at_root = rel_dir.as_os_str().is_empty();
        if at_root {
            if let Some(keep) = &self.tablespace_dir {
                return names
                    .iter()
                    .map(|n| {
                        if n.as_bytes() == keep.as_bytes() {
                            EntryRule::Keep
                        } else {
                            EntryRule::Skip
                        }
                    })
                    .collect();
            }
        }
        let db_dir = is_database_dir(rel_dir, self.tablespace_dir.is_some());
        // Unlogged relations: the relfilenodes that have an init fork.
        let unlogged: HashSet<&[u8]> = if db_dir {
            names
                .iter()
                .filter_map(|n| relation_parts(n.as_bytes()))
                .filter(|(_, fork)| *fork == b"init")
                .map(|(node, _)| node)
                .collect()
        } else {
            HashSet::new()
        };
        names
            .iter()
            .map(|n| {
                let b = n.as_bytes();
                if b.starts_with(b"pgsql_tmp") || b.starts_with(b"pg_internal.init") {
                    return EntryRule::Skip;
                }
                if at_root && self.tablespace_dir.is_none() {
                    if EXCLUDE_ROOT_FILES.iter().any(|f| f.as_bytes() == b) {
                        return EntryRule::Skip;
                    }
                    if EXCLUDE_CONTENTS.iter().any(|f| f.as_bytes() == b) {
                        return EntryRule::EmptyDir;
                    }
                }
                if db_dir {
                    if is_temp_relation(b) {
                        return EntryRule::Skip;
                    }
                    if let Some((node, fork)) = relation_parts(b) {
                        if fork != b"init" && unlogged.contains(node) {
                            return EntryRule::Skip;
                        }
                    }
                }
                EntryRule::Keep
            })
            .collect()
    }

    fn fixed_chunk_size(&self, rel: &Path) -> Option<usize> {
        let name = rel.file_name()?.as_bytes();
        let parent = rel.parent()?;
        let in_relation_dir = is_database_dir(parent, self.tablespace_dir.is_some())
            || parent.as_os_str().as_bytes() == b"global";
        (in_relation_dir && relation_parts(name).is_some()).then_some(RELATION_BLOCK)
    }

    fn vanished_ok(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(p: &PgWalkPolicy, dir: &str, names: &[&str]) -> Vec<EntryRule> {
        let names: Vec<OsString> = names.iter().map(OsString::from).collect();
        p.rules(Path::new(dir), &names)
    }

    #[test]
    fn data_directory_rules_follow_base_backup() {
        let p = PgWalkPolicy {
            tablespace_dir: None,
        };
        use EntryRule::*;
        assert_eq!(
            rules(
                &p,
                "",
                &[
                    "PG_VERSION",
                    "base",
                    "pg_wal",
                    "postmaster.pid",
                    "pg_replslot",
                    "backup_label",
                    "pgsql_tmp"
                ]
            ),
            vec![Keep, Keep, EmptyDir, Skip, EmptyDir, Skip, Skip]
        );
        assert_eq!(
            rules(
                &p,
                "base/5",
                &[
                    "1259",
                    "16384",
                    "16384_init",
                    "16384_fsm",
                    "16384.1",
                    "t3_16390",
                    "pg_internal.init",
                    "PG_VERSION"
                ]
            ),
            vec![Keep, Skip, Keep, Skip, Skip, Skip, Skip, Keep]
        );
        // Outside database directories nothing is taken for a relation.
        assert_eq!(rules(&p, "pg_xact", &["0000"]), vec![Keep]);
        assert_eq!(
            p.fixed_chunk_size(Path::new("base/5/16384.2")),
            Some(RELATION_BLOCK)
        );
        assert_eq!(
            p.fixed_chunk_size(Path::new("global/1262_vm")),
            Some(RELATION_BLOCK)
        );
        assert_eq!(p.fixed_chunk_size(Path::new("base/5/PG_VERSION")), None);
        assert_eq!(p.fixed_chunk_size(Path::new("pg_xact/0000")), None);
    }

    #[test]
    fn tablespace_walk_keeps_only_this_version() {
        let p = PgWalkPolicy {
            tablespace_dir: Some("PG_15_202209061".into()),
        };
        use EntryRule::*;
        assert_eq!(
            rules(&p, "", &["PG_14_1", "PG_15_202209061", "lost+found"]),
            vec![Skip, Keep, Skip]
        );
        assert_eq!(
            rules(&p, "PG_15_202209061/5", &["16400", "16401_init", "16401"]),
            vec![Keep, Keep, Skip]
        );
        assert_eq!(
            p.fixed_chunk_size(Path::new("PG_15_202209061/5/16400")),
            Some(RELATION_BLOCK)
        );
    }
}
