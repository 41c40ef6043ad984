//! `prune`: two phases, repacking, and never losing a blob a snapshot or a running backup
//! needs.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::common::*;

fn dir_bytes(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            let md = e.metadata().unwrap();
            n += if md.is_dir() {
                dir_bytes(&e.path())
            } else {
                md.len()
            };
        }
    }
    n
}

fn prune(repo: &Repo, extra: &[&str]) -> Value {
    repo.cmd()
        .args(["prune", "--json"])
        .args(extra)
        .run()
        .ok()
        .json()
}

fn restore_and_compare(repo: &Repo, snapshot: &str, src: &Path) {
    let target = repo.scratch(&format!("restore-{snapshot}"));
    let _ = fs::remove_dir_all(&target);
    repo.ok(&["restore", snapshot, "--target", target.to_str().unwrap()]);
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_same_tree(src, &restored, &|_, _| false);
}

#[test]
fn prune_deletes_in_two_phases_repacks_and_keeps_every_kept_snapshot_exact() {
    let repo = Repo::new();
    let a = repo.scratch("a");
    let b = repo.scratch("b");
    let c = repo.scratch("c");
    for d in [&a, &b, &c] {
        fs::create_dir_all(d).unwrap();
    }
    write_random(&a.join("old"), 6 << 20);
    write_random(&b.join("kept"), 3 << 20);
    // c: one small file kept, one big one forgotten, in the same pack.
    write_random(&c.join("small"), 1 << 20);
    write_random(&c.join("big"), 6 << 20);
    let snap_a = repo.backup(&[a.to_str().unwrap()])["snapshot_id"].clone();
    let snap_b = repo.backup(&[b.to_str().unwrap()])["snapshot_id"].clone();
    let snap_c = repo.backup(&[c.to_str().unwrap()])["snapshot_id"].clone();
    fs::remove_file(c.join("big")).unwrap();
    let snap_c2 = repo.backup(&[c.to_str().unwrap()])["snapshot_id"].clone();
    let before = dir_bytes(&repo.path.join("data"));

    repo.ok(&["forget", snap_a.as_str().unwrap(), snap_c.as_str().unwrap()]);
    let dry = prune(&repo, &["--grace", "0s", "--dry-run"]);
    assert_eq!(dry["deleted"], 0, "nothing was marked yet: {dry}");
    assert_eq!(
        dir_bytes(&repo.path.join("data")),
        before,
        "a dry run changes nothing"
    );

    // Phase 1: marks (and repacks), deletes nothing.
    let first = prune(&repo, &["--grace", "0s"]);
    assert_eq!(first["deleted"], 0, "{first}");
    assert!(
        first["marked"].as_u64().unwrap() >= 2,
        "a's pack and c's old pack: {first}"
    );
    assert_eq!(first["repacked"], 1, "c's pack is mostly unused: {first}");
    assert!(dir_bytes(&repo.path.join("data")) >= before);
    repo.ok(&["check", "--read-data"]);

    // Phase 2: deletes what is still unused.
    let second = prune(&repo, &["--grace", "0s"]);
    assert!(second["deleted"].as_u64().unwrap() >= 2, "{second}");
    assert!(second["index_rewritten"].as_u64().unwrap() >= 1, "{second}");
    let after = dir_bytes(&repo.path.join("data"));
    assert!(
        after < before - (11 << 20),
        "a's 6 MiB and c's 6 MiB are gone: {before} -> {after}"
    );
    repo.ok(&["check", "--read-data"]);
    restore_and_compare(&repo, snap_b.as_str().unwrap(), &b);
    restore_and_compare(&repo, snap_c2.as_str().unwrap(), &c);

    // Nothing left to do: a third run deletes and marks nothing.
    let third = prune(&repo, &["--grace", "0s"]);
    assert_eq!(
        (third["deleted"].clone(), third["marked"].clone()),
        (Value::from(0), Value::from(0)),
        "{third}"
    );

    // The grace period holds marks back.
    repo.ok(&["forget", snap_b.as_str().unwrap()]);
    prune(&repo, &[]);
    let held = prune(&repo, &["--grace", "1h"]);
    assert_eq!(held["deleted"], 0, "{held}");
    assert!(held["waiting"].as_u64().unwrap() >= 1, "{held}");
}

#[test]
fn a_backup_running_since_before_the_mark_keeps_marked_packs_alive() {
    backup_running_across_a_mark(None);
}

/// Clock skew (format.md §18): the backup's host runs three hours ahead (its lock would
/// seem to start long after the mark) or behind (its lock would seem hours stale); the
/// pruning host's clock is right. Times in locks and marks are the store's, so the prune
/// still sees a live backup that started before its mark.
#[test]
fn a_backup_on_a_host_whose_clock_is_hours_off_still_keeps_marked_packs_alive() {
    backup_running_across_a_mark(Some("+3h"));
    backup_running_across_a_mark(Some("-3h"));
}

/// Debian's libfaketime (package faketime, which .ci/test-all.sh installs).
fn libfaketime() -> std::path::PathBuf {
    fs::read_dir("/usr/lib")
        .unwrap()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime (apt-get install faketime)")
}

/// A backup that loaded the index before a mark, run (with libfaketime) `skew` off.
fn backup_running_across_a_mark(skew: Option<&str>) {
    let repo = Repo::new();
    let src = repo.scratch("src");
    fs::create_dir_all(&src).unwrap();
    let data = random_bytes(5 << 20);
    fs::write(src.join("dump"), &data).unwrap();
    let first = repo.backup(&[src.to_str().unwrap()])["snapshot_id"].clone();

    // A stdin backup of the same bytes starts now and blocks on its input: it has its
    // lock and an index in which those blobs exist, so it will deduplicate against them.
    let mut cmd = Command::new(BIN);
    if let Some(off) = skew {
        // libfaketime in this process itself (the faketime program would fork).
        cmd.env("LD_PRELOAD", libfaketime()).env("FAKETIME", off);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("BACKUPD_") {
            cmd.env_remove(k);
        }
    }
    let mut running = cmd
        .args([
            "--repo",
            &repo.location,
            "backup",
            "--stdin",
            "--stdin-filename",
            "dump",
            "--json",
        ])
        .env("BACKUPD_PASSWORD", PASSWORD)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its lock is written before it reads anything.
    let locks = repo.path.join("locks");
    let t0 = std::time::Instant::now();
    while fs::read_dir(&locks).map(|r| r.count()).unwrap_or(0) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no lock appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A barrier, not a pause: the backup reads its source (stdin) only after it has
    // loaded the marks and the index, so once a thread of it waits in read(0, ...) it
    // holds an index in which the data's blobs exist.
    let pid = running.id();
    let reading_stdin = || {
        fs::read_dir(format!("/proc/{pid}/task"))
            .map(|tasks| {
                tasks.flatten().any(|t| {
                    fs::read_to_string(t.path().join("syscall"))
                        .is_ok_and(|s| s.starts_with("0 0x0 "))
                })
            })
            .unwrap_or(false)
    };
    while !reading_stdin() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the backup never read its stdin"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Forget the only snapshot using the data; two prunes with no grace.
    repo.ok(&["forget", first.as_str().unwrap()]);
    let p1 = prune(&repo, &["--grace", "0s"]);
    assert!(p1["marked"].as_u64().unwrap() >= 1, "{p1}");
    let p2 = prune(&repo, &["--grace", "0s"]);
    assert_eq!(
        p2["deleted"], 0,
        "the running backup holds the marked pack: {p2}"
    );
    assert!(p2["held_by_backups"].as_u64().unwrap() >= 1, "{p2}");

    // The backup finishes, deduplicating against the marked pack.
    {
        let mut stdin = running.stdin.take().unwrap();
        stdin.write_all(&data).unwrap();
    }
    let out = running.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Only its new tree blob is added: the 5 MiB of data deduplicated.
    assert!(
        summary["bytes_added"].as_u64().unwrap() < 4096,
        "it deduplicated: {summary}"
    );

    // Now a snapshot needs the pack: the next prune unmarks it instead of deleting.
    let p3 = prune(&repo, &["--grace", "0s"]);
    // Only the forgotten snapshot's tree pack goes; the 5 MiB data pack stays.
    assert!(p3["deleted_bytes"].as_u64().unwrap() < 1 << 20, "{p3}");
    assert!(p3["unmarked"].as_u64().unwrap() >= 1, "{p3}");
    repo.ok(&["check", "--read-data"]);
    let dumped = repo.ok(&["dump", "latest", "dump"]).stdout;
    assert!(dumped == data, "the dump restores exactly");
}

#[test]
fn backups_after_a_mark_do_not_reuse_marked_packs_and_parallel_prunes_lose_nothing() {
    let repo = Repo::new();
    let src = repo.scratch("src");
    fs::create_dir_all(&src).unwrap();
    write_random(&src.join("f1"), 4 << 20);
    write_random(&src.join("f2"), 2 << 20);
    let s1 = repo.backup(&[src.to_str().unwrap()])["snapshot_id"].clone();
    repo.ok(&["forget", s1.as_str().unwrap()]);
    prune(&repo, &["--grace", "0s"]);
    // The same data again, after the mark: uploaded anew, not deduplicated.
    let s2 = repo.backup(&[src.to_str().unwrap()]);
    assert!(
        s2["bytes_added"].as_u64().unwrap() >= 6 << 20,
        "a marked pack is not deduplicated against: {s2}"
    );
    // Backups and prunes in parallel, several rounds.
    for round in 0..3 {
        let other = repo.scratch(&format!("other{round}"));
        fs::create_dir_all(&other).unwrap();
        write_random(&other.join("x"), 3 << 20);
        let b = repo.cmd().args(["backup", "--json"]).arg(&other).spawn();
        let p = repo.cmd().args(["prune", "--grace", "0s"]).spawn();
        let bo = b.wait(TIMEOUT);
        let po = p.wait(TIMEOUT);
        assert_eq!(bo.code(), 0, "{}", bo.describe());
        // A prune may find another one's lock; it then says so and exits 11.
        assert!(po.code() == 0 || po.code() == 11, "{}", po.describe());
        restore_and_compare(&repo, bo.json()["snapshot_id"].as_str().unwrap(), &other);
    }
    prune(&repo, &["--grace", "0s"]);
    repo.ok(&["check", "--read-data"]);
    restore_and_compare(&repo, s2["snapshot_id"].as_str().unwrap(), &src);
    for round in 0..3 {
        let other = repo.scratch(&format!("other{round}"));
        let snaps = repo.snapshots();
        let id = snaps
            .iter()
            .find(|s| s["paths"][0].as_str() == Some(other.to_str().unwrap()))
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        restore_and_compare(&repo, &id, &other);
    }
}

/// Spawns `prune --grace 0s` and stops it (SIGSTOP) once its lock is in the repository: a
/// holder whose process still exists. Returns it.
fn stopped_prune(repo: &Repo) -> Running {
    let before: Vec<_> = fs::read_dir(repo.path.join("locks"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let p = repo.cmd().args(["prune", "--grace", "0s"]).spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now: Vec<_> = fs::read_dir(repo.path.join("locks"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        if now.iter().any(|n| !before.contains(n)) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no prune lock appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let st = Command::new("kill")
        .args(["-STOP", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    p
}

#[test]
fn a_killed_prune_leaves_a_lock_the_next_takes_over_and_unlock_removes_stale_locks() {
    let repo = Repo::new();
    let src = repo.scratch("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..40 {
        write_random(&src.join(format!("f{i}")), 64 << 10);
    }
    for _ in 0..3 {
        repo.backup(&[src.to_str().unwrap()]);
        write_random(&src.join("f0"), 64 << 10);
    }
    // A prune that holds its lock (stopped, its process alive): the next prune is locked
    // out with exit 11 and is told who holds it.
    let mut held = stopped_prune(&repo);
    repo.cmd()
        .args(["prune", "--grace", "0s"])
        .run()
        .expect(11)
        .stderr_has("locked by a prune on");
    // unlock leaves a lock whose process runs.
    let out = repo.ok(&["unlock"]);
    assert!(
        out.stdout().contains("0 locks removed, 1 in use left"),
        "{}",
        out.describe()
    );
    // SIGKILLed (an OOM kill, a reboot): the next prune takes the lock over at once,
    // naming the old holder, and finishes.
    held.child.kill().unwrap();
    let _ = held.child.wait();
    let taken = repo.ok(&["prune", "--grace", "0s"]);
    assert!(
        taken
            .stderr
            .contains("taking over the stale lock of a prune")
            && taken
                .stderr
                .contains(&format!("process {} no longer runs", held.child.id())),
        "{}",
        taken.describe()
    );
    // unlock removes a dead holder's lock and says whose it was; --remove-all removes a
    // live one too, saying it was not stale.
    let mut dead = stopped_prune(&repo);
    dead.child.kill().unwrap();
    let _ = dead.child.wait();
    let out = repo.ok(&["unlock"]);
    assert!(
        out.stdout().contains("removed the stale lock of a prune")
            && out.stdout().contains("1 lock removed"),
        "{}",
        out.describe()
    );
    let mut live = stopped_prune(&repo);
    let out = repo.ok(&["unlock", "--remove-all"]);
    assert!(
        out.stdout().contains("it was not stale"),
        "{}",
        out.describe()
    );
    live.child.kill().unwrap();
    let _ = live.child.wait();
    repo.ok(&["check", "--read-data"]);
}
