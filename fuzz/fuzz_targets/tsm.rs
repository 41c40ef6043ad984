//! A TSM file as a shard's backup stream hands it over, fed to the counter in pieces
//! whose sizes the first byte picks: it must never panic, and whether and what it counts
//! must not depend on how the file was cut.
#![no_main]

use backupd::source::influx::tsm::{shard_counts, TsmCounter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, file)) = data.split_first() else {
        return;
    };
    let count = |step: usize| {
        let mut c = TsmCounter::new(file.len() as u64);
        for p in file.chunks(step.max(1)) {
            c.feed(p);
        }
        c.finish()
    };
    // Counted or not, and what, must not depend on the pieces (the reason given for not
    // counting may: a short entry is seen at another moment).
    let whole = count(file.len()).ok();
    let cut = count(usize::from(piece) + 1).ok();
    assert_eq!(whole, cut, "counted differently when fed in pieces");
    if let Some(t) = whole {
        let _ = shard_counts(&[t.clone(), t]);
    }
});
