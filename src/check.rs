//! `backupd check`: the repository's structure (every snapshot's trees and blobs resolve
//! to packs that exist) and, with `--read-data`, every pack's bytes (hash, header, each
//! blob's seal and id).

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};

use crate::backend::ObjectType;
use crate::pipeline::{blob, BlobId};
use crate::repo::{object_path, pack, Index, NodeKind, Repository};

/// Findings of a check.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// Problems that make data unrestorable, each naming the object.
    pub errors: Vec<String>,
    /// Harmless findings (unindexed packs left by interrupted backups).
    pub notes: Vec<String>,
    /// Snapshots checked.
    pub snapshots: usize,
    /// Packs read with `--read-data`.
    pub packs_read: usize,
    /// Snapshots and files with data in a damaged pack.
    pub affected: Vec<String>,
}

/// Which packs to read back: all, or a fraction chosen anew each `seed` (e.g. the
/// month), so that repeated runs cover different packs.
#[derive(Clone, Copy, Debug)]
pub enum ReadData {
    /// Structure only.
    None,
    /// Every pack.
    All,
    /// This fraction (0..1] of the packs, chosen by hashing each name with the seed.
    Subset {
        /// The fraction.
        fraction: f64,
        /// Changes the choice.
        seed: u64,
    },
}

impl ReadData {
    /// `fraction` of the packs, a different choice each calendar month.
    pub fn monthly_subset(fraction: f64) -> Self {
        use chrono::Datelike;
        let now = chrono::Utc::now();
        ReadData::Subset {
            fraction,
            seed: (now.year() as u64) * 12 + u64::from(now.month()),
        }
    }
}

/// Whether a pack is in a subset.
pub fn in_subset(name: &str, fraction: f64, seed: u64) -> bool {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    let d = h.finalize();
    let v = u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
    v < fraction
}

/// Checks the repository (reading every pack with `read_data`).
pub fn check(repo: &Repository, read_data: bool) -> CheckReport {
    check_with(
        repo,
        if read_data {
            ReadData::All
        } else {
            ReadData::None
        },
    )
}

/// Checks the repository, reading back the packs `read` selects; a damaged pack's
/// report names the snapshots and files it affects.
pub fn check_with(repo: &Repository, read: ReadData) -> CheckReport {
    let mut r = CheckReport::default();
    let mut index_files = vec![];
    match repo.backend().list(ObjectType::Index) {
        Ok(l) => {
            for (name, _) in l {
                match repo.load_index_file(&name) {
                    Ok(p) => index_files.extend(p),
                    Err(e) => r.errors.push(e.to_string()),
                }
            }
        }
        Err(e) => r.errors.push(format!("listing index: {e}")),
    }
    let index = Index::from_packs(index_files);
    let listed: HashMap<String, u64> = match repo.backend().list(ObjectType::Pack) {
        Ok(l) => l.into_iter().collect(),
        Err(e) => {
            r.errors.push(format!("listing packs: {e}"));
            HashMap::new()
        }
    };
    let indexed: HashSet<String> = index.packs().iter().map(|p| p.to_hex()).collect();
    for p in &indexed {
        if !listed.contains_key(p) {
            r.errors.push(format!(
                "{}: missing (named by the index)",
                object_path(ObjectType::Pack, p)
            ));
        }
    }
    for p in listed.keys() {
        if !indexed.contains(p) {
            r.notes.push(format!(
                "{}: not in any index (left by an interrupted backup; prune removes it)",
                object_path(ObjectType::Pack, p)
            ));
        }
    }
    match repo.backend().list(ObjectType::Snapshot) {
        Ok(l) => {
            for (name, _) in l {
                match repo.load_snapshot(&name) {
                    Ok(s) => {
                        r.snapshots += 1;
                        let mut seen = HashSet::new();
                        // A PostgreSQL base backup's tablespaces have trees of their own.
                        for (tree, ts) in s.trees() {
                            let at = ts.map(|n| format!("tablespace {n}")).unwrap_or_default();
                            check_tree(repo, &index, &tree, &name, &at, &mut seen, &mut r.errors);
                        }
                    }
                    Err(e) => r.errors.push(e.to_string()),
                }
            }
        }
        Err(e) => r.errors.push(format!("listing snapshots: {e}")),
    }
    let mut names: Vec<&String> = match read {
        ReadData::None => vec![],
        ReadData::All => listed.keys().collect(),
        ReadData::Subset { fraction, seed } => {
            let mut v: Vec<&String> = listed
                .keys()
                .filter(|n| in_subset(n, fraction, seed))
                .collect();
            // Never zero packs of a repository that has some.
            if v.is_empty() {
                if let Some(first) = listed.keys().min() {
                    v.push(first);
                }
            }
            v
        }
    };
    names.sort();
    let mut damaged = HashSet::new();
    for name in names {
        r.packs_read += 1;
        if let Err(e) = check_pack(repo, name) {
            r.errors.push(e);
            if let Some(id) = BlobId::from_hex(name) {
                damaged.insert(id);
            }
        }
    }
    if !damaged.is_empty() {
        r.affected = affected_by(repo, &index, &damaged);
    }
    r
}

/// The snapshots and files that have data in the `damaged` packs, as
/// `snapshot SHORT: /path`.
pub fn affected_by(repo: &Repository, index: &Index, damaged: &HashSet<BlobId>) -> Vec<String> {
    let bad = |id: &BlobId| index.get(id).is_some_and(|l| damaged.contains(&l.pack));
    let mut out = vec![];
    let Ok(snaps) = repo.snapshots() else {
        return out;
    };
    for (sid, s) in snaps {
        let mut stack: Vec<(BlobId, String)> = s
            .trees()
            .map(|(tree, ts)| {
                (
                    tree,
                    ts.map(|n| format!("[tablespace {n}]")).unwrap_or_default(),
                )
            })
            .collect();
        while let Some((tree, path)) = stack.pop() {
            if bad(&tree) {
                out.push(format!(
                    "snapshot {}: {path}/ (directory listing)",
                    sid.short()
                ));
                continue;
            }
            let Ok(t) = repo.load_tree(index, &tree) else {
                continue;
            };
            for n in t.nodes {
                let p = format!("{path}/{}", n.name);
                match n.kind {
                    NodeKind::Dir => {
                        if let Some(sub) = n.subtree {
                            stack.push((sub, p));
                        }
                    }
                    NodeKind::File => {
                        let hit = n.content_lists.iter().any(&bad)
                            || repo
                                .file_content(index, &n)
                                .map(|ids| ids.iter().any(&bad))
                                .unwrap_or(true);
                        if hit {
                            out.push(format!("snapshot {}: {p}", sid.short()));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    out.sort();
    out
}

fn check_tree(
    repo: &Repository,
    index: &Index,
    tree: &BlobId,
    snap: &str,
    path: &str,
    seen: &mut HashSet<BlobId>,
    errors: &mut Vec<String>,
) {
    if !seen.insert(*tree) {
        return;
    }
    let t = match repo.load_tree(index, tree) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!(
                "snapshot {}: {}/: {e}",
                &snap[..8.min(snap.len())],
                path
            ));
            return;
        }
    };
    for n in t.nodes {
        let p = format!("{path}/{}", n.name);
        match n.kind {
            NodeKind::Dir => match n.subtree {
                Some(s) => check_tree(repo, index, &s, snap, &p, seen, errors),
                None => errors.push(format!(
                    "snapshot {}: {p}: directory without subtree",
                    &snap[..8]
                )),
            },
            NodeKind::File => {
                let ids = match repo.file_content(index, &n) {
                    Ok(ids) => ids,
                    Err(e) => {
                        errors.push(format!("snapshot {}: {p}: {e}", &snap[..8]));
                        continue;
                    }
                };
                if let Some(why) = n.extents_problem() {
                    errors.push(format!("snapshot {}: {p}: {why}", &snap[..8]));
                    continue;
                }
                let mut content = 0u64;
                let mut missing = false;
                for id in ids {
                    match index.get(&id) {
                        Some(at) => content += u64::from(at.raw_length),
                        None => {
                            errors.push(format!(
                                "snapshot {}: {p}: blob {id} is not in the index",
                                &snap[..8]
                            ));
                            missing = true;
                            break;
                        }
                    }
                }
                if !missing && content != n.data_size() {
                    errors.push(format!(
                        "snapshot {}: {p}: its content is {content} bytes, its data {} bytes",
                        &snap[..8],
                        n.data_size()
                    ));
                }
            }
            NodeKind::Unknown => errors.push(format!(
                "snapshot {}: {p}: a node of a kind this backupd does not know",
                &snap[..8]
            )),
            _ => {}
        }
    }
}

fn check_pack(repo: &Repository, name: &str) -> Result<(), String> {
    let path = object_path(ObjectType::Pack, name);
    let bytes = repo
        .backend()
        .get(ObjectType::Pack, name)
        .map_err(|e| e.to_string())?;
    if hex::encode(Sha256::digest(&bytes)) != name {
        return Err(format!(
            "{path}: corrupt or tampered (content does not match its name)"
        ));
    }
    let entries = pack::read_header(&repo.keys(), &path, &bytes).map_err(|e| e.to_string())?;
    for e in entries {
        let sealed = &bytes[e.offset as usize..(e.offset + e.length) as usize];
        let plain = blob::decode(&repo.keys(), e.kind, &e.id, sealed, e.raw_length as usize)
            .map_err(|err| format!("{path}: {err}"))?;
        if repo.keys().blob_id(&plain) != e.id.0 {
            return Err(format!("{path}: blob {} does not hash to its id", e.id));
        }
    }
    Ok(())
}
