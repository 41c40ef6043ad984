//! Turning a restored data directory into a cluster that recovers: `backup_label`,
//! tablespace links, `recovery.signal` and the recovery settings (in
//! `postgresql.auto.conf`, replacing any left from an earlier restore), then optionally
//! starting the server and waiting until it has promoted.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::PgError;
use crate::repo::PostgresMeta;

/// Where recovery stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopAt {
    /// `recovery_target_time`.
    Time(DateTime<Utc>),
    /// Replay everything archived.
    Latest,
    /// Stop as soon as the backup is consistent.
    Consistent,
}

/// Recovery settings to write.
#[derive(Clone, Debug)]
pub struct RecoverySettings {
    /// Where to stop.
    pub stop_at: StopAt,
    /// The shell command for `restore_command`.
    pub restore_command: String,
    /// Write `archive_mode = off` (a copy that must not archive into the repository).
    pub archive_off: bool,
    /// Write `port = N`.
    pub port: Option<u16>,
}

fn io_err(p: &Path) -> impl Fn(std::io::Error) -> PgError + '_ {
    move |source| PgError::Io {
        path: p.display().to_string(),
        source,
    }
}

/// Single-quotes a word for `sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=,+@%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A postgresql.conf string literal.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

const MARK: &str = "# recovery settings written by backupd restore";
const RECOVERY_KEYS: [&str; 12] = [
    "restore_command",
    "recovery_end_command",
    "archive_cleanup_command",
    "recovery_target",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
    "recovery_target_inclusive",
    "recovery_target_timeline",
    "recovery_target_action",
    "primary_conninfo",
];

/// Writes `backup_label` (and `tablespace_map` links), `recovery.signal`, the recovery
/// settings, `pg_wal/archive_status`, and gives the directory PostgreSQL's required
/// mode and, when run as root, the owner of its files.
///
/// # Errors
/// I/O failures.
pub fn prepare(
    dir: &Path,
    meta: &PostgresMeta,
    tablespaces: &[(u32, PathBuf)],
    settings: &RecoverySettings,
) -> Result<(), PgError> {
    let owner = fs::metadata(dir.join("PG_VERSION")).map_err(io_err(&dir.join("PG_VERSION")))?;
    let chown = |p: &Path| -> Result<(), PgError> {
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::lchown(p, Some(owner.uid()), Some(owner.gid()))
                .map_err(io_err(p))?;
        }
        Ok(())
    };
    let write = |name: &str, text: &str| -> Result<(), PgError> {
        let p = dir.join(name);
        fs::write(&p, text).map_err(io_err(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).map_err(io_err(&p))?;
        chown(&p)
    };
    write("backup_label", &meta.backup_label)?;
    // The links in pg_tblspc point where the tablespaces were restored.
    for (oid, loc) in tablespaces {
        let link = dir.join("pg_tblspc").join(oid.to_string());
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(loc, &link).map_err(io_err(&link))?;
        chown(&link)?;
    }
    let status = dir.join("pg_wal/archive_status");
    fs::create_dir_all(&status).map_err(io_err(&status))?;
    chown(&dir.join("pg_wal"))?;
    chown(&status)?;
    for stale in ["standby.signal", "postmaster.pid", "tablespace_map"] {
        let _ = fs::remove_file(dir.join(stale));
    }
    write("recovery.signal", "")?;

    let auto = dir.join("postgresql.auto.conf");
    let old = fs::read_to_string(&auto).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            !l.starts_with(MARK) && !RECOVERY_KEYS.contains(&key)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!(
        "{MARK} at {}\n",
        Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
    ));
    text.push_str(&format!(
        "restore_command = {}\n",
        conf_quote(&settings.restore_command)
    ));
    match settings.stop_at {
        StopAt::Time(t) => {
            text.push_str(&format!(
                "recovery_target_time = '{}'\n",
                t.format("%Y-%m-%d %H:%M:%S%.6f+00")
            ));
        }
        StopAt::Consistent => text.push_str("recovery_target = 'immediate'\n"),
        StopAt::Latest => {}
    }
    text.push_str("recovery_target_timeline = 'latest'\n");
    text.push_str("recovery_target_action = 'promote'\n");
    if settings.archive_off {
        text.push_str("archive_mode = off\n");
    }
    if let Some(p) = settings.port {
        text.push_str(&format!("port = {p}\n"));
    }
    write("postgresql.auto.conf", &text)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    chown(dir)?;
    Ok(())
}

/// Where the restored server ended up.
#[derive(Clone, Debug, Default)]
pub struct Reached {
    /// `last completed transaction was at log time ...`: the time reached.
    pub last_completed: Option<String>,
    /// `recovery stopping before commit of transaction N, time T`.
    pub stopped: Option<String>,
    /// `redo done at X/Y`.
    pub redo_done_at: Option<String>,
    /// `selected new timeline ID: N`.
    pub timeline: Option<u32>,
    /// How long start to promotion took.
    pub seconds: f64,
    /// The server log.
    pub log: PathBuf,
}

/// A PostgreSQL program of the snapshot's major version (Debian's versioned directory),
/// else the one on PATH.
pub fn find_pg_bin(meta: &PostgresMeta, name: &str) -> PathBuf {
    find_pg_bin_of(meta.server_version_num / 10000, name)
}

/// As [`find_pg_bin`], for a major version.
pub fn find_pg_bin_of(major: u32, name: &str) -> PathBuf {
    let versioned = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/{name}"));
    if versioned.exists() {
        return versioned;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `pg_ctl -D dir`, run as the owner of `dir` when we are root (PostgreSQL refuses root).
fn pg_ctl(dir: &Path, major: u32, log: Option<&Path>) -> Result<(Command, PathBuf), PgError> {
    let pg_ctl = find_pg_bin_of(major, "pg_ctl");
    let mut cmd = if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::MetadataExt;
        let uid = fs::metadata(dir).map_err(io_err(dir))?.uid();
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .ok_or_else(|| {
                PgError::Server(format!("no user with uid {uid} to run the server as"))
            })?;
        if let Some(log) = log {
            let _ = OpenOptions::new().create(true).append(true).open(log);
            let _ = std::os::unix::fs::chown(log, Some(uid), None);
        }
        let mut c = Command::new("runuser");
        c.arg("-u").arg(user.name).arg("--").arg(&pg_ctl);
        c
    } else {
        Command::new(&pg_ctl)
    };
    cmd.arg("-D").arg(dir);
    Ok((cmd, pg_ctl))
}

/// Stops a server started by [`start_and_wait`] (fast shutdown) and waits for it.
///
/// # Errors
/// pg_ctl fails.
pub fn stop(dir: &Path, meta: &PostgresMeta) -> Result<(), PgError> {
    stop_major(dir, meta.server_version_num / 10000)
}

/// Stops the server running on `dir`, its version read from the directory's PG_VERSION
/// (for a copy whose snapshot is not at hand, e.g. left by a killed restore test).
///
/// # Errors
/// No PG_VERSION, or pg_ctl fails.
pub fn stop_dir(dir: &Path) -> Result<(), PgError> {
    let v = fs::read_to_string(dir.join("PG_VERSION")).map_err(io_err(dir))?;
    let major = v
        .trim()
        .parse()
        .map_err(|_| PgError::Server(format!("{}: PG_VERSION {v:?}", dir.display())))?;
    stop_major(dir, major)
}

fn stop_major(dir: &Path, major: u32) -> Result<(), PgError> {
    let (mut cmd, pg_ctl) = pg_ctl(dir, major, None)?;
    let status = cmd
        .args(["-m", "fast", "-w", "-t", "300", "stop"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| PgError::Server(format!("running {}: {e}", pg_ctl.display())))?;
    if !status.success() {
        return Err(PgError::Server(format!(
            "{} stop failed ({status})",
            pg_ctl.display()
        )));
    }
    Ok(())
}

/// Starts the server on `dir` (as the owner of the directory when run as root, since
/// PostgreSQL refuses root) and waits until recovery has ended and it has promoted.
///
/// # Errors
/// The server fails to start or stops during recovery; the message has the end of its
/// log.
pub fn start_and_wait(dir: &Path, meta: &PostgresMeta) -> Result<Reached, PgError> {
    let log = dir.join("backupd-recovery.log");
    let (mut cmd, pg_ctl) = pg_ctl(dir, meta.server_version_num / 10000, Some(&log))?;
    cmd.arg("-l")
        .arg(&log)
        // Wait until it accepts connections (hot standby, or done): by then the startup
        // process has replaced the backup's "in production" state in pg_control.
        .args(["-w", "-t", "86400", "start"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| PgError::Server(format!("running {}: {e}", pg_ctl.display())))?;
    if !status.success() {
        return Err(PgError::Server(format!(
            "{} start failed ({status}); server log {}:\n{}",
            pg_ctl.display(),
            log.display(),
            log_tail(&log)
        )));
    }
    let pid_file = dir.join("postmaster.pid");
    let control = dir.join("global/pg_control");
    // Promoted once pg_control says "in production" again, as `pg_ctl promote -w`
    // decides (postmaster.pid says "ready" already in hot standby, and recovery.signal
    // goes before the end-of-recovery checkpoint).
    loop {
        if control_state(&control) == Some(DB_IN_PRODUCTION) {
            break;
        }
        if !pid_file.exists() {
            return Err(PgError::Server(format!(
                "the server stopped during recovery; server log {}:\n{}",
                log.display(),
                log_tail(&log)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Segments fetched ahead that recovery did not need.
    let _ = fs::remove_dir_all(dir.join("pg_wal/backupd-prefetch"));
    let text = fs::read_to_string(&log).unwrap_or_default();
    let mut r = Reached {
        seconds: started.elapsed().as_secs_f64(),
        log: log.clone(),
        ..Reached::default()
    };
    for line in text.lines() {
        const LAST: &str = "last completed transaction was at log time ";
        if let Some(i) = line.find("recovery stopping") {
            r.stopped = Some(line[i..].to_string());
        } else if let Some(i) = line.find(LAST) {
            r.last_completed = Some(line[i + LAST.len()..].trim().to_string());
        } else if let Some(i) = line.find("redo done at ") {
            let rest = &line[i + "redo done at ".len()..];
            r.redo_done_at = rest.split_whitespace().next().map(str::to_string);
        } else if let Some(i) = line.find("selected new timeline ID: ") {
            r.timeline = line[i + "selected new timeline ID: ".len()..]
                .trim()
                .parse()
                .ok();
        }
    }
    Ok(r)
}

/// `DBState::DB_IN_PRODUCTION` in pg_control.
const DB_IN_PRODUCTION: u32 = 6;

/// The cluster state in pg_control (after the system identifier and two versions).
fn control_state(control: &Path) -> Option<u32> {
    let b = fs::read(control).ok()?;
    Some(u32::from_le_bytes(b.get(16..20)?.try_into().ok()?))
}

fn log_tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
