//! Fault injection (issue 16): backup, restore, prune, check, wal-push and wal-fetch run
//! in-process on a repository whose store fails on purpose — the Nth request of each run,
//! for N spread over every request the run makes, with each fault in turn (a reset
//! connection, a broken disk, a short read, a flipped bit, a delay, a full disk), and then
//! a seeded random schedule. Every run must end in a clear error naming the object, or
//! succeed (a retry): never a panic, a hang, a committed snapshot that does not restore,
//! wrong bytes handed back, or a deleted object that a snapshot needs. After each run,
//! with the faults off, `check --read-data` is clean and every snapshot restores exactly.
//!
//! The layer sits under the retry layer, as the store's own failures do in the binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use backupd::backend::faults::{Fault, FaultControl, FaultLayer, Injected, Schedule};
use backupd::backend::layers::{RetryLayer, RetryPolicy};
use backupd::backend::{Backend, LocalBackend};
use backupd::backup::{run_backup, BackupRequest};
use backupd::postgres::archive::WalArchive;
use backupd::repo::prune::{prune, PruneOptions};
use backupd::repo::Repository;
use backupd::restore::{restore, RestoreFilter};
use backupd::source::files::{FilesSource, WalkOptions};
use backupd::source::CancelToken;

use super::common::*;

const PW: &[u8] = b"fault injection password";
const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;
const SEGMENT: &str = "000000010000000000000007";

/// The full chain of an error, as the CLI prints it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

/// A repository with two snapshots (the first forgotten, so prune has work), a WAL
/// segment, and a copy of it all to start each run from.
struct Rig {
    _dir: tempfile::TempDir,
    template: PathBuf,
    repo_dir: PathBuf,
    src: PathBuf,
    scratch: PathBuf,
    ctl: Arc<FaultControl>,
    repo: Repository,
    /// The snapshot kept, and what it holds.
    kept: String,
    segment: Vec<u8>,
}

fn files_backup(repo: &Repository, src: &Path) -> Result<String, String> {
    let req = BackupRequest {
        source: Box::new(FilesSource {
            paths: vec![src.to_path_buf()],
            excludes: vec![],
            options: WalkOptions::default(),
        }),
        host: "faults".into(),
        tags: vec![],
        force: false,
        parent: None,
        policy: None,
        cancel: CancelToken::new(),
        readers: 2,
        stats: Default::default(),
        time: None,
    };
    run_backup(repo, req)
        .map(|r| r.snapshot_id.to_string())
        .map_err(|e| chain(&e))
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        for i in 0..16 {
            write_random(&src.join(format!("f{i}")), 10_000 + i * 3000);
        }
        write_mixed(&src.join("sub").join("mixed"), 1 << 20);
        write_random(&src.join("sub").join("big"), 600_000);
        let template = dir.path().join("template");
        let plain: Arc<dyn Backend> = Arc::new(LocalBackend::new(template.clone()));
        plain.create().unwrap();
        let repo = Repository::init(plain, PW, "faults", "root", 3).unwrap();
        // The first snapshot, forgotten: its own data is garbage for prune.
        write_random(&src.join("gone"), 300_000);
        let first = files_backup(&repo, &src).unwrap();
        fs::remove_file(src.join("gone")).unwrap();
        let kept = files_backup(&repo, &src).unwrap();
        repo.remove_snapshot(&backupd::pipeline::BlobId::from_hex(&first).unwrap())
            .unwrap();
        let segment = random_bytes(1 << 20);
        WalArchive::new(&repo, SYSTEM_ID)
            .push(SEGMENT, &segment)
            .unwrap();
        drop(repo);
        // From here on the source also holds a new file, for the backups under faults.
        // (The folder keeps its time: the kept snapshot restores to the same folder.)
        let mtime = fs::metadata(&src).unwrap().modified().unwrap();
        write_random(&src.join("new"), 300_000);
        fs::File::open(&src).unwrap().set_modified(mtime).unwrap();

        let repo_dir = dir.path().join("repo");
        let faults = FaultLayer::new(LocalBackend::new(repo_dir.clone()));
        let ctl = faults.control();
        let stack: Arc<dyn Backend> = Arc::new(RetryLayer::new(
            faults,
            RetryPolicy {
                attempts: 5,
                base_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(4),
            },
        ));
        copy_dir(&template, &repo_dir);
        let repo = Repository::open(stack, PW).unwrap();
        let scratch = dir.path().join("scratch");
        Rig {
            _dir: dir,
            template,
            repo_dir,
            src,
            scratch,
            ctl,
            repo,
            kept,
            segment,
        }
    }

    /// The repository as it was made, again.
    fn reset(&self) {
        self.ctl.set(Schedule::Off);
        fs::remove_dir_all(&self.repo_dir).unwrap();
        copy_dir(&self.template, &self.repo_dir);
        let _ = fs::remove_dir_all(&self.scratch);
        fs::create_dir_all(&self.scratch).unwrap();
    }

    /// Restores snapshot `id` into a new directory; the report and where.
    fn restore(&self, id: &str, name: &str) -> Result<(PathBuf, Vec<(String, String)>), String> {
        let (sid, snap) = self.repo.resolve_snapshot(id).map_err(|e| chain(&e))?;
        let _ = sid;
        let index = self.repo.load_index().map_err(|e| chain(&e))?;
        let target = self.scratch.join(name);
        let report = restore(
            &self.repo,
            &index,
            &snap.tree,
            &target,
            &RestoreFilter::default(),
            2,
            &AtomicU64::new(0),
        )
        .map_err(|e| chain(&e))?;
        Ok((target, report.failed))
    }

    /// With the faults off: the structure and every byte check clean, the kept snapshot
    /// restores to the source without `new`, any other to the source with it, and the
    /// WAL segment (if stored) to its bytes.
    fn assert_sound(&self, what: &str) {
        self.ctl.set(Schedule::Off);
        let report = backupd::check::check(&self.repo, true);
        assert!(
            report.errors.is_empty(),
            "{what}: check --read-data: {:?}",
            report.errors
        );
        let snaps = self.repo.snapshots().unwrap();
        assert!(
            snaps.iter().any(|(id, _)| id.to_string() == self.kept),
            "{what}: the kept snapshot is gone"
        );
        for (id, _) in snaps {
            let id = id.to_string();
            let (target, failed) = self
                .restore(&id, &format!("check-{}", &id[..8]))
                .unwrap_or_else(|e| panic!("{what}: snapshot {id} does not restore: {e}"));
            assert!(failed.is_empty(), "{what}: snapshot {id}: {failed:?}");
            let kept = id == self.kept;
            let diff = compare_trees(&self.src, &restored_path(&target, &self.src), &|rel, _| {
                kept && rel == b"new"
            });
            assert!(diff.is_empty(), "{what}: snapshot {id}: {diff:?}");
            fs::remove_dir_all(&target).unwrap();
        }
        match WalArchive::new(&self.repo, SYSTEM_ID).fetch(SEGMENT) {
            Ok(Some(b)) => assert!(b == self.segment, "{what}: the WAL segment changed"),
            other => panic!("{what}: the WAL segment: {other:?}"),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// What one run under faults did.
enum Outcome {
    Ok,
    Err(String),
}

/// Runs `f` on another thread: a panic or a run longer than a minute fails the test.
fn guarded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => {
            let _ = t.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: hung (over 60 s)"),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let e = t.join().unwrap_err();
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: panicked: {msg}")
        }
    }
}

/// An error must name the object a fault hit (its path, or its name), and a full disk
/// must say so.
fn assert_names_the_object(what: &str, err: &str, injected: &[Injected]) {
    let named = injected.iter().any(|i| {
        let last = i.path.rsplit('/').next().unwrap_or(&i.path);
        err.contains(i.path.as_str())
            || (!last.is_empty() && err.contains(last))
            || err.contains(&last[..last.len().min(8)])
    });
    assert!(
        named,
        "{what}: the error does not name the object hit: {err}\ninjected: {injected:?}"
    );
    if injected
        .iter()
        .all(|i| i.fault == Fault::DiskFull && i.op != "get")
    {
        assert!(err.contains("No space left"), "{what}: {err}");
    }
}

/// The operations under test. Each returns what it made (a snapshot id) or its error.
#[derive(Clone, Copy, Debug)]
enum Op {
    Backup,
    Restore,
    Prune,
    Check,
    WalPush,
    WalFetch,
}

impl Op {
    /// True for the operations that change the repository.
    fn writes(self) -> bool {
        matches!(self, Op::Backup | Op::Prune | Op::WalPush)
    }
}

/// Every file of a repository with its size and modification time.
fn listing(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let md = e.metadata().unwrap();
            if md.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), md.len(), md.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn run_op(rig: &Rig, op: Op) -> Outcome {
    let res: Result<String, String> = match op {
        Op::Backup => files_backup(&rig.repo, &rig.src),
        Op::Restore => rig
            .restore(&rig.kept, "under-faults")
            .and_then(|(target, failed)| {
                // Files a restore could not read are listed, each with the object and why;
                // everything else it wrote is right.
                let diff: Vec<String> =
                    compare_trees(&rig.src, &restored_path(&target, &rig.src), &|rel, _| {
                        rel == b"new"
                    })
                    .into_iter()
                    .filter(|d| {
                        let rel = d.split(':').next().unwrap_or("");
                        rel.is_empty()
                            || !failed.iter().any(|(p, _)| p.ends_with(&format!("/{rel}")))
                    })
                    .collect();
                if !diff.is_empty() {
                    panic!("restore under faults wrote wrong data: {diff:?} (failed: {failed:?})");
                }
                if failed.is_empty() {
                    Ok("restored".into())
                } else {
                    Err(format!("{failed:?}"))
                }
            }),
        Op::Prune => prune(
            &rig.repo,
            &PruneOptions {
                grace: Duration::ZERO,
                ..PruneOptions::default()
            },
        )
        .map(|r| format!("deleted {}", r.deleted))
        .map_err(|e| chain(&e)),
        Op::Check => {
            let r = backupd::check::check(&rig.repo, true);
            if r.errors.is_empty() {
                Ok("clean".into())
            } else {
                Err(r.errors.join("; "))
            }
        }
        Op::WalPush => {
            let seg = random_bytes(300_000);
            WalArchive::new(&rig.repo, SYSTEM_ID)
                .push("000000010000000000000008", &seg)
                .map(|_| "pushed".to_string())
                .map_err(|e| chain(&e))
                .inspect(|_| {
                    // Stored means stored exactly.
                    rig.ctl.off();
                    let back = WalArchive::new(&rig.repo, SYSTEM_ID)
                        .fetch("000000010000000000000008")
                        .unwrap();
                    assert!(
                        back.as_deref() == Some(&seg[..]),
                        "wal-push stored other bytes"
                    );
                })
        }
        Op::WalFetch => match WalArchive::new(&rig.repo, SYSTEM_ID).fetch(SEGMENT) {
            Ok(Some(b)) if b == rig.segment => Ok("fetched".into()),
            Ok(other) => panic!(
                "wal-fetch under faults handed back wrong bytes ({:?} bytes)",
                other.map(|b| b.len())
            ),
            Err(e) => Err(chain(&e)),
        },
    };
    match res {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Err(e),
    }
}

/// N spread over 1..=total: the first, the last, and `inner` between.
fn positions(total: u64, inner: u64) -> Vec<u64> {
    let mut v = vec![1, total];
    for k in 1..=inner {
        v.push(1 + (total - 1) * k / (inner + 1));
    }
    v.sort_unstable();
    v.dedup();
    v.retain(|n| *n >= 1);
    v
}

fn nth_fault_matrix(op: Op, inner: u64) {
    let rig = Arc::new(Rig::new());
    rig.reset();
    rig.ctl.set(Schedule::Off);
    let clean = run_op(&rig, op);
    assert!(matches!(clean, Outcome::Ok), "{op:?} without faults failed");
    let total = rig.ctl.requests();
    assert!(total > 0);
    rig.reset();
    let before = listing(&rig.repo_dir);
    let mut tally = std::collections::BTreeMap::<(Fault, &str), u32>::new();
    for n in positions(total, inner) {
        for fault in Fault::ALL {
            rig.reset();
            rig.ctl.set(Schedule::Nth { n, fault });
            let what = format!("{op:?} with {fault:?} at request {n} of {total}");
            let r = rig.clone();
            let outcome = guarded(&what, move || run_op(&r, op));
            let injected = rig.ctl.injected();
            let kind = match &outcome {
                Outcome::Ok => "succeeded",
                Outcome::Err(e) => {
                    assert_names_the_object(&what, e, &injected);
                    "clear error"
                }
            };
            *tally.entry((fault, kind)).or_default() += 1;
            if op.writes() {
                rig.assert_sound(&what);
            } else {
                assert_eq!(
                    listing(&rig.repo_dir),
                    before,
                    "{what}: a read-only run changed the repository"
                );
            }
        }
    }
    eprintln!("{op:?}: {total} requests; outcomes by fault: {tally:?}");
}

/// Transient faults on a share of all requests: every run still succeeds (retries).
fn random_transient(op: Op, per_mille: u32, seed: u64) {
    let rig = Arc::new(Rig::new());
    rig.reset();
    rig.ctl.set(Schedule::Random {
        seed,
        per_mille,
        faults: vec![Fault::Transient, Fault::Delay],
    });
    let what = format!("{op:?} with {per_mille}/1000 transient faults, seed {seed}");
    let r = rig.clone();
    let outcome = guarded(&what, move || run_op(&r, op));
    let injected = rig.ctl.injected();
    if let Outcome::Err(e) = outcome {
        panic!("{what}: failed although every fault was transient: {e}");
    }
    eprintln!(
        "{what}: survived {} injected faults in {} requests",
        injected.len(),
        rig.ctl.requests()
    );
    rig.assert_sound(&what);
}

#[test]
fn a_backup_under_each_fault_at_each_point_fails_clearly_or_succeeds() {
    nth_fault_matrix(Op::Backup, 4);
    random_transient(Op::Backup, 100, 11);
}

#[test]
fn a_restore_under_each_fault_at_each_point_fails_clearly_or_succeeds() {
    nth_fault_matrix(Op::Restore, 4);
    random_transient(Op::Restore, 100, 12);
}

#[test]
fn a_prune_under_each_fault_at_each_point_fails_clearly_or_succeeds() {
    nth_fault_matrix(Op::Prune, 4);
    random_transient(Op::Prune, 100, 13);
}

#[test]
fn check_and_wal_under_each_fault_at_each_point_fail_clearly_or_succeed() {
    nth_fault_matrix(Op::Check, 4);
    nth_fault_matrix(Op::WalPush, 4);
    nth_fault_matrix(Op::WalFetch, 4);
    random_transient(Op::Check, 100, 14);
    random_transient(Op::WalPush, 100, 15);
}
