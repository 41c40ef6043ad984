//! Running a policy's hooks: each a shell command (`sh -c`), with the policy's name and the
//! run's result in its environment, in a process group of its own that is stopped as a whole
//! when the hook outlives its timeout or the run is interrupted. A hook never sees the
//! secret variables ([`crate::secret_env`]).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::source::CancelToken;

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// It could not be started.
    #[error("{stage} hook {command:?} could not start: {source}")]
    Spawn {
        /// pre, post or on_failure.
        stage: &'static str,
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited non-zero or by a signal.
    #[error("{stage} hook {command:?} failed ({status})")]
    Failed {
        /// pre, post or on_failure.
        stage: &'static str,
        /// The command.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The run was interrupted (SIGINT/SIGTERM) while it ran; it was stopped.
    #[error("{stage} hook {command:?} stopped: interrupted")]
    Interrupted {
        /// pre, post or on_failure.
        stage: &'static str,
        /// The command.
        command: String,
    },
    /// It ran too long and was killed.
    #[error("{stage} hook {command:?} still running after {secs} s; killed")]
    Timeout {
        /// pre, post or on_failure.
        stage: &'static str,
        /// The command.
        command: String,
        /// The timeout.
        secs: u64,
    },
}

/// SIGTERM to the hook's whole process group, then SIGKILL if it lingers.
fn stop_group(child: &mut Child) {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `commands` one after another; stops at the first failure, or when `cancel` is
/// cancelled. The hooks' output goes to this process's stderr (the agent's log).
///
/// # Errors
/// The first hook that could not start, failed, timed out or was interrupted.
pub fn run_hooks(
    stage: &'static str,
    commands: &[String],
    env: &[(&str, String)],
    timeout: Duration,
    cancel: Option<&CancelToken>,
) -> Result<(), HookError> {
    for cmd in commands {
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(HookError::Interrupted {
                stage,
                command: cmd.clone(),
            });
        }
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            // Its own group: a timeout or an interrupt stops what it started too.
            .process_group(0);
        // Hook output goes to stderr: stdout may carry a JSON summary.
        if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
            c.stdout(Stdio::from(fd));
        }
        crate::secret_env::scrub(&mut c);
        for (k, v) in env {
            c.env(k, v);
        }
        c.env("BACKUPD_HOOK", stage);
        let mut child = c.spawn().map_err(|source| HookError::Spawn {
            stage,
            command: cmd.clone(),
            source,
        })?;
        let started = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break,
                Ok(Some(status)) => {
                    return Err(HookError::Failed {
                        stage,
                        command: cmd.clone(),
                        status,
                    })
                }
                Ok(None) if cancel.is_some_and(CancelToken::is_cancelled) => {
                    stop_group(&mut child);
                    return Err(HookError::Interrupted {
                        stage,
                        command: cmd.clone(),
                    });
                }
                Ok(None) if started.elapsed() >= timeout => {
                    stop_group(&mut child);
                    return Err(HookError::Timeout {
                        stage,
                        command: cmd.clone(),
                        secs: timeout.as_secs(),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(source) => {
                    return Err(HookError::Spawn {
                        stage,
                        command: cmd.clone(),
                        source,
                    })
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_run_in_order_and_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let cmds = vec![
            format!(
                "echo \"one $BACKUPD_POLICY $BACKUPD_HOOK\" >> {}",
                out.display()
            ),
            format!("echo two >> {}", out.display()),
        ];
        run_hooks(
            "pre",
            &cmds,
            &[("BACKUPD_POLICY", "p1".into())],
            Duration::from_secs(10),
            None,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one p1 pre\ntwo\n");

        let err = run_hooks(
            "pre",
            &["exit 3".into(), format!("echo no >> {}", out.display())],
            &[],
            Duration::from_secs(10),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("exit status: 3"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one p1 pre\ntwo\n");

        // A timed-out hook's children go too: the background one would write after 2 s.
        let late = dir.path().join("late");
        let t0 = Instant::now();
        let err = run_hooks(
            "post",
            &[format!("(sleep 2; touch {}) & sleep 30", late.display())],
            &[],
            Duration::from_millis(300),
            None,
        )
        .unwrap_err();
        assert!(matches!(err, HookError::Timeout { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!late.exists(), "the hook's background child was stopped");

        let cancel = CancelToken::new();
        cancel.cancel();
        let err = run_hooks(
            "pre",
            &["true".into()],
            &[],
            Duration::from_secs(10),
            Some(&cancel),
        )
        .unwrap_err();
        assert!(matches!(err, HookError::Interrupted { .. }), "{err}");
    }
}
