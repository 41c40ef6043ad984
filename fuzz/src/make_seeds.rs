//! Writes the seed corpora of the fuzz targets into `fuzz/seeds/<target>/`: the committed
//! fixture repositories (tests/fixtures, password `fixture-password`) opened with their
//! keys, each object's plaintext written in the input layout of its target (and, where a
//! target seals, sealed again with the fuzz test keys), plus small inputs for the decoders
//! no fixture holds (WAL, history, InfluxDB replies) and the example policies.
//!
//! Not a fuzz target: build and run it from `fuzz/` with
//! `cargo +nightly fuzz build -O make_seeds && target/x86_64-unknown-linux-gnu/release/make_seeds`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backupd::backend::{local::LocalBackend, Backend, ObjectType};
use backupd::crypto::{self, ObjectKind};
use backupd::pipeline::BlobKind;
use backupd::repo::{pack, Repository};
use backupd::source::influx::meta;
use prost::Message;
use sha2::{Digest, Sha256};

struct Seeds {
    root: PathBuf,
}

impl Seeds {
    fn put(&self, target: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("seed directory");
        let name = hex::encode(&Sha256::digest(bytes)[..8]);
        fs::write(dir.join(name), bytes).expect("seed written");
    }
}

fn with_prefix(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(rest);
    v
}

fn fixture(s: &Seeds, dir: &Path) {
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir));
    let repo = Repository::open(backend.clone(), b"fixture-password").expect("fixture opens");
    let keys = repo.keys();
    let test = fuzz_common::test_keys();

    let config = serde_json::to_vec(repo.config()).expect("config");
    s.put("config", &config);
    let sealed_config = Repository::read_config(&backend).expect("config read");
    s.put("envelope", &sealed_config);
    s.put(
        "envelope",
        &with_prefix(&[ObjectKind::Config as u8, 0, 0], &config),
    );

    for (name, _) in backend.list(ObjectType::Key).expect("keys") {
        let bytes = backend.get(ObjectType::Key, &name).expect("key file");
        s.put("keyfile", &with_prefix(&[0], &bytes));
        s.put("envelope", &bytes);
    }
    let bundle = keys.to_json().expect("keys as JSON");
    s.put("keyfile", &with_prefix(&[1], &bundle));
    let pair = format!(
        r#"{{"secret_key":"{k}","id_key":"{k}","chunker_secret":"{k}"}}"#,
        k = "11".repeat(32)
    );
    s.put("keyfile", &with_prefix(&[3], pair.as_bytes()));

    for (name, _) in backend.list(ObjectType::Index).expect("index") {
        let plain = repo
            .load_object(ObjectType::Index, ObjectKind::Index, &name)
            .expect("index opens");
        s.put("index", &plain);
        s.put(
            "envelope",
            &with_prefix(&[ObjectKind::Index as u8, 7, 1], &plain),
        );
    }
    for (name, _) in backend.list(ObjectType::Snapshot).expect("snapshots") {
        let plain = repo
            .load_object(ObjectType::Snapshot, ObjectKind::Snapshot, &name)
            .expect("snapshot opens");
        s.put("snapshot", &plain);
    }
    for (name, _) in backend.list(ObjectType::Pack).expect("packs") {
        let bytes = backend.get(ObjectType::Pack, &name).expect("pack");
        let n = bytes.len();
        let hlen = u32::from_le_bytes(bytes[n - 4..].try_into().expect("4 bytes")) as usize;
        let header = crypto::open(
            &keys,
            ObjectKind::PackHeader,
            None,
            &bytes[n - 4 - hlen..n - 4],
        )
        .expect("pack header opens");
        let data_end = (n - 4 - hlen) as u32;
        s.put("pack", &with_prefix(&data_end.to_le_bytes(), &header));
        // The same pack sealed with the test keys, small enough for the fuzzer: the
        // header only, behind no blobs.
        let sealed = crypto::seal(&test, ObjectKind::PackHeader, None, &header);
        let mut whole = sealed.clone();
        whole.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        s.put("envelope", &sealed);
        for e in pack::read_header(&keys, &name, &bytes).expect("pack header") {
            if e.kind != BlobKind::Tree {
                continue;
            }
            let blob = &bytes[e.offset as usize..(e.offset + e.length) as usize];
            let framed = crypto::open(&keys, ObjectKind::TreeBlob, Some(&e.id.0), blob)
                .expect("tree blob opens");
            s.put("tree", &with_prefix(&e.raw_length.to_le_bytes(), &framed));
        }
    }
}

/// A WAL segment of `size` bytes, pages of 1 KiB, holding a commit record.
fn segment(size: usize) -> Vec<u8> {
    let page = 1024usize;
    let mut seg = vec![0u8; size];
    seg[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    seg[2..4].copy_from_slice(&2u16.to_le_bytes()); // XLP_LONG_HEADER
    seg[4..8].copy_from_slice(&1u32.to_le_bytes());
    seg[24..32].copy_from_slice(&7u64.to_le_bytes());
    seg[32..36].copy_from_slice(&(size as u32).to_le_bytes());
    seg[36..40].copy_from_slice(&(page as u32).to_le_bytes());
    // After the 40-byte long header: a commit record (rmid 1, info 0) whose main data is a
    // timestamp, as a short data block (id 255, length 8).
    let mut rec = vec![0u8; 24];
    rec.extend_from_slice(&[255, 8]);
    rec.extend_from_slice(&800_000_000_000_000i64.to_le_bytes());
    let len = rec.len() as u32;
    rec[0..4].copy_from_slice(&len.to_le_bytes());
    rec[16] = 0;
    rec[17] = 1;
    seg[40..40 + rec.len()].copy_from_slice(&rec);
    // Then a switch record (rmid 0, info 0x40).
    let at = (40 + rec.len() + 7) & !7;
    let mut sw = vec![0u8; 24];
    sw[0..4].copy_from_slice(&24u32.to_le_bytes());
    sw[16] = 0x40;
    sw[17] = 0;
    seg[at..at + 24].copy_from_slice(&sw);
    seg
}

fn wal_object(file: &[u8], compress: bool) -> Vec<u8> {
    let mut v = vec![1u8, compress as u8];
    v.extend_from_slice(&(file.len() as u64).to_le_bytes());
    if compress {
        v.extend_from_slice(&zstd::bulk::compress(file, 3).expect("zstd"));
    } else {
        v.extend_from_slice(file);
    }
    v
}

fn postgres(s: &Seeds) {
    for size in [1024, 2048, 4096] {
        let seg = segment(size);
        s.put("walscan", &seg);
        s.put("wal_object", &wal_object(&seg, false));
        s.put("wal_object", &wal_object(&seg, true));
    }
    s.put(
        "wal_object",
        &wal_object(b"1\t0/A009F18\tbefore 2026-11-01\n", false),
    );
    s.put(
        "pg_history",
        &with_prefix(
            &3u32.to_le_bytes(),
            b"1\t0/A009F18\tbefore 2026-11-01 14:30:00+00\n\n2\t0/C000000\tno recovery target specified\n",
        ),
    );
    s.put(
        "pg_history",
        &with_prefix(
            &2u32.to_le_bytes(),
            b"# comment\n1\t0/3000000\tat restore point\n",
        ),
    );
    let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-01 14:00:00 UTC\nLABEL: backupd\nSTART TIMELINE: 1\n";
    let meta = serde_json::json!({
        "system_identifier": "7301234567890123456",
        "timeline": 1,
        "start_lsn": "0/2000028",
        "stop_lsn": "0/2000138",
        "start_time": "2026-11-01T14:00:00Z",
        "stop_time": "2026-11-01T14:00:01Z",
        "server_version": "15.18",
        "server_version_num": 150018,
        "wal_segment_size": 16777216,
        "label": "backupd",
        "data_directory": "/var/lib/postgresql/15/main",
        "backup_label": label,
        "tablespace_map": "16385 /srv/ts1\n",
        "tablespaces": [{"oid": 16385, "name": "ts1", "location": "/srv/ts1", "tree": "00".repeat(32)}]
    });
    s.put("pg_backup_meta", meta.to_string().as_bytes());
    s.put("pg_backup_meta", label.as_bytes());
}

fn influx(s: &Seeds) {
    let data = meta::Data {
        term: 1,
        index: 2,
        databases: vec![meta::DatabaseInfo {
            name: "db1".into(),
            default_retention_policy: "autogen".into(),
            retention_policies: vec![meta::RetentionPolicyInfo {
                name: "autogen".into(),
                duration: 0,
                shard_group_duration: 604_800_000_000_000,
                replica_n: 1,
                shard_groups: vec![meta::ShardGroupInfo {
                    id: 1,
                    start_time: 0,
                    end_time: 604_800_000_000_000,
                    shards: vec![meta::ShardInfo {
                        id: 1,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec();
    let node = br#"{"id":1,"addr":"127.0.0.1:8088"}"#;
    let mut reply = vec![0u8];
    reply.extend_from_slice(&0x5959_0101u64.to_be_bytes());
    reply.extend_from_slice(&(data.len() as u64).to_be_bytes());
    reply.extend_from_slice(&data);
    reply.extend_from_slice(&(node.len() as u64).to_be_bytes());
    reply.extend_from_slice(node);
    s.put("influx_reply", &reply);
    s.put("influx_reply", &with_prefix(&[5], &data));
    s.put(
        "influx_reply",
        &with_prefix(&[1], br#"{"Paths":["db1/autogen/1","db1/autogen/2"]}"#),
    );
    let mut upd = vec![2u8];
    upd.extend_from_slice(&0x5959_0101u64.to_be_bytes());
    upd.extend_from_slice(&1u64.to_be_bytes());
    upd.extend_from_slice(&1u64.to_be_bytes());
    upd.extend_from_slice(&5u64.to_be_bytes());
    s.put("influx_reply", &upd);
    s.put(
        "influx_reply",
        &with_prefix(
            &[3],
            br#"{"results":[{"statement_id":0,"series":[{"name":"cpu","columns":["time","count_value"],"values":[[0,100]]}]}]}"#,
        ),
    );
    s.put(
        "influx_reply",
        &with_prefix(
            &[3],
            br#"{"results":[{"statement_id":0,"error":"database not found: x"}]}"#,
        ),
    );
    // Tombstones: version 1 (lines) and version 2 (entries).
    s.put(
        "influx_reply",
        &with_prefix(&[4], b"cpu,host=h0#!~#value\nmem\n"),
    );
    let mut v2 = vec![4u8];
    v2.extend_from_slice(&0x1502u32.to_be_bytes());
    let key = b"cpu,host=h\\ 0#!~#value";
    v2.extend_from_slice(&(key.len() as u32).to_be_bytes());
    v2.extend_from_slice(key);
    v2.extend_from_slice(&0i64.to_be_bytes());
    v2.extend_from_slice(&100i64.to_be_bytes());
    s.put("influx_reply", &v2);
}

fn policies(s: &Seeds, dir: &Path) {
    for sub in [dir.to_path_buf(), dir.join("invalid")] {
        for e in fs::read_dir(&sub).expect("policies") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                s.put("policy", &fs::read(&p).expect("policy"));
            }
        }
    }
}

fn main() {
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let s = Seeds {
        root: Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds"),
    };
    for repo in ["repo-v1", "repo-v2"] {
        fixture(&s, &top.join("tests/fixtures").join(repo));
    }
    postgres(&s);
    influx(&s);
    policies(&s, &top.join("policies"));
    println!("seeds written to {}", s.root.display());
}
