//! Which nodes vote in the metadata group. Pure: a topology in, a voter set out.
//!
//! Invariant 3 of the design ("metadata survives a region") lives here: with
//! three or more regions, no region holds a majority of the voters, so losing
//! any one region leaves a quorum. With fewer regions that is impossible and
//! the choice only spreads voters as evenly as it can.

use std::collections::{BTreeMap, BTreeSet};

use super::types::{NodeId, NodeInfo};

/// Most voters a group has: more adds commit latency without adding a
/// region-loss guarantee once three regions are covered.
pub const MAX_VOTERS: usize = 5;

/// Chooses the voters among `nodes`: the largest odd count `<= MAX_VOTERS`
/// (and `<=` the node count) for which no region holds a majority when there
/// are at least three regions. Within a count, voters are taken round-robin
/// over regions sorted by name, nodes by id, which spreads them as evenly as
/// possible (so if round-robin puts a majority in one region, every choice of
/// that size would). Deterministic: every node computes the same set.
pub fn choose_voters(nodes: &BTreeMap<NodeId, NodeInfo>) -> BTreeSet<NodeId> {
    let mut by_region: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    for (id, info) in nodes {
        // `nodes` iterates by id, so each region's list is sorted by id.
        by_region.entry(info.region.as_str()).or_default().push(*id);
    }
    let total = nodes.len().min(MAX_VOTERS);
    if total == 0 {
        return BTreeSet::new();
    }
    let mut count = if total.is_multiple_of(2) {
        total - 1
    } else {
        total
    };
    loop {
        let chosen = round_robin(&by_region, count);
        let spread_needed = by_region.len() >= 3;
        // With >= 3 regions, count 3 (one per region) always satisfies the
        // check, so the loop ends there at the latest.
        if !spread_needed || count <= 1 || max_per_region(&chosen) <= count / 2 {
            return chosen.into_iter().map(|(_, id)| id).collect();
        }
        count -= 2;
    }
}

fn round_robin<'a>(
    by_region: &BTreeMap<&'a str, Vec<NodeId>>,
    count: usize,
) -> Vec<(&'a str, NodeId)> {
    let mut chosen = Vec::with_capacity(count);
    let mut round = 0;
    while chosen.len() < count {
        let before = chosen.len();
        for (region, ids) in by_region {
            if chosen.len() == count {
                break;
            }
            if let Some(id) = ids.get(round) {
                chosen.push((*region, *id));
            }
        }
        if chosen.len() == before {
            break; // fewer nodes than `count`: cannot happen given the caller's bound
        }
        round += 1;
    }
    chosen
}

fn max_per_region(chosen: &[(&str, NodeId)]) -> usize {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (region, _) in chosen {
        *counts.entry(region).or_default() += 1;
    }
    counts.values().copied().max().unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A cluster map from `(region, node ids)`; shared with other meta tests.
    pub(crate) fn topology(spec: &[(&str, &[NodeId])]) -> BTreeMap<NodeId, NodeInfo> {
        spec.iter()
            .flat_map(|(region, ids)| {
                ids.iter().map(move |id| {
                    (
                        *id,
                        NodeInfo {
                            region: region.to_string(),
                            addr: format!("n{id}"),
                        },
                    )
                })
            })
            .collect()
    }

    fn per_region(
        nodes: &BTreeMap<NodeId, NodeInfo>,
        voters: &BTreeSet<NodeId>,
    ) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for id in voters {
            *counts.entry(nodes[id].region.clone()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn three_regions_of_two_give_two_two_one() {
        let nodes = topology(&[("r1", &[1, 2]), ("r2", &[3, 4]), ("r3", &[5, 6])]);
        let voters = choose_voters(&nodes);
        assert_eq!(voters, [1, 2, 3, 4, 5].into_iter().collect());
        let counts: Vec<usize> = per_region(&nodes, &voters).into_values().collect();
        assert_eq!(counts, vec![2, 2, 1]);
    }

    #[test]
    fn three_regions_of_one_give_one_each() {
        let nodes = topology(&[("r1", &[1]), ("r2", &[2]), ("r3", &[3])]);
        assert_eq!(choose_voters(&nodes), [1, 2, 3].into_iter().collect());
    }

    #[test]
    fn a_crowded_region_shrinks_the_group_rather_than_dominate_it() {
        let nodes = topology(&[("a", &[1]), ("b", &[2]), ("c", &[3, 4, 5, 6, 7])]);
        assert_eq!(choose_voters(&nodes), [1, 2, 3].into_iter().collect());
    }

    #[test]
    fn small_and_single_region_clusters() {
        assert!(choose_voters(&BTreeMap::new()).is_empty());
        assert_eq!(
            choose_voters(&topology(&[("r1", &[9])])),
            [9].into_iter().collect()
        );
        let two = topology(&[("r1", &[1]), ("r2", &[2])]);
        assert_eq!(
            choose_voters(&two).len(),
            1,
            "an even count is rounded down to odd"
        );
        let one_region = topology(&[("r1", &[1, 2, 3, 4, 5, 6, 7])]);
        assert_eq!(
            choose_voters(&one_region),
            [1, 2, 3, 4, 5].into_iter().collect()
        );
    }

    #[test]
    fn choice_ignores_node_insertion_order_and_addresses() {
        let a = topology(&[("r2", &[3, 4]), ("r1", &[1, 2]), ("r3", &[5])]);
        let mut b = a.clone();
        for info in b.values_mut() {
            info.addr = "elsewhere".into();
        }
        assert_eq!(choose_voters(&a), choose_voters(&b));
    }

    fn arbitrary_topology() -> impl Strategy<Value = BTreeMap<NodeId, NodeInfo>> {
        // 3..7 regions, each with 1..5 nodes; ids are unique by construction.
        proptest::collection::vec(1usize..5, 3..7).prop_map(|sizes| {
            let mut nodes = BTreeMap::new();
            let mut next_id = 1;
            for (r, size) in sizes.into_iter().enumerate() {
                for _ in 0..size {
                    nodes.insert(
                        next_id,
                        NodeInfo {
                            region: format!("region-{r}"),
                            addr: String::new(),
                        },
                    );
                    next_id += 1;
                }
            }
            nodes
        })
    }

    proptest! {
        #[test]
        fn no_region_ever_holds_a_majority(nodes in arbitrary_topology()) {
            let voters = choose_voters(&nodes);
            prop_assert!(!voters.is_empty());
            prop_assert!(voters.len() <= MAX_VOTERS);
            prop_assert_eq!(voters.len() % 2, 1, "odd voter count");
            prop_assert!(voters.iter().all(|id| nodes.contains_key(id)));
            let majority = voters.len() / 2 + 1;
            for (region, count) in per_region(&nodes, &voters) {
                prop_assert!(count < majority, "region {} holds {} of {} voters", region, count, voters.len());
            }
            // Largest possible: 5 whenever 5 voters can avoid a majority.
            let regions_with_two = {
                let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
                for info in nodes.values() { *sizes.entry(info.region.as_str()).or_default() += 1; }
                sizes.values().map(|s| (*s).min(2)).sum::<usize>()
            };
            if regions_with_two >= 5 {
                prop_assert_eq!(voters.len(), 5);
            }
        }
    }
}
