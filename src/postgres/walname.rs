//! PostgreSQL's WAL vocabulary: log sequence numbers, timelines, and the file names of the
//! archive (segments `TTTTTTTTXXXXXXXXYYYYYYYY`, `TTTTTTTT.history`, backup history files
//! `<segment>.<offset>.backup`, and `.partial` segments left by a promotion).

use std::fmt;
use std::str::FromStr;

/// A WAL position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = String;

    /// Parses PostgreSQL's `X/Y` notation.
    fn from_str(s: &str) -> Result<Self, String> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an LSN (X/Y)"))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| format!("{s:?} is not an LSN"))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| format!("{s:?} is not an LSN"))?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One WAL segment: timeline and segment number, for a given segment size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    /// Timeline.
    pub timeline: u32,
    /// Segment number (LSN / segment size).
    pub number: u64,
}

impl Segment {
    /// The segment holding `lsn` on `timeline`.
    pub fn of(timeline: u32, lsn: Lsn, seg_size: u64) -> Self {
        Segment {
            timeline,
            number: lsn.0 / seg_size,
        }
    }

    /// Its file name.
    pub fn name(&self, seg_size: u64) -> String {
        let per_id = 0x1_0000_0000u64 / seg_size;
        format!(
            "{:08X}{:08X}{:08X}",
            self.timeline,
            self.number / per_id,
            self.number % per_id
        )
    }

    /// Parses a 24-digit segment name.
    pub fn parse(name: &str, seg_size: u64) -> Option<Self> {
        if !is_segment_name(name) {
            return None;
        }
        let tli = u32::from_str_radix(&name[..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_id = 0x1_0000_0000u64 / seg_size;
        if seg >= per_id {
            return None;
        }
        Some(Segment {
            timeline: tli,
            number: log * per_id + seg,
        })
    }

    /// First LSN in the segment.
    pub fn start(&self, seg_size: u64) -> Lsn {
        Lsn(self.number * seg_size)
    }

    /// The next segment on the same timeline.
    pub fn next(&self) -> Self {
        Segment {
            timeline: self.timeline,
            number: self.number + 1,
        }
    }
}

fn is_hex_upper(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// `TTTTTTTTXXXXXXXXYYYYYYYY`.
pub fn is_segment_name(name: &str) -> bool {
    name.len() == 24 && is_hex_upper(name)
}

/// `TTTTTTTT.history`.
pub fn is_history_name(name: &str) -> bool {
    name.len() == 16 && name.ends_with(".history") && is_hex_upper(&name[..8])
}

/// The timeline of a history file name.
pub fn history_timeline(name: &str) -> Option<u32> {
    is_history_name(name)
        .then(|| u32::from_str_radix(&name[..8], 16).ok())
        .flatten()
}

/// The history file name of a timeline.
pub fn history_name(timeline: u32) -> String {
    format!("{timeline:08X}.history")
}

/// A file name the archive accepts: a segment, a history file, a backup history file
/// (`<segment>.<8 hex>.backup`) or a partial segment (`<segment>.partial`).
pub fn is_archivable_name(name: &str) -> bool {
    if is_segment_name(name) || is_history_name(name) {
        return true;
    }
    if let Some(seg) = name.strip_suffix(".partial") {
        return is_segment_name(seg);
    }
    if let Some(rest) = name.strip_suffix(".backup") {
        if let Some((seg, off)) = rest.split_once('.') {
            return is_segment_name(seg) && off.len() == 8 && is_hex_upper(off);
        }
    }
    false
}

/// The archive folder of a file: segments and their `.backup`/`.partial` files go in a
/// folder per 256 segments (the first 16 digits: timeline and log id), so planning a
/// restore lists only the folders it needs; history files sit at the top.
pub fn group_of(name: &str) -> Option<&str> {
    if is_history_name(name) {
        None
    } else {
        name.get(..16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_classify() {
        let seg = 16 * 1024 * 1024;
        let s = Segment::of(2, "1/A009F18".parse().unwrap(), seg);
        assert_eq!(s.name(seg), "00000002000000010000000A");
        assert_eq!(Segment::parse("00000002000000010000000A", seg), Some(s));
        assert_eq!(s.next().name(seg), "00000002000000010000000B");
        let last = Segment::parse("0000000100000001000000FF", seg).unwrap();
        assert_eq!(last.next().name(seg), "000000010000000200000000");
        assert_eq!(Lsn(0x1_0A00_9F18).to_string(), "1/A009F18");
        assert!(is_archivable_name("00000002.history"));
        assert!(is_archivable_name(
            "000000010000000000000002.00000028.backup"
        ));
        assert!(is_archivable_name("000000010000000000000003.partial"));
        assert!(!is_archivable_name("00000001000000000000000g"));
        assert!(!is_archivable_name("../etc/passwd"));
        assert_eq!(
            group_of("000000010000000000000003"),
            Some("0000000100000000")
        );
        assert_eq!(group_of("00000002.history"), None);
        assert_eq!(history_timeline("0000000A.history"), Some(10));
        // 64 MiB segments: 64 per log id.
        let big = 64 * 1024 * 1024;
        assert_eq!(Segment::parse("000000010000000000000040", big), None);
        assert_eq!(
            Segment::parse("00000001000000010000003F", big)
                .unwrap()
                .number,
            64 + 63
        );
    }
}
