//! Repository locks: small sealed objects under `locks/` that say "a backup (or a prune)
//! is running here since ...". Backups take shared locks and never wait for anything;
//! prune takes an exclusive lock (two prunes never run at once), and so does every change
//! of the key bundle (`keys`: two hosts never both write serial N+1); prune reads the backup
//! locks to know which marked packs a running backup might still be deduplicating against
//! (docs/decisions/0009-prune.md). A holder refreshes its lock every few minutes; a lock
//! not refreshed for [`STALE_AFTER`] belongs to a dead process and is ignored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::generations::LiveKeys;
use crate::backend::{Backend, BackendError, ObjectType};
use crate::crypto::{self, ObjectKind};

/// A lock not refreshed for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// How often a holder refreshes its lock.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);

/// What holds a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// A backup (shared).
    Backup,
    /// A prune (exclusive among prunes).
    Prune,
    /// A new key bundle: `key rotate`, `key add`, `key remove`, `key passwd`, `upgrade`
    /// (exclusive among key changes).
    Keys,
}

/// The content of a lock object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Backup or prune.
    pub kind: LockKind,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: u32,
    /// When the holder started.
    pub started: DateTime<Utc>,
    /// When the lock was last written.
    pub refreshed: DateTime<Utc>,
    /// For a PostgreSQL base backup: the cluster's system identifier (prune keeps that
    /// cluster's WAL while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_system_id: Option<String>,
    /// The key generation the holder seals with (absent in locks of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    /// When the holder process started (`/proc/<pid>/stat` field 22, clock ticks after
    /// boot), with `pid` on `host`: a process of this host that no longer runs is seen at
    /// once, and a pid used again is not taken for the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
}

/// When process `pid` started, in clock ticks after boot (None: no such process, or no
/// `/proc` to ask).
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces and parentheses: the fields
    // after the last `)` are `state ppid ...`; start time is field 22 overall.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

impl LockKind {
    /// What holds such a lock, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            LockKind::Backup => "a backup",
            LockKind::Prune => "a prune",
            LockKind::Keys => "a key change",
        }
    }
}

impl LockRecord {
    /// Why the lock is stale (for a stale one), for messages.
    pub fn why_stale(&self) -> String {
        if self.holder_is_gone() {
            format!("process {} no longer runs on this host", self.pid)
        } else {
            format!(
                "not refreshed since {} (a lock is stale {} s after its last refresh)",
                self.refreshed.format("%Y-%m-%d %H:%M:%S UTC"),
                STALE_AFTER.as_secs()
            )
        }
    }

    /// Whether the holder has stopped refreshing it.
    pub fn is_stale(&self, now: DateTime<Utc>) -> bool {
        now.signed_duration_since(self.refreshed)
            .to_std()
            .unwrap_or_default()
            > STALE_AFTER
            || self.holder_is_gone()
    }

    /// True when the holder was a process of this host that no longer runs (its pid gone,
    /// or used by a process that started at another time).
    pub fn holder_is_gone(&self) -> bool {
        let Some(started) = self.pid_start else {
            return false;
        };
        if self.host != crate::host::hostname() || !std::path::Path::new("/proc/self/stat").exists()
        {
            return false;
        }
        process_start(self.pid) != Some(started)
    }
}

/// Lock errors.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another prune (or key change) holds the exclusive lock.
    #[error("the repository is locked by {} on {host} (pid {pid}) running since {since}; try again later", if *.kind == LockKind::Keys { "a key change" } else { "a prune" })]
    Locked {
        /// What holds it.
        kind: LockKind,
        /// Its host.
        host: String,
        /// Its pid.
        pid: u32,
        /// Since when.
        since: DateTime<Utc>,
    },
    /// The store failed.
    #[error("lock: {0}")]
    Backend(#[from] BackendError),
}

fn write_record(
    backend: &Arc<dyn Backend>,
    keys: &LiveKeys,
    rec: &LockRecord,
) -> Result<String, BackendError> {
    let plain = serde_json::to_vec(rec).expect("a lock record serializes");
    let sealed = crypto::seal(&keys.get(), ObjectKind::Lock, None, &plain);
    let name = super::sha256_hex(&sealed);
    backend.put(ObjectType::Lock, &name, Bytes::from(sealed))?;
    Ok(name)
}

/// Every readable lock with its object name (unreadable ones are skipped with a warning:
/// a lock is advice, and a damaged one must not stop backups).
///
/// # Errors
/// The store failing to list.
pub fn list_locks(
    backend: &Arc<dyn Backend>,
    keys: &LiveKeys,
) -> Result<Vec<(String, LockRecord)>, BackendError> {
    // A lock gone between list and get was either released or replaced by a refresh
    // (written before the old one is deleted): a new listing shows which.
    let mut attempt = 0;
    loop {
        match list_locks_once(backend, keys)? {
            Some(l) => return Ok(l),
            None if attempt < 10 => attempt += 1,
            None => {
                return Err(BackendError::Io {
                    path: "locks/".into(),
                    source: std::io::Error::other("locks keep disappearing while read"),
                })
            }
        }
    }
}

fn list_locks_once(
    backend: &Arc<dyn Backend>,
    keys: &LiveKeys,
) -> Result<Option<Vec<(String, LockRecord)>>, BackendError> {
    let mut out = vec![];
    for (name, _) in backend.list(ObjectType::Lock)? {
        let bytes = match backend.get(ObjectType::Lock, &name) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let rec = (super::sha256_hex(&bytes) == name)
            // A generation this process does not know yet (a rotation since it opened the
            // repository) is read again first, never taken for an unreadable lock.
            .then(|| keys.open(ObjectKind::Lock, None, &bytes).ok())
            .flatten()
            .and_then(|plain| serde_json::from_slice::<LockRecord>(&plain).ok());
        match rec {
            Some(r) => out.push((name, r)),
            None => tracing::warn!("locks/{name}: unreadable lock ignored"),
        }
    }
    Ok(Some(out))
}

struct Shared {
    name: Mutex<String>,
    /// Wall time of the last successful write (what other hosts judge staleness by).
    last_refresh: Mutex<DateTime<Utc>>,
    /// Set for good once a gap between refreshes was long enough for others to have
    /// taken the lock for dead (a pause, a suspend, a network cut).
    lost: AtomicBool,
    stop: AtomicBool,
}

/// A holder whose lock went this long without a refresh must not commit.
const FRESH_FOR: Duration = Duration::from_secs(STALE_AFTER.as_secs() - REFRESH_EVERY.as_secs());

impl Shared {
    fn check_gap(&self) {
        let last = *self.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
        let gap = super::clock::now()
            .signed_duration_since(last)
            .to_std()
            .unwrap_or_default();
        if gap >= FRESH_FOR {
            self.lost.store(true, Ordering::SeqCst);
        }
    }
}

/// A held lock; refreshed in the background, removed on drop.
pub struct RepoLock {
    backend: Arc<dyn Backend>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    record: LockRecord,
}

impl RepoLock {
    /// Takes a lock. A prune lock fails with `Locked` when another live prune lock exists
    /// (both writers then back off: neither proceeds).
    ///
    /// # Errors
    /// `Locked`, or the store failing.
    pub fn acquire(
        backend: Arc<dyn Backend>,
        keys: Arc<LiveKeys>,
        kind: LockKind,
        host: &str,
        postgres_system_id: Option<u64>,
    ) -> Result<RepoLock, LockError> {
        let now = super::clock::now();
        let mut record = LockRecord {
            kind,
            host: host.to_string(),
            pid: std::process::id(),
            started: now,
            refreshed: now,
            postgres_system_id: postgres_system_id.map(|id| id.to_string()),
            generation: Some(keys.get().current().0),
            pid_start: process_start(std::process::id()),
        };
        let before = Utc::now();
        let mut name = write_record(&backend, &keys, &record)?;
        let after = Utc::now();
        // The store's stamp on the lock says how far this host's clock is off. When it is
        // (by more than the noise), the lock is written again with the store's time,
        // before anything reads the marks or the index under it.
        let stamped = backend
            .modified(ObjectType::Lock, &name)
            .ok()
            .flatten()
            .is_some_and(|stored| super::clock::observe(stored, before, after));
        if stamped {
            let now = super::clock::now();
            record.started = now;
            record.refreshed = now;
            let first = std::mem::replace(&mut name, write_record(&backend, &keys, &record)?);
            let _ = backend.delete(ObjectType::Lock, &first);
        }
        let now = record.refreshed;
        if matches!(kind, LockKind::Prune | LockKind::Keys) {
            let others = list_locks(&backend, &keys)?;
            // A stale holder of this lock (its process gone from this host, or no refresh
            // by its deadline) is taken over, and said so.
            for (n, other) in others
                .iter()
                .filter(|(n, r)| *n != name && r.kind == kind && r.is_stale(super::clock::now()))
            {
                tracing::warn!(
                    "taking over the stale lock of {} on {} (pid {}, since {}): {}",
                    other.kind.describe(),
                    other.host,
                    other.pid,
                    other.started.format("%Y-%m-%d %H:%M:%S UTC"),
                    other.why_stale()
                );
                if let Err(e) = backend.delete(ObjectType::Lock, n) {
                    if !e.is_not_found() {
                        tracing::warn!("removing stale lock locks/{n}: {e}");
                    }
                }
            }
            if let Some((_, other)) = others
                .iter()
                .find(|(n, r)| *n != name && r.kind == kind && !r.is_stale(super::clock::now()))
            {
                let _ = backend.delete(ObjectType::Lock, &name);
                return Err(LockError::Locked {
                    kind,
                    host: other.host.clone(),
                    pid: other.pid,
                    since: other.started,
                });
            }
        }
        let shared = Arc::new(Shared {
            name: Mutex::new(name),
            last_refresh: Mutex::new(now),
            lost: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let (backend, shared, mut rec) = (backend.clone(), shared.clone(), record.clone());
            std::thread::Builder::new()
                .name("lock-refresh".into())
                .spawn(move || {
                    let mut next = Instant::now() + REFRESH_EVERY;
                    while !shared.stop.load(Ordering::Relaxed) {
                        // Woken at once when the lock is dropped, so no command waits
                        // out the tick on its way out.
                        std::thread::park_timeout(Duration::from_millis(200));
                        if shared.stop.load(Ordering::Acquire) {
                            break;
                        }
                        // Before any refresh: a long gap means others may have judged the
                        // lock stale meanwhile, whatever happens next.
                        shared.check_gap();
                        if Instant::now() < next {
                            continue;
                        }
                        next = Instant::now() + REFRESH_EVERY;
                        rec.refreshed = super::clock::now();
                        match write_record(&backend, &keys, &rec) {
                            Ok(new_name) => {
                                let old = std::mem::replace(
                                    &mut *shared.name.lock().unwrap_or_else(|e| e.into_inner()),
                                    new_name,
                                );
                                shared.check_gap();
                                *shared
                                    .last_refresh
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner()) = rec.refreshed;
                                let _ = backend.delete(ObjectType::Lock, &old);
                            }
                            Err(e) => tracing::warn!("refreshing the repository lock: {e}"),
                        }
                    }
                })
                .ok()
        };
        Ok(RepoLock {
            backend,
            shared,
            thread,
            record,
        })
    }

    /// Whether the lock is certainly still seen as live by others (refreshed well within
    /// [`STALE_AFTER`]). A holder that was paused or cut off longer must not commit.
    pub fn is_fresh(&self) -> bool {
        self.shared.check_gap();
        !self.shared.lost.load(Ordering::SeqCst)
    }

    /// What this lock says.
    pub fn record(&self) -> &LockRecord {
        &self.record
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let name = self
            .shared
            .name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Err(e) = self.backend.delete(ObjectType::Lock, &name) {
            tracing::warn!("removing lock locks/{name}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_gap_between_refreshes_is_never_forgotten() {
        let s = Shared {
            name: Mutex::new(String::new()),
            last_refresh: Mutex::new(Utc::now() - chrono::Duration::minutes(10)),
            lost: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        };
        s.check_gap();
        assert!(
            !s.lost.load(Ordering::SeqCst),
            "10 minutes is within the limit"
        );
        *s.last_refresh.lock().unwrap() = Utc::now() - chrono::Duration::minutes(26);
        s.check_gap();
        assert!(s.lost.load(Ordering::SeqCst));
        // A later successful refresh does not make the holder safe to commit again.
        *s.last_refresh.lock().unwrap() = Utc::now();
        s.check_gap();
        assert!(s.lost.load(Ordering::SeqCst));
    }

    #[test]
    fn staleness_is_judged_by_the_refresh_time() {
        let now = Utc::now();
        let rec = |mins: i64| LockRecord {
            kind: LockKind::Backup,
            host: "h".into(),
            pid: 1,
            started: now - chrono::Duration::hours(5),
            refreshed: now - chrono::Duration::minutes(mins),
            postgres_system_id: None,
            generation: Some(1),
            pid_start: None,
        };
        assert!(!rec(29).is_stale(now));
        assert!(rec(31).is_stale(now));
    }

    #[test]
    fn a_lock_of_a_process_of_this_host_that_is_gone_is_stale_at_once() {
        let now = Utc::now();
        let me = std::process::id();
        let mine = LockRecord {
            kind: LockKind::Prune,
            host: crate::host::hostname(),
            pid: me,
            started: now,
            refreshed: now,
            postgres_system_id: None,
            generation: Some(1),
            pid_start: process_start(me),
        };
        assert!(mine.pid_start.is_some());
        assert!(!mine.is_stale(now), "this process runs");
        // The same pid, started at another time: a reused pid, not the holder.
        let reused = LockRecord {
            pid_start: mine.pid_start.map(|t| t + 1),
            ..mine.clone()
        };
        assert!(reused.is_stale(now));
        // A pid that does not exist.
        let gone = LockRecord {
            pid: u32::MAX - 7,
            ..mine.clone()
        };
        assert!(gone.is_stale(now));
        // Another host's lock is judged by its refresh time only.
        let other = LockRecord {
            host: "another-host".into(),
            ..gone
        };
        assert!(!other.is_stale(now));
    }
}
