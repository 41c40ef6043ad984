//! `backupd wal-stream` against a real PostgreSQL 15: WAL received over a replication slot
//! into the repository, restorable seconds after a commit; a SIGKILLed streamer loses and
//! duplicates nothing; `archive_command` and the stream agree on a segment they both
//! store; the slot is created and dropped by backupd.

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use super::common::{free_port, Running};
use super::pg::backup;
use super::pgserver::{PgCluster, PgEnv};

fn streamer(env: &PgEnv, c: &PgCluster, create: bool) -> Running {
    let mut run = env
        .cmd()
        .env("BACKUPD_LOG", "backupd=debug")
        .args([
            "wal-stream",
            "--pg-host",
            "127.0.0.1",
            "--pg-user",
            "postgres",
        ])
        .arg("--pg-port")
        .arg(c.port.to_string());
    if create {
        run = run.arg("--create-slot");
    }
    run.spawn()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn slots(c: &PgCluster) -> i64 {
    c.count("select count(*) from pg_replication_slots where slot_name = 'backupd'")
}

/// `restore --at <the server's now - 1 s> --start` into `name`, asked again while the
/// plan says that time is not restorable yet, until 10 s after `committed`; the restored
/// cluster and restore's stdout.
fn restore_a_second_ago(
    env: &PgEnv,
    c: &PgCluster,
    name: &str,
    committed: Instant,
) -> (PgCluster, String) {
    let port = free_port();
    let target = env.path(name);
    loop {
        let at = c.sql("select now() - interval '1 second'");
        let out = env
            .cmd()
            .args(["restore", "--at", &at, "--start"])
            .arg("--target")
            .arg(&target)
            .arg("--pg-port")
            .arg(port.to_string())
            .run();
        if out.code() == 0 {
            return (PgCluster::adopt(target, port), out.stdout());
        }
        // Refused by the plan, before anything is written.
        assert!(
            out.stderr.contains("cannot restore to")
                && committed.elapsed() < Duration::from_secs(10),
            "{}\nthe archive: {:?}",
            out.describe(),
            wal_files(&env.repo.join("wal"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The archive's object names, for failure messages.
fn wal_files(dir: &std::path::Path) -> Vec<String> {
    let mut v = vec![];
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            v.extend(wal_files(&e.path()));
        } else {
            v.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    v.sort();
    v
}

fn batches(c: &PgCluster) -> String {
    c.sql("select coalesce(string_agg(batch || ':' || n, ' ' order by batch), '') from (select batch, count(*) n from t group by batch) s")
}

fn term(r: &mut Running) {
    let _ = Command::new("kill")
        .args(["-TERM", &r.child.id().to_string()])
        .status();
}

#[test]
fn streamed_commits_restore_seconds_later_and_a_killed_streamer_loses_nothing() {
    let env = PgEnv::new();
    // The stream alone brings WAL to the repository: archive_command only says "done".
    let c = env.cluster_with("main", "/bin/true", "");
    let mut s = streamer(&env, &c, true);
    wait_for("the slot", Duration::from_secs(30), || slots(&c) == 1);
    c.sql("create table t(batch int, i int)");
    // The base backup waits for its WAL, which the stream brings.
    backup(&env, &c, &[]);

    // One commit on a quiet server: restorable (to a second ago) 7 s later, before
    // PostgreSQL would have archived anything (archive_timeout = 0).
    c.sql("insert into t values (1, 1)");
    let committed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let (r1, out) = restore_a_second_ago(&env, &c, "r1", committed);
    assert!(out.contains("read from the WAL stream"), "{out}");
    assert_eq!(batches(&r1), "1:1", "{out}");
    r1.stop();

    // A streamer killed mid-segment while WAL pours in, then started again.
    let port = c.port;
    let writer = std::thread::spawn(move || {
        Command::new(std::path::Path::new(super::pgserver::PG_BIN).join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        // A million rows over two seconds or more: WAL streams in while the kill comes.
        .args(["-c", "do $$ begin for k in 1..20 loop insert into t select 2, g from generate_series(1, 50000) g; perform pg_sleep(0.1); end loop; end $$"])
        .status()
    });
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !writer.is_finished(),
        "the kill is to come while WAL streams in"
    );
    s.child.kill().unwrap();
    let _ = s.child.wait();
    assert!(writer.join().unwrap().unwrap().success());
    let mut s = streamer(&env, &c, false);
    c.sql("insert into t values (3, 1)");
    let committed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let (r2, out) = restore_a_second_ago(&env, &c, "r2", committed);
    assert_eq!(batches(&r2), "1:1 2:1000000 3:1", "{out}");
    r2.stop();
    // Nothing the stream stored is damaged or dangling.
    env.cmd().args(["check", "--read-data"]).run().ok();

    // archive_command and the stream both store a switched segment: the same WAL, a
    // tail after the switch that may differ. The streamed copy, its tail changed, is
    // accepted; a change inside the WAL is refused.
    let seg = c.sql("select pg_walfile_name(pg_current_wal_lsn())");
    c.sql("insert into t values (4, 1)");
    c.sql("select pg_switch_wal()");
    let fetched = env.path("fetched");
    wait_for(
        "the switched segment, streamed",
        Duration::from_secs(30),
        || {
            env.cmd()
                .args(["wal-fetch", &seg])
                .arg(&fetched)
                .arg("--pg-data")
                .arg(&c.data)
                .args(["--prefetch", "0"])
                .run()
                .code()
                == 0
                && fs::metadata(&fetched).map(|m| m.len()).unwrap_or(0) == 16 << 20
        },
    );
    let bytes = fs::read(&fetched).unwrap();
    let push_dir = env.path("push");
    fs::create_dir_all(&push_dir).unwrap();
    let push = |b: &[u8]| {
        fs::write(push_dir.join(&seg), b).unwrap();
        env.cmd()
            .args(["wal-push"])
            .arg(push_dir.join(&seg))
            .arg("--pg-data")
            .arg(&c.data)
            .args(["--push-ahead", "0"])
            .run()
    };
    let mut tail = bytes.clone();
    *tail.last_mut().unwrap() ^= 0x5a;
    push(&tail).ok();
    let mut inside = bytes.clone();
    inside[100] ^= 0x5a;
    let refused = push(&inside);
    assert_ne!(refused.code(), 0, "{}", refused.describe());
    assert!(
        refused.stderr.contains("refusing"),
        "{}",
        refused.describe()
    );

    // SIGTERM stores what it has and exits 0; --drop-slot frees the server's WAL.
    term(&mut s);
    let out = s.wait(Duration::from_secs(30));
    assert_eq!(out.code(), 0, "{}", out.describe());
    assert_eq!(slots(&c), 1);
    env.cmd()
        .args([
            "wal-stream",
            "--drop-slot",
            "--pg-host",
            "127.0.0.1",
            "--pg-user",
            "postgres",
        ])
        .arg("--pg-port")
        .arg(c.port.to_string())
        .run()
        .ok();
    assert_eq!(slots(&c), 0);
}

#[test]
fn a_missing_slot_is_named_with_the_flag_that_creates_it() {
    let env = PgEnv::new();
    let c = env.cluster("main");
    let out = env
        .cmd()
        .args([
            "wal-stream",
            "--pg-host",
            "127.0.0.1",
            "--pg-user",
            "postgres",
            "--slot",
            "nope",
        ])
        .arg("--pg-port")
        .arg(c.port.to_string())
        .run();
    assert_ne!(out.code(), 0, "{}", out.describe());
    assert!(
        out.stderr.contains("\"nope\" does not exist") && out.stderr.contains("--create-slot"),
        "{}",
        out.describe()
    );
}

#[test]
fn the_agent_streams_a_wal_stream_policy_and_reports_its_slot() {
    use super::agent::{http_get, sample, signal};
    let env = PgEnv::new();
    let c = env.cluster_with("main", "/bin/true", "");
    // The slot, made once (as `wal-stream --create-slot` would).
    c.sql("select pg_create_physical_replication_slot('backupd_db', true)");
    c.sql("create table t(batch int, i int)");
    let work = env.path("agent");
    let pol = work.join("policies");
    super::agent::write_pg_policy(&env, &c, &pol, "rpo = \"10s\"\nwal_stream = true\n");
    // policy check --online looks for the slot, not at archive_timeout.
    let online = super::common::backupd()
        .args(["policy", "check", "--online", "--strict"])
        .arg(&pol)
        .run()
        .ok();
    assert!(
        !online.stderr.contains("archive_timeout"),
        "{}",
        online.describe()
    );
    let (mut agent, port, log) = super::agent::start_agent(&pol, &work.join("state"));
    let mut m = String::new();
    wait_for(
        "the streamer and a WAL poll",
        Duration::from_secs(30),
        || {
            m = http_get(port, "/metrics").map(|r| r.1).unwrap_or_default();
            sample(&m, "backupd_wal_stream_up{policy=\"db\"}") == Some(1.0)
                && sample(&m, "backupd_wal_stream_slot_present{policy=\"db\"}") == Some(1.0)
        },
    );
    assert!(
        sample(&m, "backupd_wal_stream_slot_retained_bytes{policy=\"db\"}").is_some(),
        "{m}"
    );
    // The base backup's WAL and a later commit arrive by the agent's stream alone.
    backup(&env, &c, &[]);
    c.sql("insert into t values (1, 1)");
    let committed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let (r, out) = restore_a_second_ago(&env, &c, "r", committed);
    assert_eq!(batches(&r), "1:1", "{out}");
    r.stop();
    // The agent stops its streamer with itself; the archive_timeout warning is not given
    // for a policy that streams.
    signal(&agent, "TERM");
    let _ = agent.wait();
    let log = log.join().unwrap();
    assert!(!log.contains("archive_timeout is 0"), "{log}");
    assert!(log.contains("wal-stream"), "{log}");
}

#[test]
fn a_promoted_copy_on_timeline_2_streams_on_into_the_same_archive() {
    let env = PgEnv::new();
    let c = env.cluster_with("main", "/bin/true", "");
    let mut s = streamer(&env, &c, true);
    wait_for("the slot", Duration::from_secs(30), || slots(&c) == 1);
    c.sql("create table t(batch int, i int)");
    backup(&env, &c, &[]);
    c.sql("insert into t values (1, 1)");
    let committed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    // The primary is lost after its last commit reached the repository; its replacement
    // is restored from the repository and promoted: timeline 2, the same system.
    let (old, _) = restore_a_second_ago(&env, &c, "probe", committed);
    old.stop();
    term(&mut s);
    assert_eq!(s.wait(Duration::from_secs(30)).code(), 0);
    c.stop();
    let (p, _) = super::pg::restore_at(&env, "latest", "new-primary", &["--archive-mode", "off"]);
    assert_eq!(
        p.sql("select timeline_id from pg_control_checkpoint()"),
        "2"
    );
    assert_eq!(batches(&p), "1:1");
    // The stream goes on from the new primary: its history file, then its WAL.
    let mut s2 = streamer(&env, &p, true);
    wait_for(
        "the slot on the new primary",
        Duration::from_secs(30),
        || slots(&p) == 1,
    );
    p.sql("insert into t values (2, 1)");
    let committed = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let (r, out) = restore_a_second_ago(&env, &p, "after-failover", committed);
    assert_eq!(batches(&r), "1:1 2:1", "{out}");
    assert_eq!(
        r.sql("select timeline_id >= 3 from pg_control_checkpoint()"),
        "t",
        "{out}"
    );
    r.stop();
    term(&mut s2);
    assert_eq!(s2.wait(Duration::from_secs(30)).code(), 0);
}
