//! The agent's numbers for monitoring, and the loopback HTTP endpoint that serves them:
//! `/metrics` in the Prometheus text format and `/healthz`. Whatever connects to it can
//! only hold a bounded number of connections for a bounded time (see [`serve`]): a local
//! process opening many idle ones must not stall `/healthz` or make the agent spin.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use super::scheduler::{JobKind, JobOutcome, Observer};
use super::state::AgentState;

/// WAL archiving of a PostgreSQL policy's server, as last polled.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WalStatus {
    /// Complete segments not yet archived.
    pub pending_segments: u64,
    /// Seconds since the last archived segment when some are pending (the live RPO), 0
    /// when none is; unknown when segments are pending and none was ever archived.
    pub lag_seconds: Option<f64>,
    /// When the last segment was archived.
    pub last_archived: Option<f64>,
    /// Whether the last archive attempt failed.
    pub failing: bool,
    /// An upper bound on how much time of commits the repository could lose now (0 only
    /// while the archive holds everything the server has written); see
    /// `postgres::rpo::RpoTracker`.
    pub rpo_seconds: Option<f64>,
    /// The policy's objective (`source.rpo`).
    pub rpo_objective_seconds: f64,
    /// For a policy that streams WAL: whether its replication slot exists on the server.
    pub stream_slot_present: Option<bool>,
    /// Bytes of WAL the server keeps for the slot (its current position minus the slot's
    /// `restart_lsn`, which the streamer moves only once the repository holds the WAL).
    pub stream_retained_bytes: Option<f64>,
}

/// One policy's numbers.
#[derive(Clone, Debug, Default)]
pub struct PolicyMetrics {
    source: String,
    last_success: Option<DateTime<Utc>>,
    last_failure: Option<DateTime<Utc>>,
    last_duration: Option<f64>,
    bytes_read: u64,
    bytes_added: u64,
    dedup_ratio: f64,
    runs_ok: u64,
    runs_failed: u64,
    consecutive_failures: u64,
    running: bool,
    next_run: Option<DateTime<Utc>>,
    requests: BTreeMap<String, u64>,
    verify_last: Option<DateTime<Utc>>,
    verify_ok: Option<bool>,
    verify_duration: Option<f64>,
    retention_last: Option<DateTime<Utc>>,
    retention_ok: Option<bool>,
    wal: Option<WalStatus>,
    stream_up: Option<bool>,
    /// From the last key-rotation job: the repository, its newest generation, and when
    /// that generation was made.
    key: Option<(String, u64, DateTime<Utc>)>,
}

/// Every policy's numbers; also the scheduler's observer, keeping the state file.
pub struct Registry {
    policies: Mutex<BTreeMap<String, PolicyMetrics>>,
    state: Arc<AgentState>,
    started: DateTime<Utc>,
    reloads: Mutex<(u64, u64)>,
}

fn secs(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Registry {
    /// An empty registry writing through to `state`.
    pub fn new(state: Arc<AgentState>) -> Self {
        Registry {
            policies: Mutex::new(BTreeMap::new()),
            state,
            started: Utc::now(),
            reloads: Mutex::new((0, 0)),
        }
    }

    fn with(&self, policy: &str, f: impl FnOnce(&mut PolicyMetrics)) {
        let mut g = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        f(g.entry(policy.to_string()).or_default());
    }

    /// Makes the set of policies exactly `names` (with their source kinds), keeping the
    /// numbers of those that stay.
    pub fn set_policies(&self, names: &[(String, String)]) {
        let mut g = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|k, _| names.iter().any(|(n, _)| n == k));
        for (n, kind) in names {
            let m = g.entry(n.clone()).or_default();
            m.source = kind.clone();
            if m.last_success.is_none() {
                m.last_success = self.state.get(n).last_success;
            }
        }
    }

    /// Counts a reload.
    pub fn reloaded(&self, ok: bool) {
        let mut r = self.reloads.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            r.0 += 1;
        } else {
            r.1 += 1;
        }
    }

    /// Records a WAL poll.
    pub fn set_wal(&self, policy: &str, w: Option<WalStatus>) {
        self.with(policy, |m| m.wal = w);
    }

    /// Whether the policy's `wal-stream` child is running.
    pub fn set_stream_up(&self, policy: &str, up: bool) {
        self.with(policy, |m| m.stream_up = Some(up));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = self.policies.lock().unwrap_or_else(|e| e.into_inner());
        let mut o = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for (labels, v) in rows {
                if labels.is_empty() {
                    let _ = writeln!(o, "{name} {v}");
                } else {
                    let _ = writeln!(o, "{name}{{{labels}}} {v}");
                }
            }
        };
        let per = |f: &dyn Fn(&PolicyMetrics) -> Option<f64>| -> Vec<(String, f64)> {
            g.iter()
                .filter_map(|(n, m)| f(m).map(|v| (format!("policy=\"{}\"", esc(n)), v)))
                .collect()
        };
        family(
            "backupd_policy_info",
            "gauge",
            "Policies loaded (value 1), with their source kind.",
            g.iter()
                .map(|(n, m)| {
                    (
                        format!("policy=\"{}\",source=\"{}\"", esc(n), esc(&m.source)),
                        1.0,
                    )
                })
                .collect(),
        );
        family(
            "backupd_policy_last_success_timestamp_seconds",
            "gauge",
            "End of the last successful backup.",
            per(&|m| m.last_success.map(secs)),
        );
        family(
            "backupd_policy_last_failure_timestamp_seconds",
            "gauge",
            "End of the last failed backup attempt.",
            per(&|m| m.last_failure.map(secs)),
        );
        family(
            "backupd_policy_last_duration_seconds",
            "gauge",
            "Duration of the last backup run.",
            per(&|m| m.last_duration),
        );
        family(
            "backupd_policy_last_bytes_read",
            "gauge",
            "Bytes read from the source by the last successful backup.",
            per(&|m| m.last_success.map(|_| m.bytes_read as f64)),
        );
        family(
            "backupd_policy_last_bytes_added",
            "gauge",
            "New bytes added to the repository by the last successful backup.",
            per(&|m| m.last_success.map(|_| m.bytes_added as f64)),
        );
        family(
            "backupd_policy_last_dedup_ratio",
            "gauge",
            "Share of the last snapshot already in the repository.",
            per(&|m| m.last_success.map(|_| m.dedup_ratio)),
        );
        family(
            "backupd_policy_runs_total",
            "counter",
            "Backup runs by result.",
            g.iter()
                .flat_map(|(n, m)| {
                    [
                        (
                            format!("policy=\"{}\",result=\"success\"", esc(n)),
                            m.runs_ok as f64,
                        ),
                        (
                            format!("policy=\"{}\",result=\"failure\"", esc(n)),
                            m.runs_failed as f64,
                        ),
                    ]
                })
                .collect(),
        );
        family(
            "backupd_policy_consecutive_failures",
            "gauge",
            "Backup attempts failed in a row.",
            per(&|m| Some(m.consecutive_failures as f64)),
        );
        family(
            "backupd_policy_running",
            "gauge",
            "1 while a job of the policy runs.",
            per(&|m| Some(if m.running { 1.0 } else { 0.0 })),
        );
        family(
            "backupd_policy_next_run_timestamp_seconds",
            "gauge",
            "When the next backup is planned.",
            per(&|m| m.next_run.map(secs)),
        );
        family(
            "backupd_policy_s3_requests_total",
            "counter",
            "Repository requests made by the policy's jobs, by kind.",
            g.iter()
                .flat_map(|(n, m)| {
                    m.requests.iter().map(move |(k, v)| {
                        (
                            format!("policy=\"{}\",kind=\"{}\"", esc(n), esc(k)),
                            *v as f64,
                        )
                    })
                })
                .collect(),
        );
        family(
            "backupd_policy_last_retention_success",
            "gauge",
            "1 if the last forget/prune after a backup worked.",
            per(&|m| m.retention_ok.map(|ok| if ok { 1.0 } else { 0.0 })),
        );
        family(
            "backupd_policy_last_verify_timestamp_seconds",
            "gauge",
            "End of the last verification (restore test).",
            per(&|m| m.verify_last.map(secs)),
        );
        family(
            "backupd_policy_last_verify_success",
            "gauge",
            "1 if the last verification passed.",
            per(&|m| m.verify_ok.map(|ok| if ok { 1.0 } else { 0.0 })),
        );
        family(
            "backupd_policy_last_verify_duration_seconds",
            "gauge",
            "Duration of the last verification.",
            per(&|m| m.verify_duration),
        );
        family(
            "backupd_wal_archive_pending_segments",
            "gauge",
            "Complete WAL segments the server has not archived yet.",
            per(&|m| m.wal.as_ref().map(|w| w.pending_segments as f64)),
        );
        family(
            "backupd_wal_archive_lag_seconds",
            "gauge",
            "Age of the oldest complete but unarchived WAL segment (0 when none is pending); it does not see commits in the segment being written: backupd_wal_rpo_seconds does.",
            per(&|m| m.wal.as_ref().and_then(|w| w.lag_seconds)),
        );
        family(
            "backupd_wal_rpo_seconds",
            "gauge",
            "Upper bound on how much time of commits the repository could lose now: the time since the archive last held everything the server had written (0 while it does).",
            per(&|m| m.wal.as_ref().and_then(|w| w.rpo_seconds)),
        );
        family(
            "backupd_policy_rpo_objective_seconds",
            "gauge",
            "The policy's recovery point objective (source.rpo).",
            per(&|m| m.wal.as_ref().map(|w| w.rpo_objective_seconds)),
        );
        family(
            "backupd_wal_last_archived_timestamp_seconds",
            "gauge",
            "When the server last archived a WAL file.",
            per(&|m| m.wal.as_ref().and_then(|w| w.last_archived)),
        );
        family(
            "backupd_wal_stream_up",
            "gauge",
            "1 while the policy's wal-stream process runs (wal_stream = true), 0 while it is being restarted.",
            per(&|m| m.stream_up.map(|u| if u { 1.0 } else { 0.0 })),
        );
        family(
            "backupd_wal_stream_slot_present",
            "gauge",
            "1 if the policy's replication slot exists on the server (0: the stream cannot resume where it was).",
            per(&|m| m.wal.as_ref().and_then(|w| w.stream_slot_present).map(|p| if p { 1.0 } else { 0.0 })),
        );
        family(
            "backupd_wal_stream_slot_retained_bytes",
            "gauge",
            "Bytes of WAL the server keeps for the policy's replication slot: grows while the stream is behind or stopped.",
            per(&|m| m.wal.as_ref().and_then(|w| w.stream_retained_bytes)),
        );
        family(
            "backupd_wal_archive_failing",
            "gauge",
            "1 if the server's last archive attempt failed.",
            per(&|m| m.wal.as_ref().map(|w| if w.failing { 1.0 } else { 0.0 })),
        );
        // Per repository (several policies may share one: the newest generation wins).
        let mut repos: BTreeMap<String, (u64, DateTime<Utc>)> = BTreeMap::new();
        for m in g.values() {
            if let Some((r, gen, made)) = &m.key {
                let e = repos.entry(r.clone()).or_insert((*gen, *made));
                if *gen > e.0 {
                    *e = (*gen, *made);
                }
            }
        }
        let now = Utc::now();
        family(
            "backupd_repository_key_generation",
            "gauge",
            "The repository's newest key generation (new objects are sealed with it).",
            repos
                .iter()
                .map(|(r, (gen, _))| (format!("repository=\"{}\"", esc(r)), *gen as f64))
                .collect(),
        );
        family(
            "backupd_repository_key_age_seconds",
            "gauge",
            "How old the repository's newest key generation is.",
            repos
                .iter()
                .map(|(r, (_, made))| {
                    (
                        format!("repository=\"{}\"", esc(r)),
                        now.signed_duration_since(*made).num_seconds().max(0) as f64,
                    )
                })
                .collect(),
        );
        let r = *self.reloads.lock().unwrap_or_else(|e| e.into_inner());
        family(
            "backupd_agent_reloads_total",
            "counter",
            "Policy reloads by result.",
            vec![
                ("result=\"success\"".into(), r.0 as f64),
                ("result=\"failure\"".into(), r.1 as f64),
            ],
        );
        family(
            "backupd_agent_start_timestamp_seconds",
            "gauge",
            "When the agent started.",
            vec![(String::new(), secs(self.started))],
        );
        o
    }
}

impl Observer for Registry {
    fn fire_started(&self, policy: &str, kind: JobKind, fire: DateTime<Utc>) {
        self.state.update(policy, |s| match kind {
            JobKind::Verify => s.cut_short_verify_fire = Some(fire),
            _ => s.cut_short_backup_fire = Some(fire),
        });
    }

    fn fire_handled(&self, policy: &str, kind: JobKind, fire: DateTime<Utc>) {
        self.state.update(policy, |s| match kind {
            JobKind::Verify => {
                s.last_verify_fire = Some(fire);
                s.cut_short_verify_fire = None;
            }
            _ => {
                s.last_backup_fire = Some(fire);
                s.cut_short_backup_fire = None;
            }
        });
    }

    fn next_run(&self, policy: &str, kind: JobKind, at: DateTime<Utc>) {
        if kind == JobKind::Backup {
            self.with(policy, |m| m.next_run = Some(at));
        }
    }

    fn started(&self, policy: &str, kind: JobKind, _at: DateTime<Utc>) {
        tracing::info!(policy, job = kind.as_str(), "run starts");
        self.with(policy, |m| m.running = true);
    }

    fn finished(
        &self,
        policy: &str,
        kind: JobKind,
        started: DateTime<Utc>,
        ended: DateTime<Utc>,
        outcome: &JobOutcome,
    ) {
        let duration = (ended - started).num_milliseconds() as f64 / 1000.0;
        let summary = match outcome {
            JobOutcome::Success(s) => s.clone(),
            _ => None,
        };
        match outcome {
            JobOutcome::Success(_) => {
                tracing::info!(
                    policy,
                    job = kind.as_str(),
                    duration_secs = duration,
                    "run succeeded"
                )
            }
            JobOutcome::Failed(why) => {
                tracing::error!(
                    policy,
                    job = kind.as_str(),
                    duration_secs = duration,
                    "run failed: {why}"
                )
            }
            JobOutcome::Abandoned => {
                tracing::warn!(
                    policy,
                    job = kind.as_str(),
                    "run stopped: the agent is shutting down"
                )
            }
        }
        let ok = matches!(outcome, JobOutcome::Success(_));
        if kind == JobKind::Backup && ok {
            self.state.update(policy, |s| s.last_success = Some(ended));
        }
        self.with(policy, |m| {
            m.running = false;
            if let Some(req) = summary
                .as_ref()
                .and_then(|s| s.get("requests"))
                .and_then(|r| r.as_object())
            {
                for (k, v) in req {
                    if let Some(n) = v.as_u64() {
                        if !k.starts_with("bytes") {
                            *m.requests.entry(k.clone()).or_default() += n;
                        }
                    }
                }
            }
            match kind {
                JobKind::Backup => {
                    m.last_duration = Some(duration);
                    match outcome {
                        JobOutcome::Success(s) => {
                            m.last_success = Some(ended);
                            m.runs_ok += 1;
                            m.consecutive_failures = 0;
                            let num = |k: &str| {
                                s.as_ref()
                                    .and_then(|s| s.get(k))
                                    .and_then(|v| v.as_f64())
                                    .unwrap_or(0.0)
                            };
                            m.bytes_read = num("bytes_read") as u64;
                            m.bytes_added = num("bytes_added") as u64;
                            m.dedup_ratio = num("dedup_ratio");
                        }
                        JobOutcome::Failed(_) => {
                            m.last_failure = Some(ended);
                            m.runs_failed += 1;
                            m.consecutive_failures += 1;
                        }
                        JobOutcome::Abandoned => {}
                    }
                }
                JobKind::Retention => {
                    m.retention_last = Some(ended);
                    m.retention_ok = Some(ok);
                }
                JobKind::KeyRotation => {
                    let s = summary.as_ref();
                    let repo = s.and_then(|s| s.get("repository")).and_then(|v| v.as_str());
                    let generation = s.and_then(|s| s.get("generation")).and_then(|v| v.as_u64());
                    let age = s
                        .and_then(|s| s.get("age_seconds"))
                        .and_then(|v| v.as_u64());
                    if let (Some(r), Some(g), Some(a)) = (repo, generation, age) {
                        let made = ended - chrono::Duration::seconds(a as i64);
                        m.key = Some((r.to_string(), g, made));
                    }
                }
                JobKind::Verify => {
                    if !matches!(outcome, JobOutcome::Abandoned) {
                        m.verify_last = Some(ended);
                        m.verify_ok = Some(ok);
                        m.verify_duration = Some(duration);
                    }
                }
            }
        });
    }
}

/// Connections served at once. At the cap, a new connection closes the one that has waited
/// longest for its request (a client holding a connection open without asking anything),
/// or, when every one is being answered, waits for one to finish.
const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request head, and to take the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The first pause after a failed accept; it doubles while accepts keep failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause after a failed accept.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A connection still reading its request head: the one to close when a slot is needed.
struct Waiting {
    reading: Arc<AtomicBool>,
    task: AbortHandle,
}

/// Connections still reading their request head, oldest first.
#[derive(Default)]
struct WaitingQueue(Mutex<VecDeque<Waiting>>);

impl WaitingQueue {
    fn push(&self, w: Waiting) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|w| w.reading.load(Ordering::Acquire) && !w.task.is_finished());
        q.push_back(w);
    }

    /// Closes the oldest connection still waiting for its request; false if none is.
    fn close_oldest(&self) -> bool {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(w) = q.pop_front() {
            if w.reading.load(Ordering::Acquire) && !w.task.is_finished() {
                w.task.abort();
                return true;
            }
        }
        false
    }
}

/// Serves `/metrics` and `/healthz` until `stop` turns true.
///
/// Bounded whatever clients do: at most [`MAX_CONNECTIONS`] at once (so at most that many
/// descriptors), each given [`IO_TIMEOUT`] to ask and to take the answer; and when accept
/// fails (out of descriptors: the pending connection stays queued, so an immediate retry
/// fails again), the loop pauses, 10 ms doubling to 1 s, instead of spinning.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let waiting = WaitingQueue::default();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.changed() => return,
        };
        let sock = match conn {
            Ok((sock, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                sock
            }
            Err(e) => {
                if backoff == ACCEPT_BACKOFF_MIN {
                    tracing::warn!(
                        "/metrics: accepting a connection failed: {e}; retrying with back-off"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                waiting.close_oldest();
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = stop.changed() => return,
                }
            }
        };
        let reading = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(answer(sock, registry.clone(), reading.clone(), permit));
        waiting.push(Waiting {
            reading,
            task: task.abort_handle(),
        });
    }
}

/// Reads one request head and answers it; holds `_slot` until the connection is closed.
async fn answer(
    mut sock: TcpStream,
    registry: Arc<Registry>,
    reading: Arc<AtomicBool>,
    _slot: OwnedSemaphorePermit,
) {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    // Read the request head (bounded in size and time).
    let read = tokio::time::timeout(IO_TIMEOUT, async {
        while n < buf.len() {
            match sock.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    reading.store(false, Ordering::Release);
    if read.is_err() {
        return;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            registry.render(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_string()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(IO_TIMEOUT, async {
        let _ = sock.write_all(resp.as_bytes()).await;
        let _ = sock.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_labelled_values() {
        let d = tempfile::tempdir().unwrap();
        let r = Registry::new(Arc::new(AgentState::open(d.path()).unwrap()));
        r.set_policies(&[("db \"main\"".into(), "postgres".into())]);
        let t0 = Utc::now();
        r.started("db \"main\"", JobKind::Backup, t0);
        assert!(r
            .render()
            .contains("backupd_policy_running{policy=\"db \\\"main\\\"\"} 1"));
        r.finished(
            "db \"main\"",
            JobKind::Backup,
            t0,
            t0 + chrono::Duration::seconds(3),
            &JobOutcome::Success(Some(serde_json::json!({
                "bytes_read": 100, "bytes_added": 10, "dedup_ratio": 0.9,
                "requests": {"put": 3, "get": 2, "bytes_up": 99}
            }))),
        );
        let text = r.render();
        for want in [
            "# TYPE backupd_policy_runs_total counter",
            "backupd_policy_runs_total{policy=\"db \\\"main\\\"\",result=\"success\"} 1",
            "backupd_policy_last_bytes_read{policy=\"db \\\"main\\\"\"} 100",
            "backupd_policy_last_dedup_ratio{policy=\"db \\\"main\\\"\"} 0.9",
            "backupd_policy_last_duration_seconds{policy=\"db \\\"main\\\"\"} 3",
            "backupd_policy_s3_requests_total{policy=\"db \\\"main\\\"\",kind=\"put\"} 3",
            "backupd_policy_running{policy=\"db \\\"main\\\"\"} 0",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("bytes_up"), "byte counts are not requests");
        // The state file remembers the success for the next start.
        assert!(AgentState::open(d.path())
            .unwrap()
            .get("db \"main\"")
            .last_success
            .is_some());
    }
}
