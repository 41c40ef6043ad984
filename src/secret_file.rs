//! Secret files: who may read and write them.
//!
//! A file holding a secret (a repository or database password, an AWS shared-credentials
//! file) is refused when users other than its owner and group can read it, or anyone but
//! its owner can write it: a writable file lets someone else choose the password backupd
//! encrypts new keys with, or point it at their own bucket. Group read stays allowed, so a
//! root-owned `0640 root:postgres` file can serve both the agent and `wal-push` (run by the
//! postgres user). Every reader of a secret file — `BACKUPD_PASSWORD_FILE`, a policy's
//! `password_file` and `s3_credentials_file`, `BACKUPD_S3_CREDENTIALS_FILE` — checks it here,
//! on the open handle, so the file checked is the file read.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The mode bits a secret file must not have: group write and any access by others.
pub const FORBIDDEN_MODE_BITS: u32 = 0o027;

/// What to do about a file with a forbidden mode (the end of every such message).
pub const MODE_ADVICE: &str = "chmod 600 it, or chmod 640 to share it read-only with its group";

/// Why a secret file is refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// It cannot be opened or read.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What the file is for (`password file`, `S3 credentials file`).
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is a directory, a device, a socket...
    #[error("{what} {} is not a regular file", path.display())]
    NotAFile {
        /// What the file is for.
        what: String,
        /// The file.
        path: PathBuf,
    },
    /// Others can read it, or someone but its owner can write it.
    #[error("{what} {} has mode {mode:04o} ({}); {MODE_ADVICE}", path.display(), mode_problem(*mode).unwrap_or("allowed"))]
    Mode {
        /// What the file is for.
        what: String,
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// What is wrong with a secret file's permission bits, or `None` when they are fine.
pub fn mode_problem(mode: u32) -> Option<&'static str> {
    if mode & 0o004 != 0 {
        Some("other users can read it")
    } else if mode & 0o002 != 0 {
        Some("other users can write it")
    } else if mode & 0o001 != 0 {
        Some("other users have access to it")
    } else if mode & 0o020 != 0 {
        Some("its group can write it")
    } else {
        None
    }
}

/// Checks the mode (and with `regular`, the type) of an opened secret file.
fn check_open(
    file: &std::fs::File,
    path: &Path,
    what: &str,
    regular: bool,
) -> Result<std::fs::Metadata, SecretFileError> {
    let md = file.metadata().map_err(|source| SecretFileError::Io {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    if regular && !md.is_file() {
        return Err(SecretFileError::NotAFile {
            what: what.to_string(),
            path: path.to_path_buf(),
        });
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & FORBIDDEN_MODE_BITS != 0 {
        return Err(SecretFileError::Mode {
            what: what.to_string(),
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(md)
}

/// Opens `path` for reading; `nonblock` so that a FIFO in its place does not hang a check.
fn open(path: &Path, what: &str, nonblock: bool) -> Result<std::fs::File, SecretFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if nonblock {
        o.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    o.open(path).map_err(|source| SecretFileError::Io {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that `path` is a regular file with an allowed mode, without reading it (policy
/// checks, and files another library reads).
///
/// # Errors
/// The file cannot be opened, is not a regular file, or has a forbidden mode.
pub fn check(path: &Path, what: &str) -> Result<(), SecretFileError> {
    check_open(&open(path, what, true)?, path, what, true).map(|_| ())
}

/// Reads a whole secret file after checking its mode; the buffer is wiped when dropped.
/// A pipe (`BACKUPD_PASSWORD_FILE=<(pass show repo)`) is read too: its mode is checked.
///
/// # Errors
/// The file cannot be opened or read (or is not UTF-8), or has a forbidden mode.
pub fn read(path: &Path, what: &str) -> Result<Zeroizing<String>, SecretFileError> {
    let mut f = open(path, what, false)?;
    let md = check_open(&f, path, what, false)?;
    // Sized up front: a growing String would leave copies of the secret in freed memory.
    let cap = usize::try_from(md.len())
        .unwrap_or(0)
        .saturating_add(1)
        .max(1024);
    let mut s = Zeroizing::new(String::with_capacity(cap));
    f.read_to_string(&mut s)
        .map_err(|source| SecretFileError::Io {
            what: what.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_read_is_allowed_and_everything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "pw\n").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o400, true),
            (0o440, true),
            (0o644, false),
            (0o660, false),
            (0o602, false),
            (0o601, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = read(&f, "password file");
            assert_eq!(r.is_ok(), ok, "mode {mode:04o}: {r:?}");
            if let Err(e) = r {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("mode {mode:04o}")) && msg.contains(MODE_ADVICE),
                    "{msg}"
                );
            } else {
                assert_eq!(read(&f, "x").unwrap().as_str(), "pw\n");
            }
        }
        assert!(matches!(
            check(dir.path(), "password file"),
            Err(SecretFileError::NotAFile { .. })
        ));
    }
}
