//! Index files: the input is an index plaintext, decoded under the limits of any
//! repository and of a default one, then merged into an in-memory index and looked up;
//! the raw input is also opened as a sealed index (which must fail).
#![no_main]

use backupd::crypto::{self, ObjectKind};
use backupd::pipeline::blob::BlobLimits;
use backupd::pipeline::ChunkerParams;
use backupd::repo::index::{self, Index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = fuzz_common::test_keys();
    if let Ok(plain) = crypto::open(&keys, ObjectKind::Index, None, data) {
        let _ = index::decode(&plain, &BlobLimits::ANY);
    }
    let limits = BlobLimits::for_chunker(&ChunkerParams::default());
    let _ = index::decode(data, &limits);
    if let Ok(packs) = index::decode(data, &BlobLimits::ANY) {
        let ids: Vec<_> = packs
            .iter()
            .flat_map(|p| p.entries.iter().map(|e| e.id))
            .collect();
        let again = index::encode(&packs);
        assert_eq!(
            again, data,
            "an index that decodes encodes to the same bytes"
        );
        let idx = Index::from_packs(packs);
        for id in &ids {
            let loc = idx.get(id).expect("every decoded blob is found");
            assert!(loc.raw_length <= BlobLimits::ANY.max_len(loc.kind));
        }
    }
});
