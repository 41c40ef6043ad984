//! Storage backends. A backend stores opaque objects by kind and name; it sees ciphertext
//! only. Objects are created once and never changed in place.
//!
//! Retry, throttling and metrics are layers around a backend (issue 3), not code inside it.

pub mod credential_process;
#[doc(hidden)]
pub mod faults;
pub mod layers;
pub mod local;
pub mod s3;

use std::fmt;

pub use bytes::Bytes;
pub use local::LocalBackend;
pub use s3::{S3Backend, S3Credentials, S3Location, S3Options};

/// The folders of a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectType {
    /// `config`.
    Config,
    /// `keys/<id>`.
    Key,
    /// `data/<2 hex>/<id>`.
    Pack,
    /// `index/<id>`.
    Index,
    /// `snapshots/<id>`.
    Snapshot,
    /// `wal/<system id>/...`: PostgreSQL WAL segments and history files, named by
    /// PostgreSQL's own file names (not by content), listed one folder at a time.
    Wal,
    /// `locks/<id>`: who is backing up or pruning (see `repo::lock`).
    Lock,
    /// `marks/<id>`: packs prune found unused, with when (see `repo::prune`).
    Mark,
    /// `generations/<serial>`: the key generations and their grants (see
    /// `repo::generations`), named by a 20-digit serial.
    Generations,
}

/// What one folder of a kind holds (see [`Backend::list_dir`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirListing {
    /// Objects directly inside: name and size.
    pub files: Vec<(String, u64)>,
    /// Sub-folders directly inside, by name.
    pub dirs: Vec<String>,
}

impl ObjectType {
    /// Folder name (or the file name for `config`).
    pub fn dir(self) -> &'static str {
        match self {
            ObjectType::Config => "config",
            ObjectType::Key => "keys",
            ObjectType::Pack => "data",
            ObjectType::Index => "index",
            ObjectType::Snapshot => "snapshots",
            ObjectType::Wal => "wal",
            ObjectType::Lock => "locks",
            ObjectType::Mark => "marks",
            ObjectType::Generations => "generations",
        }
    }

    /// True when every object of this kind is named by the SHA-256 of its bytes.
    pub fn named_by_content(self) -> bool {
        !matches!(
            self,
            ObjectType::Config | ObjectType::Wal | ObjectType::Generations
        )
    }

    /// The object's path relative to the repository root.
    pub fn path_of(self, name: &str) -> String {
        match self {
            ObjectType::Config => "config".to_string(),
            ObjectType::Pack => format!("data/{}/{}", &name[..2.min(name.len())], name),
            other => format!("{}/{}", other.dir(), name),
        }
    }
}

/// Why a backend call failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The object does not exist.
    #[error("{path}: not found")]
    NotFound {
        /// Object path.
        path: String,
    },
    /// Refused to overwrite an existing object.
    #[error("{path}: already exists")]
    AlreadyExists {
        /// Object path.
        path: String,
    },
    /// A ranged read past the end of an object.
    #[error("{path}: short read ({got} of {want} bytes at offset {offset})")]
    ShortRead {
        /// Object path.
        path: String,
        /// Offset asked.
        offset: u64,
        /// Bytes asked.
        want: u64,
        /// Bytes available.
        got: u64,
    },
    /// The bucket of an S3 repository does not exist.
    #[error("{location}: bucket {bucket:?} does not exist")]
    BucketMissing {
        /// The repository.
        location: String,
        /// The bucket.
        bucket: String,
    },
    /// The store refused the credentials or the request.
    #[error("{location}: access denied ({why}); check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)")]
    Denied {
        /// The repository.
        location: String,
        /// The store's answer.
        why: String,
    },
    /// A remote store failed a request.
    #[error("{path}: {why}")]
    Remote {
        /// Object (with the endpoint).
        path: String,
        /// What happened.
        why: String,
        /// Worth retrying (network failure, 5xx, throttling).
        transient: bool,
    },
    /// An I/O error on an object.
    #[error("{path}: {source}")]
    Io {
        /// Object path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl BackendError {
    /// True for a missing object.
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound { .. })
    }

    /// True for failures worth retrying: timeouts, resets, interrupted calls. A missing
    /// object, a refused overwrite, a full disk or a permission error is not.
    pub fn is_transient(&self) -> bool {
        use std::io::ErrorKind as K;
        match self {
            BackendError::Io { source, .. } => matches!(
                source.kind(),
                K::TimedOut
                    | K::Interrupted
                    | K::WouldBlock
                    | K::ConnectionReset
                    | K::ConnectionAborted
                    | K::ConnectionRefused
                    | K::BrokenPipe
                    | K::UnexpectedEof
            ),
            BackendError::Remote { transient, .. } => *transient,
            _ => false,
        }
    }
}

/// An object store.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Where it is, for messages.
    fn location(&self) -> String;

    /// Stores a new object durably; returns only once it would survive a crash. Refuses to
    /// overwrite an existing object with different bytes; the same bytes are a no-op.
    /// Every name of a kind [`ObjectType::named_by_content`] is the hex SHA-256 of the
    /// bytes; a backend may check it (S3 sends it as the upload checksum, so the store
    /// refuses a mismatch). WAL names may hold `/` (folders).
    ///
    /// # Errors
    /// I/O failures, or `AlreadyExists`.
    fn put(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError>;

    /// Replaces an object whose name is fixed — `config` (a format upgrade, `key retire`)
    /// or a WAL object (`key retire`) — atomically: a reader sees the old bytes or the
    /// new, never a mix or nothing.
    ///
    /// # Errors
    /// I/O failures.
    fn replace(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError>;

    /// [`Backend::replace`] of `config`.
    ///
    /// # Errors
    /// As [`Backend::replace`].
    fn replace_config(&self, data: Bytes) -> Result<(), BackendError> {
        self.replace(ObjectType::Config, "config", data)
    }

    /// Reads a whole object.
    ///
    /// # Errors
    /// `NotFound`, or I/O failures.
    fn get(&self, kind: ObjectType, name: &str) -> Result<Vec<u8>, BackendError>;

    /// Reads `len` bytes at `offset` into `buf` (its contents replaced, its allocation
    /// reused): restore workers keep one buffer instead of faulting in a fresh one per read.
    /// Backends and layers implement this; [`Backend::get_range`] is built on it.
    ///
    /// # Errors
    /// `NotFound`, `ShortRead`, or I/O failures.
    fn get_range_into(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError>;

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// As [`Backend::get_range_into`].
    fn get_range(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, BackendError> {
        let mut buf = Vec::new();
        get_exact_range_into(self, kind, name, offset, len, &mut buf)?;
        Ok(buf)
    }

    /// Names and sizes of all objects of a kind.
    ///
    /// # Errors
    /// I/O failures.
    fn list(&self, kind: ObjectType) -> Result<Vec<(String, u64)>, BackendError>;

    /// The objects and sub-folders directly inside the folder `sub` of a kind (`""` for
    /// the kind's own folder), for kinds too large to list whole (WAL archives).
    ///
    /// # Errors
    /// I/O failures.
    fn list_dir(&self, kind: ObjectType, sub: &str) -> Result<DirListing, BackendError>;

    /// Removes an object. Removing an object that is not there succeeds (as on S3), so
    /// two cleanups racing both succeed.
    ///
    /// # Errors
    /// I/O failures.
    fn delete(&self, kind: ObjectType, name: &str) -> Result<(), BackendError>;

    /// True when the object exists.
    ///
    /// # Errors
    /// I/O failures.
    fn exists(&self, kind: ObjectType, name: &str) -> Result<bool, BackendError>;

    /// When the store last wrote the object, by the store's own clock (S3's
    /// `Last-Modified`, a file's mtime), for judging times across hosts whose clocks
    /// disagree (`repo::clock`). `None` when the store keeps no such time.
    ///
    /// # Errors
    /// `NotFound`, or I/O failures.
    fn modified(
        &self,
        kind: ObjectType,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackendError> {
        let _ = (kind, name);
        Ok(None)
    }

    /// Prepares an empty store for `init` (creates the directory or the bucket).
    ///
    /// # Errors
    /// The store refuses.
    fn create(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// For a remote store, how many requests it serves at once (`--s3-connections`); the
    /// pipeline sizes its uploaders and restore its fetchers by it. `None` for local disks.
    fn connections(&self) -> Option<usize> {
        None
    }
}

/// [`Backend::get_range_into`], where a store that hands back other than `len` bytes
/// without an error (a transfer cut short, a misbehaving server) is a `ShortRead`, never
/// a buffer of the wrong length for the caller to slice.
///
/// # Errors
/// As [`Backend::get_range_into`], or `ShortRead`.
pub fn get_exact_range_into<B: Backend + ?Sized>(
    backend: &B,
    kind: ObjectType,
    name: &str,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<(), BackendError> {
    backend.get_range_into(kind, name, offset, len, buf)?;
    if buf.len() as u64 != len {
        return Err(BackendError::ShortRead {
            path: kind.path_of(name),
            offset,
            want: len,
            got: buf.len() as u64,
        });
    }
    Ok(())
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    fn location(&self) -> String {
        (**self).location()
    }
    fn put(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        (**self).put(kind, name, data)
    }
    fn replace(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        (**self).replace(kind, name, data)
    }
    fn get(&self, kind: ObjectType, name: &str) -> Result<Vec<u8>, BackendError> {
        (**self).get(kind, name)
    }
    fn get_range_into(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        (**self).get_range_into(kind, name, offset, len, buf)
    }
    fn list(&self, kind: ObjectType) -> Result<Vec<(String, u64)>, BackendError> {
        (**self).list(kind)
    }
    fn list_dir(&self, kind: ObjectType, sub: &str) -> Result<DirListing, BackendError> {
        (**self).list_dir(kind, sub)
    }
    fn delete(&self, kind: ObjectType, name: &str) -> Result<(), BackendError> {
        (**self).delete(kind, name)
    }
    fn exists(&self, kind: ObjectType, name: &str) -> Result<bool, BackendError> {
        (**self).exists(kind, name)
    }
    fn modified(
        &self,
        kind: ObjectType,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackendError> {
        (**self).modified(kind, name)
    }
    fn create(&self) -> Result<(), BackendError> {
        (**self).create()
    }
    fn connections(&self) -> Option<usize> {
        (**self).connections()
    }
}
