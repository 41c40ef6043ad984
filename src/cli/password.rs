//! Where passwords come from: a file, a command, an environment variable, or a prompt.
//! Never a command-line argument (it would show in `ps`).

use std::io::IsTerminal;
use std::process::{Command, Stdio};

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

fn first_line(s: &str) -> Zeroizing<String> {
    Zeroizing::new(s.lines().next().unwrap_or("").to_string())
}

/// Reads a secret from a policy's source: a file (see [`crate::secret_file`] for the modes
/// allowed), a shell command, or an environment variable; its first line, which must not be
/// empty.
///
/// # Errors
/// An unreadable file or one others can read or write, a failing command, an unset
/// variable, or an empty secret.
pub fn read_secret(src: &crate::policy::SecretSource) -> Result<Zeroizing<String>> {
    use crate::policy::SecretSource;
    let pw = match src {
        SecretSource::File(path) => read_secret_file(path, "password file")?,
        SecretSource::Command(cmd) => run_secret_command(cmd, "password_command")?,
        SecretSource::Env(var) => Zeroizing::new(
            std::env::var(var)
                .with_context(|| format!("environment variable {var} (password_env) is not set"))?,
        ),
    };
    if pw.is_empty() {
        bail!("empty password");
    }
    Ok(pw)
}

fn read_secret_file(path: &std::path::Path, what: &str) -> Result<Zeroizing<String>> {
    let s = crate::secret_file::read(path, what)?;
    Ok(first_line(&s))
}

/// Runs a password command (`sh -c`) without the secret variables in its environment; its
/// output is wiped once the first line is taken.
fn run_secret_command(cmd: &str, what: &str) -> Result<Zeroizing<String>> {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    crate::secret_env::scrub(&mut c);
    let out = c.output().with_context(|| format!("running {what}"))?;
    let stdout = Zeroizing::new(out.stdout);
    if !out.status.success() {
        bail!("{what} failed ({})", out.status);
    }
    let text = std::str::from_utf8(&stdout)
        .with_context(|| format!("{what} printed something that is not UTF-8"))?;
    Ok(first_line(text))
}

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
