//! Command-line interface: clap definitions and one handler per verb. Handlers use
//! `anyhow` and return errors; [`main`] prints them with their causes and maps them to
//! exit codes.

mod agent_cmd;
mod backup_cmd;
mod forget_cmd;
mod inspect;
mod keys;
pub mod password;
pub mod pg_cmd;
mod policy_cmd;
mod progress;
mod prune_cmd;
mod restore_cmd;
mod stream_cmd;
mod unlock_cmd;
mod verify_cmd;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::backend::layers::{
    MetricsLayer, RequestCounters, RetryLayer, RetryPolicy, ThrottleLayer,
};
use crate::backend::{Backend, LocalBackend, S3Backend, S3Location, S3Options};
use crate::error::{exit_code, EXIT_OK};
use crate::repo::keyhint::KeyHints;
use crate::repo::Repository;

/// backupd — encrypted, deduplicated backups of databases, files and command output.
#[derive(Parser, Debug)]
#[command(name = "backupd", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Verb,
}

/// Options every verb takes.
#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Repository location: a local directory, `s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX]`, or
    /// `s3:BUCKET[/PREFIX]` on AWS. S3 credentials and region come from the AWS chain
    /// (AWS_* variables, shared profile, web identity, instance metadata); BACKUPD_S3_ENDPOINT,
    /// BACKUPD_S3_PATH_STYLE, BACKUPD_S3_STORAGE_CLASS and BACKUPD_S3_REGION override.
    #[arg(short = 'r', long = "repo", env = "BACKUPD_REPOSITORY", global = true)]
    repo: Option<String>,
    /// Upload bandwidth limit in KiB/s.
    #[arg(long, value_name = "KIB_PER_SEC", env = "BACKUPD_LIMIT_UPLOAD", global = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    limit_upload: Option<u64>,
    /// Download bandwidth limit in KiB/s.
    #[arg(long, value_name = "KIB_PER_SEC", env = "BACKUPD_LIMIT_DOWNLOAD", global = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    limit_download: Option<u64>,
    /// S3 requests in flight at most (objects, parts, list pages).
    #[arg(long, value_name = "N", env = "BACKUPD_S3_CONNECTIONS", global = true,
          default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=256))]
    s3_connections: u64,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Print only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// No progress bars.
    #[arg(long, global = true)]
    no_progress: bool,
    /// Where to cache snapshots, index files and tree packs of remote repositories
    /// (default: $XDG_CACHE_HOME/backupd or ~/.cache/backupd). Given for a local
    /// repository, caches it too.
    #[arg(long, value_name = "DIR", env = "BACKUPD_CACHE_DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// Use no local cache.
    #[arg(long, env = "BACKUPD_NO_CACHE", global = true)]
    no_cache: bool,
    /// The policy directory (`policy check`, `--policy`, `agent`).
    #[arg(
        long = "policies",
        value_name = "DIR",
        env = "BACKUPD_POLICIES",
        global = true,
        default_value = "/etc/backupd/policies"
    )]
    policies: PathBuf,
    /// Requests made to the repository by this command (reported in summaries).
    #[arg(skip)]
    requests: Arc<RequestCounters>,
    /// The repository password's source when a policy names it.
    #[arg(skip)]
    secret: Option<crate::policy::SecretSource>,
    /// S3 settings a policy gives.
    #[arg(skip)]
    s3_policy: Option<PolicyS3>,
}

/// The S3 settings of a policy's repository.
#[derive(Clone, Debug)]
struct PolicyS3 {
    credentials: crate::backend::S3Credentials,
    region: Option<String>,
    storage_class: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Create a repository.
    Init(InitArgs),
    /// Back up files, stdin or a command's output.
    Backup(backup_cmd::BackupArgs),
    /// List snapshots.
    Snapshots(inspect::SnapshotsArgs),
    /// List files in a snapshot.
    Ls(inspect::LsArgs),
    /// Restore a snapshot into a directory.
    Restore(restore_cmd::RestoreArgs),
    /// Write one file of a snapshot (e.g. a stdin backup) to stdout.
    Dump(restore_cmd::DumpArgs),
    /// Print a decrypted repository object as JSON (debugging).
    Cat(inspect::CatArgs),
    /// Manage passwords (key files).
    Key(keys::KeyArgs),
    /// Repository statistics.
    Stats,
    /// Check the repository's structure (and data with --read-data).
    Check(inspect::CheckArgs),
    /// Archive a PostgreSQL WAL file (archive_command = 'backupd wal-push %p').
    WalPush(pg_cmd::WalPushArgs),
    /// Fetch an archived WAL file (restore_command = 'backupd wal-fetch %f %p').
    WalFetch(pg_cmd::WalFetchArgs),
    /// Stream a PostgreSQL server's WAL over a replication slot into the repository.
    WalStream(stream_cmd::WalStreamArgs),
    /// Remove stale locks (--remove-all: every lock).
    Unlock(unlock_cmd::UnlockArgs),
    /// Check policy files.
    Policy(policy_cmd::PolicyArgs),
    /// Remove snapshots by retention rules (restic's keep-* options) or by id.
    Forget(forget_cmd::ForgetArgs),
    /// Delete data no snapshot needs (two-phase; safe while other hosts back up).
    Prune(prune_cmd::PruneCmdArgs),
    /// Run the policies on their schedules (the resident agent).
    Agent(agent_cmd::AgentArgs),
    /// Prove backups restore: structure, packs read back, and restore tests.
    Verify(verify_cmd::VerifyArgs),
    /// Make a format-1 repository format 2 (upgrade every backupd that uses it first).
    Upgrade(UpgradeArgs),
}

/// Arguments of `upgrade`.
#[derive(Args, Debug)]
struct UpgradeArgs {
    /// Say what would change, change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Arguments of `init`.
#[derive(Args, Debug)]
struct InitArgs {
    /// zstd level for new data, 0 (store raw) to 19. Level 1 was both faster and smaller
    /// than 3 on the benchmark corpus (docs/decisions/0005-compression-level.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=19))]
    compression: i32,
    /// With the password in the OS keyring (BACKUPD_PASSWORD_KEYRING), no recovery code:
    /// by default one is made and printed once, since a password only one host's keyring
    /// holds dies with the host.
    #[arg(long)]
    no_recovery_code: bool,
}

pub use crate::host::{current_username, hostname};

impl GlobalArgs {
    fn location(&self) -> Result<String> {
        self.repo
            .clone()
            .context("no repository given: use --repo DIR or set BACKUPD_REPOSITORY")
    }

    /// The store itself, without layers.
    fn store(&self) -> Result<Box<dyn Backend>> {
        let loc = self.location()?;
        if S3Location::is_s3(&loc) {
            let location = S3Location::parse(&loc)?;
            let mut opts = S3Options {
                // At most 256 (the argument's range).
                connections: self.s3_connections as usize,
                ..S3Options::default()
            }
            .with_env(|k| std::env::var(k).ok())?;
            if let Some(p) = &self.s3_policy {
                opts.credentials = p.credentials.clone();
                if p.region.is_some() {
                    opts.region = p.region.clone();
                }
                if p.storage_class.is_some() {
                    opts.storage_class = p.storage_class.clone();
                }
            }
            Ok(Box::new(S3Backend::new(location, opts)?))
        } else {
            Ok(Box::new(LocalBackend::new(PathBuf::from(loc))))
        }
    }

    fn backend(&self) -> Result<Arc<dyn Backend>> {
        let store = self.store()?;
        // Metrics inside retry: every attempt is a request the store serves (and bills).
        // Throttle innermost, so a retried transfer is paced too.
        Ok(Arc::new(RetryLayer::new(
            MetricsLayer::new(
                ThrottleLayer::new(store, self.limit_upload, self.limit_download),
                self.requests.clone(),
            ),
            RetryPolicy::default(),
        )))
    }

    fn open(&self) -> Result<Repository> {
        self.open_on(self.backend()?)
    }

    /// Opens the repository on a backend built by [`GlobalArgs::backend`].
    fn open_on(&self, backend: Arc<dyn Backend>) -> Result<Repository> {
        self.open_on_with_password(backend).map(|(repo, _)| repo)
    }

    /// [`GlobalArgs::open_on`], also returning the password that opened it (a restored
    /// PostgreSQL cluster may need it in a file of its own).
    fn open_on_with_password(
        &self,
        backend: Arc<dyn Backend>,
    ) -> Result<(Repository, zeroize::Zeroizing<String>)> {
        // Check for the repository before asking for a password.
        let sealed_config = Repository::read_config(&backend)?;
        let remote = backend.connections().is_some();
        // A recovery code only where no password source is set.
        let recovery = std::env::var(password::RECOVERY_CODE_VAR)
            .ok()
            .filter(|_| !password::REPO_PASSWORD.is_set());
        let mut pw = match (&self.secret, recovery) {
            (Some(src), _) => {
                password::read_secret(src).context("the policy's repository password")?
            }
            (None, Some(code)) => {
                let code = zeroize::Zeroizing::new(code);
                password::normalize_recovery_code(&code).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} is not a recovery code (8 groups of 4 letters and digits, as `key add --recovery` printed it)",
                        password::RECOVERY_CODE_VAR
                    )
                })?
            }
            (None, None) => password::read_password(&password::REPO_PASSWORD, false)?,
        };
        // The key that opened it last time goes first (one key derivation, however many
        // key files someone added to the store); the hint is kept with the cache but used
        // even without one (`--no-cache`, the WAL verbs, which open once per segment).
        let location = backend.location();
        let hints = self.key_hints();
        let preferred = hints.as_ref().and_then(|h| h.get(&location));
        let repo = match Repository::open_preferring(
            backend.clone(),
            &sealed_config,
            pw.as_bytes(),
            preferred.as_deref(),
        ) {
            // A recovery code typed at the prompt as printed (groups, dashes, capitals).
            Err(crate::repo::RepoError::WrongPassword { .. })
                if password::normalize_recovery_code(&pw).is_some_and(|c| *c != *pw) =>
            {
                pw = password::normalize_recovery_code(&pw).unwrap_or_default();
                Repository::open_preferring(
                    backend,
                    &sealed_config,
                    pw.as_bytes(),
                    preferred.as_deref(),
                )?
            }
            other => other?,
        };
        if let Some(h) = &hints {
            if preferred.as_deref() != Some(repo.key_id()) {
                h.set(&location, repo.key_id());
            }
        }
        // A local repository is its own cache; a remote one is cached unless told not to.
        let base = match (&self.cache_dir, self.no_cache, remote) {
            (_, true, _) => None,
            (Some(dir), false, _) => Some(dir.clone()),
            (None, false, true) => crate::repo::cache::default_base(),
            (None, false, false) => None,
        };
        let repo = match base {
            Some(b) => repo.with_cache(&b),
            None => repo,
        };
        Ok((repo, pw))
    }

    /// Where the key hints live: under the cache base, whether or not objects are cached.
    fn key_hints(&self) -> Option<KeyHints> {
        self.cache_dir
            .clone()
            .or_else(crate::repo::cache::default_base)
            .map(|b| KeyHints::under(&b))
    }

    /// Records that `key_id` opens the repository at `location` (a new or changed key).
    fn remember_key(&self, location: &str, key_id: &str) {
        if let Some(h) = self.key_hints() {
            h.set(location, key_id);
        }
    }

    /// These options with a policy's repository, password source and limits (options
    /// given on the command line win over the policy's limits).
    fn for_policy(&self, pol: &crate::policy::Policy) -> GlobalArgs {
        let mut g = self.clone();
        let r = &pol.repository;
        g.repo = Some(r.location.clone());
        g.secret = Some(r.password.clone());
        g.limit_upload = self.limit_upload.or(pol.limits.upload_kib);
        g.limit_download = self.limit_download.or(pol.limits.download_kib);
        if let Some(n) = pol.limits.s3_connections {
            g.s3_connections = n;
        }
        if r.cache_dir.is_some() && self.cache_dir.is_none() {
            g.cache_dir = r.cache_dir.clone();
        }
        g.s3_policy = Some(PolicyS3 {
            credentials: r.s3_credentials.clone(),
            region: r.s3_region.clone(),
            storage_class: r.s3_storage_class.clone(),
        });
        g
    }

    fn say(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            println!("{}", msg.as_ref());
        }
    }
}

fn init(g: &GlobalArgs, a: InitArgs) -> Result<()> {
    let loc = g.location()?;
    let pw = password::read_password(&password::REPO_PASSWORD, true)?;
    let repo = if S3Location::is_s3(&loc) {
        let backend = g.backend()?;
        backend.create()?;
        Repository::init(
            backend,
            pw.as_bytes(),
            &hostname(),
            &current_username(),
            a.compression,
        )?
    } else {
        let backend = Arc::new(LocalBackend::new(PathBuf::from(&loc)));
        Repository::init_local(
            backend,
            pw.as_bytes(),
            &hostname(),
            &current_username(),
            a.compression,
        )?
    };
    g.remember_key(&repo.backend().location(), repo.key_id());
    let from_keyring = std::env::var_os("BACKUPD_PASSWORD_FILE").is_none()
        && std::env::var_os("BACKUPD_PASSWORD_COMMAND").is_none()
        && std::env::var_os("BACKUPD_PASSWORD_KEYRING").is_some();
    let recovery = if from_keyring && !a.no_recovery_code {
        Some(keys::add_recovery_key(&repo)?)
    } else {
        None
    };
    if g.json {
        let mut v =
            serde_json::json!({"id": repo.config().id, "location": loc, "key": repo.key_id()});
        if let Some((id, code)) = &recovery {
            v["recovery_key"] = (*id).clone().into();
            v["recovery_code"] = code.as_str().into();
        }
        println!("{v}");
    } else {
        g.say(format!(
            "created backupd repository {} at {loc}\n\nKeep the password safe: without it the data cannot be restored.",
            &repo.config().id[..10]
        ));
        if let Some((id, code)) = &recovery {
            keys::print_recovery_code(id, code);
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<i32> {
    let g = &cli.global;
    match cli.command {
        Verb::Init(a) => init(g, a).map(|_| EXIT_OK),
        Verb::Backup(a) => backup_cmd::run(g, a),
        Verb::Snapshots(a) => inspect::snapshots(g, a).map(|_| EXIT_OK),
        Verb::Ls(a) => inspect::ls(g, a).map(|_| EXIT_OK),
        Verb::Restore(a) => restore_cmd::restore(g, a),
        Verb::Dump(a) => restore_cmd::dump(g, a).map(|_| EXIT_OK),
        Verb::Cat(a) => inspect::cat(g, a).map(|_| EXIT_OK),
        Verb::Key(a) => keys::run(g, a).map(|_| EXIT_OK),
        Verb::Stats => inspect::stats(g).map(|_| EXIT_OK),
        Verb::Check(a) => inspect::check(g, a),
        Verb::WalPush(a) => pg_cmd::wal_push(g, a),
        Verb::WalFetch(a) => pg_cmd::wal_fetch(g, a),
        Verb::WalStream(a) => stream_cmd::run(g, a),
        Verb::Unlock(a) => unlock_cmd::run(g, a),
        Verb::Policy(a) => policy_cmd::run(g, a),
        Verb::Forget(a) => forget_cmd::run(g, a),
        Verb::Prune(a) => prune_cmd::run(g, a),
        Verb::Agent(a) => agent_cmd::run(g, a),
        Verb::Verify(a) => verify_cmd::run(g, a),
        Verb::Upgrade(a) => upgrade(g, a).map(|_| EXIT_OK),
    }
}

/// Runs `upgrade`: the format version, then the key files (key generations).
fn upgrade(g: &GlobalArgs, a: UpgradeArgs) -> Result<()> {
    let (mut repo, pw) = g.open_on_with_password(g.backend()?)?;
    let from = repo.config().version;
    let format_todo = from < crate::repo::config::FORMAT_VERSION;
    let keys_todo = !repo.has_generations() || !repo.live_keys().follows_generations();
    if !format_todo && !keys_todo {
        g.say(format!(
            "repository {} is format {from} with key generations already: nothing to do",
            repo.backend().location()
        ));
        return Ok(());
    }
    // Whatever runs on the repository now may be an older backupd: its next open will
    // refuse the new format, so the hosts are named.
    let now = chrono::Utc::now();
    for (_, l) in crate::repo::lock::list_locks(repo.backend(), repo.live_keys())? {
        if !l.is_stale(now) {
            eprintln!(
                "warning: a {} is running on {} (pid {}, since {}); if that host's backupd is older than 0.3, it cannot open the repository once it is upgraded",
                format!("{:?}", l.kind).to_lowercase(),
                l.host,
                l.pid,
                l.started.to_rfc3339(),
            );
        }
    }
    if a.dry_run {
        if format_todo {
            println!(
                "would make repository {} format {} (from {from}); backupd before 0.2 could no longer open it",
                repo.backend().location(),
                crate::repo::config::FORMAT_VERSION
            );
        }
        if keys_todo {
            println!(
                "would convert the key file in use ({}) to key generations (version 2); backupd before 0.3 could no longer open the repository",
                repo.key_id().get(..8).unwrap_or(repo.key_id())
            );
        }
        return Ok(());
    }
    if format_todo {
        repo.upgrade()?;
        g.say(format!(
            "repository {} is format {} now (was {from}): backups keep extended attributes, ACLs, capabilities, special and sparse files, file flags; backupd before 0.2 refuses to open it",
            repo.backend().location(),
            repo.config().version
        ));
    }
    if keys_todo {
        let old = repo.key_id().to_string();
        if let Some(id) = repo.upgrade_keys(pw.as_bytes(), &hostname(), &current_username())? {
            g.remember_key(&repo.backend().location(), &id);
            g.say(format!(
                "key {} (version 2, key generations) replaces key {}: `key rotate` can add generations now; backupd before 0.3 refuses to open the repository",
                id.get(..8).unwrap_or(&id),
                old.get(..8).unwrap_or(&old)
            ));
        }
        let legacy: Vec<String> = repo
            .key_entries()?
            .into_iter()
            .filter(crate::repo::generations::KeyEntry::is_legacy)
            .map(|e| e.id)
            .collect();
        if !legacy.is_empty() {
            eprintln!(
                "note: key files {} are still version 1: run `backupd key passwd` once with each of their passwords before the first `key rotate`",
                legacy
                    .iter()
                    .map(|k| k.get(..8).unwrap_or(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}

/// Bytes for people: `512 B`, `1.50 MiB`.
pub(crate) fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// A token SIGINT and SIGTERM cancel; a second signal exits at once (130).
///
/// # Errors
/// The handlers cannot be installed.
pub(crate) fn interrupt_token() -> Result<crate::source::CancelToken> {
    let cancel = crate::source::CancelToken::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.flag())
            .context("installing signal handler")?;
        signal_hook::flag::register(sig, cancel.flag()).context("installing signal handler")?;
    }
    Ok(cancel)
}

/// An error with its causes, each said once (several of our errors already include their
/// cause in their own message).
pub(crate) fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if msg.contains(&s) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&s);
    }
    msg
}

/// Parses the command line, runs the verb, prints any error, returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    // Readers of a local repository keep freed blob buffers; with a remote one, many more
    // fetches are in flight and kept buffers would add up (measured: 12 S3 restore workers
    // peaked at 160 MiB with a 4 MiB trim threshold, 131 MiB with glibc's default).
    let remote = cli.global.repo.as_deref().is_some_and(S3Location::is_s3);
    crate::allocator::ensure_tuned(match cli.command {
        Verb::Backup(_) | Verb::Init(_) | Verb::Key(_) => crate::allocator::Profile::Write,
        _ if remote => crate::allocator::Profile::Write,
        _ => crate::allocator::Profile::Read,
    });
    // A reader of stdout that goes away (`backupd ls latest | head`) ends the command
    // quietly with 141, as SIGPIPE ends other tools, instead of a panic message: Rust
    // ignores SIGPIPE, so `println!` panics on the broken pipe (sockets are written with
    // MSG_NOSIGNAL and are not concerned).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    let is_agent = matches!(cli.command, Verb::Agent(_));
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKUPD_LOG").unwrap_or_else(|_| {
        // The AWS SDK logs every step of credential and region discovery as a warning
        // (no instance metadata off EC2, ...); its real failures reach us as errors.
        tracing_subscriber::EnvFilter::new(if is_agent {
            "info,aws_config=error,aws_smithy_runtime=error,tokio_postgres=warn"
        } else {
            "warn,aws_config=error,aws_smithy_runtime=error"
        })
    });
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The agent logs JSON unless on a terminal (journald, ELK); other verbs log text.
    let json = match std::env::var("BACKUPD_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        _ => is_agent && !tty,
    };
    if json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_current_span(false)
            .init();
    } else if is_agent {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(tty)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(tty)
            .without_time()
            .init();
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let code = exit_code(&e);
            match e
                .chain()
                .find_map(|c| c.downcast_ref::<crate::error::ExitWith>())
            {
                None => eprintln!("backupd: error: {}", error_chain(&e)),
                // Said already, or nothing to say (wal-fetch of a file not archived).
                Some(w) if w.message.is_empty() => {}
                Some(_) => eprintln!("backupd: {}", error_chain(&e)),
            }
            code
        }
    }
}
