//! SIGTERM / SIGINT during a backup: exit 130, no snapshot, a clean repository.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::common::*;

/// True once the process has a file under `src` open, i.e. it is reading the source
/// (which it does only after installing its signal handlers).
fn reading_source(pid: u32, src: &Path) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(src) && t != src))
}

fn interrupted_backup(signal: &str) {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..3 {
        write_random(&src.join(format!("big{i}")), 100 * 1024 * 1024);
    }

    let mut child = repo.cmd().arg("backup").arg(&src).spawn();
    let pid = child.pid();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reading_source(pid, &src) {
        if let Some(status) = child.child.try_wait().unwrap() {
            panic!("backup ended ({status}) before it could be interrupted");
        }
        assert!(Instant::now() < deadline, "backup did not start reading");
        thread::sleep(Duration::from_millis(10));
    }
    thread::sleep(Duration::from_millis(400));
    assert!(
        child.child.try_wait().unwrap().is_none(),
        "backup finished before the signal: make the source bigger"
    );
    let sent = Instant::now();
    let st = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(st.success());
    let out = child.wait(Duration::from_secs(60)).expect(130);
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "backup took {took:?} to stop after SIG{signal}"
    );
    assert!(out.stderr.contains("interrupted"), "{}", out.describe());

    assert!(
        repo.snapshots().is_empty(),
        "an interrupted backup left a snapshot"
    );
    let report = repo.ok(&["check", "--json"]).json();
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    // No temp files left behind.
    let leftovers: Vec<_> = fs::read_dir(repo.path.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "tmp/ holds {leftovers:?}");
}

#[test]
fn sigterm_during_backup_exits_130_without_snapshot() {
    interrupted_backup("TERM");
}

#[test]
fn sigint_during_backup_exits_130_without_snapshot() {
    interrupted_backup("INT");
}
