//! Restore: plan every entry from the snapshot's trees, then fetch packs in parallel, in
//! pack order, reading each pack's needed blobs with few ranged reads, and write each blob
//! in place at its offset in every file that holds it ([`write`]). Metadata is applied last
//! ([`meta`]: files, special files and links, then directories deepest first, so their
//! times stick; with `--file-flags`, file flags after all of it).
//!
//! Every write lands inside the target: the tree is made and written through directory
//! descriptors ([`crate::dirfd`]), one name at a time with `O_NOFOLLOW`, so a symlink in
//! the snapshot (or one planted in the target during a `--delta` restore) is recreated or
//! replaced, never followed. A tree with duplicate or unsorted names (which no backup
//! writes) is refused by name. Neither path length nor depth is bounded by `PATH_MAX` or
//! the descriptor limit: directories are reopened from a table, and the walk runs on a
//! thread with a large stack.
//!
//! A damaged pack does not stop the restore: every other file is restored, and the files
//! that needed the damaged blobs are named in the report; what cannot be restored exactly
//! (an extended attribute, a device without root) is a warning naming the entry.

pub mod influx;
mod meta;
mod write;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use globset::GlobSet;
use rustix::fs::FileType;

use crate::dirfd::{self, DirTable};
use crate::pipeline::{BlobId, BlobKind};
use crate::repo::{Index, Node, NodeKind, RepoError, Repository};
use write::{BlobTarget, Buffers};

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
    /// FIFOs and devices created.
    pub specials: u64,
    /// Content bytes written.
    pub bytes: u64,
    /// Content bytes a delta restore found in place already.
    pub bytes_unchanged: u64,
    /// Entries that could not be restored, with why.
    pub failed: Vec<(String, String)>,
    /// Entries restored, but not exactly (an attribute that could not be set), with why.
    pub warnings: Vec<(String, String)>,
    /// Entries with file flags that were not set (no `--file-flags`).
    pub flags_not_set: u64,
    /// The symlinks restored (their paths in the target, at most [`LINKS_LISTED`]).
    pub links: Vec<std::path::PathBuf>,
}

impl RestoreReport {
    /// Adds another tree's report (a tablespace) to this one.
    pub fn merge(&mut self, more: RestoreReport) {
        self.files += more.files;
        self.dirs += more.dirs;
        self.symlinks += more.symlinks;
        self.specials += more.specials;
        self.bytes += more.bytes;
        self.bytes_unchanged += more.bytes_unchanged;
        self.failed.extend(more.failed);
        self.warnings.extend(more.warnings);
        self.flags_not_set += more.flags_not_set;
        self.links.extend(more.links);
    }
}

/// How many restored symlinks [`RestoreReport::links`] lists.
pub const LINKS_LISTED: usize = 1000;

/// Filters by glob on the path inside the snapshot, and how to restore.
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
    /// A database cluster: every entry gets this owner (uid, gid; as root) and loses its
    /// set-id bits, whatever the snapshot says. A data directory never holds other owners
    /// or set-id files, and a snapshot forged by someone holding the key (the database's
    /// OS user does) must not make a root restore produce them.
    pub force_owner: Option<(u32, u32)>,
    /// Also write runs of zeros of any file as holes (`restore --sparse`).
    pub sparse: bool,
    /// Set file flags (`chattr`; `restore --file-flags`), after everything else.
    pub file_flags: bool,
}

pub(crate) struct PlannedFile {
    /// Its directory in the [`DirTable`].
    dir: usize,
    name: Vec<u8>,
    node: Node,
    /// The inode made (or kept) for it: every later open checks it is still that file.
    ino: u64,
    /// An older copy's file, kept by `--delta` (a hole there is punched, not skipped).
    existing: bool,
}

pub(crate) struct PlannedDir {
    idx: usize,
    depth: usize,
    node: Node,
}

pub(crate) struct PlannedLink {
    dir: usize,
    name: Vec<u8>,
    node: Node,
}

/// A FIFO or device made by the restore.
pub(crate) struct PlannedSpecial {
    dir: usize,
    name: Vec<u8>,
    node: Node,
    ino: u64,
}

/// An entry's path in the snapshot, for messages: made from the directory table when
/// needed (paths are not kept per entry, so a deep tree costs no more than its depth).
fn snap_path(table: &DirTable, dir: usize, name: &[u8]) -> String {
    format!("{}/{}", table.rel_path(dir), String::from_utf8_lossy(name))
}

impl PlannedFile {
    fn snap_path(&self, table: &DirTable) -> String {
        snap_path(table, self.dir, &self.name)
    }
}

impl PlannedLink {
    fn snap_path(&self, table: &DirTable) -> String {
        snap_path(table, self.dir, &self.name)
    }
}

impl PlannedSpecial {
    fn snap_path(&self, table: &DirTable) -> String {
        snap_path(table, self.dir, &self.name)
    }
}

impl PlannedDir {
    fn snap_path(&self, table: &DirTable) -> String {
        table.rel_path(self.idx)
    }
}

/// One blob to fetch, keyed by its offset in its pack.
pub(crate) struct PlannedBlob {
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

pub(crate) struct Plan {
    table: DirTable,
    files: Vec<PlannedFile>,
    dirs: Vec<PlannedDir>,
    links: Vec<PlannedLink>,
    specials: Vec<PlannedSpecial>,
    // pack -> offset in pack -> blob
    packs: BTreeMap<BlobId, BTreeMap<u32, PlannedBlob>>,
    missing: Vec<(usize, String)>,
    /// (device, inode) in the snapshot -> the first restored name: (directory, name).
    hardlinks: HashMap<(u64, u64), (usize, Vec<u8>)>,
    /// `--sparse`.
    sparse: bool,
}

/// Opens the target, which must be an empty directory (unless `delta`), or makes it
/// (mode 0700: nobody else can enter while the restore runs).
fn open_target(target: &Path, delta: bool) -> Result<DirTable, RestoreError> {
    let io = |source| RestoreError::Io {
        path: target.display().to_string(),
        source,
    };
    match fs::symlink_metadata(target) {
        Ok(md) => {
            if !md.is_dir() && !md.file_type().is_symlink() {
                return Err(RestoreError::TargetNotEmpty(target.display().to_string()));
            }
            let fd = dirfd::open_dir_path(target).map_err(io)?;
            if !delta && !dirfd::list(&fd).map_err(io)?.is_empty() {
                return Err(RestoreError::TargetNotEmpty(target.display().to_string()));
            }
            DirTable::new(fd, target.to_path_buf()).map_err(io)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(io)?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(target)
                .map_err(io)?;
            let fd = dirfd::open_dir_path(target).map_err(io)?;
            DirTable::new(fd, target.to_path_buf()).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

/// The stack of the thread a restore plans on: the walk of the trees recurses once per
/// directory level, and a tree may be deeper than any `PATH_MAX` (reserved address space;
/// only what a walk touches is committed).
const WALK_STACK: usize = 1 << 30;

/// The deepest directory a backup writes: the source's own path (at most `PATH_MAX`, so
/// 2,048 components), then the walker's levels and the one past its limit, kept empty.
/// Anything deeper came from no backupd and is refused.
const MAX_TREE_DEPTH: usize = 2048 + crate::source::files::MAX_DEPTH + 1;

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
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name("restore".into())
            .stack_size(WALK_STACK)
            .spawn_scoped(s, || {
                restore_here(repo, index, tree, target, filter, workers, progress)
            })
            .map_err(|e| RestoreError::Io {
                path: target.display().to_string(),
                source: e,
            })?;
        t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn restore_here(
    repo: &Repository,
    index: &Index,
    tree: &BlobId,
    target: &Path,
    filter: &RestoreFilter,
    workers: usize,
    progress: &AtomicU64,
) -> Result<RestoreReport, RestoreError> {
    let table = open_target(target, filter.delta)?;
    let mut plan = Plan {
        table,
        files: vec![],
        dirs: vec![],
        links: vec![],
        specials: vec![],
        packs: BTreeMap::new(),
        missing: vec![],
        hardlinks: HashMap::new(),
        sparse: filter.sparse,
    };
    let mut report = RestoreReport::default();
    plan_tree(
        repo,
        index,
        tree,
        0,
        0,
        &mut String::new(),
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
                    write::restore_pack(repo, pack, blobs, &plan, &failed, progress, &mut bufs);
                }
            });
        }
    });
    apply_metadata(&plan, filter, failed, &mut report)?;
    report.failed.sort();
    report.warnings.sort();
    Ok(report)
}

/// The metadata phase, and the flags pass after it.
fn apply_metadata(
    plan: &Plan,
    filter: &RestoreFilter,
    failed: Mutex<HashMap<usize, String>>,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let force = filter.force_owner;
    let failed = failed.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut warnings = vec![];
    let mut restored = vec![];
    for (i, f) in plan.files.iter().enumerate() {
        if let Some(why) = failed.get(&i) {
            report.failed.push((f.snap_path(&plan.table), why.clone()));
            continue;
        }
        report.files += 1;
        report.bytes += f.node.size;
        match meta::file(plan, f, force, &mut warnings) {
            Ok(()) => restored.push(i),
            Err(e) => report
                .failed
                .push((f.snap_path(&plan.table), format!("metadata: {e}"))),
        }
    }
    for s in &plan.specials {
        if let Err(e) = meta::special(&plan.table, s, force, &mut warnings) {
            warnings.push((s.snap_path(&plan.table), format!("metadata: {e}")));
        }
    }
    for l in &plan.links {
        if let Err(e) = meta::link(&plan.table, l, force, &mut warnings) {
            warnings.push((l.snap_path(&plan.table), format!("metadata: {e}")));
        }
    }
    // Deepest first, so restoring a child does not change its parent's mtime afterwards.
    let mut dirs: Vec<&PlannedDir> = plan.dirs.iter().collect();
    dirs.sort_by_key(|d| std::cmp::Reverse(d.depth));
    for d in &dirs {
        meta::dir(&plan.table, d, force, &mut warnings).map_err(|e| RestoreError::Io {
            path: plan.table.path(d.idx).display().to_string(),
            source: e,
        })?;
    }
    // File flags last of all: immutable and append-only would block what comes before.
    let flagged_files = restored
        .iter()
        .map(|&i| &plan.files[i])
        .filter(|f| f.node.flags != 0);
    let flagged_dirs = dirs.iter().filter(|d| d.node.flags != 0);
    // A cluster's copy (an owner forced) gets no flags: immutable files would stop the
    // server that is to run on it.
    if filter.file_flags && force.is_none() {
        for f in flagged_files {
            if let Err(e) = meta::file_flags(plan, f) {
                warnings.push((f.snap_path(&plan.table), format!("file flags: {e}")));
            }
        }
        for d in flagged_dirs {
            if let Err(e) = meta::dir_flags(&plan.table, d) {
                warnings.push((d.snap_path(&plan.table), format!("file flags: {e}")));
            }
        }
    } else {
        report.flags_not_set = (flagged_files.count() + flagged_dirs.count()) as u64;
    }
    if force.is_some() {
        let withheld = plan
            .files
            .iter()
            .map(|f| &f.node)
            .chain(plan.dirs.iter().map(|d| &d.node))
            .chain(plan.links.iter().map(|l| &l.node))
            .chain(plan.specials.iter().map(|s| &s.node))
            .filter(|n| {
                n.xattrs
                    .iter()
                    .any(|x| !meta::allowed_when_forced(&x.name_bytes()))
            })
            .count();
        if withheld > 0 {
            warnings.push((
                "(attributes)".into(),
                format!(
                    "{withheld} entries have security.* or trusted.* attributes (capabilities, labels) in the snapshot; a restore that gives every file to one owner leaves them off"
                ),
            ));
        }
    }
    // Not root: owners cannot be given; said once, not per file.
    if force.is_none() && !rustix::process::geteuid().is_root() {
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        let others = plan
            .files
            .iter()
            .map(|f| &f.node)
            .chain(plan.dirs.iter().map(|d| &d.node))
            .chain(plan.links.iter().map(|l| &l.node))
            .chain(plan.specials.iter().map(|s| &s.node))
            .filter(|n| (n.uid, n.gid) != me)
            .count();
        if others > 0 {
            warnings.push((
                "(owners)".into(),
                format!(
                    "{others} entries belong to other users or groups in the snapshot; only root restores owners, so they are this user's"
                ),
            ));
        }
    }
    report.warnings.extend(warnings);
    Ok(())
}

/// Why the names of a tree cannot be restored: empty, `.`/`..`, holding `/` or NUL, or
/// not strictly sorted (a duplicate name would let a crafted snapshot restore a symlink
/// and then write "through" it as a directory of the same name).
fn bad_names(nodes: &[Node]) -> Option<(String, &'static str)> {
    let mut prev: Option<Vec<u8>> = None;
    for n in nodes {
        let name = n.name_bytes();
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Some((n.name.clone(), "unsafe file name"));
        }
        if let Some(p) = &prev {
            if *p == name {
                return Some((n.name.clone(), "duplicate name"));
            }
            if *p > name {
                return Some((n.name.clone(), "names out of order"));
            }
        }
        prev = Some(name);
    }
    None
}

/// Maps a file's content, blob by blob, to its places in the file: the content fills
/// the node's data regions one after another (checked by [`Node::extents_problem`] to be
/// in order and inside the file).
struct Placer {
    regions: Vec<(u64, u64)>,
    region: usize,
    within: u64,
}

impl Placer {
    fn new(node: &Node) -> Self {
        Placer {
            regions: node.data_regions(),
            region: 0,
            within: 0,
        }
    }

    /// The next `len` content bytes: (file offset, offset in the blob, length) pieces;
    /// `None` when the content is longer than the regions (a malformed node).
    fn place(&mut self, len: u32) -> Option<Vec<(u64, u32, u32)>> {
        let mut out = vec![];
        let mut from = 0u32;
        while from < len {
            let &(start, rlen) = self.regions.get(self.region)?;
            let room = rlen - self.within;
            let n = room.min((len - from) as u64) as u32;
            if n > 0 {
                out.push((start + self.within, from, n));
            }
            from += n;
            self.within += n as u64;
            if self.within >= rlen {
                self.region += 1;
                self.within = 0;
            }
        }
        Some(out)
    }

    /// The content bytes placed so far.
    fn placed(&self) -> u64 {
        self.regions[..self.region.min(self.regions.len())]
            .iter()
            .map(|(_, l)| l)
            .sum::<u64>()
            + self.within
    }
}

/// The holes of a file with extents: what lies between and after its data regions.
fn holes(node: &Node) -> Vec<(u64, u64)> {
    let mut out = vec![];
    let mut pos = 0u64;
    for &(s, l) in &node.extents {
        if s > pos {
            out.push((pos, s - pos));
        }
        pos = pos.max(s + l);
    }
    if node.size > pos && !node.extents.is_empty() {
        out.push((pos, node.size - pos));
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn plan_tree(
    repo: &Repository,
    index: &Index,
    tree: &BlobId,
    dir: usize,
    depth: usize,
    snap: &mut String,
    filter: &RestoreFilter,
    included: bool,
    plan: &mut Plan,
    report: &mut RestoreReport,
) -> Result<(), RestoreError> {
    let t = repo.load_tree(index, tree)?;
    if let Some((name, why)) = bad_names(&t.nodes) {
        report.failed.push((
            format!("{snap}/{name}"),
            format!(
                "{why} in the snapshot's tree of {snap}/; directory refused, nothing in it restored"
            ),
        ));
        return Ok(());
    }
    // `snap` is this directory's path in the snapshot; each entry's is pushed onto it and
    // taken off again.
    let base = snap.len();
    let dir_err = |t: &DirTable, source| RestoreError::Io {
        path: t.path(dir).display().to_string(),
        source,
    };
    if filter.delta {
        let fd = plan.table.open(dir).map_err(|e| dir_err(&plan.table, e))?;
        remove_extraneous(&fd, &t.nodes).map_err(|e| dir_err(&plan.table, e))?;
    }
    for node in t.nodes {
        let name = node.name_bytes();
        let name_os = OsStr::from_bytes(&name);
        snap.truncate(base);
        snap.push('/');
        snap.push_str(&node.name);
        if filter
            .exclude
            .as_ref()
            .is_some_and(|g| g.is_match(snap.as_str()))
        {
            continue;
        }
        let inc = included
            || filter
                .include
                .as_ref()
                .is_none_or(|g| g.is_match(snap.as_str()));
        let err = |t: &DirTable, source| RestoreError::Io {
            path: t.path(dir).join(name_os).display().to_string(),
            source,
        };
        // Reopened per entry (a cache hit almost always), so no descriptor is held across
        // the recursion below.
        let dfd = plan.table.open(dir).map_err(|e| dir_err(&plan.table, e))?;
        match node.kind {
            NodeKind::Dir if depth + 1 > MAX_TREE_DEPTH => report.failed.push((
                snap.clone(),
                format!(
                    "more than {MAX_TREE_DEPTH} directory levels deep (no backup writes that); not restored"
                ),
            )),
            NodeKind::Dir => {
                let sub = node.subtree.ok_or_else(|| RepoError::CorruptOrTampered {
                    object: format!("tree {tree}"),
                    why: format!("directory {snap} has no subtree"),
                })?;
                let before = plan.files.len() + plan.links.len() + plan.specials.len();
                let (fd, _) = dirfd::ensure_dir(&*dfd, name_os, 0o700, filter.delta)
                    .map_err(|e| err(&plan.table, e))?;
                drop(dfd);
                let idx = plan
                    .table
                    .add(dir, &name, fd)
                    .map_err(|e| err(&plan.table, e))?;
                plan_tree(
                    repo,
                    index,
                    &sub,
                    idx,
                    depth + 1,
                    snap,
                    filter,
                    inc,
                    plan,
                    report,
                )?;
                let has_content =
                    plan.files.len() + plan.links.len() + plan.specials.len() > before;
                if inc || has_content {
                    report.dirs += 1;
                    plan.dirs.push(PlannedDir {
                        idx,
                        depth: depth + 1,
                        node,
                    });
                } else if let Ok(dfd) = plan.table.open(dir) {
                    // Nothing under it was selected: remove the (empty) directory again.
                    let _ = rustix::fs::unlinkat(&*dfd, name_os, rustix::fs::AtFlags::REMOVEDIR);
                }
            }
            _ if !inc => {}
            NodeKind::Symlink => {
                let target = node.link_target_bytes().unwrap_or_default();
                if filter.delta {
                    dirfd::remove_entry(&*dfd, name_os).map_err(|e| err(&plan.table, e))?;
                }
                dirfd::symlink_at(&target, &*dfd, name_os).map_err(|e| err(&plan.table, e))?;
                report.symlinks += 1;
                if report.links.len() < LINKS_LISTED {
                    report.links.push(plan.table.path(dir).join(name_os));
                }
                plan.links.push(PlannedLink { dir, name, node });
            }
            NodeKind::CharDevice | NodeKind::BlockDevice if filter.force_owner.is_some() => {
                // A device node given to the cluster's owner would hand that user the raw
                // device: a cluster restore makes none.
                report.failed.push((
                    snap.clone(),
                    format!(
                        "a {} in a restore that gives every file to one owner; refused",
                        node.kind.word()
                    ),
                ))
            }
            NodeKind::Fifo | NodeKind::CharDevice | NodeKind::BlockDevice
                if linked_again(plan, &dfd, name_os, &node, filter.delta) =>
            {
                report.specials += 1;
            }
            NodeKind::Fifo | NodeKind::CharDevice | NodeKind::BlockDevice => {
                if filter.delta {
                    dirfd::remove_entry(&*dfd, name_os).map_err(|e| err(&plan.table, e))?;
                }
                let made = match (node.kind, node.rdev) {
                    (NodeKind::Fifo, _) => dirfd::mkfifo_at(&*dfd, name_os),
                    (kind, Some((major, minor))) => dirfd::mknod_at(
                        &*dfd,
                        name_os,
                        kind == NodeKind::BlockDevice,
                        crate::fsattr::join_rdev(major, minor),
                    ),
                    (_, None) => Err(io::Error::other("a device without its number")),
                };
                let made = made.and_then(|()| {
                    dirfd::lstat_at(&*dfd, name_os)?.ok_or_else(|| io::Error::other("vanished"))
                });
                match made {
                    Ok(st) => {
                        if node.links > 1 && node.inode != 0 {
                            plan.hardlinks
                                .insert((node.device, node.inode), (dir, name.clone()));
                        }
                        report.specials += 1;
                        plan.specials.push(PlannedSpecial {
                            dir,
                            name,
                            node,
                            ino: st.st_ino,
                        });
                    }
                    // Devices need root: listed, the rest goes on.
                    Err(e) => report.warnings.push((
                        snap.clone(),
                        format!("{} not created: {e}", node.kind.word()),
                    )),
                }
            }
            NodeKind::Unknown => report.failed.push((
                snap.clone(),
                "an entry of a kind this backupd does not know (written by a newer version)".into(),
            )),
            NodeKind::File if node.extents_problem().is_some() => {
                let why = node.extents_problem().unwrap_or_default();
                report
                    .failed
                    .push((snap.clone(), format!("{why}; not restored")));
            }
            NodeKind::File if linked_again(plan, &dfd, name_os, &node, filter.delta) => {
                report.files += 1;
            }
            NodeKind::File => {
                if node.links > 1 && node.inode != 0 {
                    plan.hardlinks
                        .insert((node.device, node.inode), (dir, name.clone()));
                }
                plan_file(
                    repo,
                    index,
                    plan,
                    report,
                    &dfd,
                    dir,
                    name.clone(),
                    node,
                    filter,
                )
                .map_err(|e| err(&plan.table, e))?;
            }
        }
    }
    snap.truncate(base);
    Ok(())
}

/// Whether `node` is a further name of a file or special already restored in this run,
/// and was made a hard link to it here.
fn linked_again(
    plan: &Plan,
    dfd: &impl std::os::fd::AsFd,
    name: &OsStr,
    node: &Node,
    delta: bool,
) -> bool {
    if node.links <= 1 || node.inode == 0 {
        return false;
    }
    let Some((first_dir, first_name)) = plan.hardlinks.get(&(node.device, node.inode)) else {
        return false;
    };
    plan.table
        .open(*first_dir)
        .and_then(|src| {
            if delta {
                dirfd::remove_entry(dfd, name)?;
            }
            dirfd::hard_link_at(&*src, OsStr::from_bytes(first_name), dfd, name)
        })
        .is_ok()
}

/// Makes (or, in `--delta`, keeps) one regular file at its size, and plans where each of
/// its blobs goes.
#[allow(clippy::too_many_arguments)]
fn plan_file(
    repo: &Repository,
    index: &Index,
    plan: &mut Plan,
    report: &mut RestoreReport,
    dfd: &std::os::fd::OwnedFd,
    dir: usize,
    name: Vec<u8>,
    node: Node,
    filter: &RestoreFilter,
) -> io::Result<()> {
    let name_os = OsStr::from_bytes(&name);
    // In a delta restore, an existing regular file is kept and compared.
    let existing = if filter.delta {
        match dirfd::lstat_at(dfd, name_os)? {
            // A file with other names may be a hard link to a file outside the target,
            // planted in an older copy: made anew instead.
            Some(st) if dirfd::file_type(&st) == FileType::RegularFile && st.st_nlink == 1 => true,
            Some(_) => {
                dirfd::remove_entry(dfd, name_os)?;
                false
            }
            None => false,
        }
    } else {
        false
    };
    let (f, st) = if existing {
        let (f, st) = dirfd::open_file_write(dfd, name_os, true)?;
        if st.st_nlink != 1 {
            return Err(io::Error::other("gained a hard link during the restore"));
        }
        (f, st)
    } else {
        let f = dirfd::create_file(dfd, name_os, 0o600)?;
        let st = dirfd::fstat(&f)?;
        (f, st)
    };
    let old_len = if existing { st.st_size as u64 } else { 0 };
    f.set_len(node.size)?;
    if existing {
        // The snapshot's holes, where the older copy may hold data.
        for (off, len) in holes(&node) {
            zero_range(&f, off, len)?;
        }
    }
    let file_idx = plan.files.len();
    let mut placer = Placer::new(&node);
    let mut scratch = vec![];
    match repo.file_content(index, &node) {
        Ok(ids) => {
            let missing_before = plan.missing.len();
            for id in ids {
                let Some(loc) = index.get(&id) else {
                    plan.missing
                        .push((file_idx, format!("blob {id} is not in the index")));
                    break;
                };
                let Some(pieces) = placer.place(loc.raw_length) else {
                    plan.missing.push((
                        file_idx,
                        format!(
                            "its content is longer than its recorded {} bytes",
                            node.data_size()
                        ),
                    ));
                    break;
                };
                if let [(offset, 0, len)] = pieces[..] {
                    if existing
                        && len == loc.raw_length
                        && offset + len as u64 <= old_len
                        && same_bytes_on_disk(repo, &f, offset, len, &id, &mut scratch)
                    {
                        report.bytes_unchanged += len as u64;
                        continue;
                    }
                }
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
                for (offset, from, len) in pieces {
                    e.targets.push(BlobTarget {
                        file: file_idx,
                        offset,
                        from,
                        len,
                    });
                }
            }
            if plan.missing.len() == missing_before && placer.placed() != node.data_size() {
                plan.missing.push((
                    file_idx,
                    format!(
                        "its content is {} bytes, shorter than its recorded {}",
                        placer.placed(),
                        node.data_size()
                    ),
                ));
            }
        }
        Err(e) => plan.missing.push((file_idx, e.to_string())),
    }
    plan.files.push(PlannedFile {
        dir,
        name,
        node,
        ino: st.st_ino,
        existing,
    });
    Ok(())
}

/// Makes `[off, off + len)` of a file zeros: a hole where the file system can punch one,
/// else written zeros.
fn zero_range(f: &fs::File, off: u64, len: u64) -> io::Result<()> {
    if crate::fsattr::punch_hole(f, off, len).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off + done)?;
        done += n as u64;
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

/// Delta restore: removes entries of the directory the snapshot's directory does not
/// hold, and entries whose kind differs from the snapshot's (they are recreated). Nothing
/// is followed: a symlink is removed itself.
fn remove_extraneous(dir: &std::os::fd::OwnedFd, nodes: &[Node]) -> io::Result<()> {
    let wanted: HashMap<Vec<u8>, &Node> = nodes.iter().map(|n| (n.name_bytes(), n)).collect();
    for (name, _) in dirfd::list(dir)? {
        let name_os = OsStr::from_bytes(&name);
        let Some(st) = dirfd::lstat_at(dir, name_os)? else {
            continue;
        };
        let ft = dirfd::file_type(&st);
        let keep = wanted.get(&name).is_some_and(|n| match n.kind {
            NodeKind::Dir => ft == FileType::Directory,
            NodeKind::File => ft == FileType::RegularFile,
            NodeKind::Symlink => ft == FileType::Symlink,
            // Made anew.
            _ => false,
        });
        if !keep {
            dirfd::remove_entry(dir, name_os)?;
        }
    }
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

/// Writes a file node's bytes to `out`, in order: its content, with zeros for the holes
/// of a sparse file.
///
/// # Errors
/// Damaged data (named), or write errors.
pub fn dump_file(
    repo: &Repository,
    index: &Index,
    node: &Node,
    out: &mut dyn Write,
) -> Result<(), RestoreError> {
    let io_err = |e| RestoreError::Io {
        path: "stdout".into(),
        source: e,
    };
    let malformed = |why: String| {
        RestoreError::Repo(RepoError::CorruptOrTampered {
            object: format!("file {}", node.name),
            why,
        })
    };
    if let Some(why) = node.extents_problem() {
        return Err(malformed(why));
    }
    let zeros = vec![0u8; 1 << 20];
    let zero_fill = |out: &mut dyn Write, mut n: u64| -> io::Result<()> {
        while n > 0 {
            let k = n.min(zeros.len() as u64) as usize;
            out.write_all(&zeros[..k])?;
            n -= k as u64;
        }
        Ok(())
    };
    let mut placer = Placer::new(node);
    let mut pos = 0u64;
    for id in repo.file_content(index, node)? {
        let data = repo.read_blob(index, &id)?;
        let pieces = u32::try_from(data.len())
            .ok()
            .and_then(|len| placer.place(len))
            .ok_or_else(|| malformed("content longer than its data extents".into()))?;
        for (offset, from, len) in pieces {
            zero_fill(out, offset - pos).map_err(io_err)?;
            out.write_all(&data[from as usize..(from + len) as usize])
                .map_err(io_err)?;
            pos = offset + len as u64;
        }
    }
    if placer.placed() != node.data_size() {
        return Err(malformed(format!(
            "content of {} bytes, shorter than its recorded {}",
            placer.placed(),
            node.data_size()
        )));
    }
    zero_fill(out, node.size - pos).map_err(io_err)?;
    out.flush().map_err(io_err)
}

#[cfg(test)]
mod tests {
    //! Crafted snapshots (which no backup writes, but anyone holding the key can) and
    //! planted links in a `--delta` target: nothing may land outside the target.
    use super::*;
    use crate::backend::LocalBackend;
    use crate::pipeline::stages::{BlobSaver, SaverOptions};
    use crate::repo::Tree;
    use std::sync::Arc;

    fn node(name: &str, kind: NodeKind) -> Node {
        Node {
            name: name.into(),
            raw_name: None,
            kind,
            mode: if kind == NodeKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            user: String::new(),
            group: String::new(),
            mtime_ns: 1_700_000_000_000_000_000,
            ctime_ns: 0,
            inode: 0,
            device: 0,
            links: 1,
            size: 0,
            content: vec![],
            content_lists: vec![],
            subtree: None,
            link_target: None,
            raw_link_target: None,
            ..Node::default()
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        repo: Repository,
        saver: Option<(BlobSaver, crate::pipeline::stages::SaverThreads)>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let backend = Arc::new(LocalBackend::new(dir.path().join("repo")));
            let repo = Repository::init_local(backend, b"pw", "h", "u", 3).unwrap();
            let saver = BlobSaver::start(
                repo.keys().clone(),
                Arc::new(Index::default()),
                repo.backend().clone(),
                SaverOptions::default(),
            );
            Fixture {
                _dir: dir,
                repo,
                saver: Some(saver),
            }
        }

        fn save(&self, kind: BlobKind, data: Vec<u8>) -> BlobId {
            self.saver.as_ref().unwrap().0.save(kind, data).unwrap().0
        }

        fn file(&self, name: &str, data: &[u8]) -> Node {
            let mut n = node(name, NodeKind::File);
            n.size = data.len() as u64;
            n.content = vec![self.save(BlobKind::Data, data.to_vec())];
            n
        }

        fn tree(&self, nodes: Vec<Node>) -> BlobId {
            // Not sorted on purpose: the caller decides the order.
            self.save(BlobKind::Tree, Tree { nodes }.to_bytes())
        }

        fn dir(&self, name: &str, nodes: Vec<Node>) -> Node {
            let mut n = node(name, NodeKind::Dir);
            n.subtree = Some(self.tree(nodes));
            n
        }

        fn finish(&mut self) -> Index {
            let (saver, threads) = self.saver.take().unwrap();
            let saved = saver.finish(threads);
            assert!(saved.error.is_none());
            self.repo.save_index(&saved.packs).unwrap();
            self.repo.load_index().unwrap()
        }
    }

    fn link(name: &str, target: &Path) -> Node {
        let mut n = node(name, NodeKind::Symlink);
        n.link_target = Some(target.display().to_string());
        n
    }

    fn run(f: &Fixture, index: &Index, tree: &BlobId, target: &Path, delta: bool) -> RestoreReport {
        let filter = RestoreFilter {
            delta,
            ..RestoreFilter::default()
        };
        restore(&f.repo, index, tree, target, &filter, 2, &AtomicU64::new(0)).unwrap()
    }

    #[test]
    fn a_symlink_and_a_directory_of_the_same_name_are_refused_by_name() {
        let mut f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        // `a` -> outside, then a directory `a` holding `evil`: restoring the second through
        // the first would write outside/evil.
        let evil = f.file("evil", b"written through a link");
        let a_dir = f.dir("a", vec![evil]);
        let root = f.tree(vec![link("a", outside.path()), a_dir]);
        let index = f.finish();
        let target = tempfile::tempdir().unwrap();
        let report = run(&f, &index, &root, &target.path().join("t"), false);
        assert!(!outside.path().join("evil").exists());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(
            report
                .failed
                .iter()
                .any(|(p, why)| p == "/a" && why.contains("duplicate name")),
            "{:?}",
            report.failed
        );
    }

    #[test]
    fn a_cluster_restore_gives_everything_to_its_owner_without_set_id_bits() {
        use std::os::unix::fs::MetadataExt;
        let mut f = Fixture::new();
        // A forged base backup: a set-uid root program inside the data directory.
        let mut x = f.file("x", b"#!/bin/sh\n");
        x.mode = 0o4755;
        x.uid = 0;
        let mut d = f.dir("base", vec![x]);
        d.mode = 0o2755;
        let root = f.tree(vec![d]);
        let index = f.finish();
        let target = tempfile::tempdir().unwrap();
        let t = target.path().join("t");
        let owner = (4242, 4343);
        let filter = RestoreFilter {
            force_owner: Some(owner),
            ..RestoreFilter::default()
        };
        let report = restore(&f.repo, &index, &root, &t, &filter, 2, &AtomicU64::new(0)).unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        for (p, mode) in [(t.join("base/x"), 0o755), (t.join("base"), 0o755)] {
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(m.mode() & 0o7777, mode, "{}", p.display());
            if rustix::process::geteuid().is_root() {
                assert_eq!((m.uid(), m.gid()), owner, "{}", p.display());
            }
        }
    }

    #[test]
    fn a_cluster_restore_makes_no_device_and_no_security_attribute_or_flag() {
        let mut f = Fixture::new();
        // A forged base backup: a device the cluster's owner would then own, a capability
        // and a flag on a file, a FIFO with two names.
        let mut dev = node("disk", NodeKind::BlockDevice);
        dev.rdev = Some((8, 0));
        let mut x = f.file("x", b"data");
        x.xattrs = vec![
            crate::repo::tree::Xattr::new(b"security.capability", &[1, 0, 0, 2, 0, 4, 0, 0]),
            crate::repo::tree::Xattr::new(b"user.note", b"kept"),
        ];
        x.flags = crate::fsattr::nodump_flag();
        let mut fifos = vec![];
        for name in ["p1", "p2"] {
            let mut p = node(name, NodeKind::Fifo);
            (p.device, p.inode, p.links) = (1, 77, 2);
            fifos.push(p);
        }
        let mut nodes = vec![dev];
        nodes.extend(fifos);
        nodes.push(x);
        let root = f.tree(nodes);
        let index = f.finish();
        let target = tempfile::tempdir().unwrap();
        let t = target.path().join("t");
        let filter = RestoreFilter {
            force_owner: Some((4242, 4343)),
            file_flags: true,
            ..RestoreFilter::default()
        };
        let report = restore(&f.repo, &index, &root, &t, &filter, 2, &AtomicU64::new(0)).unwrap();
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert_eq!(report.failed[0].0, "/disk");
        assert!(
            report.failed[0].1.contains("refused"),
            "{:?}",
            report.failed
        );
        assert!(std::fs::symlink_metadata(t.join("disk")).is_err());
        let fd = std::fs::File::open(t.join("x")).unwrap();
        use std::os::fd::AsFd;
        let names = crate::fsattr::XattrOn::Fd(fd.as_fd()).names().unwrap();
        assert_eq!(names, [b"user.note".to_vec()]);
        assert!(
            report
                .warnings
                .iter()
                .any(|(p, w)| p == "(attributes)" && w.starts_with("1 entries have security")),
            "{:?}",
            report.warnings
        );
        let fd = std::fs::File::open(t.join("x")).unwrap();
        assert_eq!(
            crate::fsattr::read_flags(&fd) & crate::fsattr::nodump_flag(),
            0
        );
        assert_eq!(report.flags_not_set, 1);
        // Both names of the FIFO are one inode again.
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (
            std::fs::symlink_metadata(t.join("p1")).unwrap(),
            std::fs::symlink_metadata(t.join("p2")).unwrap(),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        assert_eq!(report.specials, 2);
    }

    #[test]
    fn extents_that_do_not_fit_are_refused_and_dump_writes_holes_as_zeros() {
        let mut f = Fixture::new();
        let mut sparse = f.file("sparse", b"hello");
        (sparse.size, sparse.extents) = (10_000, vec![(4096, 5)]);
        let mut overlap = f.file("overlap", b"0123456789");
        (overlap.size, overlap.extents) = (100, vec![(0, 6), (4, 4)]);
        let mut past = f.file("past", b"hello");
        (past.size, past.extents) = (6, vec![(3, 5)]);
        let mut long = f.file("long", b"hello");
        (long.size, long.extents) = (100, vec![(0, 3)]);
        let mut short = f.file("short", b"hello");
        (short.size, short.extents) = (100, vec![(0, 9)]);
        let mut holes = node("holes", NodeKind::File);
        (holes.size, holes.extents) = (1 << 40, vec![(1 << 40, 0)]);
        let nodes = vec![holes, long, overlap, past, short, sparse];
        let root = f.tree(nodes.clone());
        let index = f.finish();
        let target = tempfile::tempdir().unwrap();
        let t = target.path().join("t");
        let report = run(&f, &index, &root, &t, false);
        let failed: Vec<&str> = report.failed.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            failed,
            ["/long", "/overlap", "/past", "/short"],
            "{:?}",
            report.failed
        );
        let mut want = vec![0u8; 10_000];
        want[4096..4101].copy_from_slice(b"hello");
        assert_eq!(std::fs::read(t.join("sparse")).unwrap(), want);
        let all_holes = std::fs::File::open(t.join("holes")).unwrap();
        use std::os::unix::fs::MetadataExt;
        let m = all_holes.metadata().unwrap();
        assert_eq!((m.len(), m.blocks()), (1 << 40, 0));
        let dump = |n: &Node| {
            let mut out = vec![];
            dump_file(&f.repo, &index, n, &mut out).map(|()| out)
        };
        assert_eq!(dump(&nodes[5]).unwrap(), want);
        for n in &nodes[1..5] {
            let e = dump(n).unwrap_err().to_string();
            assert!(e.contains(&format!("file {}", n.name)), "{e}");
        }
    }

    #[test]
    fn unsorted_names_are_refused() {
        let mut f = Fixture::new();
        let b = f.file("b", b"1");
        let a = f.file("a", b"2");
        let root = f.tree(vec![b, a]);
        let index = f.finish();
        let target = tempfile::tempdir().unwrap();
        let t = target.path().join("t");
        let report = run(&f, &index, &root, &t, false);
        assert!(
            report
                .failed
                .iter()
                .any(|(_, why)| why.contains("out of order")),
            "{:?}",
            report.failed
        );
        assert!(!t.join("a").exists() && !t.join("b").exists());
    }

    #[test]
    fn delta_restore_replaces_planted_links_instead_of_following_them() {
        let mut f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(outside.path().join("conf"), b"precious").unwrap();
        std::fs::set_permissions(
            outside.path().join("conf"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let conf = f.file("conf", b"restored content");
        let inner = f.file("inner", b"inner content");
        let etc = f.dir("etc", vec![inner]);
        let mut root_nodes = vec![conf, etc];
        root_nodes.sort_by_key(|n| n.name_bytes());
        let root = f.tree(root_nodes);
        let index = f.finish();
        let target = tempfile::tempdir().unwrap();
        let t = target.path().join("t");
        std::fs::create_dir(&t).unwrap();
        // An older copy where someone replaced the file and the directory by links.
        std::os::unix::fs::symlink(outside.path().join("conf"), t.join("conf")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.join("etc")).unwrap();
        let report = run(&f, &index, &root, &t, true);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(
            std::fs::read(outside.path().join("conf")).unwrap(),
            b"precious"
        );
        assert!(!outside.path().join("inner").exists());
        assert_eq!(std::fs::read(t.join("conf")).unwrap(), b"restored content");
        assert!(t.join("etc").symlink_metadata().unwrap().is_dir());
        assert_eq!(
            std::fs::read(t.join("etc/inner")).unwrap(),
            b"inner content"
        );
        // Nor the mode of the outside file (the restored one is 0644).
        let m = std::fs::metadata(outside.path().join("conf")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        let m = std::fs::symlink_metadata(t.join("conf")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o644);
    }

    #[test]
    fn delta_restore_removes_strays_without_following_links() {
        let mut f = Fixture::new();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let a = f.file("a", b"a");
        let root = f.tree(vec![a]);
        let index = f.finish();
        let target = tempfile::tempdir().unwrap();
        let t = target.path().join("t");
        std::fs::create_dir_all(t.join("stray/deeper")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.join("stray/deeper/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), t.join("stray-link")).unwrap();
        let report = run(&f, &index, &root, &t, true);
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert!(outside.path().join("keep").exists());
        assert!(!t.join("stray").exists() && t.join("stray-link").symlink_metadata().is_err());
        assert_eq!(std::fs::read(t.join("a")).unwrap(), b"a");
    }
}
