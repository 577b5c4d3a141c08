//! Applying a membership change on the leader, step by step, each step
//! idempotent: marks, learner, catch-up, voters re-chosen with joint changes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::metrics::WaitError;
use openraft::{ChangeMembers, ServerState};

use super::plan::{caught_up, target_voters};
use super::{ChangeError, MembershipChange};
use crate::meta::Meta;
use crate::meta::types::{Command, NodeId, NodeInfo};

/// Most voter changes one reconciliation proposes (each re-reads the membership).
const MAX_VOTER_CHANGES: usize = 4;

impl Meta {
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

    pub(super) fn ensure_leader(&self) -> Result<(), ChangeError> {
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

    /// The place of `id` in the membership this node knows, if it is a member.
    pub(crate) fn member_info(&self, id: NodeId) -> Option<NodeInfo> {
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
