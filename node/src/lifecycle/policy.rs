//! The leader's policy scheduler: every `[lifecycle] policy_interval`, each
//! dataset policy is applied with [`retention::select`] over the dataset's
//! snapshots, exactly as a `Forget` with the same rules would.
//!
//! Only the Raft leader acts (followers idle), so two nodes never apply the
//! same policy at once; a leader change at worst applies a policy twice,
//! which removes nothing more (forget is idempotent over the same rules).
//! Every application is in the audit log: a removal as an `Audited`
//! `ForgetSnapshots` by this node, a pass that removes nothing as an
//! `Audited` `PolicyApplied`. The state machine re-checks locks at apply
//! time, so a lock set after the plan still holds (the entry is refused as
//! `Locked` and the policy is tried again next interval).
//!
//! `max-age` also drops the dataset's live stream segments committed
//! before it (`DropSegments`, audited as part of the policy).
//!
//! Forgetting frees no space by itself: the next garbage collection
//! (another periodic task of the leader) sweeps the blobs no remaining
//! snapshot references. `cold_after` is stored but not acted on yet
//! (tiering comes later).

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::retention;
use crate::meta::state::{StateError, StateView};
use crate::meta::types::{Actor, Command, CommandResult, Id32, NodeId};
use crate::meta::{Meta, MetaError};

/// What applying one dataset's policy does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyAction {
    pub tenant: String,
    pub dataset: String,
    /// Snapshots to forget (oldest first).
    pub remove: Vec<Id32>,
    /// Snapshots the policy keeps.
    pub kept: usize,
}

impl PolicyAction {
    /// The audit target: "tenant T dataset D: removed N, kept M".
    pub fn target(&self) -> String {
        format!(
            "tenant {} dataset {}: removed {}, kept {}",
            self.tenant,
            self.dataset,
            self.remove.len(),
            self.kept
        )
    }
}

/// The action of every policy at cluster time `now`, by tenant then dataset.
pub fn plan(view: &StateView, now: i64) -> Result<Vec<PolicyAction>, StateError> {
    let mut actions = Vec::new();
    for (tenant, policy) in view.all_policies()? {
        let datasets = super::datasets(view, &tenant, Some(&policy.dataset))?;
        let candidates: Vec<retention::Candidate> = datasets
            .into_values()
            .flatten()
            .map(|(_, candidate)| candidate)
            .collect();
        let decisions = retention::select(&candidates, &policy.keep, policy.max_age_ms, now);
        let (kept, removed): (Vec<_>, Vec<_>) = decisions.into_iter().partition(|d| d.keep);
        actions.push(PolicyAction {
            tenant,
            dataset: policy.dataset,
            remove: removed.into_iter().map(|d| d.id).collect(),
            kept: kept.len(),
        });
    }
    Ok(actions)
}

/// The cut-off (cluster time) of the dataset's `max-age` if some of its
/// stream segments were committed before it, else `None`.
fn segments_older_than_max_age(
    view: &StateView,
    action: &PolicyAction,
    now: i64,
) -> Result<Option<i64>, StateError> {
    let Some(policy) = view
        .all_policies()?
        .into_iter()
        .find(|(t, p)| *t == action.tenant && p.dataset == action.dataset)
        .map(|(_, p)| p)
    else {
        return Ok(None);
    };
    if policy.max_age_ms == 0 {
        return Ok(None);
    }
    let before = now.saturating_sub(i64::try_from(policy.max_age_ms).unwrap_or(i64::MAX));
    let mut after = None;
    loop {
        let page = view.segment_page(
            &action.tenant,
            &action.dataset,
            None,
            after.as_ref(),
            SEGMENT_PAGE,
        )?;
        if page.iter().any(|(_, r)| r.committed_unix_ms < before) {
            return Ok(Some(before));
        }
        if page.len() < SEGMENT_PAGE {
            return Ok(None);
        }
        after = page.last().map(|(id, _)| *id);
    }
}

/// Segments read at a time while looking for expired ones.
const SEGMENT_PAGE: usize = 4096;

/// The audit actor of this node's own actions.
fn node_actor(node: NodeId) -> Actor {
    Actor {
        kind: "node".into(),
        node_id: node,
        ..Actor::default()
    }
}

/// Why one application failed (logged; retried next interval).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("metadata group: {0}")]
    Meta(#[from] MetaError),
    #[error("metadata state: {0}")]
    State(#[from] StateError),
}

/// Applies every policy once (on any node; [`run`] calls it on the leader).
/// Returns how many snapshots were forgotten.
pub async fn apply_all(meta: &Meta) -> Result<u64, PolicyError> {
    // Every committed snapshot and lock in view (a stale view would only
    // keep more, but the plan should match what the entries apply to).
    meta.read_barrier().await?;
    let view = meta.view()?;
    // The leader stamps its entries with its wall clock, never earlier
    // than the cluster clock: the time the removals will apply at.
    let now = crate::meta::wall_clock_ms().max(view.clock()?);
    let actor = node_actor(meta.node_id());
    let mut removed = 0;
    for action in plan(&view, now)? {
        let audited = |cmd: Command| Command::Audited {
            at: 0,
            actor: actor.clone(),
            action: "ApplyPolicy".into(),
            target: action.target(),
            cmd: Box::new(cmd),
        };
        let applied = Command::PolicyApplied {
            tenant: action.tenant.clone(),
            dataset: action.dataset.clone(),
        };
        // `max-age` covers stream segments too, by their commit time.
        if let Some(before) = segments_older_than_max_age(&view, &action, now)? {
            let drop = Command::DropSegments {
                tenant: action.tenant.clone(),
                dataset: action.dataset.clone(),
                committed_before_ms: before,
            };
            let audited_drop = Command::Audited {
                at: 0,
                actor: actor.clone(),
                action: "ApplyPolicy".into(),
                target: format!(
                    "tenant {} dataset {}: stream segments over max-age dropped",
                    action.tenant, action.dataset
                ),
                cmd: Box::new(drop),
            };
            meta.write(audited_drop).await?;
        }
        if action.remove.is_empty() {
            meta.write(audited(applied)).await?;
            continue;
        }
        let forget = Command::ForgetSnapshots {
            tenant: action.tenant.clone(),
            ids: action.remove.clone(),
            bypass_governance: false,
        };
        match meta.write(audited(forget)).await? {
            CommandResult::Ok => {
                removed += action.remove.len() as u64;
                info!(target: "cairn::lifecycle", "{}", action.target());
                let timed = Command::Timed {
                    at: 0,
                    cmd: Box::new(applied),
                };
                meta.write(timed).await?;
            }
            // Locked or forgotten meanwhile: the next pass plans afresh.
            other => warn!(
                tenant = %action.tenant,
                dataset = %action.dataset,
                result = other.audit_text(),
                "policy not applied; retrying next interval"
            ),
        }
    }
    Ok(removed)
}

/// Applies the dataset policies every `interval` while this node leads,
/// until `shutdown` flips.
pub async fn run(meta: Meta, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        if meta.leader() != Some(meta.node_id()) {
            continue;
        }
        if let Err(error) = apply_all(&meta).await {
            warn!(%error, "applying dataset policies failed; retrying next interval");
        }
    }
}
