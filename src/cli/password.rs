//! Where passwords come from: a file, a command, an environment variable, or a prompt.
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
    /// The password itself.
    pub value_var: &'static str,
    /// Prompt text.
    pub prompt: &'static str,
}

/// The repository password.
pub const REPO_PASSWORD: PasswordSource = PasswordSource {
    file_var: "BACKUPD_PASSWORD_FILE",
    command_var: "BACKUPD_PASSWORD_COMMAND",
    value_var: "BACKUPD_PASSWORD",
    prompt: "repository password: ",
};

/// A new password (`key add`, `key passwd`).
pub const NEW_PASSWORD: PasswordSource = PasswordSource {
    file_var: "BACKUPD_NEW_PASSWORD_FILE",
    command_var: "BACKUPD_NEW_PASSWORD_COMMAND",
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
            "no password given: set {}, {} or {} (or run on a terminal to be prompted)",
            src.file_var,
            src.command_var,
            src.value_var
        );
    };
    if pw.is_empty() {
        bail!("empty password");
    }
    Ok(pw)
}
