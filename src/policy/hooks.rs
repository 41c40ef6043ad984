//! Running a policy's hooks: each a shell command (`sh -c`), with the policy's name and the
//! run's result in its environment, killed when it outlives the hook timeout.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Runs `commands` one after another; stops at the first failure. The hooks' output goes
/// to this process's stderr (the agent's log).
///
/// # Errors
/// The first hook that could not start, failed, or timed out.
pub fn run_hooks(
    stage: &'static str,
    commands: &[String],
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<(), HookError> {
    for cmd in commands {
        let mut c = Command::new("sh");
        c.arg("-c").arg(cmd).stdin(Stdio::null());
        // Hook output goes to stderr: stdout may carry a JSON summary.
        if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
            c.stdout(Stdio::from(fd));
        }
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
                Ok(None) if started.elapsed() >= timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
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
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one p1 pre\ntwo\n");

        let err = run_hooks(
            "pre",
            &["exit 3".into(), format!("echo no >> {}", out.display())],
            &[],
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(err.to_string().contains("exit status: 3"), "{err}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "one p1 pre\ntwo\n");

        let err =
            run_hooks("post", &["sleep 5".into()], &[], Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, HookError::Timeout { .. }), "{err}");
    }
}
