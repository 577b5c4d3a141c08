//! Where the shards of a pack go, and in which order a reader tries them.
//!
//! This module owns two decisions: the placement plan of a new pack
//! ([`place`]) and the read order of a stored one ([`read_order`]). It is pure:
//! inputs in, decisions out, no I/O, no clock, no randomness. It must not
//! talk to nodes or know how liveness is measured; callers pass in who is up.
//!
//! Invariants of a plan:
//! - all `k + m` shard indices are assigned, each exactly once, to up nodes;
//! - whenever the up nodes allow it, at most one shard per node and at most
//!   `m` shards per region, so losing any one region (or any `m` nodes) loses
//!   nothing; `Plan::degraded` is false exactly when the plan meets both;
//! - when they do not allow it, all shards are still placed (writes go on
//!   while a region is down), at most `m` per region whenever the number of
//!   live regions allows, spread as evenly as possible over nodes, and the
//!   plan is marked degraded so repair rebalances it later;
//! - the choice is deterministic for a pack id and spreads load evenly:
//!   nodes are ranked by rendezvous hashing of (pack id, node id), so a node
//!   a plan does not use can come and go without changing that plan.
//!
//! Storage classes ([`Target`]): a hot pack goes to hot nodes whenever they
//! can hold it healthily (one shard per node, at most `m` per region), else
//! to every node; a cold pack goes to cold nodes whenever they can hold it
//! with at most `m` per region (and at most `m` per node), spread as evenly
//! as they allow, else to every node. Protection always beats class: no
//! class rule ever accepts a plan a region loss would break.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::erasure::{Code, ErasureError};
use crate::model::{Id32, NodeId, ShardPlacement, StorageClass};

/// A node that may receive shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeId,
    /// Failure domain of the node.
    pub region: String,
    /// Whether the node is believed reachable now; down nodes get nothing.
    pub up: bool,
    /// The node's storage tier.
    pub class: StorageClass,
}

/// The nodes chosen for the shards of one pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `(shard index, node)` for every index `0..k+m`, in index order.
    pub shards: Vec<(u32, NodeId)>,
    /// The plan breaks "≤ 1 shard per node and ≤ m per region" because the up
    /// nodes did not allow better; the pack needs rebalancing later.
    pub degraded: bool,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlacementError {
    /// The code is invalid.
    #[error(transparent)]
    InvalidCode(#[from] ErasureError),
    /// Fewer up nodes than [`min_distinct_nodes`]: a pack would put more
    /// than m shards on some node.
    #[error(
        "only {up} node(s) are up but code {code} needs at least {needed} distinct up nodes \
         to make a pack durable; bring nodes back or use a smaller code"
    )]
    TooFewNodes { up: usize, needed: u32, code: Code },
    /// The same node id appears twice among the candidates.
    #[error("node {node} appears more than once among placement candidates")]
    DuplicateNode { node: NodeId },
}

/// Rendezvous (highest random weight) score of a node for a pack. Domain
/// separated so it never collides with any other use of blake3 on pack ids.
fn score(pack_id: &Id32, node: NodeId) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"cairn placement v1\0");
    h.update(pack_id);
    h.update(&node.to_le_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Plans where the `k + m` shards of a pack go.
///
/// Shards are assigned one index at a time to the node that minimises, in
/// order: (would its region exceed `m`, shards already on the node, shards
/// already in its region, rendezvous rank). Region capacity comes first
/// because losing a region is the failure the code is sized for; spreading
/// over nodes comes next. With capacities `min(up nodes, m)` per region this
/// is water-filling, which meets the healthy constraints whenever any
/// assignment can. One hard floor overrides the order: the plan always uses
/// at least `ceil((k + m) / m)` distinct nodes, so that no node holds more
/// than `m` shards and losing any one node never loses a pack, even while a
/// region is down and shards double up on the survivors (a pack is
/// acknowledged once `k + 1` shards are durable). The region cap holds
/// whenever `up regions * m >= k + m`.
///
/// A new pack is hot: only hot candidates are used when they can hold it
/// healthily ([`Target`]).
pub fn place(code: Code, pack_id: &Id32, candidates: &[Candidate]) -> Result<Plan, PlacementError> {
    complete(code, pack_id, candidates, &[])
}

/// Completes a placement of a hot pack: `keep` holds `(index, node)`
/// assignments that stay where they are (repair keeps every good,
/// well-placed shard); the other indices are assigned exactly as [`place`]
/// would, counting the kept shards. Kept shards must be on up candidates of
/// the target; duplicate indices in `keep` are an error of the caller and
/// only the first is used.
pub fn complete(
    code: Code,
    pack_id: &Id32,
    candidates: &[Candidate],
    keep: &[(u32, NodeId)],
) -> Result<Plan, PlacementError> {
    complete_class(code, StorageClass::Hot, pack_id, candidates, keep)
}

/// [`complete`] for a pack of `class`: planned over [`Target::of`] the
/// candidates, `degraded` judged by that target's rule.
pub fn complete_class(
    code: Code,
    class: StorageClass,
    pack_id: &Id32,
    candidates: &[Candidate],
    keep: &[(u32, NodeId)],
) -> Result<Plan, PlacementError> {
    code.validate()?;
    check_unique(candidates)?;
    let target = Target::of(code, class, candidates);
    let mut plan = complete_over(code, pack_id, &target.candidates, keep)?;
    plan.degraded = target.plan_degraded(code, &plan);
    Ok(plan)
}

fn check_unique(candidates: &[Candidate]) -> Result<(), PlacementError> {
    let mut seen = std::collections::BTreeSet::new();
    for c in candidates {
        if !seen.insert(c.node) {
            return Err(PlacementError::DuplicateNode { node: c.node });
        }
    }
    Ok(())
}

/// The nodes a pack of one class should live on, and the rule its
/// placement is judged by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub class: StorageClass,
    /// The nodes of the target (up and down).
    pub candidates: Vec<Candidate>,
    /// The class's own nodes can hold the pack; `false`: every node is the
    /// target (protection beats class).
    pub in_class: bool,
}

impl Target {
    /// Hot: the hot nodes when their up ones allow a healthy plan
    /// ([`healthy_possible`]), else every node. Cold: the cold nodes when
    /// their up ones allow at most `m` shards per region and per node
    /// ([`region_cap_possible`]), else every node.
    pub fn of(code: Code, class: StorageClass, candidates: &[Candidate]) -> Self {
        let own: Vec<Candidate> = candidates
            .iter()
            .filter(|c| c.class == class)
            .cloned()
            .collect();
        let holds = match class {
            StorageClass::Hot => healthy_possible(code, &own),
            StorageClass::Cold => region_cap_possible(code, &own),
        };
        if holds {
            Self {
                class,
                candidates: own,
                in_class: true,
            }
        } else {
            Self {
                class,
                candidates: candidates.to_vec(),
                in_class: false,
            }
        }
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.candidates.iter().any(|c| c.node == node)
    }

    fn region_of(&self, node: NodeId) -> Option<&str> {
        self.candidates
            .iter()
            .find(|c| c.node == node)
            .map(|c| c.region.as_str())
    }

    /// Whether the target's up nodes allow one shard per node and at most
    /// `m` per region (otherwise shards double up, at most `m` per node).
    pub fn one_per_node_possible(&self, code: Code) -> bool {
        healthy_possible(code, &self.candidates)
    }

    /// Whether a placement can meet this target's rule with the nodes up now.
    pub fn rule_possible(&self, code: Code) -> bool {
        if self.class == StorageClass::Cold && self.in_class {
            true
        } else {
            self.one_per_node_possible(code)
        }
    }

    /// The target's rule for stored shards: every one on a target node and
    /// [`well_placed`] among the target's members. A cold pack on cold
    /// nodes: at most `m` per region, and one per node when the cold nodes
    /// up allow it (else at most `m` per node).
    pub fn well_placed(&self, code: Code, nodes: &[NodeId]) -> bool {
        if !nodes.iter().all(|n| self.contains(*n)) {
            return false;
        }
        if self.class == StorageClass::Cold && self.in_class {
            let node_cap = if self.one_per_node_possible(code) {
                1
            } else {
                code.parity
            };
            let mut per_node: BTreeMap<NodeId, u32> = BTreeMap::new();
            let mut per_region: BTreeMap<Option<&str>, u32> = BTreeMap::new();
            for n in nodes {
                *per_node.entry(*n).or_default() += 1;
                *per_region.entry(self.region_of(*n)).or_default() += 1;
            }
            per_region.values().all(|&c| c <= code.parity)
                && per_node.values().all(|&c| c <= node_cap)
        } else {
            well_placed(
                code,
                nodes.iter().copied(),
                |n| self.region_of(n),
                self.candidates.len(),
            )
        }
    }

    /// Whether a fresh plan breaks the target's rule (it needs rebalancing).
    /// A cold pack on cold nodes is judged by [`Target::well_placed`]; every
    /// other plan by [`Plan::is_healthy`] over the target.
    pub fn plan_degraded(&self, code: Code, plan: &Plan) -> bool {
        if self.class == StorageClass::Cold && self.in_class {
            let nodes: Vec<NodeId> = plan.shards.iter().map(|(_, n)| *n).collect();
            let mut indices: Vec<u32> = plan.shards.iter().map(|(i, _)| *i).collect();
            indices.sort_unstable();
            let all_up = plan
                .shards
                .iter()
                .all(|(_, n)| self.candidates.iter().any(|c| c.node == *n && c.up));
            !(all_up
                && indices == (0..code.total()).collect::<Vec<_>>()
                && self.well_placed(code, &nodes))
        } else {
            !plan.is_healthy(code, &self.candidates)
        }
    }
}

/// Whether the up candidates can hold a pack with at most `m` shards per
/// region and per node: at least [`min_distinct_nodes`] of them, in at least
/// `ceil((k + m) / m)` regions. The cold tier's rule: fewer, bigger nodes,
/// each holding up to `m` shards of a pack, and a region loss still loses
/// at most `m`.
pub fn region_cap_possible(code: Code, candidates: &[Candidate]) -> bool {
    let up: Vec<&Candidate> = candidates.iter().filter(|c| c.up).collect();
    let regions: std::collections::BTreeSet<&str> = up.iter().map(|c| c.region.as_str()).collect();
    code.validate().is_ok()
        && up.len() >= min_distinct_nodes(code) as usize
        && regions.len() as u64 * u64::from(code.parity) >= u64::from(code.total())
}

/// The water-filling planner over exactly `candidates` (no class choice).
fn complete_over(
    code: Code,
    pack_id: &Id32,
    candidates: &[Candidate],
    keep: &[(u32, NodeId)],
) -> Result<Plan, PlacementError> {
    code.validate()?;
    let mut seen = std::collections::BTreeSet::new();
    for c in candidates {
        if !seen.insert(c.node) {
            return Err(PlacementError::DuplicateNode { node: c.node });
        }
    }
    let up: Vec<&Candidate> = candidates.iter().filter(|c| c.up).collect();
    let needed = min_distinct_nodes(code);
    if up.len() < needed as usize {
        return Err(PlacementError::TooFewNodes {
            up: up.len(),
            needed,
            code,
        });
    }

    let scores: Vec<u64> = up.iter().map(|c| score(pack_id, c.node)).collect();
    let mut on_node = vec![0u32; up.len()];
    let mut in_region: BTreeMap<&str, u32> = BTreeMap::new();
    let mut distinct = 0u32;
    let mut assigned: BTreeMap<u32, NodeId> = BTreeMap::new();
    for &(index, node) in keep {
        if index >= code.total() || assigned.contains_key(&index) {
            continue;
        }
        let Some(i) = up.iter().position(|c| c.node == node) else {
            continue;
        };
        if on_node[i] == 0 {
            distinct += 1;
        }
        on_node[i] += 1;
        *in_region.entry(up[i].region.as_str()).or_default() += 1;
        assigned.insert(index, node);
    }
    let free: Vec<u32> = (0..code.total())
        .filter(|i| !assigned.contains_key(i))
        .collect();
    for (n, &index) in free.iter().enumerate() {
        // Hard floor: enough distinct nodes that none holds more than m
        // shards. Once the remaining indices are just enough to reach it,
        // only nodes without a shard qualify (there are enough: checked).
        let remaining = (free.len() - n) as u32;
        let fresh_only = distinct + remaining <= needed;
        let best = (0..up.len())
            .filter(|&i| !fresh_only || on_node[i] == 0)
            .min_by_key(|&i| {
                let region = in_region.get(up[i].region.as_str()).copied().unwrap_or(0);
                (
                    region >= code.parity,
                    on_node[i],
                    region,
                    Reverse(scores[i]),
                    up[i].node,
                )
            })
            .expect("enough up nodes for the floor, fewer than the floor used so far");
        if on_node[best] == 0 {
            distinct += 1;
        }
        on_node[best] += 1;
        *in_region.entry(up[best].region.as_str()).or_default() += 1;
        assigned.insert(index, up[best].node);
    }

    let mut plan = Plan {
        shards: assigned.into_iter().collect(),
        degraded: false,
    };
    plan.degraded = !plan.is_healthy(code, candidates);
    Ok(plan)
}

/// Fewest distinct nodes a pack may be spread over: no node above `m` shards.
pub fn min_distinct_nodes(code: Code) -> u32 {
    code.total().div_ceil(code.parity.max(1))
}

impl Plan {
    /// Whether the plan meets the healthy constraints: every index `0..k+m`
    /// exactly once, only up candidate nodes, at most one shard per node and
    /// at most `m` per region. The second half of "check placement when
    /// planned and when applied".
    pub fn is_healthy(&self, code: Code, candidates: &[Candidate]) -> bool {
        let mut indices: Vec<u32> = self.shards.iter().map(|(i, _)| *i).collect();
        indices.sort_unstable();
        if indices != (0..code.total()).collect::<Vec<_>>() {
            return false;
        }
        let all_up = self
            .shards
            .iter()
            .all(|(_, n)| candidates.iter().any(|c| c.node == *n && c.up));
        all_up
            && node_counts(self).values().all(|&n| n <= 1)
            && region_counts(self, candidates)
                .values()
                .all(|&n| n <= code.parity)
    }
}

/// Shards per node in a plan.
pub fn node_counts(plan: &Plan) -> BTreeMap<NodeId, u32> {
    let mut counts = BTreeMap::new();
    for (_, node) in &plan.shards {
        *counts.entry(*node).or_default() += 1;
    }
    counts
}

/// Shards per region in a plan. Shards on nodes that are not among the
/// candidates are counted under the empty region name.
pub fn region_counts(plan: &Plan, candidates: &[Candidate]) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for (_, node) in &plan.shards {
        let region = candidates
            .iter()
            .find(|c| c.node == *node)
            .map(|c| c.region.clone())
            .unwrap_or_default();
        *counts.entry(region).or_default() += 1;
    }
    counts
}

/// Whether the up candidates allow a healthy plan: `sum over regions of
/// min(up nodes, m) >= k + m`. Configuration uses it to refuse a code too
/// wide for the cluster.
pub fn healthy_possible(code: Code, candidates: &[Candidate]) -> bool {
    let mut per_region: BTreeMap<&str, u32> = BTreeMap::new();
    for c in candidates.iter().filter(|c| c.up) {
        *per_region.entry(c.region.as_str()).or_default() += 1;
    }
    let capacity: u64 = per_region
        .values()
        .map(|&n| u64::from(n.min(code.parity)))
        .sum();
    capacity >= u64::from(code.total())
}

/// The one rule for a stored pack's shards being well placed: at most `m`
/// in any region (losing a region loses nothing), and at most one per node
/// whenever the cluster has at least `k + m` members. `region_of` names the
/// region of a node (`None`: not a member, counted under one unknown region).
/// The gateway (is a new pack degraded?), repair (is a pack misplaced?) and
/// check (is a pack at risk from a region loss?) all use this.
pub fn well_placed<'a>(
    code: Code,
    nodes: impl IntoIterator<Item = NodeId>,
    region_of: impl Fn(NodeId) -> Option<&'a str>,
    members: usize,
) -> bool {
    let mut per_node: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut per_region: BTreeMap<Option<&'a str>, u32> = BTreeMap::new();
    for node in nodes {
        *per_node.entry(node).or_default() += 1;
        *per_region.entry(region_of(node)).or_default() += 1;
    }
    let enough_nodes = members >= code.total() as usize;
    per_region.values().all(|&n| n <= code.parity)
        && (!enough_nodes || per_node.values().all(|&n| n <= 1))
}

/// Fully protected: every index `0..k+m` exactly once, [`well_placed`].
pub fn fully_protected<'a>(
    code: Code,
    shards: &[(u32, NodeId)],
    region_of: impl Fn(NodeId) -> Option<&'a str>,
    members: usize,
) -> bool {
    let mut indices: Vec<u32> = shards.iter().map(|(i, _)| *i).collect();
    indices.sort_unstable();
    indices == (0..code.total()).collect::<Vec<_>>()
        && well_placed(code, shards.iter().map(|(_, n)| *n), region_of, members)
}

/// Whether losing some one region would leave fewer than `k` of these shards
/// (more than `m` of them in one region).
pub fn region_loss_fatal<'a>(
    code: Code,
    nodes: impl IntoIterator<Item = NodeId>,
    region_of: impl Fn(NodeId) -> Option<&'a str>,
) -> bool {
    let mut per_region: BTreeMap<Option<&'a str>, u32> = BTreeMap::new();
    let mut total = 0u32;
    for node in nodes {
        *per_region.entry(region_of(node)).or_default() += 1;
        total += 1;
    }
    per_region
        .values()
        .any(|&n| total.saturating_sub(n) < code.data)
}

/// The acknowledgement rule of a new pack: at least `k + 1` distinct shard
/// indices durable (any one shard may be lost afterwards and the pack still
/// decodes) and no node holding more than `m` of them. Note: a node holding
/// two of exactly `k + 1` shards is not covered by that margin; the gateway
/// writes all `k + m` whenever it can, so this is the floor, not the rule.
pub fn ack_allowed(code: Code, durable: &[(u32, NodeId)]) -> bool {
    let mut indices: Vec<u32> = durable.iter().map(|(i, _)| *i).collect();
    indices.sort_unstable();
    indices.dedup();
    let mut per_node: BTreeMap<NodeId, u32> = BTreeMap::new();
    for (_, node) in durable {
        *per_node.entry(*node).or_default() += 1;
    }
    indices.len() > code.data as usize && per_node.values().all(|&n| n <= code.parity)
}

/// The order in which a reader should try the shards of a pack.
///
/// Shards on nodes in `excluded_regions` are dropped. The rest are ordered:
/// up nodes before down ones (nodes missing from `nodes` count as down),
/// then the preferred region before the others, then by shard index, so data
/// shards (indices `0..k`) come before parity within each group and a reader
/// taking the first k good shards decodes as little as possible.
pub fn read_order(
    placement: &[ShardPlacement],
    nodes: &BTreeMap<NodeId, (String, bool)>,
    preferred_region: &str,
    excluded_regions: &[String],
) -> Vec<ShardPlacement> {
    let mut order: Vec<(bool, bool, &ShardPlacement)> = placement
        .iter()
        .filter_map(|p| match nodes.get(&p.node) {
            Some((region, _)) if excluded_regions.iter().any(|r| r == region) => None,
            Some((region, up)) => Some((!*up, region != preferred_region, p)),
            None => Some((true, true, p)),
        })
        .collect();
    order.sort_by_key(|(down, far, p)| (*down, *far, p.index, p.node));
    order.into_iter().map(|(_, _, p)| p.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// The ack rule is exactly "k+1 distinct shards, at most m per
        /// node", and an acknowledged pack survives the loss of any one shard.
        #[test]
        fn ack_allowed_means_any_one_node_may_fail(
            durable in prop::collection::vec((0u32..6, 1u64..6), 0..8),
        ) {
            let code = Code::default();
            let mut seen = BTreeSet::new();
            let durable: Vec<(u32, NodeId)> =
                durable.into_iter().filter(|(i, _)| seen.insert(*i)).collect();
            let nodes: BTreeSet<NodeId> = durable.iter().map(|(_, n)| *n).collect();
            let survives_any_shard = durable.len() > code.data as usize;
            let per_node_ok = nodes.iter().all(|n| {
                durable.iter().filter(|(_, m)| m == n).count() <= code.parity as usize
            });
            prop_assert_eq!(
                ack_allowed(code, &durable),
                durable.len() > code.data as usize && per_node_ok
            );
            if ack_allowed(code, &durable) {
                prop_assert!(survives_any_shard);
            }
        }

        /// A well placed full pack survives the loss of any one region, and
        /// a pack that a region loss would make unrecoverable is never
        /// well placed.
        #[test]
        fn well_placed_packs_survive_any_region(
            holders in prop::collection::vec(0u64..9, 6),
            members in 1usize..12,
        ) {
            let code = Code::default();
            let region_of = |n: NodeId| Some(["r1", "r2", "r3"][(n % 3) as usize]);
            let shards: Vec<(u32, NodeId)> =
                holders.iter().enumerate().map(|(i, n)| (i as u32, *n)).collect();
            let nodes = || shards.iter().map(|(_, n)| *n);
            if well_placed(code, nodes(), region_of, members) {
                prop_assert!(!region_loss_fatal(code, nodes(), region_of));
                for region in ["r1", "r2", "r3"] {
                    let left = nodes().filter(|n| region_of(*n) != Some(region)).count();
                    prop_assert!(left >= code.data as usize);
                }
            }
            if region_loss_fatal(code, nodes(), region_of) {
                prop_assert!(!well_placed(code, nodes(), region_of, members));
            }
            prop_assert_eq!(
                fully_protected(code, &shards, region_of, members),
                well_placed(code, nodes(), region_of, members)
            );
        }
    }

    fn topology(regions: &[(&str, u64, bool)]) -> Vec<Candidate> {
        // (region, node count, up) -> nodes numbered region-major.
        let mut out = Vec::new();
        let mut id = 1;
        for (region, count, up) in regions {
            for _ in 0..*count {
                out.push(Candidate {
                    node: id,
                    region: region.to_string(),
                    up: *up,
                    class: StorageClass::Hot,
                });
                id += 1;
            }
        }
        out
    }

    fn pid(n: u64) -> Id32 {
        *blake3::hash(&n.to_le_bytes()).as_bytes()
    }

    /// The checks every plan must pass, whatever the topology.
    fn must_be_valid(code: Code, plan: &Plan, candidates: &[Candidate]) {
        let indices: Vec<u32> = plan.shards.iter().map(|(i, _)| *i).collect();
        assert_eq!(indices, (0..code.total()).collect::<Vec<_>>());
        for (_, node) in &plan.shards {
            assert!(
                candidates.iter().any(|c| c.node == *node && c.up),
                "shard on a down or unknown node {node}"
            );
        }
        let distinct: BTreeSet<NodeId> = plan.shards.iter().map(|(_, n)| *n).collect();
        assert!(
            distinct.len() >= min_distinct_nodes(code) as usize,
            "fewer distinct nodes than the floor"
        );
        assert!(
            node_counts(plan).values().all(|&n| n <= code.parity),
            "more than m shards on one node"
        );
    }

    #[test]
    fn three_regions_two_nodes_each_is_one_per_node_two_per_region() {
        let code = Code::default();
        let nodes = topology(&[("r1", 2, true), ("r2", 2, true), ("r3", 2, true)]);
        for p in 0..50 {
            let plan = place(code, &pid(p), &nodes).expect("placeable");
            must_be_valid(code, &plan, &nodes);
            assert!(!plan.degraded);
            assert!(region_counts(&plan, &nodes).values().all(|&n| n == 2));
            assert!(node_counts(&plan).values().all(|&n| n == 1));
        }
    }

    #[test]
    fn region_down_places_everything_on_survivors_and_marks_degraded() {
        let code = Code::default();
        let nodes = topology(&[("r1", 3, true), ("r2", 3, true), ("r3", 2, false)]);
        for p in 0..20 {
            let plan = place(code, &pid(p), &nodes).expect("6 up nodes");
            must_be_valid(code, &plan, &nodes);
            assert!(plan.degraded);
            assert!(region_counts(&plan, &nodes).values().all(|&n| n == 3));
            assert!(node_counts(&plan).values().all(|&n| n == 1));
        }
    }

    #[test]
    fn prefers_region_cap_over_node_cap_when_only_one_can_hold() {
        // 5 up nodes over 3 regions (2, 2, 1): the region cap (≤ 2) can hold if
        // the lone node of r3 takes two shards; losing any region still leaves 4.
        let code = Code::default();
        let nodes = topology(&[("r1", 2, true), ("r2", 2, true), ("r3", 1, true)]);
        for p in 0..20 {
            let plan = place(code, &pid(p), &nodes).expect("placeable");
            must_be_valid(code, &plan, &nodes);
            assert!(plan.degraded, "6 shards on 5 nodes cannot be healthy");
            assert!(region_counts(&plan, &nodes).values().all(|&n| n <= 2));
            assert_eq!(node_counts(&plan).values().max(), Some(&2));
        }
    }

    #[test]
    fn region_cap_before_one_per_node_when_nodes_are_short() {
        // r0 has 3 nodes, r1 and r2 one each: two shards per region keeps a
        // region loss survivable, at the price of doubling up on the single
        // nodes of r1 and r2 (never more than m on a node).
        let code = Code::default();
        let nodes = topology(&[("r0", 3, true), ("r1", 1, true), ("r2", 1, true)]);
        for p in 0..20 {
            let plan = place(code, &pid(p), &nodes).expect("5 up nodes");
            must_be_valid(code, &plan, &nodes);
            assert!(region_counts(&plan, &nodes).values().all(|&n| n <= 2));
            assert!(plan.degraded);
        }
    }

    #[test]
    fn a_region_down_still_places_every_shard_on_the_survivors() {
        let code = Code::default();
        let nodes = topology(&[("r1", 2, true), ("r2", 2, true), ("r3", 2, false)]);
        let plan = place(code, &pid(3), &nodes).expect("4 up nodes are enough");
        must_be_valid(code, &plan, &nodes);
        assert_eq!(plan.shards.len(), 6);
        assert!(plan.degraded);
    }

    #[test]
    fn too_few_up_nodes_is_an_error_naming_counts() {
        let code = Code::default();
        let nodes = topology(&[("r1", 2, true), ("r2", 2, true), ("r3", 2, false)]);
        let err = place(code, &pid(1), &nodes[..2])
            .map(|_| ())
            .expect_err("2 < 3");
        assert_eq!(
            err,
            PlacementError::TooFewNodes {
                up: 2,
                needed: 3,
                code
            }
        );
        assert!(err.to_string().contains("only 2 node(s) are up"));
        let mut dup = nodes.clone();
        dup.push(nodes[0].clone());
        assert_eq!(
            place(code, &pid(1), &dup),
            Err(PlacementError::DuplicateNode { node: 1 })
        );
        assert!(matches!(
            place(Code { data: 4, parity: 0 }, &pid(1), &nodes),
            Err(PlacementError::InvalidCode(_))
        ));
    }

    #[test]
    fn deterministic_and_load_is_spread() {
        let code = Code::default();
        let nodes = topology(&[("r1", 3, true), ("r2", 3, true), ("r3", 3, true)]);
        let mut load: BTreeMap<NodeId, u32> = BTreeMap::new();
        let packs = 3000;
        for p in 0..packs {
            let plan = place(code, &pid(p), &nodes).expect("placeable");
            assert_eq!(plan, place(code, &pid(p), &nodes).expect("placeable"));
            for (_, n) in plan.shards {
                *load.entry(n).or_default() += 1;
            }
        }
        // 6 of 9 nodes per pack: 2000 shards per node on average.
        let expected = packs as f64 * 6.0 / 9.0;
        for (node, n) in load {
            let ratio = f64::from(n) / expected;
            assert!((0.85..1.15).contains(&ratio), "node {node} got {n} shards");
        }
    }

    #[test]
    fn data_shards_spread_over_regions() {
        // Indices are handed out to the least-loaded region first, so the k data
        // shards of a 4+2 pack over 3 regions are never all in two regions.
        let code = Code::default();
        let nodes = topology(&[("r1", 3, true), ("r2", 3, true), ("r3", 3, true)]);
        for p in 0..50 {
            let plan = place(code, &pid(p), &nodes).expect("placeable");
            let data_regions: BTreeSet<String> = plan.shards[..3]
                .iter()
                .map(|(_, n)| {
                    nodes
                        .iter()
                        .find(|c| c.node == *n)
                        .expect("known")
                        .region
                        .clone()
                })
                .collect();
            assert_eq!(data_regions.len(), 3);
        }
    }

    #[test]
    fn read_order_prefers_up_near_data() {
        let sp = |index, node| ShardPlacement {
            index,
            node,
            checksum: [0; 32],
        };
        let placement = vec![sp(0, 1), sp(1, 2), sp(2, 3), sp(3, 4), sp(4, 5), sp(5, 6)];
        let nodes: BTreeMap<NodeId, (String, bool)> = [
            (1, ("r1".to_string(), true)),
            (2, ("r2".to_string(), false)),
            (3, ("r3".to_string(), true)),
            (4, ("r1".to_string(), true)),
            (5, ("r2".to_string(), true)),
            // node 6 unknown: treated as down
        ]
        .into_iter()
        .collect();
        let order: Vec<u32> = read_order(&placement, &nodes, "r3", &[])
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(order, vec![2, 0, 3, 4, 1, 5]);
        let order: Vec<u32> = read_order(&placement, &nodes, "r1", &["r2".to_string()])
            .iter()
            .map(|p| p.index)
            .collect();
        assert_eq!(order, vec![0, 3, 2, 5]);
    }

    /// Random topologies: regions 1..=6, 1..=5 nodes each, each node up or down.
    fn arb_topology() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(prop::collection::vec(any::<bool>(), 1..=5), 1..=6).prop_map(
            |regions| {
                let mut out = Vec::new();
                let mut id = 100;
                for (r, nodes) in regions.iter().enumerate() {
                    for up in nodes {
                        out.push(Candidate {
                            node: id,
                            region: format!("r{r}"),
                            up: *up,
                            class: StorageClass::Hot,
                        });
                        id += 7;
                    }
                }
                out
            },
        )
    }

    fn arb_code() -> impl Strategy<Value = Code> {
        prop_oneof![
            3 => Just(Code::default()),
            1 => (1u32..=6, 1u32..=3).prop_map(|(data, parity)| Code { data, parity }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn plans_meet_the_constraints_whenever_possible(
            code in arb_code(),
            nodes in arb_topology(),
            p in any::<u64>(),
        ) {
            let up = nodes.iter().filter(|c| c.up).count();
            let plan = match place(code, &pid(p), &nodes) {
                Err(PlacementError::TooFewNodes { up: u, needed, .. }) => {
                    prop_assert_eq!(u, up);
                    prop_assert!(up < needed as usize);
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
                Ok(plan) => plan,
            };
            prop_assert!(up >= min_distinct_nodes(code) as usize);
            must_be_valid(code, &plan, &nodes);

            // Satisfiability, checked independently of the planner.
            let mut per_region: BTreeMap<&str, u32> = BTreeMap::new();
            for c in nodes.iter().filter(|c| c.up) {
                *per_region.entry(&c.region).or_default() += 1;
            }
            let satisfiable = per_region.values().map(|&n| n.min(code.parity)).sum::<u32>() >= code.total();
            prop_assert_eq!(satisfiable, healthy_possible(code, &nodes));

            let per_node_ok = node_counts(&plan).values().all(|&n| n <= 1);
            let regions = region_counts(&plan, &nodes);
            let per_region_ok = regions.values().all(|&n| n <= code.parity);
            prop_assert_eq!(plan.degraded, !(per_node_ok && per_region_ok));
            prop_assert_eq!(plan.degraded, !satisfiable);

            // The region cap holds, even degraded, whenever it is compatible
            // with the distinct-nodes floor.
            let distinct_under_cap: u32 = per_region.values().map(|&n| n.min(code.parity)).sum();
            if per_region.len() as u64 * u64::from(code.parity) >= u64::from(code.total())
                && distinct_under_cap >= min_distinct_nodes(code)
            {
                prop_assert!(per_region_ok, "region cap broken: {:?}", regions);
            }
            // Never piles up on a node beyond what the region cap forces.
            let most = node_counts(&plan).values().copied().max().unwrap_or(0);
            prop_assert!(most <= code.parity.max(code.total().div_ceil(up as u32)), "{} on one node", most);
            // With 3 regions of 2+ up nodes, 4+2 is never degraded.
            if code == Code::default() && per_region.values().filter(|&&n| n >= 2).count() >= 3 {
                prop_assert!(!plan.degraded);
            }
            // Losing any one region leaves at least k shards when not degraded.
            if !plan.degraded {
                for region in per_region.keys() {
                    let left = plan.shards.iter().filter(|(_, n)| {
                        nodes.iter().find(|c| c.node == *n).is_some_and(|c| c.region != *region)
                    }).count();
                    prop_assert!(left >= code.data as usize, "losing {} leaves {}", region, left);
                }
            }
        }

        #[test]
        fn an_unused_node_coming_or_going_leaves_the_plan_alone(
            nodes in arb_topology(),
            p in any::<u64>(),
            pick in any::<prop::sample::Index>(),
        ) {
            let code = Code::default();
            let Ok(plan) = place(code, &pid(p), &nodes) else { return Ok(()) };
            let used: BTreeSet<NodeId> = plan.shards.iter().map(|(_, n)| *n).collect();
            let unused: Vec<&Candidate> = nodes.iter().filter(|c| !used.contains(&c.node)).collect();
            if unused.is_empty() {
                return Ok(());
            }
            let gone = unused[pick.index(unused.len())].node;
            let fewer: Vec<Candidate> = nodes.iter().filter(|c| c.node != gone).cloned().collect();
            prop_assert_eq!(place(code, &pid(p), &fewer).ok(), Some(plan));
        }
    }

    /// Three regions of (2 hot, 1 cold), region-major ids: 1 2 hot, 3 cold in r1...
    fn tiered(cold_up: bool) -> Vec<Candidate> {
        let mut out = Vec::new();
        for r in 0..3u64 {
            for i in 0..3u64 {
                let cold = i == 2;
                out.push(Candidate {
                    node: r * 3 + i + 1,
                    region: format!("r{}", r + 1),
                    up: !cold || cold_up || r != 0,
                    class: if cold {
                        StorageClass::Cold
                    } else {
                        StorageClass::Hot
                    },
                });
            }
        }
        out
    }

    fn class_of(nodes: &[Candidate], node: NodeId) -> StorageClass {
        nodes
            .iter()
            .find(|c| c.node == node)
            .map(|c| c.class)
            .expect("known node")
    }

    #[test]
    fn new_packs_prefer_hot_nodes_and_cold_packs_go_to_cold_nodes_two_per_region() {
        let code = Code::default();
        let nodes = tiered(true);
        for p in 0..50 {
            let hot = place(code, &pid(p), &nodes).expect("placeable");
            assert!(!hot.degraded);
            assert!(
                hot.shards
                    .iter()
                    .all(|(_, n)| class_of(&nodes, *n) == StorageClass::Hot)
            );
            let cold =
                complete_class(code, StorageClass::Cold, &pid(p), &nodes, &[]).expect("placeable");
            assert!(
                !cold.degraded,
                "2 shards on each of 3 cold nodes is healthy"
            );
            assert!(
                cold.shards
                    .iter()
                    .all(|(_, n)| class_of(&nodes, *n) == StorageClass::Cold)
            );
            assert!(region_counts(&cold, &nodes).values().all(|&n| n == 2));
            assert!(node_counts(&cold).values().all(|&n| n == 2));
        }
    }

    #[test]
    fn a_cold_tier_that_cannot_hold_the_region_cap_falls_back_to_every_node() {
        let code = Code::default();
        // r1's cold node is down: two cold nodes in two regions hold at most 4.
        let nodes = tiered(false);
        let target = Target::of(code, StorageClass::Cold, &nodes);
        assert!(!target.in_class);
        assert_eq!(target.candidates.len(), nodes.len());
        let plan =
            complete_class(code, StorageClass::Cold, &pid(1), &nodes, &[]).expect("placeable");
        must_be_valid(code, &plan, &nodes);
        assert!(
            !plan.degraded,
            "protection first: a healthy plan over every node"
        );
        // Hot nodes down below a healthy plan: new packs use every node.
        let mut few_hot = tiered(true);
        for c in few_hot
            .iter_mut()
            .filter(|c| c.region == "r1" && c.class == StorageClass::Hot)
        {
            c.up = false;
        }
        let plan = place(code, &pid(2), &few_hot).expect("placeable");
        assert!(
            plan.shards
                .iter()
                .any(|(_, n)| class_of(&few_hot, *n) == StorageClass::Cold)
        );
        assert!(region_counts(&plan, &few_hot).values().all(|&n| n <= 2));
    }

    /// Random topologies with a random class per node.
    fn arb_classed() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(
            prop::collection::vec((any::<bool>(), any::<bool>()), 1..=5),
            1..=6,
        )
        .prop_map(|regions| {
            let mut out = Vec::new();
            let mut id = 100;
            for (r, nodes) in regions.iter().enumerate() {
                for (up, cold) in nodes {
                    out.push(Candidate {
                        node: id,
                        region: format!("r{r}"),
                        up: *up,
                        class: if *cold {
                            StorageClass::Cold
                        } else {
                            StorageClass::Hot
                        },
                    });
                    id += 7;
                }
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the classes: a pack stays in its class exactly when the
        /// class can hold it (hot: healthily; cold: ≤ m per region and per
        /// node), and a plan of either class never breaks the region cap
        /// when the whole cluster could keep it.
        #[test]
        fn class_plans_stay_in_class_only_when_protection_allows(
            code in arb_code(),
            nodes in arb_classed(),
            p in any::<u64>(),
            cold in any::<bool>(),
        ) {
            let class = if cold { StorageClass::Cold } else { StorageClass::Hot };
            let own: Vec<Candidate> = nodes.iter().filter(|c| c.class == class).cloned().collect();
            let target = Target::of(code, class, &nodes);
            let holds = if cold { region_cap_possible(code, &own) } else { healthy_possible(code, &own) };
            prop_assert_eq!(target.in_class, holds);
            let plan = match complete_class(code, class, &pid(p), &nodes, &[]) {
                Ok(plan) => plan,
                Err(PlacementError::TooFewNodes { .. }) => {
                    prop_assert!(!holds);
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            must_be_valid(code, &plan, &nodes);
            if holds {
                prop_assert!(plan.shards.iter().all(|(_, n)| class_of(&nodes, *n) == class));
                prop_assert!(region_counts(&plan, &nodes).values().all(|&n| n <= code.parity));
                prop_assert!(!plan.degraded, "in-class plans meet the class rule: {:?}", plan);
            } else if healthy_possible(code, &nodes) {
                prop_assert!(!plan.degraded);
            }
        }
    }
}
