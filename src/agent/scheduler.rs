//! When each policy runs: its cron schedule in its zone, catch-up of a run missed while
//! the agent was down, jitter, retries with backoff, one run per policy at a time and at
//! most N runs at once. The loop is generic over the wall clock and the job runner, so
//! tests drive it under paused tokio time with a runner of their own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{watch, Mutex, Semaphore};

use crate::policy::{CronSchedule, Policy};

/// The wall clock.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that follows tokio's (pausable) time from a given start: for tests.
pub struct TokioClock {
    base: DateTime<Utc>,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Wall time `base` now.
    pub fn starting_at(base: DateTime<Utc>) -> Self {
        TokioClock {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        self.base
            + chrono::Duration::from_std(self.start.elapsed()).unwrap_or(chrono::Duration::zero())
    }
}

/// What a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// `backup --policy`.
    Backup,
    /// `forget --policy` (with prune when the retention says so), after a good backup.
    Retention,
    /// `verify --policy`.
    Verify,
    /// `key rotate --policy` (after a good backup, for a policy with `[keys]
    /// rotate_every`; it rotates only once the newest generation is that old).
    KeyRotation,
}

impl JobKind {
    /// For logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Retention => "retention",
            JobKind::Verify => "verify",
            JobKind::KeyRotation => "key-rotation",
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum JobOutcome {
    /// It worked; the command's JSON summary, if any.
    Success(Option<serde_json::Value>),
    /// It failed, with why.
    Failed(String),
    /// The agent is stopping and the run was stopped (no snapshot).
    Abandoned,
}

/// Runs jobs (the agent: child processes; tests: whatever they need).
pub trait JobRunner: Send + Sync + 'static {
    /// Runs one job of `policy`; `timeout` ends it as failed.
    fn run(
        &self,
        policy: Arc<Policy>,
        kind: JobKind,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = JobOutcome> + Send>>;
}

/// Told what happens, for metrics and state.
pub trait Observer: Send + Sync + 'static {
    /// A scheduled fire's run has ended, successfully or not (recorded for catch-up; a run
    /// cut short is not).
    fn fire_handled(&self, policy: &str, kind: JobKind, fire: DateTime<Utc>);
    /// A scheduled fire's run begins (recorded, so that a run the agent's death cuts
    /// short is caught up at the next start).
    fn fire_started(&self, _policy: &str, _kind: JobKind, _fire: DateTime<Utc>) {}
    /// The next run is planned for `at`.
    fn next_run(&self, policy: &str, kind: JobKind, at: DateTime<Utc>);
    /// A run starts.
    fn started(&self, policy: &str, kind: JobKind, at: DateTime<Utc>);
    /// A run ended.
    fn finished(
        &self,
        policy: &str,
        kind: JobKind,
        started: DateTime<Utc>,
        ended: DateTime<Utc>,
        outcome: &JobOutcome,
    );
}

/// What the loops share.
pub struct Shared {
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// The runner.
    pub runner: Arc<dyn JobRunner>,
    /// Metrics and state.
    pub observer: Arc<dyn Observer>,
    /// Runs at once, over all policies.
    pub slots: Arc<Semaphore>,
    /// Becomes true when the agent stops.
    pub shutdown: watch::Receiver<bool>,
}

/// The delay added to a fire: a fraction of `max` derived from the policy and the fire
/// time, so that many hosts with one policy do not all hit the repository at once, and a
/// run is reproducible.
pub fn jitter_for(policy: &str, fire: DateTime<Utc>, max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in policy
        .bytes()
        .chain(fire.timestamp().to_le_bytes())
        .chain(crate::host::hostname().into_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let ms = max.as_millis().min(u128::from(u64::MAX)) as u64;
    Duration::from_millis(h % (ms + 1))
}

/// The fire a catch-up would run: the last scheduled time at or before `now` that came
/// after `last_handled`.
pub fn missed_fire(
    cron: &CronSchedule,
    last_handled: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let last_handled = last_handled?;
    // Look back in growing windows: cheap for frequent schedules, still finds yearly ones.
    for days in [0u64, 1, 8, 32, 367] {
        let horizon = if days == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(days * 86_400)
        };
        if let Some(t) = cron.last_at_or_before(now, horizon) {
            return (t > last_handled).then_some(t);
        }
    }
    None
}

/// Sleeps until wall time `at` (in steps, so clock jumps are noticed) or until `stop`
/// turns true; returns false when stopped.
async fn sleep_until(
    clock: &dyn Clock,
    at: DateTime<Utc>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        if *stop.borrow() {
            return false;
        }
        let now = clock.now();
        if now >= at {
            return true;
        }
        let wait = (at - now)
            .to_std()
            .unwrap_or_default()
            .min(Duration::from_secs(60));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = stop.changed() => {
                if r.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Runs one job with its retries; then, after a good backup, the retention job. True once
/// the fire's run has ended (a success, or a failure after the last retry); false when it
/// was cut short (shutdown, a reload, the runner abandoning it).
async fn run_with_retries(
    sh: &Shared,
    policy: &Arc<Policy>,
    kind: JobKind,
    run_lock: &Mutex<()>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let sched = policy.schedule.as_ref();
    let retries = sched.map_or(0, |s| s.retries);
    let backoff = sched.map_or(Duration::from_secs(60), |s| s.retry_backoff);
    let timeout = sched.and_then(|s| s.timeout);
    for attempt in 0..=retries {
        if *sh.shutdown.borrow() {
            return false;
        }
        let outcome = {
            let _one_at_a_time = tokio::select! {
                biased;
                _ = wait_true(sh.shutdown.clone()) => return false,
                _ = wait_true(stop.clone()) => return false,
                g = run_lock.lock() => g,
            };
            let permit = tokio::select! {
                biased;
                _ = wait_true(sh.shutdown.clone()) => return false,
                _ = wait_true(stop.clone()) => return false,
                p = sh.slots.clone().acquire_owned() => p,
            };
            // Stopped (shutdown, or a reload replaced this policy) while waiting: no run.
            if *sh.shutdown.borrow() || *stop.borrow() {
                return false;
            }
            let started = sh.clock.now();
            sh.observer.started(&policy.name, kind, started);
            let outcome = sh.runner.run(policy.clone(), kind, timeout).await;
            sh.observer
                .finished(&policy.name, kind, started, sh.clock.now(), &outcome);
            if kind == JobKind::Backup
                && matches!(outcome, JobOutcome::Success(_))
                && policy.retention.is_some()
                && !*sh.shutdown.borrow()
            {
                let started = sh.clock.now();
                sh.observer
                    .started(&policy.name, JobKind::Retention, started);
                let r = sh
                    .runner
                    .run(policy.clone(), JobKind::Retention, timeout)
                    .await;
                sh.observer.finished(
                    &policy.name,
                    JobKind::Retention,
                    started,
                    sh.clock.now(),
                    &r,
                );
            }
            if kind == JobKind::Backup
                && matches!(outcome, JobOutcome::Success(_))
                && policy
                    .keys
                    .as_ref()
                    .is_some_and(|k| k.rotate_every.is_some())
                && !*sh.shutdown.borrow()
            {
                let started = sh.clock.now();
                sh.observer
                    .started(&policy.name, JobKind::KeyRotation, started);
                let r = sh
                    .runner
                    .run(policy.clone(), JobKind::KeyRotation, timeout)
                    .await;
                if let JobOutcome::Failed(why) = &r {
                    tracing::error!(policy = %policy.name, job = "key-rotation", "key rotation failed: {why}");
                }
                sh.observer.finished(
                    &policy.name,
                    JobKind::KeyRotation,
                    started,
                    sh.clock.now(),
                    &r,
                );
            }
            drop(permit);
            outcome
        };
        match outcome {
            JobOutcome::Success(_) => return true,
            JobOutcome::Abandoned => return false,
            JobOutcome::Failed(why) => {
                if attempt == retries {
                    tracing::error!(policy = %policy.name, job = kind.as_str(), attempts = attempt + 1, "giving up: {why}");
                    return true;
                }
                let delay = backoff
                    .checked_mul(1u32 << attempt.min(16))
                    .unwrap_or(backoff)
                    .min(Duration::from_secs(6 * 3600));
                tracing::warn!(policy = %policy.name, job = kind.as_str(), attempt = attempt + 1, retry_in_secs = delay.as_secs(), "run failed: {why}");
                let at = sh.clock.now() + chrono::Duration::from_std(delay).unwrap_or_default();
                if !sleep_until(sh.clock.as_ref(), at, stop).await {
                    return false;
                }
            }
        }
    }
    false
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            // The sender is gone: never true.
            std::future::pending::<()>().await;
        }
    }
}

/// One schedule of one policy.
pub struct LoopSpec {
    /// The policy.
    pub policy: Arc<Policy>,
    /// Backup or verify.
    pub kind: JobKind,
    /// When.
    pub cron: CronSchedule,
    /// Run a fire missed while the agent was down, once, at start.
    pub catch_up: bool,
    /// At most this much random delay.
    pub jitter: Duration,
    /// The last fire handled before the agent started (catch-up).
    pub last_handled: Option<DateTime<Utc>>,
    /// A fire whose run began and never ended (the agent was killed): caught up too.
    pub cut_short: Option<DateTime<Utc>>,
}

/// Schedules one kind of job of one policy until `stop` (reload or shutdown) turns true.
/// `run_lock` keeps runs of one policy apart, across reloads too.
pub async fn policy_loop(
    sh: Arc<Shared>,
    spec: LoopSpec,
    run_lock: Arc<Mutex<()>>,
    mut stop: watch::Receiver<bool>,
) {
    let LoopSpec {
        policy,
        kind,
        cron,
        catch_up,
        jitter,
        last_handled,
        cut_short,
    } = spec;
    let cut_short = cut_short.filter(|c| last_handled.is_none_or(|l| *c > l));
    let mut after = sh.clock.now();
    if catch_up {
        // The newest fire missed while the agent was down, else the one whose run its
        // death cut short.
        let missed = missed_fire(&cron, last_handled, after);
        if let Some(fire) = missed.or(cut_short) {
            if missed.is_some() && missed != cut_short {
                tracing::info!(policy = %policy.name, job = kind.as_str(), missed = %fire, "running a scheduled run missed while the agent was down");
            } else {
                tracing::warn!(policy = %policy.name, job = kind.as_str(), fire = %fire, "running again a scheduled run cut short when the agent last stopped (killed, or the host went down)");
            }
            sh.observer.fire_started(&policy.name, kind, fire);
            if run_with_retries(&sh, &policy, kind, &run_lock, &mut stop).await {
                sh.observer.fire_handled(&policy.name, kind, fire);
            }
            after = sh.clock.now();
        }
    }
    loop {
        if *stop.borrow() {
            return;
        }
        let Some(fire) = cron.next_after(after) else {
            tracing::warn!(policy = %policy.name, "schedule {} never fires again", cron.expr());
            return;
        };
        let at = fire
            + chrono::Duration::from_std(jitter_for(&policy.name, fire, jitter))
                .unwrap_or_default();
        sh.observer.next_run(&policy.name, kind, at);
        if !sleep_until(sh.clock.as_ref(), at, &mut stop).await {
            return;
        }
        // A fire counts as handled once its run has ended: one cut short (the agent
        // stopped, killed, or the host rebooted) is run again by the catch-up at start.
        sh.observer.fire_started(&policy.name, kind, fire);
        if run_with_retries(&sh, &policy, kind, &run_lock, &mut stop).await {
            sh.observer.fire_handled(&policy.name, kind, fire);
        }
        // Fires that passed while running are skipped, not queued.
        after = sh.clock.now().max(fire);
    }
}

#[cfg(test)]
mod tests;
