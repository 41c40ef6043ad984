//! Planning a point-in-time restore: which base backup, along which timelines, and how
//! far the archived WAL really reaches, so a target the archive cannot reach is refused
//! before anything is written, with the range that can be restored.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use super::archive::WalArchive;
use super::history::{parse_history, TimelineSpan};
use super::walname::{history_name, history_timeline, Lsn, Segment};
use super::walscan::scan_segment;
use super::PgError;
use crate::pipeline::BlobId;
use crate::repo::{PostgresMeta, Repository, Snapshot};

/// What to recover to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// Replay to this time (transactions committed at or before it).
    Time(DateTime<Utc>),
    /// Replay all archived WAL.
    Latest,
}

/// Why no plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// No PostgreSQL snapshots.
    #[error("the repository holds no PostgreSQL base backups{0}")]
    NoBackups(String),
    /// Several clusters; which one?
    #[error("the repository holds base backups of several clusters (system identifiers {0}); choose one with --pg-system-id")]
    SeveralClusters(String),
    /// The target is outside what can be restored.
    #[error("cannot restore to {target}: {why}; restorable range: {range}")]
    OutOfRange {
        /// The target asked.
        target: String,
        /// Why not.
        why: String,
        /// From .. to.
        range: String,
    },
    /// A history file is malformed.
    #[error("{file}: {why}")]
    BadHistory {
        /// File.
        file: String,
        /// Why.
        why: String,
    },
    /// Reading the archive failed.
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// A chosen restore.
#[derive(Clone, Debug)]
pub struct RestorePlan {
    /// The base backup's snapshot.
    pub snapshot_id: BlobId,
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Timeline recovery ends on.
    pub timeline: u32,
    /// The last segment recovery can read without a gap.
    pub last_segment: String,
    /// Time of the last transaction in the WAL that can be replayed.
    pub reach: DateTime<Utc>,
    /// The first missing segment, when the archive continues after it.
    pub gap: Option<String>,
    /// Earliest time any usable base backup allows.
    pub earliest: DateTime<Utc>,
    /// The segments recovery reads, in order, up to `last_segment`.
    pub segments: Vec<String>,
    /// The last segment is the stream's growing one, read from its pieces.
    pub streamed_last: bool,
    /// The target time lies after the last transaction, at a moment when the repository
    /// held all the server's WAL (the stream's "caught up at"): nothing committed in
    /// between, so recovery replays everything instead of stopping at a time no later
    /// transaction marks.
    pub replay_to_end: bool,
}

impl RestorePlan {
    /// The base backup's PostgreSQL facts.
    pub fn meta(&self) -> &PostgresMeta {
        self.snapshot
            .postgres
            .as_ref()
            .expect("plans are made of PostgreSQL snapshots")
    }
}

fn fmt_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// Makes the plan.
///
/// # Errors
/// No backups, several clusters without a choice, a target out of range (the message
/// lists the range), or a repository failure.
pub fn plan(
    repo: &Repository,
    target: RecoveryTarget,
    system_id: Option<u64>,
) -> Result<RestorePlan, PlanError> {
    let snaps: Vec<(BlobId, Snapshot)> = repo
        .snapshots()
        .map_err(PgError::from)?
        .into_iter()
        .filter(|(_, s)| {
            s.postgres
                .as_ref()
                .is_some_and(|m| system_id.is_none_or(|id| m.system_identifier == id))
        })
        .collect();
    let systems: HashSet<u64> = snaps
        .iter()
        .filter_map(|(_, s)| s.postgres.as_ref().map(|m| m.system_identifier))
        .collect();
    if snaps.is_empty() {
        return Err(PlanError::NoBackups(
            system_id
                .map(|i| format!(" of system {i}"))
                .unwrap_or_default(),
        ));
    }
    if systems.len() > 1 {
        let mut v: Vec<String> = systems.iter().map(u64::to_string).collect();
        v.sort();
        return Err(PlanError::SeveralClusters(v.join(", ")));
    }
    let sysid = *systems.iter().next().expect("one system");
    let archive = WalArchive::new(repo, sysid);
    let seg_size = snaps[0]
        .1
        .postgres
        .as_ref()
        .map_or(16 << 20, |m| m.wal_segment_size);

    // The newest timeline, and the path of timelines that leads to it.
    let (histories, groups) = archive.top().map_err(PgError::from)?;
    let newest_backup_tli = snaps
        .iter()
        .filter_map(|(_, s)| s.postgres.as_ref().map(|m| m.timeline))
        .max()
        .unwrap_or(1);
    let latest_tli = histories
        .iter()
        .filter_map(|h| history_timeline(h))
        .chain(std::iter::once(newest_backup_tli))
        .max()
        .unwrap_or(1);
    let path = if latest_tli > 1 {
        let file = history_name(latest_tli);
        let text = archive
            .fetch(&file)
            .map_err(PgError::from)?
            .ok_or_else(|| PlanError::BadHistory {
                file: file.clone(),
                why: "missing from the archive".into(),
            })?;
        parse_history(latest_tli, &String::from_utf8_lossy(&text))
            .map_err(|why| PlanError::BadHistory { file, why })?
    } else {
        vec![TimelineSpan {
            timeline: 1,
            begin: Lsn(0),
            end: None,
        }]
    };

    // Backups whose WAL lies on the path.
    let mut usable: Vec<&(BlobId, Snapshot)> = snaps
        .iter()
        .filter(|(_, s)| {
            let m = s.postgres.as_ref().expect("filtered");
            path.iter()
                .any(|span| span.timeline == m.timeline && span.end.is_none_or(|e| m.stop_lsn <= e))
        })
        .collect();
    usable.sort_by_key(|(_, s)| s.postgres.as_ref().map(|m| (m.stop_time, m.stop_lsn)));
    let Some(oldest) = usable.first() else {
        return Err(PlanError::NoBackups(format!(
            " on the path to timeline {latest_tli}"
        )));
    };
    let earliest = oldest.1.postgres.as_ref().expect("filtered").stop_time;
    let chosen = match target {
        RecoveryTarget::Latest => *usable.last().expect("not empty"),
        RecoveryTarget::Time(t) => match usable
            .iter()
            .rev()
            .find(|(_, s)| s.postgres.as_ref().is_some_and(|m| m.stop_time <= t))
        {
            Some(c) => *c,
            None => {
                return Err(PlanError::OutOfRange {
                    target: fmt_time(t),
                    why: "it is before the end of the oldest base backup".into(),
                    range: String::new(),
                })
                .map_err(|e| with_reach(e, &archive, &path, oldest, seg_size, &groups));
            }
        },
    };
    let meta = chosen.1.postgres.as_ref().expect("filtered");
    let walk = walk_wal(&archive, &path, meta, seg_size, &groups)?;
    let reach = reach_time(&archive, &walk.segments, meta.stop_time, seg_size)?;
    // How long the repository is known to have held all of the server's WAL: the stream's
    // status, when it is on the timeline recovery ends on and the readable WAL reaches its
    // durable position.
    let caught_up = archive
        .stream_status()
        .map_err(PgError::from)?
        .filter(|st| st.timeline == walk.timeline && st.segment_size == seg_size)
        .filter(|st| {
            walk.segments
                .last()
                .and_then(|l| Segment::parse(l, seg_size))
                .is_some_and(|l| {
                    let end = l.start(seg_size).0
                        + if walk.streamed_last {
                            walk.streamed_len
                        } else {
                            seg_size
                        };
                    end >= st.durable.0
                })
        })
        .and_then(|st| st.caught_up_at);
    let mut plan = RestorePlan {
        snapshot_id: chosen.0,
        snapshot: chosen.1.clone(),
        timeline: walk.timeline,
        last_segment: walk.segments.last().cloned().unwrap_or_default(),
        reach,
        gap: walk.gap.clone(),
        earliest,
        segments: walk.segments.clone(),
        streamed_last: walk.streamed_last,
        replay_to_end: false,
    };
    let range = match caught_up {
        Some(c) if c > reach && walk.gap.is_none() => {
            format!(
                "from {} to {} (WAL streamed)",
                fmt_time(earliest),
                fmt_time(c)
            )
        }
        _ => format!("from {} to before {}", fmt_time(earliest), fmt_time(reach)),
    };
    if walk.segments.is_empty() || walk.needed_missing.is_some() {
        return Err(PlanError::OutOfRange {
            target: target_text(target),
            why: format!(
                "WAL segment {} that base backup {} needs to become consistent is not in the archive",
                walk.needed_missing
                    .clone()
                    .unwrap_or_else(|| Segment::of(meta.timeline, meta.start_lsn, seg_size).name(seg_size)),
                chosen.0.short()
            ),
            range,
        });
    }
    match target {
        // After the last transaction, but not after a moment the stream had everything:
        // the state at the target is the end of the WAL.
        RecoveryTarget::Time(t)
            if t >= reach && walk.gap.is_none() && caught_up.is_some_and(|c| t <= c) =>
        {
            plan.replay_to_end = true;
            Ok(plan)
        }
        // Recovery stops before the first commit later than the target: one must exist
        // in the WAL it can read, so the target must be earlier than the last commit.
        RecoveryTarget::Time(t) if t >= reach => Err(PlanError::OutOfRange {
            target: fmt_time(t),
            why: match &walk.gap {
                Some(g) => format!(
                    "WAL segment {g} is missing from the archive, and the WAL before it ends with a transaction at {} (recovery to a time needs a later transaction to stop at)",
                    fmt_time(reach)
                ),
                None => format!(
                    "it is not before the last archived transaction ({}); use --at latest to replay everything",
                    fmt_time(reach)
                ),
            },
            range,
        }),
        RecoveryTarget::Latest if walk.gap.is_some() => Err(PlanError::OutOfRange {
            target: "latest".into(),
            why: format!(
                "WAL segment {} is missing from the archive though later WAL exists, so recovery would stop at {} (give --at with that time to accept)",
                walk.gap.as_deref().unwrap_or_default(),
                fmt_time(reach)
            ),
            range,
        }),
        _ => Ok(plan),
    }
}

fn target_text(t: RecoveryTarget) -> String {
    match t {
        RecoveryTarget::Time(t) => fmt_time(t),
        RecoveryTarget::Latest => "latest".into(),
    }
}

/// Adds the reachable end to an out-of-range error about the start.
fn with_reach(
    e: PlanError,
    archive: &WalArchive<'_>,
    path: &[TimelineSpan],
    oldest: &(BlobId, Snapshot),
    seg_size: u64,
    groups: &[String],
) -> PlanError {
    let PlanError::OutOfRange { target, why, .. } = e else {
        return e;
    };
    let meta = oldest.1.postgres.as_ref().expect("postgres snapshot");
    let reach = walk_wal(archive, path, meta, seg_size, groups)
        .ok()
        .and_then(|w| reach_time(archive, &w.segments, meta.stop_time, seg_size).ok())
        .unwrap_or(meta.stop_time);
    PlanError::OutOfRange {
        target,
        why,
        range: format!(
            "from {} to before {}",
            fmt_time(meta.stop_time),
            fmt_time(reach)
        ),
    }
}

struct WalWalk {
    /// Segments recovery reads, in order, up to the first missing one.
    segments: Vec<String>,
    /// Timeline of the last one.
    timeline: u32,
    /// The first missing segment when later WAL exists.
    gap: Option<String>,
    /// A segment before the backup's stop point that is missing.
    needed_missing: Option<String>,
    /// The last segment is read from the stream's pieces, this many bytes of it.
    streamed_last: bool,
    streamed_len: u64,
}

/// Follows the segments recovery would read from the backup's start: each from the
/// newest timeline on the path that has begun by then (as PostgreSQL picks them).
fn walk_wal(
    archive: &WalArchive<'_>,
    path: &[TimelineSpan],
    meta: &PostgresMeta,
    seg_size: u64,
    groups: &[String],
) -> Result<WalWalk, PgError> {
    let spans: Vec<TimelineSpan> = path
        .iter()
        .copied()
        .filter(|s| s.timeline >= meta.timeline)
        .collect();
    // What the archive holds, per timeline, for the groups on the path.
    let mut have: BTreeMap<u32, HashSet<u64>> = BTreeMap::new();
    // Segments the stream has begun, with how far their pieces reach from the start.
    let mut streamed: BTreeMap<(u32, u64), u64> = BTreeMap::new();
    for g in groups {
        let Ok(tli) = u32::from_str_radix(&g[..8.min(g.len())], 16) else {
            continue;
        };
        if !spans.iter().any(|s| s.timeline == tli) {
            continue;
        }
        let names = archive.group(g)?;
        for f in &names {
            if let Some(s) = Segment::parse(f, seg_size) {
                have.entry(tli).or_default().insert(s.number);
            } else if let Some((seg, _, _)) = super::streamed::parse_piece(f) {
                if let Some(s) = Segment::parse(seg, seg_size) {
                    let reach = super::streamed::covered(&super::streamed::pieces_of(&names, seg));
                    if reach > 0 {
                        streamed.insert((tli, s.number), reach);
                    }
                }
            }
        }
    }
    let start = Segment::of(meta.timeline, meta.start_lsn, seg_size).number;
    let stop = Segment::of(
        meta.timeline,
        Lsn(meta.stop_lsn.0.saturating_sub(1).max(meta.start_lsn.0)),
        seg_size,
    )
    .number;
    let tli_for = |n: u64| -> u32 {
        spans
            .iter()
            .rev()
            .find(|s| s.begin.0 / seg_size <= n)
            .map_or(meta.timeline, |s| s.timeline)
    };
    let max_have: Option<u64> = have.values().flat_map(|s| s.iter().copied()).max();
    let mut out = WalWalk {
        segments: vec![],
        timeline: meta.timeline,
        gap: None,
        needed_missing: None,
        streamed_last: false,
        streamed_len: 0,
    };
    let mut n = start;
    loop {
        let tli = tli_for(n);
        let seg = Segment {
            timeline: tli,
            number: n,
        };
        if have.get(&tli).is_some_and(|s| s.contains(&n)) {
            out.segments.push(seg.name(seg_size));
            out.timeline = tli;
            n += 1;
            continue;
        }
        // The stream's growing segment: the end of the WAL.
        if let Some(&len) = streamed.get(&(tli, n)) {
            out.segments.push(seg.name(seg_size));
            out.timeline = tli;
            out.streamed_last = true;
            out.streamed_len = len;
            if n < stop || (n == stop && len < meta.stop_lsn.0 - seg.start(seg_size).0) {
                out.needed_missing = Some(seg.name(seg_size));
            }
            return Ok(out);
        }
        if n <= stop {
            out.needed_missing = Some(seg.name(seg_size));
        } else if max_have.is_some_and(|m| m > n) {
            out.gap = Some(seg.name(seg_size));
        }
        return Ok(out);
    }
}

/// The time of the last transaction in the readable WAL: scans segments from the newest
/// back until one holds a commit or abort (at most 64), else the backup's stop time.
fn reach_time(
    archive: &WalArchive<'_>,
    segments: &[String],
    floor: DateTime<Utc>,
    seg_size: u64,
) -> Result<DateTime<Utc>, PgError> {
    for name in segments.iter().rev().take(64) {
        let Some((bytes, _)) = archive.fetch_for_recovery(name, seg_size)? else {
            continue;
        };
        if let Some(t) = scan_segment(&bytes).and_then(|s| s.xact_times.into_iter().max()) {
            return Ok(t.max(floor));
        }
    }
    Ok(floor)
}

/// The segments replay reads to make base backup `meta` consistent (its start to its
/// stop), for a restore of that backup alone.
pub fn backup_segments(meta: &PostgresMeta) -> Vec<String> {
    let seg_size = meta.wal_segment_size;
    let first = Segment::of(meta.timeline, meta.start_lsn, seg_size);
    let last = Segment::of(
        meta.timeline,
        Lsn(meta.stop_lsn.0.saturating_sub(1).max(meta.start_lsn.0)),
        seg_size,
    );
    std::iter::successors(Some(first), |s| Some(s.next()))
        .take_while(|s| s.number <= last.number)
        .map(|s| s.name(seg_size))
        .collect()
}

/// A tablespace that WAL replay creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablespaceCreated {
    /// Its oid.
    pub oid: u32,
    /// The location the WAL names (the source host's path).
    pub location: String,
    /// The segment holding the record.
    pub segment: String,
}

/// The `CREATE TABLESPACE` records in `segments` (read by two workers, reported in WAL
/// order). Replaying one makes `pg_tblspc/<oid>` a link to its location *on this host*
/// and removes and recreates the location's version directory there (PostgreSQL's redo
/// does so): a write outside the restore that no setting redirects. With `until`, segments
/// after the first one holding a transaction later than it are not needed (recovery stops
/// there). Each worker holds one segment at a time (16 MiB by default).
///
/// # Errors
/// A segment that cannot be fetched or opened.
pub fn tablespaces_created(
    repo: &Repository,
    system_id: u64,
    segments: &[String],
    until: Option<DateTime<Utc>>,
    segment_size: u64,
) -> Result<Vec<TablespaceCreated>, PgError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    type Scan = Option<super::walscan::SegmentScan>;
    let archive = WalArchive::new(repo, system_id);
    let next = AtomicUsize::new(0);
    // The first segment recovery stops in (a transaction after `until`): nothing after it
    // is read.
    let stop_at = AtomicUsize::new(usize::MAX);
    let results: Mutex<Vec<Option<Result<Scan, PgError>>>> =
        Mutex::new((0..segments.len()).map(|_| None).collect());
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= segments.len() || i > stop_at.load(Ordering::Relaxed) {
                    return;
                }
                let r = archive
                    .fetch_for_recovery(&segments[i], segment_size)
                    .map_err(PgError::from)
                    .map(|b| b.and_then(|(b, _)| scan_segment(&b)));
                if let Ok(Some(scan)) = &r {
                    if until.is_some_and(|t| scan.xact_times.iter().any(|x| *x > t)) {
                        stop_at.fetch_min(i, Ordering::Relaxed);
                    }
                }
                let mut g = results.lock().unwrap_or_else(|p| p.into_inner());
                g[i] = Some(r);
            });
        }
    });
    let last = stop_at.load(Ordering::Relaxed);
    let mut found = vec![];
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    for (i, r) in results.into_iter().enumerate() {
        if i > last {
            break;
        }
        let Some(scan) = r.transpose()?.flatten() else {
            continue;
        };
        for (oid, location) in scan.tablespaces_created {
            found.push(TablespaceCreated {
                oid,
                location,
                segment: segments[i].clone(),
            });
        }
    }
    Ok(found)
}
