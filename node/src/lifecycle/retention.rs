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
//! newest buckets. `within d` keeps every snapshot within d of the newest
//! snapshot's time. `tags` keeps snapshots carrying any of the tags. A
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
    format!("{}-{:02}", month_bucket(t), u8::from(t.month()))
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
pub fn select(candidates: &[Candidate], rules: &KeepRules, max_age_ms: u64, now: i64) -> Vec<Decision> {
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    // Newest first; ties broken by id so every replica agrees.
    order.sort_by(|a, b| (b.time_unix_ms, b.id).cmp(&(a.time_unix_ms, a.id)));
    let oldest_allowed = (max_age_ms > 0)
        .then(|| now.saturating_sub(i64::try_from(max_age_ms).unwrap_or(i64::MAX)));
    let expired = |c: &Candidate| oldest_allowed.is_some_and(|limit| c.time_unix_ms < limit);

    // Rules only ever look at snapshots inside max-age: an expired one can
    // neither be kept by them nor use up one of their slots.
    let newest = order.iter().find(|c| !expired(c)).map(|c| c.time_unix_ms);
    let mut buckets = [
        BucketRule { name: "hourly", count: rules.hourly, bucket: hour_bucket, last: None },
        BucketRule { name: "daily", count: rules.daily, bucket: day_bucket, last: None },
        BucketRule { name: "weekly", count: rules.weekly, bucket: week_bucket, last: None },
        BucketRule { name: "monthly", count: rules.monthly, bucket: month_bucket, last: None },
        BucketRule { name: "yearly", count: rules.yearly, bucket: year_bucket, last: None },
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
                >= newest.saturating_sub(i64::try_from(rules.within_ms).unwrap_or(i64::MAX))
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
