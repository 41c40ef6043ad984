//! The WAL archive inside a repository: `wal/<system id>/<group>/<file>` for segments and
//! their `.backup`/`.partial` files, `wal/<system id>/<TTTTTTTT>.history` for history
//! files. One object per file, named by PostgreSQL's own file name so recovery fetches it
//! without loading any index; sealed with the file's archive name bound into the
//! associated data, so a segment stored under another segment's name fails to open.
//!
//! Object plaintext: `version (1) | compression (0 raw, 1 zstd) | raw length (u64 LE) |
//! payload`.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::walname::{group_of, is_archivable_name, is_history_name};
use crate::backend::{BackendError, ObjectType};
use crate::crypto::{self, ObjectKind};
use crate::repo::{object_path, Repository};

const FORMAT: u8 = 1;
const RAW: u8 = 0;
const ZSTD: u8 = 1;
const HEADER: usize = 10;

/// Why a WAL archive operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not a WAL, history, backup history or partial file name.
    #[error("{0:?} is not a WAL file name PostgreSQL archives")]
    BadName(String),
    /// The archive holds this file already, with other bytes.
    #[error("{name}: the archive already holds a different {name} for system {system_id}; refusing to overwrite it (two clusters with one system identifier archiving to one repository?)")]
    Conflict {
        /// File name.
        name: String,
        /// Cluster.
        system_id: u64,
    },
    /// A stored WAL object failed to open.
    #[error("{object}: corrupt or tampered ({why})")]
    Corrupt {
        /// Object path.
        object: String,
        /// Why.
        why: String,
    },
    /// The store failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored now.
    Stored,
    /// The same bytes were there already.
    AlreadyThere,
}

/// One cluster's WAL archive in a repository.
pub struct WalArchive<'a> {
    repo: &'a Repository,
    system_id: u64,
}

impl<'a> WalArchive<'a> {
    /// The archive of cluster `system_id`.
    pub fn new(repo: &'a Repository, system_id: u64) -> Self {
        WalArchive { repo, system_id }
    }

    /// The cluster.
    pub fn system_id(&self) -> u64 {
        self.system_id
    }

    /// Object name (under `wal/`) of an archived file of cluster `system_id`; readable
    /// without any key, so existence checks need no password.
    pub fn object_name_of(system_id: u64, file: &str) -> String {
        match group_of(file) {
            Some(g) => format!("{system_id}/{g}/{file}"),
            None => format!("{system_id}/{file}"),
        }
    }

    fn object_name(&self, file: &str) -> String {
        Self::object_name_of(self.system_id, file)
    }

    fn binding(&self, file: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"backupd wal\0");
        h.update(self.object_name(file).as_bytes());
        h.finalize().into()
    }

    fn check_name(file: &str) -> Result<(), ArchiveError> {
        if is_archivable_name(file) {
            Ok(())
        } else {
            Err(ArchiveError::BadName(file.to_string()))
        }
    }

    /// Seals a file's bytes for the archive.
    fn seal(&self, file: &str, bytes: &[u8]) -> Vec<u8> {
        let level = self.repo.config().zstd_level;
        let compressed = if level > 0 {
            zstd::bulk::compress(bytes, level)
                .ok()
                .filter(|c| c.len() < bytes.len())
        } else {
            None
        };
        let (flag, payload) = match &compressed {
            Some(c) => (ZSTD, &c[..]),
            None => (RAW, bytes),
        };
        let mut plain = Vec::with_capacity(HEADER + payload.len());
        plain.push(FORMAT);
        plain.push(flag);
        plain.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        plain.extend_from_slice(payload);
        crypto::seal(
            self.repo.keys(),
            ObjectKind::Wal,
            Some(&self.binding(file)),
            &plain,
        )
    }

    /// Opens a stored object of `file`.
    fn open(&self, file: &str, sealed: &[u8]) -> Result<Vec<u8>, ArchiveError> {
        let object = object_path(ObjectType::Wal, &self.object_name(file));
        let corrupt = |why: String| ArchiveError::Corrupt {
            object: object.clone(),
            why,
        };
        let plain = crypto::open(
            self.repo.keys(),
            ObjectKind::Wal,
            Some(&self.binding(file)),
            sealed,
        )
        .map_err(|e| corrupt(e.to_string()))?;
        if plain.len() < HEADER || plain[0] != FORMAT {
            return Err(corrupt("unknown WAL object format".into()));
        }
        let raw_len = u64::from_le_bytes(plain[2..10].try_into().expect("8 bytes")) as usize;
        let out = match plain[1] {
            RAW => plain[HEADER..].to_vec(),
            ZSTD => zstd::bulk::decompress(&plain[HEADER..], raw_len)
                .map_err(|e| corrupt(format!("decompressing: {e}")))?,
            other => return Err(corrupt(format!("unknown compression {other}"))),
        };
        if out.len() != raw_len {
            return Err(corrupt(format!(
                "{} bytes after decompression, {raw_len} recorded",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Stores a file durably. The same bytes again succeed; other bytes under a name the
    /// archive holds are refused.
    ///
    /// # Errors
    /// `BadName`, `Conflict`, a damaged stored copy, or the store failing.
    pub fn push(&self, file: &str, bytes: &[u8]) -> Result<Pushed, ArchiveError> {
        Self::check_name(file)?;
        let name = self.object_name(file);
        let backend = self.repo.backend();
        if backend.exists(ObjectType::Wal, &name)? {
            return self.compare_existing(file, bytes);
        }
        let sealed = Bytes::from(self.seal(file, bytes));
        match backend.put(ObjectType::Wal, &name, sealed) {
            Ok(()) => Ok(Pushed::Stored),
            // Someone (a retried earlier push) stored it meanwhile: compare.
            Err(BackendError::AlreadyExists { .. }) => self.compare_existing(file, bytes),
            Err(e) => Err(e.into()),
        }
    }

    fn compare_existing(&self, file: &str, bytes: &[u8]) -> Result<Pushed, ArchiveError> {
        match self.fetch(file)? {
            Some(old) if old == bytes => Ok(Pushed::AlreadyThere),
            Some(_) => Err(ArchiveError::Conflict {
                name: file.to_string(),
                system_id: self.system_id,
            }),
            None => Err(ArchiveError::Backend(BackendError::NotFound {
                path: object_path(ObjectType::Wal, &self.object_name(file)),
            })),
        }
    }

    /// A file's bytes, or `None` when the archive does not hold it.
    ///
    /// # Errors
    /// `BadName`, a damaged object, or the store failing.
    pub fn fetch(&self, file: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
        Self::check_name(file)?;
        match self
            .repo
            .backend()
            .get(ObjectType::Wal, &self.object_name(file))
        {
            Ok(sealed) => self.open(file, &sealed).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// True when the archive holds the file.
    ///
    /// # Errors
    /// The store failing.
    pub fn contains(&self, file: &str) -> Result<bool, ArchiveError> {
        Self::check_name(file)?;
        Ok(self
            .repo
            .backend()
            .exists(ObjectType::Wal, &self.object_name(file))?)
    }

    /// History files and segment groups at the top of the archive.
    ///
    /// # Errors
    /// The store failing.
    pub fn top(&self) -> Result<(Vec<String>, Vec<String>), ArchiveError> {
        let l = self
            .repo
            .backend()
            .list_dir(ObjectType::Wal, &self.system_id.to_string())?;
        let histories = l
            .files
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| is_history_name(n))
            .collect();
        Ok((histories, l.dirs))
    }

    /// The files in one segment group (the first 16 digits of their names).
    ///
    /// # Errors
    /// The store failing.
    pub fn group(&self, group: &str) -> Result<Vec<String>, ArchiveError> {
        let l = self
            .repo
            .backend()
            .list_dir(ObjectType::Wal, &format!("{}/{group}", self.system_id))?;
        Ok(l.files.into_iter().map(|(n, _)| n).collect())
    }
}
