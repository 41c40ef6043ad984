//! Damaged repositories: every damaged object is named, the exit code is right, nothing
//! panics, and commands leave the other objects' bytes alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::PathBuf;

use tempfile::TempDir;

use super::common::*;

/// A repository with two snapshots of one directory: the first holds files `a*`, the
/// second adds files `b*`, whose data lands in the second backup's own packs.
struct Fixture {
    repo: Repo,
    _work: TempDir,
    src: PathBuf,
    snap1: String,
    snap2: String,
    /// Index file written by the second backup.
    index2: String,
}

impl Fixture {
    fn new(file_len: u64) -> Fixture {
        let repo = Repo::new();
        let work = tempfile::tempdir().unwrap();
        let src = work.path().join("src");
        fs::create_dir(&src).unwrap();
        for i in 1..=3 {
            write_random(&src.join(format!("a{i}")), file_len);
        }
        let s1 = repo.backup(&[&src]);
        let index1 = repo.names("index");
        for i in 1..=4 {
            write_random(&src.join(format!("b{i}")), file_len + i);
        }
        let s2 = repo.backup(&[&src]);
        assert_eq!(s2["files_unchanged"], 3, "{s2}");
        let index2: Vec<String> = repo
            .names("index")
            .into_iter()
            .filter(|n| !index1.contains(n))
            .collect();
        assert_eq!(index2.len(), 1, "the second backup writes one index file");
        Fixture {
            repo,
            _work: work,
            src,
            snap1: s1["snapshot_id"].as_str().unwrap().to_string(),
            snap2: s2["snapshot_id"].as_str().unwrap().to_string(),
            index2: index2[0].clone(),
        }
    }

    /// The packs of the second backup: (data pack, tree pack).
    fn packs2(&self) -> (PackInfo, PackInfo) {
        let packs: Vec<PackInfo> = self
            .repo
            .indexed_packs()
            .into_iter()
            .filter(|p| p.index == self.index2)
            .collect();
        let data: Vec<&PackInfo> = packs.iter().filter(|p| p.all("data")).collect();
        let trees: Vec<&PackInfo> = packs.iter().filter(|p| p.all("tree")).collect();
        assert_eq!(data.len(), 1, "{packs:?}");
        assert_eq!(trees.len(), 1, "{packs:?}");
        assert_eq!(packs.len(), 2, "{packs:?}");
        (data[0].clone(), trees[0].clone())
    }

    fn path_of(&self, snap_path: &str) -> PathBuf {
        PathBuf::from(snap_path)
    }

    /// Restores the latest snapshot, expecting exactly `must_fail` (snapshot paths) to be
    /// named as failed and every other file to be restored byte for byte; exit 1, and the
    /// damaged pack named.
    fn partial_restore(&self, pack_rel: &str, files: &[String], must_fail: &BTreeSet<String>) {
        assert!(!must_fail.is_empty(), "the damage must hit some file");
        assert!(
            must_fail.len() < files.len(),
            "the damage must spare some file"
        );
        let target = self.repo.scratch("restore");
        let out = self
            .repo
            .cmd()
            .args(["restore", "latest", "--target"])
            .arg(&target)
            .run()
            .expect(1)
            .stderr_has(pack_rel);
        for f in files {
            let named = out.stderr.lines().any(|l| {
                l.split(|c: char| c.is_whitespace() || c == ':' || c == '"')
                    .any(|w| w == f)
            });
            if must_fail.contains(f) {
                assert!(named, "{f} is damaged but not named:\n{}", out.describe());
            } else {
                assert!(
                    !named,
                    "{f} is intact but named as failed:\n{}",
                    out.describe()
                );
                let restored = restored_path(&target, &self.path_of(f));
                let got = fs::read(&restored)
                    .unwrap_or_else(|e| panic!("{} not restored: {e}", restored.display()));
                assert!(
                    got == fs::read(self.path_of(f)).unwrap(),
                    "{f} restored with wrong content"
                );
            }
        }
    }
}

/// Runs the pack-damage scenario: `damage` changes the second backup's data pack and
/// returns which files (snapshot paths) it must make unrestorable.
fn damaged_data_pack(
    damage: impl FnOnce(&PathBuf, &PackInfo, &BTreeMap<String, Vec<String>>) -> BTreeSet<String>,
    deleted: bool,
) {
    let fx = Fixture::new(1536 * 1024);
    let (data, _) = fx.packs2();
    let file_blobs = fx.repo.file_blobs(&fx.snap2);
    let files: Vec<String> = file_blobs.keys().cloned().collect();
    assert_eq!(files.len(), 7, "{files:?}");
    // The second backup's data pack holds exactly the b files' data.
    for (f, ids) in &file_blobs {
        let in_pack = ids.iter().any(|id| data.blobs.iter().any(|b| &b.id == id));
        let name = f.rsplit('/').next().unwrap();
        assert_eq!(in_pack, name.starts_with('b'), "{f}");
    }
    let rel = Repo::pack_rel(&data.id);
    let path = fx.repo.path.join(&rel);
    let before = fx.repo.objects();
    let must_fail = damage(&path, &data, &file_blobs);
    let damaged = fx.repo.objects();

    fx.partial_restore(&rel, &files, &must_fail);

    let out = fx
        .repo
        .run(&["check", "--read-data"])
        .expect(1)
        .output_has(&rel);
    assert!(out.stderr.contains("error"), "{}", out.describe());
    if deleted {
        // The structure check alone sees a missing pack.
        fx.repo.run(&["check"]).expect(1).output_has(&rel);
    }
    // The first snapshot does not need the damaged pack.
    let t1 = fx.repo.scratch("restore-1");
    fx.repo
        .cmd()
        .args(["restore", &fx.snap1, "--target"])
        .arg(&t1)
        .run()
        .ok();

    // Nothing touched the repository: the other objects are as before, the damaged
    // one is as we left it (not repaired, not deleted).
    assert_objects_unchanged(&before, &fx.repo.objects(), &[&rel]);
    assert_objects_unchanged(&damaged, &fx.repo.objects(), &[]);
}

fn files_with(
    file_blobs: &BTreeMap<String, Vec<String>>,
    pred: impl Fn(&str) -> bool,
) -> BTreeSet<String> {
    file_blobs
        .iter()
        .filter(|(_, ids)| ids.iter().any(|id| pred(id)))
        .map(|(f, _)| f.clone())
        .collect()
}

#[test]
fn bit_flip_in_data_pack() {
    damaged_data_pack(
        |path, pack, file_blobs| {
            // Flip one bit in the middle of one blob: only the files holding it fail.
            let victim = &pack.blobs[pack.blobs.len() / 2];
            flip_bit(path, victim.offset + victim.length / 2);
            files_with(file_blobs, |id| id == victim.id)
        },
        false,
    );
}

#[test]
fn truncated_data_pack() {
    damaged_data_pack(
        |path, pack, file_blobs| {
            // Cut the pack in the middle of a blob: that blob and all after it are gone;
            // the blobs before the cut are intact and their files must be restored.
            let mut blobs = pack.blobs.clone();
            blobs.sort_by_key(|b| b.offset);
            let mid = &blobs[blobs.len() / 2];
            let cut = mid.offset + mid.length / 2;
            truncate(path, cut);
            let lost: BTreeSet<&str> = blobs
                .iter()
                .filter(|b| b.offset + b.length > cut)
                .map(|b| b.id.as_str())
                .collect();
            files_with(file_blobs, |id| lost.contains(id))
        },
        false,
    );
}

#[test]
fn deleted_data_pack() {
    damaged_data_pack(
        |path, pack, file_blobs| {
            fs::remove_file(path).unwrap();
            files_with(file_blobs, |id| pack.blobs.iter().any(|b| b.id == id))
        },
        true,
    );
}

#[test]
fn tampered_tree_pack() {
    let fx = Fixture::new(10_000);
    let (_, trees) = fx.packs2();
    let root = fx.repo.ok(&["cat", "snapshot", &fx.snap2]).json()["tree"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = trees
        .blobs
        .iter()
        .find(|b| b.id == root)
        .expect("the root tree of the second snapshot is in its tree pack")
        .clone();
    let rel = Repo::pack_rel(&trees.id);
    let before = fx.repo.objects();
    flip_bit(&fx.repo.path.join(&rel), blob.offset + blob.length / 2);

    fx.repo.run(&["ls", "latest"]).expect(1).stderr_has(&rel);
    let target = fx.repo.scratch("restore");
    fx.repo
        .cmd()
        .args(["restore", "latest", "--target"])
        .arg(&target)
        .run()
        .expect(1)
        .stderr_has(&rel);
    fx.repo.run(&["check"]).expect(1).output_has(&rel);
    fx.repo
        .run(&["check", "--read-data"])
        .expect(1)
        .output_has(&rel);
    // The first snapshot's trees are elsewhere.
    fx.repo.ok(&["ls", &fx.snap1]);
    assert_objects_unchanged(&before, &fx.repo.objects(), &[&rel]);
}

fn index_damage(truncated: bool) {
    let fx = Fixture::new(10_000);
    let name = fx.index2.clone();
    let rel = format!("index/{name}");
    let path = fx.repo.path.join(&rel);
    let len = fs::metadata(&path).unwrap().len();
    let before = fx.repo.objects();
    if truncated {
        truncate(&path, len / 2);
    } else {
        flip_bit(&path, len / 2);
    }

    fx.repo.run(&["ls", "latest"]).expect(1).stderr_has(&rel);
    let target = fx.repo.scratch("restore");
    fx.repo
        .cmd()
        .args(["restore", "latest", "--target"])
        .arg(&target)
        .run()
        .expect(1)
        .stderr_has(&rel);
    fx.repo
        .run(&["dump", "latest", &format!("{}/a1", fx.src.display())])
        .expect(1)
        .stderr_has(&rel);
    fx.repo.run(&["stats"]).expect(1).stderr_has(&rel);
    fx.repo.run(&["check"]).expect(1).output_has(&rel);
    // A backup needs the index too, and must not write a snapshot without it.
    fx.repo
        .cmd()
        .arg("backup")
        .arg(&fx.src)
        .run()
        .expect(1)
        .stderr_has(&rel);
    // Listing snapshots does not need the index.
    assert_eq!(fx.repo.snapshots().len(), 2);
    assert_objects_unchanged(&before, &fx.repo.objects(), &[&rel]);
}

#[test]
fn bit_flip_in_index() {
    index_damage(false);
}

#[test]
fn truncated_index() {
    index_damage(true);
}

#[test]
fn bit_flip_in_snapshot() {
    let fx = Fixture::new(10_000);
    let rel = format!("snapshots/{}", fx.snap1);
    let path = fx.repo.path.join(&rel);
    let before = fx.repo.objects();
    flip_bit(&path, fs::metadata(&path).unwrap().len() / 2);

    fx.repo.run(&["snapshots"]).expect(1).stderr_has(&rel);
    fx.repo
        .run(&["snapshots", "--json"])
        .expect(1)
        .stderr_has(&rel);
    fx.repo.run(&["check"]).expect(1).output_has(&rel);
    // The other snapshot, asked for by id, is still readable.
    fx.repo.ok(&["ls", &fx.snap2]);
    assert_objects_unchanged(&before, &fx.repo.objects(), &[&rel]);
}

#[test]
fn corrupt_only_key_file() {
    let repo = Repo::new();
    let keys = repo.names("keys");
    assert_eq!(keys.len(), 1);
    let rel = format!("keys/{}", keys[0]);
    let path = repo.path.join(&rel);
    let before = repo.objects();
    // Change one hex digit of the sealed key bundle (the file stays valid JSON).
    let text = fs::read_to_string(&path).unwrap();
    let at = text.find("\"data\"").expect("data field") + 12;
    let mut bytes = text.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    fs::write(&path, &bytes).unwrap();

    for verb in [&["snapshots"][..], &["check"], &["key", "list"]] {
        let out = repo.run(verb);
        assert!(
            out.code() == 12 || out.code() == 1,
            "corrupt key file: exit {}:\n{}",
            out.code(),
            out.describe()
        );
        assert!(
            out.stderr.contains(&rel) || out.stderr.contains(&keys[0]),
            "the message does not name the key file:\n{}",
            out.describe()
        );
        assert!(out.stderr.contains("backupd: error:"), "{}", out.describe());
    }
    // Garbage instead of JSON.
    fs::write(&path, b"\x00\x01 not a key file").unwrap();
    let out = repo.run(&["snapshots"]);
    assert!(out.code() == 12 || out.code() == 1, "{}", out.describe());
    assert!(out.stderr.contains(&keys[0]), "{}", out.describe());
    assert_objects_unchanged(&before, &repo.objects(), &[&rel]);
}
