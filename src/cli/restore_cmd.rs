//! `backupd restore` and `backupd dump`.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use super::progress::Progress;
use super::GlobalArgs;
use crate::error::{ExitWith, EXIT_FATAL, EXIT_OK};
use crate::repo::NodeKind;
use crate::restore::{dump_file, find_node, restore as do_restore, RestoreFilter};
use crate::source::files::glob_set;

/// Arguments of `restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot id, unique prefix, or `latest`.
    snapshot: String,
    /// Directory to restore into (must be empty or not exist).
    #[arg(long, short = 't')]
    target: PathBuf,
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
    let (id, snap) = repo.resolve_snapshot(&a.snapshot)?;
    let index = repo.load_index()?;
    let filter = RestoreFilter {
        include: glob_set(&a.include)?,
        exclude: glob_set(&a.exclude)?,
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
    let report = do_restore(
        &repo, &index, &snap.tree, &a.target, &filter, workers, &counter,
    );
    drop(progress);
    let report = report?;
    let secs = started.elapsed().as_secs_f64();
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
