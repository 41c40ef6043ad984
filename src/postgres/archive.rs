//! The WAL archive inside a repository: `wal/<system id>/<group>/<file>` for segments and
//! their `.backup`/`.partial` files, `wal/<system id>/<TTTTTTTT>.history` for history
//! files. One object per file, named by PostgreSQL's own file name so recovery fetches it
//! without loading any index; sealed with the file's archive name bound into the
//! associated data, so a segment stored under another segment's name fails to open.
//!
//! Object plaintext: `version (1) | compression (0 raw, 1 zstd) | raw length (u64 LE) |
//! payload`.
//!
//! The raw length is the archived file's exact size. No file PostgreSQL archives is larger
//! than a WAL segment, and segments are at most 1 GiB (`initdb --wal-segsize`, 16 MiB by
//! default; history and backup history files are small). The object does not record the
//! cluster's segment size, so [`MAX_WAL_FILE`] is that maximum: a larger file is refused
//! on push, a larger recorded length on fetch, and decompression memory follows the bytes
//! that come out (up to the recorded length), not the recorded length alone.

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::walname::{group_of, is_archivable_name, is_history_name, is_segment_name};
use crate::backend::{BackendError, ObjectType};
use crate::crypto::{self, ObjectKind};
use crate::repo::{object_path, Repository};

const FORMAT: u8 = 1;
const RAW: u8 = 0;
const ZSTD: u8 = 1;
const HEADER: usize = 10;
/// The largest file the archive holds: PostgreSQL's largest WAL segment size, 1 GiB.
pub const MAX_WAL_FILE: u64 = 1 << 30;
/// What is reserved up front for a decompressed file: a default-sized segment (16 MiB).
const INITIAL_RESERVE: usize = 16 << 20;

/// Why a WAL archive operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not a WAL, history, backup history or partial file name.
    #[error("{0:?} is not a WAL file name PostgreSQL archives")]
    BadName(String),
    /// Larger than any file PostgreSQL archives.
    #[error("{name}: {len} bytes is larger than any WAL file PostgreSQL archives (at most {MAX_WAL_FILE})")]
    TooLarge {
        /// File name.
        name: String,
        /// Its size.
        len: u64,
    },
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
    /// A streamed piece listed a moment ago is gone: the streamer completed its segment
    /// meanwhile (the reader looks again).
    #[error("{object}: removed while it was being read (its segment was completed meanwhile)")]
    PieceGone {
        /// Object name.
        object: String,
    },
    /// The store failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The key generations could not be read.
    #[error(transparent)]
    Keys(#[from] Box<crate::repo::RepoError>),
}

/// The associated data binding a WAL object to its name under `wal/` (format.md §17): a
/// segment stored under another name fails to open.
pub fn binding_of(object_name: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"backupd wal\0");
    h.update(object_name.as_bytes());
    h.finalize().into()
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Stored now.
    Stored,
    /// The same bytes were there already.
    AlreadyThere,
}

/// Decompresses `payload`, producing at most `raw_len + 1` bytes (one more shows the
/// stream is longer than recorded). Memory grows with the output, from a 16 MiB start.
fn decompress_bounded(payload: &[u8], raw_len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::with_capacity(raw_len.min(INITIAL_RESERVE));
    zstd::stream::read::Decoder::with_buffer(payload)?
        .take(raw_len as u64 + 1)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// Decodes the opened plaintext of a WAL object (`version | compression | raw length |
/// payload`) into the archived file's bytes. Public for the fuzz targets (`fuzz/`).
///
/// # Errors
/// An unknown format or compression, a recorded length above [`MAX_WAL_FILE`], a payload
/// that does not decompress, or one whose length is not the recorded one.
pub fn decode_object(plain: &[u8]) -> Result<Vec<u8>, String> {
    if plain.len() < HEADER || plain[0] != FORMAT {
        return Err("unknown WAL object format".into());
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&plain[2..HEADER]);
    let recorded = u64::from_le_bytes(len);
    if recorded > MAX_WAL_FILE {
        return Err(format!(
            "recorded length {recorded} is larger than any WAL file (at most {MAX_WAL_FILE})"
        ));
    }
    // At most 1 GiB: fits a usize on every platform this runs on.
    let raw_len = recorded as usize;
    let out = match plain[1] {
        RAW => plain[HEADER..].to_vec(),
        ZSTD => decompress_bounded(&plain[HEADER..], raw_len)
            .map_err(|e| format!("decompressing: {e}"))?,
        other => return Err(format!("unknown compression {other}")),
    };
    if out.len() != raw_len {
        return Err(format!(
            "{} bytes after decompression, {raw_len} recorded",
            out.len()
        ));
    }
    Ok(out)
}

/// True when two copies of a segment hold the same WAL: the same size, the same end of
/// valid WAL ([`super::walscan::scan_segment`]), and the same bytes up to it.
pub fn same_valid_wal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (Some(sa), Some(sb)) = (
        super::walscan::scan_segment(a),
        super::walscan::scan_segment(b),
    ) else {
        return false;
    };
    sa.valid_end == sb.valid_end && a[..sa.valid_end] == b[..sb.valid_end]
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
        binding_of(&self.object_name(file))
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
            &self.repo.keys(),
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
            &self.repo.keys(),
            ObjectKind::Wal,
            Some(&self.binding(file)),
            sealed,
        )
        .map_err(|e| corrupt(e.to_string()))?;
        decode_object(&plain).map_err(corrupt)
    }

    /// Stores a file durably. The same bytes again succeed; other bytes under a name the
    /// archive holds are refused.
    ///
    /// # Errors
    /// `BadName`, `Conflict`, a damaged stored copy, or the store failing.
    pub fn push(&self, file: &str, bytes: &[u8]) -> Result<Pushed, ArchiveError> {
        Self::check_name(file)?;
        if bytes.len() as u64 > MAX_WAL_FILE {
            return Err(ArchiveError::TooLarge {
                name: file.to_string(),
                len: bytes.len() as u64,
            });
        }
        let name = self.object_name(file);
        let backend = self.repo.backend();
        if backend.exists(ObjectType::Wal, &name)? {
            return self.compare_existing(file, bytes);
        }
        // The newest key generation just before sealing (one listing): a `key retire`
        // since this process opened the repository must not be left a segment sealed with
        // a generation it is dropping.
        self.repo.live_keys().refresh().map_err(Box::new)?;
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
            // A segment streamed by `wal-stream` and the one `archive_command` pushes are
            // the same WAL up to where the WAL ends (a switch record), and may differ
            // after it: only the valid WAL is compared, and the archive keeps its copy.
            Some(old) if is_segment_name(file) && same_valid_wal(&old, bytes) => {
                tracing::debug!(
                    file,
                    "already archived with the same WAL (a different tail after its end)"
                );
                Ok(Pushed::AlreadyThere)
            }
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

    /// Stores an object of the archive's own under `file` (a streamed piece or the stream
    /// status, [`super::streamed`]): sealed and bound to its name like a segment;
    /// `replace` overwrites one that exists.
    ///
    /// # Errors
    /// The store failing (`AlreadyExists` without `replace`).
    pub(super) fn put_own(
        &self,
        file: &str,
        bytes: &[u8],
        replace: bool,
    ) -> Result<(), ArchiveError> {
        self.repo.live_keys().refresh().map_err(Box::new)?;
        let sealed = Bytes::from(self.seal(file, bytes));
        let name = self.object_name(file);
        let backend = self.repo.backend();
        if replace {
            backend.replace(ObjectType::Wal, &name, sealed)?;
        } else {
            backend.put(ObjectType::Wal, &name, sealed)?;
        }
        Ok(())
    }

    /// An object of the archive's own, or `None`.
    ///
    /// # Errors
    /// A damaged object or the store failing.
    pub(super) fn get_own(&self, file: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
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

    /// Removes an object of the archive's own (gone already is fine).
    ///
    /// # Errors
    /// The store failing.
    pub(super) fn delete_own(&self, file: &str) -> Result<(), ArchiveError> {
        match self
            .repo
            .backend()
            .delete(ObjectType::Wal, &self.object_name(file))
        {
            Err(e) if !e.is_not_found() => Err(e.into()),
            _ => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::LocalBackend;

    const FILE: &str = "000000010000000000000001";

    fn repo(dir: &std::path::Path) -> Repository {
        Repository::init_local(
            Arc::new(LocalBackend::new(dir.join("repo"))),
            b"pw",
            "h",
            "u",
            3,
        )
        .unwrap()
    }

    /// Stores a WAL object of `FILE` with this plaintext header and payload, sealed as the
    /// archive seals (someone holding the keys, or a writer gone wrong).
    fn store_forged(a: &WalArchive<'_>, flag: u8, raw_len: u64, payload: &[u8]) {
        let mut plain = vec![FORMAT, flag];
        plain.extend_from_slice(&raw_len.to_le_bytes());
        plain.extend_from_slice(payload);
        let sealed = crypto::seal(
            &a.repo.keys(),
            ObjectKind::Wal,
            Some(&a.binding(FILE)),
            &plain,
        );
        let name = a.object_name(FILE);
        let backend = a.repo.backend();
        let _ = backend.delete(ObjectType::Wal, &name);
        backend.put(ObjectType::Wal, &name, sealed.into()).unwrap();
    }

    #[test]
    fn a_recorded_length_beyond_any_wal_file_is_an_error_not_an_allocation() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let a = WalArchive::new(&repo, 7);
        let segment = vec![5u8; 1 << 20];
        a.push(FILE, &segment).unwrap();
        assert_eq!(a.fetch(FILE).unwrap().unwrap(), segment);
        let payload = zstd::bulk::compress(&segment, 3).unwrap();
        // u64::MAX would have been the capacity of the output buffer (a panic); anything
        // above 1 GiB is no WAL file.
        for raw_len in [u64::MAX, MAX_WAL_FILE + 1] {
            store_forged(&a, ZSTD, raw_len, &payload);
            let e = a.fetch(FILE).unwrap_err().to_string();
            assert!(e.contains("larger than any WAL file"), "{e}");
            assert!(e.contains(&a.object_name(FILE)), "{e}");
        }
        // Within the cap but not what the stream holds: an error either way, and the
        // output stops one byte past the recorded length.
        for raw_len in [MAX_WAL_FILE, 1000] {
            store_forged(&a, ZSTD, raw_len, &payload);
            let e = a.fetch(FILE).unwrap_err().to_string();
            assert!(e.contains("recorded"), "{e}");
        }
        store_forged(&a, RAW, 3, b"four");
        assert!(a.fetch(FILE).is_err());
    }

    #[test]
    fn a_file_larger_than_any_wal_file_is_not_pushed() {
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let a = WalArchive::new(&repo, 7);
        // Zeroed and untouched: refused before it is read.
        let big = vec![0u8; MAX_WAL_FILE as usize + 1];
        assert!(matches!(
            a.push(FILE, &big),
            Err(ArchiveError::TooLarge { .. })
        ));
        assert!(!a.contains(FILE).unwrap());
    }
}
