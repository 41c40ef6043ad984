//! The live RPO of PostgreSQL policies: how far the server's WAL archiving (into the
//! policy's repository, by `archive_command = 'backupd wal-push %p'`) is behind, polled
//! from `pg_stat_archiver` and `pg_current_wal_lsn()`: complete segments pending, and an
//! upper bound on the commits the repository could lose ([`RpoTracker`]); the server's
//! archiving settings are checked against the policy's `rpo` at every poll (a warning when
//! what they say changes).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::metrics::{Registry, WalStatus};
use crate::policy::{Policy, SourceSpec};
use crate::postgres::conn::env_with_password;
use crate::postgres::rpo::{archive_problems, durable_end, parse_lsn, ArchiveSettings, RpoTracker};
use crate::postgres::walname::Segment;

/// How often each server is asked.
pub const POLL_EVERY: Duration = Duration::from_secs(30);

/// Computes the status from the server's answers.
pub fn status_from(
    current_wal: &str,
    last_archived_wal: Option<&str>,
    last_archived_time: Option<f64>,
    last_failed_time: Option<f64>,
    segment_size: u64,
    now: f64,
) -> WalStatus {
    let cur = Segment::parse(current_wal, segment_size);
    let last = last_archived_wal
        .and_then(|w| w.get(..24))
        .and_then(|w| Segment::parse(w, segment_size));
    // The segment being written is not complete, so not archivable yet.
    let pending = match (cur, last) {
        (Some(c), Some(l)) => c.number.saturating_sub(l.number + 1),
        (Some(c), None) => c.number.saturating_sub(1),
        _ => 0,
    };
    WalStatus {
        pending_segments: pending,
        lag_seconds: match (pending, last_archived_time) {
            (0, _) => Some(0.0),
            (_, Some(t)) => Some((now - t).max(0.0)),
            (_, None) => None,
        },
        last_archived: last_archived_time,
        failing: match (last_failed_time, last_archived_time) {
            (Some(f), Some(a)) => f > a,
            (Some(_), None) => true,
            _ => false,
        },
        rpo_seconds: None,
        rpo_objective_seconds: 0.0,
        stream_slot_present: None,
        stream_retained_bytes: None,
    }
}

/// One poll's answers.
struct Polled {
    status: WalStatus,
    settings: ArchiveSettings,
    target: String,
    now: f64,
    current_lsn: Option<u64>,
    durable: Option<u64>,
    /// The policy streams WAL (archive_timeout does not bound its RPO).
    wal_stream: bool,
    /// The earliest time a commit the archive lacks could be from, when no earlier poll
    /// says better: the server's start or its last archive, whichever is older.
    unknown_since: f64,
}

async fn poll(policy: &Policy) -> Result<Polled, String> {
    let SourceSpec::Postgres(pg) = &policy.source else {
        return Err("not a postgres policy".into());
    };
    // A password command may take its time: not on the scheduler's threads.
    let password = match pg.password.clone() {
        Some(src) => Some(
            tokio::task::spawn_blocking(move || {
                crate::secret_source::read_secret(&src).map_err(|e| format!("{e:#}"))
            })
            .await
            .map_err(|e| e.to_string())??,
        ),
        None => None,
    };
    let env = env_with_password(password.as_deref().map(|p| p.as_str()));
    let resolved = pg.conn_settings().resolve(env);
    let config = resolved.config(env).map_err(|e| e.to_string())?;
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connecting to {resolved}: {e}"))?;
    let conn_task = tokio::spawn(conn);
    // The slot of a streaming policy: its restart_lsn is what the streamer confirmed as
    // stored in the repository.
    let slot = if pg.wal_stream {
        pg.slot_name(&policy.name)
    } else {
        String::new()
    };
    let row = client
        .query_one(
            "SELECT pg_walfile_name(pg_current_wal_lsn()),
                    last_archived_wal,
                    extract(epoch from last_archived_time)::float8,
                    extract(epoch from last_failed_time)::float8,
                    (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
                    extract(epoch from now())::float8,
                    pg_current_wal_lsn()::text,
                    extract(epoch from pg_postmaster_start_time())::float8,
                    current_setting('archive_mode'),
                    current_setting('archive_command'),
                    (SELECT setting::bigint FROM pg_settings WHERE name = 'archive_timeout'),
                    (SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8
                       FROM pg_replication_slots WHERE slot_name = $1),
                    (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1)
               FROM pg_stat_archiver",
            &[&slot],
        )
        .await
        .map_err(|e| format!("querying pg_stat_archiver: {e}"))?;
    drop(client);
    let _ = conn_task.await;
    let current: String = row.get(0);
    let last: Option<String> = row.get(1);
    let seg = row.get::<_, i64>(4).max(1) as u64;
    let now: f64 = row.get(5);
    let last_archived_time: Option<f64> = row.get(2);
    let started: f64 = row.get(7);
    let mut status = status_from(
        &current,
        last.as_deref(),
        last_archived_time,
        row.get(3),
        seg,
        now,
    );
    let mut durable = durable_end(last.as_deref(), seg);
    if pg.wal_stream {
        let present = row.get::<_, i64>(13) > 0;
        status.stream_slot_present = Some(present);
        status.stream_retained_bytes = row.get(12);
        let streamed = row.get::<_, Option<String>>(11).and_then(|l| parse_lsn(&l));
        durable = durable.max(streamed);
    }
    Ok(Polled {
        status,
        settings: ArchiveSettings {
            archive_mode: row.get(8),
            archive_command: row.get(9),
            archive_timeout_secs: row.get::<_, Option<i64>>(10).unwrap_or(0).max(0) as u64,
        },
        target: resolved.to_string(),
        now,
        current_lsn: parse_lsn(&row.get::<_, String>(6)),
        durable,
        wal_stream: pg.wal_stream,
        unknown_since: last_archived_time.map_or(started, |a| a.min(started)),
    })
}

/// Polls every postgres policy's server until `stop`.
pub async fn run(
    policies: Vec<Arc<Policy>>,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) {
    let pg: Vec<Arc<Policy>> = policies
        .into_iter()
        .filter(|p| matches!(p.source, SourceSpec::Postgres(_)))
        .collect();
    if pg.is_empty() {
        return;
    }
    let mut trackers: std::collections::HashMap<String, RpoTracker> = Default::default();
    let mut said: std::collections::HashMap<String, Vec<String>> = Default::default();
    loop {
        for p in &pg {
            let SourceSpec::Postgres(spec) = &p.source else {
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(20), poll(p)).await {
                Ok(Ok(polled)) => {
                    let mut s = polled.status;
                    s.rpo_objective_seconds = spec.rpo.as_secs_f64();
                    s.rpo_seconds = polled.current_lsn.map(|lsn| {
                        trackers.entry(p.name.clone()).or_default().observe(
                            polled.now,
                            lsn,
                            polled.durable,
                            polled.unknown_since,
                        )
                    });
                    // The server's settings against the objective: said at the first poll
                    // and whenever what they say changes.
                    let mut problems = if polled.wal_stream {
                        vec![]
                    } else {
                        archive_problems(&polled.settings, spec.rpo, &polled.target)
                    };
                    if s.stream_slot_present == Some(false) {
                        problems.push(format!(
                            "replication slot {} is missing on {}: the WAL stream cannot resume where it was (wal-stream --create-slot makes it; WAL between is only in the archive if archive_command stored it)",
                            spec.slot_name(&p.name),
                            polled.target
                        ));
                    }
                    if said.get(&p.name) != Some(&problems) {
                        for w in &problems {
                            tracing::warn!(policy = %p.name, "{w}");
                        }
                        said.insert(p.name.clone(), problems);
                    }
                    registry.set_wal(&p.name, Some(s));
                }
                Ok(Err(e)) => {
                    tracing::warn!(policy = %p.name, "WAL archive status: {e}");
                    registry.set_wal(&p.name, None);
                }
                Err(_) => registry.set_wal(&p.name, None),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn pending_segments_and_lag() {
        // Writing segment 5, last archived 4: nothing pending.
        let s = status_from(
            "000000010000000000000005",
            Some("000000010000000000000004"),
            Some(100.0),
            None,
            SEG,
            500.0,
        );
        assert_eq!(
            (s.pending_segments, s.lag_seconds, s.failing),
            (0, Some(0.0), false)
        );
        // Writing 9, last archived 4: 5..8 pending since the last archive 400 s ago.
        let s = status_from(
            "000000010000000000000009",
            Some("000000010000000000000004"),
            Some(100.0),
            Some(450.0),
            SEG,
            500.0,
        );
        assert_eq!(
            (s.pending_segments, s.lag_seconds, s.failing),
            (4, Some(400.0), true)
        );
        // A .backup or .history file as the last archived name.
        let s = status_from(
            "000000010000000000000003",
            Some("000000010000000000000002.00000028.backup"),
            Some(10.0),
            None,
            SEG,
            20.0,
        );
        assert_eq!(s.pending_segments, 0);
    }
}
