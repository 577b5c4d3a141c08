//! Admission of a node that starts with an empty store: the wiped-disk trap
//! (openraft FAQ, DEPENDENCIES §8.6).
//!
//! A node whose store holds nothing cannot tell on its own whether this is its
//! first start or whether its disk was wiped. If the disk was wiped and it
//! still counted as a voter, voting with an empty log could elect a leader that
//! lacks committed entries, and answering replication with an empty log makes
//! the leader's view of it go backwards (a panic in openraft's debug builds).
//! So such a node asks the nodes of its initial cluster (`ClusterInfo`) and
//! takes part in Raft only once their answers settle it:
//!
//! - a cluster exists and counts the node as a member that has acknowledged
//!   log entries ([`Decision::Wiped`]): it refuses to start, or, if it learns
//!   this after starting, it fences itself for good;
//! - a cluster exists and counts it as a member that never held the log (an
//!   initial member starting late): it starts ([`Decision::Member`]);
//! - a cluster exists without it (it was removed, or is new): it starts with an
//!   empty log and asks the leader to add it ([`Decision::Newcomer`]);
//! - no peer knows a cluster and a majority of the initial voters other than
//!   itself answered that they are empty: no cluster was ever formed
//!   ([`Decision::NewCluster`]); only then may the lowest initial voter
//!   bootstrap one. Any cluster that ever committed an entry had a majority
//!   of those voters holding its log, and two majorities share a node, so a
//!   wiped bootstrapper can never start a second cluster (as long as no other
//!   voter of that shared majority was wiped too).
//!
//! Until one of these holds the node is [`Admission::Probing`]: its Raft
//! service refuses votes, appends and snapshots, as if it were unreachable.
//!
//! The decision is pure ([`decide`]) and tested without a network; this
//! module must not change the membership itself (`membership.rs` does).
//! Known limit: a node wiped in the moment between acknowledging its first
//! entry and the leader recording [`Command::MarkHoldsLog`](super::types::Command)
//! for it (one keeper tick) passes as a first start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Weak;
use std::time::Duration;

use openraft::Vote;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::network::{PeerChannels, Rpc};
use super::types::{NodeId, NodeInfo};
use super::{Inner, Meta, MetaError};

/// Most times a newcomer asks to be added before leaving it to an operator.
const MAX_JOIN_ATTEMPTS: u32 = 10;
/// Longest pause between two attempts to join.
const MAX_JOIN_BACKOFF: Duration = Duration::from_secs(30);
/// A probing node logs that it is still waiting once per this many rounds.
const ROUNDS_PER_LOG: u64 = 50;

/// A starting node's question to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfoRequest {
    /// The node that asks (and whose status the answer describes).
    pub asker: NodeId,
}

/// What a peer knows of the cluster and of the node that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The answering node.
    pub node_id: NodeId,
    /// It holds a membership (from its log or a snapshot): a cluster exists.
    pub initialized: bool,
    /// It holds nothing Raft wrote (no vote, no log) and is not fenced:
    /// evidence that no cluster was formed with it.
    pub empty: bool,
    /// Its last applied index: of several answers, the freshest decides.
    pub applied_index: Option<u64>,
    /// The asker is in its membership (voter or learner).
    pub asker_member: bool,
    /// The asker has acknowledged log entries as a member.
    pub asker_holds_log: bool,
    /// The asker was removed on purpose.
    pub asker_removed: bool,
    /// The leader it follows, with its address.
    pub leader: Option<(NodeId, NodeInfo)>,
}

/// What a node starting with an empty store does, given its peers' answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not enough answers yet: keep asking, take no part in Raft.
    Undecided {
        /// Initial voters (other than this node) that answered "empty".
        empty_voters: usize,
        /// How many such answers prove that no cluster exists.
        needed: usize,
    },
    /// No cluster exists: start; the lowest initial voter bootstraps it.
    NewCluster,
    /// A cluster counts this node as a member that never held the log: start.
    Member,
    /// A cluster exists without this node: start empty and ask to be added.
    Newcomer {
        /// The leader named by the answers, if any.
        leader: Option<(NodeId, NodeInfo)>,
    },
    /// A cluster counts this node as a member holding the log: its disk was
    /// wiped. Must not start.
    Wiped {
        /// The peer whose answer showed it.
        told_by: NodeId,
    },
}

/// Where a node stands towards Raft (its service's gate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Started with an empty store and still asking its peers; refuses Raft RPCs.
    Probing,
    /// Takes part in Raft.
    Admitted,
    /// Found to be a wiped member after starting; refuses Raft RPCs for good.
    /// The operator removes the node, then restarts it.
    Fenced,
}

/// How many "empty" answers from initial voters other than `me` prove that no
/// cluster was formed: a majority of the initial voters (a cluster's first
/// commit needs one), or none if `me` is the only initial voter.
pub fn empty_answers_needed(me: NodeId, initial_voters: &BTreeSet<NodeId>) -> usize {
    let others = initial_voters.iter().filter(|id| **id != me).count();
    if others == 0 {
        return 0;
    }
    (initial_voters.len() / 2 + 1).min(others)
}

/// Decides what a node `me` with an empty store does, from its peers' answers
/// (peers that did not answer are simply absent). Pure and deterministic.
pub fn decide(me: NodeId, initial_voters: &BTreeSet<NodeId>, answers: &[ClusterInfo]) -> Decision {
    // Of the nodes that know a cluster, the freshest (highest applied index)
    // has the latest membership and marks; ties go to the lower node id.
    let freshest = answers
        .iter()
        .filter(|a| a.initialized && a.node_id != me)
        .max_by(|a, b| {
            a.applied_index
                .cmp(&b.applied_index)
                .then(b.node_id.cmp(&a.node_id))
        });
    if let Some(info) = freshest {
        return match (info.asker_member, info.asker_holds_log) {
            (true, true) => Decision::Wiped {
                told_by: info.node_id,
            },
            (true, false) => Decision::Member,
            (false, _) => Decision::Newcomer {
                leader: info
                    .leader
                    .clone()
                    .or_else(|| answers.iter().find_map(|a| a.leader.clone())),
            },
        };
    }
    let mut empty: BTreeSet<NodeId> = BTreeSet::new();
    for answer in answers {
        if answer.empty && answer.node_id != me && initial_voters.contains(&answer.node_id) {
            empty.insert(answer.node_id);
        }
    }
    let needed = empty_answers_needed(me, initial_voters);
    if empty.len() >= needed {
        Decision::NewCluster
    } else {
        Decision::Undecided {
            empty_voters: empty.len(),
            needed,
        }
    }
}

/// Asks every node of `peers` (except `me`) once, in parallel, each call
/// bounded by `timeout`. Peers that do not answer (down, not serving yet,
/// another node at the address) are left out; the caller decides with what
/// it has.
pub async fn probe(
    channels: &PeerChannels,
    me: NodeId,
    peers: &BTreeMap<NodeId, NodeInfo>,
    timeout: Duration,
) -> Vec<ClusterInfo> {
    let request = ClusterInfoRequest { asker: me };
    let calls = peers
        .iter()
        .filter(|(id, _)| **id != me)
        .map(|(id, info)| async move {
            let answer: Result<ClusterInfo, _> = channels
                .call(*id, &info.addr, Rpc::ClusterInfo, &request, timeout)
                .await;
            match answer {
                // A node answering for another id is a misconfiguration, not evidence.
                Ok(info) if info.node_id == *id => Some(info),
                Ok(info) => {
                    tracing::warn!(node_id = me, peer = id, answered_as = info.node_id, "cluster-info answer from the wrong node; ignoring it");
                    None
                }
                Err(e) => {
                    tracing::debug!(node_id = me, peer = id, error = %e, "no cluster-info answer; deciding without it");
                    None
                }
            }
        });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

impl Meta {
    /// This node's answer to a starting peer's `ClusterInfo`.
    pub(crate) fn cluster_info(&self, asker: NodeId) -> Result<ClusterInfo, MetaError> {
        let mark = self.view()?.node_mark(asker)?;
        let fenced = self.admission() == Admission::Fenced;
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let asker_member = membership.get_node(&asker).is_some();
        Ok(ClusterInfo {
            node_id: self.inner.node_id,
            initialized: membership.nodes().next().is_some(),
            // A fenced node is empty too, but it knows a cluster exists: its
            // emptiness must not count as evidence that none does.
            empty: !fenced
                && metrics.vote == Vote::default()
                && metrics.last_log_index.is_none()
                && metrics.last_applied.is_none()
                && metrics.snapshot.is_none(),
            applied_index: metrics.last_applied.map(|l| l.index),
            asker_member,
            asker_holds_log: asker_member && mark.holds_log,
            asker_removed: mark.removed,
            leader: metrics
                .current_leader
                .and_then(|l| membership.get_node(&l).map(|info| (l, info.clone()))),
        })
    }

    /// Acts on the decision taken for this node's empty store. Only
    /// `NewCluster` can fail (bootstrapping).
    pub(super) async fn act_on(&self, decision: Decision) -> Result<(), MetaError> {
        let me = self.inner.node_id;
        match decision {
            Decision::Undecided { .. } => Ok(()),
            Decision::NewCluster => {
                self.inner.admission.send_replace(Admission::Admitted);
                tracing::info!(
                    node_id = me,
                    "no metadata cluster exists yet; taking part in raft"
                );
                super::open::bootstrap(
                    &self.inner.raft,
                    me,
                    &self.inner.initial_voters,
                    &self.inner.initial_cluster,
                )
                .await
            }
            Decision::Member => {
                self.inner.admission.send_replace(Admission::Admitted);
                tracing::info!(
                    node_id = me,
                    "first start of a metadata member; taking part in raft"
                );
                Ok(())
            }
            Decision::Newcomer { leader } => {
                self.inner.admission.send_replace(Admission::Admitted);
                tracing::info!(node_id = me, leader = ?leader.map(|(id, _)| id), "the metadata cluster does not count this node; asking to be added");
                self.spawn_task(join(
                    std::sync::Arc::downgrade(&self.inner),
                    self.tick(),
                    self.inner.stop.subscribe(),
                ));
                Ok(())
            }
            Decision::Wiped { told_by } => {
                self.inner.admission.send_replace(Admission::Fenced);
                let fenced = MetaError::WipedMember { node_id: me };
                tracing::error!(node_id = me, told_by, error = %fenced, "fenced: refusing every raft request until removed and restarted");
                Ok(())
            }
        }
    }
}

/// Asks the initial cluster every `interval` until the answers decide, then
/// acts on the decision. Ends there, on the stop signal, or when `Meta` is dropped.
pub(super) async fn probe_until_decided(
    inner: Weak<Inner>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut rounds: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let meta = Meta { inner };
        let me = meta.inner.node_id;
        let asked = probe(
            &meta.inner.channels,
            me,
            &meta.inner.initial_cluster,
            meta.inner.config.probe_timeout(),
        );
        let answers = tokio::select! {
            _ = stop.changed() => return,
            answers = asked => answers,
        };
        match decide(me, &meta.inner.initial_voters, &answers) {
            Decision::Undecided {
                empty_voters,
                needed,
            } => {
                if rounds.is_multiple_of(ROUNDS_PER_LOG) {
                    tracing::info!(
                        node_id = me,
                        answers = answers.len(),
                        empty_voters,
                        needed,
                        "empty store: waiting for the initial voters to show whether a cluster exists; not taking part in raft yet"
                    );
                }
                rounds += 1;
            }
            decision => {
                tracing::info!(node_id = me, decision = ?decision, "empty store: admission decided");
                if let Err(e) = meta.act_on(decision).await {
                    tracing::error!(node_id = me, error = %e, "cannot bootstrap the metadata group; restart the node to try again");
                }
                return;
            }
        }
    }
}

/// A newcomer asks the leader to add it ([`Meta::add_node`] on itself),
/// retrying with a growing pause. Ends once added, after
/// [`MAX_JOIN_ATTEMPTS`], on the stop signal, or when `Meta` is dropped.
async fn join(inner: Weak<Inner>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut pause = interval;
    for attempt in 1..=MAX_JOIN_ATTEMPTS {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let meta = Meta { inner: strong };
        let me = meta.inner.node_id;
        let info = meta.inner.initial_cluster[&me].clone();
        let joined = tokio::select! {
            _ = stop.changed() => return,
            joined = meta.add_node(me, info) => joined,
        };
        match joined {
            Ok(()) => {
                tracing::info!(node_id = me, "joined the metadata group");
                return;
            }
            Err(MetaError::ShuttingDown) => return,
            Err(e) if attempt == MAX_JOIN_ATTEMPTS => {
                tracing::error!(node_id = me, error = %e, "giving up asking to join the metadata group; add the node with \"cairn cluster add-node\"");
                return;
            }
            Err(e) => {
                tracing::warn!(node_id = me, attempt, error = %e, "cannot join the metadata group yet; will retry");
            }
        }
        drop(meta);
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(MAX_JOIN_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn voters(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn empty(node_id: NodeId) -> ClusterInfo {
        ClusterInfo {
            node_id,
            initialized: false,
            empty: true,
            applied_index: None,
            asker_member: false,
            asker_holds_log: false,
            asker_removed: false,
            leader: None,
        }
    }

    fn knows(node_id: NodeId, applied: u64, member: bool, holds_log: bool) -> ClusterInfo {
        ClusterInfo {
            node_id,
            initialized: true,
            empty: false,
            applied_index: Some(applied),
            asker_member: member,
            asker_holds_log: holds_log,
            asker_removed: !member,
            leader: Some((
                2,
                NodeInfo {
                    region: "r2".into(),
                    addr: "n2".into(),
                },
            )),
        }
    }

    #[test]
    fn majority_of_the_initial_voters_is_needed() {
        assert_eq!(empty_answers_needed(1, &voters(&[1])), 0);
        assert_eq!(empty_answers_needed(1, &voters(&[1, 2, 3])), 2);
        assert_eq!(empty_answers_needed(1, &voters(&[1, 2, 3, 4, 5])), 3);
        assert_eq!(
            empty_answers_needed(6, &voters(&[1, 2, 3, 4, 5])),
            3,
            "a non-voter needs a majority too"
        );
        assert_eq!(empty_answers_needed(9, &voters(&[1])), 1);
    }

    #[test]
    fn a_wiped_member_is_told_apart_from_a_late_first_start() {
        let v = voters(&[1, 2, 3]);
        assert_eq!(
            decide(3, &v, &[knows(1, 40, true, true)]),
            Decision::Wiped { told_by: 1 }
        );
        assert_eq!(
            decide(3, &v, &[knows(1, 40, true, false)]),
            Decision::Member
        );
        assert!(matches!(
            decide(3, &v, &[knows(1, 40, false, true)]),
            Decision::Newcomer {
                leader: Some((2, _))
            }
        ));
    }

    #[test]
    fn the_freshest_answer_wins() {
        let v = voters(&[1, 2, 3]);
        // A lagging peer still lists the node; the leader already removed it.
        let answers = [knows(1, 10, true, true), knows(2, 12, false, true)];
        assert!(matches!(decide(3, &v, &answers), Decision::Newcomer { .. }));
        // And the other way round: re-added and caught up since.
        let answers = [knows(1, 30, true, true), knows(2, 12, false, true)];
        assert_eq!(decide(3, &v, &answers), Decision::Wiped { told_by: 1 });
    }

    #[test]
    fn a_new_cluster_needs_positive_evidence() {
        let v = voters(&[1, 2, 3]);
        assert_eq!(
            decide(1, &v, &[]),
            Decision::Undecided {
                empty_voters: 0,
                needed: 2
            }
        );
        assert_eq!(
            decide(1, &v, &[empty(2), empty(4), empty(5)]),
            Decision::Undecided {
                empty_voters: 1,
                needed: 2
            },
            "non-voters' answers do not count"
        );
        assert_eq!(decide(1, &v, &[empty(2), empty(3)]), Decision::NewCluster);
        assert_eq!(
            decide(1, &v, &[empty(1), empty(2)]),
            Decision::Undecided {
                empty_voters: 1,
                needed: 2
            },
            "its own answer is no evidence"
        );
        assert_eq!(decide(1, &voters(&[1]), &[]), Decision::NewCluster);
        // One peer that knows a cluster outweighs any number of empty ones.
        assert_eq!(
            decide(1, &v, &[empty(2), empty(3), knows(4, 1, true, true)]),
            Decision::Wiped { told_by: 4 }
        );
    }

    fn scenario() -> impl Strategy<Value = (BTreeSet<NodeId>, NodeId, Vec<NodeId>, Vec<bool>)> {
        // 1, 3 or 5 initial voters 1..=n, the wiped node among them, a
        // majority that held the log, and which of the others answer.
        prop_oneof![Just(1u64), Just(3), Just(5)].prop_flat_map(|n| {
            let all: Vec<NodeId> = (1..=n).collect();
            (
                Just(all.iter().copied().collect::<BTreeSet<_>>()),
                1..=n,
                Just(all.clone()).prop_shuffle(),
                proptest::collection::vec(any::<bool>(), n as usize),
            )
        })
    }

    proptest! {
        /// Whatever subset of peers answers, a wiped voter never concludes
        /// that no cluster exists when one does: every cluster that committed
        /// its first entry had a majority of the initial voters holding the
        /// log, and (only this node being wiped) those that answer say so.
        #[test]
        fn a_wiped_voter_never_starts_a_second_cluster(
            (initial, wiped, order, answering) in scenario(),
        ) {
            let majority = initial.len() / 2 + 1;
            // The first `majority` of a shuffled order held the log; make sure
            // the wiped node is among them (the interesting case).
            let mut held: BTreeSet<NodeId> = order.iter().copied().take(majority).collect();
            if !held.contains(&wiped) {
                let dropped = *held.iter().next().expect("a majority is never empty");
                held.remove(&dropped);
                held.insert(wiped);
            }
            let answers: Vec<ClusterInfo> = initial
                .iter()
                .zip(&answering)
                .filter(|(id, answers)| **answers && **id != wiped)
                .map(|(id, _)| if held.contains(id) { knows(*id, 5, true, true) } else { empty(*id) })
                .collect();
            let decision = decide(wiped, &initial, &answers);
            if initial.len() > 1 {
                prop_assert_ne!(decision.clone(), Decision::NewCluster);
            }
            let starts = matches!(decision, Decision::Member | Decision::Newcomer { .. });
            prop_assert!(!starts, "a wiped voter was let in: {:?}", decision);
        }
    }
}
