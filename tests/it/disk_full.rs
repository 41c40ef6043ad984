//! A repository on a full file system: the backup fails with the cause named, writes no
//! snapshot, leaves no temp files, and the repository still checks clean and restores its
//! earlier snapshot. The file system is a small tmpfs mounted for the test (tests run as
//! root, as CI does).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::common::*;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("running mount");
        assert!(
            st.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_fails_cleanly_and_keeps_the_repository() {
    let scratch = tempfile::tempdir().unwrap();
    let mnt = Tmpfs::mount(&scratch.path().join("fs"), "6m");
    let repo_path = mnt.0.join("repo");
    let run = || {
        backupd()
            .arg("--repo")
            .arg(&repo_path)
            .env("BACKUPD_PASSWORD", PASSWORD)
    };
    run().arg("init").run().ok();

    let small = scratch.path().join("small");
    fs::create_dir_all(&small).unwrap();
    fs::write(small.join("a.txt"), b"fits easily\n").unwrap();
    run().args(["backup", "--json"]).arg(&small).run().ok();

    let big = scratch.path().join("big");
    fs::create_dir_all(&big).unwrap();
    write_random(&big.join("r.bin"), 24 * 1024 * 1024);
    let out = run().args(["backup", "--json"]).arg(&big).run();
    assert_eq!(out.code(), 1, "{}", out.describe());
    let out = out.stderr_has("No space left on device");
    assert!(
        out.all_text().contains(&repo_path.display().to_string()),
        "{}",
        out.describe()
    );

    let snaps = run().args(["snapshots", "--json"]).run().ok().json();
    assert_eq!(
        snaps.as_array().map(Vec::len),
        Some(1),
        "only the first snapshot: {snaps}"
    );
    let leftovers: Vec<_> = fs::read_dir(repo_path.join("tmp")).unwrap().collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    run().args(["check", "--read-data"]).run().ok();
    let target = scratch.path().join("restore");
    run()
        .args(["restore", "latest", "--target"])
        .arg(&target)
        .run()
        .ok();
    let restored = target.join(small.strip_prefix("/").unwrap()).join("a.txt");
    assert_eq!(fs::read(restored).unwrap(), b"fits easily\n");
}
