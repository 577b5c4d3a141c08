//! Lifecycle records in the metadata state: forgetting snapshots,
//! retention locks and dataset policies (layout in `state.rs`).
//!
//! Every rule here is decided at `now`, the cluster time of the entry being
//! applied, so each replica reaches the same answer whatever its own clock
//! says. A lock decides against cluster time only: a client or a node with
//! a clock set far ahead cannot make a lock expire early.

use std::collections::{BTreeMap, BTreeSet};

use super::codec;
use super::state::{
    LOCK, POLICY, StateError, StateView, lock_key, policy_key, snapshot_key, snapshot_life_key,
    tenant_prefix,
};
use super::types::{Command, CommandResult, Id32, LockMode, MetaStats, Policy, RetentionLock};
use crate::kv::WriteBatch;

impl StateView {
    /// The lock of one snapshot (expired ones too: expiry is decided at the
    /// caller's cluster time).
    pub fn lock(&self, tenant: &str, id: &Id32) -> Result<Option<RetentionLock>, StateError> {
        self.get("retention lock", &lock_key(tenant, id))
    }

    /// Every lock of the tenant, by snapshot id.
    pub fn locks(&self, tenant: &str) -> Result<BTreeMap<Id32, RetentionLock>, StateError> {
        let prefix = tenant_prefix(LOCK, tenant);
        let pairs = self.kv().scan_prefix(&prefix)?;
        Self::decode_by_id("retention lock", &prefix, pairs)
    }

    /// The policy of one dataset.
    pub fn policy(&self, tenant: &str, dataset: &str) -> Result<Option<Policy>, StateError> {
        self.get("policy", &policy_key(tenant, dataset))
    }

    /// The tenant's policies, by dataset name.
    pub fn policies(&self, tenant: &str) -> Result<Vec<Policy>, StateError> {
        self.scan("policy", &tenant_prefix(POLICY, tenant))
    }

    /// Every policy of every tenant, as (tenant, policy), in key order.
    pub fn all_policies(&self) -> Result<Vec<(String, Policy)>, StateError> {
        self.kv()
            .scan_prefix(&[POLICY])?
            .into_iter()
            .filter_map(|(key, value)| {
                let tenant = tenant_in_key(&key)?;
                Some(
                    codec::decode("policy", &value)
                        .map(|policy| (tenant, policy))
                        .map_err(StateError::from),
                )
            })
            .collect()
    }
}

/// The tenant of a tenant-prefixed key (kind byte, u32-BE length, bytes).
fn tenant_in_key(key: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(key.get(1..5)?.try_into().ok()?) as usize;
    let bytes = key.get(5..5usize.checked_add(len)?)?;
    String::from_utf8(bytes.to_vec()).ok()
}

/// Whether `lock` forbids removing its snapshot at `now`: compliance until
/// it expires, governance unless the remover has the bypass.
fn forbids_removal(lock: &RetentionLock, now: i64, bypass_governance: bool) -> bool {
    lock.holds_at(now) && (lock.mode == LockMode::Compliance || !bypass_governance)
}

/// Applies the lifecycle commands (see [`Command`]).
pub(super) fn apply(
    view: &StateView,
    cmd: &Command,
    now: i64,
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    match cmd {
        Command::ForgetSnapshots {
            tenant,
            ids,
            bypass_governance,
        } => {
            let ids: BTreeSet<&Id32> = ids.iter().collect();
            // All checks first: a refused forget changes nothing at all.
            for id in &ids {
                if view.kv().get(&snapshot_key(tenant, id))?.is_none() {
                    return Ok(CommandResult::UnknownSnapshot);
                }
                if let Some(lock) = view.lock(tenant, id)?
                    && forbids_removal(&lock, now, *bypass_governance)
                {
                    return Ok(CommandResult::Locked);
                }
            }
            for id in &ids {
                batch.delete(snapshot_key(tenant, id));
                batch.delete(snapshot_life_key(tenant, id));
                batch.delete(lock_key(tenant, id));
            }
            stats.snapshots = stats.snapshots.saturating_sub(ids.len() as u64);
            Ok(CommandResult::Ok)
        }
        Command::SetLock { tenant, id, lock } => {
            if view.kv().get(&snapshot_key(tenant, id))?.is_none() {
                return Ok(CommandResult::UnknownSnapshot);
            }
            if let Some(old) = view.lock(tenant, id)?
                && old.holds_at(now)
            {
                // A lock only ever grows: no earlier end, and compliance
                // never turns back into governance. Shortening a governance
                // lock means removing it with the bypass first (audited).
                let shorter = lock.until_unix_ms < old.until_unix_ms;
                let weaker = old.mode == LockMode::Compliance && lock.mode != LockMode::Compliance;
                if shorter || weaker {
                    return Ok(CommandResult::Locked);
                }
            }
            let record = RetentionLock {
                set_unix_ms: now,
                ..lock.clone()
            };
            batch.put(
                lock_key(tenant, id),
                codec::encode("retention lock", &record)?,
            );
            Ok(CommandResult::Ok)
        }
        Command::RemoveLock {
            tenant,
            id,
            bypass_governance,
        } => {
            let Some(lock) = view.lock(tenant, id)? else {
                return Ok(CommandResult::AlreadyExists);
            };
            if forbids_removal(&lock, now, *bypass_governance) {
                return Ok(CommandResult::Locked);
            }
            batch.delete(lock_key(tenant, id));
            Ok(CommandResult::Ok)
        }
        Command::SetPolicy { tenant, policy } => {
            let applied_unix_ms = view
                .policy(tenant, &policy.dataset)?
                .map_or(0, |old| old.applied_unix_ms);
            let record = Policy {
                updated_unix_ms: now,
                applied_unix_ms,
                ..policy.clone()
            };
            batch.put(
                policy_key(tenant, &policy.dataset),
                codec::encode("policy", &record)?,
            );
            Ok(CommandResult::Ok)
        }
        Command::RemovePolicy { tenant, dataset } => {
            if view.policy(tenant, dataset)?.is_none() {
                return Ok(CommandResult::UnknownPolicy);
            }
            batch.delete(policy_key(tenant, dataset));
            Ok(CommandResult::Ok)
        }
        Command::PolicyApplied { tenant, dataset } => {
            let Some(mut policy) = view.policy(tenant, dataset)? else {
                return Ok(CommandResult::UnknownPolicy);
            };
            policy.applied_unix_ms = now;
            batch.put(
                policy_key(tenant, dataset),
                codec::encode("policy", &policy)?,
            );
            Ok(CommandResult::Ok)
        }
        // `state.rs` dispatches only the commands above here.
        _ => Ok(CommandResult::UnknownSnapshot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::state::testing::{id, pack, run_at, view};
    use crate::meta::types::{BlobLocation, KeepRules, PackRecord, SnapshotLife, SnapshotRecord};

    const T: &str = "tenant";
    const DAY: i64 = 86_400_000;

    /// A view with a tenant root tree indexed and snapshots 1..=n committed.
    fn with_snapshots(n: u8) -> StateView {
        let v = view();
        let pack = PackRecord {
            tenant: T.into(),
            ..pack(200)
        };
        let location = BlobLocation {
            pack_id: id(200),
            offset: 0,
            length: 10,
        };
        let add = Command::AddPack {
            pack,
            blobs: vec![(id(201), location)],
        };
        assert_eq!(run_at(&v, 1, add), CommandResult::Ok);
        for s in 1..=n {
            let snapshot = SnapshotRecord {
                id: id(s),
                dataset: "d".into(),
                parent: None,
                time_unix_ms: i64::from(s),
                kind: "full".into(),
                root_tree: id(201),
                sealed_info: vec![],
                files: 1,
                bytes: 1,
                bytes_added: 1,
                tags: vec![],
            };
            let commit = Command::CommitSnapshot {
                tenant: T.into(),
                snapshot,
            };
            assert_eq!(run_at(&v, 1, commit), CommandResult::Ok);
        }
        v
    }

    fn lock(mode: LockMode, until_unix_ms: i64) -> RetentionLock {
        RetentionLock {
            mode,
            until_unix_ms,
            set_by: "tok".into(),
            set_unix_ms: 0,
        }
    }

    fn set_lock(s: u8, mode: LockMode, until: i64) -> Command {
        Command::SetLock {
            tenant: T.into(),
            id: id(s),
            lock: lock(mode, until),
        }
    }

    fn forget(ids: &[u8], bypass_governance: bool) -> Command {
        Command::ForgetSnapshots {
            tenant: T.into(),
            ids: ids.iter().map(|s| id(*s)).collect(),
            bypass_governance,
        }
    }

    fn unlock(s: u8, bypass_governance: bool) -> Command {
        Command::RemoveLock {
            tenant: T.into(),
            id: id(s),
            bypass_governance,
        }
    }

    fn snapshot_ids(v: &StateView) -> Vec<Id32> {
        v.snapshots(T, None)
            .expect("snapshots")
            .iter()
            .map(|s| s.id)
            .collect()
    }

    #[test]
    fn compliance_lock_yields_to_nothing_until_it_expires() {
        let v = with_snapshots(2);
        assert_eq!(
            run_at(&v, 10, set_lock(1, LockMode::Compliance, 10 * DAY)),
            CommandResult::Ok
        );
        let stored = v.lock(T, &id(1)).expect("read").expect("a lock");
        assert_eq!((stored.set_unix_ms, stored.set_by.as_str()), (10, "tok"));
        // Forget with the bypass, unlock with the bypass, shorten, weaken.
        assert_eq!(run_at(&v, 20, forget(&[1], true)), CommandResult::Locked);
        assert_eq!(run_at(&v, 20, unlock(1, true)), CommandResult::Locked);
        assert_eq!(
            run_at(&v, 20, set_lock(1, LockMode::Compliance, 5 * DAY)),
            CommandResult::Locked
        );
        assert_eq!(
            run_at(&v, 20, set_lock(1, LockMode::Governance, 20 * DAY)),
            CommandResult::Locked
        );
        assert_eq!(snapshot_ids(&v), vec![id(1), id(2)]);
        assert_eq!(v.lock(T, &id(1)).expect("read"), Some(stored));
        // Extending is allowed.
        assert_eq!(
            run_at(&v, 30, set_lock(1, LockMode::Compliance, 12 * DAY)),
            CommandResult::Ok
        );
        // Expired (cluster time past until): it no longer holds.
        assert_eq!(run_at(&v, 12 * DAY, forget(&[1], false)), CommandResult::Ok);
        assert_eq!(snapshot_ids(&v), vec![id(2)]);
        assert_eq!(v.lock(T, &id(1)).expect("read"), None);
        assert_eq!(v.stats().expect("stats").snapshots, 1);
    }

    #[test]
    fn governance_lock_yields_only_to_the_bypass() {
        let v = with_snapshots(2);
        assert_eq!(
            run_at(&v, 10, set_lock(1, LockMode::Governance, DAY)),
            CommandResult::Ok
        );
        assert_eq!(run_at(&v, 20, forget(&[1], false)), CommandResult::Locked);
        assert_eq!(run_at(&v, 20, unlock(1, false)), CommandResult::Locked);
        assert_eq!(
            run_at(&v, 20, set_lock(1, LockMode::Governance, DAY / 2)),
            CommandResult::Locked,
            "shortening a governance lock"
        );
        assert_eq!(run_at(&v, 20, unlock(1, true)), CommandResult::Ok);
        assert_eq!(
            run_at(&v, 20, unlock(1, true)),
            CommandResult::AlreadyExists
        );
        // Forget with the bypass removes a governance-locked snapshot.
        assert_eq!(
            run_at(&v, 30, set_lock(2, LockMode::Governance, DAY)),
            CommandResult::Ok
        );
        // Governance may be turned into compliance.
        assert_eq!(
            run_at(&v, 30, set_lock(1, LockMode::Compliance, DAY)),
            CommandResult::Ok
        );
        assert_eq!(run_at(&v, 40, forget(&[2], true)), CommandResult::Ok);
        assert_eq!(snapshot_ids(&v), vec![id(1)]);
        assert_eq!(v.lock(T, &id(2)).expect("read"), None);
        assert_eq!(v.locks(T).expect("locks").len(), 1);
    }

    #[test]
    fn expired_locks_are_removed_without_bypass() {
        let v = with_snapshots(1);
        assert_eq!(
            run_at(&v, 10, set_lock(1, LockMode::Compliance, 100)),
            CommandResult::Ok
        );
        assert_eq!(run_at(&v, 99, unlock(1, false)), CommandResult::Locked);
        assert_eq!(run_at(&v, 100, unlock(1, false)), CommandResult::Ok);
        // An expired lock no longer limits a new one.
        assert_eq!(
            run_at(&v, 110, set_lock(1, LockMode::Compliance, 200)),
            CommandResult::Ok
        );
        assert_eq!(
            run_at(&v, 300, set_lock(1, LockMode::Governance, 250)),
            CommandResult::Ok
        );
    }

    #[test]
    fn forget_is_atomic_and_counts_exactly() {
        let v = with_snapshots(4);
        assert_eq!(v.stats().expect("stats").snapshots, 4);
        // One unknown id: nothing goes.
        assert_eq!(
            run_at(&v, 10, forget(&[1, 2, 99], false)),
            CommandResult::UnknownSnapshot
        );
        // One locked id: nothing goes.
        assert_eq!(
            run_at(&v, 10, set_lock(3, LockMode::Governance, DAY)),
            CommandResult::Ok
        );
        assert_eq!(
            run_at(&v, 10, forget(&[1, 3], false)),
            CommandResult::Locked
        );
        assert_eq!(snapshot_ids(&v).len(), 4);
        assert_eq!(v.stats().expect("stats").snapshots, 4);
        // Duplicates count once.
        assert_eq!(run_at(&v, 10, forget(&[1, 2, 1], false)), CommandResult::Ok);
        assert_eq!(snapshot_ids(&v), vec![id(3), id(4)]);
        assert_eq!(v.stats().expect("stats").snapshots, 2);
        assert_eq!(
            run_at(&v, 10, forget(&[1], false)),
            CommandResult::UnknownSnapshot
        );
        // Another tenant's snapshot is unknown here.
        let other = Command::ForgetSnapshots {
            tenant: "other".into(),
            ids: vec![id(3)],
            bypass_governance: true,
        };
        assert_eq!(run_at(&v, 10, other), CommandResult::UnknownSnapshot);
        assert_eq!(
            run_at(&v, 10, set_lock(99, LockMode::Governance, DAY)),
            CommandResult::UnknownSnapshot
        );
    }

    #[test]
    fn retention_uses_the_commit_time_and_warns_of_locks_past_max_age() {
        let v = with_snapshots(3);
        // Snapshot 3 has a recorded commit time (cluster time); 1 and 2,
        // committed before lives existed, fall back to their own time.
        let life = SnapshotLife {
            committed_unix_ms: 50 * DAY,
            catalog_seq: 3,
            refs: Vec::new(),
        };
        let mut batch = WriteBatch::new();
        batch.put(
            snapshot_life_key(T, &id(3)),
            codec::encode("snapshot life", &life).expect("encode"),
        );
        v.kv().apply_batch(batch).expect("batch");
        assert_eq!(v.snapshot_lives(T).expect("lives").len(), 1);
        let now = 60 * DAY;
        assert_eq!(
            run_at(&v, 10, set_lock(1, LockMode::Compliance, 100 * DAY)),
            CommandResult::Ok
        );
        let datasets = crate::lifecycle::datasets(&v, T, None).expect("datasets");
        let times: Vec<(u8, i64)> = datasets["d"]
            .iter()
            .map(|(_, c)| (c.id[0], c.time_unix_ms))
            .collect();
        assert_eq!(times, vec![(1, 1), (2, 2), (3, 50 * DAY)]);
        assert!(datasets["d"][0].1.lock.is_some());

        let policy = Policy {
            dataset: "d".into(),
            keep: KeepRules {
                last: 1,
                ..KeepRules::default()
            },
            max_age_ms: 30 * DAY as u64,
            ..Policy::default()
        };
        let set = Command::SetPolicy {
            tenant: T.into(),
            policy,
        };
        assert_eq!(run_at(&v, 20, set), CommandResult::Ok);
        // Snapshot 1 is past max-age but locked; 2 is past it; 3 is the latest.
        let plan = crate::lifecycle::policy::plan(&v, now).expect("plan");
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].remove, vec![id(2)]);
        assert_eq!(
            plan[0].target(),
            "tenant tenant dataset d: removed 1, kept 2"
        );
        let warnings = crate::lifecycle::warnings(&v, Some(T), now).expect("warnings");
        assert_eq!(
            warnings,
            vec![
                "tenant tenant dataset d: snapshot 01010101 is past max-age 30d but locked (compliance) until 1970-04-11T00:00:00Z"
                    .to_string()
            ]
        );
        assert_eq!(
            crate::lifecycle::warnings(&v, None, now).expect("all"),
            warnings
        );
        // Once the lock expires there is nothing to warn about.
        assert!(
            crate::lifecycle::warnings(&v, None, 100 * DAY)
                .expect("warnings")
                .is_empty()
        );
        // Forgetting a snapshot removes its life record too.
        assert_eq!(run_at(&v, now, forget(&[3], false)), CommandResult::Ok);
        assert!(v.snapshot_lives(T).expect("lives").is_empty());
    }

    #[test]
    fn policies_keep_their_times_in_cluster_time() {
        let v = view();
        let policy = |dataset: &str, last: u32| Policy {
            dataset: dataset.into(),
            keep: KeepRules {
                last,
                ..KeepRules::default()
            },
            updated_unix_ms: -1,
            applied_unix_ms: -1,
            ..Policy::default()
        };
        let set = |tenant: &str, p: Policy| Command::SetPolicy {
            tenant: tenant.into(),
            policy: p,
        };
        let applied = |dataset: &str| Command::PolicyApplied {
            tenant: T.into(),
            dataset: dataset.into(),
        };
        assert_eq!(run_at(&v, 10, set(T, policy("d", 3))), CommandResult::Ok);
        assert_eq!(run_at(&v, 11, set("t2", policy("x", 1))), CommandResult::Ok);
        let stored = v.policy(T, "d").expect("read").expect("policy");
        assert_eq!((stored.updated_unix_ms, stored.applied_unix_ms), (10, 0));
        assert_eq!(run_at(&v, 20, applied("d")), CommandResult::Ok);
        assert_eq!(
            run_at(&v, 20, applied("none")),
            CommandResult::UnknownPolicy
        );
        assert_eq!(run_at(&v, 30, set(T, policy("d", 5))), CommandResult::Ok);
        let stored = v.policy(T, "d").expect("read").expect("policy");
        assert_eq!(
            (
                stored.keep.last,
                stored.updated_unix_ms,
                stored.applied_unix_ms
            ),
            (5, 30, 20)
        );
        let all = v.all_policies().expect("all");
        assert_eq!(
            all.iter()
                .map(|(t, p)| (t.as_str(), p.dataset.as_str()))
                .collect::<Vec<_>>(),
            // Key order: tenants by name length first (length-prefixed keys).
            vec![("t2", "x"), (T, "d")]
        );
        let remove = |dataset: &str| Command::RemovePolicy {
            tenant: T.into(),
            dataset: dataset.into(),
        };
        assert_eq!(run_at(&v, 40, remove("d")), CommandResult::Ok);
        assert_eq!(run_at(&v, 40, remove("d")), CommandResult::UnknownPolicy);
        assert!(v.policies(T).expect("read").is_empty());
        assert_eq!(v.policies("t2").expect("read").len(), 1);
    }
}
