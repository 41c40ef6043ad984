//! Turning a restored data directory into a cluster that recovers: `backup_label`,
//! tablespace links, a real `pg_wal` (or one elsewhere with `--waldir`), `recovery.signal`
//! and the recovery settings (in `postgresql.auto.conf`, replacing any left from an
//! earlier restore), then optionally starting the server and waiting until it has
//! promoted.
//!
//! Everything here writes into a directory the cluster's owner controls and may have
//! filled with symlinks (or that a crafted snapshot restored as symlinks), and runs as
//! root: every write, chown and removal is relative to the data directory's descriptor,
//! one name at a time, replacing a symlink rather than following it ([`crate::dirfd`]).
//! The server is started as the cluster's owner, never as root, with the settings that run
//! commands or load code (`archive_command`, `restore_command`, `shared_preload_libraries`,
//! ...) given on its command line, which outranks any `postgresql.conf` in the snapshot.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rustix::fs::FileType;

use super::PgError;
use crate::dirfd;
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
    /// Put the WAL directory here (`pg_wal` becomes a symlink to it), as `initdb --waldir`.
    pub waldir: Option<PathBuf>,
    /// `recovery_end_command` (removing the temporary secret files when recovery ends).
    pub recovery_end_command: Option<String>,
    /// A `--delta` restore over an older copy: what `waldir` holds is replaced.
    pub delta: bool,
}

/// The owner of a restored cluster (of its `PG_VERSION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterOwner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

fn io_at(p: &Path) -> impl Fn(std::io::Error) -> PgError + '_ {
    move |source| PgError::Io {
        path: p.display().to_string(),
        source,
    }
}

fn io_in<'a>(dir: &'a Path, name: &'a str) -> impl Fn(std::io::Error) -> PgError + 'a {
    move |source| PgError::Io {
        path: dir.join(name).display().to_string(),
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

/// A postgresql.conf string literal: `'` doubled and `\` escaped, since the server's
/// configuration parser reads backslash escapes inside quotes.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', r"\\").replace('\'', "''"))
}

/// Why a value cannot go into a command PostgreSQL runs: control characters (a newline
/// would end the setting in `postgresql.auto.conf`).
///
/// # Errors
/// A message naming what holds the character.
pub fn check_command_value(what: &str, v: &str) -> Result<(), PgError> {
    if let Some(c) = v.chars().find(|c| c.is_control()) {
        return Err(PgError::Unsupported(format!(
            "{what} {v:?} holds the control character {c:?}, which cannot go into a PostgreSQL command setting"
        )));
    }
    Ok(())
}

/// Escapes `%` as `%%` for `restore_command` / `archive_command` / `recovery_end_command`,
/// where PostgreSQL replaces `%f`, `%p`, `%r` and `%%`.
pub fn percent_escape(s: &str) -> String {
    s.replace('%', "%%")
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

/// The directories whose contents a base backup leaves out; in a restored cluster each
/// must be a real, empty directory (`pg_basebackup` writes them so even when the source
/// holds a symlink).
pub const EMPTIED_DIRS: [&str; 8] = [
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
    "pg_stat_tmp",
];

/// What [`prepare`] noticed and did not refuse.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    /// Things the user should know (a symlink replaced, ...).
    pub warnings: Vec<String>,
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Checks the open directory holds a restored cluster: its `PG_VERSION` is a regular file.
fn check_cluster(root: &OwnedFd, dir: &Path) -> Result<(), PgError> {
    match dirfd::lstat_at(root, OsStr::new("PG_VERSION")).map_err(io_in(dir, "PG_VERSION"))? {
        Some(st) if dirfd::file_type(&st) == FileType::RegularFile => Ok(()),
        Some(st) => Err(PgError::Server(format!(
            "{}: a {}, not a regular file: not a restored data directory",
            dir.join("PG_VERSION").display(),
            dirfd::kind_word(dirfd::file_type(&st))
        ))),
        None => Err(PgError::Server(format!(
            "{}: missing: not a restored data directory",
            dir.join("PG_VERSION").display()
        ))),
    }
}

/// The OS user a restored cluster belongs to and runs as: `name` (as root; never root
/// itself), or this process's own user (not root: nothing else is possible). Decided on
/// the restoring host, never by the snapshot, whose recorded owner a forger chooses.
///
/// # Errors
/// No such user, root, or another user asked for without being root.
pub fn cluster_owner(name: Option<&str>) -> Result<ClusterOwner, PgError> {
    use nix::unistd::{getegid, geteuid, User};
    if !is_root() {
        let me = ClusterOwner {
            uid: geteuid().as_raw(),
            gid: getegid().as_raw(),
        };
        if let Some(n) = name {
            let u = User::from_name(n).ok().flatten();
            if u.as_ref().map(|u| u.uid.as_raw()) != Some(me.uid) {
                return Err(PgError::Unsupported(format!(
                    "--pg-owner {n}: only root can restore a cluster for another user"
                )));
            }
        }
        return Ok(me);
    }
    let n = name.unwrap_or("postgres");
    let u = User::from_name(n).ok().flatten().ok_or_else(|| {
        PgError::Unsupported(format!(
            "no user {n:?} on this host to own and run the restored cluster; give --pg-owner USER"
        ))
    })?;
    if u.uid.is_root() {
        return Err(PgError::Unsupported(format!(
            "--pg-owner {n}: a PostgreSQL cluster never belongs to root"
        )));
    }
    Ok(ClusterOwner {
        uid: u.uid.as_raw(),
        gid: u.gid.as_raw(),
    })
}

/// Makes `name` in `parent` a real directory (replacing a symlink or file) owned by
/// `owner`, and returns it open.
fn real_dir(
    parent: &OwnedFd,
    name: &str,
    own: Option<(u32, u32)>,
    shown: &Path,
    warnings: &mut Vec<String>,
) -> Result<OwnedFd, PgError> {
    if let Some(st) = dirfd::lstat_at(parent, OsStr::new(name)).map_err(io_in(shown, name))? {
        if dirfd::file_type(&st) != FileType::Directory {
            warnings.push(format!(
                "{} was a {}; replaced by an empty directory",
                shown.join(name).display(),
                dirfd::kind_word(dirfd::file_type(&st))
            ));
        }
    }
    let (fd, _) =
        dirfd::ensure_dir(parent, OsStr::new(name), 0o700, true).map_err(io_in(shown, name))?;
    if let Some((uid, gid)) = own {
        dirfd::set_owner(&fd, uid, gid).map_err(io_in(shown, name))?;
    }
    Ok(fd)
}

/// Writes `backup_label` (and `tablespace_map` links), a real `pg_wal` with
/// `archive_status` (or one in `settings.waldir`), real empty directories where a base
/// backup leaves them empty, `recovery.signal`, the recovery settings, and `secrets` (each
/// mode 0600, owned by the cluster's owner); gives the directory PostgreSQL's required mode
/// and, when run as root, the owner of its files. Nothing is written through a symlink.
///
/// # Errors
/// I/O failures, a directory that is not a restored cluster, a non-empty `--waldir`.
pub fn prepare(
    dir: &Path,
    meta: &PostgresMeta,
    tablespaces: &[(u32, PathBuf)],
    settings: &RecoverySettings,
    secrets: &[(&str, &[u8])],
    owner: ClusterOwner,
) -> Result<Prepared, PgError> {
    let root = dirfd::open_dir_path(dir).map_err(io_at(dir))?;
    check_cluster(&root, dir)?;
    let own = is_root().then_some((owner.uid, owner.gid));
    let mut warnings = vec![];
    let write = |name: &str, data: &[u8]| -> Result<(), PgError> {
        dirfd::write_replace(&root, OsStr::new(name), data, 0o600, own).map_err(io_in(dir, name))
    };
    write("backup_label", meta.backup_label.as_bytes())?;
    // The links in pg_tblspc point where the tablespaces were restored; any other entry
    // there (a tablespace the backup did not record) would lead the server elsewhere.
    {
        let ts = real_dir(&root, "pg_tblspc", own, dir, &mut warnings)?;
        let ts_path = dir.join("pg_tblspc");
        for (name, _) in dirfd::list(&ts).map_err(io_at(&ts_path))? {
            let known = std::str::from_utf8(&name)
                .ok()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|oid| tablespaces.iter().any(|(o, _)| *o == oid));
            if !known {
                return Err(PgError::Unsupported(format!(
                    "{}/{} is not a tablespace this base backup recorded (one created while it ran?): refusing to start a cluster that would use it; take a new base backup",
                    ts_path.display(),
                    String::from_utf8_lossy(&name)
                )));
            }
        }
        for (oid, loc) in tablespaces {
            // The location itself is not in the snapshot (its tree is what is inside):
            // PostgreSQL wants it as CREATE TABLESPACE leaves it, the cluster's, mode 0700.
            let loc_fd = dirfd::open_dir_path(loc).map_err(io_at(loc))?;
            dirfd::set_mode(&loc_fd, 0o700).map_err(io_at(loc))?;
            if let Some((uid, gid)) = own {
                dirfd::set_owner(&loc_fd, uid, gid).map_err(io_at(loc))?;
            }
            let name = oid.to_string();
            let n = OsStr::new(&name);
            dirfd::remove_entry(&ts, n).map_err(io_in(&ts_path, &name))?;
            dirfd::symlink_at(loc.as_os_str().as_encoded_bytes(), &ts, n)
                .map_err(io_in(&ts_path, &name))?;
            if let Some((uid, gid)) = own {
                dirfd::set_link_owner(&ts, n, uid, gid).map_err(io_in(&ts_path, &name))?;
            }
        }
    }
    for name in EMPTIED_DIRS.iter().filter(|n| **n != "pg_wal") {
        real_dir(&root, name, own, dir, &mut warnings)?;
    }
    match &settings.waldir {
        None => {
            let wal = real_dir(&root, "pg_wal", own, dir, &mut warnings)?;
            real_dir(
                &wal,
                "archive_status",
                own,
                &dir.join("pg_wal"),
                &mut warnings,
            )?;
        }
        Some(waldir) => {
            let wal = open_waldir(waldir, own, settings.delta)?;
            real_dir(&wal, "archive_status", own, waldir, &mut warnings)?;
            dirfd::remove_entry(&root, OsStr::new("pg_wal")).map_err(io_in(dir, "pg_wal"))?;
            dirfd::symlink_at(
                waldir.as_os_str().as_encoded_bytes(),
                &root,
                OsStr::new("pg_wal"),
            )
            .map_err(io_in(dir, "pg_wal"))?;
            if let Some((uid, gid)) = own {
                dirfd::set_link_owner(&root, OsStr::new("pg_wal"), uid, gid)
                    .map_err(io_in(dir, "pg_wal"))?;
            }
        }
    }
    for stale in ["standby.signal", "postmaster.pid", "tablespace_map"] {
        dirfd::remove_entry(&root, OsStr::new(stale)).map_err(io_in(dir, stale))?;
    }
    write("recovery.signal", b"")?;

    let auto = "postgresql.auto.conf";
    let old = match dirfd::read_file(&root, OsStr::new(auto), 16 * 1024 * 1024) {
        Ok(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        Ok(None) => String::new(),
        Err(e) => {
            warnings.push(format!(
                "{}: {e}; replaced by a file holding only the recovery settings",
                dir.join(auto).display()
            ));
            String::new()
        }
    };
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
    for (key, value) in recovery_lines(settings) {
        text.push_str(&format!("{key} = {}\n", conf_quote(&value)));
    }
    if settings.archive_off {
        text.push_str("archive_mode = off\n");
    }
    if let Some(p) = settings.port {
        text.push_str(&format!("port = {p}\n"));
    }
    write(auto, text.as_bytes())?;
    let names: Vec<String> = secrets.iter().map(|(n, _)| n.to_string()).collect();
    let guard = SecretFiles {
        root: &root,
        names: &names,
    };
    for (name, data) in secrets {
        write(name, data)?;
    }
    dirfd::set_mode(&root, 0o700).map_err(io_at(dir))?;
    if let Some((uid, gid)) = own {
        dirfd::set_owner(&root, uid, gid).map_err(io_at(dir))?;
    }
    // Written and in place: they stay for recovery.
    std::mem::forget(guard);
    Ok(Prepared { warnings })
}

/// The recovery settings proper, as (key, value).
fn recovery_lines(settings: &RecoverySettings) -> Vec<(&'static str, String)> {
    let mut v = vec![("restore_command", settings.restore_command.clone())];
    if let Some(c) = &settings.recovery_end_command {
        v.push(("recovery_end_command", c.clone()));
    }
    match settings.stop_at {
        StopAt::Time(t) => v.push((
            "recovery_target_time",
            t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string(),
        )),
        StopAt::Consistent => v.push(("recovery_target", "immediate".into())),
        StopAt::Latest => {}
    }
    v.push(("recovery_target_timeline", "latest".into()));
    v.push(("recovery_target_action", "promote".into()));
    v
}

/// Opens (making it if missing) the `--waldir` directory, which must be empty (with
/// `delta`, it is emptied: it held an older copy's WAL), and gives it to the cluster's
/// owner with mode 0700.
fn open_waldir(waldir: &Path, own: Option<(u32, u32)>, delta: bool) -> Result<OwnedFd, PgError> {
    if !waldir.is_absolute() {
        return Err(PgError::Unsupported(format!(
            "--waldir {}: give an absolute path",
            waldir.display()
        )));
    }
    if let Some(parent) = waldir.parent() {
        std::fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    let parent = waldir.parent().unwrap_or(Path::new("/"));
    let pfd = dirfd::open_dir_path(parent).map_err(io_at(parent))?;
    let name = waldir.file_name().ok_or_else(|| {
        PgError::Unsupported(format!(
            "--waldir {}: not a directory name",
            waldir.display()
        ))
    })?;
    let (fd, _) = dirfd::ensure_dir(&pfd, name, 0o700, false).map_err(io_at(waldir))?;
    let entries = dirfd::list(&fd).map_err(io_at(waldir))?;
    if delta {
        for (n, _) in &entries {
            dirfd::remove_entry(&fd, OsStr::from_bytes(n)).map_err(io_at(waldir))?;
        }
    } else if entries.iter().any(|(n, _)| n != b"archive_status") {
        return Err(PgError::Unsupported(format!(
            "--waldir {} is not empty; give an empty or new directory",
            waldir.display()
        )));
    }
    dirfd::set_mode(&fd, 0o700).map_err(io_at(waldir))?;
    if let Some((uid, gid)) = own {
        dirfd::set_owner(&fd, uid, gid).map_err(io_at(waldir))?;
    }
    Ok(fd)
}

/// The `shared_preload_libraries` the restored cluster's own configuration sets (the
/// last non-empty setting in `postgresql.conf`, then `postgresql.auto.conf`), read without
/// following links; for telling the user what a started copy leaves out.
pub fn configured_preload(dir: &Path) -> Option<String> {
    let root = dirfd::open_dir_path(dir).ok()?;
    let mut found = None;
    for file in ["postgresql.conf", "postgresql.auto.conf"] {
        let Ok(Some(b)) = dirfd::read_file(&root, OsStr::new(file), 16 * 1024 * 1024) else {
            continue;
        };
        for line in String::from_utf8_lossy(&b).lines() {
            let line = strip_comment(line).trim();
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            if k.trim() == "shared_preload_libraries" {
                let v = v.trim().trim_matches('\'').to_string();
                found = (!v.is_empty()).then_some(v);
            }
        }
    }
    found
}

/// A configuration line without its comment (a `#` outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// Settings given to a server backupd starts on its command line (`-c name=value`), which
/// outrank `postgresql.conf` and `postgresql.auto.conf`: whatever a snapshot's
/// configuration says, the server runs no command and loads no library backupd did not
/// choose, and works on this data directory.
#[derive(Clone, Debug, Default)]
pub struct ServerSettings {
    /// (name, value) pairs.
    pub settings: Vec<(&'static str, String)>,
    /// Files in the data directory removed once the server has promoted (secrets).
    pub remove_after_promotion: Vec<String>,
    /// After promotion, rewrite `postmaster.opts` without these settings, so a later
    /// `pg_ctl restart` starts the server from its configuration files (a restored
    /// production server), not with backupd's overrides for good.
    pub forget_on_restart: bool,
}

impl ServerSettings {
    /// The settings for a server started on `dir` after [`prepare`] with `settings`:
    /// `archive_command` is `archive_command` when archiving stays on (else archiving is
    /// off); `listen_local` keeps it to 127.0.0.1 (a restore test).
    pub fn for_recovery(
        dir: &Path,
        settings: &RecoverySettings,
        archive_command: Option<&str>,
        shared_preload_libraries: &str,
        listen_local: bool,
        server_version_num: u32,
    ) -> Self {
        let mut v: Vec<(&'static str, String)> = vec![
            ("data_directory", dir.display().to_string()),
            (
                "archive_mode",
                if settings.archive_off || archive_command.is_none() {
                    "off"
                } else {
                    "on"
                }
                .into(),
            ),
            ("archive_command", archive_command.unwrap_or("").to_string()),
            ("archive_cleanup_command", String::new()),
            ("recovery_end_command", String::new()),
            (
                "shared_preload_libraries",
                shared_preload_libraries.to_string(),
            ),
            ("local_preload_libraries", String::new()),
            ("session_preload_libraries", String::new()),
            ("dynamic_library_path", "$libdir".into()),
            ("jit_provider", "llvmjit".into()),
            ("ssl_passphrase_command", String::new()),
            ("primary_conninfo", String::new()),
            ("primary_slot_name", String::new()),
            ("recovery_target", String::new()),
            ("recovery_target_name", String::new()),
            ("recovery_target_time", String::new()),
            ("recovery_target_xid", String::new()),
            ("recovery_target_lsn", String::new()),
            ("recovery_target_inclusive", "on".into()),
        ];
        if server_version_num >= 150000 {
            v.push(("archive_library", String::new()));
        }
        // Ours win over the blanks above.
        for (k, val) in recovery_lines(settings) {
            v.retain(|(n, _)| *n != k);
            v.push((k, val));
        }
        if let Some(p) = settings.port {
            v.push(("port", p.to_string()));
        }
        if listen_local {
            // TCP on loopback only, and no Unix socket in a directory the snapshot names.
            v.push(("listen_addresses", "127.0.0.1".into()));
            v.push(("unix_socket_directories", String::new()));
            // The log goes where pg_ctl sends it, not to a directory the snapshot names.
            v.push(("logging_collector", "off".into()));
        }
        ServerSettings {
            settings: v,
            remove_after_promotion: vec![],
            forget_on_restart: false,
        }
    }

    /// The `pg_ctl -o` string: `-c 'name=value'` each, quoted for the shell pg_ctl runs
    /// the server with.
    fn pg_ctl_options(&self) -> String {
        self.settings
            .iter()
            .map(|(k, v)| format!("-c {}", shell_quote(&format!("{k}={v}"))))
            .collect::<Vec<_>>()
            .join(" ")
    }
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

/// The file a restored cluster's `restore_command` reads the repository password from
/// when the password came from the environment or a prompt (base backups leave it out).
pub const RECOVERY_PASSWORD_FILE: &str = "backupd-recovery.password";
/// Likewise for S3 keys that came from `AWS_SECRET_ACCESS_KEY`.
pub const RECOVERY_S3_FILE: &str = "backupd-recovery.s3-credentials";

/// The server log `restore --start` and restore tests write, in the data directory.
pub const RECOVERY_LOG: &str = "backupd-recovery.log";

/// `pg_ctl -D dir`, run as the owner of `dir` — never as root: a root-owned data directory
/// is refused — with the secret variables kept out of its (and the server's) environment.
fn pg_ctl(dir: &Path, root: &OwnedFd, major: u32) -> Result<(Command, PathBuf), PgError> {
    let pg_ctl = find_pg_bin_of(major, "pg_ctl");
    let st = dirfd::fstat(root).map_err(io_at(dir))?;
    if st.st_uid == 0 {
        return Err(PgError::Server(format!(
            "{} is owned by root; a PostgreSQL server never runs as root (chown it to the cluster's owner)",
            dir.display()
        )));
    }
    let mut cmd = if is_root() {
        let uid = st.st_uid;
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .ok_or_else(|| {
                PgError::Server(format!("no user with uid {uid} to run the server as"))
            })?;
        let mut c = Command::new("runuser");
        c.arg("-u").arg(user.name).arg("--").arg(&pg_ctl);
        c
    } else {
        Command::new(&pg_ctl)
    };
    crate::secret_env::scrub(&mut cmd);
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
    let root = dirfd::open_dir_path(dir).map_err(io_at(dir))?;
    let v = dirfd::read_file(&root, OsStr::new("PG_VERSION"), 64)
        .map_err(io_in(dir, "PG_VERSION"))?
        .unwrap_or_default();
    let v = String::from_utf8_lossy(&v);
    let major = v
        .trim()
        .parse()
        .map_err(|_| PgError::Server(format!("{}: PG_VERSION {v:?}", dir.display())))?;
    stop_major(dir, major)
}

fn stop_major(dir: &Path, major: u32) -> Result<(), PgError> {
    let root = dirfd::open_dir_path(dir).map_err(io_at(dir))?;
    let (mut cmd, pg_ctl) = pg_ctl(dir, &root, major)?;
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

/// Makes the server log anew: a new regular file owned by the cluster's owner (an old
/// one, or whatever a link or hard link at its name leads to, is not opened).
fn make_log(root: &OwnedFd, dir: &Path) -> Result<(), PgError> {
    let name = OsStr::new(RECOVERY_LOG);
    dirfd::remove_entry(root, name).map_err(io_in(dir, RECOVERY_LOG))?;
    let f = dirfd::create_file(root, name, 0o600).map_err(io_in(dir, RECOVERY_LOG))?;
    if is_root() {
        let st = dirfd::fstat(root).map_err(io_at(dir))?;
        dirfd::set_owner(&f, st.st_uid, st.st_gid).map_err(io_in(dir, RECOVERY_LOG))?;
    }
    Ok(())
}

/// Starts the server on `dir` as the directory's owner (PostgreSQL refuses root, and so
/// does backupd) with `server`'s settings on its command line, and waits until recovery
/// has ended and it has promoted; then removes what `server` lists (secrets) and the
/// segments fetched ahead.
///
/// # Errors
/// The server fails to start or stops during recovery; the message has the end of its
/// log.
pub fn start_and_wait(
    dir: &Path,
    meta: &PostgresMeta,
    server: &ServerSettings,
    waldir: Option<&Path>,
) -> Result<Reached, PgError> {
    let root = dirfd::open_dir_path(dir).map_err(io_at(dir))?;
    // However this ends, the temporary secrets do not outlive it.
    let secrets = SecretFiles {
        root: &root,
        names: &server.remove_after_promotion,
    };
    make_log(&root, dir)?;
    let log = dir.join(RECOVERY_LOG);
    let (mut cmd, pg_ctl) = pg_ctl(dir, &root, meta.server_version_num / 10000)?;
    cmd.arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(server.pg_ctl_options())
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
            log_tail(&root)
        )));
    }
    // Promoted once pg_control says "in production" again, as `pg_ctl promote -w`
    // decides (postmaster.pid says "ready" already in hot standby, and recovery.signal
    // goes before the end-of-recovery checkpoint).
    loop {
        if control_state(&root) == Some(DB_IN_PRODUCTION) {
            break;
        }
        if !matches!(
            dirfd::lstat_at(&root, OsStr::new("postmaster.pid")),
            Ok(Some(_))
        ) {
            return Err(PgError::Server(format!(
                "the server stopped during recovery; server log {}:\n{}",
                log.display(),
                log_tail(&root)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(secrets);
    if server.forget_on_restart {
        forget_options(&root, dir)?;
    }
    // Segments fetched ahead that recovery did not need.
    let wal = match waldir {
        Some(w) => dirfd::open_dir_path(w),
        None => dirfd::open_subdir(&root, OsStr::new("pg_wal")),
    };
    if let Ok(wal) = wal {
        let _ = dirfd::remove_entry(&wal, OsStr::new("backupd-prefetch"));
    }
    let text = read_log(&root);
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

/// Removes the temporary secret files of a recovery when dropped.
struct SecretFiles<'a> {
    root: &'a OwnedFd,
    names: &'a [String],
}

impl Drop for SecretFiles<'_> {
    fn drop(&mut self) {
        for name in self.names {
            if let Err(e) = dirfd::remove_entry(self.root, OsStr::new(name)) {
                tracing::warn!("removing the temporary secret file {name}: {e}");
            }
        }
    }
}

/// Rewrites `postmaster.opts` (what `pg_ctl restart` starts the server with) to the
/// server program and the data directory only.
fn forget_options(root: &OwnedFd, dir: &Path) -> Result<(), PgError> {
    let name = OsStr::new("postmaster.opts");
    let Some(text) =
        dirfd::read_file(root, name, 1 << 20).map_err(io_in(dir, "postmaster.opts"))?
    else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&text);
    let program = text.split(" \"").next().unwrap_or("").trim();
    if program.is_empty() {
        return Ok(());
    }
    let st = dirfd::fstat(root).map_err(io_at(dir))?;
    let own = is_root().then_some((st.st_uid, st.st_gid));
    let opts = format!("{program} \"-D\" \"{}\"\n", dir.display());
    dirfd::write_replace(root, name, opts.as_bytes(), 0o600, own)
        .map_err(io_in(dir, "postmaster.opts"))
}

/// `DBState::DB_IN_PRODUCTION` in pg_control.
const DB_IN_PRODUCTION: u32 = 6;

/// The cluster state in pg_control (after the system identifier and two versions).
fn control_state(root: &OwnedFd) -> Option<u32> {
    let global = dirfd::open_subdir(root, OsStr::new("global")).ok()?;
    let b = dirfd::read_file(&global, OsStr::new("pg_control"), 64 * 1024).ok()??;
    Some(u32::from_le_bytes(b.get(16..20)?.try_into().ok()?))
}

/// The server log, read without following a link (it could point at any file root can
/// read, and the log goes into reports).
fn read_log(root: &OwnedFd) -> String {
    dirfd::read_file(root, OsStr::new(RECOVERY_LOG), 256 * 1024 * 1024)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn log_tail(root: &OwnedFd) -> String {
    let text = read_log(root);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::walname::Lsn;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn meta() -> PostgresMeta {
        PostgresMeta {
            system_identifier: 1,
            timeline: 1,
            start_lsn: Lsn(0),
            stop_lsn: Lsn(0),
            start_time: Utc::now(),
            stop_time: Utc::now(),
            server_version: "15.0".into(),
            server_version_num: 150000,
            wal_segment_size: 16 << 20,
            label: "l".into(),
            data_directory: "/nowhere".into(),
            backup_label: "START WAL LOCATION: 0/0\n".into(),
            tablespace_map: String::new(),
            tablespaces: vec![],
        }
    }

    fn me() -> ClusterOwner {
        ClusterOwner {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        }
    }

    fn settings() -> RecoverySettings {
        RecoverySettings {
            stop_at: StopAt::Latest,
            restore_command: "backupd wal-fetch %f %p".into(),
            archive_off: true,
            port: Some(5999),
            waldir: None,
            recovery_end_command: None,
            delta: false,
        }
    }

    #[test]
    fn links_planted_in_a_restored_cluster_are_replaced_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(outside.join("wal")).unwrap();
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        let victims = ["label", "signal", "auto", "pid", "log"];
        for v in victims {
            std::fs::write(outside.join(v), format!("{v} stays\n")).unwrap();
            std::fs::set_permissions(outside.join(v), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        symlink(outside.join("label"), data.join("backup_label")).unwrap();
        symlink(outside.join("signal"), data.join("recovery.signal")).unwrap();
        symlink(outside.join("auto"), data.join("postgresql.auto.conf")).unwrap();
        symlink(outside.join("pid"), data.join("postmaster.pid")).unwrap();
        symlink(outside.join("wal"), data.join("pg_wal")).unwrap();
        symlink(outside.join("wal"), data.join("pg_replslot")).unwrap();
        let secret = [("backupd-recovery.password", &b"pw\n"[..])];
        let p = prepare(&data, &meta(), &[], &settings(), &secret, me()).unwrap();
        for v in victims {
            let m = std::fs::metadata(outside.join(v)).unwrap();
            assert_eq!(
                std::fs::read_to_string(outside.join(v)).unwrap(),
                format!("{v} stays\n")
            );
            assert_eq!(m.permissions().mode() & 0o777, 0o644, "{v}");
        }
        assert_eq!(std::fs::read_dir(outside.join("wal")).unwrap().count(), 0);
        for f in [
            "backup_label",
            "recovery.signal",
            "postgresql.auto.conf",
            "backupd-recovery.password",
        ] {
            let m = std::fs::symlink_metadata(data.join(f)).unwrap();
            assert!(m.is_file(), "{f} is a regular file");
            assert_eq!(m.mode() & 0o777, 0o600, "{f}");
        }
        assert!(std::fs::symlink_metadata(data.join("postmaster.pid")).is_err());
        for d in [
            "pg_wal",
            "pg_wal/archive_status",
            "pg_replslot",
            "pg_notify",
        ] {
            assert!(
                std::fs::symlink_metadata(data.join(d)).unwrap().is_dir(),
                "{d}"
            );
        }
        let auto = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
        assert!(
            auto.contains("restore_command = 'backupd wal-fetch %f %p'"),
            "{auto}"
        );
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("postgresql.auto.conf")),
            "{:?}",
            p.warnings
        );
        // A log planted as a link: the server log is made anew, the target left alone.
        std::fs::remove_file(data.join("PG_VERSION")).unwrap();
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        symlink(outside.join("log"), data.join(RECOVERY_LOG)).unwrap();
        let root = dirfd::open_dir_path(&data).unwrap();
        make_log(&root, &data).unwrap();
        assert!(std::fs::symlink_metadata(data.join(RECOVERY_LOG))
            .unwrap()
            .is_file());
        assert_eq!(
            std::fs::read_to_string(outside.join("log")).unwrap(),
            "log stays\n"
        );
    }

    #[test]
    fn a_pg_tblspc_entry_the_backup_did_not_record_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("pg_tblspc")).unwrap();
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        symlink("/srv/production/ts", data.join("pg_tblspc/16999")).unwrap();
        let e = prepare(&data, &meta(), &[], &settings(), &[], me()).unwrap_err();
        assert!(e.to_string().contains("pg_tblspc/16999"), "{e}");
    }

    #[test]
    fn the_cluster_owner_is_never_root_nor_chosen_by_the_snapshot() {
        if rustix::process::geteuid().is_root() {
            assert!(cluster_owner(Some("root")).is_err());
            assert!(cluster_owner(Some("no-such-user-backupd")).is_err());
            let pg = cluster_owner(Some("postgres")).unwrap();
            assert_ne!(pg.uid, 0);
            assert_eq!(cluster_owner(None).unwrap(), pg);
        } else {
            assert_eq!(cluster_owner(None).unwrap(), me());
            assert!(cluster_owner(Some("root")).is_err());
        }
    }

    #[test]
    fn waldir_must_be_empty_and_becomes_the_link_target() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        std::fs::create_dir_all(data.join("pg_wal")).unwrap();
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        let wal = t.path().join("wal");
        std::fs::create_dir_all(&wal).unwrap();
        std::fs::write(wal.join("000000010000000000000001"), b"x").unwrap();
        let mut s = settings();
        s.waldir = Some(wal.clone());
        let e = prepare(&data, &meta(), &[], &s, &[], me()).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        let wal = t.path().join("new/wal");
        s.waldir = Some(wal.clone());
        prepare(&data, &meta(), &[], &s, &[], me()).unwrap();
        assert_eq!(std::fs::read_link(data.join("pg_wal")).unwrap(), wal);
        assert!(wal.join("archive_status").is_dir());
        assert_eq!(std::fs::metadata(&wal).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn server_command_line_overrides_what_runs_commands_or_loads_code() {
        let mut s = settings();
        s.stop_at = StopAt::Consistent;
        let srv = ServerSettings::for_recovery(Path::new("/d"), &s, None, "", true, 150000);
        let get = |k: &str| {
            srv.settings
                .iter()
                .filter(|(n, _)| *n == k)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("archive_mode"), ["off"]);
        assert_eq!(get("archive_command"), [""]);
        assert_eq!(get("archive_library"), [""]);
        assert_eq!(get("shared_preload_libraries"), [""]);
        assert_eq!(get("recovery_end_command"), [""]);
        assert_eq!(get("data_directory"), ["/d"]);
        assert_eq!(get("restore_command"), ["backupd wal-fetch %f %p"]);
        assert_eq!(get("recovery_target"), ["immediate"]);
        assert_eq!(get("listen_addresses"), ["127.0.0.1"]);
        assert_eq!(get("logging_collector"), ["off"]);
        let old = ServerSettings::for_recovery(Path::new("/d"), &s, None, "", false, 140000);
        assert!(!old.settings.iter().any(|(k, _)| *k == "archive_library"));
        assert!(!old.settings.iter().any(|(k, _)| *k == "listen_addresses"));
        let opts = srv.pg_ctl_options();
        assert!(
            opts.contains("-c 'restore_command=backupd wal-fetch %f %p'"),
            "{opts}"
        );
    }

    #[test]
    fn command_values_are_percent_escaped_and_control_characters_refused() {
        assert_eq!(percent_escape("/srv/100%p"), "/srv/100%%p");
        assert!(check_command_value("x", "/srv/a\nb").is_err());
        assert!(check_command_value("x", "/srv/ok dir").is_ok());
        assert_eq!(conf_quote(r"a\b'c"), r"'a\\b''c'");
    }
}
