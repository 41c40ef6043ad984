//! `backupd backup`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::progress::Progress;
use super::GlobalArgs;
use super::{human, interrupt_token};
use crate::backup::{run_backup, BackupRequest};
use crate::error::{EXIT_OK, EXIT_PARTIAL};
use crate::postgres::basebackup::PgSession;
use crate::source::files::{FilesSource, FilesStats, WalkOptions};
use crate::source::postgres::PgSource;
use crate::source::stream::StreamBackup;
use crate::source::stream::StreamSource;
use crate::source::CancelToken;
use crate::source::Source;

/// Arguments of `backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Files and directories to back up.
    paths: Vec<PathBuf>,
    /// Exclude paths matching this glob (a pattern without `/` matches names anywhere).
    #[arg(long = "exclude", short = 'e', value_name = "GLOB")]
    exclude: Vec<String>,
    /// Read exclude globs from a file, one per line (`#` comments).
    #[arg(long = "exclude-file", value_name = "FILE")]
    exclude_file: Vec<PathBuf>,
    /// Leave out files and directories marked nodump (`chattr +d`).
    #[arg(long = "exclude-nodump")]
    exclude_nodump: bool,
    /// Stay on the file systems of the given paths (a mount point below is kept, empty).
    #[arg(long = "one-file-system", short = 'x')]
    one_file_system: bool,
    /// Leave out the contents of directories holding a valid CACHEDIR.TAG (the tag stays).
    #[arg(long = "exclude-caches")]
    exclude_caches: bool,
    /// Leave out directories that hold an entry with this name (repeatable).
    #[arg(long = "exclude-if-present", value_name = "NAME", value_parser = marker_name)]
    exclude_if_present: Vec<String>,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag")]
    tag: Vec<String>,
    /// Host name recorded in the snapshot (default: this host).
    #[arg(long)]
    host: Option<String>,
    /// Read the data from standard input.
    #[arg(long)]
    stdin: bool,
    /// File name for --stdin / --stdin-from-command data.
    #[arg(long = "stdin-filename")]
    stdin_filename: Option<String>,
    /// Back up the stdout of the command given after `--`.
    #[arg(long = "stdin-from-command")]
    stdin_from_command: bool,
    /// Read every file again, ignoring the parent snapshot.
    #[arg(long)]
    force: bool,
    /// Use this snapshot as the parent.
    #[arg(long)]
    parent: Option<String>,
    /// Reader threads for files.
    #[arg(long, default_value_t = 2)]
    read_concurrency: usize,
    /// Take a PostgreSQL base backup of the server given by --pg-host/--pg-port/--pg-user
    /// (or PG* variables, ~/.pgpass), reading its data directory on this host. WAL must be
    /// archived with archive_command = 'backupd wal-push %p' into this repository.
    #[arg(long)]
    postgres: bool,
    #[command(flatten)]
    pg: super::pg_cmd::PgArgs,
    /// The data directory, checked against the server's [PGDATA].
    #[arg(long = "pg-data", value_name = "DIR")]
    pg_data: Option<PathBuf>,
    /// Label for pg_backup_start() (default: backupd and the time).
    #[arg(long = "pg-label", value_name = "LABEL")]
    pg_label: Option<String>,
    /// Wait for a spread checkpoint instead of asking for an immediate one.
    #[arg(long = "pg-spread-checkpoint")]
    pg_spread_checkpoint: bool,
    /// Back up an InfluxDB 1.x server through its backup protocol (the RPC port): the
    /// metastore and every shard, streamed; measurements counted over its HTTP API
    /// (user and password from INFLUX_USERNAME / INFLUX_PASSWORD).
    #[arg(long)]
    influxdb: bool,
    /// The server's RPC address (its `bind-address`).
    #[arg(
        long = "influx-host",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:8088"
    )]
    influx_host: String,
    /// A database to back up (repeatable; default: all but _internal).
    #[arg(long = "influx-database", value_name = "DB")]
    influx_database: Vec<String>,
    /// The server's HTTP API.
    #[arg(
        long = "influx-http",
        value_name = "URL",
        default_value = "http://127.0.0.1:8086"
    )]
    influx_http: String,
    /// Seconds a base backup waits for its WAL to reach the repository.
    #[arg(long = "wal-wait", value_name = "SECONDS")]
    wal_wait: Option<u64>,
    /// The old name of --wal-wait (deprecated: PostgreSQL's archive_timeout is another
    /// setting).
    #[arg(long = "archive-timeout", value_name = "SECONDS", hide = true)]
    archive_timeout: Option<u64>,
    /// The recovery point objective: warn when the server's archive_timeout is 0 or above
    /// it (default 5m; a policy's source.rpo).
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    rpo: String,
    /// The snapshot's time instead of now ("2026-01-02 03:04:05", local time unless an
    /// offset or Z is given), as restic's --time: for importing older backups.
    #[arg(long, value_name = "TIME", value_parser = crate::cli::restore_cmd::parse_time_arg)]
    time: Option<chrono::DateTime<chrono::Utc>>,
    /// Run this policy (from --policies DIR) once: its source, repository, password
    /// source, tags, limits and hooks.
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// The command for --stdin-from-command.
    #[arg(last = true)]
    command: Vec<String>,
}

/// INFLUX_USERNAME and INFLUX_PASSWORD, when the user is set.
pub(crate) fn influx_env_credentials() -> Option<(String, zeroize::Zeroizing<String>)> {
    let user = std::env::var("INFLUX_USERNAME")
        .ok()
        .filter(|u| !u.is_empty())?;
    let password = zeroize::Zeroizing::new(std::env::var("INFLUX_PASSWORD").unwrap_or_default());
    Some((user, password))
}

/// An InfluxDB source from its addresses and credentials.
pub(crate) fn influx_source(
    rpc: &str,
    http: &str,
    databases: Vec<String>,
    credentials: Option<(String, zeroize::Zeroizing<String>)>,
) -> Result<Box<dyn Source>> {
    use crate::source::influx::{http::HttpApi, rpc::Rpc, InfluxSource};
    Ok(Box::new(InfluxSource {
        rpc: Rpc::new(rpc),
        http: HttpApi::new(http, credentials)?,
        databases,
    }))
}

/// Connects to PostgreSQL and checks the data directory.
fn pg_source(
    settings: crate::postgres::conn::ConnSettings,
    env: impl Fn(&str) -> Option<String> + Copy,
    pg_data: Option<&std::path::Path>,
    label: Option<String>,
    fast_checkpoint: bool,
    wal_wait: std::time::Duration,
    rpo: std::time::Duration,
) -> Result<Box<dyn Source>> {
    let resolved = settings.resolve(env);
    let session = PgSession::connect(resolved.config(env)?, &resolved)?;
    session.check(pg_data)?;
    // The objective the server's settings cannot meet: said, not fatal (the base backup
    // itself is fine).
    for problem in crate::postgres::rpo::archive_problems(
        &session.info.archive_settings(),
        rpo,
        session.target(),
    ) {
        eprintln!("warning: {problem}");
    }
    Ok(Box::new(PgSource {
        session,
        label: label.unwrap_or_else(|| {
            format!(
                "backupd {}",
                chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
            )
        }),
        fast_checkpoint,
        wal_wait,
    }))
}

/// Runs `backup`.
///
/// # Errors
/// Bad arguments, repository errors, or a failed backup.
pub fn run(g: &GlobalArgs, a: BackupArgs) -> Result<i32> {
    if let Some(name) = a.policy.clone() {
        return run_policy(g, &a, &name);
    }
    let source = if a.influxdb {
        if !a.paths.is_empty() || a.stdin || a.stdin_from_command || a.postgres {
            bail!("--influxdb takes no paths, --stdin, --stdin-from-command or --postgres");
        }
        influx_source(
            &a.influx_host,
            &a.influx_http,
            a.influx_database.clone(),
            influx_env_credentials(),
        )?
    } else if a.postgres {
        if !a.paths.is_empty() || a.stdin || a.stdin_from_command {
            bail!("--postgres takes no paths, --stdin or --stdin-from-command");
        }
        let pg_data = a
            .pg_data
            .clone()
            .or_else(|| std::env::var_os("PGDATA").map(PathBuf::from));
        pg_source(
            a.pg.settings(),
            |k: &str| std::env::var(k).ok(),
            pg_data.as_deref(),
            a.pg_label.clone(),
            !a.pg_spread_checkpoint,
            std::time::Duration::from_secs(match (a.wal_wait, a.archive_timeout) {
                (Some(w), _) => w,
                (None, Some(old)) => {
                    eprintln!("warning: --archive-timeout is deprecated: use --wal-wait (PostgreSQL's archive_timeout is another setting)");
                    old
                }
                (None, None) => 60,
            }),
            crate::policy::units::parse_duration(&a.rpo)
                .map_err(|e| anyhow::anyhow!("--rpo {:?}: {e}", a.rpo))?,
        )?
    } else if a.stdin_from_command {
        if a.command.is_empty() {
            bail!("--stdin-from-command needs the command after `--`, e.g. `backupd backup --stdin-from-command -- pg_dump -Fc db`");
        }
        if !a.paths.is_empty() || a.stdin {
            bail!("--stdin-from-command takes no paths and not --stdin");
        }
        let name = a.stdin_filename.clone().unwrap_or_else(|| {
            std::path::Path::new(&a.command[0])
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "stdin".into())
        });
        stream_source(StreamSource::Command(a.command.clone()), name)?
    } else if a.stdin {
        if !a.paths.is_empty() {
            bail!("--stdin takes no paths");
        }
        stream_source(
            StreamSource::Stdin,
            a.stdin_filename.clone().unwrap_or_else(|| "stdin".into()),
        )?
    } else {
        if a.paths.is_empty() {
            bail!("nothing to back up: give paths, --stdin, or --stdin-from-command -- CMD");
        }
        let mut excludes = a.exclude.clone();
        for f in &a.exclude_file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading exclude file {}", f.display()))?;
            excludes.extend(text.lines().map(str::to_string));
        }
        let mut paths = vec![];
        for p in &a.paths {
            paths.push(
                std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?,
            );
        }
        Box::new(FilesSource {
            paths,
            excludes,
            options: WalkOptions {
                format2: false,
                parent_has_attributes: false,
                parent_same_user: false,
                exclude_nodump: a.exclude_nodump,
                one_file_system: a.one_file_system,
                exclude_caches: a.exclude_caches,
                exclude_if_present: a.exclude_if_present.iter().map(Into::into).collect(),
            },
        })
    };
    let host = a.host.clone().unwrap_or_else(super::hostname);
    execute(g, &a, source, a.tag.clone(), host, None, interrupt_token()?).map(|(code, _)| code)
}

/// Runs a policy once: pre hooks, the backup, then post or on_failure hooks.
fn run_policy(g: &GlobalArgs, a: &BackupArgs, name: &str) -> Result<i32> {
    if !a.paths.is_empty()
        || a.stdin
        || a.stdin_from_command
        || a.postgres
        || a.influxdb
        || !a.command.is_empty()
    {
        bail!("--policy takes its source from the policy: give no paths, --stdin, --stdin-from-command or --postgres");
    }
    let pol = crate::policy::find(&g.policies, name)?;
    for w in &pol.warnings {
        eprintln!("warning: {w}");
    }
    let g = g.for_policy(&pol);
    let hooks = &pol.hooks;
    // Signals are handled from here on: an interrupt during a pre hook stops the hook and
    // still runs the on_failure hooks.
    let cancel = interrupt_token()?;
    let mut env = vec![("BACKUPD_POLICY", pol.name.clone())];
    let outcome = (|| -> Result<(i32, Option<crate::pipeline::BlobId>)> {
        crate::policy::hooks::run_hooks("pre", &hooks.pre, &env, hooks.timeout, Some(&cancel))?;
        if cancel.is_cancelled() {
            return Err(crate::backup::BackupError::Interrupted.into());
        }
        let source = policy_source(&pol)?;
        let mut tags = pol.tags.clone();
        tags.extend(a.tag.iter().cloned());
        let host = a
            .host
            .clone()
            .or_else(|| pol.host.clone())
            .unwrap_or_else(super::hostname);
        execute(
            &g,
            a,
            source,
            tags,
            host,
            Some(pol.name.clone()),
            cancel.clone(),
        )
    })();
    match outcome {
        Ok((code, id)) => {
            env.push(("BACKUPD_RESULT", "success".into()));
            if let Some(id) = id {
                env.push(("BACKUPD_SNAPSHOT", id.to_hex()));
            }
            if let Err(e) =
                crate::policy::hooks::run_hooks("post", &hooks.post, &env, hooks.timeout, None)
            {
                // The snapshot is saved: not a failed backup (the agent must not run it
                // again), but not a clean run either.
                eprintln!("backupd: warning: the snapshot was saved, but {e}");
                return Ok(crate::error::EXIT_PARTIAL);
            }
            Ok(code)
        }
        Err(e) => {
            env.push(("BACKUPD_RESULT", "failure".into()));
            env.push(("BACKUPD_ERROR", super::error_chain(&e)));
            if let Err(h) = crate::policy::hooks::run_hooks(
                "on_failure",
                &hooks.on_failure,
                &env,
                hooks.timeout,
                None,
            ) {
                tracing::error!(policy = %pol.name, "{h}");
            }
            Err(e)
        }
    }
}

/// A stream source, its file name checked.
fn stream_source(source: StreamSource, name: String) -> Result<Box<dyn Source>> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("--stdin-filename {name:?} must be a plain file name");
    }
    Ok(Box::new(StreamBackup { source, name }))
}

/// The backup source a policy describes.
fn policy_source(pol: &crate::policy::Policy) -> Result<Box<dyn Source>> {
    use crate::policy::SourceSpec;
    Ok(match &pol.source {
        SourceSpec::Files {
            paths,
            exclude,
            options,
        } => Box::new(FilesSource {
            paths: paths.clone(),
            excludes: exclude.clone(),
            options: options.clone(),
        }),
        SourceSpec::Command { argv, filename } => Box::new(StreamBackup {
            source: StreamSource::Command(argv.clone()),
            name: filename.clone(),
        }),
        SourceSpec::Postgres(pg) => {
            let password = pg.read_password()?;
            pg_source(
                pg.conn_settings(),
                crate::postgres::conn::env_with_password(password.as_deref().map(|p| p.as_str())),
                Some(&pg.data_directory),
                None,
                pg.fast_checkpoint,
                pg.wal_wait,
                pg.rpo,
            )?
        }
        SourceSpec::Influxdb(ix) => {
            let credentials = match &ix.username {
                Some(user) => {
                    let password = ix
                        .password
                        .as_ref()
                        .map(super::password::read_secret)
                        .transpose()
                        .context("the policy's InfluxDB password")?;
                    Some((
                        user.clone(),
                        password.unwrap_or_else(|| zeroize::Zeroizing::new(String::new())),
                    ))
                }
                None => influx_env_credentials(),
            };
            influx_source(&ix.host, &ix.http, ix.databases.clone(), credentials)?
        }
    })
}

/// Backs up `source` and prints the summary; returns the exit code and the snapshot id.
fn execute(
    g: &GlobalArgs,
    a: &BackupArgs,
    source: Box<dyn Source>,
    tags: Vec<String>,
    host: String,
    policy: Option<String>,
    cancel: CancelToken,
) -> Result<(i32, Option<crate::pipeline::BlobId>)> {
    let repo = g.open()?;
    let stats = Arc::new(FilesStats::default());
    let progress = Progress::start(!g.json && !g.quiet && !g.no_progress, "backup", None, {
        let st = stats.clone();
        move || st.bytes_read.load(std::sync::atomic::Ordering::Relaxed)
    });
    let req = BackupRequest {
        source,
        host,
        tags,
        force: a.force,
        parent: a.parent.clone(),
        policy,
        time: a.time,
        cancel,
        readers: a.read_concurrency,
        stats,
    };
    let report = run_backup(&repo, req);
    drop(progress);
    let report = report?;
    for (p, why) in &report.unreadable {
        eprintln!("backupd: warning: could not read {p}: {why}");
    }
    for p in &report.skipped_special {
        eprintln!("backupd: skipped special file {p}");
    }
    for p in &report.changed {
        eprintln!("backupd: warning: {p} changed while it was read; backed up as read (marked in the snapshot)");
    }
    for what in &report.not_kept {
        eprintln!("backupd: warning: not kept: {what}");
    }
    let s = &report.snapshot.summary;
    if g.json {
        let mut v = serde_json::to_value(s)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("snapshot_id".into(), json!(report.snapshot_id.to_hex()));
            o.insert(
                "parent".into(),
                json!(report.snapshot.parent.map(|p| p.to_hex())),
            );
            o.insert(
                "unreadable".into(),
                json!(report.unreadable.iter().map(|(p, _)| p).collect::<Vec<_>>()),
            );
            o.insert("skipped_special".into(), json!(report.skipped_special));
            o.insert("changed_while_read".into(), json!(report.changed));
            o.insert("not_kept".into(), json!(report.not_kept));
            o.insert("features".into(), json!(report.snapshot.features));
            o.insert("requests".into(), json!(g.requests.stats()));
        }
        println!("{v}");
    } else if !g.quiet {
        println!(
            "snapshot {} saved{}",
            report.snapshot_id.short(),
            report
                .snapshot
                .parent
                .map(|p| format!(" (parent {})", p.short()))
                .unwrap_or_default()
        );
        println!(
            "files:     {} new, {} changed, {} unchanged; {} directories",
            s.files_new, s.files_changed, s.files_unchanged, s.dirs
        );
        println!(
            "read:      {} of {} in the snapshot",
            human(s.bytes_read),
            human(s.bytes_total)
        );
        println!(
            "added:     {} new data ({} blobs), {} stored after compression",
            human(s.bytes_added),
            s.blobs_new,
            human(s.bytes_stored)
        );
        println!(
            "dedup:     {:.1}% of the snapshot was already in the repository",
            s.dedup_ratio * 100.0
        );
        if let Some(m) = &report.snapshot.influxdb {
            let shards: usize = m.databases.iter().map(|d| d.shards.len()).sum();
            let unchanged: usize = m
                .databases
                .iter()
                .flat_map(|d| &d.shards)
                .filter(|s| s.unchanged)
                .count();
            let names: Vec<&str> = m.databases.iter().map(|d| d.name.as_str()).collect();
            println!(
                "influxdb:  {} {}: {} ({shards} shards, {unchanged} unchanged since the parent)",
                m.rpc,
                m.server_version,
                names.join(", ")
            );
        }
        if let Some(m) = &report.snapshot.postgres {
            println!(
                "postgres:  {} system {}, timeline {}, WAL {} .. {}",
                m.server_version, m.system_identifier, m.timeline, m.start_lsn, m.stop_lsn
            );
        }
        println!("duration:  {:.2} s", s.duration_secs);
        let r = g.requests.stats();
        println!(
            "requests:  {} ({} put, {} get, {} ranged get, {} list, {} exists, {} delete)",
            r.total(),
            r.put,
            r.get,
            r.get_range,
            r.list,
            r.exists,
            r.delete
        );
    }
    if report.unreadable.is_empty() && report.changed.is_empty() && report.not_kept.is_empty() {
        Ok((EXIT_OK, Some(report.snapshot_id)))
    } else {
        let mut what = vec![];
        if !report.unreadable.is_empty() {
            what.push(format!(
                "{} path(s) could not be read",
                report.unreadable.len()
            ));
        }
        if !report.changed.is_empty() {
            what.push(format!(
                "{} file(s) changed while they were read",
                report.changed.len()
            ));
        }
        if !report.not_kept.is_empty() {
            what.push("some attributes were not kept (listed)".to_string());
        }
        eprintln!(
            "backupd: snapshot {} was saved, but {}",
            report.snapshot_id.short(),
            what.join(", ")
        );
        Ok((EXIT_PARTIAL, Some(report.snapshot_id)))
    }
}

/// An `--exclude-if-present` name: a file name, looked up in each directory.
fn marker_name(v: &str) -> Result<String, String> {
    match crate::source::files::marker_name_problem(v) {
        Some(want) => Err(format!("expected {want}")),
        None => Ok(v.to_string()),
    }
}
