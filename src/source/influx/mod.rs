//! InfluxDB 1.x as a source: the metastore and every shard's files, read with the server's
//! own backup protocol ([`rpc`]) and streamed into the pipeline as they arrive — no
//! staging directory. Each TSM and tombstone file is a file of the snapshot's tree, under
//! `databases/<db>/<rp>/<shard id>/`, beside the metastore as the server gave it
//! (`metastore`, read after the shard lists) and its node description (`node.json`).
//!
//! A later backup asks each shard for the files changed since the parent's start (on the
//! server's clock). None: the shard is taken from the parent unread. Any: the shard is read
//! whole, since the protocol cannot say which older files compaction has removed, and a
//! snapshot must not hold a file the server no longer has. Every snapshot is therefore a
//! full restore point on its own.
//!
//! Counts per measurement and field: each shard read is counted from its own TSM files
//! as they stream by ([`tsm`]), exactly what the snapshot holds, with no work asked of the
//! server. Where the files cannot say (tombstones not compacted away, two files that may
//! hold one point twice, a file the walk cannot account for) the server counts over HTTP
//! instead: once, if nothing was written to the shard since the backup began (asked after
//! its read; the question flushes the server's cache, so a point written meanwhile shows
//! as a new file); otherwise before a second read of the shard and again after every
//! shard is read, and a restore's counts must lie between the two. A shard taken from the
//! parent keeps the parent's counts.

pub mod http;
pub mod meta;
pub mod rpc;
pub mod throwaway;
pub mod tombstone;
pub mod tsm;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use self::http::{HttpApi, HttpError};
use self::rpc::{Rpc, RpcError};
use super::files::FilesStats;
use super::reader::save_stream;
use super::CancelToken;
use crate::pipeline::chunker::Cutter;
use crate::pipeline::stages::{BlobSaver, SaveError};
use crate::pipeline::{BlobId, BlobKind};
use crate::repo::{
    Index, InfluxDatabase, InfluxMeta, InfluxRetentionPolicy, InfluxShard, Node, NodeKind,
    RepoError, Repository, Snapshot, Tree,
};

/// The tree entry holding the metastore.
pub const METASTORE_FILE: &str = "metastore";
/// The tree entry holding the node description.
pub const NODE_FILE: &str = "node.json";
/// The tree directory holding one directory per database (so no database name can clash
/// with the files beside it).
pub const DATABASES_DIR: &str = "databases";
/// The database InfluxDB keeps its own statistics in: never backed up unless named.
pub const INTERNAL_DB: &str = "_internal";
/// Attempts at a shard the server refuses or cuts short: it refuses while a delete or a
/// compaction has its snapshots disabled, and `influxd backup` retries too.
const SHARD_ATTEMPTS: u32 = 5;
/// Pause between them.
const SHARD_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Why an InfluxDB backup failed.
#[derive(Debug, thiserror::Error)]
pub enum InfluxError {
    /// The RPC port.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The HTTP API.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// A database asked for that the server does not have.
    #[error("database {db:?} does not exist on the InfluxDB server at {addr} (it has: {have})")]
    NoDatabase {
        /// Asked for.
        db: String,
        /// Server.
        addr: String,
        /// What it has.
        have: String,
    },
    /// A shard's stream broke or was not a tar archive.
    #[error("reading {what}: {why}; no snapshot was written")]
    Stream {
        /// Which shard, from where.
        what: String,
        /// Why.
        why: String,
    },
    /// The metastore did not decode.
    #[error("the metastore from {addr}: {why}")]
    Meta {
        /// Server.
        addr: String,
        /// Why.
        why: String,
    },
    /// A format-1 repository.
    #[error("InfluxDB backups need a format-2 repository: run `backupd upgrade` first")]
    NeedsFormat2,
    /// SIGINT/SIGTERM.
    #[error("interrupted; no snapshot was written")]
    Interrupted,
    /// The pipeline.
    #[error(transparent)]
    Save(#[from] SaveError),
    /// The repository (the parent's trees).
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// An InfluxDB server to back up.
pub struct InfluxSource {
    /// The RPC port (`host:8088`).
    pub rpc: Rpc,
    /// The HTTP API (counts).
    pub http: HttpApi,
    /// Databases; all but `_internal` when empty.
    pub databases: Vec<String>,
}

/// One InfluxDB backup's inputs.
pub struct InfluxJob<'a> {
    /// The repository.
    pub repo: &'a Repository,
    /// The index (to read the parent's trees).
    pub index: Arc<Index>,
    /// The server.
    pub source: &'a InfluxSource,
    /// The parent snapshot, if any (of this server).
    pub parent: Option<&'a Snapshot>,
    /// Stop flag.
    pub cancel: CancelToken,
    /// Live counters.
    pub stats: Arc<FilesStats>,
}

impl super::Source for InfluxSource {
    fn kind(&self) -> &'static str {
        "influxdb"
    }

    fn paths(&self) -> Vec<String> {
        snapshot_paths(self)
    }

    /// An earlier backup of the same server and databases.
    fn is_parent(&self, host: &str, s: &Snapshot) -> bool {
        s.host == host
            && s.source == "influxdb"
            && s.influxdb
                .as_ref()
                .is_some_and(|m| m.rpc == self.rpc.addr())
            && s.paths == snapshot_paths(self)
    }

    fn read(
        &self,
        ctx: &super::ReadContext<'_>,
    ) -> Result<super::SourceOutput, super::SourceError> {
        let (tree, meta) = backup_influx(
            InfluxJob {
                repo: ctx.repo,
                index: ctx.index.clone(),
                source: self,
                parent: ctx.parent,
                cancel: ctx.cancel.clone(),
                stats: ctx.stats.clone(),
            },
            ctx.saver,
        )?;
        Ok(super::SourceOutput {
            influxdb: Some(meta),
            ..super::SourceOutput::tree_only(tree)
        })
    }
}

/// The snapshot's `paths`: the server and the databases asked for.
pub fn snapshot_paths(source: &InfluxSource) -> Vec<String> {
    let mut dbs = source.databases.clone();
    dbs.sort();
    dbs.dedup();
    if dbs.is_empty() {
        vec![format!("influxdb://{}", source.rpc.addr())]
    } else {
        dbs.iter()
            .map(|d| format!("influxdb://{}/{d}", source.rpc.addr()))
            .collect()
    }
}

/// A directory being built: entries by name (so they come out sorted).
#[derive(Default)]
struct DirBuild {
    entries: BTreeMap<Vec<u8>, Entry>,
}

enum Entry {
    Node(Box<Node>),
    Dir(DirBuild),
}

impl DirBuild {
    fn dir(&mut self, name: &str) -> &mut DirBuild {
        match self
            .entries
            .entry(name.as_bytes().to_vec())
            .or_insert_with(|| Entry::Dir(DirBuild::default()))
        {
            Entry::Dir(d) => d,
            Entry::Node(_) => unreachable!("names of files and directories do not collide here"),
        }
    }

    fn put(&mut self, node: Node) {
        self.entries
            .insert(node.name.as_bytes().to_vec(), Entry::Node(Box::new(node)));
    }

    fn save(self, saver: &BlobSaver, stats: &FilesStats) -> Result<BlobId, SaveError> {
        let mut nodes = vec![];
        for (name, e) in self.entries {
            match e {
                Entry::Node(n) => nodes.push(*n),
                Entry::Dir(d) => {
                    stats.dirs.fetch_add(1, Ordering::Relaxed);
                    let sub = d.save(saver, stats)?;
                    let mut n = plain_node(&String::from_utf8_lossy(&name), NodeKind::Dir, 0);
                    n.mode = 0o755;
                    n.subtree = Some(sub);
                    nodes.push(n);
                }
            }
        }
        Ok(saver.save(BlobKind::Tree, Tree { nodes }.to_bytes())?.0)
    }
}

fn plain_node(name: &str, kind: NodeKind, mtime_ns: i64) -> Node {
    Node {
        name: name.into(),
        kind,
        mode: 0o644,
        mtime_ns,
        links: 1,
        ..Node::default()
    }
}

/// Counts the bytes it passes and how many zero bytes end them (a tar archive ends with
/// two zero blocks; a stream cut at an entry's boundary does not).
struct Tracked<R> {
    inner: R,
    trailing_zeros: u64,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        for &b in &buf[..n] {
            self.trailing_zeros = if b == 0 { self.trailing_zeros + 1 } else { 0 };
        }
        Ok(n)
    }
}

/// Backs up the server; returns the root tree and what the snapshot records.
///
/// # Errors
/// The server unreachable or refusing, a database it lacks, a stream cut short, an
/// interrupt, or the pipeline failing. Nothing is committed by this function.
pub fn backup_influx(
    job: InfluxJob<'_>,
    saver: &BlobSaver,
) -> Result<(BlobId, InfluxMeta), InfluxError> {
    if !job.repo.config().is_v2() {
        return Err(InfluxError::NeedsFormat2);
    }
    let src = job.source;
    let addr = src.rpc.addr().to_string();
    let (server_time, server_version) = src.http.ping()?;
    let parse = |store: &rpc::Metastore| {
        meta::Data::parse(&store.data).map_err(|why| InfluxError::Meta {
            addr: addr.clone(),
            why,
        })
    };
    let first = src.rpc.metastore()?;
    let data = parse(&first)?;
    let have: Vec<&str> = data.databases.iter().map(|d| d.name.as_str()).collect();
    let mut names: Vec<String> = if src.databases.is_empty() {
        have.iter()
            .filter(|d| **d != INTERNAL_DB)
            .map(|d| d.to_string())
            .collect()
    } else {
        src.databases.clone()
    };
    names.sort();
    names.dedup();
    for n in &names {
        if data.database(n).is_none() {
            return Err(InfluxError::NoDatabase {
                db: n.clone(),
                addr: addr.clone(),
                have: if have.is_empty() {
                    "no databases".into()
                } else {
                    have.join(", ")
                },
            });
        }
    }
    // The shard lists, then the metastore again: a shard group created meanwhile (a group
    // boundary passed, points written in the past) is then in the metastore the snapshot
    // keeps, with its time range.
    let mut listed: Vec<Vec<(String, String, u64)>> = vec![];
    for name in &names {
        listed.push(
            src.rpc
                .shard_paths(name)?
                .iter()
                .filter_map(|p| rpc::parse_shard_path(p))
                .filter(|(db, _, _)| db == name)
                .collect(),
        );
    }
    let (store, data) = {
        let mut attempt = 0;
        loop {
            let store = src.rpc.metastore()?;
            let data = parse(&store)?;
            let missing = names.iter().zip(&listed).find_map(|(name, shards)| {
                let known: Vec<u64> = data
                    .database(name)
                    .map(|d| d.all_shards().map(|(_, _, id)| id).collect())
                    .unwrap_or_default();
                shards
                    .iter()
                    .find(|(_, _, id)| !known.contains(id))
                    .map(|(_, _, id)| *id)
            });
            match missing {
                None => break (store, data),
                Some(id) if attempt >= 3 => {
                    return Err(InfluxError::Meta {
                        addr: addr.clone(),
                        why: format!("shard {id} is on the server but not in its metastore"),
                    })
                }
                Some(_) => {
                    attempt += 1;
                    std::thread::sleep(SHARD_RETRY_PAUSE);
                }
            }
        }
    };
    let cutter = Cutter::new(job.repo.config().chunker, job.repo.keys().gear_table());
    let mut root = DirBuild::default();
    let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
    for (name, bytes) in [(METASTORE_FILE, &store.data), (NODE_FILE, &store.node)] {
        let (content, lists, size) = save_stream(
            &bytes[..],
            saver,
            &cutter,
            &job.cancel,
            &job.stats.bytes_read,
        )
        .map_err(|e| stopped(e, &job.cancel))?;
        let mut n = plain_node(name, NodeKind::File, now_ns);
        n.mode = 0o600;
        (n.size, n.content, n.content_lists) = (size, content, lists);
        job.stats.files_new.fetch_add(1, Ordering::Relaxed);
        job.stats.bytes_total.fetch_add(size, Ordering::Relaxed);
        root.put(n);
    }
    let parent_meta = job.parent.and_then(|p| p.influxdb.as_ref());
    let parent_tree = job.parent.map(|p| p.tree);
    // Files changed since the parent began, on the server's clock (its Date is to the
    // second: one second earlier, so nothing of that second is taken for old).
    let since = parent_meta.and_then(|m| m.server_time).map(|t| {
        (t - chrono::Duration::seconds(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    });
    // Which shards the parent holds have no file changed since it began: asked of all of
    // them at once, a few connections at a time (each question is a round trip in which
    // the server flushes the shard's cache and lists its files).
    let unchanged_since_parent: HashSet<u64> = match (&since, parent_meta) {
        (Some(since), Some(pm)) => {
            let candidates: Vec<u64> = listed
                .iter()
                .flatten()
                .filter(|(db, rp, id)| parent_shard(pm, db, rp, *id).is_some())
                .map(|(_, _, id)| *id)
                .collect();
            let answers = in_parallel(&candidates, |id| nothing_since(src, *id, since))?;
            candidates
                .into_iter()
                .zip(answers)
                .filter_map(|(id, unchanged)| unchanged.then_some(id))
                .collect()
        }
        _ => HashSet::new(),
    };
    // The plan: per database, each shard with its time range, and the parent's copy where
    // it is unchanged (a shard of a deleted group is on its way out: not backed up).
    let mut plan: Vec<(&meta::DatabaseInfo, Vec<PlannedShard>)> = vec![];
    for (name, on_server) in names.iter().zip(listed) {
        let info = data.database(name).ok_or_else(|| InfluxError::NoDatabase {
            db: name.clone(),
            addr: addr.clone(),
            have: "(it was dropped during the backup)".into(),
        })?;
        let mut shards = vec![];
        for (db, rp, id) in on_server {
            let Some((start_ns, end_ns)) = info
                .shards()
                .find(|(_, _, sid)| *sid == id)
                .map(|(_, g, _)| (g.start_time, g.end_time))
            else {
                continue;
            };
            let reused = match (parent_tree, parent_meta) {
                (Some(ptree), Some(pm)) if unchanged_since_parent.contains(&id) => {
                    let dir_path = [DATABASES_DIR, db.as_str(), rp.as_str(), &id.to_string()];
                    match (
                        parent_shard(pm, &db, &rp, id),
                        find_dir(job.repo, &job.index, ptree, &dir_path)?,
                    ) {
                        (Some(before), Some(node)) => Some((before.clone(), node)),
                        _ => None,
                    }
                }
                _ => None,
            };
            shards.push(PlannedShard {
                db,
                rp,
                id,
                start_ns,
                end_ns,
                reused,
            });
        }
        plan.push((info, shards));
    }
    // The backup's start on the server's clock, one second early (as `since`).
    let began = server_time.map(|t| {
        (t - chrono::Duration::seconds(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    });
    let mut databases = vec![];
    // Shards whose counts are final once read: counted from their files, or counted by
    // the server with nothing written to them since the backup began.
    let mut settled: HashSet<u64> = HashSet::new();
    {
        for (info, planned) in &plan {
            let mut shards = vec![];
            for p in planned {
                if job.cancel.is_cancelled() {
                    return Err(InfluxError::Interrupted);
                }
                let (db, rp, id) = (&p.db, &p.rp, p.id);
                let shard_dir = root.dir(DATABASES_DIR).dir(db).dir(rp);
                let shard = match &p.reused {
                    Some((before, node)) => {
                        let mut before = before.clone();
                        if before.counts_before.is_empty() && before.counts_after.is_empty() {
                            // A parent from before per-shard counts: counted now, once (the
                            // shard has not changed since).
                            let now = src.http.counts_in(db, rp, p.start_ns, p.end_ns)?;
                            before.counts_before = now.clone();
                            before.counts_after = now;
                        }
                        job.stats
                            .files_unchanged
                            .fetch_add(before.files, Ordering::Relaxed);
                        job.stats
                            .bytes_total
                            .fetch_add(before.bytes, Ordering::Relaxed);
                        shard_dir.put(node.clone());
                        InfluxShard {
                            unchanged: true,
                            start_ns: p.start_ns,
                            end_ns: p.end_ns,
                            ..before
                        }
                    }
                    None => {
                        let read = || {
                            retrying(&src.rpc, id, || {
                                read_shard(src, db, rp, id, saver, &cutter, &job)
                            })
                        };
                        let (mut got, counts) = read()?;
                        let counted_from_files = counts.is_ok();
                        let (counts_before, counts_after) = match counts {
                            Ok(counts) => {
                                settled.insert(id);
                                (counts.clone(), counts)
                            }
                            Err(why) => {
                                tracing::info!(shard = id, "counted by the server: {why}");
                                let counts = src.http.counts_in(db, rp, p.start_ns, p.end_ns)?;
                                let quiet = match &began {
                                    Some(began) => nothing_since(src, id, began)?,
                                    None => false,
                                };
                                if quiet {
                                    // Nothing written since the backup began: the files
                                    // read hold what the server counts now.
                                    settled.insert(id);
                                } else {
                                    // Written meanwhile: read again after this count, so
                                    // the files hold at least it (counted again below).
                                    got = read()?.0;
                                }
                                (counts.clone(), counts)
                            }
                        };
                        let ShardRead {
                            dir,
                            files,
                            bytes,
                            tombstones,
                        } = got;
                        job.stats.files_new.fetch_add(files, Ordering::Relaxed);
                        job.stats.bytes_total.fetch_add(bytes, Ordering::Relaxed);
                        job.stats.dirs.fetch_add(1, Ordering::Relaxed);
                        let sub = dir.save(saver, &job.stats)?;
                        let mut n = plain_node(&id.to_string(), NodeKind::Dir, now_ns);
                        n.mode = 0o755;
                        n.subtree = Some(sub);
                        shard_dir.put(n);
                        InfluxShard {
                            id,
                            retention_policy: rp.to_string(),
                            start_ns: p.start_ns,
                            end_ns: p.end_ns,
                            files,
                            bytes,
                            tombstones,
                            unchanged: false,
                            counted_from_files,
                            counts_before,
                            // Where not settled, counted again below once every shard
                            // is read.
                            counts_after,
                        }
                    }
                };
                shards.push(shard);
            }
            databases.push(InfluxDatabase {
                name: info.name.clone(),
                default_retention_policy: info.default_retention_policy.clone(),
                retention_policies: info
                    .retention_policies
                    .iter()
                    .map(|rp| InfluxRetentionPolicy {
                        name: rp.name.clone(),
                        duration_ns: rp.duration,
                        shard_group_duration_ns: rp.shard_group_duration,
                        replica_n: rp.replica_n,
                    })
                    .collect(),
                shards,
                continuous_queries: info
                    .continuous_queries
                    .iter()
                    .map(|c| (c.name.clone(), c.query.clone()))
                    .collect(),
                counts_before: Default::default(),
                counts_after: Default::default(),
            });
        }
    }
    // Counted again after every shard is read, where anything was written: a shard with no
    // file changed since the backup began (asked now; the question flushes its cache, so a
    // point written meanwhile shows as a new file) holds what its count before said.
    let read: Vec<(&str, &InfluxShard)> = databases
        .iter()
        .flat_map(|d| d.shards.iter().map(move |s| (d.name.as_str(), s)))
        .filter(|(_, s)| !s.unchanged && !settled.contains(&s.id))
        .collect();
    let quiet = match &began {
        Some(began) => in_parallel(&read, |(_, s)| nothing_since(src, s.id, began))?,
        None => vec![false; read.len()],
    };
    let written: Vec<(&str, &InfluxShard)> = read
        .iter()
        .zip(&quiet)
        .filter(|(_, q)| !**q)
        .map(|(r, _)| *r)
        .collect();
    let mut counted_after: HashMap<u64, crate::repo::InfluxCounts> = written
        .iter()
        .map(|(_, s)| s.id)
        .zip(in_parallel(&written, |(db, s)| {
            src.http
                .counts_in(db, &s.retention_policy, s.start_ns, s.end_ns)
        })?)
        .collect();
    for d in &mut databases {
        for s in d.shards.iter_mut().filter(|s| !s.unchanged) {
            if let Some(after) = counted_after.remove(&s.id) {
                s.counts_after = after;
            }
        }
        d.counts_before = sum_counts(&d.shards, |s| &s.counts_before);
        d.counts_after = sum_counts(&d.shards, |s| &s.counts_after);
    }
    let tree = root.save(saver, &job.stats)?;
    Ok((
        tree,
        InfluxMeta {
            rpc: addr,
            http: src.http.url().to_string(),
            server_time,
            server_version,
            databases,
            users: data
                .users
                .iter()
                .map(|u| {
                    if u.admin {
                        format!("{} (admin)", u.name)
                    } else {
                        u.name.clone()
                    }
                })
                .collect(),
        },
    ))
}

fn stopped(e: Option<io::Error>, cancel: &CancelToken) -> InfluxError {
    match e {
        Some(e) => InfluxError::Stream {
            what: "the metastore".into(),
            why: e.to_string(),
        },
        None if cancel.is_cancelled() => InfluxError::Interrupted,
        None => InfluxError::Save(SaveError::Stopped),
    }
}

/// The directory node at `path` under tree `root`, if there is one.
fn find_dir(
    repo: &Repository,
    index: &Index,
    root: BlobId,
    path: &[&str],
) -> Result<Option<Node>, RepoError> {
    let mut tree = root;
    let mut found = None;
    for part in path {
        let t = repo.load_tree(index, &tree)?;
        match t
            .nodes
            .into_iter()
            .find(|n| n.name == *part && n.kind == NodeKind::Dir)
        {
            Some(n) => {
                tree = match n.subtree {
                    Some(s) => s,
                    None => return Ok(None),
                };
                found = Some(n);
            }
            None => return Ok(None),
        }
    }
    Ok(found)
}

/// True when shard `id` has no file changed since `since`: the server sends an empty
/// archive.
fn nothing_since(src: &InfluxSource, id: u64, since: &str) -> Result<bool, InfluxError> {
    retrying(&src.rpc, id, || nothing_since_once(src, id, since))
}

/// One shard of the plan: where it is, its time range, and the parent's copy (its
/// record and directory) when it is unchanged.
struct PlannedShard {
    db: String,
    rp: String,
    id: u64,
    start_ns: i64,
    end_ns: i64,
    reused: Option<(InfluxShard, Node)>,
}

/// The parent's record of shard `id` of `db`/`rp`.
fn parent_shard<'m>(pm: &'m InfluxMeta, db: &str, rp: &str, id: u64) -> Option<&'m InfluxShard> {
    pm.databases
        .iter()
        .find(|d| d.name == db)?
        .shards
        .iter()
        .find(|s| s.id == id && s.retention_policy == rp)
}

/// The counts of `shards` summed per `<rp>.<measurement>` and field.
fn sum_counts(
    shards: &[InfluxShard],
    pick: fn(&InfluxShard) -> &crate::repo::InfluxCounts,
) -> crate::repo::InfluxCounts {
    let mut total = crate::repo::InfluxCounts::new();
    for s in shards {
        for (m, fields) in pick(s) {
            let e = total
                .entry(format!("{}.{m}", s.retention_policy))
                .or_default();
            for (f, n) in fields {
                let v = e.entry(f.clone()).or_insert(0);
                *v = v.saturating_add(*n);
            }
        }
    }
    total
}

/// Questions (counts, "changed since?") asked of the server at once.
const PARALLEL_QUESTIONS: usize = 4;

/// `ask` for every item, [`PARALLEL_QUESTIONS`] at a time, answers in `items` order; the
/// first error (in that order) is returned.
fn in_parallel<T: Sync, R: Send, E: Send>(
    items: &[T],
    ask: impl Fn(&T) -> Result<R, E> + Sync,
) -> Result<Vec<R>, InfluxError>
where
    InfluxError: From<E>,
{
    let mut out = Vec::with_capacity(items.len());
    for group in items.chunks(PARALLEL_QUESTIONS) {
        let answers: Vec<Result<R, E>> = std::thread::scope(|s| {
            let asks: Vec<_> = group.iter().map(|item| s.spawn(|| ask(item))).collect();
            asks.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        for a in answers {
            out.push(a?);
        }
    }
    Ok(out)
}

/// Runs `f` again while the server refuses the shard or cuts its stream short (not when
/// it cannot be reached: a stopped server fails at once).
fn retrying<T>(
    rpc: &Rpc,
    id: u64,
    mut f: impl FnMut() -> Result<T, InfluxError>,
) -> Result<T, InfluxError> {
    let mut attempt = 1;
    loop {
        match f() {
            Err(e @ (InfluxError::Rpc(RpcError::Refused { .. }) | InfluxError::Stream { .. }))
                if attempt < SHARD_ATTEMPTS =>
            {
                tracing::info!(shard = id, server = rpc.addr(), "retrying: {e}");
                attempt += 1;
                std::thread::sleep(SHARD_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

fn nothing_since_once(src: &InfluxSource, id: u64, since: &str) -> Result<bool, InfluxError> {
    let stream = src.rpc.shard_backup(id, Some(since))?;
    let what = stream.describe();
    let mut t = Tracked {
        inner: stream,
        trailing_zeros: 0,
    };
    let mut any = false;
    {
        let mut ar = tar::Archive::new(&mut t);
        let entries = ar.entries().map_err(|e| InfluxError::Stream {
            what: what.clone(),
            why: e.to_string(),
        })?;
        if let Some(e) = entries.into_iter().next() {
            e.map_err(|e| InfluxError::Stream {
                what: what.clone(),
                why: e.to_string(),
            })?;
            any = true;
        }
    }
    if !any {
        end_of_archive(&mut t, &what)?;
    }
    Ok(!any)
}

/// Reads to the end and checks the archive ended as one does.
fn end_of_archive<R: Read>(t: &mut Tracked<R>, what: &str) -> Result<(), InfluxError> {
    io::copy(t, &mut io::sink()).map_err(|e| InfluxError::Stream {
        what: what.into(),
        why: e.to_string(),
    })?;
    if t.trailing_zeros < 1024 {
        return Err(InfluxError::Stream {
            what: what.into(),
            why: "the server closed the stream before the archive's end (did it stop, or drop the shard?)".into(),
        });
    }
    Ok(())
}

/// One shard as read: its directory, file count, bytes and tombstone files.
struct ShardRead {
    dir: DirBuild,
    files: u64,
    bytes: u64,
    tombstones: u64,
}

/// Feeds what passes through to a TSM counter.
struct Counting<'c, R> {
    inner: R,
    tsm: Option<&'c mut tsm::TsmCounter>,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(c) = self.tsm.as_deref_mut() {
            c.feed(&buf[..n]);
        }
        Ok(n)
    }
}

/// Streams one shard's files into the pipeline; returns them with the counts of its TSM
/// files' values (or why those do not give the shard's counts).
#[allow(clippy::too_many_arguments)]
fn read_shard(
    src: &InfluxSource,
    db: &str,
    rp: &str,
    id: u64,
    saver: &BlobSaver,
    cutter: &Cutter,
    job: &InfluxJob<'_>,
) -> Result<(ShardRead, Result<tsm::Counts, String>), InfluxError> {
    let stream = src.rpc.shard_backup(id, None)?;
    let what = stream.describe();
    let bad = |why: String| InfluxError::Stream {
        what: what.clone(),
        why,
    };
    let mut t = Tracked {
        inner: stream,
        trailing_zeros: 0,
    };
    let prefix = format!("{db}/{rp}/{id}/");
    let mut dir = DirBuild::default();
    let (mut files, mut bytes, mut tombstones) = (0u64, 0u64, 0u64);
    let mut tallies: Result<Vec<tsm::FileTally>, String> = Ok(vec![]);
    {
        let mut ar = tar::Archive::new(&mut t);
        for e in ar.entries().map_err(|e| bad(e.to_string()))? {
            let mut e = e.map_err(|e| bad(e.to_string()))?;
            let path = e
                .path()
                .map_err(|e| bad(e.to_string()))?
                .display()
                .to_string();
            if e.header().entry_type().is_dir() {
                continue;
            }
            let name = path
                .strip_prefix(&prefix)
                .filter(|n| !n.is_empty() && !n.contains('/') && *n != "." && *n != "..")
                .ok_or_else(|| bad(format!("an entry {path:?} outside {prefix}")))?
                .to_string();
            if !e.header().entry_type().is_file() {
                return Err(bad(format!("entry {path:?} is not a file")));
            }
            let size = e.size();
            let mtime_ns = e
                .header()
                .mtime()
                .ok()
                .and_then(|s| i64::try_from(s).ok())
                .map_or(0, |s| s.saturating_mul(1_000_000_000));
            let counter = AtomicU64::new(0);
            let mut tsm_counter =
                (name.ends_with(".tsm") && tallies.is_ok()).then(|| tsm::TsmCounter::new(size));
            let mut input = Counting {
                inner: &mut e,
                tsm: tsm_counter.as_mut(),
            };
            let (content, lists, got) =
                save_stream(&mut input, saver, cutter, &job.cancel, &counter).map_err(|err| {
                    match err {
                        Some(io) => bad(format!("{name}: {io}")),
                        None if job.cancel.is_cancelled() => InfluxError::Interrupted,
                        None => InfluxError::Save(SaveError::Stopped),
                    }
                })?;
            job.stats
                .bytes_read
                .fetch_add(counter.load(Ordering::Relaxed), Ordering::Relaxed);
            if got != size {
                return Err(bad(format!("{name}: {got} of {size} bytes")));
            }
            if name.ends_with(".tombstone") {
                tombstones += 1;
                tallies = Err(format!("{name}: deletions not compacted away"));
            }
            if let (Some(c), Ok(t)) = (tsm_counter, tallies.as_mut()) {
                match c.finish() {
                    Ok(tally) => t.push(tally),
                    Err(why) => tallies = Err(format!("{name}: {why}")),
                }
            }
            let mut n = plain_node(&name, NodeKind::File, mtime_ns);
            (n.size, n.content, n.content_lists) = (size, content, lists);
            files += 1;
            bytes += size;
            dir.put(n);
        }
    }
    end_of_archive(&mut t, &what)?;
    Ok((
        ShardRead {
            dir,
            files,
            bytes,
            tombstones,
        },
        tallies.and_then(|t| tsm::shard_counts(&t)),
    ))
}
