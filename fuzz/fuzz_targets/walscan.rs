//! WAL segments as restore reads them (`walscan`): the input is a segment (or the start
//! of one), scanned for its header, record ends, commit times and tablespace creations.
#![no_main]

use backupd::postgres::{archive, walscan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = walscan::segment_header(data);
    if let Some(scan) = walscan::scan_segment(data) {
        assert!(scan.valid_end <= data.len());
        assert!(archive::same_valid_wal(data, data));
    }
});
