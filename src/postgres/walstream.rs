//! `backupd wal-stream`: PostgreSQL's WAL received over a physical replication slot
//! ([`super::replication`]) and stored in the archive as it arrives, so the repository is
//! seconds behind the server, not a segment ([`super::streamed`] has the layout).
//!
//! The loop: begin at the start of the segment holding the newer of the stream's durable
//! position (its status in the archive) and the slot's `restart_lsn`; keep the segment
//! being received in memory (at most one segment); store what is new as a piece after a
//! burst of WAL ends (nothing more within [`BURST_GAP`]), when [`FLUSH_BYTES`] wait, or
//! [`FLUSH_EVERY`] at the latest;
//! store a completed segment under its usual name (the archive's `push`, which accepts the
//! copy `archive_command` stored if its WAL is the same) and remove its pieces. Only then
//! is the position confirmed to the server as flushed, which lets the slot free the WAL:
//! what the server drops, the repository holds. Every [`DEFAULT_STATUS_EVERY`] (or as
//! told) the server is asked for its end of WAL; when the repository holds all of it, the
//! status records the moment ("caught up at").
//!
//! A kill at any point loses nothing: pieces are written before the position is confirmed,
//! and a restart re-reads the current segment from its start (the slot still holds it) and
//! writes only what lies past the durable position.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;

use super::archive::{ArchiveError, Pushed, WalArchive};
use super::replication::{ConnectTo, Replication, ReplicationError, StreamEvent};
use super::streamed::StreamStatus;
use super::walname::{history_name, Lsn, Segment};
use crate::repo::Repository;

/// How long after the last WAL message a burst counts as over (then it is stored).
pub const BURST_GAP: Duration = Duration::from_millis(50);
/// The longest received WAL waits before it is stored (under a steady stream of WAL, when
/// no burst ends): `benches/wal-stream.sh` measured a median commit-to-durable of 675 ms
/// at 1 s under pgbench.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Received WAL stored at once when this much waits.
pub const FLUSH_BYTES: u64 = 1 << 20;
/// How often the server is asked for its end of WAL, and the status stored when the
/// answer shows the repository holds all of it (`--status-every`): how recent a time a
/// restore can target on a quiet server. On S3 each is a PUT (86,400 a day at 1 s).
pub const DEFAULT_STATUS_EVERY: Duration = Duration::from_secs(1);
/// How many pieces a segment gathers before one piece from its start replaces them.
pub const MAX_PIECES: usize = 64;
/// The time between a server's flush and its walsender sending it is not known to the
/// client; a "caught up" moment is dated this much before the question that showed it.
const CAUGHT_UP_MARGIN: Duration = Duration::from_millis(200);

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The replication session failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The archive failed.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The slot does not exist.
    #[error("replication slot {slot:?} does not exist on {server}; create it with `backupd wal-stream --create-slot` (it keeps WAL on the server until backupd has stored it)")]
    NoSlot {
        /// Slot name.
        slot: String,
        /// Server.
        server: String,
    },
    /// The server sent WAL that does not follow what was received.
    #[error("the server sent WAL at {got} where {expected} was next")]
    OutOfOrder {
        /// Expected position.
        expected: Lsn,
        /// Received position.
        got: Lsn,
    },
    /// A server setting could not be read.
    #[error("{0}")]
    Setting(String),
}

/// What the streamer is told.
pub struct StreamOptions<'a> {
    /// Where to connect.
    pub connect: ConnectTo<'a>,
    /// The password, when the server asks for one.
    pub password: Option<&'a [u8]>,
    /// The replication slot.
    pub slot: &'a str,
    /// Create the slot when it does not exist.
    pub create_slot: bool,
    /// How often to ask the server for its end of WAL ([`DEFAULT_STATUS_EVERY`]).
    pub status_every: Duration,
}

/// What a stream session did, for its caller's log.
#[derive(Debug, Default)]
pub struct StreamReport {
    /// Bytes of WAL stored.
    pub stored: u64,
    /// Segments completed.
    pub segments: u64,
    /// Where it stopped.
    pub durable: Lsn,
}

/// The segment being received.
struct Current {
    segment: Segment,
    /// The cluster's segment size.
    seg_size: u64,
    /// Its bytes from its start.
    bytes: Vec<u8>,
    /// Offset in the segment up to which the archive holds it.
    durable: u64,
    /// When the oldest byte not yet stored arrived.
    pending_since: Option<Instant>,
    /// Pieces stored for it in this session or before (their names).
    pieces: Vec<String>,
}

impl Current {
    /// Where the segment begins.
    fn start(&self) -> u64 {
        self.segment.start(self.seg_size).0
    }

    /// The position up to which the archive holds the WAL.
    fn durable_lsn(&self) -> Lsn {
        Lsn(self.start() + self.durable)
    }
}

/// The stream status as last stored, stored again when what it says changes.
struct StatusWriter<'a> {
    archive: &'a WalArchive<'a>,
    timeline: u32,
    slot: &'a str,
    segment_size: u64,
    written: Option<StreamStatus>,
}

impl StatusWriter<'_> {
    fn write(
        &mut self,
        durable: Lsn,
        caught_up_at: Option<chrono::DateTime<Utc>>,
    ) -> Result<(), StreamError> {
        let same = self
            .written
            .as_ref()
            .is_some_and(|w| w.durable == durable && w.caught_up_at == caught_up_at);
        if !same {
            let s = StreamStatus {
                timeline: self.timeline,
                durable,
                caught_up_at,
                updated_at: Utc::now(),
                slot: self.slot.to_string(),
                segment_size: self.segment_size,
            };
            self.archive.set_stream_status(&s)?;
            self.written = Some(s);
        }
        Ok(())
    }
}

/// Drops the slot (`--drop-slot`).
///
/// # Errors
/// The session failing, or no such slot.
pub fn drop_slot(
    to: &ConnectTo<'_>,
    password: Option<&[u8]>,
    slot: &str,
) -> Result<(), StreamError> {
    let mut r = Replication::connect(to, password)?;
    r.drop_slot(slot)?;
    r.close();
    Ok(())
}

/// Streams until `stop` is set (then stores what it has and returns) or the session fails.
///
/// # Errors
/// As [`StreamError`]; what was stored before stays stored.
pub fn stream(
    repo: &Repository,
    opts: &StreamOptions<'_>,
    stop: &AtomicBool,
) -> Result<StreamReport, StreamError> {
    let mut report = StreamReport::default();
    loop {
        match session(repo, opts, stop, &mut report)? {
            Session::Stopped => return Ok(report),
            // A timeline ended (the server was promoted): go on with the next.
            Session::NextTimeline => continue,
        }
    }
}

enum Session {
    Stopped,
    NextTimeline,
}

fn segment_size(r: &mut Replication) -> Result<u64, StreamError> {
    let v = r.show("wal_segment_size")?;
    parse_size(&v)
        .ok_or_else(|| StreamError::Setting(format!("wal_segment_size {v:?} is not a size")))
}

/// PostgreSQL's `SHOW` of a size: `16MB`, `1GB`, `512kB`.
pub fn parse_size(v: &str) -> Option<u64> {
    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().ok()?;
    let unit = match v[digits.len()..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    Some(n * unit)
}

fn session(
    repo: &Repository,
    opts: &StreamOptions<'_>,
    stop: &AtomicBool,
    report: &mut StreamReport,
) -> Result<Session, StreamError> {
    let mut r = Replication::connect(&opts.connect, opts.password)?;
    let id = r.identify_system()?;
    let seg_size = segment_size(&mut r)?;
    let archive = WalArchive::new(repo, id.system_id);
    if id.timeline > 1 {
        let (name, content) = r.timeline_history(id.timeline)?;
        let name = if name.is_empty() {
            history_name(id.timeline)
        } else {
            name
        };
        archive.push(&name, &content)?;
    }
    let slot = match r.read_slot(opts.slot)? {
        Some(s) => s,
        None if opts.create_slot => {
            r.create_slot(opts.slot)?;
            tracing::info!(
                slot = opts.slot,
                server = r.server(),
                "created the replication slot"
            );
            r.read_slot(opts.slot)?.ok_or_else(|| StreamError::NoSlot {
                slot: opts.slot.into(),
                server: r.server().into(),
            })?
        }
        None => {
            return Err(StreamError::NoSlot {
                slot: opts.slot.into(),
                server: r.server().into(),
            })
        }
    };
    // What the stream stored before on this timeline.
    let before = archive
        .stream_status()?
        .filter(|s| s.timeline == id.timeline);
    let resume = before.as_ref().map(|s| s.durable);
    let from_slot = slot.restart_lsn.unwrap_or(id.position);
    if let Some(d) = resume {
        if from_slot.0 / seg_size > d.0 / seg_size {
            tracing::warn!(
                slot = opts.slot,
                "the slot begins at {from_slot}, after the stream's durable position {d}: WAL between them is not streamed (archive_command may hold it)"
            );
        }
    }
    let begin = resume.map_or(from_slot, |d| d.max(from_slot));
    let segment = Segment::of(id.timeline, begin, seg_size);
    let seg_start = segment.start(seg_size);
    let mut cur = Current {
        segment,
        seg_size,
        bytes: Vec::with_capacity(seg_size.min(64 << 20) as usize),
        // What this stream stored before on this timeline is durable; a stream that
        // starts afresh stores the segment from its start.
        durable: resume
            .filter(|d| *d >= seg_start)
            .map_or(0, |d| d.0 - seg_start.0),
        pending_since: None,
        pieces: archive.piece_names(&segment.name(seg_size))?,
    };
    tracing::info!(
        slot = opts.slot,
        server = r.server(),
        timeline = id.timeline,
        "streaming WAL from {seg_start} (the repository holds it to {})",
        resume.filter(|d| *d >= seg_start).unwrap_or(seg_start)
    );
    r.start(opts.slot, seg_start, id.timeline)?;
    let mut last_message = Instant::now();
    let status_every = opts.status_every.max(Duration::from_millis(100));
    let mut last_status = Instant::now() - status_every;
    let mut asked_at: Option<chrono::DateTime<Utc>> = None;
    let mut caught_up_at = before.and_then(|s| s.caught_up_at);
    let mut status = StatusWriter {
        archive: &archive,
        timeline: id.timeline,
        slot: opts.slot,
        segment_size: seg_size,
        written: None,
    };
    loop {
        if stop.load(Ordering::Acquire) {
            store_pending(&archive, &mut cur, seg_size, report)?;
            let durable = cur.durable_lsn();
            r.send_status(durable, durable, false)?;
            status.write(durable, caught_up_at)?;
            r.close();
            report.durable = durable;
            return Ok(Session::Stopped);
        }
        let wait = match cur.pending_since {
            Some(t) => BURST_GAP.min(FLUSH_EVERY.saturating_sub(t.elapsed())),
            None => status_every
                .saturating_sub(last_status.elapsed())
                .min(Duration::from_millis(250)),
        };
        match r.next_event(wait)? {
            Some(StreamEvent::XLogData { start, data, .. }) => {
                last_message = Instant::now();
                receive(&archive, &mut cur, start, &data, seg_size, &mut r, report)?;
            }
            Some(StreamEvent::Keepalive {
                server_end: end,
                reply,
            }) => {
                let durable = cur.durable_lsn();
                if let Some(at) = asked_at.take() {
                    if cur.pending_since.is_none() && durable >= end {
                        caught_up_at = Some(at);
                        status.write(durable, caught_up_at)?;
                    }
                }
                if reply {
                    r.send_status(durable, durable, false)?;
                }
            }
            Some(StreamEvent::EndOfTimeline {
                next_timeline,
                next_start,
            }) => {
                store_pending(&archive, &mut cur, seg_size, report)?;
                let durable = cur.durable_lsn();
                status.write(durable, caught_up_at)?;
                tracing::info!(
                    "timeline {} ended at {next_start}; streaming timeline {next_timeline}",
                    id.timeline
                );
                r.close();
                return Ok(Session::NextTimeline);
            }
            None => {}
        }
        let burst_over = last_message.elapsed() >= BURST_GAP;
        let waited = cur
            .pending_since
            .is_some_and(|t| t.elapsed() >= FLUSH_EVERY)
            || cur.bytes.len() as u64 >= cur.durable + FLUSH_BYTES;
        if cur.pending_since.is_some() && (burst_over || waited) {
            store_pending(&archive, &mut cur, seg_size, report)?;
            let durable = cur.durable_lsn();
            r.send_status(durable, durable, false)?;
        }
        if last_status.elapsed() >= status_every {
            last_status = Instant::now();
            let durable = cur.durable_lsn();
            // Ask for the server's end now: the answer dates the next "caught up".
            asked_at =
                Some(Utc::now() - chrono::Duration::from_std(CAUGHT_UP_MARGIN).unwrap_or_default());
            r.send_status(durable, durable, true)?;
        }
    }
}

/// Appends received WAL; completes segments it fills.
fn receive(
    archive: &WalArchive<'_>,
    cur: &mut Current,
    start: Lsn,
    mut data: &[u8],
    seg_size: u64,
    r: &mut Replication,
    report: &mut StreamReport,
) -> Result<(), StreamError> {
    let expected = Lsn(cur.start() + cur.bytes.len() as u64);
    if start != expected {
        return Err(StreamError::OutOfOrder {
            expected,
            got: start,
        });
    }
    while !data.is_empty() {
        let room = (seg_size - cur.bytes.len() as u64) as usize;
        let take = room.min(data.len());
        cur.bytes.extend_from_slice(&data[..take]);
        data = &data[take..];
        if cur.pending_since.is_none() && cur.bytes.len() as u64 > cur.durable {
            cur.pending_since = Some(Instant::now());
        }
        if cur.bytes.len() as u64 == seg_size {
            complete(archive, cur, seg_size, report)?;
            let durable = Lsn(cur.start());
            r.send_status(durable, durable, false)?;
        }
    }
    Ok(())
}

/// Stores a full segment under its name, removes its pieces, moves to the next segment.
fn complete(
    archive: &WalArchive<'_>,
    cur: &mut Current,
    seg_size: u64,
    report: &mut StreamReport,
) -> Result<(), StreamError> {
    let name = cur.segment.name(seg_size);
    let durable = Lsn(cur.start() + seg_size);
    match archive.push(&name, &cur.bytes)? {
        Pushed::Stored => tracing::debug!(segment = %name, %durable, "stored the streamed segment"),
        Pushed::AlreadyThere => tracing::debug!(segment = %name, %durable, "archived already"),
    }
    report.stored += seg_size - cur.durable;
    report.segments += 1;
    // Pieces listed at the session's start, and any written since.
    let mut stale = cur.pieces.clone();
    stale.extend(archive.piece_names(&name)?);
    stale.sort();
    stale.dedup();
    archive.remove_pieces(&stale)?;
    cur.segment = cur.segment.next();
    cur.bytes.clear();
    cur.durable = 0;
    cur.pending_since = None;
    cur.pieces.clear();
    Ok(())
}

/// Stores what was received past the durable offset as a piece (or, once the segment has
/// many, one piece from its start in place of them all).
fn store_pending(
    archive: &WalArchive<'_>,
    cur: &mut Current,
    seg_size: u64,
    report: &mut StreamReport,
) -> Result<(), StreamError> {
    let end = cur.bytes.len() as u64;
    if end <= cur.durable {
        cur.pending_since = None;
        return Ok(());
    }
    let name = cur.segment.name(seg_size);
    if cur.pieces.len() >= MAX_PIECES {
        let whole = archive.put_piece(&name, 0, &cur.bytes)?;
        let old: Vec<String> = cur.pieces.drain(..).filter(|p| *p != whole).collect();
        archive.remove_pieces(&old)?;
        cur.pieces.push(whole);
    } else {
        let piece = archive.put_piece(&name, cur.durable, &cur.bytes[cur.durable as usize..])?;
        cur.pieces.push(piece);
    }
    report.stored += end - cur.durable;
    cur.durable = end;
    cur.pending_since = None;
    tracing::debug!(
        segment = %name,
        durable = %Lsn(cur.start() + end),
        "stored a piece"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_postgresql_shows_them() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("512kB"), Some(512 << 10));
        assert_eq!(parse_size("lots"), None);
    }
}
