//! Decodes the committed repository `tests/fixtures/repo-v1` (made by backupd 0.1.0 with
//! `tests/fixtures/make-fixture.sh`), so any change to the on-disk format fails here.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::backend::{Backend, LocalBackend, ObjectType};
use crate::repo::{NodeKind, Repository};
use crate::restore::{dump_file, find_node, restore, RestoreFilter};

fn fixture() -> Repository {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1");
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir));
    Repository::open(backend, b"fixture-password").expect("the fixture opens")
}

#[test]
fn fixture_config_and_snapshots_decode() {
    let repo = fixture();
    let c = repo.config();
    assert_eq!(c.version, 1);
    assert_eq!(c.chunker.min_size, 512 * 1024);
    assert_eq!(c.chunker.avg_size, 1024 * 1024);
    assert_eq!(c.chunker.max_size, 8 * 1024 * 1024);
    let snaps = repo.snapshots().expect("snapshots decode");
    let sources: Vec<&str> = snaps.iter().map(|(_, s)| s.source.as_str()).collect();
    assert_eq!(sources, ["files", "stdin"]);
    assert_eq!(snaps[0].1.paths, ["/tmp/backupd-fixture-src"]);
    assert_eq!(snaps[0].1.tags, ["fixture"]);
    // Every stored object is named by the SHA-256 of its bytes.
    for kind in [
        ObjectType::Pack,
        ObjectType::Index,
        ObjectType::Snapshot,
        ObjectType::Key,
    ] {
        for (name, _) in repo.backend().list(kind).expect("list") {
            let bytes = repo.backend().get(kind, &name).expect("get");
            assert_eq!(
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
                name
            );
        }
    }
    let report = crate::check::check(&repo, true);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn fixture_restores_exact_content() {
    let repo = fixture();
    let index = repo.load_index().expect("index decodes");
    let snaps = repo.snapshots().expect("snapshots decode");
    let target = tempfile::tempdir().expect("tempdir");
    let out = target.path().join("r");
    let rep = restore(
        &repo,
        &index,
        &snaps[0].1.tree,
        &out,
        &RestoreFilter::default(),
        2,
        &AtomicU64::new(0),
    )
    .expect("restore runs");
    assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    let base = out.join("tmp/backupd-fixture-src");
    assert_eq!(
        std::fs::read(base.join("hello.txt")).expect("hello.txt"),
        b"hello, backupd fixture\n"
    );
    let numbers: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        std::fs::read(base.join("data/numbers.txt")).expect("numbers"),
        numbers.as_bytes()
    );
    assert_eq!(
        std::fs::read_link(base.join("link")).expect("link"),
        PathBuf::from("hello.txt")
    );
    let stdin_node = find_node(&repo, &index, &snaps[1].1.tree, "greeting.txt").expect("node");
    assert_eq!(stdin_node.kind, NodeKind::File);
    let mut buf = vec![];
    dump_file(&repo, &index, &stdin_node, &mut buf).expect("dump");
    assert_eq!(buf, b"from stdin\n");
}

#[test]
fn fixture_rejects_wrong_password() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1");
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir));
    assert!(matches!(
        Repository::open(backend, b"not the password"),
        Err(crate::repo::RepoError::WrongPassword { .. })
    ));
}
