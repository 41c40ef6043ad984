//! The metadata phase of a restore, on each entry itself (an open descriptor, or an
//! `O_PATH` one for what must not be opened): owner (as root), extended attributes, mode,
//! times — in that order, since `chown` clears set-id bits and capabilities, and a
//! read-only mode would refuse `user.*` attributes to a restore without privilege (the
//! mode's group bits then set the ACL mask, which the snapshot recorded equal) — and, with
//! `--file-flags`, file flags after everything else. Attributes the entry has and the
//! snapshot does not (an older copy's in `--delta`, ACLs inherited from the target's
//! directory) are removed. What cannot be set is a warning naming the entry, never silent.
//!
//! A cluster's copy (an owner forced) gets only `user.*` attributes and ACLs: a forged
//! snapshot could otherwise give its server's owner file capabilities.

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

/// The attribute the kernel's security module gives each file, not the restore's to
/// remove.
const LSM_LABEL: &[u8] = b"security.selinux";

/// True when a cluster's copy (an owner forced) may get the attribute `name`.
pub(super) fn allowed_when_forced(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name.starts_with(b"system.posix_acl_")
}

/// Makes the entry's extended attributes the node's: removes the others, sets each;
/// failures are warnings for `path`.
fn sync_xattrs(
    node: &Node,
    path: &str,
    force: Option<(u32, u32)>,
    warnings: &mut Warnings,
    on: fsattr::XattrOn<'_>,
) {
    let wanted = |n: &[u8]| force.is_none() || allowed_when_forced(n);
    match on.names() {
        Ok(have) => {
            for n in have {
                if n == LSM_LABEL
                    || node
                        .xattrs
                        .iter()
                        .any(|x| x.name_bytes() == n && wanted(&n))
                {
                    continue;
                }
                if let Err(e) = on.remove(&n) {
                    warnings.push((
                        path.to_string(),
                        format!(
                            "extended attribute {} (not in the snapshot) not removed: {e}",
                            String::from_utf8_lossy(&n)
                        ),
                    ));
                }
            }
        }
        Err(e) => warnings.push((path.to_string(), format!("extended attributes: {e}"))),
    }
    for x in &node.xattrs {
        let name = x.name_bytes();
        if !wanted(&name) {
            continue;
        }
        let r = match x.value_bytes() {
            Some(v) => on.set(&name, &v),
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

/// Owner, extended attributes, mode and times on an open file or directory.
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
    sync_xattrs(node, path, force, warnings, fsattr::XattrOn::Fd(fd.as_fd()));
    dirfd::set_mode(fd, mode)?;
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
    sync_xattrs(
        &l.node,
        &l.snap_path(table),
        force,
        warnings,
        fsattr::XattrOn::At(dir.as_fd(), name),
    );
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
    sync_xattrs(
        &s.node,
        &s.snap_path(table),
        force,
        warnings,
        fsattr::XattrOn::PathFd(fd.as_fd()),
    );
    dirfd::set_mode_path_fd(&fd, mode)?;
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
