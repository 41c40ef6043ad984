//! Key files. The first byte picks the mode. Even: the rest is a whole key file (JSON),
//! parsed and checked as an open does before the KDF (version, cost caps, salt), its
//! public key checked, and its `data` opened with a fixed wrapping key instead of
//! Argon2id. Odd: the rest is what a key file wraps (a version-1 master-key bundle or a
//! version-2 key pair, by the second bit), sealed with the fixed wrapping key into a
//! template key file and opened.
#![no_main]

use backupd::crypto::aead::seal_with;
use backupd::crypto::{KeyFile, ObjectKind, Secret32};
use libfuzzer_sys::fuzz_target;

const TEMPLATE_V1: &str = r#"{"version":1,"created":"2026-01-01T00:00:00+00:00","host":"h","username":"u","kdf":{"algorithm":"argon2id","m_cost_kib":65536,"t_cost":3,"p_cost":2,"salt":"00112233445566778899aabbccddeeff"},"data":""}"#;
const TEMPLATE_V2: &str = r#"{"version":2,"created":"2026-01-01T00:00:00+00:00","host":"h","username":"u","kdf":{"algorithm":"argon2id","m_cost_kib":65536,"t_cost":3,"p_cost":2,"salt":"00112233445566778899aabbccddeeff"},"public_key":"0000000000000000000000000000000000000000000000000000000000000000","public_key_mac":"00","data":""}"#;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let wrap = fuzz_common::WRAP_KEY;
    if mode & 1 == 0 {
        let Ok(kf) = KeyFile::parse(rest) else {
            return;
        };
        let _ = kf.kdf.check();
        let _ = kf.verified_public_key(&Secret32([9u8; 32]));
        let _ = kf.open_with_wrapping_key(&wrap);
        let _ = KeyFile::parse(&kf.to_bytes()).expect("a parsed key file parses again");
    } else {
        let template = if mode & 2 == 0 {
            TEMPLATE_V1
        } else {
            TEMPLATE_V2
        };
        let mut kf = KeyFile::parse(template.as_bytes()).expect("the template parses");
        kf.data = hex::encode(seal_with(&wrap, 0, ObjectKind::Key, None, rest));
        let _ = kf.open_with_wrapping_key(&wrap);
    }
});
