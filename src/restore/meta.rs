//! The metadata phase of a restore, on each entry itself (an open descriptor, or an
//! `O_PATH` one for what must not be opened): owner (as root), mode, extended attributes,
//! times — in that order, since `chown` clears set-id bits and capabilities and the ACL
//! settles the group bits — and, with `--file-flags`, file flags after everything else.
//! What cannot be set is a warning naming the entry, never silent.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use super::write::open_planned_any;
use super::{Plan, PlannedDir, PlannedLink, PlannedSpecial};
use crate::dirfd::{self, DirTable};
use crate::fsattr;
use crate::repo::Node;

/// What cannot be restored exactly: (path in the snapshot, why).
pub(super) type Warnings = Vec<(String, String)>;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The owner and mode an entry gets: the snapshot's, or for a cluster the forced owner
/// and no set-id bits.
fn owner_and_mode(node: &Node, force: Option<(u32, u32)>) -> ((u32, u32), u32) {
    match force {
        Some(o) => (o, node.mode & 0o1777),
        None => ((node.uid, node.gid), node.mode),
    }
}

/// Sets each extended attribute with `set`; failures are warnings for `path`.
fn set_xattrs(
    node: &Node,
    path: &str,
    warnings: &mut Warnings,
    set: impl Fn(&[u8], &[u8]) -> io::Result<()>,
) {
    for x in &node.xattrs {
        let r = match x.value_bytes() {
            Some(v) => set(&x.name_bytes(), &v),
            None => Err(io::Error::other("its value in the snapshot is not base64")),
        };
        if let Err(e) = r {
            warnings.push((
                path.to_string(),
                format!("extended attribute {}: {e}", x.name),
            ));
        }
    }
}

/// Owner, mode, extended attributes and times on an open file or directory.
fn apply_to_fd(
    fd: &impl AsFd,
    node: &Node,
    path: &str,
    force: Option<(u32, u32)>,
    warnings: &mut Warnings,
) -> io::Result<()> {
    let ((uid, gid), mode) = owner_and_mode(node, force);
    if is_root() {
        dirfd::set_owner(fd, uid, gid)?;
    }
    dirfd::set_mode(fd, mode)?;
    set_xattrs(node, path, warnings, |n, v| {
        fsattr::write_xattr_fd(fd, n, v)
    });
    dirfd::set_times(fd, node.mtime_parts())
}

/// A regular file's metadata.
pub(super) fn file(
    plan: &Plan,
    f: &super::PlannedFile,
    force: Option<(u32, u32)>,
    warnings: &mut Warnings,
) -> io::Result<()> {
    apply_to_fd(
        &open_planned_any(plan, f)?,
        &f.node,
        &f.snap_path(&plan.table),
        force,
        warnings,
    )
}

/// A directory's metadata.
pub(super) fn dir(
    table: &DirTable,
    d: &PlannedDir,
    force: Option<(u32, u32)>,
    warnings: &mut Warnings,
) -> io::Result<()> {
    apply_to_fd(
        &*table.open(d.idx)?,
        &d.node,
        &d.snap_path(table),
        force,
        warnings,
    )
}

/// A symlink's owner, extended attributes (`trusted.*`, `security.*`: the kernel allows
/// no others on a link) and times, on the link itself.
pub(super) fn link(
    table: &DirTable,
    l: &PlannedLink,
    force: Option<(u32, u32)>,
    warnings: &mut Warnings,
) -> io::Result<()> {
    let dir = table.open(l.dir)?;
    let name = OsStr::from_bytes(&l.name);
    if is_root() {
        let ((uid, gid), _) = owner_and_mode(&l.node, force);
        dirfd::set_link_owner(&*dir, name, uid, gid)?;
    }
    set_xattrs(&l.node, &l.snap_path(table), warnings, |n, v| {
        fsattr::write_xattr_at(&*dir, name, n, v)
    });
    dirfd::set_times_at(&*dir, name, l.node.mtime_parts())
}

/// A FIFO's or device's metadata, through an `O_PATH` descriptor checked to be the inode
/// the restore made (it is never opened: a FIFO would block, a device would be touched).
pub(super) fn special(
    table: &DirTable,
    s: &PlannedSpecial,
    force: Option<(u32, u32)>,
    warnings: &mut Warnings,
) -> io::Result<()> {
    let dir = table.open(s.dir)?;
    let fd = dirfd::open_path(&*dir, OsStr::from_bytes(&s.name))?;
    let st = dirfd::fstat(&fd)?;
    if st.st_ino != s.ino {
        return Err(io::Error::other(
            "replaced during the restore; its metadata was not applied",
        ));
    }
    let ((uid, gid), mode) = owner_and_mode(&s.node, force);
    if is_root() {
        dirfd::set_owner_path_fd(&fd, uid, gid)?;
    }
    dirfd::set_mode_path_fd(&fd, mode)?;
    set_xattrs(&s.node, &s.snap_path(table), warnings, |n, v| {
        fsattr::write_xattr_path_fd(&fd, n, v)
    });
    dirfd::set_times_path_fd(&fd, s.node.mtime_parts())
}

/// File flags of a file (`restore --file-flags`, after everything else).
pub(super) fn file_flags(plan: &Plan, f: &super::PlannedFile) -> io::Result<()> {
    fsattr::write_flags(&open_planned_any(plan, f)?, f.node.flags)
}

/// File flags of a directory.
pub(super) fn dir_flags(table: &DirTable, d: &PlannedDir) -> io::Result<()> {
    fsattr::write_flags(&*table.open(d.idx)?, d.node.flags)
}
