//! PostgreSQL: base backups, the WAL archive and point-in-time restore, against real
//! throwaway PostgreSQL 15 clusters. Expected row counts come from the source cluster's own
//! commit timestamps (`track_commit_timestamp`), which are the times recovery compares.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::common::free_port;
use super::pgserver::{PgCluster, PgEnv};

/// `backup --postgres` of `c` over TCP, not yet run.
pub(super) fn backup_cmd(env: &PgEnv, c: &PgCluster) -> super::common::Run {
    env.cmd()
        .args([
            "backup",
            "--postgres",
            "--pg-host",
            "127.0.0.1",
            "--pg-user",
            "postgres",
        ])
        .arg("--pg-port")
        .arg(c.port.to_string())
}

/// `backup --postgres` of `c` with `extra` arguments; its JSON summary.
pub(super) fn backup(env: &PgEnv, c: &PgCluster, extra: &[&str]) -> Value {
    backup_cmd(env, c)
        .arg("--json")
        .args(extra)
        .run()
        .ok()
        .json()
}

/// `restore --at AT --start` into `name` on a new port; the restored, promoted cluster.
pub(super) fn restore_at(env: &PgEnv, at: &str, name: &str, extra: &[&str]) -> (PgCluster, String) {
    let port = free_port();
    let target = env.path(name);
    let out = env
        .cmd()
        .args(["restore", "--at", at, "--start"])
        .arg("--target")
        .arg(&target)
        .arg("--pg-port")
        .arg(port.to_string())
        .args(extra)
        .run()
        .ok();
    (PgCluster::adopt(target, port), out.stdout())
}

/// The commit time of the rows of `batch`, as PostgreSQL prints it.
fn batch_commit_time(c: &PgCluster, batch: i32) -> String {
    c.sql(&format!(
        "select max(pg_xact_commit_timestamp(xmin)) from t where batch = {batch}"
    ))
}

/// The middle between the commits of two batches.
fn between(c: &PgCluster, a: i32, b: i32) -> String {
    c.sql(&format!(
        "select x + (y - x) / 2 from (select max(pg_xact_commit_timestamp(xmin)) filter (where batch = {a}) x,
                                             min(pg_xact_commit_timestamp(xmin)) filter (where batch = {b}) y from t) s"
    ))
}

fn insert_batch(c: &PgCluster, batch: i32, rows: i32) {
    c.sql(&format!(
        "insert into t select {batch}, g from generate_series(1, {rows}) g"
    ));
    // Commits of different batches are apart in time.
    std::thread::sleep(Duration::from_millis(150));
}

fn batches(c: &PgCluster) -> String {
    c.sql("select string_agg(batch || ':' || n, ' ' order by batch) from (select batch, count(*) n from t group by batch) s")
}

#[test]
fn restore_at_a_time_between_commits_has_exactly_the_earlier_rows() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    c.sql("create table t(batch int, i int)");
    insert_batch(&c, 1, 1000);
    let b = backup(&env, &c, &[]);
    assert!(b["bytes_total"].as_u64().unwrap() > 10_000_000, "{b}");
    insert_batch(&c, 2, 100);
    insert_batch(&c, 3, 100);
    insert_batch(&c, 4, 100);
    c.switch_and_wait_archived();
    let target = between(&c, 3, 4);

    // The snapshot records the cluster and the WAL range it needs.
    let snaps = env.cmd().args(["snapshots", "--json"]).run().ok().json();
    let pg = &snaps[0]["postgres"];
    assert_eq!(snaps[0]["source"], "postgres");
    assert_eq!(
        pg["system_identifier"].as_str().unwrap(),
        c.sql("select system_identifier from pg_control_system()")
    );
    assert_eq!(pg["timeline"], 1);
    assert!(pg["backup_label"]
        .as_str()
        .unwrap()
        .contains("START WAL LOCATION"));
    let text = env.cmd().arg("snapshots").run().ok().stdout();
    assert!(
        text.contains("timeline 1") && text.contains("WAL 0/"),
        "{text}"
    );

    let (r, out) = restore_at(&env, &target, "r1", &["--archive-mode", "off"]);
    assert!(out.contains("server promoted"), "{out}");
    assert_eq!(batches(&r), "1:1000 2:100 3:100");
    r.amcheck();
    // The inclusive edge: a target equal to a commit's time includes that commit.
    let at_commit = batch_commit_time(&c, 2);
    let (r2, _) = restore_at(&env, &at_commit, "r2", &["--archive-mode", "off"]);
    assert_eq!(batches(&r2), "1:1000 2:100");
}

#[test]
fn restore_inside_a_pgbench_run_matches_the_commits_before_the_target() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    c.pgbench_ok(&["-i", "-s", "2", "-q"]);
    // Long enough to outlast a slow backup on a busy machine; stopped once past the target.
    let mut load = c.pgbench(&["-c", "2", "-T", "120", "-n"]);
    std::thread::sleep(Duration::from_secs(2));
    // The base backup is taken under load.
    backup(&env, &c, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    let target = c.sql("select clock_timestamp()");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        load.try_wait().unwrap().is_none(),
        "pgbench ended before the target: the target would not be inside the load"
    );
    load.kill().unwrap();
    let _ = load.wait();
    c.switch_and_wait_archived();
    let expected = c.count(&format!(
        "select count(*) from pgbench_history where pg_xact_commit_timestamp(xmin) <= '{target}'"
    ));
    let total = c.count("select count(*) from pgbench_history");
    assert!(expected > 0 && expected < total, "{expected} of {total}");

    let (r, _) = restore_at(&env, &target, "r", &["--archive-mode", "off"]);
    assert_eq!(r.count("select count(*) from pgbench_history"), expected);
    // TPC-B keeps balances and history in step: a torn restore would not.
    assert_eq!(
        r.count("select sum(abalance) from pgbench_accounts"),
        r.count("select coalesce(sum(delta), 0) from pgbench_history")
    );
    r.amcheck();
}

#[test]
fn a_promoted_restore_archives_timeline_2_and_restores_on_it() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    c.sql("create table t(batch int, i int)");
    insert_batch(&c, 1, 100);
    backup(&env, &c, &[]);
    insert_batch(&c, 2, 100);
    insert_batch(&c, 3, 100);
    c.switch_and_wait_archived();
    let t1 = between(&c, 2, 3);
    c.stop();

    // Restored and promoted, it keeps archiving into the repository, on timeline 2.
    let (r1, out) = restore_at(&env, &t1, "r1", &[]);
    assert!(out.contains("timeline 2"), "{out}");
    assert_eq!(batches(&r1), "1:100 2:100");
    insert_batch(&r1, 10, 50);
    insert_batch(&r1, 11, 50);
    r1.switch_and_wait_archived();
    let t2 = between(&r1, 10, 11);
    r1.stop();

    let (r2, out) = restore_at(&env, &t2, "r2", &["--archive-mode", "off"]);
    assert!(out.contains("timeline 3"), "{out}");
    assert_eq!(batches(&r2), "1:100 2:100 10:50");
    let (r3, _) = restore_at(&env, "latest", "r3", &["--archive-mode", "off"]);
    assert_eq!(batches(&r3), "1:100 2:100 10:50 11:50");
}

fn wal_object(env: &PgEnv, c: &PgCluster, segment: &str) -> std::path::PathBuf {
    let sysid = c.sql("select system_identifier from pg_control_system()");
    env.repo
        .join("wal")
        .join(sysid)
        .join(&segment[..16])
        .join(segment)
}

#[test]
fn a_missing_segment_is_reported_with_the_last_time_recovery_can_reach() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    c.sql("create table t(batch int, i int)");
    backup(&env, &c, &[]);
    insert_batch(&c, 1, 100);
    insert_batch(&c, 2, 100);
    c.switch_and_wait_archived();
    insert_batch(&c, 3, 100);
    let lost = c.switch_and_wait_archived();
    insert_batch(&c, 4, 100);
    c.switch_and_wait_archived();
    fs::remove_file(wal_object(&env, &c, &lost)).unwrap();

    let target = env.path("never");
    let last_before_gap = batch_commit_time(&c, 2);
    for at in ["latest", &c.sql("select now()"), &last_before_gap] {
        let out = env
            .cmd()
            .args(["restore", "--at", at, "--target"])
            .arg(&target)
            .run()
            .expect(1);
        let err = out.all_text();
        assert!(err.contains(&lost) && err.contains("missing"), "{err}");
        assert!(err.contains("restorable range"), "{err}");
        assert!(!target.exists(), "nothing is written before the plan holds");
    }
    // Before the last transaction ahead of the gap is a real target.
    let (r, _) = restore_at(&env, &between(&c, 1, 2), "r", &["--archive-mode", "off"]);
    assert_eq!(batches(&r), "1:100");
}

#[test]
fn wal_push_fails_while_the_repository_is_away_and_nothing_is_lost() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    c.sql("create table t(batch int, i int)");
    backup(&env, &c, &[]);
    let away = env.path("repo.away");
    fs::rename(&env.repo, &away).unwrap();
    insert_batch(&c, 1, 100);
    c.sql("select pg_switch_wal()");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c.count("select failed_count from pg_stat_archiver") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "archiving did not fail"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = fs::read_to_string(&c.log).unwrap();
    assert!(log.contains("no backupd repository"), "{log}");
    insert_batch(&c, 2, 100);
    fs::rename(&away, &env.repo).unwrap();
    c.switch_and_wait_archived();
    let (r, _) = restore_at(&env, "latest", "r", &["--archive-mode", "off"]);
    assert_eq!(batches(&r), "1:100 2:100");
}

#[test]
fn wal_push_twice_is_idempotent_different_bytes_fail_and_fetch_misses_quietly() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    let seg = c.switch_and_wait_archived();
    let copy_dir = env.path("copy");
    fs::create_dir_all(&copy_dir).unwrap();
    let copy = copy_dir.join(&seg);
    let data = c.data.display().to_string();
    env.cmd()
        .args(["wal-fetch", "--pg-data", &data, &seg])
        .arg(&copy)
        .run()
        .ok();
    let original = fs::read(c.data.join("pg_wal").join(&seg)).ok();
    let fetched = fs::read(&copy).unwrap();
    if let Some(o) = original {
        assert_eq!(o, fetched, "fetched bytes equal the server's segment");
    }
    env.cmd()
        .args(["wal-push", "--pg-data", &data])
        .arg(&copy)
        .run()
        .ok();
    // A byte of its WAL (after a switch record the rest of the segment is not WAL, and a
    // copy that differs only there is the same segment: tests/it/walstream.rs).
    let mut changed = fetched.clone();
    changed[100] ^= 0xff;
    fs::write(&copy, &changed).unwrap();
    env.cmd()
        .args(["wal-push", "--pg-data", &data])
        .arg(&copy)
        .run()
        .expect(1)
        .stderr_has("different");
    // The refused push left the stored segment as it was.
    let again = copy_dir.join("again");
    env.cmd()
        .args(["wal-fetch", "--pg-data", &data, &seg])
        .arg(&again)
        .run()
        .ok();
    assert!(
        fs::read(&again).unwrap() == fetched,
        "the stored segment changed"
    );
    // Not archived: exit 1, nothing on stderr (recovery probes like this all the time).
    let missing = env
        .cmd()
        .args(["wal-fetch", "--pg-data", &data, "0000000100000000000000FE"])
        .arg(copy_dir.join("x"))
        .run()
        .expect(1);
    assert_eq!(missing.all_text().trim(), "", "{}", missing.describe());
    // A damaged object fails loudly instead, with an exit code above 125, which makes
    // PostgreSQL stop recovery rather than end it early.
    let obj = wal_object(&env, &c, &seg);
    let mut bytes = fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&obj, bytes).unwrap();
    env.cmd()
        .args(["wal-fetch", "--pg-data", &data, "--prefetch", "0", &seg])
        .arg(copy_dir.join("y"))
        .run()
        .expect(255)
        .stderr_has("corrupt or tampered");
    // So does a repository that is not there (a miss would end recovery silently).
    super::common::backupd()
        .env("BACKUPD_PASSWORD_FILE", &env.password_file)
        .args([
            "--repo",
            "/nonexistent/repo",
            "wal-fetch",
            "--pg-data",
            &data,
            &seg,
        ])
        .arg(copy_dir.join("z"))
        .run()
        .expect(255)
        .stderr_has("no backupd repository");
}

#[test]
fn tablespaces_are_restored_remapped_or_refused_by_name() {
    let env = PgEnv::new();
    let ts_dir = env.path("ts1");
    fs::create_dir_all(&ts_dir).unwrap();
    std::process::Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&ts_dir)
        .status()
        .unwrap();
    let c = env.cluster("src");
    c.sql(&format!(
        "create tablespace ts1 location '{}'",
        ts_dir.display()
    ));
    c.sql("create table tt(i int) tablespace ts1");
    c.sql("insert into tt select generate_series(1, 500)");
    let b = backup(&env, &c, &[]);
    let snaps = env.cmd().args(["snapshots", "--json"]).run().ok().json();
    assert_eq!(snaps[0]["postgres"]["tablespaces"][0]["name"], "ts1", "{b}");
    c.sql("insert into tt select generate_series(501, 1000)");
    c.switch_and_wait_archived();

    // The original location holds the live tablespace: refused, by name.
    env.cmd()
        .args(["restore", "--at", "latest", "--target"])
        .arg(env.path("r-refused"))
        .run()
        .expect(1)
        .stderr_has("tablespace ts1");
    let moved = env.path("ts1-restored");
    let (r, _) = restore_at(
        &env,
        "latest",
        "r",
        &[
            "--archive-mode",
            "off",
            "--tablespace-map",
            &format!("ts1={}", moved.display()),
        ],
    );
    assert_eq!(r.count("select count(*) from tt"), 1000);
    let oid = r.sql("select oid from pg_tablespace where spcname = 'ts1'");
    assert_eq!(
        fs::read_link(r.data.join("pg_tblspc").join(oid)).unwrap(),
        moved
    );
    assert_eq!(
        r.sql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts1'"),
        moved.display().to_string()
    );
    // check reads the tablespace's tree too.
    env.cmd().args(["check", "--read-data"]).run().ok();
}

#[test]
fn delta_restore_rewrites_only_what_differs() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    c.sql("create table t(batch int, i int)");
    backup(&env, &c, &[]);
    insert_batch(&c, 1, 20000);
    insert_batch(&c, 2, 100);
    let older = between(&c, 1, 2);
    backup(&env, &c, &[]);
    insert_batch(&c, 3, 100);
    insert_batch(&c, 4, 100);
    c.switch_and_wait_archived();
    let t = between(&c, 3, 4);
    // First an older copy from the first backup (not started), then a delta restore of
    // the second backup and a later time onto it.
    let dir = env.path("r");
    env.cmd()
        .args(["restore", "--at", &older, "--target"])
        .arg(&dir)
        .run()
        .ok();
    fs::write(dir.join("stray-file"), "not in the backup").unwrap();
    // A file both backups hold unchanged: the delta restore must leave it alone.
    let kept = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(p).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };
    let untouched = dir.join("PG_VERSION");
    let before = kept(&untouched);
    let port = free_port();
    let out = env
        .cmd()
        .args([
            "restore",
            "--at",
            &t,
            "--delta",
            "--start",
            "--archive-mode",
            "off",
        ])
        .arg("--target")
        .arg(&dir)
        .arg("--pg-port")
        .arg(port.to_string())
        .run()
        .ok()
        .stdout();
    let in_place: u64 = out
        .split(" bytes already in place")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in place: {out}"));
    assert!(in_place > 0, "{out}");
    assert_eq!(kept(&untouched), before, "PG_VERSION was rewritten: {out}");
    assert!(!dir.join("stray-file").exists());
    let r = PgCluster::adopt(dir, port);
    assert_eq!(batches(&r), "1:20000 2:100 3:100");
    // Without --delta a non-empty target is refused.
    env.cmd()
        .args(["restore", "--at", &t, "--target"])
        .arg(&r.data)
        .run()
        .expect(1)
        .stderr_has("not empty");
}

#[test]
fn backups_that_could_not_restore_are_refused_and_leave_no_snapshot() {
    let env = PgEnv::new();
    let off = env.cluster_with("off", "true", "archive_mode = off");
    env.cmd()
        .args([
            "backup",
            "--postgres",
            "--pg-host",
            "127.0.0.1",
            "--pg-user",
            "postgres",
        ])
        .arg("--pg-port")
        .arg(off.port.to_string())
        .run()
        .expect(1)
        .stderr_has("archive_mode is off");
    // Archiving somewhere else: the backup's WAL never reaches the repository.
    let elsewhere = env.cluster_with("elsewhere", "true", "");
    env.cmd()
        .args([
            "backup",
            "--postgres",
            "--archive-timeout",
            "3",
            "--pg-host",
            "127.0.0.1",
            "--pg-user",
            "postgres",
        ])
        .arg("--pg-port")
        .arg(elsewhere.port.to_string())
        .run()
        .expect(1)
        .stderr_has("did not reach the repository");
    let snaps = env.cmd().args(["snapshots", "--json"]).run().ok().json();
    assert_eq!(snaps.as_array().unwrap().len(), 0, "{snaps}");
    // No backup: restore says so.
    env.cmd()
        .args(["restore", "--at", "latest", "--target"])
        .arg(env.path("x"))
        .run()
        .expect(1)
        .stderr_has("no PostgreSQL base backups");
    assert!(!Path::new(&env.path("x")).exists());
}

#[test]
fn the_whole_cycle_works_on_an_s3_repository() {
    let env = PgEnv::new_s3();
    let c = env.cluster("src");
    c.sql("create table t(batch int, i int)");
    insert_batch(&c, 1, 500);
    backup(&env, &c, &[]);
    insert_batch(&c, 2, 100);
    insert_batch(&c, 3, 100);
    let seg = c.switch_and_wait_archived();
    assert!(
        wal_object(&env, &c, &seg).is_file(),
        "segments are objects on the server"
    );
    let target = between(&c, 2, 3);
    // The restored server fetches WAL from S3 with the credentials of our environment.
    let (r, out) = restore_at(&env, &target, "r", &["--archive-mode", "off"]);
    assert!(out.contains("server promoted"), "{out}");
    assert_eq!(batches(&r), "1:500 2:100");
}

#[test]
fn prune_removes_wal_older_than_the_oldest_kept_base_backup_and_it_still_restores() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    c.sql("create table t(batch int, i int)");
    insert_batch(&c, 1, 1000);
    let first = backup(&env, &c, &[]);
    insert_batch(&c, 2, 50);
    let early = c.switch_and_wait_archived();
    insert_batch(&c, 2, 50);
    c.switch_and_wait_archived();
    let second = backup(&env, &c, &[]);
    insert_batch(&c, 3, 100);
    c.switch_and_wait_archived();
    assert!(wal_object(&env, &c, &early).exists());
    let start = env
        .cmd()
        .args(["snapshots", "--json"])
        .run()
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == second["snapshot_id"])
        .unwrap()["postgres"]["start_lsn"]
        .as_str()
        .unwrap()
        .to_string();

    // Both kept: only what precedes the first backup goes.
    env.cmd()
        .args(["prune", "--json", "--grace", "0s"])
        .run()
        .ok();
    assert!(
        wal_object(&env, &c, &early).exists(),
        "the first backup needs it"
    );
    env.cmd()
        .args(["forget", first["snapshot_id"].as_str().unwrap()])
        .run()
        .ok();
    let p = env
        .cmd()
        .args(["prune", "--json", "--grace", "0s"])
        .run()
        .ok()
        .json();
    assert!(p["wal_deleted"].as_u64().unwrap() >= 2, "{p}");
    assert!(
        !wal_object(&env, &c, &early).exists(),
        "WAL before the kept backup is gone"
    );
    // What the kept backup needs, from its start segment on, is all there.
    let start_seg = c.sql(&format!("select pg_walfile_name('{start}')"));
    assert!(wal_object(&env, &c, &start_seg).exists(), "{start_seg}");
    let (r, _) = restore_at(&env, "latest", "r", &["--archive-mode", "off"]);
    assert_eq!(batches(&r), "1:1000 2:100 3:100");
}
