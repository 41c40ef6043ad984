//! What a PostgreSQL base backup's snapshot records: `backup_label` and `tablespace_map`
//! as `pg_backup_stop()` returned them, the cluster, the timeline, the WAL range and the
//! segment size (`PostgresMeta`, the snapshot's `postgres` object; backupd keeps the label
//! verbatim and reads its WAL range from these fields). The input is that object's JSON;
//! a decoded one goes through what prune and `restore --at` compute from it (the segments
//! of its start and stop LSN, their names). Every whitespace-separated word of the input
//! is also parsed as an LSN and as a WAL file name.
#![no_main]

use backupd::postgres::walname::{self, Lsn, Segment};
use backupd::repo::PostgresMeta;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for word in text.split_whitespace().take(64) {
        if let Ok(lsn) = word.parse::<Lsn>() {
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
        let _ = walname::is_archivable_name(word);
        let _ = walname::group_of(word);
        let _ = walname::history_timeline(word);
        if let Some(s) = Segment::parse(word, 16 << 20) {
            assert_eq!(Segment::parse(&s.name(16 << 20), 16 << 20), Some(s));
        }
    }
    if let Ok(m) = serde_json::from_slice::<PostgresMeta>(data) {
        let seg = m.wal_segment_size;
        let first = Segment::of(m.timeline, m.start_lsn, seg);
        let last = Segment::of(m.timeline, m.stop_lsn, seg);
        let _ = first.name(seg);
        let _ = last.name(seg);
        let _ = first.start(seg);
        let _ = first.next();
        let _ = m.backup_label.lines().count();
        let _ = m.tablespace_map.lines().count();
    }
});
