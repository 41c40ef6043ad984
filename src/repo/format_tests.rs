//! Format version 2's growth rules: snapshots that need a feature this build lacks are
//! skipped when listing and refused when restoring or pruning; a repository that needs
//! one does not open; version-1 repositories open and upgrade.

use std::sync::Arc;

use crate::backend::{Backend, LocalBackend, ObjectType};
use crate::crypto::{self, ObjectKind};
use crate::pipeline::BlobId;
use crate::repo::config::Config;
use crate::repo::{RepoError, Repository, Snapshot};

fn repo() -> (tempfile::TempDir, Repository) {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(LocalBackend::new(dir.path().join("repo")));
    let repo = Repository::init_local(backend, b"pw", "h", "u", 3).unwrap();
    (dir, repo)
}

fn snapshot(features: &[&str]) -> Snapshot {
    Snapshot {
        time: chrono::Utc::now(),
        host: "h".into(),
        username: "u".into(),
        paths: vec!["/x".into()],
        tags: vec![],
        tree: BlobId([7; 32]),
        parent: None,
        source: "files".into(),
        command: None,
        policy: None,
        summary: Default::default(),
        postgres: None,
        influxdb: None,
        program_version: "9.9.9".into(),
        features: features.iter().map(|f| f.to_string()).collect(),
        format: 2,
        original_id: None,
    }
}

fn reopen(dir: &tempfile::TempDir) -> Result<Repository, RepoError> {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
    Repository::open(backend, b"pw")
}

/// Seals `config` under the repository's keys and puts it in place.
fn write_config(repo: &Repository, config: &Config) {
    let sealed = crypto::seal(
        &repo.keys(),
        ObjectKind::Config,
        None,
        &serde_json::to_vec(config).unwrap(),
    );
    repo.backend().replace_config(sealed.into()).unwrap();
}

#[test]
fn a_snapshot_needing_an_unknown_feature_is_skipped_when_listing_and_refused_otherwise() {
    let (_dir, repo) = repo();
    let known = repo
        .save_snapshot(&snapshot(&["sparse", "xattrs"]))
        .unwrap();
    let future = repo
        .save_snapshot(&snapshot(&["sparse", "from-the-future"]))
        .unwrap();
    let listed: Vec<BlobId> = repo
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, [known]);
    let e = repo.all_snapshots().unwrap_err().to_string();
    assert!(
        e.contains("from-the-future") && e.contains(&future.to_hex()),
        "{e}"
    );
    let e = repo
        .load_snapshot(&future.to_hex())
        .unwrap_err()
        .to_string();
    assert!(e.contains("from-the-future"), "{e}");
    // `restore ID` resolves through load_snapshot: refused by name too.
    let e = repo
        .resolve_snapshot(&future.to_hex()[..12])
        .unwrap_err()
        .to_string();
    assert!(e.contains("from-the-future"), "{e}");
    // "latest" may be the one this build cannot read: refused, not an older one instead.
    let e = repo.resolve_snapshot("latest").unwrap_err().to_string();
    assert!(e.contains("from-the-future"), "{e}");
}

#[test]
fn an_authentic_snapshot_this_build_cannot_decode_is_skipped_when_listing() {
    let (_dir, repo) = repo();
    let known = repo.save_snapshot(&snapshot(&[])).unwrap();
    // Sealed correctly, but a shape this build does not know (a newer writer's).
    let sealed = crypto::seal(
        &repo.keys(),
        ObjectKind::Snapshot,
        None,
        br#"{"time":"not a time at all"}"#,
    );
    let name = crate::repo::sha256_hex(&sealed);
    repo.backend()
        .put(ObjectType::Snapshot, &name, sealed.into())
        .unwrap();
    let listed: Vec<BlobId> = repo
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, [known]);
    let e = repo.all_snapshots().unwrap_err().to_string();
    assert!(e.contains("newer version") && e.contains(&name), "{e}");
}

#[test]
fn a_repository_needing_an_unknown_feature_does_not_open() {
    let (dir, repo) = repo();
    let mut c = repo.config().clone();
    c.features = vec!["key-bundle-v9".into()];
    write_config(&repo, &c);
    let e = reopen(&dir).unwrap_err();
    assert!(
        matches!(&e, RepoError::UnsupportedFeature(f) if f == "key-bundle-v9"),
        "{e}"
    );
    assert!(e.to_string().contains("upgrade backupd"), "{e}");
}

#[test]
fn version_1_opens_upgrades_and_a_later_version_is_refused() {
    let (dir, repo) = repo();
    assert_eq!(repo.config().version, 2);
    let mut c = repo.config().clone();
    c.version = 1;
    // Version 1 had no features (its key files were version 1; a version-2 key file opens
    // whatever the config says).
    c.features.clear();
    write_config(&repo, &c);
    let mut r = reopen(&dir).unwrap();
    assert!(!r.config().is_v2());
    r.upgrade().unwrap();
    let r = reopen(&dir).unwrap();
    assert_eq!(r.config().version, 2);
    // A version-1 config's bytes carry no `features` field: as version 1 wrote them.
    let plain = serde_json::to_string(&c).unwrap();
    assert!(!plain.contains("features"), "{plain}");
    let mut c3 = r.config().clone();
    c3.version = 3;
    write_config(&r, &c3);
    assert!(matches!(
        reopen(&dir),
        Err(RepoError::UnsupportedVersion(3))
    ));
}
