//! The repository config: id, format version, chunker parameters, and the features a
//! reader must know. Sealed like every other object, so it is read only after a key file
//! has opened.
//!
//! Format version 2 is made to grow without a version 3: objects may gain optional fields
//! that readers ignore where ignoring is safe, and what is not safe to ignore is a named
//! feature — in the config (every reader of the repository must know it, or it refuses to
//! open) or in a snapshot (a reader that lacks it skips that snapshot when listing and
//! refuses to restore it). Version 1 repositories (no features) open and back up as before;
//! `backupd upgrade` makes them version 2, which binaries before it refuse at open.

use serde::{Deserialize, Serialize};

use crate::pipeline::ChunkerParams;

/// Format version new repositories get.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest format version this build reads and writes.
pub const OLDEST_VERSION: u32 = 1;

/// The repository's key files are version 2 and take their encryption keys from grants
/// in `generations/` bundles (decision 0014).
pub const KEY_GENERATIONS: &str = "key-generations";

/// Repository-wide features this build knows.
pub const KNOWN_REPOSITORY_FEATURES: &[&str] = &[KEY_GENERATIONS];

/// Contents of `config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Format version.
    pub version: u32,
    /// Random repository id, hex.
    pub id: String,
    /// Chunk size bounds.
    pub chunker: ChunkerParams,
    /// zstd level for new blobs.
    pub zstd_level: i32,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// Features every reader of this repository must know (version 2 on).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

impl Config {
    /// True when objects of format version 2 may be written (trees with extended
    /// attributes, special files, sparse files, file flags; snapshot features).
    pub fn is_v2(&self) -> bool {
        self.version >= 2
    }

    /// The first feature this build does not know, if any.
    pub fn unknown_feature(&self) -> Option<&str> {
        self.features
            .iter()
            .map(String::as_str)
            .find(|f| !KNOWN_REPOSITORY_FEATURES.contains(f))
    }
}
