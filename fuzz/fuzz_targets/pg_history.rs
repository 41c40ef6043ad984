//! PostgreSQL timeline history files (`TTTTTTTT.history`): the input is `timeline u32 LE |
//! text` (lossy UTF-8), parsed into the path of timelines a recovery follows, and each
//! timeline looked up in it.
#![no_main]

use backupd::postgres::history::{parse_history, span_of};
use backupd::postgres::walname;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let timeline = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let text = String::from_utf8_lossy(&data[4..]);
    let _ = walname::history_timeline(&text);
    if let Ok(path) = parse_history(timeline, &text) {
        assert_eq!(path.last().map(|s| s.timeline), Some(timeline));
        for w in path.windows(2) {
            assert!(w[0].timeline < w[1].timeline);
            assert!(w[0].begin <= w[1].begin);
        }
        for s in &path {
            assert!(span_of(&path, s.timeline).is_some());
        }
    }
});
