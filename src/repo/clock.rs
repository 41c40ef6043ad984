//! The repository's clock. The times written into locks and marks, and the "now" they are
//! compared with, are the store's time rather than this host's: hosts whose clocks
//! disagree by hours still agree on which lock is stale and which backup started before a
//! mark (format.md §18). The offset between this host's clock and the store's is measured
//! whenever this process writes a lock: the store's modification time of the lock object
//! (S3's `Last-Modified`, a file's mtime set by the kernel or the file server) against
//! this host's time at the write. Until then, and on a store that keeps no times, the
//! offset is zero.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Duration, Utc};

/// The store's time minus this host's, in milliseconds.
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Offsets within this are measurement noise (S3 keeps whole seconds; a write takes time).
const NOISE: Duration = Duration::seconds(2);

/// An offset this large is worth a warning: this host's clock is wrong.
const WARN_AT: Duration = Duration::minutes(1);

/// Now, by the store's clock (as far as measured).
pub fn now() -> DateTime<Utc> {
    Utc::now() + offset()
}

/// The store's time minus this host's.
pub fn offset() -> Duration {
    Duration::milliseconds(OFFSET_MS.load(Ordering::SeqCst))
}

/// Records what one write says of the offset: the store stamped the object `stored`, and
/// this host's clock read `before` and `after` around the write. Returns true when the
/// offset changed (times written meanwhile by the old offset are then worth writing
/// again).
pub fn observe(stored: DateTime<Utc>, before: DateTime<Utc>, after: DateTime<Utc>) -> bool {
    let old = OFFSET_MS.load(Ordering::SeqCst);
    let Some(ms) = next_offset(old, stored, before, after) else {
        return false;
    };
    OFFSET_MS.store(ms, Ordering::SeqCst);
    if Duration::milliseconds(ms).abs() >= WARN_AT {
        tracing::warn!(
            "this host's clock is {} s {} the repository store's: times in locks and marks use the store's clock",
            ms.abs() / 1000,
            if ms > 0 { "behind" } else { "ahead of" }
        );
    }
    true
}

/// The offset (ms) a write implies, when it differs from `old_ms` by more than the noise;
/// an offset within the noise counts as none.
fn next_offset(
    old_ms: i64,
    stored: DateTime<Utc>,
    before: DateTime<Utc>,
    after: DateTime<Utc>,
) -> Option<i64> {
    let local = before + (after - before) / 2;
    let measured = stored - local;
    if (measured - Duration::milliseconds(old_ms)).abs() <= NOISE {
        return None;
    }
    Some(if measured.abs() <= NOISE {
        0
    } else {
        measured.num_milliseconds()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_the_stores_time_less_this_hosts_beyond_the_noise() {
        let t = Utc::now();
        let ms = Duration::milliseconds;
        // Agreement (within the noise): no offset, no change.
        assert_eq!(next_offset(0, t, t - ms(300), t + ms(300)), None);
        assert_eq!(next_offset(0, t + ms(1500), t, t), None);
        // This host runs three hours ahead: the store stamped three hours "earlier".
        let ahead = t + Duration::hours(3);
        let off = next_offset(0, t, ahead, ahead + ms(100)).unwrap();
        assert_eq!(off, -(3 * 3600 * 1000 + 50));
        // Measured again: no change; a host three hours behind: the other way.
        assert_eq!(next_offset(off, t, ahead, ahead + ms(100)), None);
        let behind = t - Duration::hours(3);
        assert_eq!(next_offset(off, t, behind, behind), Some(3 * 3600 * 1000));
        // Back to agreement: none again.
        assert_eq!(next_offset(off, t, t, t), Some(0));
    }
}
