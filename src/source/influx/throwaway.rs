//! A throwaway `influxd` for restore tests: its own config, data and ports in a scratch
//! directory, listening on 127.0.0.1 only, with usage reporting and the `_internal`
//! statistics off; stopped (SIGTERM, then SIGKILL) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http::HttpApi;
use super::rpc::Rpc;

/// How long it may take to answer `/ping`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a throwaway server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ThrowawayError {
    /// The binary could not be run.
    #[error("cannot run {binary} (set [verify] influxd = PATH in the policy, or install influxdb): {source}")]
    Spawn {
        /// The binary.
        binary: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited or did not answer.
    #[error("{binary} did not start: {why}; its log: {log}")]
    NotStarted {
        /// The binary.
        binary: String,
        /// Why.
        why: String,
        /// The end of its log.
        log: String,
    },
    /// Writing its config.
    #[error("preparing {dir}: {source}")]
    Io {
        /// The scratch dir.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A running throwaway server.
pub struct Throwaway {
    child: Option<Child>,
    log: PathBuf,
    /// Its RPC port.
    pub rpc: Rpc,
    /// Its HTTP API.
    pub http: HttpApi,
}

impl Throwaway {
    /// Starts `binary` with everything under `dir` on ports `http` and `rpc`.
    ///
    /// # Errors
    /// See [`ThrowawayError`].
    pub fn start(binary: &Path, dir: &Path, http: u16, rpc: u16) -> Result<Self, ThrowawayError> {
        let io = |source| ThrowawayError::Io {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let d = dir.display();
        let conf = format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc}\"\n[meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n[http]\n  bind-address = \"127.0.0.1:{http}\"\n  log-enabled = false\n[monitor]\n  store-enabled = false\n[continuous_queries]\n  enabled = false\n"
        );
        let conf_path = dir.join("influxdb.conf");
        std::fs::write(&conf_path, conf).map_err(io)?;
        let log = dir.join("influxd.log");
        let out = std::fs::File::create(&log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let mut cmd = Command::new(binary);
        cmd.args(["run", "-config"])
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        crate::secret_env::scrub(&mut cmd);
        let child = cmd.spawn().map_err(|source| ThrowawayError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
        let http_api = HttpApi::new(&format!("http://127.0.0.1:{http}"), None)
            .expect("a loopback URL is valid");
        let mut t = Throwaway {
            child: Some(child),
            log,
            rpc: Rpc::new(&format!("127.0.0.1:{rpc}")),
            http: http_api,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if t.http.ping().is_ok() {
                return Ok(t);
            }
            let exited = t
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .map(|s| s.to_string());
            if exited.is_some() || Instant::now() > deadline {
                return Err(ThrowawayError::NotStarted {
                    binary: binary.display().to_string(),
                    why: exited.map_or_else(
                        || format!("no answer on port {http} within {START_TIMEOUT:?}"),
                        |s| format!("it exited ({s})"),
                    ),
                    log: t.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
