//! WAL streaming under the agent: for each postgres policy with `wal_stream = true`, a
//! `backupd wal-stream --policy NAME` child (its own process, like every job), its log lines
//! re-emitted, restarted with a growing pause when it exits, stopped with SIGTERM (then
//! SIGKILL) when the policy changes or the agent stops. Whether it runs is the metric
//! `backupd_wal_stream_up`; a streamer that keeps exiting is an error in the log at every
//! restart, never silence.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::watch;

use super::metrics::Registry;
use crate::policy::Policy;

/// First pause before a restart; doubles up to [`RESTART_MAX`], back to the first after a
/// run of [`RESTART_MAX`] or longer.
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);

/// How to start streamers.
#[derive(Clone, Debug)]
pub struct StreamerSpawn {
    /// This program.
    pub exe: PathBuf,
    /// The policy directory.
    pub policies: PathBuf,
}

/// Keeps policy `policy`'s streamer running until `stop` turns true.
pub async fn supervise(
    spawn: StreamerSpawn,
    policy: Arc<Policy>,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) {
    let name = policy.name.clone();
    let mut pause = RESTART_FIRST;
    loop {
        if *stop.borrow() {
            break;
        }
        let mut cmd = Command::new(&spawn.exe);
        cmd.arg("--policies")
            .arg(&spawn.policies)
            .args(["wal-stream", "--policy", &name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .env("BACKUPD_LOG_FORMAT", "text");
        let started = std::time::Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(policy = %name, "cannot start wal-stream: {e}");
                registry.set_stream_up(&name, false);
                if sleep_or_stop(pause, &mut stop).await {
                    break;
                }
                continue;
            }
        };
        registry.set_stream_up(&name, true);
        let logger = super::runner::relay_stderr(child.stderr.take(), name.clone(), "wal-stream");
        tokio::select! {
            status = child.wait() => {
                let last = logger.await.unwrap_or_default();
                registry.set_stream_up(&name, false);
                if started.elapsed() >= RESTART_MAX {
                    pause = RESTART_FIRST;
                }
                tracing::error!(
                    policy = %name,
                    "wal-stream exited ({}){}; restarting in {} s",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    if last.is_empty() { String::new() } else { format!(": {last}") },
                    pause.as_secs()
                );
                if sleep_or_stop(pause, &mut stop).await {
                    break;
                }
                pause = (pause * 2).min(RESTART_MAX);
            }
            _ = stop.changed() => {
                // SIGTERM: the streamer stores what it has; SIGKILL after a grace.
                super::runner::stop_child(&mut child).await;
                let _ = logger.await;
                registry.set_stream_up(&name, false);
                break;
            }
        }
    }
}

/// Sleeps `d`; true when `stop` turned true meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}
