//! The metadata group's data model: what the Raft log carries and the state
//! machine holds. Bulk data never appears here, only ids, placement and sealed
//! records the node cannot read.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use crate::model::{Id32, NodeId, NodeInfo, ShardPlacement};

openraft::declare_raft_types!(
    /// openraft type configuration of the Cairn metadata group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = NodeInfo,
        SnapshotData = Cursor<Vec<u8>>,
);

/// One erasure-coded pack: its code, length and where its shards are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    pub id: Id32,
    pub tenant: String,
    pub data_shards: u32,
    pub parity_shards: u32,
    /// Length of the pack before padding and encoding.
    pub pack_len: u64,
    /// Length of every shard payload.
    pub shard_len: u64,
    /// Durable shards, at most one entry per shard index.
    pub shards: Vec<ShardPlacement>,
    /// Written while part of the cluster was unreachable: fewer than k+m
    /// shards, or more than m in one region. Repair brings it back.
    pub needs_rebalance: bool,
}

/// Where one blob lives inside a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobLocation {
    pub pack_id: Id32,
    pub offset: u64,
    pub length: u32,
}

/// One committed snapshot in the catalog. Names, paths and tags the user
/// typed live in `sealed_info`, encrypted by the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: Id32,
    pub dataset: String,
    pub parent: Option<Id32>,
    pub time_unix_ms: i64,
    /// `full`, `incremental` or `differential`.
    pub kind: String,
    /// Blob id of the root tree.
    pub root_tree: Id32,
    pub sealed_info: Vec<u8>,
    pub files: u64,
    pub bytes: u64,
    pub bytes_added: u64,
    /// Operator tags (plaintext: they label snapshots for retention and drills).
    pub tags: Vec<String>,
}

/// A state-machine command: the only way metadata changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Stores the tenant's first key slot; refused if the tenant has one.
    InitTenant { tenant: String, key_slot: Vec<u8> },
    /// Records a durable pack and the blobs it holds. Idempotent: a pack
    /// already present is left as is (its blobs are already indexed).
    AddPack {
        pack: PackRecord,
        blobs: Vec<(Id32, BlobLocation)>,
    },
    /// Replaces the shard placement of a pack (repair and rebalance).
    SetPlacement {
        pack_id: Id32,
        shards: Vec<ShardPlacement>,
        needs_rebalance: bool,
    },
    /// Adds a snapshot to the catalog. Refused if the root tree is not indexed.
    CommitSnapshot {
        tenant: String,
        snapshot: SnapshotRecord,
    },
    // Variants below were added after the first release: only ever append
    // (postcard encodes the variant index), never reorder or remove.
    /// Records that `node` was removed from the group on purpose, so the
    /// initial-member adder never re-adds it on its own. `AlreadyExists` if marked.
    MarkRemoved { node: NodeId },
    /// An explicit add of `node` is starting: clears its `removed` and
    /// `holds_log` marks (a new incarnation holds nothing yet).
    /// `AlreadyExists` if neither was set.
    MarkAdded { node: NodeId },
    /// `node` has acknowledged log entries as a member: from now on, the same
    /// id starting with an empty store is a wiped disk, not a first start.
    /// `AlreadyExists` if marked.
    MarkHoldsLog { node: NodeId },
    /// Compare-and-set of a pack's placement (repair and rebalance): applied
    /// only if the stored placement still equals `expected`, else refused
    /// with [`CommandResult::PlacementChanged`] and nothing changes. Two
    /// repair passes racing on one pack can then never both win, so the
    /// loser's placement never overwrites shards the winner relies on.
    /// `SetPlacement` stays for log replay of entries written before it.
    SetPlacementIf {
        pack_id: Id32,
        expected: Vec<ShardPlacement>,
        shards: Vec<ShardPlacement>,
        needs_rebalance: bool,
    },
}

/// What the metadata group records about a node beyond the Raft membership.
/// A node without a record has every flag cleared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMark {
    /// Removed on purpose ([`Command::MarkRemoved`]); cleared by an explicit add.
    pub removed: bool,
    /// Has acknowledged log entries as a member ([`Command::MarkHoldsLog`]).
    pub holds_log: bool,
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Applied (also for a membership or blank entry).
    Ok,
    /// `InitTenant` for a tenant that already has a key slot; `AddPack` for a
    /// pack already stored; `CommitSnapshot` for a snapshot id already in the
    /// catalog (a retried commit); a node mark already in the asked state.
    /// Nothing changes.
    AlreadyExists,
    /// `SetPlacement` for an unknown pack.
    UnknownPack,
    /// `CommitSnapshot` whose root tree blob is not in the index.
    MissingRootTree,
    // Appended: postcard encodes the variant index.
    /// `SetPlacementIf` whose expected placement no longer matches the
    /// stored one: another writer changed it first. Nothing changes.
    PlacementChanged,
}

/// Counts kept by the state machine for status pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaStats {
    pub tenants: u64,
    pub packs: u64,
    pub packs_needing_rebalance: u64,
    pub blobs: u64,
    pub snapshots: u64,
}
