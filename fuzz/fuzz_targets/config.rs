//! The repository config: the input is its plaintext (JSON), decoded and checked as an
//! open does (version, features, chunker parameters); the raw input is also opened as a
//! sealed config (which must fail).
#![no_main]

use backupd::crypto::{self, ObjectKind};
use backupd::pipeline::blob::BlobLimits;
use backupd::repo::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = fuzz_common::test_keys();
    let _ = crypto::open(&keys, ObjectKind::Config, None, data);
    if let Ok(c) = serde_json::from_slice::<Config>(data) {
        let _ = c.is_v2();
        let _ = c.unknown_feature();
        if c.chunker.is_valid() {
            let _ = BlobLimits::for_chunker(&c.chunker);
        }
    }
});
