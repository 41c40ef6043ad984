//! Trees: one blob per directory, its entries sorted by name (JSON, then compressed and
//! sealed like any blob). A file's content is its list of data blob ids; a very long list
//! (a file of more than [`INLINE_CONTENT_MAX`] chunks, such as a 1 TB dump) is split into
//! content-list blobs of binary ids, so no node grows without bound.

use serde::{Deserialize, Serialize};

use crate::pipeline::BlobId;

/// Content-list size: a file with fewer chunk ids keeps them inline in its node; from this
/// many on, they go to content-list blobs of this many ids each.
pub const INLINE_CONTENT_MAX: usize = 4096;

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
}

impl Node {
    /// The exact name bytes.
    pub fn name_bytes(&self) -> Vec<u8> {
        self.raw_name
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .unwrap_or_else(|| self.name.as_bytes().to_vec())
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

    fn node() -> impl Strategy<Value = Node> {
        (
            "[a-z]{1,8}",
            0u32..0o7777,
            any::<i64>(),
            proptest::collection::vec(any::<[u8; 32]>(), 0..4),
            any::<u64>(),
        )
            .prop_map(|(name, mode, mtime_ns, content, size)| Node {
                name,
                raw_name: None,
                kind: NodeKind::File,
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
                link_target: None,
                raw_link_target: None,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn tree_codec_round_trips(nodes in proptest::collection::vec(node(), 0..10)) {
            let mut t = Tree { nodes };
            t.sort();
            let back: Tree = serde_json::from_slice(&t.to_bytes()).unwrap();
            prop_assert_eq!(back, t);
        }

        #[test]
        fn content_list_round_trips(ids in proptest::collection::vec(any::<[u8; 32]>(), 0..50)) {
            let ids: Vec<BlobId> = ids.into_iter().map(BlobId).collect();
            prop_assert_eq!(decode_content_list(&encode_content_list(&ids)).unwrap(), ids);
        }
    }
}
