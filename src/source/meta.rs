//! File metadata as stored in tree nodes: from `lstat`/`fstat`, with owner and group names.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use nix::unistd::{Gid, Group, Uid, User};

use crate::dirfd::{self, EntryStat};
use crate::repo::{Node, NodeKind};

/// Caches uid/gid to name lookups.
#[derive(Default)]
pub struct NameCache {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl NameCache {
    /// The user name of `uid`, or "".
    pub fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_default()
            })
            .clone()
    }

    /// The group name of `gid`, or "".
    pub fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                Group::from_gid(Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
                    .unwrap_or_default()
            })
            .clone()
    }
}

/// Name as stored: UTF-8, with the exact bytes in hex when it is not UTF-8.
pub fn encode_name(name: &OsStr) -> (String, Option<String>) {
    match name.to_str() {
        Some(s) => (s.to_string(), None),
        None => (
            name.to_string_lossy().into_owned(),
            Some(hex::encode(name.as_bytes())),
        ),
    }
}

/// A node with everything but content/subtree/link target filled in from `st`.
pub fn node_from_stat(name: &OsStr, kind: NodeKind, st: &EntryStat, names: &mut NameCache) -> Node {
    let (name, raw_name) = encode_name(name);
    Node {
        name,
        raw_name,
        kind,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        user: names.user(st.st_uid),
        group: names.group(st.st_gid),
        mtime_ns: dirfd::mtime_ns(st),
        // Only what `mtime_ns` cannot hold (before 1677, after 2262).
        mtime: {
            let (s, ns) = dirfd::mtime_parts(st);
            s.checked_mul(1_000_000_000)
                .and_then(|n| n.checked_add(ns as i64))
                .is_none()
                .then_some((s, ns))
        },
        ctime_ns: dirfd::ctime_ns(st),
        inode: st.st_ino,
        device: st.st_dev,
        links: st.st_nlink,
        size: if kind == NodeKind::File {
            st.st_size as u64
        } else {
            0
        },
        content: vec![],
        content_lists: vec![],
        subtree: None,
        link_target: None,
        raw_link_target: None,
        ..Node::default()
    }
}
