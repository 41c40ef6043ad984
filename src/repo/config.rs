//! The repository config: id, format version, chunker parameters. Sealed like every
//! other object, so it is read only after a key file has opened.

use serde::{Deserialize, Serialize};

use crate::pipeline::ChunkerParams;

/// Format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Contents of `config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
}
