//! Cron schedules in a time zone: standard five-field crontab expressions (or `@daily`,
//! `@hourly`, ...) evaluated on the zone's wall clock, with ISC cron's rules for daylight
//! saving time: a time skipped by a spring-forward runs once, right after the jump; a time
//! that happens twice at a fall-back runs once, at its first occurrence (schedules that fire
//! every hour fire in both repeated hours). The `cron` crate matches the fields; this module
//! owns the crontab dialect and the time-zone arithmetic
//! (docs/decisions/0008-policies-and-agent.md).

use std::str::FromStr;

use chrono::{DateTime, Duration as ChronoDuration, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    expr: String,
    tz: Tz,
    fields: cron::Schedule,
    every_hour: bool,
}

/// What a schedule looks like, for error messages.
pub const CRON_FORMAT: &str = "a cron expression: five fields (minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\") or @hourly, @daily, @weekly, @monthly, @yearly";

const WEEKDAYS: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

/// Rewrites crontab day-of-week numbers (0 or 7 = Sunday, 1 = Monday) as names, because
/// the `cron` crate numbers days from 1 = Sunday.
fn weekday_names(field: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut num = String::new();
    let flush = |num: &mut String, out: &mut String, after_slash: bool| -> Result<(), String> {
        if num.is_empty() {
            return Ok(());
        }
        if after_slash {
            out.push_str(num);
        } else {
            let n: usize = num
                .parse()
                .map_err(|_| format!("day of week {num} does not parse"))?;
            let name = WEEKDAYS
                .get(n)
                .ok_or_else(|| format!("day of week {n} is out of range 0-7"))?;
            out.push_str(name);
        }
        num.clear();
        Ok(())
    };
    let mut after_slash = false;
    for c in field.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            flush(&mut num, &mut out, after_slash)?;
            after_slash = c == '/';
            out.push(c);
        }
    }
    flush(&mut num, &mut out, after_slash)?;
    Ok(out)
}

/// Checks every number of a crontab field against its range, so errors name the field
/// (the `cron` crate's own messages speak of its six-field form).
fn check_ranges(field: &str, name: &str, lo: u32, hi: u32) -> Result<(), String> {
    for part in field.split(',') {
        let base = part.split('/').next().unwrap_or("");
        for n in base.split('-') {
            if n.is_empty() || n == "*" || n == "?" || !n.chars().all(|c| c.is_ascii_digit()) {
                continue;
            }
            let v: u64 = n.parse().unwrap_or(u64::MAX);
            if v < lo as u64 || v > hi as u64 {
                return Err(format!("{name} {n} is out of range {lo}-{hi}"));
            }
        }
    }
    Ok(())
}

fn restricted(field: &str) -> bool {
    !(field == "*" || field == "?")
}

impl CronSchedule {
    /// Parses a crontab expression for the zone `tz` (an IANA name such as `UTC` or
    /// `Europe/Berlin`).
    ///
    /// # Errors
    /// A message saying which part is wrong.
    pub fn parse(expr: &str, tz: &str) -> Result<Self, String> {
        let tz: Tz = Tz::from_str(tz.trim())
            .map_err(|_| format!("the unknown time zone {tz:?} (use an IANA name such as \"UTC\" or \"Europe/Berlin\")"))?;
        let e = expr.trim();
        let (six, hour_field) = match e {
            "@yearly" | "@annually" => ("0 0 0 1 1 *".to_string(), "0".to_string()),
            "@monthly" => ("0 0 0 1 * *".into(), "0".into()),
            "@weekly" => ("0 0 0 * * SUN".into(), "0".into()),
            "@daily" | "@midnight" => ("0 0 0 * * *".into(), "0".into()),
            "@hourly" => ("0 0 * * * *".into(), "*".into()),
            _ => {
                let f: Vec<&str> = e.split_whitespace().collect();
                if f.len() != 5 {
                    return Err(format!(
                        "{e:?} ({} field(s) where five are needed)",
                        f.len()
                    ));
                }
                if restricted(f[2]) && restricted(f[4]) {
                    return Err(format!(
                        "{e:?} (both day-of-month and day-of-week are restricted; cron implementations disagree on what that means, so give only one)"
                    ));
                }
                for (field, (name, lo, hi)) in f.iter().zip([
                    ("minute", 0, 59),
                    ("hour", 0, 23),
                    ("day of month", 1, 31),
                    ("month", 1, 12),
                    ("day of week", 0, 7),
                ]) {
                    check_ranges(field, name, lo, hi).map_err(|why| format!("{e:?} ({why})"))?;
                }
                let dow = weekday_names(f[4]).map_err(|why| format!("{e:?} ({why})"))?;
                (
                    format!("0 {} {} {} {} {dow}", f[0], f[1], f[2], f[3]),
                    f[1].to_string(),
                )
            }
        };
        let fields = cron::Schedule::from_str(&six).map_err(|err| {
            // The crate's message spans lines and shows its own six-field form.
            let why = err.to_string();
            let last = why
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("");
            format!("{e:?} (does not parse: {last})")
        })?;
        let s = CronSchedule {
            expr: e.to_string(),
            tz,
            fields,
            every_hour: hour_field == "*" || hour_field == "*/1",
        };
        if s.next_after(Utc::now()).is_none() {
            return Err(format!("{e:?} (it never fires)"));
        }
        Ok(s)
    }

    /// The expression as written.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The time zone.
    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The instants a wall-clock time stands for under the rules in the module header.
    fn instants(&self, civil: NaiveDateTime) -> Vec<DateTime<Utc>> {
        match self.tz.from_local_datetime(&civil) {
            LocalResult::Single(t) => vec![t.with_timezone(&Utc)],
            LocalResult::Ambiguous(a, b) => {
                let (a, b) = (a.with_timezone(&Utc), b.with_timezone(&Utc));
                let (first, second) = if a <= b { (a, b) } else { (b, a) };
                if self.every_hour {
                    vec![first, second]
                } else {
                    vec![first]
                }
            }
            LocalResult::None => {
                // Skipped by a spring-forward: the first wall-clock minute that exists.
                let mut c = civil;
                for _ in 0..(26 * 60) {
                    c += ChronoDuration::minutes(1);
                    match self.tz.from_local_datetime(&c) {
                        LocalResult::Single(t) => return vec![t.with_timezone(&Utc)],
                        LocalResult::Ambiguous(a, _) => return vec![a.with_timezone(&Utc)],
                        LocalResult::None => {}
                    }
                }
                vec![]
            }
        }
    }

    /// The first time the schedule fires strictly after `t`, or `None` if it never does.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Match fields on the wall clock, treated as UTC so the crate does no zone math.
        // Start three hours back: a fall-back repeats wall-clock times already passed.
        let civil_now = t.with_timezone(&self.tz).naive_local();
        let start = Utc.from_utc_datetime(&(civil_now - ChronoDuration::hours(3)));
        let mut best: Option<(DateTime<Utc>, NaiveDateTime)> = None;
        for c in self.fields.after(&start).take(10_000) {
            let civil = c.naive_utc();
            if let Some((_, best_civil)) = best {
                // Zone offsets change by less than three hours, so later wall-clock
                // times cannot map to earlier instants.
                if civil > best_civil + ChronoDuration::hours(3) {
                    break;
                }
            }
            for i in self.instants(civil) {
                if i > t && best.is_none_or(|(b, _)| i < b) {
                    best = Some((i, civil));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// The last time the schedule fired at or before `t` within `horizon`, if any.
    pub fn last_at_or_before(
        &self,
        t: DateTime<Utc>,
        horizon: std::time::Duration,
    ) -> Option<DateTime<Utc>> {
        let from = t - ChronoDuration::from_std(horizon).ok()?;
        let mut last = None;
        let mut cur = from;
        while let Some(n) = self.next_after(cur) {
            if n > t {
                break;
            }
            last = Some(n);
            cur = n;
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn daily_in_utc() {
        let s = CronSchedule::parse("0 2 * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(at("2026-11-30T01:00:00Z")),
            Some(at("2026-11-30T02:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-11-30T02:00:00Z")),
            Some(at("2026-12-01T02:00:00Z"))
        );
    }

    #[test]
    fn crontab_weekday_numbers() {
        // 1 = Monday in crontab; 2026-11-30 is a Monday.
        let s = CronSchedule::parse("0 3 * * 1", "UTC").unwrap();
        assert_eq!(
            s.next_after(at("2026-11-28T00:00:00Z")),
            Some(at("2026-11-30T03:00:00Z"))
        );
        for sunday in ["0", "7", "SUN"] {
            let s = CronSchedule::parse(&format!("0 3 * * {sunday}"), "UTC").unwrap();
            assert_eq!(
                s.next_after(at("2026-11-28T00:00:00Z")),
                Some(at("2026-11-29T03:00:00Z")),
                "{sunday}"
            );
        }
        let s = CronSchedule::parse("0 3 * * 1-5", "UTC").unwrap();
        assert_eq!(
            s.next_after(at("2026-11-28T00:00:00Z")),
            Some(at("2026-11-30T03:00:00Z"))
        );
    }

    #[test]
    fn zone_offset_applies() {
        let s = CronSchedule::parse("30 14 * * *", "Europe/Berlin").unwrap();
        // Winter: UTC+1.
        assert_eq!(
            s.next_after(at("2026-11-30T00:00:00Z")),
            Some(at("2026-11-30T13:30:00Z"))
        );
        // Summer: UTC+2.
        assert_eq!(
            s.next_after(at("2026-07-01T00:00:00Z")),
            Some(at("2026-07-01T12:30:00Z"))
        );
    }

    #[test]
    fn spring_forward_runs_once_after_the_jump() {
        // New York, 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
        let s = CronSchedule::parse("30 2 * * *", "America/New_York").unwrap();
        assert_eq!(
            s.next_after(at("2026-03-08T06:00:00Z")),
            Some(at("2026-03-08T07:00:00Z"))
        );
        // And the day after, normal again (02:30 EDT = 06:30 UTC).
        assert_eq!(
            s.next_after(at("2026-03-08T07:00:00Z")),
            Some(at("2026-03-09T06:30:00Z"))
        );
    }

    #[test]
    fn fall_back_runs_fixed_times_once_and_hourly_twice() {
        // New York, 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens at
        // 05:30 UTC and 06:30 UTC.
        let s = CronSchedule::parse("30 1 * * *", "America/New_York").unwrap();
        let first = s.next_after(at("2026-11-01T04:00:00Z")).unwrap();
        assert_eq!(first, at("2026-11-01T05:30:00Z"));
        assert_eq!(
            s.next_after(first),
            Some(at("2026-11-02T06:30:00Z")),
            "the repeated 01:30 must not fire again"
        );
        let hourly = CronSchedule::parse("30 * * * *", "America/New_York").unwrap();
        let mut t = at("2026-11-01T04:00:00Z");
        let mut fired = vec![];
        for _ in 0..4 {
            t = hourly.next_after(t).unwrap();
            fired.push(t);
        }
        assert_eq!(
            fired,
            vec![
                at("2026-11-01T04:30:00Z"),
                at("2026-11-01T05:30:00Z"),
                at("2026-11-01T06:30:00Z"),
                at("2026-11-01T07:30:00Z"),
            ]
        );
    }

    #[test]
    fn macros_and_errors() {
        let s = CronSchedule::parse("@daily", "UTC").unwrap();
        assert_eq!(
            s.next_after(at("2026-11-30T01:00:00Z")),
            Some(at("2026-12-01T00:00:00Z"))
        );
        assert!(CronSchedule::parse("0 25 * * *", "UTC").is_err());
        assert!(CronSchedule::parse("0 2 * *", "UTC")
            .unwrap_err()
            .contains("4 field(s)"));
        assert!(CronSchedule::parse("0 2 1 * 1", "UTC")
            .unwrap_err()
            .contains("both day-of-month"));
        assert!(CronSchedule::parse("0 2 * * 8", "UTC").is_err());
        assert!(CronSchedule::parse("0 2 * * *", "Mars/Olympus")
            .unwrap_err()
            .contains("time zone"));
        assert!(CronSchedule::parse("0 0 30 2 *", "UTC")
            .unwrap_err()
            .contains("never fires"));
        assert_eq!(
            CronSchedule::parse("0 25 * * *", "UTC").unwrap_err(),
            "\"0 25 * * *\" (hour 25 is out of range 0-23)"
        );
        assert!(CronSchedule::parse("61 * * * *", "UTC")
            .unwrap_err()
            .contains("minute 61 is out of range 0-59"));
    }

    #[test]
    fn last_fire_before() {
        let s = CronSchedule::parse("0 2 * * *", "UTC").unwrap();
        assert_eq!(
            s.last_at_or_before(
                at("2026-11-30T10:00:00Z"),
                std::time::Duration::from_secs(3 * 86_400)
            ),
            Some(at("2026-11-30T02:00:00Z"))
        );
        assert_eq!(
            s.last_at_or_before(
                at("2026-11-30T01:00:00Z"),
                std::time::Duration::from_secs(3600)
            ),
            None
        );
    }
}
