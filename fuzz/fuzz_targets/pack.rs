//! Pack header and trailer. The input is `data_end u32 LE | header plaintext`: the
//! plaintext goes to the header decoder directly, and sealed with the test keys behind
//! that many blob bytes (at most 64 KiB) through the whole reader, trailer included; the
//! raw input is also read as a whole pack (trailer, then a seal that must fail).
#![no_main]

use backupd::crypto::{self, ObjectKind};
use backupd::repo::pack;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = fuzz_common::test_keys();
    let _ = pack::read_header(&keys, "fuzz", data);
    if data.len() < 4 {
        return;
    }
    let data_end = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let plain = &data[4..];
    if let Ok(entries) = pack::decode_header("fuzz", plain, data_end as u64) {
        for e in &entries {
            assert!(e.offset as u64 + e.length as u64 <= data_end as u64);
        }
    }
    let mut whole = vec![0u8; (data_end as usize).min(64 << 10)];
    let sealed = crypto::seal(&keys, ObjectKind::PackHeader, None, plain);
    whole.extend_from_slice(&sealed);
    whole.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    let direct = pack::decode_header("fuzz", plain, (data_end as u64).min(64 << 10));
    let read = pack::read_header(&keys, "fuzz", &whole);
    assert_eq!(direct.ok(), read.ok());
});
