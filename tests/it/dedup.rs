//! Deduplication and parent reuse, measured by the JSON summary and the repository size.

use std::fs;
use std::path::Path;

use serde_json::Value;

use super::common::*;

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

fn make_src(src: &Path) -> u64 {
    fs::create_dir_all(src.join("sub")).unwrap();
    write_random(&src.join("r1"), 3 * 1024 * 1024);
    write_random(&src.join("sub/r2"), 2 * 1024 * 1024 + 12345);
    write_mixed(&src.join("mix"), 3 * 1024 * 1024);
    fs::write(src.join("small"), b"small file\n").unwrap();
    fs::write(src.join("sub/empty"), b"").unwrap();
    (3 * 1024 * 1024) + (2 * 1024 * 1024 + 12345) + (3 * 1024 * 1024) + 11
}

#[test]
fn forced_second_backup_of_same_data_adds_under_one_percent() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let total = make_src(&src);

    let first = repo.backup(&[&src]);
    assert_eq!(u(&first, "bytes_read"), total);
    assert_eq!(u(&first, "bytes_total"), total);
    let stored1 = u(&first, "bytes_stored");
    assert!(stored1 > total / 2, "first backup stored only {stored1}");
    let size1 = repo.size();

    let second = repo
        .cmd()
        .arg("backup")
        .arg("--json")
        .arg("--force")
        .arg(&src)
        .run()
        .ok()
        .json();
    // --force really re-read everything ...
    assert_eq!(u(&second, "bytes_read"), total, "{second}");
    assert_eq!(u(&second, "files_unchanged"), 0, "{second}");
    assert!(
        second["parent"].is_null(),
        "--force must not use a parent: {second}"
    );
    // ... and stored (almost) nothing.
    let stored2 = u(&second, "bytes_stored");
    assert!(
        stored2 * 100 < stored1,
        "second backup stored {stored2} bytes, first {stored1}"
    );
    let size2 = repo.size();
    assert!(
        (size2 - size1) * 100 < size1,
        "repository grew from {size1} to {size2} bytes"
    );
    assert_eq!(repo.snapshots().len(), 2);
}

#[test]
fn same_content_under_two_names_is_stored_once() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    let len = 4 * 1024 * 1024 + 777;
    write_random(&src.join("a"), len);
    fs::copy(src.join("a"), src.join("b")).unwrap(); // a copy, not a hard link
    assert_ne!(lmeta(&src.join("a")).ino, lmeta(&src.join("b")).ino);

    let before = repo.size();
    let s = repo.backup(&[&src]);
    assert_eq!(u(&s, "bytes_total"), 2 * len);
    let added = u(&s, "bytes_added");
    assert!(
        added >= len && added < len + len / 20,
        "bytes_added {added} for two copies of {len} bytes"
    );
    let stored = u(&s, "bytes_stored");
    assert!(stored < len + len / 10, "bytes_stored {stored}");
    let grown = repo.size() - before;
    assert!(grown < len + len / 10, "repository grew by {grown} bytes");
    let dedup = s["dedup_ratio"].as_f64().expect("dedup_ratio");
    assert!(dedup > 0.4 && dedup < 0.6, "dedup_ratio {dedup}");

    // Both names restore the same bytes.
    let want = fs::read(src.join("a")).unwrap();
    for name in ["a", "b"] {
        let out = repo
            .cmd()
            .args(["dump", "latest"])
            .arg(src.join(name))
            .run()
            .ok();
        assert!(out.stdout == want, "dump of {name} differs");
    }
}

#[test]
fn unchanged_files_are_not_read_again() {
    let repo = Repo::new();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    make_src(&src);
    let n_files = 5;

    let first = repo.backup(&[&src]);
    assert_eq!(u(&first, "files_new"), n_files);
    let first_id = first["snapshot_id"].as_str().unwrap().to_string();

    // No change: nothing is read, everything comes from the parent.
    let second = repo.backup(&[&src]);
    assert_eq!(
        second["parent"].as_str(),
        Some(first_id.as_str()),
        "{second}"
    );
    assert_eq!(u(&second, "bytes_read"), 0, "{second}");
    assert_eq!(u(&second, "files_unchanged"), n_files, "{second}");
    assert_eq!(u(&second, "files_new"), 0, "{second}");
    assert_eq!(u(&second, "files_changed"), 0, "{second}");
    assert_eq!(
        u(&second, "bytes_total"),
        u(&first, "bytes_total"),
        "{second}"
    );
    // Only directory trees can be new (e.g. /tmp's own mtime moves), never file data.
    assert!(u(&second, "bytes_added") < 64 * 1024, "{second}");
    // Requests by kind are reported; a no-change backup writes its lock, its snapshot and
    // at most one tree pack with its index, never a data pack.
    let puts = second["requests"]["put"]
        .as_u64()
        .expect("requests.put in the summary");
    assert!((2..=4).contains(&puts), "{second}");
    assert!(
        second["requests"]["bytes_up"].as_u64().unwrap() < 64 * 1024,
        "{second}"
    );

    // One file changes (content, size and mtime): only it is read.
    let changed = src.join("sub/r2");
    let mut data = fs::read(&changed).unwrap();
    data.extend_from_slice(b"appended");
    data[100] ^= 1;
    fs::write(&changed, &data).unwrap();
    let third = repo.backup(&[&src]);
    assert_eq!(u(&third, "files_changed"), 1, "{third}");
    assert_eq!(u(&third, "files_unchanged"), n_files - 1, "{third}");
    assert_eq!(u(&third, "files_new"), 0, "{third}");
    assert_eq!(u(&third, "bytes_read"), data.len() as u64, "{third}");

    let out = repo.cmd().args(["dump", "latest"]).arg(&changed).run().ok();
    assert!(
        out.stdout == data,
        "the changed file does not restore its new content"
    );
    // The older snapshot still has the old content (a different size).
    let out = repo
        .cmd()
        .args(["dump", &first_id])
        .arg(&changed)
        .run()
        .ok();
    assert_eq!(out.stdout.len() as u64, 2 * 1024 * 1024 + 12345);
}
