//! Restores an InfluxDB snapshot into a running server through its backup protocol: per
//! database, the metastore part first (the server creates the database, its retention
//! policies and empty shards, and says which new shard is which old one), then each
//! shard's TSM files streamed from the repository as a tar archive. Nothing is staged.
//!
//! What the protocol does not carry is done over HTTP: continuous queries are created
//! again, and deletions a shard still held as tombstones are replayed as `DELETE`. A
//! tombstone belongs to one TSM file and holds deletions made after that file was
//! written; so a shard's files are uploaded in the order they were written (generation,
//! then sequence), and each tombstone's deletes are replayed right after the files up to
//! its own are installed — before any file written later is, whose points the delete
//! never touched. Each delete is bounded to its shard's time range; a shard with
//! tombstones overlapping another retention policy's shard in time is refused before
//! anything changes (a `DELETE` has no retention policy). Last, the counts per
//! measurement and field are compared with those recorded at backup.

use std::collections::BTreeMap;
use std::io::{self, Read};

use crate::pipeline::BlobId;
use crate::repo::{
    Index, InfluxCounts, InfluxDatabase, Node, NodeKind, RepoError, Repository, Snapshot,
};
use crate::source::influx::http::{quote_ident, quote_str, HttpApi, HttpError};
use crate::source::influx::meta::Data;
use crate::source::influx::rpc::{Rpc, RpcError};
use crate::source::influx::{tombstone, DATABASES_DIR, METASTORE_FILE};

/// How many shards the metastore gives database `db`: a database without any is created
/// with none, and the server's answer then holds no pairs.
fn known_shards(data: &Data, db: &str) -> usize {
    data.database(db).map_or(0, |d| d.all_shards().count())
}

/// Why an InfluxDB restore failed.
#[derive(Debug, thiserror::Error)]
pub enum InfluxRestoreError {
    /// Not an InfluxDB snapshot.
    #[error("snapshot {0} is not an InfluxDB backup")]
    NotInflux(String),
    /// A database asked for that the snapshot lacks.
    #[error("database {db:?} is not in snapshot {snapshot} (it holds: {have})")]
    NotInSnapshot {
        /// Asked for.
        db: String,
        /// Snapshot.
        snapshot: String,
        /// What it holds.
        have: String,
    },
    /// Databases that exist on the server: nothing was changed.
    #[error("database(s) {0} already exist on the server; nothing was changed (restore under another name with --rename OLD=NEW, or drop them first)")]
    Exists(String),
    /// A `--rename` not of the form OLD=NEW, or naming no restored database.
    #[error("--rename {0:?}: {1}")]
    Rename(String, String),
    /// Tombstones whose deletes cannot be replayed exactly.
    #[error("shard {shard} of {db}.{rp} holds deletions (tombstones) over a time range shared with shard {other} of retention policy {other_rp}; a DELETE cannot be limited to one retention policy, so replaying them could delete points of the other. Nothing was changed (restore one retention policy at a time with --influx-database after dropping the other, or compact the shard on the source before the backup)")]
    TombstoneOverlap {
        /// Database.
        db: String,
        /// Retention policy.
        rp: String,
        /// Shard.
        shard: u64,
        /// The other shard.
        other: u64,
        /// Its retention policy.
        other_rp: String,
    },
    /// The snapshot's tree lacks what its record names.
    #[error("snapshot {snapshot}: {why}")]
    Incomplete {
        /// Snapshot.
        snapshot: String,
        /// What is missing.
        why: String,
    },
    /// Counts after the restore outside what the backup saw.
    #[error("restored database {db:?} does not hold what was backed up: {diff}")]
    Counts {
        /// The restored database.
        db: String,
        /// The differences.
        diff: String,
    },
    /// A tombstone file that did not decode.
    #[error("shard {shard} file {file}: {why}")]
    Tombstone {
        /// Shard.
        shard: u64,
        /// File.
        file: String,
        /// Why.
        why: String,
    },
    /// A failure after the server created the database: it holds only part of the data.
    #[error("{cause}; database {db} was created on the server and holds only part of the snapshot: drop it (DROP DATABASE) before restoring again{}", if done.is_empty() { String::new() } else { format!(" (restored completely before it: {done})") })]
    Partial {
        /// The database left incomplete.
        db: String,
        /// Databases this run restored completely.
        done: String,
        /// What failed (shown in the message, so not a `source`).
        cause: Box<InfluxRestoreError>,
    },
    /// The RPC port.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The HTTP API.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The repository.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Uploading a shard.
    #[error("uploading shard {shard}: {source}")]
    Upload {
        /// New shard id.
        shard: u64,
        /// Why.
        source: io::Error,
    },
}

/// What to restore where.
pub struct InfluxRestore<'a> {
    /// The server's RPC port.
    pub rpc: Rpc,
    /// Its HTTP API.
    pub http: HttpApi,
    /// Databases (all of the snapshot when empty).
    pub databases: Vec<String>,
    /// OLD=NEW names.
    pub rename: BTreeMap<String, String>,
    /// Only say what would be done.
    pub dry_run: bool,
    /// Progress lines go here (stdout unless quiet).
    pub say: &'a mut dyn FnMut(String),
}

/// What a restore did (or would do).
#[derive(Debug, Default, serde::Serialize)]
pub struct InfluxRestoreReport {
    /// (snapshot database, restored name, shards, files, bytes).
    pub databases: Vec<RestoredDatabase>,
    /// Users recorded in the snapshot the protocol cannot create.
    pub users_not_restored: Vec<String>,
    /// Continuous queries that could not be created again: (name, why).
    pub continuous_queries_failed: Vec<(String, String)>,
    /// Whether anything was changed.
    pub dry_run: bool,
}

/// One restored database.
#[derive(Debug, Default, serde::Serialize)]
pub struct RestoredDatabase {
    /// Name in the snapshot.
    pub from: String,
    /// Name on the server.
    pub to: String,
    /// Retention policies.
    pub retention_policies: Vec<String>,
    /// Shards uploaded.
    pub shards: usize,
    /// TSM files uploaded.
    pub files: u64,
    /// Bytes uploaded.
    pub bytes: u64,
    /// Deletes replayed from tombstones.
    pub deletes_replayed: u64,
    /// Continuous queries created.
    pub continuous_queries: usize,
}

/// A shard's files from the snapshot, in the order they were written.
struct ShardFiles {
    rp: String,
    old_id: u64,
    start_ns: i64,
    end_ns: i64,
    counts_before: InfluxCounts,
    counts_after: InfluxCounts,
    /// (generation, sequence, tsm node, its tombstone node if any).
    files: Vec<(u64, u64, Node, Option<Node>)>,
}

fn file_order(name: &str) -> Option<(u64, u64)> {
    let stem = name
        .strip_suffix(".tsm")
        .or_else(|| name.strip_suffix(".tombstone"))?;
    let (g, s) = stem.split_once('-')?;
    Some((g.parse().ok()?, s.parse().ok()?))
}

/// Restores snapshot `snap` (id `id`) into the server.
///
/// # Errors
/// See [`InfluxRestoreError`]; refusals come before any change.
pub fn restore_influx(
    repo: &Repository,
    index: &Index,
    id: &BlobId,
    snap: &Snapshot,
    req: InfluxRestore<'_>,
) -> Result<InfluxRestoreReport, InfluxRestoreError> {
    let short = id.short();
    let meta = snap
        .influxdb
        .as_ref()
        .ok_or_else(|| InfluxRestoreError::NotInflux(short.clone()))?;
    let incomplete = |why: String| InfluxRestoreError::Incomplete {
        snapshot: short.clone(),
        why,
    };
    let have: Vec<&str> = meta.databases.iter().map(|d| d.name.as_str()).collect();
    let chosen: Vec<&InfluxDatabase> = if req.databases.is_empty() {
        meta.databases.iter().collect()
    } else {
        let mut v = vec![];
        for d in &req.databases {
            v.push(
                meta.databases
                    .iter()
                    .find(|x| x.name == *d)
                    .ok_or_else(|| InfluxRestoreError::NotInSnapshot {
                        db: d.clone(),
                        snapshot: short.clone(),
                        have: have.join(", "),
                    })?,
            );
        }
        v
    };
    for old in req.rename.keys() {
        if !chosen.iter().any(|d| d.name == *old) {
            return Err(InfluxRestoreError::Rename(
                old.clone(),
                "names no database this restore restores".into(),
            ));
        }
    }
    let target = |d: &str| req.rename.get(d).cloned().unwrap_or_else(|| d.to_string());
    // Everything is checked before anything is created: the names in the server's whole
    // metastore (SHOW DATABASES lists only what the user may see), and each target once.
    let mut targets: Vec<String> = chosen.iter().map(|d| target(&d.name)).collect();
    targets.sort();
    if let Some(w) = targets.windows(2).find(|w| w[0] == w[1]) {
        return Err(InfluxRestoreError::Rename(
            w[0].clone(),
            "two databases would be restored under this name".into(),
        ));
    }
    let existing: Vec<String> = Data::parse(&req.rpc.metastore()?.data)
        .map_err(|why| InfluxRestoreError::Incomplete {
            snapshot: format!("the target server's metastore ({})", req.rpc.addr()),
            why,
        })?
        .databases
        .into_iter()
        .map(|d| d.name)
        .collect();
    let clash: Vec<String> = chosen
        .iter()
        .map(|d| target(&d.name))
        .filter(|t| existing.contains(t))
        .collect();
    if !clash.is_empty() {
        return Err(InfluxRestoreError::Exists(clash.join(", ")));
    }
    let root = repo.load_tree(index, &snap.tree)?;
    let store_node = root
        .nodes
        .iter()
        .find(|n| n.name == METASTORE_FILE && n.kind == NodeKind::File)
        .ok_or_else(|| incomplete("no metastore in its tree".into()))?;
    let mut store = vec![];
    crate::restore::dump_file(repo, index, store_node, &mut store)
        .map_err(|e| incomplete(e.to_string()))?;
    let data = Data::parse(&store).map_err(incomplete)?;
    let mut plans = vec![];
    for d in &chosen {
        let shards = shard_files(repo, index, &root.nodes, d).map_err(|e| match e {
            Plan::Repo(e) => InfluxRestoreError::Repo(e),
            Plan::Missing(why) => incomplete(why),
        })?;
        check_tombstone_overlaps(d, &shards)?;
        let known: Vec<u64> = data
            .database(&d.name)
            .map(|x| x.all_shards().map(|(_, _, id)| id).collect())
            .unwrap_or_default();
        if let Some(s) = shards.iter().find(|s| !known.contains(&s.old_id)) {
            return Err(incomplete(format!(
                "shard {} of {}.{} is not in its metastore",
                s.old_id, d.name, s.rp
            )));
        }
        let cut = data
            .only_database(&d.name)
            .ok_or_else(|| incomplete(format!("database {} is not in its metastore", d.name)))?;
        plans.push((d, shards, cut));
    }
    let mut report = InfluxRestoreReport {
        dry_run: req.dry_run,
        users_not_restored: meta.users.clone(),
        ..Default::default()
    };
    let say = req.say;
    for (d, shards, cut) in plans {
        let to = target(&d.name);
        let mut done = RestoredDatabase {
            from: d.name.clone(),
            to: to.clone(),
            retention_policies: d
                .retention_policies
                .iter()
                .map(|r| r.name.clone())
                .collect(),
            shards: shards.len(),
            ..Default::default()
        };
        for s in &shards {
            for (_, _, tsm, _) in &s.files {
                done.files += 1;
                done.bytes += tsm.size;
            }
        }
        if req.dry_run {
            say(format!(
                "would create database {to} (from {}): retention policies {}, {} shards, {} TSM files ({} bytes), {} continuous queries",
                d.name,
                done.retention_policies.join(", "),
                done.shards,
                done.files,
                done.bytes,
                d.continuous_queries.len()
            ));
            report.databases.push(done);
            continue;
        }
        let pairs: BTreeMap<u64, u64> = req
            .rpc
            .metastore_update(&cut, &d.name, &to, known_shards(&data, &d.name))?
            .into_iter()
            .collect();
        // From here on the database exists: a failure says so, and what to do.
        let filled = (|| -> Result<(), InfluxRestoreError> {
            // Shards with tombstones first, so deletes replayed meet no file of another shard
            // restored after them.
            let mut order: Vec<&ShardFiles> = shards.iter().collect();
            order.sort_by_key(|s| (s.files.iter().all(|f| f.3.is_none()), s.old_id));
            for s in order {
                let new_id = *pairs.get(&s.old_id).ok_or_else(|| {
                    incomplete(format!(
                        "the server created no shard for shard {} of {}.{}",
                        s.old_id, d.name, s.rp
                    ))
                })?;
                done.deletes_replayed +=
                    upload_shard(repo, index, &req.rpc, &req.http, &to, s, new_id)?;
                // Each shard checked as soon as it is in: a failed install is named at once
                // (the server closes an upload the same way whether it succeeded or not).
                if !(s.counts_before.is_empty() && s.counts_after.is_empty()) {
                    let now = req.http.counts_in(&to, &s.rp, s.start_ns, s.end_ns)?;
                    if let Some(diff) = counts_outside(&s.counts_before, &s.counts_after, &now) {
                        return Err(InfluxRestoreError::Counts {
                            db: to.clone(),
                            diff: format!("shard {} ({}): {diff}", s.old_id, s.rp),
                        });
                    }
                }
            }
            // Snapshots from before per-shard counts: the database's, once.
            if shards
                .iter()
                .any(|s| s.counts_before.is_empty() && s.counts_after.is_empty())
            {
                let now = req.http.counts(&to, &done.retention_policies)?;
                if let Some(diff) = counts_outside(&d.counts_before, &d.counts_after, &now) {
                    return Err(InfluxRestoreError::Counts {
                        db: to.clone(),
                        diff,
                    });
                }
            }
            Ok(())
        })();
        if let Err(e) = filled {
            return Err(InfluxRestoreError::Partial {
                db: to,
                done: report
                    .databases
                    .iter()
                    .map(|d| d.to.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                cause: Box::new(e),
            });
        }
        // After the counts: a continuous query may write as soon as it exists.
        for (name, q) in &d.continuous_queries {
            let stmt = if to == d.name {
                q.clone()
            } else {
                retarget_cq(q, &d.name, &to)
            };
            match req.http.query(None, &stmt) {
                Ok(_) => done.continuous_queries += 1,
                Err(e) => report
                    .continuous_queries_failed
                    .push((name.clone(), e.to_string())),
            }
        }
        say(format!(
            "restored database {} as {to}: {} shards, {} TSM files ({} bytes), {} deletes replayed, {} continuous queries; counts match the backup",
            d.name, done.shards, done.files, done.bytes, done.deletes_replayed, done.continuous_queries
        ));
        report.databases.push(done);
    }
    Ok(report)
}

enum Plan {
    Repo(RepoError),
    Missing(String),
}

impl From<RepoError> for Plan {
    fn from(e: RepoError) -> Self {
        Plan::Repo(e)
    }
}

fn subdir(repo: &Repository, index: &Index, nodes: &[Node], name: &str) -> Result<Vec<Node>, Plan> {
    let n = nodes
        .iter()
        .find(|n| n.name == name && n.kind == NodeKind::Dir)
        .ok_or_else(|| Plan::Missing(format!("no directory {name:?} in its tree")))?;
    let sub = n
        .subtree
        .ok_or_else(|| Plan::Missing(format!("directory {name:?} without a subtree")))?;
    Ok(repo.load_tree(index, &sub)?.nodes)
}

fn shard_files(
    repo: &Repository,
    index: &Index,
    root: &[Node],
    d: &InfluxDatabase,
) -> Result<Vec<ShardFiles>, Plan> {
    let mut out = vec![];
    if d.shards.is_empty() {
        return Ok(out);
    }
    let dbs = subdir(repo, index, root, DATABASES_DIR)?;
    let db = subdir(repo, index, &dbs, &d.name)?;
    let mut rps: BTreeMap<&str, Vec<Node>> = BTreeMap::new();
    for s in &d.shards {
        if !rps.contains_key(s.retention_policy.as_str()) {
            rps.insert(
                &s.retention_policy,
                subdir(repo, index, &db, &s.retention_policy)?,
            );
        }
        let files = subdir(
            repo,
            index,
            &rps[s.retention_policy.as_str()],
            &s.id.to_string(),
        )?;
        let mut tombs: BTreeMap<(u64, u64), Node> = BTreeMap::new();
        let mut tsm = vec![];
        for f in files {
            match (file_order(&f.name), f.name.ends_with(".tsm")) {
                (Some(o), true) => tsm.push((o.0, o.1, f)),
                (Some(o), false) => {
                    tombs.insert(o, f);
                }
                // Anything else the server would skip too.
                (None, _) => {}
            }
        }
        tsm.sort_by_key(|(g, q, _)| (*g, *q));
        out.push(ShardFiles {
            rp: s.retention_policy.clone(),
            old_id: s.id,
            start_ns: s.start_ns,
            end_ns: s.end_ns,
            counts_before: s.counts_before.clone(),
            counts_after: s.counts_after.clone(),
            files: tsm
                .into_iter()
                .map(|(g, q, n)| {
                    let t = tombs.remove(&(g, q));
                    (g, q, n, t)
                })
                .collect(),
        });
    }
    Ok(out)
}

fn check_tombstone_overlaps(
    d: &InfluxDatabase,
    shards: &[ShardFiles],
) -> Result<(), InfluxRestoreError> {
    for s in shards
        .iter()
        .filter(|s| s.files.iter().any(|f| f.3.is_some()))
    {
        // Shard groups of one policy may overlap too (after its shard duration changed).
        for o in shards.iter().filter(|o| o.old_id != s.old_id) {
            if o.start_ns < s.end_ns && s.start_ns < o.end_ns {
                return Err(InfluxRestoreError::TombstoneOverlap {
                    db: d.name.clone(),
                    rp: s.rp.clone(),
                    shard: s.old_id,
                    other: o.old_id,
                    other_rp: o.rp.clone(),
                });
            }
        }
    }
    Ok(())
}

/// A file's content from the repository as a `Read`, one blob at a time.
struct BlobReader<'a> {
    repo: &'a Repository,
    index: &'a Index,
    ids: std::vec::IntoIter<BlobId>,
    buf: Vec<u8>,
    pos: usize,
    read: u64,
}

impl Read for BlobReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.ids.next() {
                None => return Ok(0),
                Some(id) => {
                    self.buf = self
                        .repo
                        .read_blob(self.index, &id)
                        .map_err(io::Error::other)?;
                    self.pos = 0;
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.read += n as u64;
        Ok(n)
    }
}

/// Uploads one shard's files in batches, replaying each tombstone's deletes after the
/// batch ending with its file; returns the deletes replayed.
fn upload_shard(
    repo: &Repository,
    index: &Index,
    rpc: &Rpc,
    http: &HttpApi,
    db: &str,
    s: &ShardFiles,
    new_id: u64,
) -> Result<u64, InfluxRestoreError> {
    let mut replayed = 0;
    let mut batch: Vec<&Node> = vec![];
    // Files get fresh names in write order (generation 1, 2, ... sequence 1): the server
    // installs an upload under its names, and a compaction of an earlier batch may have
    // made a file of the same name as a later one (its outputs have sequence 2 and up).
    let mut generation = 0u64;
    let upload_err = |source| InfluxRestoreError::Upload {
        shard: new_id,
        source,
    };
    for (i, (_, _, tsm, tomb)) in s.files.iter().enumerate() {
        batch.push(tsm);
        let last = i + 1 == s.files.len();
        if tomb.is_none() && !last {
            continue;
        }
        let up = rpc.shard_update(new_id)?;
        let mut b = tar::Builder::new(up);
        for n in batch.drain(..) {
            let mut h = tar::Header::new_gnu();
            h.set_size(n.size);
            h.set_mode(0o644);
            h.set_mtime(u64::try_from(n.mtime_ns / 1_000_000_000).unwrap_or(0));
            h.set_entry_type(tar::EntryType::Regular);
            generation += 1;
            let path = format!("{db}/{}/{new_id}/{generation:09}-{:09}.tsm", s.rp, 1);
            let mut r = BlobReader {
                repo,
                index,
                ids: repo.file_content(index, n)?.into_iter(),
                buf: vec![],
                pos: 0,
                read: 0,
            };
            b.append_data(&mut h, &path, (&mut r).take(n.size))
                .map_err(upload_err)?;
            if r.read != n.size {
                return Err(InfluxRestoreError::Incomplete {
                    snapshot: format!("file {}", n.name),
                    why: format!("its content is {} bytes, its size {}", r.read, n.size),
                });
            }
        }
        b.finish().map_err(upload_err)?;
        b.into_inner().map_err(upload_err)?.finish()?;
        if let Some(t) = tomb {
            let mut raw = vec![];
            crate::restore::dump_file(repo, index, t, &mut raw).map_err(|e| {
                InfluxRestoreError::Tombstone {
                    shard: s.old_id,
                    file: t.name.clone(),
                    why: e.to_string(),
                }
            })?;
            let dels = tombstone::parse(&raw).map_err(|why| InfluxRestoreError::Tombstone {
                shard: s.old_id,
                file: t.name.clone(),
                why,
            })?;
            replayed += replay(http, db, s, &dels, &t.name)?;
        }
    }
    Ok(replayed)
}

/// Replays deletions as `DELETE` statements matching exactly one series each (every tag
/// key of its measurement named, `''` for those it lacks), within the shard's time range.
fn replay(
    http: &HttpApi,
    db: &str,
    s: &ShardFiles,
    dels: &[tombstone::Deletion],
    file: &str,
) -> Result<u64, InfluxRestoreError> {
    let mut tag_keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut n = 0;
    for d in dels {
        let key =
            tombstone::split_series(&d.series).map_err(|why| InfluxRestoreError::Tombstone {
                shard: s.old_id,
                file: file.into(),
                why,
            })?;
        if !tag_keys.contains_key(&key.measurement) {
            let keys = http.tag_keys(db, &key.measurement)?;
            tag_keys.insert(key.measurement.clone(), keys);
        }
        let mut conds = vec![];
        for k in &tag_keys[&key.measurement] {
            let v = key
                .tags
                .iter()
                .find(|(tk, _)| tk == k)
                .map_or("", |(_, v)| v.as_str());
            conds.push(format!("{} = {}", quote_ident(k), quote_str(v)));
        }
        let min = d.min.max(s.start_ns);
        let max = d.max.min(s.end_ns.saturating_sub(1));
        if min > max {
            continue;
        }
        conds.push(format!("time >= {min}"));
        conds.push(format!("time <= {max}"));
        let stmt = format!(
            "DELETE FROM {} WHERE {}",
            quote_ident(&key.measurement),
            conds.join(" AND ")
        );
        http.query(Some(db), &stmt)?;
        n += 1;
    }
    Ok(n)
}

/// A continuous query's statement for database `to` instead of `from`: its `ON` clause,
/// and the `INTO` and `FROM` names qualified with `from` (the server stores them so).
fn retarget_cq(q: &str, from: &str, to: &str) -> String {
    let (bare, quoted, new) = (from.to_string(), quote_ident(from), quote_ident(to));
    let mut out = q.to_string();
    for name in [&quoted, &bare] {
        out = out.replace(&format!(" ON {name} "), &format!(" ON {new} "));
        for kw in [" INTO ", " FROM ", ", ", ","] {
            out = out.replace(&format!("{kw}{name}."), &format!("{kw}{new}."));
        }
    }
    out
}

/// Where `now` lies outside what the backup saw (`before` and `after` bound each count).
pub fn counts_outside(
    before: &InfluxCounts,
    after: &InfluxCounts,
    now: &InfluxCounts,
) -> Option<String> {
    let mut diffs = vec![];
    let names: std::collections::BTreeSet<&String> = before
        .keys()
        .chain(after.keys())
        .chain(now.keys())
        .collect();
    for m in names {
        let empty = BTreeMap::new();
        let (b, a, n) = (
            before.get(m).unwrap_or(&empty),
            after.get(m).unwrap_or(&empty),
            now.get(m).unwrap_or(&empty),
        );
        let fields: std::collections::BTreeSet<&String> =
            b.keys().chain(a.keys()).chain(n.keys()).collect();
        for f in fields {
            let (x, y, z) = (
                b.get(f).copied().unwrap_or(0),
                a.get(f).copied().unwrap_or(0),
                n.get(f).copied().unwrap_or(0),
            );
            if z < x.min(y) || z > x.max(y) {
                let want = if x == y {
                    x.to_string()
                } else {
                    format!("{}..{}", x.min(y), x.max(y))
                };
                diffs.push(format!("{m}.{f}: {z} values, backed up {want}"));
            }
        }
    }
    (!diffs.is_empty()).then(|| diffs.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(v: &[(&str, &str, u64)]) -> InfluxCounts {
        let mut c = InfluxCounts::new();
        for (m, f, n) in v {
            c.entry(m.to_string())
                .or_default()
                .insert(f.to_string(), *n);
        }
        c
    }

    #[test]
    fn counts_must_lie_between_those_before_and_after_the_backup() {
        let b = counts(&[("cpu", "value", 100), ("mem", "free", 5)]);
        let a = counts(&[("cpu", "value", 110), ("mem", "free", 5)]);
        assert_eq!(
            counts_outside(
                &b,
                &a,
                &counts(&[("cpu", "value", 105), ("mem", "free", 5)])
            ),
            None
        );
        let e =
            counts_outside(&b, &a, &counts(&[("cpu", "value", 99), ("mem", "free", 5)])).unwrap();
        assert!(
            e.contains("cpu.value: 99 values, backed up 100..110"),
            "{e}"
        );
        let e = counts_outside(&b, &a, &counts(&[("cpu", "value", 100)])).unwrap();
        assert!(e.contains("mem.free: 0 values, backed up 5"), "{e}");
        let e = counts_outside(
            &b,
            &a,
            &counts(&[("cpu", "value", 100), ("mem", "free", 5), ("new", "x", 1)]),
        )
        .unwrap();
        assert!(e.contains("new.x: 1 values, backed up 0"), "{e}");
    }

    #[test]
    fn files_are_ordered_by_generation_then_sequence() {
        assert_eq!(file_order("000000012-000000003.tsm"), Some((12, 3)));
        assert_eq!(file_order("000000012-000000003.tombstone"), Some((12, 3)));
        assert_eq!(file_order("fields.idx"), None);
    }

    #[test]
    fn a_continuous_query_is_moved_to_the_new_database() {
        let q = r#"CREATE CONTINUOUS QUERY cq1 ON db1 BEGIN SELECT mean(value) INTO db1.autogen.m5 FROM db1.autogen.cpu, "db1".autogen.mem GROUP BY time(5m) END"#;
        assert_eq!(
            retarget_cq(q, "db1", "db2"),
            r#"CREATE CONTINUOUS QUERY cq1 ON "db2" BEGIN SELECT mean(value) INTO "db2".autogen.m5 FROM "db2".autogen.cpu, "db2".autogen.mem GROUP BY time(5m) END"#
        );
    }
}
