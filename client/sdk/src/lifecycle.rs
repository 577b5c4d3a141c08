//! The lifecycle of a tenant's snapshots: forget (restic's keep rules,
//! computed by the cluster over cluster times), prune (garbage collection
//! on the leader, without the tenant's key, from the snapshots' reference
//! lists), retention locks, dataset policies the leader applies, and
//! storage statistics.
//!
//! Every call here is an answer from the cluster: a refusal for the token's
//! role is returned at once (never failed over) and says which token may do
//! it. The decisions are the cluster's, so a client with a wrong clock
//! cannot make a snapshot look older than it is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cairn_proto::v1 as pb;
use serde::Serialize;

use crate::error::{ClientError, Result};
use crate::repo::Repository;

/// A retention lock on a snapshot: it cannot be forgotten before `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockInfo {
    /// "governance" (a cluster-admin may bypass it) or "compliance" (nobody).
    pub mode: String,
    /// Cluster time, Unix ms.
    pub until_unix_ms: i64,
}

impl LockInfo {
    pub(crate) fn from_wire(lock: pb::RetentionLock) -> Self {
        Self {
            mode: lock.mode,
            until_unix_ms: lock.until_unix_ms,
        }
    }

    /// Whether the lock still holds at `now_ms` (Unix ms).
    pub fn holds_at(&self, now_ms: i64) -> bool {
        self.until_unix_ms > now_ms
    }
}

/// The two lock modes (S3 Object Lock's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    /// Holds against every rule and admin; a cluster-admin may lift it
    /// with `bypass_governance`.
    #[default]
    Governance,
    /// Holds against everyone until it expires.
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }
}

impl std::str::FromStr for LockMode {
    type Err = ClientError;

    fn from_str(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "governance" => Ok(LockMode::Governance),
            "compliance" => Ok(LockMode::Compliance),
            _ => Err(ClientError::BadInput {
                what: format!("unknown lock mode {text:?}: use governance or compliance"),
            }),
        }
    }
}

/// Until when a lock holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockUntil {
    /// An absolute time (compared with cluster time).
    At(SystemTime),
    /// This long from when the cluster applies it.
    For(Duration),
}

/// restic's keep rules; 0 / `None` / empty = rule not given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeepRules {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    /// Keep every snapshot within this long of the dataset's newest one.
    #[serde(serialize_with = "opt_duration")]
    pub within: Option<Duration>,
    /// Keep every snapshot carrying one of these tags.
    pub tags: Vec<String>,
}

impl KeepRules {
    /// No rule given: such a forget would remove everything, so it is refused.
    pub fn is_empty(&self) -> bool {
        self.to_wire() == pb::KeepRules::default()
    }

    pub fn to_wire(&self) -> pb::KeepRules {
        pb::KeepRules {
            last: self.last,
            hourly: self.hourly,
            daily: self.daily,
            weekly: self.weekly,
            monthly: self.monthly,
            yearly: self.yearly,
            within_ms: self.within.map(duration_ms).unwrap_or_default(),
            tags: self.tags.clone(),
        }
    }

    pub fn from_wire(rules: &pb::KeepRules) -> Self {
        Self {
            last: rules.last,
            hourly: rules.hourly,
            daily: rules.daily,
            weekly: rules.weekly,
            monthly: rules.monthly,
            yearly: rules.yearly,
            within: ms_duration(rules.within_ms),
            tags: rules.tags.clone(),
        }
    }
}

/// What to forget.
#[derive(Debug, Clone, Default)]
pub struct ForgetOptions {
    /// Only this dataset; `None`: every dataset, each on its own.
    pub dataset: Option<String>,
    /// Snapshots to remove by id: hex prefixes of at least 8 characters.
    pub ids: Vec<String>,
    pub keep: KeepRules,
    /// Compute and report, remove nothing.
    pub dry_run: bool,
    /// Remove governance-locked snapshots named by id (cluster-admin only).
    pub bypass_governance: bool,
}

/// The cluster's decision on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForgetDecision {
    /// Full hex id.
    pub id: String,
    pub dataset: String,
    pub kind: String,
    /// Cluster time of the commit (the client's time for an old record).
    pub committed_unix_ms: i64,
    pub tags: Vec<String>,
    pub lock: Option<LockInfo>,
    pub keep: bool,
    /// Why kept or removed ("last 3", "daily 2026-11-28", "locked ...").
    pub reasons: Vec<String>,
}

/// What a forget decided and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ForgetReport {
    /// Oldest first, per dataset.
    pub decisions: Vec<ForgetDecision>,
    /// Snapshot records removed (0 on a dry run).
    pub removed: u64,
}

impl ForgetReport {
    pub fn kept(&self) -> impl Iterator<Item = &ForgetDecision> {
        self.decisions.iter().filter(|d| d.keep)
    }

    pub fn to_remove(&self) -> impl Iterator<Item = &ForgetDecision> {
        self.decisions.iter().filter(|d| !d.keep)
    }
}

/// What a garbage collection found and did ([`pb::PruneReply`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    pub blobs_live: u64,
    pub blobs_removed: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    /// Pack bytes (before erasure coding) no longer stored.
    pub bytes_freed: u64,
    /// Live bytes copied into new packs by repacking.
    pub bytes_repacked: u64,
    /// Shard files deleted from nodes.
    pub shards_deleted: u64,
    /// Unreferenced packs kept because a backup may still commit them.
    pub packs_in_grace: u64,
    pub duration_ms: u64,
    pub dry_run: bool,
    /// Tenants skipped and why.
    pub skipped: Vec<String>,
}

impl From<pb::PruneReply> for PruneReport {
    fn from(r: pb::PruneReply) -> Self {
        Self {
            blobs_live: r.blobs_live,
            blobs_removed: r.blobs_removed,
            packs_deleted: r.packs_deleted,
            packs_repacked: r.packs_repacked,
            bytes_freed: r.bytes_freed,
            bytes_repacked: r.bytes_repacked,
            shards_deleted: r.shards_deleted,
            packs_in_grace: r.packs_in_grace,
            duration_ms: r.duration_ms,
            dry_run: r.dry_run,
            skipped: r.skipped,
        }
    }
}

/// A dataset's policy, applied by the leader on a schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicySpec {
    pub dataset: String,
    pub keep: KeepRules,
    /// Legal ceiling: older snapshots are forgotten unless locked.
    #[serde(serialize_with = "opt_duration")]
    pub max_age: Option<Duration>,
    /// Move packs to the cold class after this long (applied by tiering).
    #[serde(serialize_with = "opt_duration")]
    pub cold_after: Option<Duration>,
    /// Set by the cluster; ignored when setting.
    pub updated_unix_ms: i64,
    /// When the leader last applied it; 0 = not yet. Ignored when setting.
    pub applied_unix_ms: i64,
}

impl PolicySpec {
    fn to_wire(&self) -> pb::Policy {
        pb::Policy {
            dataset: self.dataset.clone(),
            keep: Some(self.keep.to_wire()),
            max_age_ms: self.max_age.map(duration_ms).unwrap_or_default(),
            // On the wire 0 means "never"; `--cold-after 0s` means "as soon
            // as committed", sent as the smallest age that is not 0.
            cold_after_ms: self
                .cold_after
                .map(|d| duration_ms(d).max(1))
                .unwrap_or_default(),
            updated_unix_ms: 0,
            applied_unix_ms: 0,
        }
    }

    fn from_wire(p: pb::Policy) -> Self {
        Self {
            keep: p
                .keep
                .as_ref()
                .map(KeepRules::from_wire)
                .unwrap_or_default(),
            max_age: ms_duration(p.max_age_ms),
            cold_after: ms_duration(p.cold_after_ms),
            updated_unix_ms: p.updated_unix_ms,
            applied_unix_ms: p.applied_unix_ms,
            dataset: p.dataset,
        }
    }
}

/// Storage of a tenant (or one dataset) ([`pb::StatsReply`]) and its ratios.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub snapshots: u64,
    /// Sum of the snapshots' file bytes (what restoring each would write).
    pub logical_bytes: u64,
    /// Distinct blobs indexed and their encoded (compressed, sealed) bytes.
    pub blobs: u64,
    pub stored_bytes: u64,
    /// Packs and their bytes before erasure coding (live and garbage).
    pub packs: u64,
    pub pack_bytes: u64,
    /// Bytes on the nodes' disks: every shard of every pack.
    pub raw_bytes: u64,
    pub datasets: Vec<String>,
    /// logical / stored: what deduplication and compression save (0 when
    /// nothing is stored).
    pub dedup_compression_ratio: f64,
    /// raw / pack bytes: what erasure coding costs (0 when nothing is stored).
    pub erasure_overhead: f64,
}

impl From<pb::StatsReply> for Stats {
    fn from(r: pb::StatsReply) -> Self {
        Self {
            dedup_compression_ratio: ratio(r.logical_bytes, r.stored_bytes),
            erasure_overhead: ratio(r.raw_bytes, r.pack_bytes),
            snapshots: r.snapshots,
            logical_bytes: r.logical_bytes,
            blobs: r.blobs,
            stored_bytes: r.stored_bytes,
            packs: r.packs,
            pack_bytes: r.pack_bytes,
            raw_bytes: r.raw_bytes,
            datasets: r.datasets,
        }
    }
}

fn ratio(over: u64, under: u64) -> f64 {
    if under == 0 {
        0.0
    } else {
        over as f64 / under as f64
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ms_duration(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// A duration as humantime text ("30days"), `null` when absent.
fn opt_duration<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// The role a node's refusal names ("a backup token may not call Forget").
fn role_in(reason: &str) -> Option<String> {
    let rest = reason.strip_prefix("a ")?;
    let (role, _) = rest.split_once(" token may not")?;
    (!role.is_empty()).then(|| role.to_string())
}

/// A role refusal as the lifecycle sentence that says which token may.
fn refused(error: ClientError, what: &'static str, advice: &'static str) -> ClientError {
    match error {
        ClientError::PermissionDenied { reason, .. } => ClientError::LifecycleRefused {
            what,
            role: role_in(&reason),
            advice,
            reason,
        },
        other => other,
    }
}

const ADMIN_ADVICE: &str = "use an admin token of the tenant (or a cluster-admin token)";
const BYPASS_ADVICE: &str = "bypassing a governance lock takes a cluster-admin token";

/// A forget decision from the wire (the record need not open: forget needs
/// no key, and an old record is still shown by its clear fields).
fn decision(d: pb::ForgetDecision) -> ForgetDecision {
    let record = d.snapshot.unwrap_or_default();
    ForgetDecision {
        id: hex::encode(&record.id),
        dataset: record.dataset,
        kind: record.kind,
        committed_unix_ms: if record.committed_unix_ms > 0 {
            record.committed_unix_ms
        } else {
            record.time_unix_ms
        },
        tags: record.tags,
        lock: record.lock.map(LockInfo::from_wire),
        keep: d.keep,
        reasons: d.reasons,
    }
}

fn unix_ms(time: SystemTime) -> Result<i64> {
    let since = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| ClientError::BadInput {
            what: "a lock time before 1970 holds nothing".into(),
        })?;
    Ok(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

impl Repository {
    /// Removes snapshot records by the keep rules and/or by id, as the
    /// cluster decides over cluster times; locked snapshots stay. Data is
    /// freed by [`Repository::prune`] (or the leader's next collection).
    pub async fn forget(&self, opts: &ForgetOptions) -> Result<ForgetReport> {
        if opts.ids.is_empty() && opts.keep.is_empty() {
            return Err(ClientError::NoForgetPolicy);
        }
        let mut ids = Vec::with_capacity(opts.ids.len());
        for query in &opts.ids {
            let snapshot = self.find_snapshot(query, opts.dataset.as_deref()).await?;
            ids.push(snapshot.id.to_vec());
        }
        let request = pb::ForgetRequest {
            tenant: self.tenant().to_string(),
            dataset: opts.dataset.clone().unwrap_or_default(),
            ids,
            keep: Some(opts.keep.to_wire()),
            dry_run: opts.dry_run,
            bypass_governance: opts.bypass_governance,
        };
        let advice = if opts.bypass_governance {
            BYPASS_ADVICE
        } else {
            ADMIN_ADVICE
        };
        let reply = self
            .cluster()
            .call("forget snapshots", |mut c| {
                let request = request.clone();
                async move { c.forget(request).await }
            })
            .await
            .map_err(|e| refused(e, "forget snapshots", advice))?;
        Ok(ForgetReport {
            decisions: reply.decisions.into_iter().map(decision).collect(),
            removed: reply.removed,
        })
    }

    /// Garbage collection of this tenant now, on the leader: blobs no
    /// snapshot references are removed, packs deleted or repacked.
    pub async fn prune(&self, dry_run: bool) -> Result<PruneReport> {
        let reply = self
            .cluster()
            .call("prune", |mut c| {
                let request = pb::PruneRequest {
                    tenant: self.tenant().to_string(),
                    dry_run,
                };
                async move { c.prune(request).await }
            })
            .await
            .map_err(|e| refused(e, "prune", ADMIN_ADVICE))?;
        Ok(reply.into())
    }

    /// Locks the snapshot `query` names (a hex prefix or `latest`) until a
    /// time or for a duration; returns the lock as the cluster recorded it.
    pub async fn lock(&self, query: &str, until: LockUntil, mode: LockMode) -> Result<LockInfo> {
        let snapshot = self.find_snapshot(query, None).await?;
        let (until_unix_ms, for_ms) = match until {
            LockUntil::At(time) => (unix_ms(time)?, 0),
            LockUntil::For(d) => (0, duration_ms(d).max(1)),
        };
        let reply = self
            .cluster()
            .call("lock snapshot", |mut c| {
                let request = pb::LockSnapshotRequest {
                    tenant: self.tenant().to_string(),
                    id: snapshot.id.to_vec(),
                    until_unix_ms,
                    for_ms,
                    mode: mode.as_str().to_string(),
                };
                async move { c.lock_snapshot(request).await }
            })
            .await
            .map_err(|e| refused(e, "lock snapshots", ADMIN_ADVICE))?;
        reply
            .lock
            .map(LockInfo::from_wire)
            .ok_or_else(|| ClientError::integrity("lock snapshot: the answer holds no lock"))
    }

    /// Lifts the lock of the snapshot `query` names. A governance lock
    /// before expiry needs `bypass_governance` (cluster-admin); a
    /// compliance lock cannot be lifted.
    pub async fn unlock(&self, query: &str, bypass_governance: bool) -> Result<()> {
        let snapshot = self.find_snapshot(query, None).await?;
        let advice = if bypass_governance {
            BYPASS_ADVICE
        } else {
            ADMIN_ADVICE
        };
        self.cluster()
            .call("unlock snapshot", |mut c| {
                let request = pb::UnlockSnapshotRequest {
                    tenant: self.tenant().to_string(),
                    id: snapshot.id.to_vec(),
                    bypass_governance,
                };
                async move { c.unlock_snapshot(request).await }
            })
            .await
            .map_err(|e| refused(e, "unlock snapshots", advice))?;
        Ok(())
    }

    /// Sets (replaces) the policy of `p.dataset`.
    pub async fn set_policy(&self, p: &PolicySpec) -> Result<()> {
        if p.dataset.is_empty() {
            return Err(ClientError::BadInput {
                what: "a policy needs a dataset (--dataset D)".into(),
            });
        }
        self.send_policy(p.to_wire(), false).await
    }

    /// Removes the policy of `dataset` (its snapshots stay).
    pub async fn remove_policy(&self, dataset: &str) -> Result<()> {
        let policy = pb::Policy {
            dataset: dataset.to_string(),
            ..Default::default()
        };
        self.send_policy(policy, true).await
    }

    async fn send_policy(&self, policy: pb::Policy, remove: bool) -> Result<()> {
        self.cluster()
            .call("set policy", |mut c| {
                let request = pb::SetPolicyRequest {
                    tenant: self.tenant().to_string(),
                    policy: Some(policy.clone()),
                    remove,
                };
                async move { c.set_policy(request).await }
            })
            .await
            .map_err(|e| refused(e, "change dataset policies", ADMIN_ADVICE))?;
        Ok(())
    }

    /// The tenant's dataset policies and the warnings about them (e.g. a
    /// lock holding a snapshot past its dataset's max-age).
    pub async fn policies(&self) -> Result<(Vec<PolicySpec>, Vec<String>)> {
        let reply = self
            .cluster()
            .call("get policies", |mut c| {
                let request = pb::GetPoliciesRequest {
                    tenant: self.tenant().to_string(),
                };
                async move { c.get_policies(request).await }
            })
            .await
            .map_err(|e| refused(e, "read dataset policies", ADMIN_ADVICE))?;
        Ok((
            reply
                .policies
                .into_iter()
                .map(PolicySpec::from_wire)
                .collect(),
            reply.warnings,
        ))
    }

    /// Storage statistics of the tenant, or of one dataset.
    pub async fn stats(&self, dataset: Option<&str>) -> Result<Stats> {
        let reply = self
            .cluster()
            .call("stats", |mut c| {
                let request = pb::StatsRequest {
                    tenant: self.tenant().to_string(),
                    dataset: dataset.unwrap_or_default().to_string(),
                };
                async move { c.stats(request).await }
            })
            .await
            .map_err(|e| refused(e, "read storage statistics", ADMIN_ADVICE))?;
        Ok(reply.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_rules_round_trip_and_empty_rules_are_named() {
        assert!(KeepRules::default().is_empty());
        let rules = KeepRules {
            last: 3,
            daily: 7,
            within: Some(Duration::from_secs(86_400)),
            tags: vec!["monthly".into()],
            ..Default::default()
        };
        assert!(!rules.is_empty());
        let wire = rules.to_wire();
        assert_eq!(wire.within_ms, 86_400_000);
        assert_eq!(KeepRules::from_wire(&wire), rules);
        // A zero duration is no rule.
        let zero = KeepRules {
            within: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(zero.is_empty());
    }

    #[test]
    fn a_role_refusal_says_which_token_may() {
        let denied = ClientError::PermissionDenied {
            op: "forget snapshots",
            reason: "a backup token may not call Forget".into(),
        };
        let error = refused(denied, "forget snapshots", ADMIN_ADVICE);
        assert_eq!(
            error.to_string(),
            "this token's role (backup) cannot forget snapshots; use an admin token of the tenant (or a cluster-admin token)"
        );
        let other = ClientError::PermissionDenied {
            op: "prune",
            reason: "this token is bound to another tenant than the one requested".into(),
        };
        let text = refused(other, "prune", ADMIN_ADVICE).to_string();
        assert!(text.contains("bound to another tenant"), "{text}");
        // Anything else passes through.
        let missing = refused(ClientError::NoForgetPolicy, "prune", ADMIN_ADVICE);
        assert!(matches!(missing, ClientError::NoForgetPolicy));
    }

    #[test]
    fn stats_ratios() {
        let stats: Stats = pb::StatsReply {
            logical_bytes: 1000,
            stored_bytes: 250,
            pack_bytes: 300,
            raw_bytes: 450,
            ..Default::default()
        }
        .into();
        assert_eq!(stats.dedup_compression_ratio, 4.0);
        assert_eq!(stats.erasure_overhead, 1.5);
        let empty: Stats = pb::StatsReply::default().into();
        assert_eq!(empty.dedup_compression_ratio, 0.0);
    }

    #[test]
    fn decisions_fall_back_to_the_client_time_of_old_records() {
        let d = decision(pb::ForgetDecision {
            snapshot: Some(pb::SnapshotRecord {
                id: vec![0xab; 32],
                dataset: "chat".into(),
                kind: "full".into(),
                time_unix_ms: 5,
                ..Default::default()
            }),
            keep: true,
            reasons: vec!["last 1".into()],
        });
        assert_eq!(d.id, "ab".repeat(32));
        assert_eq!(d.committed_unix_ms, 5);
        assert!(d.keep && d.lock.is_none());
    }

    #[test]
    fn lock_modes_parse() {
        assert_eq!(
            "Compliance".parse::<LockMode>().ok(),
            Some(LockMode::Compliance)
        );
        assert_eq!(LockMode::default(), LockMode::Governance);
        assert!("legal".parse::<LockMode>().is_err());
    }
}
