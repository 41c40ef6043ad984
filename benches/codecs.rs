//! Criterion benchmarks of the CPU stages of the data path, in MB/s on one core:
//! chunker, blob id (HMAC-SHA256), zstd compression (levels 1 and 3), seal (XChaCha20-Poly1305), the
//! whole encode of one blob, the pack writer, and index lookups.
//!
//! Run: `cargo bench --bench codecs`. Figures go in the issue notes; nothing here is
//! asserted in tests.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use backupd::crypto::{self, MasterKeys, ObjectKind};
use backupd::pipeline::blob;
use backupd::pipeline::chunker::Cutter;
use backupd::pipeline::{BlobId, BlobKind, Chunker, ChunkerParams};
use backupd::repo::index::IndexedPack;
use backupd::repo::pack::{PackBuilder, PackEntry};
use backupd::repo::Index;

/// Deterministic test data: log-like text (compresses ~4x) or random bytes.
fn data(len: usize, text: bool) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    if !text {
        return (0..len).map(|_| next() as u8).collect();
    }
    let words = [
        "GET",
        "POST",
        "/api/v1/orders",
        "200",
        "404",
        "user",
        "session",
        "cache",
        "miss",
        "INFO",
        "WARN",
        "db.pool",
        "timeout",
        "retry",
        "2024-01-15T14:30:00Z",
    ];
    let mut out = Vec::with_capacity(len + 64);
    while out.len() < len {
        let w = words[(next() % words.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        out.extend_from_slice(format!(" {} ", next() % 100_000).as_bytes());
        if next() % 8 == 0 {
            out.push(b'\n');
        }
    }
    out.truncate(len);
    out
}

fn kinds() -> [(&'static str, bool); 2] {
    [("text", true), ("random", false)]
}

fn chunker(c: &mut Criterion) {
    let keys = MasterKeys::generate();
    let cutter = Cutter::new(ChunkerParams::default(), keys.gear_table());
    let mut g = c.benchmark_group("chunker");
    for (name, text) in kinds() {
        let d = data(64 << 20, text);
        g.throughput(Throughput::Bytes(d.len() as u64));
        g.bench_with_input(BenchmarkId::new("stream", name), &d, |b, d| {
            b.iter(|| {
                let mut ch = Chunker::new(&d[..], cutter.clone());
                let mut n = 0;
                while let Some(c) = ch.next_chunk().expect("in-memory read") {
                    n += c.len();
                }
                black_box(n)
            })
        });
    }
    g.finish();
}

fn per_blob(c: &mut Criterion) {
    let keys = MasterKeys::generate();
    let mut g = c.benchmark_group("blob");
    for (name, text) in kinds() {
        let d = data(1 << 20, text);
        let id = BlobId(keys.blob_id(&d));
        g.throughput(Throughput::Bytes(d.len() as u64));
        g.bench_with_input(BenchmarkId::new("id_hmac_sha256", name), &d, |b, d| {
            b.iter(|| black_box(keys.blob_id(d)))
        });
        for level in [1, 3] {
            g.bench_with_input(
                BenchmarkId::new(format!("zstd{level}"), name),
                &d,
                |b, d| b.iter(|| black_box(zstd::bulk::compress(d, level).expect("compress"))),
            );
        }
        g.bench_with_input(BenchmarkId::new("seal", name), &d, |b, d| {
            b.iter(|| black_box(crypto::seal(&keys, ObjectKind::DataBlob, Some(&id.0), d)))
        });
        g.bench_with_input(BenchmarkId::new("encode_full", name), &d, |b, d| {
            b.iter(|| {
                let id = BlobId(keys.blob_id(d));
                black_box(blob::encode(&keys, BlobKind::Data, &id, d, 1))
            })
        });
        let sealed = blob::encode(&keys, BlobKind::Data, &id, &d, 1);
        g.bench_with_input(BenchmarkId::new("decode_full", name), &sealed, |b, s| {
            b.iter(|| {
                black_box(blob::decode(&keys, BlobKind::Data, &id, s, d.len()).expect("decode"))
            })
        });
    }
    g.finish();
}

fn pack_writer(c: &mut Criterion) {
    let keys = MasterKeys::generate();
    let d = data(1 << 20, false);
    let blobs: Vec<(BlobId, Vec<u8>)> = (0..16u8)
        .map(|i| {
            let mut x = d.clone();
            x[0] = i;
            let id = BlobId(keys.blob_id(&x));
            let s = blob::encode(&keys, BlobKind::Data, &id, &x, 0);
            (id, s)
        })
        .collect();
    let total: usize = blobs.iter().map(|(_, s)| s.len()).sum();
    let mut g = c.benchmark_group("pack");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("build_16MiB", |b| {
        b.iter(|| {
            let mut p = PackBuilder::default();
            for (id, s) in &blobs {
                p.add(BlobKind::Data, *id, s, (1 << 20) as u32);
            }
            black_box(p.finish(&keys).id)
        })
    });
    g.finish();
}

fn index_lookup(c: &mut Criterion) {
    let n_packs = 1000u32;
    let per = 1000u32;
    let mut x: u64 = 42;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut ids = vec![];
    let packs: Vec<IndexedPack> = (0..n_packs)
        .map(|p| IndexedPack {
            pack: BlobId([(p % 251) as u8; 32]),
            entries: (0..per)
                .map(|i| {
                    let mut id = [0u8; 32];
                    for w in id.chunks_mut(8) {
                        w.copy_from_slice(&rnd().to_le_bytes());
                    }
                    ids.push(BlobId(id));
                    PackEntry {
                        kind: BlobKind::Data,
                        id: BlobId(id),
                        offset: i,
                        length: 1,
                        raw_length: 1,
                    }
                })
                .collect(),
        })
        .collect();
    let idx = Index::from_packs(packs);
    println!(
        "index: {} blobs, {:.1} bytes of memory per blob",
        idx.len(),
        idx.bytes_per_blob()
    );
    let mut g = c.benchmark_group("index");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("lookup_hit_1M_blobs", |b| {
        b.iter(|| {
            i = (i + 7919) % ids.len();
            black_box(idx.get(&ids[i]))
        })
    });
    let miss = BlobId([0xab; 32]);
    g.bench_function("lookup_miss_1M_blobs", |b| {
        b.iter(|| black_box(idx.contains(&miss)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    targets = chunker, per_blob, pack_writer, index_lookup
}
criterion_main!(benches);
