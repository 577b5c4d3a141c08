//! Snapshot lifecycle on the node: which snapshots a dataset keeps
//! (`retention`, pure), the leader's scheduler that applies dataset policies
//! (`policy`), and what both share: a dataset's candidates read from the
//! state, the wording of locks and durations, and the operator warnings.
//!
//! Forgetting removes snapshot records only; the space their blobs held is
//! reclaimed by the next garbage collection, which works from the reference
//! lists of the snapshots that remain.

pub mod policy;
pub mod retention;

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use crate::meta::state::{StateError, StateView};
use crate::meta::types::{RetentionLock, SnapshotRecord};
use retention::Candidate;

/// RFC 3339 UTC, to the second, of a Unix time in ms.
pub fn format_time(unix_ms: i64) -> String {
    let time = if unix_ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(unix_ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(unix_ms.unsigned_abs())
    };
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A duration in the largest unit that divides it: "3y", "7d", "36h", "90s".
/// A year is 365 days, as in the policy settings.
pub fn format_duration(ms: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("y", 365 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ];
    for (unit, size) in UNITS {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// "locked (compliance) until 2027-01-01T00:00:00Z".
pub fn lock_reason(lock: &RetentionLock) -> String {
    format!(
        "locked ({}) until {}",
        lock.mode.as_str(),
        format_time(lock.until_unix_ms)
    )
}

/// The short form of a snapshot id in messages (as `cairn snapshots` prints it).
pub fn short_id(id: &[u8]) -> String {
    hex::encode(&id[..id.len().min(4)])
}

/// One dataset's snapshots, each with what retention sees of it.
pub type Dataset = Vec<(SnapshotRecord, Candidate)>;

/// The tenant's snapshots grouped by dataset (one dataset if given), with
/// their retention times and locks. The retention time is the cluster
/// commit time; a snapshot committed before commit times were recorded
/// falls back to its own `time_unix_ms`, the only time it has.
pub fn datasets(
    view: &StateView,
    tenant: &str,
    dataset: Option<&str>,
) -> Result<BTreeMap<String, Dataset>, StateError> {
    let lives = view
        .snapshot_lives(tenant)?
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>();
    let mut locks = view.locks(tenant)?;
    let mut grouped: BTreeMap<String, Dataset> = BTreeMap::new();
    for record in view.snapshots(tenant, dataset)? {
        let candidate = Candidate {
            id: record.id,
            time_unix_ms: lives
                .get(&record.id)
                .map_or(record.time_unix_ms, |life| life.committed_unix_ms),
            tags: record.tags.clone(),
            lock: locks.remove(&record.id),
        };
        grouped
            .entry(record.dataset.clone())
            .or_default()
            .push((record, candidate));
    }
    Ok(grouped)
}

/// Conditions an operator should see: a snapshot past its dataset's
/// max-age that only a lock keeps (legal hold against the ceiling). One
/// tenant's, or every tenant's for `None` (cluster status).
pub fn warnings(
    view: &StateView,
    tenant: Option<&str>,
    now: i64,
) -> Result<Vec<String>, StateError> {
    let policies = match tenant {
        Some(tenant) => view
            .policies(tenant)?
            .into_iter()
            .map(|p| (tenant.to_string(), p))
            .collect(),
        None => view.all_policies()?,
    };
    let mut warnings = Vec::new();
    for (tenant, policy) in policies.iter().filter(|(_, p)| p.max_age_ms > 0) {
        let limit = now.saturating_sub(i64::try_from(policy.max_age_ms).unwrap_or(i64::MAX));
        let snapshots = datasets(view, tenant, Some(&policy.dataset))?;
        for (_, candidate) in snapshots.values().flatten() {
            if candidate.time_unix_ms >= limit {
                continue;
            }
            if let Some(lock) = candidate.lock.as_ref().filter(|l| l.holds_at(now)) {
                warnings.push(format!(
                    "tenant {tenant} dataset {}: snapshot {} is past max-age {} but {}",
                    policy.dataset,
                    short_id(&candidate.id),
                    format_duration(policy.max_age_ms),
                    lock_reason(lock)
                ));
            }
        }
    }
    Ok(warnings)
}
