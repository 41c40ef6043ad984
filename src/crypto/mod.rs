//! Cryptography: the AEAD that seals every repository object, the password KDF, the key
//! files that wrap the master keys, and secret types that zeroize on drop.
//!
//! Nothing outside this module touches a cipher or a raw key.

pub mod aead;
pub mod generations;
pub mod keyfile;
pub mod master;

pub use aead::{open, open_in_place, seal, ObjectKind, SealError, SEAL_HEADER, SEAL_OVERHEAD};
pub use keyfile::{KdfParams, KeyFile, KeyFileError, OpenedKey, PairKey};
pub use master::{MasterKeys, Secret32};
