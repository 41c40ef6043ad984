//! Back up a tree with every kind of file and metadata, restore it, compare byte for byte
//! and by metadata.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::common::*;

/// Builds the source tree under `src`; returns the path of the FIFO.
fn build_tree(src: &Path) -> PathBuf {
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::create_dir(src.join("emptydir")).unwrap();
    fs::create_dir(src.join("links")).unwrap();
    fs::create_dir(src.join("owned_dir")).unwrap();

    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("one"), b"x").unwrap();
    fs::write(src.join("k100"), random_bytes(100 * 1024)).unwrap();
    write_random(&src.join("r3m"), 3 * 1024 * 1024);
    write_mixed(&src.join("mix20m"), 20 * 1024 * 1024);
    fs::write(src.join("a/b/c/deep.txt"), b"deep inside\n").unwrap();
    fs::write(src.join("a/b/mid.txt"), b"middle\n").unwrap();

    // Symlinks: relative, absolute, dangling, and one whose target is not UTF-8.
    symlink("../one", src.join("links/rel")).unwrap();
    symlink(src.join("k100"), src.join("links/abs")).unwrap();
    symlink(
        "/nonexistent/backupd-test/nowhere",
        src.join("links/dangling"),
    )
    .unwrap();
    symlink(
        OsStr::from_bytes(b"target-\xfe\xff"),
        src.join("links/raw_target"),
    )
    .unwrap();

    // Two names, one inode.
    fs::write(src.join("hard1"), b"hard linked content\n").unwrap();
    fs::hard_link(src.join("hard1"), src.join("a/hard2")).unwrap();

    // Non-UTF-8 names (a file and a directory).
    let raw_file = src.join(OsStr::from_bytes(b"name-\xff.bin"));
    fs::write(&raw_file, b"non-utf8 name\n").unwrap();
    let raw_dir = src.join(OsString::from_vec(b"dir-\xfe".to_vec()));
    fs::create_dir(&raw_dir).unwrap();
    fs::write(raw_dir.join("inner"), b"inner\n").unwrap();

    // Ownership (tests run as root) and modes; chown before chmod (chown clears setuid).
    fs::write(src.join("owned"), b"owned by 1234\n").unwrap();
    run_prog(
        "chown",
        &[OsStr::new("1234:1234"), src.join("owned").as_os_str()],
    );
    run_prog(
        "chown",
        &[OsStr::new("1234:4321"), src.join("owned_dir").as_os_str()],
    );
    run_prog(
        "chown",
        &[
            OsStr::new("-h"),
            OsStr::new("2345:3456"),
            src.join("links/rel").as_os_str(),
        ],
    );
    fs::write(src.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(src.join("private"), b"secret\n").unwrap();
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(src.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(&raw_file, fs::Permissions::from_mode(0o600)).unwrap();

    // A FIFO: backed up and restored as one, without hanging the backup. A socket: skipped
    // and reported, as tar does (its program makes it anew).
    let fifo = src.join("a/fifo");
    run_prog("mkfifo", &[fifo.as_os_str()]);
    let sock = src.join("a/sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());

    // Distinct mtimes with nanoseconds on everything, deepest first, directories last.
    let mut all: Vec<PathBuf> = scan(src)
        .keys()
        .map(|rel| src.join(OsStr::from_bytes(rel)))
        .collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let (dirs, others): (Vec<PathBuf>, Vec<PathBuf>) =
        all.into_iter().partition(|p| lmeta(p).kind == Kind::Dir);
    for (i, p) in others.iter().chain(dirs.iter()).enumerate() {
        let when = format!(
            "2021-03-04 05:{:02}:{:02}.{:09}",
            i / 60,
            i % 60,
            123_456_789 + i * 1_001
        );
        set_mtime(p, &when);
    }
    // The setup must have produced what the test claims to cover.
    assert_eq!(lmeta(&src.join("setuid")).mode & 0o7777, 0o4755);
    assert_eq!(lmeta(&src.join("owned")).uid, 1234);
    assert_ne!(lmeta(&src.join("k100")).mtime_ns % 1_000_000_000, 0);
    assert_eq!(lmeta(&src.join("hard1")).nlink, 2);
    sock
}

#[test]
fn round_trip_every_file_kind_and_metadata() {
    round_trip_every_file_kind(&Repo::new());
}

#[test]
fn round_trip_every_file_kind_and_metadata_on_s3() {
    round_trip_every_file_kind(&Repo::new_s3());
}

fn round_trip_every_file_kind(repo: &Repo) {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let sock = build_tree(&src);

    let out = repo
        .cmd()
        .args([OsStr::new("backup"), OsStr::new("--json"), src.as_os_str()])
        .run()
        .ok();
    // The socket is reported on stderr as skipped, and in the JSON summary.
    let sock_s = sock.display().to_string();
    assert!(
        out.stderr.contains("skipped") && out.stderr.contains(&sock_s),
        "the socket is not reported as skipped:\n{}",
        out.describe()
    );
    let summary = out.json();
    let skipped: Vec<&str> = summary["skipped_special"]
        .as_array()
        .expect("skipped_special")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        skipped.iter().any(|s| s.contains(&sock_s)) && skipped.len() == 1,
        "skipped_special: {skipped:?}"
    );
    assert_eq!(summary["unreadable"].as_array().map(Vec::len), Some(0));
    // Every regular file name counts (both hard links; not the FIFO).
    let regular = scan(&src).values().filter(|m| m.kind == Kind::File).count() as u64;
    assert_eq!(regular, 14);
    assert_eq!(summary["files_new"].as_u64(), Some(regular), "{summary}");

    let tdir = tempfile::tempdir().unwrap();
    let target = tdir.path().join("restore");
    let out = repo
        .cmd()
        .args([
            OsStr::new("restore"),
            OsStr::new("latest"),
            OsStr::new("--target"),
            target.as_os_str(),
        ])
        .run()
        .ok();
    assert!(out.stderr.trim().is_empty(), "{}", out.describe());

    // The absolute source path is recreated under the target, including the (real)
    // metadata of the directory that holds the source.
    let restored_src = restored_path(&target, &src);
    assert!(
        restored_src.is_dir(),
        "{} not restored",
        restored_src.display()
    );
    let restored_work = restored_path(&target, work.path());
    assert_same_tree(work.path(), &restored_work, &|_, m| m.kind == Kind::Socket);

    // Hard links: one inode again.
    let h1 = lmeta(&restored_src.join("hard1"));
    let h2 = lmeta(&restored_src.join("a/hard2"));
    assert_eq!(h1.ino, h2.ino, "hard links were not restored as one inode");
    assert_eq!(h1.nlink, 2);
    // Sanity: the restored tree is really a separate copy.
    assert_ne!(h1.ino, lmeta(&src.join("hard1")).ino);
    assert_eq!(
        fs::read_link(restored_src.join("links/abs")).unwrap(),
        src.join("k100")
    );
    assert_eq!(lmeta(&restored_src.join("a/fifo")).kind, Kind::Fifo);
    assert!(fs::symlink_metadata(restored_src.join("a/sock")).is_err());
    assert_eq!(
        fs::metadata(restored_src.join("setuid")).unwrap().mode() & 0o7777,
        0o4755
    );

    // `dump` of a file path inside a files snapshot returns its bytes.
    let out = repo
        .cmd()
        .args(["dump", "latest"])
        .arg(src.join("r3m"))
        .run()
        .ok();
    assert!(
        out.stdout == fs::read(src.join("r3m")).unwrap(),
        "dump of r3m differs"
    );
}

#[test]
fn restore_include_selects_a_subtree() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("keep/sub")).unwrap();
    fs::create_dir_all(src.join("drop")).unwrap();
    fs::write(src.join("keep/sub/a"), b"a").unwrap();
    fs::write(src.join("keep/b"), b"b").unwrap();
    fs::write(src.join("drop/c"), b"c").unwrap();
    repo.backup(&[&src]);
    let target = repo.scratch("r");
    let pattern = format!("{}/keep/**", src.display());
    repo.cmd()
        .args(["restore", "latest", "--include", &pattern, "--target"])
        .arg(&target)
        .run()
        .ok();
    let r = restored_path(&target, &src);
    assert_eq!(fs::read(r.join("keep/sub/a")).unwrap(), b"a");
    assert_eq!(fs::read(r.join("keep/b")).unwrap(), b"b");
    assert!(!r.join("drop").exists(), "excluded subtree was restored");
}

#[test]
fn exclude_patterns_leave_files_out() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(src.join("cache/deep")).unwrap();
    fs::create_dir_all(src.join("keep")).unwrap();
    fs::write(src.join("keep/a.txt"), b"a").unwrap();
    fs::write(src.join("keep/b.tmp"), b"b").unwrap();
    fs::write(src.join("c.tmp"), b"c").unwrap();
    fs::write(src.join("cache/deep/d"), b"d").unwrap();
    fs::write(src.join("secret.key"), b"e").unwrap();
    let exfile = work.path().join("excludes");
    fs::write(&exfile, "# comment\n*.key\n").unwrap();
    let s = repo.backup(&[
        OsStr::new("--exclude"),
        OsStr::new("*.tmp"),
        OsStr::new("--exclude"),
        src.join("cache").as_os_str(),
        OsStr::new("--exclude-file"),
        exfile.as_os_str(),
        src.as_os_str(),
    ]);
    assert_eq!(s["files_new"], 1, "{s}");
    let paths: Vec<String> = repo
        .ok(&["ls", "--json", "latest"])
        .ndjson()
        .iter()
        .map(|n| n["path"].as_str().unwrap().to_string())
        .collect();
    let src_s = src.display().to_string();
    let under: Vec<&str> = paths
        .iter()
        .filter_map(|p| p.strip_prefix(src_s.as_str()))
        .collect();
    assert_eq!(under, ["", "/keep", "/keep/a.txt"], "{paths:?}");
}

/// A file whose bytes equal an existing tree blob (the tree of an empty directory) is
/// deduplicated onto that tree blob; restore must open it with the index's kind.
#[test]
fn file_identical_to_a_tree_blob_restores() {
    let repo = Repo::new();
    let src = repo.scratch("src");
    fs::create_dir_all(src.join("empty")).unwrap();
    repo.backup(&[&src]);
    fs::write(src.join("looks_like_a_tree"), br#"{"nodes":[]}"#).unwrap();
    repo.backup(&[&src]);
    let target = repo.scratch("restore");
    repo.ok(&[
        OsStr::new("restore"),
        OsStr::new("latest"),
        OsStr::new("--target"),
        target.as_os_str(),
    ]);
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_eq!(
        fs::read(restored.join("looks_like_a_tree")).unwrap(),
        br#"{"nodes":[]}"#
    );
}
