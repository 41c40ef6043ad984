//! WAL objects of the archive: the input is an object's opened plaintext (`version |
//! compression | raw length u64 | payload`), decoded as `wal-fetch` and `restore --at` do,
//! and the file that comes out is scanned as a WAL segment (as restore plans and wal-push
//! compare them). The raw input is also opened as a sealed WAL object (which must fail),
//! and its first line parsed as a streamed piece's name.
#![no_main]

use backupd::crypto::{self, ObjectKind};
use backupd::postgres::{archive, streamed, walscan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = fuzz_common::test_keys();
    let binding = archive::binding_of("1/0000000100000000/000000010000000000000001");
    assert!(crypto::open(&keys, ObjectKind::Wal, Some(&binding), data).is_err());
    if let Some(line) = data.split(|&b| b == b'\n').next() {
        let _ = streamed::parse_piece(&String::from_utf8_lossy(line));
    }
    if let Ok(file) = archive::decode_object(data) {
        let _ = walscan::segment_header(&file);
        if let Some(scan) = walscan::scan_segment(&file) {
            assert!(scan.valid_end <= file.len());
        }
        assert!(archive::same_valid_wal(&file, &file) || walscan::scan_segment(&file).is_none());
    }
});
