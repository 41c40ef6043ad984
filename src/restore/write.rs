//! The data phase of a restore: each pack's needed blobs read with few ranged reads,
//! opened, and written at their places in every file that holds them — by name under the
//! file's directory, checking it is still the file the plan made.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::{Plan, PlannedBlob, PlannedFile};
use crate::backend::{BackendError, ObjectType};
use crate::dirfd;
use crate::pipeline::{blob, BlobId};
use crate::repo::{object_path, Repository};

/// Where (part of) a blob goes: `len` bytes from `from` in the blob, at `offset` in the
/// planned file `file`. A blob crossing the end of a data region is placed in pieces (a backup
/// never cuts one so, but the placement does not rely on it).
pub(super) struct BlobTarget {
    pub file: usize,
    pub offset: u64,
    pub from: u32,
    pub len: u32,
}

/// Reads ranges no more than this far apart as one.
const COALESCE_GAP: u32 = 1024 * 1024;

/// The block a `--sparse` restore leaves as a hole when it holds only zeros.
pub(super) const SPARSE_BLOCK: usize = 4096;

/// A restore worker's reusable buffers.
#[derive(Default)]
pub(super) struct Buffers {
    range: Vec<u8>,
    plain: Vec<u8>,
}

/// Fetches and writes the blobs planned from one pack. Failures are recorded per file.
pub(super) fn restore_pack(
    repo: &Repository,
    pack: &BlobId,
    blobs: &BTreeMap<u32, PlannedBlob>,
    plan: &Plan,
    failed: &Mutex<HashMap<usize, String>>,
    progress: &AtomicU64,
    bufs: &mut Buffers,
) {
    let name = pack.to_hex();
    let path = object_path(ObjectType::Pack, &name);
    // Each worker holds one ranged read at a time; a remote store gets more, smaller reads
    // in flight (throughput per connection is what limits it), a local disk fewer, larger.
    let max_range: u64 = if repo.backend().connections().is_some() {
        4 * 1024 * 1024
    } else {
        8 * 1024 * 1024
    };
    let fail = |targets: &[BlobTarget], why: &str| {
        let mut g = failed.lock().unwrap_or_else(|p| p.into_inner());
        for t in targets {
            g.entry(t.file).or_insert_with(|| why.to_string());
        }
    };
    let entries: Vec<(u32, &PlannedBlob)> = blobs.iter().map(|(o, b)| (*o, b)).collect();
    let mut i = 0;
    while i < entries.len() {
        let start = entries[i].0 as u64;
        let mut end = start + entries[i].1.length as u64;
        let mut j = i + 1;
        while let Some(&(off, b)) = entries.get(j) {
            let (off, blob_end) = (off as u64, off as u64 + b.length as u64);
            if off > end + COALESCE_GAP as u64 || blob_end - start > max_range {
                break;
            }
            end = end.max(blob_end);
            j += 1;
        }
        let mut todo = vec![&entries[i..j]];
        while let Some(group) = todo.pop() {
            let start = group[0].0 as u64;
            let end = group
                .iter()
                .map(|(off, b)| *off as u64 + b.length as u64)
                .max()
                .unwrap_or(start);
            let Buffers { range, plain } = &mut *bufs;
            match crate::backend::get_exact_range_into(
                &**repo.backend(),
                ObjectType::Pack,
                &name,
                start,
                end - start,
                range,
            ) {
                Ok(()) => {
                    for &(off, b) in group {
                        let lo = (off as u64 - start) as usize;
                        let sealed = &mut range[lo..lo + b.length as usize];
                        match blob::decode_in_place(
                            &repo.keys(),
                            b.kind,
                            &b.id,
                            sealed,
                            b.raw_length as usize,
                            plain,
                        ) {
                            Ok(data) => write_blob(data, &b.targets, plan, &fail, progress),
                            Err(e) => {
                                fail(&b.targets, &format!("{path}: corrupt or tampered ({e})"))
                            }
                        }
                    }
                }
                // A short read (a truncated pack) is retried blob by blob, so the intact
                // blobs before the cut are still restored. Any other failure (a missing
                // pack, an I/O error) would fail the same way for each blob.
                Err(BackendError::ShortRead { .. }) if group.len() > 1 => {
                    todo.extend(group.chunks(1).rev())
                }
                Err(e) => {
                    for (_, b) in group {
                        fail(&b.targets, &format!("{path}: {e}"));
                    }
                }
            }
        }
        i = j;
    }
}

/// Opens a planned file for writing, by name in its directory, checking it is still the
/// file the plan made.
pub(super) fn open_planned(plan: &Plan, f: &PlannedFile) -> io::Result<fs::File> {
    let dir = plan.table.open(f.dir)?;
    let (file, st) = dirfd::open_file_write(&*dir, OsStr::from_bytes(&f.name), false)?;
    if st.st_ino != f.ino {
        return Err(io::Error::other(
            "replaced by another file during the restore; not written",
        ));
    }
    Ok(file)
}

/// Opens a planned file for its metadata: for reading if it may be read, else for
/// writing (either carries chown, chmod, xattrs, times and flags), checking it is still
/// the file the plan made.
pub(super) fn open_planned_any(plan: &Plan, f: &PlannedFile) -> io::Result<fs::File> {
    let dir = plan.table.open(f.dir)?;
    let name = OsStr::from_bytes(&f.name);
    let (file, st) = match dirfd::open_file_read(&*dir, name) {
        Ok(file) => {
            let st = dirfd::fstat(&file)?;
            (file, st)
        }
        Err(_) => dirfd::open_file_write(&*dir, name, false)?,
    };
    if st.st_ino != f.ino {
        return Err(io::Error::other(
            "replaced by another file during the restore; its metadata was not applied",
        ));
    }
    Ok(file)
}

/// Writes `data` at `offset`; with `sparse`, zeros are holes instead: each piece up to a
/// block boundary (in the file) that holds only zeros is skipped in a new file (made at its
/// full size, all hole: the zeros are there already, and a block stays unallocated unless
/// a neighbouring blob writes data into it), and punched in an existing one.
fn write_region(
    f: &fs::File,
    data: &[u8],
    offset: u64,
    sparse: bool,
    existing: bool,
) -> io::Result<()> {
    if !sparse {
        return f.write_all_at(data, offset);
    }
    let mut pos = 0usize;
    while pos < data.len() {
        // To the next block boundary in the file, then block by block.
        let abs = offset + pos as u64;
        let to_boundary = SPARSE_BLOCK - (abs % SPARSE_BLOCK as u64) as usize;
        let n = to_boundary.min(data.len() - pos);
        let piece = &data[pos..pos + n];
        if piece.iter().all(|&b| b == 0) {
            if existing {
                crate::fsattr::punch_hole(f, abs, n as u64)
                    .or_else(|_| f.write_all_at(piece, abs))?;
            }
        } else {
            f.write_all_at(piece, abs)?;
        }
        pos += n;
    }
    Ok(())
}

/// Writes one decoded blob at its places in every file that holds it.
fn write_blob(
    plain: &[u8],
    targets: &[BlobTarget],
    plan: &Plan,
    fail: &dyn Fn(&[BlobTarget], &str),
    progress: &AtomicU64,
) {
    let mut written = 0u64;
    for t in targets {
        let f = &plan.files[t.file];
        let piece = &plain[t.from as usize..(t.from + t.len) as usize];
        let r = open_planned(plan, f)
            .and_then(|h| write_region(&h, piece, t.offset, plan.sparse, f.existing));
        if let Err(e) = r {
            fail(std::slice::from_ref(t), &format!("writing: {e}"));
        }
        written += t.len as u64;
    }
    progress.fetch_add(written, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_write_leaves_zero_blocks_as_holes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(64 << 20).unwrap();
        let mut data = vec![0u8; 32 << 20];
        data[5] = 1;
        data[(16 << 20) + 7] = 2;
        write_region(&f, &data, 4096 * 3, true, false).unwrap();
        f.sync_all().unwrap();
        use std::os::unix::fs::MetadataExt;
        let allocated = fs::metadata(&p).unwrap().blocks() * 512;
        assert!(allocated <= 64 * 1024, "{allocated} bytes allocated");
        let mut back = vec![0u8; data.len()];
        f.read_exact_at(&mut back, 4096 * 3).unwrap();
        assert_eq!(back, data);
        // Zeros that end a blob short of a block boundary, the next blob's zeros filling
        // the block: no block is allocated for them.
        let before = fs::metadata(&p).unwrap().blocks();
        let off = 48 << 20;
        write_region(&f, &vec![0u8; 1000], off + 100, true, false).unwrap();
        write_region(&f, &vec![0u8; 5000], off + 1100, true, false).unwrap();
        f.sync_all().unwrap();
        assert_eq!(fs::metadata(&p).unwrap().blocks(), before);
    }
}
