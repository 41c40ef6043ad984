//! `backupd prune`: deletes the data no snapshot needs, in two phases (see
//! [`crate::repo::prune`]).

use anyhow::{Context, Result};
use clap::Args;

use super::{human, GlobalArgs};
use crate::error::EXIT_OK;
use crate::repo::prune::{prune, PruneOptions, PruneReport};
use crate::repo::Repository;

/// Arguments of `prune` (also taken by `forget --prune`).
#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    /// Delete a marked pack only when its mark is at least this old: longer than any
    /// backup runs (e.g. 24h, 2d; 0s deletes at the second run).
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    grace: String,
    /// Repack packs with at least this percentage of unused bytes (0: every pack, e.g. to
    /// seal every blob with the newest key generation).
    #[arg(long, value_name = "PERCENT", default_value_t = 50,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    repack_unused: u8,
}

/// Arguments of `prune` itself.
#[derive(Args, Debug)]
pub struct PruneCmdArgs {
    #[command(flatten)]
    prune: PruneArgs,
    /// Report what would be marked, repacked and deleted; change nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
}

/// Prunes `repo` with these arguments.
///
/// # Errors
/// A bad duration, another prune running, a damaged repository, or store failures.
pub fn prune_with(repo: &Repository, a: &PruneArgs, dry_run: bool) -> Result<PruneReport> {
    let grace = crate::policy::units::parse_duration(&a.grace)
        .map_err(|e| anyhow::anyhow!("--grace {:?}: {e}", a.grace))?;
    let opts = PruneOptions {
        grace,
        repack_unused: f64::from(a.repack_unused) / 100.0,
        dry_run,
        ..PruneOptions::default()
    };
    prune(repo, &opts).context("prune")
}

/// Prints a prune report as text (unless --quiet).
pub fn print_report(g: &GlobalArgs, r: &PruneReport, dry_run: bool) {
    if !g.quiet {
        let verb = if dry_run { "would be" } else { "were" };
        println!("packs:     {} ({})", r.packs, human(r.pack_bytes));
        println!(
            "repacked:  {} pack(s), {} blob(s) copied, {} written",
            r.repacked,
            r.blobs_repacked,
            human(r.repacked_bytes)
        );
        println!(
            "marked:    {} pack(s) unused or repacked; {} needed again",
            r.marked, r.unmarked
        );
        println!(
            "waiting:   {} marked pack(s) wait for the grace period{}",
            r.waiting,
            if r.held_by_backups > 0 {
                format!(" or for {} held by running backups", r.held_by_backups)
            } else {
                String::new()
            }
        );
        println!(
            "deleted:   {} pack(s) {verb} deleted ({}), {} index file(s) rewritten",
            r.deleted,
            human(r.deleted_bytes),
            r.index_rewritten
        );
        println!("wal:       {} WAL object(s) {verb} removed", r.wal_deleted);
    }
}

/// Runs `prune`.
///
/// # Errors
/// As [`prune_with`], or the repository failing to open.
pub fn run(g: &GlobalArgs, a: PruneCmdArgs) -> Result<i32> {
    let repo = g.open()?;
    let r = prune_with(&repo, &a.prune, a.dry_run)?;
    if g.json {
        println!("{}", serde_json::to_value(&r)?);
    } else {
        print_report(g, &r, a.dry_run);
    }
    Ok(EXIT_OK)
}
