//! Where passwords come from: a file, a command, an OS keyring entry, an environment
//! variable, or a prompt; or a recovery code (`BACKUPD_RECOVERY_CODE`).
//! Never a command-line argument (it would show in `ps`).

use std::io::IsTerminal;

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

/// Environment variable names for one password role.
pub struct PasswordSource {
    /// File whose first line is the password.
    pub file_var: &'static str,
    /// Shell command whose first stdout line is the password.
    pub command_var: &'static str,
    /// The name of an OS keyring entry holding it (None: not offered for this role).
    pub keyring_var: Option<&'static str>,
    /// The password itself.
    pub value_var: &'static str,
    /// Prompt text.
    pub prompt: &'static str,
}

impl PasswordSource {
    /// True when one of its variables is set.
    pub fn is_set(&self) -> bool {
        [
            Some(self.file_var),
            Some(self.command_var),
            self.keyring_var,
            Some(self.value_var),
        ]
        .into_iter()
        .flatten()
        .any(|v| std::env::var_os(v).is_some())
    }
}

/// The repository password.
pub const REPO_PASSWORD: PasswordSource = PasswordSource {
    file_var: "BACKUPD_PASSWORD_FILE",
    command_var: "BACKUPD_PASSWORD_COMMAND",
    keyring_var: Some("BACKUPD_PASSWORD_KEYRING"),
    value_var: "BACKUPD_PASSWORD",
    prompt: "repository password: ",
};

/// A new password (`key add`, `key passwd`).
pub const NEW_PASSWORD: PasswordSource = PasswordSource {
    file_var: "BACKUPD_NEW_PASSWORD_FILE",
    command_var: "BACKUPD_NEW_PASSWORD_COMMAND",
    keyring_var: None,
    value_var: "BACKUPD_NEW_PASSWORD",
    prompt: "new password: ",
};

pub use crate::secret_source::read_secret;
use crate::secret_source::{read_secret_file, run_secret_command};

/// Reads a password; `confirm` asks twice at a prompt.
///
/// # Errors
/// An unreadable file, a failing command, an empty password, or no source at all.
pub fn read_password(src: &PasswordSource, confirm: bool) -> Result<Zeroizing<String>> {
    let pw = if let Some(path) = std::env::var_os(src.file_var) {
        read_secret_file(std::path::Path::new(&path), "password file")
            .with_context(|| src.file_var.to_string())?
    } else if let Ok(cmd) = std::env::var(src.command_var) {
        run_secret_command(&cmd, src.command_var)?
    } else if let Some(name) = src.keyring_var.and_then(|v| std::env::var(v).ok()) {
        crate::keyring_secret::read(&name)
            .with_context(|| src.keyring_var.unwrap_or_default().to_string())?
    } else if let Ok(v) = std::env::var(src.value_var) {
        Zeroizing::new(v)
    } else if std::io::stdin().is_terminal() {
        let p = Zeroizing::new(rpassword::prompt_password(src.prompt).context("reading password")?);
        if confirm {
            let again = Zeroizing::new(
                rpassword::prompt_password("enter it again: ").context("reading password")?,
            );
            if *again != *p {
                bail!("the passwords do not match");
            }
        }
        p
    } else {
        bail!(
            "no password given: set {}, {}{} or {} (or run on a terminal to be prompted)",
            src.file_var,
            src.command_var,
            src.keyring_var
                .map(|k| format!(", {k}"))
                .unwrap_or_default(),
            src.value_var
        );
    };
    if pw.is_empty() {
        bail!("empty password");
    }
    Ok(pw)
}

/// A recovery code from `BACKUPD_RECOVERY_CODE`, if set.
pub const RECOVERY_CODE_VAR: &str = "BACKUPD_RECOVERY_CODE";

/// Groups of a printed recovery code, and letters per group.
const RECOVERY_GROUPS: usize = 8;
const RECOVERY_GROUP_LEN: usize = 4;

/// The alphabet of recovery codes: Crockford's base 32 in lower case (digits and letters
/// without `i l o u`, which a person misreads), 5 bits a letter.
const RECOVERY_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A fresh recovery code: 160 random bits as 8 groups of 4 letters (`abcd-efgh-...`).
pub fn new_recovery_code() -> Zeroizing<String> {
    use chacha20poly1305::aead::{rand_core::RngCore, OsRng};
    let mut bytes = Zeroizing::new([0u8; 20]);
    OsRng.fill_bytes(bytes.as_mut());
    let mut letters = Zeroizing::new(String::with_capacity(40));
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in bytes.iter() {
        acc = (acc << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            letters.push(RECOVERY_ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
        acc &= (1 << bits) - 1;
    }
    let mut out = Zeroizing::new(String::with_capacity(40));
    for (i, c) in letters.chars().enumerate() {
        if i > 0 && i % RECOVERY_GROUP_LEN == 0 {
            out.push('-');
        }
        out.push(c);
    }
    debug_assert_eq!(letters.len(), RECOVERY_GROUPS * RECOVERY_GROUP_LEN);
    out
}

/// A recovery code as its key file's password: lower case, without the spaces and dashes a
/// person types between groups. None: not a recovery code's shape.
pub fn normalize_recovery_code(typed: &str) -> Option<Zeroizing<String>> {
    let mut out = Zeroizing::new(String::with_capacity(RECOVERY_GROUPS * RECOVERY_GROUP_LEN));
    for c in typed.chars() {
        match c {
            ' ' | '-' | '\t' => {}
            c if RECOVERY_ALPHABET.contains(&(c.to_ascii_lowercase() as u8)) && c.is_ascii() => {
                out.push(c.to_ascii_lowercase())
            }
            _ => return None,
        }
    }
    (out.len() == RECOVERY_GROUPS * RECOVERY_GROUP_LEN).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_codes_have_160_bits_in_groups_and_read_back_however_typed() {
        let a = new_recovery_code();
        let b = new_recovery_code();
        assert_ne!(*a, *b);
        assert_eq!(a.len(), 8 * 4 + 7);
        assert_eq!(a.split('-').count(), 8);
        let norm = normalize_recovery_code(&a).unwrap();
        assert_eq!(norm.len(), 32);
        let typed = a.to_uppercase().replace('-', " ");
        assert_eq!(*normalize_recovery_code(&typed).unwrap(), *norm);
        assert!(normalize_recovery_code("correct horse battery staple").is_none());
        assert!(normalize_recovery_code(&a[..30]).is_none());
    }
}
