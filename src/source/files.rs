//! The files source: walks directory trees, reads new and changed files on a pool of
//! reader threads, reuses the content of unchanged files from the parent snapshot, and
//! writes one tree blob per directory.
//!
//! Absolute source paths are kept: `/etc/app` is stored as `etc` -> `app` under the root
//! tree, with the real metadata of each intermediate directory.
//!
//! Below each source path the walk goes by directory descriptors ([`crate::dirfd`]): each
//! entry is `lstat`ed and opened relative to its directory with `O_NOFOLLOW`, and a file is
//! read only if the inode opened is a regular file in that directory (when it is not the
//! inode stat'ed, it was replaced in between, and what was read is recorded with the
//! metadata of what was read). A symlink swapped in for a directory or file is never
//! followed out of the tree.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use globset::{Glob, GlobSet, GlobSetBuilder};

use rustix::fs::FileType;

use super::meta::{node_from_stat, NameCache};
use super::CancelToken;
use crate::dirfd::{self, EntryStat};
use crate::pipeline::chunker::Cutter;
use crate::pipeline::stages::{BlobSaver, SaveError};
use crate::pipeline::{BlobId, BlobKind, Chunker};
use crate::repo::tree::{encode_content_list, INLINE_CONTENT_MAX};
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
    /// Special files skipped.
    pub skipped_special: Vec<String>,
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
    /// (a database dropping a table during its backup), not reported as unreadable.
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

struct FileContent {
    content: Vec<BlobId>,
    lists: Vec<BlobId>,
    size: u64,
    /// The status of the inode read, when it is not the one the walk stat'ed (the file was
    /// replaced in between): the node takes its metadata.
    replaced: Option<EntryStat>,
}

enum ReadFailure {
    Unreadable(String),
    Vanished,
    Stopped,
}

struct FileJobMsg {
    /// The file's directory, open.
    dir: Arc<OwnedFd>,
    /// Its name there.
    name: OsString,
    /// Device and inode the walk stat'ed.
    expect: (u64, u64),
    fixed_chunk: Option<usize>,
    reply: Sender<Result<FileContent, ReadFailure>>,
}

enum Pending {
    Ready(Node),
    Waiting(Node, PathBuf, Receiver<Result<FileContent, ReadFailure>>),
}

struct Walker<'a> {
    repo: &'a Repository,
    index: Arc<Index>,
    saver: BlobSaver,
    jobs: Sender<FileJobMsg>,
    names: NameCache,
    excludes: Excludes,
    cancel: CancelToken,
    stats: Arc<FilesStats>,
    unreadable: Vec<(String, String)>,
    skipped: Vec<String>,
    root: PathBuf,
    policy: Option<Arc<dyn WalkPolicy>>,
    racy_after_ns: Option<i64>,
}

/// Runs the walk and returns the root tree; the caller owns the saver and commits.
///
/// # Errors
/// Interrupt, pipeline failure, bad patterns, or no readable path.
pub fn backup_files(job: FilesJob<'_>, saver: BlobSaver) -> Result<FilesOutcome, FilesError> {
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
                        let r = open_checked(&m).and_then(|(file, replaced)| {
                            let mut c = match m.fixed_chunk {
                                Some(n) => read_fixed(file, n, &saver, &cancel, &stats),
                                None => read_file(file, &saver, &cutter, min_size, &cancel, &stats),
                            }?;
                            c.replaced = replaced;
                            Ok(c)
                        });
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
        root: match job.layout {
            Layout::Contents => job.paths.first().cloned().unwrap_or_default(),
            Layout::Absolute => PathBuf::from("/"),
        },
        policy: job.policy.clone(),
        racy_after_ns: job.parent_time_ns.map(|t| t.saturating_sub(1_000_000_000)),
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
                match dirfd::open_dir_path(&root) {
                    Ok(fd) => walker.walk_dir(Arc::new(fd), &root, parent, false),
                    Err(e) => Err(FilesError::NoPaths(format!("{}: {e}", root.display()))),
                }
            }
        }
    };
    let Walker {
        jobs,
        unreadable,
        skipped,
        ..
    } = walker;
    drop(jobs);
    for h in handles {
        let _ = h.join();
    }
    let tree = result?;
    Ok(FilesOutcome {
        tree,
        unreadable,
        skipped_special: skipped,
    })
}

fn parent_children(parent: Option<Tree>) -> HashMap<Vec<u8>, Node> {
    parent
        .map(|t| t.nodes.into_iter().map(|n| (n.name_bytes(), n)).collect())
        .unwrap_or_default()
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

    fn walk_virtual(
        &mut self,
        vdir: &VDir,
        path: &Path,
        parent: Option<Tree>,
    ) -> Result<BlobId, FilesError> {
        let mut parents = parent_children(parent);
        let mut pending = vec![];
        // The directory holding this level's sources, opened by the path the user gave.
        let mut dir_fd: Option<Arc<OwnedFd>> = None;
        for (name, entry) in &vdir.children {
            self.check()?;
            let name_os = OsStr::from_bytes(name);
            let abs = path.join(name_os);
            let pnode = parents.remove(name);
            match entry {
                VEntry::Source => {
                    let fd = match &dir_fd {
                        Some(fd) => fd.clone(),
                        None => match dirfd::open_dir_path(path) {
                            Ok(fd) => dir_fd.insert(Arc::new(fd)).clone(),
                            Err(e) => {
                                self.unreadable
                                    .push((abs.display().to_string(), e.to_string()));
                                continue;
                            }
                        },
                    };
                    self.entry(&fd, &abs, name_os, pnode.as_ref(), &mut pending)?
                }
                VEntry::Dir(sub) => {
                    let st = match rustix::fs::lstat(&abs) {
                        Ok(st) => st,
                        Err(e) => {
                            self.unreadable
                                .push((abs.display().to_string(), io::Error::from(e).to_string()));
                            continue;
                        }
                    };
                    let ptree = self.subtree_of(pnode.as_ref());
                    let id = self.walk_virtual(sub, &abs, ptree)?;
                    let mut node = node_from_stat(name_os, NodeKind::Dir, &st, &mut self.names);
                    node.subtree = Some(id);
                    self.stats.dirs.fetch_add(1, Ordering::Relaxed);
                    pending.push(Pending::Ready(node));
                }
            }
        }
        self.finish_dir(pending)
    }

    fn walk_dir(
        &mut self,
        dir: Arc<OwnedFd>,
        path: &Path,
        parent: Option<Tree>,
        empty: bool,
    ) -> Result<BlobId, FilesError> {
        if empty {
            return self.finish_dir(vec![]);
        }
        let mut parents = parent_children(parent);
        let mut names: Vec<OsString> = match dirfd::list(&*dir) {
            Ok(entries) => entries
                .into_iter()
                .map(|(n, _)| OsStr::from_bytes(&n).to_os_string())
                .collect(),
            Err(e) => {
                self.unreadable
                    .push((path.display().to_string(), e.to_string()));
                vec![]
            }
        };
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let rules = match &self.policy {
            Some(p) => p.rules(path.strip_prefix(&self.root).unwrap_or(path), &names),
            None => vec![EntryRule::Keep; names.len()],
        };
        let mut pending = vec![];
        for (name, rule) in names.into_iter().zip(rules) {
            self.check()?;
            let abs = path.join(&name);
            if rule == EntryRule::Skip || self.excludes.is_excluded(&abs, &name) {
                continue;
            }
            let pnode = parents.remove(name.as_bytes());
            self.entry_with(&dir, &abs, &name, pnode.as_ref(), &mut pending, rule)?;
        }
        self.finish_dir(pending)
    }

    fn entry(
        &mut self,
        dir: &Arc<OwnedFd>,
        abs: &Path,
        name: &OsStr,
        parent: Option<&Node>,
        pending: &mut Vec<Pending>,
    ) -> Result<(), FilesError> {
        self.entry_with(dir, abs, name, parent, pending, EntryRule::Keep)
    }

    fn vanished_ok(&self) -> bool {
        self.policy.as_ref().is_some_and(|p| p.vanished_ok())
    }

    fn entry_with(
        &mut self,
        dir: &Arc<OwnedFd>,
        abs: &Path,
        name: &OsStr,
        parent: Option<&Node>,
        pending: &mut Vec<Pending>,
        rule: EntryRule,
    ) -> Result<(), FilesError> {
        let st = match dirfd::lstat_at(&**dir, name) {
            Ok(Some(st)) => st,
            Ok(None) if self.vanished_ok() => return Ok(()),
            Ok(None) => {
                self.unreadable.push((
                    abs.display().to_string(),
                    "vanished during the backup".into(),
                ));
                return Ok(());
            }
            Err(e) => {
                self.unreadable
                    .push((abs.display().to_string(), e.to_string()));
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
            node.subtree = Some(self.finish_dir(vec![])?);
            self.stats.dirs.fetch_add(1, Ordering::Relaxed);
            pending.push(Pending::Ready(node));
            return Ok(());
        }
        if ft == FileType::Directory {
            let empty = rule == EntryRule::EmptyDir;
            let (sub, st) = match dirfd::open_subdir(&**dir, name).and_then(|fd| {
                // What was opened is what is recorded (it may have been replaced since the
                // lstat; opened without following, it is this directory's entry).
                let st = dirfd::fstat(&fd)?;
                Ok((fd, st))
            }) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::NotFound && self.vanished_ok() => {
                    return Ok(())
                }
                Err(e) => {
                    self.unreadable
                        .push((abs.display().to_string(), e.to_string()));
                    return Ok(());
                }
            };
            let ptree = if empty { None } else { self.subtree_of(parent) };
            let id = self.walk_dir(Arc::new(sub), abs, ptree, empty)?;
            let mut node = node_from_stat(name, NodeKind::Dir, &st, &mut self.names);
            node.subtree = Some(id);
            self.stats.dirs.fetch_add(1, Ordering::Relaxed);
            pending.push(Pending::Ready(node));
        } else if ft == FileType::Symlink {
            let target = match dirfd::read_link_at(&**dir, name) {
                Ok(t) => t,
                Err(e) => {
                    self.unreadable
                        .push((abs.display().to_string(), e.to_string()));
                    return Ok(());
                }
            };
            let mut node = node_from_stat(name, NodeKind::Symlink, &st, &mut self.names);
            let (t, raw) = super::meta::encode_name(OsStr::from_bytes(&target));
            node.link_target = Some(t);
            node.raw_link_target = raw;
            pending.push(Pending::Ready(node));
        } else if ft == FileType::RegularFile {
            let mut node = node_from_stat(name, NodeKind::File, &st, &mut self.names);
            if let Some(p) = parent.filter(|p| self.unchanged(p, &node)) {
                node.content = p.content.clone();
                node.content_lists = p.content_lists.clone();
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
            let fixed_chunk = self
                .policy
                .as_ref()
                .and_then(|p| p.fixed_chunk_size(abs.strip_prefix(&self.root).unwrap_or(abs)));
            self.jobs
                .send(FileJobMsg {
                    dir: dir.clone(),
                    name: name.to_os_string(),
                    expect: (st.st_dev, st.st_ino),
                    fixed_chunk,
                    reply: tx,
                })
                .map_err(|_| FilesError::Save(SaveError::Stopped))?;
            pending.push(Pending::Waiting(node, abs.to_path_buf(), rx));
        } else {
            self.skipped
                .push(format!("{} ({})", abs.display(), dirfd::kind_word(ft)));
        }
        Ok(())
    }

    fn unchanged(&self, parent: &Node, now: &Node) -> bool {
        parent.kind == NodeKind::File
            && parent.size == now.size
            && parent.mtime_ns == now.mtime_ns
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
                Pending::Waiting(mut n, path, rx) => match rx.recv() {
                    Ok(Ok(c)) => {
                        if let Some(st) = &c.replaced {
                            let name = OsStr::from_bytes(&n.name_bytes()).to_os_string();
                            n = node_from_stat(&name, NodeKind::File, st, &mut self.names);
                        }
                        n.content = c.content;
                        n.content_lists = c.lists;
                        n.size = c.size;
                        self.stats.bytes_total.fetch_add(c.size, Ordering::Relaxed);
                        tree.nodes.push(n);
                    }
                    Ok(Err(ReadFailure::Unreadable(why))) => {
                        self.unreadable.push((path.display().to_string(), why));
                    }
                    Ok(Err(ReadFailure::Vanished)) => {
                        if !self.vanished_ok() {
                            self.unreadable.push((
                                path.display().to_string(),
                                "vanished during the backup".into(),
                            ));
                        }
                    }
                    Ok(Err(ReadFailure::Stopped)) | Err(_) => {
                        self.check()?;
                        return Err(FilesError::Save(SaveError::Stopped));
                    }
                },
            }
        }
        tree.sort();
        let (id, _) = self.saver.save(BlobKind::Tree, tree.to_bytes())?;
        Ok(id)
    }
}

/// Collects a file's chunk ids, spilling to content-list blobs past the inline limit.
struct ContentSink<'a> {
    saver: &'a BlobSaver,
    ids: Vec<BlobId>,
    lists: Vec<BlobId>,
}

impl ContentSink<'_> {
    fn push(&mut self, id: BlobId) -> Result<(), SaveError> {
        self.ids.push(id);
        if self.ids.len() >= INLINE_CONTENT_MAX {
            let (l, _) = self
                .saver
                .save(BlobKind::Tree, encode_content_list(&self.ids))?;
            self.lists.push(l);
            self.ids.clear();
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<BlobId>, Vec<BlobId>), SaveError> {
        if self.lists.is_empty() {
            return Ok((self.ids, vec![]));
        }
        if !self.ids.is_empty() {
            let (l, _) = self
                .saver
                .save(BlobKind::Tree, encode_content_list(&self.ids))?;
            self.lists.push(l);
        }
        Ok((vec![], self.lists))
    }
}

/// Chunks a stream into the saver; returns (inline ids, content lists, bytes).
///
/// # Errors
/// `Err(None)` when stopped (cancel or pipeline failure), `Err(Some(e))` on a read error.
pub fn save_stream<R: Read>(
    reader: R,
    saver: &BlobSaver,
    cutter: &Cutter,
    cancel: &CancelToken,
    read_counter: &AtomicU64,
) -> Result<(Vec<BlobId>, Vec<BlobId>, u64), Option<io::Error>> {
    let mut chunker = Chunker::new(reader, cutter.clone());
    let mut sink = ContentSink {
        saver,
        ids: vec![],
        lists: vec![],
    };
    let mut last = 0;
    while let Some(chunk) = chunker.next_chunk().map_err(Some)? {
        if cancel.is_cancelled() {
            return Err(None);
        }
        let read = chunker.bytes_read();
        read_counter.fetch_add(read - last, Ordering::Relaxed);
        last = read;
        let (id, _) = saver.save(BlobKind::Data, chunk).map_err(|_| None)?;
        sink.push(id).map_err(|_| None)?;
    }
    read_counter.fetch_add(chunker.bytes_read() - last, Ordering::Relaxed);
    let total = chunker.bytes_read();
    let (ids, lists) = sink.finish().map_err(|_| None)?;
    Ok((ids, lists, total))
}

/// Opens a file the walk found: relative to its directory, without following a symlink,
/// without blocking on a FIFO swapped in, and without touching its access time where the
/// kernel lets us (`O_NOATIME` is for the owner and root). It must be a regular file; when
/// it is not the inode the walk stat'ed, its own status comes back with it.
fn open_checked(m: &FileJobMsg) -> Result<(File, Option<EntryStat>), ReadFailure> {
    use rustix::fs::{Mode, OFlags};
    let base = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(&*m.dir, &m.name, base | OFlags::NOATIME, Mode::empty())
        .or_else(|e| match e {
            rustix::io::Errno::PERM => rustix::fs::openat(&*m.dir, &m.name, base, Mode::empty()),
            e => Err(e),
        })
        .map_err(|e| match e {
            rustix::io::Errno::NOENT => ReadFailure::Vanished,
            rustix::io::Errno::LOOP => {
                ReadFailure::Unreadable("replaced by a symlink during the backup".into())
            }
            e => ReadFailure::Unreadable(io::Error::from(e).to_string()),
        })?;
    let st = dirfd::fstat(&fd).map_err(|e| ReadFailure::Unreadable(e.to_string()))?;
    if dirfd::file_type(&st) != FileType::RegularFile {
        return Err(ReadFailure::Unreadable(format!(
            "replaced by a {} during the backup",
            dirfd::kind_word(dirfd::file_type(&st))
        )));
    }
    let replaced = ((st.st_dev, st.st_ino) != m.expect).then_some(st);
    Ok((File::from(fd), replaced))
}

/// Reads a file in blocks of `block` bytes (the last one shorter), one blob each.
fn read_fixed(
    mut file: File,
    block: usize,
    saver: &BlobSaver,
    cancel: &CancelToken,
    stats: &FilesStats,
) -> Result<FileContent, ReadFailure> {
    let mut sink = ContentSink {
        saver,
        ids: vec![],
        lists: vec![],
    };
    let mut size = 0u64;
    loop {
        if cancel.is_cancelled() {
            return Err(ReadFailure::Stopped);
        }
        let mut buf = Vec::with_capacity(block);
        let n = (&mut file)
            .take(block as u64)
            .read_to_end(&mut buf)
            .map_err(|e| ReadFailure::Unreadable(e.to_string()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        stats.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
        let (id, _) = saver
            .save(BlobKind::Data, buf)
            .map_err(|_| ReadFailure::Stopped)?;
        sink.push(id).map_err(|_| ReadFailure::Stopped)?;
        if n < block {
            break;
        }
    }
    let (content, lists) = sink.finish().map_err(|_| ReadFailure::Stopped)?;
    Ok(FileContent {
        content,
        lists,
        size,
        replaced: None,
    })
}

fn read_file(
    file: File,
    saver: &BlobSaver,
    cutter: &Cutter,
    min_size: u64,
    cancel: &CancelToken,
    stats: &FilesStats,
) -> Result<FileContent, ReadFailure> {
    let unreadable = |e: io::Error| ReadFailure::Unreadable(e.to_string());
    let md = file.metadata().map_err(unreadable)?;
    if !md.is_file() {
        return Err(ReadFailure::Unreadable("no longer a regular file".into()));
    }
    // Small files are read whole with one exact allocation; they are one or two chunks.
    if md.len() <= min_size * 2 {
        let mut data = Vec::with_capacity(md.len() as usize + 1);
        (&file)
            .take(md.len() + 1)
            .read_to_end(&mut data)
            .map_err(unreadable)?;
        if data.len() as u64 <= md.len() {
            stats
                .bytes_read
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let size = data.len() as u64;
            let save = |chunk: Vec<u8>| {
                saver
                    .save(BlobKind::Data, chunk)
                    .map(|(id, _)| id)
                    .map_err(|_| ReadFailure::Stopped)
            };
            let mut ids = vec![];
            let first = cutter.cut(&data);
            if first == data.len() {
                // One chunk (the common case): hand over the buffer, no copy.
                if !data.is_empty() {
                    ids.push(save(data)?);
                }
            } else {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let n = cutter.cut(rest);
                    ids.push(save(rest[..n].to_vec())?);
                    rest = &rest[n..];
                }
            }
            return Ok(FileContent {
                content: ids,
                lists: vec![],
                size,
                replaced: None,
            });
        }
        // The file grew while we read it: continue as a stream.
        let reader = io::Cursor::new(data).chain(&file);
        return stream_file(reader, saver, cutter, cancel, stats);
    }
    stream_file(&file, saver, cutter, cancel, stats)
}

fn stream_file<R: Read>(
    reader: R,
    saver: &BlobSaver,
    cutter: &Cutter,
    cancel: &CancelToken,
    stats: &FilesStats,
) -> Result<FileContent, ReadFailure> {
    match save_stream(reader, saver, cutter, cancel, &stats.bytes_read) {
        Ok((content, lists, size)) => Ok(FileContent {
            content,
            lists,
            size,
            replaced: None,
        }),
        Err(Some(e)) => Err(ReadFailure::Unreadable(e.to_string())),
        Err(None) => Err(ReadFailure::Stopped),
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

    fn job(dir: &Path, name: &str, expect: (u64, u64)) -> FileJobMsg {
        let (tx, _) = bounded(1);
        FileJobMsg {
            dir: Arc::new(dirfd::open_dir_path(dir).unwrap()),
            name: name.into(),
            expect,
            fixed_chunk: None,
            reply: tx,
        }
    }

    fn dev_ino(p: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn files_are_read_only_as_the_regular_file_of_their_directory() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"not in this tree").unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, b"mine").unwrap();
        let stat_ed = dev_ino(&f);
        // Swapped for a symlink between the walk's lstat and the read: refused. (The
        // original is kept under another name, so its inode number is not reused.)
        std::fs::rename(&f, t.path().join("orig")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), &f).unwrap();
        match open_checked(&job(t.path(), "f", stat_ed)) {
            Err(ReadFailure::Unreadable(why)) => assert!(why.contains("symlink"), "{why}"),
            _ => panic!("a symlink was opened"),
        }
        // A FIFO in its place: refused at once, not waited on.
        std::fs::remove_file(&f).unwrap();
        let st = std::process::Command::new("mkfifo")
            .arg(&f)
            .status()
            .unwrap();
        assert!(st.success());
        match open_checked(&job(t.path(), "f", stat_ed)) {
            Err(ReadFailure::Unreadable(why)) => assert!(why.contains("fifo"), "{why}"),
            _ => panic!("a fifo was opened"),
        }
        // Replaced by another regular file (an editor's rename): read, with its own status.
        std::fs::remove_file(&f).unwrap();
        std::fs::write(&f, b"new").unwrap();
        let now = dev_ino(&f);
        assert_ne!(now, stat_ed);
        match open_checked(&job(t.path(), "f", stat_ed)) {
            Ok((_, Some(st))) => assert_eq!((st.st_dev, st.st_ino), now),
            _ => panic!("a replaced file must come back with its own status"),
        }
        match open_checked(&job(t.path(), "f", now)) {
            Ok((_, None)) => {}
            _ => panic!("the stat'ed file is read as is"),
        }
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
