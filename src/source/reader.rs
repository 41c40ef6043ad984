//! The files source's readers: each file the walk found is opened relative to its
//! directory (never through a symlink, never blocking on a FIFO swapped in), checked to be
//! a regular file, and chunked into the pipeline — only its data extents when it has holes,
//! in fixed blocks for database relation files. Its extended attributes and flags are read
//! on the same descriptor, and its status is compared before and after the read, so a file
//! that changed while it was read is known.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;
use rustix::fs::FileType;

use super::files::FilesStats;
use super::CancelToken;
use crate::dirfd::{self, EntryStat};
use crate::fsattr;
use crate::pipeline::chunker::Cutter;
use crate::pipeline::stages::{BlobSaver, SaveError};
use crate::pipeline::{BlobId, BlobKind, Chunker};
use crate::repo::tree::{encode_content_list, INLINE_CONTENT_MAX};

/// What a reader needs to know about one file.
pub(super) struct FileJobMsg {
    /// The file's directory, open.
    pub dir: Arc<OwnedFd>,
    /// Its name there.
    pub name: OsString,
    /// Device and inode the walk stat'ed.
    pub expect: (u64, u64),
    /// Fixed-size blocks instead of content-defined chunks (database relation files).
    pub fixed_chunk: Option<usize>,
    /// Format 2: record data extents (holes) too.
    pub format2: bool,
    /// Leave the file out when it is marked nodump.
    pub exclude_nodump: bool,
    /// Where the outcome goes.
    pub reply: Sender<Result<FileContent, ReadFailure>>,
}

/// A file as read.
pub(super) struct FileContent {
    /// Chunk ids (inline).
    pub content: Vec<BlobId>,
    /// Content-list blobs, for files with very many chunks.
    pub lists: Vec<BlobId>,
    /// Bytes read (the data extents' when it has holes).
    pub size: u64,
    /// The file's size (with its holes).
    pub file_size: u64,
    /// The status of the inode read, when it is not the one the walk stat'ed (the file was
    /// replaced in between): the node takes its metadata.
    pub replaced: Option<EntryStat>,
    /// Extended attributes (format 2).
    pub xattrs: fsattr::Xattrs,
    /// File flags (format 2).
    pub flags: u32,
    /// Data extents when the file has holes (format 2).
    pub extents: Vec<(u64, u64)>,
    /// Size, mtime or ctime differed after the read.
    pub changed: bool,
    /// Could not be read in full but what could is here (attributes): the message.
    pub attr_error: Option<String>,
}

/// Why a file yielded no content.
pub(super) enum ReadFailure {
    /// Could not be opened or read.
    Unreadable(String),
    /// Gone between listing and reading.
    Vanished,
    /// Marked nodump and `--exclude-nodump`.
    NoDump,
    /// Cancelled, or the pipeline stopped.
    Stopped,
}

/// Opens a file the walk found: relative to its directory, without following a symlink,
/// without blocking on a FIFO swapped in, and without touching its access time where the
/// kernel lets us (`O_NOATIME` is for the owner and root). It must be a regular file; when
/// it is not the inode the walk stat'ed, its own status comes back with it.
pub(super) fn open_checked(m: &FileJobMsg) -> Result<(File, EntryStat, bool), ReadFailure> {
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
    let replaced = (st.st_dev, st.st_ino) != m.expect;
    Ok((File::from(fd), st, replaced))
}

/// Reads one file: opens it, its attributes, its content, and its status again.
pub(super) fn read_job(
    m: &FileJobMsg,
    saver: &BlobSaver,
    cutter: &Cutter,
    min_size: u64,
    cancel: &CancelToken,
    stats: &FilesStats,
) -> Result<FileContent, ReadFailure> {
    let (file, before, replaced) = open_checked(m)?;
    // Read in a format-1 repository too: what it cannot hold is then reported by kind.
    let flags = fsattr::read_flags(&file);
    let (xattrs, attr_error) = match fsattr::read_xattrs_fd(&file) {
        Ok(x) => (x, None),
        Err(e) => (vec![], Some(format!("extended attributes: {e}"))),
    };
    if m.exclude_nodump && flags & fsattr::nodump_flag() != 0 {
        return Err(ReadFailure::NoDump);
    }
    let file_size = before.st_size as u64;
    // Holes are neither read nor hashed: only a file with fewer blocks than its size can
    // have any, so the others cost no extra call.
    let mut extents =
        if m.format2 && m.fixed_chunk.is_none() && (before.st_blocks as u64) * 512 < file_size {
            fsattr::data_extents(&file, file_size).unwrap_or_default()
        } else {
            vec![]
        };
    let mut c = if !extents.is_empty() {
        read_extents(&file, &mut extents, saver, cutter, cancel, stats)?
    } else {
        match m.fixed_chunk {
            Some(n) => read_fixed(&file, n, saver, cancel, stats)?,
            None => read_file(&file, saver, cutter, min_size, cancel, stats)?,
        }
    };
    let after = dirfd::fstat(&file).map_err(|e| ReadFailure::Unreadable(e.to_string()))?;
    c.changed = after.st_size != before.st_size
        || dirfd::mtime_ns(&after) != dirfd::mtime_ns(&before)
        || dirfd::ctime_ns(&after) != dirfd::ctime_ns(&before);
    c.replaced = replaced.then_some(before);
    let shrunk = c.changed && (after.st_size as u64) < file_size;
    (c.file_size, c.extents) = if extents.is_empty() {
        (c.size, extents)
    } else {
        holes_settled(extents, file_size, shrunk.then_some(after.st_size as u64))
    };
    c.flags = flags;
    c.xattrs = xattrs;
    c.attr_error = attr_error;
    Ok(c)
}

/// Collects a file's chunk ids, spilling to content-list blobs past the inline limit.
pub(super) struct ContentSink<'a> {
    saver: &'a BlobSaver,
    ids: Vec<BlobId>,
    lists: Vec<BlobId>,
}

impl<'a> ContentSink<'a> {
    pub(super) fn new(saver: &'a BlobSaver) -> Self {
        ContentSink {
            saver,
            ids: vec![],
            lists: vec![],
        }
    }

    pub(super) fn push(&mut self, id: BlobId) -> Result<(), SaveError> {
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

    pub(super) fn finish(mut self) -> Result<(Vec<BlobId>, Vec<BlobId>), SaveError> {
        if self.lists.is_empty() {
            return Ok((self.ids, vec![]));
        }
        if !self.ids.is_empty() {
            let (l, _) = self
                .saver
                .save(BlobKind::Tree, encode_content_list(&self.ids))?;
            self.lists.push(l);
            self.ids.clear();
        }
        Ok((vec![], self.lists))
    }
}

/// Chunks a stream into `sink`; returns the bytes read. `Err(None)` when stopped (cancel
/// or pipeline failure), `Err(Some(e))` on a read error.
fn chunk_into<R: Read>(
    reader: R,
    sink: &mut ContentSink<'_>,
    cutter: &Cutter,
    cancel: &CancelToken,
    read_counter: &AtomicU64,
) -> Result<u64, Option<io::Error>> {
    let mut chunker = Chunker::new(reader, cutter.clone());
    let mut last = 0;
    while let Some(chunk) = chunker.next_chunk().map_err(Some)? {
        if cancel.is_cancelled() {
            return Err(None);
        }
        let read = chunker.bytes_read();
        read_counter.fetch_add(read - last, Ordering::Relaxed);
        last = read;
        let (id, _) = sink.saver.save(BlobKind::Data, chunk).map_err(|_| None)?;
        sink.push(id).map_err(|_| None)?;
    }
    read_counter.fetch_add(chunker.bytes_read() - last, Ordering::Relaxed);
    Ok(chunker.bytes_read())
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
    let mut sink = ContentSink::new(saver);
    let total = chunk_into(reader, &mut sink, cutter, cancel, read_counter)?;
    let (ids, lists) = sink.finish().map_err(|_| None)?;
    Ok((ids, lists, total))
}

fn content(sink: ContentSink<'_>, size: u64) -> Result<FileContent, ReadFailure> {
    let (content, lists) = sink.finish().map_err(|_| ReadFailure::Stopped)?;
    Ok(FileContent {
        content,
        lists,
        size,
        file_size: size,
        replaced: None,
        xattrs: vec![],
        flags: 0,
        extents: vec![],
        changed: false,
        attr_error: None,
    })
}

fn failure(e: Option<io::Error>) -> ReadFailure {
    match e {
        Some(e) => ReadFailure::Unreadable(e.to_string()),
        None => ReadFailure::Stopped,
    }
}

/// Reads only a sparse file's data extents, chunking each on its own (so no chunk spans a
/// hole and a restore writes each at its place). A file that shrinks while read ends
/// where the reading did: the extents are cut there.
fn read_extents(
    file: &File,
    extents: &mut Vec<(u64, u64)>,
    saver: &BlobSaver,
    cutter: &Cutter,
    cancel: &CancelToken,
    stats: &FilesStats,
) -> Result<FileContent, ReadFailure> {
    let mut sink = ContentSink::new(saver);
    let mut size = 0u64;
    let mut f = file;
    for i in 0..extents.len() {
        let (off, len) = extents[i];
        f.seek(io::SeekFrom::Start(off))
            .map_err(|e| ReadFailure::Unreadable(e.to_string()))?;
        let n = chunk_into(f.take(len), &mut sink, cutter, cancel, &stats.bytes_read)
            .map_err(failure)?;
        size += n;
        if n < len {
            extents[i].1 = n;
            extents.truncate(i + 1);
            break;
        }
    }
    content(sink, size)
}

/// A sparse file's size and data extents once read: extents cut short by a shrinking file
/// end where the reading did (and one cut to nothing is dropped); a file that `shrunk_to`
/// a smaller size ends at its last data or that size, whichever is further; a file with no
/// data left is the one extent `[size, 0]` (all hole).
fn holes_settled(
    mut extents: Vec<(u64, u64)>,
    size: u64,
    shrunk_to: Option<u64>,
) -> (u64, Vec<(u64, u64)>) {
    extents.retain(|&(_, len)| len > 0);
    let size = match shrunk_to {
        Some(now) => extents.last().map_or(0, |&(off, len)| off + len).max(now),
        None => size,
    };
    if extents.is_empty() {
        extents.push((size, 0));
    }
    (size, extents)
}

/// Reads a file in blocks of `block` bytes (the last one shorter), one blob each.
fn read_fixed(
    mut file: &File,
    block: usize,
    saver: &BlobSaver,
    cancel: &CancelToken,
    stats: &FilesStats,
) -> Result<FileContent, ReadFailure> {
    let mut sink = ContentSink::new(saver);
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
    content(sink, size)
}

/// Reads a whole file: small ones at once with one exact allocation, others as a stream.
fn read_file(
    file: &File,
    saver: &BlobSaver,
    cutter: &Cutter,
    min_size: u64,
    cancel: &CancelToken,
    stats: &FilesStats,
) -> Result<FileContent, ReadFailure> {
    let unreadable = |e: io::Error| ReadFailure::Unreadable(e.to_string());
    let md = file.metadata().map_err(unreadable)?;
    // Small files are read whole with one exact allocation; they are one or two chunks.
    if md.len() <= min_size * 2 {
        let mut data = Vec::with_capacity(md.len() as usize + 1);
        file.take(md.len() + 1)
            .read_to_end(&mut data)
            .map_err(unreadable)?;
        if data.len() as u64 <= md.len() {
            stats
                .bytes_read
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            let size = data.len() as u64;
            let mut sink = ContentSink::new(saver);
            let save = |sink: &mut ContentSink<'_>, chunk: Vec<u8>| {
                let (id, _) = saver
                    .save(BlobKind::Data, chunk)
                    .map_err(|_| ReadFailure::Stopped)?;
                sink.push(id).map_err(|_| ReadFailure::Stopped)
            };
            let first = cutter.cut(&data);
            if first == data.len() {
                // One chunk (the common case): hand over the buffer, no copy.
                if !data.is_empty() {
                    save(&mut sink, data)?;
                }
            } else {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let n = cutter.cut(rest);
                    save(&mut sink, rest[..n].to_vec())?;
                    rest = &rest[n..];
                }
            }
            return content(sink, size);
        }
        // The file grew while we read it: continue as a stream.
        let reader = io::Cursor::new(data).chain(file);
        return stream_file(reader, saver, cutter, cancel, stats);
    }
    stream_file(file, saver, cutter, cancel, stats)
}

fn stream_file<R: Read>(
    reader: R,
    saver: &BlobSaver,
    cutter: &Cutter,
    cancel: &CancelToken,
    stats: &FilesStats,
) -> Result<FileContent, ReadFailure> {
    let mut sink = ContentSink::new(saver);
    let size = chunk_into(reader, &mut sink, cutter, cancel, &stats.bytes_read).map_err(failure)?;
    content(sink, size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;
    use std::path::Path;

    fn job(dir: &Path, name: &str, expect: (u64, u64)) -> FileJobMsg {
        let (tx, _) = bounded(1);
        FileJobMsg {
            dir: Arc::new(dirfd::open_dir_path(dir).unwrap()),
            name: name.into(),
            expect,
            fixed_chunk: None,
            format2: true,
            exclude_nodump: false,
            reply: tx,
        }
    }

    fn dev_ino(p: &Path) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(p).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn a_sparse_file_that_shrinks_while_read_ends_where_the_reading_did() {
        use crate::pipeline::stages::SaverOptions;
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let backend = Arc::new(crate::backend::LocalBackend::new(t.path().join("repo")));
        let repo = crate::repo::Repository::init_local(backend, b"pw", "h", "u", 3).unwrap();
        let (saver, threads) = BlobSaver::start(
            repo.keys().clone(),
            Arc::new(crate::repo::Index::default()),
            repo.backend().clone(),
            SaverOptions::default(),
        );
        let p = t.path().join("sparse");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1; 4096], 0).unwrap();
        f.write_all_at(&[2; 8192], 1 << 20).unwrap();
        f.write_all_at(&[3; 4096], 3 << 20).unwrap();
        f.sync_all().unwrap();
        let found = fsattr::data_extents(&f, 4 << 20).unwrap();
        assert_eq!(found, [(0, 4096), (1 << 20, 8192), (3 << 20, 4096)]);
        // Truncated after its holes were found, inside the second extent.
        f.set_len((1 << 20) + 100).unwrap();
        let read = File::open(&p).unwrap();
        let mut extents = found.clone();
        let cutter = Cutter::new(repo.config().chunker, repo.keys().gear_table());
        let stats = FilesStats::default();
        let c = read_extents(
            &read,
            &mut extents,
            &saver,
            &cutter,
            &CancelToken::default(),
            &stats,
        )
        .ok()
        .expect("read as far as the file goes");
        assert_eq!(extents, [(0, 4096), (1 << 20, 100)]);
        assert_eq!(c.size, 4196);
        assert_eq!(
            holes_settled(extents, 4 << 20, Some((1 << 20) + 100)),
            ((1 << 20) + 100, vec![(0, 4096), (1 << 20, 100)])
        );
        // The second extent cut to nothing (the file ends at 8 KiB now): dropped.
        assert_eq!(
            holes_settled(vec![(0, 4096), (1 << 20, 0)], 4 << 20, Some(8192)),
            (8192, vec![(0, 4096)])
        );
        // All hole, shrunk: still all hole, at its new size; not shrunk: as it was.
        assert_eq!(
            holes_settled(vec![(4 << 20, 0)], 4 << 20, Some(1 << 20)),
            (1 << 20, vec![(1 << 20, 0)])
        );
        assert_eq!(
            holes_settled(vec![(0, 5), (9, 1)], 100, None),
            (100, vec![(0, 5), (9, 1)])
        );
        drop(saver.finish(threads));
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
            Ok((_, st, true)) => assert_eq!((st.st_dev, st.st_ino), now),
            _ => panic!("a replaced file must come back with its own status"),
        }
        match open_checked(&job(t.path(), "f", now)) {
            Ok((_, _, false)) => {}
            _ => panic!("the stat'ed file is read as is"),
        }
    }
}
