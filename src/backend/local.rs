//! The local-directory backend, the default.
//!
//! Durability: `put` writes a temp file in `tmp/`, fsyncs it, links it to its final name
//! (`link` fails if the name exists, so nothing is ever overwritten, even racing another
//! writer), removes the temp name, and fsyncs the destination directory so the new entry
//! survives a crash.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backend, BackendError, Bytes, DirListing, ObjectType};

/// A repository in a local directory.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
    counter: AtomicU64,
}

impl LocalBackend {
    /// A backend rooted at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalBackend {
            root: root.into(),
            counter: AtomicU64::new(0),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directory skeleton (`keys`, `data/00..ff`, `index`, `snapshots`, `tmp`).
    ///
    /// # Errors
    /// I/O failures.
    pub fn create_layout(&self) -> Result<(), BackendError> {
        let io = |p: &Path, source| BackendError::Io {
            path: p.display().to_string(),
            source,
        };
        for d in ["keys", "index", "snapshots", "tmp", "data"] {
            let p = self.root.join(d);
            fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
        }
        for i in 0..=255u8 {
            let p = self.root.join("data").join(format!("{i:02x}"));
            fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
        }
        sync_dir(&self.root).map_err(|e| io(&self.root, e))?;
        Ok(())
    }

    fn full(&self, kind: ObjectType, name: &str) -> PathBuf {
        self.root.join(kind.path_of(name))
    }

    fn err(&self, kind: ObjectType, name: &str, source: io::Error) -> BackendError {
        let path = self.full(kind, name).display().to_string();
        if source.kind() == ErrorKind::NotFound {
            BackendError::NotFound { path }
        } else {
            BackendError::Io { path, source }
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing ancestors, fsyncing the parent of each one created, so a
/// new folder (a WAL group) survives a crash along with the object put into it.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    match dir.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        let dest = self.full(kind, name);
        let tmp_dir = self.root.join("tmp");
        let tmp = tmp_dir.join(format!(
            "{}-{}-{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed),
            name.replace('/', "_")
        ));
        let io = |p: &Path, source| BackendError::Io {
            path: p.display().to_string(),
            source,
        };
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if kind == ObjectType::Key {
                    0o600
                } else {
                    0o644
                })
                .open(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io(&tmp, e));
        }
        if let Some(parent) = dest.parent() {
            if let Err(e) = create_dirs_durably(parent) {
                let _ = fs::remove_file(&tmp);
                return Err(io(parent, e));
            }
        }
        let linked = fs::hard_link(&tmp, &dest);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // Content-addressed objects: the same bytes again is harmless.
                let same = fs::read(&dest).map(|old| old == data[..]).unwrap_or(false);
                if !same {
                    return Err(BackendError::AlreadyExists {
                        path: dest.display().to_string(),
                    });
                }
            }
            Err(e) => return Err(io(&dest, e)),
        }
        if let Some(parent) = dest.parent() {
            sync_dir(parent).map_err(|e| io(parent, e))?;
        }
        Ok(())
    }

    fn replace(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        // A new file beside it, fsynced, renamed over it (atomic), then the directory
        // fsynced: after a crash, the object is the old bytes or the new.
        let dest = self.full(kind, name);
        let tmp = self.root.join("tmp").join(format!(
            "{}-{}-{}",
            std::process::id(),
            self.counter.fetch_add(1, Ordering::Relaxed),
            name.replace('/', "_")
        ));
        let io = |p: &Path, source| BackendError::Io {
            path: p.display().to_string(),
            source,
        };
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io(&tmp, e));
        }
        // The first object of its folder (a WAL group) makes the folder.
        let renamed = fs::rename(&tmp, &dest).or_else(|e| match dest.parent() {
            Some(parent) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(parent)?;
                fs::rename(&tmp, &dest)
            }
            _ => Err(e),
        });
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
            return Err(io(&dest, e));
        }
        let dir = dest.parent().unwrap_or(&self.root);
        sync_dir(dir).map_err(|e| io(dir, e))
    }

    fn get(&self, kind: ObjectType, name: &str) -> Result<Vec<u8>, BackendError> {
        let mut f = File::open(self.full(kind, name)).map_err(|e| self.err(kind, name, e))?;
        let mut out = Vec::new();
        f.read_to_end(&mut out)
            .map_err(|e| self.err(kind, name, e))?;
        Ok(out)
    }

    fn get_range_into(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        let f = File::open(self.full(kind, name)).map_err(|e| self.err(kind, name, e))?;
        buf.clear();
        buf.resize(len as usize, 0);
        let mut got = 0usize;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => {
                    return Err(BackendError::ShortRead {
                        path: self.full(kind, name).display().to_string(),
                        offset,
                        want: len,
                        got: got as u64,
                    })
                }
                Ok(k) => got += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(kind, name, e)),
            }
        }
        Ok(())
    }

    fn list(&self, kind: ObjectType) -> Result<Vec<(String, u64)>, BackendError> {
        let mut out = vec![];
        let mut scan = |dir: &Path| -> Result<(), BackendError> {
            let rd = match fs::read_dir(dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => {
                    return Err(BackendError::Io {
                        path: dir.display().to_string(),
                        source: e,
                    })
                }
            };
            for ent in rd {
                let ent = ent.map_err(|e| BackendError::Io {
                    path: dir.display().to_string(),
                    source: e,
                })?;
                let md = match ent.metadata() {
                    Ok(md) => md,
                    // Deleted since it was read from the directory (a prune): not listed.
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(BackendError::Io {
                            path: ent.path().display().to_string(),
                            source: e,
                        })
                    }
                };
                if md.is_file() {
                    if let Some(n) = ent.file_name().to_str() {
                        out.push((n.to_string(), md.len()));
                    }
                }
            }
            Ok(())
        };
        match kind {
            ObjectType::Config => {
                if let Ok(md) = fs::metadata(self.root.join("config")) {
                    out.push(("config".into(), md.len()));
                }
            }
            ObjectType::Pack => {
                for i in 0..=255u8 {
                    scan(&self.root.join("data").join(format!("{i:02x}")))?;
                }
            }
            other => scan(&self.root.join(other.dir()))?,
        }
        out.sort();
        Ok(out)
    }

    fn list_dir(&self, kind: ObjectType, sub: &str) -> Result<DirListing, BackendError> {
        let dir = if sub.is_empty() {
            self.root.join(kind.dir())
        } else {
            self.root.join(kind.dir()).join(sub)
        };
        let io = |p: &Path, source| BackendError::Io {
            path: p.display().to_string(),
            source,
        };
        let mut out = DirListing::default();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&dir, e)),
        };
        for ent in rd {
            let ent = ent.map_err(|e| io(&dir, e))?;
            let md = ent.metadata().map_err(|e| io(&ent.path(), e))?;
            let Some(n) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if md.is_dir() {
                out.dirs.push(n);
            } else if md.is_file() {
                out.files.push((n, md.len()));
            }
        }
        out.files.sort();
        out.dirs.sort();
        Ok(out)
    }

    fn delete(&self, kind: ObjectType, name: &str) -> Result<(), BackendError> {
        let p = self.full(kind, name);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.err(kind, name, e)),
        }
        if let Some(parent) = p.parent() {
            let _ = sync_dir(parent);
        }
        Ok(())
    }

    fn create(&self) -> Result<(), BackendError> {
        self.create_layout()
    }

    fn exists(&self, kind: ObjectType, name: &str) -> Result<bool, BackendError> {
        match fs::symlink_metadata(self.full(kind, name)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err(kind, name, e)),
        }
    }

    fn modified(
        &self,
        kind: ObjectType,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackendError> {
        // The kernel (or a file server) stamps it, whatever this process's clock says.
        let md = fs::metadata(self.full(kind, name)).map_err(|e| self.err(kind, name, e))?;
        Ok(md
            .modified()
            .ok()
            .map(chrono::DateTime::<chrono::Utc>::from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_range_list_delete() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path());
        b.create_layout().unwrap();
        let name = "ab".repeat(32);
        b.put(ObjectType::Pack, &name, Bytes::from_static(b"hello world"))
            .unwrap();
        b.put(ObjectType::Pack, &name, Bytes::from_static(b"hello world"))
            .unwrap();
        assert!(matches!(
            b.put(ObjectType::Pack, &name, Bytes::from_static(b"other")),
            Err(BackendError::AlreadyExists { .. })
        ));
        assert_eq!(b.get(ObjectType::Pack, &name).unwrap(), b"hello world");
        assert_eq!(
            b.get_range(ObjectType::Pack, &name, 6, 5).unwrap(),
            b"world"
        );
        assert!(matches!(
            b.get_range(ObjectType::Pack, &name, 6, 50),
            Err(BackendError::ShortRead { .. })
        ));
        assert_eq!(b.list(ObjectType::Pack).unwrap(), vec![(name.clone(), 11)]);
        b.delete(ObjectType::Pack, &name).unwrap();
        assert!(b.get(ObjectType::Pack, &name).unwrap_err().is_not_found());
        assert_eq!(fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
    }
}
