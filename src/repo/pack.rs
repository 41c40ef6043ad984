//! Packs: many sealed blobs in one object, followed by a sealed header that lists them and
//! the header's length. The pack id is the SHA-256 of all its bytes, so storage-level
//! integrity can be checked without any key.
//!
//! Layout: `blob_0 | ... | blob_n-1 | seal(header) | header_len u32 LE`.
//! Header plaintext: `"BKPH" | version u8 = 1 | count u32 | count x entry`,
//! entry = `kind u8 | id [32] | offset u32 | length u32 | raw_length u32` (45 bytes).

use sha2::{Digest, Sha256};

use crate::crypto::{self, MasterKeys, ObjectKind, SealError};
use crate::pipeline::{BlobId, BlobKind};

/// Bytes of one header entry.
pub const ENTRY_LEN: usize = 1 + 32 + 4 + 4 + 4;
const MAGIC: &[u8; 4] = b"BKPH";

/// One blob's place in a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// Data or tree.
    pub kind: BlobKind,
    /// Blob id.
    pub id: BlobId,
    /// Offset of the sealed blob in the pack.
    pub offset: u32,
    /// Length of the sealed blob.
    pub length: u32,
    /// Length of the plaintext.
    pub raw_length: u32,
}

/// Why a pack could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// Too short to hold its own trailer, or a header length past its start.
    #[error("pack {pack}: truncated or malformed trailer")]
    Truncated {
        /// Which pack.
        pack: String,
    },
    /// The header did not open.
    #[error("pack {pack}: header: {source}")]
    Header {
        /// Which pack.
        pack: String,
        /// Why.
        source: SealError,
    },
    /// The header opened but does not parse.
    #[error("pack {pack}: malformed header: {why}")]
    Malformed {
        /// Which pack.
        pack: String,
        /// Why.
        why: String,
    },
}

/// Encodes header entries (shared with the index format).
pub fn encode_entries(entries: &[PackEntry], out: &mut Vec<u8>) {
    for e in entries {
        out.push(e.kind as u8);
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&e.raw_length.to_le_bytes());
    }
}

/// Decodes one entry from exactly [`ENTRY_LEN`] bytes.
pub fn decode_entry(b: &[u8]) -> Option<PackEntry> {
    if b.len() != ENTRY_LEN {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut id = [0u8; 32];
    id.copy_from_slice(&b[1..33]);
    Some(PackEntry {
        kind: BlobKind::from_u8(b[0])?,
        id: BlobId(id),
        offset: u32_at(33),
        length: u32_at(37),
        raw_length: u32_at(41),
    })
}

/// Accumulates sealed blobs into one pack in memory.
#[derive(Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack ready to upload.
pub struct FinishedPack {
    /// SHA-256 of `bytes`.
    pub id: BlobId,
    /// The whole object.
    pub bytes: Vec<u8>,
    /// Its blobs.
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends one sealed blob.
    pub fn add(&mut self, kind: BlobKind, id: BlobId, sealed: &[u8], raw_length: u32) {
        if self.bytes.capacity() == 0 {
            // Room for a full pack plus one maximal blob, so the buffer never reallocates
            // (untouched capacity costs no resident memory).
            self.bytes.reserve(26 * 1024 * 1024);
        }
        self.entries.push(PackEntry {
            kind,
            id,
            offset: self.bytes.len() as u32,
            length: sealed.len() as u32,
            raw_length,
        });
        self.bytes.extend_from_slice(sealed);
    }

    /// Seals the header, appends the trailer and names the pack.
    pub fn finish(mut self, keys: &MasterKeys) -> FinishedPack {
        let mut header = Vec::with_capacity(9 + self.entries.len() * ENTRY_LEN);
        header.extend_from_slice(MAGIC);
        header.push(1);
        header.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        encode_entries(&self.entries, &mut header);
        let sealed = crypto::seal(keys, ObjectKind::PackHeader, None, &header);
        self.bytes.extend_from_slice(&sealed);
        self.bytes
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        let id = BlobId(Sha256::digest(&self.bytes).into());
        FinishedPack {
            id,
            bytes: self.bytes,
            entries: self.entries,
        }
    }
}

/// Reads the blob list of a whole pack.
///
/// # Errors
/// A truncated trailer, a header that does not open, or one that does not parse.
pub fn read_header(
    keys: &MasterKeys,
    pack_name: &str,
    pack: &[u8],
) -> Result<Vec<PackEntry>, PackError> {
    let trunc = || PackError::Truncated {
        pack: pack_name.to_string(),
    };
    if pack.len() < 4 {
        return Err(trunc());
    }
    let n = pack.len();
    let hlen = u32::from_le_bytes([pack[n - 4], pack[n - 3], pack[n - 2], pack[n - 1]]) as usize;
    if hlen + 4 > n {
        return Err(trunc());
    }
    let sealed = &pack[n - 4 - hlen..n - 4];
    let header = crypto::open(keys, ObjectKind::PackHeader, None, sealed).map_err(|source| {
        PackError::Header {
            pack: pack_name.to_string(),
            source,
        }
    })?;
    decode_header(pack_name, &header, (n - 4 - hlen) as u64)
}

/// Parses an opened pack header (its plaintext): `data_end` is where the blobs end, the
/// start of the sealed header, which no entry may pass. [`read_header`] opens the header
/// and calls this; it is public for the fuzz targets (`fuzz/`).
///
/// # Errors
/// Bad magic or version, a length that does not match the count, an unknown kind, or an
/// entry past `data_end`.
pub fn decode_header(
    pack_name: &str,
    header: &[u8],
    data_end: u64,
) -> Result<Vec<PackEntry>, PackError> {
    let bad = |why: &str| PackError::Malformed {
        pack: pack_name.to_string(),
        why: why.into(),
    };
    if header.len() < 9 || &header[..4] != MAGIC || header[4] != 1 {
        return Err(bad("bad magic or version"));
    }
    let count = u32::from_le_bytes([header[5], header[6], header[7], header[8]]) as u64;
    if header.len() as u64 != 9 + count * ENTRY_LEN as u64 {
        return Err(bad("length does not match the entry count"));
    }
    header[9..]
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            let e = decode_entry(c).ok_or_else(|| bad("unknown blob kind"))?;
            if e.offset as u64 + e.length as u64 > data_end {
                return Err(bad("entry past the end of the blobs"));
            }
            Ok(e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::blob;

    #[test]
    fn pack_round_trip_and_tamper() {
        let keys = MasterKeys::generate();
        let mut b = PackBuilder::default();
        let mut ids = vec![];
        for i in 0..5u8 {
            let data = vec![i; 1000 + i as usize];
            let id = BlobId(keys.blob_id(&data));
            b.add(
                BlobKind::Data,
                id,
                &blob::encode(&keys, BlobKind::Data, &id, &data, 3),
                data.len() as u32,
            );
            ids.push(id);
        }
        let p = b.finish(&keys);
        let entries = read_header(&keys, "p", &p.bytes).unwrap();
        assert_eq!(entries, p.entries);
        for e in &entries {
            let s = &p.bytes[e.offset as usize..(e.offset + e.length) as usize];
            let out = blob::decode(&keys, e.kind, &e.id, s, e.raw_length as usize).unwrap();
            assert_eq!(BlobId(keys.blob_id(&out)), e.id);
        }
        for cut in [0, 3, p.bytes.len() / 2, p.bytes.len() - 1] {
            assert!(read_header(&keys, "p", &p.bytes[..cut]).is_err());
        }
        let mut flipped = p.bytes.clone();
        let at = flipped.len() - 10;
        flipped[at] ^= 1;
        assert!(read_header(&keys, "p", &flipped).is_err());
    }
}
