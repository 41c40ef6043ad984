//! Key generations in one bundle (`generations/<serial>`): which encryption-key
//! generations are in force, and for every key file a *grant* of their keys, sealed to that
//! key file's X25519 public key — so any password holder can add a generation (or a key)
//! without the other passwords, and a key file left out of the next bundle gets nothing
//! written after it. The bundle and every key file's public key are authenticated with a
//! key derived from `id_key`, which only password holders have (decision 0014).

use std::collections::BTreeMap;

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::aead::{open_with, seal_with, ObjectKind};
use super::master::{Secret32, SecretBuf};

/// The bundle format this build writes and reads.
pub const BUNDLE_VERSION: u32 = 1;

/// Why a bundle or a grant could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GenerationsError {
    /// Not a bundle this build reads.
    #[error("malformed: {0}")]
    Malformed(String),
    /// The authentication code did not verify: not written by a password holder, or
    /// changed since.
    #[error("authentication failed: not written with this repository's keys, or changed since")]
    Authentication,
    /// No grant for the key file.
    #[error("no grant for keys/{0} (the key was removed, or added after this bundle)")]
    NoGrant(String),
    /// The grant did not open with the key file's secret key.
    #[error("the grant for keys/{0} does not open with its secret key")]
    GrantUnreadable(String),
}

/// One generation in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationInfo {
    /// Its number (1, 2, ...).
    pub generation: u32,
    /// When it was created (RFC 3339).
    pub created: String,
}

/// The generations' keys for one key file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The key file's id.
    pub key: String,
    /// Hex of the ephemeral X25519 public key of this grant.
    pub ephemeral: String,
    /// Hex of the sealed [`GrantPlain`].
    pub sealed: String,
}

/// What a grant holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantPlain {
    serial: u64,
    key: String,
    enc_keys: BTreeMap<u32, Secret32>,
}

/// The contents of `generations/<serial>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// [`BUNDLE_VERSION`].
    pub version: u32,
    /// Its serial: the object's name, one more than the bundle it replaced.
    pub serial: u64,
    /// When it was written (RFC 3339).
    pub written: String,
    /// Who wrote it and why (`host`, the verb).
    pub note: String,
    /// Generations in force, ascending; the last is the one new objects are sealed with.
    pub generations: Vec<GenerationInfo>,
    /// Generations removed by `key retire`, for `key list` (their keys are gone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<GenerationInfo>,
    /// One per key file.
    pub grants: Vec<Grant>,
    /// HMAC-SHA256 (hex) under the grant authentication key over the bundle's JSON with
    /// this field empty.
    #[serde(default)]
    pub mac: String,
}

/// The name of bundle `serial` (20 digits, so names sort as numbers).
pub fn bundle_name(serial: u64) -> String {
    format!("{serial:020}")
}

/// The serial a bundle name stands for (None: not a bundle name).
pub fn parse_bundle_name(name: &str) -> Option<u64> {
    (name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()))
        .then(|| name.parse().ok())
        .flatten()
}

type HmacSha256 = Hmac<Sha256>;

/// The grant authentication key: derived from `id_key`, which every password holder and
/// nobody else has.
fn auth_key(id_key: &Secret32) -> Zeroizing<[u8; 32]> {
    let mut m = <HmacSha256 as Mac>::new_from_slice(&id_key.0).expect("HMAC takes any key");
    m.update(b"backupd grant authentication");
    Zeroizing::new(m.finalize().into_bytes().into())
}

fn mac_over(id_key: &Secret32, domain: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m =
        <HmacSha256 as Mac>::new_from_slice(auth_key(id_key).as_ref()).expect("HMAC takes any key");
    m.update(domain);
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

/// The authentication code of a key file's public key (and its recovery flag), hex.
pub fn public_key_mac(id_key: &Secret32, public: &[u8; 32], recovery: bool) -> String {
    hex::encode(
        mac_over(
            id_key,
            b"backupd key file public key\0",
            &[public, &[u8::from(recovery)]],
        )
        .finalize()
        .into_bytes(),
    )
}

/// True when `mac_hex` authenticates `public` (constant time).
pub fn verify_public_key_mac(
    id_key: &Secret32,
    public: &[u8; 32],
    recovery: bool,
    mac_hex: &str,
) -> bool {
    let Ok(tag) = hex::decode(mac_hex) else {
        return false;
    };
    mac_over(
        id_key,
        b"backupd key file public key\0",
        &[public, &[u8::from(recovery)]],
    )
    .verify_slice(&tag)
    .is_ok()
}

/// A key file's X25519 key pair.
pub struct KeyPair {
    /// The secret key (wiped when dropped).
    pub secret: StaticSecret,
    /// Its public key.
    pub public: [u8; 32],
}

impl KeyPair {
    /// A fresh pair from the OS generator.
    pub fn generate() -> Self {
        let secret = Secret32::random();
        Self::from_secret(&secret)
    }

    /// The pair of a stored secret key.
    pub fn from_secret(secret: &Secret32) -> Self {
        let secret = StaticSecret::from(secret.0);
        let public = PublicKey::from(&secret).to_bytes();
        KeyPair { secret, public }
    }

    /// The secret key's bytes.
    pub fn secret_bytes(&self) -> Secret32 {
        Secret32(self.secret.to_bytes())
    }
}

/// The key a grant is sealed with: HKDF-SHA256 over the X25519 shared secret, salted with
/// both public keys.
fn grant_key(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(ephemeral);
    salt[32..].copy_from_slice(recipient);
    let hk = Hkdf::<Sha256>::new(Some(&salt), shared);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(b"backupd generation grant v1", okm.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

fn hex32(s: &str, what: &str) -> Result<[u8; 32], GenerationsError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| GenerationsError::Malformed(format!("{what} is not 64 hex digits")))?;
    Ok(out)
}

impl Grant {
    /// Seals `enc_keys` for key file `key` (public key `recipient`) in bundle `serial`.
    pub fn new(
        serial: u64,
        key: &str,
        recipient: &[u8; 32],
        enc_keys: &BTreeMap<u32, Secret32>,
    ) -> Self {
        let eph = StaticSecret::from(Secret32::random().0);
        let eph_pub = PublicKey::from(&eph).to_bytes();
        let shared = Zeroizing::new(eph.diffie_hellman(&PublicKey::from(*recipient)).to_bytes());
        let k = grant_key(&shared, &eph_pub, recipient);
        let plain = GrantPlain {
            serial,
            key: key.to_string(),
            enc_keys: enc_keys.clone(),
        };
        let mut buf = SecretBuf::with_capacity(128 + 80 * enc_keys.len());
        serde_json::to_writer(&mut buf, &plain).expect("a grant serializes");
        let sealed = seal_with(&k, 0, ObjectKind::Grant, None, &buf.into_inner());
        Grant {
            key: key.to_string(),
            ephemeral: hex::encode(eph_pub),
            sealed: hex::encode(sealed),
        }
    }
}

impl Bundle {
    /// Parses a bundle and checks its authentication code with `id_key`.
    ///
    /// # Errors
    /// `Malformed` or `Authentication`.
    pub fn parse_verified(bytes: &[u8], id_key: &Secret32) -> Result<Bundle, GenerationsError> {
        let b: Bundle = serde_json::from_slice(bytes)
            .map_err(|e| GenerationsError::Malformed(e.to_string()))?;
        if b.version != BUNDLE_VERSION {
            return Err(GenerationsError::Malformed(format!(
                "unknown bundle version {}",
                b.version
            )));
        }
        let tag = hex::decode(&b.mac).map_err(|_| GenerationsError::Authentication)?;
        let body = b.body_bytes();
        mac_over(id_key, b"backupd generations\0", &[&body])
            .verify_slice(&tag)
            .map_err(|_| GenerationsError::Authentication)?;
        if b.generations.is_empty()
            || b.generations
                .windows(2)
                .any(|w| w[0].generation >= w[1].generation)
            || b.generations[0].generation == 0
        {
            return Err(GenerationsError::Malformed(
                "generations empty, unsorted or 0".into(),
            ));
        }
        Ok(b)
    }

    /// The JSON the authentication code covers: the bundle with `mac` empty.
    fn body_bytes(&self) -> Vec<u8> {
        let mut c = self.clone();
        c.mac.clear();
        serde_json::to_vec(&c).expect("a bundle serializes")
    }

    /// Computes the authentication code and returns the stored bytes (pretty JSON).
    pub fn seal_to_bytes(&mut self, id_key: &Secret32) -> Vec<u8> {
        self.mac.clear();
        let body = self.body_bytes();
        self.mac = hex::encode(
            mac_over(id_key, b"backupd generations\0", &[&body])
                .finalize()
                .into_bytes(),
        );
        serde_json::to_vec_pretty(self).expect("a bundle serializes")
    }

    /// The newest generation in force.
    pub fn current(&self) -> u32 {
        self.generations.last().map_or(0, |g| g.generation)
    }

    /// The grant for key file `key`, if any.
    pub fn grant_for(&self, key: &str) -> Option<&Grant> {
        self.grants.iter().find(|g| g.key == key)
    }

    /// Opens the grant of key file `key` with its key pair: the keys of every generation
    /// in force (checked against the list).
    ///
    /// # Errors
    /// `NoGrant`, `GrantUnreadable`, or `Malformed` when it does not hold exactly the
    /// generations the bundle lists.
    pub fn open_grant(
        &self,
        key: &str,
        pair: &KeyPair,
    ) -> Result<BTreeMap<u32, Secret32>, GenerationsError> {
        let g = self
            .grant_for(key)
            .ok_or_else(|| GenerationsError::NoGrant(key.into()))?;
        let eph = hex32(&g.ephemeral, "a grant's ephemeral key")?;
        let shared = Zeroizing::new(pair.secret.diffie_hellman(&PublicKey::from(eph)).to_bytes());
        let k = grant_key(&shared, &eph, &pair.public);
        let sealed = hex::decode(&g.sealed)
            .map_err(|_| GenerationsError::Malformed("a grant is not hex".into()))?;
        let plain = Zeroizing::new(
            open_with(&k, ObjectKind::Grant, None, &sealed)
                .map_err(|_| GenerationsError::GrantUnreadable(key.into()))?,
        );
        let p: GrantPlain = serde_json::from_slice(&plain)
            .map_err(|e| GenerationsError::Malformed(format!("grant: {e}")))?;
        let listed: Vec<u32> = self.generations.iter().map(|g| g.generation).collect();
        let held: Vec<u32> = p.enc_keys.keys().copied().collect();
        if p.serial != self.serial || p.key != key || listed != held {
            return Err(GenerationsError::Malformed(format!(
                "the grant for keys/{key} does not match its bundle (serial {}, generations {held:?})",
                p.serial
            )));
        }
        Ok(p.enc_keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(gens: &[u32]) -> BTreeMap<u32, Secret32> {
        gens.iter().map(|g| (*g, Secret32::random())).collect()
    }

    fn bundle(serial: u64, enc: &BTreeMap<u32, Secret32>, to: &[(&str, &KeyPair)]) -> Bundle {
        Bundle {
            version: BUNDLE_VERSION,
            serial,
            written: "2026-12-01T00:00:00+00:00".into(),
            note: "test".into(),
            generations: enc
                .keys()
                .map(|g| GenerationInfo {
                    generation: *g,
                    created: "2026-12-01T00:00:00+00:00".into(),
                })
                .collect(),
            retired: vec![],
            grants: to
                .iter()
                .map(|(id, p)| Grant::new(serial, id, &p.public, enc))
                .collect(),
            mac: String::new(),
        }
    }

    #[test]
    fn a_grant_opens_only_for_its_key_and_a_changed_bundle_fails_closed() {
        let id_key = Secret32::random();
        let (a, b) = (KeyPair::generate(), KeyPair::generate());
        let enc = keys(&[1, 2]);
        let mut bd = bundle(7, &enc, &[("a", &a), ("b", &b)]);
        let bytes = bd.seal_to_bytes(&id_key);
        let back = Bundle::parse_verified(&bytes, &id_key).unwrap();
        let got = back.open_grant("a", &a).unwrap();
        assert!(got == enc);
        assert!(back.open_grant("b", &b).unwrap() == enc);
        // a's pair does not open b's grant, and c has none.
        assert!(matches!(
            back.open_grant("b", &a),
            Err(GenerationsError::GrantUnreadable(_))
        ));
        assert!(matches!(
            back.open_grant("c", &a),
            Err(GenerationsError::NoGrant(_))
        ));
        // Another id_key (another repository, or no password) does not verify it.
        assert!(matches!(
            Bundle::parse_verified(&bytes, &Secret32::random()),
            Err(GenerationsError::Authentication)
        ));
        // Any change to what it says fails: a dropped generation, a swapped grant.
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["generations"].as_array_mut().unwrap().pop();
        let changed = serde_json::to_vec(&v).unwrap();
        assert!(matches!(
            Bundle::parse_verified(&changed, &id_key),
            Err(GenerationsError::Authentication)
        ));
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let g0 = v["grants"][0]["sealed"].clone();
        v["grants"][0]["sealed"] = v["grants"][1]["sealed"].clone();
        v["grants"][1]["sealed"] = g0;
        assert!(Bundle::parse_verified(&serde_json::to_vec(&v).unwrap(), &id_key).is_err());
    }

    #[test]
    fn a_grant_from_another_bundle_or_for_other_generations_is_refused() {
        let id_key = Secret32::random();
        let a = KeyPair::generate();
        let enc = keys(&[1, 2]);
        // A grant sealed for serial 3 inside bundle 4, re-authenticated by a key holder
        // gone wrong: the serial inside does not match.
        let mut bd = bundle(4, &enc, &[]);
        bd.grants.push(Grant::new(3, "a", &a.public, &enc));
        let bytes = bd.seal_to_bytes(&id_key);
        let back = Bundle::parse_verified(&bytes, &id_key).unwrap();
        assert!(matches!(
            back.open_grant("a", &a),
            Err(GenerationsError::Malformed(_))
        ));
        // Generations listed but not granted.
        let mut bd = bundle(5, &keys(&[1, 2, 3]), &[]);
        bd.grants.push(Grant::new(5, "a", &a.public, &enc));
        let back = Bundle::parse_verified(&bd.seal_to_bytes(&id_key), &id_key).unwrap();
        assert!(matches!(
            back.open_grant("a", &a),
            Err(GenerationsError::Malformed(_))
        ));
    }

    #[test]
    fn public_key_macs_bind_the_key_and_the_recovery_flag() {
        let id_key = Secret32::random();
        let p = KeyPair::generate();
        let m = public_key_mac(&id_key, &p.public, false);
        assert!(verify_public_key_mac(&id_key, &p.public, false, &m));
        assert!(!verify_public_key_mac(&id_key, &p.public, true, &m));
        assert!(!verify_public_key_mac(
            &id_key,
            &KeyPair::generate().public,
            false,
            &m
        ));
        assert!(!verify_public_key_mac(
            &Secret32::random(),
            &p.public,
            false,
            &m
        ));
        assert_eq!(bundle_name(12), "00000000000000000012");
        assert_eq!(parse_bundle_name(&bundle_name(12)), Some(12));
        assert_eq!(parse_bundle_name("12"), None);
    }
}
