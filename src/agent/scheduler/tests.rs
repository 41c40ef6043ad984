//! The scheduler under paused tokio time: cron in a zone across DST, catch-up, jitter
//! bounds, retries with backoff, one run per policy at a time, and the concurrency limit.

use std::collections::VecDeque;
use std::sync::Mutex as StdMutex;

use super::*;
use crate::policy::parse::parse_policy;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn policy(name: &str, schedule: &str, extra: &str) -> Arc<Policy> {
    let text = format!(
        "name = \"{name}\"\n[repository]\nlocation = \"/r\"\npassword_env = \"PW\"\n[source]\ntype = \"files\"\npaths = [\"/etc\"]\n[schedule]\n{schedule}\n{extra}"
    );
    Arc::new(parse_policy(&text, std::path::Path::new("/p/x.toml")).unwrap())
}

type RunLog = Arc<StdMutex<Vec<(String, JobKind, DateTime<Utc>, DateTime<Utc>)>>>;

/// Records runs; each takes `duration` and returns the next queued outcome (success when
/// none is queued).
struct Recorder {
    clock: Arc<TokioClock>,
    duration: Duration,
    outcomes: StdMutex<VecDeque<JobOutcome>>,
    runs: RunLog,
}

impl JobRunner for Recorder {
    fn run(
        &self,
        policy: Arc<Policy>,
        kind: JobKind,
        _timeout: Option<Duration>,
    ) -> Pin<Box<dyn Future<Output = JobOutcome> + Send>> {
        let clock = self.clock.clone();
        let d = self.duration;
        let outcome = self
            .outcomes
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(JobOutcome::Success(None));
        let runs = self.runs.clone();
        let name = policy.name.clone();
        Box::pin(async move {
            let start = clock.now();
            tokio::time::sleep(d).await;
            runs.lock().unwrap().push((name, kind, start, clock.now()));
            outcome
        })
    }
}

struct NoObserver;
impl Observer for NoObserver {
    fn fire_handled(&self, _: &str, _: JobKind, _: DateTime<Utc>) {}
    fn next_run(&self, _: &str, _: JobKind, _: DateTime<Utc>) {}
    fn started(&self, _: &str, _: JobKind, _: DateTime<Utc>) {}
    fn finished(&self, _: &str, _: JobKind, _: DateTime<Utc>, _: DateTime<Utc>, _: &JobOutcome) {}
}

struct Harness {
    shared: Arc<Shared>,
    runs: RunLog,
    stop_tx: watch::Sender<bool>,
    _shutdown_tx: watch::Sender<bool>,
}

fn harness(start: &str, duration: Duration, outcomes: Vec<JobOutcome>, slots: usize) -> Harness {
    let clock = Arc::new(TokioClock::starting_at(at(start)));
    let runs: RunLog = Arc::default();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (stop_tx, _) = watch::channel(false);
    Harness {
        shared: Arc::new(Shared {
            clock: clock.clone(),
            runner: Arc::new(Recorder {
                clock,
                duration,
                outcomes: StdMutex::new(outcomes.into()),
                runs: runs.clone(),
            }),
            observer: Arc::new(NoObserver),
            slots: Arc::new(Semaphore::new(slots)),
            shutdown,
        }),
        runs,
        stop_tx,
        _shutdown_tx: shutdown_tx,
    }
}

impl Harness {
    fn spawn(&self, p: &Arc<Policy>, last_handled: Option<DateTime<Utc>>) {
        self.spawn_cut_short(p, last_handled, None);
    }

    fn spawn_cut_short(
        &self,
        p: &Arc<Policy>,
        last_handled: Option<DateTime<Utc>>,
        cut_short: Option<DateTime<Utc>>,
    ) {
        let s = p.schedule.as_ref().unwrap();
        let spec = LoopSpec {
            policy: p.clone(),
            kind: JobKind::Backup,
            cron: s.cron.clone(),
            catch_up: s.catch_up,
            jitter: s.jitter,
            last_handled,
            cut_short,
        };
        tokio::spawn(policy_loop(
            self.shared.clone(),
            spec,
            Arc::new(Mutex::new(())),
            self.stop_tx.subscribe(),
        ));
    }

    fn starts(&self, kind: JobKind) -> Vec<DateTime<Utc>> {
        self.runs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.1 == kind)
            .map(|r| r.2)
            .collect()
    }
}

async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
}

#[tokio::test(start_paused = true)]
async fn every_minute_runs_on_each_minute_boundary() {
    let h = harness("2026-11-30T10:00:30Z", Duration::from_secs(5), vec![], 2);
    h.spawn(&policy("p", "cron = \"* * * * *\"", ""), None);
    advance(Duration::from_secs(200)).await;
    assert_eq!(
        h.starts(JobKind::Backup),
        vec![
            at("2026-11-30T10:01:00Z"),
            at("2026-11-30T10:02:00Z"),
            at("2026-11-30T10:03:00Z")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_daily_time_in_a_zone_follows_its_dst_changes() {
    // 02:30 in New York: EST (UTC-5) before 2026-03-08, skipped that day (runs at the jump,
    // 03:00 EDT = 07:00 UTC), EDT (UTC-4) after.
    let h = harness("2026-03-06T12:00:00Z", Duration::from_secs(1), vec![], 2);
    h.spawn(
        &policy(
            "ny",
            "cron = \"30 2 * * *\"\ntimezone = \"America/New_York\"",
            "",
        ),
        None,
    );
    advance(Duration::from_secs(4 * 86_400)).await;
    assert_eq!(
        h.starts(JobKind::Backup),
        vec![
            at("2026-03-07T07:30:00Z"),
            at("2026-03-08T07:00:00Z"),
            at("2026-03-09T06:30:00Z"),
            at("2026-03-10T06:30:00Z"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_missed_run_is_caught_up_once_at_start_unless_disabled() {
    // Daily at 02:00; the agent was down since the 27th; it starts on the 30th at 10:00.
    let h = harness("2026-11-30T10:00:00Z", Duration::from_secs(10), vec![], 2);
    h.spawn(
        &policy("daily", "cron = \"0 2 * * *\"", ""),
        Some(at("2026-11-27T02:00:00Z")),
    );
    advance(Duration::from_secs(86_400)).await;
    assert_eq!(
        h.starts(JobKind::Backup),
        vec![at("2026-11-30T10:00:00Z"), at("2026-12-01T02:00:00Z")],
        "one catch-up run (not three), then the schedule"
    );

    let h = harness("2026-11-30T10:00:00Z", Duration::from_secs(10), vec![], 2);
    h.spawn(
        &policy("daily", "cron = \"0 2 * * *\"\ncatch_up = false", ""),
        Some(at("2026-11-27T02:00:00Z")),
    );
    advance(Duration::from_secs(86_400)).await;
    assert_eq!(h.starts(JobKind::Backup), vec![at("2026-12-01T02:00:00Z")]);

    // Nothing missed (the last fire was handled): no catch-up.
    let h = harness("2026-11-30T10:00:00Z", Duration::from_secs(10), vec![], 2);
    h.spawn(
        &policy("daily", "cron = \"0 2 * * *\"", ""),
        Some(at("2026-11-30T02:00:00Z")),
    );
    advance(Duration::from_secs(3600)).await;
    assert!(h.starts(JobKind::Backup).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_run_the_agents_death_cut_short_is_run_again_at_start() {
    // The 02:00 run began (recorded) and never ended; the agent starts again at 02:05.
    let h = harness("2026-11-30T02:05:00Z", Duration::from_secs(10), vec![], 2);
    h.spawn_cut_short(
        &policy("daily", "cron = \"0 2 * * *\"", ""),
        Some(at("2026-11-29T02:00:00Z")),
        Some(at("2026-11-30T02:00:00Z")),
    );
    advance(Duration::from_secs(3600)).await;
    assert_eq!(h.starts(JobKind::Backup), vec![at("2026-11-30T02:05:00Z")]);

    // The same on a first run ever (nothing handled before it).
    let h = harness("2026-11-30T02:05:00Z", Duration::from_secs(10), vec![], 2);
    h.spawn_cut_short(
        &policy("daily", "cron = \"0 2 * * *\"", ""),
        None,
        Some(at("2026-11-30T02:00:00Z")),
    );
    advance(Duration::from_secs(3600)).await;
    assert_eq!(h.starts(JobKind::Backup), vec![at("2026-11-30T02:05:00Z")]);

    // A cut-short record older than the last handled fire is stale: no run.
    let h = harness("2026-11-30T02:05:00Z", Duration::from_secs(10), vec![], 2);
    h.spawn_cut_short(
        &policy("daily", "cron = \"0 2 * * *\"", ""),
        Some(at("2026-11-30T02:00:00Z")),
        Some(at("2026-11-29T02:00:00Z")),
    );
    advance(Duration::from_secs(3600)).await;
    assert!(h.starts(JobKind::Backup).is_empty());

    // catch_up = false: not run again.
    let h = harness("2026-11-30T02:05:00Z", Duration::from_secs(10), vec![], 2);
    h.spawn_cut_short(
        &policy("daily", "cron = \"0 2 * * *\"\ncatch_up = false", ""),
        None,
        Some(at("2026-11-30T02:00:00Z")),
    );
    advance(Duration::from_secs(3600)).await;
    assert!(h.starts(JobKind::Backup).is_empty());
}

#[tokio::test(start_paused = true)]
async fn jitter_delays_each_run_within_its_bound() {
    let h = harness("2026-11-30T00:00:00Z", Duration::from_secs(1), vec![], 2);
    h.spawn(
        &policy("j", "cron = \"0 * * * *\"\njitter = \"10m\"", ""),
        None,
    );
    advance(Duration::from_secs(24 * 3600 + 700)).await;
    let starts = h.starts(JobKind::Backup);
    assert_eq!(starts.len(), 24, "{starts:?}");
    let mut distinct = std::collections::HashSet::new();
    for (i, s) in starts.iter().enumerate() {
        let fire = at("2026-11-30T01:00:00Z") + chrono::Duration::hours(i as i64);
        let delay = *s - fire;
        assert!(
            delay >= chrono::Duration::zero() && delay <= chrono::Duration::minutes(10),
            "run {i} at {s}: delay {delay}"
        );
        distinct.insert(delay.num_milliseconds());
    }
    assert!(distinct.len() > 10, "jitter varies: {distinct:?}");
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_with_doubling_backoff_then_given_up() {
    let failed = || JobOutcome::Failed("repository unreachable".into());
    let h = harness(
        "2026-11-30T01:59:00Z",
        Duration::from_secs(10),
        vec![failed(), failed(), failed(), failed()],
        2,
    );
    h.spawn(
        &policy(
            "r",
            "cron = \"0 2 * * *\"\nretries = 2\nretry_backoff = \"1m\"",
            "",
        ),
        None,
    );
    advance(Duration::from_secs(3600)).await;
    // 02:00 fails (ends 02:00:10), retry after 1 min, fails, retry after 2 min, fails: give up.
    assert_eq!(
        h.starts(JobKind::Backup),
        vec![
            at("2026-11-30T02:00:00Z"),
            at("2026-11-30T02:01:10Z"),
            at("2026-11-30T02:03:20Z"),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_good_backup_is_followed_by_retention_and_runs_never_overlap() {
    // Every minute, but each run takes 90 s: runs do not pile up or overlap.
    let h = harness("2026-11-30T10:00:30Z", Duration::from_secs(90), vec![], 2);
    h.spawn(
        &policy(
            "slow",
            "cron = \"* * * * *\"",
            "[retention]\nkeep_last = 3\n",
        ),
        None,
    );
    advance(Duration::from_secs(600)).await;
    let runs = h.runs.lock().unwrap().clone();
    for w in runs.windows(2) {
        assert!(w[1].2 >= w[0].3, "overlap: {w:?}");
    }
    let kinds: Vec<JobKind> = runs.iter().map(|r| r.1).take(4).collect();
    assert_eq!(
        kinds,
        vec![
            JobKind::Backup,
            JobKind::Retention,
            JobKind::Backup,
            JobKind::Retention
        ]
    );
    // Backup 10:01:00-10:02:30, retention -10:04:00; the next fire after is 10:05.
    assert_eq!(runs[2].2, at("2026-11-30T10:05:00Z"));
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_limit_holds_across_policies() {
    let h = harness("2026-11-30T10:00:30Z", Duration::from_secs(20), vec![], 1);
    for n in ["a", "b", "c"] {
        h.spawn(&policy(n, "cron = \"* * * * *\"", ""), None);
    }
    advance(Duration::from_secs(100)).await;
    let mut runs = h.runs.lock().unwrap().clone();
    runs.sort_by_key(|r| r.2);
    assert_eq!(runs.len(), 3, "{runs:?}");
    for w in runs.windows(2) {
        assert!(
            w[1].2 >= w[0].3,
            "two runs at once with a limit of 1: {w:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn stopping_ends_the_loop_before_the_next_fire() {
    let h = harness("2026-11-30T10:00:30Z", Duration::from_secs(1), vec![], 2);
    h.spawn(&policy("p", "cron = \"* * * * *\"", ""), None);
    advance(Duration::from_secs(40)).await;
    h.stop_tx.send(true).unwrap();
    advance(Duration::from_secs(300)).await;
    assert_eq!(h.starts(JobKind::Backup), vec![at("2026-11-30T10:01:00Z")]);
}

#[test]
fn jitter_is_bounded_and_zero_without_jitter() {
    let t = at("2026-11-30T02:00:00Z");
    assert_eq!(jitter_for("p", t, Duration::ZERO), Duration::ZERO);
    for i in 0..1000 {
        let j = jitter_for(
            "p",
            t + chrono::Duration::minutes(i),
            Duration::from_secs(600),
        );
        assert!(j <= Duration::from_secs(600));
    }
}
