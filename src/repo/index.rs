//! The index: which blob is in which pack, at which offset.
//!
//! On disk, each index file is sealed binary:
//! `"BKIX" | version u8 = 1 | repeated (pack id [32] | count u32 | count x pack entry)`,
//! the entries as in the pack header. In memory, one sorted array of 52-byte entries
//! (a test prints the figure), searched by bisection: no per-entry allocation.

use std::collections::HashMap;

use crate::pipeline::blob::BlobLimits;
use crate::pipeline::{BlobId, BlobKind};

use super::pack::{decode_entry, encode_entries, PackEntry, ENTRY_LEN};

const MAGIC: &[u8; 4] = b"BKIX";

/// Why an index file does not parse.
#[derive(Debug, thiserror::Error)]
#[error("malformed index: {0}")]
pub struct IndexFormatError(pub String);

/// One pack and its blobs, as written to an index file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedPack {
    /// Pack id.
    pub pack: BlobId,
    /// Its blobs.
    pub entries: Vec<PackEntry>,
}

/// Encodes the plaintext of one index file.
pub fn encode(packs: &[IndexedPack]) -> Vec<u8> {
    let n: usize = packs.iter().map(|p| 36 + p.entries.len() * ENTRY_LEN).sum();
    let mut out = Vec::with_capacity(5 + n);
    out.extend_from_slice(MAGIC);
    out.push(1);
    for p in packs {
        out.extend_from_slice(&p.pack.0);
        out.extend_from_slice(&(p.entries.len() as u32).to_le_bytes());
        encode_entries(&p.entries, &mut out);
    }
    out
}

/// Decodes the plaintext of one index file. Every entry's lengths are checked against
/// `limits` (a repository's [`BlobLimits::for_chunker`]): they size the buffers a blob is
/// read and decompressed into later, so none above the largest blob gets in.
///
/// # Errors
/// Bad magic, version, a truncated record, or an entry whose lengths no blob can have.
pub fn decode(b: &[u8], limits: &BlobLimits) -> Result<Vec<IndexedPack>, IndexFormatError> {
    if b.len() < 5 || &b[..4] != MAGIC || b[4] != 1 {
        return Err(IndexFormatError("bad magic or version".into()));
    }
    let mut out = vec![];
    let mut i = 5;
    while i < b.len() {
        if i + 36 > b.len() {
            return Err(IndexFormatError("truncated pack record".into()));
        }
        let mut pack = [0u8; 32];
        pack.copy_from_slice(&b[i..i + 32]);
        let count = u32::from_le_bytes([b[i + 32], b[i + 33], b[i + 34], b[i + 35]]) as usize;
        i += 36;
        let end = count
            .checked_mul(ENTRY_LEN)
            .and_then(|n| n.checked_add(i))
            .filter(|&e| e <= b.len())
            .ok_or_else(|| IndexFormatError("truncated entries".into()))?;
        let entries = b[i..end]
            .chunks_exact(ENTRY_LEN)
            .map(|c| {
                let e =
                    decode_entry(c).ok_or_else(|| IndexFormatError("unknown blob kind".into()))?;
                limits
                    .check(e.kind, e.length, e.raw_length)
                    .map_err(|why| IndexFormatError(format!("blob {}: {why}", e.id)))?;
                Ok(e)
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(IndexedPack {
            pack: BlobId(pack),
            entries,
        });
        i = end;
    }
    Ok(out)
}

/// One blob's location, as kept in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Blob id.
    pub id: [u8; 32],
    /// Position of the pack in [`Index::packs`].
    pub pack: u32,
    /// Offset in the pack.
    pub offset: u32,
    /// Sealed length.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
    /// `BlobKind` as a byte.
    pub kind: u8,
}

/// Where a blob is, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    /// Pack id.
    pub pack: BlobId,
    /// Data or tree.
    pub kind: BlobKind,
    /// Offset in the pack.
    pub offset: u32,
    /// Sealed length.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
}

/// The in-memory index of a whole repository.
#[derive(Default)]
pub struct Index {
    packs: Vec<BlobId>,
    entries: Vec<IndexEntry>,
}

impl Index {
    /// Builds the index from decoded index files (duplicates keep one location).
    pub fn from_packs(files: impl IntoIterator<Item = IndexedPack>) -> Self {
        let mut pack_pos: HashMap<BlobId, u32> = HashMap::new();
        let mut idx = Index::default();
        for p in files {
            let pos = *pack_pos.entry(p.pack).or_insert_with(|| {
                idx.packs.push(p.pack);
                (idx.packs.len() - 1) as u32
            });
            idx.entries.extend(p.entries.iter().map(|e| IndexEntry {
                id: e.id.0,
                pack: pos,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
                kind: e.kind as u8,
            }));
        }
        idx.entries.sort_unstable_by_key(|e| e.id);
        idx.entries.dedup_by(|a, b| a.id == b.id);
        idx.entries.shrink_to_fit();
        idx
    }

    /// Number of distinct blobs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All pack ids referenced.
    pub fn packs(&self) -> &[BlobId] {
        &self.packs
    }

    /// Bytes of memory per blob held by the index arrays.
    pub fn bytes_per_blob(&self) -> f64 {
        if self.entries.is_empty() {
            return std::mem::size_of::<IndexEntry>() as f64;
        }
        let bytes = self.entries.capacity() * std::mem::size_of::<IndexEntry>()
            + self.packs.capacity() * std::mem::size_of::<BlobId>();
        bytes as f64 / self.entries.len() as f64
    }

    /// True when the blob is stored.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.find(id).is_some()
    }

    fn find(&self, id: &BlobId) -> Option<&IndexEntry> {
        self.entries
            .binary_search_by(|e| e.id.cmp(&id.0))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Where a blob is.
    pub fn get(&self, id: &BlobId) -> Option<BlobLocation> {
        self.find(id).map(|e| BlobLocation {
            pack: self.packs[e.pack as usize],
            kind: BlobKind::from_u8(e.kind).unwrap_or(BlobKind::Data),
            offset: e.offset,
            length: e.length,
            raw_length: e.raw_length,
        })
    }

    /// Every blob with its location.
    pub fn iter(&self) -> impl Iterator<Item = (BlobId, BlobLocation)> + '_ {
        self.entries.iter().map(|e| {
            (
                BlobId(e.id),
                BlobLocation {
                    pack: self.packs[e.pack as usize],
                    kind: BlobKind::from_u8(e.kind).unwrap_or(BlobKind::Data),
                    offset: e.offset,
                    length: e.length,
                    raw_length: e.raw_length,
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: BlobLimits = BlobLimits {
        data: 8 * 1024 * 1024,
        tree: crate::pipeline::blob::MAX_TREE_BLOB,
    };

    fn entry() -> impl Strategy<Value = PackEntry> {
        (
            any::<[u8; 32]>(),
            any::<bool>(),
            any::<u32>(),
            0..=LIMITS.data,
            0..=LIMITS.data,
        )
            .prop_map(|(id, tree, offset, raw_length, extra)| PackEntry {
                kind: if tree { BlobKind::Tree } else { BlobKind::Data },
                id: BlobId(id),
                offset,
                // Anything from an empty framed blob to a stored-raw one.
                length: 1 + crate::crypto::SEAL_OVERHEAD as u32 + extra % (raw_length + 1),
                raw_length,
            })
    }

    fn one_entry(kind: BlobKind, length: u32, raw_length: u32) -> Vec<u8> {
        encode(&[IndexedPack {
            pack: BlobId([1; 32]),
            entries: vec![PackEntry {
                kind,
                id: BlobId([2; 32]),
                offset: 0,
                length,
                raw_length,
            }],
        }])
    }

    #[test]
    fn lengths_no_blob_can_have_are_refused() {
        let least = 1 + crate::crypto::SEAL_OVERHEAD as u32;
        decode(&one_entry(BlobKind::Data, least + 100, 100), &LIMITS).unwrap();
        for (kind, length, raw_length) in [
            // A raw length of 4 GiB would size a 4 GiB buffer when the blob is read.
            (BlobKind::Data, least, u32::MAX),
            (BlobKind::Data, least, LIMITS.data + 1),
            (BlobKind::Tree, least, LIMITS.tree + 1),
            // A sealed length of 4 GiB would size the ranged read.
            (BlobKind::Data, u32::MAX, 100),
            (BlobKind::Tree, least - 1, 0),
        ] {
            let e = decode(&one_entry(kind, length, raw_length), &LIMITS).unwrap_err();
            let e = e.to_string();
            assert!(e.contains(&BlobId([2; 32]).to_hex()), "{e}");
            assert!(e.contains("length"), "{e}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn index_codec_round_trips(packs in proptest::collection::vec((any::<[u8; 32]>(), proptest::collection::vec(entry(), 0..20)), 0..8)) {
            let packs: Vec<IndexedPack> = packs.into_iter().map(|(p, entries)| IndexedPack { pack: BlobId(p), entries }).collect();
            let enc = encode(&packs);
            prop_assert_eq!(decode(&enc, &LIMITS).unwrap(), packs.clone());
            // Any cut that is not at a pack record's boundary is an error; at a boundary it
            // is exactly the packs before it (the seal around the file catches that case).
            let mut boundaries = vec![5usize];
            for p in &packs {
                let last = *boundaries.last().unwrap();
                boundaries.push(last + 36 + p.entries.len() * ENTRY_LEN);
            }
            prop_assert_eq!(*boundaries.last().unwrap(), enc.len());
            for cut in 0..enc.len() {
                match boundaries.iter().position(|b| *b == cut) {
                    Some(k) => prop_assert_eq!(decode(&enc[..cut], &LIMITS).unwrap(), packs[..k].to_vec()),
                    None => prop_assert!(decode(&enc[..cut], &LIMITS).is_err(), "a cut at {} decoded", cut),
                }
            }
            let idx = Index::from_packs(packs.clone());
            for p in &packs {
                for e in &p.entries {
                    let loc = idx.get(&e.id).unwrap();
                    prop_assert_eq!(loc.kind, e.kind);
                }
            }
        }
    }

    #[test]
    fn memory_per_blob_is_under_64_bytes() {
        let packs: Vec<IndexedPack> = (0..100u32)
            .map(|p| IndexedPack {
                pack: BlobId([p as u8; 32]),
                entries: (0..1000u32)
                    .map(|i| {
                        let mut id = [0u8; 32];
                        id[..4].copy_from_slice(&(p * 1000 + i).to_le_bytes());
                        PackEntry {
                            kind: BlobKind::Data,
                            id: BlobId(id),
                            offset: i,
                            length: 1,
                            raw_length: 1,
                        }
                    })
                    .collect(),
            })
            .collect();
        let idx = Index::from_packs(packs);
        let per = idx.bytes_per_blob();
        println!(
            "in-memory index: {per:.1} bytes per blob ({} blobs)",
            idx.len()
        );
        assert!(per < 64.0, "{per}");
        assert_eq!(std::mem::size_of::<IndexEntry>(), 52);
    }
}
