//! Pure membership decisions: which voters the group should have, when a
//! learner counts as caught up, and whether a request to add a node makes
//! sense against the cluster map. No I/O; unit- and property-tested.

use std::collections::{BTreeMap, BTreeSet};

use openraft::RaftMetrics;

use crate::meta::types::{NodeId, NodeInfo};
use crate::meta::voters::choose_voters;
use crate::model::NodeView;

/// A learner is caught up when the leader knows it holds the log up to at
/// most this many entries behind the leader's last entry.
pub const CATCH_UP_LAG_ENTRIES: u64 = 1000;

/// Whether the leader whose metrics these are knows `id` to be caught up.
pub(super) fn caught_up(metrics: &RaftMetrics<NodeId, NodeInfo>, id: NodeId) -> bool {
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
