//! `verify`: restore tests of files and of PostgreSQL (with pg_amcheck and the policy's
//! SQL checks, failing when they fail), packs read back, and damage reported with the
//! files it affects.

use std::fs;
use std::path::Path;

use serde_json::Value;

use super::common::*;
use super::pgserver::PgEnv;
use super::policy::PolicyDir;

fn largest_pack(repo_path: &Path) -> std::path::PathBuf {
    let mut best: Option<(u64, std::path::PathBuf)> = None;
    for d in fs::read_dir(repo_path.join("data")).unwrap() {
        for f in fs::read_dir(d.unwrap().path()).unwrap() {
            let f = f.unwrap();
            let len = f.metadata().unwrap().len();
            if best.as_ref().is_none_or(|(l, _)| len > *l) {
                best = Some((len, f.path()));
            }
        }
    }
    best.unwrap().1
}

#[test]
fn a_files_restore_test_passes_and_a_damaged_pack_names_the_files_it_affects() {
    let repo = Repo::new();
    let src = repo.scratch("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("small.txt"), b"hello\n").unwrap();
    repo.backup(&[src.to_str().unwrap()]);
    // The big file's data goes into a pack of its own, in the second backup.
    write_random(&src.join("sub/big.bin"), 3 << 20);
    repo.backup(&[src.to_str().unwrap()]);
    let scratch = repo.scratch("scratch");
    let v = repo
        .cmd()
        .args([
            "verify",
            "--restore-test",
            "--read-data-subset",
            "100%",
            "--json",
            "--scratch",
        ])
        .arg(&scratch)
        .run()
        .ok()
        .json();
    assert_eq!(v["ok"], true, "{v}");
    // 100%: every pack in the store was read, counted on disk.
    let packs = walk_files(&repo.path.join("data"));
    assert!(packs >= 2, "two backups, two packs at least: {packs}");
    assert_eq!(v["packs_read"].as_u64().unwrap(), packs, "{v}");
    assert_eq!(v["restore"]["bytes"], (3 << 20) + 6, "{v}");
    assert_eq!(v["restore"]["files"], 2, "{v}");
    assert_eq!(
        fs::read_dir(&scratch).unwrap().count(),
        0,
        "the scratch copy is removed"
    );

    flip_bit(&largest_pack(&repo.path), 100);
    let out = repo
        .cmd()
        .args(["verify", "--read-data", "--json"])
        .run()
        .expect(1);
    let v: Value = out.json();
    assert_eq!(v["ok"], false);
    let affected: Vec<&str> = v["affected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        affected.iter().any(|a| a.ends_with("/sub/big.bin")),
        "{affected:?}"
    );
    assert!(
        !affected.iter().any(|a| a.ends_with("small.txt")),
        "{affected:?}"
    );
    assert!(
        out.stderr.contains("verification failed"),
        "{}",
        out.describe()
    );
}

#[test]
fn a_postgres_restore_test_runs_amcheck_and_the_policy_sql_checks_and_fails_when_they_fail() {
    let env = PgEnv::new();
    let cluster = env.cluster("main");
    cluster.sql("CREATE TABLE users(id int primary key, name text); INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 500) g;");
    // The example's second check wants the application's database to exist.
    cluster.sql("CREATE DATABASE finnexus");
    let d = PolicyDir::examples();
    d.point_finnexus_at(&env, &cluster);
    let run = |args: &[&str]| {
        backupd()
            .arg("--policies")
            .arg(d.policies())
            .args(args)
            .run()
    };
    run(&["backup", "--policy", "finnexusai-postgres"]).ok();
    // Rows after the base backup come from the WAL archive.
    cluster.sql("INSERT INTO users SELECT g, 'late' FROM generate_series(501, 600) g;");
    cluster.switch_and_wait_archived();

    let v = run(&["verify", "--policy", "finnexusai-postgres", "--json"])
        .ok()
        .json();
    assert_eq!(v["ok"], true, "{v}");
    let t = &v["restore"];
    assert_eq!(t["source"], "postgres", "{v}");
    assert_eq!(t["amcheck_ok"], true, "{v}");
    let checks = t["sql_checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2, "{v}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{v}");
    assert_eq!(
        checks[0]["value"], "600",
        "replayed to the end of the archive: {v}"
    );
    // The live cluster is untouched (that the throwaway server is gone is asserted in
    // pg_amcheck_finding_a_broken_index_fails_the_verification_and_the_server_is_gone_after).
    assert_eq!(cluster.count("select count(*) from users"), 600);

    // A check that does not hold fails the verification, saying which and why.
    d.edit("finnexusai-postgres.toml", |doc| {
        doc["verify"]["sql_checks"][0]["at_least"] = toml_edit::value(1000);
    });
    let out = run(&["verify", "--policy", "finnexusai-postgres"]).expect(1);
    assert!(
        out.stdout().contains("SQL check failed in postgres: SELECT count(*) FROM users: expected at least 1000, got 600"),
        "{}",
        out.describe()
    );
}

/// Files under `dir`, at any depth.
fn walk_files(dir: &std::path::Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Processes whose command line mentions `dir` (a server started on a data directory
/// under it).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

#[test]
fn pg_amcheck_finding_a_broken_index_fails_the_verification_and_the_server_is_gone_after() {
    let env = PgEnv::new();
    let c = env.cluster("main");
    c.sql("CREATE TABLE t(k int); INSERT INTO t SELECT g FROM generate_series(1, 5000) g; CREATE INDEX t_k ON t(k); CHECKPOINT;");
    // Break the index on disk (not in the server's memory, where the page stays clean):
    // swap the keys 1000 and 1001 in their leaf page, so that its order no longer holds.
    // The base backup copies the broken file; nothing rewrites the page before it does.
    let rel = c.sql("SELECT pg_relation_filepath('t_k')");
    let file = c.data.join(rel);
    let mut b = fs::read(&file).unwrap();
    let find = |b: &[u8], k: u32| {
        let pat = k.to_le_bytes();
        let hits: Vec<usize> = (0..b.len() - 4)
            .filter(|&i| b[i..i + 4] == pat && i % 4 == 0)
            .collect();
        assert_eq!(hits.len(), 1, "key {k} once in the index: {hits:?}");
        hits[0]
    };
    let (a, z) = (find(&b, 1000), find(&b, 1001));
    b[a..a + 4].copy_from_slice(&1001u32.to_le_bytes());
    b[z..z + 4].copy_from_slice(&1000u32.to_le_bytes());
    fs::write(&file, &b).unwrap();
    super::pg::backup(&env, &c, &[]);
    c.switch_and_wait_archived();

    let scratch = env.path("scratch");
    fs::create_dir_all(&scratch).unwrap();
    let out = env
        .cmd()
        .args(["verify", "--restore-test", "--json", "--scratch"])
        .arg(&scratch)
        .run()
        .expect(1);
    let v = out.json();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["restore"]["amcheck_ok"], false, "{v}");
    assert!(
        v.to_string().contains("pg_amcheck found problems") && v.to_string().contains("t_k"),
        "the failure names the check and the index: {v}"
    );
    // The throwaway server is stopped and its directory removed; the live one is as it was.
    assert_eq!(
        processes_under(&scratch),
        Vec::<String>::new(),
        "a server still runs"
    );
    assert_eq!(
        fs::read_dir(&scratch).unwrap().count(),
        0,
        "the restore test's directory is removed"
    );
    assert_eq!(c.count("select count(*) from t"), 5000);
}
