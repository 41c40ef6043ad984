//! Backup policies: one TOML file per policy in `/etc/backupd/policies/`, read into a
//! validated [`Policy`] (see `docs/policies.md` for every key). Reading collects every
//! problem in every file at once, each naming the file, line, key, what was expected and
//! what was found; the rest of the program only ever sees a valid [`Policy`].

pub mod hooks;
pub mod parse;
pub mod retention;
pub mod schedule;
pub mod units;
pub mod walk;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::backend::S3Credentials;
pub use retention::KeepRules;
pub use schedule::CronSchedule;
pub use walk::Problem;

/// Where a secret comes from. Policies never hold secrets themselves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    /// The first line of a file (no bit of 0o027 in its mode: 0600 or 0640 at most).
    File(PathBuf),
    /// The first line a shell command prints.
    Command(String),
    /// An environment variable of the agent.
    Env(String),
    /// An entry of the OS keyring (Secret Service), service `backupd`.
    Keyring(String),
}

/// The repository a policy writes to.
#[derive(Clone, Debug)]
pub struct RepositorySpec {
    /// A directory or an `s3:` location.
    pub location: String,
    /// The repository password.
    pub password: SecretSource,
    /// Cache directory for remote repositories.
    pub cache_dir: Option<PathBuf>,
    /// S3 credentials.
    pub s3_credentials: S3Credentials,
    /// S3 region override.
    pub s3_region: Option<String>,
    /// Storage class of new S3 objects.
    pub s3_storage_class: Option<String>,
}

/// What a policy backs up.
#[derive(Clone, Debug)]
pub enum SourceSpec {
    /// Files and directories.
    Files {
        /// Absolute paths.
        paths: Vec<PathBuf>,
        /// Exclude globs.
        exclude: Vec<String>,
        /// `one_file_system`, `exclude_caches`, `exclude_nodump`, `exclude_if_present`.
        options: crate::source::files::WalkOptions,
    },
    /// A PostgreSQL base backup (WAL archived by `archive_command`).
    Postgres(PostgresSpec),
    /// InfluxDB 1.x databases.
    Influxdb(InfluxSpec),
    /// The stdout of a command.
    Command {
        /// argv (a string in the file runs through `sh -c`).
        argv: Vec<String>,
        /// The file name it is stored under.
        filename: String,
    },
}

impl SourceSpec {
    /// `files`, `postgres`, `influxdb` or `command`.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceSpec::Files { .. } => "files",
            SourceSpec::Postgres(_) => "postgres",
            SourceSpec::Influxdb(_) => "influxdb",
            SourceSpec::Command { .. } => "command",
        }
    }
}

/// A PostgreSQL source.
#[derive(Clone, Debug)]
pub struct PostgresSpec {
    /// The data directory on this host.
    pub data_directory: PathBuf,
    /// Host or socket directory.
    pub host: Option<String>,
    /// Port.
    pub port: Option<u16>,
    /// User.
    pub user: Option<String>,
    /// Database to connect to.
    pub database: Option<String>,
    /// The user's password, if the server asks for one.
    pub password: Option<SecretSource>,
    /// Ask for an immediate checkpoint (default) rather than a spread one.
    pub fast_checkpoint: bool,
    /// How long a base backup waits for its WAL to be archived (`wal_wait`; the old key
    /// `archive_timeout` still works, with a warning).
    pub wal_wait: Duration,
    /// The recovery point objective (`rpo`, default 5 min): the server's
    /// `archive_timeout` must not be 0 or above it.
    pub rpo: Duration,
    /// Stream WAL over a replication slot (`wal_stream`, run by the agent as
    /// `backupd wal-stream --policy NAME`).
    pub wal_stream: bool,
    /// The slot's name (`wal_stream_slot`; default from the policy's name,
    /// [`PostgresSpec::slot_name`]).
    pub wal_stream_slot: Option<String>,
    /// How often the streamer asks the server for its end of WAL
    /// (`wal_stream_status_every`, default 1 s).
    pub wal_stream_status_every: Duration,
}

impl PostgresSpec {
    /// The user's password from the policy's secret source, if it names one.
    ///
    /// # Errors
    /// The source cannot be read (named in the message).
    pub fn read_password(&self) -> anyhow::Result<Option<zeroize::Zeroizing<String>>> {
        use anyhow::Context;
        self.password
            .as_ref()
            .map(crate::secret_source::read_secret)
            .transpose()
            .context("the policy's PostgreSQL password")
    }

    /// The replication slot of policy `policy`: `wal_stream_slot`, else `backupd_` and the
    /// policy's name with what a slot name cannot hold as `_`.
    pub fn slot_name(&self, policy: &str) -> String {
        self.wal_stream_slot.clone().unwrap_or_else(|| {
            let mut s: String = format!("backupd_{policy}")
                .chars()
                .map(|c| {
                    let c = c.to_ascii_lowercase();
                    if c.is_ascii_lowercase() || c.is_ascii_digit() {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            s.truncate(63);
            s
        })
    }

    /// Its connection settings (unset ones fall back to PG* variables and defaults).
    pub fn conn_settings(&self) -> crate::postgres::conn::ConnSettings {
        crate::postgres::conn::ConnSettings {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            database: self.database.clone(),
        }
    }
}

/// An InfluxDB 1.x source.
#[derive(Clone, Debug)]
pub struct InfluxSpec {
    /// The backup/restore RPC address (`influxd`'s bind-address, default 127.0.0.1:8088).
    pub host: String,
    /// The databases (`databases`, or the one of `database`); all but `_internal` when
    /// empty.
    pub databases: Vec<String>,
    /// The HTTP API (counts, restore tests; default http://127.0.0.1:8086).
    pub http: String,
    /// The HTTP API's user, if it asks for one.
    pub username: Option<String>,
    /// That user's password.
    pub password: Option<SecretSource>,
}

/// When a policy runs.
#[derive(Clone, Debug)]
pub struct ScheduleSpec {
    /// The cron schedule and its zone.
    pub cron: CronSchedule,
    /// A random delay of at most this much before each run.
    pub jitter: Duration,
    /// Run once at start when a scheduled run was missed while the agent was down.
    pub catch_up: bool,
    /// Extra attempts after a failed run.
    pub retries: u32,
    /// Delay before the first retry; doubled for each further one.
    pub retry_backoff: Duration,
    /// A run still going after this long is stopped (no snapshot).
    pub timeout: Option<Duration>,
}

/// Retention.
#[derive(Clone, Debug)]
pub struct RetentionSpec {
    /// The keep-* rules.
    pub keep: KeepRules,
    /// Run prune after forget.
    pub prune: bool,
}

/// One SQL check of a restore test.
#[derive(Clone, Debug)]
pub struct SqlCheck {
    /// The database to run it in (default: the source's).
    pub database: Option<String>,
    /// The query; its first column of its first row is checked.
    pub query: String,
    /// What the value must be.
    pub expect: SqlExpect,
}

/// What a SQL check's value must be.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlExpect {
    /// `true` (a boolean query).
    True,
    /// At least this number.
    AtLeast(i64),
    /// Exactly this text.
    Equals(String),
}

/// Scheduled verification.
#[derive(Clone, Debug)]
pub struct VerifySpec {
    /// When to verify.
    pub cron: Option<CronSchedule>,
    /// Read back this fraction of the packs.
    pub read_data_subset: Option<f64>,
    /// Restore the newest snapshot and check it.
    pub restore_test: bool,
    /// SQL checks run against a restored PostgreSQL snapshot.
    pub sql_checks: Vec<SqlCheck>,
    /// InfluxDB: measurements that must exist in the restored copy.
    pub measurements: Vec<String>,
    /// InfluxDB: InfluxQL checks run against the restored copy.
    pub influxql_checks: Vec<SqlCheck>,
    /// InfluxDB: the `influxd` a restore test starts (default: from `PATH`).
    pub influxd: Option<PathBuf>,
    /// PostgreSQL: the `shared_preload_libraries` the restored server starts with (none
    /// unless given: the snapshot's configuration does not choose the code verify runs).
    pub shared_preload_libraries: Option<String>,
    /// PostgreSQL: the OS user that owns and runs the restored cluster (`postgres`).
    pub cluster_owner: Option<String>,
}

/// Hooks run around a backup (each through `sh -c`).
#[derive(Clone, Debug, Default)]
pub struct Hooks {
    /// Before the backup; a failing one fails the run.
    pub pre: Vec<String>,
    /// After a successful backup.
    pub post: Vec<String>,
    /// After a failed one.
    pub on_failure: Vec<String>,
    /// Each hook is killed after this long.
    pub timeout: Duration,
}

/// Resource limits.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// Upload KiB/s.
    pub upload_kib: Option<u64>,
    /// Download KiB/s.
    pub download_kib: Option<u64>,
    /// S3 requests in flight.
    pub s3_connections: Option<u64>,
}

/// A validated policy.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Its name (the file name without `.toml` unless set).
    pub name: String,
    /// The file it came from.
    pub file: PathBuf,
    /// Free text.
    pub description: Option<String>,
    /// Tags added to every snapshot.
    pub tags: Vec<String>,
    /// Host name recorded in snapshots (default: this host).
    pub host: Option<String>,
    /// Where to.
    pub repository: RepositorySpec,
    /// What.
    pub source: SourceSpec,
    /// When (none: by hand only).
    pub schedule: Option<ScheduleSpec>,
    /// How long to keep.
    pub retention: Option<RetentionSpec>,
    /// How to verify.
    pub verify: Option<VerifySpec>,
    /// Hooks.
    pub hooks: Hooks,
    /// Limits.
    pub limits: Limits,
    /// Key rotation (`[keys]`).
    pub keys: Option<KeysSpec>,
    /// What is accepted but should change (deprecated keys), as `FILE:LINE: ...`.
    pub warnings: Vec<String>,
}

/// `[keys]`: the repository's key generations.
#[derive(Clone, Debug)]
pub struct KeysSpec {
    /// The agent runs `key rotate` (after a good backup) once the newest generation is
    /// this old; one rotation per repository however many policies share it.
    pub rotate_every: Option<Duration>,
}

/// Problems found in one file.
#[derive(Clone, Debug)]
pub struct FileProblems {
    /// The file.
    pub file: PathBuf,
    /// Its problems.
    pub problems: Vec<Problem>,
}

/// Errors of loading policies.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The directory cannot be listed.
    #[error("cannot read the policy directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// One or more files are invalid.
    #[error("{}", render(.0))]
    Invalid(Vec<FileProblems>),
    /// No policy by that name.
    #[error("no policy named {name:?} in {dir} (policies there: {known})")]
    NotFound {
        /// The name asked for.
        name: String,
        /// The directory.
        dir: PathBuf,
        /// The names found.
        known: String,
    },
}

/// Formats problems one per line: `FILE:LINE: KEY: expected X, found Y`.
pub fn render(files: &[FileProblems]) -> String {
    let mut out = vec![];
    for f in files {
        for p in &f.problems {
            out.push(format!(
                "{}:{}: {}: expected {}, found {}",
                f.file.display(),
                p.line,
                p.key,
                p.expected,
                p.found
            ));
        }
    }
    out.join("\n")
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.name, self.source.kind())?;
        if let Some(s) = &self.schedule {
            write!(f, ", \"{}\" {}", s.cron.expr(), s.cron.tz())?;
        } else {
            write!(f, ", by hand")?;
        }
        write!(f, ")")
    }
}

/// Reads every `*.toml` file of `dir` (not subdirectories), in name order.
///
/// # Errors
/// `Dir` when the directory cannot be read; `Invalid` with every problem of every file.
pub fn load_dir(dir: &Path) -> Result<Vec<Policy>, PolicyError> {
    load_files(&policy_files(dir)?)
}

/// The `*.toml` files directly in `dir`, in name order.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io = |source| PolicyError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut files = vec![];
    for e in std::fs::read_dir(dir).map_err(io)? {
        let p = e.map_err(io)?.path();
        if p.extension().is_some_and(|x| x == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Every file read: the valid policies, and the problems of the others (file order).
fn read_all(files: &[PathBuf]) -> (Vec<Policy>, Vec<FileProblems>) {
    let mut policies = vec![];
    let mut bad = vec![];
    for f in files {
        match parse::read_file(f) {
            Ok(p) => policies.push(p),
            Err(problems) => bad.push(FileProblems {
                file: f.clone(),
                problems,
            }),
        }
    }
    (policies, bad)
}

/// The problem of a policy whose name another file already has.
fn duplicate_name(p: &Policy, other: &Policy) -> FileProblems {
    FileProblems {
        file: p.file.clone(),
        problems: vec![Problem {
            line: 1,
            key: "name".into(),
            expected: "a name no other policy has".into(),
            found: format!("{:?}, also the name of {}", p.name, other.file.display()),
        }],
    }
}

/// Reads the given policy files; duplicate names are problems too.
///
/// # Errors
/// `Invalid` with every problem of every file.
pub fn load_files(files: &[PathBuf]) -> Result<Vec<Policy>, PolicyError> {
    let (all, mut bad) = read_all(files);
    let mut policies: Vec<Policy> = vec![];
    for p in all {
        match policies.iter().find(|o| o.name == p.name) {
            Some(other) => bad.push(duplicate_name(&p, other)),
            None => policies.push(p),
        }
    }
    if bad.is_empty() {
        Ok(policies)
    } else {
        bad.sort_by(|a, b| a.file.cmp(&b.file));
        Err(PolicyError::Invalid(bad))
    }
}

/// The policy called `name` in `dir`. Problems in other files do not stop it (a job of
/// the agent must not fail because someone is editing another policy); problems in a file
/// that may be it (its file name, or no valid file has the name) do.
///
/// # Errors
/// `Dir`, `Invalid` or `NotFound`.
pub fn find(dir: &Path, name: &str) -> Result<Policy, PolicyError> {
    let (all, bad) = read_all(&policy_files(dir)?);
    let (mut found, others): (Vec<Policy>, Vec<Policy>) =
        all.into_iter().partition(|p| p.name == name);
    let known: Vec<String> = others.into_iter().map(|p| p.name).collect();
    match found.len() {
        1 => {
            let own = dir.join(format!("{name}.toml"));
            // Its own file broken while another claims the name: refuse, do not guess.
            if let Some(b) = bad.into_iter().find(|b| b.file == own) {
                return Err(PolicyError::Invalid(vec![b]));
            }
            Ok(found.remove(0))
        }
        0 if !bad.is_empty() => Err(PolicyError::Invalid(bad)),
        0 => Err(PolicyError::NotFound {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        }),
        _ => Err(PolicyError::Invalid(
            found[1..]
                .iter()
                .map(|p| duplicate_name(p, &found[0]))
                .collect(),
        )),
    }
}
