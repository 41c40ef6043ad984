//! Secrets a policy names: a file (modes checked by [`crate::secret_file`]), a shell
//! command run without the secret variables, an environment variable, or an OS keyring
//! entry ([`crate::keyring_secret`]). Below the CLI,
//! so the agent and the sources read them without going through it.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use zeroize::Zeroizing;

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
        SecretSource::Keyring(name) => crate::keyring_secret::read(name)?,
    };
    if pw.is_empty() {
        bail!("empty password");
    }
    Ok(pw)
}

pub(crate) fn read_secret_file(path: &std::path::Path, what: &str) -> Result<Zeroizing<String>> {
    let s = crate::secret_file::read(path, what)?;
    Ok(first_line(&s))
}

/// Runs a password command (`sh -c`) without the secret variables in its environment; its
/// output is wiped once the first line is taken.
pub(crate) fn run_secret_command(cmd: &str, what: &str) -> Result<Zeroizing<String>> {
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
