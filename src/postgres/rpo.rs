//! The recovery point objective of a PostgreSQL policy, told honestly.
//!
//! With `archive_command = 'backupd wal-push %p'` a commit reaches the repository only when
//! its WAL segment is complete; PostgreSQL's `archive_timeout` (0 by default) bounds how
//! long that can take on a quiet server. [`archive_problems`] says when the settings cannot
//! meet the policy's `rpo`. [`RpoTracker`] turns polls of the server's current WAL position
//! and of what is archived into `backupd_wal_rpo_seconds`: an upper bound on how much time
//! of commits the repository could lose now.

use std::collections::VecDeque;
use std::time::Duration;

/// The objective of a postgres policy that states none.
pub const DEFAULT_RPO: Duration = Duration::from_secs(5 * 60);

/// Samples kept while the archive has not caught up with them (dropping one only makes the
/// bound larger, never smaller).
const MAX_SAMPLES: usize = 4096;

/// The server's archiving settings, as `pg_settings` gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveSettings {
    /// `archive_mode`.
    pub archive_mode: String,
    /// `archive_command`.
    pub archive_command: String,
    /// `archive_timeout`, seconds (0: off).
    pub archive_timeout_secs: u64,
}

/// Why the server's settings cannot meet `rpo` (empty: they can). `target` names the
/// server in the messages.
pub fn archive_problems(s: &ArchiveSettings, rpo: Duration, target: &str) -> Vec<String> {
    let mut out = vec![];
    if s.archive_mode == "off" {
        out.push(format!(
            "archive_mode is off on {target}: no WAL reaches the repository between base backups (set archive_mode = on and archive_command = 'backupd wal-push %p', then restart)"
        ));
        return out;
    }
    if !s.archive_command.contains("wal-push") {
        out.push(format!(
            "archive_command on {target} is {:?}, not backupd wal-push: the RPO of this repository is not what the server archives",
            s.archive_command
        ));
    }
    let rpo_s = rpo.as_secs().max(1);
    if s.archive_timeout_secs == 0 {
        out.push(format!(
            "archive_timeout is 0 on {target}: on a quiet server the last commits wait in a segment that is not complete, for hours or days, while the policy's rpo is {rpo_s}s (set archive_timeout = {} in postgresql.conf and reload)",
            rpo_s.min(60)
        ));
    } else if s.archive_timeout_secs > rpo_s {
        out.push(format!(
            "archive_timeout is {}s on {target}, above the policy's rpo of {rpo_s}s: a quiet server's last commits can wait that long (set archive_timeout = {rpo_s} or less)",
            s.archive_timeout_secs
        ));
    }
    out
}

/// A `pg_lsn` as text (`16/B374D848`) as a number.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The WAL position up to which the archive holds every byte: the end of the last
/// archived segment (`last_archived_wal`, maybe a `.partial`/`.backup`/`.history` name:
/// only a plain segment counts).
pub fn durable_end(last_archived_wal: Option<&str>, segment_size: u64) -> Option<u64> {
    let name = last_archived_wal?;
    if name.len() != 24 {
        return None;
    }
    let seg = super::walname::Segment::parse(name, segment_size)?;
    Some((seg.number + 1).saturating_mul(segment_size))
}

/// Polls of one server: when it was at which WAL position, until the archive covers it.
#[derive(Debug, Default)]
pub struct RpoTracker {
    /// The newest sample the archive covered: (time, position).
    covered: Option<(f64, u64)>,
    /// Samples the archive does not cover yet, oldest first.
    pending: VecDeque<(f64, u64)>,
}

impl RpoTracker {
    /// Records a poll at `now` (seconds): the server's `current` position and the
    /// archive's `durable` end. Returns the bound: 0 while the archive holds everything
    /// the server has written; else the time since the newest sample the archive covers
    /// (commits after it may be lost); with no such sample yet, the time since
    /// `unknown_since` (the earliest time a lost commit could have — the caller's
    /// conservative guess: the server's start or its last archive, whichever is older).
    pub fn observe(
        &mut self,
        now: f64,
        current: u64,
        durable: Option<u64>,
        unknown_since: f64,
    ) -> f64 {
        let durable = durable.unwrap_or(0);
        self.pending.push_back((now, current));
        // Everything at or below the archive's end is covered; the newest of those wins.
        while let Some(&(t, lsn)) = self.pending.front() {
            if lsn > durable {
                break;
            }
            self.covered = Some((t, lsn));
            self.pending.pop_front();
        }
        // Equal positions in a row: the newest time is the better bound.
        if self.pending.len() >= 2 {
            let n = self.pending.len();
            if self.pending[n - 2].1 == self.pending[n - 1].1 {
                self.pending.remove(n - 2);
            }
        }
        while self.pending.len() > MAX_SAMPLES {
            self.pending.pop_front();
            // An older uncovered sample dropped: the bound can only grow.
        }
        if self.pending.is_empty() {
            return 0.0;
        }
        match self.covered {
            Some((t, _)) => (now - t).max(0.0),
            None => (now - unknown_since).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn settings_that_cannot_meet_the_objective_are_named() {
        let s = |mode: &str, cmd: &str, t: u64| ArchiveSettings {
            archive_mode: mode.into(),
            archive_command: cmd.into(),
            archive_timeout_secs: t,
        };
        let rpo = Duration::from_secs(60);
        let ok = s("on", "backupd wal-push %p", 60);
        assert!(archive_problems(&ok, rpo, "db").is_empty());
        let zero = archive_problems(&s("on", "backupd wal-push %p", 0), rpo, "db");
        assert_eq!(zero.len(), 1);
        assert!(zero[0].contains("archive_timeout is 0"), "{zero:?}");
        let above = archive_problems(&s("on", "backupd wal-push %p", 300), rpo, "db");
        assert!(
            above[0].contains("above the policy's rpo of 60s"),
            "{above:?}"
        );
        let off = archive_problems(&s("off", "", 0), rpo, "db");
        assert!(
            off.len() == 1 && off[0].contains("archive_mode is off"),
            "{off:?}"
        );
        let other = archive_problems(&s("on", "cp %p /mnt/%f", 30), rpo, "db");
        assert!(other[0].contains("not backupd wal-push"), "{other:?}");
    }

    #[test]
    fn lsns_and_durable_ends() {
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("x"), None);
        // Segment 3 of timeline 1 archived: everything below 4 * 16 MiB is durable.
        assert_eq!(
            durable_end(Some("000000010000000000000003"), SEG),
            Some(4 * SEG)
        );
        assert_eq!(
            durable_end(Some("000000010000000000000003.00000028.backup"), SEG),
            None
        );
        assert_eq!(durable_end(None, SEG), None);
    }

    #[test]
    fn the_bound_is_zero_only_when_caught_up_and_never_below_the_oldest_loss() {
        let mut t = RpoTracker::default();
        // Caught up: the archive ends beyond the position.
        assert_eq!(t.observe(100.0, 3 * SEG, Some(3 * SEG), 0.0), 0.0);
        // A commit (position moves into segment 3, which is not complete): the bound is
        // the time since the last covered sample, and grows while nothing is archived.
        assert_eq!(t.observe(130.0, 3 * SEG + 500, Some(3 * SEG), 0.0), 30.0);
        assert_eq!(t.observe(160.0, 3 * SEG + 500, Some(3 * SEG), 0.0), 60.0);
        assert_eq!(t.observe(3700.0, 3 * SEG + 900, Some(3 * SEG), 0.0), 3600.0);
        // Segment 3 archived (say archive_timeout switched it): caught up again.
        assert_eq!(t.observe(3730.0, 4 * SEG, Some(4 * SEG), 0.0), 0.0);
        // Archived only part of what was written: the covered sample's age.
        assert_eq!(t.observe(3760.0, 5 * SEG + 10, Some(4 * SEG), 0.0), 30.0);
        assert_eq!(
            t.observe(3790.0, 6 * SEG + 10, Some(5 * SEG + 10 + SEG), 0.0),
            0.0
        );
        // A fresh tracker that is not caught up: the caller's conservative start.
        let mut fresh = RpoTracker::default();
        assert_eq!(
            fresh.observe(1000.0, 9 * SEG + 1, Some(9 * SEG), 400.0),
            600.0
        );
        assert_eq!(
            fresh.observe(1030.0, 9 * SEG + 1, Some(9 * SEG), 400.0),
            630.0
        );
    }

    #[test]
    fn a_long_backlog_is_bounded_in_memory_and_still_an_upper_bound() {
        let mut t = RpoTracker::default();
        t.observe(0.0, SEG, Some(SEG), 0.0);
        let mut last = 0.0;
        for i in 1..10_000u64 {
            last = t.observe(i as f64, SEG + i, Some(SEG), 0.0);
        }
        assert!(t.pending.len() <= MAX_SAMPLES);
        assert_eq!(last, 9999.0);
    }
}
