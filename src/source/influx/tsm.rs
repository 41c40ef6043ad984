//! Counting a shard's values from its TSM files as they stream into the pipeline, so a
//! backup need not ask the server to count them (a `SELECT count(*)` makes the server
//! decode every block: over a few million values it costs more than the whole stream).
//!
//! A TSM file (`tsdb/engine/tsm1/writer.go`) is a 5-byte header, blocks, an index and an
//! 8-byte footer holding the index's offset. A block is a CRC-32 and
//! `[type][uvarint timestamps length][timestamps][values]`; its length is only in the
//! index, at the file's end. So the walk finds each block's end by reading its encodings
//! as far as their lengths need (the timestamps give the value count; floats are decoded
//! bit by bit, snappy strings tag by tag), and checks every block's CRC. The first thing
//! that is not a valid block is taken for the index, which must then account for every
//! block walked, end where the footer begins, and start where the footer says.
//!
//! A file counts when all of that holds. A shard counts when every one of its TSM files
//! does, it has no tombstone file (deletions not compacted away: which points they cover
//! needs the timestamps), and no two of its files can hold the same point (a point
//! written twice would be counted twice; the server keeps one). Otherwise the caller asks
//! the server instead. Memory: the block being walked (at most [`MAX_BLOCK`]), one index
//! entry, and 16 bytes per block of the file.

use std::collections::BTreeMap;

/// The TSM file magic number.
const MAGIC: u32 = 0x16D1_16D1;
/// The one TSM version.
const VERSION: u8 = 1;
/// The separator of series key and field in a TSM key.
const FIELD_SEPARATOR: &[u8] = b"#!~#";
/// The longest block walked; a longer one leaves the shard to the server's count.
pub const MAX_BLOCK: usize = 16 << 20;
/// Bytes of one index entry: min time, max time, offset, size.
const INDEX_ENTRY: usize = 28;
/// The float encoding's end-of-stream marker (a NaN).
const FLOAT_END: u64 = 0x7FF8_0000_0000_0001;
/// Values per simple8b word, by selector.
const SIMPLE8B_N: [u64; 16] = [240, 120, 60, 30, 20, 15, 12, 10, 8, 7, 6, 5, 4, 3, 2, 1];

/// Values per field, per measurement (as InfluxQL's `count(*)` reports them).
pub type Counts = BTreeMap<String, BTreeMap<String, u64>>;

/// A key with its first and last time.
pub type KeySpan = (Vec<u8>, i64, i64);

/// What one TSM file holds, per measurement and field: values, and the time span.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FileTally {
    /// Per (measurement, field): values, first time, last time.
    pub fields: BTreeMap<(String, String), (u64, i64, i64)>,
    /// The file's first and last keys, each with its time span.
    pub first_key: Option<KeySpan>,
    /// As `first_key`.
    pub last_key: Option<KeySpan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Blocks,
    Index,
    Footer,
    Done,
}

/// A walked block: offset, size (CRC included), values.
#[derive(Debug, Clone, Copy)]
struct Walked {
    offset: u64,
    size: u32,
    values: u32,
}

/// Counts one TSM file fed in order, a slice at a time.
#[derive(Debug)]
pub struct TsmCounter {
    file_len: u64,
    /// Bytes fed and not yet consumed; `buf[0]` is at file offset `at`.
    buf: Vec<u8>,
    at: u64,
    /// An incomplete block is tried again once `buf` holds this many bytes.
    retry_len: usize,
    state: State,
    blocks: Vec<Walked>,
    used: Vec<bool>,
    index_start: u64,
    /// Per key: the last entry's max time, to find blocks of one key that overlap.
    tally: FileTally,
    failed: Option<String>,
}

impl TsmCounter {
    /// A counter for a file of `file_len` bytes.
    #[must_use]
    pub fn new(file_len: u64) -> Self {
        TsmCounter {
            file_len,
            buf: Vec::new(),
            at: 0,
            retry_len: 0,
            state: State::Header,
            blocks: Vec::new(),
            used: Vec::new(),
            index_start: 0,
            tally: FileTally::default(),
            failed: if file_len < 13 {
                Some(format!("{file_len} bytes is too short for a TSM file"))
            } else {
                None
            },
        }
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.at + (self.buf.len() + data.len()) as u64 > self.file_len {
            self.fail(format!("more than its {} bytes", self.file_len));
            self.buf = Vec::new();
            return;
        }
        // Walked where it arrives; only what an incomplete block or entry leaves over is
        // kept for the next piece.
        let used = if self.buf.is_empty() {
            let used = self.advance(data);
            self.buf.extend_from_slice(&data[used..]);
            used
        } else {
            self.buf.extend_from_slice(data);
            let buf = std::mem::take(&mut self.buf);
            let used = self.advance(&buf);
            self.buf = buf;
            self.buf.drain(..used);
            used
        };
        self.at += used as u64;
        if self.failed.is_some() {
            self.buf = Vec::new();
        }
    }

    /// What the file holds, or why it could not be counted.
    ///
    /// # Errors
    /// The reason, when the file was not all fed, or is not a TSM file this walk accounts
    /// for completely.
    pub fn finish(self) -> Result<FileTally, String> {
        if let Some(why) = self.failed {
            return Err(why);
        }
        if self.state != State::Done {
            return Err(format!(
                "cut short at byte {} of {}",
                self.at + self.buf.len() as u64,
                self.file_len
            ));
        }
        Ok(self.tally)
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            self.failed = Some(why);
        }
    }

    /// The end of the index (where the footer begins).
    fn index_end(&self) -> u64 {
        self.file_len - 8
    }

    /// Consumes what it can of `buf`; returns the bytes consumed.
    fn advance(&mut self, buf: &[u8]) -> usize {
        let mut cur = 0usize;
        loop {
            let pos = self.at + cur as u64;
            let rest = &buf[cur..];
            match self.state {
                State::Header => {
                    if rest.len() < 5 {
                        return cur;
                    }
                    let magic = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    if magic != MAGIC || rest[4] != VERSION {
                        self.fail("not a TSM file (magic or version)".into());
                        return cur;
                    }
                    cur += 5;
                    self.state = State::Blocks;
                }
                State::Blocks => {
                    let limit = usize::try_from(self.index_end() - pos).unwrap_or(usize::MAX);
                    let all_here = rest.len() >= limit;
                    let rest = &rest[..rest.len().min(limit)];
                    if !all_here && rest.len() < self.retry_len {
                        return cur;
                    }
                    match walk_block(rest) {
                        Step::Block { len, values } => {
                            self.blocks.push(Walked {
                                offset: pos,
                                size: u32::try_from(len).unwrap_or(u32::MAX),
                                values,
                            });
                            cur += len;
                            self.retry_len = 0;
                        }
                        // What is not a block, or cannot end before the footer, is
                        // taken for the index.
                        Step::NotBlock => self.start_index(pos),
                        Step::NeedMore if all_here => self.start_index(pos),
                        Step::NeedMore => {
                            if rest.len() >= MAX_BLOCK {
                                self.fail(format!(
                                    "a block at byte {pos} longer than {MAX_BLOCK} bytes"
                                ));
                                return cur;
                            }
                            self.retry_len = (rest.len() * 2).max(rest.len() + 4096);
                            return cur;
                        }
                    }
                }
                State::Index => {
                    if pos == self.index_end() {
                        self.state = State::Footer;
                        continue;
                    }
                    match self.index_entry(rest, pos) {
                        Ok(Some(len)) => cur += len,
                        Ok(None) => return cur,
                        Err(why) => {
                            self.fail(why);
                            return cur;
                        }
                    }
                }
                State::Footer => {
                    if rest.len() < 8 {
                        return cur;
                    }
                    let mut f = [0u8; 8];
                    f.copy_from_slice(&rest[..8]);
                    let said = u64::from_be_bytes(f);
                    if said != self.index_start {
                        self.fail(format!(
                            "the footer puts the index at byte {said}, the blocks end at {}",
                            self.index_start
                        ));
                        return cur;
                    }
                    if let Some(i) = self.used.iter().position(|u| !u) {
                        self.fail(format!(
                            "the block at byte {} is in no index entry",
                            self.blocks[i].offset
                        ));
                        return cur;
                    }
                    cur += 8;
                    self.state = State::Done;
                }
                State::Done => return cur,
            }
        }
    }

    /// The blocks end at `pos`: the index starts there.
    fn start_index(&mut self, pos: u64) {
        self.index_start = pos;
        self.used = vec![false; self.blocks.len()];
        self.state = State::Index;
    }

    /// One key's index entry at the start of `b` (file offset `pos`): its length, or
    /// `None` when more bytes are needed.
    fn index_entry(&mut self, b: &[u8], pos: u64) -> Result<Option<usize>, String> {
        if b.len() < 2 {
            return Ok(None);
        }
        let key_len = usize::from(u16::from_be_bytes([b[0], b[1]]));
        let head = 2 + key_len + 1 + 2;
        if b.len() < head {
            return Ok(self.short(pos, head));
        }
        let n = usize::from(u16::from_be_bytes([b[head - 2], b[head - 1]]));
        let len = head + n * INDEX_ENTRY;
        if b.len() < len {
            return Ok(self.short(pos, len));
        }
        if n == 0 {
            return Err(format!("an index entry at byte {pos} lists no block"));
        }
        if pos + len as u64 > self.index_end() {
            return Err(format!("an index entry at byte {pos} runs into the footer"));
        }
        let key = &b[2..2 + key_len];
        let (measurement, field) =
            split_key(key).ok_or_else(|| format!("an index key at byte {pos} without a field"))?;
        let (mut values, mut first, mut last) = (0u64, i64::MAX, i64::MIN);
        let mut prev_max: Option<i64> = None;
        for e in b[head..len].chunks_exact(INDEX_ENTRY) {
            let min = be_i64(&e[0..8]);
            let max = be_i64(&e[8..16]);
            let offset = u64::from_be_bytes(e[16..24].try_into().unwrap_or_default());
            let size = u32::from_be_bytes(e[24..28].try_into().unwrap_or_default());
            if min > max || prev_max.is_some_and(|p| min <= p) {
                return Err(format!(
                    "key {} has blocks whose times overlap",
                    String::from_utf8_lossy(key)
                ));
            }
            prev_max = Some(max);
            let i = self
                .blocks
                .binary_search_by_key(&offset, |w| w.offset)
                .map_err(|_| format!("the index names a block at byte {offset} not walked"))?;
            let w = self.blocks[i];
            if w.size != size || self.used[i] {
                return Err(format!(
                    "the block at byte {offset} does not match the index"
                ));
            }
            self.used[i] = true;
            values += u64::from(w.values);
            first = first.min(min);
            last = last.max(max);
        }
        let span = (key.to_vec(), first, last);
        if self.tally.first_key.is_none() {
            self.tally.first_key = Some(span.clone());
        } else if self
            .tally
            .last_key
            .as_ref()
            .is_some_and(|(k, _, _)| k.as_slice() >= key)
        {
            return Err("index keys out of order".into());
        }
        self.tally.last_key = Some(span);
        let e = self
            .tally
            .fields
            .entry((measurement, field))
            .or_insert((0, i64::MAX, i64::MIN));
        e.0 += values;
        e.1 = e.1.min(first);
        e.2 = e.2.max(last);
        Ok(Some(len))
    }

    /// Needs `want` bytes at `pos`: more to come, unless that passes the footer.
    fn short(&mut self, pos: u64, want: usize) -> Option<usize> {
        if pos + want as u64 > self.index_end() {
            self.fail(format!("an index entry at byte {pos} runs into the footer"));
        }
        None
    }
}

fn be_i64(b: &[u8]) -> i64 {
    i64::from_be_bytes(b.try_into().unwrap_or_default())
}

/// A TSM key's measurement (unescaped) and field.
fn split_key(key: &[u8]) -> Option<(String, String)> {
    let at = key
        .windows(FIELD_SEPARATOR.len())
        .position(|w| w == FIELD_SEPARATOR)?;
    let (series, field) = (&key[..at], &key[at + FIELD_SEPARATOR.len()..]);
    let mut m = Vec::with_capacity(series.len());
    let mut i = 0;
    while i < series.len() {
        match series[i] {
            b'\\' if matches!(series.get(i + 1), Some(b',' | b' ')) => {
                m.push(series[i + 1]);
                i += 2;
            }
            b',' => break,
            c => {
                m.push(c);
                i += 1;
            }
        }
    }
    Some((
        String::from_utf8_lossy(&m).into_owned(),
        String::from_utf8_lossy(field).into_owned(),
    ))
}

/// What the bytes at a block's start are.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A whole block with a good CRC: its length and values.
    Block { len: usize, values: u32 },
    /// Not a block (the index, or damage).
    NotBlock,
    /// A block may start here, but its end is not here yet.
    NeedMore,
}

/// Why a block walk stopped.
enum Stop {
    Short,
    Bad,
}

impl From<Stop> for Step {
    fn from(s: Stop) -> Step {
        match s {
            Stop::Short => Step::NeedMore,
            Stop::Bad => Step::NotBlock,
        }
    }
}

fn walk_block(b: &[u8]) -> Step {
    match block_len(b) {
        Ok((len, values)) => {
            let crc = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            if crc32fast::hash(&b[4..len]) == crc {
                Step::Block { len, values }
            } else {
                Step::NotBlock
            }
        }
        Err(s) => s.into(),
    }
}

/// A block's length (CRC included) and its value count.
fn block_len(b: &[u8]) -> Result<(usize, u32), Stop> {
    let typ = *b.get(4).ok_or(Stop::Short)?;
    if typ > 4 {
        return Err(Stop::Bad);
    }
    let (ts_len, n) = uvarint(b, 5)?;
    let ts_start = 5 + n;
    let ts_len = usize::try_from(ts_len).map_err(|_| Stop::Bad)?;
    if ts_len > MAX_BLOCK {
        return Err(Stop::Bad);
    }
    let v = ts_start + ts_len;
    let ts = b.get(ts_start..v).ok_or(Stop::Short)?;
    let count = timestamps(ts)?;
    if count == 0 || count > u64::from(u32::MAX) {
        return Err(Stop::Bad);
    }
    let header = *b.get(v).ok_or(Stop::Short)?;
    let end = match typ {
        0 => {
            if header >> 4 != 1 {
                return Err(Stop::Bad);
            }
            v + 1 + floats(&b[v + 1..], count)?
        }
        1 | 4 => v + integers(b, v, count)?,
        2 => {
            if header >> 4 != 1 {
                return Err(Stop::Bad);
            }
            let (n, w) = uvarint(b, v + 1)?;
            if n != count {
                return Err(Stop::Bad);
            }
            v + 1 + w + usize::try_from(n.div_ceil(8)).map_err(|_| Stop::Bad)?
        }
        _ => {
            if header >> 4 != 1 {
                return Err(Stop::Bad);
            }
            v + 1 + snappy_len(b, v + 1)?
        }
    };
    if end > b.len() {
        return Err(Stop::Short);
    }
    Ok((end, u32::try_from(count).map_err(|_| Stop::Bad)?))
}

/// A uvarint at `b[at..]`: its value and its length.
fn uvarint(b: &[u8], at: usize) -> Result<(u64, usize), Stop> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some(&byte) = b.get(at + i) else {
            return Err(Stop::Short);
        };
        if i == 9 && byte > 1 {
            return Err(Stop::Bad);
        }
        v |= u64::from(byte & 0x7F) << (7 * i);
        if byte < 0x80 {
            return Ok((v, i + 1));
        }
    }
    Err(Stop::Bad)
}

/// How many timestamps an encoded timestamp section holds.
fn timestamps(ts: &[u8]) -> Result<u64, Stop> {
    let Some(&h) = ts.first() else {
        return Err(Stop::Bad);
    };
    match h >> 4 {
        // Uncompressed: 8 bytes each.
        0 if (ts.len() - 1).is_multiple_of(8) => Ok((ts.len() as u64 - 1) / 8),
        // simple8b: the first 8 bytes, then words.
        1 if ts.len() >= 9 && (ts.len() - 9).is_multiple_of(8) => Ok(1 + ts[9..]
            .chunks_exact(8)
            .map(|w| SIMPLE8B_N[usize::from(w[0] >> 4)])
            .sum::<u64>()),
        // Run length: first, delta, count.
        2 if ts.len() > 9 => {
            let (_, w) = uvarint(ts, 9).map_err(|_| Stop::Bad)?;
            let (n, w2) = uvarint(ts, 9 + w).map_err(|_| Stop::Bad)?;
            if 9 + w + w2 != ts.len() {
                return Err(Stop::Bad);
            }
            Ok(n)
        }
        _ => Err(Stop::Bad),
    }
}

/// The length of an integer (or unsigned) value section of `count` values at `b[v..]`.
fn integers(b: &[u8], v: usize, count: u64) -> Result<usize, Stop> {
    match b[v] >> 4 {
        0 => usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(8))
            .map(|n| 1 + n)
            .ok_or(Stop::Bad),
        1 => {
            // The first value, then simple8b words for the rest.
            let mut at = v + 9;
            let mut got = 1u64;
            while got < count {
                let w = *b.get(at).ok_or(Stop::Short)?;
                got += SIMPLE8B_N[usize::from(w >> 4)];
                at += 8;
            }
            if got != count {
                return Err(Stop::Bad);
            }
            Ok(at - v)
        }
        2 => {
            let (_, w) = uvarint(b, v + 9)?;
            let (repeats, w2) = uvarint(b, v + 9 + w)?;
            if repeats + 1 != count {
                return Err(Stop::Bad);
            }
            Ok(9 + w + w2)
        }
        _ => Err(Stop::Bad),
    }
}

/// Reads bits most significant first.
struct Bits<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    /// The next `n` bits (1 to 64).
    #[inline]
    fn read(&mut self, n: u32) -> Result<u64, Stop> {
        debug_assert!((1..=64).contains(&n));
        let byte = self.pos / 8;
        let off = (self.pos % 8) as u32;
        if self.pos + n as usize > self.b.len() * 8 {
            return Err(Stop::Short);
        }
        let word = match self.b.get(byte..byte + 16) {
            Some(s) => u128::from_be_bytes(s.try_into().unwrap_or_default()),
            None => {
                let mut w = [0u8; 16];
                let s = &self.b[byte..];
                w[..s.len()].copy_from_slice(s);
                u128::from_be_bytes(w)
            }
        };
        self.pos += n as usize;
        Ok(((word << off) >> (128 - n)) as u64)
    }

    #[inline]
    fn bit(&mut self) -> Result<bool, Stop> {
        let byte = *self.b.get(self.pos / 8).ok_or(Stop::Short)?;
        let v = byte & (0x80 >> (self.pos % 8)) != 0;
        self.pos += 1;
        Ok(v)
    }
}

/// The length of a Gorilla float section after its header byte, holding `count` values
/// and the end marker.
fn floats(b: &[u8], count: u64) -> Result<usize, Stop> {
    let mut r = Bits { b, pos: 0 };
    let mut val = r.read(64)?;
    if val == FLOAT_END {
        return Err(Stop::Bad);
    }
    let (mut leading, mut trailing) = (0u32, 0u32);
    let mut seen = 1u64;
    loop {
        if r.bit()? {
            if r.bit()? {
                leading = r.read(5)? as u32;
                let mut sig = r.read(6)? as u32;
                if sig == 0 {
                    sig = 64;
                }
                if leading + sig > 64 {
                    return Err(Stop::Bad);
                }
                trailing = 64 - leading - sig;
            } else if leading + trailing >= 64 {
                return Err(Stop::Bad);
            }
            let sig = 64 - leading - trailing;
            val ^= r.read(sig)? << trailing;
            if val == FLOAT_END {
                if seen != count {
                    return Err(Stop::Bad);
                }
                return Ok(r.pos.div_ceil(8));
            }
        }
        seen += 1;
        if seen > count {
            return Err(Stop::Bad);
        }
    }
}

/// The length of a snappy block at `b[at..]`, walked tag by tag.
fn snappy_len(b: &[u8], at: usize) -> Result<usize, Stop> {
    let (want, w) = uvarint(b, at)?;
    let mut i = at + w;
    let mut got = 0u64;
    while got < want {
        let tag = *b.get(i).ok_or(Stop::Short)?;
        let (len, skip) = match tag & 3 {
            0 => {
                let l = u64::from(tag >> 2);
                if l < 60 {
                    (l + 1, 1)
                } else {
                    let extra = (l - 59) as usize;
                    let bytes = b.get(i + 1..i + 1 + extra).ok_or(Stop::Short)?;
                    let mut n = 0u64;
                    for (k, byte) in bytes.iter().enumerate() {
                        n |= u64::from(*byte) << (8 * k);
                    }
                    (n + 1, 1 + extra)
                }
            }
            1 => (u64::from((tag >> 2) & 7) + 4, 2),
            2 => (u64::from(tag >> 2) + 1, 3),
            _ => (u64::from(tag >> 2) + 1, 5),
        };
        // A literal's bytes follow its tag.
        let literal = if tag & 3 == 0 { len as usize } else { 0 };
        i += skip + literal;
        got += len;
    }
    if got != want {
        return Err(Stop::Bad);
    }
    if i > b.len() {
        return Err(Stop::Short);
    }
    Ok(i - at)
}

/// Sums a shard's file tallies, or says why they do not give its counts.
///
/// # Errors
/// Two files that may hold the same point.
pub fn shard_counts(files: &[FileTally]) -> Result<Counts, String> {
    for (i, a) in files.iter().enumerate() {
        for b in &files[i + 1..] {
            may_share(a, b)?;
        }
    }
    let mut out = Counts::new();
    for f in files {
        for ((m, field), (n, _, _)) in &f.fields {
            *out.entry(m.clone())
                .or_default()
                .entry(field.clone())
                .or_insert(0) += n;
        }
    }
    Ok(out)
}

/// Whether two files of one shard can hold the same point.
fn may_share(a: &FileTally, b: &FileTally) -> Result<(), String> {
    let (Some(af), Some(al), Some(bf), Some(bl)) =
        (&a.first_key, &a.last_key, &b.first_key, &b.last_key)
    else {
        return Ok(());
    };
    // Key ranges apart: no key in both.
    if al.0 < bf.0 || bl.0 < af.0 {
        return Ok(());
    }
    let apart = |x: &KeySpan, y: &KeySpan| x.2 < y.1 || y.2 < x.1;
    // Meeting at one key only (a large compaction split across files).
    if al.0 == bf.0 && al.0 < bl.0 && af.0 < al.0 {
        return if apart(al, bf) {
            Ok(())
        } else {
            Err("two files hold one key over the same time".into())
        };
    }
    if bl.0 == af.0 && bl.0 < al.0 && bf.0 < bl.0 {
        return if apart(bl, af) {
            Ok(())
        } else {
            Err("two files hold one key over the same time".into())
        };
    }
    // Otherwise per measurement and field: times apart.
    for (k, (_, amin, amax)) in &a.fields {
        if let Some((_, bmin, bmax)) = b.fields.get(k) {
            if !(amax < bmin || bmax < amin) {
                return Err(format!("two files hold {}.{} over the same time", k.0, k.1));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of `typ` with uncompressed timestamps `ts` and value section `values`.
    fn block(typ: u8, ts: &[i64], values: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8];
        for x in ts {
            t.extend_from_slice(&x.to_be_bytes());
        }
        let mut b = vec![typ];
        let mut l = t.len() as u64;
        while l >= 0x80 {
            b.push((l as u8) | 0x80);
            l >>= 7;
        }
        b.push(l as u8);
        b.extend_from_slice(&t);
        b.extend_from_slice(values);
        let mut out = crc32fast::hash(&b).to_be_bytes().to_vec();
        out.extend_from_slice(&b);
        out
    }

    fn ints_uncompressed(v: &[i64]) -> Vec<u8> {
        let mut b = vec![0u8];
        for x in v {
            b.extend_from_slice(&x.to_be_bytes());
        }
        b
    }

    /// A file of (key, blocks with their min/max).
    fn file(keys: &[(&str, Vec<KeySpan>)]) -> Vec<u8> {
        let mut f = MAGIC.to_be_bytes().to_vec();
        f.push(VERSION);
        let mut index = vec![];
        for (key, blocks) in keys {
            index.extend_from_slice(&(key.len() as u16).to_be_bytes());
            index.extend_from_slice(key.as_bytes());
            index.push(blocks[0].0[4]);
            index.extend_from_slice(&(blocks.len() as u16).to_be_bytes());
            for (b, min, max) in blocks {
                index.extend_from_slice(&min.to_be_bytes());
                index.extend_from_slice(&max.to_be_bytes());
                index.extend_from_slice(&(f.len() as u64).to_be_bytes());
                index.extend_from_slice(&(b.len() as u32).to_be_bytes());
                f.extend_from_slice(b);
            }
        }
        let start = f.len() as u64;
        f.extend_from_slice(&index);
        f.extend_from_slice(&start.to_be_bytes());
        f
    }

    fn count(f: &[u8], piece: usize) -> Result<FileTally, String> {
        let mut c = TsmCounter::new(f.len() as u64);
        for p in f.chunks(piece) {
            c.feed(p);
        }
        c.finish()
    }

    fn sample() -> Vec<u8> {
        let bools = {
            let mut v = vec![1u8 << 4, 3];
            v.push(0b1010_0000);
            v
        };
        // "ab","c" as a string section: snappy of [2,'a','b',1,'c'] as one literal.
        let strings = vec![1u8 << 4, 5, 4 << 2, 2, b'a', b'b', 1, b'c'];
        // RLE integers: first 7, delta 1, 2 repeats.
        let mut rle = vec![2u8 << 4];
        rle.extend_from_slice(&7u64.to_be_bytes());
        rle.extend_from_slice(&[1, 2]);
        file(&[
            (
                "cpu,host=a#!~#n",
                vec![
                    (block(1, &[1, 2], &ints_uncompressed(&[5, 6])), 1, 2),
                    (block(1, &[3, 4, 5], &rle), 3, 5),
                ],
            ),
            (
                "cpu,host=a#!~#ok",
                vec![(block(2, &[1, 2, 3], &bools), 1, 3)],
            ),
            (
                "my\\ m\\,x,t=1#!~#s",
                vec![(block(3, &[9, 10], &strings), 9, 10)],
            ),
        ])
    }

    #[test]
    fn a_file_is_counted_per_measurement_and_field_whatever_the_pieces() {
        let f = sample();
        for piece in [1, 3, 7, 64, f.len()] {
            let t = count(&f, piece).unwrap();
            let c = shard_counts(&[t]).unwrap();
            assert_eq!(c["cpu"]["n"], 5, "piece {piece}");
            assert_eq!(c["cpu"]["ok"], 3);
            assert_eq!(c["my m,x"]["s"], 2);
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_leaves_the_file_uncounted_or_counted_right() {
        for f in [sample(), REAL.to_vec()] {
            flips_in(&f);
        }
    }

    fn flips_in(f: &[u8]) {
        let good = count(f, 16).unwrap();
        for i in 0..f.len() {
            for bit in [0x01u8, 0x80] {
                let mut g = f.to_vec();
                g[i] ^= bit;
                if let Ok(t) = count(&g, 16) {
                    // Only a key's bytes in the index can change and still walk: the
                    // counts then move to another name, never change in number.
                    let n = |t: &FileTally| t.fields.values().map(|v| v.0).sum::<u64>();
                    assert_eq!(n(&t), n(&good), "byte {i}");
                }
            }
        }
    }

    /// A file influxd 1.6.7 wrote (`tests/fixtures/tsm/README.md`): 300 points of `cpu`
    /// with a field of each type, and 50 of a measurement whose name is escaped.
    const REAL: &[u8] = include_bytes!("../../../tests/fixtures/tsm/000000001-000000001.tsm");

    #[test]
    fn a_file_influxd_wrote_is_counted_as_the_server_counts_it() {
        for piece in [1, 5, 100, REAL.len()] {
            let c = shard_counts(&[count(REAL, piece).unwrap()]).unwrap();
            let cpu = &c["cpu"];
            for f in ["value", "n", "ok", "note"] {
                assert_eq!(cpu[f], 300, "{f}, pieces of {piece}");
            }
            assert_eq!(c["m e,x"]["v"], 50);
            assert_eq!(c.len(), 2);
        }
        let mut cut = TsmCounter::new(REAL.len() as u64 + 1);
        cut.feed(REAL);
        assert!(cut.finish().is_err(), "one byte short of its length");
    }

    #[test]
    fn a_cut_file_is_not_counted() {
        let f = sample();
        let mut c = TsmCounter::new(f.len() as u64);
        c.feed(&f[..f.len() - 1]);
        assert!(c.finish().unwrap_err().contains("cut short"));
    }

    #[test]
    fn files_that_may_hold_one_point_twice_are_not_summed() {
        let t = count(&sample(), 64).unwrap();
        assert!(shard_counts(&[t.clone(), t.clone()]).is_err());
        let mut later = t.clone();
        for v in later.fields.values_mut() {
            v.1 += 100;
            v.2 += 100;
        }
        let c = shard_counts(&[t, later]).unwrap();
        assert_eq!(c["cpu"]["n"], 10);
    }

    #[test]
    fn gorilla_floats_end_at_their_marker() {
        // 1.0, 1.0, then the end marker: 64 bits, one 0 bit, then a control 1 1,
        // leading 1 (5 bits), sig bits 63 (6 bits) with 1.0 ^ NaN's bits.
        let one = 1.0f64.to_bits();
        let delta = one ^ FLOAT_END;
        let lead = delta.leading_zeros();
        let trail = delta.trailing_zeros();
        let sig = 64 - lead - trail;
        let mut bits: Vec<bool> = (0..64).rev().map(|i| one >> i & 1 == 1).collect();
        bits.push(false);
        bits.extend([true, true]);
        bits.extend((0..5).rev().map(|i| lead >> i & 1 == 1));
        bits.extend((0..6).rev().map(|i| (sig % 64) >> i & 1 == 1));
        bits.extend((0..sig).rev().map(|i| (delta >> trail) >> i & 1 == 1));
        let mut bytes = vec![0u8; bits.len().div_ceil(8)];
        for (i, b) in bits.iter().enumerate() {
            if *b {
                bytes[i / 8] |= 0x80 >> (i % 8);
            }
        }
        assert_eq!(floats(&bytes, 2).ok(), Some(bytes.len()));
        assert!(floats(&bytes, 3).is_err());
        assert!(matches!(
            floats(&bytes[..bytes.len() - 1], 2),
            Err(Stop::Short)
        ));
    }
}
