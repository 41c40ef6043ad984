//! Fault injection, for tests: a layer that, by a seeded schedule, fails a request
//! (transiently, as a reset connection, or for good, as a broken disk), returns a short or
//! corrupted read, delays a request, or reports a full disk. The binary never builds it
//! into its stack; the fault tests (`tests/it/faults.rs`) put it under the retry layer, as
//! a store's own failures would be, and prove that every fault ends in a clear error
//! naming the object or in a successful retry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Backend, BackendError, Bytes, DirListing, ObjectType};

/// What goes wrong with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// The connection is reset: a transient error, worth a retry.
    Transient,
    /// The store fails for good (an I/O error): not retried.
    Permanent,
    /// A read returns fewer bytes than the object holds (a truncated transfer). On a
    /// write: the write fails part way (not retried).
    ShortRead,
    /// A read returns the bytes with one bit flipped. On a write, a transient error (a
    /// store that silently keeps other bytes than it was given is outside what any
    /// client can notice without reading back).
    Corrupt,
    /// The request waits first, then is served.
    Delay,
    /// A write fails with "no space left on device"; other requests fail for good.
    DiskFull,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 6] = [
        Fault::Transient,
        Fault::Permanent,
        Fault::ShortRead,
        Fault::Corrupt,
        Fault::Delay,
        Fault::DiskFull,
    ];
}

/// Which requests get a fault.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// None: every request is served.
    Off,
    /// Request number `n` (counted from 1 since the schedule was set) gets `fault`.
    Nth {
        /// The request.
        n: u64,
        /// Its fault.
        fault: Fault,
    },
    /// Each request gets, with probability `per_mille / 1000`, one of `faults`, chosen by
    /// a generator seeded with `seed`.
    Random {
        /// The seed.
        seed: u64,
        /// Chance per request, in thousandths.
        per_mille: u32,
        /// The faults drawn from.
        faults: Vec<Fault>,
    },
}

/// A fault that was injected: which request, what it did, to which object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injected {
    /// The request number.
    pub request: u64,
    /// `put`, `get`, `list`, ...
    pub op: &'static str,
    /// The object (or folder) path.
    pub path: String,
    /// The fault.
    pub fault: Fault,
}

#[derive(Debug)]
struct State {
    schedule: Schedule,
    rng: u64,
    injected: Vec<Injected>,
}

/// The schedule and the record of a [`FaultLayer`], shared with the test that drives it.
#[derive(Debug)]
pub struct FaultControl {
    requests: AtomicU64,
    state: Mutex<State>,
}

/// Injects faults into the requests that reach `inner`.
#[derive(Debug)]
pub struct FaultLayer<B> {
    inner: B,
    ctl: Arc<FaultControl>,
    delay: Duration,
}

/// The next number of the splitmix64 sequence whose state is `x` (seeded, repeatable;
/// the tests' generators use it too).
pub fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl FaultControl {
    /// Sets the schedule, restarts the request count and forgets what was injected.
    pub fn set(&self, schedule: Schedule) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.rng = match &schedule {
            Schedule::Random { seed, .. } => *seed,
            _ => 0,
        };
        st.schedule = schedule;
        st.injected.clear();
        self.requests.store(0, Ordering::SeqCst);
    }

    /// No more faults, keeping the count and the record.
    pub fn off(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .schedule = Schedule::Off;
    }

    /// Requests since the schedule was set.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// The faults injected since the schedule was set.
    pub fn injected(&self) -> Vec<Injected> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .injected
            .clone()
    }

    /// The fault for this request, if any (recorded).
    fn draw(&self, op: &'static str, kind: ObjectType, name: &str) -> Option<Fault> {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State {
            schedule,
            rng,
            injected,
        } = &mut *guard;
        let fault = match schedule {
            Schedule::Off => None,
            Schedule::Nth { n: at, fault } => (*at == n).then_some(*fault),
            Schedule::Random {
                per_mille, faults, ..
            } => {
                let roll = splitmix(rng);
                let pick = splitmix(rng);
                (!faults.is_empty() && roll % 1000 < u64::from(*per_mille))
                    .then(|| faults[(pick % faults.len() as u64) as usize])
            }
        }?;
        let path = if name.is_empty() {
            kind.dir().to_string()
        } else {
            kind.path_of(name)
        };
        injected.push(Injected {
            request: n,
            op,
            path,
            fault,
        });
        Some(fault)
    }
}

impl<B: Backend> FaultLayer<B> {
    /// Wraps `inner` with no faults scheduled.
    pub fn new(inner: B) -> Self {
        FaultLayer {
            inner,
            ctl: Arc::new(FaultControl {
                requests: AtomicU64::new(0),
                state: Mutex::new(State {
                    schedule: Schedule::Off,
                    rng: 0,
                    injected: vec![],
                }),
            }),
            delay: Duration::from_millis(30),
        }
    }

    /// The handle that sets the schedule and reads the record.
    pub fn control(&self) -> Arc<FaultControl> {
        self.ctl.clone()
    }

    /// The fault for this request, if any (recorded).
    fn draw(&self, op: &'static str, kind: ObjectType, name: &str) -> Option<Fault> {
        self.ctl.draw(op, kind, name)
    }

    fn requests(&self) -> u64 {
        self.ctl.requests()
    }

    fn error(&self, kind: ObjectType, name: &str, fault: Fault) -> BackendError {
        use std::io::{Error, ErrorKind};
        let path = kind.path_of(name);
        let source = match fault {
            Fault::Transient | Fault::Corrupt => Error::new(
                ErrorKind::ConnectionReset,
                "connection reset by peer (injected)",
            ),
            Fault::DiskFull => {
                Error::new(ErrorKind::StorageFull, "No space left on device (injected)")
            }
            Fault::ShortRead => Error::new(ErrorKind::WriteZero, "short write (injected)"),
            Fault::Permanent | Fault::Delay => Error::other("Input/output error (injected)"),
        };
        BackendError::Io { path, source }
    }

    /// Applies a fault to a request that returns no bytes: an error, or a wait.
    fn plain<T>(
        &self,
        op: &'static str,
        kind: ObjectType,
        name: &str,
        f: impl FnOnce() -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        match self.draw(op, kind, name) {
            None => f(),
            Some(Fault::Delay) => {
                std::thread::sleep(self.delay);
                f()
            }
            Some(fault) => Err(self.error(kind, name, fault)),
        }
    }

    /// Applies a fault to a read: an error, a wait, or damage to the bytes read.
    fn damage(&self, fault: Option<Fault>, buf: &mut Vec<u8>) {
        match fault {
            Some(Fault::ShortRead) if !buf.is_empty() => {
                let keep = buf.len() / 2;
                buf.truncate(keep);
            }
            Some(Fault::Corrupt) if !buf.is_empty() => {
                let at = (self.requests() as usize * 7919) % buf.len();
                buf[at] ^= 0x10;
            }
            _ => {}
        }
    }
}

impl<B: Backend> Backend for FaultLayer<B> {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn put(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        self.plain("put", kind, name, || self.inner.put(kind, name, data))
    }

    fn replace(&self, kind: ObjectType, name: &str, data: Bytes) -> Result<(), BackendError> {
        self.plain("replace", kind, name, || {
            self.inner.replace(kind, name, data)
        })
    }

    fn get(&self, kind: ObjectType, name: &str) -> Result<Vec<u8>, BackendError> {
        let fault = self.draw("get", kind, name);
        match fault {
            None | Some(Fault::ShortRead) | Some(Fault::Corrupt) => {
                let mut v = self.inner.get(kind, name)?;
                self.damage(fault, &mut v);
                Ok(v)
            }
            Some(Fault::Delay) => {
                std::thread::sleep(self.delay);
                self.inner.get(kind, name)
            }
            Some(f) => Err(self.error(kind, name, f)),
        }
    }

    fn get_range_into(
        &self,
        kind: ObjectType,
        name: &str,
        offset: u64,
        len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), BackendError> {
        let fault = self.draw("get", kind, name);
        match fault {
            None | Some(Fault::ShortRead) | Some(Fault::Corrupt) => {
                self.inner.get_range_into(kind, name, offset, len, buf)?;
                self.damage(fault, buf);
                Ok(())
            }
            Some(Fault::Delay) => {
                std::thread::sleep(self.delay);
                self.inner.get_range_into(kind, name, offset, len, buf)
            }
            Some(f) => Err(self.error(kind, name, f)),
        }
    }

    fn list(&self, kind: ObjectType) -> Result<Vec<(String, u64)>, BackendError> {
        self.plain("list", kind, "", || self.inner.list(kind))
    }

    fn list_dir(&self, kind: ObjectType, sub: &str) -> Result<DirListing, BackendError> {
        self.plain("list", kind, sub, || self.inner.list_dir(kind, sub))
    }

    fn delete(&self, kind: ObjectType, name: &str) -> Result<(), BackendError> {
        self.plain("delete", kind, name, || self.inner.delete(kind, name))
    }

    fn exists(&self, kind: ObjectType, name: &str) -> Result<bool, BackendError> {
        self.plain("exists", kind, name, || self.inner.exists(kind, name))
    }

    fn modified(
        &self,
        kind: ObjectType,
        name: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, BackendError> {
        self.plain("exists", kind, name, || self.inner.modified(kind, name))
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

    #[test]
    fn the_nth_request_gets_the_fault_and_it_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let b = FaultLayer::new(LocalBackend::new(dir.path().to_path_buf()));
        let ctl = b.control();
        b.create().unwrap();
        b.put(ObjectType::Lock, "a", Bytes::from_static(b"0123456789"))
            .unwrap();
        ctl.set(Schedule::Nth {
            n: 2,
            fault: Fault::ShortRead,
        });
        assert_eq!(b.get(ObjectType::Lock, "a").unwrap(), b"0123456789");
        assert_eq!(b.get(ObjectType::Lock, "a").unwrap(), b"01234");
        assert_eq!(b.get(ObjectType::Lock, "a").unwrap(), b"0123456789");
        assert_eq!(
            ctl.injected(),
            vec![Injected {
                request: 2,
                op: "get",
                path: "locks/a".into(),
                fault: Fault::ShortRead
            }]
        );
        ctl.set(Schedule::Nth {
            n: 1,
            fault: Fault::DiskFull,
        });
        let e = b
            .put(ObjectType::Lock, "b", Bytes::from_static(b"x"))
            .unwrap_err();
        assert!(e.to_string().contains("locks/b"), "{e}");
        assert!(!e.is_transient());
        ctl.set(Schedule::Nth {
            n: 1,
            fault: Fault::Transient,
        });
        assert!(b.exists(ObjectType::Lock, "a").unwrap_err().is_transient());
        ctl.set(Schedule::Nth {
            n: 1,
            fault: Fault::Corrupt,
        });
        let got = b.get(ObjectType::Lock, "a").unwrap();
        assert_eq!(got.len(), 10);
        assert_ne!(got, b"0123456789");
    }

    #[test]
    fn a_random_schedule_is_repeatable_and_near_its_rate() {
        let dir = tempfile::tempdir().unwrap();
        let b = FaultLayer::new(LocalBackend::new(dir.path().to_path_buf()));
        let ctl = b.control();
        b.create().unwrap();
        let run = || {
            ctl.set(Schedule::Random {
                seed: 42,
                per_mille: 100,
                faults: vec![Fault::Transient, Fault::Permanent],
            });
            for _ in 0..2000 {
                let _ = b.exists(ObjectType::Lock, "a");
            }
            ctl.injected()
        };
        let first = run();
        assert_eq!(first, run(), "the same seed, the same faults");
        assert!((150..250).contains(&first.len()), "{}", first.len());
        assert!(first.iter().any(|i| i.fault == Fault::Transient));
        assert!(first.iter().any(|i| i.fault == Fault::Permanent));
    }
}
