//! The files source: walks directory trees, reads new and changed files on a pool of
//! reader threads ([`super::reader`]), reuses the content of unchanged files from the
//! parent snapshot, and writes one tree blob per directory.
//!
//! Absolute source paths are kept: `/etc/app` is stored as `etc` -> `app` under the root
//! tree, with the real metadata of each intermediate directory.
//!
//! Below each source path the walk goes by directory descriptors ([`crate::dirfd`]): each
//! entry is `lstat`ed and opened relative to its directory with `O_NOFOLLOW`, and a file is
//! read only if the inode opened is a regular file in that directory (when it is not the
//! inode stat'ed, it was replaced in between, and what was read is recorded with the
//! metadata of what was read). A symlink swapped in for a directory or file is never
//! followed out of the tree. Neither depth nor path length is bounded by `PATH_MAX` or
//! the descriptor limit: while a subdirectory is walked its parent's descriptor is closed
//! (files of the parent still being read hold their own), and it is reopened as the
//! subdirectory's `..`, checked to be the same directory; the walk runs on a thread with a
//! large stack.
//!
//! Format 2 records more: extended attributes (ACLs, capabilities, labels), FIFOs and
//! devices, the data extents of sparse files (holes are neither read nor hashed), file
//! flags, and files that changed while they were read. A version-1 repository cannot hold
//! them: what was left out is reported.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver};
use globset::{Glob, GlobSet, GlobSetBuilder};
use rustix::fs::FileType;

use super::meta::{node_from_stat, NameCache};
use super::reader::{read_job, FileContent, FileJobMsg, ReadFailure};
use super::CancelToken;
use crate::dirfd::{self, EntryStat};
use crate::fsattr;
use crate::pipeline::chunker::Cutter;
use crate::pipeline::stages::{BlobSaver, SaveError};
use crate::pipeline::BlobId;
use crate::repo::snapshot::{
    FEATURE_FILE_FLAGS, FEATURE_SPARSE, FEATURE_SPECIAL_FILES, FEATURE_XATTRS,
};
use crate::repo::tree::Xattr;
use crate::repo::{Index, Node, NodeKind, RepoError, Repository, Tree};

/// Why a files backup stopped (unreadable files are not errors: they are listed).
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A bad exclude pattern.
    #[error("exclude pattern {pattern:?}: {why}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        why: String,
    },
    /// None of the paths could be read.
    #[error("no source path could be read: {0}")]
    NoPaths(String),
    /// Storing failed.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// Reading the repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// SIGINT/SIGTERM.
    #[error("interrupted")]
    Interrupted,
}

/// Exclude patterns. A pattern with a `/` matches absolute paths; one without matches
/// a file name anywhere (as in restic and gitignore).
#[derive(Default)]
pub struct Excludes {
    names: Option<GlobSet>,
    paths: Option<GlobSet>,
}

impl Excludes {
    /// Compiles patterns.
    ///
    /// # Errors
    /// The first invalid pattern.
    pub fn new(patterns: &[String]) -> Result<Self, FilesError> {
        let mut names = GlobSetBuilder::new();
        let mut paths = GlobSetBuilder::new();
        let (mut n, mut p) = (0, 0);
        for pat in patterns {
            let pat = pat.trim();
            if pat.is_empty() || pat.starts_with('#') {
                continue;
            }
            let glob = globset::GlobBuilder::new(pat.trim_end_matches('/'))
                .literal_separator(true)
                .build()
                .map_err(|e| FilesError::Pattern {
                    pattern: pat.into(),
                    why: e.kind().to_string(),
                })?;
            if pat.trim_end_matches('/').contains('/') {
                paths.add(glob);
                p += 1;
            } else {
                names.add(glob);
                n += 1;
            }
        }
        let build = |b: GlobSetBuilder, count| -> Result<Option<GlobSet>, FilesError> {
            if count == 0 {
                return Ok(None);
            }
            b.build().map(Some).map_err(|e| FilesError::Pattern {
                pattern: "(set)".into(),
                why: e.to_string(),
            })
        };
        Ok(Excludes {
            names: build(names, n)?,
            paths: build(paths, p)?,
        })
    }

    /// True when `abs` (with file name `name`) is excluded.
    pub fn is_excluded(&self, abs: &Path, name: &OsStr) -> bool {
        self.names.as_ref().is_some_and(|s| s.is_match(name))
            || self.paths.as_ref().is_some_and(|s| s.is_match(abs))
    }
}

/// Glob patterns matched against paths inside a snapshot (restore `--include/--exclude`).
pub fn glob_set(patterns: &[String]) -> Result<Option<GlobSet>, FilesError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(Glob::new(p).map_err(|e| FilesError::Pattern {
            pattern: p.clone(),
            why: e.kind().to_string(),
        })?);
    }
    b.build().map(Some).map_err(|e| FilesError::Pattern {
        pattern: "(set)".into(),
        why: e.to_string(),
    })
}

/// Live counters, readable while the backup runs (progress).
#[derive(Debug, Default)]
pub struct FilesStats {
    /// New files.
    pub files_new: AtomicU64,
    /// Changed files.
    pub files_changed: AtomicU64,
    /// Files reused from the parent.
    pub files_unchanged: AtomicU64,
    /// Directories.
    pub dirs: AtomicU64,
    /// Content bytes read.
    pub bytes_read: AtomicU64,
    /// Logical bytes of files in the snapshot.
    pub bytes_total: AtomicU64,
}

/// What the walk produced.
pub struct FilesOutcome {
    /// Root tree.
    pub tree: BlobId,
    /// Files that could not be read, with why.
    pub unreadable: Vec<(String, String)>,
    /// Special files skipped (sockets; FIFOs and devices in a version-1 repository).
    pub skipped_special: Vec<String>,
    /// Files that changed while they were read (backed up as read, marked in the snapshot).
    pub changed: Vec<String>,
    /// What a version-1 repository could not hold, one line per kind of attribute.
    pub not_kept: Vec<String>,
    /// Snapshot features its trees use.
    pub features: BTreeSet<&'static str>,
}

/// What to do with one directory entry (see [`WalkPolicy`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryRule {
    /// Back it up.
    Keep,
    /// Leave it out.
    Skip,
    /// Keep the directory itself (name, mode, owner) but none of its contents.
    EmptyDir,
}

/// Source-specific rules for a walk (PostgreSQL's data directory: what a base backup
/// leaves out, which files are read in fixed-size blocks).
pub trait WalkPolicy: Send + Sync {
    /// The rule for each of `names` (same order) inside `rel_dir`, a directory relative
    /// to the walk's root (`""` for the root).
    fn rules(&self, rel_dir: &Path, names: &[OsString]) -> Vec<EntryRule>;

    /// For a file (relative to the root), a fixed chunk size instead of content-defined
    /// chunks: files changed in place by pages dedup best on page-aligned blocks.
    fn fixed_chunk_size(&self, rel: &Path) -> Option<usize>;

    /// True when a file that disappears between listing and reading is simply left out
    /// (a database dropping a table during its backup), not reported as unreadable; and
    /// when a file that changes while it is read is expected to (WAL replay repairs it),
    /// not reported as changed.
    fn vanished_ok(&self) -> bool;
}

/// How the source paths become the snapshot's root tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Absolute paths under the root (`/etc/app` as `etc` -> `app`).
    Absolute,
    /// The root tree is the contents of the one source directory.
    Contents,
}

/// Why `name` cannot be an `--exclude-if-present` marker: it names an entry of the
/// directory itself, so it holds no `/` and is not empty, `.` or `..`.
pub fn marker_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name == "." || name == ".." {
        Some("a file name, not empty, . or ..")
    } else if name.contains('/') {
        Some("a file name without /")
    } else {
        None
    }
}

/// How a files backup walks, beyond excludes.
#[derive(Clone, Debug, Default)]
pub struct WalkOptions {
    /// Record format-2 attributes (the repository is version 2).
    pub format2: bool,
    /// The parent snapshot recorded attributes (format 2): an unchanged file's may be
    /// taken from it. Not so after an upgrade from format 1, when they are read again.
    pub parent_has_attributes: bool,
    /// The parent was taken by this user, so it could read the same attributes: an
    /// unchanged file's are taken from it. Otherwise (taken as another user, who may have
    /// seen fewer) they are listed again.
    pub parent_same_user: bool,
    /// Leave out files and directories marked nodump (`chattr +d`).
    pub exclude_nodump: bool,
    /// Stay on the file systems of the source paths: a directory on another one (a mount
    /// point) is kept, empty.
    pub one_file_system: bool,
    /// Keep only `CACHEDIR.TAG` of a directory holding a valid one.
    pub exclude_caches: bool,
    /// Leave out directories that hold an entry of one of these names.
    pub exclude_if_present: Vec<OsString>,
}

/// Directory trees and files as a source.
pub struct FilesSource {
    /// Absolute paths.
    pub paths: Vec<PathBuf>,
    /// Exclude globs.
    pub excludes: Vec<String>,
    /// Walk options (`format2` and `parent_has_attributes` are set from the repository
    /// and the parent).
    pub options: WalkOptions,
}

fn sorted(mut p: Vec<String>) -> Vec<String> {
    p.sort();
    p
}

impl super::Source for FilesSource {
    fn kind(&self) -> &'static str {
        "files"
    }

    fn paths(&self) -> Vec<String> {
        self.paths.iter().map(|p| p.display().to_string()).collect()
    }

    fn is_parent(&self, host: &str, s: &crate::repo::Snapshot) -> bool {
        s.host == host && s.source == "files" && sorted(s.paths.clone()) == sorted(self.paths())
    }

    fn read(
        &self,
        ctx: &super::ReadContext<'_>,
    ) -> Result<super::SourceOutput, super::SourceError> {
        let job = FilesJob {
            repo: ctx.repo,
            index: ctx.index.clone(),
            paths: self.paths.clone(),
            excludes: Excludes::new(&self.excludes)?,
            parent_tree: ctx.parent.map(|s| s.tree),
            readers: ctx.readers,
            cancel: ctx.cancel.clone(),
            stats: ctx.stats.clone(),
            // Files sources trust (size, mtime, ctime, inode) as restic does.
            parent_time_ns: None,
            layout: Layout::Absolute,
            policy: None,
            options: WalkOptions {
                format2: ctx.repo.config().is_v2(),
                parent_has_attributes: ctx.parent.is_some_and(|s| s.format >= 2),
                parent_same_user: ctx
                    .parent
                    .is_some_and(|s| s.username == crate::host::current_username()),
                ..self.options.clone()
            },
        };
        let out = backup_files(job, ctx.saver.clone())?;
        Ok(super::SourceOutput {
            tree: out.tree,
            unreadable: out.unreadable,
            skipped_special: out.skipped_special,
            changed: out.changed,
            not_kept: out.not_kept,
            features: out.features,
            ..super::SourceOutput::default()
        })
    }
}

/// The signature a `CACHEDIR.TAG` starts with (bford.info/cachedir).
const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// Inputs of a files backup.
pub struct FilesJob<'a> {
    /// The open repository.
    pub repo: &'a Repository,
    /// The loaded index (dedup and parent checks).
    pub index: Arc<Index>,
    /// Source paths, absolute.
    pub paths: Vec<PathBuf>,
    /// Exclusions.
    pub excludes: Excludes,
    /// Root tree of the parent snapshot.
    pub parent_tree: Option<BlobId>,
    /// Reader threads.
    pub readers: usize,
    /// Stop flag.
    pub cancel: CancelToken,
    /// Counters.
    pub stats: Arc<FilesStats>,
    /// When the parent snapshot was taken (ns since the epoch), to guard against racy
    /// mtimes: a file whose recorded mtime is within a second of it may have changed again
    /// in the same clock tick after it was read, with the same size, so it is read again
    /// rather than trusted. Set for PostgreSQL, whose relation files are rewritten in place
    /// at constant size all the time.
    pub parent_time_ns: Option<i64>,
    /// Root layout.
    pub layout: Layout,
    /// Source-specific rules.
    pub policy: Option<Arc<dyn WalkPolicy>>,
    /// Walk options.
    pub options: WalkOptions,
}

#[derive(Default)]
struct VDir {
    children: BTreeMap<Vec<u8>, VEntry>,
}

enum VEntry {
    Source,
    Dir(VDir),
}

fn build_virtual(paths: &[PathBuf]) -> VDir {
    let mut root = VDir::default();
    let mut sorted: Vec<&PathBuf> = paths.iter().collect();
    sorted.sort_by_key(|p| p.components().count());
    'outer: for p in sorted {
        let comps: Vec<Vec<u8>> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.as_bytes().to_vec()),
                _ => None,
            })
            .collect();
        if comps.is_empty() {
            continue;
        }
        let mut cur = &mut root;
        for (i, c) in comps.iter().enumerate() {
            let last = i + 1 == comps.len();
            if last {
                cur.children.insert(c.clone(), VEntry::Source);
                continue 'outer;
            }
            let e = cur
                .children
                .entry(c.clone())
                .or_insert_with(|| VEntry::Dir(VDir::default()));
            match e {
                VEntry::Source => continue 'outer,
                VEntry::Dir(d) => cur = d,
            }
        }
    }
    root
}

enum Pending {
    Ready(Node),
    /// A file being read: its node, its name (its path is the walk's current path and the
    /// name: paths are not kept per entry, so a deep tree costs no more than its depth).
    Waiting(Node, OsString, Receiver<Result<FileContent, ReadFailure>>),
}

struct Walker<'a> {
    repo: &'a Repository,
    index: Arc<Index>,
    saver: BlobSaver,
    jobs: crossbeam_channel::Sender<FileJobMsg>,
    names: NameCache,
    excludes: Excludes,
    cancel: CancelToken,
    stats: Arc<FilesStats>,
    unreadable: Vec<(String, String)>,
    skipped: Vec<String>,
    changed: Vec<String>,
    features: BTreeSet<&'static str>,
    /// Format-2 attributes met in a version-1 repository: kind -> count.
    lost: BTreeMap<&'static str, u64>,
    root: PathBuf,
    /// The path of the entry being walked (one buffer, pushed and popped).
    path: PathBuf,
    policy: Option<Arc<dyn WalkPolicy>>,
    racy_after_ns: Option<i64>,
    options: WalkOptions,
    /// The device of the source path being walked (`--one-file-system`).
    source_dev: Option<u64>,
    /// Directory levels below the source path of the directory being walked.
    depth: usize,
    /// Up to this depth a directory keeps its descriptor while its subdirectories are
    /// walked; deeper, it is let go and regained ([`dirfd::open_dirs`]).
    hold_depth: usize,
}

/// The stack of the walking thread: the walk recurses once per directory level, and a
/// tree may be deeper than any `PATH_MAX`; [`MAX_DEPTH`] levels fit in it.
const WALK_STACK: usize = 512 << 20;

/// The deepest directory level a backup reads: a directory below it is kept, empty, and
/// reported (a tree deeper than this is made only to break tools).
pub const MAX_DEPTH: usize = 20_000;

/// The directory being walked: its descriptor while it is held (deep in a tree it is let
/// go while a subdirectory is walked) and its identity.
struct DirSlot {
    fd: Option<Arc<OwnedFd>>,
    id: (u64, u64),
}

/// Runs the walk and returns the root tree; the caller owns the saver and commits.
///
/// # Errors
/// Interrupt, pipeline failure, bad patterns, or no readable path.
pub fn backup_files(job: FilesJob<'_>, saver: BlobSaver) -> Result<FilesOutcome, FilesError> {
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name("walk".into())
            .stack_size(WALK_STACK)
            .spawn_scoped(s, || walk(job, saver))
            .map_err(|e| FilesError::NoPaths(format!("starting the walk: {e}")))?;
        t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn walk(job: FilesJob<'_>, saver: BlobSaver) -> Result<FilesOutcome, FilesError> {
    let cutter = Cutter::new(job.repo.config().chunker, job.repo.keys().gear_table());
    let min_size = job.repo.config().chunker.min_size as u64;
    let readers = job.readers.max(1);
    let (jobs_tx, jobs_rx) = bounded::<FileJobMsg>(readers * 4);
    let mut handles = vec![];
    for i in 0..readers {
        let rx = jobs_rx.clone();
        let saver = saver.clone();
        let cutter = cutter.clone();
        let cancel = job.cancel.clone();
        let stats = job.stats.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("read-{i}"))
                .spawn(move || {
                    for m in rx {
                        let r = read_job(&m, &saver, &cutter, min_size, &cancel, &stats);
                        let _ = m.reply.send(r);
                    }
                })
                .expect("spawning a thread"),
        );
    }
    drop(jobs_rx);

    let mut missing = vec![];
    let mut present = vec![];
    for p in &job.paths {
        match std::fs::symlink_metadata(p) {
            Ok(_) => present.push(p.clone()),
            Err(e) => missing.push((p.display().to_string(), e.to_string())),
        }
    }
    let mut walker = Walker {
        repo: job.repo,
        index: job.index.clone(),
        saver,
        jobs: jobs_tx,
        names: NameCache::default(),
        excludes: job.excludes,
        cancel: job.cancel.clone(),
        stats: job.stats.clone(),
        unreadable: missing.clone(),
        skipped: vec![],
        changed: vec![],
        features: BTreeSet::new(),
        lost: BTreeMap::new(),
        root: match job.layout {
            Layout::Contents => job.paths.first().cloned().unwrap_or_default(),
            Layout::Absolute => PathBuf::from("/"),
        },
        path: PathBuf::new(),
        policy: job.policy.clone(),
        racy_after_ns: job.parent_time_ns.map(|t| t.saturating_sub(1_000_000_000)),
        options: job.options,
        source_dev: None,
        depth: 0,
        hold_depth: dirfd::open_dirs(),
    };
    let result = if present.is_empty() {
        Err(FilesError::NoPaths(
            missing
                .iter()
                .map(|(p, e)| format!("{p}: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        ))
    } else {
        let parent = job
            .parent_tree
            .and_then(|id| walker.repo.load_tree(&walker.index, &id).ok());
        match job.layout {
            Layout::Absolute => {
                let vroot = build_virtual(&present);
                walker.walk_virtual(&vroot, Path::new("/"), parent)
            }
            Layout::Contents => {
                let root = walker.root.clone();
                match dirfd::open_dir_path(&root).and_then(|fd| {
                    let st = dirfd::fstat(&fd)?;
                    Ok((fd, st))
                }) {
                    Ok((fd, st)) => {
                        walker.source_dev = Some(st.st_dev);
                        let mut slot = DirSlot {
                            fd: Some(Arc::new(fd)),
                            id: (st.st_dev, st.st_ino),
                        };
                        walker.path = root;
                        walker.walk_dir(&mut slot, parent, false)
                    }
                    Err(e) => Err(FilesError::NoPaths(format!("{}: {e}", root.display()))),
                }
            }
        }
    };
    let Walker {
        jobs,
        unreadable,
        skipped,
        changed,
        features,
        lost,
        ..
    } = walker;
    drop(jobs);
    for h in handles {
        let _ = h.join();
    }
    let tree = result?;
    let not_kept = lost
        .iter()
        .map(|(what, n)| {
            format!("{what} of {n} entr{} (the repository is format 1: `backupd upgrade` makes it format 2)", if *n == 1 { "y" } else { "ies" })
        })
        .collect();
    Ok(FilesOutcome {
        tree,
        unreadable,
        skipped_special: skipped,
        changed,
        not_kept,
        features,
    })
}

fn parent_children(parent: Option<Tree>) -> HashMap<Vec<u8>, Node> {
    parent
        .map(|t| t.nodes.into_iter().map(|n| (n.name_bytes(), n)).collect())
        .unwrap_or_default()
}

/// Xattrs as stored: sorted by name.
fn to_xattrs(x: fsattr::Xattrs) -> Vec<Xattr> {
    x.iter().map(|(n, v)| Xattr::new(n, v)).collect()
}

impl Walker<'_> {
    fn check(&self) -> Result<(), FilesError> {
        if self.cancel.is_cancelled() {
            return Err(FilesError::Interrupted);
        }
        if self.saver.failed() {
            return Err(FilesError::Save(SaveError::Stopped));
        }
        Ok(())
    }

    fn subtree_of(&self, parent: Option<&Node>) -> Option<Tree> {
        let p = parent?;
        if p.kind != NodeKind::Dir {
            return None;
        }
        self.repo.load_tree(&self.index, p.subtree.as_ref()?).ok()
    }

    /// Records what a node holds: attributes a version-1 repository cannot keep are
    /// dropped and counted, the others name the snapshot's features.
    fn settle(&mut self, node: &mut Node) {
        if self.options.format2 {
            if !node.xattrs.is_empty() {
                self.features.insert(FEATURE_XATTRS);
            }
            if !node.extents.is_empty() {
                self.features.insert(FEATURE_SPARSE);
            }
            if node.flags != 0 {
                self.features.insert(FEATURE_FILE_FLAGS);
            }
            if node.kind.is_special() {
                self.features.insert(FEATURE_SPECIAL_FILES);
            }
            return;
        }
        if !node.xattrs.is_empty() {
            *self
                .lost
                .entry("extended attributes (ACLs, capabilities)")
                .or_default() += 1;
            node.xattrs.clear();
        }
        if node.flags != 0 {
            *self.lost.entry("file flags").or_default() += 1;
            node.flags = 0;
        }
        if node.mtime.take().is_some() {
            *self
                .lost
                .entry("modification times before 1677 or after 2262 (saturated)")
                .or_default() += 1;
        }
        node.changed = false;
    }

    /// Records why the entry being walked could not be read.
    fn unreadable_here(&mut self, why: String) {
        self.unreadable.push((self.path.display().to_string(), why));
    }

    /// The xattrs and flags of an open directory (read in format 1 too: [`Self::settle`]
    /// reports what it cannot hold).
    fn dir_attributes(&mut self, fd: &OwnedFd, node: &mut Node) {
        node.flags = fsattr::read_flags(fd);
        match fsattr::read_xattrs_fd(fd) {
            Ok(x) => node.xattrs = to_xattrs(x),
            Err(e) => self.unreadable_here(format!("extended attributes: {e}")),
        }
    }

    /// The xattrs and flags of the regular file `name` in `dir`, opened without following
    /// and checked to be the file stat'ed (an unchanged file whose parent lacks them).
    fn file_attributes(&mut self, dir: &OwnedFd, name: &OsStr, node: &mut Node) {
        match dirfd::open_file_read(dir, name) {
            Ok(f) if dirfd::fstat(&f).is_ok_and(|st| st.st_ino == node.inode) => {
                node.flags = fsattr::read_flags(&f);
                match fsattr::read_xattrs_fd(&f) {
                    Ok(x) => node.xattrs = to_xattrs(x),
                    Err(e) => self.unreadable_here(format!("extended attributes: {e}")),
                }
            }
            _ => self.entry_xattrs(dir, name, node),
        }
    }

    /// The xattrs of `name` in `dir` itself (a symlink, a FIFO, a device).
    fn entry_xattrs(&mut self, dir: &OwnedFd, name: &OsStr, node: &mut Node) {
        match fsattr::read_xattrs_at(dir, name) {
            Ok(x) => node.xattrs = to_xattrs(x),
            Err(e) => self.unreadable_here(format!("extended attributes: {e}")),
        }
    }

    fn walk_virtual(
        &mut self,
        vdir: &VDir,
        path: &Path,
        parent: Option<Tree>,
    ) -> Result<BlobId, FilesError> {
        let mut parents = parent_children(parent);
        let mut pending = vec![];
        // The directory holding this level's sources, opened by the path the user gave.
        let mut slot: Option<DirSlot> = None;
        for (name, entry) in &vdir.children {
            self.check()?;
            let name_os = OsStr::from_bytes(name);
            let abs = path.join(name_os);
            let pnode = parents.remove(name);
            match entry {
                VEntry::Source => {
                    if slot.as_ref().is_none_or(|s| s.fd.is_none()) {
                        match dirfd::open_dir_path(path).and_then(|fd| {
                            let st = dirfd::fstat(&fd)?;
                            Ok((fd, st))
                        }) {
                            Ok((fd, st)) => {
                                slot = Some(DirSlot {
                                    fd: Some(Arc::new(fd)),
                                    id: (st.st_dev, st.st_ino),
                                })
                            }
                            Err(e) => {
                                self.unreadable
                                    .push((abs.display().to_string(), e.to_string()));
                                continue;
                            }
                        }
                    }
                    let s = slot.as_mut().expect("opened above");
                    // Each source path's own file system (for --one-file-system).
                    self.source_dev = dirfd::lstat_at(&**s.fd.as_ref().expect("held"), name_os)
                        .ok()
                        .flatten()
                        .map(|st| st.st_dev);
                    let outer = std::mem::replace(&mut self.path, abs);
                    let r =
                        self.entry_with(s, name_os, pnode.as_ref(), &mut pending, EntryRule::Keep);
                    self.path = outer;
                    r?;
                }
                VEntry::Dir(sub) => {
                    let st = match rustix::fs::lstat(&abs) {
                        Ok(st) => st,
                        Err(e) => {
                            self.unreadable.push((
                                abs.display().to_string(),
                                std::io::Error::from(e).to_string(),
                            ));
                            continue;
                        }
                    };
                    let ptree = self.subtree_of(pnode.as_ref());
                    let id = self.walk_virtual(sub, &abs, ptree)?;
                    let mut node = node_from_stat(name_os, NodeKind::Dir, &st, &mut self.names);
                    if let Ok(fd) = dirfd::open_dir_path(&abs) {
                        let outer = std::mem::replace(&mut self.path, abs);
                        self.dir_attributes(&fd, &mut node);
                        self.path = outer;
                    }
                    self.settle(&mut node);
                    node.subtree = Some(id);
                    self.stats.dirs.fetch_add(1, Ordering::Relaxed);
                    pending.push(Pending::Ready(node));
                }
            }
        }
        self.finish_dir(pending)
    }

    /// The directory's descriptor, reopened when it was let go: as `..` of `child` (its
    /// subdirectory, just walked), else by its path (the parent of the walk's current
    /// path), either checked to be this directory.
    fn regain(&self, slot: &mut DirSlot, child: Option<&OwnedFd>) -> std::io::Result<()> {
        if slot.fd.is_some() {
            return Ok(());
        }
        let check = |fd: OwnedFd| -> std::io::Result<OwnedFd> {
            let st = dirfd::fstat(&fd)?;
            if (st.st_dev, st.st_ino) != slot.id {
                return Err(std::io::Error::other("it was moved during the backup"));
            }
            Ok(fd)
        };
        let up = match child {
            Some(c) => rustix::fs::openat(
                c,
                "..",
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(std::io::Error::from)
            .and_then(check),
            None => Err(std::io::Error::other("its subdirectory was lost")),
        };
        let fd = match up {
            Ok(fd) => fd,
            // (a subdirectory that may be listed but not searched has no `..`)
            Err(first) => {
                let parent = self.path.parent().unwrap_or(&self.path);
                dirfd::open_dir_path(parent)
                    .and_then(check)
                    .map_err(|e| {
                        std::io::Error::other(format!(
                            "reopening it failed ({first}; by its path: {e}); the rest of it was not read"
                        ))
                    })?
            }
        };
        slot.fd = Some(Arc::new(fd));
        Ok(())
    }

    /// Walks the directory `slot` holds, whose path is the walk's current path.
    fn walk_dir(
        &mut self,
        slot: &mut DirSlot,
        parent: Option<Tree>,
        empty: bool,
    ) -> Result<BlobId, FilesError> {
        if empty {
            return self.finish_dir(vec![]);
        }
        let mut parents = parent_children(parent);
        let dir = slot.fd.clone().expect("a walked directory is held");
        let mut names: Vec<OsString> = match dirfd::list(&*dir) {
            Ok(entries) => entries
                .into_iter()
                .map(|(n, _)| OsStr::from_bytes(&n).to_os_string())
                .collect(),
            Err(e) => {
                self.unreadable_here(e.to_string());
                vec![]
            }
        };
        drop(dir);
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut rules = match &self.policy {
            Some(p) => p.rules(
                self.path.strip_prefix(&self.root).unwrap_or(&self.path),
                &names,
            ),
            None => vec![EntryRule::Keep; names.len()],
        };
        // A valid CACHEDIR.TAG: only the tag is kept.
        if self.options.exclude_caches && self.is_cache_dir(slot, &names) {
            for (n, r) in names.iter().zip(rules.iter_mut()) {
                if n.as_bytes() != b"CACHEDIR.TAG" {
                    *r = EntryRule::Skip;
                }
            }
        }
        let mut pending = vec![];
        for (name, rule) in names.into_iter().zip(rules) {
            self.check()?;
            if rule == EntryRule::Skip || slot.fd.is_none() {
                // (no descriptor: lost while a subdirectory was walked, said once)
                continue;
            }
            self.path.push(&name);
            if self.excludes.is_excluded(&self.path, &name) {
                self.path.pop();
                continue;
            }
            let pnode = parents.remove(name.as_bytes());
            let r = self.entry_with(slot, &name, pnode.as_ref(), &mut pending, rule);
            self.path.pop();
            r?;
        }
        self.finish_dir(pending)
    }

    fn is_cache_dir(&self, slot: &DirSlot, names: &[OsString]) -> bool {
        if !names.iter().any(|n| n.as_bytes() == b"CACHEDIR.TAG") {
            return false;
        }
        let Some(dir) = &slot.fd else { return false };
        dirfd::read_file(&**dir, OsStr::new("CACHEDIR.TAG"), 4096)
            .ok()
            .flatten()
            .is_some_and(|b| b.starts_with(CACHEDIR_SIGNATURE))
    }

    fn vanished_ok(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| p.vanished_ok())
    }

    /// One entry of the directory `slot` holds; the walk's current path is the entry's.
    fn entry_with(
        &mut self,
        slot: &mut DirSlot,
        name: &OsStr,
        parent: Option<&Node>,
        pending: &mut Vec<Pending>,
        rule: EntryRule,
    ) -> Result<(), FilesError> {
        let dir = slot.fd.clone().expect("held while its entries are read");
        let st = match dirfd::lstat_at(&*dir, name) {
            Ok(Some(st)) => st,
            Ok(None) if self.vanished_ok() => return Ok(()),
            Ok(None) => {
                self.unreadable_here("vanished during the backup".into());
                return Ok(());
            }
            Err(e) => {
                self.unreadable_here(e.to_string());
                return Ok(());
            }
        };
        let ft = dirfd::file_type(&st);
        if rule == EntryRule::EmptyDir && ft != FileType::Directory {
            // A directory whose contents a base backup leaves out, held as a symlink (pg_wal
            // on its own disk): stored as a real empty directory, as pg_basebackup does, so a
            // restore never recreates a link into the source's WAL directory.
            let mut node = node_from_stat(name, NodeKind::Dir, &st, &mut self.names);
            node.mode = 0o700;
            self.settle(&mut node);
            node.subtree = Some(self.finish_dir(vec![])?);
            self.stats.dirs.fetch_add(1, Ordering::Relaxed);
            pending.push(Pending::Ready(node));
            return Ok(());
        }
        match ft {
            FileType::Directory => self.directory(slot, dir, name, parent, pending, rule),
            FileType::Symlink => {
                let target = match dirfd::read_link_at(&*dir, name) {
                    Ok(t) => t,
                    Err(e) => {
                        self.unreadable_here(e.to_string());
                        return Ok(());
                    }
                };
                let mut node = node_from_stat(name, NodeKind::Symlink, &st, &mut self.names);
                let (t, raw) = super::meta::encode_name(OsStr::from_bytes(&target));
                node.link_target = Some(t);
                node.raw_link_target = raw;
                self.entry_xattrs(&dir, name, &mut node);
                self.settle(&mut node);
                pending.push(Pending::Ready(node));
                Ok(())
            }
            FileType::RegularFile => self.file(&dir, name, &st, parent, pending),
            FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice
                if self.options.format2 =>
            {
                let kind = match ft {
                    FileType::Fifo => NodeKind::Fifo,
                    FileType::CharacterDevice => NodeKind::CharDevice,
                    _ => NodeKind::BlockDevice,
                };
                let mut node = node_from_stat(name, kind, &st, &mut self.names);
                if kind != NodeKind::Fifo {
                    node.rdev = Some(fsattr::split_rdev(st.st_rdev));
                }
                self.entry_xattrs(&dir, name, &mut node);
                self.settle(&mut node);
                pending.push(Pending::Ready(node));
                Ok(())
            }
            FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => {
                *self
                    .lost
                    .entry("FIFOs and devices (not backed up)")
                    .or_default() += 1;
                self.skipped.push(format!(
                    "{} ({})",
                    self.path.display(),
                    dirfd::kind_word(ft)
                ));
                Ok(())
            }
            _ => {
                // Sockets are recreated by the program that listens on them (as tar does).
                self.skipped.push(format!(
                    "{} ({})",
                    self.path.display(),
                    dirfd::kind_word(ft)
                ));
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn directory(
        &mut self,
        slot: &mut DirSlot,
        dir: Arc<OwnedFd>,
        name: &OsStr,
        parent: Option<&Node>,
        pending: &mut Vec<Pending>,
        rule: EntryRule,
    ) -> Result<(), FilesError> {
        let mut empty = rule == EntryRule::EmptyDir;
        let opened = dirfd::open_subdir(&*dir, name).and_then(|fd| {
            // What was opened is what is recorded (it may have been replaced since the
            // lstat; opened without following, it is this directory's entry).
            let st = dirfd::fstat(&fd)?;
            Ok((fd, st))
        });
        drop(dir);
        let (sub, st) = match opened {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.vanished_ok() => {
                return Ok(())
            }
            Err(e) => {
                self.unreadable_here(e.to_string());
                return Ok(());
            }
        };
        let mut node = node_from_stat(name, NodeKind::Dir, &st, &mut self.names);
        self.dir_attributes(&sub, &mut node);
        if self.options.exclude_nodump && node.flags & fsattr::nodump_flag() != 0 {
            return Ok(());
        }
        for marker in &self.options.exclude_if_present {
            if matches!(dirfd::lstat_at(&sub, marker), Ok(Some(_))) {
                return Ok(());
            }
        }
        if self.options.one_file_system && self.source_dev.is_some_and(|d| d != st.st_dev) {
            // Another file system mounted here: the mount point is kept, empty.
            empty = true;
        }
        if self.depth >= MAX_DEPTH && !empty {
            self.unreadable_here(format!(
                "more than {MAX_DEPTH} directory levels deep: kept empty, its contents were not read"
            ));
            empty = true;
        }
        let ptree = if empty { None } else { self.subtree_of(parent) };
        let mut child = DirSlot {
            fd: Some(Arc::new(sub)),
            id: (st.st_dev, st.st_ino),
        };
        // Deep in a tree, this directory's descriptor is let go while the subdirectory is
        // walked (files of it still being read hold their own), so depth costs no more
        // descriptors than the levels held; it comes back as the subdirectory's `..`.
        if self.depth >= self.hold_depth {
            slot.fd = None;
        }
        self.depth += 1;
        let id = self.walk_dir(&mut child, ptree, empty);
        self.depth -= 1;
        if let Err(e) = self.regain(slot, child.fd.take().as_deref()) {
            let parent = self
                .path
                .parent()
                .unwrap_or(&self.path)
                .display()
                .to_string();
            self.unreadable.push((parent, e.to_string()));
        }
        let id = id?;
        self.settle(&mut node);
        node.subtree = Some(id);
        self.stats.dirs.fetch_add(1, Ordering::Relaxed);
        pending.push(Pending::Ready(node));
        Ok(())
    }

    fn file(
        &mut self,
        dir: &Arc<OwnedFd>,
        name: &OsStr,
        st: &EntryStat,
        parent: Option<&Node>,
        pending: &mut Vec<Pending>,
    ) -> Result<(), FilesError> {
        let mut node = node_from_stat(name, NodeKind::File, st, &mut self.names);
        // After an upgrade, a file that may have holes is read again once, so they are
        // recorded (the parent, format 1, could not).
        let may_gain_holes = self.options.format2
            && !self.options.parent_has_attributes
            && (st.st_blocks as u64) * 512 < st.st_size as u64;
        if let Some(p) = parent.filter(|p| !may_gain_holes && self.unchanged(p, &node)) {
            // Unchanged (size, times, inode; a new xattr or flag changes the ctime): its
            // content comes from the parent, its flags and xattrs too when the parent has
            // them and was taken by this user. A parent taken as another user may have
            // seen fewer xattrs (trusted.* needs root): then they are listed again.
            node.content = p.content.clone();
            node.content_lists = p.content_lists.clone();
            node.extents = p.extents.clone();
            if self.options.format2 && self.options.parent_has_attributes {
                node.flags = p.flags;
                if self.options.parent_same_user {
                    node.xattrs = p.xattrs.clone();
                } else {
                    self.entry_xattrs(dir, name, &mut node);
                }
            } else {
                // A format-1 parent holds neither: read now (and in a format-1 repository
                // counted as not kept, every time).
                self.file_attributes(dir, name, &mut node);
            }
            if self.options.exclude_nodump && node.flags & fsattr::nodump_flag() != 0 {
                return Ok(());
            }
            self.settle(&mut node);
            self.stats.files_unchanged.fetch_add(1, Ordering::Relaxed);
            self.stats
                .bytes_total
                .fetch_add(node.size, Ordering::Relaxed);
            pending.push(Pending::Ready(node));
            return Ok(());
        }
        if parent.is_some_and(|p| p.kind == NodeKind::File) {
            self.stats.files_changed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.files_new.fetch_add(1, Ordering::Relaxed);
        }
        let (tx, rx) = bounded(1);
        let fixed_chunk = self.policy.as_ref().and_then(|p| {
            p.fixed_chunk_size(self.path.strip_prefix(&self.root).unwrap_or(&self.path))
        });
        self.jobs
            .send(FileJobMsg {
                dir: dir.clone(),
                name: name.to_os_string(),
                expect: (st.st_dev, st.st_ino),
                fixed_chunk,
                format2: self.options.format2,
                exclude_nodump: self.options.exclude_nodump,
                reply: tx,
            })
            .map_err(|_| FilesError::Save(SaveError::Stopped))?;
        pending.push(Pending::Waiting(node, name.to_os_string(), rx));
        Ok(())
    }

    fn unchanged(&self, parent: &Node, now: &Node) -> bool {
        parent.kind == NodeKind::File
            && parent.size == now.size
            && parent.mtime_ns == now.mtime_ns
            && parent.mtime == now.mtime
            && parent.ctime_ns == now.ctime_ns
            && parent.inode == now.inode
            && self.racy_after_ns.is_none_or(|t| parent.mtime_ns < t)
            && parent
                .content
                .iter()
                .chain(parent.content_lists.iter())
                .all(|id| self.index.contains(id))
    }

    fn finish_dir(&mut self, pending: Vec<Pending>) -> Result<BlobId, FilesError> {
        let mut tree = Tree::default();
        for p in pending {
            match p {
                Pending::Ready(n) => tree.nodes.push(n),
                Pending::Waiting(mut n, name, rx) => match rx.recv() {
                    Ok(Ok(c)) => {
                        if let Some(st) = &c.replaced {
                            let name = OsStr::from_bytes(&n.name_bytes()).to_os_string();
                            n = node_from_stat(&name, NodeKind::File, st, &mut self.names);
                        }
                        n.content = c.content;
                        n.content_lists = c.lists;
                        n.size = c.file_size;
                        n.extents = c.extents;
                        n.flags = c.flags;
                        n.xattrs = to_xattrs(c.xattrs);
                        if let Some(why) = c.attr_error {
                            self.unreadable
                                .push((self.path.join(&name).display().to_string(), why));
                        }
                        if c.changed && !self.vanished_ok() {
                            n.changed = self.options.format2;
                            self.changed
                                .push(self.path.join(&name).display().to_string());
                        }
                        self.settle(&mut n);
                        self.stats.bytes_total.fetch_add(n.size, Ordering::Relaxed);
                        tree.nodes.push(n);
                    }
                    Ok(Err(ReadFailure::Unreadable(why))) => {
                        self.unreadable
                            .push((self.path.join(&name).display().to_string(), why));
                    }
                    Ok(Err(ReadFailure::Vanished)) => {
                        if !self.vanished_ok() {
                            self.unreadable.push((
                                self.path.join(&name).display().to_string(),
                                "vanished during the backup".into(),
                            ));
                        }
                    }
                    Ok(Err(ReadFailure::NoDump)) => {}
                    Ok(Err(ReadFailure::Stopped)) | Err(_) => {
                        self.check()?;
                        return Err(FilesError::Save(SaveError::Stopped));
                    }
                },
            }
        }
        tree.sort();
        let (id, _) = self
            .saver
            .save(crate::pipeline::BlobKind::Tree, tree.to_bytes())?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_match_names_and_paths() {
        let ex = Excludes::new(&["*.tmp".into(), "/data/cache".into(), "/x/**/y".into()]).unwrap();
        assert!(ex.is_excluded(Path::new("/a/b.tmp"), OsStr::new("b.tmp")));
        assert!(!ex.is_excluded(Path::new("/a/b.tmpx"), OsStr::new("b.tmpx")));
        assert!(ex.is_excluded(Path::new("/data/cache"), OsStr::new("cache")));
        assert!(!ex.is_excluded(Path::new("/other/cache"), OsStr::new("cache")));
        assert!(ex.is_excluded(Path::new("/x/1/2/y"), OsStr::new("y")));
    }

    #[test]
    fn virtual_tree_merges_paths() {
        let v = build_virtual(&[
            PathBuf::from("/a/b/c"),
            PathBuf::from("/a/b"),
            PathBuf::from("/a/d"),
        ]);
        let VEntry::Dir(a) = &v.children[&b"a".to_vec()] else {
            panic!("a is virtual")
        };
        assert!(matches!(a.children[&b"b".to_vec()], VEntry::Source));
        assert!(matches!(a.children[&b"d".to_vec()], VEntry::Source));
    }
}
