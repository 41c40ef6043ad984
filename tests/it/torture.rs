//! Crash torture (issue 16): every mutating verb — backup of files, stdin and PostgreSQL,
//! wal-push, `key` add/rotate/remove, forget, prune, restore `--delta`, and the agent — is
//! SIGKILLed (with every process it started) at seeded random moments, round after round
//! on one repository, local and on S3. After every kill `check` must be clean and the next
//! run of the same verb must succeed with no manual step; at the end `check --read-data`
//! must be clean and every snapshot must restore exactly: file trees to their content,
//! modes and times as they were at that backup, stdin to its bytes, PostgreSQL to the rows
//! committed before that backup, WAL segments to their bytes.
//!
//! `TORTURE_SEED` repeats a run (the seed is printed either way); `TORTURE_ROUNDS` sets
//! the rounds per verb and `TORTURE_AGENT_ROUNDS` the agent's (each waits for a cron
//! minute): a few here; `benches/torture.sh` runs thousands. The kill moment
//! is drawn uniformly over the verb's last uninterrupted run time, and each kill is
//! tallied by where it fell in that time.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::common::*;
use super::pgserver::{PgCluster, PgEnv};

/// The phases a kill is tallied by: where in the verb's usual run time it fell.
const PHASES: [&str; 5] = ["0-25%", "25-50%", "50-75%", "75-100%", "after it ended"];

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The seed: `TORTURE_SEED`, or the clock's nanoseconds; printed so a failure repeats.
fn seed() -> u64 {
    let seed = env_number("TORTURE_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64
    });
    eprintln!("torture seed {seed} (TORTURE_SEED={seed} repeats this run)");
    seed
}

fn rounds(default: u64) -> usize {
    env_number("TORTURE_ROUNDS").unwrap_or(default) as usize
}

/// SIGKILLs `pid` and every process it started, as a reboot, an OOM kill of its cgroup or
/// `systemctl kill -s KILL` would: each is stopped first (so none starts another), then
/// all are killed.
fn kill_tree(pid: u32) {
    fn children(pid: u32) -> Vec<u32> {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return vec![];
        };
        tasks
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect()
    }
    let signal = |sig: &str, p: u32| {
        let _ = Command::new("kill")
            .args([sig, &p.to_string()])
            .stderr(Stdio::null())
            .status();
    };
    let mut all = vec![];
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        signal("-STOP", p);
        all.push(p);
        todo.extend(children(p).into_iter().filter(|c| !all.contains(c)));
    }
    for p in all {
        signal("-KILL", p);
    }
}

/// What a snapshot must restore to.
#[derive(Clone, Debug)]
enum Expect {
    /// A file tree: `restored_path(target, src)` has exactly this manifest.
    Tree { src: PathBuf, manifest: Manifest },
    /// `dump <id> <name>` prints bytes with this SHA-256.
    Stdin { name: String, sha: String },
    /// `restore --at <at> --start` has `rows` rows in table `t`.
    Postgres { at: String, rows: i64 },
}

/// Relative path → kind, mode, mtime, size, content hash or link target.
type Manifest = BTreeMap<Vec<u8>, String>;

fn manifest(root: &Path) -> Manifest {
    scan(root)
        .into_iter()
        .map(|(rel, m)| {
            let what = match m.kind {
                Kind::File => hex(&Sha256::digest(
                    fs::read(root.join(std::ffi::OsStr::new(std::str::from_utf8(&rel).unwrap())))
                        .unwrap(),
                )),
                Kind::Symlink => String::from_utf8_lossy(m.target.as_deref().unwrap()).into(),
                _ => String::new(),
            };
            // A directory's mtime changes while a restore fills it in and is set at the
            // end; files' times must match to the nanosecond.
            let mtime = if m.kind == Kind::Dir { 0 } else { m.mtime_ns };
            (
                rel,
                format!("{:?} {:o} {mtime} {} {what}", m.kind, m.mode, m.size),
            )
        })
        .collect()
}

fn manifest_diff(want: &Manifest, got: &Manifest) -> Vec<String> {
    let mut out = vec![];
    for (k, v) in want {
        match got.get(k) {
            None => out.push(format!("missing {}", String::from_utf8_lossy(k))),
            Some(g) if g != v => {
                out.push(format!("{}: want {v}, got {g}", String::from_utf8_lossy(k)))
            }
            _ => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        out.push(format!("extra {}", String::from_utf8_lossy(k)));
    }
    out
}

/// How many kills of a verb fell in each phase; all of them were survived (a kill that
/// was not fails the test there and then, naming the seed and round).
#[derive(Default)]
struct Tally {
    kills: [u32; 5],
}

/// One torture run: a repository, the generator, the tallies, and what each snapshot
/// must restore to.
struct Torture<'a> {
    env: &'a PgEnv,
    rng: Rng,
    seed: u64,
    tallies: BTreeMap<&'static str, Tally>,
    expect: BTreeMap<String, Expect>,
    /// Each verb's last uninterrupted run time: the span kills are drawn from.
    typical: BTreeMap<&'static str, Duration>,
}

impl<'a> Torture<'a> {
    fn new(env: &'a PgEnv) -> Self {
        let seed = seed();
        Torture {
            env,
            rng: Rng(seed),
            seed,
            tallies: BTreeMap::new(),
            expect: BTreeMap::new(),
            typical: BTreeMap::new(),
        }
    }

    /// Runs `run` to completion, timed as the verb's typical run; asserts exit 0.
    fn clean_run(&mut self, verb: &'static str, run: Run) -> Output {
        let t0 = Instant::now();
        let out = run.run();
        assert!(
            out.status.success(),
            "seed {}: {verb}: the run after a kill failed:\n{}",
            self.seed,
            out.describe()
        );
        self.typical.insert(verb, t0.elapsed());
        out
    }

    /// Starts `run` and kills it (and its children) at a random moment within the verb's
    /// typical run time; tallies the phase; returns what it printed.
    fn killed_run(&mut self, verb: &'static str, run: Run) -> Output {
        let span = self.typical[verb];
        let frac = self.rng.unit() * 1.05;
        let delay = span.mul_f64(frac);
        let p = run.spawn();
        let t0 = Instant::now();
        while t0.elapsed() < delay {
            if p.child.try_wait_ref() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1).min(delay - t0.elapsed().min(delay)));
        }
        let ended = p.child.try_wait_ref();
        if !ended {
            kill_tree(p.pid());
        }
        let out = p.wait(TIMEOUT);
        let phase = if ended {
            4
        } else {
            ((frac * 4.0) as usize).min(3)
        };
        self.tallies.entry(verb).or_default().kills[phase] += 1;
        out
    }

    /// `check` must be clean after every kill.
    fn check(&self, verb: &str, round: usize, killed: &Output) {
        let out = self.env.cmd().arg("check").run();
        assert!(
            out.status.success(),
            "seed {}: {verb} round {round}: check failed after the kill.\nkilled run:\n{}\ncheck:\n{}",
            self.seed,
            killed.describe(),
            out.describe()
        );
    }

    fn snapshot_ids(&self) -> BTreeSet<String> {
        let v = self
            .env
            .cmd()
            .args(["snapshots", "--json"])
            .run()
            .ok()
            .json();
        v.as_array()
            .expect("snapshots --json is an array")
            .iter()
            .map(|s| s["id"].as_str().expect("snapshot id").to_string())
            .collect()
    }

    /// Records that every snapshot not in `before` must restore to `what`.
    fn expect_new(&mut self, before: &BTreeSet<String>, what: Expect) {
        for id in self.snapshot_ids().difference(before) {
            self.expect.insert(id.clone(), what.clone());
        }
    }

    /// One kill-check-rerun round of `make()`; the snapshots it made must restore to `what`.
    fn backup_round(
        &mut self,
        verb: &'static str,
        round: usize,
        make: &dyn Fn() -> Run,
        what: Expect,
    ) {
        let before = self.snapshot_ids();
        let killed = self.killed_run(verb, make());
        self.check(verb, round, &killed);
        self.clean_run(verb, make());
        self.expect_new(&before, what);
    }

    /// The table of kills by phase, printed at the end.
    fn report(&self, title: &str) {
        let mut s = format!(
            "\ncrash torture ({title}, seed {}): kills survived by phase\n{:<16}",
            self.seed, "verb"
        );
        for p in PHASES {
            s += &format!("{p:>15}");
        }
        s += &format!("{:>8}\n", "total");
        let mut sum = 0;
        for (verb, t) in &self.tallies {
            s += &format!("{verb:<16}");
            for k in t.kills {
                s += &format!("{k:>15}");
            }
            let n: u32 = t.kills.iter().sum();
            sum += n;
            s += &format!("{n:>8}\n");
        }
        s += &format!("all {sum} kills survived\n");
        eprintln!("{s}");
    }
}

trait TryWaitRef {
    fn try_wait_ref(&self) -> bool;
}

impl TryWaitRef for std::process::Child {
    /// True once the process has ended (without reaping it).
    fn try_wait_ref(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/stat", self.id()))
            .map(|s| {
                s.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
            })
            .unwrap_or(true)
    }
}

/// A source tree of small and larger files, a symlink and a subdirectory.
fn make_source(rng: &mut Rng, src: &Path) {
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..40 {
        let len = 1024 + rng.below(48 << 10) as usize;
        fs::write(src.join(format!("small-{i}")), rng.bytes(len)).unwrap();
    }
    for i in 0..4 {
        fs::write(src.join("sub").join(format!("big-{i}")), rng.bytes(3 << 20)).unwrap();
    }
    std::os::unix::fs::symlink("small-0", src.join("link")).unwrap();
}

/// Changes a few files: rewrites one, adds one, removes one, changes a mode.
fn mutate_source(rng: &mut Rng, src: &Path, round: usize) {
    let i = rng.below(40);
    fs::write(src.join(format!("small-{i}")), rng.bytes(4096)).unwrap();
    fs::write(src.join(format!("new-{round}")), rng.bytes(64 << 10)).unwrap();
    let big = src.join("sub").join(format!("big-{}", rng.below(4)));
    let mut b = fs::read(&big).unwrap();
    let at = rng.below(b.len() as u64) as usize;
    b[at] ^= 0x5a;
    fs::write(&big, b).unwrap();
    if round > 1 {
        let _ = fs::remove_file(src.join(format!("new-{}", round - 2)));
    }
    let j = rng.below(40);
    fs::set_permissions(
        src.join(format!("small-{j}")),
        fs::Permissions::from_mode(0o600 | ((rng.below(2) as u32) * 0o044)),
    )
    .unwrap();
}

/// The PostgreSQL server's clock, as `restore --at` takes it.
fn pg_now(c: &PgCluster) -> String {
    c.sql(
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    )
}

/// Every verb, `n` rounds each, on `env`'s repository.
fn torture_every_verb(env: &PgEnv, n: usize, title: &str) {
    let mut t = Torture::new(env);
    let work = env.path("torture");
    fs::create_dir_all(&work).unwrap();

    // --- backup of files ---
    let src = work.join("src");
    make_source(&mut t.rng, &src);
    let files = |src: PathBuf| move || env.cmd().arg("backup").arg(&src);
    let before = t.snapshot_ids();
    t.clean_run("backup files", files(src.clone())());
    t.expect_new(
        &before,
        Expect::Tree {
            src: src.clone(),
            manifest: manifest(&src),
        },
    );
    for round in 0..n {
        mutate_source(&mut t.rng, &src, round);
        let what = Expect::Tree {
            src: src.clone(),
            manifest: manifest(&src),
        };
        t.backup_round("backup files", round, &files(src.clone()), what);
    }

    // --- backup of stdin ---
    let stdin_run = |data: Vec<u8>| {
        move || {
            env.cmd()
                .args(["backup", "--stdin", "--stdin-filename", "dump.sql"])
                .stdin(data.clone())
        }
    };
    for round in 0..=n {
        let mut data = t.rng.bytes(6 << 20);
        // Half of it compressible, as a real dump is.
        data.extend(std::iter::repeat_n(b"insert into t values (42);\n", 1 << 16).flatten());
        let what = Expect::Stdin {
            name: "dump.sql".into(),
            sha: hex(&Sha256::digest(&data)),
        };
        let make = stdin_run(data);
        if round == 0 {
            let before = t.snapshot_ids();
            t.clean_run("backup stdin", make());
            t.expect_new(&before, what);
        } else {
            t.backup_round("backup stdin", round, &make, what);
        }
    }

    // --- backup of PostgreSQL, with its WAL archived by wal-push ---
    let c = env.cluster("torture-pg");
    c.sql("create table t (i int, pad text); create table s (i int)");
    let mut rows = 0i64;
    for round in 0..=n {
        c.sql("insert into t select g, repeat('x', 200) from generate_series(1, 2000) g");
        rows += 2000;
        let make = || super::pg::backup_cmd(env, &c);
        let before = t.snapshot_ids();
        if round == 0 {
            t.clean_run("backup postgres", make());
        } else {
            let killed = t.killed_run("backup postgres", make());
            t.check("backup postgres", round, &killed);
            t.clean_run("backup postgres", make());
        }
        // The backup's end is archived (a write first: with nothing since the backup's
        // own switch, pg_switch_wal would not switch); this moment lies after it and
        // before the next rows of t.
        c.sql("insert into s values (1)");
        c.switch_and_wait_archived();
        let at = pg_now(&c);
        t.expect_new(&before, Expect::Postgres { at, rows });
    }
    // A commit after the last of those moments, so that recovery to each one ends there.
    c.sql("insert into t values (0, 'after the last backup')");
    c.switch_and_wait_archived();

    // --- wal-push of segments PostgreSQL has not archived (archive_command fails) ---
    let w = env.cluster_with("torture-wal", "false", "");
    w.sql("create table w (i int)");
    let mut segments = vec![];
    for _ in 0..=n {
        w.sql("insert into w select generate_series(1, 20000)");
        segments.push(w.sql("select pg_walfile_name(pg_switch_wal())"));
    }
    // pg_switch_wal returns the segment it ended; wait until PostgreSQL has closed it.
    std::thread::sleep(Duration::from_millis(200));
    let push = |seg: &str| {
        env.cmd()
            .current_dir(&w.data)
            .args(["wal-push", "--push-ahead", "0", "--pg-data"])
            .arg(&w.data)
            .arg(format!("pg_wal/{seg}"))
    };
    t.clean_run("wal-push", push(&segments[0]));
    for (round, seg) in segments.iter().enumerate().skip(1) {
        let killed = t.killed_run("wal-push", push(seg));
        t.check("wal-push", round, &killed);
        t.clean_run("wal-push", push(seg));
    }

    // --- key add, rotate, remove ---
    const OTHER: &str = "torture other password";
    let key_add = || {
        env.cmd()
            .args(["key", "add"])
            .env("BACKUPD_NEW_PASSWORD", OTHER)
    };
    let key_rotate = || env.cmd().args(["key", "rotate"]);
    t.clean_run("key add", key_add());
    t.clean_run("key rotate", key_rotate());
    for round in 0..n {
        let killed = t.killed_run("key add", key_add());
        t.check("key add", round, &killed);
        t.clean_run("key add", key_add());
        let killed = t.killed_run("key rotate", key_rotate());
        t.check("key rotate", round, &killed);
        t.clean_run("key rotate", key_rotate());
        // Remove one of the other keys (the main password opens the repository).
        let keys = key_list(env, &env_password(env));
        let victim = keys
            .iter()
            .find(|k| k["current"] == false && k["kind"] != "not authentic")
            .map(|k| k["id"].as_str().unwrap().to_string());
        if let Some(victim) = victim {
            let remove = || env.cmd().args(["key", "remove", &victim]);
            let rotate_took = t.typical["key rotate"];
            t.typical.entry("key remove").or_insert(rotate_took);
            let killed = t.killed_run("key remove", remove());
            t.check("key remove", round, &killed);
            // Either the kill came after the removal, or running it again removes it.
            if key_list(env, env_password(env).as_str())
                .iter()
                .any(|k| k["id"] == victim.as_str())
            {
                t.clean_run("key remove", remove());
            }
        }
        assert_keys_sound(env, &t);
    }

    // --- forget ---
    let forget = |keep: usize| {
        move || {
            env.cmd()
                .args(["forget", "--keep-last"])
                .arg(keep.to_string())
        }
    };
    for round in 0..n {
        let most = largest_group(env);
        let make = forget(most.saturating_sub(1).max(2));
        if !t.typical.contains_key("forget") {
            t.clean_run("forget", make());
            continue;
        }
        let killed = t.killed_run("forget", make());
        t.check("forget", round, &killed);
        t.clean_run("forget", make());
    }
    let now = t.snapshot_ids();
    t.expect.retain(|id, _| now.contains(id));

    // --- prune: each round first makes garbage (a backup of new data, forgotten) ---
    let prune = || env.cmd().args(["prune", "--grace", "0s"]);
    for round in 0..=n {
        fs::write(src.join("garbage"), t.rng.bytes(2 << 20)).unwrap();
        let before = t.snapshot_ids();
        env.cmd().arg("backup").arg(&src).run().ok();
        for id in t.snapshot_ids().difference(&before) {
            env.cmd().args(["forget", id]).run().ok();
        }
        fs::remove_file(src.join("garbage")).unwrap();
        if round == 0 {
            t.clean_run("prune", prune());
            continue;
        }
        let killed = t.killed_run("prune", prune());
        t.check("prune", round, &killed);
        t.clean_run("prune", prune());
    }

    // --- restore --delta, alternating between two snapshots into one target ---
    let trees: Vec<(String, PathBuf, Manifest)> = t
        .expect
        .iter()
        .filter_map(|(id, e)| match e {
            Expect::Tree { src, manifest } => Some((id.clone(), src.clone(), manifest.clone())),
            _ => None,
        })
        .collect();
    assert!(trees.len() >= 2, "two file snapshots to restore: {trees:?}");
    let target = work.join("delta-target");
    let restore = |id: &str| {
        env.cmd()
            .args(["restore", id, "--delta", "--target"])
            .arg(&target)
    };
    for round in 0..=n {
        let (id, src, want) = &trees[round % 2 + trees.len() - 2];
        if round == 0 {
            t.clean_run("restore --delta", restore(id));
        } else {
            let killed = t.killed_run("restore --delta", restore(id));
            t.check("restore --delta", round, &killed);
            t.clean_run("restore --delta", restore(id));
        }
        let got = manifest(&restored_path(&target, src));
        let diff = manifest_diff(want, &got);
        assert!(
            diff.is_empty(),
            "seed {}: restore --delta round {round} of {id}: {diff:?}",
            t.seed
        );
    }

    // --- the end: every byte read back, every snapshot restored ---
    let out = env.cmd().args(["check", "--read-data"]).run();
    assert!(
        out.status.success(),
        "seed {}: check --read-data:\n{}",
        t.seed,
        out.describe()
    );
    assert_eq!(
        t.snapshot_ids(),
        t.expect.keys().cloned().collect::<BTreeSet<_>>(),
        "seed {}: every snapshot is one the torture made and knows",
        t.seed
    );
    let mut restored_at = BTreeSet::new();
    for (i, (id, e)) in t.expect.iter().enumerate() {
        match e {
            Expect::Tree {
                src,
                manifest: want,
            } => {
                let dst = work.join(format!("restore-{i}"));
                env.cmd()
                    .args(["restore", id, "--target"])
                    .arg(&dst)
                    .run()
                    .ok();
                let diff = manifest_diff(want, &manifest(&restored_path(&dst, src)));
                assert!(diff.is_empty(), "seed {}: snapshot {id}: {diff:?}", t.seed);
                fs::remove_dir_all(&dst).unwrap();
            }
            Expect::Stdin { name, sha } => {
                let out = env.cmd().args(["dump", id, name]).run().ok();
                assert_eq!(
                    &hex(&Sha256::digest(&out.stdout)),
                    sha,
                    "seed {}: snapshot {id}",
                    t.seed
                );
            }
            // Both snapshots of a round (a killed run may have committed one) have the
            // same rows; recovery to that moment starts from the newer.
            Expect::Postgres { at, .. } if !restored_at.insert(at.clone()) => {}
            Expect::Postgres { at, rows: want } => {
                let dst = work.join(format!("restore-{i}"));
                let port = free_port();
                env.cmd()
                    .args(["restore", "--at", at, "--start", "--archive-mode", "off"])
                    .arg("--target")
                    .arg(&dst)
                    .arg("--pg-port")
                    .arg(port.to_string())
                    .run()
                    .ok();
                let r = PgCluster::adopt(dst.clone(), port);
                assert_eq!(
                    r.count("select count(*) from t"),
                    *want,
                    "seed {}: PostgreSQL restored to {at}",
                    t.seed
                );
                drop(r);
                fs::remove_dir_all(&dst).unwrap();
            }
        }
    }
    for seg in &segments {
        let dst = work.join("fetched");
        env.cmd()
            .args(["wal-fetch", "--prefetch", "0", seg])
            .arg(&dst)
            .arg("--pg-data")
            .arg(&w.data)
            .run()
            .ok();
        assert!(
            fs::read(&dst).unwrap() == fs::read(w.data.join("pg_wal").join(seg)).unwrap(),
            "seed {}: WAL segment {seg} fetched differs",
            t.seed
        );
        fs::remove_file(&dst).unwrap();
    }
    t.report(title);
}

fn env_password(env: &PgEnv) -> String {
    fs::read_to_string(&env.password_file)
        .unwrap()
        .trim_end()
        .to_string()
}

fn key_list(env: &PgEnv, pw: &str) -> Vec<Value> {
    let v = env
        .cmd()
        .env("BACKUPD_PASSWORD", pw)
        .env_remove("BACKUPD_PASSWORD_FILE")
        .args(["key", "list", "--json"])
        .run()
        .ok()
        .json();
    v["keys"].as_array().expect("key list --json").clone()
}

/// Every key file is authentic and granted the current generation, and both passwords
/// open the repository.
fn assert_keys_sound(env: &PgEnv, t: &Torture) {
    for pw in [env_password(env).as_str(), "torture other password"] {
        for k in key_list(env, pw) {
            assert!(
                k["kind"] != "not authentic" && k["granted"] == true,
                "seed {}: a key file left unsound by a kill: {k}",
                t.seed
            );
        }
    }
}

/// The size of the largest group of snapshots `forget --keep-last` keeps apart.
fn largest_group(env: &PgEnv) -> usize {
    let v = env.cmd().args(["snapshots", "--json"]).run().ok().json();
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for s in v.as_array().unwrap() {
        let key = format!("{} {} {}", s["hostname"], s["paths"], s["tags"]);
        *groups.entry(key).or_default() += 1;
    }
    groups.values().copied().max().unwrap_or(0)
}

#[test]
fn every_verb_survives_sigkill_at_random_moments_on_a_local_repository() {
    let env = PgEnv::new();
    torture_every_verb(&env, rounds(3), "local");
}

#[test]
fn every_verb_survives_sigkill_at_random_moments_on_s3() {
    let env = PgEnv::new_s3();
    torture_every_verb(&env, rounds(2), "S3");
}

/// The agent, SIGKILLed with its job mid-backup: the next agent start runs the next fire
/// with no manual step, and what it stored restores.
#[test]
fn the_agent_survives_sigkill_in_the_middle_of_a_job() {
    use super::agent::{http_get, sample, start_agent};
    let env = PgEnv::new();
    let mut t = Torture::new(&env);
    let work = env.path("torture");
    let src = work.join("src");
    make_source(&mut t.rng, &src);
    for i in 0..3 {
        fs::write(src.join(format!("large-{i}")), t.rng.bytes(8 << 20)).unwrap();
    }
    let want = Expect::Tree {
        src: src.clone(),
        manifest: manifest(&src),
    };
    let pol = work.join("policies");
    fs::create_dir_all(&pol).unwrap();
    fs::write(
        pol.join("files.toml"),
        format!(
            "[repository]\nlocation = \"{}\"\npassword_file = \"{}\"\n[source]\ntype = \"files\"\npaths = [\"{}\"]\n[schedule]\ncron = \"* * * * *\"\n",
            env.location,
            env.password_file.display(),
            src.display()
        ),
    )
    .unwrap();
    // How long the job's backup takes (the first one stores everything; so does the
    // agent's first, which the kill aims at).
    let first = || env.cmd().arg("backup").arg(&src);
    let before = t.snapshot_ids();
    t.clean_run("agent", first());
    t.expect_new(&before, want.clone());
    let locks = env.repo.join("locks");
    let lock_names = || -> BTreeSet<std::ffi::OsString> {
        fs::read_dir(&locks)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let state = work.join("state");
    let n = env_number("TORTURE_AGENT_ROUNDS").unwrap_or(2) as usize;
    for round in 0..n {
        // As much new data each round as the first backup stored, so that the job takes
        // about as long as that one did.
        for i in 0..5 {
            fs::write(src.join(format!("round-{round}-{i}")), t.rng.bytes(8 << 20)).unwrap();
        }
        let want = Expect::Tree {
            src: src.clone(),
            manifest: manifest(&src),
        };
        let before = t.snapshot_ids();
        let (agent, _port, log) = start_agent(&pol, &state);
        let old = lock_names();
        let deadline = Instant::now() + Duration::from_secs(90);
        while !lock_names().iter().any(|n| !old.contains(n)) {
            assert!(Instant::now() < deadline, "the agent's job never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        let span = t.typical["agent"];
        let frac = t.rng.unit() * 1.05;
        std::thread::sleep(span.mul_f64(frac));
        let ended = !lock_names().iter().any(|n| !old.contains(n));
        kill_tree(agent.id());
        let mut agent = agent;
        let _ = agent.wait();
        let text = log.join().unwrap_or_default();
        let phase = if ended {
            4
        } else {
            ((frac * 4.0) as usize).min(3)
        };
        t.tallies.entry("agent").or_default().kills[phase] += 1;
        let out = env.cmd().arg("check").run();
        assert!(
            out.status.success(),
            "seed {}: agent round {round}: check after the kill:\n{}\nagent log:\n{text}",
            t.seed,
            out.describe()
        );
        // The next start runs the fire the kill cut short at once (catch-up), or, when the
        // kill came after the run, the next fire; either succeeds.
        let (mut agent, port, log) = start_agent(&pol, &state);
        let deadline = Instant::now() + Duration::from_secs(100);
        loop {
            let m = http_get(port, "/metrics").map(|r| r.1).unwrap_or_default();
            let ok = sample(
                &m,
                "backupd_policy_runs_total{policy=\"files\",result=\"success\"}",
            );
            let failed = sample(
                &m,
                "backupd_policy_runs_total{policy=\"files\",result=\"failure\"}",
            );
            assert!(
                failed.unwrap_or(0.0) == 0.0,
                "seed {}: agent round {round}: a run failed after the kill:\n{m}",
                t.seed
            );
            if ok.unwrap_or(0.0) >= 1.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "seed {}: agent round {round}: no successful run after the kill",
                t.seed
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        super::agent::signal(&agent, "TERM");
        let _ = agent.wait();
        let text = log.join().unwrap_or_default();
        assert!(
            ended || text.contains("cut short when the agent last stopped"),
            "seed {}: agent round {round}: the run cut short was not caught up:\n{text}",
            t.seed
        );
        t.expect_new(&before, want);
    }
    let out = env.cmd().args(["check", "--read-data"]).run();
    assert!(out.status.success(), "{}", out.describe());
    for (i, (id, e)) in t.expect.iter().enumerate() {
        let Expect::Tree {
            src,
            manifest: want,
        } = e
        else {
            unreachable!("the agent stores file trees only")
        };
        let dst = work.join(format!("restore-{i}"));
        env.cmd()
            .args(["restore", id, "--target"])
            .arg(&dst)
            .run()
            .ok();
        let diff = manifest_diff(want, &manifest(&restored_path(&dst, src)));
        assert!(diff.is_empty(), "seed {}: snapshot {id}: {diff:?}", t.seed);
    }
    t.report("agent, local");
}
