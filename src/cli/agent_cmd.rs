//! `backupd agent`: the resident agent (see [`crate::agent`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::GlobalArgs;
use crate::agent::{self, AgentOptions};
use crate::error::EXIT_OK;

/// Arguments of `agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Where the agent remembers the runs it handled (catch-up after downtime).
    #[arg(
        long,
        value_name = "DIR",
        env = "BACKUPD_STATE_DIR",
        default_value = "/var/lib/backupd"
    )]
    state_dir: PathBuf,
    /// Address of /metrics and /healthz.
    #[arg(
        long,
        value_name = "ADDR",
        env = "BACKUPD_LISTEN",
        default_value = "127.0.0.1:9898"
    )]
    listen: SocketAddr,
    /// Jobs running at once, over all policies.
    #[arg(long, value_name = "N", env = "BACKUPD_MAX_CONCURRENT", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=64))]
    max_concurrent: u64,
    /// After SIGTERM, running jobs may finish within this long; then they are stopped
    /// (no snapshot is written).
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    shutdown_timeout: String,
}

/// Runs `agent`.
///
/// # Errors
/// Invalid policies, state directory or address at start.
pub fn run(g: &GlobalArgs, a: AgentArgs) -> Result<i32> {
    let shutdown_timeout = crate::policy::units::parse_duration(&a.shutdown_timeout)
        .map_err(|e| anyhow::anyhow!("--shutdown-timeout {:?}: {e}", a.shutdown_timeout))?;
    agent::run(AgentOptions {
        policies: g.policies.clone(),
        state_dir: a.state_dir,
        listen: a.listen,
        max_concurrent: a.max_concurrent as usize,
        shutdown_timeout,
    })?;
    Ok(EXIT_OK)
}
