//! Which snapshots a dataset keeps: restic's `forget` rules over cluster
//! commit times, plus Cairn's own: retention locks and the max-age ceiling.
//!
//! Pure: the gateway's `Forget` and the leader's policy scheduler both call
//! [`select`] over one dataset at a time, so a rule means the same thing
//! whoever applies it.
//!
//! restic's semantics (its `forget` documentation): snapshots are walked
//! newest first. `last n` keeps the n newest. `hourly/daily/weekly/monthly/
//! yearly n` keeps a snapshot whenever its bucket (UTC hour, day, ISO week,
//! month, year) differs from the bucket of the previous snapshot that rule
//! kept, until n buckets are kept: the newest snapshot of each of the n
//! newest buckets. `within d` keeps every snapshot newer than the newest
//! snapshot's time minus d. `tags` keeps snapshots carrying any of the tags. A
//! snapshot is kept if any rule keeps it.
//!
//! Cairn adds, in this order of strength:
//! 1. an unexpired lock always keeps its snapshot;
//! 2. with `max_age_ms > 0`, a snapshot older than `now - max_age` goes
//!    unless locked, whatever the keep rules say (a legal ceiling);
//! 3. the dataset's newest snapshot is always kept ("latest"), so rules
//!    never leave a dataset empty — except past max-age;
//! 4. with no keep rule, every snapshot inside max-age (all of them without
//!    one) is kept: an empty rule set never removes anything.

use time::OffsetDateTime;

use super::{format_duration, lock_reason};
use crate::meta::types::{Id32, KeepRules, RetentionLock};

/// One snapshot as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: Id32,
    /// Cluster commit time (Unix ms): retention's clock, never the client's.
    pub time_unix_ms: i64,
    pub tags: Vec<String>,
    pub lock: Option<RetentionLock>,
}

/// The verdict on one snapshot and every reason for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: Id32,
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// A calendar bucket rule: its name, count and how a time maps to a bucket.
struct BucketRule {
    name: &'static str,
    count: u32,
    bucket: fn(OffsetDateTime) -> String,
    last: Option<String>,
}

fn utc(unix_ms: i64) -> OffsetDateTime {
    // Out of the representable range only for absurd times; those share a bucket.
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn hour_bucket(t: OffsetDateTime) -> String {
    format!("{}T{:02}", day_bucket(t), t.hour())
}

fn day_bucket(t: OffsetDateTime) -> String {
    format!("{}-{:02}", month_bucket(t), t.day())
}

fn week_bucket(t: OffsetDateTime) -> String {
    let (year, week, _) = t.to_iso_week_date();
    format!("{year:04}-W{week:02}")
}

fn month_bucket(t: OffsetDateTime) -> String {
    format!("{:04}-{:02}", t.year(), u8::from(t.month()))
}

fn year_bucket(t: OffsetDateTime) -> String {
    format!("{:04}", t.year())
}

/// Decides every snapshot of one dataset at cluster time `now`. Returns
/// one decision per candidate, oldest first (by time, then id).
pub fn select(
    candidates: &[Candidate],
    rules: &KeepRules,
    max_age_ms: u64,
    now: i64,
) -> Vec<Decision> {
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    // Newest first; ties broken by id so every replica agrees.
    order.sort_by_key(|c| std::cmp::Reverse((c.time_unix_ms, c.id)));
    let oldest_allowed =
        (max_age_ms > 0).then(|| now.saturating_sub(i64::try_from(max_age_ms).unwrap_or(i64::MAX)));
    let expired = |c: &Candidate| oldest_allowed.is_some_and(|limit| c.time_unix_ms < limit);

    // Rules only ever look at snapshots inside max-age: an expired one can
    // neither be kept by them nor use up one of their slots.
    let newest = order.iter().find(|c| !expired(c)).map(|c| c.time_unix_ms);
    let mut buckets = [
        BucketRule {
            name: "hourly",
            count: rules.hourly,
            bucket: hour_bucket,
            last: None,
        },
        BucketRule {
            name: "daily",
            count: rules.daily,
            bucket: day_bucket,
            last: None,
        },
        BucketRule {
            name: "weekly",
            count: rules.weekly,
            bucket: week_bucket,
            last: None,
        },
        BucketRule {
            name: "monthly",
            count: rules.monthly,
            bucket: month_bucket,
            last: None,
        },
        BucketRule {
            name: "yearly",
            count: rules.yearly,
            bucket: year_bucket,
            last: None,
        },
    ];
    let mut last_left = rules.last;
    let mut decisions = Vec::with_capacity(order.len());
    for (position, candidate) in order.iter().enumerate() {
        let mut reasons = Vec::new();
        let locked = candidate.lock.as_ref().filter(|lock| lock.holds_at(now));
        if let Some(lock) = locked {
            reasons.push(lock_reason(lock));
        }
        if expired(candidate) {
            if locked.is_none() {
                reasons.push(format!(
                    "older than max-age {}",
                    format_duration(max_age_ms)
                ));
            } else {
                reasons.push(format!("past max-age {}", format_duration(max_age_ms)));
            }
            decisions.push(Decision {
                id: candidate.id,
                keep: locked.is_some(),
                reasons,
            });
            continue;
        }
        let mut kept_by_rule = false;
        if rules.is_empty() {
            kept_by_rule = true;
            reasons.push(if max_age_ms > 0 {
                format!("within max-age {}", format_duration(max_age_ms))
            } else {
                "no keep rule given".to_string()
            });
        }
        // Sorted newest first, and an expired snapshot makes every older one
        // expired too: position 0 is the newest inside max-age.
        if position == 0 {
            kept_by_rule = true;
            reasons.push("latest".to_string());
        }
        for tag in &rules.tags {
            if candidate.tags.contains(tag) {
                kept_by_rule = true;
                reasons.push(format!("tag {tag}"));
            }
        }
        if last_left > 0 {
            last_left -= 1;
            kept_by_rule = true;
            reasons.push("last snapshot".to_string());
        }
        let at = utc(candidate.time_unix_ms);
        for rule in buckets.iter_mut().filter(|rule| rule.count > 0) {
            let bucket = (rule.bucket)(at);
            if rule.last.as_ref() != Some(&bucket) {
                rule.count -= 1;
                kept_by_rule = true;
                reasons.push(format!("{} snapshot {bucket}", rule.name));
                rule.last = Some(bucket);
            }
        }
        if rules.within_ms > 0
            && let Some(newest) = newest
            && candidate.time_unix_ms
                > newest.saturating_sub(i64::try_from(rules.within_ms).unwrap_or(i64::MAX))
        {
            kept_by_rule = true;
            reasons.push(format!("within {}", format_duration(rules.within_ms)));
        }
        if !kept_by_rule && locked.is_none() {
            reasons.push("no rule keeps it".to_string());
        }
        decisions.push(Decision {
            id: candidate.id,
            keep: kept_by_rule || locked.is_some(),
            reasons,
        });
    }
    decisions.reverse();
    decisions
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;
    use crate::meta::types::LockMode;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    /// Unix ms of a UTC date and time.
    fn at(year: i32, month: u8, day: u8, hour: u8) -> i64 {
        let month = time::Month::try_from(month).expect("month");
        let date = time::Date::from_calendar_date(year, month, day).expect("date");
        let time = date.with_hms(hour, 0, 0).expect("time").assume_utc();
        i64::try_from(time.unix_timestamp_nanos() / 1_000_000).expect("ms")
    }

    fn candidate(n: u8, time_unix_ms: i64) -> Candidate {
        Candidate {
            id: [n; 32],
            time_unix_ms,
            tags: Vec::new(),
            lock: None,
        }
    }

    fn kept(decisions: &[Decision]) -> Vec<u8> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id[0])
            .collect()
    }

    fn reasons(decisions: &[Decision], n: u8) -> Vec<String> {
        decisions
            .iter()
            .find(|d| d.id[0] == n)
            .map(|d| d.reasons.clone())
            .expect("decided")
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_day() {
        // Two or three backups a day over four days (restic's keep-daily example).
        let snapshots = [
            candidate(1, at(2026, 11, 25, 9)),
            candidate(2, at(2026, 11, 25, 18)),
            candidate(3, at(2026, 11, 26, 9)),
            candidate(4, at(2026, 11, 27, 9)),
            candidate(5, at(2026, 11, 27, 13)),
            candidate(6, at(2026, 11, 27, 18)),
            candidate(7, at(2026, 11, 28, 9)),
            candidate(8, at(2026, 11, 28, 18)),
        ];
        let rules = KeepRules {
            daily: 3,
            ..KeepRules::default()
        };
        let now = at(2026, 11, 29, 0);
        let decisions = select(&snapshots, &rules, 0, now);
        // Oldest first, one decision each.
        assert_eq!(
            decisions.iter().map(|d| d.id[0]).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(kept(&decisions), vec![3, 6, 8]);
        assert_eq!(
            reasons(&decisions, 8),
            vec!["latest", "daily snapshot 2026-11-28"]
        );
        assert_eq!(reasons(&decisions, 3), vec!["daily snapshot 2026-11-26"]);
        assert_eq!(reasons(&decisions, 7), vec!["no rule keeps it"]);

        // With keep-last 2 as well: the two newest, and the days' newest.
        let rules = KeepRules {
            last: 2,
            daily: 3,
            ..KeepRules::default()
        };
        assert_eq!(kept(&select(&snapshots, &rules, 0, now)), vec![3, 6, 7, 8]);
    }

    #[test]
    fn weeks_are_iso_weeks_and_years_are_calendar_years() {
        // 2026-12-31 and 2027-01-01 are both in ISO week 2026-W53; Sunday
        // 2027-01-03 too; Monday 2027-01-04 starts 2027-W01.
        let snapshots = [
            candidate(1, at(2026, 12, 28, 12)),
            candidate(2, at(2026, 12, 31, 12)),
            candidate(3, at(2027, 1, 1, 12)),
            candidate(4, at(2027, 1, 3, 12)),
            candidate(5, at(2027, 1, 4, 12)),
        ];
        let now = at(2027, 1, 5, 0);
        let weekly = KeepRules {
            weekly: 5,
            ..KeepRules::default()
        };
        let decisions = select(&snapshots, &weekly, 0, now);
        assert_eq!(kept(&decisions), vec![4, 5]);
        assert_eq!(
            reasons(&decisions, 4),
            vec!["weekly snapshot 2026-W53".to_string()]
        );
        let yearly = KeepRules {
            yearly: 5,
            ..KeepRules::default()
        };
        assert_eq!(kept(&select(&snapshots, &yearly, 0, now)), vec![2, 5]);
        let monthly = KeepRules {
            monthly: 1,
            ..KeepRules::default()
        };
        assert_eq!(kept(&select(&snapshots, &monthly, 0, now)), vec![5]);
        let hourly = KeepRules {
            hourly: 2,
            ..KeepRules::default()
        };
        assert_eq!(kept(&select(&snapshots, &hourly, 0, now)), vec![4, 5]);
    }

    #[test]
    fn within_tags_locks_and_max_age() {
        let now = at(2026, 11, 29, 0);
        let mut snapshots: Vec<Candidate> = (1..=10u8)
            .map(|n| candidate(n, now - i64::from(11 - n) * DAY))
            .collect();
        snapshots[1].tags = vec!["monthly".into()];
        snapshots[0].lock = Some(RetentionLock {
            mode: LockMode::Compliance,
            until_unix_ms: at(2027, 1, 1, 0),
            set_by: String::new(),
            set_unix_ms: 0,
        });
        // An expired lock holds nothing.
        snapshots[2].lock = Some(RetentionLock {
            mode: LockMode::Governance,
            until_unix_ms: now,
            set_by: String::new(),
            set_unix_ms: 0,
        });
        let rules = KeepRules {
            within_ms: 3 * DAY as u64,
            tags: vec!["monthly".into()],
            ..KeepRules::default()
        };
        let decisions = select(&snapshots, &rules, 0, now);
        // Newest is day -1: strictly within 3d of it (as restic: newer than
        // newest - 3d) = days -1..-3 (snapshots 8..10); 7 is exactly 3d older.
        assert_eq!(kept(&decisions), vec![1, 2, 8, 9, 10]);
        assert_eq!(
            reasons(&decisions, 1),
            vec!["locked (compliance) until 2027-01-01T00:00:00Z"]
        );
        assert_eq!(reasons(&decisions, 2), vec!["tag monthly"]);
        assert_eq!(reasons(&decisions, 8), vec!["within 3d"]);
        assert_eq!(reasons(&decisions, 7), vec!["no rule keeps it"]);

        // Max-age 5d removes even tagged and "last" snapshots, never locked ones.
        let rules = KeepRules {
            last: 10,
            tags: vec!["monthly".into()],
            ..KeepRules::default()
        };
        let decisions = select(&snapshots, &rules, 5 * DAY as u64, now);
        assert_eq!(kept(&decisions), vec![1, 6, 7, 8, 9, 10]);
        assert_eq!(reasons(&decisions, 2), vec!["older than max-age 5d"]);
        assert_eq!(
            reasons(&decisions, 1),
            vec![
                "locked (compliance) until 2027-01-01T00:00:00Z".to_string(),
                "past max-age 5d".to_string()
            ]
        );
        // Max-age alone keeps everything inside it; no rule at all keeps all.
        let none = KeepRules::default();
        assert_eq!(
            kept(&select(&snapshots, &none, 5 * DAY as u64, now)),
            vec![1, 6, 7, 8, 9, 10]
        );
        assert_eq!(kept(&select(&snapshots, &none, 0, now)).len(), 10);
        // Past max-age, even the newest goes.
        assert_eq!(kept(&select(&snapshots, &none, HOUR as u64, now)), vec![1]);
    }

    #[test]
    fn durations_and_times_read_well() {
        assert_eq!(super::super::format_duration(3 * 365 * DAY as u64), "3y");
        assert_eq!(super::super::format_duration(7 * DAY as u64), "7d");
        assert_eq!(super::super::format_duration(36 * HOUR as u64), "36h");
        assert_eq!(super::super::format_duration(1500), "1500ms");
        assert_eq!(
            super::super::format_time(at(2027, 1, 1, 0)),
            "2027-01-01T00:00:00Z"
        );
    }

    /// Snapshots over ~40 days (some sharing a time), some tagged, some locked.
    fn snapshots() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(
            (
                0i64..40 * 24 * 4,
                any::<bool>(),
                prop::option::of((any::<bool>(), -5i64..5)),
            ),
            1..40,
        )
        .prop_map(|raw| {
            let base = at(2026, 10, 1, 0);
            raw.into_iter()
                .enumerate()
                .map(|(i, (quarter_hours, tagged, lock))| Candidate {
                    id: [u8::try_from(i).expect("small"); 32],
                    time_unix_ms: base + quarter_hours * HOUR / 4,
                    tags: if tagged {
                        vec!["keep".into()]
                    } else {
                        Vec::new()
                    },
                    lock: lock.map(|(compliance, days)| RetentionLock {
                        mode: if compliance {
                            LockMode::Compliance
                        } else {
                            LockMode::Governance
                        },
                        until_unix_ms: at(2026, 11, 10, 0) + days * DAY,
                        set_by: String::new(),
                        set_unix_ms: 0,
                    }),
                })
                .collect()
        })
    }

    fn rules() -> impl Strategy<Value = KeepRules> {
        (
            0u32..4,
            0u32..3,
            0u32..6,
            0u32..3,
            0u32..2,
            0u32..2,
            0u64..4,
            any::<bool>(),
        )
            .prop_map(
                |(last, hourly, daily, weekly, monthly, yearly, within_days, tags)| KeepRules {
                    last,
                    hourly,
                    daily,
                    weekly,
                    monthly,
                    yearly,
                    within_ms: within_days * DAY as u64,
                    tags: if tags {
                        vec!["keep".into()]
                    } else {
                        Vec::new()
                    },
                },
            )
    }

    /// Newest first, as restic walks them.
    fn newest_first(snapshots: &[Candidate]) -> Vec<&Candidate> {
        let mut order: Vec<&Candidate> = snapshots.iter().collect();
        order.sort_by_key(|c| std::cmp::Reverse((c.time_unix_ms, c.id)));
        order
    }

    proptest! {
        #[test]
        fn selection_obeys_the_model(
            snapshots in snapshots(),
            rules in rules(),
            max_age_days in prop::option::of(1u64..45),
        ) {
            let now = at(2026, 11, 10, 0);
            let max_age_ms = max_age_days.map_or(0, |d| d * DAY as u64);
            let decisions = select(&snapshots, &rules, max_age_ms, now);
            prop_assert_eq!(decisions.len(), snapshots.len());
            let keep: BTreeMap<Id32, bool> = decisions.iter().map(|d| (d.id, d.keep)).collect();
            prop_assert_eq!(keep.len(), snapshots.len());
            let order = newest_first(&snapshots);
            let limit = now - i64::try_from(max_age_ms).expect("small");
            for c in &snapshots {
                let locked = c.lock.as_ref().is_some_and(|l| l.holds_at(now));
                if locked {
                    prop_assert!(keep[&c.id], "a locked snapshot is removed");
                }
                if max_age_ms > 0 && c.time_unix_ms < limit && !locked {
                    prop_assert!(!keep[&c.id], "kept past max-age without a lock");
                }
            }
            if max_age_ms == 0 {
                prop_assert!(keep[&order[0].id], "the newest snapshot is removed");
                for c in order.iter().take(rules.last as usize) {
                    prop_assert!(keep[&c.id], "one of the last {} is removed", rules.last);
                }
                // The newest snapshot of each of the `daily` newest days is kept.
                let mut days_seen = BTreeSet::new();
                let mut day_newest = Vec::new();
                for c in &order {
                    if days_seen.insert(c.time_unix_ms.div_euclid(DAY)) {
                        day_newest.push(c.id);
                    }
                }
                let expected_days = (rules.daily as usize).min(days_seen.len());
                for id in day_newest.iter().take(expected_days) {
                    prop_assert!(keep[id], "a day's newest snapshot is removed");
                }
                // With daily the only rule and no lock, exactly those are kept.
                let only_daily = KeepRules { daily: rules.daily, ..KeepRules::default() };
                if rules.daily > 0 {
                    let unlocked: Vec<Candidate> = snapshots
                        .iter()
                        .map(|c| Candidate { lock: None, ..c.clone() })
                        .collect();
                    let kept: BTreeSet<Id32> = select(&unlocked, &only_daily, 0, now)
                        .into_iter()
                        .filter(|d| d.keep)
                        .map(|d| d.id)
                        .collect();
                    let expected: BTreeSet<Id32> =
                        day_newest.iter().take(expected_days).copied().collect();
                    prop_assert_eq!(kept, expected);
                }
            }
            if rules.is_empty() && max_age_ms == 0 {
                prop_assert!(keep.values().all(|k| *k), "no rule removed something");
            }
        }
    }
}
