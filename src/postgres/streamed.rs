//! Streamed WAL in the archive (`backupd wal-stream`): the segment being written, stored
//! as it grows, and where the stream stands.
//!
//! - **Pieces.** `wal/<system id>/<group>/<segment>.stream-<start>-<end>` (offsets in the
//!   segment, 8 hex digits each) holds the segment's bytes `start..end`, sealed and bound
//!   to its name like any WAL object. A stream always begins at a segment's start, so the
//!   pieces of a segment cover it from 0 without gaps; once they are many, one piece from 0
//!   replaces them. When the segment is complete it is stored under its usual name and its
//!   pieces are removed; a complete segment always wins over pieces left beside it.
//! - **Status.** `wal/<system id>/stream.status`, replaced every few seconds: the
//!   timeline, the position up to which the repository holds every byte, and the latest
//!   time at which that was the server's own end of WAL ("caught up at"). A restore to a
//!   time after the last commit and not after that moment needs no later commit to stop
//!   at: nothing committed in between.
//!
//! Recovery reads a segment missing from the archive from its pieces, zero-filled to the
//! segment size, which PostgreSQL reads as the end of the WAL.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::archive::{ArchiveError, WalArchive};
use super::walname::{is_segment_name, Lsn};

/// Name of the stream status object.
pub const STATUS_FILE: &str = "stream.status";
const PIECE_TAG: &str = ".stream-";

/// Where the stream stands, as the streamer last stored it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStatus {
    /// Timeline streamed.
    pub timeline: u32,
    /// The repository holds every byte of WAL before this position on `timeline`.
    pub durable: Lsn,
    /// The latest time at which `durable` was at or past the server's end of WAL.
    pub caught_up_at: Option<DateTime<Utc>>,
    /// When the status was written.
    pub updated_at: DateTime<Utc>,
    /// The replication slot streamed from.
    pub slot: String,
    /// The segment size of the cluster.
    pub segment_size: u64,
}

/// A piece's name.
pub fn piece_name(segment: &str, start: u64, end: u64) -> String {
    format!("{segment}{PIECE_TAG}{start:08X}-{end:08X}")
}

/// A piece name's segment, start and end.
pub fn parse_piece(name: &str) -> Option<(&str, u64, u64)> {
    let (seg, range) = name.split_once(PIECE_TAG)?;
    let (a, b) = range.split_once('-')?;
    if !is_segment_name(seg) || a.len() != 8 || b.len() != 8 {
        return None;
    }
    let start = u64::from_str_radix(a, 16).ok()?;
    let end = u64::from_str_radix(b, 16).ok()?;
    (start < end).then_some((seg, start, end))
}

/// The pieces of `segment` among a group's file names, as (start, end, name), by start.
pub fn pieces_of<'a>(names: &'a [String], segment: &str) -> Vec<(u64, u64, &'a str)> {
    let mut v: Vec<(u64, u64, &str)> = names
        .iter()
        .filter_map(|n| {
            parse_piece(n)
                .filter(|(s, _, _)| *s == segment)
                .map(|(_, a, b)| (a, b, n.as_str()))
        })
        .collect();
    v.sort();
    v
}

/// How far pieces sorted by start cover a segment from 0 without a gap.
pub fn covered(pieces: &[(u64, u64, &str)]) -> u64 {
    let mut end = 0;
    for &(a, b, _) in pieces {
        if a > end {
            break;
        }
        end = end.max(b);
    }
    end
}

impl WalArchive<'_> {
    /// Stores bytes `start..start + bytes.len()` of `segment` as a piece.
    ///
    /// # Errors
    /// The store failing.
    pub fn put_piece(
        &self,
        segment: &str,
        start: u64,
        bytes: &[u8],
    ) -> Result<String, ArchiveError> {
        let name = piece_name(segment, start, start + bytes.len() as u64);
        // A streamer restarted after a kill may write a piece it had written: same bytes.
        self.put_own(&name, bytes, true)?;
        Ok(name)
    }

    /// Removes pieces by name.
    ///
    /// # Errors
    /// The store failing.
    pub fn remove_pieces(&self, names: &[String]) -> Result<(), ArchiveError> {
        for n in names {
            self.delete_own(n)?;
        }
        Ok(())
    }

    /// The names of the pieces of `segment` in the archive.
    ///
    /// # Errors
    /// The store failing.
    pub fn piece_names(&self, segment: &str) -> Result<Vec<String>, ArchiveError> {
        let Some(group) = segment.get(..16) else {
            return Ok(vec![]);
        };
        let names = self.group(group)?;
        Ok(pieces_of(&names, segment)
            .into_iter()
            .map(|(_, _, n)| n.to_string())
            .collect())
    }

    /// The streamed bytes of `segment` from its start, as far as its pieces reach without
    /// a gap, or `None` when it has none from 0. `names` is its group's listing.
    ///
    /// # Errors
    /// A damaged piece (a piece whose bytes disagree with an overlapping one is damaged)
    /// or the store failing.
    pub fn streamed_prefix(
        &self,
        segment: &str,
        names: &[String],
    ) -> Result<Option<Vec<u8>>, ArchiveError> {
        let pieces = pieces_of(names, segment);
        let end = covered(&pieces);
        if end == 0 {
            return Ok(None);
        }
        let mut out: Vec<u8> = Vec::with_capacity(end as usize);
        for (a, b, name) in pieces {
            if a > out.len() as u64 {
                break;
            }
            if b <= out.len() as u64 {
                continue;
            }
            let bytes = self.get_own(name)?.ok_or_else(|| ArchiveError::PieceGone {
                object: name.to_string(),
            })?;
            if bytes.len() as u64 != b - a {
                return Err(ArchiveError::Corrupt {
                    object: name.to_string(),
                    why: format!("{} bytes where its name says {}", bytes.len(), b - a),
                });
            }
            let skip = (out.len() as u64 - a) as usize;
            if out[a as usize..] != bytes[..skip] {
                return Err(ArchiveError::Corrupt {
                    object: name.to_string(),
                    why: "its bytes differ from an overlapping piece's".into(),
                });
            }
            out.extend_from_slice(&bytes[skip..]);
        }
        Ok(Some(out))
    }

    /// A segment as recovery reads it: the archived one, else its streamed bytes zero-filled
    /// to `segment_size` (`true`: streamed), else `None`.
    ///
    /// # Errors
    /// As [`WalArchive::fetch`] and [`WalArchive::streamed_prefix`].
    pub fn fetch_for_recovery(
        &self,
        file: &str,
        segment_size: u64,
    ) -> Result<Option<(Vec<u8>, bool)>, ArchiveError> {
        // A streamer completing the segment meanwhile removes its pieces after storing it
        // whole: a piece gone between the listing and its read means "look again".
        let mut attempt = 0;
        loop {
            if let Some(b) = self.fetch(file)? {
                return Ok(Some((b, false)));
            }
            if !is_segment_name(file) {
                return Ok(None);
            }
            let names = self.group(&file[..16])?;
            match self.streamed_prefix(file, &names) {
                Ok(got) => {
                    return Ok(got.map(|mut b| {
                        b.resize(segment_size as usize, 0);
                        (b, true)
                    }))
                }
                Err(ArchiveError::PieceGone { .. }) if attempt < 3 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The stream status, if a streamer ever wrote one.
    ///
    /// # Errors
    /// A damaged status object or the store failing.
    pub fn stream_status(&self) -> Result<Option<StreamStatus>, ArchiveError> {
        let Some(b) = self.get_own(STATUS_FILE)? else {
            return Ok(None);
        };
        serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ArchiveError::Corrupt {
                object: STATUS_FILE.into(),
                why: e.to_string(),
            })
    }

    /// Replaces the stream status.
    ///
    /// # Errors
    /// The store failing.
    pub fn set_stream_status(&self, s: &StreamStatus) -> Result<(), ArchiveError> {
        let b = serde_json::to_vec(s).expect("status serializes");
        self.put_own(STATUS_FILE, &b, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: &str = "000000010000000000000003";

    #[test]
    fn piece_names_round_trip_and_refuse_what_is_not_one() {
        let n = piece_name(SEG, 0x2000, 0x9000);
        assert_eq!(n, "000000010000000000000003.stream-00002000-00009000");
        assert_eq!(parse_piece(&n), Some((SEG, 0x2000, 0x9000)));
        assert_eq!(parse_piece("000000010000000000000003.partial"), None);
        assert_eq!(parse_piece(&piece_name(SEG, 5, 5)), None, "empty");
        assert_eq!(parse_piece("nope.stream-00000000-00000010"), None);
    }

    #[test]
    fn coverage_stops_at_the_first_gap() {
        let names: Vec<String> = vec![
            piece_name(SEG, 0, 100),
            piece_name(SEG, 50, 300),
            piece_name(SEG, 400, 500),
            piece_name("000000010000000000000004", 0, 900),
        ];
        let p = pieces_of(&names, SEG);
        assert_eq!(p.len(), 3);
        assert_eq!(covered(&p), 300);
        assert_eq!(covered(&pieces_of(&names[2..3], SEG)), 0, "none from 0");
    }
}
