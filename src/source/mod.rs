//! Backup sources: directory trees, single streams (stdin, a command's stdout), and
//! InfluxDB servers. Each feeds the write pipeline; the backup commits the snapshot.

pub mod files;
pub mod influx;
pub mod meta;
mod reader;
pub mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set by SIGINT/SIGTERM; sources stop at the next chunk and no snapshot is written.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The flag, for signal handlers.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}
