//! `backupd verify`: proves that backups restore. The repository's structure, a share of
//! its packs read back (`--read-data-subset`), and with `--restore-test` a real restore
//! of the newest snapshot into a scratch directory: for PostgreSQL, the newest base backup
//! replayed to the end of the WAL archive, started as a throwaway server on a free port,
//! checked with `pg_amcheck` and the policy's SQL checks, then stopped and removed. Each
//! phase is timed; the result is a JSON report and an exit code an alert can use.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::GlobalArgs;
use crate::check::{check_with, ReadData};
use crate::error::{ExitWith, EXIT_FATAL, EXIT_OK};
use crate::policy::{self, Policy, SourceSpec, VerifySpec};
use crate::postgres::checks::{run_sql_checks, SqlCheckResult, Target};
use crate::postgres::plan::{plan, RecoveryTarget};
use crate::postgres::recovery;
use crate::source::CancelToken;

/// Arguments of `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Verify this policy with its [verify] settings (and its repository).
    #[arg(long, value_name = "NAME", conflicts_with = "all_policies")]
    policy: Option<String>,
    /// Verify every policy of --policies that has a [verify] section.
    #[arg(long)]
    all_policies: bool,
    /// Read back this share of the packs (e.g. 10%), a different share each month.
    #[arg(long, value_name = "PERCENT")]
    read_data_subset: Option<String>,
    /// Read back every pack.
    #[arg(long, conflicts_with = "read_data_subset")]
    read_data: bool,
    /// Restore the newest snapshot (PostgreSQL: start it and run the checks).
    #[arg(long)]
    restore_test: bool,
    /// Where restore tests restore (default: $TMPDIR or /tmp), in a new private directory
    /// (`backupd-verify-<random>`, mode 0711) removed afterwards.
    #[arg(long, value_name = "DIR", env = "BACKUPD_SCRATCH_DIR")]
    scratch: Option<PathBuf>,
    /// PostgreSQL: the OS user that owns and runs the restored cluster (default: the
    /// policy's `cluster_owner`, else `postgres`).
    #[arg(long = "pg-owner", value_name = "USER")]
    pg_owner: Option<String>,
    /// PostgreSQL: the shared_preload_libraries the restored server starts with (default:
    /// the policy's, else none).
    #[arg(long = "shared-preload-libraries", value_name = "LIST")]
    shared_preload_libraries: Option<String>,
}

/// Where and how a restore test runs.
struct TestSetup<'a> {
    /// The base of its scratch directory.
    scratch: &'a Path,
    /// `--pg-owner`.
    owner: Option<String>,
    /// `--shared-preload-libraries`.
    preload: String,
}

/// The outcome of one verification.
#[derive(Debug, Default, Serialize)]
struct Report {
    policy: Option<String>,
    ok: bool,
    problems: Vec<String>,
    snapshots: usize,
    packs_read: usize,
    affected: Vec<String>,
    check_secs: f64,
    restore: Option<RestoreTest>,
}

#[derive(Debug, Default, Serialize)]
struct RestoreTest {
    snapshot: String,
    source: String,
    files: u64,
    bytes: u64,
    restore_secs: f64,
    /// PostgreSQL: restore, WAL replay and promotion, until it accepts connections.
    server_secs: Option<f64>,
    amcheck_ok: Option<bool>,
    amcheck_secs: Option<f64>,
    sql_checks: Vec<SqlCheckResult>,
    /// InfluxDB: the measurements of the restored copy, per database.
    #[serde(skip_serializing_if = "Option::is_none")]
    measurements: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// InfluxDB: the policy's InfluxQL checks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    influxql_checks: Vec<SqlCheckResult>,
}

/// A free port for the restored server, chosen at random below the kernel's ephemeral
/// range (where an outgoing connection could take a port from `bind(0)` before the server
/// binds it), else from `bind(0)`.
fn free_port() -> Result<u16> {
    for _ in 0..64 {
        let mut r = [0u8; 2];
        chacha20poly1305::aead::rand_core::RngCore::fill_bytes(
            &mut chacha20poly1305::aead::OsRng,
            &mut r,
        );
        let port = 20000 + u16::from_le_bytes(r) % 12000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tree_size(p: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                files += 1;
                bytes += md.len();
            }
        }
    }
    (files, bytes)
}

/// A restore test's private scratch directory: `BASE/backupd-verify-<random>`, made new
/// (never reused) with mode 0711 and owned by this process's user, so nobody else can
/// create, rename or replace anything in it, yet the restored server (running as the
/// cluster's owner) can reach the data directory restored inside it. A marker inside names
/// the process that made it. Removed on drop, by descriptor.
struct Scratch {
    base: PathBuf,
    name: String,
    dir: PathBuf,
}

/// The marker inside a scratch directory: `<pid> <process start time>`.
const SCRATCH_MARKER: &str = "backupd-verify.owner";
const SCRATCH_PREFIX: &str = "backupd-verify-";

/// The start time of process `pid` (field 22 of /proc/PID/stat), to tell a live owner
/// from a reused pid.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Scratch {
    fn new(base: &Path) -> Result<Scratch> {
        std::fs::create_dir_all(base)
            .with_context(|| format!("scratch directory {}", base.display()))?;
        let base_fd = crate::dirfd::open_dir_path(base)
            .with_context(|| format!("scratch directory {}", base.display()))?;
        for _ in 0..16 {
            let mut r = [0u8; 12];
            chacha20poly1305::aead::rand_core::RngCore::fill_bytes(
                &mut chacha20poly1305::aead::OsRng,
                &mut r,
            );
            let name = format!("{SCRATCH_PREFIX}{}", hex::encode(r));
            let dir = base.join(&name);
            match rustix::fs::mkdirat(
                &base_fd,
                name.as_str(),
                rustix::fs::Mode::from_raw_mode(0o711),
            ) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => {
                    return Err(std::io::Error::from(e))
                        .with_context(|| format!("creating {}", dir.display()))
                }
            }
            let fd = crate::dirfd::open_subdir(&base_fd, std::ffi::OsStr::new(&name))
                .with_context(|| format!("opening {}", dir.display()))?;
            crate::dirfd::set_mode(&fd, 0o711)?;
            let pid = std::process::id();
            let marker = format!("{pid} {}\n", process_start(pid).unwrap_or(0));
            let mut f = crate::dirfd::create_file(&fd, std::ffi::OsStr::new(SCRATCH_MARKER), 0o600)
                .with_context(|| format!("writing {}/{SCRATCH_MARKER}", dir.display()))?;
            std::io::Write::write_all(&mut f, marker.as_bytes())?;
            return Ok(Scratch {
                base: base.to_path_buf(),
                name,
                dir,
            });
        }
        bail!(
            "could not make a new scratch directory in {}",
            base.display()
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let r = crate::dirfd::open_dir_path(&self.base)
            .and_then(|fd| crate::dirfd::remove_tree(&fd, std::ffi::OsStr::new(&self.name)));
        if let Err(e) = r {
            tracing::warn!("removing {}: {e}", self.dir.display());
        }
    }
}

/// Removes what a killed restore test left in `base`: scratch directories this user made
/// (real directories, mode 0711, with a marker) whose process is gone, stopping a server
/// still running on one first. Anything else with a similar name is left alone.
fn clean_stale(base: &Path) {
    use crate::dirfd;
    use std::ffi::OsStr;
    let Ok(base_fd) = dirfd::open_dir_path(base) else {
        return;
    };
    let Ok(entries) = dirfd::list(&base_fd) else {
        return;
    };
    let me = rustix::process::geteuid().as_raw();
    for (name, _) in entries {
        let Some(name) = std::str::from_utf8(&name)
            .ok()
            .filter(|n| n.starts_with(SCRATCH_PREFIX))
        else {
            continue;
        };
        let n = OsStr::new(name);
        let ours = dirfd::lstat_at(&base_fd, n)
            .ok()
            .flatten()
            .is_some_and(|st| {
                dirfd::file_type(&st) == rustix::fs::FileType::Directory
                    && st.st_uid == me
                    && st.st_mode & 0o7777 == 0o711
            });
        if !ours {
            continue;
        }
        let Ok(fd) = dirfd::open_subdir(&base_fd, n) else {
            continue;
        };
        let Some(owner) = dirfd::read_file(&fd, OsStr::new(SCRATCH_MARKER), 64)
            .ok()
            .flatten()
            .and_then(|b| {
                let t = String::from_utf8(b).ok()?;
                let (pid, start) = t.trim().split_once(' ')?;
                Some((pid.parse::<u32>().ok()?, start.parse::<u64>().ok()?))
            })
        else {
            continue;
        };
        // Its process still runs (the same one: same start time; when the start time
        // could not be read, any process with that pid counts).
        let alive = match process_start(owner.0) {
            Some(s) => owner.1 == 0 || s == owner.1,
            None => false,
        };
        if alive {
            continue;
        }
        let path = base.join(name);
        let data = path.join("restore");
        if matches!(
            dirfd::open_subdir(&fd, OsStr::new("restore"))
                .and_then(|r| dirfd::lstat_at(&r, OsStr::new("postmaster.pid"))),
            Ok(Some(_))
        ) {
            if let Err(err) = recovery::stop_dir(&data) {
                tracing::warn!("stopping the server left on {}: {err}", data.display());
            }
        }
        tracing::warn!(
            "removing {} left by an interrupted restore test",
            path.display()
        );
        drop(fd);
        let _ = dirfd::remove_tree(&base_fd, n);
    }
}

/// Stops the restored server when the restore test ends, however it ends.
struct RunningServer<'a> {
    dir: &'a Path,
    meta: &'a crate::repo::PostgresMeta,
    stopped: bool,
}

impl RunningServer<'_> {
    /// Stops it now, reporting how that went.
    fn stop(mut self) -> Result<(), crate::postgres::PgError> {
        self.stopped = true;
        recovery::stop(self.dir, self.meta)
    }
}

impl Drop for RunningServer<'_> {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        if let Err(e) = recovery::stop(self.dir, self.meta) {
            tracing::warn!(
                "stopping the restored server on {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// Set by SIGINT/SIGTERM: the restore test stops at its next phase and cleans up.
fn interrupted(stop: &CancelToken) -> Result<()> {
    if stop.is_cancelled() {
        bail!("interrupted");
    }
    Ok(())
}

fn restore_test(
    g: &GlobalArgs,
    repo: &crate::repo::Repository,
    pol: Option<&Policy>,
    spec: Option<&VerifySpec>,
    setup: &TestSetup<'_>,
    r: &mut Report,
    stop: &CancelToken,
) -> Result<()> {
    let (scratch, owner, preload) = (setup.scratch, &setup.owner, &setup.preload);
    let snaps = repo.snapshots()?;
    let newest = snaps
        .iter()
        .rev()
        .find(|(_, s)| pol.is_none_or(|p| s.policy.as_deref() == Some(&p.name)))
        .cloned();
    let Some((id, snap)) = newest else {
        bail!(
            "no snapshot to restore{}",
            pol.map(|p| format!(" for policy {}", p.name))
                .unwrap_or_default()
        );
    };
    let mut quiet = g.clone();
    quiet.quiet = true;
    quiet.json = false;
    quiet.no_progress = true;
    clean_stale(scratch);
    let dir = Scratch::new(scratch)?;
    let target = dir.dir.join("restore");
    let mut t = RestoreTest {
        source: snap.source.clone(),
        ..RestoreTest::default()
    };
    let started = Instant::now();
    if let Some(meta) = &snap.postgres {
        let sysid = meta.system_identifier;
        let p = plan(repo, RecoveryTarget::Latest, Some(sysid))?;
        if let Some(gap) = &p.gap {
            r.problems.push(format!(
                "the WAL archive of system {sysid} has a gap at {gap}: recovery stops before it"
            ));
        }
        t.snapshot = p.snapshot_id.to_hex();
        let ts_map: Vec<String> = p
            .snapshot
            .postgres
            .iter()
            .flat_map(|m| &m.tablespaces)
            .map(|ts| {
                format!(
                    "{}={}",
                    ts.oid,
                    dir.dir.join(format!("ts-{}", ts.oid)).display()
                )
            })
            .collect();
        let pg = pol.and_then(|p| match &p.source {
            SourceSpec::Postgres(pg) => Some(pg),
            _ => None,
        });
        let user = pg
            .and_then(|p| p.user.clone())
            .or_else(|| std::env::var("PGUSER").ok())
            .unwrap_or_else(|| "postgres".into());
        let database = pg
            .and_then(|p| p.database.clone())
            .unwrap_or_else(|| "postgres".into());
        let password = match pg.and_then(|p| p.password.as_ref()) {
            Some(src) => Some(super::password::read_secret(src)?),
            None => None,
        };
        interrupted(stop)?;
        let port = free_port()?;
        let args = super::restore_cmd::RestoreArgs::for_test(
            None,
            target.clone(),
            Some(super::restore_cmd::PgTest {
                port,
                system_id: Some(sysid),
                owner: owner.clone(),
                shared_preload_libraries: preload.clone(),
            }),
            ts_map,
        );
        let restored = super::restore_cmd::restore(&quiet, args);
        t.server_secs = Some(started.elapsed().as_secs_f64());
        let (files, bytes) = tree_size(&target);
        t.files = files;
        t.bytes = bytes;
        if let Err(e) = restored {
            // A server that started but did not finish recovery must not be left running.
            if std::fs::symlink_metadata(target.join("postmaster.pid")).is_ok() {
                let _ = recovery::stop(&target, meta);
            }
            r.problems.push(format!(
                "restoring and starting base backup {}: {}",
                p.snapshot_id.short(),
                super::error_chain(&e)
            ));
            r.restore = Some(t);
            return Ok(());
        }
        let server_meta = p.snapshot.postgres.clone().unwrap_or_else(|| meta.clone());
        let server = RunningServer {
            dir: &target,
            meta: &server_meta,
            stopped: false,
        };
        interrupted(stop)?;
        // Every relation and index of every database, with the checker the server ships.
        let a0 = Instant::now();
        let amcheck = recovery::find_pg_bin(meta, "pg_amcheck");
        let (mut cmd, passfile) = amcheck_command(
            &amcheck,
            port,
            &user,
            password.as_ref().map(|p| p.as_str()),
            &dir.dir,
        )?;
        match cmd.output() {
            Ok(o) if o.status.success() => t.amcheck_ok = Some(true),
            Ok(o) => {
                t.amcheck_ok = Some(false);
                r.problems.push(format!(
                    "pg_amcheck found problems: {}{}",
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .take(10)
                        .collect::<Vec<_>>()
                        .join("; "),
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            Err(e) => {
                t.amcheck_ok = Some(false);
                r.problems
                    .push(format!("running {}: {e}", amcheck.display()));
            }
        }
        drop(passfile);
        t.amcheck_secs = Some(a0.elapsed().as_secs_f64());
        interrupted(stop)?;
        if let Some(v) = spec {
            t.sql_checks = run_sql_checks(
                &Target {
                    host: "127.0.0.1",
                    port,
                    user: &user,
                    password: password.as_ref().map(|p| p.as_str()),
                    database: &database,
                },
                &v.sql_checks,
            );
            for c in t.sql_checks.iter().filter(|c| !c.ok) {
                r.problems.push(format!(
                    "SQL check failed in {}: {}: {}",
                    c.database,
                    c.query,
                    c.why.as_deref().unwrap_or("?")
                ));
            }
        }
        if let Err(e) = server.stop() {
            r.problems
                .push(format!("stopping the restored server: {e}"));
        }
    } else if snap.influxdb.is_some() {
        t.snapshot = id.to_hex();
        interrupted(stop)?;
        influx_restore_test(repo, &id, &snap, spec, &dir.dir, &mut t, r)?;
    } else {
        t.snapshot = id.to_hex();
        let args = super::restore_cmd::RestoreArgs::for_test(
            Some(id.to_hex()),
            target.clone(),
            None,
            vec![],
        );
        let restored = super::restore_cmd::restore(&quiet, args);
        t.restore_secs = started.elapsed().as_secs_f64();
        let (files, bytes) = tree_size(&target);
        t.files = files;
        t.bytes = bytes;
        match restored {
            Err(e) => r.problems.push(format!(
                "restoring snapshot {}: {}",
                id.short(),
                super::error_chain(&e)
            )),
            Ok(_) if bytes != snap.summary.bytes_total => r.problems.push(format!(
                "snapshot {} restored {bytes} bytes, but it holds {}",
                id.short(),
                snap.summary.bytes_total
            )),
            Ok(_) => {}
        }
    }
    if t.restore_secs == 0.0 {
        t.restore_secs = started.elapsed().as_secs_f64();
    }
    r.restore = Some(t);
    Ok(())
}

/// An InfluxDB restore test: a throwaway `influxd` in the scratch directory, the snapshot
/// restored into it (which compares the counts with those recorded at backup), then the
/// policy's measurements and InfluxQL checks.
fn influx_restore_test(
    repo: &crate::repo::Repository,
    id: &crate::pipeline::BlobId,
    snap: &crate::repo::Snapshot,
    spec: Option<&VerifySpec>,
    dir: &Path,
    t: &mut RestoreTest,
    r: &mut Report,
) -> Result<()> {
    use crate::restore::influx::{restore_influx, InfluxRestore};
    use crate::source::influx::throwaway::Throwaway;
    let binary = spec
        .and_then(|v| v.influxd.clone())
        .unwrap_or_else(|| PathBuf::from("influxd"));
    let started = Instant::now();
    let (http, rpc) = loop {
        let (h, p) = (free_port()?, free_port()?);
        if h != p {
            break (h, p);
        }
    };
    let server = Throwaway::start(&binary, &dir.join("influxd"), http, rpc)?;
    t.server_secs = Some(started.elapsed().as_secs_f64());
    let index = repo.load_index()?;
    let mut say = |_line: String| {};
    let restored = restore_influx(
        repo,
        &index,
        id,
        snap,
        InfluxRestore {
            rpc: server.rpc.clone(),
            http: server.http.clone(),
            databases: vec![],
            rename: Default::default(),
            dry_run: false,
            say: &mut say,
        },
    );
    t.restore_secs = started.elapsed().as_secs_f64();
    let report = match restored {
        Ok(rep) => rep,
        Err(e) => {
            r.problems.push(format!(
                "restoring InfluxDB snapshot {} into a throwaway influxd: {}",
                id.short(),
                super::error_chain(&anyhow::Error::new(e))
            ));
            return Ok(());
        }
    };
    t.files = report.databases.iter().map(|d| d.files).sum();
    t.bytes = report.databases.iter().map(|d| d.bytes).sum();
    let mut found = std::collections::BTreeMap::new();
    for d in &report.databases {
        found.insert(d.to.clone(), server.http.measurements(&d.to)?);
    }
    for m in spec.map(|v| &v.measurements[..]).unwrap_or_default() {
        if !found.values().any(|ms| ms.contains(m)) {
            r.problems.push(format!(
                "measurement {m} (the policy's [verify] measurements) is not in the restored copy"
            ));
        }
    }
    t.measurements = Some(found);
    for c in spec.map(|v| &v.influxql_checks[..]).unwrap_or_default() {
        let database = c.database.clone().unwrap_or_default();
        let value = server.http.query(Some(&database), &c.query).map(|series| {
            // The first value of the first row that is not its time.
            series.first().and_then(|s| {
                let row = s.values.first()?;
                let col = s.columns.iter().position(|c| c != "time").unwrap_or(0);
                row.get(col).map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
            })
        });
        let (value, outcome) = match value {
            Ok(v) => {
                let o = crate::postgres::checks::evaluate(&c.expect, v.as_deref());
                (v, o)
            }
            Err(e) => (None, Err(e.to_string())),
        };
        if let Err(why) = &outcome {
            r.problems.push(format!(
                "InfluxQL check failed in {database}: {}: {why}",
                c.query
            ));
        }
        t.influxql_checks.push(SqlCheckResult {
            database,
            query: c.query.clone(),
            value,
            ok: outcome.is_ok(),
            why: outcome.err(),
        });
    }
    drop(server);
    Ok(())
}

fn verify_one(g: &GlobalArgs, a: &VerifyArgs, pol: Option<&Policy>, stop: &CancelToken) -> Report {
    let mut r = Report {
        policy: pol.map(|p| p.name.clone()),
        ..Report::default()
    };
    let spec = pol.and_then(|p| p.verify.as_ref());
    let g = match pol {
        Some(p) => g.for_policy(p),
        None => g.clone(),
    };
    let fraction = match &a.read_data_subset {
        Some(s) => match policy::units::parse_percent(s) {
            Ok(f) => Some(f),
            Err(e) => {
                r.problems.push(format!("--read-data-subset {s:?}: {e}"));
                return r;
            }
        },
        None => spec.and_then(|v| v.read_data_subset),
    };
    let read = if a.read_data {
        ReadData::All
    } else if let Some(f) = fraction {
        ReadData::monthly_subset(f)
    } else {
        ReadData::None
    };
    let repo = match g.open() {
        Ok(repo) => repo,
        Err(e) => {
            r.problems.push(super::error_chain(&e));
            return r;
        }
    };
    let t0 = Instant::now();
    let c = check_with(&repo, read);
    r.check_secs = t0.elapsed().as_secs_f64();
    r.snapshots = c.snapshots;
    r.packs_read = c.packs_read;
    r.affected = c.affected;
    r.problems.extend(c.errors);
    if a.restore_test || spec.is_some_and(|v| v.restore_test) {
        let base = a.scratch.clone().unwrap_or_else(std::env::temp_dir);
        let setup = TestSetup {
            scratch: &base,
            owner: a
                .pg_owner
                .clone()
                .or_else(|| spec.and_then(|v| v.cluster_owner.clone())),
            preload: a
                .shared_preload_libraries
                .clone()
                .or_else(|| spec.and_then(|v| v.shared_preload_libraries.clone()))
                .unwrap_or_default(),
        };
        if let Err(e) = restore_test(&g, &repo, pol, spec, &setup, &mut r, stop) {
            r.problems
                .push(format!("restore test: {}", super::error_chain(&e)));
        }
    }
    r.ok = r.problems.is_empty();
    r
}

/// Runs `verify`.
///
/// # Errors
/// An invalid policy; a failed verification is exit code 1 with the report.
pub fn run(g: &GlobalArgs, a: VerifyArgs) -> Result<i32> {
    // An interrupt ends the restore test at its next phase, which stops the restored
    // server and removes the scratch copy (a second one exits at once).
    let stop = &super::interrupt_token()?;
    let reports: Vec<Report> = if a.all_policies {
        let all = policy::load_dir(&g.policies)?;
        let with: Vec<&Policy> = all.iter().filter(|p| p.verify.is_some()).collect();
        if with.is_empty() {
            bail!(
                "no policy in {} has a [verify] section",
                g.policies.display()
            );
        }
        with.into_iter()
            .map(|p| verify_one(g, &a, Some(p), stop))
            .collect()
    } else if let Some(name) = &a.policy {
        let p = policy::find(&g.policies, name)?;
        vec![verify_one(g, &a, Some(&p), stop)]
    } else {
        vec![verify_one(g, &a, None, stop)]
    };
    let failed = reports.iter().filter(|r| !r.ok).count();
    if g.json {
        if reports.len() == 1 {
            println!("{}", serde_json::to_value(&reports[0])?);
        } else {
            println!("{}", json!({ "reports": reports, "failed": failed }));
        }
    } else if !g.quiet {
        for r in &reports {
            let who = r
                .policy
                .as_deref()
                .map(|p| format!("policy {p}"))
                .unwrap_or_else(|| "repository".into());
            println!(
                "{who}: {} snapshots checked, {} packs read back in {:.2} s",
                r.snapshots, r.packs_read, r.check_secs
            );
            if let Some(t) = &r.restore {
                println!(
                    "  restore test of {} ({}): {} files, {} bytes in {:.2} s{}{}",
                    &t.snapshot[..8.min(t.snapshot.len())],
                    t.source,
                    t.files,
                    t.bytes,
                    t.restore_secs,
                    t.amcheck_ok
                        .map(|ok| format!("; pg_amcheck {}", if ok { "clean" } else { "FAILED" }))
                        .unwrap_or_default(),
                    if t.sql_checks.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; SQL checks {}/{} passed",
                            t.sql_checks.iter().filter(|c| c.ok).count(),
                            t.sql_checks.len()
                        )
                    }
                );
            }
            for p in &r.problems {
                println!("  problem: {p}");
            }
            for f in &r.affected {
                println!("  affected: {f}");
            }
            println!("  {}", if r.ok { "OK" } else { "FAILED" });
        }
    }
    if failed == 0 {
        Ok(EXIT_OK)
    } else {
        Err(ExitWith {
            code: EXIT_FATAL,
            message: format!(
                "verification failed for {failed} of {} target(s)",
                reports.len()
            ),
        }
        .into())
    }
}

/// `pg_amcheck` of every database of the restored server on 127.0.0.1:`port`, without the
/// secret variables in its environment; the policy's password, if any, in a private
/// `PGPASSFILE` in `scratch` that is removed when the returned file is dropped.
fn amcheck_command(
    amcheck: &Path,
    port: u16,
    user: &str,
    password: Option<&str>,
    scratch: &Path,
) -> Result<(
    std::process::Command,
    Option<crate::postgres::conn::TempPassFile>,
)> {
    let mut cmd = std::process::Command::new(amcheck);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        user,
        "--all",
        "--install-missing",
        "--no-password",
    ])
    .stdin(std::process::Stdio::null())
    .env(
        "PGOPTIONS",
        crate::postgres::checks::RESTORED_SESSION_OPTIONS,
    );
    crate::secret_env::scrub(&mut cmd);
    let passfile = match password {
        Some(pw) => {
            let f =
                crate::postgres::conn::TempPassFile::create(scratch, "127.0.0.1", port, user, pw)?;
            cmd.env("PGPASSFILE", f.path());
            Some(f)
        }
        None => None,
    };
    Ok((cmd, passfile))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(cmd: &std::process::Command, var: &str) -> Option<Option<PathBuf>> {
        cmd.get_envs()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| v.map(PathBuf::from))
    }

    #[test]
    fn pg_amcheck_gets_the_password_in_a_private_file_not_its_environment() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cmd, file) = amcheck_command(
            Path::new("pg_amcheck"),
            5999,
            "app",
            Some("amcheck-secret"),
            dir.path(),
        )
        .unwrap();
        // Removed, not set: backupd's own PGPASSWORD does not reach it either.
        assert_eq!(env_of(&cmd, "PGPASSWORD"), Some(None));
        let pf = env_of(&cmd, "PGPASSFILE")
            .flatten()
            .expect("PGPASSFILE is set");
        let mode = std::fs::metadata(&pf).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(&pf).unwrap(),
            "127.0.0.1:5999:*:app:amcheck-secret\n"
        );
        drop(file);
        assert!(!pf.exists(), "the password file is removed afterwards");

        let (cmd, file) =
            amcheck_command(Path::new("pg_amcheck"), 5999, "app", None, dir.path()).unwrap();
        assert!(file.is_none());
        assert_eq!(env_of(&cmd, "PGPASSWORD"), Some(None));
        assert_eq!(env_of(&cmd, "PGPASSFILE"), None);
    }
}
