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

fn fixture_v2() -> Repository {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v2");
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir));
    Repository::open(backend, b"fixture-password").expect("the v2 fixture opens")
}

#[test]
fn fixture_v1_is_format_1_and_the_v2_fixture_is_format_2() {
    assert_eq!(fixture().config().version, 1);
    assert!(!fixture().config().is_v2());
    let repo = fixture_v2();
    assert_eq!(repo.config().version, 2);
    assert!(repo.config().features.is_empty());
    let snaps = repo.snapshots().expect("snapshots decode");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].1.features, ["sparse", "special-files", "xattrs"]);
    let report = crate::check::check(&repo, true);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[test]
fn fixture_v2_restores_attributes_special_and_sparse_files() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let repo = fixture_v2();
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
    let base = out.join("tmp/backupd-fixture-v2-src");
    let hello = std::fs::File::open(base.join("hello.txt")).expect("hello.txt");
    let x = crate::fsattr::read_xattrs_fd(&hello).expect("xattrs");
    assert!(
        x.contains(&(b"user.fixture".to_vec(), b"kept by format 2".to_vec())),
        "{x:?}"
    );
    assert!(
        x.iter().any(|(n, _)| n == b"system.posix_acl_access"),
        "{x:?}"
    );
    let dir = std::fs::File::open(base.join("dir")).expect("dir");
    let x = crate::fsattr::read_xattrs_fd(&dir).expect("xattrs");
    assert!(
        x.iter().any(|(n, _)| n == b"system.posix_acl_default"),
        "{x:?}"
    );
    assert!(std::fs::symlink_metadata(base.join("fifo"))
        .expect("fifo")
        .file_type()
        .is_fifo());
    let sparse = std::fs::read(base.join("sparse")).expect("sparse");
    assert_eq!(sparse.len(), 8 << 20);
    assert_eq!(&sparse[1 << 20..(1 << 20) + 22], b"data in a sparse file\n");
    assert!(sparse[..1 << 20].iter().all(|&b| b == 0));
    let blocks = std::fs::metadata(base.join("sparse"))
        .expect("sparse")
        .blocks();
    assert!(
        blocks * 512 <= 64 * 1024,
        "{} bytes allocated",
        blocks * 512
    );
    let node = find_node(
        &repo,
        &index,
        &snaps[0].1.tree,
        "tmp/backupd-fixture-v2-src/sparse",
    )
    .expect("node");
    assert_eq!(node.extents.len(), 1, "{:?}", node.extents);
}
