//! Tree blobs: the input is `raw length u32 LE | compression byte | payload`, sealed with
//! the test keys as a tree blob and decoded as restore does (open, decompress to the raw
//! length the index gave), then parsed as a directory listing and as a content list, and
//! every accessor restore uses on a node is run.
#![no_main]

use backupd::crypto::{self, ObjectKind};
use backupd::pipeline::{blob, BlobId, BlobKind};
use backupd::repo::tree::{self, Tree};
use libfuzzer_sys::fuzz_target;

fn walk(plain: &[u8]) {
    let _ = tree::decode_content_list(plain);
    let Ok(t) = serde_json::from_slice::<Tree>(plain) else {
        return;
    };
    for n in &t.nodes {
        let _ = n.name_bytes();
        let _ = n.mtime_parts();
        if n.extents_problem().is_none() {
            let _ = n.data_size();
            let _ = n.data_regions();
        }
        let _ = n.link_target_bytes();
        for x in &n.xattrs {
            let _ = x.name_bytes();
            let _ = x.value_bytes();
        }
        let _ = n.kind.word();
    }
    let mut sorted = t.clone();
    sorted.sort();
    let _ = sorted.to_bytes();
}

fuzz_target!(|data: &[u8]| {
    walk(data);
    if data.len() < 4 {
        return;
    }
    let keys = fuzz_common::test_keys();
    let raw_len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let framed = &data[4..];
    let id = BlobId([7u8; 32]);
    let sealed = crypto::seal(&keys, ObjectKind::TreeBlob, Some(&id.0), framed);
    if let Ok(plain) = blob::decode(&keys, BlobKind::Tree, &id, &sealed, raw_len) {
        assert_eq!(plain.len(), raw_len);
        walk(&plain);
    }
    let mut buf = sealed.clone();
    let mut scratch = Vec::new();
    let _ = blob::decode_in_place(&keys, BlobKind::Tree, &id, &mut buf, raw_len, &mut scratch);
});
