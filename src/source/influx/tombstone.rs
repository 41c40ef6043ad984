//! TSM tombstone files (`<gen>-<seq>.tombstone`, `tsdb/engine/tsm1/tombstone.go`): the
//! deletions recorded against one TSM file and not yet compacted away. The restore
//! protocol installs only `*.tsm` files, so a restore replays these as InfluxQL `DELETE`
//! statements instead (see `restore::influx` for the order that keeps that exact).
//!
//! Formats: v1 is newline-separated keys (whole-time deletes); v2 (`0x00001502`) binary
//! entries `[u32 key length][key][i64 min][i64 max]`; v3 (`0x00001503`) the same in one
//! gzip stream; v4 (`0x00001504`) the same in consecutive gzip members. A key is a series
//! key, `#!~#`, and a field.

use std::io::Read;

use flate2::read::MultiGzDecoder;

const V2: u32 = 0x1502;
const V3: u32 = 0x1503;
const V4: u32 = 0x1504;
/// The separator of series key and field in a TSM key.
const FIELD_SEPARATOR: &[u8] = b"#!~#";
/// The longest key read (InfluxDB limits series keys to 64 KiB).
const MAX_KEY: usize = 1 << 20;

/// One deletion: a series (and field) and a closed time range in Unix nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deletion {
    /// The series key (`measurement,tag=value,...`, escaped as in line protocol).
    pub series: Vec<u8>,
    /// First deleted time.
    pub min: i64,
    /// Last deleted time.
    pub max: i64,
}

/// Decodes a tombstone file's deletions, one per series and range (fields merged: every
/// 1.x delete removes all fields of a series).
///
/// # Errors
/// A file that is not a tombstone file of a known version, or is cut short.
pub fn parse(b: &[u8]) -> Result<Vec<Deletion>, String> {
    let mut out = vec![];
    if b.len() < 4 {
        return Ok(out);
    }
    let header = u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
    match header {
        V2 => read_entries(&b[4..], &mut out)?,
        V3 | V4 => {
            let mut plain = vec![];
            MultiGzDecoder::new(&b[4..])
                .take(1 << 30)
                .read_to_end(&mut plain)
                .map_err(|e| format!("tombstone: {e}"))?;
            read_entries(&plain, &mut out)?;
        }
        _ => {
            for line in b.split(|&c| c == b'\n').filter(|l| !l.is_empty()) {
                out.push(deletion(line, i64::MIN, i64::MAX));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn deletion(key: &[u8], min: i64, max: i64) -> Deletion {
    let series = match key
        .windows(FIELD_SEPARATOR.len())
        .position(|w| w == FIELD_SEPARATOR)
    {
        Some(i) => &key[..i],
        None => key,
    };
    Deletion {
        series: series.to_vec(),
        min,
        max,
    }
}

fn read_entries(mut b: &[u8], out: &mut Vec<Deletion>) -> Result<(), String> {
    let short = || "tombstone: an entry is cut short".to_string();
    while !b.is_empty() {
        if b.len() < 4 {
            return Err(short());
        }
        let n = u32::from_be_bytes(b[..4].try_into().expect("4 bytes")) as usize;
        if n > MAX_KEY {
            return Err(format!("tombstone: a key of {n} bytes"));
        }
        if b.len() < 4 + n + 16 {
            return Err(short());
        }
        let key = &b[4..4 + n];
        let min = i64::from_be_bytes(b[4 + n..12 + n].try_into().expect("8 bytes"));
        let max = i64::from_be_bytes(b[12 + n..20 + n].try_into().expect("8 bytes"));
        out.push(deletion(key, min, max));
        b = &b[20 + n..];
    }
    Ok(())
}

/// A series key split into its measurement and tags, unescaped.
#[derive(Debug, PartialEq, Eq)]
pub struct SeriesKey {
    /// Measurement.
    pub measurement: String,
    /// Tag key and value pairs.
    pub tags: Vec<(String, String)>,
}

/// Splits a series key (`m,k=v,...`, with `\,`, `\=` and `\ ` escapes).
///
/// # Errors
/// A key that is not UTF-8 or has a tag without `=`.
pub fn split_series(key: &[u8]) -> Result<SeriesKey, String> {
    let s = std::str::from_utf8(key).map_err(|_| "a series key that is not UTF-8".to_string())?;
    let parts = split_unescaped(s, ',');
    let mut it = parts.into_iter();
    let measurement = unescape(&it.next().unwrap_or_default());
    let mut tags = vec![];
    for t in it {
        let kv = split_unescaped(&t, '=');
        match kv.as_slice() {
            [k, v] => tags.push((unescape(k), unescape(v))),
            _ => return Err(format!("series key {s:?}: tag {t:?} without one '='")),
        }
    }
    Ok(SeriesKey { measurement, tags })
}

fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.last_mut().expect("one part").push(c);
            if let Some(n) = chars.next() {
                out.last_mut().expect("one part").push(n);
            }
        } else if c == sep {
            out.push(String::new());
        } else {
            out.last_mut().expect("one part").push(c);
        }
    }
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' && matches!(chars.peek(), Some(',' | '=' | ' ' | '"' | '\\')) {
            out.push(chars.next().expect("peeked"));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn entry(key: &[u8], min: i64, max: i64) -> Vec<u8> {
        let mut v = (key.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(key);
        v.extend_from_slice(&min.to_be_bytes());
        v.extend_from_slice(&max.to_be_bytes());
        v
    }

    fn gz(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(vec![], flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn every_version_decodes_and_fields_of_a_series_merge() {
        let a = [
            entry(b"cpu,host=a#!~#value", 10, 20),
            entry(b"cpu,host=a#!~#other", 10, 20),
        ]
        .concat();
        let b = entry(b"mem,host=b#!~#free", -5, 5);
        let want = vec![
            Deletion {
                series: b"cpu,host=a".to_vec(),
                min: 10,
                max: 20,
            },
            Deletion {
                series: b"mem,host=b".to_vec(),
                min: -5,
                max: 5,
            },
        ];
        let v2 = [&V2.to_be_bytes()[..], &a, &b].concat();
        assert_eq!(parse(&v2).unwrap(), want);
        let v3 = [&V3.to_be_bytes()[..], &gz(&[a.clone(), b.clone()].concat())].concat();
        assert_eq!(parse(&v3).unwrap(), want);
        let v4 = [&V4.to_be_bytes()[..], &gz(&a), &gz(&b)].concat();
        assert_eq!(parse(&v4).unwrap(), want);
        let v1 = b"cpu,host=a#!~#value\n";
        assert_eq!(parse(v1).unwrap()[0].min, i64::MIN);
        assert!(parse(&v2[..v2.len() - 3]).is_err());
        assert!(parse(&[]).unwrap().is_empty());
    }

    #[test]
    fn series_keys_split_with_their_escapes() {
        assert_eq!(
            split_series(br"cpu\,x,host=a\ b,k\=1=v\,2").unwrap(),
            SeriesKey {
                measurement: "cpu,x".into(),
                tags: vec![("host".into(), "a b".into()), ("k=1".into(), "v,2".into())],
            }
        );
        assert_eq!(split_series(b"m").unwrap().tags, vec![]);
        assert!(split_series(b"m,novalue").is_err());
    }
}
