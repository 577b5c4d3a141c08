//! The keeper: on the leader, records which members hold the log
//! (`MarkHoldsLog`, what admission needs to recognise a wiped disk) and adds
//! the initial nodes that are not members yet, skipping removed ones.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::meta::types::{Command, NodeId};
use crate::meta::{Inner, Meta};

/// Most attempts the keeper makes per initial node before leaving it to an operator.
const MAX_LEARNER_ATTEMPTS: u32 = 20;
/// Longest pause between two of the keeper's attempts to add initial nodes.
const MAX_LEARNER_BACKOFF: Duration = Duration::from_secs(30);

/// The keeper: on the leader, records which members hold the log and adds
/// the initial nodes that are not members yet (unless removed on purpose).
/// Ends on the stop signal, when Raft stops, or when `Meta` is dropped.
pub(in crate::meta) async fn keep_membership(
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
