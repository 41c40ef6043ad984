//! The data path: content-defined chunking, keyed blob ids, compression and sealing, and
//! the threaded stages that connect them with bounded channels.

pub mod blob;
pub mod chunker;
pub mod stages;

pub use blob::{BlobId, BlobKind};
pub use chunker::{Chunker, ChunkerParams};
