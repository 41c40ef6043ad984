//! Reads just enough of a WAL segment to plan a point-in-time restore: the system
//! identifier in its long page header, the timestamps of its transaction commit and
//! abort records (the only records `recovery_target_time` looks at), and its
//! `CREATE TABLESPACE` records (whose replay writes outside the data directory).
//!
//! The layout is PostgreSQL's (`access/xlog_internal.h`, `access/xlogrecord.h`): 8 KiB
//! pages, each with a 24-byte header (40 at the start of a segment) carrying how many bytes
//! of a record continue from the previous page; records are 8-byte aligned, start with a
//! 24-byte header (total length, xid, prev, info, resource manager, CRC), then block
//! headers, then block data, then the record's main data. Commit and abort records put the
//! transaction time (microseconds since 2000-01-01 UTC) first in their main data.

use chrono::{DateTime, TimeZone, Utc};

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const SHORT_HEADER: usize = 24;
const LONG_HEADER: usize = 40;
const RECORD_HEADER: usize = 24;
const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const RM_TBLSPC_ID: u8 = 5;
const XLOG_TBLSPC_CREATE: u8 = 0x00;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// What the long header of a segment's first page says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// Segment size in bytes.
    pub segment_size: u32,
    /// WAL page size in bytes.
    pub page_size: u32,
    /// Timeline of the first page.
    pub timeline: u32,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// Reads the long page header at the start of a segment; `None` if it is not one.
pub fn segment_header(seg: &[u8]) -> Option<SegmentHeader> {
    let info = u16_at(seg, 2)?;
    if info & XLP_LONG_HEADER == 0 {
        return None;
    }
    let h = SegmentHeader {
        timeline: u32_at(seg, 4)?,
        system_identifier: u64_at(seg, 24)?,
        segment_size: u32_at(seg, 32)?,
        page_size: u32_at(seg, 36)?,
    };
    let plausible = h.page_size.is_power_of_two()
        && (1024..=65536).contains(&h.page_size)
        && h.segment_size.is_power_of_two()
        && h.segment_size >= h.page_size;
    plausible.then_some(h)
}

/// A PostgreSQL timestamp as UTC.
pub fn pg_time(us_since_2000: i64) -> Option<DateTime<Utc>> {
    let unix_us = us_since_2000.checked_add(PG_EPOCH_OFFSET_US)?;
    Utc.timestamp_micros(unix_us).single()
}

/// What one segment says, in WAL order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SegmentScan {
    /// Time of each commit or abort record that starts in the segment.
    pub xact_times: Vec<DateTime<Utc>>,
    /// Each `CREATE TABLESPACE` record: (tablespace oid, location).
    pub tablespaces_created: Vec<(u32, String)>,
    /// True when the scan reached an `XLOG_SWITCH` record or the end of valid records
    /// before the end of the segment.
    pub ended_early: bool,
    /// Where the segment's WAL ends: just after an `XLOG_SWITCH` record, at the first
    /// position that holds no record, else the segment's size. What follows is not WAL
    /// (a switched segment's tail, a recycled file's old bytes, zeros).
    pub valid_end: usize,
}

/// Scans a whole segment. Records continuing from the previous segment are skipped;
/// records running past its end are not reported (they start here but their main data,
/// which holds the time, is in the next segment).
pub fn scan_segment(seg: &[u8]) -> Option<SegmentScan> {
    let hdr = segment_header(seg)?;
    let page = hdr.page_size as usize;
    if seg.len() != hdr.segment_size as usize {
        return None;
    }
    let mut out = SegmentScan {
        valid_end: seg.len(),
        ..SegmentScan::default()
    };
    // One buffer for every record's bytes, sized by records that are really there.
    let mut head = Vec::with_capacity(RECORD_HEADER);
    let mut record = Vec::new();
    // Position of the first record: after the header and any continuation data.
    let rem = u32_at(seg, 16)? as usize;
    let info = u16_at(seg, 2)?;
    let mut pos = LONG_HEADER;
    if info & XLP_FIRST_IS_CONTRECORD != 0 {
        pos = match skip_bytes(seg, pos, rem, page) {
            Some(p) => p,
            None => return Some(out),
        };
    }
    loop {
        pos = align8(pos);
        if pos.is_multiple_of(page) {
            if pos >= seg.len() {
                return Some(out);
            }
            // A record never starts inside a page header; a page that begins with the
            // tail of a record we could not follow has nothing more for us.
            let pinfo = u16_at(seg, pos + 2)?;
            let hlen = if pinfo & XLP_LONG_HEADER != 0 {
                LONG_HEADER
            } else {
                SHORT_HEADER
            };
            if pinfo & XLP_FIRST_IS_CONTRECORD != 0 {
                let rem = u32_at(seg, pos + 16)? as usize;
                pos = match skip_bytes(seg, pos + hlen, rem, page) {
                    Some(p) => p,
                    None => return Some(out),
                };
                continue;
            }
            pos += hlen;
        }
        if pos >= seg.len() {
            return Some(out);
        }
        // Gather the record header (it may cross a page boundary).
        if gather(seg, pos, RECORD_HEADER, page, &mut head).is_none() {
            return Some(out);
        }
        let tot_len = u32::from_le_bytes(head[0..4].try_into().ok()?) as usize;
        if !(RECORD_HEADER..=1 << 30).contains(&tot_len) {
            out.ended_early = true;
            out.valid_end = pos;
            return Some(out);
        }
        let rmid = head[17];
        let xl_info = head[16];
        if gather(seg, pos, tot_len, page, &mut record).is_none() {
            // Continues into the next segment.
            return Some(out);
        }
        if rmid == RM_XACT_ID {
            let op = xl_info & XLOG_XACT_OPMASK;
            if matches!(
                op,
                XLOG_XACT_COMMIT
                    | XLOG_XACT_ABORT
                    | XLOG_XACT_COMMIT_PREPARED
                    | XLOG_XACT_ABORT_PREPARED
            ) {
                if let Some(t) = main_data(&record).and_then(|m| u64_at(m, 0)) {
                    if let Some(t) = pg_time(t as i64) {
                        out.xact_times.push(t);
                    }
                }
            }
        }
        if rmid == RM_TBLSPC_ID && xl_info & 0xF0 == XLOG_TBLSPC_CREATE {
            // xl_tblspc_create_rec: the oid, then the location, NUL-terminated.
            if let Some(m) = main_data(&record) {
                if let Some(oid) = u32_at(m, 0) {
                    let path = &m[4..];
                    let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                    out.tablespaces_created
                        .push((oid, String::from_utf8_lossy(&path[..end]).into_owned()));
                }
            }
        }
        if rmid == RM_XLOG_ID && xl_info & 0xF0 == XLOG_SWITCH {
            out.ended_early = true;
            out.valid_end = advance(pos, tot_len, page)
                .unwrap_or(seg.len())
                .min(seg.len());
            return Some(out);
        }
        pos = advance(pos, tot_len, page)?;
    }
}

fn align8(p: usize) -> usize {
    (p + 7) & !7
}

/// Bytes of page data from `pos` to the end of its page.
fn room(pos: usize, page: usize) -> usize {
    page - pos % page
}

/// The position after `len` bytes of record data starting at `pos`, skipping the short
/// page headers in between; `None` past the end of the segment.
fn advance(mut pos: usize, mut len: usize, page: usize) -> Option<usize> {
    while len > 0 {
        if pos.is_multiple_of(page) {
            pos += SHORT_HEADER;
        }
        let n = len.min(room(pos, page));
        pos += n;
        len -= n;
    }
    Some(pos)
}

/// Skips `len` bytes of continuation data that start right at `pos` (after a page
/// header); `None` when they run past the segment.
fn skip_bytes(seg: &[u8], pos: usize, len: usize, page: usize) -> Option<usize> {
    let end = advance(pos, len, page)?;
    (end <= seg.len()).then_some(end)
}

/// Copies `len` bytes of record data starting at `pos` into `out` (cleared, its allocation
/// reused); `None` past the segment's end.
fn gather(seg: &[u8], mut pos: usize, len: usize, page: usize, out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    // `len` comes from the record header: the record cannot hold more than what is left
    // of the segment, so no more is reserved (a longer one runs into the next segment, and
    // the copy below stops at the end of this one).
    out.reserve(len.min(seg.len().saturating_sub(pos)));
    while out.len() < len {
        if pos.is_multiple_of(page) {
            pos += SHORT_HEADER;
        }
        let n = (len - out.len()).min(room(pos, page));
        out.extend_from_slice(seg.get(pos..pos + n)?);
        pos += n;
    }
    Some(())
}

/// The main data of a whole record: its last `main_len` bytes, where `main_len` comes
/// from the data header that follows the block headers.
fn main_data(rec: &[u8]) -> Option<&[u8]> {
    const XLR_MAX_BLOCK_ID: u8 = 32;
    const DATA_SHORT: u8 = 255;
    const DATA_LONG: u8 = 254;
    const ORIGIN: u8 = 253;
    const TOPLEVEL_XID: u8 = 252;
    const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
    const BKPBLOCK_SAME_REL: u8 = 0x80;
    const BKPIMAGE_HAS_HOLE: u8 = 0x01;
    const BKPIMAGE_COMPRESSED: u8 = 0x04 | 0x08 | 0x10;
    let mut p = RECORD_HEADER;
    while p < rec.len() {
        let id = rec[p];
        p += 1;
        match id {
            DATA_SHORT => {
                let n = *rec.get(p)? as usize;
                return rec.len().checked_sub(n).map(|s| &rec[s..]);
            }
            DATA_LONG => {
                let n = u32_at(rec, p)? as usize;
                return rec.len().checked_sub(n).map(|s| &rec[s..]);
            }
            ORIGIN => p += 2,
            TOPLEVEL_XID => p += 4,
            id if id <= XLR_MAX_BLOCK_ID => {
                let fork_flags = *rec.get(p)?;
                p += 1 + 2; // fork flags, data length
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let bimg_info = *rec.get(p + 4)?;
                    p += 5;
                    if bimg_info & BKPIMAGE_HAS_HOLE != 0 && bimg_info & BKPIMAGE_COMPRESSED != 0 {
                        p += 2;
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    p += 12;
                }
                p += 4;
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a one-page-per-record segment by hand: a commit record with a known time.
    fn segment_with(records: &[Vec<u8>], page: usize, size: usize) -> Vec<u8> {
        let mut seg = vec![0u8; size];
        seg[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        seg[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        seg[4..8].copy_from_slice(&1u32.to_le_bytes());
        seg[24..32].copy_from_slice(&7u64.to_le_bytes());
        seg[32..36].copy_from_slice(&(size as u32).to_le_bytes());
        seg[36..40].copy_from_slice(&(page as u32).to_le_bytes());
        let mut pos = LONG_HEADER;
        for r in records {
            pos = align8(pos);
            let mut written = 0;
            while written < r.len() {
                if pos.is_multiple_of(page) {
                    let rem = (r.len() - written) as u32;
                    seg[pos + 2..pos + 4].copy_from_slice(&XLP_FIRST_IS_CONTRECORD.to_le_bytes());
                    seg[pos + 16..pos + 20].copy_from_slice(&rem.to_le_bytes());
                    pos += SHORT_HEADER;
                }
                let n = (r.len() - written).min(room(pos, page));
                seg[pos..pos + n].copy_from_slice(&r[written..written + n]);
                pos += n;
                written += n;
            }
        }
        seg
    }

    /// A record of resource manager `rmid` with `info` and this main data.
    fn record(rmid: u8, info: u8, main: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; RECORD_HEADER];
        r.push(255);
        r.push(main.len() as u8);
        r.extend_from_slice(main);
        let len = r.len() as u32;
        r[0..4].copy_from_slice(&len.to_le_bytes());
        r[16] = info;
        r[17] = rmid;
        r
    }

    fn commit(time_us: i64, pad: usize) -> Vec<u8> {
        let main: Vec<u8> = time_us
            .to_le_bytes()
            .into_iter()
            .chain(std::iter::repeat_n(0, pad))
            .collect();
        record(RM_XACT_ID, XLOG_XACT_COMMIT, &main)
    }

    fn tablespace_create(oid: u32, path: &str) -> Vec<u8> {
        let mut main = oid.to_le_bytes().to_vec();
        main.extend_from_slice(path.as_bytes());
        main.push(0);
        record(RM_TBLSPC_ID, XLOG_TBLSPC_CREATE, &main)
    }

    #[test]
    fn finds_tablespace_creation_records() {
        let t0 = 815_000_000_000_000i64;
        let recs = vec![
            commit(t0, 10),
            tablespace_create(16390, "/srv/pg/ts_fast"),
            commit(t0 + 1, 10),
        ];
        let seg = segment_with(&recs, 1024, 16384);
        let scan = scan_segment(&seg).unwrap();
        assert_eq!(
            scan.tablespaces_created,
            [(16390, "/srv/pg/ts_fast".to_string())]
        );
        assert_eq!(scan.xact_times.len(), 2);
    }

    /// The times and tablespaces pg_waldump printed for the committed real segment.
    fn waldump_says(text: &str) -> (Vec<DateTime<Utc>>, Vec<(u32, String)>) {
        let mut times = vec![];
        let mut tablespaces = vec![];
        for line in text.lines() {
            let desc = line.split_once("desc: ").expect("a desc field").1;
            if let Some(rest) = desc
                .strip_prefix("COMMIT ")
                .or_else(|| desc.strip_prefix("ABORT "))
            {
                let ts = rest.split_once(" UTC").expect("a time in UTC").0;
                let t = chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.f")
                    .expect("pg_waldump's time format");
                times.push(t.and_utc());
            } else if let Some(rest) = desc.strip_prefix("CREATE ") {
                let (oid, loc) = rest.split_once(' ').unwrap();
                tablespaces.push((oid.parse().unwrap(), loc.trim_matches('"').to_string()));
            }
        }
        (times, tablespaces)
    }

    #[test]
    fn a_real_segment_gives_the_times_and_tablespaces_pg_waldump_prints() {
        // Written by PostgreSQL 15 (tests/fixtures/make-wal-fixture.sh): 40 commits, an
        // abort, a CREATE TABLESPACE, then pg_switch_wal.
        let seg = zstd::decode_all(
            &include_bytes!("../../tests/fixtures/wal/000000010000000000000002.zst")[..],
        )
        .unwrap();
        let (want_times, want_ts) = waldump_says(include_str!(
            "../../tests/fixtures/wal/000000010000000000000002.waldump"
        ));
        assert!(want_times.len() >= 42, "{}", want_times.len());
        let h = segment_header(&seg).unwrap();
        assert_eq!(
            (h.segment_size, h.page_size, h.timeline),
            (16 << 20, 8192, 1)
        );
        let scan = scan_segment(&seg).unwrap();
        assert_eq!(scan.xact_times, want_times);
        assert_eq!(scan.tablespaces_created, want_ts);
        assert!(scan.ended_early, "the segment was switched");
        assert!(scan.valid_end < seg.len() && scan.valid_end > 0x224350);
        assert!(
            seg[scan.valid_end..].iter().all(|&b| b == 0),
            "zeros after the switch"
        );
    }

    #[test]
    fn finds_commit_times_across_page_boundaries() {
        let t0 = 815_000_000_000_000i64; // 2025-10-28
        let recs: Vec<Vec<u8>> = (0..40).map(|i| commit(t0 + i, 200)).collect();
        let seg = segment_with(&recs, 1024, 16384);
        let h = segment_header(&seg).unwrap();
        assert_eq!(h.system_identifier, 7);
        let times = scan_segment(&seg).unwrap();
        assert_eq!(times.xact_times.len(), 40);
        assert_eq!(times.xact_times[39], pg_time(t0 + 39).unwrap());
        assert!(times.ended_early);
    }

    #[test]
    fn a_record_length_past_the_segment_sizes_no_buffer() {
        // A record header claiming 1 GiB (PostgreSQL's own record limit) in a 16 KiB
        // segment: it would continue into the next segment, so it is not gathered, and no
        // buffer of its claimed size is reserved.
        let t0 = 815_000_000_000_000i64;
        let mut big = commit(t0, 0);
        big[0..4].copy_from_slice(&((1u32 << 30) - 8).to_le_bytes());
        let seg = segment_with(&[commit(t0, 0), big], 1024, 16384);
        let times = scan_segment(&seg).unwrap();
        assert_eq!(times.xact_times, [pg_time(t0).unwrap()]);
        let mut buf = Vec::new();
        assert!(gather(&seg, LONG_HEADER, (1 << 30) - 8, 1024, &mut buf).is_none());
        assert!(buf.capacity() <= seg.len(), "{}", buf.capacity());
        // Every length a header can hold, at every position.
        for pos in [LONG_HEADER, 1000, 1024 + SHORT_HEADER, 16380] {
            for len in [seg.len(), 1 << 20, u32::MAX as usize] {
                assert!(gather(&seg, pos, len, 1024, &mut buf).is_none());
                assert!(
                    buf.capacity() <= seg.len(),
                    "{pos} {len}: {}",
                    buf.capacity()
                );
            }
        }
    }

    #[test]
    fn rejects_what_is_not_a_segment() {
        assert_eq!(scan_segment(&[0u8; 100]), None);
        assert_eq!(segment_header(b"short"), None);
    }
}
