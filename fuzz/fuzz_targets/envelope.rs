//! The sealed envelope (`version | generation | nonce | ciphertext | tag`). The raw input
//! is opened as every kind, with and without a blob id, by the keyed and the raw-key
//! openers and in place (the keyed opener and the in-place one must agree). Then the input
//! is taken as `kind | flip position u16 | plaintext`: sealed with the test keys, it must
//! open to the same plaintext, and with any one bit flipped it must not open.
#![no_main]

use backupd::crypto::aead::{generation_of, open_with};
use backupd::crypto::{self, ObjectKind};
use libfuzzer_sys::fuzz_target;

const KINDS: [ObjectKind; 11] = [
    ObjectKind::Config,
    ObjectKind::Key,
    ObjectKind::DataBlob,
    ObjectKind::TreeBlob,
    ObjectKind::PackHeader,
    ObjectKind::Index,
    ObjectKind::Snapshot,
    ObjectKind::Wal,
    ObjectKind::Lock,
    ObjectKind::Marks,
    ObjectKind::Grant,
];

fuzz_target!(|data: &[u8]| {
    let keys = fuzz_common::test_keys();
    let id = [5u8; 32];
    let _ = generation_of(data);
    for kind in KINDS {
        for blob_id in [None, Some(&id)] {
            let opened = crypto::open(&keys, kind, blob_id, data);
            let _ = open_with(&fuzz_common::RAW_KEY, kind, blob_id, data);
            let mut buf = data.to_vec();
            let in_place =
                crypto::open_in_place(&keys, kind, blob_id, &mut buf).map(|p| p.to_vec());
            assert_eq!(opened, in_place, "both openers agree");
        }
    }
    if data.len() < 3 {
        return;
    }
    let kind = KINDS[data[0] as usize % KINDS.len()];
    let blob_id = (data[0] & 0x80 != 0).then_some(&id);
    let flip = u16::from_le_bytes([data[1], data[2]]) as usize;
    let plain = &data[3..];
    let mut sealed = crypto::seal(&keys, kind, blob_id, plain);
    assert_eq!(generation_of(&sealed), Ok(1));
    assert_eq!(
        crypto::open(&keys, kind, blob_id, &sealed).as_deref(),
        Ok(plain)
    );
    let mut copy = sealed.clone();
    assert_eq!(
        crypto::open_in_place(&keys, kind, blob_id, &mut copy).map(|p| p.to_vec()),
        Ok(plain.to_vec())
    );
    let bit = flip % (sealed.len() * 8);
    sealed[bit / 8] ^= 1 << (bit % 8);
    assert!(crypto::open(&keys, kind, blob_id, &sealed).is_err());
    assert!(crypto::open_in_place(&keys, kind, blob_id, &mut sealed).is_err());
});
