//! Runs jobs as child processes of this same binary (`backupd backup --policy NAME`, ...):
//! a job's memory returns to the system when it ends, a stuck job can be killed without
//! harming the agent, and a killed job leaves no snapshot (the snapshot is the commit
//! point). The child's stderr becomes log events of the agent; its stdout is its JSON
//! summary.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::scheduler::{JobKind, JobOutcome, JobRunner};
use crate::policy::Policy;

/// After SIGTERM, a child gets this long to stop before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(20);

/// Spawns jobs as `backupd` child processes.
pub struct ProcessRunner {
    /// The binary (this one).
    pub exe: PathBuf,
    /// The policy directory the child reads its policy from.
    pub policies: PathBuf,
    /// Turns true when the agent stops.
    pub shutdown: watch::Receiver<bool>,
    /// How long running jobs may go on after shutdown starts.
    pub shutdown_timeout: Duration,
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

/// Re-emits a child's stderr lines in the agent's log (a line with "error" as an error),
/// tagged with the policy and job; the task's result is the last line.
pub(super) fn relay_stderr(
    stderr: Option<tokio::process::ChildStderr>,
    policy: String,
    job: &'static str,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut last = String::new();
        if let Some(s) = stderr {
            let mut lines = BufReader::new(s).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim().is_empty() {
                    continue;
                }
                if line.contains("error") {
                    tracing::error!(policy = %policy, job, "{line}");
                } else {
                    tracing::info!(policy = %policy, job, "{line}");
                }
                last = line;
            }
        }
        last
    })
}

/// SIGTERM, then SIGKILL if it does not stop in time.
pub(super) async fn stop_child(child: &mut Child) {
    signal(child, nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(TERM_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

impl JobRunner for ProcessRunner {
    fn run(
        &self,
        policy: Arc<Policy>,
        kind: JobKind,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = JobOutcome> + Send>> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--policies")
            .arg(&self.policies)
            .args(["--json", "--no-progress"]);
        match kind {
            JobKind::Backup => cmd.args(["backup", "--policy", &policy.name]),
            JobKind::Retention => cmd.args(["forget", "--policy", &policy.name]),
            JobKind::Verify => cmd.args(["verify", "--policy", &policy.name]),
            JobKind::KeyRotation => cmd.args(["key", "rotate", "--policy", &policy.name]),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches only the agent, which
            // decides how its jobs end.
            .process_group(0)
            .kill_on_drop(true)
            // Child logs are re-emitted by the agent, so they stay plain text.
            .env("BACKUPD_LOG_FORMAT", "text");
        let mut shutdown = self.shutdown.clone();
        let shutdown_timeout = self.shutdown_timeout;
        Box::pin(async move {
            let name = policy.name.clone();
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => return JobOutcome::Failed(format!("cannot start a job process: {e}")),
            };
            let mut stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let out_task = tokio::spawn(async move {
                let mut v = vec![];
                if let Some(s) = stdout.as_mut() {
                    let _ = s.read_to_end(&mut v).await;
                }
                v
            });
            let err_task = relay_stderr(stderr, name.clone(), kind.as_str());
            let deadline = async {
                match timeout {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(deadline);
            let mut abandoned = false;
            let mut timed_out = false;
            let status = loop {
                tokio::select! {
                    s = child.wait() => break s,
                    _ = &mut deadline, if !timed_out => {
                        timed_out = true;
                        tracing::error!(policy = %name, job = kind.as_str(), "still running after its timeout; stopping it");
                        stop_child(&mut child).await;
                    }
                    r = shutdown.changed(), if !abandoned => {
                        if r.is_err() || *shutdown.borrow() {
                            abandoned = true;
                            tracing::warn!(policy = %name, job = kind.as_str(), timeout_secs = shutdown_timeout.as_secs(), "shutting down: waiting for the running job");
                            if tokio::time::timeout(shutdown_timeout, child.wait()).await.is_err() {
                                tracing::warn!(policy = %name, job = kind.as_str(), "shutdown timeout: stopping the job (no snapshot is written)");
                                stop_child(&mut child).await;
                            }
                        }
                    }
                }
            };
            // Something the job started may still hold its pipes open: do not wait long.
            let mut out_task = out_task;
            let mut err_task = err_task;
            let stdout = match tokio::time::timeout(Duration::from_secs(5), &mut out_task).await {
                Ok(r) => r.unwrap_or_default(),
                Err(_) => {
                    out_task.abort();
                    vec![]
                }
            };
            let last_err = match tokio::time::timeout(Duration::from_secs(5), &mut err_task).await {
                Ok(r) => r.unwrap_or_default(),
                Err(_) => {
                    err_task.abort();
                    String::new()
                }
            };
            let summary = serde_json::from_slice::<serde_json::Value>(&stdout).ok();
            match status {
                // 3: a snapshot was saved, some files were unreadable (logged above).
                Ok(s) if s.success() || s.code() == Some(3) => JobOutcome::Success(summary),
                Ok(_) if abandoned => JobOutcome::Abandoned,
                Ok(_) if timed_out => {
                    JobOutcome::Failed("timed out; no snapshot was written".into())
                }
                Ok(s) => JobOutcome::Failed(if last_err.is_empty() {
                    format!("exited with {s}")
                } else {
                    last_err.trim_start_matches("backupd: ").to_string()
                }),
                Err(e) => JobOutcome::Failed(format!("waiting for the job: {e}")),
            }
        })
    }
}
