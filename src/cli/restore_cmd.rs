//! `backupd restore` and `backupd dump`.

use std::path::PathBuf;
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
    #[arg(long, short = 't')]
    target: PathBuf,
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
}

impl RestoreArgs {
    /// A restore test's arguments: the newest snapshot `snapshot` (or, for PostgreSQL, the
    /// newest base backup replayed to the end of the archive and started on `pg_port`
    /// with archiving off).
    pub(crate) fn for_test(
        snapshot: Option<String>,
        target: PathBuf,
        pg: Option<(u16, Option<u64>)>,
        tablespace_map: Vec<String>,
    ) -> Self {
        RestoreArgs {
            snapshot: if pg.is_some() { None } else { snapshot },
            target,
            at: pg.map(|_| "latest".to_string()),
            start: pg.is_some(),
            delta: false,
            tablespace_map,
            pg_port: pg.map(|(port, _)| port),
            archive_mode: "off".into(),
            pg_system_id: pg.and_then(|(_, id)| id),
            include: vec![],
            exclude: vec![],
            workers: None,
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

/// Runs `restore`.
///
/// # Errors
/// Repository errors, a non-empty target, or files that could not be restored.
pub fn restore(g: &GlobalArgs, a: RestoreArgs) -> Result<i32> {
    let repo = g.open()?;
    let (id, snap, pg) = match (&a.at, &a.snapshot) {
        (Some(_), Some(_)) => bail!("give a snapshot or --at, not both"),
        (None, None) => {
            bail!("give a snapshot (id, prefix or `latest`), or --at TIME for PostgreSQL")
        }
        (Some(at), None) => {
            let target = parse_at(at)?;
            let plan = plan(&repo, target, a.pg_system_id)?;
            let stop_at = match target {
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
            }
            (plan.snapshot_id, plan.snapshot, Some(stop_at))
        }
        (None, Some(spec)) => {
            let (id, snap) = repo.resolve_snapshot(spec)?;
            let pg = snap.postgres.is_some().then_some(StopAt::Consistent);
            (id, snap, pg)
        }
    };
    if pg.is_none() && (a.start || !a.tablespace_map.is_empty() || a.pg_port.is_some()) {
        bail!("--start, --tablespace-map and --pg-port apply to PostgreSQL snapshots only");
    }
    let index = repo.load_index()?;
    let filter = RestoreFilter {
        include: glob_set(&a.include)?,
        exclude: glob_set(&a.exclude)?,
        delta: a.delta,
    };
    if pg.is_some() && (filter.include.is_some() || filter.exclude.is_some()) {
        bail!("--include/--exclude would leave a PostgreSQL data directory incomplete");
    }
    let tablespaces = match (&pg, &snap.postgres) {
        (Some(_), Some(m)) => tablespace_targets(m, &a.tablespace_map, a.delta)?,
        _ => vec![],
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
        &repo, &index, &snap.tree, &a.target, &filter, workers, &counter,
    );
    for (tree, location) in &tablespaces {
        let Ok(r) = &mut report else { break };
        match do_restore(&repo, &index, tree, location, &filter, workers, &counter) {
            Ok(more) => {
                r.files += more.files;
                r.dirs += more.dirs;
                r.symlinks += more.symlinks;
                r.bytes += more.bytes;
                r.bytes_unchanged += more.bytes_unchanged;
                r.failed.extend(more.failed);
            }
            Err(e) => report = Err(e),
        }
    }
    drop(progress);
    let report = report?;
    let secs = started.elapsed().as_secs_f64();
    let mut reached = None;
    if let (Some(stop_at), Some(meta), true) = (pg, &snap.postgres, report.failed.is_empty()) {
        let settings = RecoverySettings {
            stop_at,
            restore_command: restore_command(g)?,
            archive_off: a.archive_mode == "off",
            port: a.pg_port,
        };
        let links: Vec<(u32, PathBuf)> = meta
            .tablespaces
            .iter()
            .zip(&tablespaces)
            .map(|(t, (_, loc))| (t.oid, loc.clone()))
            .collect();
        recovery::prepare(&a.target, meta, &links, &settings)?;
        if !g.quiet && !g.json {
            println!(
                "restored base backup {} to {} ({} files, {} bytes{}) in {:.2} s; recovery settings in postgresql.auto.conf",
                id.short(),
                a.target.display(),
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
        if a.start {
            let r = recovery::start_and_wait(&a.target, meta)?;
            if !g.quiet && !g.json {
                println!(
                    "server promoted after {:.2} s: last transaction replayed at {}, redo done at {}, now on timeline {}{}",
                    r.seconds,
                    r.last_completed.as_deref().unwrap_or("(none)"),
                    r.redo_done_at.as_deref().unwrap_or("?"),
                    r.timeline.map_or("?".into(), |t| t.to_string()),
                    r.stopped.as_ref().map(|s| format!(" ({s})")).unwrap_or_default(),
                );
            }
            reached = Some(r);
        } else if !g.quiet && !g.json {
            println!(
                "start it with: pg_ctl -D {} start (as the owner of the directory)",
                a.target.display()
            );
        }
        if g.json {
            println!(
                "{}",
                json!({
                    "snapshot_id": id.to_hex(),
                    "target": a.target.display().to_string(),
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
        return Ok(EXIT_OK);
    }
    if g.json {
        println!(
            "{}",
            json!({
                "snapshot_id": id.to_hex(),
                "target": a.target.display().to_string(),
                "files": report.files,
                "dirs": report.dirs,
                "symlinks": report.symlinks,
                "bytes": report.bytes,
                "duration_secs": secs,
                "failed": report.failed.iter().map(|(p, why)| json!({"path": p, "error": why})).collect::<Vec<_>>(),
            })
        );
    } else if !g.quiet {
        println!(
            "restored snapshot {} to {}: {} files, {} directories, {} symlinks, {} bytes in {:.2} s",
            id.short(),
            a.target.display(),
            report.files,
            report.dirs,
            report.symlinks,
            report.bytes,
            secs
        );
    }
    if report.failed.is_empty() {
        return Ok(EXIT_OK);
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
        let loc = pairs
            .iter()
            .find(|(old, _)| *old == t.name || *old == t.oid.to_string() || *old == t.location)
            .map_or_else(|| PathBuf::from(&t.location), |(_, n)| n.clone());
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

/// The restore_command for the restored cluster: this binary, this repository, and the
/// password source when it is a file or a command (never the password itself).
fn restore_command(g: &GlobalArgs) -> Result<String> {
    let exe = std::env::current_exe().context("finding this program")?;
    let loc = g.location()?;
    let loc = if crate::backend::S3Location::is_s3(&loc) {
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
        Some(crate::policy::SecretSource::Env(v)) => bail!(
            "the restored server fetches WAL with the repository password, which the policy takes from the environment variable {v}: use password_file or password_command for a PostgreSQL policy"
        ),
        None => {}
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
    let mut cmd = String::new();
    for (var, v) in vars {
        let v = if var == "BACKUPD_PASSWORD_FILE" || var == "BACKUPD_S3_CREDENTIALS_FILE" {
            std::path::absolute(&v)?.display().to_string()
        } else {
            v
        };
        cmd.push_str(&format!("{var}={} ", shell_quote(&v)));
    }
    cmd.push_str(&format!(
        "{} --repo {} --no-cache wal-fetch %f %p",
        shell_quote(&exe.display().to_string()),
        shell_quote(&loc)
    ));
    Ok(cmd)
}
