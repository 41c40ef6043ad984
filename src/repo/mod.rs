//! The repository: opening it with a password, and reading and writing its sealed objects
//! (config, keys, packs, index, snapshots) through a [`Backend`].

pub mod cache;
pub mod clock;
pub mod config;
pub mod generations;
pub mod index;
pub mod keyhint;
pub mod lock;
pub mod pack;
pub mod prune;
pub mod retire;
pub mod snapshot;
pub mod tree;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod format_tests;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use chacha20poly1305::aead::{rand_core::RngCore, OsRng};
use sha2::{Digest, Sha256};

use crate::backend::{Backend, BackendError, Bytes, LocalBackend, ObjectType};
use crate::crypto::{self, KeyFile, KeyFileError, MasterKeys, ObjectKind, OpenedKey};
use crate::pipeline::blob::BlobLimits;
use crate::pipeline::{blob, BlobId, BlobKind, ChunkerParams};
use generations::LiveKeys;

pub use cache::Cache;
pub use config::Config;
pub use index::Index;
pub use snapshot::{
    BackupSummary, InfluxCounts, InfluxDatabase, InfluxMeta, InfluxRetentionPolicy, InfluxShard,
    PgTablespace, PostgresMeta, Snapshot,
};
pub use tree::{Node, NodeKind, Tree};

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// No `config` at that location.
    #[error("no backupd repository at {location} (run `backupd init` first)")]
    NotARepository {
        /// Where.
        location: String,
    },
    /// `init` on an existing repository or a non-empty directory.
    #[error("{location}: {why}; refusing to initialize")]
    NotEmpty {
        /// Where.
        location: String,
        /// Why.
        why: String,
    },
    /// No key file opened with this password.
    #[error("wrong password: no key in {location} opens with it")]
    WrongPassword {
        /// Where.
        location: String,
    },
    /// An object's bytes do not match its name or did not authenticate.
    #[error("{object}: corrupt or tampered ({why})")]
    CorruptOrTampered {
        /// Which object (path in the repository).
        object: String,
        /// What failed.
        why: String,
    },
    /// The index names no such blob.
    #[error("blob {id} is not in the index (missing or pruned data)")]
    BlobNotFound {
        /// Which blob.
        id: BlobId,
    },
    /// No snapshot matches.
    #[error("no snapshot matches {0:?}")]
    NoSnapshot(String),
    /// More than one snapshot matches a prefix.
    #[error("snapshot prefix {0:?} is ambiguous")]
    AmbiguousSnapshot(String),
    /// A backend failure.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A key file problem other than a wrong password.
    #[error("key file {key}: {source}")]
    KeyFile {
        /// Which key.
        key: String,
        /// Why.
        source: KeyFileError,
    },
    /// A key-file removal or a rotation needs the lock another host holds, or a lock
    /// could not be written.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// A version-2 key file, but no `generations/` bundle.
    #[error("keys/{key} takes its keys from generations/, which holds no bundle (damaged or deleted): open the repository with a version-1 key file, or restore generations/ from a copy")]
    NoGenerations {
        /// Which key.
        key: String,
    },
    /// The newest bundle grants nothing to this key file.
    #[error("keys/{key} opens with this password but generations/{serial:020} grants it no keys: it was removed (key remove, key retire), or added after that bundle by a build gone wrong; use another password or the recovery code")]
    KeyNotGranted {
        /// Which key.
        key: String,
        /// The newest bundle.
        serial: u64,
    },
    /// A version-1 key file does not hold a generation in force.
    #[error("keys/{key} is a version-1 key file and does not hold key generation {generation}, which is in force since a rotation: open the repository with another password (or the recovery code), or remove this key file")]
    LegacyKey {
        /// Which key.
        key: String,
        /// The generation it lacks.
        generation: u32,
    },
    /// Version-1 key files could not follow a rotation.
    #[error("key files {} hold the keys themselves (version 1) and could not follow a rotation: run `backupd key passwd` once with each of their passwords (that makes it version 2), or remove them with `backupd key remove ID`", .0.iter().map(|k| k.get(..8).unwrap_or(k)).collect::<Vec<_>>().join(", "))]
    LegacyKeys(Vec<String>),
    /// The repository (or the key that opened it) predates key generations.
    #[error("this repository's key files predate key generations: run `backupd upgrade` first (it converts the key file in use)")]
    NeedsKeyUpgrade,
    /// Unsupported format version.
    #[error("repository format version {0} is not supported by this backupd (it reads versions 1 and 2): upgrade backupd")]
    UnsupportedVersion(u32),
    /// The repository needs a feature this build does not know.
    #[error("this repository needs the format feature {0:?}, which this backupd does not know: upgrade backupd")]
    UnsupportedFeature(String),
    /// A snapshot needs a feature this build does not know.
    #[error("{object} needs the format feature {feature:?}, which this backupd does not know: upgrade backupd to restore it")]
    SnapshotFeature {
        /// `snapshots/<id>`.
        object: String,
        /// The feature.
        feature: String,
    },
    /// An authentic object whose contents this build cannot decode (written by a newer
    /// backupd, most likely).
    #[error(
        "{object}: authentic but not readable by this backupd ({why}): written by a newer version?"
    )]
    Undecodable {
        /// Which object.
        object: String,
        /// The decoder's message.
        why: String,
    },
}

/// Path of an object for messages.
pub fn object_path(kind: ObjectType, name: &str) -> String {
    kind.path_of(name)
}

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    live: Arc<LiveKeys>,
    config: Config,
    key_id: String,
    kdf_runs: usize,
    cache: Option<Arc<Cache>>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.backend.location())
            .field("id", &self.config.id)
            .finish()
    }
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// True for a name a key file can have: the lower-case hex SHA-256 of its bytes (64
/// digits). Anything else in `keys/` is not a key file and is ignored wherever keys are
/// listed.
pub fn is_key_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Tries one key file's stored bytes with `password`, counting the key derivations run in
/// `kdf_runs`. Anything wrong with the file is a warning naming it; the caller goes on with
/// the next one.
fn try_key(name: &str, bytes: &[u8], password: &[u8], kdf_runs: &mut usize) -> Option<OpenedKey> {
    if sha256_hex(bytes) != name {
        tracing::warn!(
            "keys/{name}: corrupt or tampered (content does not match its name); skipped"
        );
        return None;
    }
    let kf = match KeyFile::parse(bytes) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!("keys/{name}: {e}; skipped");
            return None;
        }
    };
    // The parameters are not authenticated yet: check them before paying for them.
    if let Err(e) = kf.kdf.check() {
        tracing::warn!("keys/{name}: {e}; skipped without running its KDF");
        return None;
    }
    *kdf_runs += 1;
    match kf.open(password) {
        Ok(keys) => Some(keys),
        Err(KeyFileError::WrongPassword) => None,
        Err(e) => {
            tracing::warn!("keys/{name}: {e}; skipped");
            None
        }
    }
}

impl Repository {
    /// Creates a repository in an empty (or missing) local directory.
    ///
    /// # Errors
    /// An existing repository or non-empty directory, or I/O failures.
    pub fn init_local(
        backend: Arc<LocalBackend>,
        password: &[u8],
        host: &str,
        username: &str,
        zstd_level: i32,
    ) -> Result<Self, RepoError> {
        let root = backend.root();
        if root.join("config").exists() {
            return Err(RepoError::NotEmpty {
                location: backend.location(),
                why: "a repository already exists here".into(),
            });
        }
        if let Ok(mut rd) = std::fs::read_dir(root) {
            if rd.next().is_some() {
                return Err(RepoError::NotEmpty {
                    location: backend.location(),
                    why: "the directory is not empty".into(),
                });
            }
        }
        backend.create_layout()?;
        Self::init(backend, password, host, username, zstd_level)
    }

    /// Writes a new config and first key into an empty store.
    ///
    /// # Errors
    /// Backend failures.
    pub fn init(
        backend: Arc<dyn Backend>,
        password: &[u8],
        host: &str,
        username: &str,
        zstd_level: i32,
    ) -> Result<Self, RepoError> {
        if backend.exists(ObjectType::Config, "config")? {
            return Err(RepoError::NotEmpty {
                location: backend.location(),
                why: "a repository already exists here".into(),
            });
        }
        let keys = MasterKeys::generate();
        let mut rid = [0u8; 32];
        OsRng.fill_bytes(&mut rid);
        let config = Config {
            version: config::FORMAT_VERSION,
            id: hex::encode(rid),
            chunker: ChunkerParams::default(),
            zstd_level,
            pack_size: 16 * 1024 * 1024,
            features: vec![config::KEY_GENERATIONS.to_string()],
        };
        // A version-2 key file and bundle 1 granting it generation 1.
        let (kf, pair) = KeyFile::create_pair(
            &keys.id_key,
            &keys.chunker_secret,
            password,
            host,
            username,
            false,
        )
        .map_err(|source| RepoError::KeyFile {
            key: "(new)".into(),
            source,
        })?;
        let kbytes = kf.to_bytes();
        let key_id = sha256_hex(&kbytes);
        backend.put(ObjectType::Key, &key_id, kbytes.into())?;
        let now = chrono::Utc::now().to_rfc3339();
        let mut bundle = crypto::generations::Bundle {
            version: crypto::generations::BUNDLE_VERSION,
            serial: 1,
            written: now.clone(),
            note: format!("init on {host}"),
            generations: vec![crypto::generations::GenerationInfo {
                generation: 1,
                created: now,
            }],
            retired: vec![],
            grants: vec![crypto::generations::Grant::new(
                1,
                &key_id,
                &pair.pair.public,
                &keys.enc_keys,
            )],
            mac: String::new(),
        };
        backend.put(
            ObjectType::Generations,
            &crypto::generations::bundle_name(1),
            bundle.seal_to_bytes(&keys.id_key).into(),
        )?;
        let sealed = crypto::seal(
            &keys,
            ObjectKind::Config,
            None,
            &serde_json::to_vec(&config).expect("config serializes"),
        );
        // The config is written last: a repository exists once its config does.
        backend.put(ObjectType::Config, "config", sealed.into())?;
        let live = LiveKeys::from_pair(backend.clone(), &key_id, pair)?;
        Ok(Repository {
            backend,
            live: Arc::new(live),
            config,
            key_id,
            kdf_runs: 0,
            cache: None,
        })
    }

    /// Opens a repository with a password, trying every key file.
    ///
    /// # Errors
    /// `NotARepository`, `WrongPassword`, a tampered config, or backend failures.
    pub fn open(backend: Arc<dyn Backend>, password: &[u8]) -> Result<Self, RepoError> {
        let sealed = Self::read_config(&backend)?;
        Self::open_with_config(backend, &sealed, password)
    }

    /// Makes a version-1 repository the current format version (`backupd upgrade`): the
    /// config is sealed anew and replaces the old one atomically. Binaries that read only
    /// version 1 then refuse at open, with a message naming the version, instead of meeting
    /// version-2 objects later. Objects already written stay valid (version 2 reads them).
    ///
    /// # Errors
    /// Backend failures.
    pub fn upgrade(&mut self) -> Result<(), RepoError> {
        if self.config.version >= config::FORMAT_VERSION {
            return Ok(());
        }
        let mut c = self.config.clone();
        c.version = config::FORMAT_VERSION;
        let sealed = crypto::seal(
            &self.keys(),
            ObjectKind::Config,
            None,
            &serde_json::to_vec(&c).expect("config serializes"),
        );
        self.backend.replace_config(sealed.into())?;
        self.config = c;
        Ok(())
    }

    /// Reads the sealed config: the first request to a repository, and the proof that one
    /// is there.
    ///
    /// # Errors
    /// `NotARepository`, or backend failures.
    pub fn read_config(backend: &Arc<dyn Backend>) -> Result<Vec<u8>, RepoError> {
        match backend.get(ObjectType::Config, "config") {
            Ok(b) => Ok(b),
            Err(BackendError::NotFound { .. }) => Err(RepoError::NotARepository {
                location: backend.location(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens a repository whose sealed config was read by [`Repository::read_config`].
    ///
    /// # Errors
    /// `WrongPassword`, a tampered config, or backend failures.
    pub fn open_with_config(
        backend: Arc<dyn Backend>,
        sealed: &[u8],
        password: &[u8],
    ) -> Result<Self, RepoError> {
        Self::open_preferring(backend, sealed, password, None)
    }

    /// Like [`Repository::open_with_config`], trying the key file `preferred` first (the
    /// one that opened the repository last time, from [`keyhint::KeyHints`]): when it
    /// opens, it is the only key derivation run, and the key list is not even read. When it
    /// is gone or does not open with this password, every other key file is tried, in
    /// listing order. Names in `keys/` that cannot be key ids are ignored; key files whose
    /// KDF cost is above the caps are skipped (with a warning naming them) without running
    /// their KDF.
    ///
    /// # Errors
    /// `WrongPassword`, a tampered config, or backend failures.
    pub fn open_preferring(
        backend: Arc<dyn Backend>,
        sealed: &[u8],
        password: &[u8],
        preferred: Option<&str>,
    ) -> Result<Self, RepoError> {
        let mut kdf_runs = 0;
        let mut opened = None;
        let preferred = preferred.filter(|n| is_key_name(n));
        if let Some(name) = preferred {
            match backend.get(ObjectType::Key, name) {
                Ok(bytes) => {
                    opened = try_key(name, &bytes, password, &mut kdf_runs)
                        .map(|keys| (name.to_string(), keys));
                    if opened.is_none() {
                        tracing::debug!(
                            "keys/{name} (the key used last time) did not open; trying the others"
                        );
                    }
                }
                Err(e) if e.is_not_found() => {
                    tracing::debug!(
                        "keys/{name} (the key used last time) is gone; trying the others"
                    );
                }
                Err(e) => tracing::warn!("keys/{name}: {e}"),
            }
        }
        if opened.is_none() {
            for (name, _) in backend.list(ObjectType::Key)? {
                if !is_key_name(&name) || preferred == Some(name.as_str()) {
                    continue;
                }
                let bytes = match backend.get(ObjectType::Key, &name) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!("keys/{name}: {e}");
                        continue;
                    }
                };
                if let Some(keys) = try_key(&name, &bytes, password, &mut kdf_runs) {
                    opened = Some((name, keys));
                    break;
                }
            }
        }
        let (key_id, keys) = opened.ok_or_else(|| RepoError::WrongPassword {
            location: backend.location(),
        })?;
        tracing::debug!("keys/{key_id} opened the repository; key derivations run: {kdf_runs}");
        let legacy = matches!(keys, OpenedKey::Legacy(_));
        let live = match keys {
            OpenedKey::Legacy(k) => LiveKeys::fixed(k),
            OpenedKey::Pair(p) => LiveKeys::from_pair(backend.clone(), &key_id, p)?,
        };
        let plain = live
            .open(ObjectKind::Config, None, sealed)
            .map_err(|e| match e {
                crypto::SealError::UnknownGeneration(generation) if legacy => {
                    RepoError::LegacyKey {
                        key: key_id.clone(),
                        generation,
                    }
                }
                e => RepoError::CorruptOrTampered {
                    object: "config".into(),
                    why: e.to_string(),
                },
            })?;
        let config: Config =
            serde_json::from_slice(&plain).map_err(|e| RepoError::CorruptOrTampered {
                object: "config".into(),
                why: e.to_string(),
            })?;
        if !(config::OLDEST_VERSION..=config::FORMAT_VERSION).contains(&config.version) {
            return Err(RepoError::UnsupportedVersion(config.version));
        }
        if let Some(f) = config.unknown_feature() {
            return Err(RepoError::UnsupportedFeature(f.to_string()));
        }
        if !config.chunker.is_valid() {
            return Err(RepoError::CorruptOrTampered {
                object: "config".into(),
                why: "invalid chunker parameters".into(),
            });
        }
        Ok(Repository {
            backend,
            live: Arc::new(live),
            config,
            key_id,
            kdf_runs,
            cache: None,
        })
    }

    /// Uses a local cache under `base` for snapshots, index files and tree packs. A cache
    /// that cannot be created is only a warning.
    #[must_use]
    pub fn with_cache(mut self, base: &Path) -> Self {
        match Cache::open(base, &self.config.id) {
            Ok(c) => self.cache = Some(Arc::new(c)),
            Err(e) => tracing::warn!("{e}; going on without a cache"),
        }
        self
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The master keys now (after any rotation this process has met).
    pub fn keys(&self) -> Arc<MasterKeys> {
        self.live.get()
    }

    /// The live keys: read again when an object names a generation they lack.
    pub fn live_keys(&self) -> &Arc<LiveKeys> {
        &self.live
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Id of the key file that opened the repository.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// How many key derivations (Argon2id runs) opening the repository took: 1 when the
    /// first key tried opened it (0 for a repository this process created).
    pub fn kdf_runs(&self) -> usize {
        self.kdf_runs
    }

    /// Seals and stores an object named by the SHA-256 of its stored bytes.
    ///
    /// # Errors
    /// Backend failures.
    pub fn save_object(
        &self,
        kind: ObjectType,
        okind: ObjectKind,
        plain: &[u8],
    ) -> Result<BlobId, RepoError> {
        let sealed = crypto::seal(&self.keys(), okind, None, plain);
        let id = BlobId(Sha256::digest(&sealed).into());
        let name = id.to_hex();
        let sealed = Bytes::from(sealed);
        self.backend.put(kind, &name, sealed.clone())?;
        if let Some(cache) = &self.cache {
            cache.put(kind, &name, &sealed);
        }
        Ok(id)
    }

    /// Loads, checks and opens an object stored by [`Repository::save_object`].
    ///
    /// # Errors
    /// `CorruptOrTampered` naming the object, or backend failures.
    pub fn load_object(
        &self,
        kind: ObjectType,
        okind: ObjectKind,
        name: &str,
    ) -> Result<Vec<u8>, RepoError> {
        if let Some(cache) = &self.cache {
            if let Some(bytes) = cache.get(kind, name) {
                match self.open_object(kind, okind, name, &bytes) {
                    Ok(plain) => return Ok(plain),
                    Err(e) => {
                        tracing::warn!("cached copy: {e}; fetching it again");
                        cache.remove(kind, name);
                    }
                }
            }
        }
        let bytes = self.backend.get(kind, name)?;
        let plain = self.open_object(kind, okind, name, &bytes)?;
        if let Some(cache) = &self.cache {
            cache.put(kind, name, &bytes);
        }
        Ok(plain)
    }

    /// Checks a stored object against its name and opens it.
    fn open_object(
        &self,
        kind: ObjectType,
        okind: ObjectKind,
        name: &str,
        bytes: &[u8],
    ) -> Result<Vec<u8>, RepoError> {
        if sha256_hex(bytes) != name {
            return Err(RepoError::CorruptOrTampered {
                object: object_path(kind, name),
                why: "content does not match its name".into(),
            });
        }
        self.live
            .open(okind, None, bytes)
            .map_err(|e| RepoError::CorruptOrTampered {
                object: object_path(kind, name),
                why: e.to_string(),
            })
    }

    /// Loads and merges every index file.
    ///
    /// # Errors
    /// A damaged index file (named), or backend failures.
    pub fn load_index(&self) -> Result<Index, RepoError> {
        self.load_index_excluding(&HashSet::new())
    }

    /// Loads every index file, leaving out the packs in `excluded` (packs prune marked:
    /// a backup must not deduplicate against them).
    ///
    /// # Errors
    /// A damaged index file (named), or backend failures.
    pub fn load_index_excluding(&self, excluded: &HashSet<BlobId>) -> Result<Index, RepoError> {
        // A prune replaces index files (the new one first, then the old ones go): when one
        // listed is gone before it is read, list again.
        let mut attempt = 0;
        let (mut all, listed) = loop {
            let mut all = vec![];
            let listed = self.backend.list(ObjectType::Index)?;
            let mut gone = false;
            for (name, _) in &listed {
                match self.load_index_file(name) {
                    Ok(p) => all.extend(p),
                    Err(RepoError::Backend(e)) if e.is_not_found() && attempt < 10 => {
                        gone = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !gone {
                break (all, listed);
            }
            attempt += 1;
        };
        if let Some(cache) = &self.cache {
            cache.retain(
                ObjectType::Index,
                &listed.iter().map(|(n, _)| n.as_str()).collect(),
            );
            let packs: Vec<String> = all.iter().map(|p| p.pack.to_hex()).collect();
            cache.retain(
                ObjectType::Pack,
                &packs.iter().map(String::as_str).collect::<HashSet<_>>(),
            );
        }
        all.retain(|p: &index::IndexedPack| !excluded.contains(&p.pack));
        Ok(Index::from_packs(all))
    }

    /// Loads one index file.
    ///
    /// # Errors
    /// A damaged index file (named), or backend failures.
    pub fn load_index_file(&self, name: &str) -> Result<Vec<index::IndexedPack>, RepoError> {
        let plain = self.load_object(ObjectType::Index, ObjectKind::Index, name)?;
        let limits = BlobLimits::for_chunker(&self.config.chunker);
        index::decode(&plain, &limits).map_err(|e| RepoError::CorruptOrTampered {
            object: object_path(ObjectType::Index, name),
            why: e.to_string(),
        })
    }

    /// Stores an index file for these packs.
    ///
    /// # Errors
    /// Backend failures.
    pub fn save_index(&self, packs: &[index::IndexedPack]) -> Result<BlobId, RepoError> {
        self.save_object(ObjectType::Index, ObjectKind::Index, &index::encode(packs))
    }

    /// Stores a snapshot (the commit point of a backup).
    ///
    /// # Errors
    /// Backend failures.
    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<BlobId, RepoError> {
        let plain = serde_json::to_vec(snap).expect("a snapshot serializes");
        self.save_object(ObjectType::Snapshot, ObjectKind::Snapshot, &plain)
    }

    /// Removes a snapshot object (and its cached copy).
    ///
    /// # Errors
    /// Backend failures.
    pub fn remove_snapshot(&self, id: &BlobId) -> Result<(), RepoError> {
        let name = id.to_hex();
        self.backend.delete(ObjectType::Snapshot, &name)?;
        if let Some(cache) = &self.cache {
            cache.remove(ObjectType::Snapshot, &name);
        }
        Ok(())
    }

    /// Loads one snapshot by full id.
    ///
    /// # Errors
    /// A damaged snapshot (named), or backend failures.
    pub fn load_snapshot(&self, name: &str) -> Result<Snapshot, RepoError> {
        let plain = self.load_object(ObjectType::Snapshot, ObjectKind::Snapshot, name)?;
        let object = object_path(ObjectType::Snapshot, name);
        // Authentic (the seal held): what does not decode was written by a newer build.
        let snap: Snapshot =
            serde_json::from_slice(&plain).map_err(|e| RepoError::Undecodable {
                object: object.clone(),
                why: e.to_string(),
            })?;
        if let Some(f) = snap.unknown_feature() {
            return Err(RepoError::SnapshotFeature {
                object,
                feature: f.to_string(),
            });
        }
        Ok(snap)
    }

    /// All snapshots this build can read, oldest first. One written by a newer backupd (a
    /// feature this build lacks, or contents it cannot decode) is skipped with a warning
    /// naming it, so one new snapshot does not stop every older agent sharing the
    /// repository; a damaged one is an error naming it. Whatever must see every snapshot
    /// (prune, forget, check) uses [`Repository::all_snapshots`].
    ///
    /// # Errors
    /// A damaged snapshot, or backend failures.
    pub fn snapshots(&self) -> Result<Vec<(BlobId, Snapshot)>, RepoError> {
        self.snapshots_with(true)
    }

    /// Every snapshot, oldest first; one this build cannot read is an error naming it and
    /// the feature (prune must not free what such a snapshot uses).
    ///
    /// # Errors
    /// A damaged or unreadable snapshot, or backend failures.
    pub fn all_snapshots(&self) -> Result<Vec<(BlobId, Snapshot)>, RepoError> {
        self.snapshots_with(false)
    }

    fn snapshots_with(&self, skip_newer: bool) -> Result<Vec<(BlobId, Snapshot)>, RepoError> {
        let mut out = vec![];
        let listed = self.backend.list(ObjectType::Snapshot)?;
        if let Some(cache) = &self.cache {
            cache.retain(
                ObjectType::Snapshot,
                &listed.iter().map(|(n, _)| n.as_str()).collect(),
            );
        }
        for (name, _) in listed {
            let id = BlobId::from_hex(&name).ok_or_else(|| RepoError::CorruptOrTampered {
                object: object_path(ObjectType::Snapshot, &name),
                why: "name is not a 64-digit hex id".into(),
            })?;
            match self.load_snapshot(&name) {
                Ok(s) => out.push((id, s)),
                Err(e @ (RepoError::SnapshotFeature { .. } | RepoError::Undecodable { .. }))
                    if skip_newer =>
                {
                    tracing::warn!("skipping {e}");
                }
                Err(e) => return Err(e),
            }
        }
        if skip_newer {
            // A `key retire` killed between writing a snapshot's new copy and deleting the
            // old one leaves both: listed once (the next retire deletes the old one).
            let copied: HashSet<BlobId> = out.iter().filter_map(|(_, s)| s.original_id).collect();
            out.retain(|(id, _)| !copied.contains(id));
        }
        out.sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Resolves `latest`, a full id or a unique prefix. `latest` is an error when any
    /// snapshot cannot be read by this build (it may be the newest).
    ///
    /// # Errors
    /// `NoSnapshot`, `AmbiguousSnapshot`, or load failures.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<(BlobId, Snapshot), RepoError> {
        if spec == "latest" {
            // Every snapshot counts: one this build cannot read may be the newest, and
            // "latest" must not quietly mean an older one.
            return self
                .all_snapshots()?
                .pop()
                .ok_or_else(|| RepoError::NoSnapshot(spec.into()));
        }
        let names: Vec<String> = self
            .backend
            .list(ObjectType::Snapshot)?
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(spec))
            .collect();
        match names.as_slice() {
            // A snapshot `key retire` sealed again answers to the id it was written with.
            [] if !spec.is_empty() => {
                let mut by_original: Vec<(BlobId, Snapshot)> = self
                    .all_snapshots()?
                    .into_iter()
                    .filter(|(_, s)| s.original_id.is_some_and(|o| o.to_hex().starts_with(spec)))
                    .collect();
                match by_original.len() {
                    0 => Err(RepoError::NoSnapshot(spec.into())),
                    1 => Ok(by_original.remove(0)),
                    _ => Err(RepoError::AmbiguousSnapshot(spec.into())),
                }
            }
            [] => Err(RepoError::NoSnapshot(spec.into())),
            [one] => {
                let id = BlobId::from_hex(one).ok_or_else(|| RepoError::NoSnapshot(spec.into()))?;
                Ok((id, self.load_snapshot(one)?))
            }
            _ => Err(RepoError::AmbiguousSnapshot(spec.into())),
        }
    }

    /// Reads and decodes one blob.
    ///
    /// # Errors
    /// `BlobNotFound`, a damaged pack (named), or backend failures.
    pub fn read_blob(&self, index: &Index, id: &BlobId) -> Result<Vec<u8>, RepoError> {
        let loc = index.get(id).ok_or(RepoError::BlobNotFound { id: *id })?;
        let pack = loc.pack.to_hex();
        if let (Some(cache), BlobKind::Tree) = (&self.cache, loc.kind) {
            // Packs holding trees are fetched whole once and read locally from then on:
            // walking a snapshot costs one request per tree pack, not one per directory.
            let filled = cache.fill_once(ObjectType::Pack, &pack, || {
                self.backend.get(ObjectType::Pack, &pack)
            });
            match filled {
                Ok(true) => {
                    if let Some(plain) = cache
                        .get_range(
                            ObjectType::Pack,
                            &pack,
                            loc.offset as u64,
                            loc.length as u64,
                        )
                        .and_then(|sealed| {
                            blob::decode(
                                &self.keys(),
                                loc.kind,
                                id,
                                &sealed,
                                loc.raw_length as usize,
                            )
                            .ok()
                        })
                    {
                        return Ok(plain);
                    }
                    // Damaged or short in the cache (or in the store): drop the copy and
                    // read the blob from the store, which names any damage.
                    cache.remove(ObjectType::Pack, &pack);
                }
                // Not cached (the cache cannot be written), or the pack is missing: the
                // ranged read below reads the blob or names the failure.
                Ok(false) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let sealed = self
            .backend
            .get_range(
                ObjectType::Pack,
                &pack,
                loc.offset as u64,
                loc.length as u64,
            )
            .map_err(|e| match e {
                BackendError::ShortRead { .. } => RepoError::CorruptOrTampered {
                    object: object_path(ObjectType::Pack, &pack),
                    why: e.to_string(),
                },
                other => RepoError::Backend(other),
            })?;
        blob::decode(&self.keys(), loc.kind, id, &sealed, loc.raw_length as usize).map_err(|e| {
            RepoError::CorruptOrTampered {
                object: object_path(ObjectType::Pack, &pack),
                why: e.to_string(),
            }
        })
    }

    /// Reads one tree.
    ///
    /// # Errors
    /// As [`Repository::read_blob`], or a tree that does not parse.
    pub fn load_tree(&self, index: &Index, id: &BlobId) -> Result<Tree, RepoError> {
        let plain = self.read_blob(index, id)?;
        serde_json::from_slice(&plain).map_err(|e| RepoError::CorruptOrTampered {
            object: format!("tree {id}"),
            why: e.to_string(),
        })
    }

    /// The full chunk list of a file node (inline or through content-list blobs).
    ///
    /// # Errors
    /// As [`Repository::read_blob`].
    pub fn file_content(&self, index: &Index, node: &Node) -> Result<Vec<BlobId>, RepoError> {
        if node.content_lists.is_empty() {
            return Ok(node.content.clone());
        }
        let mut out = vec![];
        for l in &node.content_lists {
            let b = self.read_blob(index, l)?;
            out.extend(tree::decode_content_list(&b).ok_or_else(|| {
                RepoError::CorruptOrTampered {
                    object: format!("content list {l}"),
                    why: "length is not a multiple of 32".into(),
                }
            })?);
        }
        Ok(out)
    }

    /// Lists key files with their metadata (names that cannot be key ids are left out).
    ///
    /// # Errors
    /// Backend failures.
    pub fn list_keys(&self) -> Result<Vec<(String, Option<KeyFile>)>, RepoError> {
        let mut out = vec![];
        for (name, _) in self.backend.list(ObjectType::Key)? {
            if !is_key_name(&name) {
                continue;
            }
            let kf = self
                .backend
                .get(ObjectType::Key, &name)
                .ok()
                .and_then(|b| KeyFile::parse(&b).ok());
            out.push((name, kf));
        }
        Ok(out)
    }

    /// Adds a key file for another password; returns its id.
    ///
    /// # Errors
    /// Backend or KDF failures.
    pub fn add_key(&self, password: &[u8], host: &str, user: &str) -> Result<String, RepoError> {
        self.add_key_file(password, host, user, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (key id, password) pairs.
    type Keys = Vec<(String, String)>;

    /// A local repository with four key files, each opening with its own password; returns
    /// the backend, the sealed config, and (key id, password) sorted by key id, so the last
    /// one is listed last.
    fn four_keys(dir: &Path) -> (Arc<dyn Backend>, Vec<u8>, Keys) {
        let backend = Arc::new(LocalBackend::new(dir.join("repo")));
        let repo = Repository::init_local(backend.clone(), b"pw0", "h", "u", 1).unwrap();
        let mut keys = vec![(repo.key_id().to_string(), "pw0".to_string())];
        for i in 1..4 {
            let pw = format!("pw{i}");
            keys.push((repo.add_key(pw.as_bytes(), "h", "u").unwrap(), pw));
        }
        keys.sort();
        let backend: Arc<dyn Backend> = backend;
        let sealed = Repository::read_config(&backend).unwrap();
        (backend, sealed, keys)
    }

    #[test]
    fn an_index_entry_longer_than_any_blob_is_named_not_allocated() {
        let d = tempfile::tempdir().unwrap();
        let backend = Arc::new(LocalBackend::new(d.path().join("repo")));
        let repo = Repository::init_local(backend, b"pw", "h", "u", 1).unwrap();
        // An index file written with the keys (a writer gone wrong, or anyone holding
        // them), claiming a 4 GiB data blob.
        let entry = pack::PackEntry {
            kind: BlobKind::Data,
            id: BlobId([3; 32]),
            offset: 0,
            length: 100,
            raw_length: u32::MAX,
        };
        let name = repo
            .save_index(&[index::IndexedPack {
                pack: BlobId([4; 32]),
                entries: vec![entry],
            }])
            .unwrap()
            .to_hex();
        match repo.load_index() {
            Err(RepoError::CorruptOrTampered { object, why }) => {
                assert_eq!(object, format!("index/{name}"));
                assert!(why.contains("raw length 4294967295 above"), "{why}");
            }
            other => panic!("{:?}", other.map(|i| i.len())),
        }
    }

    #[test]
    fn the_preferred_key_is_the_only_key_derivation() {
        let d = tempfile::tempdir().unwrap();
        let (backend, sealed, keys) = four_keys(d.path());
        let (last, pw) = &keys[3];
        // Without a hint, every key listed before the right one costs a derivation.
        let r = Repository::open_with_config(backend.clone(), &sealed, pw.as_bytes()).unwrap();
        assert_eq!((r.key_id(), r.kdf_runs()), (last.as_str(), 4));
        // With it, one.
        let r = Repository::open_preferring(backend.clone(), &sealed, pw.as_bytes(), Some(last))
            .unwrap();
        assert_eq!((r.key_id(), r.kdf_runs()), (last.as_str(), 1));
        // A hint naming a key of another password: that one, then the others in order.
        let r =
            Repository::open_preferring(backend.clone(), &sealed, pw.as_bytes(), Some(&keys[1].0))
                .unwrap();
        assert_eq!((r.key_id(), r.kdf_runs()), (last.as_str(), 4));
        // A hint naming a key that is gone, or no key id at all: as without a hint.
        backend.delete(ObjectType::Key, &keys[0].0).unwrap();
        for hint in [keys[0].0.as_str(), "../config", ""] {
            let r =
                Repository::open_preferring(backend.clone(), &sealed, pw.as_bytes(), Some(hint))
                    .unwrap();
            assert_eq!((r.key_id(), r.kdf_runs()), (last.as_str(), 3), "{hint:?}");
        }
        // A wrong password still is one.
        assert!(matches!(
            Repository::open_preferring(backend, &sealed, b"nope", Some(last)),
            Err(RepoError::WrongPassword { .. })
        ));
    }
}
