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
    v.as_array().expect("key list --json is an array").clone()
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
