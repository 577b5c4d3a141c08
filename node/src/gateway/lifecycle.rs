//! Lifecycle calls behind the gateway: forget (retention rules over cluster
//! times), retention locks and dataset policies.
//!
//! Decisions are computed here from this node's state after a read barrier;
//! the state machine re-checks every lock when the change applies, so a
//! decision that raced a lock is refused there, never applied wrongly.
//! Forgetting removes snapshot records only: the space is reclaimed by the
//! next garbage collection.

use std::collections::{BTreeMap, BTreeSet};

use cairn_proto::v1 as pb;

use super::catalog::snapshot_to_wire;
use super::{Gateway, GatewayError, check_name, id32, ids, invalid};
use crate::auth::Caller;
use crate::auth::audit::actor_of;
use crate::lifecycle::retention::{self, Decision};
use crate::lifecycle::{datasets, format_duration, format_time, lock_reason, warnings};
use crate::meta::types::{
    Command, CommandResult, Id32, KeepRules, LockMode, Policy, RetentionLock, SnapshotLife,
};

/// How often a forget is recomputed when a lock or another forget raced it.
const FORGET_ATTEMPTS: usize = 2;

fn rules_from_wire(keep: Option<pb::KeepRules>) -> Result<KeepRules, GatewayError> {
    let keep = keep.unwrap_or_default();
    for tag in &keep.tags {
        check_name(tag, "keep tag")?;
    }
    Ok(KeepRules {
        last: keep.last,
        hourly: keep.hourly,
        daily: keep.daily,
        weekly: keep.weekly,
        monthly: keep.monthly,
        yearly: keep.yearly,
        within_ms: keep.within_ms,
        tags: keep.tags,
    })
}

fn rules_to_wire(keep: KeepRules) -> pb::KeepRules {
    pb::KeepRules {
        last: keep.last,
        hourly: keep.hourly,
        daily: keep.daily,
        weekly: keep.weekly,
        monthly: keep.monthly,
        yearly: keep.yearly,
        within_ms: keep.within_ms,
        tags: keep.tags,
    }
}

/// A lock as the wire shows it.
pub(super) fn lock_to_wire(lock: &RetentionLock) -> pb::RetentionLock {
    pb::RetentionLock {
        mode: lock.mode.as_str().into(),
        until_unix_ms: lock.until_unix_ms,
        set_by: lock.set_by.clone(),
        set_unix_ms: lock.set_unix_ms,
    }
}

fn policy_to_wire(policy: Policy) -> pb::Policy {
    pb::Policy {
        dataset: policy.dataset,
        keep: Some(rules_to_wire(policy.keep)),
        max_age_ms: policy.max_age_ms,
        cold_after_ms: policy.cold_after_ms,
        updated_unix_ms: policy.updated_unix_ms,
        applied_unix_ms: policy.applied_unix_ms,
    }
}

/// "keep last 3, daily 7, tag monthly; max-age 3y" for audit targets.
fn describe_policy(keep: &KeepRules, max_age_ms: u64) -> String {
    let mut parts = Vec::new();
    for (name, n) in [
        ("last", keep.last),
        ("hourly", keep.hourly),
        ("daily", keep.daily),
        ("weekly", keep.weekly),
        ("monthly", keep.monthly),
        ("yearly", keep.yearly),
    ] {
        if n > 0 {
            parts.push(format!("{name} {n}"));
        }
    }
    if keep.within_ms > 0 {
        parts.push(format!("within {}", format_duration(keep.within_ms)));
    }
    parts.extend(keep.tags.iter().map(|t| format!("tag {t}")));
    let mut text = if parts.is_empty() {
        "no keep rule".to_string()
    } else {
        format!("keep {}", parts.join(", "))
    };
    if max_age_ms > 0 {
        text.push_str(&format!("; max-age {}", format_duration(max_age_ms)));
    }
    text
}

/// Why a lock stops a removal, and who (if anyone) can lift it.
fn locked_error(id: &Id32, lock: &RetentionLock) -> GatewayError {
    let remedy = match lock.mode {
        LockMode::Compliance => "nobody can remove it before then",
        LockMode::Governance => "cluster-admin can remove it with --bypass-governance",
    };
    GatewayError::Precondition {
        what: format!(
            "snapshot {} is {}: {remedy}",
            hex::encode(id),
            lock_reason(lock)
        ),
    }
}

/// The snapshot id in a request: 32 bytes.
fn snapshot_id(bytes: &[u8]) -> Result<Id32, GatewayError> {
    id32(bytes, "snapshot id")
}

impl Gateway {
    pub(super) async fn forget_inner(
        &self,
        req: pb::ForgetRequest,
        caller: &Caller,
    ) -> Result<pb::ForgetReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        if !req.dataset.is_empty() {
            check_name(&req.dataset, "dataset")?;
        }
        let named: BTreeSet<Id32> = ids(&req.ids)?.into_iter().collect();
        let rules = rules_from_wire(req.keep.clone())?;
        if named.is_empty() && rules.is_empty() {
            // As restic: an empty policy would keep everything, which is
            // never what a forget meant.
            return Err(invalid(
                "nothing to forget: give snapshot ids or at least one keep rule (keep last, hourly, daily, weekly, monthly, yearly, within or tags)",
            ));
        }
        for attempt in 1..=FORGET_ATTEMPTS {
            let (decisions, removals) = match self.plan_forget(&req, &named, &rules).await {
                Ok(plan) => plan,
                // An attempt on locked data is recorded, as the state
                // machine records the refusals it decides.
                Err(locked @ GatewayError::Precondition { .. }) if !req.dry_run => {
                    let target =
                        format!("tenant {}: {} snapshot(s) by id", req.tenant, named.len());
                    self.auditor
                        .refused(actor_of(caller), "Forget", &target, &locked.to_string());
                    return Err(locked);
                }
                Err(other) => return Err(other),
            };
            if req.dry_run || removals.is_empty() {
                return Ok(pb::ForgetReply {
                    decisions,
                    removed: 0,
                });
            }
            let touched: BTreeSet<&str> = decisions
                .iter()
                .filter(|d| !d.keep)
                .filter_map(|d| d.snapshot.as_ref())
                .map(|s| s.dataset.as_str())
                .collect();
            let target = format!(
                "tenant {} dataset {}: {} snapshot(s)",
                req.tenant,
                touched.into_iter().collect::<Vec<_>>().join(","),
                removals.len()
            );
            let cmd = Command::ForgetSnapshots {
                tenant: req.tenant.clone(),
                ids: removals.clone(),
                bypass_governance: req.bypass_governance,
            };
            match self.write_audited(caller, "Forget", target, cmd).await? {
                CommandResult::Ok => {
                    return Ok(pb::ForgetReply {
                        decisions,
                        removed: removals.len() as u64,
                    });
                }
                // A lock set, or a snapshot forgotten, since the plan:
                // decide again on the newer state.
                CommandResult::Locked | CommandResult::UnknownSnapshot
                    if attempt < FORGET_ATTEMPTS => {}
                other => {
                    return Err(GatewayError::Precondition {
                        what: format!(
                            "forget refused ({}): the snapshots changed while it was decided; run it again",
                            other.audit_text()
                        ),
                    });
                }
            }
        }
        Err(GatewayError::Precondition {
            what: "forget raced other changes twice; run it again".into(),
        })
    }

    /// The decisions of a forget on the current state, and the ids it
    /// removes. `Precondition` only when a named snapshot is locked.
    async fn plan_forget(
        &self,
        req: &pb::ForgetRequest,
        named: &BTreeSet<Id32>,
        rules: &KeepRules,
    ) -> Result<(Vec<pb::ForgetDecision>, Vec<Id32>), GatewayError> {
        self.catch_up().await;
        let view = self.meta.view()?;
        // The cluster clock lags real time while the cluster is idle: a
        // decision taken with it removes less, never more (locks are checked
        // again at apply time).
        let now = view.clock()?;
        let dataset = (!req.dataset.is_empty()).then_some(req.dataset.as_str());
        let groups = datasets(&view, &req.tenant, dataset)?;
        let lives = view
            .snapshot_lives(&req.tenant)?
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>();

        let mut found = BTreeSet::new();
        for (_, candidate) in groups.values().flatten() {
            if !named.contains(&candidate.id) {
                continue;
            }
            found.insert(candidate.id);
            if let Some(lock) = &candidate.lock
                && lock.holds_at(now)
                && (lock.mode == LockMode::Compliance || !req.bypass_governance)
            {
                return Err(locked_error(&candidate.id, lock));
            }
        }
        if let Some(missing) = named.difference(&found).next() {
            let scope = dataset.map_or(String::new(), |d| format!(" in dataset {d}"));
            return Err(GatewayError::NotFound {
                what: format!("snapshot {}{scope}", hex::encode(missing)),
            });
        }

        let mut decisions = Vec::new();
        let mut removals = Vec::new();
        for (_, snapshots) in groups {
            let candidates: Vec<retention::Candidate> =
                snapshots.iter().map(|(_, c)| c.clone()).collect();
            let mut decided: BTreeMap<Id32, Decision> = if rules.is_empty() {
                BTreeMap::new()
            } else {
                retention::select(&candidates, rules, 0, now)
                    .into_iter()
                    .map(|d| (d.id, d))
                    .collect()
            };
            for id in named
                .iter()
                .filter(|id| candidates.iter().any(|c| c.id == **id))
            {
                let decision = decided.entry(*id).or_insert_with(|| Decision {
                    id: *id,
                    keep: false,
                    reasons: Vec::new(),
                });
                decision.keep = false;
                decision.reasons.push("id given".into());
            }
            // Oldest first (by retention time), as `select` orders them.
            let mut ordered: Vec<_> = snapshots
                .into_iter()
                .filter_map(|(record, candidate)| {
                    decided
                        .remove(&candidate.id)
                        .map(|d| (candidate, record, d))
                })
                .collect();
            ordered.sort_by_key(|(c, _, _)| (c.time_unix_ms, c.id));
            for (candidate, record, decision) in ordered {
                if !decision.keep {
                    removals.push(candidate.id);
                }
                decisions.push(pb::ForgetDecision {
                    snapshot: Some(snapshot_with_life(
                        record,
                        &candidate,
                        lives.get(&candidate.id),
                    )),
                    keep: decision.keep,
                    reasons: decision.reasons,
                });
            }
        }
        Ok((decisions, removals))
    }

    pub(super) async fn lock_snapshot_inner(
        &self,
        req: pb::LockSnapshotRequest,
        caller: &Caller,
    ) -> Result<pb::LockSnapshotReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        let id = snapshot_id(&req.id)?;
        let mode = LockMode::parse(&req.mode).ok_or_else(|| {
            invalid(format!(
                "lock mode must be governance or compliance, not {:?}",
                req.mode
            ))
        })?;
        if (req.until_unix_ms != 0) == (req.for_ms != 0) {
            return Err(invalid(
                "give exactly one of: a time to lock until, or a duration to lock for",
            ));
        }
        self.catch_up().await;
        let view = self.meta.view()?;
        // Not earlier than the cluster clock (which lags while idle), nor
        // than this node's clock: a lock "for" a duration is never shorter
        // than asked.
        let now = view.clock()?.max(crate::meta::wall_clock_ms());
        let until = if req.until_unix_ms != 0 {
            req.until_unix_ms
        } else {
            now.saturating_add(i64::try_from(req.for_ms).unwrap_or(i64::MAX))
        };
        if until <= now {
            return Err(invalid(format!(
                "lock until {} is not in the future (cluster time is {})",
                format_time(until),
                format_time(now)
            )));
        }
        let hex_id = hex::encode(id);
        let target = format!(
            "tenant {} snapshot {hex_id} {} until {}",
            req.tenant,
            mode.as_str(),
            format_time(until)
        );
        let lock = RetentionLock {
            mode,
            until_unix_ms: until,
            set_by: actor_of(caller).token_id,
            set_unix_ms: 0,
        };
        let cmd = Command::SetLock {
            tenant: req.tenant.clone(),
            id,
            lock: lock.clone(),
        };
        match self
            .write_audited(caller, "LockSnapshot", target, cmd)
            .await?
        {
            CommandResult::Ok => {
                let stored = self.meta.view()?.lock(&req.tenant, &id)?.unwrap_or(lock);
                Ok(pb::LockSnapshotReply {
                    lock: Some(lock_to_wire(&stored)),
                })
            }
            CommandResult::UnknownSnapshot => Err(GatewayError::NotFound {
                what: format!("snapshot {hex_id}"),
            }),
            CommandResult::Locked => {
                let existing = self
                    .meta
                    .view()?
                    .lock(&req.tenant, &id)?
                    .map_or_else(|| "a lock".to_string(), |l| lock_reason(&l));
                Err(GatewayError::Precondition {
                    what: format!(
                        "snapshot {hex_id} is already {existing}; a lock can only be extended (a compliance lock never turns into governance); to shorten a governance lock, cluster-admin removes it with --bypass-governance first"
                    ),
                })
            }
            other => Err(GatewayError::Precondition {
                what: format!("lock refused: {}", other.audit_text()),
            }),
        }
    }

    pub(super) async fn unlock_snapshot_inner(
        &self,
        req: pb::UnlockSnapshotRequest,
        caller: &Caller,
    ) -> Result<pb::UnlockSnapshotReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        let id = snapshot_id(&req.id)?;
        let hex_id = hex::encode(id);
        let target = format!("tenant {} snapshot {hex_id}", req.tenant);
        let cmd = Command::RemoveLock {
            tenant: req.tenant.clone(),
            id,
            bypass_governance: req.bypass_governance,
        };
        match self
            .write_audited(caller, "UnlockSnapshot", target, cmd)
            .await?
        {
            CommandResult::Ok => Ok(pb::UnlockSnapshotReply {}),
            CommandResult::AlreadyExists => Err(GatewayError::NotFound {
                what: format!("a lock on snapshot {hex_id}"),
            }),
            CommandResult::Locked => match self.meta.view()?.lock(&req.tenant, &id)? {
                Some(lock) => Err(locked_error(&id, &lock)),
                None => Err(GatewayError::Precondition {
                    what: format!("the lock on snapshot {hex_id} changed meanwhile; retry"),
                }),
            },
            other => Err(GatewayError::Precondition {
                what: format!("unlock refused: {}", other.audit_text()),
            }),
        }
    }

    pub(super) async fn set_policy_inner(
        &self,
        req: pb::SetPolicyRequest,
        caller: &Caller,
    ) -> Result<pb::SetPolicyReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        let policy = req
            .policy
            .ok_or_else(|| invalid("policy missing (its dataset at least)"))?;
        check_name(&policy.dataset, "dataset")?;
        let dataset = policy.dataset.clone();
        if req.remove {
            let target = format!("tenant {} dataset {dataset}: removed", req.tenant);
            let cmd = Command::RemovePolicy {
                tenant: req.tenant,
                dataset: dataset.clone(),
            };
            return match self.write_audited(caller, "SetPolicy", target, cmd).await? {
                CommandResult::UnknownPolicy => Err(GatewayError::NotFound {
                    what: format!("a policy for dataset {dataset}"),
                }),
                _ => Ok(pb::SetPolicyReply {}),
            };
        }
        let keep = rules_from_wire(policy.keep)?;
        // A tiering-only policy (cold-after alone) keeps every snapshot and
        // only moves the old ones' packs to the cold tier.
        if keep.is_empty() && policy.max_age_ms == 0 && policy.cold_after_ms == 0 {
            return Err(invalid(
                "a policy needs at least one keep rule, a max-age or a cold-after: without any it would do nothing",
            ));
        }
        let target = format!(
            "tenant {} dataset {dataset}: {}",
            req.tenant,
            describe_policy(&keep, policy.max_age_ms)
        );
        let cmd = Command::SetPolicy {
            tenant: req.tenant,
            policy: Policy {
                dataset,
                keep,
                max_age_ms: policy.max_age_ms,
                cold_after_ms: policy.cold_after_ms,
                updated_unix_ms: 0,
                applied_unix_ms: 0,
            },
        };
        self.write_audited(caller, "SetPolicy", target, cmd).await?;
        Ok(pb::SetPolicyReply {})
    }

    pub(super) async fn get_policies_inner(
        &self,
        req: pb::GetPoliciesRequest,
    ) -> Result<pb::GetPoliciesReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        self.catch_up().await;
        let view = self.meta.view()?;
        let now = view.clock()?;
        Ok(pb::GetPoliciesReply {
            policies: view
                .policies(&req.tenant)?
                .into_iter()
                .map(policy_to_wire)
                .collect(),
            warnings: warnings(&view, Some(&req.tenant), now)?,
        })
    }
}

/// A snapshot record on the wire with what the lifecycle knows of it.
fn snapshot_with_life(
    record: crate::meta::types::SnapshotRecord,
    candidate: &retention::Candidate,
    life: Option<&SnapshotLife>,
) -> pb::SnapshotRecord {
    snapshot_to_wire(record, life, candidate.lock.as_ref())
}
