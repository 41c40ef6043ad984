//! Format versions in use: a version-1 repository (the committed fixture, copied) keeps
//! opening, restoring and backing up; what it cannot hold is reported, not dropped in
//! silence; `upgrade` makes it version 2, after which the same backup keeps everything.

use std::fs;
use std::path::Path;

use super::common::{backupd, sh, Run};

const FIXTURE_PASSWORD: &str = "fixture-password";

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn cmd(repo: &Path, cache: &Path) -> Run {
    backupd()
        .arg("--repo")
        .arg(repo)
        .env("BACKUPD_PASSWORD", FIXTURE_PASSWORD)
        .env("XDG_CACHE_HOME", cache)
}

#[test]
fn a_version_1_repository_reports_what_it_cannot_hold_until_upgraded() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let cache = t.path().join("cache");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1"),
        &repo,
    );
    let config = || cmd(&repo, &cache).args(["cat", "config"]).run().ok().json();
    assert_eq!(config()["version"], 1);
    // Its old snapshots still restore.
    cmd(&repo, &cache)
        .args(["restore", "latest", "--target"])
        .arg(t.path().join("old"))
        .run()
        .ok();

    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"with an attribute").unwrap();
    // 8 MiB holding 4 KiB in the middle: format 1 stores it whole, without its holes.
    let sparse = fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &[7u8; 4096], 4 << 20).unwrap();
    sparse.sync_all().unwrap();
    drop(sparse);
    sh(&format!(
        "setfattr -n user.kept -v yes {} && mkfifo {}",
        src.join("f").display(),
        src.join("fifo").display()
    ));
    // Format 1 cannot hold the attribute or the FIFO: the backup says so and exits 3.
    let out = cmd(&repo, &cache)
        .args(["backup", "--json"])
        .arg(&src)
        .run()
        .expect(3);
    let v = out.json();
    let not_kept = v["not_kept"].to_string();
    assert!(
        not_kept.contains("extended attributes") && not_kept.contains("FIFOs"),
        "{v}"
    );
    assert!(out.stderr.contains("backupd upgrade"), "{}", out.describe());
    assert_eq!(
        config()["version"],
        1,
        "a backup does not upgrade on its own"
    );

    let out = cmd(&repo, &cache).args(["upgrade", "--dry-run"]).run().ok();
    assert!(out.stdout().contains("would make"), "{}", out.describe());
    assert_eq!(config()["version"], 1);
    cmd(&repo, &cache).arg("upgrade").run().ok();
    assert_eq!(config()["version"], 2);
    // Again: nothing to do.
    let out = cmd(&repo, &cache).arg("upgrade").run().ok();
    assert!(out.stdout().contains("already"), "{}", out.describe());

    let v = cmd(&repo, &cache)
        .args(["backup", "--json"])
        .arg(&src)
        .run()
        .ok()
        .json();
    assert_eq!(v["not_kept"].as_array().map(Vec::len), Some(0), "{v}");
    // The sparse file is unchanged since the format-1 backup, and is read again for its
    // holes all the same.
    assert_eq!(
        v["features"],
        serde_json::json!(["sparse", "special-files", "xattrs"]),
        "{v}"
    );
    let target = t.path().join("new");
    cmd(&repo, &cache)
        .args(["restore", "latest", "--target"])
        .arg(&target)
        .run()
        .ok();
    let restored = super::common::restored_path(&target, &src);
    let out = std::process::Command::new("getfattr")
        .args(["--only-values", "-n", "user.kept"])
        .arg(restored.join("f"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"yes");
    use std::os::unix::fs::MetadataExt;
    let back = fs::metadata(restored.join("sparse")).unwrap();
    assert_eq!(back.len(), 8 << 20);
    assert!(back.blocks() * 512 < 1 << 20, "{} blocks", back.blocks());
    let mut want = vec![0u8; 8 << 20];
    want[4 << 20..(4 << 20) + 4096].fill(7);
    assert!(fs::read(restored.join("sparse")).unwrap() == want);
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(restored.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    // The old snapshots are still there and still restore; check is clean.
    cmd(&repo, &cache).args(["check", "--read-data"]).run().ok();
    let snaps = cmd(&repo, &cache)
        .args(["snapshots", "--json"])
        .run()
        .ok()
        .json();
    assert_eq!(snaps.as_array().map(Vec::len), Some(4), "{snaps}");
}
