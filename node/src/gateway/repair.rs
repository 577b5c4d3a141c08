//! The gateway's side of re-protection: executing repair plans (read k
//! shards, rebuild, write, commit, then delete), taking scrub reports, and
//! measuring protection for `cluster status`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use cairn_proto::v1 as pb;
use futures::future::join_all;
use tracing::{info, warn};

use super::{Gateway, GatewayError, id32};
use crate::erasure::{Code, EncodedShard, reconstruct_shards};
use crate::meta::types::{Command, NodeId, NodeInfo, PackRecord, ShardPlacement};
use crate::repair::plan::{
    Health, NodeState, ProtectionCounts, RepairPlan, assess, good_shards, plan_repair,
};
use crate::repair::{PassOutcome, RateLimiter};

impl Gateway {
    /// The worker's view of the members: region and whether each is down.
    fn node_states(
        &self,
        members: &BTreeMap<NodeId, (NodeInfo, bool)>,
    ) -> BTreeMap<NodeId, NodeState> {
        members
            .iter()
            .map(|(id, (info, _))| {
                (
                    *id,
                    NodeState {
                        region: info.region.clone(),
                        down: self.liveness.is_down(*id) || self.is_draining(*id),
                    },
                )
            })
            .collect()
    }

    /// Protection of every pack, as this node sees the cluster now.
    pub(crate) fn protection(&self) -> Result<ProtectionCounts, GatewayError> {
        let members = self.members();
        let nodes = self.node_states(&members);
        let bad = self.repair.bad_shards();
        let mut counts = ProtectionCounts::default();
        for pack in self.meta.packs()? {
            let good = good_shards(&pack, &nodes, &bad);
            let health = assess(&pack, &good, &nodes);
            counts.add(
                health,
                pack.data_shards + pack.parity_shards,
                good.len() as u32,
            );
        }
        Ok(counts)
    }

    /// One repair pass over every pack, worst first.
    pub async fn repair_pass(&self, rate_bytes_per_s: u64) -> PassOutcome {
        let mut outcome = PassOutcome::default();
        let packs = match self.meta.packs() {
            Ok(packs) => packs,
            Err(e) => {
                warn!(error = %e, "repair pass cannot read the pack index; retrying next pass");
                outcome.errors += 1;
                return outcome;
            }
        };
        let members = self.members();
        let nodes = self.node_states(&members);
        let bad = self.repair.bad_shards();
        let mut work: Vec<(u8, PackRecord, RepairPlan)> = Vec::new();
        for pack in packs {
            let good = good_shards(&pack, &nodes, &bad);
            let urgency = match assess(&pack, &good, &nodes) {
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
            match plan_repair(&pack, &good, &nodes) {
                Ok(Some(plan)) => work.push((urgency, pack, plan)),
                Ok(None) => {}
                Err(e) => {
                    outcome.errors += 1;
                    warn!(pack_id = %hex::encode(pack.id), error = %e, "cannot plan repair; retrying next pass");
                }
            }
        }
        work.sort_by_key(|(urgency, _, _)| *urgency);
        outcome.queued = work.len() as u64;
        self.repair.queue.store(outcome.queued, Ordering::Relaxed);
        let mut limiter = RateLimiter::new(rate_bytes_per_s);
        for (_, pack, plan) in work {
            match self.repair_pack(&pack, &plan, &members, &mut limiter).await {
                Ok(()) => {
                    outcome.repaired += 1;
                    self.repair
                        .packs_repaired_total
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(reason) => {
                    outcome.errors += 1;
                    self.repair.errors_total.fetch_add(1, Ordering::Relaxed);
                    warn!(pack_id = %hex::encode(pack.id), %reason, "pack repair failed; retrying next pass");
                }
            }
            self.repair.queue.fetch_sub(1, Ordering::Relaxed);
        }
        if outcome.repaired > 0 {
            self.repair
                .rate_milli_bytes_per_s
                .store((limiter.bytes_per_s() * 1000.0) as u64, Ordering::Relaxed);
            info!(
                repaired = outcome.repaired,
                errors = outcome.errors,
                "repair pass done"
            );
        }
        self.repair.mark_pass();
        outcome
    }

    /// Rebuilds the planned shards of one pack, commits, then deletes.
    async fn repair_pack(
        &self,
        pack: &PackRecord,
        plan: &RepairPlan,
        members: &BTreeMap<NodeId, (NodeInfo, bool)>,
        limiter: &mut RateLimiter,
    ) -> Result<(), String> {
        let code = Code {
            data: pack.data_shards,
            parity: pack.parity_shards,
        };
        let nodes = self.node_states(members);
        let good = good_shards(pack, &nodes, &self.repair.bad_shards());
        // Read good shards until k verified ones are in hand.
        let mut slots: Vec<Option<Vec<u8>>> = vec![None; code.total() as usize];
        let mut have = 0usize;
        let mut failures = Vec::new();
        for shard in &good {
            if have >= code.data as usize {
                break;
            }
            match self.fetch_verified(pack, shard, members).await {
                Ok(payload) => {
                    slots[shard.index as usize] = Some(payload);
                    have += 1;
                }
                Err(reason) => failures.push(reason),
            }
        }
        if have < code.data as usize {
            return Err(format!(
                "only {have} of {} shards readable: {}",
                code.data,
                failures.join("; ")
            ));
        }
        let (pack_len, shard_len) = (pack.pack_len, pack.shard_len);
        let rebuilt = tokio::task::spawn_blocking(move || {
            reconstruct_shards(code, pack_len, shard_len, &mut slots).map(|_| slots)
        })
        .await
        .map_err(|e| format!("rebuild task: {e}"))?
        .map_err(|e| e.to_string())?;

        let mut written: BTreeMap<u32, ShardPlacement> = BTreeMap::new();
        let writes = plan.writes.iter().map(|&(index, node)| {
            let payload = rebuilt[index as usize].clone().unwrap_or_default();
            async move {
                let shard =
                    EncodedShard::from_payload(code, index, pack.id, pack.pack_len, payload)
                        .map_err(|e| e.to_string())?;
                let checksum = shard.header.checksum;
                let file = shard.to_file_bytes();
                let len = file.len() as u64;
                self.store_shard(node, file, members).await?;
                Ok::<_, String>((index, node, checksum, len))
            }
        });
        for result in join_all(writes).await {
            let (index, node, checksum, len) = result?;
            limiter.consume(len).await;
            self.repair
                .shards_written_total
                .fetch_add(1, Ordering::Relaxed);
            self.repair
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

        // Commit only if nobody changed the placement meanwhile.
        let current = self
            .meta
            .pack(&pack.id)
            .map_err(|e| e.to_string())?
            .ok_or("pack vanished from the index")?;
        if current.shards != pack.shards {
            return Err("placement changed during repair; replanning next pass".into());
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
                return Err(format!(
                    "plan keeps shard {index} on node {node}, which the index does not list"
                ));
            }
        }
        self.meta
            .write(Command::SetPlacement {
                pack_id: pack.id,
                shards,
                needs_rebalance: plan.still_degraded,
            })
            .await
            .map_err(|e| e.to_string())?;
        self.repair.clear_pack(&pack.id);
        info!(pack_id = %hex::encode(pack.id), rebuilt = plan.writes.len(),
            removed = plan.deletes.len(), still_degraded = plan.still_degraded, "pack re-protected");
        for &(index, node) in &plan.deletes {
            if let Err(reason) = self.remove_shard(node, &pack.id, index, members).await {
                warn!(pack_id = %hex::encode(pack.id), shard_idx = index, node_id = node, %reason,
                    "surplus shard not deleted; scrub will find it");
            }
        }
        Ok(())
    }

    pub(super) fn is_draining(&self, node: NodeId) -> bool {
        self.draining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&node)
    }

    /// Repair counters for `cluster status`.
    pub(super) fn repair_status(&self) -> pb::RepairStatus {
        let r = &self.repair;
        pb::RepairStatus {
            queue: r.queue.load(Ordering::Relaxed),
            rate_bytes_per_s: r.rate_milli_bytes_per_s.load(Ordering::Relaxed) as f64 / 1000.0,
            packs_repaired_total: r.packs_repaired_total.load(Ordering::Relaxed),
            shards_written_total: r.shards_written_total.load(Ordering::Relaxed),
            bytes_written_total: r.bytes_written_total.load(Ordering::Relaxed),
            last_pass_unix_ms: r.last_pass_unix_ms.load(Ordering::Relaxed) as i64,
            errors_total: r.errors_total.load(Ordering::Relaxed),
            rate_limit_bytes_per_s: self.repair_rate_bytes_per_s,
        }
    }

    /// Moves a node's shards away (if `drain`), then removes it from the
    /// cluster. Without `drain` (its disk is gone), its shards are rebuilt
    /// from the others after the removal.
    pub(super) async fn drain_and_remove(
        &self,
        node: NodeId,
        drain: bool,
    ) -> Result<pb::RemoveNodeReply, GatewayError> {
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
            for _ in 0..3 {
                self.repair_pass(0).await;
                if holds(&self.meta.packs()?) == 0 {
                    break;
                }
            }
            self.draining
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&node);
            let left = holds(&self.meta.packs()?);
            if left > 0 {
                return Err(GatewayError::TooFewShards {
                    pack: format!("{left} shard(s) still on node {node}"),
                    durable: 0,
                    needed: 0,
                    failures: "drain incomplete; the node was not removed, run remove-node again"
                        .into(),
                });
            }
        }
        self.meta.remove_node(node).await?;
        self.repair.kick.notify_one();
        Ok(pb::RemoveNodeReply {
            shards_moved: if drain { before } else { 0 },
        })
    }

    /// Takes a scrub report (on the leader) and starts a pass.
    pub(super) fn take_faults(&self, faults: &[pb::ShardFault]) -> Result<(), GatewayError> {
        let mut parsed = Vec::with_capacity(faults.len());
        for fault in faults {
            parsed.push((id32(&fault.pack_id, "pack id")?, fault.index, fault.node_id));
        }
        warn!(
            count = parsed.len(),
            "scrub reported bad shards; repair scheduled"
        );
        self.repair.report_bad(parsed);
        Ok(())
    }
}
