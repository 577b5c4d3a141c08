//! The repairer: the one owner of repair passes, drains and fault intake.
//!
//! Every way into repair goes through it: the background worker, the
//! `Repair` RPC (`cairn check --repair`), a drain before `remove-node`, and
//! fault reports (scrub, the read path, `cairn check --read-data`). Passes
//! run one at a time (a mutex), and each pack's new placement is committed
//! with a compare-and-set in the state machine (`SetPlacementIf`): a pass
//! that planned from a placement someone else changed meanwhile loses, is
//! counted as lost, and deletes the shards it wrote that the index does not
//! name. So two passes can never leave a pack with fewer good shards.
//!
//! It must not serve the network or know the gateway: the gateway calls it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::future::join_all;
use tokio::sync::watch;
use tracing::{info, warn};

use super::plan::{
    Health, NodeState, ProtectionCounts, RepairPlan, assess, good_shards, plan_repair,
};
use super::{PassOutcome, RateLimiter, RepairConfig, RepairState};
use crate::erasure::{Code, EncodedShard, reconstruct_shards};
use crate::liveness::Liveness;
use crate::meta::types::{Command, CommandResult, PackRecord};
use crate::meta::{Meta, MetaError};
use crate::model::{Id32, NodeId, ShardPlacement, StorageClass};
use crate::shard_io::{Members, ShardIo, ShardIoError, verify_shard};

/// Passes a drain runs at most before giving up.
const DRAIN_PASSES_MAX: usize = 3;

/// Why one pack's repair (or a drain) did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("metadata group: {0}")]
    Meta(#[from] MetaError),
    #[error(
        "only {readable} of {needed} shards readable ({failures}); the pack waits for its nodes to return"
    )]
    Unreadable {
        readable: usize,
        needed: usize,
        failures: String,
    },
    #[error("rebuilding the missing shards failed: {reason}; retrying next pass")]
    Rebuild { reason: String },
    #[error("writing rebuilt shard {index}: {source}; retrying next pass")]
    Write {
        index: u32,
        #[source]
        source: ShardIoError,
    },
    #[error(
        "the placement changed while this pass rebuilt the pack; its shards were cleaned up and the next pass replans"
    )]
    PlacementChanged,
    #[error("the pack left the index during repair; nothing to do")]
    PackVanished,
    #[error("plan keeps shard {index} on node {node}, which the index does not list; replanning")]
    PlanInconsistent { index: u32, node: NodeId },
    #[error(
        "drain incomplete: {left} shard(s) still on node {node}; the node was not removed, run remove-node again"
    )]
    DrainIncomplete { node: NodeId, left: u64 },
}

/// Owns repair passes, drains and the queue of reported bad shards.
pub struct Repairer {
    node_id: NodeId,
    meta: Meta,
    io: Arc<ShardIo>,
    liveness: Arc<Liveness>,
    config: RepairConfig,
    state: Arc<RepairState>,
    /// Nodes being drained: treated as down so their shards move.
    draining: Mutex<BTreeSet<NodeId>>,
    /// One pass at a time on this node, whoever asked for it.
    pass_lock: tokio::sync::Mutex<()>,
}

impl Repairer {
    pub fn new(
        node_id: NodeId,
        meta: Meta,
        io: Arc<ShardIo>,
        liveness: Arc<Liveness>,
        config: RepairConfig,
    ) -> Self {
        Self {
            node_id,
            meta,
            io,
            liveness,
            config,
            state: Arc::new(RepairState::default()),
            draining: Mutex::new(BTreeSet::new()),
            pass_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Counters for status and metrics.
    pub fn state(&self) -> Arc<RepairState> {
        self.state.clone()
    }

    pub fn config(&self) -> &RepairConfig {
        &self.config
    }

    pub fn is_leader(&self) -> bool {
        self.meta.leader() == Some(self.node_id)
    }

    pub fn is_draining(&self, node: NodeId) -> bool {
        self.draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&node)
    }

    fn node_states(&self, members: &Members) -> BTreeMap<NodeId, NodeState> {
        members
            .iter()
            .map(|(id, view)| {
                (
                    *id,
                    NodeState {
                        region: view.region.clone(),
                        down: self.liveness.is_down(*id) || self.is_draining(*id),
                        class: view.storage_class,
                    },
                )
            })
            .collect()
    }

    /// Takes reports of bad shards `(pack, index, node)` and starts a pass.
    /// Reports about shards the index does not place there (a reader with a
    /// stale placement, a misfiled file's name) are dropped: nothing to repair.
    pub fn report_faults(&self, faults: Vec<(Id32, u32, NodeId)>) {
        let faults: Vec<_> = faults
            .into_iter()
            .filter(|(pack, index, node)| {
                self.meta.pack(pack).ok().flatten().is_some_and(|p| {
                    p.shards
                        .iter()
                        .any(|s| s.index == *index && s.node == *node)
                })
            })
            .collect();
        if faults.is_empty() {
            return;
        }
        warn!(
            count = faults.len(),
            "bad shards reported; repair scheduled"
        );
        self.state.report_bad(faults);
    }

    /// Protection of every pack, as this node sees the cluster now.
    pub fn protection(&self) -> Result<ProtectionCounts, MetaError> {
        let members = self.meta.node_views();
        let nodes = self.node_states(&members);
        let bad = self.state.bad_shards();
        let classes = self.meta.pack_classes()?;
        let mut counts = ProtectionCounts::default();
        for pack in self.meta.packs()? {
            let good = good_shards(&pack, &nodes, &bad);
            let class = classes.get(&pack.id).copied().unwrap_or_default();
            let health = assess(&pack, class, &good, &nodes);
            counts.add(
                health,
                pack.data_shards + pack.parity_shards,
                good.len() as u32,
            );
        }
        Ok(counts)
    }

    /// One repair pass over every pack, worst first. Passes never overlap:
    /// a second caller waits for the running pass, then runs its own (so
    /// faults reported meanwhile are acted on).
    pub async fn pass(&self, rate_bytes_per_s: u64) -> PassOutcome {
        let _one_at_a_time = self.pass_lock.lock().await;
        let outcome = self.pass_locked(rate_bytes_per_s).await;
        self.state.mark_pass(outcome.errors == 0);
        outcome
    }

    async fn pass_locked(&self, rate_bytes_per_s: u64) -> PassOutcome {
        let mut outcome = PassOutcome::default();
        let packs = match self.meta.packs() {
            Ok(packs) => packs,
            Err(e) => {
                warn!(error = %e, "repair pass cannot read the pack index; retrying next pass");
                outcome.errors += 1;
                self.state.errors_total.fetch_add(1, Ordering::Relaxed);
                return outcome;
            }
        };
        let members = self.meta.node_views();
        let nodes = self.node_states(&members);
        let bad = self.state.bad_shards();
        // A pack is repaired within its class: a cold pack is never moved
        // back to hot nodes while the cold ones can hold it.
        let classes = match self.meta.pack_classes() {
            Ok(classes) => classes,
            Err(e) => {
                warn!(error = %e, "repair pass cannot read the pack classes; retrying next pass");
                outcome.errors += 1;
                self.state.errors_total.fetch_add(1, Ordering::Relaxed);
                return outcome;
            }
        };
        let mut work: Vec<(u8, PackRecord, RepairPlan)> = Vec::new();
        for pack in packs {
            let good = good_shards(&pack, &nodes, &bad);
            let class = classes.get(&pack.id).copied().unwrap_or_default();
            let urgency = match assess(&pack, class, &good, &nodes) {
                Health::Unrecoverable => {
                    warn!(pack_id = %hex::encode(pack.id), good = good.len(),
                        "pack has fewer than k good shards; it stays listed until its nodes return");
                    continue;
                }
                Health::AtRisk => 0,
                Health::Degraded { .. } => 1,
                Health::Misplaced => 2,
                Health::Full => continue,
            };
            match plan_repair(&pack, class, &good, &nodes) {
                Ok(Some(plan)) => work.push((urgency, pack, plan)),
                Ok(None) => {}
                Err(e) => {
                    outcome.errors += 1;
                    self.state.errors_total.fetch_add(1, Ordering::Relaxed);
                    warn!(pack_id = %hex::encode(pack.id), error = %e, "cannot plan repair; retrying next pass");
                }
            }
        }
        work.sort_by_key(|(urgency, _, _)| *urgency);
        outcome.queued = work.len() as u64;
        self.state.queue.store(outcome.queued, Ordering::Relaxed);
        let mut limiter = RateLimiter::new(rate_bytes_per_s);
        for (_, pack, plan) in work {
            match self
                .repair_pack(&pack, &plan, None, &members, &mut limiter)
                .await
            {
                Ok(()) => {
                    outcome.repaired += 1;
                    self.state
                        .packs_repaired_total
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    outcome.errors += 1;
                    self.state.errors_total.fetch_add(1, Ordering::Relaxed);
                    if matches!(error, RepairError::PlacementChanged) {
                        outcome.lost += 1;
                        self.state.passes_lost_total.fetch_add(1, Ordering::Relaxed);
                    }
                    warn!(pack_id = %hex::encode(pack.id), %error, "pack repair failed; retrying next pass");
                }
            }
            self.state.queue.fetch_sub(1, Ordering::Relaxed);
        }
        if outcome.repaired > 0 {
            self.state
                .rate_milli_bytes_per_s
                .store((limiter.bytes_per_s() * 1000.0) as u64, Ordering::Relaxed);
            info!(
                repaired = outcome.repaired,
                errors = outcome.errors,
                "repair pass done"
            );
        }
        outcome
    }

    /// Rebuilds the planned shards of one pack, commits (compare-and-set),
    /// then deletes surplus; on any failure deletes what it wrote.
    /// `new_class`: commit the placement together with the pack's new
    /// storage class (a tiering move) instead of the placement alone.
    async fn repair_pack(
        &self,
        pack: &PackRecord,
        plan: &RepairPlan,
        new_class: Option<StorageClass>,
        members: &Members,
        limiter: &mut RateLimiter,
    ) -> Result<(), RepairError> {
        let mut written: BTreeMap<u32, ShardPlacement> = BTreeMap::new();
        let result = self
            .rebuild_and_commit(pack, plan, new_class, members, limiter, &mut written)
            .await;
        if result.is_err() && !written.is_empty() {
            self.clean_up_lost(pack, &written, members).await;
        }
        result
    }

    async fn rebuild_and_commit(
        &self,
        pack: &PackRecord,
        plan: &RepairPlan,
        new_class: Option<StorageClass>,
        members: &Members,
        limiter: &mut RateLimiter,
        written: &mut BTreeMap<u32, ShardPlacement>,
    ) -> Result<(), RepairError> {
        let code = Code {
            data: pack.data_shards,
            parity: pack.parity_shards,
        };
        let nodes = self.node_states(members);
        let good = good_shards(pack, &nodes, &self.state.bad_shards());
        // Read good shards until k verified ones are in hand.
        let mut slots: Vec<Option<Vec<u8>>> = vec![None; code.total() as usize];
        let mut have = 0usize;
        let mut failures = Vec::new();
        let mut found_bad = Vec::new();
        for shard in &good {
            if have >= code.data as usize {
                break;
            }
            match self
                .io
                .get(shard.node, &pack.id, shard.index, members)
                .await
            {
                Ok(file) => match verify_shard(pack, shard, &file) {
                    Ok(payload) => {
                        slots[shard.index as usize] = Some(payload);
                        have += 1;
                    }
                    Err(reason) => {
                        found_bad.push((pack.id, shard.index, shard.node));
                        failures.push(reason);
                    }
                },
                Err(e) => {
                    if e.kind().is_shard_fault() {
                        found_bad.push((pack.id, shard.index, shard.node));
                    }
                    failures.push(e.to_string());
                }
            }
        }
        // What this pass found bad is repaired by the next one.
        self.state.report_bad(found_bad);
        if have < code.data as usize {
            return Err(RepairError::Unreadable {
                readable: have,
                needed: code.data as usize,
                failures: failures.join("; "),
            });
        }
        let (pack_len, shard_len) = (pack.pack_len, pack.shard_len);
        let rebuilt = tokio::task::spawn_blocking(move || {
            reconstruct_shards(code, pack_len, shard_len, &mut slots).map(|_| slots)
        })
        .await
        .map_err(|e| RepairError::Rebuild {
            reason: e.to_string(),
        })?
        .map_err(|e| RepairError::Rebuild {
            reason: e.to_string(),
        })?;

        let writes = plan.writes.iter().map(|&(index, node)| {
            let payload = rebuilt[index as usize].clone().unwrap_or_default();
            async move {
                let shard =
                    EncodedShard::from_payload(code, index, pack.id, pack.pack_len, payload)
                        .map_err(|e| RepairError::Rebuild {
                            reason: e.to_string(),
                        })?;
                let checksum = shard.header.checksum;
                let file = shard.to_file_bytes();
                let len = file.len() as u64;
                let put = self.io.put(node, file, members).await;
                Ok::<_, RepairError>((index, node, checksum, len, put))
            }
        });
        let mut first_error = None;
        for result in join_all(writes).await {
            let (index, node, checksum, len, put) = result?;
            match put {
                Ok(()) => {
                    limiter.consume(len).await;
                    self.state
                        .shards_written_total
                        .fetch_add(1, Ordering::Relaxed);
                    self.state
                        .bytes_written_total
                        .fetch_add(len, Ordering::Relaxed);
                    written.insert(
                        index,
                        ShardPlacement {
                            index,
                            node,
                            checksum,
                        },
                    );
                }
                Err(source) => {
                    first_error.get_or_insert(RepairError::Write { index, source });
                }
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }

        let mut shards = Vec::with_capacity(plan.placement_after.len());
        for &(index, node) in &plan.placement_after {
            if let Some(placement) = written.get(&index) {
                shards.push(placement.clone());
            } else if let Some(old) = pack
                .shards
                .iter()
                .find(|s| s.index == index && s.node == node)
            {
                shards.push(old.clone());
            } else {
                return Err(RepairError::PlanInconsistent { index, node });
            }
        }
        // The state machine applies this only over the placement the plan
        // was made from: the one check that cannot race.
        let commit = match new_class {
            None => Command::SetPlacementIf {
                pack_id: pack.id,
                expected: pack.shards.clone(),
                shards,
                needs_rebalance: plan.still_degraded,
            },
            Some(class) => Command::SetPackClass {
                pack: pack.id,
                class,
                expected: pack.shards.clone(),
                shards,
                needs_rebalance: plan.still_degraded,
            },
        };
        match self.meta.write(commit).await? {
            CommandResult::PlacementChanged => return Err(RepairError::PlacementChanged),
            CommandResult::UnknownPack => return Err(RepairError::PackVanished),
            _ => {}
        }
        self.state.clear_pack(&pack.id);
        info!(pack_id = %hex::encode(pack.id), rebuilt = plan.writes.len(),
            removed = plan.deletes.len(), still_degraded = plan.still_degraded, "pack re-protected");
        for &(index, node) in &plan.deletes {
            // A surplus copy on the node a rebuilt shard went to shares its
            // file name: deleting it would delete the new shard.
            if written.get(&index).is_some_and(|w| w.node == node) {
                continue;
            }
            if let Err(error) = self.io.delete(node, &pack.id, index, members).await {
                warn!(pack_id = %hex::encode(pack.id), shard_idx = index, node_id = node, %error,
                    "surplus shard not deleted; the orphan sweep of its node removes it");
            }
        }
        Ok(())
    }

    /// Deletes the shards a failed or losing pass wrote, except those the
    /// index names now (the winner may have chosen the same spot).
    async fn clean_up_lost(
        &self,
        pack: &PackRecord,
        written: &BTreeMap<u32, ShardPlacement>,
        members: &Members,
    ) {
        let current: BTreeSet<(u32, NodeId)> = match self.meta.pack(&pack.id) {
            Ok(Some(record)) => record.shards.iter().map(|s| (s.index, s.node)).collect(),
            Ok(None) => BTreeSet::new(),
            Err(error) => {
                warn!(pack_id = %hex::encode(pack.id), %error,
                    "cannot read the placement to clean up; the orphan sweep removes the shards");
                return;
            }
        };
        let before: BTreeSet<(u32, NodeId)> =
            pack.shards.iter().map(|s| (s.index, s.node)).collect();
        for shard in written.values() {
            let key = (shard.index, shard.node);
            if current.contains(&key) || before.contains(&key) {
                continue;
            }
            match self
                .io
                .delete(shard.node, &pack.id, shard.index, members)
                .await
            {
                Ok(()) => {
                    self.state
                        .shards_cleaned_total
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    warn!(pack_id = %hex::encode(pack.id), shard_idx = shard.index, node_id = shard.node, %error,
                        "shard of a lost repair not deleted; the orphan sweep removes it")
                }
            }
        }
    }

    /// Moves one pack to the nodes of `class` (tiering): the same rebuild as
    /// a repair — read k verified shards, reconstruct, write the target's
    /// shards, commit placement and class with one compare-and-set, then
    /// delete the old shards; a lost compare-and-set deletes what it wrote.
    /// Holds the pass lock for this one pack, so moves and repair passes
    /// never interleave and neither starves the other. Returns the shard
    /// bytes written, or `None` when the pack needs no move (its class
    /// cannot hold it, or it is already there).
    pub async fn move_pack(
        &self,
        pack_id: &Id32,
        class: StorageClass,
        limiter: &mut RateLimiter,
    ) -> Result<Option<u64>, RepairError> {
        let _one_at_a_time = self.pass_lock.lock().await;
        let Some(pack) = self.meta.pack(pack_id)? else {
            return Err(RepairError::PackVanished);
        };
        let members = self.meta.node_views();
        let nodes = self.node_states(&members);
        let good = good_shards(&pack, &nodes, &self.state.bad_shards());
        let code = Code {
            data: pack.data_shards,
            parity: pack.parity_shards,
        };
        if !crate::placement::Target::of(code, class, &super::plan::candidates(&nodes)).in_class {
            return Ok(None);
        }
        let plan = match plan_repair(&pack, class, &good, &nodes) {
            Ok(Some(plan)) => plan,
            // Already placed for the class: only the record is missing.
            Ok(None) if self.meta.pack_class(pack_id)? != class => RepairPlan {
                writes: Vec::new(),
                placement_after: good.iter().map(|s| (s.index, s.node)).collect(),
                deletes: Vec::new(),
                still_degraded: pack.needs_rebalance,
            },
            Ok(None) => return Ok(None),
            Err(e) => {
                return Err(RepairError::Rebuild {
                    reason: e.to_string(),
                });
            }
        };
        if assess(&pack, class, &good, &nodes) == Health::Unrecoverable {
            return Ok(None);
        }
        let before = self.state.bytes_written_total.load(Ordering::Relaxed);
        self.repair_pack(&pack, &plan, Some(class), &members, limiter)
            .await?;
        Ok(Some(
            self.state
                .bytes_written_total
                .load(Ordering::Relaxed)
                .saturating_sub(before),
        ))
    }

    /// Moves a node's shards away (if `drain`), then removes it from the
    /// cluster. Without `drain` (its disk is gone), its shards are rebuilt
    /// from the others after the removal. Returns the shards moved.
    pub async fn drain_and_remove(&self, node: NodeId, drain: bool) -> Result<u64, RepairError> {
        let holds = |packs: &[PackRecord]| -> u64 {
            packs
                .iter()
                .flat_map(|p| &p.shards)
                .filter(|s| s.node == node)
                .count() as u64
        };
        let before = holds(&self.meta.packs()?);
        if drain && before > 0 {
            self.draining
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node);
            let mut left = before;
            for _ in 0..DRAIN_PASSES_MAX {
                self.pass(0).await;
                left = holds(&self.meta.packs()?);
                if left == 0 {
                    break;
                }
            }
            self.draining
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&node);
            if left > 0 {
                return Err(RepairError::DrainIncomplete { node, left });
            }
        }
        self.meta.remove_node(node).await?;
        self.state.kick.notify_one();
        Ok(if drain { before } else { 0 })
    }

    /// Runs repair passes until `shutdown` flips: every `interval`, or at
    /// once when kicked (a fault report). Acts only on the Raft leader.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = self.state.kick.notified() => {}
                _ = shutdown.changed() => return,
            }
            if self.is_leader() {
                let outcome = self.pass(self.config.rate_bytes_per_s).await;
                if outcome.errors > 0 {
                    warn!(
                        errors = outcome.errors,
                        repaired = outcome.repaired,
                        lost = outcome.lost,
                        "repair pass left work undone; retrying next pass"
                    );
                }
            } else {
                // Followers have nothing to do; they are not stuck.
                self.state.mark_pass(true);
            }
        }
    }
}
