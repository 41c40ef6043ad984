//! Key files: secrets wrapped by a key derived from a password with Argon2id.
//!
//! A key file is a small JSON envelope: the KDF parameters and salt in clear (they are
//! needed to derive the wrapping key), and what it wraps — version 1: the whole master-key
//! bundle; version 2: its own X25519 secret key (the public key, authenticated, in clear)
//! and the two secrets that never change, the encryption keys coming from its grant in the
//! newest `generations/` bundle (decision 0014). Tampering with the
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
use super::generations::{public_key_mac, verify_public_key_mac, KeyPair};
use super::{MasterKeys, Secret32};

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
    /// 1: `data` wraps the master-key bundle itself; 2: `data` wraps the key file's X25519
    /// secret key and the two secrets that never change, and the encryption keys come from
    /// its grant in the newest `generations/` bundle (decision 0014).
    pub version: u32,
    pub created: String,
    pub host: String,
    pub username: String,
    pub kdf: KdfParams,
    /// Version 2: hex of the X25519 public key grants are sealed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Version 2: the public key's authentication code (see `generations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_mac: Option<String>,
    /// Version 2: a recovery-code key file (`key add --recovery`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovery: bool,
    pub data: String,
}

/// What a version-2 key file wraps.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PairPrivate {
    secret_key: Secret32,
    id_key: Secret32,
    chunker_secret: Secret32,
}

/// A version-2 key file, opened: its key pair and the secrets that never change.
pub struct PairKey {
    /// The key pair grants are sealed to.
    pub pair: KeyPair,
    /// The blob-id key.
    pub id_key: Secret32,
    /// The chunker secret.
    pub chunker_secret: Secret32,
}

/// A key file, opened.
pub enum OpenedKey {
    /// Version 1: the whole bundle.
    Legacy(MasterKeys),
    /// Version 2: the key pair (the encryption keys are in its grant).
    Pair(PairKey),
}

impl KeyFile {
    /// A version-1 key file wrapping `keys` (repositories without key generations).
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
            public_key: None,
            public_key_mac: None,
            recovery: false,
            data: hex::encode(sealed),
        })
    }

    /// A version-2 key file with a fresh key pair, for a repository whose secrets are
    /// `id_key` and `chunker_secret`; returns it with what it wraps.
    pub fn create_pair(
        id_key: &Secret32,
        chunker_secret: &Secret32,
        password: &[u8],
        host: &str,
        username: &str,
        recovery: bool,
    ) -> Result<(Self, PairKey), KeyFileError> {
        let kdf = KdfParams::new_default();
        let wrap = kdf.derive(password)?;
        let pair = KeyPair::generate();
        let private = PairPrivate {
            secret_key: pair.secret_bytes(),
            id_key: id_key.clone(),
            chunker_secret: chunker_secret.clone(),
        };
        let mut buf = super::master::SecretBuf::with_capacity(256);
        serde_json::to_writer(&mut buf, &private)
            .map_err(|e| KeyFileError::Malformed(e.to_string()))?;
        let sealed = seal_with(&wrap, 0, ObjectKind::Key, None, &buf.into_inner());
        let public = pair.public;
        Ok((
            KeyFile {
                version: 2,
                created: chrono::Utc::now().to_rfc3339(),
                host: host.into(),
                username: username.into(),
                kdf,
                public_key: Some(hex::encode(public)),
                public_key_mac: Some(public_key_mac(id_key, &public, recovery)),
                recovery,
                data: hex::encode(sealed),
            },
            PairKey {
                pair,
                id_key: id_key.clone(),
                chunker_secret: chunker_secret.clone(),
            },
        ))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, KeyFileError> {
        let kf: KeyFile =
            serde_json::from_slice(bytes).map_err(|e| KeyFileError::Malformed(e.to_string()))?;
        match kf.version {
            1 if kf.public_key.is_none() && kf.public_key_mac.is_none() && !kf.recovery => {}
            2 if kf.public_key.is_some() && kf.public_key_mac.is_some() => {}
            1 | 2 => {
                return Err(KeyFileError::Malformed(format!(
                    "fields do not match key file version {}",
                    kf.version
                )))
            }
            v => {
                return Err(KeyFileError::Malformed(format!(
                    "unknown key file version {v}"
                )))
            }
        }
        Ok(kf)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a key file always serializes")
    }

    /// The public key of a version-2 key file whose authentication code holds under
    /// `id_key` (None: version 1, or not made by a holder of this repository's keys).
    pub fn verified_public_key(&self, id_key: &Secret32) -> Option<[u8; 32]> {
        let mut public = [0u8; 32];
        hex::decode_to_slice(self.public_key.as_ref()?, &mut public).ok()?;
        verify_public_key_mac(
            id_key,
            &public,
            self.recovery,
            self.public_key_mac.as_ref()?,
        )
        .then_some(public)
    }

    pub fn open(&self, password: &[u8]) -> Result<OpenedKey, KeyFileError> {
        let wrap = self.kdf.derive(password)?;
        self.open_with_wrapping_key(&wrap)
    }

    /// What [`KeyFile::open`] does once the KDF has given the wrapping key: opens `data`
    /// and decodes what it wraps. Public for the fuzz targets (`fuzz/`), which cannot
    /// afford an Argon2id run per input.
    ///
    /// # Errors
    /// `data` that is not hex, does not open under `wrap`, or does not decode.
    #[doc(hidden)]
    pub fn open_with_wrapping_key(&self, wrap: &[u8; 32]) -> Result<OpenedKey, KeyFileError> {
        let sealed = hex::decode(&self.data)
            .map_err(|_| KeyFileError::Malformed("data is not hex".into()))?;
        let plain = Zeroizing::new(
            open_with(wrap, ObjectKind::Key, None, &sealed)
                .map_err(|_| KeyFileError::WrongPassword)?,
        );
        if self.version == 1 {
            let keys: MasterKeys = serde_json::from_slice(&plain)
                .map_err(|e| KeyFileError::Malformed(format!("master key bundle: {e}")))?;
            if keys.enc_keys.is_empty() {
                return Err(KeyFileError::Malformed(
                    "no encryption key in bundle".into(),
                ));
            }
            return Ok(OpenedKey::Legacy(keys));
        }
        let p: PairPrivate = serde_json::from_slice(&plain)
            .map_err(|e| KeyFileError::Malformed(format!("key pair: {e}")))?;
        let pair = KeyPair::from_secret(&p.secret_key);
        // The public key in clear must be this secret's, authenticated by these secrets.
        if self.verified_public_key(&p.id_key) != Some(pair.public) {
            return Err(KeyFileError::Malformed(
                "its public key does not match its secret key".into(),
            ));
        }
        Ok(OpenedKey::Pair(PairKey {
            pair,
            id_key: p.id_key,
            chunker_secret: p.chunker_secret,
        }))
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
        let OpenedKey::Legacy(back) = parsed.open(b"correct horse").unwrap() else {
            panic!("a version-1 key file opens as one")
        };
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

    #[test]
    fn a_pair_key_file_opens_with_its_password_and_its_public_key_is_bound() {
        let (id_key, chunker) = (Secret32::random(), Secret32::random());
        let (kf, made) = KeyFile::create_pair(&id_key, &chunker, b"pw", "h", "u", false).unwrap();
        let public = made.pair.public;
        let parsed = KeyFile::parse(&kf.to_bytes()).unwrap();
        assert_eq!(parsed.version, 2);
        assert_eq!(parsed.verified_public_key(&id_key), Some(public));
        assert_eq!(parsed.verified_public_key(&Secret32::random()), None);
        let OpenedKey::Pair(p) = parsed.open(b"pw").unwrap() else {
            panic!("a version-2 key file opens as a pair")
        };
        assert!(p.id_key == id_key && p.chunker_secret == chunker && p.pair.public == public);
        assert!(matches!(
            parsed.open(b"no"),
            Err(KeyFileError::WrongPassword)
        ));
        // Another key file's public key (with its valid MAC) in this one: refused at open.
        let (other, _) = KeyFile::create_pair(&id_key, &chunker, b"pw2", "h", "u", false).unwrap();
        let mut swapped = parsed.clone();
        swapped.public_key = other.public_key.clone();
        swapped.public_key_mac = other.public_key_mac.clone();
        assert!(matches!(
            swapped.open(b"pw"),
            Err(KeyFileError::Malformed(_))
        ));
        // The recovery flag is part of what the MAC covers.
        let mut flagged = parsed.clone();
        flagged.recovery = true;
        assert_eq!(flagged.verified_public_key(&id_key), None);
        // A version-1 file claiming a public key, or a version-2 one without: malformed.
        let mut v: serde_json::Value = serde_json::from_slice(&kf.to_bytes()).unwrap();
        v["version"] = 1.into();
        assert!(KeyFile::parse(&serde_json::to_vec(&v).unwrap()).is_err());
    }
}
