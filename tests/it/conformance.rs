//! One backend conformance suite, run against the local backend and against a real S3
//! server (s3s-fs on loopback): every backend must behave the same to the layers above.

use std::collections::BTreeSet;
use std::sync::Arc;

use backupd::backend::layers::{MetricsLayer, RequestCounters};
use backupd::backend::{
    Backend, BackendError, Bytes, LocalBackend, ObjectType, S3Backend, S3Location, S3Options,
};
use sha2::{Digest, Sha256};

use super::common::*;

fn fs_names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Credentials for the SDK's environment provider (nextest runs each test in a process of
/// its own; the values are the same for every test anyway).
fn set_s3_credentials() {
    std::env::set_var("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY);
}

fn s3_backend(server: &S3Server, path: &str, opts: S3Options) -> S3Backend {
    set_s3_credentials();
    S3Backend::new(S3Location::parse(&server.location(path)).unwrap(), opts).unwrap()
}

fn name(i: u64) -> String {
    hex(&Sha256::digest(i.to_le_bytes()))
}

/// Objects are named by the SHA-256 of their bytes (all but `config`; format.md).
fn name_of(body: &[u8]) -> String {
    hex(&Sha256::digest(body))
}

/// The suite. `big` is the size of the large-object case.
fn conformance(b: &dyn Backend, big: usize) {
    b.create().unwrap();

    // Missing objects.
    let missing = name(u64::MAX);
    assert!(!b.exists(ObjectType::Pack, &missing).unwrap());
    assert!(matches!(
        b.get(ObjectType::Pack, &missing),
        Err(BackendError::NotFound { .. })
    ));
    assert!(matches!(
        b.get_range(ObjectType::Pack, &missing, 0, 10),
        Err(BackendError::NotFound { .. })
    ));
    assert!(!b.exists(ObjectType::Config, "config").unwrap());

    // Put and get of every kind.
    let body = random_bytes(100_000);
    let id = name_of(&body);
    for kind in [
        ObjectType::Key,
        ObjectType::Pack,
        ObjectType::Index,
        ObjectType::Snapshot,
    ] {
        b.put(kind, &id, Bytes::from(body.clone())).unwrap();
        assert!(b.exists(kind, &id).unwrap(), "{kind:?}");
        assert_eq!(b.get(kind, &id).unwrap(), body, "{kind:?}");
        assert_eq!(b.list(kind).unwrap(), vec![(id.clone(), body.len() as u64)]);
    }
    b.put(ObjectType::Config, "config", Bytes::from_static(b"cfg"))
        .unwrap();
    assert!(b.exists(ObjectType::Config, "config").unwrap());
    assert_eq!(b.get(ObjectType::Config, "config").unwrap(), b"cfg");
    // The one object ever replaced (a format upgrade): other bytes under the same name.
    b.replace_config(Bytes::from_static(b"config, upgraded"))
        .unwrap();
    assert_eq!(
        b.get(ObjectType::Config, "config").unwrap(),
        b"config, upgraded"
    );
    // The same bytes again (a retried upload) succeed.
    b.put(ObjectType::Pack, &id, Bytes::from(body.clone()))
        .unwrap();

    // Ranged reads: start, middle, exact end, past the end, empty.
    let r = |off: u64, len: u64| b.get_range(ObjectType::Pack, &id, off, len);
    assert_eq!(r(0, 10).unwrap(), &body[..10]);
    assert_eq!(r(4_000, 50_000).unwrap(), &body[4_000..54_000]);
    assert_eq!(r(99_990, 10).unwrap(), &body[99_990..]);
    assert!(r(0, 0).unwrap().is_empty());
    match r(99_990, 20) {
        Err(BackendError::ShortRead { got, want, .. }) => assert_eq!((got, want), (10, 20)),
        other => panic!("read past the end: {other:?}"),
    }
    match r(200_000, 5) {
        Err(BackendError::ShortRead { got: 0, .. }) => {}
        other => panic!("read after the end: {other:?}"),
    }

    // Listing past one page (S3 pages hold 1000 keys); packs spread over data/xx/.
    let bodies: Vec<Vec<u8>> = (100..1_150)
        .map(|i: u32| format!("object {i:08}").into_bytes())
        .collect();
    let many: BTreeSet<String> = bodies.iter().map(|b| name_of(b)).collect();
    for body in &bodies {
        b.put(ObjectType::Pack, &name_of(body), Bytes::from(body.clone()))
            .unwrap();
    }
    let listed = b.list(ObjectType::Pack).unwrap();
    assert_eq!(listed.len(), many.len() + 1);
    for (n, size) in &listed {
        if *n != id {
            assert!(many.contains(n), "unexpected {n}");
            assert_eq!(*size, 15);
        }
    }
    // Other kinds are not mixed in.
    assert_eq!(b.list(ObjectType::Index).unwrap().len(), 1);

    // Delete: gone from get, exists and list; deleting again succeeds.
    for n in many.iter().take(10) {
        b.delete(ObjectType::Pack, n).unwrap();
        assert!(!b.exists(ObjectType::Pack, n).unwrap());
        b.delete(ObjectType::Pack, n).unwrap();
    }
    assert_eq!(b.list(ObjectType::Pack).unwrap().len(), many.len() + 1 - 10);
    assert!(matches!(
        b.get(ObjectType::Pack, many.iter().next().unwrap()),
        Err(BackendError::NotFound { .. })
    ));

    // A large object (multipart with parallel parts on S3), read back whole and in ranges
    // across part boundaries.
    let unit = random_bytes(1 << 20);
    let mut large = vec![0u8; big];
    for (i, chunk) in large.chunks_mut(1 << 20).enumerate() {
        chunk.copy_from_slice(&unit[..chunk.len()]);
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    let digest = Sha256::digest(&large);
    let big_id = hex(&digest);
    let large = Bytes::from(large);
    b.put(ObjectType::Pack, &big_id, large.clone()).unwrap();
    let back = b.get(ObjectType::Pack, &big_id).unwrap();
    assert_eq!(back.len(), big);
    assert_eq!(Sha256::digest(&back), digest);
    drop(back);
    let mid = (big / 2) as u64;
    assert_eq!(
        b.get_range(ObjectType::Pack, &big_id, mid - 1000, 2000)
            .unwrap(),
        &large[mid as usize - 1000..mid as usize + 1000]
    );
    let end = big as u64;
    assert_eq!(
        b.get_range(ObjectType::Pack, &big_id, end - 7, 7).unwrap(),
        &large[big - 7..]
    );
    b.delete(ObjectType::Pack, &big_id).unwrap();

    // WAL objects: names with folders, listed one folder at a time, never by content.
    let wal = |f: &str| format!("7001/{}/{f}", &f[..16]);
    let segs = [
        "000000010000000000000001",
        "000000010000000000000002",
        "000000020000000000000002",
    ];
    for s in segs {
        b.put(ObjectType::Wal, &wal(s), Bytes::from(s.as_bytes().to_vec()))
            .unwrap();
    }
    b.put(
        ObjectType::Wal,
        "7001/00000002.history",
        Bytes::from_static(b"1\t0/2000000\tx\n"),
    )
    .unwrap();
    assert!(b.exists(ObjectType::Wal, &wal(segs[2])).unwrap());
    assert_eq!(
        b.get(ObjectType::Wal, &wal(segs[1])).unwrap(),
        segs[1].as_bytes()
    );
    let top = b.list_dir(ObjectType::Wal, "7001").unwrap();
    assert_eq!(top.files, vec![("00000002.history".to_string(), 14)]);
    assert_eq!(top.dirs, vec!["0000000100000000", "0000000200000000"]);
    let g1 = b
        .list_dir(ObjectType::Wal, "7001/0000000100000000")
        .unwrap();
    assert_eq!(
        g1.files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        &segs[..2]
    );
    assert!(g1.dirs.is_empty());
    assert_eq!(b.list_dir(ObjectType::Wal, "").unwrap().dirs, vec!["7001"]);
    assert_eq!(
        b.list_dir(ObjectType::Wal, "9999").unwrap(),
        Default::default()
    );
}

const BIG: usize = 200 * 1024 * 1024;

#[test]
fn local_backend_conforms() {
    let d = tempfile::tempdir().unwrap();
    let b = LocalBackend::new(d.path().join("repo"));
    conformance(&b, BIG);
}

#[test]
fn s3_backend_conforms() {
    let server = S3Server::start();
    let counters = Arc::new(RequestCounters::default());
    let b = MetricsLayer::new(
        s3_backend(&server, "bk1/conformance", S3Options::default()),
        counters.clone(),
    );
    conformance(&b, BIG);
    // The objects are where the layout says, under the prefix.
    let root = server.bucket_dir("bk1").join("conformance");
    assert!(root.join("config").is_file());
    assert_eq!(fs_names(&root.join("keys")).len(), 1);
    let subdirs = fs_names(&root.join("data"));
    assert!(
        subdirs.len() > 100,
        "packs are spread over data/xx/: {subdirs:?}"
    );
    assert!(
        subdirs
            .iter()
            .all(|d| d.len() == 2 && hex::decode(d).is_ok()),
        "{subdirs:?}"
    );
    // The store checks each upload against its name: bytes that do not match are refused,
    // and not retried.
    match b.put(
        ObjectType::Pack,
        &name(7),
        Bytes::from_static(b"not what the name says"),
    ) {
        Err(e) => assert!(!e.is_transient(), "{e}"),
        Ok(()) => panic!("a pack whose bytes do not match its name was stored"),
    }
    // Listing 1051 packs took two pages.
    assert!(counters.stats().list >= 2);
}

#[test]
fn s3_backend_creates_a_missing_bucket() {
    let server = S3Server::start();
    let b = s3_backend(&server, "newbucket/x", S3Options::default());
    match b.exists(ObjectType::Config, "config") {
        Err(BackendError::BucketMissing { bucket, location }) => {
            assert_eq!(bucket, "newbucket");
            assert!(location.contains(&server.endpoint()), "{location}");
        }
        other => panic!("missing bucket: {other:?}"),
    }
    b.create().unwrap();
    assert!(!b.exists(ObjectType::Config, "config").unwrap());
    b.create().unwrap();
}

#[test]
fn s3_wrong_credentials_are_denied_not_retried() {
    let server = S3Server::start();
    std::env::set_var("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "wrong-secret");
    let b = S3Backend::new(
        S3Location::parse(&server.location("bk1/repo")).unwrap(),
        S3Options::default(),
    )
    .unwrap();
    match b.put(ObjectType::Snapshot, &name(1), Bytes::from_static(b"x")) {
        Err(e @ BackendError::Denied { .. }) => assert!(!e.is_transient()),
        other => panic!("a wrong secret: {other:?}"),
    }
    let out = backupd()
        .args(["snapshots", "--repo"])
        .arg(server.location("bk1/repo"))
        .env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        .env("BACKUPD_PASSWORD", "x")
        .run()
        .expect(1);
    let err = out.stderr.clone();
    assert!(
        err.contains("access denied") && err.contains(&server.endpoint()),
        "{}",
        out.describe()
    );
    assert!(
        !err.contains("retrying"),
        "denied requests must not be retried: {err}"
    );
    assert!(!err.contains("wrong-secret"), "the secret leaked: {err}");
}

#[test]
fn s3_bucket_missing_is_no_repository() {
    let server = S3Server::start();
    let out = server
        .credentials(backupd())
        .args(["snapshots", "--repo"])
        .arg(server.location("nosuchbucket/repo"))
        .env("BACKUPD_PASSWORD", "x")
        .run()
        .expect(10);
    assert!(
        out.stderr.contains("nosuchbucket") && out.stderr.contains("does not exist"),
        "{}",
        out.describe()
    );
}
