//! Pure repair decisions: how well is a pack protected, and what must be
//! written where to bring it back to full protection.
//!
//! Inputs are the pack's recorded placement and which nodes are down (past
//! the grace period); outputs are counts and a plan. No I/O here: the worker
//! in `repair::mod` executes plans, and property tests below check that a
//! plan never makes protection worse and always keeps good shards in place.
//!
//! A pack is judged against the nodes of its storage class
//! ([`crate::placement::Target`]): a cold pack with two shards on each of
//! three cold nodes is `Full`, and the same pack back on hot nodes is
//! `Misplaced` while the cold nodes can hold it. When its class cannot hold
//! it (a cold node lost), every node is the target: protection beats class.

use std::collections::{BTreeMap, BTreeSet};

use crate::erasure::Code;
use crate::meta::types::PackRecord;
use crate::model::{Id32, NodeId, ShardPlacement, StorageClass};
use crate::placement::{Candidate, PlacementError, Target};

/// What the repair worker knows of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub region: String,
    /// Unreachable for longer than the grace period.
    pub down: bool,
    /// Its storage tier.
    pub class: StorageClass,
}

/// The repair worker's view of the nodes as placement candidates.
pub fn candidates(nodes: &BTreeMap<NodeId, NodeState>) -> Vec<Candidate> {
    nodes
        .iter()
        .map(|(id, n)| Candidate {
            node: *id,
            region: n.region.clone(),
            up: !n.down,
            class: n.class,
        })
        .collect()
}

/// How well one pack is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// k+m good shards, at most one per node and m per region.
    Full,
    /// k+m good shards, but doubled up on a node or over m in a region.
    Misplaced,
    /// More than k but fewer than k+m good shards.
    Degraded { missing: u32 },
    /// Exactly k good shards: no margin left.
    AtRisk,
    /// Fewer than k good shards.
    Unrecoverable,
}

/// Counts over all packs, as `cairn cluster status` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProtectionCounts {
    pub fully_protected: u64,
    pub misplaced: u64,
    pub degraded: u64,
    pub at_risk: u64,
    pub unrecoverable: u64,
    pub shards_missing: u64,
}

impl ProtectionCounts {
    pub fn into_wire(self) -> cairn_proto::v1::Protection {
        cairn_proto::v1::Protection {
            fully_protected: self.fully_protected,
            degraded: self.degraded,
            at_risk: self.at_risk,
            unrecoverable: self.unrecoverable,
            misplaced: self.misplaced,
            shards_missing: self.shards_missing,
        }
    }

    pub fn add(&mut self, health: Health, code_total: u32, good: u32) {
        match health {
            Health::Full => self.fully_protected += 1,
            Health::Misplaced => self.misplaced += 1,
            Health::Degraded { .. } => self.degraded += 1,
            Health::AtRisk => self.at_risk += 1,
            Health::Unrecoverable => self.unrecoverable += 1,
        }
        self.shards_missing += u64::from(code_total.saturating_sub(good));
    }
}

fn code_of(pack: &PackRecord) -> Code {
    Code {
        data: pack.data_shards,
        parity: pack.parity_shards,
    }
}

/// Shards on nodes that are members and not down, one per index, minus
/// those known bad (scrub reports).
pub fn good_shards(
    pack: &PackRecord,
    nodes: &BTreeMap<NodeId, NodeState>,
    bad: &BTreeSet<(Id32, u32, NodeId)>,
) -> Vec<ShardPlacement> {
    let mut seen = BTreeSet::new();
    pack.shards
        .iter()
        .filter(|s| nodes.get(&s.node).is_some_and(|n| !n.down))
        .filter(|s| !bad.contains(&(pack.id, s.index, s.node)))
        .filter(|s| s.index < pack.data_shards + pack.parity_shards && seen.insert(s.index))
        .cloned()
        .collect()
}

/// Classifies a pack of storage class `class` from its good shards.
pub fn assess(
    pack: &PackRecord,
    class: StorageClass,
    good: &[ShardPlacement],
    nodes: &BTreeMap<NodeId, NodeState>,
) -> Health {
    let code = code_of(pack);
    let total = code.total();
    let count = good.len() as u32;
    if count < code.data {
        return Health::Unrecoverable;
    }
    if count == code.data {
        return Health::AtRisk;
    }
    if count < total {
        return Health::Degraded {
            missing: total - count,
        };
    }
    let target = Target::of(code, class, &candidates(nodes));
    let on: Vec<NodeId> = good.iter().map(|s| s.node).collect();
    if target.well_placed(code, &on) {
        Health::Full
    } else {
        Health::Misplaced
    }
}

/// What to do for one pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairPlan {
    /// Shards to (re)build and where: `(index, node)`.
    pub writes: Vec<(u32, NodeId)>,
    /// The placement to commit once every write is durable.
    pub placement_after: Vec<(u32, NodeId)>,
    /// Old shards to delete after the commit (still on live nodes).
    pub deletes: Vec<(u32, NodeId)>,
    /// The new placement still breaks the rules (a region is still down).
    pub still_degraded: bool,
}

/// Plans the repair of one pack, or `None` when it needs nothing (or
/// nothing can be done until nodes come back).
///
/// The plan targets the nodes of `class` ([`Target::of`]); a move between
/// classes is the same plan: "every good shard outside the target is
/// misplaced".
pub fn plan_repair(
    pack: &PackRecord,
    class: StorageClass,
    good: &[ShardPlacement],
    nodes: &BTreeMap<NodeId, NodeState>,
) -> Result<Option<RepairPlan>, PlacementError> {
    let code = code_of(pack);
    let health = assess(pack, class, good, nodes);
    if matches!(health, Health::Full | Health::Unrecoverable) {
        return Ok(None);
    }
    let all = candidates(nodes);
    let target = Target::of(code, class, &all);
    let ideal = target.rule_possible(code);
    if health == Health::Misplaced && !ideal {
        // Every shard is good; moving them now would not make the pack safer.
        return Ok(None);
    }
    // Keep every good shard that is where a healthy plan could have put it.
    let mut keep = Vec::new();
    let mut on_node: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut in_region: BTreeMap<&str, u32> = BTreeMap::new();
    let node_cap = if target.one_per_node_possible(code) {
        1
    } else {
        code.parity
    };
    for shard in good.iter().filter(|s| target.contains(s.node)) {
        let region = nodes
            .get(&shard.node)
            .map(|n| n.region.as_str())
            .unwrap_or("");
        let node_n = on_node.get(&shard.node).copied().unwrap_or(0);
        let region_n = in_region.get(region).copied().unwrap_or(0);
        if node_n < node_cap && (!ideal || region_n < code.parity) {
            keep.push((shard.index, shard.node));
            *on_node.entry(shard.node).or_default() += 1;
            *in_region.entry(region).or_default() += 1;
        }
    }
    let plan = crate::placement::complete_class(code, class, &pack.id, &all, &keep)?;
    let kept: BTreeSet<(u32, NodeId)> = keep.iter().copied().collect();
    let writes: Vec<(u32, NodeId)> = plan
        .shards
        .iter()
        .filter(|a| !kept.contains(a))
        .copied()
        .collect();
    let after: BTreeSet<(u32, NodeId)> = plan.shards.iter().copied().collect();
    let deletes: Vec<(u32, NodeId)> = good
        .iter()
        .map(|s| (s.index, s.node))
        .filter(|a| !after.contains(a))
        .collect();
    if writes.is_empty() && deletes.is_empty() {
        return Ok(None);
    }
    Ok(Some(RepairPlan {
        writes,
        placement_after: plan.shards,
        deletes,
        still_degraded: plan.degraded,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOT: StorageClass = StorageClass::Hot;

    fn topology(spec: &[(&str, usize, bool)]) -> BTreeMap<NodeId, NodeState> {
        let mut nodes = BTreeMap::new();
        let mut id = 0;
        for (region, count, up) in spec {
            for _ in 0..*count {
                id += 1;
                nodes.insert(
                    id,
                    NodeState {
                        region: region.to_string(),
                        down: !up,
                        class: StorageClass::Hot,
                    },
                );
            }
        }
        nodes
    }

    fn pack(placement: &[(u32, NodeId)]) -> PackRecord {
        PackRecord {
            id: [7; 32],
            tenant: "t".into(),
            data_shards: 4,
            parity_shards: 2,
            pack_len: 100,
            shard_len: 25,
            shards: placement
                .iter()
                .map(|&(index, node)| ShardPlacement {
                    index,
                    node,
                    checksum: [0; 32],
                })
                .collect(),
            needs_rebalance: false,
        }
    }

    fn apply(pack: &PackRecord, plan: &RepairPlan) -> PackRecord {
        let mut after = pack.clone();
        after.shards = plan
            .placement_after
            .iter()
            .map(|&(index, node)| ShardPlacement {
                index,
                node,
                checksum: [0; 32],
            })
            .collect();
        after
    }

    #[test]
    fn a_lost_node_is_rebuilt_elsewhere_and_good_shards_stay() {
        let mut nodes = topology(&[("r1", 3, true), ("r2", 2, true), ("r3", 2, true)]);
        let p = pack(&[(0, 1), (1, 2), (2, 4), (3, 5), (4, 6), (5, 7)]);
        nodes.get_mut(&2).expect("node 2").down = true;
        let good = good_shards(&p, &nodes, &BTreeSet::new());
        assert_eq!(
            assess(&p, HOT, &good, &nodes),
            Health::Degraded { missing: 1 }
        );
        let plan = plan_repair(&p, HOT, &good, &nodes)
            .expect("plan")
            .expect("work");
        assert_eq!(
            plan.writes,
            vec![(1, 3)],
            "the spare node of r1 takes shard 1"
        );
        assert!(plan.deletes.is_empty());
        let after = apply(&p, &plan);
        let good = good_shards(&after, &nodes, &BTreeSet::new());
        assert_eq!(assess(&after, HOT, &good, &nodes), Health::Full);
    }

    #[test]
    fn a_region_down_is_reprotected_on_the_survivors_then_rebalanced_when_back() {
        let mut nodes = topology(&[("r1", 2, true), ("r2", 2, true), ("r3", 2, true)]);
        let p = pack(&[(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]);
        for id in [5, 6] {
            nodes.get_mut(&id).expect("node").down = true;
        }
        let good = good_shards(&p, &nodes, &BTreeSet::new());
        assert_eq!(
            assess(&p, HOT, &good, &nodes),
            Health::AtRisk,
            "k good shards, no margin"
        );
        let plan = plan_repair(&p, HOT, &good, &nodes)
            .expect("plan")
            .expect("work");
        assert_eq!(plan.writes.len(), 2);
        assert!(plan.still_degraded);
        let during = apply(&p, &plan);
        let good = good_shards(&during, &nodes, &BTreeSet::new());
        // k+m shards again: one more node loss is survivable.
        assert_eq!(good.len(), 6);
        assert_eq!(assess(&during, HOT, &good, &nodes), Health::Misplaced);
        assert_eq!(
            plan_repair(&during, HOT, &good, &nodes).expect("plan"),
            None,
            "no churn while r3 is down"
        );
        // r3 returns: rebalance to one per node, two per region.
        for id in [5, 6] {
            nodes.get_mut(&id).expect("node").down = false;
        }
        let good = good_shards(&during, &nodes, &BTreeSet::new());
        let plan = plan_repair(&during, HOT, &good, &nodes)
            .expect("plan")
            .expect("rebalance");
        assert!(!plan.still_degraded);
        assert_eq!(plan.deletes.len(), 2, "the doubled-up copies go");
        let after = apply(&during, &plan);
        let good = good_shards(&after, &nodes, &BTreeSet::new());
        assert_eq!(assess(&after, HOT, &good, &nodes), Health::Full);
    }

    #[test]
    fn bad_shards_reported_by_scrub_count_as_missing() {
        let nodes = topology(&[("r1", 2, true), ("r2", 2, true), ("r3", 2, true)]);
        let p = pack(&[(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]);
        let bad: BTreeSet<_> = [(p.id, 3, 4)].into_iter().collect();
        let good = good_shards(&p, &nodes, &bad);
        assert_eq!(
            assess(&p, HOT, &good, &nodes),
            Health::Degraded { missing: 1 }
        );
        let plan = plan_repair(&p, HOT, &good, &nodes)
            .expect("plan")
            .expect("work");
        assert_eq!(
            plan.writes,
            vec![(3, 4)],
            "rewritten in place, the only healthy spot"
        );
    }

    #[test]
    fn counts_follow_the_good_shards() {
        let nodes = topology(&[("r1", 2, true), ("r2", 2, false), ("r3", 2, false)]);
        let p = pack(&[(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]);
        let good = good_shards(&p, &nodes, &BTreeSet::new());
        assert_eq!(assess(&p, HOT, &good, &nodes), Health::Unrecoverable);
        assert_eq!(plan_repair(&p, HOT, &good, &nodes).expect("plan"), None);
    }

    /// Three regions of (2 hot, 1 cold): ids 1 2 hot, 3 cold (r1); 4 5, 6; 7 8, 9.
    fn tiered() -> BTreeMap<NodeId, NodeState> {
        let mut nodes = topology(&[("r1", 3, true), ("r2", 3, true), ("r3", 3, true)]);
        for id in [3, 6, 9] {
            nodes.get_mut(&id).expect("node").class = StorageClass::Cold;
        }
        nodes
    }

    const COLD: StorageClass = StorageClass::Cold;
    const ON_COLD: [(u32, NodeId); 6] = [(0, 3), (1, 6), (2, 9), (3, 3), (4, 6), (5, 9)];
    const ON_HOT: [(u32, NodeId); 6] = [(0, 1), (1, 4), (2, 7), (3, 2), (4, 5), (5, 8)];

    #[test]
    fn health_is_judged_against_the_nodes_of_the_pack_class() {
        let nodes = tiered();
        let cold = pack(&ON_COLD);
        let good = good_shards(&cold, &nodes, &BTreeSet::new());
        assert_eq!(assess(&cold, COLD, &good, &nodes), Health::Full);
        assert_eq!(plan_repair(&cold, COLD, &good, &nodes).expect("plan"), None);
        // The same shards judged as a hot pack are misplaced.
        assert_eq!(assess(&cold, HOT, &good, &nodes), Health::Misplaced);
        let hot = pack(&ON_HOT);
        let good = good_shards(&hot, &nodes, &BTreeSet::new());
        assert_eq!(assess(&hot, HOT, &good, &nodes), Health::Full);
        assert_eq!(assess(&hot, COLD, &good, &nodes), Health::Misplaced);
    }

    #[test]
    fn a_move_to_cold_is_a_repair_plan_onto_cold_nodes_only() {
        let nodes = tiered();
        let hot = pack(&ON_HOT);
        let good = good_shards(&hot, &nodes, &BTreeSet::new());
        let plan = plan_repair(&hot, COLD, &good, &nodes)
            .expect("plan")
            .expect("a move");
        assert_eq!(plan.writes.len(), 6);
        assert_eq!(
            plan.deletes.len(),
            6,
            "every hot shard goes after the commit"
        );
        assert!(!plan.still_degraded);
        assert!(plan.writes.iter().all(|(_, n)| [3, 6, 9].contains(n)));
        let after = apply(&hot, &plan);
        let good = good_shards(&after, &nodes, &BTreeSet::new());
        assert_eq!(assess(&after, COLD, &good, &nodes), Health::Full);
        // And back: a promoted pack returns to hot nodes, one per node.
        let back = plan_repair(&after, HOT, &good, &nodes)
            .expect("plan")
            .expect("a move back");
        assert!(back.writes.iter().all(|(_, n)| ![3, 6, 9].contains(n)));
        assert!(!back.still_degraded);
    }

    #[test]
    fn a_lost_cold_node_is_rebuilt_on_every_node_then_moved_back_to_cold() {
        let mut nodes = tiered();
        nodes.get_mut(&3).expect("node 3").down = true;
        let cold = pack(&ON_COLD);
        let good = good_shards(&cold, &nodes, &BTreeSet::new());
        assert_eq!(assess(&cold, COLD, &good, &nodes), Health::AtRisk);
        let plan = plan_repair(&cold, COLD, &good, &nodes)
            .expect("plan")
            .expect("work");
        assert!(
            !plan.still_degraded,
            "protection first: healthy over every node"
        );
        assert!(plan.writes.iter().all(|(_, n)| *n != 3));
        let during = apply(&cold, &plan);
        let good = good_shards(&during, &nodes, &BTreeSet::new());
        assert_eq!(good.len(), 6);
        assert_eq!(assess(&during, COLD, &good, &nodes), Health::Full);
        // The cold node returns: the pack goes back to the cold tier.
        nodes.get_mut(&3).expect("node 3").down = false;
        let good = good_shards(&during, &nodes, &BTreeSet::new());
        assert_eq!(assess(&during, COLD, &good, &nodes), Health::Misplaced);
        let back = plan_repair(&during, COLD, &good, &nodes)
            .expect("plan")
            .expect("back to cold");
        let after = apply(&during, &back);
        let good = good_shards(&after, &nodes, &BTreeSet::new());
        assert_eq!(assess(&after, COLD, &good, &nodes), Health::Full);
        assert!(after.shards.iter().all(|s| [3, 6, 9].contains(&s.node)));
    }

    proptest! {
        /// A repair never lowers the number of good shards, keeps every
        /// kept shard where it was, writes only to up nodes, and ends
        /// fully protected whenever the up nodes allow it.
        #[test]
        fn repairs_only_improve_protection(
            regions in prop::collection::vec((1usize..4, prop::collection::vec(any::<bool>(), 4)), 3..5),
            holders in prop::collection::vec(0usize..16, 6),
        ) {
            let mut nodes = BTreeMap::new();
            let mut id = 0u64;
            for (r, (count, ups)) in regions.iter().enumerate() {
                for up in ups.iter().take(*count) {
                    id += 1;
                    nodes.insert(id, NodeState { region: format!("r{r}"), down: !up, class: StorageClass::Hot });
                }
            }
            let ids: Vec<NodeId> = nodes.keys().copied().collect();
            let placement: Vec<(u32, NodeId)> = holders
                .iter()
                .enumerate()
                .map(|(i, h)| (i as u32, ids[h % ids.len()]))
                .collect();
            let p = pack(&placement);
            let good = good_shards(&p, &nodes, &BTreeSet::new());
            let before = good.len();
            match plan_repair(&p, HOT, &good, &nodes) {
                Ok(Some(plan)) => {
                    for (_, node) in &plan.writes {
                        prop_assert!(!nodes[node].down, "write to a down node");
                    }
                    let after = apply(&p, &plan);
                    let good_after = good_shards(&after, &nodes, &BTreeSet::new());
                    prop_assert!(good_after.len() >= before);
                    prop_assert_eq!(good_after.len(), 6);
                    if crate::placement::healthy_possible(Code::default(), &candidates(&nodes)) {
                        prop_assert_eq!(assess(&after, HOT, &good_after, &nodes), Health::Full);
                    }
                }
                Ok(None) => {}
                Err(PlacementError::TooFewNodes { .. }) => {}
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            }
        }
    }
}
