//! Snapshots: the input is a snapshot's plaintext (JSON), decoded as `snapshots` and
//! restore do, with the feature check and the trees it names; the raw input is also opened
//! as a sealed snapshot (which must fail).
#![no_main]

use backupd::crypto::{self, ObjectKind};
use backupd::repo::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = fuzz_common::test_keys();
    let _ = crypto::open(&keys, ObjectKind::Snapshot, None, data);
    if let Ok(s) = serde_json::from_slice::<Snapshot>(data) {
        let _ = s.unknown_feature();
        let _ = s.trees().count();
        let again = serde_json::to_vec(&s).expect("a snapshot serializes");
        let _ = serde_json::from_slice::<Snapshot>(&again);
    }
});
