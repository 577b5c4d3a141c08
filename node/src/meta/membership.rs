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
//!   with [`choose_voters`] over the voters and the caught-up learners;
//! - remove: mark it removed (`MarkRemoved`, so the keeper never re-adds it),
//!   re-choose the voters without it if it votes (a joint change: quorum and
//!   region spread hold in every configuration on the way), then drop it.
//!
//! The keeper, on the leader only, records which members hold the log
//! (`MarkHoldsLog`, what `admission` needs to recognise a wiped disk) and adds
//! the initial nodes that are not members yet, skipping removed ones.
//!
//! This module must not decide admission (`admission.rs` does) nor touch
//! openraft's storage. Invariant: every voter set it proposes comes from
//! [`choose_voters`], so with three regions or more no region holds a majority.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::metrics::WaitError;
use openraft::{ChangeMembers, RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::types::{Command, NodeId, NodeInfo};
use super::voters::choose_voters;
use super::{Inner, Meta, MetaError, admission};
use crate::meta::network::Rpc;
use crate::model::NodeView;

/// A learner is caught up when the leader knows it holds the log up to at
/// most this many entries behind the leader's last entry.
pub const CATCH_UP_LAG_ENTRIES: u64 = 1000;
/// Most attempts the keeper makes per initial node before leaving it to an operator.
const MAX_LEARNER_ATTEMPTS: u32 = 20;
/// Longest pause between two of the keeper's attempts to add initial nodes.
const MAX_LEARNER_BACKOFF: Duration = Duration::from_secs(30);
/// Most voter changes one reconciliation proposes (each re-reads the membership).
const MAX_VOTER_CHANGES: usize = 4;

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

/// Whether the leader whose metrics these are knows `id` to be caught up.
fn caught_up(metrics: &RaftMetrics<NodeId, NodeInfo>, id: NodeId) -> bool {
    let Some(Some(matched)) = metrics.replication.as_ref().and_then(|r| r.get(&id)) else {
        return false;
    };
    matched.index.saturating_add(CATCH_UP_LAG_ENTRIES) >= metrics.last_log_index.unwrap_or(0)
}

/// The voters the group should have: [`choose_voters`] over the current
/// voters and the caught-up learners, without `exclude`.
pub fn target_voters(
    members: &BTreeMap<NodeId, NodeInfo>,
    voters: &BTreeSet<NodeId>,
    caught_up_learners: &BTreeSet<NodeId>,
    exclude: Option<NodeId>,
) -> BTreeSet<NodeId> {
    let candidates: BTreeMap<NodeId, NodeInfo> = members
        .iter()
        .filter(|(id, _)| Some(**id) != exclude)
        .filter(|(id, _)| voters.contains(id) || caught_up_learners.contains(id))
        .map(|(id, info)| (*id, info.clone()))
        .collect();
    choose_voters(&candidates)
}

/// Why an operator's request to add a node is refused before anything
/// changes. Decided by [`check_add`] from the cluster map alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddRefused {
    #[error("node id 0 is not valid: node ids start at 1 and are never reused")]
    ZeroId,
    #[error(
        "address {addr:?} is not HOST:PORT (the address the node listens on, as other nodes dial it)"
    )]
    BadAddress { addr: String },
    #[error(
        "region {region:?} is not a region of this cluster (it has {known}); check the spelling: a node can only join an existing region"
    )]
    UnknownRegion { region: String, known: String },
    #[error(
        "node {node} is already a member at {member}, not at {requested}; remove it first to move it"
    )]
    MemberElsewhere {
        node: NodeId,
        member: NodeInfo,
        requested: NodeInfo,
    },
    #[error(
        "address {addr} already belongs to member node {holder}; give node {node} an address of its own"
    )]
    AddressTaken {
        addr: String,
        holder: NodeId,
        node: NodeId,
    },
}

impl AddRefused {
    /// True if the request itself is malformed (as opposed to conflicting
    /// with the cluster as it is).
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            AddRefused::ZeroId | AddRefused::BadAddress { .. } | AddRefused::UnknownRegion { .. }
        )
    }
}

/// What adding a node amounts to, once [`check_add`] accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddPlan {
    /// Not a member: it joins as a learner, then the voters are re-chosen.
    Join,
    /// Already a member at this very region and address: only the voters are
    /// re-checked (adding is idempotent).
    AlreadyMember,
}

/// Checks a request to add `id` at `info` against the cluster map `members`.
/// Pure: the caller still has to reach the node before proposing the change.
pub fn check_add(
    members: &BTreeMap<NodeId, NodeView>,
    id: NodeId,
    info: &NodeInfo,
) -> Result<AddPlan, AddRefused> {
    if id == 0 {
        return Err(AddRefused::ZeroId);
    }
    let port_ok = info
        .addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(AddRefused::BadAddress {
            addr: info.addr.clone(),
        });
    }
    if let Some(member) = members.get(&id) {
        return if member.info() == *info {
            Ok(AddPlan::AlreadyMember)
        } else {
            Err(AddRefused::MemberElsewhere {
                node: id,
                member: member.info(),
                requested: info.clone(),
            })
        };
    }
    let regions: BTreeSet<&str> = members.values().map(|m| m.region.as_str()).collect();
    if !regions.contains(info.region.as_str()) {
        return Err(AddRefused::UnknownRegion {
            region: info.region.clone(),
            known: regions.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    if let Some(holder) = members.values().find(|m| m.addr == info.addr) {
        return Err(AddRefused::AddressTaken {
            addr: info.addr.clone(),
            holder: holder.id,
            node: id,
        });
    }
    Ok(AddPlan::Join)
}

impl Meta {
    /// Adds a node: as a learner first (it catches up by log or snapshot),
    /// then the voter set is re-chosen with [`choose_voters`] over the voters
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

    /// Runs `change` on this node, which must be the leader, until done or
    /// `deadline`. Returns the index of the last entry it needed (or the
    /// applied index if nothing was needed): the caller waits for it.
    pub(crate) async fn change_on_leader(
        &self,
        change: &MembershipChange,
        deadline: Instant,
    ) -> Result<u64, ChangeError> {
        let me = self.inner.node_id;
        let started = Instant::now();
        // One change at a time on this leader: two adds would race on the
        // marks and on the voter set.
        let _one_at_a_time =
            tokio::time::timeout_at(deadline.into(), self.inner.change_lock.lock())
                .await
                .map_err(|_| ChangeError::Busy {
                    waited_ms: started.elapsed().as_millis() as u64,
                })?;
        self.ensure_leader()?;
        let mut last_index = 0;
        match change {
            MembershipChange::Add { id, info } => {
                match self.member_info(*id) {
                    Some(member) if member != *info => {
                        return Err(ChangeError::AddressConflict {
                            node: *id,
                            member,
                            requested: info.clone(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        // A new incarnation holds nothing yet: clear the marks first.
                        last_index = self
                            .leader_write(Command::MarkAdded { node: *id }, deadline)
                            .await?;
                        let add =
                            ChangeMembers::AddNodes([(*id, info.clone())].into_iter().collect());
                        let index = self.leader_change(add, deadline).await?;
                        self.wait_membership_at(index, deadline).await?;
                        last_index = last_index.max(index);
                        tracing::info!(node_id = me, learner = id, region = %info.region, "added node as metadata learner");
                    }
                }
                self.wait_caught_up(*id, deadline).await?;
                last_index = last_index.max(self.reconcile_voters(None, deadline).await?);
            }
            MembershipChange::Remove { id } => {
                let marked = self
                    .view()
                    .and_then(|v| Ok(v.node_mark(*id)?))
                    .map(|m| m.removed)
                    .unwrap_or(false);
                if !marked {
                    // Before the change: from now on the keeper leaves it out.
                    last_index = self
                        .leader_write(Command::MarkRemoved { node: *id }, deadline)
                        .await?;
                }
                if self.voter_ids().contains(id) {
                    last_index = last_index.max(self.reconcile_voters(Some(*id), deadline).await?);
                }
                if self.member_info(*id).is_some() {
                    let drop = ChangeMembers::RemoveNodes([*id].into_iter().collect());
                    let index = self.leader_change(drop, deadline).await?;
                    last_index = last_index.max(index);
                    tracing::info!(
                        node_id = me,
                        removed = id,
                        "removed node from the metadata group"
                    );
                }
            }
        }
        Ok(last_index.max(self.last_applied()))
    }

    fn ensure_leader(&self) -> Result<(), ChangeError> {
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.running_state.is_err() {
            return Err(ChangeError::Stopped {
                node_id: self.inner.node_id,
            });
        }
        if metrics.state == ServerState::Leader
            && metrics.current_leader == Some(self.inner.node_id)
        {
            return Ok(());
        }
        Err(ChangeError::NotLeader {
            node_id: self.inner.node_id,
            leader: metrics.current_leader,
        })
    }

    fn member_info(&self, id: NodeId) -> Option<NodeInfo> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    fn not_leader_or_stopped<E>(&self, e: RaftError<NodeId, E>) -> ChangeError {
        match e {
            RaftError::Fatal(_) => ChangeError::Stopped {
                node_id: self.inner.node_id,
            },
            RaftError::APIError(_) => ChangeError::NotLeader {
                node_id: self.inner.node_id,
                leader: self.leader(),
            },
        }
    }

    /// Proposes `cmd` on this leader and waits for it to apply here.
    async fn leader_write(&self, cmd: Command, deadline: Instant) -> Result<u64, ChangeError> {
        let started = Instant::now();
        let unconfirmed = || ChangeError::Unconfirmed {
            waited_ms: started.elapsed().as_millis() as u64,
        };
        let response = tokio::time::timeout_at(deadline.into(), self.inner.raft.client_write(cmd))
            .await
            .map_err(|_| unconfirmed())?
            .map_err(|e| self.not_leader_or_stopped(e))?;
        Ok(response.log_id.index)
    }

    /// Applies one membership change on this leader, waiting while another
    /// change is in progress.
    async fn leader_change(
        &self,
        changes: ChangeMembers<NodeId, NodeInfo>,
        deadline: Instant,
    ) -> Result<u64, ChangeError> {
        let started = Instant::now();
        let pause = Duration::from_millis(self.inner.config.heartbeat_ms.max(10));
        loop {
            let answer = tokio::time::timeout_at(
                deadline.into(),
                self.inner.raft.change_membership(changes.clone(), true),
            )
            .await
            .map_err(|_| ChangeError::Unconfirmed {
                waited_ms: started.elapsed().as_millis() as u64,
            })?;
            match answer {
                Ok(response) => return Ok(response.log_id.index),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => match e {
                    ChangeMembershipError::EmptyMembership(_) => {
                        return Err(ChangeError::LastVoter {
                            node: self.inner.node_id,
                        });
                    }
                    // Another change is being committed, or the membership
                    // moved under us: look again after a heartbeat.
                    ChangeMembershipError::InProgress(_)
                    | ChangeMembershipError::LearnerNotFound(_) => {
                        if Instant::now() + pause >= deadline {
                            return Err(ChangeError::Busy {
                                waited_ms: started.elapsed().as_millis() as u64,
                            });
                        }
                        tokio::time::sleep(pause).await;
                    }
                },
                Err(e) => return Err(self.not_leader_or_stopped(e)),
            }
        }
    }

    /// Waits until the leader knows `id` has caught up.
    async fn wait_caught_up(&self, id: NodeId, deadline: Instant) -> Result<(), ChangeError> {
        let me = self.inner.node_id;
        let started = Instant::now();
        let remaining = deadline.saturating_duration_since(started);
        let waited = self
            .inner
            .raft
            .wait(Some(remaining))
            .metrics(
                |m| caught_up(m, id) || m.current_leader != Some(me),
                format!("node {id} catches up"),
            )
            .await;
        match waited {
            Ok(m) if m.current_leader == Some(me) => Ok(()),
            Ok(m) => Err(ChangeError::NotLeader {
                node_id: me,
                leader: m.current_leader,
            }),
            Err(WaitError::ShuttingDown) => Err(ChangeError::Stopped { node_id: me }),
            Err(WaitError::Timeout(..)) => {
                let metrics = self.inner.raft.metrics();
                let metrics = metrics.borrow();
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).cloned().flatten())
                    .map(|l| l.index);
                Err(ChangeError::NotCaughtUp {
                    node: id,
                    matched,
                    last_log: metrics.last_log_index,
                    waited_ms: started.elapsed().as_millis() as u64,
                })
            }
        }
    }

    /// Waits until this leader's metrics show the membership of entry
    /// `index` (they lag the change's answer), so the next read sees it.
    async fn wait_membership_at(&self, index: u64, deadline: Instant) -> Result<(), ChangeError> {
        let me = self.inner.node_id;
        let started = Instant::now();
        let remaining = deadline.saturating_duration_since(started);
        let waited = self
            .inner
            .raft
            .wait(Some(remaining))
            .metrics(
                |m| {
                    m.membership_config.log_id().map(|l| l.index) >= Some(index)
                        || m.current_leader != Some(me)
                },
                format!("membership of entry {index} is visible"),
            )
            .await;
        match waited {
            Ok(_) => self.ensure_leader(),
            Err(WaitError::ShuttingDown) => Err(ChangeError::Stopped { node_id: me }),
            Err(WaitError::Timeout(..)) => Err(ChangeError::Unconfirmed {
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }

    /// Changes the voters to [`target_voters`] (without `exclude`) until they
    /// match, each change a joint one that openraft commits in both
    /// configurations. Removed voters stay learners.
    async fn reconcile_voters(
        &self,
        exclude: Option<NodeId>,
        deadline: Instant,
    ) -> Result<u64, ChangeError> {
        let me = self.inner.node_id;
        let started = Instant::now();
        let mut last_index = 0;
        let mut changes = 0;
        loop {
            self.ensure_leader()?;
            let (joint, voters, target) = {
                let metrics = self.inner.raft.metrics();
                let metrics = metrics.borrow();
                let membership = metrics.membership_config.membership();
                let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
                let members: BTreeMap<NodeId, NodeInfo> = membership
                    .nodes()
                    .map(|(id, info)| (*id, info.clone()))
                    .collect();
                let caught_up_learners: BTreeSet<NodeId> = membership
                    .learner_ids()
                    .filter(|id| caught_up(&metrics, *id))
                    .collect();
                let target = target_voters(&members, &voters, &caught_up_learners, exclude);
                (membership.get_joint_config().len() > 1, voters, target)
            };
            if !joint && target == voters {
                return Ok(last_index);
            }
            if target.is_empty() {
                return Err(ChangeError::LastVoter {
                    node: exclude.unwrap_or(me),
                });
            }
            if changes >= MAX_VOTER_CHANGES {
                // The target keeps moving (learners flapping between caught
                // up and not): stop here rather than churn the voters.
                return Err(ChangeError::Busy {
                    waited_ms: started.elapsed().as_millis() as u64,
                });
            }
            // A joint configuration left by a leader that died between
            // openraft's two steps is finished by the same call.
            tracing::info!(node_id = me, from = ?voters, to = ?target, "changing metadata voters");
            let index = self
                .leader_change(ChangeMembers::ReplaceAllVoters(target), deadline)
                .await?;
            self.wait_membership_at(index, deadline).await?;
            last_index = last_index.max(index);
            changes += 1;
        }
    }
}

/// The keeper: on the leader, records which members hold the log and adds
/// the initial nodes that are not members yet (unless removed on purpose).
/// Ends on the stop signal, when Raft stops, or when `Meta` is dropped.
pub(super) async fn keep_membership(
    inner: Weak<Inner>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempts: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut adder_pause = interval;
    let mut adder_next = Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if *stop.borrow() {
            return;
        }
        let Some(inner) = inner.upgrade() else { return };
        let meta = Meta { inner };
        if meta.inner.raft.metrics().borrow().running_state.is_err() {
            return;
        }
        if meta.ensure_leader().is_err() {
            continue;
        }
        let work = async {
            meta.mark_log_holders().await;
            if Instant::now() >= adder_next {
                let progress = meta.add_initial_learners(&mut attempts).await;
                adder_pause = if progress {
                    interval
                } else {
                    (adder_pause * 2).min(MAX_LEARNER_BACKOFF)
                };
                adder_next = Instant::now() + adder_pause;
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            () = work => {}
        }
    }
}

impl Meta {
    /// Records `MarkHoldsLog` for every member the leader knows to hold
    /// entries (itself included) that is not marked yet.
    async fn mark_log_holders(&self) {
        let me = self.inner.node_id;
        let Ok(marks) = self.view().and_then(|v| Ok(v.node_marks()?)) else {
            return;
        };
        let holders: Vec<NodeId> = {
            let metrics = self.inner.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            membership
                .nodes()
                .map(|(id, _)| *id)
                .filter(|id| {
                    *id == me
                        || metrics
                            .replication
                            .as_ref()
                            .and_then(|r| r.get(id))
                            .is_some_and(|matched| matched.is_some())
                })
                .filter(|id| !marks.get(id).is_some_and(|m| m.holds_log))
                .collect()
        };
        for node in holders {
            match self.write(Command::MarkHoldsLog { node }).await {
                Ok(_) => tracing::debug!(
                    node_id = me,
                    holder = node,
                    "recorded that node holds the log"
                ),
                Err(e) => {
                    tracing::warn!(node_id = me, holder = node, error = %e, "cannot record that node holds the log yet; will retry");
                    return;
                }
            }
        }
    }

    /// Adds the initial nodes that are not members and not removed on
    /// purpose as learners. Returns whether one was added.
    async fn add_initial_learners(&self, attempts: &mut BTreeMap<NodeId, u32>) -> bool {
        let me = self.inner.node_id;
        let Ok(marks) = self.view().and_then(|v| Ok(v.node_marks()?)) else {
            return false;
        };
        let missing: Vec<NodeId> = {
            let metrics = self.inner.raft.metrics();
            let metrics = metrics.borrow();
            let membership = metrics.membership_config.membership();
            self.inner
                .initial_cluster
                .keys()
                .filter(|id| membership.get_node(id).is_none())
                .filter(|id| !marks.get(id).is_some_and(|m| m.removed))
                .copied()
                .collect()
        };
        let mut progress = false;
        let call_timeout = self.inner.config.op_timeout();
        for id in missing {
            let used = attempts.entry(id).or_insert(0);
            if *used >= MAX_LEARNER_ATTEMPTS {
                continue;
            }
            *used += 1;
            let info = self.inner.initial_cluster[&id].clone();
            let added = tokio::time::timeout(
                call_timeout,
                self.inner.raft.add_learner(id, info.clone(), false),
            )
            .await;
            let outcome = match added {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_elapsed) => Err(format!(
                    "membership change not committed within {call_timeout:?}"
                )),
            };
            match outcome {
                Ok(()) => {
                    progress = true;
                    tracing::info!(node_id = me, learner = id, region = %info.region, "added initial node as metadata learner");
                }
                Err(e) if *used >= MAX_LEARNER_ATTEMPTS => {
                    tracing::error!(node_id = me, learner = id, error = %e, "giving up adding initial node as learner; an operator must add it");
                }
                Err(e) => {
                    tracing::warn!(node_id = me, learner = id, error = %e, attempt = *used, "cannot add initial node as learner yet; will retry");
                }
            }
        }
        progress
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::voters::tests::topology;
    use proptest::prelude::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_lagging_learner_is_not_promoted() {
        let members = topology(&[("r1", &[1, 2]), ("r2", &[3, 4]), ("r3", &[5, 6])]);
        // Voter 3 is removed: 6 is the only learner, and it lags.
        let voters = set(&[1, 2, 3, 4, 5]);
        let target = target_voters(&members, &voters, &set(&[]), Some(3));
        assert_eq!(
            target,
            set(&[1, 4, 5]),
            "five voters would need 6, which lags: three, one per region"
        );
        let target = target_voters(&members, &voters, &set(&[6]), Some(3));
        assert_eq!(target, set(&[1, 2, 4, 5, 6]));
    }

    #[test]
    fn a_new_node_in_a_region_keeps_the_voters() {
        let members = topology(&[("r1", &[1, 2]), ("r2", &[3, 4, 7]), ("r3", &[5, 6])]);
        let voters = set(&[1, 2, 3, 4, 5]);
        assert_eq!(
            target_voters(&members, &voters, &set(&[6, 7]), None),
            voters
        );
    }

    fn map_of(members: &BTreeMap<NodeId, NodeInfo>) -> BTreeMap<NodeId, NodeView> {
        members
            .iter()
            .map(|(id, info)| (*id, NodeView::member(*id, info, false)))
            .collect()
    }

    fn at(region: &str, addr: &str) -> NodeInfo {
        NodeInfo {
            region: region.into(),
            addr: addr.into(),
        }
    }

    #[test]
    fn adding_checks_region_address_and_membership() {
        let mut members = topology(&[("r1", &[1, 2]), ("r2", &[3, 4]), ("r3", &[5, 6])]);
        for (id, info) in members.iter_mut() {
            info.addr = format!("10.0.0.{id}:7100");
        }
        let map = map_of(&members);
        assert_eq!(
            check_add(&map, 7, &at("r2", "10.0.0.7:7100")),
            Ok(AddPlan::Join)
        );
        assert_eq!(
            check_add(&map, 3, &members[&3]),
            Ok(AddPlan::AlreadyMember),
            "adding a member again at its own place is idempotent"
        );
        assert!(matches!(
            check_add(&map, 3, &at("r2", "10.0.0.9:7100")),
            Err(AddRefused::MemberElsewhere { node: 3, .. })
        ));
        let unknown = check_add(&map, 7, &at("r9", "10.0.0.7:7100")).expect_err("no region r9");
        assert!(unknown.is_bad_request());
        assert!(unknown.to_string().contains("r1, r2, r3"), "{unknown}");
        assert!(matches!(
            check_add(&map, 7, &at("r2", "10.0.0.4:7100")),
            Err(AddRefused::AddressTaken { holder: 4, .. })
        ));
        for addr in [
            "",
            "10.0.0.7",
            "10.0.0.7:",
            ":7100",
            "10.0.0.7:x",
            "10.0.0.7:0",
        ] {
            assert!(
                matches!(
                    check_add(&map, 7, &at("r2", addr)),
                    Err(AddRefused::BadAddress { .. })
                ),
                "{addr:?} must be refused"
            );
        }
        assert_eq!(
            check_add(&map, 0, &at("r2", "10.0.0.7:7100")),
            Err(AddRefused::ZeroId)
        );
    }

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

    fn cluster() -> impl Strategy<Value = (BTreeMap<NodeId, NodeInfo>, BTreeSet<NodeId>, NodeId)> {
        // 3..6 regions of 1..4 nodes, some caught up, one node to exclude.
        proptest::collection::vec(1usize..4, 3..6).prop_flat_map(|sizes| {
            let mut nodes = BTreeMap::new();
            let mut id = 1;
            for (r, size) in sizes.iter().enumerate() {
                for _ in 0..*size {
                    nodes.insert(
                        id,
                        NodeInfo {
                            region: format!("r{r}"),
                            addr: String::new(),
                        },
                    );
                    id += 1;
                }
            }
            let n = nodes.len() as u64;
            (
                Just(nodes),
                proptest::collection::btree_set(1..=n, 0..n as usize),
                1..=n,
            )
        })
    }

    proptest! {
        /// Whatever the members, lag and excluded node, the target voters
        /// never give a region the majority while three regions remain, and
        /// never include the excluded node or a lagging learner.
        #[test]
        fn target_voters_keep_the_region_spread((members, caught_up_set, exclude) in cluster()) {
            let voters = choose_voters(&members);
            let learners: BTreeSet<NodeId> = caught_up_set.difference(&voters).copied().collect();
            let target = target_voters(&members, &voters, &learners, Some(exclude));
            prop_assert!(!target.contains(&exclude));
            for id in &target {
                prop_assert!(voters.contains(id) || learners.contains(id));
            }
            let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
            for id in &target {
                *per_region.entry(members[id].region.as_str()).or_default() += 1;
            }
            let candidate_regions: BTreeSet<&str> = members
                .iter()
                .filter(|(id, _)| **id != exclude && (voters.contains(id) || learners.contains(id)))
                .map(|(_, info)| info.region.as_str())
                .collect();
            if candidate_regions.len() >= 3 {
                for count in per_region.values() {
                    prop_assert!(*count <= target.len() / 2);
                }
            }
        }
    }
}
