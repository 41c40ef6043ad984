//! Key files: the master keys wrapped by a key derived from a password with Argon2id.
//!
//! A key file is a small JSON envelope: the KDF parameters and salt in clear (they are
//! needed to derive the wrapping key), and the sealed master-key bundle. Tampering with the
//! parameters only yields a different wrapping key, so the seal fails closed. Its name in
//! the repository is the SHA-256 of its bytes.
//!
//! The parameters are read before anything in the file is authenticated, so their cost is
//! capped at four times the defaults ([`KdfParams::MAX_M_COST_KIB`] and its siblings): a
//! file above the cap is refused as malformed without running the KDF. Anyone who can
//! write to the store can still add key files at the cap; the repository opener tries the
//! key that worked last time first (`repo::keyhint`) so that they cost nothing then.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{rand_core::RngCore, OsRng};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::aead::{open_with, seal_with, ObjectKind};
use super::MasterKeys;

/// Why a key file could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Not a key file (bad JSON, missing fields, wrong hex).
    #[error("malformed key file: {0}")]
    Malformed(String),
    /// The password did not open this key file (or the file was tampered with).
    #[error("wrong password or tampered key file")]
    WrongPassword,
    /// The KDF rejected its parameters.
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

/// Argon2id parameters stored in a key file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    /// Always "argon2id".
    pub algorithm: String,
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
    /// Random salt, hex.
    pub salt: String,
}

impl KdfParams {
    /// The defaults for new key files: 64 MiB, 3 passes, 2 lanes (`backupd init`, which runs it
    /// once, took 0.19–0.33 s in the bench runs here).
    pub fn new_default() -> Self {
        let mut salt = [0u8; 16];
        OsRng.fill_bytes(&mut salt);
        KdfParams {
            algorithm: "argon2id".into(),
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 2,
            salt: hex::encode(salt),
        }
    }

    /// Largest memory cost accepted: 256 MiB, four times the default.
    pub const MAX_M_COST_KIB: u32 = 256 * 1024;
    /// Largest number of passes accepted: four times the default.
    pub const MAX_T_COST: u32 = 12;
    /// Largest number of lanes accepted: four times the default.
    pub const MAX_P_COST: u32 = 8;

    /// Checks what can be checked without running the KDF: the algorithm, the cost caps
    /// and the salt's encoding.
    ///
    /// # Errors
    /// `Malformed` naming the field at fault.
    pub fn check(&self) -> Result<(), KeyFileError> {
        if self.algorithm != "argon2id" {
            return Err(KeyFileError::Malformed(format!(
                "unknown KDF algorithm {:?}",
                self.algorithm
            )));
        }
        // Nothing in a key file is authenticated before the KDF has run, so its cost is
        // whatever the file says: refuse more than four times the defaults instead of
        // spending up to gigabytes and minutes on a file anyone with write access to the
        // store could have planted.
        if self.m_cost_kib > Self::MAX_M_COST_KIB
            || self.t_cost > Self::MAX_T_COST
            || self.p_cost > Self::MAX_P_COST
        {
            return Err(KeyFileError::Malformed(format!(
                "KDF cost above the limit: m_cost_kib {} (at most {}), t_cost {} (at most {}), p_cost {} (at most {})",
                self.m_cost_kib,
                Self::MAX_M_COST_KIB,
                self.t_cost,
                Self::MAX_T_COST,
                self.p_cost,
                Self::MAX_P_COST
            )));
        }
        if hex::decode(&self.salt).is_err() {
            return Err(KeyFileError::Malformed("salt is not hex".into()));
        }
        Ok(())
    }

    fn derive(&self, password: &[u8]) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
        self.check()?;
        let salt = hex::decode(&self.salt)
            .map_err(|_| KeyFileError::Malformed("salt is not hex".into()))?;
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| KeyFileError::Kdf(e.to_string()))?;
        let mut out = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(password, &salt, out.as_mut())
            .map_err(|e| KeyFileError::Kdf(e.to_string()))?;
        Ok(out)
    }
}

/// A key file as stored in `keys/<id>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Envelope version (1).
    pub version: u32,
    /// When it was made (RFC 3339).
    pub created: String,
    /// Host it was made on.
    pub host: String,
    /// User who made it.
    pub username: String,
    /// Password KDF.
    pub kdf: KdfParams,
    /// Sealed master-key bundle, hex.
    pub data: String,
}

impl KeyFile {
    /// Wraps `keys` under `password`.
    ///
    /// # Errors
    /// Only if the KDF fails.
    pub fn create(
        keys: &MasterKeys,
        password: &[u8],
        host: &str,
        username: &str,
    ) -> Result<Self, KeyFileError> {
        let kdf = KdfParams::new_default();
        let wrap = kdf.derive(password)?;
        // The keys' hex JSON, wiped when dropped (and never left behind by a growing Vec).
        let plain = keys
            .to_json()
            .map_err(|e| KeyFileError::Malformed(e.to_string()))?;
        let sealed = seal_with(&wrap, 0, ObjectKind::Key, None, &plain);
        Ok(KeyFile {
            version: 1,
            created: chrono::Utc::now().to_rfc3339(),
            host: host.into(),
            username: username.into(),
            kdf,
            data: hex::encode(sealed),
        })
    }

    /// Parses the stored bytes.
    ///
    /// # Errors
    /// `Malformed` when they are not a key file.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeyFileError> {
        let kf: KeyFile =
            serde_json::from_slice(bytes).map_err(|e| KeyFileError::Malformed(e.to_string()))?;
        if kf.version != 1 {
            return Err(KeyFileError::Malformed(format!(
                "unknown key file version {}",
                kf.version
            )));
        }
        Ok(kf)
    }

    /// Serialized bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a key file always serializes")
    }

    /// Unwraps the master keys with `password`. Runs the KDF only once
    /// [`KdfParams::check`] has passed.
    ///
    /// # Errors
    /// `WrongPassword` when the seal does not open; `Malformed` for bad fields or a KDF
    /// cost above the caps.
    pub fn open(&self, password: &[u8]) -> Result<MasterKeys, KeyFileError> {
        let wrap = self.kdf.derive(password)?;
        let sealed = hex::decode(&self.data)
            .map_err(|_| KeyFileError::Malformed("data is not hex".into()))?;
        let plain = Zeroizing::new(
            open_with(&wrap, ObjectKind::Key, None, &sealed)
                .map_err(|_| KeyFileError::WrongPassword)?,
        );
        let keys: MasterKeys = serde_json::from_slice(&plain)
            .map_err(|e| KeyFileError::Malformed(format!("master key bundle: {e}")))?;
        if keys.enc_keys.is_empty() {
            return Err(KeyFileError::Malformed(
                "no encryption key in bundle".into(),
            ));
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let keys = MasterKeys::generate();
        let kf = KeyFile::create(&keys, b"correct horse", "h", "u").unwrap();
        let parsed = KeyFile::parse(&kf.to_bytes()).unwrap();
        let back = parsed.open(b"correct horse").unwrap();
        assert!(back.id_key == keys.id_key);
        assert!(matches!(
            parsed.open(b"wrong"),
            Err(KeyFileError::WrongPassword)
        ));
        let mut tampered = parsed.clone();
        tampered.kdf.t_cost += 1;
        assert!(tampered.open(b"correct horse").is_err());
    }

    #[test]
    fn kdf_cost_above_four_times_the_defaults_is_malformed() {
        let defaults = KdfParams::new_default();
        let at_cap = KdfParams {
            m_cost_kib: 4 * defaults.m_cost_kib,
            t_cost: 4 * defaults.t_cost,
            p_cost: 4 * defaults.p_cost,
            ..defaults.clone()
        };
        at_cap.check().unwrap();
        let keys = MasterKeys::generate();
        let kf = KeyFile::create(&keys, b"pw", "h", "u").unwrap();
        for over in [
            KdfParams {
                m_cost_kib: at_cap.m_cost_kib + 1,
                ..at_cap.clone()
            },
            KdfParams {
                t_cost: at_cap.t_cost + 1,
                ..at_cap.clone()
            },
            KdfParams {
                p_cost: at_cap.p_cost + 1,
                ..at_cap.clone()
            },
            // Cheap enough to run, were it run: the cap on memory alone refuses it.
            KdfParams {
                m_cost_kib: 512 * 1024,
                t_cost: 1,
                p_cost: 1,
                ..at_cap.clone()
            },
        ] {
            let mut f = kf.clone();
            f.kdf = over.clone();
            match f.open(b"pw") {
                Err(KeyFileError::Malformed(why)) => {
                    assert!(why.contains("above the limit"), "{why}")
                }
                other => panic!("{over:?}: {:?}", other.map(|_| ())),
            }
        }
    }
}
