//! Snapshots: the commit record of a backup. Written last, after every pack and index it
//! needs is durable, so a snapshot that exists always restores.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pipeline::BlobId;

/// What a backup reports when it ends (also stored in the snapshot).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupSummary {
    /// Files not in the parent snapshot.
    pub files_new: u64,
    /// Files in the parent whose metadata changed (re-read).
    pub files_changed: u64,
    /// Files reused from the parent without reading.
    pub files_unchanged: u64,
    /// Directories.
    pub dirs: u64,
    /// Content bytes read from the source.
    pub bytes_read: u64,
    /// Logical bytes of all files in the snapshot.
    pub bytes_total: u64,
    /// Plaintext bytes of blobs new to the repository.
    pub bytes_added: u64,
    /// Bytes written to packs (compressed and sealed).
    pub bytes_stored: u64,
    /// Blobs new to the repository.
    pub blobs_new: u64,
    /// Share of the snapshot's bytes already in the repository: 1 - bytes_added / bytes_total
    /// (0 = all new, 1 = nothing new).
    pub dedup_ratio: f64,
    /// Wall time.
    pub duration_secs: f64,
}

/// A snapshot as stored in `snapshots/<id>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// When the backup started.
    pub time: DateTime<Utc>,
    /// Host name (grouping, parent selection).
    pub host: String,
    /// User who ran it.
    #[serde(default)]
    pub username: String,
    /// Absolute source paths (or `/NAME` for stdin and commands).
    pub paths: Vec<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Root tree.
    pub tree: BlobId,
    /// Parent snapshot, if one was used.
    #[serde(default)]
    pub parent: Option<BlobId>,
    /// "files", "stdin" or "command".
    pub source: String,
    /// The command, for command sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Policy that made it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The backup's summary.
    #[serde(default)]
    pub summary: BackupSummary,
    /// backupd version that wrote it.
    pub program_version: String,
}
