//! The master keys of a repository: the encryption keys (one per generation), the blob-id
//! key and the chunker secret. Created once at `init`, wrapped by every key file.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{rand_core::RngCore, OsRng};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

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
        // The hex copy lives on the stack and is wiped, not in a String left in freed memory.
        let mut buf = Zeroizing::new([0u8; 64]);
        hex::encode_to_slice(self.0, &mut buf[..])
            .map_err(|_| serde::ser::Error::custom("hex encoding of a key"))?;
        let text = std::str::from_utf8(&buf[..])
            .map_err(|_| serde::ser::Error::custom("hex encoding of a key"))?;
        s.serialize_str(text)
    }
}

/// Decodes the hex of a key straight from the deserializer's text, copying it nowhere.
struct Secret32Visitor;

impl serde::de::Visitor<'_> for Secret32Visitor {
    type Value = Secret32;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("64 hex digits")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret32, E> {
        let mut out = Secret32([0u8; 32]);
        // The error names no digit of the key.
        hex::decode_to_slice(v, &mut out.0).map_err(|_| E::custom("a key is not 64 hex digits"))?;
        Ok(out)
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret32, E> {
        let v = Zeroizing::new(v);
        self.visit_str(&v)
    }
}

impl<'de> Deserialize<'de> for Secret32 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(Secret32Visitor)
    }
}

/// An [`std::io::Write`] into a buffer that is wiped when dropped and never grown in place:
/// when it must grow, the bytes move to a new buffer and the old one is wiped, so no copy of
/// what was written stays behind in freed memory (as `Vec`'s own reallocation would leave).
pub struct SecretBuf(Zeroizing<Vec<u8>>);

impl SecretBuf {
    /// An empty buffer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        SecretBuf(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    /// The bytes written.
    pub fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl std::io::Write for SecretBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let need = self.0.len() + b.len();
        if need > self.0.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(self.0.capacity() * 2)));
            bigger.extend_from_slice(&self.0);
            // The old buffer is wiped here, as it is dropped.
            self.0 = bigger;
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
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

    /// The keys as JSON (each key 64 hex digits), in a buffer that is wiped when dropped;
    /// no other copy of the hex is left behind.
    ///
    /// # Errors
    /// None in practice: every field serializes.
    pub fn to_json(&self) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
        // Room for the three fields and a few generations without growing.
        let mut buf = SecretBuf::with_capacity(256 + 80 * self.enc_keys.len());
        serde_json::to_writer(&mut buf, self)?;
        Ok(buf.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_serialize_into_a_wiped_buffer_and_round_trip() {
        let mut keys = MasterKeys::generate();
        for g in 2..40 {
            keys.enc_keys.insert(g, Secret32::random());
        }
        // The type is the point: the JSON with the hex of every key is wiped when dropped.
        let json: Zeroizing<Vec<u8>> = keys.to_json().unwrap();
        assert_eq!(*json, serde_json::to_vec(&keys).unwrap());
        let back: MasterKeys = serde_json::from_slice(&json).unwrap();
        assert!(back.id_key == keys.id_key && back.chunker_secret == keys.chunker_secret);
        assert!(back.enc_keys == keys.enc_keys);
        // Escaped text (not borrowable from the input) decodes too.
        let hex = hex::encode(keys.id_key.0);
        let escaped = format!("\"\\u00{:x}{}\"", hex.as_bytes()[0], &hex[1..]);
        let k: Secret32 = serde_json::from_str(&escaped).unwrap();
        assert!(k == keys.id_key);
        let e = serde_json::from_str::<Secret32>(&format!("\"{}\"", &hex[..63])).unwrap_err();
        assert!(!e.to_string().contains(&hex[..20]), "{e}");
    }

    #[test]
    fn secret_buf_grows_by_moving_and_keeps_every_byte() {
        use std::io::Write;
        let mut b = SecretBuf::with_capacity(4);
        let mut want = vec![];
        for i in 0..1000u32 {
            let chunk = i.to_le_bytes();
            b.write_all(&chunk).unwrap();
            want.extend_from_slice(&chunk);
        }
        assert_eq!(*b.into_inner(), want);
    }
}
