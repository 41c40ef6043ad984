//! `backupd restore` and `backupd dump`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::progress::Progress;
use super::GlobalArgs;
use crate::error::{ExitWith, EXIT_FATAL, EXIT_OK};
use crate::pipeline::BlobId;
use crate::postgres::plan::{plan, RecoveryTarget};
use crate::postgres::recovery::{self, shell_quote, RecoverySettings, StopAt};
use crate::repo::NodeKind;
use crate::repo::PostgresMeta;
use crate::restore::{dump_file, find_node, restore as do_restore, RestoreFilter};
use crate::source::files::glob_set;

/// Arguments of `restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot id, unique prefix, or `latest` (not with --at).
    snapshot: Option<String>,
    /// Directory to restore into (must be empty or not exist, unless --delta).
    #[arg(long, short = 't', required_unless_present = "influx_host")]
    target: Option<PathBuf>,
    /// InfluxDB: the RPC address of the running server to restore into.
    #[arg(long = "influx-host", value_name = "HOST:PORT")]
    influx_host: Option<String>,
    /// InfluxDB: its HTTP API (database checks, deletes, continuous queries, counts).
    #[arg(
        long = "influx-http",
        value_name = "URL",
        default_value = "http://127.0.0.1:8086"
    )]
    influx_http: String,
    /// InfluxDB: restore only this database (repeatable; default: all in the snapshot).
    #[arg(long = "influx-database", value_name = "DB")]
    influx_database: Vec<String>,
    /// InfluxDB: restore database OLD as NEW (repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    rename: Vec<String>,
    /// InfluxDB: say what would be created, change nothing.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// PostgreSQL point-in-time restore: a time such as "2026-11-01 14:30:00+00" (without
    /// an offset: this host's time zone), or `latest` to replay all archived WAL. Picks the
    /// newest base backup that ended before it and writes the recovery settings.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// PostgreSQL: start the restored server, wait until it has promoted, and print the
    /// time and LSN it reached.
    #[arg(long)]
    start: bool,
    /// Restore into a directory that holds an older copy: only what differs is fetched and
    /// written, and what the snapshot does not have is removed.
    #[arg(long)]
    delta: bool,
    /// PostgreSQL: restore a tablespace elsewhere (OLD is its name, oid or location).
    #[arg(long = "tablespace-map", value_name = "OLD=NEW")]
    tablespace_map: Vec<String>,
    /// PostgreSQL: the port the restored server listens on (written to postgresql.auto.conf).
    #[arg(long = "pg-port", value_name = "PORT")]
    pg_port: Option<u16>,
    /// PostgreSQL: `off` writes archive_mode = off, so a copy does not archive into the
    /// repository; `preserve` keeps the cluster's setting.
    #[arg(long = "archive-mode", value_name = "MODE", default_value = "preserve",
          value_parser = ["preserve", "off"])]
    archive_mode: String,
    /// PostgreSQL: keep the WAL directory here (pg_wal becomes a symlink to it, as
    /// `initdb --waldir`); it must be empty or not exist. Without it, pg_wal is a real
    /// directory inside the target, whatever the source had.
    #[arg(long, value_name = "DIR")]
    waldir: Option<PathBuf>,
    /// PostgreSQL with --start: the shared_preload_libraries the server starts with. A
    /// started copy loads none unless given here: a configuration inside a snapshot does not
    /// choose the code backupd runs.
    #[arg(
        long = "shared-preload-libraries",
        value_name = "LIST",
        default_value = ""
    )]
    shared_preload_libraries: String,
    /// PostgreSQL: the OS user that owns the restored cluster and runs it (as root;
    /// default `postgres`). Every restored file gets this owner and no set-id bits,
    /// whatever the snapshot recorded.
    #[arg(long = "pg-owner", value_name = "USER")]
    pg_owner: Option<String>,
    /// PostgreSQL: the cluster, when the repository holds several.
    #[arg(long = "pg-system-id", value_name = "ID")]
    pg_system_id: Option<u64>,
    /// Restore only paths matching this glob (paths as in `ls`, e.g. `/etc/**`).
    #[arg(long = "include", short = 'i')]
    include: Vec<String>,
    /// Do not restore paths matching this glob.
    #[arg(long = "exclude", short = 'e')]
    exclude: Vec<String>,
    /// Parallel pack fetches (default 3 on a local disk; on S3 --s3-connections, at most 8).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: Option<u64>,
    /// Also write long runs of zeros of any file as holes (files that had holes when they
    /// were backed up get them back anyway).
    #[arg(long)]
    sparse: bool,
    /// Set file flags (chattr: immutable, append-only, nodump, noatime, ...) as recorded,
    /// after everything else. Off by default: an immutable file blocks a later --delta,
    /// cleanup, and verify's scratch removal.
    #[arg(long = "file-flags")]
    file_flags: bool,
    /// A restore test: a started server listens on 127.0.0.1 only, without a server log
    /// collector, and its command-line settings are not kept for a restart.
    #[arg(skip)]
    test: bool,
}

/// The PostgreSQL side of a restore test.
pub(crate) struct PgTest {
    /// Port of the restored server.
    pub port: u16,
    /// The cluster, when the repository holds several.
    pub system_id: Option<u64>,
    /// Who owns and runs it (`--pg-owner`).
    pub owner: Option<String>,
    /// `--shared-preload-libraries`.
    pub shared_preload_libraries: String,
}

impl RestoreArgs {
    /// A restore test's arguments: the newest snapshot `snapshot` (or, for PostgreSQL, the
    /// newest base backup replayed to the end of the archive and started on `pg.port`
    /// with archiving off).
    pub(crate) fn for_test(
        snapshot: Option<String>,
        target: PathBuf,
        pg: Option<PgTest>,
        tablespace_map: Vec<String>,
    ) -> Self {
        let is_pg = pg.is_some();
        let (port, system_id, owner, preload) = match pg {
            Some(p) => (
                Some(p.port),
                p.system_id,
                p.owner,
                p.shared_preload_libraries,
            ),
            None => (None, None, None, String::new()),
        };
        RestoreArgs {
            snapshot: if is_pg { None } else { snapshot },
            target: Some(target),
            influx_host: None,
            influx_http: String::new(),
            influx_database: vec![],
            rename: vec![],
            dry_run: false,
            at: is_pg.then(|| "latest".to_string()),
            start: is_pg,
            delta: false,
            tablespace_map,
            pg_port: port,
            archive_mode: "off".into(),
            pg_system_id: system_id,
            include: vec![],
            exclude: vec![],
            workers: None,
            waldir: None,
            shared_preload_libraries: preload,
            pg_owner: owner,
            sparse: false,
            file_flags: false,
            test: true,
        }
    }
}

/// Arguments of `dump`.
#[derive(Args, Debug)]
pub struct DumpArgs {
    /// Snapshot id, unique prefix, or `latest`.
    snapshot: String,
    /// File to write out, e.g. the --stdin-filename of a stdin backup.
    name: String,
}

/// Restores an InfluxDB snapshot into the server at `host`.
fn influx_restore(
    g: &GlobalArgs,
    a: &RestoreArgs,
    repo: &crate::repo::Repository,
    id: &crate::pipeline::BlobId,
    snap: &crate::repo::Snapshot,
    host: &str,
) -> Result<i32> {
    use crate::restore::influx::{restore_influx, InfluxRestore};
    use crate::source::influx::{http::HttpApi, rpc::Rpc};
    if snap.influxdb.is_none() {
        bail!(
            "snapshot {} is not an InfluxDB backup: --influx-host restores only those",
            id.short()
        );
    }
    if a.target.is_some() || a.delta || a.start {
        bail!(
            "an InfluxDB restore goes to a server (--influx-host): no --target, --delta or --start"
        );
    }
    let mut rename = std::collections::BTreeMap::new();
    for r in &a.rename {
        match r.split_once('=') {
            Some((old, new))
                if !old.is_empty() && !new.is_empty() && !new.contains(['/', '\\', '"']) =>
            {
                if rename.insert(old.to_string(), new.to_string()).is_some() {
                    bail!("--rename {old}=...: given twice");
                }
            }
            _ => bail!("--rename {r:?}: must be OLD=NEW, NEW a database name"),
        }
    }
    let index = repo.load_index()?;
    let quiet = g.quiet || g.json;
    let mut say = |line: String| {
        if !quiet {
            println!("{line}");
        }
    };
    let report = restore_influx(
        repo,
        &index,
        id,
        snap,
        InfluxRestore {
            rpc: Rpc::new(host),
            http: HttpApi::new(&a.influx_http, super::backup_cmd::influx_env_credentials())?,
            databases: a.influx_database.clone(),
            rename,
            dry_run: a.dry_run,
            say: &mut say,
        },
    )?;
    if g.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if !g.quiet {
        if !report.users_not_restored.is_empty() {
            println!(
                "note: {} user(s) recorded in the snapshot are not restored (the protocol cannot create users): {}",
                report.users_not_restored.len(),
                report.users_not_restored.join(", ")
            );
        }
        for (name, why) in &report.continuous_queries_failed {
            eprintln!("backupd: warning: continuous query {name} was not created again: {why}");
        }
    }
    Ok(if report.continuous_queries_failed.is_empty() {
        EXIT_OK
    } else {
        3
    })
}

/// Runs `restore`.
///
/// # Errors
/// Repository errors, a non-empty target, or files that could not be restored.
pub fn restore(g: &GlobalArgs, a: RestoreArgs) -> Result<i32> {
    let (repo, password) = g.open_on_with_password(g.backend()?)?;
    let (id, snap, pg, segments) = match (&a.at, &a.snapshot) {
        (Some(_), Some(_)) => bail!("give a snapshot or --at, not both"),
        (None, None) => {
            bail!("give a snapshot (id, prefix or `latest`), or --at TIME for PostgreSQL")
        }
        (Some(at), None) => {
            let target = parse_at(at)?;
            let plan = plan(&repo, target, a.pg_system_id)?;
            let stop_at = match target {
                // Nothing committed between the last transaction and the target.
                RecoveryTarget::Time(_) if plan.replay_to_end => StopAt::Latest,
                RecoveryTarget::Time(t) => StopAt::Time(t),
                RecoveryTarget::Latest => StopAt::Latest,
            };
            if !g.quiet && !g.json {
                let m = plan.meta();
                println!(
                    "base backup {} (ended {}, timeline {}); WAL readable through {} (last transaction {}); target {}",
                    plan.snapshot_id.short(),
                    m.stop_time.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                    m.timeline,
                    plan.last_segment,
                    plan.reach.format("%Y-%m-%d %H:%M:%S%.6f UTC"),
                    match target {
                        RecoveryTarget::Time(t) => t.format("%Y-%m-%d %H:%M:%S%.6f UTC").to_string(),
                        RecoveryTarget::Latest => "latest".into(),
                    }
                );
                if plan.streamed_last {
                    println!(
                        "{} is read from the WAL stream (the segment the server was writing)",
                        plan.last_segment
                    );
                }
                if plan.replay_to_end {
                    println!("no transaction between the last one and the target (the stream held all of the server's WAL then): replaying all of it");
                }
            }
            (
                plan.snapshot_id,
                plan.snapshot,
                Some(stop_at),
                plan.segments,
            )
        }
        (None, Some(spec)) => {
            let (id, snap) = repo.resolve_snapshot(spec)?;
            let pg = snap.postgres.is_some().then_some(StopAt::Consistent);
            let segments = snap
                .postgres
                .as_ref()
                .map(crate::postgres::plan::backup_segments)
                .unwrap_or_default();
            (id, snap, pg, segments)
        }
    };
    if let Some(host) = &a.influx_host {
        return influx_restore(g, &a, &repo, &id, &snap, host);
    }
    if snap.influxdb.is_some() {
        bail!("snapshot {} is an InfluxDB backup: restore it into a running server with --influx-host HOST:PORT", id.short());
    }
    if a.rename.len() + a.influx_database.len() > 0 || a.dry_run {
        bail!("--rename, --influx-database and --dry-run apply to InfluxDB snapshots only");
    }
    let target_dir = a.target.clone().context("--target DIR is required")?;
    if pg.is_none()
        && (a.start
            || !a.tablespace_map.is_empty()
            || a.pg_port.is_some()
            || a.waldir.is_some()
            || a.pg_owner.is_some())
    {
        bail!(
            "--start, --tablespace-map, --pg-port, --waldir and --pg-owner apply to PostgreSQL snapshots only"
        );
    }
    let target = std::path::absolute(&target_dir)?;
    let waldir = a.waldir.as_deref().map(std::path::absolute).transpose()?;
    let index = repo.load_index()?;
    let mut filter = RestoreFilter {
        include: glob_set(&a.include)?,
        exclude: glob_set(&a.exclude)?,
        delta: a.delta,
        force_owner: None,
        sparse: a.sparse,
        file_flags: a.file_flags,
    };
    if pg.is_some() && (filter.include.is_some() || filter.exclude.is_some()) {
        bail!("--include/--exclude would leave a PostgreSQL data directory incomplete");
    }
    // For PostgreSQL, everything the restored cluster will run and everything outside the
    // target it would touch is decided, and refused if unsafe, before anything is written.
    let checked = match (pg, &snap.postgres) {
        (Some(stop_at), Some(meta)) => {
            let c = pg_checks(
                g, &a, &repo, meta, stop_at, &segments, &target, &password, &index, snap.tree,
            )?;
            filter.force_owner = Some((c.owner.uid, c.owner.gid));
            Some(c)
        }
        _ => None,
    };
    let counter = Arc::new(AtomicU64::new(0));
    let progress = Progress::start(
        !g.json && !g.quiet && !g.no_progress,
        "restore",
        Some(snap.summary.bytes_total),
        {
            let c = counter.clone();
            move || c.load(std::sync::atomic::Ordering::Relaxed)
        },
    );
    // A remote store: throughput per connection is the limit, so one fetcher per
    // connection up to 8. Each keeps a 4 MiB read buffer and a buffer as large as the
    // largest compressed blob it met (up to 8 MiB); bench corpus from S3: 8 workers peaked
    // at 141-147 MiB in 9.5-9.9 s, 10 at 160-164 MiB in 9.4-11.7 s, 12 at 183-187 MiB.
    let workers = a.workers.map_or_else(
        || repo.backend().connections().map_or(3, |n| n.clamp(3, 8)),
        |n| n as usize,
    );
    let started = std::time::Instant::now();
    let mut report = do_restore(
        &repo,
        &index,
        &snap.tree,
        &target_dir,
        &filter,
        workers,
        &counter,
    );
    let tablespaces = checked.as_ref().map_or(&[][..], |c| &c.tablespaces[..]);
    for (tree, location) in tablespaces {
        let Ok(r) = &mut report else { break };
        match do_restore(&repo, &index, tree, location, &filter, workers, &counter) {
            Ok(more) => r.merge(more),
            Err(e) => report = Err(e),
        }
    }
    drop(progress);
    let report = report?;
    let secs = started.elapsed().as_secs_f64();
    if let (Some(stop_at), Some(meta), true, Some(c)) =
        (pg, &snap.postgres, report.failed.is_empty(), &checked)
    {
        finish_pg(g, &a, meta, stop_at, c, &report, &id, &target, waldir, secs)?;
        return Ok(EXIT_OK);
    }
    if g.json {
        println!(
            "{}",
            json!({
                "snapshot_id": id.to_hex(),
                "target": target_dir.display().to_string(),
                "files": report.files,
                "dirs": report.dirs,
                "symlinks": report.symlinks,
                "specials": report.specials,
                "bytes": report.bytes,
                "duration_secs": secs,
                "failed": report.failed.iter().map(|(p, why)| json!({"path": p, "error": why})).collect::<Vec<_>>(),
                "warnings": report.warnings.iter().map(|(p, why)| json!({"path": p, "warning": why})).collect::<Vec<_>>(),
                "flags_not_set": report.flags_not_set,
            })
        );
    } else if !g.quiet {
        println!(
            "restored snapshot {} to {}: {} files, {} directories, {} symlinks, {} special files, {} bytes in {:.2} s",
            id.short(),
            target_dir.display(),
            report.files,
            report.dirs,
            report.symlinks,
            report.specials,
            report.bytes,
            secs
        );
        if report.flags_not_set > 0 {
            println!(
                "{} entries have file flags (chattr) that were not set: restore --file-flags sets them",
                report.flags_not_set
            );
        }
    }
    for (p, why) in &report.warnings {
        eprintln!("backupd: warning: {p}: {why}");
    }
    if report.failed.is_empty() && report.warnings.is_empty() {
        return Ok(EXIT_OK);
    }
    if report.failed.is_empty() {
        return Err(ExitWith {
            code: crate::error::EXIT_PARTIAL,
            message: format!(
                "warning: {} entr{} restored but not exactly (listed above)",
                report.warnings.len(),
                if report.warnings.len() == 1 {
                    "y"
                } else {
                    "ies"
                }
            ),
        }
        .into());
    }
    for (p, why) in &report.failed {
        eprintln!("backupd: could not restore {p}: {why}");
    }
    Err(ExitWith {
        code: EXIT_FATAL,
        message: format!(
            "error: {} file(s) could not be restored completely (listed above); all others were restored",
            report.failed.len()
        ),
    }
    .into())
}

/// What a PostgreSQL restore settled before writing anything.
struct PgChecked {
    /// Who owns and runs the restored cluster.
    owner: recovery::ClusterOwner,
    /// How its restore_command reaches the repository.
    access: WalAccess,
    /// Each tablespace's tree and where it goes.
    tablespaces: Vec<(BlobId, PathBuf)>,
}

/// The checks of a PostgreSQL restore that must pass before anything is written: the
/// server version, the cluster's owner, the WAL commands and their secrets, where each
/// tablespace goes, and tablespaces the WAL creates outside the target.
#[allow(clippy::too_many_arguments)]
fn pg_checks(
    g: &GlobalArgs,
    a: &RestoreArgs,
    repo: &crate::repo::Repository,
    meta: &PostgresMeta,
    stop_at: StopAt,
    segments: &[String],
    target: &Path,
    password: &str,
    index: &crate::repo::Index,
    snap_tree: BlobId,
) -> Result<PgChecked> {
    if meta.server_version_num < 120000 {
        bail!(
            "base backup of PostgreSQL {} : restoring clusters older than 12 (recovery.conf) is not supported",
            meta.server_version
        );
    }
    let owner = recovery::cluster_owner(a.pg_owner.as_deref())?;
    let access = wal_access(g, target, password)?;
    if a.start && a.archive_mode != "off" && !access.secrets.is_empty() {
        bail!(
            "the started server would archive its WAL into the repository with the credentials that came from {}, and the temporary copies backupd gives recovery are removed when it promotes: give them as files or commands (BACKUPD_PASSWORD_FILE or BACKUPD_PASSWORD_COMMAND, BACKUPD_S3_CREDENTIALS_FILE, or a policy's password_file/password_command and s3_credentials_file), or --archive-mode off",
            access.secret_origin
        );
    }
    let tablespaces = tablespace_targets(meta, &a.tablespace_map, a.delta)?;
    // pg_tblspc may only hold the tablespaces the backup recorded (a link to any other
    // place would have the restored server write there).
    if let Ok(node) = crate::restore::find_node(repo, index, &snap_tree, "/pg_tblspc") {
        if let Some(sub) = node.subtree {
            for n in repo.load_tree(index, &sub)?.nodes {
                let known = n
                    .name
                    .parse::<u32>()
                    .is_ok_and(|oid| meta.tablespaces.iter().any(|t| t.oid == oid));
                if !known {
                    bail!(
                        "the base backup holds pg_tblspc/{} but records no such tablespace (created while the backup ran?): not restoring a cluster that would use it; take a new base backup",
                        n.name
                    );
                }
            }
        }
    }
    if !g.quiet && !g.json {
        // Locations come from the snapshot: say where each goes before writing there.
        for (t, (_, loc)) in meta.tablespaces.iter().zip(&tablespaces) {
            println!(
                "tablespace {} (oid {}) is restored to {}",
                t.name,
                t.oid,
                loc.display()
            );
        }
    }
    // Replaying CREATE TABLESPACE writes at the location the WAL names, on this host,
    // removing what is there; no setting redirects it.
    let until = match stop_at {
        StopAt::Time(t) => Some(t),
        _ => None,
    };
    let created = crate::postgres::plan::tablespaces_created(
        repo,
        meta.system_identifier,
        segments,
        until,
        meta.wal_segment_size,
    )?;
    for t in &created {
        let in_use = std::fs::read_dir(&t.location).is_ok_and(|mut d| d.next().is_some());
        if in_use || a.test {
            bail!(
                "the WAL to replay creates tablespace oid {} at {} (segment {}), after base backup {}: recovery would remove and recreate {}/PG_{}_* on this host{}; take a new base backup (it records the tablespace) and restore from it, or restore on another host",
                t.oid,
                t.location,
                t.segment,
                meta.label,
                t.location,
                meta.server_version_num / 10000,
                if in_use { ", where it is in use" } else { "" }
            );
        }
        if !g.quiet && !g.json {
            eprintln!(
                "backupd: warning: WAL replay creates tablespace oid {} at {} on this host (segment {})",
                t.oid, t.location, t.segment
            );
        }
    }
    Ok(PgChecked {
        owner,
        access,
        tablespaces,
    })
}

/// After the files of a PostgreSQL restore: the recovery settings, then with `--start`
/// the server, and the report.
#[allow(clippy::too_many_arguments)]
fn finish_pg(
    g: &GlobalArgs,
    a: &RestoreArgs,
    meta: &PostgresMeta,
    stop_at: StopAt,
    c: &PgChecked,
    report: &crate::restore::RestoreReport,
    id: &BlobId,
    target: &Path,
    waldir: Option<PathBuf>,
    secs: f64,
) -> Result<()> {
    let access = &c.access;
    let archive_off = a.archive_mode == "off";
    let settings = RecoverySettings {
        stop_at,
        restore_command: access.command("wal-fetch %f %p"),
        archive_off,
        port: a.pg_port,
        waldir: waldir.clone(),
        recovery_end_command: access.remove_secrets_command(target),
        delta: a.delta,
    };
    let links: Vec<(u32, PathBuf)> = meta
        .tablespaces
        .iter()
        .zip(&c.tablespaces)
        .map(|(t, (_, loc))| (t.oid, loc.clone()))
        .collect();
    let secrets: Vec<(&str, &[u8])> = access
        .secrets
        .iter()
        .map(|(n, b)| (*n, b.as_slice()))
        .collect();
    let prepared = recovery::prepare(target, meta, &links, &settings, &secrets, c.owner)?;
    for w in &prepared.warnings {
        eprintln!("backupd: warning: {w}");
    }
    if !access.secrets.is_empty() && !g.quiet && !g.json {
        println!(
            "restore_command reads {} from {} (mode 0600, owned by the cluster's owner), since they came from {}, which the server does not inherit; {}",
            access.secret_names(),
            access
                .secrets
                .iter()
                .map(|(n, _)| target.join(n).display().to_string())
                .collect::<Vec<_>>()
                .join(" and "),
            access.secret_origin,
            if a.start {
                "they are removed once the server has promoted"
            } else {
                "recovery_end_command removes them when recovery ends"
            }
        );
    }
    if !g.quiet && !g.json {
        println!(
            "restored base backup {} to {} ({} files, {} bytes{}) in {:.2} s; recovery settings in postgresql.auto.conf",
            id.short(),
            target.display(),
            report.files,
            report.bytes,
            if a.delta {
                format!(", {} bytes already in place", report.bytes_unchanged)
            } else {
                String::new()
            },
            secs
        );
    }
    let mut reached = None;
    if a.start {
        // Links that lead out of the data directory would have the started server write
        // there (pg_basebackup keeps them too, and the user may want them; backupd does not
        // start a server on them).
        // (The recovery files, pg_tblspc/<oid> and the emptied directories were just
        // made what they must be: only links still there count.)
        let tblspc = target.join("pg_tblspc");
        let outside: Vec<String> = report
            .links
            .iter()
            .filter(|p| p.parent() != Some(tblspc.as_path()))
            .filter(|p| !(waldir.is_some() && **p == target.join("pg_wal")))
            // (made anew when the server starts)
            .filter(|p| **p != target.join(recovery::RECOVERY_LOG))
            .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()))
            .map(|p| p.display().to_string())
            .collect();
        if !outside.is_empty() {
            bail!(
                "the restored data directory holds symlinks that lead out of it ({}); the server was not started: check them, then start it yourself (pg_ctl -D {} start)",
                outside
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                target.display()
            );
        }
        let archive_command = (!archive_off).then(|| access.command("wal-push %p"));
        let mut server = recovery::ServerSettings::for_recovery(
            target,
            &settings,
            archive_command.as_deref(),
            &a.shared_preload_libraries,
            a.test,
            meta.server_version_num,
        );
        server.remove_after_promotion = access.secrets.iter().map(|(n, _)| n.to_string()).collect();
        server.forget_on_restart = !a.test;
        if a.shared_preload_libraries.is_empty() && !g.quiet && !g.json {
            if let Some(libs) = recovery::configured_preload(target) {
                println!(
                    "note: the snapshot's configuration sets shared_preload_libraries = {libs:?}; the server starts without them (a configuration inside a snapshot does not choose the code backupd runs): give --shared-preload-libraries {libs:?} to load them"
                );
            }
        }
        let r = recovery::start_and_wait(target, meta, &server, waldir.as_deref())?;
        if !g.quiet && !g.json {
            println!(
                "server promoted after {:.2} s: last transaction replayed at {}, redo done at {}, now on timeline {}{}",
                r.seconds,
                r.last_completed.as_deref().unwrap_or("(none)"),
                r.redo_done_at.as_deref().unwrap_or("?"),
                r.timeline.map_or("?".into(), |t| t.to_string()),
                r.stopped.as_ref().map(|s| format!(" ({s})")).unwrap_or_default(),
            );
            if !a.test {
                println!(
                    "it runs with archive_command, restore_command, shared_preload_libraries and the other command settings backupd chose; a restart (pg_ctl restart) uses postgresql.conf again"
                );
            }
        }
        reached = Some(r);
    } else if !g.quiet && !g.json {
        println!(
            "start it with: pg_ctl -D {} start (as the owner of the directory)",
            target.display()
        );
    }
    if g.json {
        println!(
            "{}",
            json!({
                "snapshot_id": id.to_hex(),
                "target": target.display().to_string(),
                "files": report.files,
                "bytes": report.bytes,
                "bytes_unchanged": report.bytes_unchanged,
                "duration_secs": secs,
                "promoted_after_secs": reached.as_ref().map(|r| r.seconds),
                "last_transaction": reached.as_ref().and_then(|r| r.last_completed.clone()),
                "redo_done_at": reached.as_ref().and_then(|r| r.redo_done_at.clone()),
                "timeline": reached.as_ref().and_then(|r| r.timeline),
            })
        );
    }
    Ok(())
}

/// Runs `dump`.
///
/// # Errors
/// Repository errors, or the name is not a file in the snapshot.
pub fn dump(g: &GlobalArgs, a: DumpArgs) -> Result<()> {
    let repo = g.open()?;
    let (_, snap) = repo.resolve_snapshot(&a.snapshot)?;
    let index = repo.load_index()?;
    let node = find_node(&repo, &index, &snap.tree, &a.name)?;
    if node.kind != NodeKind::File {
        bail!("{} is not a file in the snapshot", a.name);
    }
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    dump_file(&repo, &index, &node, &mut lock)?;
    Ok(())
}

/// Parses a time argument (`backup --time`): RFC 3339 or `YYYY-MM-DD HH:MM[:SS]` with an
/// optional offset (this host's zone without one).
///
/// # Errors
/// A message saying what is expected.
pub(crate) fn parse_time_arg(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if s.trim().eq_ignore_ascii_case("latest") {
        return Err("expected a time, not `latest`".into());
    }
    match parse_at(s) {
        Ok(RecoveryTarget::Time(t)) => Ok(t),
        Ok(RecoveryTarget::Latest) => Err("expected a time".into()),
        Err(e) => Err(e.to_string().replace("--at ", "")),
    }
}

/// Parses `--at`: `latest`, RFC 3339, or `YYYY-MM-DD HH:MM[:SS[.frac]][+HH[:MM]]`; without
/// an offset, this host's time zone.
fn parse_at(s: &str) -> Result<RecoveryTarget> {
    use chrono::{DateTime, Local, NaiveDateTime, TimeZone, Utc};
    let s = s.trim();
    if s.eq_ignore_ascii_case("latest") {
        return Ok(RecoveryTarget::Latest);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(RecoveryTarget::Time(t.with_timezone(&Utc)));
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M%#z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Ok(RecoveryTarget::Time(t.with_timezone(&Utc)));
        }
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S%.f",
    ] {
        if let Ok(n) = NaiveDateTime::parse_from_str(s, f) {
            if let Some(t) = Local.from_local_datetime(&n).single() {
                return Ok(RecoveryTarget::Time(t.with_timezone(&Utc)));
            }
            bail!("--at {s:?} is ambiguous or does not exist in this host's time zone (a DST change); give an offset such as +00");
        }
    }
    bail!("--at {s:?}: expected a time such as \"2026-11-01 14:30:00+00\", or `latest`")
}

/// Where each tablespace goes: its location, or the one --tablespace-map gives. A
/// location that is not empty is refused (unless --delta), naming the tablespace.
fn tablespace_targets(
    meta: &PostgresMeta,
    map: &[String],
    delta: bool,
) -> Result<Vec<(BlobId, PathBuf)>> {
    let mut pairs = vec![];
    for m in map {
        let (old, new) = m
            .split_once('=')
            .with_context(|| format!("--tablespace-map {m:?}: expected OLD=NEW"))?;
        if !meta
            .tablespaces
            .iter()
            .any(|t| t.name == old || t.oid.to_string() == old || t.location == old)
        {
            bail!(
                "--tablespace-map {old}: the backup has no such tablespace (it has: {})",
                meta.tablespaces
                    .iter()
                    .map(|t| format!("{} (oid {}, {})", t.name, t.oid, t.location))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        pairs.push((old.to_string(), std::path::absolute(new)?));
    }
    let mut out = vec![];
    for t in &meta.tablespaces {
        let mapped = pairs
            .iter()
            .find(|(old, _)| *old == t.name || *old == t.oid.to_string() || *old == t.location)
            .map(|(_, n)| n.clone());
        let loc = mapped.clone().unwrap_or_else(|| PathBuf::from(&t.location));
        // A location the snapshot names (a forger can name any path) is used only if it
        // does not exist yet, or when --tablespace-map names it, or for --delta.
        if mapped.is_none() && !delta && std::fs::symlink_metadata(&loc).is_ok() {
            bail!(
                "tablespace {} (oid {}) would be restored to {}, which exists; give --tablespace-map {}={} to restore into it (it must be empty), or another directory",
                t.name,
                t.oid,
                loc.display(),
                t.name,
                loc.display()
            );
        }
        let busy = std::fs::read_dir(&loc).is_ok_and(|mut d| d.next().is_some());
        if busy && !delta {
            bail!(
                "tablespace {} (oid {}) would be restored to {}, which is not empty; give --tablespace-map {}=NEW_DIR",
                t.name,
                t.oid,
                loc.display(),
                t.name
            );
        }
        out.push((t.tree, loc));
    }
    Ok(out)
}

use recovery::{
    RECOVERY_PASSWORD_FILE as SECRET_PASSWORD_FILE, RECOVERY_S3_FILE as SECRET_S3_FILE,
};

/// How a restored cluster's `restore_command` (and, when backupd starts it with archiving
/// on, its `archive_command`) reach the repository: this binary, this repository, and the
/// password and S3 sources as files or commands — never a secret in the command, and never
/// one the server would have to inherit from the environment.
struct WalAccess {
    /// `VAR=value ... /path/to/backupd --repo LOCATION --no-cache`, `%` escaped.
    prefix: String,
    /// Secret files to write into the data directory (mode 0600, the cluster's owner) for
    /// the duration of recovery.
    secrets: Vec<(&'static str, zeroize::Zeroizing<Vec<u8>>)>,
    /// Where the secrets came from, for messages.
    secret_origin: String,
}

impl WalAccess {
    /// The command for a WAL verb (`wal-fetch %f %p`).
    fn command(&self, verb: &str) -> String {
        format!("{} {verb}", self.prefix)
    }

    /// What the secret files hold, for messages.
    fn secret_names(&self) -> String {
        self.secrets
            .iter()
            .map(|(n, _)| match *n {
                SECRET_PASSWORD_FILE => "the repository password",
                _ => "the S3 keys",
            })
            .collect::<Vec<_>>()
            .join(" and ")
    }

    /// `recovery_end_command` removing the secret files, if there are any.
    fn remove_secrets_command(&self, target: &Path) -> Option<String> {
        if self.secrets.is_empty() {
            return None;
        }
        let files: Vec<String> = self
            .secrets
            .iter()
            .map(|(n, _)| shell_quote(&target.join(n).display().to_string()))
            .collect();
        Some(recovery::percent_escape(&format!(
            "rm -f {}",
            files.join(" ")
        )))
    }
}

fn wal_access(g: &GlobalArgs, target: &Path, password: &str) -> Result<WalAccess> {
    let exe = std::env::current_exe().context("finding this program")?;
    let loc = g.location()?;
    let s3 = crate::backend::S3Location::is_s3(&loc);
    let loc = if s3 {
        loc
    } else {
        std::path::absolute(&loc)?.display().to_string()
    };
    let mut vars: Vec<(&str, String)> = vec![];
    for var in [
        "BACKUPD_PASSWORD_FILE",
        "BACKUPD_PASSWORD_COMMAND",
        "BACKUPD_S3_ENDPOINT",
        "BACKUPD_S3_PATH_STYLE",
        "BACKUPD_S3_REGION",
        "BACKUPD_S3_CREDENTIALS_FILE",
        "BACKUPD_S3_PROFILE",
        "BACKUPD_S3_CREDENTIALS_COMMAND",
    ] {
        if let Ok(v) = std::env::var(var) {
            vars.push((var, v));
        }
    }
    let mut secrets = vec![];
    let mut origins = vec![];
    let password_file = |secrets: &mut Vec<_>, vars: &mut Vec<(&str, String)>| {
        vars.retain(|(k, _)| !k.starts_with("BACKUPD_PASSWORD"));
        vars.push((
            "BACKUPD_PASSWORD_FILE",
            target.join(SECRET_PASSWORD_FILE).display().to_string(),
        ));
        // Sized once: no reallocation leaves a copy behind.
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(password.len() + 1));
        bytes.extend_from_slice(password.as_bytes());
        bytes.push(b'\n');
        secrets.push((SECRET_PASSWORD_FILE, bytes));
    };
    // A policy's sources win over the environment's (never the secret itself).
    match &g.secret {
        Some(crate::policy::SecretSource::File(p)) => {
            vars.retain(|(k, _)| !k.starts_with("BACKUPD_PASSWORD"));
            vars.push(("BACKUPD_PASSWORD_FILE", p.display().to_string()));
        }
        Some(crate::policy::SecretSource::Command(c)) => {
            vars.retain(|(k, _)| !k.starts_with("BACKUPD_PASSWORD"));
            vars.push(("BACKUPD_PASSWORD_COMMAND", c.clone()));
        }
        Some(crate::policy::SecretSource::Env(v)) => {
            password_file(&mut secrets, &mut vars);
            origins.push(format!("the policy's password_env {v}"));
        }
        // The server runs as the cluster's owner, whose keyring is not this one.
        Some(crate::policy::SecretSource::Keyring(n)) => {
            password_file(&mut secrets, &mut vars);
            origins.push(format!("the policy's password_keyring {n}"));
        }
        None => {
            if std::env::var_os("BACKUPD_PASSWORD_FILE").is_none()
                && std::env::var_os("BACKUPD_PASSWORD_COMMAND").is_none()
            {
                password_file(&mut secrets, &mut vars);
                origins.push(if std::env::var_os("BACKUPD_PASSWORD_KEYRING").is_some() {
                    "BACKUPD_PASSWORD_KEYRING".to_string()
                } else if std::env::var_os("BACKUPD_PASSWORD").is_some() {
                    "BACKUPD_PASSWORD".to_string()
                } else {
                    "the prompt".to_string()
                });
            }
        }
    }
    if let Some(p) = &g.s3_policy {
        vars.retain(|(k, _)| {
            !k.starts_with("BACKUPD_S3_CREDENTIALS") && *k != "BACKUPD_S3_PROFILE"
        });
        match &p.credentials {
            crate::backend::S3Credentials::Chain => {}
            crate::backend::S3Credentials::File { path, profile } => {
                vars.push(("BACKUPD_S3_CREDENTIALS_FILE", path.display().to_string()));
                vars.push(("BACKUPD_S3_PROFILE", profile.clone()));
            }
            crate::backend::S3Credentials::Command(c) => {
                vars.push(("BACKUPD_S3_CREDENTIALS_COMMAND", c.clone()));
            }
        }
        if let Some(r) = &p.region {
            vars.retain(|(k, _)| *k != "BACKUPD_S3_REGION");
            vars.push(("BACKUPD_S3_REGION", r.clone()));
        }
    }
    // S3 keys from the environment: the server does not inherit AWS_SECRET_ACCESS_KEY, so
    // they go into a credentials file of the cluster's own.
    let chain = !vars
        .iter()
        .any(|(k, _)| k.starts_with("BACKUPD_S3_CREDENTIALS"));
    if s3 && chain {
        if let (Ok(id), Ok(secret)) = (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            let secret = zeroize::Zeroizing::new(secret);
            let token = std::env::var("AWS_SESSION_TOKEN")
                .ok()
                .map(zeroize::Zeroizing::new);
            // Sized once and filled piece by piece: no temporary or reallocated copy of a
            // key is left behind.
            let parts: [&str; 8] = [
                "[default]\naws_access_key_id = ",
                &id,
                "\naws_secret_access_key = ",
                &secret,
                "\n",
                if token.is_some() {
                    "aws_session_token = "
                } else {
                    ""
                },
                token.as_deref().map_or("", |t| t.as_str()),
                if token.is_some() { "\n" } else { "" },
            ];
            let mut text =
                zeroize::Zeroizing::new(String::with_capacity(parts.iter().map(|p| p.len()).sum()));
            for p in parts {
                text.push_str(p);
            }
            vars.retain(|(k, _)| *k != "BACKUPD_S3_PROFILE");
            vars.push((
                "BACKUPD_S3_CREDENTIALS_FILE",
                target.join(SECRET_S3_FILE).display().to_string(),
            ));
            vars.push(("BACKUPD_S3_PROFILE", "default".into()));
            secrets.push((
                SECRET_S3_FILE,
                zeroize::Zeroizing::new(text.as_bytes().to_vec()),
            ));
            origins.push("AWS_SECRET_ACCESS_KEY".into());
        }
    }
    let mut cmd = String::new();
    for (var, v) in vars {
        let v = if var == "BACKUPD_PASSWORD_FILE" || var == "BACKUPD_S3_CREDENTIALS_FILE" {
            std::path::absolute(&v)?.display().to_string()
        } else {
            v
        };
        recovery::check_command_value(var, &v)?;
        cmd.push_str(&format!("{var}={} ", shell_quote(&v)));
    }
    let exe = exe.display().to_string();
    recovery::check_command_value("this program's path", &exe)?;
    recovery::check_command_value("the repository location", &loc)?;
    recovery::check_command_value("the target", &target.display().to_string())?;
    cmd.push_str(&format!(
        "{} --repo {} --no-cache",
        shell_quote(&exe),
        shell_quote(&loc)
    ));
    Ok(WalAccess {
        prefix: recovery::percent_escape(&cmd),
        secrets,
        secret_origin: origins.join(" and "),
    })
}
