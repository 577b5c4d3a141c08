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

/// The storage tier of a node (`--storage-class`) or of a pack (where its
/// shards should live). postcard encodes the variant index (only ever
/// append); the config file spells the lowercase names.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum StorageClass {
    /// Fast disks: new packs and everything a young snapshot references.
    #[default]
    Hot,
    /// Cheap, slower disks: packs only old snapshots reference.
    Cold,
}

impl StorageClass {
    pub const ALL: [StorageClass; 2] = [StorageClass::Hot, StorageClass::Cold];

    pub fn as_str(self) -> &'static str {
        match self {
            StorageClass::Hot => "hot",
            StorageClass::Cold => "cold",
        }
    }
}

impl fmt::Display for StorageClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A storage class name that is neither `hot` nor `cold`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("storage class {0:?} is not one of hot, cold")]
pub struct UnknownStorageClass(pub String);

impl std::str::FromStr for StorageClass {
    type Err = UnknownStorageClass;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "hot" => Ok(StorageClass::Hot),
            "cold" => Ok(StorageClass::Cold),
            _ => Err(UnknownStorageClass(text.to_string())),
        }
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
    /// Its storage tier, from the metadata group (`hot` without a record).
    pub storage_class: StorageClass,
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
            storage_class: StorageClass::Hot,
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
