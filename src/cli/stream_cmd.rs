//! `backupd wal-stream`: receives a PostgreSQL server's WAL over a physical replication
//! slot into the repository until SIGTERM ([`crate::postgres::walstream`]); reconnects
//! with a growing pause when the connection is lost, as `pg_receivewal` does.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use zeroize::Zeroizing;

use super::pg_cmd::PgArgs;
use super::GlobalArgs;
use crate::error::EXIT_OK;
use crate::postgres::conn::{env_with_password, ConnSettings};
use crate::postgres::replication::{valid_slot_name, ConnectTo, ReplicationError};
use crate::postgres::walstream::{self, StreamError, StreamOptions};

/// Arguments of `wal-stream`.
#[derive(Args, Debug)]
pub struct WalStreamArgs {
    /// Take the server, its password, the repository and the slot from this policy.
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    #[command(flatten)]
    pg: PgArgs,
    /// The replication slot (default: the policy's, else `backupd`).
    #[arg(long, value_name = "NAME")]
    slot: Option<String>,
    /// Create the slot if it does not exist (it then keeps the server's WAL until backupd
    /// has stored it).
    #[arg(long)]
    create_slot: bool,
    /// Drop the slot and exit (the server frees the WAL it kept for it).
    #[arg(long, conflicts_with = "create_slot")]
    drop_slot: bool,
    /// How often to ask the server for its end of WAL and record when the repository held
    /// all of it: a restore can target a time up to then on a quiet server (default: the
    /// policy's wal_stream_status_every, else 1s; on S3 each is a PUT).
    #[arg(long, value_name = "DURATION")]
    status_every: Option<String>,
}

/// Pauses between reconnections: 1 s, doubling, at most 30 s.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Runs `wal-stream`.
///
/// # Errors
/// A bad slot name, a missing slot, a refused connection, or a repository failure.
pub fn run(g: &GlobalArgs, a: WalStreamArgs) -> Result<i32> {
    let mut status_every = walstream::DEFAULT_STATUS_EVERY;
    let (g, settings, password, slot) = match &a.policy {
        Some(name) => {
            let pol = crate::policy::find(&g.policies, name)?;
            let crate::policy::SourceSpec::Postgres(pg) = &pol.source else {
                bail!(
                    "policy {name} is not a postgres policy: wal-stream streams PostgreSQL's WAL"
                );
            };
            let password = pg.read_password()?;
            let slot = a.slot.clone().unwrap_or_else(|| pg.slot_name(&pol.name));
            status_every = pg.wal_stream_status_every;
            (g.for_policy(&pol), pg.conn_settings(), password, slot)
        }
        None => (
            g.clone(),
            a.pg.settings(),
            None,
            a.slot.clone().unwrap_or_else(|| "backupd".into()),
        ),
    };
    if let Some(d) = &a.status_every {
        status_every = crate::policy::units::parse_duration(d)
            .map_err(|e| anyhow::anyhow!("--status-every {d:?}: {e}"))?;
    }
    if !valid_slot_name(&slot) {
        bail!("{slot:?} is not a replication slot name (1 to 63 of a-z, 0-9 and _)");
    }
    stream_with(
        &g,
        &settings,
        password.as_deref().map(|p| p.as_str()),
        &slot,
        status_every,
        &a,
    )
}

fn stream_with(
    g: &GlobalArgs,
    settings: &ConnSettings,
    password: Option<&str>,
    slot: &str,
    status_every: Duration,
    a: &WalStreamArgs,
) -> Result<i32> {
    let env = env_with_password(password);
    let resolved = settings.resolve(env);
    let config = resolved.config(env)?;
    let password: Option<Zeroizing<Vec<u8>>> =
        config.get_password().map(|p| Zeroizing::new(p.to_vec()));
    let to = ConnectTo {
        host: &resolved.host,
        port: resolved.port,
        user: &resolved.user,
        application_name: "backupd wal-stream",
    };
    if a.drop_slot {
        walstream::drop_slot(&to, password.as_deref().map(|p| &p[..]), slot)
            .with_context(|| format!("dropping replication slot {slot}"))?;
        println!("dropped replication slot {slot}");
        return Ok(EXIT_OK);
    }
    let repo = g.open()?;
    let cancel = super::interrupt_token()?;
    let stop = cancel.flag();
    let opts = StreamOptions {
        connect: to,
        password: password.as_deref().map(|p| &p[..]),
        slot,
        create_slot: a.create_slot,
        status_every,
    };
    let mut pause = RETRY_FIRST;
    loop {
        match walstream::stream(&repo, &opts, &stop) {
            Ok(report) => {
                eprintln!(
                    "wal-stream: stopped at {} ({} bytes of WAL stored, {} segments completed)",
                    report.durable, report.stored, report.segments
                );
                return Ok(EXIT_OK);
            }
            // Lost or refused connections are retried; anything else is for the user.
            Err(StreamError::Replication(e @ ReplicationError::Io { .. })) => {
                tracing::warn!("{e}; reconnecting in {} s", pause.as_secs());
                let until = std::time::Instant::now() + pause;
                while std::time::Instant::now() < until {
                    if cancel.is_cancelled() {
                        return Ok(EXIT_OK);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                pause = (pause * 2).min(RETRY_MAX);
            }
            Err(e) => return Err(e).context(format!("wal-stream from {resolved}")),
        }
    }
}
