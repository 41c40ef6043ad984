//! File attributes beyond mode, owner and times: extended attributes (which hold POSIX
//! ACLs, file capabilities and security labels), file flags (`chattr`), device numbers and
//! the data extents of sparse files — read and written through an open descriptor, or
//! through a name under an open directory without following it.
//!
//! A symlink, a FIFO or a device cannot (or must not) be opened for its attributes: those
//! are reached as `/proc/self/fd/<directory>/<name>` with the `l*` calls, which resolve the
//! directory's descriptor and then the one name without following it.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::{self as rfs, IFlags, SeekFrom, XattrFlags};

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// The path that reaches `name` in the open directory `dir` through procfs.
fn proc_path(dir: &impl AsFd, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd()));
    p.push(name);
    p
}

/// The path of an open descriptor through procfs (`/proc/self/fd/N`): operations on it
/// reach the inode the descriptor holds, whatever it is (an `O_PATH` one of a FIFO too).
pub fn proc_fd_path(fd: &impl AsFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

/// Splits a `listxattr` buffer into names.
fn names(list: &[u8]) -> Vec<Vec<u8>> {
    list.split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Attribute names and values, sorted by name. Attributes that vanish between the list
/// and the read are left out.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// The names of the extended attributes this process may see, with `list`.
fn list_names(list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    let len = loop {
        match list(&mut buf) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            // No xattrs on this file system: nothing to keep.
            Err(rustix::io::Errno::NOTSUP) => return Ok(vec![]),
            Err(e) => return Err(io_err(e)),
        }
        if buf.len() > 16 << 20 {
            return Err(io::Error::other(
                "extended attribute list larger than 16 MiB",
            ));
        }
    };
    Ok(names(&buf[..len]))
}

/// Reads every extended attribute this process may read, with `list` and `get` (the same
/// calls by descriptor or by path).
fn read_all(
    list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    get: impl Fn(&OsStr, &mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Xattrs> {
    let mut out = vec![];
    for name in list_names(list)? {
        let n = OsStr::from_bytes(&name);
        let mut v = vec![0u8; 256];
        let vlen = loop {
            match get(n, &mut v) {
                Ok(l) => break Some(l),
                Err(rustix::io::Errno::RANGE) => v.resize(v.len() * 4, 0),
                Err(rustix::io::Errno::NODATA) => break None,
                Err(e) => return Err(io_err(e)),
            }
            if v.len() > 16 << 20 {
                return Err(io::Error::other(format!(
                    "extended attribute {} larger than 16 MiB",
                    n.to_string_lossy()
                )));
            }
        };
        if let Some(l) = vlen {
            v.truncate(l);
            out.push((name, v));
        }
    }
    out.sort();
    Ok(out)
}

/// The extended attributes of an open file or directory.
///
/// # Errors
/// I/O failures (none on a file system without them).
pub fn read_xattrs_fd(fd: &impl AsFd) -> io::Result<Xattrs> {
    read_all(|b| rfs::flistxattr(fd, b), |n, b| rfs::fgetxattr(fd, n, b))
}

/// The extended attributes of `name` in `dir` itself (a symlink's own, a FIFO's), without
/// opening or following it.
///
/// # Errors
/// I/O failures.
pub fn read_xattrs_at(dir: &impl AsFd, name: &OsStr) -> io::Result<Xattrs> {
    let p = proc_path(dir, name);
    read_all(|b| rfs::llistxattr(&p, b), |n, b| rfs::lgetxattr(&p, n, b))
}

/// Sets one extended attribute of an open file or directory.
///
/// # Errors
/// Not permitted, not supported, or I/O failures.
pub fn write_xattr_fd(fd: &impl AsFd, name: &[u8], value: &[u8]) -> io::Result<()> {
    rfs::fsetxattr(fd, OsStr::from_bytes(name), value, XattrFlags::empty()).map_err(io_err)
}

/// Sets one extended attribute of `name` in `dir` itself, without following it.
///
/// # Errors
/// Not permitted, not supported, or I/O failures.
pub fn write_xattr_at(dir: &impl AsFd, name: &OsStr, xname: &[u8], value: &[u8]) -> io::Result<()> {
    rfs::lsetxattr(
        proc_path(dir, name),
        OsStr::from_bytes(xname),
        value,
        XattrFlags::empty(),
    )
    .map_err(io_err)
}

/// Sets one extended attribute of the inode an `O_PATH` descriptor holds (a FIFO or a
/// device, which are not opened for real).
///
/// # Errors
/// Not permitted, not supported, or I/O failures.
pub fn write_xattr_path_fd(fd: &impl AsFd, xname: &[u8], value: &[u8]) -> io::Result<()> {
    rfs::setxattr(
        proc_fd_path(fd),
        OsStr::from_bytes(xname),
        value,
        XattrFlags::empty(),
    )
    .map_err(io_err)
}

/// The inode a restore's extended-attribute calls reach.
#[derive(Clone, Copy)]
pub enum XattrOn<'a> {
    /// An open file or directory.
    Fd(BorrowedFd<'a>),
    /// `name` in the directory itself, not followed (a symlink).
    At(BorrowedFd<'a>, &'a OsStr),
    /// The inode an `O_PATH` descriptor holds (a FIFO, a device).
    PathFd(BorrowedFd<'a>),
}

impl XattrOn<'_> {
    /// The names of its extended attributes this process may see.
    ///
    /// # Errors
    /// I/O failures (none on a file system without them).
    pub fn names(self) -> io::Result<Vec<Vec<u8>>> {
        match self {
            XattrOn::Fd(fd) => list_names(|b| rfs::flistxattr(fd, b)),
            XattrOn::At(dir, name) => {
                let p = proc_path(&dir, name);
                list_names(|b| rfs::llistxattr(&p, b))
            }
            XattrOn::PathFd(fd) => {
                let p = proc_fd_path(&fd);
                list_names(|b| rfs::listxattr(&p, b))
            }
        }
    }

    /// Sets one extended attribute.
    ///
    /// # Errors
    /// Not permitted, not supported, or I/O failures.
    pub fn set(self, xname: &[u8], value: &[u8]) -> io::Result<()> {
        match self {
            XattrOn::Fd(fd) => write_xattr_fd(&fd, xname, value),
            XattrOn::At(dir, name) => write_xattr_at(&dir, name, xname, value),
            XattrOn::PathFd(fd) => write_xattr_path_fd(&fd, xname, value),
        }
    }

    /// Removes one extended attribute (absent is fine).
    ///
    /// # Errors
    /// Not permitted, or I/O failures.
    pub fn remove(self, xname: &[u8]) -> io::Result<()> {
        let n = OsStr::from_bytes(xname);
        let r = match self {
            XattrOn::Fd(fd) => rfs::fremovexattr(fd, n),
            XattrOn::At(dir, name) => rfs::lremovexattr(proc_path(&dir, name), n),
            XattrOn::PathFd(fd) => rfs::removexattr(proc_fd_path(&fd), n),
        };
        match r {
            Ok(()) | Err(rustix::io::Errno::NODATA) => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
}

/// The file flags a restore can set again (`chattr` letters `s u c S i a d A j t D T C P`):
/// what the kernel reports but does not let anyone set (extents, inline data, encryption,
/// verity, ...) is not recorded.
pub fn restorable_flags() -> IFlags {
    IFlags::SECURE_REMOVAL
        | IFlags::UNRM
        | IFlags::COMPRESSED
        | IFlags::SYNC
        | IFlags::IMMUTABLE
        | IFlags::APPEND
        | IFlags::NODUMP
        | IFlags::NOATIME
        | IFlags::JOURNALING
        | IFlags::NOTAIL
        | IFlags::DIRSYNC
        | IFlags::TOPDIR
        | IFlags::NOCOW
        | IFlags::PROJECT_INHERIT
}

/// Flags that keep a file from changing; set after everything else of a restore.
pub fn sealing_flags() -> IFlags {
    IFlags::IMMUTABLE | IFlags::APPEND
}

/// `FS_NODUMP_FL` (`chattr +d`).
pub fn nodump_flag() -> u32 {
    IFlags::NODUMP.bits()
}

/// The restorable flags of an open file or directory; 0 where the file system has none.
pub fn read_flags(fd: &impl AsFd) -> u32 {
    rfs::ioctl_getflags(fd)
        .map(|f| (f & restorable_flags()).bits())
        .unwrap_or(0)
}

/// Sets the restorable flags of an open file or directory (others it has are kept).
///
/// # Errors
/// Not permitted (immutable and append-only need `CAP_LINUX_IMMUTABLE`), not supported.
pub fn write_flags(fd: &impl AsFd, flags: u32) -> io::Result<()> {
    let now = rfs::ioctl_getflags(fd).map_err(io_err)?;
    let want = (now - restorable_flags()) | (IFlags::from_bits_retain(flags) & restorable_flags());
    if want == now {
        return Ok(());
    }
    rfs::ioctl_setflags(fd, want).map_err(io_err)
}

/// Holes shorter than this between two data extents are read as data: a file fragmented
/// into many small extents would otherwise make a node with as many entries.
const MIN_HOLE: u64 = 64 * 1024;

/// The data extents (`offset`, `length`) of an open regular file of `size` bytes, found
/// with `SEEK_DATA`/`SEEK_HOLE`; `None` when it has no hole worth keeping (or the file
/// system cannot say). A file without data is `[(size, 0)]`. The read position is left
/// anywhere.
pub fn data_extents(fd: &impl AsFd, size: u64) -> Option<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = vec![];
    let mut pos = 0u64;
    while pos < size {
        let start = match rfs::seek(fd, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return None,
        };
        if start >= size {
            break;
        }
        let end = rfs::seek(fd, SeekFrom::Hole(start)).ok()?.min(size);
        match out.last_mut() {
            Some((o, l)) if start - (*o + *l) < MIN_HOLE => *l = end - *o,
            _ => out.push((start, end - start)),
        }
        pos = end;
    }
    let data: u64 = out.iter().map(|(_, l)| l).sum();
    if out.is_empty() && size >= MIN_HOLE {
        // No data at all (a fresh disk image): the one empty extent at its end, since no
        // extents would mean the whole file is data.
        return Some(vec![(size, 0)]);
    }
    (data + MIN_HOLE <= size).then_some(out)
}

/// Makes `[offset, offset + len)` of an open file a hole (its size unchanged).
///
/// # Errors
/// Not supported by the file system, or I/O failures.
pub fn punch_hole(fd: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    rfs::fallocate(
        fd,
        rfs::FallocateFlags::PUNCH_HOLE | rfs::FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .map_err(io_err)
}

/// A device number as (major, minor).
pub fn split_rdev(rdev: u64) -> (u32, u32) {
    (rfs::major(rdev), rfs::minor(rdev))
}

/// A device number from (major, minor).
pub fn join_rdev(major: u32, minor: u32) -> u64 {
    rfs::makedev(major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    #[test]
    fn extents_of_a_sparse_file_skip_its_holes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("sparse");
        let mut f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        f.seek(std::io::SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(&[9u8; 8192]).unwrap();
        f.sync_all().unwrap();
        let e = data_extents(&f, 64 << 20).expect("holes found");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(
            e[0].0 <= 1 << 20 && e[0].0 + e[0].1 >= (1 << 20) + 4096,
            "{e:?}"
        );
        assert!(
            e[1].0 <= 40 << 20 && e[1].0 + e[1].1 >= (40 << 20) + 8192,
            "{e:?}"
        );
        // A file without holes has no extents to record.
        let q = t.path().join("dense");
        std::fs::write(&q, vec![1u8; 300_000]).unwrap();
        let g = std::fs::File::open(&q).unwrap();
        assert_eq!(data_extents(&g, 300_000), None);
    }

    #[test]
    fn user_xattrs_round_trip_by_descriptor() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        write_xattr_fd(&f, b"user.backupd.test", b"\x00\xffvalue").unwrap();
        let x = read_xattrs_fd(&f).unwrap();
        assert!(x.contains(&(b"user.backupd.test".to_vec(), b"\x00\xffvalue".to_vec())));
        let dir = crate::dirfd::open_dir_path(t.path()).unwrap();
        let y = read_xattrs_at(&dir, OsStr::new("f")).unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn device_numbers_split_and_join() {
        assert_eq!(split_rdev(join_rdev(8, 17)), (8, 17));
        assert_eq!(split_rdev(join_rdev(259, 1 << 19)), (259, 1 << 19));
    }
}
