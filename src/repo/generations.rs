//! The repository's key generations (decision 0014, format.md §3): the keys an open
//! repository seals and opens with ([`LiveKeys`], read again when an object names a
//! generation this process does not know), and the verbs that write a new
//! `generations/<serial>` bundle — `key rotate`, `key add`, `key remove`, `key passwd` and
//! the conversion of a repository whose key files predate generations (`upgrade`). Each
//! writes its bundle under an exclusive `keys` lock, so two hosts never both make serial
//! N+1 or generation N+1.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::config::KEY_GENERATIONS;
use super::lock::{LockKind, RepoLock};
use super::{is_key_name, sha256_hex, RepoError, Repository};
use crate::backend::{Backend, ObjectType};
use crate::crypto::generations::{
    bundle_name, parse_bundle_name, Bundle, GenerationInfo, GenerationsError, Grant, BUNDLE_VERSION,
};
use crate::crypto::{self, KeyFile, MasterKeys, ObjectKind, PairKey, SealError, Secret32};

/// A process asks the store for newer keys at most this often (an object naming a
/// generation nobody made must not turn every read into two requests more).
const RELOAD_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Where a version-2 key's generations come from.
struct PairSource {
    backend: Arc<dyn Backend>,
    key_id: String,
    key: PairKey,
}

/// The keys of an open repository. A version-1 key file's keys are fixed; a version-2 key
/// file's are its grant in the newest bundle, read again when an object or a lock names a
/// generation they lack (a rotation since this process opened the repository).
pub struct LiveKeys {
    current: RwLock<Arc<MasterKeys>>,
    /// The serial of the bundle `current` came from (0: none).
    serial: Mutex<u64>,
    source: Option<PairSource>,
    last_reload: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for LiveKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveKeys(<redacted>)")
    }
}

impl LiveKeys {
    /// Keys that never change (a version-1 key file, or a repository being created).
    pub fn fixed(keys: MasterKeys) -> Self {
        LiveKeys {
            current: RwLock::new(Arc::new(keys)),
            serial: Mutex::new(0),
            source: None,
            last_reload: Mutex::new(None),
        }
    }

    /// The keys of key file `key_id` (version 2): its grant in the newest bundle.
    ///
    /// # Errors
    /// No bundle, no grant for the key, a tampered bundle, or backend failures.
    pub fn from_pair(
        backend: Arc<dyn Backend>,
        key_id: &str,
        key: PairKey,
    ) -> Result<Self, RepoError> {
        let (serial, keys) = grant_keys(&backend, key_id, &key)?;
        Ok(LiveKeys {
            current: RwLock::new(Arc::new(keys)),
            serial: Mutex::new(serial),
            source: Some(PairSource {
                backend,
                key_id: key_id.to_string(),
                key,
            }),
            last_reload: Mutex::new(None),
        })
    }

    /// The keys now.
    pub fn get(&self) -> Arc<MasterKeys> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// True when these keys follow the repository's bundle (a version-2 key file).
    pub fn follows_generations(&self) -> bool {
        self.source.is_some()
    }

    /// Reads the newest bundle again (a version-1 key: nothing to read).
    ///
    /// # Errors
    /// As [`LiveKeys::from_pair`].
    pub fn reload(&self) -> Result<(), RepoError> {
        let Some(src) = &self.source else {
            return Ok(());
        };
        let (serial, keys) = grant_keys(&src.backend, &src.key_id, &src.key)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        *self.serial.lock().unwrap_or_else(|e| e.into_inner()) = serial;
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(())
    }

    /// Reads the bundle again only if a newer one is listed (one listing when none is).
    ///
    /// # Errors
    /// As [`LiveKeys::reload`].
    pub fn refresh(&self) -> Result<(), RepoError> {
        let Some(src) = &self.source else {
            return Ok(());
        };
        let known = *self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let newest = src
            .backend
            .list(ObjectType::Generations)?
            .into_iter()
            .filter_map(|(n, _)| parse_bundle_name(&n))
            .max()
            .unwrap_or(0);
        if newest > known {
            self.reload()?;
        }
        Ok(())
    }

    /// Reads the bundle again because generation `g` was met, unless it was read less
    /// than [`RELOAD_AT_MOST_EVERY`] ago; true when `g` is known afterwards.
    fn reload_for(&self, g: u32) -> bool {
        if self.source.is_none() {
            return false;
        }
        let recent = self
            .last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < RELOAD_AT_MOST_EVERY);
        if !recent {
            tracing::debug!("generation {g} met: reading the key generations again");
            if let Err(e) = self.reload() {
                tracing::warn!("reading the key generations again: {e}");
            }
        }
        self.get().generation(g).is_some()
    }

    /// Opens a sealed object, reading the generations again first when it names one these
    /// keys lack.
    ///
    /// # Errors
    /// As [`crypto::open`].
    pub fn open(
        &self,
        kind: ObjectKind,
        blob_id: Option<&[u8; 32]>,
        sealed: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        match crypto::open(&self.get(), kind, blob_id, sealed) {
            Err(SealError::UnknownGeneration(g)) if self.reload_for(g) => {
                crypto::open(&self.get(), kind, blob_id, sealed)
            }
            other => other,
        }
    }
}

/// The newest authentic bundle (None: the repository has none). A bundle that vanished
/// between listing and reading was replaced by a newer one: listed again.
///
/// # Errors
/// A newest bundle that does not verify (named), or backend failures.
pub fn newest_bundle(
    backend: &Arc<dyn Backend>,
    id_key: &Secret32,
) -> Result<Option<Bundle>, RepoError> {
    for _ in 0..10 {
        let newest = backend
            .list(ObjectType::Generations)?
            .into_iter()
            .filter_map(|(n, _)| parse_bundle_name(&n).map(|s| (s, n)))
            .max();
        let Some((serial, name)) = newest else {
            return Ok(None);
        };
        let bytes = match backend.get(ObjectType::Generations, &name) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let bad = |why: String| RepoError::CorruptOrTampered {
            object: ObjectType::Generations.path_of(&name),
            why,
        };
        let b = Bundle::parse_verified(&bytes, id_key).map_err(|e| bad(e.to_string()))?;
        if b.serial != serial {
            return Err(bad(format!("it says it is serial {}", b.serial)));
        }
        return Ok(Some(b));
    }
    Err(RepoError::CorruptOrTampered {
        object: "generations/".into(),
        why: "bundles keep disappearing while read".into(),
    })
}

/// The master keys key file `key_id` gets from the newest bundle, with its serial.
fn grant_keys(
    backend: &Arc<dyn Backend>,
    key_id: &str,
    key: &PairKey,
) -> Result<(u64, MasterKeys), RepoError> {
    let bundle = newest_bundle(backend, &key.id_key)?.ok_or_else(|| RepoError::NoGenerations {
        key: key_id.to_string(),
    })?;
    let enc_keys = bundle.open_grant(key_id, &key.pair).map_err(|e| match e {
        GenerationsError::NoGrant(_) => RepoError::KeyNotGranted {
            key: key_id.to_string(),
            serial: bundle.serial,
        },
        other => RepoError::CorruptOrTampered {
            object: ObjectType::Generations.path_of(&bundle_name(bundle.serial)),
            why: other.to_string(),
        },
    })?;
    Ok((
        bundle.serial,
        MasterKeys {
            id_key: key.id_key.clone(),
            chunker_secret: key.chunker_secret.clone(),
            enc_keys,
        },
    ))
}

/// How old the newest generation of `bundle` is (None: its time does not parse).
pub fn generation_age(bundle: &Bundle) -> Option<std::time::Duration> {
    let created = bundle.generations.last()?.created.as_str();
    let t = chrono::DateTime::parse_from_rfc3339(created).ok()?;
    chrono::Utc::now()
        .signed_duration_since(t)
        .to_std()
        .ok()
        .or(Some(std::time::Duration::ZERO))
}

/// What a new bundle changes.
pub(crate) enum Change<'a> {
    /// A new generation.
    Rotate,
    /// Key file `id` (already written) joins.
    Add(&'a str),
    /// Key file `id` leaves (its file is deleted afterwards).
    Remove(&'a str),
    /// Generations up to this one leave (`key retire`, once nothing is sealed with them).
    Retire(u32),
}

/// A key file of the repository as a bundle writer sees it.
pub struct KeyEntry {
    /// Its id.
    pub id: String,
    /// Its contents (None: unreadable or malformed).
    pub file: Option<KeyFile>,
    /// Its public key, when it is version 2 and authentic.
    pub public: Option<[u8; 32]>,
}

impl KeyEntry {
    /// True for a version-1 key file (it holds the keys itself and gets no grant).
    pub fn is_legacy(&self) -> bool {
        self.file.as_ref().is_some_and(|f| f.version == 1)
    }
}

impl Repository {
    /// True when the repository's key files take their encryption keys from
    /// `generations/` bundles (the `key-generations` feature).
    pub fn has_generations(&self) -> bool {
        self.config.features.iter().any(|f| f == KEY_GENERATIONS)
    }

    /// The newest bundle (None: the repository predates key generations).
    ///
    /// # Errors
    /// A tampered bundle, or backend failures.
    pub fn generations(&self) -> Result<Option<Bundle>, RepoError> {
        newest_bundle(&self.backend, &self.keys().id_key)
    }

    /// Every key file, with its public key where it is authentic.
    ///
    /// # Errors
    /// Backend failures.
    pub fn key_entries(&self) -> Result<Vec<KeyEntry>, RepoError> {
        let id_key = self.keys().id_key.clone();
        Ok(self
            .list_keys()?
            .into_iter()
            .map(|(id, file)| {
                let public = file.as_ref().and_then(|f| f.verified_public_key(&id_key));
                KeyEntry { id, file, public }
            })
            .collect())
    }

    /// Takes the exclusive `keys` lock.
    fn keys_lock(&self) -> Result<RepoLock, RepoError> {
        Ok(RepoLock::acquire(
            self.backend.clone(),
            self.live.clone(),
            LockKind::Keys,
            &crate::host::hostname(),
            None,
        )?)
    }

    /// Writes the bundle after the newest with `change` applied, under the `keys` lock
    /// (taken by the caller), then deletes the older bundles; returns it.
    pub(crate) fn write_bundle(&self, change: Change<'_>, note: &str) -> Result<Bundle, RepoError> {
        // Whatever was rotated since this process opened the repository is included.
        self.live.reload()?;
        let keys = self.keys();
        let prev = self.generations()?;
        let serial = prev.as_ref().map_or(1, |b| b.serial + 1);
        let now = chrono::Utc::now().to_rfc3339();
        let mut generations = prev.as_ref().map_or_else(
            || {
                keys.enc_keys
                    .keys()
                    .map(|g| GenerationInfo {
                        generation: *g,
                        created: now.clone(),
                    })
                    .collect()
            },
            |b| b.generations.clone(),
        );
        // Every generation in force must be one these keys hold (a version-1 key file
        // opened after a rotation holds only the older ones).
        if let Some(g) = generations
            .iter()
            .find(|g| keys.generation(g.generation).is_none())
        {
            return Err(RepoError::LegacyKey {
                key: self.key_id.clone(),
                generation: g.generation,
            });
        }
        let mut enc_keys: BTreeMap<u32, Secret32> = generations
            .iter()
            .filter_map(|g| Some((g.generation, keys.generation(g.generation)?.clone())))
            .collect();
        let mut retired = prev.as_ref().map(|b| b.retired.clone()).unwrap_or_default();
        if let Change::Retire(upto) = change {
            retired.extend(generations.iter().filter(|g| g.generation <= upto).cloned());
            generations.retain(|g| g.generation > upto);
            enc_keys.retain(|g, _| *g > upto);
            if generations.is_empty() {
                return Err(RepoError::CorruptOrTampered {
                    object: "generations/".into(),
                    why: format!("retiring up to {upto} would leave no generation"),
                });
            }
        }
        if let Change::Rotate = change {
            let next = generations.last().map_or(1, |g| g.generation + 1);
            generations.push(GenerationInfo {
                generation: next,
                created: now.clone(),
            });
            enc_keys.insert(next, Secret32::random());
        }
        let entries = self.key_entries()?;
        let mut grants = vec![];
        for e in &entries {
            if matches!(change, Change::Remove(id) if id == e.id) {
                continue;
            }
            match (&e.public, &e.file) {
                (Some(public), _) => grants.push(Grant::new(serial, &e.id, public, &enc_keys)),
                (None, Some(f)) if f.version == 1 => {}
                _ => tracing::warn!(
                    "keys/{}: not made with this repository's keys (or damaged): no grant",
                    e.id
                ),
            }
        }
        if let Change::Add(id) = change {
            if !grants.iter().any(|g| g.key == id) {
                return Err(RepoError::CorruptOrTampered {
                    object: ObjectType::Key.path_of(id),
                    why: "the key file just written is not listed or not authentic".into(),
                });
            }
        }
        let mut bundle = Bundle {
            version: BUNDLE_VERSION,
            serial,
            written: now,
            note: format!("{note} on {}", crate::host::hostname()),
            generations,
            retired,
            grants,
            mac: String::new(),
        };
        let bytes = bundle.seal_to_bytes(&keys.id_key);
        self.backend.put(
            ObjectType::Generations,
            &bundle_name(serial),
            Bytes::from(bytes),
        )?;
        // The older bundles grant what the new one does or less (or, after `key remove`,
        // to a key that is gone): deleted. A reader that listed one lists again.
        for (name, _) in self.backend.list(ObjectType::Generations)? {
            if parse_bundle_name(&name).is_some_and(|s| s < serial) {
                if let Err(e) = self.backend.delete(ObjectType::Generations, &name) {
                    tracing::warn!("generations/{name}: {e}");
                }
            }
        }
        // (A key that removed itself — `key passwd` — has nothing more to read.)
        if !matches!(change, Change::Remove(id) if id == self.key_id) {
            self.live.reload()?;
        }
        Ok(bundle)
    }

    /// Adds a generation (`key rotate`): from now on every object written is sealed with
    /// it. No object is rewritten. Refused while a version-1 key file remains (it could
    /// not follow), and while another host changes the keys (exit 11).
    ///
    /// # Errors
    /// `LegacyKeys`, a held `keys` lock, or backend failures.
    pub fn rotate(&self) -> Result<Bundle, RepoError> {
        self.rotate_if_older(None).map(|(b, _)| b)
    }

    /// [`Repository::rotate`] only when the newest generation is at least `min_age` old
    /// (checked under the `keys` lock, so two policies sharing the repository rotate it
    /// once); returns the newest bundle and whether it rotated.
    ///
    /// # Errors
    /// As [`Repository::rotate`].
    pub fn rotate_if_older(
        &self,
        min_age: Option<std::time::Duration>,
    ) -> Result<(Bundle, bool), RepoError> {
        if !self.has_generations() || !self.live.follows_generations() {
            return Err(RepoError::NeedsKeyUpgrade);
        }
        let legacy: Vec<String> = self
            .key_entries()?
            .into_iter()
            .filter(KeyEntry::is_legacy)
            .map(|e| e.id)
            .collect();
        if !legacy.is_empty() {
            return Err(RepoError::LegacyKeys(legacy));
        }
        let _lock = self.keys_lock()?;
        if let Some(min) = min_age {
            let newest = self.generations()?.ok_or(RepoError::NeedsKeyUpgrade)?;
            if generation_age(&newest).is_some_and(|age| age < min) {
                return Ok((newest, false));
            }
        }
        Ok((self.write_bundle(Change::Rotate, "key rotate")?, true))
    }

    /// Adds a key file for another password (`recovery`: a recovery code's); returns its
    /// id. With key generations: a version-2 key file and a bundle granting it the keys.
    ///
    /// # Errors
    /// Backend or KDF failures, a held `keys` lock.
    pub fn add_key_file(
        &self,
        password: &[u8],
        host: &str,
        user: &str,
        recovery: bool,
    ) -> Result<String, RepoError> {
        let keyfile_err = |source| RepoError::KeyFile {
            key: "(new)".into(),
            source,
        };
        if !self.has_generations() {
            let kf = KeyFile::create(&self.keys(), password, host, user).map_err(keyfile_err)?;
            let bytes = kf.to_bytes();
            let id = sha256_hex(&bytes);
            self.backend.put(ObjectType::Key, &id, bytes.into())?;
            return Ok(id);
        }
        let _lock = self.keys_lock()?;
        let keys = self.keys();
        let (kf, _) = KeyFile::create_pair(
            &keys.id_key,
            &keys.chunker_secret,
            password,
            host,
            user,
            recovery,
        )
        .map_err(keyfile_err)?;
        let bytes = kf.to_bytes();
        let id = sha256_hex(&bytes);
        self.backend.put(ObjectType::Key, &id, bytes.into())?;
        if let Err(e) = self.write_bundle(Change::Add(&id), "key add") {
            let _ = self.backend.delete(ObjectType::Key, &id);
            return Err(e);
        }
        Ok(id)
    }

    /// Removes key file `id`: with key generations, first a bundle without its grant, so
    /// it opens nothing written afterwards.
    ///
    /// # Errors
    /// Backend failures, a held `keys` lock.
    pub fn remove_key_file(&self, id: &str) -> Result<(), RepoError> {
        if self.has_generations() {
            let _lock = self.keys_lock()?;
            self.write_bundle(Change::Remove(id), "key remove")?;
        }
        self.backend.delete(ObjectType::Key, id)?;
        Ok(())
    }

    /// Converts a repository whose key files predate key generations (part of `upgrade`):
    /// a version-2 key file for `password` (the one that opened it), bundle 1 with the
    /// generations that key file held, the `key-generations` feature in the config; then
    /// the version-1 key file in use is removed. Returns the new key id, or None when
    /// there was nothing to do. Other version-1 key files keep opening the repository
    /// until a rotation; `key passwd` with their password converts them.
    ///
    /// # Errors
    /// Backend or KDF failures, a held `keys` lock.
    pub fn upgrade_keys(
        &mut self,
        password: &[u8],
        host: &str,
        user: &str,
    ) -> Result<Option<String>, RepoError> {
        if self.has_generations() && self.live.follows_generations() {
            return Ok(None);
        }
        let _lock = self.keys_lock()?;
        let keys = self.keys();
        let (kf, pair) = KeyFile::create_pair(
            &keys.id_key,
            &keys.chunker_secret,
            password,
            host,
            user,
            false,
        )
        .map_err(|source| RepoError::KeyFile {
            key: "(new)".into(),
            source,
        })?;
        let bytes = kf.to_bytes();
        let id = sha256_hex(&bytes);
        self.backend.put(ObjectType::Key, &id, bytes.into())?;
        if let Err(e) = self.write_bundle(Change::Add(&id), "upgrade") {
            // Nothing grants it: the repository stays as it was.
            let _ = self.backend.delete(ObjectType::Key, &id);
            return Err(e);
        }
        if !self.has_generations() {
            let mut c = self.config.clone();
            c.features.push(KEY_GENERATIONS.to_string());
            c.version = c.version.max(2);
            let sealed = crypto::seal(
                &keys,
                ObjectKind::Config,
                None,
                &serde_json::to_vec(&c).expect("config serializes"),
            );
            self.backend.replace_config(sealed.into())?;
            self.config = c;
        }
        let old = std::mem::replace(&mut self.key_id, id.clone());
        self.live = Arc::new(LiveKeys::from_pair(self.backend.clone(), &id, pair)?);
        if is_key_name(&old) && old != id {
            self.backend.delete(ObjectType::Key, &old)?;
        }
        Ok(Some(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;
    use crate::repo::lock::{list_locks, LockError};

    fn init(dir: &std::path::Path) -> (Arc<dyn Backend>, Repository) {
        let backend = Arc::new(LocalBackend::new(dir.join("repo")));
        let repo = Repository::init_local(backend.clone(), b"pw", "h", "u", 1).unwrap();
        (backend, repo)
    }

    fn open(backend: &Arc<dyn Backend>, pw: &[u8]) -> Result<Repository, RepoError> {
        Repository::open(backend.clone(), pw)
    }

    #[test]
    fn a_process_opened_before_a_rotation_reads_what_is_sealed_after_it() {
        let d = tempfile::tempdir().unwrap();
        let (backend, first) = init(d.path());
        assert_eq!(first.keys().current().0, 1);
        let other = open(&backend, b"pw").unwrap();
        let bundle = other.rotate().unwrap();
        assert_eq!(bundle.current(), 2);
        assert_eq!(other.keys().current().0, 2);
        // An object sealed with generation 2 (its envelope says so) opens in the process
        // that knew only generation 1, which reads the generations again.
        let id = other
            .save_object(ObjectType::Index, ObjectKind::Index, b"after the rotation")
            .unwrap();
        let sealed = backend.get(ObjectType::Index, &id.to_hex()).unwrap();
        assert_eq!(crypto::aead::generation_of(&sealed).unwrap(), 2);
        assert_eq!(first.keys().current().0, 1);
        assert_eq!(
            first
                .load_object(ObjectType::Index, ObjectKind::Index, &id.to_hex())
                .unwrap(),
            b"after the rotation"
        );
        assert_eq!(first.keys().current().0, 2);
        // And what generation 1 sealed still opens everywhere.
        let old = first
            .save_object(ObjectType::Index, ObjectKind::Index, b"x")
            .unwrap();
        let third = open(&backend, b"pw").unwrap();
        third
            .load_object(ObjectType::Index, ObjectKind::Index, &old.to_hex())
            .unwrap();
    }

    #[test]
    fn a_lock_sealed_after_a_rotation_is_seen_by_a_process_opened_before_it() {
        let d = tempfile::tempdir().unwrap();
        let (backend, pruner) = init(d.path());
        let backer = open(&backend, b"pw").unwrap();
        backer.rotate().unwrap();
        let _held = RepoLock::acquire(
            backend.clone(),
            backer.live_keys().clone(),
            LockKind::Backup,
            "other-host",
            None,
        )
        .unwrap();
        // The prune's view (generation 1 only when it opened) still lists the lock.
        let locks = list_locks(&backend, pruner.live_keys()).unwrap();
        assert_eq!(locks.len(), 1, "{locks:?}");
        assert_eq!(locks[0].1.host, "other-host");
        assert_eq!(locks[0].1.generation, Some(2));
    }

    #[test]
    fn two_key_changes_never_run_at_once() {
        let d = tempfile::tempdir().unwrap();
        let (backend, a) = init(d.path());
        let b = open(&backend, b"pw").unwrap();
        let held = RepoLock::acquire(
            backend.clone(),
            a.live_keys().clone(),
            LockKind::Keys,
            "h",
            None,
        )
        .unwrap();
        match b.rotate() {
            Err(RepoError::Lock(LockError::Locked { kind, .. })) => {
                assert_eq!(kind, LockKind::Keys)
            }
            other => panic!("{:?}", other.map(|b| b.serial)),
        }
        // Nothing changed, and the refused rotation left no lock behind.
        assert_eq!(b.generations().unwrap().unwrap().serial, 1);
        drop(held);
        assert!(list_locks(&backend, b.live_keys()).unwrap().is_empty());
        assert_eq!(b.rotate().unwrap().current(), 2);
    }

    #[test]
    fn a_planted_bundle_or_key_file_gets_nothing_and_fails_closed() {
        let d = tempfile::tempdir().unwrap();
        let (backend, repo) = init(d.path());
        // A key file with a public key of someone else's choosing and no valid MAC: the
        // next bundle grants it nothing.
        let (mut planted, _) = KeyFile::create_pair(
            &Secret32::random(),
            &Secret32::random(),
            b"x",
            "evil",
            "e",
            false,
        )
        .unwrap();
        planted.created = "2026-01-01T00:00:00+00:00".into();
        let bytes = planted.to_bytes();
        let planted_id = sha256_hex(&bytes);
        backend
            .put(ObjectType::Key, &planted_id, bytes.into())
            .unwrap();
        let bundle = repo.rotate().unwrap();
        assert!(bundle.grant_for(&planted_id).is_none());
        assert!(bundle.grant_for(repo.key_id()).is_some());
        // A bundle written without the keys (a newer serial, any content): opening fails,
        // naming it, rather than sealing with keys someone else chose.
        let mut fake = bundle.clone();
        fake.serial += 1;
        let fake_bytes = fake.seal_to_bytes(&Secret32::random());
        backend
            .put(
                ObjectType::Generations,
                &bundle_name(fake.serial),
                fake_bytes.into(),
            )
            .unwrap();
        let e = open(&backend, b"pw").unwrap_err().to_string();
        assert!(
            e.contains(&bundle_name(fake.serial)) && e.contains("authentication"),
            "{e}"
        );
    }

    #[test]
    fn a_removed_key_file_copied_back_opens_nothing() {
        let d = tempfile::tempdir().unwrap();
        let (backend, repo) = init(d.path());
        let leaked = repo.add_key(b"leaked", "h", "u").unwrap();
        let copy = backend.get(ObjectType::Key, &leaked).unwrap();
        repo.remove_key_file(&leaked).unwrap();
        backend.put(ObjectType::Key, &leaked, copy.into()).unwrap();
        match open(&backend, b"leaked") {
            Err(RepoError::KeyNotGranted { key, .. }) => assert_eq!(key, leaked),
            other => panic!("{:?}", other.map(|r| r.key_id().to_string())),
        }
        open(&backend, b"pw").unwrap();
    }

    #[test]
    fn a_legacy_repository_converts_and_its_other_version_1_keys_block_rotation() {
        let d = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(d.path().join("repo")));
        // A repository as builds before key generations made it: version-1 key files
        // wrapping the whole bundle, no generations/.
        let keys = MasterKeys::generate();
        LocalBackend::new(d.path().join("repo"))
            .create_layout()
            .unwrap();
        for pw in [&b"one"[..], b"two"] {
            let kf = KeyFile::create(&keys, pw, "h", "u").unwrap().to_bytes();
            backend
                .put(ObjectType::Key, &sha256_hex(&kf), kf.into())
                .unwrap();
        }
        let config = super::super::Config {
            version: 2,
            id: "00".repeat(32),
            chunker: crate::pipeline::ChunkerParams::default(),
            zstd_level: 1,
            pack_size: 16 << 20,
            features: vec![],
        };
        let sealed = crypto::seal(
            &keys,
            ObjectKind::Config,
            None,
            &serde_json::to_vec(&config).unwrap(),
        );
        backend
            .put(ObjectType::Config, "config", sealed.into())
            .unwrap();
        let mut one = open(&backend, b"one").unwrap();
        assert!(!one.has_generations());
        assert!(matches!(one.rotate(), Err(RepoError::NeedsKeyUpgrade)));
        one.upgrade_keys(b"one", "h", "u").unwrap().unwrap();
        assert!(one.has_generations());
        // "two" is still version 1 and still opens (it holds generation 1), but blocks a
        // rotation it could not follow.
        let two = open(&backend, b"two").unwrap();
        match one.rotate() {
            Err(RepoError::LegacyKeys(ids)) => assert_eq!(ids, [two.key_id().to_string()]),
            other => panic!("{:?}", other.map(|b| b.serial)),
        }
        // `key passwd` with "two": a version-2 key file, then the version-1 one removed.
        let new_two = two.add_key(b"two again", "h", "u").unwrap();
        two.remove_key_file(two.key_id()).unwrap();
        assert_eq!(one.rotate().unwrap().current(), 2);
        let reopened = open(&backend, b"two again").unwrap();
        assert_eq!(reopened.key_id(), new_two);
        assert_eq!(reopened.keys().current().0, 2);
        assert!(reopened.keys().id_key == keys.id_key);
    }

    #[test]
    fn a_rotation_due_is_made_once_however_many_ask() {
        let d = tempfile::tempdir().unwrap();
        let (backend, a) = init(d.path());
        let b = open(&backend, b"pw").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let every = Some(std::time::Duration::from_secs(1));
        let (first, rotated) = a.rotate_if_older(every).unwrap();
        assert!(rotated);
        assert_eq!(first.current(), 2);
        // The second policy sharing the repository (opened before the rotation) finds
        // generation 2 younger than its rotate_every: no generation 3.
        let (second, rotated) = b.rotate_if_older(every).unwrap();
        assert!(!rotated);
        assert_eq!(second.current(), 2);
        assert!(generation_age(&second).unwrap() < std::time::Duration::from_secs(1));
    }
}
