//! Keyed FastCDC (the 2020 algorithm with normalized chunking).
//!
//! The gear table is derived from the repository's chunker secret, so chunk boundaries
//! (and therefore chunk sizes) reveal nothing about the content to someone without the
//! keys. See docs/decisions/0001-keyed-chunker.md for why this is ours and not a crate.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// Chunk size bounds (format: recorded in the repository config).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChunkerParams {
    /// No chunk is smaller, except the last of a stream.
    pub min_size: u32,
    /// Target average; a power of two.
    pub avg_size: u32,
    /// No chunk is larger.
    pub max_size: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min_size: 512 * 1024,
            avg_size: 1024 * 1024,
            max_size: 8 * 1024 * 1024,
        }
    }
}

impl ChunkerParams {
    /// True when the bounds are ordered and the average is a power of two.
    pub fn is_valid(&self) -> bool {
        self.min_size >= 64
            && self.min_size < self.avg_size
            && self.avg_size < self.max_size
            && self.avg_size.is_power_of_two()
            && self.max_size <= 64 * 1024 * 1024
    }
}

/// Boundary finder over a keyed gear table; stateless between chunks.
#[derive(Clone)]
pub struct Cutter {
    gear: Box<[u64; 256]>,
    min: usize,
    avg: usize,
    max: usize,
    mask_small: u64,
    mask_large: u64,
}

impl Cutter {
    /// A cutter for these bounds and gear table.
    pub fn new(params: ChunkerParams, gear: [u64; 256]) -> Self {
        let bits = params.avg_size.trailing_zeros();
        // Normalized chunking, level 1: harder before the average, easier after it. The
        // masks test the top bits, which depend on the last 64 bytes only.
        let mask_small = !0u64 << (64 - (bits + 1));
        let mask_large = !0u64 << (64 - (bits - 1));
        Cutter {
            gear: Box::new(gear),
            min: params.min_size as usize,
            avg: params.avg_size as usize,
            max: params.max_size as usize,
            mask_small,
            mask_large,
        }
    }

    /// Length of the first chunk of `data`. `data` holds everything that remains of the
    /// stream, or at least `max` bytes.
    pub fn cut(&self, data: &[u8]) -> usize {
        let n = data.len().min(self.max);
        if n <= self.min {
            return n;
        }
        let center = self.avg.min(n);
        let gear = &*self.gear;
        let mut h: u64 = 0;
        let mut i = self.min;
        while i < center {
            h = (h << 1).wrapping_add(gear[data[i] as usize]);
            if h & self.mask_small == 0 {
                return i + 1;
            }
            i += 1;
        }
        while i < n {
            h = (h << 1).wrapping_add(gear[data[i] as usize]);
            if h & self.mask_large == 0 {
                return i + 1;
            }
            i += 1;
        }
        n
    }
}

/// Scan position within the chunk being built, so a boundary search can resume after
/// more bytes arrive.
#[derive(Default)]
struct ScanState {
    hash: u64,
    pos: usize,
}

impl Cutter {
    /// Continues the boundary search over `chunk[state.pos..]`; the same boundaries as
    /// [`Cutter::cut`] over the whole stream.
    fn scan(&self, chunk: &[u8], state: &mut ScanState) -> Option<usize> {
        let n = chunk.len().min(self.max);
        let gear = &*self.gear;
        let mut i = state.pos.max(self.min);
        let mut h = state.hash;
        while i < n {
            h = (h << 1).wrapping_add(gear[chunk[i] as usize]);
            let mask = if i < self.avg {
                self.mask_small
            } else {
                self.mask_large
            };
            if h & mask == 0 {
                return Some(i + 1);
            }
            i += 1;
        }
        state.hash = h;
        state.pos = i;
        None
    }
}

/// Splits a byte stream into chunks. Bytes are read straight into the chunk being built,
/// so a reader holds one chunk (average 1 MiB, at most the maximum) plus one read block.
pub struct Chunker<R> {
    reader: R,
    cutter: Cutter,
    carry: Vec<u8>,
    eof: bool,
    bytes_read: u64,
}

/// Bytes asked of the reader at a time.
const READ_BLOCK: usize = 1024 * 1024;

impl<R: Read> Chunker<R> {
    /// A chunker reading from `reader`.
    pub fn new(reader: R, cutter: Cutter) -> Self {
        Chunker {
            reader,
            cutter,
            carry: Vec::new(),
            eof: false,
            bytes_read: 0,
        }
    }

    /// Bytes read from the source so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next chunk, or `None` at the end of the stream.
    ///
    /// # Errors
    /// The reader's errors.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut chunk = std::mem::take(&mut self.carry);
        let mut state = ScanState::default();
        loop {
            if let Some(cut) = self.cutter.scan(&chunk, &mut state) {
                self.carry = chunk[cut..].to_vec();
                chunk.truncate(cut);
                return Ok(Some(chunk));
            }
            if chunk.len() >= self.cutter.max {
                self.carry = chunk[self.cutter.max..].to_vec();
                chunk.truncate(self.cutter.max);
                return Ok(Some(chunk));
            }
            if self.eof {
                return Ok(if chunk.is_empty() { None } else { Some(chunk) });
            }
            let want = READ_BLOCK.min(self.cutter.max - chunk.len());
            chunk.reserve_exact(want);
            let before = chunk.len();
            loop {
                match (&mut self.reader).take(want as u64).read_to_end(&mut chunk) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let got = chunk.len() - before;
            self.bytes_read += got as u64;
            if got < want {
                self.eof = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKeys;
    use proptest::prelude::*;

    fn small() -> ChunkerParams {
        ChunkerParams {
            min_size: 256,
            avg_size: 1024,
            max_size: 4096,
        }
    }

    fn chunks_of(data: &[u8], params: ChunkerParams, keys: &MasterKeys) -> Vec<Vec<u8>> {
        let mut c = Chunker::new(data, Cutter::new(params, keys.gear_table()));
        let mut out = vec![];
        while let Some(ch) = c.next_chunk().unwrap() {
            out.push(ch);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn streaming_cuts_equal_slice_cuts(data in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let keys = MasterKeys::generate();
            let cutter = Cutter::new(small(), keys.gear_table());
            let mut expected = vec![];
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = cutter.cut(rest);
                expected.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            prop_assert_eq!(chunks_of(&data, small(), &keys), expected);
        }

        #[test]
        fn chunk_then_concatenate_is_input(data in proptest::collection::vec(any::<u8>(), 0..40_000)) {
            let keys = MasterKeys::generate();
            let chunks = chunks_of(&data, small(), &keys);
            let p = small();
            for (i, c) in chunks.iter().enumerate() {
                prop_assert!(c.len() <= p.max_size as usize);
                if i + 1 < chunks.len() { prop_assert!(c.len() >= p.min_size as usize); }
                prop_assert!(!c.is_empty());
            }
            prop_assert_eq!(chunks.concat(), data);
        }
    }

    #[test]
    fn boundaries_resync_after_an_insert_and_depend_on_the_key() {
        let mut data = vec![0u8; 300_000];
        let mut x: u64 = 1;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let keys = MasterKeys::generate();
        let a = chunks_of(&data, small(), &keys);
        let mut shifted = b"inserted bytes".to_vec();
        shifted.extend_from_slice(&data);
        let b = chunks_of(&shifted, small(), &keys);
        let same = a.iter().filter(|c| b.contains(c)).count();
        assert!(
            same * 10 >= a.len() * 8,
            "{same} of {} chunks survive",
            a.len()
        );
        let other = chunks_of(&data, small(), &MasterKeys::generate());
        assert_ne!(
            a.iter().map(Vec::len).collect::<Vec<_>>(),
            other.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
}
