//! The write pipeline: callers hand plaintext blobs to a [`BlobSaver`]; seal workers
//! compress and encrypt them; one packer thread fills packs; uploader threads store them.
//! Every hop is a bounded channel, so memory is bounded by queue depth times blob size
//! whatever the input size.
//!
//! ```text
//! caller (hash, dedup) -> [seal queue] -> seal workers -> [pack queue] -> packer
//!                      -> [upload queue] -> uploaders -> backend.put (durable)
//! ```
//! A failure anywhere stores the first error and closes the channels, so every stage
//! stops; [`BlobSaver::finish`] returns that error.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::backend::{Backend, BackendError, Bytes, ObjectType};
use crate::crypto::MasterKeys;
use crate::pipeline::blob::BlobLimits;
use crate::pipeline::{blob, BlobId, BlobKind};
use crate::repo::index::IndexedPack;
use crate::repo::pack::{FinishedPack, PackBuilder};
use crate::repo::Index;

/// Why saving stopped.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Storing a pack failed.
    #[error("storing pack {pack}: {source}")]
    Backend {
        /// Pack id.
        pack: String,
        /// Why.
        source: BackendError,
    },
    /// The pipeline stopped after an earlier failure.
    #[error("the write pipeline stopped after an earlier error")]
    Stopped,
    /// A blob larger than readers accept ([`BlobLimits::ANY`]): a directory whose listing
    /// is above [`blob::MAX_TREE_BLOB`].
    #[error("a {kind} blob of {len} bytes is larger than the {max}-byte limit readers accept")]
    TooLarge {
        /// `data` or `tree`.
        kind: &'static str,
        /// Its plaintext length.
        len: usize,
        /// The limit.
        max: u32,
    },
}

/// Tuning of the pipeline.
#[derive(Clone, Copy, Debug)]
pub struct SaverOptions {
    /// Compress-and-seal threads.
    pub seal_workers: usize,
    /// Upload threads.
    pub uploaders: usize,
    /// A pack is closed once it reaches this many bytes.
    pub pack_size: usize,
    /// zstd level (0 = store raw).
    pub zstd_level: i32,
}

impl Default for SaverOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        SaverOptions {
            seal_workers: cores.clamp(1, 8),
            uploaders: 1,
            pack_size: 16 * 1024 * 1024,
            zstd_level: 1,
        }
    }
}

/// Counters of one save session.
#[derive(Debug, Default)]
pub struct SaverStats {
    /// Blobs new to the repository.
    pub blobs_new: AtomicU64,
    /// Their plaintext bytes.
    pub bytes_added: AtomicU64,
    /// Bytes of packs written.
    pub bytes_stored: AtomicU64,
    /// Packs written.
    pub packs: AtomicU64,
}

struct RawBlob {
    kind: BlobKind,
    id: BlobId,
    data: Vec<u8>,
}

struct SealedBlob {
    kind: BlobKind,
    id: BlobId,
    sealed: Vec<u8>,
    raw_length: u32,
}

struct Shared {
    keys: Arc<MasterKeys>,
    index: Arc<Index>,
    inflight: Mutex<HashSet<BlobId>>,
    error: Mutex<Option<SaveError>>,
    stopped: AtomicBool,
    done: Mutex<Vec<IndexedPack>>,
    stats: SaverStats,
}

impl Shared {
    fn fail(&self, e: SaveError) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

/// A cloneable handle that stores blobs through the pipeline.
#[derive(Clone)]
pub struct BlobSaver {
    shared: Arc<Shared>,
    tx: Option<Sender<RawBlob>>,
}

/// What a save session wrote.
pub struct SaveResult {
    /// Packs stored, with their blobs (to be indexed).
    pub packs: Vec<IndexedPack>,
    /// The first failure, if any.
    pub error: Option<SaveError>,
    /// Blobs new to the repository.
    pub blobs_new: u64,
    /// Their plaintext bytes.
    pub bytes_added: u64,
    /// Bytes of packs stored.
    pub bytes_stored: u64,
}

/// Owns the pipeline threads; `finish` drains and joins them.
pub struct SaverThreads {
    threads: Vec<JoinHandle<()>>,
}

impl BlobSaver {
    /// Starts the pipeline writing to `backend`, deduplicating against `index`.
    pub fn start(
        keys: Arc<MasterKeys>,
        index: Arc<Index>,
        backend: Arc<dyn Backend>,
        opts: SaverOptions,
    ) -> (BlobSaver, SaverThreads) {
        let shared = Arc::new(Shared {
            keys,
            index,
            inflight: Mutex::new(HashSet::new()),
            error: Mutex::new(None),
            stopped: AtomicBool::new(false),
            done: Mutex::new(Vec::new()),
            stats: SaverStats::default(),
        });
        let workers = opts.seal_workers.max(1);
        // Queue depths bound memory: at most `workers` raw blobs waiting, `workers` sealed
        // blobs waiting, one pack being filled and one pack per uploader in flight (a
        // rendezvous hand-off, so no finished pack waits in a queue).
        let (seal_tx, seal_rx) = bounded::<RawBlob>(workers);
        let (pack_tx, pack_rx) = bounded::<SealedBlob>(workers);
        let (up_tx, up_rx) = bounded::<FinishedPack>(0);
        let mut threads = vec![];
        for i in 0..workers {
            let rx = seal_rx.clone();
            let tx = pack_tx.clone();
            let sh = shared.clone();
            let level = opts.zstd_level;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("seal-{i}"))
                    .spawn(move || seal_worker(&sh, rx, tx, level))
                    .expect("spawning a thread"),
            );
        }
        drop(pack_tx);
        {
            let sh = shared.clone();
            let size = opts.pack_size;
            threads.push(
                std::thread::Builder::new()
                    .name("packer".into())
                    .spawn(move || packer(&sh, pack_rx, up_tx, size))
                    .expect("spawning a thread"),
            );
        }
        for i in 0..opts.uploaders.max(1) {
            let sh = shared.clone();
            let rx = up_rx.clone();
            let be = backend.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("upload-{i}"))
                    .spawn(move || uploader(&sh, rx, be.as_ref()))
                    .expect("spawning a thread"),
            );
        }
        (
            BlobSaver {
                shared,
                tx: Some(seal_tx),
            },
            SaverThreads { threads },
        )
    }

    /// Stores a blob unless the repository (or this session) already has it; returns its
    /// id and whether it was new. Blocks when the pipeline is full.
    ///
    /// # Errors
    /// `Stopped` once any stage has failed; `TooLarge` for a blob no reader would accept
    /// (it would be stored, and the snapshot holding it would not restore).
    pub fn save(&self, kind: BlobKind, data: Vec<u8>) -> Result<(BlobId, bool), SaveError> {
        if self.shared.stopped() {
            return Err(SaveError::Stopped);
        }
        let max = BlobLimits::ANY.max_len(kind);
        if data.len() > max as usize {
            return Err(SaveError::TooLarge {
                kind: kind.as_str(),
                len: data.len(),
                max,
            });
        }
        let id = BlobId(self.shared.keys.blob_id(&data));
        if self.shared.index.contains(&id) {
            return Ok((id, false));
        }
        {
            let mut g = self
                .shared
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if !g.insert(id) {
                return Ok((id, false));
            }
        }
        self.shared.stats.blobs_new.fetch_add(1, Ordering::Relaxed);
        self.shared
            .stats
            .bytes_added
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let tx = self.tx.as_ref().ok_or(SaveError::Stopped)?;
        tx.send(RawBlob { kind, id, data })
            .map_err(|_| SaveError::Stopped)?;
        Ok((id, true))
    }

    /// Live counters.
    pub fn stats(&self) -> &SaverStats {
        &self.shared.stats
    }

    /// True once a stage has failed.
    pub fn failed(&self) -> bool {
        self.shared.stopped()
    }

    /// Closes the input, waits for every pack to be stored, and returns the packs written
    /// (also after a failure, so that they can still be indexed). Every clone of this
    /// saver must have been dropped, or the stages never see the end of their input.
    pub fn finish(mut self, threads: SaverThreads) -> SaveResult {
        self.tx.take();
        for t in threads.threads {
            let _ = t.join();
        }
        let done = std::mem::take(&mut *self.shared.done.lock().unwrap_or_else(|p| p.into_inner()));
        let error = self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let st = &self.shared.stats;
        SaveResult {
            packs: done,
            error,
            blobs_new: st.blobs_new.load(Ordering::Relaxed),
            bytes_added: st.bytes_added.load(Ordering::Relaxed),
            bytes_stored: st.bytes_stored.load(Ordering::Relaxed),
        }
    }
}

fn seal_worker(sh: &Shared, rx: Receiver<RawBlob>, tx: Sender<SealedBlob>, level: i32) {
    for b in rx {
        if sh.stopped() {
            return;
        }
        let sealed = blob::encode(&sh.keys, b.kind, &b.id, &b.data, level);
        let msg = SealedBlob {
            kind: b.kind,
            id: b.id,
            sealed,
            raw_length: b.data.len() as u32,
        };
        drop(b.data);
        if tx.send(msg).is_err() {
            return;
        }
    }
}

fn packer(sh: &Shared, rx: Receiver<SealedBlob>, tx: Sender<FinishedPack>, pack_size: usize) {
    // Data and trees go to separate packs, so restore and check can fetch trees compactly.
    let mut data = PackBuilder::default();
    let mut trees = PackBuilder::default();
    for b in rx {
        if sh.stopped() {
            return;
        }
        let builder = if b.kind == BlobKind::Tree {
            &mut trees
        } else {
            &mut data
        };
        builder.add(b.kind, b.id, &b.sealed, b.raw_length);
        if builder.len() >= pack_size {
            let full = std::mem::take(builder);
            if tx.send(full.finish(&sh.keys)).is_err() {
                return;
            }
        }
    }
    for b in [data, trees] {
        if !b.is_empty() && tx.send(b.finish(&sh.keys)).is_err() {
            return;
        }
    }
}

fn uploader(sh: &Shared, rx: Receiver<FinishedPack>, backend: &dyn Backend) {
    for p in rx {
        if sh.stopped() {
            return;
        }
        let name = p.id.to_hex();
        let len = p.bytes.len() as u64;
        match backend.put(ObjectType::Pack, &name, Bytes::from(p.bytes)) {
            Ok(()) => {
                sh.stats.bytes_stored.fetch_add(len, Ordering::Relaxed);
                sh.stats.packs.fetch_add(1, Ordering::Relaxed);
                sh.done
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(IndexedPack {
                        pack: p.id,
                        entries: p.entries,
                    });
            }
            Err(source) => {
                sh.fail(SaveError::Backend { pack: name, source });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    #[test]
    fn a_tree_larger_than_readers_accept_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(d.path().join("repo"));
        backend.create_layout().unwrap();
        let (saver, threads) = BlobSaver::start(
            Arc::new(MasterKeys::generate()),
            Arc::new(Index::default()),
            Arc::new(backend),
            SaverOptions::default(),
        );
        // Zeroed and never touched before the check: no gigabyte is really written.
        let huge = vec![0u8; blob::MAX_TREE_BLOB as usize + 1];
        match saver.save(BlobKind::Tree, huge) {
            Err(SaveError::TooLarge { kind: "tree", .. }) => {}
            other => panic!("{other:?}"),
        }
        saver.save(BlobKind::Tree, b"{}".to_vec()).unwrap();
        let r = saver.finish(threads);
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.blobs_new, 1);
    }
}
