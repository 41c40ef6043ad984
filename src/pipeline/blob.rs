//! Blobs: the unit of deduplication. A blob id is HMAC-SHA256(id_key, plaintext); a stored
//! blob is `seal(compression byte | payload)` with the id bound into the AEAD.

use std::cell::RefCell;
use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};

use crate::crypto::{self, MasterKeys, ObjectKind, SealError};
use crate::pipeline::ChunkerParams;

/// A 32-byte content address (blob, pack, index, snapshot or key id).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(BlobId(b))
    }

    /// First 8 hex digits, for humans.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BlobId::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// What a blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum BlobKind {
    /// File content.
    Data = 1,
    /// A directory listing (JSON) or a list of content ids.
    Tree = 2,
}

impl BlobKind {
    /// From the stored byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(BlobKind::Data),
            2 => Some(BlobKind::Tree),
            _ => None,
        }
    }

    /// `data` or `tree`, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            BlobKind::Data => "data",
            BlobKind::Tree => "tree",
        }
    }

    pub fn object_kind(self) -> ObjectKind {
        match self {
            BlobKind::Data => ObjectKind::DataBlob,
            BlobKind::Tree => ObjectKind::TreeBlob,
        }
    }
}

/// The largest plaintext of a tree blob: a directory's listing (JSON, one node per entry,
/// a file's chunk ids inline up to 4096 of them) or a content list (at most 128 KiB).
/// Trees are not chunked, so this is not the chunker's bound: 1 GiB is some three million
/// directory entries. The write pipeline refuses a larger tree, and readers refuse an index
/// or pack entry claiming one, before any allocation is sized by it.
pub const MAX_TREE_BLOB: u32 = 1 << 30;

/// The largest plaintext a blob may have, by kind: what sizes the buffer a blob is
/// decompressed into is this, never a length read from the repository alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLimits {
    /// Data blobs: chunks (at most the chunker's `max_size`) or fixed-size blocks.
    pub data: u32,
    /// Tree blobs: [`MAX_TREE_BLOB`].
    pub tree: u32,
}

impl BlobLimits {
    /// What a blob of any repository may be: data up to the largest `max_size` a config may
    /// name (64 MiB, [`ChunkerParams::is_valid`]).
    pub const ANY: BlobLimits = BlobLimits {
        data: 64 * 1024 * 1024,
        tree: MAX_TREE_BLOB,
    };

    /// The limits of a repository whose config has these chunker bounds: data blobs are
    /// chunks of at most `max_size`, or the fixed-size blocks PostgreSQL relation files are
    /// read in ([`crate::postgres::basebackup::RELATION_BLOCK`]).
    pub fn for_chunker(c: &ChunkerParams) -> Self {
        let fixed = crate::postgres::basebackup::RELATION_BLOCK as u32;
        BlobLimits {
            data: c.max_size.max(fixed).min(Self::ANY.data),
            tree: MAX_TREE_BLOB,
        }
    }

    /// The largest plaintext of a blob of `kind`.
    pub fn max_len(&self, kind: BlobKind) -> u32 {
        match kind {
            BlobKind::Data => self.data,
            BlobKind::Tree => self.tree,
        }
    }

    /// Checks the lengths an index or pack header gives for a blob: the plaintext within
    /// the limit of its kind, and a sealed length that a blob of that plaintext can have
    /// (a flag byte, then the plaintext or a smaller compressed form, then the seal).
    ///
    /// # Errors
    /// What is wrong, for the caller to name the object.
    pub fn check(&self, kind: BlobKind, length: u32, raw_length: u32) -> Result<(), String> {
        let max = self.max_len(kind);
        if raw_length > max {
            return Err(format!(
                "raw length {raw_length} above the {max}-byte limit of a {} blob",
                kind.as_str()
            ));
        }
        let least = 1 + crypto::SEAL_OVERHEAD as u64;
        let most = raw_length as u64 + least;
        if !(least..=most).contains(&(length as u64)) {
            return Err(format!(
                "sealed length {length} impossible for raw length {raw_length}"
            ));
        }
        Ok(())
    }
}

/// Why a stored blob could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The seal did not open.
    #[error("blob {id}: {source}")]
    Seal {
        /// Which blob.
        id: BlobId,
        /// Why.
        source: SealError,
    },
    /// Unknown compression byte or a zstd stream that does not decode.
    #[error("blob {id}: bad payload: {why}")]
    Payload {
        /// Which blob.
        id: BlobId,
        /// Why.
        why: String,
    },
}

const RAW: u8 = 0;
const ZSTD: u8 = 1;

thread_local! {
    /// One zstd context per thread, reused for every blob: creating one per blob cost 4 % of
    /// a restore's CPU (perf, bench corpus).
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Runs `f` with this thread's compressor at `level`; `None` when zstd fails (the caller
/// stores the blob raw).
fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> io::Result<T>,
) -> Option<T> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = slot.as_mut()?;
        f(c).ok()
    })
}

/// Runs `f` with this thread's decompressor.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> io::Result<T>,
) -> io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => f(d),
            None => Err(io::Error::other("no zstd context")),
        }
    })
}

/// Up to this raw length, a compressed blob's output buffer is reserved whole up front
/// (twice the default chunker's largest chunk: every data blob of a default repository).
const RESERVE_WHOLE: usize = 16 << 20;

/// Decompresses `payload` into `out` (cleared), producing at most `raw_len + 1` bytes. Up to
/// [`RESERVE_WHOLE`], in one call into a buffer of `raw_len`; above, as a stream whose
/// buffer grows with the bytes that come out: `raw_len` is what the index says, so a tree
/// claiming 1 GiB behind a few bytes of zstd must not take 1 GiB (found by `fuzz/`'s
/// `tree` target).
fn decompress_into(payload: &[u8], raw_len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    if raw_len <= RESERVE_WHOLE {
        out.reserve(raw_len);
        return with_decompressor(|d| d.decompress_to_buffer(payload, out)).map(|_| ());
    }
    use std::io::Read;
    out.reserve(RESERVE_WHOLE);
    zstd::stream::read::Decoder::with_buffer(payload)?
        .take(raw_len as u64 + 1)
        .read_to_end(out)
        .map(|_| ())
}

/// Compresses (when it shrinks) and seals one blob.
pub fn encode(
    keys: &MasterKeys,
    kind: BlobKind,
    id: &BlobId,
    plaintext: &[u8],
    zstd_level: i32,
) -> Vec<u8> {
    // Compress straight after the flag byte, into at most as many bytes as the plaintext:
    // output that would not shrink fails to fit, and the blob is stored raw.
    let mut framed = std::io::Cursor::new(Vec::with_capacity(plaintext.len() + 1));
    framed.get_mut().push(ZSTD);
    framed.set_position(1);
    let compressed_ok = zstd_level > 0
        && with_compressor(zstd_level, |c| c.compress_to_buffer(plaintext, &mut framed))
            .is_some_and(|n| n < plaintext.len());
    let mut framed = framed.into_inner();
    if !compressed_ok {
        framed.clear();
        framed.push(RAW);
        framed.extend_from_slice(plaintext);
    }
    crypto::seal(keys, kind.object_kind(), Some(&id.0), &framed)
}

/// Seals one blob again with the newest generation of `keys` (which must also hold the
/// one it is sealed with), after checking that it opens and decodes to its id; the
/// compressed payload is kept as it is. `key retire` and prune's repack use it, so that a
/// pack's blobs share its header's generation.
///
/// # Errors
/// A blob that does not open, decode, or match its id.
pub fn reseal(
    keys: &MasterKeys,
    kind: BlobKind,
    id: &BlobId,
    sealed: &[u8],
    raw_len: usize,
) -> Result<Vec<u8>, BlobError> {
    let mut opened = sealed.to_vec();
    let mut scratch = Vec::new();
    let plain = decode_in_place(keys, kind, id, &mut opened, raw_len, &mut scratch)?;
    if keys.blob_id(plain) != id.0 {
        return Err(BlobError::Payload {
            id: *id,
            why: "its content does not match its id".into(),
        });
    }
    // `opened` holds the envelope header, then the framed payload (opened in place), then
    // the tag: the framed payload is sealed again as it is.
    let framed = &opened[crypto::SEAL_HEADER..opened.len() - 16];
    Ok(crypto::seal(keys, kind.object_kind(), Some(&id.0), framed))
}

/// Opens and decompresses one blob; `raw_len` bounds the output.
///
/// # Errors
/// A seal that does not open, or a payload that does not decode to `raw_len` bytes.
pub fn decode(
    keys: &MasterKeys,
    kind: BlobKind,
    id: &BlobId,
    sealed: &[u8],
    raw_len: usize,
) -> Result<Vec<u8>, BlobError> {
    let mut buf = sealed.to_vec();
    let mut scratch = Vec::new();
    let len = decode_in_place(keys, kind, id, &mut buf, raw_len, &mut scratch)?.len();
    if !scratch.is_empty() {
        // Compressed: the output is in `scratch`.
        return Ok(scratch);
    }
    // Stored raw (or empty): the output is in `buf`, after the envelope header and the
    // compression byte.
    let start = crypto::SEAL_HEADER + 1;
    buf.truncate(start + len);
    buf.drain(..start);
    Ok(buf)
}

/// Like [`decode`], but opens the blob inside `sealed` (which it overwrites) and returns a
/// raw blob as a slice of it, a compressed one decompressed into `scratch` (its allocation
/// reused): no allocation per blob.
///
/// # Errors
/// As [`decode`].
pub fn decode_in_place<'a>(
    keys: &MasterKeys,
    kind: BlobKind,
    id: &BlobId,
    sealed: &'a mut [u8],
    raw_len: usize,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], BlobError> {
    // `raw_len` comes from an index or pack header: bound it before it sizes a buffer.
    let max = BlobLimits::ANY.max_len(kind) as usize;
    if raw_len > max {
        return Err(BlobError::Payload {
            id: *id,
            why: format!(
                "raw length {raw_len} above the {max}-byte limit of a {} blob",
                kind.as_str()
            ),
        });
    }
    let framed = crypto::open_in_place(keys, kind.object_kind(), Some(&id.0), sealed)
        .map_err(|source| BlobError::Seal { id: *id, source })?;
    let (flag, payload) = framed.split_first().ok_or_else(|| BlobError::Payload {
        id: *id,
        why: "empty".into(),
    })?;
    let out: &'a [u8] = match *flag {
        RAW => payload,
        ZSTD => {
            scratch.clear();
            decompress_into(payload, raw_len, scratch).map_err(|e| BlobError::Payload {
                id: *id,
                why: format!("zstd: {e}"),
            })?;
            &scratch[..]
        }
        other => {
            return Err(BlobError::Payload {
                id: *id,
                why: format!("unknown compression {other}"),
            })
        }
    };
    if out.len() != raw_len {
        return Err(BlobError::Payload {
            id: *id,
            why: format!("{} bytes, index says {raw_len}", out.len()),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn decode_in_place_matches_decode(data in proptest::collection::vec(0u8..4, 0..20_000), level in 0i32..4) {
            let keys = MasterKeys::generate();
            let id = BlobId(keys.blob_id(&data));
            let sealed = encode(&keys, BlobKind::Data, &id, &data, level);
            let copied = decode(&keys, BlobKind::Data, &id, &sealed, data.len()).unwrap();
            let mut buf = sealed.clone();
            let mut scratch = Vec::new();
            let in_place = decode_in_place(&keys, BlobKind::Data, &id, &mut buf, data.len(), &mut scratch).unwrap();
            prop_assert_eq!(&copied[..], in_place);
            prop_assert_eq!(&copied[..], &data[..]);
        }

        #[test]
        fn encode_decode_round_trips(data in proptest::collection::vec(0u8..4, 0..20_000), level in 0i32..4) {
            let keys = MasterKeys::generate();
            let id = BlobId(keys.blob_id(&data));
            let sealed = encode(&keys, BlobKind::Data, &id, &data, level);
            prop_assert_eq!(decode(&keys, BlobKind::Data, &id, &sealed, data.len()).unwrap(), data);
            prop_assert!(decode(&keys, BlobKind::Tree, &id, &sealed, 0).is_err());
        }

        #[test]
        fn blob_id_hex_round_trips(b in any::<[u8; 32]>()) {
            let id = BlobId(b);
            prop_assert_eq!(BlobId::from_hex(&id.to_hex()), Some(id));
        }
    }

    #[test]
    fn fuzz_tree_a_large_raw_length_behind_an_empty_zstd_payload_reserves_nothing() {
        // fuzz/ `tree`, minimized: raw length 0x1f012622 (520 MB, within the 1 GiB tree
        // limit), then the flag byte of zstd and no payload. The output buffer was reserved
        // from the raw length alone before a byte was decompressed.
        let crash = [0x22u8, 0x26, 0x01, 0x1f, 0x01];
        let raw_len = u32::from_le_bytes([crash[0], crash[1], crash[2], crash[3]]) as usize;
        let keys = MasterKeys::generate();
        let id = BlobId([7u8; 32]);
        let sealed = crypto::seal(&keys, ObjectKind::TreeBlob, Some(&id.0), &crash[4..]);
        assert!(decode(&keys, BlobKind::Tree, &id, &sealed, raw_len).is_err());
        let mut buf = sealed.clone();
        let mut scratch = Vec::new();
        assert!(
            decode_in_place(&keys, BlobKind::Tree, &id, &mut buf, raw_len, &mut scratch).is_err()
        );
        assert!(
            scratch.capacity() <= RESERVE_WHOLE,
            "{}",
            scratch.capacity()
        );
        // A real tree above the whole-reservation size still decodes (the streamed path).
        let big = vec![b'x'; RESERVE_WHOLE + 100];
        let id = BlobId(keys.blob_id(&big));
        let sealed = encode(&keys, BlobKind::Tree, &id, &big, 1);
        assert_eq!(
            decode(&keys, BlobKind::Tree, &id, &sealed, big.len()).unwrap(),
            big
        );
        assert!(decode(&keys, BlobKind::Tree, &id, &sealed, big.len() - 1).is_err());
        assert!(decode(&keys, BlobKind::Tree, &id, &sealed, big.len() + 1).is_err());
    }

    #[test]
    fn a_raw_length_above_the_limit_is_refused_before_any_allocation() {
        let keys = MasterKeys::generate();
        let data = vec![0u8; 100_000];
        let id = BlobId(keys.blob_id(&data));
        let sealed = encode(&keys, BlobKind::Data, &id, &data, 3);
        // Compressed: the raw length would size the output buffer. Reserving usize::MAX
        // panics, and a few GiB would be taken before the zstd stream proved shorter.
        for (kind, raw_len) in [
            (BlobKind::Data, usize::MAX),
            (BlobKind::Data, BlobLimits::ANY.data as usize + 1),
            (BlobKind::Tree, MAX_TREE_BLOB as usize + 1),
        ] {
            let mut buf = sealed.clone();
            let mut scratch = Vec::new();
            let e = decode_in_place(&keys, kind, &id, &mut buf, raw_len, &mut scratch).unwrap_err();
            assert!(e.to_string().contains("above the"), "{e}");
            assert_eq!(scratch.capacity(), 0);
        }
    }

    #[test]
    fn limits_follow_the_chunker_and_the_seal() {
        let l = BlobLimits::for_chunker(&ChunkerParams::default());
        assert_eq!(l.data, 8 * 1024 * 1024);
        assert_eq!(l.tree, MAX_TREE_BLOB);
        let least = 1 + crypto::SEAL_OVERHEAD as u32;
        l.check(BlobKind::Data, least, 0).unwrap();
        l.check(BlobKind::Data, least + l.data, l.data).unwrap();
        l.check(BlobKind::Data, least, l.data).unwrap();
        for (kind, length, raw) in [
            (BlobKind::Data, least, l.data + 1),
            (BlobKind::Tree, least, MAX_TREE_BLOB + 1),
            (BlobKind::Data, least - 1, 10),
            (BlobKind::Data, least + 11, 10),
            (BlobKind::Data, u32::MAX, 1000),
        ] {
            assert!(
                l.check(kind, length, raw).is_err(),
                "{kind:?} {length} {raw}"
            );
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let keys = MasterKeys::generate();
        // splitmix64 output: no pattern zstd can use (a multiplicative sequence, which
        // this test used before, compresses).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..10_000)
            .map(|_| {
                x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = x;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)) as u8
            })
            .collect();
        let id = BlobId(keys.blob_id(&data));
        let sealed = encode(&keys, BlobKind::Data, &id, &data, 3);
        assert_eq!(sealed.len(), data.len() + 1 + crypto::SEAL_OVERHEAD);
        // The flag inside the seal says raw, and the payload is the plaintext itself.
        let framed =
            crypto::open(&keys, BlobKind::Data.object_kind(), Some(&id.0), &sealed).unwrap();
        assert_eq!(framed[0], RAW);
        assert_eq!(&framed[1..], &data[..]);
        assert_eq!(
            decode(&keys, BlobKind::Data, &id, &sealed, data.len()).unwrap(),
            data
        );
    }

    #[test]
    fn compressible_is_stored_compressed() {
        let keys = MasterKeys::generate();
        let data: Vec<u8> = b"backupd ".iter().copied().cycle().take(100_000).collect();
        let id = BlobId(keys.blob_id(&data));
        let sealed = encode(&keys, BlobKind::Data, &id, &data, 3);
        let framed =
            crypto::open(&keys, BlobKind::Data.object_kind(), Some(&id.0), &sealed).unwrap();
        assert_eq!(framed[0], ZSTD);
        assert!(framed.len() < data.len() / 50, "{} bytes", framed.len());
        assert_eq!(
            zstd::bulk::decompress(&framed[1..], data.len()).unwrap(),
            data
        );
        assert_eq!(
            decode(&keys, BlobKind::Data, &id, &sealed, data.len()).unwrap(),
            data
        );
        // Compression off: raw.
        let plain = encode(&keys, BlobKind::Data, &id, &data, 0);
        let framed =
            crypto::open(&keys, BlobKind::Data.object_kind(), Some(&id.0), &plain).unwrap();
        assert_eq!(framed[0], RAW);
    }
}
