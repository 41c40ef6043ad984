//! PostgreSQL verbs: `wal-push` (archive_command) and `wal-fetch` (restore_command), and
//! the connection flags `backup --postgres` shares with them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::GlobalArgs;
use crate::error::{ExitWith, EXIT_OK};
use crate::postgres::archive::{Pushed, WalArchive};
use crate::postgres::conn::ConnSettings;
use crate::postgres::walname::{is_archivable_name, is_segment_name, Segment};
use crate::postgres::walscan::segment_header;
use crate::repo::sha256_hex;

/// libpq-style connection flags (each overrides its PG* variable).
#[derive(Args, Debug, Clone, Default)]
pub struct PgArgs {
    /// Server host or socket directory [PGHOST].
    #[arg(long = "pg-host", value_name = "HOST")]
    pub pg_host: Option<String>,
    /// Server port [PGPORT].
    #[arg(long = "pg-port", value_name = "PORT")]
    pub pg_port: Option<u16>,
    /// User name (a superuser, or one with backup rights) [PGUSER].
    #[arg(long = "pg-user", value_name = "USER")]
    pub pg_user: Option<String>,
    /// Database to connect to [PGDATABASE, default postgres].
    #[arg(long = "pg-database", value_name = "DB")]
    pub pg_database: Option<String>,
}

impl PgArgs {
    /// As connection settings.
    pub fn settings(&self) -> ConnSettings {
        ConnSettings {
            host: self.pg_host.clone(),
            port: self.pg_port,
            user: self.pg_user.clone(),
            database: self.pg_database.clone(),
        }
    }
}

/// Arguments of `wal-push`.
#[derive(Args, Debug)]
pub struct WalPushArgs {
    /// The file to archive (`%p`: relative to the data directory, where PostgreSQL runs
    /// archive_command).
    path: PathBuf,
    /// The cluster's data directory, for its system identifier (default: PGDATA, else the
    /// current directory).
    #[arg(long = "pg-data", env = "PGDATA", value_name = "DIR")]
    pg_data: Option<PathBuf>,
    /// Also push up to this many other segments PostgreSQL has marked ready
    /// (pg_wal/archive_status/*.ready), two at a time; its later calls for them then
    /// return at once. 0: only the one asked for.
    #[arg(long, default_value_t = 8, env = "BACKUPD_WAL_PUSH_AHEAD")]
    push_ahead: usize,
}

/// Arguments of `wal-fetch`.
#[derive(Args, Debug)]
pub struct WalFetchArgs {
    /// The file PostgreSQL asks for (`%f`).
    name: String,
    /// Where to write it (`%p`).
    dest: PathBuf,
    /// The cluster's data directory (default: PGDATA, else the current directory).
    #[arg(long = "pg-data", env = "PGDATA", value_name = "DIR")]
    pg_data: Option<PathBuf>,
    /// Segments to fetch ahead, in parallel, into pg_wal/backupd-prefetch (0: none).
    #[arg(long, default_value_t = 8, env = "BACKUPD_WAL_PREFETCH")]
    prefetch: usize,
}

/// The system identifier in `global/pg_control`.
///
/// # Errors
/// The file cannot be read.
pub fn control_system_id(pg_data: &Path) -> Result<u64> {
    let p = pg_data.join("global/pg_control");
    let mut b = [0u8; 8];
    let mut f = fs::File::open(&p).with_context(|| {
        format!(
            "reading {} for the cluster's system identifier (run from the data directory, or give --pg-data)",
            p.display()
        )
    })?;
    std::io::Read::read_exact(&mut f, &mut b)
        .with_context(|| format!("reading {}", p.display()))?;
    Ok(u64::from_le_bytes(b))
}

fn data_dir(given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `wal-push`: exits 0 only once the file is durable in the repository.
///
/// # Errors
/// A bad name, a conflict, an unreadable file, or a repository failure.
pub fn wal_push(g: &GlobalArgs, a: WalPushArgs) -> Result<i32> {
    // WAL objects are never cached; neither is anything else this verb reads.
    let g = &GlobalArgs {
        no_cache: true,
        ..g.clone()
    };
    let name = a
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .unwrap_or_default();
    if !is_archivable_name(&name) {
        bail!(
            "{}: not a WAL segment, history, backup history or partial file name",
            a.path.display()
        );
    }
    let bytes = fs::read(&a.path).with_context(|| format!("reading {}", a.path.display()))?;
    let pg_data = data_dir(&a.pg_data);
    let pushed_dir = pg_data.join(PUSHED_DIR);
    // Pushed ahead by an earlier call: done, once the archive still has it and the bytes
    // are the ones pushed (no password needed for that).
    if let Some(marker) = read_marker(&pushed_dir, &name) {
        let backend = g.backend()?;
        let object = WalArchive::object_name_of(marker.0, &name);
        if marker.1 == sha256_hex(&bytes)
            && backend.exists(crate::backend::ObjectType::Wal, &object)?
        {
            let _ = fs::remove_file(pushed_dir.join(&name));
            tracing::info!("{name}: archived already (pushed ahead)");
            return Ok(EXIT_OK);
        }
        let _ = fs::remove_file(pushed_dir.join(&name));
    }
    let control = control_system_id(&pg_data);
    let system_id = if is_segment_name(&name) {
        let h = segment_header(&bytes).with_context(|| {
            format!(
                "{}: not a WAL segment (no long page header)",
                a.path.display()
            )
        })?;
        if let Ok(c) = &control {
            if *c != h.system_identifier {
                bail!(
                    "{name} belongs to system {}, but this data directory is system {c}",
                    h.system_identifier
                );
            }
        }
        h.system_identifier
    } else {
        control?
    };
    let repo = g.open()?;
    let archive = WalArchive::new(&repo, system_id);
    let started = std::time::Instant::now();
    let pushed = archive.push(&name, &bytes)?;
    drop(bytes);
    if a.push_ahead > 0 && is_segment_name(&name) {
        push_ahead(&archive, &pg_data, &name, a.push_ahead);
    }
    tracing::info!(
        "{name}: {} in {:.0} ms",
        match pushed {
            Pushed::Stored => "archived",
            Pushed::AlreadyThere => "already archived with the same bytes",
        },
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(EXIT_OK)
}

const PREFETCH_DIR: &str = "pg_wal/backupd-prefetch";
/// Markers of segments pushed ahead: `<system id> <sha256 of the bytes>`.
const PUSHED_DIR: &str = "pg_wal/backupd-pushed";

fn read_marker(dir: &Path, name: &str) -> Option<(u64, String)> {
    let text = fs::read_to_string(dir.join(name)).ok()?;
    let (sysid, sum) = text.trim().split_once(' ')?;
    Some((sysid.parse().ok()?, sum.to_string()))
}

/// Pushes other ready segments (oldest first, at most `max`), two at a time, and leaves a
/// marker for each so PostgreSQL's own call for it returns at once. Failures are left for
/// that call to report.
fn push_ahead(archive: &WalArchive<'_>, pg_data: &Path, current: &str, max: usize) {
    let Ok(rd) = fs::read_dir(pg_data.join("pg_wal/archive_status")) else {
        return;
    };
    let pushed_dir = pg_data.join(PUSHED_DIR);
    let mut ready: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".ready"))
                .filter(|n| is_segment_name(n) && *n != current)
                .map(str::to_string)
        })
        .filter(|n| !pushed_dir.join(n).exists())
        .collect();
    ready.sort();
    ready.truncate(max);
    if ready.is_empty() || fs::create_dir_all(&pushed_dir).is_err() {
        return;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(name) = ready.get(i) else { return };
                let Ok(bytes) = fs::read(pg_data.join("pg_wal").join(name)) else {
                    continue;
                };
                if segment_header(&bytes).map(|h| h.system_identifier) != Some(archive.system_id())
                {
                    continue;
                }
                if archive.push(name, &bytes).is_ok() {
                    let marker = format!("{} {}\n", archive.system_id(), sha256_hex(&bytes));
                    let _ = write_atomically(&pushed_dir.join(name), marker.as_bytes());
                }
            });
        }
    });
}

/// Writes `bytes` to `dest` through a temporary name in the same directory.
fn write_atomically(dest: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = dest.with_file_name(format!(
        ".{}.backupd-tmp",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal")
    ));
    let mut f = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}

/// Exit code of `wal-fetch` for anything but a missing file. PostgreSQL takes any exit code
/// up to 125 for "not in the archive" and ends recovery there, promoting at a point the user
/// did not ask for; above 125 it stops recovery instead (FATAL), which is what a repository
/// that cannot be read or a damaged segment must do.
pub const WAL_FETCH_FAILED: i32 = 255;

/// Runs `wal-fetch`: writes the file and exits 0, or exits 1 without a word when the
/// archive does not have it (recovery then ends, or tries the next timeline). Any other
/// failure exits [`WAL_FETCH_FAILED`] with the error on stderr.
///
/// # Errors
/// A missing file (exit 1), or any failure (exit 255).
pub fn wal_fetch(g: &GlobalArgs, a: WalFetchArgs) -> Result<i32> {
    wal_fetch_or_miss(g, a).map_err(|e| {
        if e.chain().any(|c| c.is::<ExitWith>()) {
            return e;
        }
        ExitWith {
            code: WAL_FETCH_FAILED,
            message: format!("error: {}", super::error_chain(&e)),
        }
        .into()
    })
}

fn wal_fetch_or_miss(g: &GlobalArgs, a: WalFetchArgs) -> Result<i32> {
    let g = &GlobalArgs {
        no_cache: true,
        ..g.clone()
    };
    if !is_archivable_name(&a.name) {
        bail!("{:?} is not a WAL file name", a.name);
    }
    let pg_data = data_dir(&a.pg_data);
    let spool = pg_data.join(PREFETCH_DIR);
    let spooled = spool.join(&a.name);
    if spooled.is_file() {
        // Fetched ahead, checked and opened then; hand it over.
        fs::rename(&spooled, &a.dest)
            .or_else(|_| fs::copy(&spooled, &a.dest).map(|_| ()))
            .with_context(|| format!("moving {} to {}", spooled.display(), a.dest.display()))?;
        prune_spool(&spool, &a.name);
        return Ok(EXIT_OK);
    }
    let _ = fs::remove_dir_all(&spool);
    let system_id = control_system_id(&pg_data)?;
    // Recovery asks for many files that do not exist (the next timeline's history, the
    // segment after the last): answer those without the password (no key derivation),
    // once the repository itself is known to be there.
    let backend = g.backend()?;
    let object = WalArchive::object_name_of(system_id, &a.name);
    if !backend.exists(crate::backend::ObjectType::Wal, &object)?
        && !streamed(&backend, system_id, &a.name)?
    {
        crate::repo::Repository::read_config(&backend)?;
        return Err(ExitWith {
            code: 1,
            message: String::new(),
        }
        .into());
    }
    let repo = g.open_on(backend)?;
    let archive = WalArchive::new(&repo, system_id);
    // The segments after this one, fetched in parallel while this one is fetched.
    let ahead: Vec<String> = if a.prefetch > 0 && is_segment_name(&a.name) {
        let seg_size = segment_size_hint(&pg_data);
        Segment::parse(&a.name, seg_size)
            .map(|s| {
                std::iter::successors(Some(s.next()), |s| Some(s.next()))
                    .take(a.prefetch)
                    .map(|s| s.name(seg_size))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        vec![]
    };
    let result = std::thread::scope(|sc| {
        let helper = (!ahead.is_empty()).then(|| {
            sc.spawn(|| {
                let _ = fs::create_dir_all(&spool);
                prefetch(&archive, &ahead, &spool);
            })
        });
        let r = archive.fetch(&a.name).and_then(|got| match got {
            Some(b) => Ok(Some(b)),
            // The stream's growing segment, zero-filled: the end of the WAL.
            None if is_segment_name(&a.name) => {
                let seg_size = archive
                    .stream_status()?
                    .map_or_else(|| segment_size_hint(&pg_data), |s| s.segment_size);
                Ok(archive
                    .fetch_for_recovery(&a.name, seg_size)?
                    .map(|(b, _)| b))
            }
            None => Ok(None),
        });
        if let Some(h) = helper {
            let _ = h.join();
        }
        r
    });
    match result? {
        Some(bytes) => {
            write_atomically(&a.dest, &bytes)?;
            Ok(EXIT_OK)
        }
        None => Err(ExitWith {
            code: 1,
            message: String::new(),
        }
        .into()),
    }
}

/// True when the WAL stream has begun segment `name` (pieces from its start), read from
/// the listing alone (no password needed to say "no").
fn streamed(
    backend: &std::sync::Arc<dyn crate::backend::Backend>,
    system_id: u64,
    name: &str,
) -> Result<bool> {
    if !is_segment_name(name) {
        return Ok(false);
    }
    let l = backend.list_dir(
        crate::backend::ObjectType::Wal,
        &format!("{system_id}/{}", &name[..16]),
    )?;
    let names: Vec<String> = l.files.into_iter().map(|(n, _)| n).collect();
    Ok(crate::postgres::streamed::covered(&crate::postgres::streamed::pieces_of(&names, name)) > 0)
}

/// The cluster's WAL segment size, from the long header of any segment in `pg_wal` (a
/// restored data directory holds none, then the default 16 MiB; the size only decides
/// which names to fetch ahead).
fn segment_size_hint(pg_data: &Path) -> u64 {
    fs::read_dir(pg_data.join("pg_wal"))
        .ok()
        .and_then(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_str().is_some_and(is_segment_name))
                .find_map(|e| {
                    let mut b = vec![0u8; 40];
                    let mut f = fs::File::open(e.path()).ok()?;
                    std::io::Read::read_exact(&mut f, &mut b).ok()?;
                    segment_header(&b).map(|h| h.segment_size as u64)
                })
        })
        .unwrap_or(16 * 1024 * 1024)
}

/// Fetches `names` in order, several at a time, into the spool; stops at the first one
/// the archive does not have.
fn prefetch(archive: &WalArchive<'_>, names: &[String], spool: &Path) {
    // Fetching is decrypt + decompress bound locally, request bound on S3: a few at once.
    let workers = names.len().clamp(1, 4);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| loop {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(name) = names.get(i) else { return };
                match archive.fetch(name) {
                    Ok(Some(bytes)) => {
                        let _ = write_atomically(&spool.join(name), &bytes);
                    }
                    _ => stop.store(true, std::sync::atomic::Ordering::Relaxed),
                }
            });
        }
    });
}

/// Removes spooled segments recovery has passed.
fn prune_spool(spool: &Path, handed_over: &str) {
    if let Ok(rd) = fs::read_dir(spool) {
        for e in rd.flatten() {
            if let Some(n) = e.file_name().to_str() {
                if n < handed_over || n.starts_with('.') {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}
