//! The master keys of a repository: the encryption keys (one per generation), the blob-id
//! key and the chunker secret. Created once at `init`, wrapped by every key file.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{rand_core::RngCore, OsRng};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A 32-byte secret that is wiped from memory when dropped and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Secret32(pub [u8; 32]);

impl Secret32 {
    /// A fresh random secret from the OS generator.
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        Secret32(b)
    }
}

impl std::fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret32(<redacted>)")
    }
}

impl Serialize for Secret32 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Secret32 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        let r = hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom);
        s.zeroize();
        r.map(|_| Secret32(out))
    }
}

/// All keys of one repository. `id_key` and `chunker_secret` never change (dedup depends on
/// them); encryption keys come in generations so they can rotate.
#[derive(Clone, Serialize, Deserialize)]
pub struct MasterKeys {
    /// HMAC-SHA256 key for blob ids.
    pub id_key: Secret32,
    /// Seeds the chunker's gear table, so chunk boundaries leak nothing.
    pub chunker_secret: Secret32,
    /// Encryption keys by generation; new data is sealed with the highest generation.
    pub enc_keys: BTreeMap<u32, Secret32>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKeys(<redacted>)")
    }
}

impl MasterKeys {
    /// Fresh random keys with one encryption-key generation (1).
    pub fn generate() -> Self {
        let mut enc_keys = BTreeMap::new();
        enc_keys.insert(1, Secret32::random());
        MasterKeys {
            id_key: Secret32::random(),
            chunker_secret: Secret32::random(),
            enc_keys,
        }
    }

    /// The newest generation and its key.
    pub fn current(&self) -> (u32, &Secret32) {
        let (g, k) = self
            .enc_keys
            .iter()
            .next_back()
            .expect("MasterKeys always hold at least one generation");
        (*g, k)
    }

    /// The key of one generation, if this bundle holds it.
    pub fn generation(&self, generation: u32) -> Option<&Secret32> {
        self.enc_keys.get(&generation)
    }

    /// Keyed blob id: HMAC-SHA256(id_key, plaintext).
    pub fn blob_id(&self, data: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.id_key.0)
            .expect("HMAC accepts any key length");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// The 256-entry gear table of the chunker, derived from the chunker secret.
    pub fn gear_table(&self) -> [u64; 256] {
        let mut table = [0u64; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.chunker_secret.0)
                .expect("HMAC accepts any key length");
            mac.update(b"backupd gear v1");
            mac.update(&[i as u8]);
            let out = mac.finalize().into_bytes();
            let mut w = [0u8; 8];
            w.copy_from_slice(&out[..8]);
            *slot = u64::from_le_bytes(w);
        }
        table
    }
}
