//! Which snapshots a retention policy keeps, with restic's semantics: within one group,
//! newest first, `keep_last` keeps the N newest; `keep_hourly` (daily, weekly, monthly,
//! yearly) keeps the newest snapshot of each of the N most recent hours (days, ISO weeks,
//! months, years) that have one; `keep_within` keeps everything within that duration of
//! the group's newest snapshot; `keep_tags` keeps snapshots carrying any of the tags. A
//! snapshot kept by any rule is kept. Unlike restic, the newest snapshot of a group is
//! always kept, whatever the rules: retention never leaves a group with no backup.

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};

/// The keep-* rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeepRules {
    /// Keep the N newest.
    pub last: u32,
    /// Keep the newest of each of the N most recent hours.
    pub hourly: u32,
    /// ... days.
    pub daily: u32,
    /// ... ISO weeks.
    pub weekly: u32,
    /// ... months.
    pub monthly: u32,
    /// ... years.
    pub yearly: u32,
    /// Keep every snapshot this close to the newest.
    pub within: Option<Duration>,
    /// Keep snapshots with any of these tags.
    pub tags: Vec<String>,
}

impl KeepRules {
    /// Whether any rule is set (forgetting with none would remove all but the newest).
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
            && self.within.is_none()
            && self.tags.is_empty()
    }
}

/// One snapshot of a group, as retention sees it.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    /// When it was taken.
    pub time: DateTime<Utc>,
    /// Its tags.
    pub tags: &'a [String],
}

/// For each candidate (same order as given), why it is kept; empty = forget it.
/// Candidates with equal times are ordered by their position (earlier = newer).
pub fn select<Z: TimeZone>(group: &[Candidate], rules: &KeepRules, tz: &Z) -> Vec<Vec<String>> {
    let mut reasons: Vec<Vec<String>> = vec![vec![]; group.len()];
    if group.is_empty() {
        return reasons;
    }
    let mut order: Vec<usize> = (0..group.len()).collect();
    order.sort_by(|&a, &b| group[b].time.cmp(&group[a].time).then(a.cmp(&b)));
    let newest = group[order[0]].time;
    reasons[order[0]].push("newest snapshot".into());

    type BucketFn<Z> = fn(&DateTime<Z>) -> i64;
    let buckets: [(u32, &str, BucketFn<Z>); 6] = [
        (rules.last, "last", |_| 0),
        (rules.hourly, "hourly", |t| {
            (t.year() as i64 * 10_000 + t.ordinal() as i64) * 100 + t.hour() as i64
        }),
        (rules.daily, "daily", |t| {
            t.year() as i64 * 10_000 + t.ordinal() as i64
        }),
        (rules.weekly, "weekly", |t| {
            let w = t.iso_week();
            w.year() as i64 * 100 + w.week() as i64
        }),
        (rules.monthly, "monthly", |t| {
            t.year() as i64 * 100 + t.month() as i64
        }),
        (rules.yearly, "yearly", |t| t.year() as i64),
    ];
    for (count, name, bucket_of) in buckets {
        let mut left = count;
        let mut last_bucket: Option<i64> = None;
        for (pos, &i) in order.iter().enumerate() {
            if left == 0 {
                break;
            }
            let local = group[i].time.with_timezone(tz);
            // `last` has no buckets: every snapshot is its own.
            let b = if name == "last" {
                pos as i64
            } else {
                bucket_of(&local)
            };
            if last_bucket != Some(b) {
                reasons[i].push(format!("{name} snapshot"));
                last_bucket = Some(b);
                left -= 1;
            }
        }
    }
    if let Some(w) = rules.within {
        let w = chrono::Duration::from_std(w).unwrap_or(chrono::Duration::MAX);
        let horizon = newest.checked_sub_signed(w);
        for &i in &order {
            if horizon.is_none_or(|h| group[i].time >= h) {
                reasons[i].push(format!(
                    "within {} of the newest",
                    super::units::format_duration(w.to_std().unwrap_or_default())
                ));
            }
        }
    }
    if !rules.tags.is_empty() {
        for &i in &order {
            if let Some(t) = group[i].tags.iter().find(|t| rules.tags.contains(t)) {
                reasons[i].push(format!("tagged {t}"));
            }
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration as D, Utc};
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-30T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn kept(group: &[Candidate], rules: &KeepRules) -> Vec<usize> {
        select(group, rules, &Utc)
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn daily_keeps_newest_of_each_day() {
        let tags: Vec<String> = vec![];
        // Two snapshots a day for five days, newest first.
        let group: Vec<Candidate> = (0..10)
            .map(|i| Candidate {
                time: t0() - D::hours(12 * i),
                tags: &tags,
            })
            .collect();
        let rules = KeepRules {
            daily: 3,
            ..Default::default()
        };
        // 12:00 and 00:00 of the same day: the 12:00 one is the day's newest.
        assert_eq!(kept(&group, &rules), vec![0, 2, 4]);
        let reasons = select(&group, &rules, &Utc);
        assert_eq!(reasons[0], vec!["newest snapshot", "daily snapshot"]);
    }

    #[test]
    fn within_is_relative_to_newest_and_tags_keep() {
        let keep = vec!["keep".to_string()];
        let none: Vec<String> = vec![];
        let group = vec![
            Candidate {
                time: t0() - D::days(30),
                tags: &none,
            },
            Candidate {
                time: t0() - D::days(31),
                tags: &none,
            },
            Candidate {
                time: t0() - D::days(40),
                tags: &keep,
            },
        ];
        let rules = KeepRules {
            within: Some(Duration::from_secs(86_400)),
            tags: vec!["keep".into()],
            ..Default::default()
        };
        assert_eq!(kept(&group, &rules), vec![0, 1, 2]);
    }

    /// The kept set computed the slow, obvious way.
    fn reference(times: &[i64], rules: &KeepRules) -> Vec<bool> {
        let mut idx: Vec<usize> = (0..times.len()).collect();
        idx.sort_by(|&a, &b| times[b].cmp(&times[a]).then(a.cmp(&b)));
        let mut keep = vec![false; times.len()];
        if let Some(&n) = idx.first() {
            keep[n] = true;
        }
        for &i in idx.iter().take(rules.last as usize) {
            keep[i] = true;
        }
        let day = |s: i64| s.div_euclid(86_400);
        let hour = |s: i64| s.div_euclid(3600);
        for (n, f) in [
            (rules.hourly, &hour as &dyn Fn(i64) -> i64),
            (rules.daily, &day),
        ] {
            let mut seen: Vec<i64> = vec![];
            for &i in &idx {
                let b = f(times[i]);
                if seen.len() < n as usize && !seen.contains(&b) {
                    seen.push(b);
                    keep[i] = true;
                }
            }
        }
        if let (Some(w), Some(&n)) = (rules.within, idx.first()) {
            for i in 0..times.len() {
                if times[i] >= times[n] - w.as_secs() as i64 {
                    keep[i] = true;
                }
            }
        }
        keep
    }

    fn rules_strategy() -> impl Strategy<Value = KeepRules> {
        (
            0u32..4,
            0u32..6,
            0u32..6,
            proptest::option::of(0u64..400_000),
        )
            .prop_map(|(last, hourly, daily, within)| KeepRules {
                last,
                hourly,
                daily,
                within: within.map(Duration::from_secs),
                ..Default::default()
            })
    }

    proptest! {
        #[test]
        fn kept_set_is_exactly_the_rules(
            times in proptest::collection::vec(0i64..1_000_000, 1..40),
            rules in rules_strategy(),
        ) {
            let none: Vec<String> = vec![];
            let base = 1_790_000_000i64;
            let group: Vec<Candidate> = times.iter().map(|&s| Candidate {
                time: DateTime::from_timestamp(base + s, 0).unwrap(),
                tags: &none,
            }).collect();
            let abs: Vec<i64> = times.iter().map(|s| base + s).collect();
            let got: Vec<bool> = select(&group, &rules, &Utc).iter().map(|r| !r.is_empty()).collect();
            prop_assert_eq!(got, reference(&abs, &rules));
        }

        #[test]
        fn newest_always_kept_and_forget_twice_is_once(
            times in proptest::collection::vec(0i64..20_000_000, 1..40),
            tagged in proptest::collection::vec(any::<bool>(), 40),
            rules in rules_strategy(),
            weekly in 0u32..4, monthly in 0u32..4, yearly in 0u32..3,
            keep_tag in any::<bool>(),
        ) {
            let mut rules = rules;
            rules.weekly = weekly;
            rules.monthly = monthly;
            rules.yearly = yearly;
            if keep_tag { rules.tags = vec!["t".into()]; }
            let tag = vec!["t".to_string()];
            let none: Vec<String> = vec![];
            let group: Vec<Candidate> = times.iter().enumerate().map(|(i, &s)| Candidate {
                time: DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap(),
                tags: if tagged[i] { &tag } else { &none },
            }).collect();
            let tz = chrono_tz::Europe::Berlin;
            let first = select(&group, &rules, &tz);
            let newest = (0..group.len()).max_by(|&a, &b| group[a].time.cmp(&group[b].time).then(b.cmp(&a))).unwrap();
            prop_assert!(!first[newest].is_empty());
            let kept: Vec<Candidate> = group.iter().zip(&first)
                .filter(|(_, r)| !r.is_empty()).map(|(c, _)| c.clone()).collect();
            let second = select(&kept, &rules, &tz);
            prop_assert!(second.iter().all(|r| !r.is_empty()), "a second forget removed more");
        }
    }
}
