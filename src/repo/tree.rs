//! Trees: one blob per directory, its entries sorted by name (JSON, then compressed and
//! sealed like any blob). A file's content is its list of data blob ids; a very long list
//! (a file of more than [`INLINE_CONTENT_MAX`] chunks, such as a 1 TB dump) is split into
//! content-list blobs of binary ids, so no node grows without bound.
//!
//! Format version 2 adds, each written only when there is something to say (a plain file's
//! node is as in version 1): special files, extended attributes, data extents of sparse
//! files, file flags, and a mark on files that changed while they were read. Unknown
//! fields are ignored; what a reader must not ignore is a snapshot feature.

use serde::{Deserialize, Serialize};

use crate::pipeline::BlobId;

/// Content-list size: a file with fewer chunk ids keeps them inline in its node; from this
/// many on, they go to content-list blobs of this many ids each.
pub const INLINE_CONTENT_MAX: usize = 4096;

/// What a node is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A regular file.
    #[default]
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A named pipe (format 2).
    Fifo,
    /// A character device (format 2).
    #[serde(rename = "chardev")]
    CharDevice,
    /// A block device (format 2).
    #[serde(rename = "blockdev")]
    BlockDevice,
    /// A kind a newer backupd wrote (its snapshot names the feature).
    #[serde(other)]
    Unknown,
}

impl NodeKind {
    /// A word for messages.
    pub fn word(self) -> &'static str {
        match self {
            NodeKind::File => "file",
            NodeKind::Dir => "directory",
            NodeKind::Symlink => "symlink",
            NodeKind::Fifo => "fifo",
            NodeKind::CharDevice => "character device",
            NodeKind::BlockDevice => "block device",
            NodeKind::Unknown => "unknown kind",
        }
    }

    /// A FIFO or a device.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            NodeKind::Fifo | NodeKind::CharDevice | NodeKind::BlockDevice
        )
    }
}

/// One extended attribute (format 2): `system.posix_acl_access` / `_default` hold the
/// ACLs, `security.capability` the file capabilities, `security.selinux` the label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Its name (lossy UTF-8 when `raw_name` is set).
    pub name: String,
    /// The exact name bytes, hex, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_name: Option<String>,
    /// Its value, base64 (standard alphabet, padded).
    pub value: String,
}

impl Xattr {
    /// Makes one from the raw name and value.
    pub fn new(name: &[u8], value: &[u8]) -> Self {
        use base64::Engine;
        let (name, raw_name) = match std::str::from_utf8(name) {
            Ok(s) => (s.to_string(), None),
            Err(_) => (
                String::from_utf8_lossy(name).into_owned(),
                Some(hex::encode(name)),
            ),
        };
        Xattr {
            name,
            raw_name,
            value: base64::engine::general_purpose::STANDARD.encode(value),
        }
    }

    /// The exact name bytes.
    pub fn name_bytes(&self) -> Vec<u8> {
        self.raw_name
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .unwrap_or_else(|| self.name.as_bytes().to_vec())
    }

    /// The value bytes; `None` when it is not valid base64.
    pub fn value_bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&self.value)
            .ok()
    }
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

/// One directory entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// File name (lossy UTF-8 when `raw_name` is set).
    pub name: String,
    /// The exact name bytes, hex, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_name: Option<String>,
    /// File, dir or symlink.
    #[serde(rename = "type")]
    pub kind: NodeKind,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Owner name, if known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// Group name, if known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status change time, nanoseconds since the epoch (change detection only).
    #[serde(default)]
    pub ctime_ns: i64,
    /// Inode (change detection and hard links).
    #[serde(default)]
    pub inode: u64,
    /// Device of the inode.
    #[serde(default)]
    pub device: u64,
    /// Hard link count.
    #[serde(default)]
    pub links: u64,
    /// Size in bytes (files).
    #[serde(default)]
    pub size: u64,
    /// Chunk ids, in order (files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<BlobId>,
    /// Content-list blobs, in order, for files with very many chunks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_lists: Vec<BlobId>,
    /// Tree blob of a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<BlobId>,
    /// Symlink target (lossy UTF-8 when `raw_link_target` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
    /// The exact target bytes, hex, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_link_target: Option<String>,
    /// A device's (major, minor) number (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<(u32, u32)>,
    /// Extended attributes, sorted by name (format 2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    /// A sparse file's data extents, `[offset, length]` in order (format 2): its content
    /// is these regions one after another, and the rest of its `size` are holes. Empty: the
    /// content is the whole file. A file that is all hole has the one extent `[size, 0]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extents: Vec<(u64, u64)>,
    /// File flags as `FS_IOC_GETFLAGS` gives them (`chattr`; format 2).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub flags: u32,
    /// The file changed while it was read: its content is what was read (format 2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub changed: bool,
    /// The modification time as `[seconds, nanoseconds]` when `mtime_ns` cannot hold it
    /// (before 1677 or after 2262; `mtime_ns` is then saturated) (format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<(i64, u32)>,
}

impl Node {
    /// The exact name bytes.
    pub fn name_bytes(&self) -> Vec<u8> {
        self.raw_name
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .unwrap_or_else(|| self.name.as_bytes().to_vec())
    }

    /// The modification time as (seconds, nanoseconds): `mtime` when set, else from
    /// `mtime_ns`.
    pub fn mtime_parts(&self) -> (i64, u32) {
        self.mtime.unwrap_or((
            self.mtime_ns.div_euclid(1_000_000_000),
            self.mtime_ns.rem_euclid(1_000_000_000) as u32,
        ))
    }

    /// Why the extents cannot describe this file (a crafted or damaged node): out of
    /// order, overlapping, or past its size. `None` when they can.
    pub fn extents_problem(&self) -> Option<String> {
        let mut end = 0u64;
        for &(off, len) in &self.extents {
            let Some(e) = off.checked_add(len) else {
                return Some(format!("data extent [{off}, {len}] overflows"));
            };
            if off < end {
                return Some(format!(
                    "data extent [{off}, {len}] overlaps or precedes the one before it"
                ));
            }
            if e > self.size {
                return Some(format!(
                    "data extent [{off}, {len}] ends past the file's size {}",
                    self.size
                ));
            }
            end = e;
        }
        None
    }

    /// The number of content bytes the file holds: its data regions' total.
    pub fn data_size(&self) -> u64 {
        if self.extents.is_empty() {
            self.size
        } else {
            self.extents.iter().map(|(_, l)| l).sum()
        }
    }

    /// Where each of the content's bytes goes in the file: `(file offset, length)` of the
    /// regions the content fills, in order (the whole file when it has no extents).
    pub fn data_regions(&self) -> Vec<(u64, u64)> {
        if self.extents.is_empty() {
            vec![(0, self.size)]
        } else {
            self.extents.clone()
        }
    }

    /// The exact link target bytes.
    pub fn link_target_bytes(&self) -> Option<Vec<u8>> {
        match (&self.raw_link_target, &self.link_target) {
            (Some(h), _) => hex::decode(h).ok(),
            (None, Some(t)) => Some(t.as_bytes().to_vec()),
            (None, None) => None,
        }
    }
}

/// A directory listing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    /// Entries sorted by name bytes.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// Sorts entries by name bytes (the canonical order).
    pub fn sort(&mut self) {
        self.nodes.sort_by_key(|a| a.name_bytes());
    }

    /// Canonical JSON bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a tree always serializes")
    }
}

/// Encodes a content-list blob: the ids, 32 bytes each.
pub fn encode_content_list(ids: &[BlobId]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.0).collect()
}

/// Decodes a content-list blob.
pub fn decode_content_list(b: &[u8]) -> Option<Vec<BlobId>> {
    if !b.len().is_multiple_of(32) {
        return None;
    }
    Some(
        b.chunks_exact(32)
            .map(|c| {
                let mut id = [0u8; 32];
                id.copy_from_slice(c);
                BlobId(id)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn an_unknown_kind_and_unknown_fields_still_decode() {
        let json = r#"{"nodes":[{"name":"x","type":"whiteout","mode":420,"uid":0,"gid":0,"mtime_ns":0,"future_field":[1,2]}]}"#;
        let t: Tree = serde_json::from_str(json).unwrap();
        assert_eq!(t.nodes[0].kind, NodeKind::Unknown);
    }

    fn kind() -> impl Strategy<Value = NodeKind> {
        prop_oneof![
            Just(NodeKind::File),
            Just(NodeKind::Dir),
            Just(NodeKind::Symlink),
            Just(NodeKind::Fifo),
            Just(NodeKind::CharDevice),
            Just(NodeKind::BlockDevice),
        ]
    }

    fn node() -> impl Strategy<Value = Node> {
        (
            (
                proptest::collection::vec(any::<u8>(), 1..40),
                kind(),
                0u32..0o7777,
                any::<i64>(),
                proptest::collection::vec(any::<[u8; 32]>(), 0..4),
                any::<u64>(),
            ),
            (
                proptest::option::of((any::<u32>(), any::<u32>())),
                proptest::collection::vec(
                    (
                        proptest::collection::vec(any::<u8>(), 1..20),
                        proptest::collection::vec(any::<u8>(), 0..64),
                    ),
                    0..3,
                ),
                proptest::collection::vec((any::<u64>(), any::<u64>()), 0..4),
                any::<u32>(),
                any::<bool>(),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 1..30)),
            ),
        )
            .prop_map(
                |(
                    (name, kind, mode, mtime_ns, content, size),
                    (rdev, xattrs, extents, flags, changed, target),
                )| {
                    let (name, raw_name) =
                        crate::source::meta::encode_name(std::ffi::OsStr::from_bytes(&name));
                    let (link_target, raw_link_target) = match target {
                        Some(t) => {
                            let (t, raw) =
                                crate::source::meta::encode_name(std::ffi::OsStr::from_bytes(&t));
                            (Some(t), raw)
                        }
                        None => (None, None),
                    };
                    let mut xattrs: Vec<Xattr> =
                        xattrs.iter().map(|(n, v)| Xattr::new(n, v)).collect();
                    xattrs.sort_by_key(Xattr::name_bytes);
                    Node {
                        name,
                        raw_name,
                        kind,
                        mode,
                        uid: 1,
                        gid: 2,
                        user: "u".into(),
                        group: String::new(),
                        mtime_ns,
                        ctime_ns: 0,
                        inode: 3,
                        device: 4,
                        links: 1,
                        size,
                        content: content.into_iter().map(BlobId).collect(),
                        content_lists: vec![],
                        subtree: None,
                        link_target,
                        raw_link_target,
                        rdev,
                        xattrs,
                        extents,
                        flags,
                        changed,
                        mtime: None,
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn tree_codec_round_trips(nodes in proptest::collection::vec(node(), 0..10)) {
            let mut t = Tree { nodes };
            t.sort();
            let back: Tree = serde_json::from_slice(&t.to_bytes()).unwrap();
            prop_assert_eq!(&back, &t);
            // Names, targets and attribute names come back byte for byte.
            for (a, b) in back.nodes.iter().zip(&t.nodes) {
                prop_assert_eq!(a.name_bytes(), b.name_bytes());
                prop_assert_eq!(a.link_target_bytes(), b.link_target_bytes());
                for (x, y) in a.xattrs.iter().zip(&b.xattrs) {
                    prop_assert_eq!(x.name_bytes(), y.name_bytes());
                    prop_assert_eq!(x.value_bytes(), y.value_bytes());
                }
            }
        }

        #[test]
        fn a_plain_node_is_written_as_in_format_1(n in node()) {
            // No format-2 field appears unless it has something to say: unchanged trees of
            // plain files keep deduplicating against trees written before.
            let mut n = n;
            n.kind = NodeKind::File;
            n.rdev = None;
            n.xattrs.clear();
            n.extents.clear();
            n.flags = 0;
            n.changed = false;
            let json = serde_json::to_string(&n).unwrap();
            for key in ["rdev", "xattrs", "extents", "flags", "changed"] {
                let quoted = format!("\"{key}\"");
                prop_assert!(!json.contains(&quoted), "{}", json);
            }
        }

        #[test]
        fn content_list_round_trips(ids in proptest::collection::vec(any::<[u8; 32]>(), 0..50)) {
            let ids: Vec<BlobId> = ids.into_iter().map(BlobId).collect();
            prop_assert_eq!(decode_content_list(&encode_content_list(&ids)).unwrap(), ids);
        }
    }
}
