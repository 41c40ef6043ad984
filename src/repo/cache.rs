//! Local cache of a remote repository's metadata: snapshot files, index files and the packs
//! that hold trees. All of them are immutable and named by their content, so a cached copy
//! never goes stale; it is only ever missing (fetch it) or gone from the repository (drop
//! it). The cache holds the same ciphertext as the repository and every read from it is
//! authenticated as a read from the repository is, so a damaged cache file is noticed,
//! dropped and fetched again; the cache can always be deleted.
//!
//! Layout: `BASE/CACHEDIR.TAG`, `BASE/<repository id>/{snapshots,index,data}/<name>`,
//! directories 0700 (`BASE/key-hints/` belongs to [`super::keyhint`]). Writes go to a
//! temporary file renamed into place, so concurrent processes (the agent runs several
//! policies) never see half a file.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::backend::ObjectType;

/// Why the cache cannot be used (the caller goes on without one).
#[derive(Debug, thiserror::Error)]
#[error("cache directory {path}: {source}")]
pub struct CacheError {
    /// The directory.
    pub path: String,
    /// Why.
    pub source: io::Error,
}

const CACHEDIR_TAG: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55\n\
# This file marks the backupd cache; backup tools skip directories holding it.\n";

/// The cache of one repository.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    counter: AtomicU64,
    /// One whole-pack fill at a time, so two threads wanting the same tree pack fetch it once.
    fill: Mutex<()>,
    /// A write failed (full disk, ...): whole packs are no longer fetched for the cache,
    /// which would otherwise refetch one for every tree it holds.
    write_failed: AtomicBool,
}

/// The default base directory: `$XDG_CACHE_HOME/backupd`, else `$HOME/.cache/backupd`.
pub fn default_base() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty());
    match xdg {
        Some(x) => Some(PathBuf::from(x).join("backupd")),
        None => std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|h| PathBuf::from(h).join(".cache").join("backupd")),
    }
}

fn mkdir(p: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().recursive(true).mode(0o700).create(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates the cache base `base` (0700, tagged) if needed.
fn prepare_base(base: &Path) -> io::Result<()> {
    mkdir(base)?;
    let tag = base.join("CACHEDIR.TAG");
    if !tag.exists() {
        let _ = fs::write(&tag, CACHEDIR_TAG);
    }
    Ok(())
}

/// Creates `dir`, a directory directly inside a cache base, and the base (0700, tagged).
///
/// # Errors
/// Either cannot be created.
pub(crate) fn prepare_dir(dir: &Path) -> io::Result<()> {
    if let Some(base) = dir.parent() {
        prepare_base(base)?;
    }
    mkdir(dir)
}

impl Cache {
    /// Opens (creating) the cache of repository `repo_id` under `base`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn open(base: &Path, repo_id: &str) -> Result<Cache, CacheError> {
        let err = |p: &Path, source| CacheError {
            path: p.display().to_string(),
            source,
        };
        prepare_base(base).map_err(|e| err(base, e))?;
        let dir = base.join(repo_id);
        for sub in ["snapshots", "index", "data", "tmp"] {
            let p = dir.join(sub);
            mkdir(&p).map_err(|e| err(&p, e))?;
        }
        Ok(Cache {
            dir,
            counter: AtomicU64::new(0),
            fill: Mutex::new(()),
            write_failed: AtomicBool::new(false),
        })
    }

    /// The folder of a cached kind (`None` for kinds never cached).
    fn kind_dir(&self, kind: ObjectType) -> Option<PathBuf> {
        let sub = match kind {
            ObjectType::Snapshot => "snapshots",
            ObjectType::Index => "index",
            ObjectType::Pack => "data",
            ObjectType::Config
            | ObjectType::Key
            | ObjectType::Wal
            | ObjectType::Lock
            | ObjectType::Mark
            | ObjectType::Generations => return None,
        };
        Some(self.dir.join(sub))
    }

    fn path(&self, kind: ObjectType, name: &str) -> Option<PathBuf> {
        // Names come from listings of the store; never let one climb out of the cache.
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(self.kind_dir(kind)?.join(name))
    }

    /// The cached bytes of an object, if any.
    pub fn get(&self, kind: ObjectType, name: &str) -> Option<Vec<u8>> {
        fs::read(self.path(kind, name)?).ok()
    }

    /// True when the object is cached.
    pub fn has(&self, kind: ObjectType, name: &str) -> bool {
        self.path(kind, name).is_some_and(|p| p.is_file())
    }

    /// `len` bytes at `offset` of a cached object; `None` if it is not cached or too short.
    pub fn get_range(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Option<Vec<u8>> {
        let f = File::open(self.path(kind, name)?).ok()?;
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        f.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }

    /// Stores an object; false if it was not stored. A failure (full disk, ...) only costs
    /// the cache: it is logged.
    pub fn put(&self, kind: ObjectType, name: &str, data: &[u8]) -> bool {
        let Some(dest) = self.path(kind, name) else {
            return false;
        };
        let tmp = self.dir.join("tmp").join(format!(
            "{}-{}-{name}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            fs::rename(&tmp, &dest)
        };
        match write() {
            Ok(()) => true,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                if !self.write_failed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "cache {}: {e}; tree packs are read from the store",
                        dest.display()
                    );
                }
                false
            }
        }
    }

    /// Drops a cached object (found damaged).
    pub fn remove(&self, kind: ObjectType, name: &str) {
        if let Some(p) = self.path(kind, name) {
            let _ = fs::remove_file(p);
        }
    }

    /// Drops cached objects of `kind` that the repository no longer has.
    pub fn retain(&self, kind: ObjectType, present: &HashSet<&str>) {
        let Some(dir) = self.kind_dir(kind) else {
            return;
        };
        let Ok(rd) = fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if !present.contains(name.as_ref()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Makes sure the object is cached, running `fill` to fetch it when it is not: one fill
    /// at a time, re-checking under the lock so a pack another thread just cached is not
    /// fetched again. `Ok(false)` when it is not cached and will not be (a write failed
    /// before, or now): read from the store instead.
    pub fn fill_once<E>(
        &self,
        kind: ObjectType,
        name: &str,
        fill: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<bool, E> {
        let _g = self.fill.lock().unwrap_or_else(|e| e.into_inner());
        if self.has(kind, name) {
            return Ok(true);
        }
        if self.write_failed.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let bytes = fill()?;
        Ok(self.put(kind, name, &bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_reads_ranges_and_forgets() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), "abcd").unwrap();
        assert!(d.path().join("CACHEDIR.TAG").is_file());
        c.put(ObjectType::Snapshot, "aa11", b"snapshot bytes");
        c.put(ObjectType::Snapshot, "bb22", b"other");
        c.put(ObjectType::Pack, "cc33", b"0123456789");
        assert_eq!(
            c.get(ObjectType::Snapshot, "aa11").unwrap(),
            b"snapshot bytes"
        );
        assert_eq!(
            c.get_range(ObjectType::Pack, "cc33", 3, 4).unwrap(),
            b"3456"
        );
        assert!(c.get_range(ObjectType::Pack, "cc33", 8, 4).is_none());
        // Keys and config are never cached; odd names are refused.
        c.put(ObjectType::Key, "dd44", b"k");
        assert!(c.get(ObjectType::Key, "dd44").is_none());
        c.put(ObjectType::Snapshot, "../escape", b"x");
        assert!(!d.path().join("abcd").join("escape").exists());
        c.retain(ObjectType::Snapshot, &["bb22"].into_iter().collect());
        assert!(!c.has(ObjectType::Snapshot, "aa11"));
        assert!(c.has(ObjectType::Snapshot, "bb22"));
        let mode = fs::metadata(d.path().join("abcd")).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        // A fill runs once; a second call finds the object.
        let mut calls = 0;
        assert!(c
            .fill_once::<()>(ObjectType::Pack, "ee55", || {
                calls += 1;
                Ok(b"pack".to_vec())
            })
            .unwrap());
        assert!(c
            .fill_once::<()>(ObjectType::Pack, "ee55", || {
                calls += 1;
                Ok(vec![])
            })
            .unwrap());
        assert_eq!(calls, 1);
    }

    #[test]
    fn a_failed_write_stops_whole_pack_fills() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), "abcd").unwrap();
        // `data` is a file now: every pack write fails (as on a full disk, even as root).
        let data = d.path().join("abcd").join("data");
        fs::remove_dir(&data).unwrap();
        fs::write(&data, b"").unwrap();
        let mut calls = 0;
        let mut fill = |name: &str| {
            c.fill_once::<()>(ObjectType::Pack, name, || {
                calls += 1;
                Ok(b"pack".to_vec())
            })
            .unwrap()
        };
        assert!(!fill("aa01"));
        assert!(!fill("aa02"));
        assert_eq!(
            calls, 1,
            "a pack was fetched again for a cache that cannot hold it"
        );
    }
}
