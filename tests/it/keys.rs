//! Passwords: `key add`, `key list`, `key passwd`, `key remove`.

use std::os::unix::fs::PermissionsExt;

use serde_json::Value;

use super::common::*;

const B: &str = "second password";
const C: &str = "third password";

fn key_modes(repo: &Repo) -> Vec<u32> {
    repo.names("keys")
        .iter()
        .map(|k| {
            std::fs::metadata(repo.path.join("keys").join(k))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        })
        .collect()
}

fn key_list(repo: &Repo, pw: &str) -> Vec<Value> {
    let v = repo
        .cmd_pw(pw)
        .args(["key", "list", "--json"])
        .run()
        .ok()
        .json();
    v["keys"]
        .as_array()
        .expect("key list --json has the key files under \"keys\"")
        .clone()
}

fn current(list: &[Value]) -> String {
    let cur: Vec<&Value> = list.iter().filter(|k| k["current"] == true).collect();
    assert_eq!(cur.len(), 1, "exactly one current key: {list:?}");
    cur[0]["id"].as_str().expect("key id").to_string()
}

#[test]
fn add_passwd_remove_keys() {
    let repo = Repo::new();
    let a = PASSWORD;
    assert_eq!(repo.names("keys").len(), 1);
    assert_eq!(key_modes(&repo), [0o600]);
    repo.cmd()
        .args(["backup", "--stdin", "--stdin-filename", "x"])
        .stdin(b"kept across key changes".to_vec())
        .run()
        .ok();

    // key add: both passwords open the repository.
    repo.cmd_pw(a)
        .args(["key", "add"])
        .env("BACKUPD_NEW_PASSWORD", B)
        .run()
        .ok();
    assert_eq!(repo.names("keys").len(), 2);
    assert_eq!(key_modes(&repo), [0o600, 0o600], "key files must be 0600");
    repo.cmd_pw(a).arg("snapshots").run().ok();
    repo.cmd_pw(B).arg("snapshots").run().ok();

    let list_a = key_list(&repo, a);
    assert_eq!(list_a.len(), 2, "{list_a:?}");
    let key_a = current(&list_a);
    let list_b = key_list(&repo, B);
    assert_eq!(list_b.len(), 2);
    let key_b = current(&list_b);
    assert_ne!(key_a, key_b);
    let mut ids: Vec<String> = list_a
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, repo.names("keys"));

    // Removing the key in use is refused.
    repo.cmd_pw(a)
        .args(["key", "remove", &key_a])
        .run()
        .expect(1)
        .stderr_has("in use");
    assert_eq!(repo.names("keys").len(), 2);

    // key passwd replaces the current key: A stops working, C works, B still works.
    repo.cmd_pw(a)
        .args(["key", "passwd"])
        .env("BACKUPD_NEW_PASSWORD", C)
        .run()
        .ok();
    repo.cmd_pw(a)
        .arg("snapshots")
        .run()
        .expect(12)
        .stderr_has("wrong password");
    repo.cmd_pw(C).arg("snapshots").run().ok();
    repo.cmd_pw(B).arg("snapshots").run().ok();
    let list_c = key_list(&repo, C);
    assert_eq!(list_c.len(), 2, "{list_c:?}");
    let key_c = current(&list_c);
    assert!(
        !repo.names("keys").contains(&key_a),
        "old key file is still there"
    );
    assert_eq!(key_modes(&repo), [0o600, 0o600]);

    // Removing another key works.
    repo.cmd_pw(B)
        .args(["key", "remove", &key_c[..12]])
        .run()
        .ok();
    assert_eq!(repo.names("keys"), std::slice::from_ref(&key_b));
    repo.cmd_pw(C).arg("snapshots").run().expect(12);
    // The data is still readable with the remaining password.
    let out = repo.cmd_pw(B).args(["dump", "latest", "x"]).run().ok();
    assert_eq!(out.stdout, b"kept across key changes");
    // ...and the last key cannot be removed (it is the one in use).
    repo.cmd_pw(B)
        .args(["key", "remove", &key_b])
        .run()
        .expect(1);
    assert_eq!(repo.names("keys").len(), 1);
}

#[test]
fn key_list_and_open_ignore_names_that_are_not_key_ids() {
    let repo = Repo::new();
    let real = repo.names("keys");
    assert_eq!(real.len(), 1);
    // Short, non-hex and upper-case names: none of them is a key file (`keys/` holds
    // files named by the lower-case hex SHA-256 of their bytes).
    for junk in ["x", "not-hex-name", &real[0].to_uppercase()] {
        std::fs::write(repo.path.join("keys").join(junk), b"{}").unwrap();
    }
    let list = key_list(&repo, PASSWORD);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(current(&list), real[0]);
    let text = repo.ok(&["key", "list"]).stdout();
    assert!(text.contains(&real[0][..8]), "{text}");
    assert_eq!(
        text.lines().take_while(|l| !l.is_empty()).count(),
        2,
        "a header and the one real key:\n{text}"
    );
    assert!(text.contains("generations (bundle 1"), "{text}");
    repo.ok(&["snapshots"]);
}

/// Writes a key file no password opens, with these KDF costs, into `keys/` under its name
/// (the SHA-256 of its bytes), choosing its salt so that it is listed before `before`.
fn plant_key(repo: &Repo, m_cost_kib: u32, t_cost: u32, p_cost: u32, before: &str) -> String {
    use sha2::{Digest, Sha256};
    loop {
        let kf = serde_json::json!({
            "version": 1,
            "created": "2026-01-01T00:00:00Z",
            "host": "planted",
            "username": "planted",
            "kdf": {
                "algorithm": "argon2id",
                "m_cost_kib": m_cost_kib,
                "t_cost": t_cost,
                "p_cost": p_cost,
                "salt": hex(&random_bytes(16)),
            },
            "data": hex(&random_bytes(120)),
        });
        let bytes = serde_json::to_vec_pretty(&kf).unwrap();
        let name = hex(&Sha256::digest(&bytes));
        if name.as_str() < before {
            std::fs::write(repo.path.join("keys").join(&name), &bytes).unwrap();
            return name;
        }
    }
}

/// A data directory just real enough for `wal-push` of history files: a `pg_control`
/// with system identifier 42.
fn fake_pg_data(repo: &Repo) -> std::path::PathBuf {
    let data = repo.scratch("pgdata");
    std::fs::create_dir_all(data.join("global")).unwrap();
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    let mut control = 42u64.to_le_bytes().to_vec();
    control.resize(8192, 0);
    std::fs::write(data.join("global/pg_control"), control).unwrap();
    data
}

#[test]
fn planted_key_files_at_the_kdf_cap_do_not_slow_wal_push() {
    let repo = Repo::new();
    let real = repo.names("keys")[0].clone();
    // Someone who can write to the store adds key files at the highest cost still
    // accepted, listed before the real key (so tried first when keys are tried in order).
    let planted: Vec<String> = (0..2)
        .map(|_| plant_key(&repo, 256 * 1024, 12, 8, &real))
        .collect();
    let data = fake_pg_data(&repo);
    // `init` recorded which key opens the repository: each wal-push (one open per file)
    // runs one key derivation, not one per planted key first.
    for (i, file) in ["00000002.history", "00000003.history"].iter().enumerate() {
        let path = data.join("pg_wal").join(file);
        std::fs::write(
            &path,
            format!("{i}\t0/{i}000000\tno recovery target specified\n"),
        )
        .unwrap();
        let out = repo
            .cmd()
            .env("BACKUPD_LOG", "backupd=debug")
            .arg("wal-push")
            .arg(&path)
            .arg("--pg-data")
            .arg(&data)
            .run()
            .ok();
        let log = out.stderr.clone();
        assert!(
            log.contains(&format!(
                "keys/{real} opened the repository; key derivations run: 1"
            )),
            "{log}"
        );
        for p in &planted {
            assert!(
                !log.contains(p.as_str()),
                "planted key {p} was read:\n{log}"
            );
        }
        // The result is still right: the file comes back.
        let back = repo.scratch(file);
        repo.cmd()
            .arg("wal-fetch")
            .arg(file)
            .arg(&back)
            .arg("--pg-data")
            .arg(&data)
            .run()
            .ok();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&path).unwrap());
    }
    // Without the hint (another host, a fresh cache), the planted keys are tried first
    // and the repository still opens, and the hint is written again.
    std::fs::remove_dir_all(repo.scratch("cache")).unwrap();
    let out = repo
        .cmd()
        .env("BACKUPD_LOG", "backupd=debug")
        .args(["key", "list", "--json"])
        .run()
        .ok();
    let log = out.stderr.clone();
    assert!(log.contains("key derivations run: 3"), "{log}");
    assert_eq!(current(out.json()["keys"].as_array().unwrap()), real);
    let hints: Vec<_> = std::fs::read_dir(repo.scratch("cache").join("backupd/key-hints"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(hints.len(), 1, "{hints:?}");
    assert_eq!(
        std::fs::read_to_string(hints[0].path()).unwrap().trim(),
        real
    );
}

#[test]
fn a_key_file_above_the_kdf_cap_is_refused_without_running_it() {
    let repo = Repo::new();
    let real = repo.names("keys")[0].clone();
    // Twice the memory cap (one pass, so running it would be quick too): refused as
    // malformed, naming the file; the real key still opens the repository.
    let big = plant_key(&repo, 512 * 1024, 1, 1, &real);
    std::fs::remove_dir_all(repo.scratch("cache")).unwrap();
    let out = repo
        .cmd()
        .env("BACKUPD_LOG", "backupd=debug")
        .arg("snapshots")
        .run()
        .ok();
    let log = out.stderr.clone();
    assert!(
        log.contains(&format!(
            "keys/{big}: malformed key file: KDF cost above the limit"
        )),
        "{log}"
    );
    assert!(log.contains("key derivations run: 1"), "{log}");
}
