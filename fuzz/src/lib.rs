//! What the fuzz targets share: the fixed test keys that let a target seal what the
//! fuzzer made and so reach the decoder behind the seal.

use backupd::crypto::MasterKeys;

/// A fixed 32-byte key, hex.
const KEY_HEX: &str = "0101010101010101010101010101010101010101010101010101010101010101";

/// Master keys with one generation (1), the same for every run, so a seed sealed with them
/// by `make_seeds` opens in the targets.
pub fn test_keys() -> MasterKeys {
    let json = format!(
        r#"{{"id_key":"{k}","chunker_secret":"{k}","enc_keys":{{"1":"{k}"}}}}"#,
        k = KEY_HEX.replace("01", "02")
    );
    serde_json::from_str(&json).expect("the fixed test keys decode")
}

/// The fixed wrapping key the key-file target opens `data` with (instead of running
/// Argon2id on a password).
pub const WRAP_KEY: [u8; 32] = [0x03; 32];

/// A fixed key for raw envelopes.
pub const RAW_KEY: [u8; 32] = [0x01; 32];

/// Splits `data` at a position taken from its first byte (a quarter of the length per
/// 64 steps): the two parts of a two-part input.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.split_first() {
        None => (&[], &[]),
        Some((&b, rest)) => {
            let at = rest.len() * b as usize / 256;
            rest.split_at(at)
        }
    }
}
