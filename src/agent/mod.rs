//! The resident agent (`backupd agent`): runs every policy of the policy directory on its
//! schedule ([`scheduler`]) as child processes ([`runner`]), remembers what it ran
//! ([`state`]), serves `/metrics` and `/healthz` ([`metrics`]), watches WAL archiving of
//! PostgreSQL policies ([`wal_lag`]), reloads on SIGHUP (an invalid reload keeps the old
//! policies) and stops on SIGTERM/SIGINT, letting running jobs finish within a deadline and
//! stopping them cleanly (no snapshot) after it.

pub mod metrics;
pub mod runner;
pub mod scheduler;
pub mod state;
pub mod streamer;
pub mod wal_lag;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinHandle;

use crate::policy::{self, Policy, PolicyError};
use metrics::Registry;
use scheduler::{JobKind, LoopSpec, Shared, SystemClock};
use state::AgentState;

/// Agent errors (at start; once running, failures are logged and counted).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The policies do not load.
    #[error(transparent)]
    Policies(#[from] PolicyError),
    /// The state directory.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The metrics address cannot be bound.
    #[error("cannot listen on {addr} for /metrics: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The runtime, signals or this program's path.
    #[error("agent setup: {0}")]
    Setup(String),
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The policy directory.
    pub policies: PathBuf,
    /// Where the state file lives.
    pub state_dir: PathBuf,
    /// The metrics address.
    pub listen: SocketAddr,
    /// Jobs at once.
    pub max_concurrent: usize,
    /// How long running jobs may go on after SIGTERM.
    pub shutdown_timeout: Duration,
}

struct Running {
    fingerprint: String,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

struct Supervisor {
    shared: Arc<Shared>,
    state: Arc<AgentState>,
    registry: Arc<Registry>,
    loops: HashMap<String, Running>,
    run_locks: HashMap<String, Arc<Mutex<()>>>,
    wal_stop: Option<watch::Sender<bool>>,
    finished: Vec<JoinHandle<()>>,
    /// How to start `wal-stream` children (none in tests that run no processes).
    streamer: Option<streamer::StreamerSpawn>,
}

impl Supervisor {
    /// Makes the running loops match `policies`: unchanged ones keep running, changed or
    /// removed ones stop scheduling (a run in progress finishes), new ones start.
    fn apply(&mut self, policies: Vec<Policy>) {
        let policies: Vec<Arc<Policy>> = policies.into_iter().map(Arc::new).collect();
        self.registry.set_policies(
            &policies
                .iter()
                .map(|p| (p.name.clone(), p.source.kind().to_string()))
                .collect::<Vec<_>>(),
        );
        let wanted: HashMap<String, String> = policies
            .iter()
            .map(|p| (p.name.clone(), format!("{:?}", p.as_ref())))
            .collect();
        let old: Vec<String> = self.loops.keys().cloned().collect();
        for name in old {
            if wanted.get(&name) != self.loops.get(&name).map(|r| &r.fingerprint) {
                if let Some(r) = self.loops.remove(&name) {
                    let _ = r.stop.send(true);
                    self.finished.extend(r.tasks);
                }
            }
        }
        for p in &policies {
            if self.loops.contains_key(&p.name) {
                continue;
            }
            let (stop, _) = watch::channel(false);
            let lock = self
                .run_locks
                .entry(p.name.clone())
                .or_insert_with(|| Arc::new(Mutex::new(())))
                .clone();
            let st = self.state.get(&p.name);
            let mut tasks = vec![];
            if let Some(s) = &p.schedule {
                tasks.push(tokio::spawn(scheduler::policy_loop(
                    self.shared.clone(),
                    LoopSpec {
                        policy: p.clone(),
                        kind: JobKind::Backup,
                        cron: s.cron.clone(),
                        catch_up: s.catch_up,
                        jitter: s.jitter,
                        last_handled: st.last_backup_fire,
                        cut_short: st.cut_short_backup_fire,
                    },
                    lock.clone(),
                    stop.subscribe(),
                )));
            }
            if let Some(cron) = p.verify.as_ref().and_then(|v| v.cron.clone()) {
                tasks.push(tokio::spawn(scheduler::policy_loop(
                    self.shared.clone(),
                    LoopSpec {
                        policy: p.clone(),
                        kind: JobKind::Verify,
                        cron,
                        catch_up: p.schedule.as_ref().is_none_or(|s| s.catch_up),
                        jitter: p.schedule.as_ref().map_or(Duration::ZERO, |s| s.jitter),
                        last_handled: st.last_verify_fire,
                        cut_short: st.cut_short_verify_fire,
                    },
                    lock.clone(),
                    stop.subscribe(),
                )));
            }
            if let (Some(spawn), crate::policy::SourceSpec::Postgres(pg)) =
                (&self.streamer, &p.source)
            {
                if pg.wal_stream {
                    tasks.push(tokio::spawn(streamer::supervise(
                        spawn.clone(),
                        p.clone(),
                        self.registry.clone(),
                        stop.subscribe(),
                    )));
                }
            }
            tracing::info!(policy = %p.name, "{p}");
            self.loops.insert(
                p.name.clone(),
                Running {
                    fingerprint: format!("{:?}", p.as_ref()),
                    stop,
                    tasks,
                },
            );
        }
        if let Some(s) = self.wal_stop.take() {
            let _ = s.send(true);
        }
        let (wal_stop, wal_rx) = watch::channel(false);
        tokio::spawn(wal_lag::run(policies, self.registry.clone(), wal_rx));
        self.wal_stop = Some(wal_stop);
    }

    fn stop_all(&mut self) {
        for (_, r) in self.loops.drain() {
            let _ = r.stop.send(true);
            self.finished.extend(r.tasks);
        }
        if let Some(s) = self.wal_stop.take() {
            let _ = s.send(true);
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
///
/// Logs what the policies accept but should change (deprecated keys).
fn warn_deprecated(policies: &[Policy]) {
    for p in policies {
        for w in &p.warnings {
            tracing::warn!(policy = %p.name, "{w}");
        }
    }
}

/// # Errors
/// Invalid policies, an unusable state directory or metrics address, at start.
pub fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let policies = policy::load_dir(&opts.policies)?;
    warn_deprecated(&policies);
    let state = Arc::new(AgentState::open(&opts.state_dir)?);
    let exe = std::env::current_exe()
        .map_err(|e| AgentError::Setup(format!("this program's path: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agent")
        .enable_all()
        .build()
        .map_err(|e| AgentError::Setup(e.to_string()))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: opts.listen,
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(opts.listen);
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "/metrics is served beyond loopback");
        }
        let registry = Arc::new(Registry::new(state.clone()));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let streamer = streamer::StreamerSpawn {
            exe: exe.clone(),
            policies: opts.policies.clone(),
        };
        let runner = Arc::new(runner::ProcessRunner {
            exe,
            policies: opts.policies.clone(),
            shutdown: shutdown_rx.clone(),
            shutdown_timeout: opts.shutdown_timeout,
        });
        let shared = Arc::new(Shared {
            clock: Arc::new(SystemClock),
            runner,
            observer: registry.clone(),
            slots: Arc::new(Semaphore::new(opts.max_concurrent.max(1))),
            shutdown: shutdown_rx.clone(),
        });
        let mut sigs = [
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ]
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AgentError::Setup(format!("signals: {e}")))?;
        let mut hup = sigs.pop().expect("three signals");
        let mut int = sigs.pop().expect("three signals");
        let mut term = sigs.pop().expect("three signals");
        let server = tokio::spawn(metrics::serve(listener, registry.clone(), shutdown_rx.clone()));
        let mut sup = Supervisor {
            shared,
            state,
            registry: registry.clone(),
            loops: HashMap::new(),
            run_locks: HashMap::new(),
            wal_stop: None,
            finished: vec![],
            streamer: Some(streamer),
        };
        let n = policies.len();
        sup.apply(policies);
        tracing::info!(policies = n, metrics = %format!("http://{addr}/metrics"), "agent started");
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    match policy::load_dir(&opts.policies) {
                        Ok(p) => {
                            tracing::info!(policies = p.len(), "reloaded the policies");
                            warn_deprecated(&p);
                            registry.reloaded(true);
                            sup.apply(p);
                        }
                        Err(e) => {
                            registry.reloaded(false);
                            tracing::error!("reload refused, the previous policies stay in force: {e}");
                        }
                    }
                }
            }
        }
        tracing::info!(timeout_secs = opts.shutdown_timeout.as_secs(), "stopping: running jobs may finish within the shutdown timeout");
        let _ = shutdown_tx.send(true);
        sup.stop_all();
        let all = std::mem::take(&mut sup.finished);
        let wait = futures_join(all);
        if tokio::time::timeout(opts.shutdown_timeout + Duration::from_secs(30), wait)
            .await
            .is_err()
        {
            tracing::error!("jobs did not stop in time; exiting anyway (their processes are killed)");
        }
        server.abort();
        tracing::info!("agent stopped");
        Ok(())
    })
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}
