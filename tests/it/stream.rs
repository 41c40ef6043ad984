//! Stream sources: `--stdin` and `--stdin-from-command`.

use std::fs;

use super::common::*;

#[test]
fn stdin_backup_dumps_exact_bytes() {
    let repo = Repo::new();
    let data = random_bytes(5 * 1024 * 1024);
    let s = repo
        .cmd()
        .args([
            "backup",
            "--json",
            "--stdin",
            "--stdin-filename",
            "app.dump",
        ])
        .stdin(data.clone())
        .run()
        .ok()
        .json();
    assert_eq!(s["bytes_read"].as_u64(), Some(data.len() as u64), "{s}");
    assert_eq!(s["bytes_total"].as_u64(), Some(data.len() as u64), "{s}");

    let out = repo.ok(&["dump", "latest", "app.dump"]);
    assert_eq!(out.stdout.len(), data.len());
    assert!(
        out.stdout == data,
        "dump differs from what went in on stdin"
    );

    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["source"], "stdin");
    assert_eq!(snaps[0]["paths"], serde_json::json!(["/app.dump"]));

    // `ls` shows the one file with its size.
    let nodes = repo.ok(&["ls", "--json", "latest"]).ndjson();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0]["path"], "/app.dump");
    assert_eq!(nodes[0]["size"].as_u64(), Some(data.len() as u64));
}

#[test]
fn command_output_is_backed_up() {
    let repo = Repo::new();
    let copy = repo.scratch("copy.bin");
    let script = format!(
        "head -c 3000000 /dev/urandom | tee {}; exit 0",
        copy.display()
    );
    let s = repo
        .cmd()
        .args([
            "backup",
            "--json",
            "--stdin-from-command",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .run()
        .ok()
        .json();
    assert_eq!(s["bytes_total"].as_u64(), Some(3_000_000), "{s}");
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["source"], "command");
    // Default file name: the command's basename.
    let out = repo.ok(&["dump", "latest", "sh"]);
    let want = fs::read(&copy).unwrap();
    assert_eq!(want.len(), 3_000_000);
    assert!(out.stdout == want, "dump differs from the command's output");
}

#[test]
fn failing_command_writes_no_snapshot() {
    let repo = Repo::new();
    // One good snapshot first, so "unchanged" is not just "empty".
    repo.cmd()
        .args(["backup", "--stdin", "--stdin-filename", "ok.txt"])
        .stdin(b"fine\n".to_vec())
        .run()
        .ok();
    assert_eq!(repo.snapshots().len(), 1);

    let out = repo
        .cmd()
        .args([
            "backup",
            "--stdin-from-command",
            "--stdin-filename",
            "db.dump",
            "--",
            "sh",
            "-c",
            "head -c 2000000 /dev/urandom; exit 7",
        ])
        .run();
    assert_ne!(
        out.code(),
        0,
        "a failing command must fail the backup:\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("backupd: error:") && out.stderr.contains("sh"),
        "the error does not name the command:\n{}",
        out.describe()
    );
    assert_eq!(
        repo.snapshots().len(),
        1,
        "a snapshot was written for a failed command"
    );

    // A command that cannot start at all.
    let out = repo
        .cmd()
        .args([
            "backup",
            "--stdin-from-command",
            "--",
            "/nonexistent/backupd-no-such-command",
        ])
        .run();
    assert_ne!(out.code(), 0, "{}", out.describe());
    assert_eq!(repo.snapshots().len(), 1);

    let report = repo.ok(&["check", "--read-data", "--json"]).json();
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    // The good snapshot is intact.
    assert_eq!(repo.ok(&["dump", "latest", "ok.txt"]).stdout, b"fine\n");
}
