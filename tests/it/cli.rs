//! Exit codes, error messages, password sources, and the JSON outputs of the contract.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};

use serde_json::Value;

use super::common::*;

#[test]
fn not_a_repository_exits_10_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let missing = dir.path().join("does-not-exist");
    for path in [&empty, &missing] {
        for verb in [&["snapshots"][..], &["backup", "/etc/hostname"], &["check"]] {
            let out = backupd()
                .arg("--repo")
                .arg(path)
                .env("BACKUPD_PASSWORD", PASSWORD)
                .args(verb)
                .run()
                .expect(10)
                .stderr_has(&path.display().to_string());
            assert!(out.stderr.contains("backupd: error:"), "{}", out.describe());
        }
    }
    // Nothing was created at the missing path.
    assert!(!missing.exists());
    // Same through BACKUPD_REPOSITORY.
    backupd()
        .env("BACKUPD_REPOSITORY", &empty)
        .env("BACKUPD_PASSWORD", PASSWORD)
        .arg("snapshots")
        .run()
        .expect(10)
        .stderr_has(&empty.display().to_string());
}

#[test]
fn wrong_password_exits_12() {
    let repo = Repo::new();
    for verb in [&["snapshots"][..], &["stats"], &["check"]] {
        repo.cmd_pw("not the password")
            .args(verb)
            .run()
            .expect(12)
            .stderr_has("wrong password");
    }
    repo.ok(&["snapshots"]);
}

#[test]
fn repository_from_env_and_password_file() {
    let repo = Repo::new();
    let dir = tempfile::tempdir().unwrap();
    let pwfile = dir.path().join("pw");
    fs::write(&pwfile, format!("{PASSWORD}\nsecond line is ignored\n")).unwrap();
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).unwrap();
    // BACKUPD_REPOSITORY and BACKUPD_PASSWORD_FILE (which wins over BACKUPD_PASSWORD).
    let out = backupd()
        .env("BACKUPD_REPOSITORY", &repo.path)
        .env("BACKUPD_PASSWORD_FILE", &pwfile)
        .env("BACKUPD_PASSWORD", "wrong")
        .args(["snapshots", "--json"])
        .run()
        .ok();
    assert_eq!(out.json(), Value::Array(vec![]));

    // A world-readable password file is refused.
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o644)).unwrap();
    let out = backupd()
        .env("BACKUPD_REPOSITORY", &repo.path)
        .env("BACKUPD_PASSWORD_FILE", &pwfile)
        .arg("snapshots")
        .run()
        .expect(1)
        .stderr_has(&pwfile.display().to_string());
    assert!(
        out.stderr.contains("other users can read"),
        "{}",
        out.describe()
    );
}

#[test]
fn no_password_source_without_tty_exits_1() {
    let repo = Repo::new();
    // stdin is /dev/null, so there is no terminal to prompt on.
    let out = backupd()
        .arg("--repo")
        .arg(&repo.path)
        .arg("snapshots")
        .run()
        .expect(1)
        .stderr_has("BACKUPD_PASSWORD");
    assert!(out.stdout.is_empty(), "{}", out.describe());
    // init too (and it creates nothing).
    let fresh = repo.scratch("fresh");
    backupd()
        .arg("--repo")
        .arg(&fresh)
        .arg("init")
        .run()
        .expect(1)
        .stderr_has("BACKUPD_PASSWORD");
    assert!(!fresh.join("config").exists());
}

#[test]
fn init_twice_fails_and_leaves_the_repository_unchanged() {
    let repo = Repo::new();
    repo.cmd()
        .args(["backup", "--stdin", "--stdin-filename", "x"])
        .stdin(b"payload".to_vec())
        .run()
        .ok();
    let before = repo.objects();
    repo.cmd()
        .arg("init")
        .run()
        .expect(1)
        .stderr_has(&repo.path.display().to_string());
    let after = repo.objects();
    assert_objects_unchanged(&before, &after, &[]);
    repo.ok(&["dump", "latest", "x"]);

    // Also with another password: still refused, still unchanged.
    repo.cmd_pw("another password").arg("init").run().expect(1);
    assert_objects_unchanged(&before, &repo.objects(), &[]);

    // A non-empty directory that is not a repository is refused too.
    let other = repo.scratch("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("file"), b"keep me").unwrap();
    backupd()
        .arg("--repo")
        .arg(&other)
        .env("BACKUPD_PASSWORD", PASSWORD)
        .arg("init")
        .run()
        .expect(1)
        .stderr_has(&other.display().to_string());
    assert_eq!(fs::read_dir(&other).unwrap().count(), 1);
}

#[test]
fn restore_into_non_empty_target_exits_1_naming_it() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    repo.backup(&[&src]);

    let target = repo.scratch("target");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("existing"), b"do not touch").unwrap();
    repo.cmd()
        .args(["restore", "latest", "--target"])
        .arg(&target)
        .run()
        .expect(1)
        .stderr_has(&target.display().to_string());
    assert_eq!(fs::read_dir(&target).unwrap().count(), 1);
    assert_eq!(fs::read(target.join("existing")).unwrap(), b"do not touch");

    // A file in the way is refused too.
    let file_target = repo.scratch("file-target");
    fs::write(&file_target, b"a file").unwrap();
    repo.cmd()
        .args(["restore", "latest", "--target"])
        .arg(&file_target)
        .run()
        .expect(1)
        .stderr_has(&file_target.display().to_string());

    // An empty directory is fine.
    let empty = repo.scratch("empty-target");
    fs::create_dir(&empty).unwrap();
    repo.cmd()
        .args(["restore", "latest", "--target"])
        .arg(&empty)
        .run()
        .ok();
    assert_eq!(
        fs::read(restored_path(&empty, &src).join("f")).unwrap(),
        b"data"
    );
}

#[test]
fn missing_source_path_exits_3_with_snapshot_written() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    let gone = work.path().join("vanished");
    let out = repo
        .cmd()
        .args(["backup", "--json"])
        .arg(&src)
        .arg(&gone)
        .run()
        .expect(3)
        .stderr_has(&gone.display().to_string());
    let s = out.json();
    let unreadable: Vec<&str> = s["unreadable"]
        .as_array()
        .expect("unreadable")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(unreadable, [gone.display().to_string().as_str()], "{s}");
    assert!(!out.stderr.contains(&format!("{}/f", src.display())));

    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1, "the snapshot must be written");
    assert_eq!(snaps[0]["id"], s["snapshot_id"]);
    let out = repo
        .cmd()
        .args(["dump", "latest"])
        .arg(src.join("f"))
        .run()
        .ok();
    assert_eq!(out.stdout, b"data");

    // Only missing paths: nothing to back up, no snapshot.
    let out = repo.cmd().arg("backup").arg(&gone).run();
    assert_ne!(out.code(), 0, "{}", out.describe());
    assert_ne!(out.code(), 3, "{}", out.describe());
    assert_eq!(repo.snapshots().len(), 1);
}

fn assert_rfc3339(s: &str) {
    // YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)
    let b = s.as_bytes();
    let ok = b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
            .iter()
            .all(|&i| b[i].is_ascii_digit())
        && (s.ends_with('Z') || {
            let t = &b[b.len() - 6..];
            (t[0] == b'+' || t[0] == b'-') && t[3] == b':'
        });
    assert!(ok, "{s:?} is not RFC 3339");
}

#[test]
fn json_outputs_follow_the_contract() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/file"), b"0123456789").unwrap();
    symlink("d/file", src.join("link")).unwrap();

    // backup --json summary.
    let s1 = repo
        .cmd()
        .args([
            "backup", "--json", "--tag", "t1", "--tag", "t2", "--host", "testhost",
        ])
        .arg(&src)
        .run()
        .ok()
        .json();
    for k in [
        "files_new",
        "files_changed",
        "files_unchanged",
        "dirs",
        "bytes_read",
        "bytes_total",
        "bytes_added",
        "bytes_stored",
        "blobs_new",
    ] {
        assert!(s1[k].is_u64(), "{k} missing or not a count in {s1}");
    }
    for k in ["dedup_ratio", "duration_secs"] {
        assert!(s1[k].is_f64() || s1[k].is_u64(), "{k} in {s1}");
    }
    assert_hex64(s1["snapshot_id"].as_str().expect("snapshot_id"));
    assert!(s1["parent"].is_null(), "{s1}");
    assert!(
        s1["unreadable"].is_array() && s1["skipped_special"].is_array(),
        "{s1}"
    );
    assert_eq!(s1["files_new"], 1);
    assert_eq!(s1["bytes_total"], 10);

    let s2 = repo
        .cmd()
        .args(["backup", "--json", "--host", "testhost"])
        .arg(&src)
        .run()
        .ok()
        .json();
    assert_eq!(s2["parent"], s1["snapshot_id"], "{s2}");

    // snapshots --json.
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 2);
    let first = snaps
        .iter()
        .find(|s| s["id"] == s1["snapshot_id"])
        .expect("first snapshot listed");
    let id = first["id"].as_str().unwrap();
    assert_hex64(id);
    let short = first["short_id"].as_str().expect("short_id");
    assert!(
        !short.is_empty() && id.starts_with(short),
        "short_id {short}"
    );
    assert_rfc3339(first["time"].as_str().expect("time"));
    assert_eq!(first["host"], "testhost");
    assert_eq!(
        first["paths"],
        serde_json::json!([src.display().to_string()])
    );
    assert_eq!(first["tags"], serde_json::json!(["t1", "t2"]));
    assert!(first["parent"].is_null());
    assert_hex64(first["tree"].as_str().expect("tree"));
    assert_eq!(first["source"], "files");
    assert_eq!(first["summary"]["bytes_total"], 10);
    assert_eq!(first["summary"]["files_new"], 1);
    let second = snaps.iter().find(|s| s["id"] == s2["snapshot_id"]).unwrap();
    assert_eq!(second["parent"], s1["snapshot_id"]);
    // Filters.
    let tagged = repo.ok(&["snapshots", "--json", "--tag", "t1"]).json();
    assert_eq!(tagged.as_array().map(Vec::len), Some(1));
    let other_host = repo
        .ok(&["snapshots", "--json", "--host", "elsewhere"])
        .json();
    assert_eq!(other_host.as_array().map(Vec::len), Some(0));

    // ls --json: NDJSON, one node per line.
    let nodes = repo.ok(&["ls", "--json", id]).ndjson();
    let by_path = |p: &str| -> &Value {
        nodes
            .iter()
            .find(|n| n["path"] == p)
            .unwrap_or_else(|| panic!("{p} not in ls output: {nodes:?}"))
    };
    for n in &nodes {
        let p = n["path"].as_str().expect("path");
        assert!(p.starts_with('/'), "path {p} is not absolute");
        for k in ["type", "mode", "uid", "gid", "size", "mtime_ns"] {
            assert!(!n[k].is_null(), "{k} missing in {n}");
        }
        assert!(n.get("user").is_some() && n.get("group").is_some(), "{n}");
    }
    let file = by_path(&format!("{}/d/file", src.display()));
    assert_eq!(file["type"], "file");
    assert_eq!(file["size"], 10);
    let m = lmeta(&src.join("d/file"));
    assert_eq!(file["mode"].as_u64(), Some((m.mode & 0o7777) as u64));
    assert_eq!(file["mtime_ns"].as_i64().map(i128::from), Some(m.mtime_ns));
    assert_eq!(file["uid"].as_u64(), Some(u64::from(m.uid)));
    assert_eq!(file["gid"].as_u64(), Some(u64::from(m.gid)));
    let link = by_path(&format!("{}/link", src.display()));
    assert_eq!(link["type"], "symlink");
    assert_eq!(link["link_target"], "d/file");
    assert_eq!(by_path(&format!("{}/d", src.display()))["type"], "dir");
    assert!(file.get("link_target").is_none_or(Value::is_null));
    // ls with a path lists that subtree only.
    let sub = repo
        .ok(&["ls", "--json", "latest", &format!("{}/d", src.display())])
        .ndjson();
    let paths: Vec<&str> = sub.iter().map(|n| n["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            format!("{}/d", src.display()),
            format!("{}/d/file", src.display())
        ]
    );

    // cat config.
    let config = repo.ok(&["cat", "config"]).json();
    assert!(config["chunker"].is_object(), "{config}");
    // cat snapshot by prefix.
    let snap = repo.ok(&["cat", "snapshot", short]).json();
    assert_eq!(snap["id"].as_str(), Some(id));

    // stats --json.
    let stats = repo.ok(&["stats", "--json"]).json();
    assert_eq!(stats["snapshots"], 2, "{stats}");
    let bpb = stats["index_bytes_per_blob"]
        .as_f64()
        .expect("index_bytes_per_blob");
    assert!(bpb > 0.0 && bpb < 1000.0, "{stats}");
    assert!(stats["blobs"].as_u64().unwrap() >= 2, "{stats}");

    // check on a healthy repository.
    repo.ok(&["check", "--read-data"]);
}

#[test]
fn a_listing_whose_reader_goes_away_ends_quietly_with_141() {
    let repo = Repo::new();
    let src = repo.scratch("many");
    fs::create_dir_all(&src).unwrap();
    for i in 0..3000 {
        fs::write(src.join(format!("file-{i:05}")), b"x").unwrap();
    }
    repo.ok(&["backup", src.to_str().unwrap()]);
    // `head -1` reads one line and exits; backupd's next writes meet a closed pipe.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg("\"$B\" --repo \"$R\" ls latest | head -1; echo \"status=${PIPESTATUS[0]}\"")
        .env("B", BIN)
        .env("R", &repo.location)
        .env("BACKUPD_PASSWORD", PASSWORD)
        .env("XDG_CACHE_HOME", repo.scratch("cache"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("status=141"), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
