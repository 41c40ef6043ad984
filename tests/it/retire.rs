//! `key retire`: the old keys open nothing afterwards (proved by opening every object
//! with them), SIGKILL at random moments and run again (local and S3), and a backup that
//! seals with the retiring generation is waited for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backupd::backend::{Backend, LocalBackend, ObjectType};
use backupd::crypto::{self, MasterKeys, ObjectKind};
use backupd::repo::pack;
use backupd::repo::Repository;

use super::common::*;

/// A small seeded generator (the seed is printed, so a failing run can be repeated).
struct Rng(u64);

impl Rng {
    fn from_env(name: &str) -> Rng {
        let seed = std::env::var("BACKUPD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{name}: seed {seed} (BACKUPD_TEST_SEED={seed} repeats it)");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Files of several sizes (several packs), a stdin snapshot, and two WAL objects.
fn fill(repo: &Repo) -> PathBuf {
    let src = repo.scratch("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..6u64 {
        write_random(&src.join(format!("f{i}")), (1 << 20) * (i + 1));
    }
    std::fs::write(src.join("d/small"), b"small file").unwrap();
    repo.ok(&["backup", src.to_str().unwrap()]);
    repo.cmd()
        .args(["backup", "--stdin", "--stdin-filename", "s"])
        .stdin(random_bytes(3 << 20))
        .run()
        .ok();
    let data = repo.scratch("pgdata");
    std::fs::create_dir_all(data.join("global")).unwrap();
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    let mut control = 42u64.to_le_bytes().to_vec();
    control.resize(8192, 0);
    std::fs::write(data.join("global/pg_control"), control).unwrap();
    for (i, f) in ["00000002.history", "00000003.history"].iter().enumerate() {
        let p = data.join("pg_wal").join(f);
        std::fs::write(&p, format!("{i}\t0/{i}000000\tno recovery target\n")).unwrap();
        repo.cmd()
            .arg("wal-push")
            .arg(&p)
            .arg("--pg-data")
            .arg(&data)
            .run()
            .ok();
    }
    src
}

/// Restores every snapshot and compares the files snapshot with `src`.
fn restores_exactly(repo: &Repo, src: &Path, round: &str) {
    let back = repo.scratch(&format!("back-{round}"));
    repo.cmd()
        .args(["restore", "latest", "--target"])
        .arg(&back)
        .run()
        .ok();
    let snaps = repo.ok(&["snapshots", "--json"]).json();
    let files = snaps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "files")
        .expect("the files snapshot")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fb = repo.scratch(&format!("files-{round}"));
    repo.cmd()
        .args(["restore", &files, "--target"])
        .arg(&fb)
        .run()
        .ok();
    let inside = fb.join(src.strip_prefix("/").unwrap());
    sh(&format!("diff -r {} {}", src.display(), inside.display()));
    std::fs::remove_dir_all(&back).ok();
    std::fs::remove_dir_all(&fb).ok();
}

/// Every object of the repository at `path` (a local directory), opened with `keys`:
/// how many opened.
fn objects_opened_with(path: &Path, keys: &MasterKeys, real: &MasterKeys) -> (usize, usize) {
    let b = LocalBackend::new(path.to_path_buf());
    let (mut opened, mut tried) = (0, 0);
    let mut try_open = |ok: bool| {
        tried += 1;
        if ok {
            opened += 1;
        }
    };
    let config = b.get(ObjectType::Config, "config").unwrap();
    try_open(crypto::open(keys, ObjectKind::Config, None, &config).is_ok());
    for (ty, kind) in [
        (ObjectType::Index, ObjectKind::Index),
        (ObjectType::Snapshot, ObjectKind::Snapshot),
        (ObjectType::Mark, ObjectKind::Marks),
        (ObjectType::Lock, ObjectKind::Lock),
    ] {
        for (n, _) in b.list(ty).unwrap() {
            let bytes = b.get(ty, &n).unwrap();
            try_open(crypto::open(keys, kind, None, &bytes).is_ok());
        }
    }
    for (n, _) in b.list(ObjectType::Pack).unwrap() {
        let bytes = b.get(ObjectType::Pack, &n).unwrap();
        let hlen = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap()) as usize;
        let header = &bytes[bytes.len() - 4 - hlen..bytes.len() - 4];
        try_open(crypto::open(keys, ObjectKind::PackHeader, None, header).is_ok());
        // The blobs, found with the real keys' reading of the header.
        for e in pack::read_header(real, &n, &bytes).unwrap() {
            let s = &bytes[e.offset as usize..(e.offset + e.length) as usize];
            try_open(crypto::open(keys, e.kind.object_kind(), Some(&e.id.0), s).is_ok());
        }
    }
    let wal = path.join("wal");
    for f in walk(&wal) {
        let name = f.strip_prefix(&wal).unwrap().display().to_string();
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, b"backupd wal\0");
        sha2::Digest::update(&mut h, name.as_bytes());
        let binding: [u8; 32] = sha2::Digest::finalize(h).into();
        let bytes = std::fs::read(&f).unwrap();
        try_open(crypto::open(keys, ObjectKind::Wal, Some(&binding), &bytes).is_ok());
    }
    (opened, tried)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn open_lib(path: &Path, pw: &str) -> Repository {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(path.to_path_buf()));
    Repository::open(backend, pw.as_bytes()).unwrap()
}

#[test]
fn after_retire_a_leaked_key_file_and_its_password_open_no_object_of_the_repository() {
    let repo = Repo::new();
    let src = fill(&repo);
    repo.cmd()
        .args(["key", "add"])
        .env("BACKUPD_NEW_PASSWORD", "leaked password")
        .run()
        .ok();
    // What the one who took the key file and its password has: the keys it opened then.
    let leaked = open_lib(&repo.path, "leaked password").keys();
    let leaked_id = open_lib(&repo.path, "leaked password").key_id().to_string();
    let real = open_lib(&repo.path, PASSWORD).keys();
    let (opened, tried) = objects_opened_with(&repo.path, &leaked, &real);
    assert_eq!(
        opened, tried,
        "before the retire the leaked keys open everything"
    );
    let before: Vec<String> = repo
        .ok(&["snapshots", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert!(tried > 20, "{tried} objects");

    let out = repo
        .cmd()
        .args([
            "key",
            "retire",
            "1",
            "--grace",
            "0s",
            "--json",
            "--remove-key",
        ])
        .arg(&leaked_id[..12])
        .run()
        .ok()
        .json();
    assert_eq!(out["retired"], serde_json::json!([1]), "{out}");
    assert_eq!(out["generation"], 2, "{out}");
    assert!(
        out["resealed"]["pack"]["1"]["blobs"].as_u64().unwrap() > 10,
        "{out}"
    );
    assert!(
        out["resealed"]["wal"]["1"]["objects"].as_u64().unwrap() == 2,
        "{out}"
    );

    let real_now = open_lib(&repo.path, PASSWORD).keys();
    assert!(real_now.generation(1).is_none());
    let (opened, tried) = objects_opened_with(&repo.path, &leaked, &real_now);
    assert_eq!(
        opened, 0,
        "{opened} of {tried} objects still open with the leaked keys"
    );
    // The real key opens every one of them (so the count above could have failed).
    let (opened, tried) = objects_opened_with(&repo.path, &real_now, &real_now);
    assert_eq!(opened, tried);
    // The key file itself, put back, opens nothing either.
    repo.cmd_pw("leaked password")
        .arg("snapshots")
        .run()
        .expect(12);
    repo.ok(&["check", "--read-data"]);
    restores_exactly(&repo, &src, "end");
    let usage = repo.ok(&["key", "list", "--usage", "--json"]).json();
    let gens = usage["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 1, "{usage}");
    assert_eq!(gens[0]["generation"], 2);
    assert!(
        gens[0]["usage"]["pack"]["objects"].as_u64().unwrap() > 0,
        "{usage}"
    );
    // Every snapshot got a new id and keeps its old one, and answers to it.
    let after = repo.ok(&["snapshots", "--json"]).json();
    let after = after.as_array().unwrap();
    assert_eq!(after.len(), before.len());
    for s in after {
        let original = s["original_id"].as_str().expect("original_id");
        assert!(before.iter().any(|b| b == original), "{s}");
        assert!(
            !before.iter().any(|b| b == s["id"].as_str().unwrap()),
            "{s}"
        );
    }
    let files_before = before
        .iter()
        .find(|b| {
            after
                .iter()
                .any(|s| s["original_id"] == b.as_str() && s["source"] == "files")
        })
        .unwrap();
    let by_old = repo.scratch("by-old-id");
    repo.cmd()
        .args(["restore", &files_before[..10], "--target"])
        .arg(&by_old)
        .run()
        .ok();
    sh(&format!(
        "diff -r {} {}",
        src.display(),
        by_old.join(src.strip_prefix("/").unwrap()).display()
    ));
    let wal_fetched = repo.scratch("h");
    repo.cmd()
        .args(["wal-fetch", "00000002.history"])
        .arg(&wal_fetched)
        .arg("--pg-data")
        .arg(repo.scratch("pgdata"))
        .run()
        .ok();
}

#[test]
fn a_retire_killed_at_random_moments_finishes_when_run_again_local_and_s3() {
    let mut rng = Rng::from_env("retire torture");
    for repo in Repo::both() {
        let src = fill(&repo);
        let mut kills = 0;
        let mut finished = false;
        for round in 0..8 {
            let delay = Duration::from_millis(50 + rng.below(1200));
            let running = repo
                .cmd()
                .args([
                    "key", "retire", "1", "--grace", "0s", "--wait", "5s", "--json",
                ])
                .spawn();
            let started = Instant::now();
            std::thread::sleep(delay);
            let pid = running.pid();
            let killed = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap()
                .success();
            let out = running.wait(TIMEOUT);
            if out.status.code() == Some(0) {
                finished = true;
                eprintln!(
                    "round {round}: finished in {:?} before the kill",
                    started.elapsed()
                );
                break;
            }
            assert!(
                killed && out.status.code().is_none(),
                "neither finished nor killed: {}",
                out.describe()
            );
            kills += 1;
            // After each kill: the repository checks clean (the killed run's locks are
            // stale at once: its process is gone) and every snapshot restores exactly.
            repo.ok(&["check"]);
            restores_exactly(&repo, &src, &format!("kill-{round}"));
        }
        if !finished {
            let out = repo
                .cmd()
                .args(["key", "retire", "1", "--grace", "0s", "--json"])
                .run()
                .ok()
                .json();
            assert_eq!(out["retired"], serde_json::json!([1]), "{out}");
        }
        eprintln!("{}: {kills} kills survived", repo.location);
        let usage = repo.ok(&["key", "list", "--usage", "--json"]).json();
        let gens = usage["generations"].as_array().unwrap();
        assert_eq!(gens.len(), 1, "{usage}");
        repo.ok(&["check", "--read-data"]);
        restores_exactly(&repo, &src, "end");
    }
}

/// Waits until some process holds a lock on the (local) repository.
fn wait_for_a_lock(repo: &Repo) {
    let locks = repo.path.join("locks");
    let t0 = Instant::now();
    while std::fs::read_dir(&locks).map(|r| r.count()).unwrap_or(0) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no lock appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_backup_sealing_with_the_retiring_generation_is_waited_for_and_its_objects_resealed() {
    let repo = Repo::new();
    let data = repo.scratch("data");
    write_random(&data, 2 << 20);
    let script = format!("cat {0}; sleep 3; cat {0}", data.display());
    let running = repo
        .cmd()
        .args([
            "backup",
            "--stdin-filename",
            "slow",
            "--stdin-from-command",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .spawn();
    // Not a pause: its lock is there (a loaded machine may take seconds to start it).
    wait_for_a_lock(&repo);
    let started = Instant::now();
    let out = repo
        .cmd()
        .args(["key", "retire", "1", "--grace", "0s", "--json"])
        .run()
        .ok()
        .json();
    let backup = running.wait(TIMEOUT);
    assert_eq!(backup.code(), 0, "{}", backup.describe());
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "retire did not wait for the backup"
    );
    assert_eq!(out["retired"], serde_json::json!([1]), "{out}");
    let usage = repo.ok(&["key", "list", "--usage", "--json"]).json();
    assert_eq!(usage["generations"].as_array().unwrap().len(), 1, "{usage}");
    let back = repo.scratch("back");
    repo.cmd()
        .args(["restore", "latest", "--target"])
        .arg(&back)
        .run()
        .ok();
    let mut want = std::fs::read(&data).unwrap();
    want.extend_from_slice(&want.clone());
    assert!(std::fs::read(back.join("slow")).unwrap() == want);
    // A short --wait gives up with exit 11, naming the backup.
    let running = repo
        .cmd()
        .args([
            "backup",
            "--stdin-filename",
            "slow2",
            "--stdin-from-command",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .spawn();
    // Not a pause: its lock is there (a loaded machine may take seconds to start it).
    wait_for_a_lock(&repo);
    repo.cmd()
        .args(["key", "retire", "2", "--grace", "0s", "--wait", "1s"])
        .run()
        .expect(11)
        .stderr_has("seals with key generation 2");
    assert_eq!(running.wait(TIMEOUT).code(), 0);
    repo.ok(&["key", "retire", "2", "--grace", "0s"]);
    repo.ok(&["check", "--read-data"]);
}
