//! The key hint: which key file opened a repository the last time, remembered on this host
//! so that the next open tries that key first and runs one key derivation.
//!
//! Key files are the one thing read before anything is authenticated, and every one tried
//! costs an Argon2id run. Someone who can only write to the store can add key files (at
//! the cost cap, [`crate::crypto::KdfParams::MAX_M_COST_KIB`]) that sort before the real
//! ones; without a hint every `wal-push` (one open per WAL segment) would pay for each of
//! them. With the hint, only the first open on a host does.
//!
//! Layout: `BASE/key-hints/<SHA-256 of the repository location>`, holding one key id and a
//! newline; `BASE` is the cache base (`--cache-dir`, else `$XDG_CACHE_HOME/backupd` or
//! `~/.cache/backupd`), used even when the object cache is off (`--no-cache`, the WAL
//! verbs). The location, not the repository id, names it: the id is inside the sealed
//! config, which only the keys open. Directories 0700, files 0600, written to a temporary
//! file renamed into place. A hint that cannot be read or written only costs key
//! derivations, never a command: problems are logged at debug level.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{is_key_name, sha256_hex};

/// The key hints kept under one cache base.
#[derive(Clone, Debug)]
pub struct KeyHints {
    dir: PathBuf,
}

/// Names temporary files apart within one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

impl KeyHints {
    /// The hints under cache base `base` (nothing is created until one is written).
    pub fn under(base: &Path) -> Self {
        KeyHints {
            dir: base.join("key-hints"),
        }
    }

    fn path(&self, location: &str) -> PathBuf {
        self.dir.join(sha256_hex(location.as_bytes()))
    }

    /// The key id that opened the repository at `location` last time, if one is recorded
    /// and well-formed.
    pub fn get(&self, location: &str) -> Option<String> {
        let path = self.path(location);
        let mut text = String::new();
        let read = File::open(&path).and_then(|f| f.take(128).read_to_string(&mut text));
        if let Err(e) = read {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::debug!("key hint {}: {e}; ignored", path.display());
            }
            return None;
        }
        let id = text.trim();
        if is_key_name(id) {
            Some(id.to_string())
        } else {
            tracing::debug!("key hint {}: not a key id; ignored", path.display());
            None
        }
    }

    /// Records that key `key_id` opened the repository at `location`. Never fails: a hint
    /// that cannot be written is logged at debug level.
    pub fn set(&self, location: &str, key_id: &str) {
        if !is_key_name(key_id) {
            return;
        }
        if let Err(e) = self.write(location, key_id) {
            tracing::debug!("key hint under {}: {e}; not recorded", self.dir.display());
        }
    }

    fn write(&self, location: &str, key_id: &str) -> io::Result<()> {
        super::cache::prepare_dir(&self.dir)?;
        let dest = self.path(location);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(format!("{key_id}\n").as_bytes())?;
            // Rename over the old hint: a reader sees the old id or the new one, never half
            // of one. No fsync: a hint lost in a crash only costs key derivations.
            fs::rename(&tmp, &dest)
        };
        write().inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn remembers_one_key_per_location_privately() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("cache");
        let h = KeyHints::under(&base);
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        assert_eq!(h.get("/srv/repo"), None);
        h.set("/srv/repo", &a);
        h.set("s3:bucket/x", &b);
        assert_eq!(h.get("/srv/repo"), Some(a.clone()));
        assert_eq!(h.get("s3:bucket/x"), Some(b.clone()));
        h.set("/srv/repo", &b);
        assert_eq!(h.get("/srv/repo"), Some(b.clone()));
        let dir = base.join("key-hints");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let files: Vec<_> = fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(files.len(), 2, "no temporary files are left: {files:?}");
        for f in files {
            assert_eq!(mode(&f.path()), 0o600);
        }
        // What is not a key id is neither written nor believed.
        h.set("/srv/repo", "../../etc/passwd");
        assert_eq!(h.get("/srv/repo"), Some(b));
        fs::write(h.path("/srv/repo"), "not a key id\n").unwrap();
        assert_eq!(h.get("/srv/repo"), None);
    }

    #[test]
    fn a_hint_that_cannot_be_written_is_no_error() {
        let d = tempfile::tempdir().unwrap();
        // The base is a file: nothing can be created under it.
        let base = d.path().join("file");
        fs::write(&base, b"").unwrap();
        let h = KeyHints::under(&base);
        h.set("/srv/repo", &"c".repeat(64));
        assert_eq!(h.get("/srv/repo"), None);
    }
}
