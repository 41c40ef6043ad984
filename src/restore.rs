//! Restore: plan every file from the snapshot's trees, then fetch packs in parallel, in
//! pack order, reading each pack's needed blobs with few ranged reads, and write each blob
//! in place at its offset in every file that holds it. Metadata is applied last (files,
//! then directories deepest first, so their times stick).
//!
//! A damaged pack does not stop the restore: every other file is restored, and the files
//! that needed the damaged blobs are named in the report.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use globset::GlobSet;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, Gid, Uid};

use crate::backend::{BackendError, ObjectType};
use crate::pipeline::{blob, BlobId, BlobKind};
use crate::repo::{object_path, Index, Node, NodeKind, RepoError, Repository};

/// Why a restore could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The target holds files already.
    #[error("target {0} is not empty; restore into a new or empty directory")]
    TargetNotEmpty(String),
    /// Could not create something in the target.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// Reading the snapshot's trees failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The path asked for is not in the snapshot.
    #[error("{0}: not found in the snapshot")]
    NotFound(String),
}

/// What a restore did.
#[derive(Debug, Default)]
pub struct RestoreReport {
    /// Files restored completely.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Content bytes written.
    pub bytes: u64,
    /// Content bytes a delta restore found in place already.
    pub bytes_unchanged: u64,
    /// Files that could not be restored completely, with why.
    pub failed: Vec<(String, String)>,
}

/// Filters by glob on the path inside the snapshot.
#[derive(Default)]
pub struct RestoreFilter {
    /// Only these (and what is under them).
    pub include: Option<GlobSet>,
    /// Not these (nor what is under them).
    pub exclude: Option<GlobSet>,
    /// Delta restore: the target may hold files already. Each file's blobs are compared
    /// with what is on disk (by keyed hash, at the blob's own offsets) and only those that
    /// differ are fetched and written; files are cut to their size; entries the snapshot
    /// does not have are removed.
    pub delta: bool,
}

struct PlannedFile {
    path: PathBuf,
    snap_path: String,
    node: Node,
}

struct BlobTarget {
    file: usize,
    offset: u64,
}

/// One blob to fetch, keyed by its offset in its pack.
struct PlannedBlob {
    id: BlobId,
    /// The index's kind, which is what sealed it (a file chunk may be stored as a tree blob
    /// with the same bytes).
    kind: BlobKind,
    /// Sealed length.
    length: u32,
    /// Plaintext length.
    raw_length: u32,
    /// Where it goes.
    targets: Vec<BlobTarget>,
}

struct Plan {
    files: Vec<PlannedFile>,
    dirs: Vec<(PathBuf, Node)>,
    links: Vec<(PathBuf, Node)>,
    // pack -> offset in pack -> blob
    packs: BTreeMap<BlobId, BTreeMap<u32, PlannedBlob>>,
    missing: Vec<(usize, String)>,
    hardlinks: HashMap<(u64, u64), PathBuf>,
}

fn to_path(base: &Path, node: &Node) -> PathBuf {
    base.join(OsStr::from_bytes(&node.name_bytes()))
}

/// Restores a snapshot tree into `target`.
///
/// # Errors
/// A non-empty target, I/O errors creating the tree, or trees that cannot be read.
/// Damaged packs are not errors: they are in the report.
pub fn restore(
    repo: &Repository,
    index: &Index,
    tree: &BlobId,
    target: &Path,
    filter: &RestoreFilter,
    workers: usize,
    progress: &AtomicU64,
) -> Result<RestoreReport, RestoreError> {
    let io = |p: &Path, source| RestoreError::Io {
        path: p.display().to_string(),
        source,
    };
    if let Ok(mut rd) = fs::read_dir(target) {
        if rd.next().is_some() && !filter.delta {
            return Err(RestoreError::TargetNotEmpty(target.display().to_string()));
        }
    } else if target.exists() {
        return Err(RestoreError::TargetNotEmpty(target.display().to_string()));
    }
    fs::create_dir_all(target).map_err(|e| io(target, e))?;
    let mut plan = Plan {
        files: vec![],
        dirs: vec![],
        links: vec![],
        packs: BTreeMap::new(),
        missing: vec![],
        hardlinks: HashMap::new(),
    };
    let mut report = RestoreReport::default();
    plan_tree(
        repo,
        index,
        tree,
        target,
        "",
        filter,
        false,
        &mut plan,
        &mut report,
    )?;

    let failed: Mutex<HashMap<usize, String>> = Mutex::new(
        plan.missing
            .iter()
            .map(|(f, why)| (*f, why.clone()))
            .collect(),
    );
    let packs: Vec<_> = std::mem::take(&mut plan.packs).into_iter().collect();
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| {
                // One read buffer and one decompression buffer per worker, reused for every
                // range and blob: bounded memory, and no fresh pages to fault in per read.
                let mut bufs = Buffers::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some((pack, blobs)) = packs.get(i) else {
                        return;
                    };
                    restore_pack(repo, pack, blobs, &plan.files, &failed, progress, &mut bufs);
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    for (i, f) in plan.files.iter().enumerate() {
        if let Some(why) = failed.get(&i) {
            report.failed.push((f.snap_path.clone(), why.clone()));
            continue;
        }
        report.files += 1;
        report.bytes += f.node.size;
        if let Err(e) = apply_metadata(&f.path, &f.node) {
            report
                .failed
                .push((f.snap_path.clone(), format!("metadata: {e}")));
        }
    }
    for (p, n) in &plan.links {
        let _ = apply_metadata(p, n);
    }
    // Deepest first, so restoring a child does not change its parent's mtime afterwards.
    plan.dirs
        .sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (p, n) in &plan.dirs {
        apply_metadata(p, n).map_err(|e| io(p, e))?;
    }
    report.failed.sort();
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn plan_tree(
    repo: &Repository,
    index: &Index,
    tree: &BlobId,
    dir: &Path,
    snap_dir: &str,
    filter: &RestoreFilter,
    included: bool,
    plan: &mut Plan,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let io = |p: &Path, source| RestoreError::Io {
        path: p.display().to_string(),
        source,
    };
    let t = repo.load_tree(index, tree)?;
    if filter.delta {
        remove_extraneous(dir, &t.nodes).map_err(|e| io(dir, e))?;
    }
    for node in t.nodes {
        let name = node.name_bytes();
        if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
            report.failed.push((
                format!("{snap_dir}/{}", node.name),
                "unsafe file name in snapshot; skipped".into(),
            ));
            continue;
        }
        let path = to_path(dir, &node);
        let snap_path = format!("{snap_dir}/{}", node.name);
        if filter
            .exclude
            .as_ref()
            .is_some_and(|g| g.is_match(&snap_path))
        {
            continue;
        }
        let inc = included
            || filter
                .include
                .as_ref()
                .is_none_or(|g| g.is_match(&snap_path));
        match node.kind {
            NodeKind::Dir => {
                let sub = node.subtree.ok_or_else(|| RepoError::CorruptOrTampered {
                    object: format!("tree {tree}"),
                    why: format!("directory {snap_path} has no subtree"),
                })?;
                let before = plan.files.len() + plan.links.len();
                fs::create_dir_all(&path).map_err(|e| io(&path, e))?;
                plan_tree(
                    repo, index, &sub, &path, &snap_path, filter, inc, plan, report,
                )?;
                let has_content = plan.files.len() + plan.links.len() > before;
                if inc || has_content {
                    report.dirs += 1;
                    plan.dirs.push((path, node));
                } else {
                    // Nothing under it was selected: remove the directory again.
                    let _ = fs::remove_dir(&path);
                }
            }
            _ if !inc => {}
            NodeKind::Symlink => {
                let target = node.link_target_bytes().unwrap_or_default();
                if filter.delta {
                    remove_any(&path).map_err(|e| io(&path, e))?;
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|e| io(&path, e))?;
                report.symlinks += 1;
                plan.links.push((path, node));
            }
            NodeKind::File => {
                if node.links > 1 && node.inode != 0 {
                    let key = (node.device, node.inode);
                    if let Some(first) = plan.hardlinks.get(&key) {
                        if fs::hard_link(first, &path).is_ok() {
                            report.files += 1;
                            continue;
                        }
                    } else {
                        plan.hardlinks.insert(key, path.clone());
                    }
                }
                // In a delta restore, an existing regular file is kept and compared.
                let existing = filter.delta
                    && fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
                if filter.delta && !existing {
                    remove_any(&path).map_err(|e| io(&path, e))?;
                }
                let f = if existing {
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(|e| io(&path, e))?
                } else {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(|e| io(&path, e))?
                };
                let old_len = if existing {
                    f.metadata().map_err(|e| io(&path, e))?.len()
                } else {
                    0
                };
                f.set_len(node.size).map_err(|e| io(&path, e))?;
                let file_idx = plan.files.len();
                let mut offset = 0u64;
                let mut scratch = vec![];
                match repo.file_content(index, &node) {
                    Ok(ids) => {
                        for id in ids {
                            match index.get(&id) {
                                Some(loc)
                                    if existing
                                        && offset + loc.raw_length as u64 <= old_len
                                        && same_bytes_on_disk(
                                            repo,
                                            &f,
                                            offset,
                                            loc.raw_length,
                                            &id,
                                            &mut scratch,
                                        ) =>
                                {
                                    report.bytes_unchanged += loc.raw_length as u64;
                                    offset += loc.raw_length as u64;
                                }
                                Some(loc) => {
                                    let e = plan
                                        .packs
                                        .entry(loc.pack)
                                        .or_default()
                                        .entry(loc.offset)
                                        .or_insert_with(|| PlannedBlob {
                                            id,
                                            kind: loc.kind,
                                            length: loc.length,
                                            raw_length: loc.raw_length,
                                            targets: vec![],
                                        });
                                    e.targets.push(BlobTarget {
                                        file: file_idx,
                                        offset,
                                    });
                                    offset += loc.raw_length as u64;
                                }
                                None => {
                                    plan.missing
                                        .push((file_idx, format!("blob {id} is not in the index")));
                                    break;
                                }
                            }
                        }
                    }
                    Err(e) => plan.missing.push((file_idx, e.to_string())),
                }
                plan.files.push(PlannedFile {
                    path,
                    snap_path,
                    node,
                });
            }
        }
    }
    Ok(())
}

/// True when the file holds exactly the blob `id` at `offset`.
fn same_bytes_on_disk(
    repo: &Repository,
    f: &fs::File,
    offset: u64,
    len: u32,
    id: &BlobId,
    buf: &mut Vec<u8>,
) -> bool {
    buf.resize(len as usize, 0);
    f.read_exact_at(buf, offset).is_ok() && repo.keys().blob_id(buf) == id.0
}

/// Removes whatever is at `path` (file, link or directory tree); absent is fine.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Delta restore: removes entries of `dir` the snapshot's directory does not hold, and
/// entries whose kind differs from the snapshot's (they are recreated).
fn remove_extraneous(dir: &Path, nodes: &[Node]) -> io::Result<()> {
    let wanted: HashMap<Vec<u8>, &Node> = nodes.iter().map(|n| (n.name_bytes(), n)).collect();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let ft = e.file_type()?;
        let keep = wanted.get(name.as_bytes()).is_some_and(|n| match n.kind {
            NodeKind::Dir => ft.is_dir(),
            NodeKind::File => ft.is_file(),
            NodeKind::Symlink => ft.is_symlink(),
        });
        if !keep {
            remove_any(&e.path())?;
        }
    }
    Ok(())
}

/// Reads ranges no more than this far apart as one.
const COALESCE_GAP: u32 = 1024 * 1024;

/// A restore worker's reusable buffers.
#[derive(Default)]
struct Buffers {
    range: Vec<u8>,
    plain: Vec<u8>,
}

fn restore_pack(
    repo: &Repository,
    pack: &BlobId,
    blobs: &BTreeMap<u32, PlannedBlob>,
    files: &[PlannedFile],
    failed: &Mutex<HashMap<usize, String>>,
    progress: &AtomicU64,
    bufs: &mut Buffers,
) {
    let name = pack.to_hex();
    let path = object_path(ObjectType::Pack, &name);
    // Each worker holds one ranged read at a time; a remote store gets more, smaller reads
    // in flight (throughput per connection is what limits it), a local disk fewer, larger.
    let max_range: u64 = if repo.backend().connections().is_some() {
        4 * 1024 * 1024
    } else {
        8 * 1024 * 1024
    };
    let fail = |targets: &[BlobTarget], why: &str| {
        let mut g = failed.lock().unwrap_or_else(|p| p.into_inner());
        for t in targets {
            g.entry(t.file).or_insert_with(|| why.to_string());
        }
    };
    let entries: Vec<(u32, &PlannedBlob)> = blobs.iter().map(|(o, b)| (*o, b)).collect();
    let mut i = 0;
    while i < entries.len() {
        let start = entries[i].0 as u64;
        let mut end = start + entries[i].1.length as u64;
        let mut j = i + 1;
        while let Some(&(off, b)) = entries.get(j) {
            let (off, blob_end) = (off as u64, off as u64 + b.length as u64);
            if off > end + COALESCE_GAP as u64 || blob_end - start > max_range {
                break;
            }
            end = end.max(blob_end);
            j += 1;
        }
        let mut todo = vec![&entries[i..j]];
        while let Some(group) = todo.pop() {
            let start = group[0].0 as u64;
            let end = group
                .iter()
                .map(|(off, b)| *off as u64 + b.length as u64)
                .max()
                .unwrap_or(start);
            let Buffers { range, plain } = &mut *bufs;
            match repo
                .backend()
                .get_range_into(ObjectType::Pack, &name, start, end - start, range)
            {
                Ok(()) => {
                    for &(off, b) in group {
                        let lo = (off as u64 - start) as usize;
                        let sealed = &mut range[lo..lo + b.length as usize];
                        match blob::decode_in_place(
                            repo.keys(),
                            b.kind,
                            &b.id,
                            sealed,
                            b.raw_length as usize,
                            plain,
                        ) {
                            Ok(data) => write_blob(data, &b.targets, files, &fail, progress),
                            Err(e) => {
                                fail(&b.targets, &format!("{path}: corrupt or tampered ({e})"))
                            }
                        }
                    }
                }
                // A short read (a truncated pack) is retried blob by blob, so the intact
                // blobs before the cut are still restored. Any other failure (a missing
                // pack, an I/O error) would fail the same way for each blob.
                Err(BackendError::ShortRead { .. }) if group.len() > 1 => {
                    todo.extend(group.chunks(1).rev())
                }
                Err(e) => {
                    for (_, b) in group {
                        fail(&b.targets, &format!("{path}: {e}"));
                    }
                }
            }
        }
        i = j;
    }
}

/// Writes one decoded blob at its offset in every file that holds it.
fn write_blob(
    plain: &[u8],
    targets: &[BlobTarget],
    files: &[PlannedFile],
    fail: &dyn Fn(&[BlobTarget], &str),
    progress: &AtomicU64,
) {
    for t in targets {
        let r = OpenOptions::new()
            .write(true)
            .open(&files[t.file].path)
            .and_then(|h| h.write_all_at(plain, t.offset));
        if let Err(e) = r {
            fail(std::slice::from_ref(t), &format!("writing: {e}"));
        }
    }
    progress.fetch_add(plain.len() as u64 * targets.len() as u64, Ordering::Relaxed);
}

fn apply_metadata(path: &Path, node: &Node) -> io::Result<()> {
    let is_link = node.kind == NodeKind::Symlink;
    if nix::unistd::geteuid().is_root() {
        fchownat(
            None,
            path,
            Some(Uid::from_raw(node.uid)),
            Some(Gid::from_raw(node.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io::Error::from)?;
    }
    if !is_link {
        fs::set_permissions(path, fs::Permissions::from_mode(node.mode))?;
    }
    let t = TimeSpec::new(
        node.mtime_ns.div_euclid(1_000_000_000),
        node.mtime_ns.rem_euclid(1_000_000_000),
    );
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)?;
    Ok(())
}

/// Finds the node at `path` (e.g. `/etc/app.conf` or `app.dump`) in a snapshot tree.
///
/// # Errors
/// `NotFound`, or trees that cannot be read.
pub fn find_node(
    repo: &Repository,
    index: &Index,
    root: &BlobId,
    path: &str,
) -> Result<Node, RestoreError> {
    let mut tree = repo.load_tree(index, root)?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        let node = tree
            .nodes
            .into_iter()
            .find(|n| n.name == *part)
            .ok_or_else(|| RestoreError::NotFound(path.to_string()))?;
        if i + 1 == parts.len() {
            return Ok(node);
        }
        let sub = node
            .subtree
            .ok_or_else(|| RestoreError::NotFound(path.to_string()))?;
        tree = repo.load_tree(index, &sub)?;
    }
    Err(RestoreError::NotFound(path.to_string()))
}

/// Writes a file node's content to `out`, in order.
///
/// # Errors
/// Damaged data (named), or write errors.
pub fn dump_file(
    repo: &Repository,
    index: &Index,
    node: &Node,
    out: &mut dyn Write,
) -> Result<(), RestoreError> {
    for id in repo.file_content(index, node)? {
        let data = repo.read_blob(index, &id)?;
        out.write_all(&data).map_err(|e| RestoreError::Io {
            path: "stdout".into(),
            source: e,
        })?;
    }
    out.flush().map_err(|e| RestoreError::Io {
        path: "stdout".into(),
        source: e,
    })
}
