//! Layers around any backend: request metrics (what S3 bills for), bandwidth limits, and
//! retry with exponential backoff for transient errors only. Backends themselves stay
//! small; these wrap them (`Retry(Metrics(Throttle(S3)))`, so every attempt is counted as the
//! store would bill it), as rustic_core's decorators do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Backend, BackendError, Bytes, DirListing, ObjectType};

/// Requests and bytes by kind, counted as they happen.
#[derive(Debug, Default)]
pub struct RequestCounters {
    get: AtomicU64,
    get_range: AtomicU64,
    put: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    exists: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// A copy of the counters, for summaries and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestStats {
    /// Whole-object reads.
    pub get: u64,
    /// Ranged reads.
    pub get_range: u64,
    /// Writes.
    pub put: u64,
    /// Listings.
    pub list: u64,
    /// Deletions.
    pub delete: u64,
    /// Existence checks.
    pub exists: u64,
    /// Bytes written.
    pub bytes_up: u64,
    /// Bytes read.
    pub bytes_down: u64,
}

impl RequestStats {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.get + self.get_range + self.put + self.list + self.delete + self.exists
    }
}

impl RequestCounters {
    /// The current values.
    pub fn stats(&self) -> RequestStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestStats {
            get: l(&self.get),
            get_range: l(&self.get_range),
            put: l(&self.put),
            list: l(&self.list),
            delete: l(&self.delete),
            exists: l(&self.exists),
            bytes_up: l(&self.bytes_up),
            bytes_down: l(&self.bytes_down),
        }
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Counts every request that reaches the inner backend (placed inside the retry layer, each
/// attempt).
#[derive(Debug)]
pub struct MetricsLayer<B> {
    inner: B,
    counters: Arc<RequestCounters>,
}

impl<B: Backend> MetricsLayer<B> {
    /// Wraps `inner`, counting into `counters`.
    pub fn new(inner: B, counters: Arc<RequestCounters>) -> Self {
        MetricsLayer { inner, counters }
    }
}

impl<B: Backend> Backend for MetricsLayer<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        bump(&self.counters.put, 1);
        let len = data.len() as u64;
        let r = self.inner.put(kind, name, data);
        if r.is_ok() {
            bump(&self.counters.bytes_up, len);
        }
        r
    }

    fn replace(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        bump(&self.counters.put, 1);
        let len = data.len() as u64;
        let r = self.inner.replace(kind, name, data);
        if r.is_ok() {
            bump(&self.counters.bytes_up, len);
        }
        r
    }

    fn get(&self, kind: ObjectType, name: &str) -> Result<Vec<u8>, BackendError> {
        bump(&self.counters.get, 1);
        let r = self.inner.get(kind, name)?;
        bump(&self.counters.bytes_down, r.len() as u64);
        Ok(r)
    }

    fn get_range_into(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        bump(&self.counters.get_range, 1);
        self.inner.get_range_into(kind, name, offset, len, buf)?;
        bump(&self.counters.bytes_down, buf.len() as u64);
        Ok(())
    }

    fn list(&self, kind: ObjectType) -> Result<Vec<(String, u64)>, BackendError> {
        bump(&self.counters.list, 1);
        self.inner.list(kind)
    }

    fn list_dir(&self, kind: ObjectType, sub: &str) -> Result<DirListing, BackendError> {
        bump(&self.counters.list, 1);
        self.inner.list_dir(kind, sub)
    }

    fn delete(&self, kind: ObjectType, name: &str) -> Result<(), BackendError> {
        bump(&self.counters.delete, 1);
        self.inner.delete(kind, name)
    }

    fn exists(&self, kind: ObjectType, name: &str) -> Result<bool, BackendError> {
        bump(&self.counters.exists, 1);
        self.inner.exists(kind, name)
    }

    fn modified(
        &self,
        kind: ObjectType,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackendError> {
        bump(&self.counters.exists, 1);
        self.inner.modified(kind, name)
    }

    fn create(&self) -> Result<(), BackendError> {
        self.inner.create()
    }

    fn connections(&self) -> Option<usize> {
        self.inner.connections()
    }
}

/// How often and how patiently to retry.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Wait before the second attempt; doubles each time.
    pub base_delay: Duration,
    /// Longest wait between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// Retries transient failures (see [`BackendError::is_transient`]); anything else, such as
/// a missing object or a refused overwrite, is returned at once.
#[derive(Debug)]
pub struct RetryLayer<B> {
    inner: B,
    policy: RetryPolicy,
}

impl<B: Backend> RetryLayer<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, policy: RetryPolicy) -> Self {
        RetryLayer { inner, policy }
    }

    fn run<T>(
        &self,
        what: &str,
        mut f: impl FnMut() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut delay = self.policy.base_delay;
        let mut attempt = 1;
        loop {
            match f() {
                Err(e) if e.is_transient() && attempt < self.policy.attempts => {
                    tracing::warn!(
                        "{what}: {e}; retrying in {} ms (attempt {attempt} of {})",
                        delay.as_millis(),
                        self.policy.attempts
                    );
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(self.policy.max_delay);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

impl<B: Backend> Backend for RetryLayer<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        self.run("put", || self.inner.put(kind, name, data.clone()))
    }

    fn replace(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        self.run("put", || self.inner.replace(kind, name, data.clone()))
    }

    fn get(&self, kind: ObjectType, name: &str) -> Result<Vec<u8>, BackendError> {
        self.run("get", || self.inner.get(kind, name))
    }

    fn get_range_into(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        self.run("get", || {
            self.inner.get_range_into(kind, name, offset, len, buf)
        })
    }

    fn list(&self, kind: ObjectType) -> Result<Vec<(String, u64)>, BackendError> {
        self.run("list", || self.inner.list(kind))
    }

    fn list_dir(&self, kind: ObjectType, sub: &str) -> Result<DirListing, BackendError> {
        self.run("list", || self.inner.list_dir(kind, sub))
    }

    fn delete(&self, kind: ObjectType, name: &str) -> Result<(), BackendError> {
        self.run("delete", || self.inner.delete(kind, name))
    }

    fn exists(&self, kind: ObjectType, name: &str) -> Result<bool, BackendError> {
        self.run("exists", || self.inner.exists(kind, name))
    }

    fn modified(
        &self,
        kind: ObjectType,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackendError> {
        self.run("exists", || self.inner.modified(kind, name))
    }

    fn create(&self) -> Result<(), BackendError> {
        self.run("create", || self.inner.create())
    }

    fn connections(&self) -> Option<usize> {
        self.inner.connections()
    }
}

/// Paces transfers to a byte rate: each transfer of `n` bytes books `n / rate` seconds on a
/// shared timeline, and the caller waits until its booking ends. Concurrent transfers queue
/// behind each other, so the average rate over any window stays at or under the limit plus
/// one object; idle time earns no burst credit.
#[derive(Debug)]
pub struct Pacer {
    bytes_per_sec: f64,
    booked_until: Mutex<Option<Instant>>,
}

impl Pacer {
    /// A pacer for `kib_per_sec` KiB/s.
    pub fn new(kib_per_sec: u64) -> Self {
        Pacer {
            bytes_per_sec: (kib_per_sec.max(1) * 1024) as f64,
            booked_until: Mutex::new(None),
        }
    }

    /// Books a transfer of `n` bytes that started at `started`; returns when it may end.
    pub fn book(&self, started: Instant, n: u64) -> Instant {
        let mut until = self.booked_until.lock().unwrap_or_else(|e| e.into_inner());
        let from = match *until {
            Some(u) if u > started => u,
            _ => started,
        };
        let end = from + Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        *until = Some(end);
        end
    }

    fn pace(&self, started: Instant, n: u64) {
        let end = self.book(started, n);
        let now = Instant::now();
        if end > now {
            std::thread::sleep(end - now);
        }
    }
}

/// Limits upload and download bandwidth (`--limit-upload`, `--limit-download`, KiB/s).
#[derive(Debug)]
pub struct ThrottleLayer<B> {
    inner: B,
    up: Option<Pacer>,
    down: Option<Pacer>,
}

impl<B: Backend> ThrottleLayer<B> {
    /// Wraps `inner`; `None` leaves a direction unlimited.
    pub fn new(inner: B, upload_kib: Option<u64>, download_kib: Option<u64>) -> Self {
        ThrottleLayer {
            inner,
            up: upload_kib.map(Pacer::new),
            down: download_kib.map(Pacer::new),
        }
    }
}

impl<B: Backend> Backend for ThrottleLayer<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        let started = Instant::now();
        let n = data.len() as u64;
        let r = self.inner.put(kind, name, data);
        if let Some(p) = &self.up {
            p.pace(started, n);
        }
        r
    }

    fn replace(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        self.inner.replace(kind, name, data)
    }

    fn get(&self, kind: ObjectType, name: &str) -> Result<Vec<u8>, BackendError> {
        let started = Instant::now();
        let r = self.inner.get(kind, name)?;
        if let Some(p) = &self.down {
            p.pace(started, r.len() as u64);
        }
        Ok(r)
    }

    fn get_range_into(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        self.inner.get_range_into(kind, name, offset, len, buf)?;
        if let Some(p) = &self.down {
            p.pace(started, buf.len() as u64);
        }
        Ok(())
    }

    fn list(&self, kind: ObjectType) -> Result<Vec<(String, u64)>, BackendError> {
        self.inner.list(kind)
    }

    fn list_dir(&self, kind: ObjectType, sub: &str) -> Result<DirListing, BackendError> {
        self.inner.list_dir(kind, sub)
    }

    fn delete(&self, kind: ObjectType, name: &str) -> Result<(), BackendError> {
        self.inner.delete(kind, name)
    }

    fn exists(&self, kind: ObjectType, name: &str) -> Result<bool, BackendError> {
        self.inner.exists(kind, name)
    }

    fn modified(
        &self,
        kind: ObjectType,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackendError> {
        self.inner.modified(kind, name)
    }

    fn create(&self) -> Result<(), BackendError> {
        self.inner.create()
    }

    fn connections(&self) -> Option<usize> {
        self.inner.connections()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;
    use std::io;
    use std::sync::Mutex;

    /// Our own backend that fails its first `fail` calls with a given error kind, to drive
    /// the retry layer (a test of our layer, not a stand-in for a server).
    #[derive(Debug)]
    struct Flaky {
        inner: LocalBackend,
        left: Mutex<u32>,
        kind: io::ErrorKind,
    }

    impl Flaky {
        fn trip(&self) -> Result<(), BackendError> {
            let mut l = self.left.lock().unwrap();
            if *l > 0 {
                *l -= 1;
                return Err(BackendError::Io {
                    path: "flaky".into(),
                    source: io::Error::from(self.kind),
                });
            }
            Ok(())
        }
    }

    impl Backend for Flaky {
        fn location(&self) -> String {
            self.inner.location()
        }
        fn put(&self, k: ObjectType, n: &str, d: Bytes) -> Result<(), BackendError> {
            self.trip()?;
            self.inner.put(k, n, d)
        }
        fn replace(&self, k: ObjectType, n: &str, d: Bytes) -> Result<(), BackendError> {
            self.trip()?;
            self.inner.replace(k, n, d)
        }
        fn get(&self, k: ObjectType, n: &str) -> Result<Vec<u8>, BackendError> {
            self.trip()?;
            self.inner.get(k, n)
        }
        fn get_range_into(
            &self,
            k: ObjectType,
            n: &str,
            o: u64,
            l: u64,
            b: &mut Vec<u8>,
        ) -> Result<(), BackendError> {
            self.trip()?;
            self.inner.get_range_into(k, n, o, l, b)
        }
        fn list(&self, k: ObjectType) -> Result<Vec<(String, u64)>, BackendError> {
            self.trip()?;
            self.inner.list(k)
        }
        fn list_dir(&self, k: ObjectType, sub: &str) -> Result<DirListing, BackendError> {
            self.trip()?;
            self.inner.list_dir(k, sub)
        }
        fn delete(&self, k: ObjectType, n: &str) -> Result<(), BackendError> {
            self.trip()?;
            self.inner.delete(k, n)
        }
        fn exists(&self, k: ObjectType, n: &str) -> Result<bool, BackendError> {
            self.trip()?;
            self.inner.exists(k, n)
        }
    }

    #[test]
    fn pacer_books_transfers_back_to_back_without_burst_credit() {
        let p = Pacer::new(1); // 1024 B/s
        let t0 = Instant::now();
        let ms = |i: Instant| (i - t0).as_millis();
        assert_eq!(ms(p.book(t0, 512)), 500);
        // A second transfer started at the same time queues behind the first.
        assert_eq!(ms(p.book(t0, 1024)), 1500);
        // After idling, the booking starts from the transfer's own start.
        assert_eq!(ms(p.book(t0 + Duration::from_secs(10), 256)), 10_250);
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    fn setup(
        fail: u32,
        kind: io::ErrorKind,
    ) -> (
        tempfile::TempDir,
        MetricsLayer<RetryLayer<Flaky>>,
        Arc<RequestCounters>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let local = LocalBackend::new(d.path());
        local.create_layout().unwrap();
        let flaky = Flaky {
            inner: local,
            left: Mutex::new(fail),
            kind,
        };
        let counters = Arc::new(RequestCounters::default());
        let b = MetricsLayer::new(RetryLayer::new(flaky, fast()), counters.clone());
        (d, b, counters)
    }

    #[test]
    fn transient_errors_are_retried_until_success() {
        let (_d, b, c) = setup(3, io::ErrorKind::TimedOut);
        b.put(ObjectType::Snapshot, "s1", Bytes::from_static(b"data"))
            .unwrap();
        assert_eq!(b.get(ObjectType::Snapshot, "s1").unwrap(), b"data");
        let s = c.stats();
        assert_eq!((s.put, s.get, s.bytes_up, s.bytes_down), (1, 1, 4, 4));
    }

    #[test]
    fn shipped_order_counts_every_attempt() {
        // The CLI composes Retry(Metrics(backend)): each attempt is a request the store
        // serves and bills, so three failures and one success count four puts.
        let d = tempfile::tempdir().unwrap();
        let local = LocalBackend::new(d.path());
        local.create_layout().unwrap();
        let flaky = Flaky {
            inner: local,
            left: Mutex::new(3),
            kind: io::ErrorKind::TimedOut,
        };
        let counters = Arc::new(RequestCounters::default());
        let b = RetryLayer::new(MetricsLayer::new(flaky, counters.clone()), fast());
        b.put(ObjectType::Snapshot, "s1", Bytes::from_static(b"data"))
            .unwrap();
        let s = counters.stats();
        assert_eq!((s.put, s.bytes_up), (4, 4));
    }

    #[test]
    fn retries_give_up_after_the_policy() {
        let (_d, b, _) = setup(10, io::ErrorKind::ConnectionReset);
        let e = b
            .put(ObjectType::Snapshot, "s1", Bytes::from_static(b"data"))
            .unwrap_err();
        assert!(e.is_transient(), "{e}");
        // Exactly the policy's attempts reached the store: 10 failures armed, 4 used.
        assert_eq!(*b.inner.inner.left.lock().unwrap(), 10 - fast().attempts);
    }

    #[test]
    fn permanent_errors_are_not_retried() {
        let (_d, b, _) = setup(1, io::ErrorKind::PermissionDenied);
        assert!(b
            .put(ObjectType::Snapshot, "s1", Bytes::from_static(b"data"))
            .is_err());
        // The single failure was consumed by the one attempt: the next call succeeds.
        b.put(ObjectType::Snapshot, "s1", Bytes::from_static(b"data"))
            .unwrap();
        let (_d2, b2, _) = setup(0, io::ErrorKind::TimedOut);
        assert!(b2
            .get(ObjectType::Snapshot, "missing")
            .unwrap_err()
            .is_not_found());
    }
}
