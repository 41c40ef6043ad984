//! Sealing and opening of repository objects with XChaCha20-Poly1305.
//!
//! Sealed layout (all integers little-endian):
//! `version u8 = 1 | key generation u32 | nonce [24] | ciphertext | tag [16]`.
//! The associated data binds the object kind, the version and key generation, and for
//! blobs the blob id, so a blob cannot be moved to another id or an index passed off as a
//! snapshot: `"backupd\0" | kind u8 | version u8 | generation u32 | blob id?`.
//! Nonces are random (24 bytes: no collision risk at any realistic volume).

use chacha20poly1305::aead::{rand_core::RngCore, Aead, AeadInPlace, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::MasterKeys;

/// Format version of the sealed envelope.
pub const SEAL_VERSION: u8 = 1;
/// Bytes a sealed object adds to its plaintext.
pub const SEAL_OVERHEAD: usize = 1 + 4 + 24 + 16;
/// Bytes before the ciphertext: version, generation, nonce.
pub const SEAL_HEADER: usize = 1 + 4 + 24;

/// What a sealed object is; part of the associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ObjectKind {
    /// The repository config.
    Config = 1,
    /// The master-key bundle inside a key file.
    Key = 2,
    /// A data blob inside a pack.
    DataBlob = 3,
    /// A tree blob inside a pack.
    TreeBlob = 4,
    /// The header of a pack.
    PackHeader = 5,
    /// An index file.
    Index = 6,
    /// A snapshot.
    Snapshot = 7,
    /// A PostgreSQL WAL file (the associated data binds its archive name).
    Wal = 8,
    /// A repository lock.
    Lock = 9,
    /// Prune's marks of unused packs.
    Marks = 10,
    /// A grant of generation keys to one key file (inside `generations/<serial>`).
    Grant = 11,
}

/// Why an object could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// Shorter than the envelope itself.
    #[error("truncated ({len} bytes, at least {SEAL_OVERHEAD} needed)")]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// Unknown envelope version.
    #[error("unknown envelope version {0}")]
    Version(u8),
    /// Sealed with a key generation this key file does not hold.
    #[error("sealed with key generation {0}, which this key does not hold")]
    UnknownGeneration(u32),
    /// The authentication tag did not verify: wrong key, or the bytes were changed.
    #[error("authentication failed: corrupt or tampered")]
    Authentication,
}

fn aad(kind: ObjectKind, generation: u32, blob_id: Option<&[u8; 32]>) -> Vec<u8> {
    let mut a = Vec::with_capacity(8 + 1 + 1 + 4 + 32);
    a.extend_from_slice(b"backupd\0");
    a.push(kind as u8);
    a.push(SEAL_VERSION);
    a.extend_from_slice(&generation.to_le_bytes());
    if let Some(id) = blob_id {
        a.extend_from_slice(id);
    }
    a
}

/// Seals `plaintext` with the newest encryption key.
pub fn seal(
    keys: &MasterKeys,
    kind: ObjectKind,
    blob_id: Option<&[u8; 32]>,
    plaintext: &[u8],
) -> Vec<u8> {
    let (generation, key) = keys.current();
    seal_with(&key.0, generation, kind, blob_id, plaintext)
}

/// Seals with an explicit raw key and generation (used for key files).
pub fn seal_with(
    key: &[u8; 32],
    generation: u32,
    kind: ObjectKind,
    blob_id: Option<&[u8; 32]>,
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut nonce = [0u8; 24];
    OsRng.fill_bytes(&mut nonce);
    let ad = aad(kind, generation, blob_id);
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &ad,
            },
        )
        .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
    let mut out = Vec::with_capacity(SEAL_OVERHEAD + plaintext.len());
    out.push(SEAL_VERSION);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

/// Reads the key generation named by a sealed object.
///
/// # Errors
/// `Truncated` or `Version` when the envelope is malformed.
pub fn generation_of(sealed: &[u8]) -> Result<u32, SealError> {
    if sealed.len() < SEAL_OVERHEAD {
        return Err(SealError::Truncated { len: sealed.len() });
    }
    if sealed[0] != SEAL_VERSION {
        return Err(SealError::Version(sealed[0]));
    }
    Ok(u32::from_le_bytes([
        sealed[1], sealed[2], sealed[3], sealed[4],
    ]))
}

/// Opens an object sealed by [`seal`].
///
/// # Errors
/// Any malformed envelope, unknown generation or failed tag.
pub fn open(
    keys: &MasterKeys,
    kind: ObjectKind,
    blob_id: Option<&[u8; 32]>,
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    let generation = generation_of(sealed)?;
    let key = keys
        .generation(generation)
        .ok_or(SealError::UnknownGeneration(generation))?;
    open_with(&key.0, kind, blob_id, sealed)
}

/// Opens in place: the plaintext overwrites the ciphertext inside `sealed`, and the returned
/// slice is it (no allocation; restore decrypts blobs inside the ranged-read buffer).
///
/// # Errors
/// As [`open`]; on failure the contents of `sealed` are unspecified.
pub fn open_in_place<'a>(
    keys: &MasterKeys,
    kind: ObjectKind,
    blob_id: Option<&[u8; 32]>,
    sealed: &'a mut [u8],
) -> Result<&'a mut [u8], SealError> {
    let generation = generation_of(sealed)?;
    let key = keys
        .generation(generation)
        .ok_or(SealError::UnknownGeneration(generation))?;
    let cipher = XChaCha20Poly1305::new((&key.0).into());
    let ad = aad(kind, generation, blob_id);
    let (head, body) = sealed.split_at_mut(29);
    let (ct, tag) = body.split_at_mut(body.len() - 16);
    cipher
        .decrypt_in_place_detached(XNonce::from_slice(&head[5..29]), &ad, ct, (&*tag).into())
        .map_err(|_| SealError::Authentication)?;
    Ok(ct)
}

/// Opens with an explicit raw key (used for key files).
///
/// # Errors
/// Any malformed envelope or failed tag.
pub fn open_with(
    key: &[u8; 32],
    kind: ObjectKind,
    blob_id: Option<&[u8; 32]>,
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    let generation = generation_of(sealed)?;
    let cipher = XChaCha20Poly1305::new(key.into());
    let ad = aad(kind, generation, blob_id);
    cipher
        .decrypt(
            XNonce::from_slice(&sealed[5..29]),
            Payload {
                msg: &sealed[29..],
                aad: &ad,
            },
        )
        .map_err(|_| SealError::Authentication)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn seal_then_open_is_identity(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let keys = MasterKeys::generate();
            let id = keys.blob_id(&data);
            let s = seal(&keys, ObjectKind::DataBlob, Some(&id), &data);
            prop_assert_eq!(s.len(), data.len() + SEAL_OVERHEAD);
            prop_assert_eq!(open(&keys, ObjectKind::DataBlob, Some(&id), &s).unwrap(), data);
        }

        #[test]
        fn open_in_place_matches_open(data in proptest::collection::vec(any::<u8>(), 0..4096), flip in any::<bool>()) {
            let keys = MasterKeys::generate();
            let id = keys.blob_id(&data);
            let mut s = seal(&keys, ObjectKind::DataBlob, Some(&id), &data);
            if flip {
                let i = s.len() / 2;
                s[i] ^= 1;
                prop_assert!(open_in_place(&keys, ObjectKind::DataBlob, Some(&id), &mut s).is_err());
            } else {
                let got = open_in_place(&keys, ObjectKind::DataBlob, Some(&id), &mut s).unwrap();
                prop_assert_eq!(&got[..], &data[..]);
            }
        }

        #[test]
        fn any_bit_flip_is_rejected(data in proptest::collection::vec(any::<u8>(), 0..512), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let keys = MasterKeys::generate();
            let mut s = seal(&keys, ObjectKind::Snapshot, None, &data);
            let i = pos.index(s.len());
            s[i] ^= 1 << bit;
            prop_assert!(open(&keys, ObjectKind::Snapshot, None, &s).is_err());
        }

        #[test]
        fn any_truncation_is_rejected(data in proptest::collection::vec(any::<u8>(), 0..512), cut in any::<prop::sample::Index>()) {
            let keys = MasterKeys::generate();
            let s = seal(&keys, ObjectKind::Index, None, &data);
            let n = cut.index(s.len());
            prop_assert!(open(&keys, ObjectKind::Index, None, &s[..n]).is_err());
        }
    }

    #[test]
    fn kind_and_blob_id_are_bound() {
        let keys = MasterKeys::generate();
        let s = seal(&keys, ObjectKind::Snapshot, None, b"x");
        assert_eq!(
            open(&keys, ObjectKind::Index, None, &s),
            Err(SealError::Authentication)
        );
        let id = [7u8; 32];
        let s = seal(&keys, ObjectKind::DataBlob, Some(&id), b"x");
        assert_eq!(
            open(&keys, ObjectKind::DataBlob, Some(&[8u8; 32]), &s),
            Err(SealError::Authentication)
        );
        let other = MasterKeys::generate();
        assert!(open(&other, ObjectKind::DataBlob, Some(&id), &s).is_err());
    }
}
