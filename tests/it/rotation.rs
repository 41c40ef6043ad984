//! Key generations: `key rotate` while a backup runs (local and S3), recovery codes, and
//! the conversion of the committed fixture's version-1 key files by `upgrade`.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::common::*;

/// The key generation named in a stored object's envelope (byte 0 is the envelope
/// version, bytes 1..5 the generation).
fn generation_of(repo: &Repo, dir: &str, name: &str) -> u32 {
    let b = std::fs::read(repo.path.join(dir).join(name)).unwrap();
    assert_eq!(b[0], 1, "{dir}/{name}: envelope version");
    u32::from_le_bytes([b[1], b[2], b[3], b[4]])
}

fn snapshot_ids(repo: &Repo) -> Vec<(String, String)> {
    let v = repo.ok(&["snapshots", "--json"]).json();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s["tags"].to_string()))
        .collect()
}

#[test]
fn a_rotation_during_a_backup_lets_it_finish_and_seals_later_objects_with_the_new_generation() {
    for repo in Repo::both() {
        let data = repo.scratch("data");
        write_random(&data, 3 << 20);
        // A backup that reads for a while (its command sleeps between two halves).
        let script = format!("cat {0}; sleep 3; cat {0}", data.display());
        let running = repo
            .cmd()
            .args([
                "backup",
                "--json",
                "--tag",
                "during",
                "--stdin-filename",
                "slow",
                "--stdin-from-command",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .spawn();
        std::thread::sleep(Duration::from_millis(1500));
        let rotated = repo.ok(&["key", "rotate", "--json"]).json();
        assert_eq!(rotated["generation"], 2, "{rotated}");
        let out = running.wait(TIMEOUT);
        assert_eq!(out.code(), 0, "{}", out.describe());
        repo.ok(&[
            "backup",
            "--tag",
            "after",
            "--stdin",
            "--stdin-filename",
            "x",
        ]);
        let snaps = snapshot_ids(&repo);
        let during = &snaps.iter().find(|(_, t)| t.contains("during")).unwrap().0;
        let after = &snaps.iter().find(|(_, t)| t.contains("after")).unwrap().0;
        // The backup that opened before the rotation sealed with the generation it had;
        // the one after, with the new one.
        assert_eq!(
            generation_of(&repo, "snapshots", during),
            1,
            "{}",
            repo.location
        );
        assert_eq!(
            generation_of(&repo, "snapshots", after),
            2,
            "{}",
            repo.location
        );
        // Both restore exactly, and check reads every object.
        let back = repo.scratch("back");
        repo.cmd()
            .args(["restore", during, "--target"])
            .arg(&back)
            .run()
            .ok();
        let mut want = std::fs::read(&data).unwrap();
        want.extend_from_slice(&want.clone());
        assert!(std::fs::read(back.join("slow")).unwrap() == want);
        repo.ok(&["check", "--read-data"]);
        let list = repo.ok(&["key", "list", "--json"]).json();
        let gens: Vec<u64> = list["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["generation"].as_u64().unwrap())
            .collect();
        assert_eq!(gens, [1, 2], "{list}");
    }
}

#[test]
fn a_recovery_code_opens_a_repository_whose_only_password_is_gone() {
    let repo = Repo::new();
    repo.ok(&["backup", "--stdin", "--stdin-filename", "x"]);
    let v: Value = repo.ok(&["key", "add", "--recovery", "--json"]).json();
    let code = v["recovery_code"].as_str().unwrap().to_string();
    let recovery_id = v["id"].as_str().unwrap().to_string();
    assert_eq!(code.split('-').count(), 8, "{code}");
    // Printed once: the code is in no file of the repository or the cache.
    let grep = std::process::Command::new("grep")
        .args(["-rqF", &code.replace('-', "")])
        .arg(repo.scratch(""))
        .status()
        .unwrap();
    assert!(!grep.success(), "the recovery code is stored somewhere");
    let with_code = |c: &str| {
        backupd()
            .arg("--repo")
            .arg(&repo.location)
            .env("XDG_CACHE_HOME", repo.scratch("other-host-cache"))
            .env_remove("BACKUPD_PASSWORD")
            .env("BACKUPD_RECOVERY_CODE", c)
    };
    // The password's key file goes; the code still opens everything, typed as printed
    // or in capitals with spaces.
    let password_key = repo.ok(&["key", "list", "--json"]).json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kind"] == "password")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    with_code(&code)
        .args(["key", "remove", &password_key])
        .run()
        .ok();
    repo.cmd().arg("snapshots").run().expect(12);
    let typed = code.to_uppercase().replace('-', " ");
    let back = repo.scratch("back");
    with_code(&typed)
        .args(["restore", "latest", "--target"])
        .arg(&back)
        .run()
        .ok();
    let list = with_code(&code)
        .args(["key", "list", "--json"])
        .run()
        .ok()
        .json();
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{list}");
    assert_eq!(keys[0]["id"], recovery_id.as_str());
    assert_eq!(keys[0]["kind"], "recovery");
    // A wrong code (right shape) is a wrong password; a malformed one says what it is.
    let mut wrong: Vec<char> = code.chars().collect();
    wrong[0] = if wrong[0] == 'a' { 'b' } else { 'a' };
    with_code(&wrong.into_iter().collect::<String>())
        .arg("snapshots")
        .run()
        .expect(12);
    with_code("not a code")
        .arg("snapshots")
        .run()
        .expect(1)
        .stderr_has("BACKUPD_RECOVERY_CODE is not a recovery code");
}

#[test]
fn upgrade_converts_the_committed_fixtures_key_file_and_its_snapshots_restore_after_a_rotation() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    sh(&format!(
        "cp -a {} {}",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/repo-v2")
            .display(),
        repo.display()
    ));
    let cmd = || {
        backupd()
            .arg("--repo")
            .arg(&repo)
            .env("BACKUPD_PASSWORD", "fixture-password")
            .env("XDG_CACHE_HOME", t.path().join("cache"))
    };
    let before = t.path().join("before");
    cmd()
        .args(["restore", "latest", "--target"])
        .arg(&before)
        .run()
        .ok();
    let list = cmd().args(["key", "list", "--json"]).run().ok().json();
    assert_eq!(list["keys"][0]["kind"], "legacy", "{list}");
    assert!(list["serial"].is_null(), "{list}");
    cmd()
        .args(["key", "rotate"])
        .run()
        .expect(1)
        .stderr_has("backupd upgrade");
    cmd()
        .arg("upgrade")
        .run()
        .ok()
        .output_has("key generations");
    let list = cmd().args(["key", "list", "--json"]).run().ok().json();
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{list}");
    assert_eq!(keys[0]["kind"], "password");
    assert_eq!(keys[0]["version"], 2);
    assert_eq!(keys[0]["granted"], true);
    cmd().args(["key", "rotate"]).run().ok();
    let after = t.path().join("after");
    cmd()
        .args(["restore", "latest", "--target"])
        .arg(&after)
        .run()
        .ok();
    // (diff calls two FIFOs a difference: they are compared by type.)
    sh(&format!(
        "diff -r -x fifo {0} {1} && test -p {1}/tmp/backupd-fixture-v2-src/fifo && getfattr -d {0}/tmp/backupd-fixture-v2-src/hello.txt | sed 1d > {0}.x && getfattr -d {1}/tmp/backupd-fixture-v2-src/hello.txt | sed 1d > {1}.x && cmp {0}.x {1}.x && grep -q fixture {1}.x",
        before.display(),
        after.display()
    ));
    cmd().args(["check", "--read-data"]).run().ok();
    // A second upgrade has nothing to do.
    cmd().arg("upgrade").run().ok().output_has("nothing to do");
}
