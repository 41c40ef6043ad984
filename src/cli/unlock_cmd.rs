//! `backupd unlock`: removes stale locks (restic's verb); `--remove-all` removes every
//! lock, after saying what each was. A lock is stale when its process no longer runs on
//! this host (pid and start time) or it missed its refresh deadline
//! ([`crate::repo::lock::STALE_AFTER`]).

use anyhow::Result;
use clap::Args;

use super::GlobalArgs;
use crate::backend::ObjectType;
use crate::error::EXIT_OK;
use crate::repo::lock::list_locks;

/// Arguments of `unlock`.
#[derive(Args, Debug)]
pub struct UnlockArgs {
    /// Remove every lock, not only stale ones (only when no backupd runs against the
    /// repository: a running prune or backup loses its protection).
    #[arg(long)]
    remove_all: bool,
}

/// Runs `unlock`.
///
/// # Errors
/// The repository cannot be opened or listed.
pub fn run(g: &GlobalArgs, a: UnlockArgs) -> Result<i32> {
    let repo = g.open()?;
    let backend = repo.backend().clone();
    // A lock of this command's own first: writing it measures this host's clock against
    // the store's, so staleness is judged by the store's time (a host whose clock is off
    // must not take live locks for stale).
    let own = crate::repo::lock::RepoLock::acquire(
        backend.clone(),
        repo.live_keys().clone(),
        crate::repo::lock::LockKind::Backup,
        &crate::host::hostname(),
        None,
    )?;
    let now = crate::repo::clock::now();
    let mut removed = 0;
    let mut kept = 0;
    for (name, rec) in list_locks(&backend, repo.live_keys())? {
        if rec == *own.record() {
            continue;
        }
        let stale = rec.is_stale(now);
        if !stale && !a.remove_all {
            kept += 1;
            continue;
        }
        let what = format!(
            "{} on {} (pid {}, since {})",
            rec.kind.describe(),
            rec.host,
            rec.pid,
            rec.started.format("%Y-%m-%d %H:%M:%S UTC")
        );
        match backend.delete(ObjectType::Lock, &name) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        }
        removed += 1;
        if !g.quiet {
            if stale {
                println!("removed the stale lock of {what}: {}", rec.why_stale());
            } else {
                println!("removed the lock of {what} (--remove-all; it was not stale)");
            }
        }
    }
    if !g.quiet {
        println!(
            "{removed} lock{} removed, {kept} in use left",
            if removed == 1 { "" } else { "s" }
        );
    }
    Ok(EXIT_OK)
}
