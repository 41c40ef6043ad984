//! The OS keyring as a password source: an entry of the Secret Service (GNOME Keyring,
//! KeePassXC, KWallet's bridge) through the `keyring` crate, service `backupd`, account
//! the entry's name. `BACKUPD_PASSWORD_KEYRING=NAME` or a policy's `password_keyring`
//! reads it; `backupd key keyring-set NAME` and `keyring-delete NAME` write it.
//!
//! A Secret Service keyring is locked after a reboot until someone logs in (or unlocks
//! it): it suits interactive hosts. A locked, missing or unreachable keyring is an error
//! naming the entry and what failed — never a silent fallback to a prompt.

use zeroize::Zeroizing;

/// The service name every backupd entry is stored under.
pub const SERVICE: &str = "backupd";

/// Why the keyring gave no password.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The entry is not there.
    #[error("the OS keyring (Secret Service) has no entry {SERVICE}/{name}: store it with `backupd key keyring-set {name}`")]
    NoEntry {
        /// The entry's name.
        name: String,
    },
    /// The keyring is locked, or no Secret Service answers.
    #[error("the OS keyring (Secret Service) could not be used for entry {SERVICE}/{name}: {why} (a Secret Service keyring is locked until someone logs in or unlocks it; an unattended agent should use password_file or password_command instead)")]
    Unavailable {
        /// The entry's name.
        name: String,
        /// What the keyring said.
        why: String,
    },
    /// Not a usable entry name, or not UTF-8.
    #[error("OS keyring entry {SERVICE}/{name}: {why}")]
    Bad {
        /// The entry's name.
        name: String,
        /// What is wrong.
        why: String,
    },
}

fn entry(name: &str) -> Result<keyring::Entry, KeyringError> {
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(KeyringError::Bad {
            name: name.into(),
            why: "an entry name must be non-empty text".into(),
        });
    }
    keyring::Entry::new(SERVICE, name).map_err(|e| classify(name, e))
}

fn classify(name: &str, e: keyring::Error) -> KeyringError {
    match e {
        keyring::Error::NoEntry => KeyringError::NoEntry { name: name.into() },
        keyring::Error::BadEncoding(_) => KeyringError::Bad {
            name: name.into(),
            why: "the stored password is not UTF-8".into(),
        },
        keyring::Error::TooLong(what, max) => KeyringError::Bad {
            name: name.into(),
            why: format!("{what} is longer than {max}"),
        },
        keyring::Error::Invalid(what, why) => KeyringError::Bad {
            name: name.into(),
            why: format!("{what}: {why}"),
        },
        // Locked (no prompter on a headless host), no D-Bus session, no Secret Service:
        // the crate's own text says which, and never holds the secret.
        other => KeyringError::Unavailable {
            name: name.into(),
            why: other.to_string(),
        },
    }
}

/// Reads entry `name`: its first line, which must not be empty.
///
/// # Errors
/// No such entry, a locked or unreachable keyring, or an empty password.
pub fn read(name: &str) -> Result<Zeroizing<String>, KeyringError> {
    let pw = Zeroizing::new(entry(name)?.get_password().map_err(|e| classify(name, e))?);
    let first = Zeroizing::new(pw.lines().next().unwrap_or("").to_string());
    if first.is_empty() {
        return Err(KeyringError::Bad {
            name: name.into(),
            why: "the stored password is empty".into(),
        });
    }
    Ok(first)
}

/// Stores `secret` as entry `name` (replacing what was there).
///
/// # Errors
/// A locked or unreachable keyring.
pub fn store(name: &str, secret: &str) -> Result<(), KeyringError> {
    entry(name)?
        .set_password(secret)
        .map_err(|e| classify(name, e))
}

/// Removes entry `name`.
///
/// # Errors
/// No such entry, a locked or unreachable keyring.
pub fn delete(name: &str) -> Result<(), KeyringError> {
    entry(name)?
        .delete_credential()
        .map_err(|e| classify(name, e))
}
