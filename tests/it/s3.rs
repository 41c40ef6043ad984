//! S3 repositories through the binary, against a real server (s3s-fs) on loopback: a
//! server that dies in the middle of a backup, a pack damaged on the server's disk, and
//! what a backup costs in requests.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::common::*;

/// Waits until the server has stored at least one pack of the repository.
fn wait_for_first_pack(repo_dir: &Path, deadline: Duration) -> bool {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        let any = fs::read_dir(repo_dir.join("data"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                fs::read_dir(d.path())
                    .map(|mut r| r.next().is_some())
                    .unwrap_or(false)
            });
        if any {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn server_killed_mid_backup_leaves_no_snapshot_and_the_next_backup_restores_exactly() {
    let mut repo = Repo::new_s3();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..5 {
        write_random(&src.join(format!("f{i}")), 12 << 20);
    }
    let running = repo.cmd().arg("backup").arg(&src).spawn();
    assert!(
        wait_for_first_pack(&repo.path, Duration::from_secs(120)),
        "no pack reached the server"
    );
    let endpoint = repo.s3.as_ref().unwrap().endpoint();
    repo.s3.as_mut().unwrap().kill();
    let out = running.wait(TIMEOUT).expect(1);
    assert!(
        out.stderr.contains(&endpoint) && out.stderr.contains("cannot reach the endpoint"),
        "the error does not name the endpoint:\n{}",
        out.describe()
    );
    assert!(
        !repo.path.join("snapshots").exists()
            || fs::read_dir(repo.path.join("snapshots"))
                .unwrap()
                .next()
                .is_none(),
        "a snapshot was written by the failed backup"
    );

    repo.s3.as_mut().unwrap().restart();
    assert!(repo.snapshots().is_empty());
    let summary = repo.backup(&[&src]);
    assert_eq!(summary["files_new"], 5, "{summary}");
    repo.ok(&["check", "--read-data"]);
    let target = work.path().join("restore");
    repo.cmd()
        .args(["restore", "latest", "--target"])
        .arg(&target)
        .run()
        .ok();
    assert_same_tree(&src, &restored_path(&target, &src), &|_, _| false);
}

#[test]
fn pack_damaged_on_the_server_is_named_by_restore() {
    let repo = Repo::new_s3();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    write_random(&src.join("a"), 3 << 20);
    write_random(&src.join("b"), 3 << 20);
    repo.backup(&[&src]);
    let packs = repo.indexed_packs();
    let data = packs.iter().find(|p| p.all("data")).expect("a data pack");
    let rel = Repo::pack_rel(&data.id);
    let on_disk = repo.path.join(&rel);
    assert!(on_disk.is_file(), "{} not on the server", on_disk.display());
    flip_bit(&on_disk, 100);

    let target = work.path().join("restore");
    let out = repo
        .cmd()
        .args(["restore", "latest", "--target"])
        .arg(&target)
        .run()
        .expect(1);
    assert!(
        out.all_text().contains(&data.id[..16]),
        "restore does not name the damaged pack {}:\n{}",
        data.id,
        out.describe()
    );
    let out = repo.run(&["check", "--read-data"]).expect(1);
    assert!(
        out.all_text().contains(&data.id[..16]),
        "{}",
        out.describe()
    );
}

#[test]
fn every_verb_works_on_s3() {
    let repo = Repo::new_s3();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    write_mixed(&src.join("m"), 2 << 20);
    fs::write(src.join("small"), b"hello").unwrap();
    let s = repo.backup(&[&src]);
    let id = s["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(repo.snapshots().len(), 1);
    let ls = repo.ok(&["ls", "latest"]).stdout();
    assert!(ls.contains("small"), "{ls}");
    let dump = repo
        .cmd()
        .args(["dump", "latest"])
        .arg(src.join("small"))
        .run()
        .ok();
    assert_eq!(dump.stdout, b"hello");
    let config = repo.ok(&["cat", "config"]).json();
    assert!(config["version"].as_u64().is_some(), "{config}");
    let snap = repo.ok(&["cat", "snapshot", &id]).json();
    assert_eq!(snap["paths"][0].as_str(), src.to_str(), "{snap}");
    let stats = repo.ok(&["stats", "--json"]).json();
    assert_eq!(stats["snapshots"].as_u64(), Some(1), "{stats}");
    repo.ok(&["check"]);
    // Keys: add a second password, open with it, remove the first.
    repo.cmd()
        .args(["key", "add"])
        .env("BACKUPD_NEW_PASSWORD", "second password")
        .run()
        .ok();
    let keys = repo.ok(&["key", "list", "--json"]).json();
    assert_eq!(keys["keys"].as_array().map(Vec::len), Some(2), "{keys}");
    repo.cmd_pw("second password")
        .args(["snapshots"])
        .run()
        .ok();
    repo.cmd_pw("wrong").args(["snapshots"]).run().expect(12);
    // init again refuses.
    repo.run(&["init"]).expect(1).stderr_has("already exists");

    // forget, prune and verify on S3: the first snapshot's own data goes, the second
    // restores exactly.
    write_mixed(&src.join("m"), 2 << 20);
    let second = repo.backup(&[&src])["snapshot_id"]
        .as_str()
        .unwrap()
        .to_string();
    repo.ok(&["forget", &id]);
    let ids: Vec<_> = repo.snapshots().iter().map(|s| s["id"].clone()).collect();
    assert_eq!(ids, [second.as_str()], "forget removed the first only");
    let prunes: Vec<_> = (0..2)
        .map(|_| repo.ok(&["prune", "--grace", "0s", "--json"]).json())
        .collect();
    assert!(
        prunes[1]["deleted_bytes"].as_u64().unwrap() > 1 << 20,
        "the second prune deleted the forgotten 2 MiB on S3: {prunes:?}"
    );
    let scratch = work.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let v = repo
        .cmd()
        .args([
            "verify",
            "--read-data",
            "--restore-test",
            "--json",
            "--scratch",
        ])
        .arg(&scratch)
        .run()
        .ok()
        .json();
    assert!(
        v.to_string().contains(&second[..8]),
        "verify restored the newest: {v}"
    );
    let dst = work.path().join("dst");
    repo.cmd()
        .args(["restore", "latest", "--target"])
        .arg(&dst)
        .run()
        .ok();
    assert_same_tree(&src, &restored_path(&dst, &src), &|_, _| false);
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn a_backup_reports_requests_by_kind_and_a_no_change_backup_is_cheap() {
    let repo = Repo::new_s3();
    // Not under /tmp: other tests creating directories there change /tmp's mtime, which a
    // snapshot records (the source's ancestors are in its tree), and that would be a real
    // change for the next backup.
    let parent = Path::new(env!("CARGO_TARGET_TMPDIR")).join("requests-test");
    fs::create_dir_all(&parent).unwrap();
    let work = tempfile::tempdir_in(&parent).unwrap();
    let src = work.path().join("src");
    for d in 0..30 {
        let dir = src.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("f"), format!("file {d}")).unwrap();
    }
    let first = repo.backup(&[&src]);
    let req = &first["requests"];
    assert!(req["put"].as_u64().unwrap() >= 3, "{req}");
    let total = |req: &serde_json::Value| -> u64 {
        ["get", "get_range", "put", "list", "delete", "exists"]
            .iter()
            .map(|k| req[k].as_u64().unwrap())
            .sum()
    };
    // The source's ancestors (up to /) are in the snapshot, and a parallel test run may
    // change one (a fresh clone under /tmp): that is a real change, which adds a pack and
    // an index. So look at backups until one saw no change, and one after it (fully cached).
    let mut cheap = None;
    let mut cached = None;
    for _ in 0..10 {
        let out = repo.cmd().args(["backup", "--json"]).arg(&src).run().ok();
        let s = out.json();
        assert_eq!(s["files_unchanged"], 30, "{s}");
        if s["blobs_new"] != 0 {
            cheap = None;
            continue;
        }
        match cheap {
            None => cheap = Some(s),
            Some(_) => {
                cached = Some((s, out.describe()));
                break;
            }
        }
    }
    // The parent's trees come from one whole tree pack, fetched once into the cache.
    let second = cheap.expect("two backups in a row saw no change in 10 tries");
    let req = &second["requests"];
    // Two puts: the lock and the snapshot (and one delete: the lock). No listing of
    // data/, no per-directory reads.
    assert_eq!(req["put"], 2, "{second}");
    assert_eq!(req["delete"], 1, "{second}");
    assert_eq!(req["get_range"], 0, "{second}");
    // (Three of them read the key generations: the newest bundle listed and read at open,
    // listed again once the lock is visible; one reads back the store's time on the lock.)
    assert!(
        total(req) <= 14,
        "a no-change backup made {} requests: {req}",
        total(req)
    );
    // With everything cached: config, the key that opened it last time (no key listing),
    // snapshot, index and marks lists, the lock (put, the store's time read back, and
    // delete) and the new snapshot; and the key generations (listed and read at open,
    // listed after the lock).
    let (summary, described) = cached.expect("a cached backup");
    let req = &summary["requests"];
    assert_eq!(total(req), 12, "{described}");
    // Without the cache every directory is a ranged read.
    let uncached = repo
        .cmd()
        .args(["backup", "--json", "--no-cache"])
        .arg(&src)
        .run()
        .ok()
        .json();
    assert!(
        uncached["requests"]["get_range"].as_u64().unwrap() >= 31,
        "{uncached}"
    );
}

/// The time a limited transfer of 1 MiB at 256 KiB/s adds to the same command unlimited
/// (which pays for the password KDF, process start and the requests): at least 3.5 s (4 s,
/// less the rounding of pack boundaries) and, with room for a loaded machine, at most 8 s.
fn assert_paced(what: &str, unlimited: Duration, limited: Duration) {
    assert!(
        limited >= Duration::from_millis(3_500),
        "{what}: 1 MiB in {limited:?} under a 256 KiB/s limit"
    );
    let added = limited.saturating_sub(unlimited);
    assert!(
        added <= Duration::from_secs(8),
        "{what}: the limit added {added:?} ({limited:?} against {unlimited:?} unlimited) for 1 MiB at 256 KiB/s"
    );
}

#[test]
fn upload_limit_paces_a_backup() {
    let repo = Repo::new_s3();
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    for src in [&a, &b] {
        fs::create_dir(src).unwrap();
        write_random(&src.join("r"), 1 << 20);
    }
    let started = Instant::now();
    repo.cmd().arg("backup").arg(&a).run().ok();
    let unlimited = started.elapsed();
    let started = Instant::now();
    repo.cmd()
        .args(["backup", "--limit-upload", "256"])
        .arg(&b)
        .run()
        .ok();
    assert_paced("backup to S3", unlimited, started.elapsed());
}

#[test]
fn download_limit_paces_a_restore() {
    let repo = Repo::new_s3();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    write_random(&src.join("r"), 1 << 20);
    repo.backup(&[&src]);
    let restore = |out: &str, limit: &[&str]| {
        let started = Instant::now();
        // A cache of its own: the second restore must fetch from the store too.
        repo.cmd()
            .env(
                "BACKUPD_CACHE_DIR",
                work.path().join(format!("cache-{out}")),
            )
            .args(["restore", "latest"])
            .args(limit)
            .arg("--target")
            .arg(work.path().join(out))
            .run()
            .ok();
        assert_eq!(
            fs::read(restored_path(&work.path().join(out), &src).join("r")).unwrap(),
            fs::read(src.join("r")).unwrap()
        );
        started.elapsed()
    };
    let unlimited = restore("fast", &[]);
    let limited = restore("slow", &["--limit-download", "256"]);
    assert_paced("restore from S3", unlimited, limited);
}
