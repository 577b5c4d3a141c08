//! The vocabulary every layer of the node shares: node ids, content ids,
//! a member's place in the map and where a shard lives. A leaf: it imports
//! nothing from the crate, so the pure modules (`erasure`, `placement`,
//! `repair::plan`) never depend on the metadata group.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a node for the lifetime of the cluster; never reused.
pub type NodeId = u64;

/// A 32-byte content id (blob id, pack id, snapshot id, tree id).
pub type Id32 = [u8; 32];

/// A member of the cluster map, carried in openraft's membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Failure domain (datacenter) this node lives in.
    pub region: String,
    /// `host:port` other nodes and clients dial.
    pub addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.region, self.addr)
    }
}

/// Where one shard of a pack lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlacement {
    /// Index of the shard in the Reed-Solomon codeword: `0..k` data, `k..k+m` parity.
    pub index: u32,
    pub node: NodeId,
    /// blake3 of the shard payload (without header).
    pub checksum: Id32,
}

/// One node as the cluster map shows it: who it is, where it lives, whether
/// it answers, whether it votes in the metadata group and whether it is being
/// drained. The one shape the gateway's status, membership and the metrics
/// page share, instead of ad-hoc tuples.
///
/// The metadata group knows `id`, `region`, `addr` and `voter`; `up` and
/// `draining` are the gateway's knowledge (liveness, drains in progress), so
/// a view built from the membership alone ([`NodeView::member`]) says
/// `up: true, draining: false` until the gateway says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    /// Failure domain (datacenter) this node lives in.
    pub region: String,
    /// `host:port` other nodes and clients dial.
    pub addr: String,
    /// Answers (not declared down).
    pub up: bool,
    /// Votes in the metadata group (otherwise a learner).
    pub voter: bool,
    /// Its shards are being moved away before it is removed.
    pub draining: bool,
}

impl NodeView {
    /// A member as the membership knows it: presumed up, not draining.
    pub fn member(id: NodeId, info: &NodeInfo, voter: bool) -> Self {
        Self {
            id,
            region: info.region.clone(),
            addr: info.addr.clone(),
            up: true,
            voter,
            draining: false,
        }
    }

    /// Its place in the map (region and address).
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            region: self.region.clone(),
            addr: self.addr.clone(),
        }
    }
}
