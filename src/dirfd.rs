//! Directory handles: file-system operations done relative to an open directory, one
//! name at a time, never through a symlink.
//!
//! A backup tool runs as root and writes where a snapshot says, into directories other
//! users may own. Every write, chmod, chown, utimes and deletion of a restore (and every
//! read of the backup walk) goes through these calls: `openat`/`mkdirat`/`unlinkat`/
//! `renameat` with `O_NOFOLLOW` (or `AT_SYMLINK_NOFOLLOW`) on a single name relative to a
//! directory descriptor. A symlink met where a directory or file is expected is an error
//! (`ELOOP`/`ENOTDIR`) or is replaced, never followed, so nothing can land outside the
//! directory the walk started from (the lesson of CVE-2022-21658 in `remove_dir_all`).
//!
//! [`DirTable`] holds the directories of one restore by index and reopens them on demand
//! from the nearest open ancestor (checking device and inode each time), so a restore
//! needs neither paths nor one open descriptor per directory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, Stat, Timespec, Timestamps};

/// The status of a directory entry (`lstat`), as the kernel gives it.
pub type EntryStat = Stat;

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// The file type of a status.
pub fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Modification time of a status, nanoseconds since the epoch.
#[allow(clippy::unnecessary_cast)] // c_long is not i64 everywhere
pub fn mtime_ns(st: &Stat) -> i64 {
    to_ns(st.st_mtime as i64, st.st_mtime_nsec as i64)
}

/// Modification time of a status as (seconds, nanoseconds) since the epoch: every time a
/// file system holds, also those `mtime_ns` cannot (before 1677, after 2262).
#[allow(clippy::unnecessary_cast)] // c_long is not i64 everywhere
pub fn mtime_parts(st: &Stat) -> (i64, u32) {
    (st.st_mtime as i64, st.st_mtime_nsec as u32)
}

/// Seconds and nanoseconds as nanoseconds, saturated at the ends of `i64` (1677, 2262).
pub fn to_ns(secs: i64, nsecs: i64) -> i64 {
    secs.checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(nsecs))
        .unwrap_or(if secs < 0 { i64::MIN } else { i64::MAX })
}

/// Status change time of a status, nanoseconds since the epoch.
#[allow(clippy::unnecessary_cast)] // c_long is not i64 everywhere
pub fn ctime_ns(st: &Stat) -> i64 {
    to_ns(st.st_ctime as i64, st.st_ctime_nsec as i64)
}

/// Opens a directory the user named by path (symlinks in the user's own path are the
/// user's choice and are followed).
///
/// # Errors
/// It does not exist or is not a directory.
pub fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    rfs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)
}

/// Opens the subdirectory `name` of `dir`; a symlink there is refused (`ELOOP`).
///
/// # Errors
/// Missing, not a directory, or a symlink.
pub fn open_subdir(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)
}

/// `lstat` of `name` in `dir`; `None` when there is no such entry.
///
/// # Errors
/// Any failure but "not found".
pub fn lstat_at(dir: impl AsFd, name: &OsStr) -> io::Result<Option<Stat>> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(io_err(e)),
    }
}

/// `fstat` of an open descriptor.
///
/// # Errors
/// Only on a bad descriptor.
pub fn fstat(fd: impl AsFd) -> io::Result<Stat> {
    rfs::fstat(fd).map_err(io_err)
}

/// Makes directory `name` in `dir` (mode `mode`, before the umask) unless a real
/// directory is there already, and opens it. `created` says which. Anything else at the
/// name (a file, a symlink) is an error unless `replace`, which removes it first.
///
/// # Errors
/// I/O failures, or a non-directory at the name without `replace`.
pub fn ensure_dir(
    dir: impl AsFd,
    name: &OsStr,
    mode: u32,
    replace: bool,
) -> io::Result<(OwnedFd, bool)> {
    let dir = dir.as_fd();
    match rfs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) => return open_subdir(dir, name).map(|fd| (fd, true)),
        Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(io_err(e)),
    }
    match lstat_at(dir, name)? {
        Some(st) if file_type(&st) == FileType::Directory => {
            open_subdir(dir, name).map(|fd| (fd, false))
        }
        Some(_) if replace => {
            remove_entry(dir, name)?;
            rfs::mkdirat(dir, name, Mode::from_raw_mode(mode)).map_err(io_err)?;
            open_subdir(dir, name).map(|fd| (fd, true))
        }
        Some(st) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is a {}, not a directory",
                name.to_string_lossy(),
                kind_word(file_type(&st))
            ),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} vanished while being created", name.to_string_lossy()),
        )),
    }
}

/// A word for a file type, for messages.
pub fn kind_word(t: FileType) -> &'static str {
    match t {
        FileType::RegularFile => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "special file",
    }
}

/// Creates the regular file `name` in `dir`, which must not exist (`O_EXCL`: an existing
/// symlink is not followed either).
///
/// # Errors
/// It exists, or I/O failures.
pub fn create_file(dir: impl AsFd, name: &OsStr, mode: u32) -> io::Result<File> {
    rfs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map(File::from)
    .map_err(io_err)
}

/// Opens the existing regular file `name` in `dir` for writing (`rw` adds reading),
/// refusing a symlink and anything but a regular file; returns its status too.
///
/// # Errors
/// Missing, a symlink, not a regular file, or I/O failures.
pub fn open_file_write(dir: impl AsFd, name: &OsStr, rw: bool) -> io::Result<(File, Stat)> {
    let access = if rw { OFlags::RDWR } else { OFlags::WRONLY };
    let fd = rfs::openat(
        dir,
        name,
        access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)?;
    regular_stat(fd, name)
}

/// Opens the regular file `name` in `dir` for reading, refusing a symlink, and without
/// blocking on a FIFO put in its place.
///
/// # Errors
/// Missing, a symlink, not a regular file, or I/O failures.
pub fn open_file_read(dir: impl AsFd, name: &OsStr) -> io::Result<File> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)?;
    regular(fd, name)
}

fn regular(fd: OwnedFd, name: &OsStr) -> io::Result<File> {
    regular_stat(fd, name).map(|(f, _)| f)
}

fn regular_stat(fd: OwnedFd, name: &OsStr) -> io::Result<(File, Stat)> {
    let st = fstat(&fd)?;
    if file_type(&st) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a {}, not a regular file",
                name.to_string_lossy(),
                kind_word(file_type(&st))
            ),
        ));
    }
    Ok((File::from(fd), st))
}

/// Reads the regular file `name` of `dir` whole (at most `max` bytes); `None` when it
/// does not exist. A symlink is an error, never followed.
///
/// # Errors
/// A symlink or special file, a file larger than `max`, or I/O failures.
pub fn read_file(dir: impl AsFd, name: &OsStr, max: u64) -> io::Result<Option<Vec<u8>>> {
    let f = match open_file_read(dir, name) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = vec![];
    (&f).take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {max} bytes", name.to_string_lossy()),
        ));
    }
    Ok(Some(buf))
}

/// Writes `name` in `dir` as a new regular file holding `data` (mode `mode`, owner
/// `owner` when given), replacing whatever was there — a symlink is replaced, not
/// followed — atomically: a temporary name, fsync, then `renameat` over the name.
///
/// # Errors
/// I/O failures (the temporary file is removed).
pub fn write_replace(
    dir: impl AsFd,
    name: &OsStr,
    data: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let dir = dir.as_fd();
    let mut tmp = b".".to_vec();
    tmp.extend_from_slice(name.as_bytes());
    tmp.extend_from_slice(format!(".backupd-{}.tmp", std::process::id()).as_bytes());
    let tmp = OsStr::from_bytes(&tmp);
    let _ = rfs::unlinkat(dir, tmp, AtFlags::empty());
    let result = (|| {
        let mut f = create_file(dir, tmp, 0o600)?;
        f.write_all(data)?;
        if let Some((uid, gid)) = owner {
            set_owner(&f, uid, gid)?;
        }
        rfs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(io_err)?;
        f.sync_all()?;
        rfs::renameat(dir, tmp, dir, name).map_err(io_err)
    })();
    if result.is_err() {
        let _ = rfs::unlinkat(dir, tmp, AtFlags::empty());
    }
    result
}

/// Removes whatever `name` in `dir` is — a file, a symlink (not what it points to), or a
/// directory tree, walked by descriptors; absent is fine.
///
/// # Errors
/// I/O failures.
pub fn remove_entry(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    let dir = dir.as_fd();
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if file_type(&st) == FileType::Directory => remove_tree(dir, name),
        Some(_) => match rfs::unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(io_err(e)),
        },
    }
}

/// Removes the directory `name` of `dir` and everything in it, never following a
/// symlink: each level is opened with `O_NOFOLLOW` relative to its parent. Only two
/// descriptors are open at a time, however deep the tree: going back up is `..` of the
/// directory just emptied, checked to be the directory it was entered from (device and
/// inode), so a directory moved during the removal stops it instead of leading elsewhere.
///
/// # Errors
/// I/O failures, or a directory moved while it is removed (what could be removed is).
pub fn remove_tree(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    let top = dir.as_fd();
    let first = match open_subdir(top, name) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    // The path from `top` down: each level's name, (device, inode), and the names of the
    // subdirectories still to remove (listed once, when the level is entered).
    let top_st = fstat(top)?;
    let st = fstat(&first)?;
    type Level = (Vec<u8>, (u64, u64), Option<Vec<Vec<u8>>>);
    let mut stack: Vec<Level> = vec![(name.as_bytes().to_vec(), (st.st_dev, st.st_ino), None)];
    let mut cur = first;
    loop {
        let level = stack
            .last_mut()
            .expect("the stack holds the current directory");
        if level.2.is_none() {
            // Remove what is not a directory; keep the directories for one by one.
            let mut dirs = vec![];
            for (child, _) in list(&cur)? {
                let c = OsStr::from_bytes(&child);
                match lstat_at(&cur, c)? {
                    Some(st) if file_type(&st) == FileType::Directory => dirs.push(child),
                    Some(_) => match rfs::unlinkat(&cur, c, AtFlags::empty()) {
                        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                        Err(e) => return Err(io_err(e)),
                    },
                    None => {}
                }
            }
            level.2 = Some(dirs);
        }
        if let Some(child) = level.2.as_mut().and_then(|d| d.pop()) {
            let c = OsStr::from_bytes(&child);
            let next = match open_subdir(&cur, c) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let st = fstat(&next)?;
            stack.push((child, (st.st_dev, st.st_ino), None));
            cur = next;
            continue;
        }
        // Empty now: go up and remove it.
        let (done, _, _) = stack.pop().expect("the stack holds the current directory");
        let parent_id = stack
            .last()
            .map_or((top_st.st_dev, top_st.st_ino), |(_, id, _)| *id);
        let parent = if stack.is_empty() {
            None
        } else {
            let up = rfs::openat(
                &cur,
                "..",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_err)?;
            let st = fstat(&up)?;
            if (st.st_dev, st.st_ino) != parent_id {
                return Err(io::Error::other(format!(
                    "{} was moved while it was being removed",
                    String::from_utf8_lossy(&done)
                )));
            }
            Some(up)
        };
        let parent_fd = parent.as_ref().map_or(top, |p| p.as_fd());
        match rfs::unlinkat(parent_fd, OsStr::from_bytes(&done), AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(io_err(e)),
        }
        match parent {
            Some(p) => cur = p,
            None => return Ok(()),
        }
    }
}

/// The names in a directory (without `.` and `..`) with their types as the directory
/// reports them (`Unknown` on file systems that do not say).
///
/// # Errors
/// I/O failures.
pub fn list(dir: impl AsFd) -> io::Result<Vec<(Vec<u8>, FileType)>> {
    let mut d = rfs::Dir::read_from(dir).map_err(io_err)?;
    let mut out = vec![];
    while let Some(e) = d.read() {
        let e = e.map_err(io_err)?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((name.to_vec(), e.file_type()));
    }
    Ok(out)
}

/// Makes the FIFO `name` in `dir` (mode 0600 until its metadata is applied).
///
/// # Errors
/// The name exists, or I/O failures.
pub fn mkfifo_at(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    rfs::mkfifoat(dir, name, Mode::from_raw_mode(0o600)).map_err(io_err)
}

/// Makes the character (`block` false) or block device `name` in `dir`, mode 0600 until
/// its metadata is applied.
///
/// # Errors
/// Not permitted (devices need root), the name exists, or I/O failures.
pub fn mknod_at(dir: impl AsFd, name: &OsStr, block: bool, rdev: u64) -> io::Result<()> {
    let kind = if block {
        FileType::BlockDevice
    } else {
        FileType::CharacterDevice
    };
    rfs::mknodat(dir, name, kind, Mode::from_raw_mode(0o600), rdev).map_err(io_err)
}

/// Opens `name` in `dir` as an `O_PATH` descriptor (not opened for reading or writing: a
/// FIFO does not block, a device is not touched), never following a symlink.
///
/// # Errors
/// Missing, or I/O failures.
pub fn open_path(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)
}

/// Owner and group of the inode an `O_PATH` descriptor holds.
///
/// # Errors
/// I/O failures (not permitted).
pub fn set_owner_path_fd(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    rfs::chownat(
        fd,
        "",
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io_err)
}

/// Permission bits of the inode an `O_PATH` descriptor holds (through procfs, which
/// reaches that inode itself: it is not a symlink that could lead elsewhere).
///
/// # Errors
/// I/O failures.
pub fn set_mode_path_fd(fd: impl AsFd, mode: u32) -> io::Result<()> {
    rfs::chmod(crate::fsattr::proc_fd_path(&fd), Mode::from_raw_mode(mode)).map_err(io_err)
}

/// Access and modification time of the inode an `O_PATH` descriptor holds.
///
/// # Errors
/// I/O failures.
pub fn set_times_path_fd(fd: impl AsFd, mtime: (i64, u32)) -> io::Result<()> {
    rfs::utimensat(
        rfs::CWD,
        crate::fsattr::proc_fd_path(&fd),
        &timestamps(mtime),
        AtFlags::empty(),
    )
    .map_err(io_err)
}

/// Makes the symlink `name` in `dir` pointing at `target`.
///
/// # Errors
/// The name exists, or I/O failures.
pub fn symlink_at(target: &[u8], dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    rfs::symlinkat(OsStr::from_bytes(target), dir, name).map_err(io_err)
}

/// Reads the target of the symlink `name` in `dir`.
///
/// # Errors
/// Not a symlink, or I/O failures.
pub fn read_link_at(dir: impl AsFd, name: &OsStr) -> io::Result<Vec<u8>> {
    rfs::readlinkat(dir, name, Vec::new())
        .map(|c| c.into_bytes())
        .map_err(io_err)
}

/// Makes `name` in `dir` a hard link to `src_name` in `src_dir` (a symlink there is linked
/// itself, never followed).
///
/// # Errors
/// I/O failures.
pub fn hard_link_at(
    src_dir: impl AsFd,
    src_name: &OsStr,
    dir: impl AsFd,
    name: &OsStr,
) -> io::Result<()> {
    rfs::linkat(src_dir, src_name, dir, name, AtFlags::empty()).map_err(io_err)
}

/// Sets owner and group of an open file or directory.
///
/// # Errors
/// I/O failures (not permitted).
pub fn set_owner(fd: impl AsFd, uid: u32, gid: u32) -> io::Result<()> {
    rfs::fchown(
        fd,
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
    )
    .map_err(io_err)
}

/// Sets owner and group of the symlink `name` in `dir`: the link is opened with
/// `O_PATH | O_NOFOLLOW` and checked to be a symlink first, so a name swapped for a hard
/// link to some other file in between is not chowned.
///
/// # Errors
/// Not a symlink, or I/O failures.
pub fn set_link_owner(dir: impl AsFd, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_err)?;
    let st = fstat(&fd)?;
    if file_type(&st) != FileType::Symlink {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is no longer a symlink", name.to_string_lossy()),
        ));
    }
    rfs::chownat(
        &fd,
        "",
        Some(rfs::Uid::from_raw(uid)),
        Some(rfs::Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io_err)
}

/// Sets the permission bits of an open file or directory.
///
/// # Errors
/// I/O failures.
pub fn set_mode(fd: impl AsFd, mode: u32) -> io::Result<()> {
    rfs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(io_err)
}

fn timestamps((secs, nsecs): (i64, u32)) -> Timestamps {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: nsecs.min(999_999_999) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Sets access and modification time of an open file or directory.
///
/// # Errors
/// I/O failures.
pub fn set_times(fd: impl AsFd, mtime: (i64, u32)) -> io::Result<()> {
    rfs::futimens(fd, &timestamps(mtime)).map_err(io_err)
}

/// Sets access and modification time of `name` in `dir` itself (a symlink's own times).
///
/// # Errors
/// I/O failures.
pub fn set_times_at(dir: impl AsFd, name: &OsStr, mtime: (i64, u32)) -> io::Result<()> {
    rfs::utimensat(dir, name, &timestamps(mtime), AtFlags::SYMLINK_NOFOLLOW).map_err(io_err)
}

/// How many directories a walk (a [`DirTable`], a backup's path from its source) keeps
/// open at most: 128, or an eighth of the descriptor limit when that is lower (the rest is
/// for the files being read or written and the repository's packs).
pub fn open_dirs() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1024);
    (soft / 8).clamp(4, 128) as usize
}

#[cfg(test)]
const OPEN_DIRS: usize = 128;

struct DirRecord {
    parent: usize,
    name: Vec<u8>,
    dev: u64,
    ino: u64,
}

struct OpenDirs {
    fds: HashMap<usize, (Arc<OwnedFd>, u64)>,
    tick: u64,
    limit: usize,
}

/// The directories of one restore, by index (0 is the root), each reopened on demand by
/// walking down from its nearest open ancestor with `O_NOFOLLOW`, and checked against the
/// device and inode recorded when it was made: a directory swapped for another (or for a
/// symlink) during the restore is an error, not a place to write. At most a fixed number
/// stay open, whatever the depth or size of the tree.
pub struct DirTable {
    root: Arc<OwnedFd>,
    root_path: PathBuf,
    dirs: Vec<DirRecord>,
    open: Mutex<OpenDirs>,
}

impl DirTable {
    /// A table rooted at the open directory `root` (shown as `root_path` in messages).
    ///
    /// # Errors
    /// Only if `root` cannot be stat'ed.
    pub fn new(root: OwnedFd, root_path: PathBuf) -> io::Result<Self> {
        let st = fstat(&root)?;
        Ok(DirTable {
            root: Arc::new(root),
            root_path,
            dirs: vec![DirRecord {
                parent: 0,
                name: vec![],
                dev: st.st_dev,
                ino: st.st_ino,
            }],
            open: Mutex::new(OpenDirs {
                fds: HashMap::new(),
                tick: 0,
                limit: open_dirs(),
            }),
        })
    }

    /// Records the directory `name` of directory `parent`, open as `fd`; returns its index.
    ///
    /// # Errors
    /// Only if `fd` cannot be stat'ed.
    pub fn add(&mut self, parent: usize, name: &[u8], fd: OwnedFd) -> io::Result<usize> {
        let st = fstat(&fd)?;
        self.dirs.push(DirRecord {
            parent,
            name: name.to_vec(),
            dev: st.st_dev,
            ino: st.st_ino,
        });
        let idx = self.dirs.len() - 1;
        self.remember(idx, Arc::new(fd));
        Ok(idx)
    }

    fn remember(&self, idx: usize, fd: Arc<OwnedFd>) {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        g.tick += 1;
        let tick = g.tick;
        if g.fds.len() >= g.limit && !g.fds.contains_key(&idx) {
            if let Some(oldest) = g.fds.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                g.fds.remove(&oldest);
            }
        }
        g.fds.insert(idx, (fd, tick));
    }

    fn cached(&self, idx: usize) -> Option<Arc<OwnedFd>> {
        if idx == 0 {
            return Some(self.root.clone());
        }
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        g.tick += 1;
        let tick = g.tick;
        g.fds.get_mut(&idx).map(|(fd, t)| {
            *t = tick;
            fd.clone()
        })
    }

    /// The directory `idx`, open.
    ///
    /// # Errors
    /// It, or a directory above it, was removed or replaced since it was recorded.
    pub fn open(&self, idx: usize) -> io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.cached(idx) {
            return Ok(fd);
        }
        // Just back from a subdirectory (a restore walks down, then back up): its `..`,
        // checked to be this directory, costs one call whatever the depth.
        if let Some(fd) = self.reopen_above_child(idx) {
            return Ok(fd);
        }
        // Climb to the nearest open ancestor, then walk down.
        let mut chain = vec![idx];
        let mut fd = loop {
            let up = self.dirs[*chain.last().unwrap_or(&0)].parent;
            if let Some(fd) = self.cached(up) {
                break fd;
            }
            chain.push(up);
        };
        while let Some(i) = chain.pop() {
            let rec = &self.dirs[i];
            let sub = open_subdir(&*fd, OsStr::from_bytes(&rec.name))
                .map_err(|e| self.replaced(i, Some(e)))?;
            let st = fstat(&sub)?;
            if st.st_dev != rec.dev || st.st_ino != rec.ino {
                return Err(self.replaced(i, None));
            }
            fd = Arc::new(sub);
            self.remember(i, fd.clone());
        }
        Ok(fd)
    }

    /// Directory `idx` reopened as `..` of one of its subdirectories that is open, if one
    /// is and that leads back to `idx` (same device and inode).
    fn reopen_above_child(&self, idx: usize) -> Option<Arc<OwnedFd>> {
        let child = {
            let g = self.open.lock().unwrap_or_else(|p| p.into_inner());
            g.fds
                .iter()
                .find(|(i, _)| **i != 0 && self.dirs[**i].parent == idx)
                .map(|(_, (fd, _))| fd.clone())
        }?;
        let up = rfs::openat(
            &*child,
            "..",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let st = fstat(&up).ok()?;
        let rec = &self.dirs[idx];
        if st.st_dev != rec.dev || st.st_ino != rec.ino {
            return None;
        }
        let fd = Arc::new(up);
        self.remember(idx, fd.clone());
        Some(fd)
    }

    /// The path of directory `idx` relative to the root, as `/a/b` (lossy UTF-8; `""` for
    /// the root), for messages.
    pub fn rel_path(&self, idx: usize) -> String {
        let mut names = vec![];
        let mut i = idx;
        while i != 0 {
            names.push(&self.dirs[i].name);
            i = self.dirs[i].parent;
        }
        let mut out = String::new();
        for n in names.into_iter().rev() {
            out.push('/');
            out.push_str(&String::from_utf8_lossy(n));
        }
        out
    }

    /// The path of directory `idx` under the root, for messages.
    pub fn path(&self, idx: usize) -> PathBuf {
        let mut names = vec![];
        let mut i = idx;
        while i != 0 {
            names.push(&self.dirs[i].name);
            i = self.dirs[i].parent;
        }
        let mut p = self.root_path.clone();
        for n in names.into_iter().rev() {
            p.push(OsStr::from_bytes(n));
        }
        p
    }

    fn replaced(&self, idx: usize, e: Option<io::Error>) -> io::Error {
        let p = self.path(idx);
        match e {
            Some(e) => io::Error::new(
                e.kind(),
                format!("{}: {e} (changed during the restore)", p.display()),
            ),
            None => io::Error::other(format!(
                "{} was replaced during the restore; not writing into it",
                p.display()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, OwnedFd) {
        let t = tempfile::tempdir().unwrap();
        let fd = open_dir_path(t.path()).unwrap();
        (t, fd)
    }

    #[test]
    fn symlinks_are_never_followed() {
        let (t, fd) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("f"), b"keep").unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("d")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("f"), t.path().join("f")).unwrap();
        assert!(open_subdir(&fd, OsStr::new("d")).is_err());
        assert!(ensure_dir(&fd, OsStr::new("d"), 0o700, false).is_err());
        assert!(open_file_write(&fd, OsStr::new("f"), false).is_err());
        assert!(read_file(&fd, OsStr::new("f"), 100).is_err());
        assert!(create_file(&fd, OsStr::new("f"), 0o600).is_err());
        write_replace(&fd, OsStr::new("f"), b"new", 0o600, None).unwrap();
        assert_eq!(std::fs::read(outside.path().join("f")).unwrap(), b"keep");
        assert_eq!(std::fs::read(t.path().join("f")).unwrap(), b"new");
        remove_entry(&fd, OsStr::new("d")).unwrap();
        assert!(outside.path().join("f").exists());
        let (_, created) = ensure_dir(&fd, OsStr::new("d"), 0o700, true).unwrap();
        assert!(created);
        assert!(t.path().join("d").symlink_metadata().unwrap().is_dir());
    }

    #[test]
    fn remove_tree_stays_inside() {
        let (t, fd) = root();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"x").unwrap();
        std::fs::create_dir_all(t.path().join("a/b/c")).unwrap();
        std::fs::write(t.path().join("a/b/c/f"), b"y").unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("a/b/link")).unwrap();
        remove_tree(&fd, OsStr::new("a")).unwrap();
        assert!(!t.path().join("a").exists());
        assert!(outside.path().join("precious").exists());
    }

    #[test]
    fn remove_tree_goes_deeper_than_the_descriptor_limit_allows_open_at_once() {
        let (t, fd) = root();
        // 1,500 levels: more than a default soft limit of 1,024 descriptors.
        let mut cur = open_dir_path(t.path()).unwrap();
        let (first, _) = ensure_dir(&cur, OsStr::new("top"), 0o700, false).unwrap();
        cur = first;
        for _ in 0..1500 {
            std::fs::write(crate::fsattr::proc_fd_path(&cur).join("f"), b"x").unwrap();
            let (next, _) = ensure_dir(&cur, OsStr::new("d"), 0o700, false).unwrap();
            cur = next;
        }
        drop(cur);
        remove_tree(&fd, OsStr::new("top")).unwrap();
        assert!(!t.path().join("top").exists());
    }

    #[test]
    fn remove_tree_removes_wide_trees_of_many_subdirectories_at_every_level() {
        let (t, fd) = root();
        let outside = tempfile::tempdir().unwrap();
        // 12 x 12 x 12 directories, files and links (one leading outside) at each level.
        for a in 0..12 {
            for b in 0..12 {
                for c in 0..12 {
                    let d = t.path().join(format!("w/{a}/{b}/{c}"));
                    std::fs::create_dir_all(&d).unwrap();
                    std::fs::write(d.join("f"), b"x").unwrap();
                }
                let d = t.path().join(format!("w/{a}/{b}"));
                std::fs::write(d.join("g"), b"y").unwrap();
                std::os::unix::fs::symlink(outside.path(), d.join("out")).unwrap();
            }
        }
        std::fs::write(outside.path().join("precious"), b"z").unwrap();
        remove_tree(&fd, OsStr::new("w")).unwrap();
        assert!(std::fs::symlink_metadata(t.path().join("w")).is_err());
        assert!(outside.path().join("precious").exists());
    }

    #[test]
    fn table_reopens_and_detects_replaced_directories() {
        let (t, fd) = root();
        let mut table = DirTable::new(fd, t.path().to_path_buf()).unwrap();
        let mut parent = 0;
        // Deeper than the number of descriptors the table keeps open.
        for i in 0..(OPEN_DIRS + 20) {
            let name = format!("d{i}");
            let pfd = table.open(parent).unwrap();
            let (sub, _) = ensure_dir(&*pfd, OsStr::new(&name), 0o700, false).unwrap();
            parent = table.add(parent, name.as_bytes(), sub).unwrap();
        }
        let deepest = parent;
        // Evict everything by opening others, then reopen the deepest by walking down.
        for i in 1..OPEN_DIRS {
            table.open(i).unwrap();
        }
        let fd = table.open(deepest).unwrap();
        create_file(&*fd, OsStr::new("leaf"), 0o600).unwrap();
        assert!(table.path(deepest).join("leaf").exists());
        // Swap d0 for a symlink to a look-alike: reopening must refuse.
        let outside = tempfile::tempdir().unwrap();
        std::fs::rename(t.path().join("d0"), t.path().join("moved")).unwrap();
        std::fs::create_dir(outside.path().join("d0")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("d0"), t.path().join("d0")).unwrap();
        table.open.lock().unwrap().fds.clear();
        assert!(table.open(1).is_err());
        std::fs::remove_file(t.path().join("d0")).unwrap();
        std::fs::create_dir(t.path().join("d0")).unwrap();
        let e = table.open(1).unwrap_err();
        assert!(e.to_string().contains("replaced"), "{e}");
    }
}
