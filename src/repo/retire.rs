//! `backupd key retire GEN`: after a key file and its password leaked, re-seals every
//! object still sealed with generation GEN or older under the newest generation, then
//! drops those generations from the key bundle, so that the old keys open nothing the
//! repository holds (decision 0014, format.md §3).
//!
//! Under the prune lock (no prune runs meanwhile) and the `keys` lock. In order: the named
//! key files lose their grants and go; a new generation is made if GEN is the newest;
//! backups and other holders whose lock says they seal with a retiring generation are
//! waited for; then every kind is re-sealed — config and WAL objects in place (their
//! names are fixed: an atomic replacement, local and S3), index files, snapshots (new ids,
//! the old one kept as `original_id`) and marks as new objects with the old ones deleted,
//! and packs as prune repacks them: a new pack with every blob sealed again, its index,
//! and the old pack *marked*, deleted once the grace period has passed and no backup that
//! started before the mark is running (format.md §18). When no object of a retiring
//! generation is left, the bundle drops them. Every step leaves a repository that checks
//! clean and restores; a run killed anywhere is finished by running it again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::generations::Change;
use super::index::IndexedPack;
use super::lock::{list_locks, LockKind, LockRecord, RepoLock};
use super::pack::{self, PackBuilder};
use super::prune::{delete_packs, holds_mark, load_marks, rewrite_marks};
use super::{RepoError, Repository, Snapshot};
use crate::backend::ObjectType;
use crate::crypto::{self, aead::generation_of, MasterKeys, ObjectKind};
use crate::pipeline::{blob, BlobId};

/// How long the final WAL pass waits for pushes that read the generations before the
/// last bundle (a push stores one segment: well under this).
const WAL_SETTLE: Duration = Duration::from_secs(10);

/// A pack sealed again: the new pack's index entry (None: it held no blob), the old
/// one's generation, size and blob count.
type ResealedPack = (Option<IndexedPack>, u32, u64, u64);

/// Packs sealed again at once, at most.
const RESEAL_WORKERS: usize = 2;

/// Why a retire stopped.
#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    /// Nothing to retire: GEN is not in force.
    #[error("key generation {0} is not in force (key list shows the generations)")]
    NotInForce(u32),
    /// A process sealing with a retiring generation did not finish in time.
    #[error("a {kind} on {host} (pid {pid}, since {since}) seals with key generation {generation}, which is retiring; it did not finish within {waited:?}: run `key retire` again when it has")]
    Waiting {
        /// What it is.
        kind: String,
        /// Its host.
        host: String,
        /// Its pid.
        pid: u32,
        /// Since when.
        since: DateTime<Utc>,
        /// The generation it seals with.
        generation: u32,
        /// How long this run waited.
        waited: Duration,
    },
    /// A damaged object: nothing damaged is copied.
    #[error("refusing to re-seal a damaged object (run `backupd check`): {0}")]
    Damaged(String),
    /// Repository failures.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl From<crate::backend::BackendError> for RetireError {
    fn from(e: crate::backend::BackendError) -> Self {
        RetireError::Repo(e.into())
    }
}

impl From<super::lock::LockError> for RetireError {
    fn from(e: super::lock::LockError) -> Self {
        RetireError::Repo(e.into())
    }
}

/// What to retire, and how.
#[derive(Clone, Debug)]
pub struct RetireOptions {
    /// Generations up to this one go.
    pub generation: u32,
    /// Key files to remove first (full ids).
    pub remove_keys: Vec<String>,
    /// How long a marked old pack waits before it is deleted (as prune's grace).
    pub grace: Duration,
    /// How long to wait for processes sealing with a retiring generation.
    pub wait: Duration,
}

/// Objects and bytes re-sealed, per generation they were sealed with.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Resealed {
    /// Objects (packs count once; their blobs in `blobs`).
    pub objects: u64,
    /// Stored bytes read.
    pub bytes: u64,
    /// Blobs inside the packs.
    pub blobs: u64,
}

/// What a run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RetireReport {
    /// The generation everything is sealed with now.
    pub generation: u32,
    /// Generations dropped from the bundle by this run (empty: not yet).
    pub retired: Vec<u32>,
    /// Key files removed.
    pub keys_removed: Vec<String>,
    /// Per kind (`config`, `index`, `snapshot`, `pack`, `wal`, `marks`), per generation.
    pub resealed: BTreeMap<String, BTreeMap<u32, Resealed>>,
    /// Old packs marked by this run.
    pub packs_marked: usize,
    /// Old packs deleted by this run.
    pub packs_deleted: usize,
    /// Old packs still waiting for their grace period (or for a backup that started
    /// before their mark).
    pub packs_waiting: usize,
    /// When the last of them may go (run `key retire` again after it).
    pub waiting_until: Option<DateTime<Utc>>,
}

impl RetireReport {
    fn add(&mut self, kind: &str, generation: u32, bytes: u64, blobs: u64) {
        let r = self
            .resealed
            .entry(kind.to_string())
            .or_default()
            .entry(generation)
            .or_default();
        r.objects += 1;
        r.bytes += bytes;
        r.blobs += blobs;
    }

    /// True when the retiring generations are gone from the bundle.
    pub fn done(&self) -> bool {
        !self.retired.is_empty()
    }
}

/// Progress of the pack pass: `(packs done, packs to do, bytes done)`.
pub type Progress<'a> = &'a (dyn Fn(u64, u64, u64) + Sync);

/// The generation of a stored object (its envelope's).
fn gen_of(bytes: &[u8], what: &str) -> Result<u32, RetireError> {
    generation_of(bytes).map_err(|e| RetireError::Damaged(format!("{what}: {e}")))
}

/// The generation a pack's header is sealed with (two ranged reads: the trailer, then the
/// header's envelope), and its size.
fn pack_generation(repo: &Repository, name: &str, size: u64) -> Result<u32, RetireError> {
    let path = super::object_path(ObjectType::Pack, name);
    if size < 4 + crypto::SEAL_OVERHEAD as u64 {
        return Err(RetireError::Damaged(format!("{path}: too short")));
    }
    let tail = repo
        .backend()
        .get_range(ObjectType::Pack, name, size - 4, 4)?;
    let hlen = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if hlen + 4 > size || hlen < crypto::SEAL_OVERHEAD as u64 {
        return Err(RetireError::Damaged(format!("{path}: malformed trailer")));
    }
    // The envelope's version byte and generation (its first 5 bytes).
    let head = repo
        .backend()
        .get_range(ObjectType::Pack, name, size - 4 - hlen, 5)?;
    if head.first() != Some(&1) {
        return Err(RetireError::Damaged(format!(
            "{path}: header envelope version {:?}",
            head.first()
        )));
    }
    Ok(u32::from_le_bytes([head[1], head[2], head[3], head[4]]))
}

/// Every WAL object's path under `wal/`.
fn wal_objects(repo: &Repository) -> Result<Vec<String>, RetireError> {
    let b = repo.backend();
    let mut out = vec![];
    for sys in b.list_dir(ObjectType::Wal, "")?.dirs {
        let top = b.list_dir(ObjectType::Wal, &sys)?;
        out.extend(top.files.into_iter().map(|(f, _)| format!("{sys}/{f}")));
        for g in top.dirs {
            let files = b.list_dir(ObjectType::Wal, &format!("{sys}/{g}"))?;
            out.extend(
                files
                    .files
                    .into_iter()
                    .map(|(f, _)| format!("{sys}/{g}/{f}")),
            );
        }
    }
    Ok(out)
}

/// Which packs hold each blob, from every index file: whether a marked pack's blobs all
/// have a copy in a pack that is not marked.
struct Availability {
    blobs_of: HashMap<BlobId, Vec<BlobId>>,
    packs_of: HashMap<BlobId, Vec<BlobId>>,
    marked: HashSet<BlobId>,
}

impl Availability {
    fn load(repo: &Repository, marks: &super::prune::Marks) -> Result<Self, RetireError> {
        let mut a = Availability {
            blobs_of: HashMap::new(),
            packs_of: HashMap::new(),
            marked: marks.keys().copied().collect(),
        };
        for (name, _) in repo.backend().list(ObjectType::Index)? {
            for p in repo.load_index_file(&name)? {
                for e in &p.entries {
                    a.blobs_of.entry(p.pack).or_default().push(e.id);
                    a.packs_of.entry(e.id).or_default().push(p.pack);
                }
            }
        }
        Ok(a)
    }

    fn all_elsewhere(&self, pack: &BlobId) -> bool {
        self.blobs_of.get(pack).is_none_or(|blobs| {
            blobs.iter().all(|b| {
                self.packs_of
                    .get(b)
                    .is_some_and(|ps| ps.iter().any(|p| p != pack && !self.marked.contains(p)))
            })
        })
    }
}

impl Repository {
    /// Runs `key retire` (see the module documentation).
    ///
    /// # Errors
    /// `NotInForce`, `Waiting` (exit 11: run again), a damaged object, a held lock, or
    /// backend failures — each leaving a repository that opens, checks and restores.
    pub fn retire(
        &self,
        opts: &RetireOptions,
        progress: Progress<'_>,
    ) -> Result<RetireReport, RetireError> {
        if !self.has_generations() || !self.live.follows_generations() {
            return Err(RepoError::NeedsKeyUpgrade.into());
        }
        let host = crate::host::hostname();
        let prune_lock = RepoLock::acquire(
            self.backend.clone(),
            self.live.clone(),
            LockKind::Prune,
            &host,
            None,
        )?;
        let keys_lock = RepoLock::acquire(
            self.backend.clone(),
            self.live.clone(),
            LockKind::Keys,
            &host,
            None,
        )?;
        let ours = [prune_lock.record().clone(), keys_lock.record().clone()];
        let mut report = RetireReport::default();
        let bundle = self.generations()?.ok_or(RepoError::NeedsKeyUpgrade)?;
        let retiring: Vec<u32> = bundle
            .generations
            .iter()
            .map(|g| g.generation)
            .filter(|g| *g <= opts.generation)
            .collect();
        if retiring.is_empty() {
            return Err(RetireError::NotInForce(opts.generation));
        }
        // 1. Leaked key files lose their grants first, then go.
        for id in &opts.remove_keys {
            self.write_bundle(Change::Remove(id), "key retire: remove key")?;
            self.backend.delete(ObjectType::Key, id)?;
            report.keys_removed.push(id.clone());
        }
        // 2. A generation newer than every retiring one.
        if self.live.get().current().0 <= opts.generation {
            self.write_bundle(Change::Rotate, "key retire: rotate")?;
        }
        // The keys of every generation, the retiring ones included, are kept in this
        // process until the end: what it re-seals it must still open.
        let keys: Arc<MasterKeys> = self.live.get();
        let newest = keys.current().0;
        report.generation = newest;
        let old = |g: u32| g <= opts.generation;
        let started = Instant::now();
        loop {
            // 3. Nobody still sealing with a retiring generation.
            self.wait_for_old_sealers(&ours, opts, started)?;
            // 4. Everything re-sealed.
            self.reseal_pass(&keys, &old, &mut report, progress)?;
            // 5. A holder that appeared meanwhile with an old generation means another pass.
            let again = list_locks(&self.backend, &self.live)?
                .into_iter()
                .any(|(_, l)| {
                    !ours.contains(&l)
                        && !l.is_stale(super::clock::now())
                        && l.generation.is_none_or(old)
                });
            if !again {
                break;
            }
        }
        // 6. Old packs whose grace has passed go; the generations go when no pack is left.
        let waiting = self.delete_old_packs(&old, opts, &ours, &mut report)?;
        if waiting == 0 {
            self.write_bundle(Change::Retire(opts.generation), "key retire")?;
            report.retired = retiring;
            // A WAL push reads the generations just before it seals; one that read them
            // before this bundle may still be storing a segment sealed with an old one:
            // given time to finish, then sealed again with the keys this process still
            // holds.
            if !wal_objects(self)?.is_empty() {
                std::thread::sleep(WAL_SETTLE);
                self.reseal_wal(&keys, &old, &mut report)?;
            }
        }
        drop(keys_lock);
        drop(prune_lock);
        Ok(report)
    }

    /// Waits until no live lock (but ours) says its holder seals with a retiring
    /// generation; a lock of a build before generations were recorded counts as old.
    fn wait_for_old_sealers(
        &self,
        ours: &[LockRecord],
        opts: &RetireOptions,
        started: Instant,
    ) -> Result<(), RetireError> {
        loop {
            let now = super::clock::now();
            let old: Option<LockRecord> = list_locks(&self.backend, &self.live)?
                .into_iter()
                .map(|(_, l)| l)
                .find(|l| {
                    !ours.contains(l)
                        && !l.is_stale(now)
                        && l.generation.is_none_or(|g| g <= opts.generation)
                });
            let Some(l) = old else {
                return Ok(());
            };
            if started.elapsed() >= opts.wait {
                return Err(RetireError::Waiting {
                    kind: format!("{:?}", l.kind).to_lowercase(),
                    host: l.host,
                    pid: l.pid,
                    since: l.started,
                    generation: l.generation.unwrap_or(0),
                    waited: opts.wait,
                });
            }
            tracing::info!(
                "waiting for a {:?} on {} (pid {}), which seals with a retiring generation",
                l.kind,
                l.host,
                l.pid
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// One pass over every kind of object.
    fn reseal_pass(
        &self,
        keys: &Arc<MasterKeys>,
        old: &dyn Fn(u32) -> bool,
        report: &mut RetireReport,
        progress: Progress<'_>,
    ) -> Result<(), RetireError> {
        // Config: replaced in place (local: rename over it; S3: one PUT).
        let sealed = Repository::read_config(&self.backend)?;
        let g = gen_of(&sealed, "config")?;
        if old(g) {
            let plain = crypto::open(keys, ObjectKind::Config, None, &sealed)
                .map_err(|e| RetireError::Damaged(format!("config: {e}")))?;
            self.backend
                .replace_config(crypto::seal(keys, ObjectKind::Config, None, &plain).into())?;
            report.add("config", g, sealed.len() as u64, 0);
        }
        // Snapshots: new ids, the first one kept; the old object deleted after.
        self.reseal_snapshots(keys, old, report)?;
        // Packs, then the index files (those the pack pass wrote are new already).
        self.reseal_packs(keys, old, report, progress)?;
        for (name, _) in self.backend.list(ObjectType::Index)? {
            let bytes = self.backend.get(ObjectType::Index, &name)?;
            let g = gen_of(&bytes, &format!("index/{name}"))?;
            if old(g) {
                let plain = self.load_object(ObjectType::Index, ObjectKind::Index, &name)?;
                self.save_object(ObjectType::Index, ObjectKind::Index, &plain)?;
                self.backend.delete(ObjectType::Index, &name)?;
                report.add("index", g, bytes.len() as u64, 0);
            }
        }
        // Marks: rewritten into one new object when any is old.
        let mut old_marks = vec![];
        for (name, _) in self.backend.list(ObjectType::Mark)? {
            if let Ok(bytes) = self.backend.get(ObjectType::Mark, &name) {
                let g = gen_of(&bytes, &format!("marks/{name}"))?;
                if old(g) {
                    old_marks.push((g, bytes.len() as u64));
                }
            }
        }
        if !old_marks.is_empty() {
            let (marks, _) = load_marks(self)?;
            rewrite_marks(self, marks, &[])?;
            for (g, n) in old_marks {
                report.add("marks", g, n, 0);
            }
        }
        self.reseal_wal(keys, old, report)
    }

    fn reseal_snapshots(
        &self,
        keys: &Arc<MasterKeys>,
        old: &dyn Fn(u32) -> bool,
        report: &mut RetireReport,
    ) -> Result<(), RetireError> {
        let all = self.all_snapshots()?;
        // Ids already sealed again (a run killed between the write and the delete).
        let mut renamed: HashMap<BlobId, BlobId> = all
            .iter()
            .filter_map(|(id, s)| s.original_id.map(|o| (o, *id)))
            .collect();
        let mut todo: Vec<(BlobId, Snapshot, u32, u64)> = vec![];
        for (id, s) in all {
            let name = id.to_hex();
            let bytes = self.backend.get(ObjectType::Snapshot, &name)?;
            let g = gen_of(&bytes, &format!("snapshots/{name}"))?;
            if old(g) {
                todo.push((id, s, g, bytes.len() as u64));
            }
        }
        // Oldest first, so a parent's new id is known when its children are written.
        todo.sort_by_key(|(_, s, _, _)| s.time);
        for (id, mut s, g, n) in todo {
            if renamed.get(&id).is_some_and(|new| *new != id) {
                self.remove_snapshot(&id)?;
                report.add("snapshot", g, n, 0);
                continue;
            }
            let first = s.original_id.unwrap_or(id);
            s.original_id = Some(first);
            if let Some(p) = s.parent {
                if let Some(new) = renamed.get(&p) {
                    s.parent = Some(*new);
                }
            }
            let plain = serde_json::to_vec(&s).expect("a snapshot serializes");
            let sealed = crypto::seal(keys, ObjectKind::Snapshot, None, &plain);
            let new_id = BlobId(Sha256::digest(&sealed).into());
            self.backend
                .put(ObjectType::Snapshot, &new_id.to_hex(), Bytes::from(sealed))?;
            self.remove_snapshot(&id)?;
            renamed.insert(id, new_id);
            renamed.insert(first, new_id);
            report.add("snapshot", g, n, 0);
        }
        Ok(())
    }

    fn reseal_packs(
        &self,
        keys: &Arc<MasterKeys>,
        old: &dyn Fn(u32) -> bool,
        report: &mut RetireReport,
        progress: Progress<'_>,
    ) -> Result<(), RetireError> {
        let (marks, _) = load_marks(self)?;
        let avail = Availability::load(self, &marks)?;
        let mut todo: Vec<(BlobId, u64, u32)> = vec![];
        for (name, size) in self.backend.list(ObjectType::Pack)? {
            let Some(id) = BlobId::from_hex(&name) else {
                continue;
            };
            let g = pack_generation(self, &name, size)?;
            // A marked pack whose every blob is in a pack that stays needs no copy (an
            // earlier run made one, or prune found it unused); it is deleted below.
            if old(g) && !(marks.contains_key(&id) && avail.all_elsewhere(&id)) {
                todo.push((id, size, g));
            }
        }
        let total = todo.len() as u64;
        let done = std::sync::atomic::AtomicU64::new(0);
        let bytes_done = std::sync::atomic::AtomicU64::new(0);
        progress(0, total, 0);
        // A few packs at once (each worker holds one old and one new pack in memory).
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, RESEAL_WORKERS);
        // Batches: the new packs' index is written, then the old packs marked.
        for batch in todo.chunks(32) {
            let per = batch.len().div_ceil(workers);
            let results: Vec<Result<Vec<ResealedPack>, RetireError>> = std::thread::scope(|sc| {
                let handles: Vec<_> = batch
                    .chunks(per.max(1))
                    .map(|part| {
                        let (done, bytes_done) = (&done, &bytes_done);
                        sc.spawn(move || {
                            let mut out = vec![];
                            for (id, size, g) in part {
                                let (new, blobs) = self.reseal_pack(keys, id)?;
                                out.push((new, *g, *size, blobs));
                                let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                                let b = bytes_done
                                    .fetch_add(*size, std::sync::atomic::Ordering::Relaxed)
                                    + size;
                                progress(d, total, b);
                            }
                            Ok(out)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            });
            let mut new_index: Vec<IndexedPack> = vec![];
            for r in results {
                for (new, g, size, blobs) in r? {
                    new_index.extend(new);
                    report.add("pack", g, size, blobs);
                }
            }
            if !new_index.is_empty() {
                self.save_index(&new_index)?;
            }
            let (marks, _) = load_marks(self)?;
            let olds: Vec<BlobId> = batch.iter().map(|(id, _, _)| *id).collect();
            rewrite_marks(self, marks, &olds)?;
            report.packs_marked += olds.len();
        }
        Ok(())
    }

    /// Writes a copy of pack `id` with every blob sealed again; returns its index entry
    /// (None: the pack held no blob) and how many blobs it held.
    fn reseal_pack(
        &self,
        keys: &Arc<MasterKeys>,
        id: &BlobId,
    ) -> Result<(Option<IndexedPack>, u64), RetireError> {
        let name = id.to_hex();
        let path = super::object_path(ObjectType::Pack, &name);
        let bytes = self.backend.get(ObjectType::Pack, &name)?;
        let entries = pack::read_header(keys, &path, &bytes)
            .map_err(|e| RetireError::Damaged(e.to_string()))?;
        let mut b = PackBuilder::default();
        for e in &entries {
            let sealed = bytes
                .get(e.offset as usize..(e.offset as usize + e.length as usize))
                .ok_or_else(|| RetireError::Damaged(format!("{path}: blob past the end")))?;
            let again = blob::reseal(keys, e.kind, &e.id, sealed, e.raw_length as usize)
                .map_err(|err| RetireError::Damaged(format!("{path}: {err}")))?;
            b.add(e.kind, e.id, &again, e.raw_length);
        }
        drop(bytes);
        if b.is_empty() {
            return Ok((None, 0));
        }
        let fin = b.finish(keys);
        self.backend
            .put(ObjectType::Pack, &fin.id.to_hex(), Bytes::from(fin.bytes))?;
        Ok((
            Some(IndexedPack {
                pack: fin.id,
                entries: fin.entries,
            }),
            entries.len() as u64,
        ))
    }

    /// Deletes marked packs of a retiring generation whose grace has passed and that no
    /// backup started before their mark could be using; returns how many must still wait.
    fn delete_old_packs(
        &self,
        old: &dyn Fn(u32) -> bool,
        opts: &RetireOptions,
        ours: &[LockRecord],
        report: &mut RetireReport,
    ) -> Result<usize, RetireError> {
        let (marks, _) = load_marks(self)?;
        let sizes: HashMap<BlobId, u64> = self
            .backend
            .list(ObjectType::Pack)?
            .into_iter()
            .filter_map(|(n, s)| BlobId::from_hex(&n).map(|id| (id, s)))
            .collect();
        let now = super::clock::now();
        let locks: Vec<LockRecord> = list_locks(&self.backend, &self.live)?
            .into_iter()
            .map(|(_, l)| l)
            .filter(|l| !ours.contains(l))
            .collect();
        let avail = Availability::load(self, &marks)?;
        let mut gone: HashSet<BlobId> = HashSet::new();
        let mut waiting = 0;
        let mut until: Option<DateTime<Utc>> = None;
        for (id, size) in &sizes {
            let Some(&mark) = marks.get(id) else {
                // Unmarked: resealed in this run or not old.
                if old(pack_generation(self, &id.to_hex(), *size)?) {
                    waiting += 1;
                }
                continue;
            };
            if !old(pack_generation(self, &id.to_hex(), *size)?) {
                continue;
            }
            let grace_over =
                now.signed_duration_since(mark).to_std().unwrap_or_default() >= opts.grace;
            let held = locks.iter().any(|l| holds_mark(l, mark, now));
            if grace_over && !held && avail.all_elsewhere(id) {
                gone.insert(*id);
            } else {
                waiting += 1;
                let t = mark + chrono::Duration::from_std(opts.grace).unwrap_or_default();
                until = Some(until.map_or(t, |u: DateTime<Utc>| u.max(t)));
            }
        }
        if !gone.is_empty() {
            delete_packs(self, &gone)?;
            let rest: super::prune::Marks = marks
                .into_iter()
                .filter(|(p, _)| !gone.contains(p))
                .collect();
            rewrite_marks(self, rest, &[])?;
            report.packs_deleted += gone.len();
        }
        report.packs_waiting = waiting;
        report.waiting_until = until;
        Ok(waiting)
    }

    fn reseal_wal(
        &self,
        keys: &Arc<MasterKeys>,
        old: &dyn Fn(u32) -> bool,
        report: &mut RetireReport,
    ) -> Result<(), RetireError> {
        for name in wal_objects(self)? {
            let bytes = match self.backend.get(ObjectType::Wal, &name) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e.into()),
            };
            let g = gen_of(&bytes, &format!("wal/{name}"))?;
            if !old(g) {
                continue;
            }
            let binding = crate::postgres::archive::binding_of(&name);
            let plain = crypto::open(keys, ObjectKind::Wal, Some(&binding), &bytes)
                .map_err(|e| RetireError::Damaged(format!("wal/{name}: {e}")))?;
            let again = crypto::seal(keys, ObjectKind::Wal, Some(&binding), &plain);
            // The name is fixed: replaced whole (local: rename over it; S3: one PUT).
            self.backend
                .replace(ObjectType::Wal, &name, Bytes::from(again))?;
            report.add("wal", g, bytes.len() as u64, 0);
        }
        Ok(())
    }
}

/// Objects and stored bytes per kind and generation (`key list --usage`).
pub type Usage = BTreeMap<String, BTreeMap<u32, (u64, u64)>>;

impl Repository {
    /// Which generation every object is sealed with: the envelope of each config, index,
    /// snapshot, marks, lock and WAL object, and each pack's header (two ranged reads; a
    /// pack's blobs share its header's generation).
    ///
    /// # Errors
    /// Backend failures, or an object too damaged to name a generation.
    pub fn generation_usage(&self) -> Result<Usage, RetireError> {
        let mut u: Usage = BTreeMap::new();
        let mut add = |kind: &str, g: u32, n: u64| {
            let e = u.entry(kind.to_string()).or_default().entry(g).or_default();
            e.0 += 1;
            e.1 += n;
        };
        let config = Repository::read_config(&self.backend)?;
        add("config", gen_of(&config, "config")?, config.len() as u64);
        for (kind, ty) in [
            ("index", ObjectType::Index),
            ("snapshot", ObjectType::Snapshot),
            ("marks", ObjectType::Mark),
            ("lock", ObjectType::Lock),
        ] {
            for (name, _) in self.backend.list(ty)? {
                match self.backend.get(ty, &name) {
                    Ok(b) => add(kind, gen_of(&b, &ty.path_of(&name))?, b.len() as u64),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        for (name, size) in self.backend.list(ObjectType::Pack)? {
            add("pack", pack_generation(self, &name, size)?, size);
        }
        for name in wal_objects(self)? {
            match self.backend.get(ObjectType::Wal, &name) {
                Ok(b) => add("wal", gen_of(&b, &format!("wal/{name}"))?, b.len() as u64),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(u)
    }
}
