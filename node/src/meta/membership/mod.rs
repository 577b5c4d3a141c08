//! Membership changes of the metadata group: adding and removing nodes, the
//! node marks that go with them, and the keeper task that runs on the leader.
//!
//! [`Meta::add_node`] and [`Meta::remove_node`] may be called on any node: the
//! change is sent to the leader (`ChangeMembership` RPC), which runs it step by
//! step, each step idempotent, so a retry after a lost answer or a leader
//! change simply continues where the last attempt stopped:
//!
//! - add: clear the node's marks (`MarkAdded`), add it as a learner, wait
//!   until it has caught up (by log or snapshot), then re-choose the voters
//!   with [`choose_voters`](crate::meta::voters::choose_voters) over the voters and the caught-up learners;
//! - remove: mark it removed (`MarkRemoved`, so the keeper never re-adds it),
//!   re-choose the voters without it if it votes (a joint change: quorum and
//!   region spread hold in every configuration on the way), then drop it.
//!
//! The keeper, on the leader only, records which members hold the log
//! (`MarkHoldsLog`, what `admission` needs to recognise a wiped disk) and adds
//! the initial nodes that are not members yet, skipping removed ones.
//!
//! Files: this one holds the requests and their errors and sends a change to
//! the leader; `plan` the pure decisions (voter targets, whether a request
//! to add a node makes sense); `apply` runs a change step by step on the
//! leader; `keeper` is the leader's background task.
//!
//! This module must not decide admission (`admission.rs` does) nor touch
//! openraft's storage. Invariant: every voter set it proposes comes from
//! [`choose_voters`](crate::meta::voters::choose_voters), so with three regions or more no region holds a majority.

mod apply;
mod keeper;
mod plan;

pub(super) use keeper::keep_membership;
pub use plan::{AddPlan, AddRefused, CATCH_UP_LAG_ENTRIES, check_add, target_voters};

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::types::{NodeId, NodeInfo};
use super::{Meta, MetaError, admission};
use crate::meta::network::Rpc;

/// A membership change, as sent to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add `id` at `info` (learner first, then voters re-chosen).
    Add { id: NodeId, info: NodeInfo },
    /// Remove `id`, voter or learner.
    Remove { id: NodeId },
}

/// The `ChangeMembership` request: the change, and how long the leader may
/// work on it before answering (so that the answer beats the caller's deadline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRequest {
    pub change: MembershipChange,
    pub within_ms: u64,
}

/// Why a membership change did not complete. Travels in the RPC answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ChangeError {
    /// The node asked is not the leader (any more); retried elsewhere.
    #[error("node {node_id} is not the metadata leader (it knows {leader:?}); retry on the leader")]
    NotLeader {
        node_id: NodeId,
        leader: Option<NodeId>,
    },
    /// The new node did not catch up in time; it stays a learner.
    #[error(
        "node {node} has not caught up after {waited_ms} ms (it holds the log up to {matched:?}, the leader up to {last_log:?}); it stays a learner: check that it runs and is reachable, then add it again"
    )]
    NotCaughtUp {
        node: NodeId,
        matched: Option<u64>,
        last_log: Option<u64>,
        waited_ms: u64,
    },
    /// The id is taken by a member with another region or address.
    #[error(
        "node {node} is already a member at {member}, not at {requested}; remove it first to move it"
    )]
    AddressConflict {
        node: NodeId,
        member: NodeInfo,
        requested: NodeInfo,
    },
    /// Removing the node would leave no voter.
    #[error("cannot remove node {node}: it is the last metadata voter")]
    LastVoter { node: NodeId },
    /// Another membership change did not finish in time.
    #[error("another membership change kept the metadata group busy for {waited_ms} ms; retry")]
    Busy { waited_ms: u64 },
    /// The leader did not commit a step in time (a quorum may be unreachable).
    #[error(
        "the metadata leader could not commit the change within {waited_ms} ms (a quorum of voters may be unreachable); retrying is safe"
    )]
    Unconfirmed { waited_ms: u64 },
    /// The leader is shutting down, or its Raft stopped.
    #[error("metadata node {node_id} stopped while changing the membership; retry on another node")]
    Stopped { node_id: NodeId },
}

impl ChangeError {
    /// True if trying again (possibly on another node) can succeed as is.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ChangeError::NotLeader { .. }
                | ChangeError::Busy { .. }
                | ChangeError::Unconfirmed { .. }
                | ChangeError::Stopped { .. }
        )
    }
}

impl Meta {
    /// Adds a node: as a learner first (it catches up by log or snapshot),
    /// then the voter set is re-chosen with [`choose_voters`](crate::meta::voters::choose_voters) over the voters
    /// and caught-up learners and applied with a joint change (so no region
    /// ever holds a voter majority). Idempotent: adding a member again with
    /// the same region and address only re-checks the voters. Works on any
    /// node (sent to the leader); returns once this node has applied the
    /// change. Clears the node's `removed` mark.
    pub async fn add_node(&self, id: NodeId, info: NodeInfo) -> Result<(), MetaError> {
        self.change_anywhere(MembershipChange::Add { id, info })
            .await
    }

    /// Removes a node from the membership (voter or learner), re-choosing the
    /// voters among the rest first so that quorum and region spread hold at
    /// every step, and marks it removed so that it is never re-added on its
    /// own. Idempotent. Works on any node (sent to the leader). The caller
    /// moves the node's shards before, or rebuilds them after.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), MetaError> {
        self.change_anywhere(MembershipChange::Remove { id }).await
    }

    /// Runs `change` on the leader (this node or another), retrying transient
    /// failures until [`super::MetaConfig::membership_timeout`] has passed.
    async fn change_anywhere(&self, change: MembershipChange) -> Result<(), MetaError> {
        let me = self.inner.node_id;
        let started = Instant::now();
        let deadline = started + self.inner.config.membership_timeout();
        let pause = Duration::from_millis(self.inner.config.heartbeat_ms.max(10));
        let mut last_failure: Option<MetaError> = None;
        loop {
            if *self.inner.stop.borrow() {
                return Err(MetaError::ShuttingDown);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last_failure.unwrap_or(MetaError::NoLeader {
                    waited_ms: started.elapsed().as_millis() as u64,
                }));
            }
            let answer = match self.locate_leader(remaining).await {
                None => {
                    last_failure = Some(MetaError::NoLeader {
                        waited_ms: started.elapsed().as_millis() as u64,
                    });
                    tokio::time::sleep(pause.min(remaining)).await;
                    continue;
                }
                Some((leader, _)) if leader == me => self.change_on_leader(&change, deadline).await,
                Some((leader, addr)) => {
                    // Leave the leader time to answer before our own deadline.
                    let margin = Duration::from_millis(self.inner.config.rpc_timeout_ms / 2)
                        .min(remaining / 4);
                    let request = ChangeRequest {
                        change: change.clone(),
                        within_ms: remaining.saturating_sub(margin).as_millis() as u64,
                    };
                    let sent: Result<Result<u64, ChangeError>, _> = self
                        .inner
                        .channels
                        .call(leader, &addr, Rpc::ChangeMembership, &request, remaining)
                        .await;
                    match sent {
                        Ok(answer) => answer,
                        // Every step is idempotent: retrying after a lost answer is safe.
                        Err(source) => {
                            last_failure = Some(MetaError::Unavailable { leader, source });
                            tokio::time::sleep(pause.min(remaining)).await;
                            continue;
                        }
                    }
                }
            };
            match answer {
                Ok(index) => {
                    // A node that removed itself stops receiving the log.
                    let removed_me = change == MembershipChange::Remove { id: me };
                    if !removed_me {
                        self.wait_applied(index, deadline).await?;
                    }
                    return Ok(());
                }
                Err(e) if e.is_transient() => {
                    tracing::debug!(node_id = me, error = %e, "membership change not done yet; retrying");
                    last_failure = Some(MetaError::Change(e));
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(remaining)).await;
                }
                Err(e) => return Err(MetaError::Change(e)),
            }
        }
    }

    /// The leader and its address: from this node's metrics, or else (a
    /// newcomer that is not a member yet, or no leader known here) from the
    /// initial cluster's answers to `ClusterInfo`.
    async fn locate_leader(&self, within: Duration) -> Option<(NodeId, String)> {
        {
            let metrics = self.inner.raft.metrics();
            let metrics = metrics.borrow();
            if let Some(leader) = metrics.current_leader {
                if leader == self.inner.node_id {
                    return Some((leader, String::new()));
                }
                if let Some(info) = metrics.membership_config.membership().get_node(&leader) {
                    return Some((leader, info.addr.clone()));
                }
            }
        }
        let answers = admission::probe(
            &self.inner.channels,
            self.inner.node_id,
            &self.inner.initial_cluster,
            self.inner.config.probe_timeout().min(within),
        )
        .await;
        answers
            .into_iter()
            .filter(|a| a.initialized)
            .max_by_key(|a| a.applied_index)
            .and_then(|a| a.leader)
            .map(|(id, info)| (id, info.addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_retried_and_final_ones_are_not() {
        assert!(
            ChangeError::NotLeader {
                node_id: 1,
                leader: None
            }
            .is_transient()
        );
        assert!(ChangeError::Busy { waited_ms: 1 }.is_transient());
        assert!(!ChangeError::LastVoter { node: 1 }.is_transient());
        assert!(
            !ChangeError::AddressConflict {
                node: 1,
                member: NodeInfo::default(),
                requested: NodeInfo::default()
            }
            .is_transient()
        );
    }
}
