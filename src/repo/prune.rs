//! `prune`: frees the space of forgotten snapshots without ever stopping backups.
//!
//! Two phases across runs (docs/decisions/0009-prune.md):
//! 1. A run finds packs no snapshot needs (and repacks packs that are mostly unused, so
//!    their live blobs move to new packs) and *marks* them in a `marks/` object, with the
//!    time.
//! 2. A later run deletes marked packs whose mark is older than the grace period, that are
//!    still unneeded, and that no backup running since before the mark could be using.
//!
//! Backups load the marks after taking their lock and never deduplicate against a marked
//! pack, so a backup that started after a mark cannot come to need it; one that started
//! before it is protected by its lock. The index is rewritten before any pack goes, so it
//! never names a deleted pack. For PostgreSQL, WAL segments older than the start of the
//! oldest base backup of each cluster are removed.

use std::collections::{BTreeMap, HashMap, HashSet};

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::index::IndexedPack;
use super::lock::{list_locks, LockError, LockKind, LockRecord, RepoLock};
use super::pack::{self, PackBuilder};
use super::{Index, RepoError, Repository, Snapshot};
use crate::backend::{BackendError, ObjectType};
use crate::crypto::ObjectKind;
use crate::pipeline::{blob, BlobId};
use crate::postgres::walname::{is_segment_name, Segment};

/// A backup whose lock started less than this after a mark might not have seen it (the
/// marks object is written after its time is taken; clocks of hosts differ a little).
const MARK_SLACK: chrono::Duration = chrono::Duration::minutes(10);

/// Prune errors.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// Another prune runs.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The repository is damaged: pruning could delete what a repair needs.
    #[error("refusing to prune a damaged repository (run `backupd check`): {0}")]
    Damaged(String),
    /// Repository failures.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Store failures.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Prune settings.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// A pack is deleted only when its mark is at least this old.
    pub grace: Duration,
    /// Repack packs with at least this fraction of unused bytes.
    pub repack_unused: f64,
    /// Compute and report, change nothing.
    pub dry_run: bool,
    /// Host name for the lock.
    pub host: String,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: Duration::from_secs(24 * 3600),
            repack_unused: 0.5,
            dry_run: false,
            host: crate::host::hostname(),
        }
    }
}

/// What a prune did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    /// Packs in the store.
    pub packs: usize,
    /// Bytes in the store's packs.
    pub pack_bytes: u64,
    /// Packs marked by this run.
    pub marked: usize,
    /// Packs marked earlier that a snapshot needs again (unmarked).
    pub unmarked: usize,
    /// Packs still marked, waiting for their grace period or for running backups.
    pub waiting: usize,
    /// Of those, packs held only by running backups that started before their mark.
    pub held_by_backups: usize,
    /// Packs deleted.
    pub deleted: usize,
    /// Bytes deleted.
    pub deleted_bytes: u64,
    /// Packs repacked (their live blobs copied; the old packs marked).
    pub repacked: usize,
    /// Blobs copied by repacking.
    pub blobs_repacked: usize,
    /// Bytes written by repacking.
    pub repacked_bytes: u64,
    /// Index files rewritten without the deleted packs.
    pub index_rewritten: usize,
    /// WAL objects removed.
    pub wal_deleted: usize,
}

/// The content of a marks object: each marked pack and when it was first marked.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct MarksRecord {
    written: DateTime<Utc>,
    packs: BTreeMap<String, DateTime<Utc>>,
}

/// Marked packs with the (earliest) time each was marked.
pub type Marks = HashMap<BlobId, DateTime<Utc>>;

/// Every marked pack with its mark time, and the names of the marks objects holding them.
///
/// # Errors
/// A damaged marks object, or the store failing.
pub fn load_marks(repo: &Repository) -> Result<(Marks, Vec<String>), RepoError> {
    // A prune writes its new marks object before deleting the old ones: when one listed
    // is gone, list again and the replacement is there.
    let mut attempt = 0;
    loop {
        match load_marks_once(repo) {
            Ok(Some(m)) => return Ok(m),
            Ok(None) if attempt < 10 => attempt += 1,
            Ok(None) => {
                return Err(RepoError::CorruptOrTampered {
                    object: "marks/".into(),
                    why: "marks objects keep disappearing while read".into(),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// One pass; `None` when an object listed was gone before it was read.
fn load_marks_once(repo: &Repository) -> Result<Option<(Marks, Vec<String>)>, RepoError> {
    let mut out: Marks = HashMap::new();
    let mut names = vec![];
    for (name, _) in repo.backend().list(ObjectType::Mark)? {
        let plain = match repo.load_object(ObjectType::Mark, ObjectKind::Marks, &name) {
            Ok(p) => p,
            Err(RepoError::Backend(e)) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let rec: MarksRecord =
            serde_json::from_slice(&plain).map_err(|e| RepoError::CorruptOrTampered {
                object: super::object_path(ObjectType::Mark, &name),
                why: e.to_string(),
            })?;
        for (p, t) in rec.packs {
            if let Some(id) = BlobId::from_hex(&p) {
                let e = out.entry(id).or_insert(t);
                *e = (*e).min(t);
            }
        }
        names.push(name);
    }
    Ok(Some((out, names)))
}

/// Every blob the snapshots need: trees, content lists and data.
fn used_blobs(
    repo: &Repository,
    index: &Index,
    snaps: &[(BlobId, Snapshot)],
) -> Result<HashSet<BlobId>, PruneError> {
    let mut used = HashSet::new();
    let mut stack: Vec<(BlobId, String)> = vec![];
    for (id, s) in snaps {
        stack.extend(s.trees().map(|(tree, _)| (tree, id.short())));
    }
    while let Some((tree, snap)) = stack.pop() {
        if !used.insert(tree) {
            continue;
        }
        let t = repo
            .load_tree(index, &tree)
            .map_err(|e| PruneError::Damaged(format!("snapshot {snap}: tree {tree}: {e}")))?;
        for n in t.nodes {
            // Whatever a node references is used, whatever its kind (a kind a newer
            // build wrote included): a subtree, and content.
            if let Some(sub) = n.subtree {
                stack.push((sub, snap.clone()));
            }
            if !n.content.is_empty() || !n.content_lists.is_empty() {
                used.extend(n.content_lists.iter().copied());
                let ids = repo.file_content(index, &n).map_err(|e| {
                    PruneError::Damaged(format!("snapshot {snap}: {}: {e}", n.name))
                })?;
                used.extend(ids);
            }
        }
    }
    for id in &used {
        if !index.contains(id) {
            return Err(PruneError::Damaged(format!(
                "blob {id} is used by a snapshot but in no index"
            )));
        }
    }
    Ok(used)
}

/// The blobs of every pack not in `packs`.
fn blobs_outside(
    blobs_of: &HashMap<BlobId, HashMap<BlobId, pack::PackEntry>>,
    packs: &HashSet<BlobId>,
) -> HashSet<BlobId> {
    blobs_of
        .iter()
        .filter(|(p, _)| !packs.contains(p))
        .flat_map(|(_, m)| m.keys().copied())
        .collect()
}

/// Runs prune.
///
/// # Errors
/// Another prune holding the lock, a damaged repository (nothing is deleted), or store
/// failures (whatever was done before stays consistent).
pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport, PruneError> {
    let keys = repo.keys();
    let live = repo.live_keys().clone();
    let backend = repo.backend().clone();
    let _lock = if opts.dry_run {
        None
    } else {
        Some(RepoLock::acquire(
            backend.clone(),
            live.clone(),
            LockKind::Prune,
            &opts.host,
            None,
        )?)
    };
    // The backups running now, read before the snapshots: one that finishes later was
    // running when we looked, so its lock is here.
    let locks_at_start: Vec<LockRecord> = list_locks(&backend, &live)?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let now = super::clock::now();
    let mut report = PruneReport::default();
    let snaps = repo.all_snapshots()?;
    let mut index_files: Vec<(String, Vec<IndexedPack>)> = vec![];
    for (name, _) in backend.list(ObjectType::Index)? {
        let packs = repo.load_index_file(&name)?;
        index_files.push((name, packs));
    }
    let index = Index::from_packs(index_files.iter().flat_map(|(_, p)| p.iter().cloned()));
    let used = used_blobs(repo, &index, &snaps)?;
    let stored: HashMap<BlobId, u64> = backend
        .list(ObjectType::Pack)?
        .into_iter()
        .filter_map(|(n, size)| BlobId::from_hex(&n).map(|id| (id, size)))
        .collect();
    report.packs = stored.len();
    report.pack_bytes = stored.values().sum();
    let (old_marks, mark_objects) = load_marks(repo)?;

    // Per stored pack: its blobs (from every index file naming it).
    let mut blobs_of: HashMap<BlobId, HashMap<BlobId, pack::PackEntry>> = HashMap::new();
    for (_, packs) in &index_files {
        for p in packs {
            if stored.contains_key(&p.pack) {
                let m = blobs_of.entry(p.pack).or_default();
                for e in &p.entries {
                    m.insert(e.id, *e);
                }
            }
        }
    }
    let used_bytes = |p: &BlobId| -> u64 {
        blobs_of.get(p).map_or(0, |m| {
            m.values()
                .filter(|e| used.contains(&e.id))
                .map(|e| u64::from(e.length))
                .sum()
        })
    };
    // Packs nothing needs, and packs mostly unused.
    let mut candidates: HashSet<BlobId> = HashSet::new();
    let mut repack: Vec<BlobId> = vec![];
    for (p, size) in &stored {
        let u = used_bytes(p);
        if u == 0 {
            candidates.insert(*p);
        } else if !old_marks.contains_key(p)
            && *size > 0
            && (1.0 - u as f64 / *size as f64) >= opts.repack_unused
        {
            repack.push(*p);
        }
    }
    repack.sort();
    // Packs marked earlier are candidates again unless needed (checked below).
    for p in old_marks.keys() {
        if stored.contains_key(p) {
            candidates.insert(*p);
        }
    }

    // Repack: copy the live blobs of mostly-unused packs into new packs.
    let mut new_index: Vec<IndexedPack> = vec![];
    if !repack.is_empty() && !opts.dry_run {
        let gone: HashSet<BlobId> = candidates.iter().chain(repack.iter()).copied().collect();
        // Blobs already safe in a pack that stays.
        let mut elsewhere = blobs_outside(&blobs_of, &gone);
        let mut builder = PackBuilder::default();
        let pack_size = repo.config().pack_size as usize;
        let mut flush = |b: PackBuilder, report: &mut PruneReport| -> Result<(), PruneError> {
            let fin = b.finish(&keys);
            report.repacked_bytes += fin.bytes.len() as u64;
            backend.put(ObjectType::Pack, &fin.id.to_hex(), Bytes::from(fin.bytes))?;
            new_index.push(IndexedPack {
                pack: fin.id,
                entries: fin.entries,
            });
            Ok(())
        };
        for p in &repack {
            let name = p.to_hex();
            let bytes = backend.get(ObjectType::Pack, &name)?;
            let path = super::object_path(ObjectType::Pack, &name);
            let entries = pack::read_header(&keys, &path, &bytes)
                .map_err(|e| PruneError::Damaged(e.to_string()))?;
            for e in entries {
                if !used.contains(&e.id) || elsewhere.contains(&e.id) {
                    continue;
                }
                let sealed = bytes
                    .get(e.offset as usize..(e.offset as usize + e.length as usize))
                    .ok_or_else(|| PruneError::Damaged(format!("{path}: blob past the end")))?;
                // Never copy damage into a new pack; and a blob of an older key generation
                // is sealed again with the newest, so that every blob of a pack has the
                // generation of its header (`key retire` reads only headers to know).
                blob::decode(&keys, e.kind, &e.id, sealed, e.raw_length as usize)
                    .map_err(|err| PruneError::Damaged(format!("{path}: {err}")))?;
                if crate::crypto::aead::generation_of(sealed).ok() == Some(keys.current().0) {
                    builder.add(e.kind, e.id, sealed, e.raw_length);
                } else {
                    let again = blob::reseal(&keys, e.kind, &e.id, sealed, e.raw_length as usize)
                        .map_err(|err| PruneError::Damaged(format!("{path}: {err}")))?;
                    builder.add(e.kind, e.id, &again, e.raw_length);
                }
                elsewhere.insert(e.id);
                report.blobs_repacked += 1;
                if builder.len() >= pack_size {
                    flush(std::mem::take(&mut builder), &mut report)?;
                }
            }
            report.repacked += 1;
            candidates.insert(*p);
        }
        if !builder.is_empty() {
            flush(builder, &mut report)?;
        }
        // The copies are findable before anything marks the originals.
        if !new_index.is_empty() {
            repo.save_index(&new_index)?;
        }
        for p in &new_index {
            let m = blobs_of.entry(p.pack).or_default();
            for e in &p.entries {
                m.insert(e.id, *e);
            }
        }
    } else if opts.dry_run {
        report.repacked = repack.len();
    }

    // A candidate is needed when some used blob in it exists in no pack that stays.
    let available = blobs_outside(&blobs_of, &candidates);
    let mut marks: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    // Marked in this run: stamped when the marks object is written, not now, since a
    // backup starting before it is visible cannot see them (decisions/0009-prune.md).
    let mut new_marks: Vec<String> = vec![];
    let mut deletable: Vec<BlobId> = vec![];
    let live_locks: Vec<LockRecord> = {
        let mut l = locks_at_start;
        if !opts.dry_run {
            l.extend(list_locks(&backend, &live)?.into_iter().map(|(_, r)| r));
        }
        l.into_iter()
            .filter(|r| r.kind == LockKind::Backup && !r.is_stale(now))
            .collect()
    };
    let mut sorted: Vec<&BlobId> = candidates.iter().collect();
    sorted.sort();
    for p in sorted {
        let needed = blobs_of.get(p).is_some_and(|m| {
            m.keys()
                .any(|id| used.contains(id) && !available.contains(id))
        });
        if needed {
            if old_marks.contains_key(p) {
                report.unmarked += 1;
            }
            continue;
        }
        match old_marks.get(p) {
            None => {
                report.marked += 1;
                new_marks.push(p.to_hex());
            }
            Some(&t) => {
                let old_enough =
                    now.signed_duration_since(t).to_std().unwrap_or_default() >= opts.grace;
                let held = live_locks.iter().any(|l| l.started < t + MARK_SLACK);
                if old_enough && !held {
                    deletable.push(*p);
                } else {
                    report.waiting += 1;
                    if old_enough {
                        report.held_by_backups += 1;
                    }
                    marks.insert(p.to_hex(), t);
                }
            }
        }
    }
    if opts.dry_run {
        report.deleted = deletable.len();
        report.deleted_bytes = deletable.iter().map(|p| stored[p]).sum();
        report.wal_deleted = expire_wal(repo, &snaps, &live_locks, true)?;
        return Ok(report);
    }

    if !deletable.is_empty() {
        let gone: HashSet<BlobId> = deletable.iter().copied().collect();
        // 1. Index files without the deleted packs, before any pack goes.
        report.index_rewritten += index_without(repo, &index_files, &gone)?;
        // 2. The packs.
        for p in &deletable {
            backend.delete(ObjectType::Pack, &p.to_hex())?;
            report.deleted += 1;
            report.deleted_bytes += stored[p];
        }
    }
    // 3. The marks that remain, then the old marks objects.
    let stamp = super::clock::now();
    for p in new_marks {
        marks.insert(p, stamp);
    }
    if !marks.is_empty() {
        let rec = MarksRecord {
            written: stamp,
            packs: marks,
        };
        let plain = serde_json::to_vec(&rec).expect("marks serialize");
        repo.save_object(ObjectType::Mark, ObjectKind::Marks, &plain)?;
    }
    for name in mark_objects {
        backend.delete(ObjectType::Mark, &name)?;
    }
    report.wal_deleted = expire_wal(repo, &snaps, &live_locks, false)?;
    Ok(report)
}

/// Removes WAL segments (and their `.partial`/`.backup` files) older than the start of
/// the oldest base backup of each cluster; history files stay. Clusters without a base
/// backup keep all their WAL, and so do clusters with a base backup running now (its lock
/// names the cluster: it may have started before the oldest kept one). Returns how many objects were
/// (or would be) removed.
fn expire_wal(
    repo: &Repository,
    snaps: &[(BlobId, Snapshot)],
    live_backups: &[LockRecord],
    dry_run: bool,
) -> Result<usize, PruneError> {
    let mut oldest: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let busy: HashSet<u64> = live_backups
        .iter()
        .filter_map(|l| l.postgres_system_id.as_deref())
        .filter_map(|id| id.parse().ok())
        .collect();
    for (_, s) in snaps {
        if let Some(m) = &s.postgres {
            if busy.contains(&m.system_identifier) {
                continue;
            }
            let seg = Segment::of(m.timeline, m.start_lsn, m.wal_segment_size);
            let e = oldest
                .entry(m.system_identifier)
                .or_insert((seg.number, m.wal_segment_size));
            e.0 = e.0.min(seg.number);
        }
    }
    let mut removed = 0;
    for (sysid, (keep_from, seg_size)) in oldest {
        let per_id = 0x1_0000_0000u64 / seg_size;
        let top = repo
            .backend()
            .list_dir(ObjectType::Wal, &sysid.to_string())?;
        for group in top.dirs {
            // The group's first 16 digits: timeline and log id; skip groups wholly new.
            let log = group
                .get(8..16)
                .and_then(|l| u64::from_str_radix(l, 16).ok());
            match log {
                Some(log) if log * per_id >= keep_from => continue,
                None => continue,
                Some(_) => {}
            }
            let files = repo
                .backend()
                .list_dir(ObjectType::Wal, &format!("{sysid}/{group}"))?;
            for (name, _) in files.files {
                let Some(seg_name) = name.get(..24).filter(|n| is_segment_name(n)) else {
                    continue;
                };
                let Some(seg) = Segment::parse(seg_name, seg_size) else {
                    continue;
                };
                if seg.number < keep_from {
                    if !dry_run {
                        repo.backend()
                            .delete(ObjectType::Wal, &format!("{sysid}/{group}/{name}"))?;
                    }
                    removed += 1;
                }
            }
        }
    }
    Ok(removed)
}

/// Replaces the marks objects by one holding `marks` (stamped now where new) — the step a
/// prune ends with, for `key retire`, which holds the prune lock. Returns the stamp.
///
/// # Errors
/// Backend failures (the old marks objects stay; the new one holds all of them).
pub(crate) fn rewrite_marks(
    repo: &Repository,
    mut marks: Marks,
    new: &[BlobId],
) -> Result<DateTime<Utc>, RepoError> {
    let (_, objects) = load_marks(repo)?;
    let stamp = super::clock::now();
    for p in new {
        marks.entry(*p).or_insert(stamp);
    }
    if !marks.is_empty() {
        let rec = MarksRecord {
            written: stamp,
            packs: marks.iter().map(|(p, t)| (p.to_hex(), *t)).collect(),
        };
        let plain = serde_json::to_vec(&rec).expect("marks serialize");
        repo.save_object(ObjectType::Mark, ObjectKind::Marks, &plain)?;
    }
    for name in objects {
        repo.backend().delete(ObjectType::Mark, &name)?;
    }
    Ok(stamp)
}

/// Deletes packs `gone`, every index file naming one rewritten first without them (rule 3
/// of format.md §18); returns how many index files were rewritten.
///
/// # Errors
/// Backend failures: what was done stays consistent (an index never names a deleted pack).
pub(crate) fn delete_packs(repo: &Repository, gone: &HashSet<BlobId>) -> Result<usize, RepoError> {
    let mut index_files: Vec<(String, Vec<IndexedPack>)> = vec![];
    for (name, _) in repo.backend().list(ObjectType::Index)? {
        let packs = repo.load_index_file(&name)?;
        index_files.push((name, packs));
    }
    let rewritten = index_without(repo, &index_files, gone)?;
    for p in gone {
        match repo.backend().delete(ObjectType::Pack, &p.to_hex()) {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
    }
    Ok(rewritten)
}

/// Rule 3 of format.md §18: one new index file with the surviving entries of every index
/// file that names a pack of `gone`, then those index files deleted; returns how many.
fn index_without(
    repo: &Repository,
    index_files: &[(String, Vec<IndexedPack>)],
    gone: &HashSet<BlobId>,
) -> Result<usize, RepoError> {
    let affected: Vec<&(String, Vec<IndexedPack>)> = index_files
        .iter()
        .filter(|(_, packs)| packs.iter().any(|p| gone.contains(&p.pack)))
        .collect();
    let surviving: Vec<IndexedPack> = affected
        .iter()
        .flat_map(|(_, packs)| packs.iter())
        .filter(|p| !gone.contains(&p.pack))
        .cloned()
        .collect();
    if !surviving.is_empty() {
        repo.save_index(&surviving)?;
    }
    for (name, _) in &affected {
        repo.backend().delete(ObjectType::Index, name)?;
    }
    Ok(affected.len())
}

/// A backup lock that may still deduplicate against packs marked at `mark`: started
/// before the mark (with the slack of rule 2d).
pub(crate) fn holds_mark(lock: &LockRecord, mark: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    lock.kind == LockKind::Backup && !lock.is_stale(now) && lock.started < mark + MARK_SLACK
}
