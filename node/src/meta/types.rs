//! The metadata group's data model: what the Raft log carries and the state
//! machine holds. Bulk data never appears here, only ids, placement and sealed
//! records the node cannot read.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use crate::auth::Role;
pub use crate::model::{Id32, NodeId, NodeInfo, ShardPlacement, StorageClass};

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

/// The blob index of one pack as one byte string of fixed records: blob id
/// (32 bytes), offset (u64 LE), length (u32 LE); the pack id is the
/// pack's. Serialized as bytes, an index of tens of thousands of blobs (a
/// pack of small files) costs one copy in the log, on the wire to every
/// follower and in each apply, instead of per-field serde work and an
/// encoded size twice as large.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlobIndex(Vec<u8>);

impl BlobIndex {
    /// Bytes of one record.
    pub const RECORD_LEN: usize = 32 + 8 + 4;

    /// The index of `blobs`, all in one pack (their `pack_id` is not kept).
    pub fn new(blobs: &[(Id32, BlobLocation)]) -> Self {
        let mut bytes = Vec::with_capacity(blobs.len() * Self::RECORD_LEN);
        for (id, location) in blobs {
            bytes.extend_from_slice(id);
            bytes.extend_from_slice(&location.offset.to_le_bytes());
            bytes.extend_from_slice(&location.length.to_le_bytes());
        }
        Self(bytes)
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.0.len() / Self::RECORD_LEN
    }

    /// Whether it lists no blob.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The blobs with their locations in pack `pack_id`.
    pub fn locations(&self, pack_id: Id32) -> Vec<(Id32, BlobLocation)> {
        self.0
            .chunks_exact(Self::RECORD_LEN)
            .map(|record| {
                let (id, rest) = record.split_at(32);
                let (offset, length) = rest.split_at(8);
                let mut blob = [0u8; 32];
                blob.copy_from_slice(id);
                let mut off = [0u8; 8];
                off.copy_from_slice(offset);
                let mut len = [0u8; 4];
                len.copy_from_slice(length);
                (
                    blob,
                    BlobLocation {
                        pack_id,
                        offset: u64::from_le_bytes(off),
                        length: u32::from_le_bytes(len),
                    },
                )
            })
            .collect()
    }
}

impl Serialize for BlobIndex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for BlobIndex {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a blob index: records of 44 bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        let bytes = deserializer.deserialize_byte_buf(Bytes)?;
        if bytes.len() % Self::RECORD_LEN != 0 {
            return Err(serde::de::Error::custom(format!(
                "blob index of {} bytes is not a whole number of records",
                bytes.len()
            )));
        }
        Ok(Self(bytes))
    }
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
    /// Stores a bearer token's hash (`key` = `auth::token::token_key`). The
    /// record's id is derived from `key`, its times from the cluster clock
    /// when the entry applies; `ttl_ms` 0 = never expires. `AlreadyExists`
    /// for a key already stored.
    CreateToken {
        key: Id32,
        role: Role,
        tenant: Option<String>,
        ttl_ms: u64,
        label: String,
        created_by: String,
    },
    /// Marks the token with this public id revoked (`UnknownToken` if none).
    RevokeToken { id: String },
    /// The first `cluster-admin` token, from `--bootstrap-token-file`: applied
    /// only while no token was ever created (`AlreadyExists` after), so every
    /// initial node may propose the same one. Audited by itself when applied.
    BootstrapToken { at: i64, node: NodeId, key: Id32 },
    /// Adds a key slot to an initialized tenant (`UnknownTenant` if it has
    /// none, `AlreadyExists` for the same slot twice).
    AddKeySlot { tenant: String, key_slot: Vec<u8> },
    /// Removes the tenant's key slot with this id (`UnknownKeySlot`; the last
    /// slot is never removed: `LastKeySlot`).
    RemoveKeySlot { tenant: String, id: String },
    /// One audit entry on its own (refusals, membership changes, repair).
    /// `at` is stamped by the leader ([`Command::stamp`]).
    Audit {
        at: i64,
        actor: Actor,
        action: String,
        target: String,
        result: String,
    },
    /// `cmd` applied, and an audit entry recording it with its result, in the
    /// same entry (so a change is never without its record).
    Audited {
        at: i64,
        actor: Actor,
        action: String,
        target: String,
        cmd: Box<Command>,
    },
    /// `cmd` applied at cluster time `at` (stamped by the leader), for
    /// commands that record a time but are not audited (pack uploads).
    Timed { at: i64, cmd: Box<Command> },
    /// [`Command::AddPack`] that also records the pack's life: its cluster
    /// time of creation and the backup session that uploaded it (whose
    /// uncommitted packs garbage collection keeps for the grace period).
    AddPackInSession {
        pack: PackRecord,
        blobs: Vec<(Id32, BlobLocation)>,
        session: Option<SessionId>,
    },
    /// Adds a snapshot with its reference list. Refused with
    /// [`CommandResult::GcRaced`] unless the GC epoch still equals
    /// `expect_epoch` (no index entry was swept since the references were
    /// known present), with `MissingRootTree` if the root is not indexed.
    /// Records the commit time (cluster time) and catalog sequence in the
    /// snapshot's [`SnapshotLife`], and closes `session`.
    CommitSnapshotWithRefs {
        tenant: String,
        snapshot: SnapshotRecord,
        refs: Vec<RefSegment>,
        expect_epoch: u64,
        session: Option<SessionId>,
    },
    /// Removes snapshot records (and their life records). Refused with
    /// [`CommandResult::Locked`] (nothing changes) if any of them holds an
    /// unexpired lock that this command may not override: compliance
    /// always, governance unless `bypass_governance`. `UnknownSnapshot` if
    /// an id is not in the catalog.
    ForgetSnapshots {
        tenant: String,
        ids: Vec<Id32>,
        bypass_governance: bool,
    },
    /// Sets or extends a retention lock. An unexpired compliance lock can
    /// only be extended (later `until`), never shortened or turned into
    /// governance (`Locked`); `UnknownSnapshot` for an id not in the catalog.
    SetLock {
        tenant: String,
        id: Id32,
        lock: RetentionLock,
    },
    /// Removes a lock: an expired one always; an unexpired governance lock
    /// only with `bypass_governance`; an unexpired compliance lock never
    /// (`Locked`).
    RemoveLock {
        tenant: String,
        id: Id32,
        bypass_governance: bool,
    },
    /// Sets (replaces) the policy of `policy.dataset`; its times are set
    /// when the entry applies.
    SetPolicy { tenant: String, policy: Policy },
    /// Removes the dataset's policy (`UnknownPolicy` if none).
    RemovePolicy { tenant: String, dataset: String },
    /// Records when the leader last applied the dataset's policy.
    PolicyApplied { tenant: String, dataset: String },
    /// Removes these blob index entries. Refused with
    /// [`CommandResult::CatalogChanged`] unless no snapshot of any tenant
    /// was committed since catalog sequence `catalog_seq` (the one the
    /// collector marked at). Bumps the GC epoch.
    SweepBlobs {
        tenant: String,
        ids: Vec<Id32>,
        catalog_seq: u64,
    },
    /// Removes a pack record (and its life record) that no index entry
    /// points at any more. Its shards are deleted after this applies.
    DropPack { id: Id32 },
    /// Repacking: adds `new`, points every blob listed whose index entry
    /// still points into `old` at its place in `new`, and removes `old`.
    /// `UnknownPack` if `old` is gone.
    Repack {
        old: Id32,
        new: PackRecord,
        blobs: Vec<(Id32, BlobLocation)>,
    },
    /// Records `node`'s storage class (`--storage-class`), proposed by the
    /// node itself at start. Kept beside the membership, never in
    /// `NodeInfo` (which travels in openraft's membership). `hot` removes
    /// the record (no record reads as hot). `AlreadyExists` if unchanged.
    SetStorageClass { node: NodeId, class: StorageClass },
    /// Tiering's compare-and-set: applied only if the pack's placement still
    /// equals `expected` (else [`CommandResult::PlacementChanged`], nothing
    /// changes); then sets the placement like `SetPlacementIf` and the
    /// pack's class in the same entry, so a pack's class always names the
    /// tier its placement was planned for. `hot` removes the class record.
    SetPackClass {
        pack: Id32,
        class: StorageClass,
        expected: Vec<ShardPlacement>,
        shards: Vec<ShardPlacement>,
        needs_rebalance: bool,
    },
    /// One batch of a live record stream (wrap in [`Command::Timed`]: the
    /// segments record cluster time). Deduplicated by sequence against the
    /// writer's `committed_seq`: `last_seq <= committed` is
    /// [`CommandResult::StreamDuplicate`], `first_seq <= committed <
    /// last_seq` [`CommandResult::StreamOverlap`] (nothing changes either
    /// way); else the pack and its blob index are added as `AddPack` does (a
    /// pack already present is fine), the segments are numbered from the
    /// dataset's counter, and `committed_seq` becomes `last_seq`, all in one
    /// batch.
    AppendStream {
        tenant: String,
        dataset: String,
        writer: String,
        first_seq: u64,
        last_seq: u64,
        pack: PackRecord,
        blobs: Vec<(Id32, BlobLocation)>,
        segments: Vec<StreamSegment>,
    },
    /// `cmd` (a snapshot commit) that also retires stream segments of
    /// `dataset`: every one must still exist, else
    /// [`CommandResult::SegmentsChanged`] and nothing changes; they are
    /// removed (and the dataset's generation bumped) only if `cmd` returns
    /// `Ok`, in the same batch. So snapshot + remaining segments is always
    /// the whole stream, never a record twice.
    RetiringSegments {
        tenant: String,
        dataset: String,
        segments: Vec<SegmentId>,
        cmd: Box<Command>,
    },
    /// Removes the dataset's segments committed before cluster time
    /// `committed_before_ms` (policy `max-age`); bumps the generation if any
    /// went.
    DropSegments {
        tenant: String,
        dataset: String,
        committed_before_ms: i64,
    },
    /// Stores the dataset's compression dictionary (sealed by the client)
    /// unless it has one: the first writer wins, and the result names the
    /// dataset's dictionary either way ([`CommandResult::Dictionary`]).
    /// Refused with [`CommandResult::TooManyDictionaries`] when the tenant
    /// holds [`cairn_proto::DICTIONARIES_PER_TENANT_MAX`]. Dictionaries are
    /// tenant metadata: never swept by garbage collection.
    PutDictionary {
        tenant: String,
        dataset: String,
        id: Id32,
        sealed: Vec<u8>,
    },
    /// [`Command::AddPackInSession`] with its blob index as a [`BlobIndex`]
    /// (what `PutPack` commits; the older variant still applies from logs).
    AddPackIndexed {
        pack: PackRecord,
        index: BlobIndex,
        session: Option<SessionId>,
    },
}

/// One room's records of a stream batch, as the writer describes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSegment {
    /// Keyed hash of the room name: nodes never see room names.
    pub room: Id32,
    /// The sealed blob (in the batch's pack) holding the records.
    pub blob: Id32,
    pub first_ts_ms: i64,
    pub last_ts_ms: i64,
    pub records: u32,
}

/// A segment's key within its dataset: room, then the number given at
/// commit (so a room's segments list in commit order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SegmentId {
    pub room: Id32,
    pub number: u64,
}

impl SegmentId {
    /// Length of the wire form: room (32) then number (u64 big-endian).
    pub const WIRE_LEN: usize = 40;

    /// The opaque id clients see (`SegmentInfo.id`, `retire_segments`).
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::WIRE_LEN);
        out.extend_from_slice(&self.room);
        out.extend_from_slice(&self.number.to_be_bytes());
        out
    }

    /// Parses [`SegmentId::to_wire`]'s form.
    pub fn from_wire(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::WIRE_LEN {
            return None;
        }
        let room = Id32::try_from(&bytes[..32]).ok()?;
        let number = u64::from_be_bytes(<[u8; 8]>::try_from(&bytes[32..]).ok()?);
        Some(SegmentId { room, number })
    }
}

/// A committed stream segment as the metadata group keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub blob: Id32,
    pub first_ts_ms: i64,
    pub last_ts_ms: i64,
    pub records: u32,
    pub writer: String,
    /// Cluster time of the batch's commit: `max-age`'s clock.
    pub committed_unix_ms: i64,
}

/// Per-dataset stream counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamDatasetRecord {
    /// Number the next segment gets.
    pub next_segment: u64,
    /// Bumped whenever segments are retired or dropped: a listing that
    /// sees it change between pages raced a compaction and starts again.
    pub generation: u64,
}

impl Command {
    /// Sets the leader's time on a command that carries one. Called on the
    /// leader just before it proposes (forwarded commands included), so
    /// cluster time is the leader's clock, never the client's or a follower's.
    pub fn stamp(&mut self, now_unix_ms: i64) {
        match self {
            Command::BootstrapToken { at, .. }
            | Command::Audit { at, .. }
            | Command::Audited { at, .. }
            | Command::Timed { at, .. } => *at = now_unix_ms,
            _ => {}
        }
    }

    /// The time stamped on this command, if it carries one.
    pub fn stamped(&self) -> Option<i64> {
        match self {
            Command::BootstrapToken { at, .. }
            | Command::Audit { at, .. }
            | Command::Audited { at, .. }
            | Command::Timed { at, .. } => Some(*at),
            _ => None,
        }
    }
}

/// A backup session: 16 random bytes the client picks per backup.
pub type SessionId = [u8; 16];

/// One segment of a snapshot's reference list (`cairn_proto::refs`): a
/// plaintext blob of sorted blob ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefSegment {
    pub blob: Id32,
    pub first: Id32,
    pub last: Id32,
    pub count: u32,
}

/// What the lifecycle knows of a committed snapshot beyond its record.
/// Snapshots committed before reference lists existed have none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLife {
    /// Cluster time of the commit: retention's clock.
    pub committed_unix_ms: i64,
    /// Catalog sequence of the commit (1, 2, ... over all tenants).
    pub catalog_seq: u64,
    pub refs: Vec<RefSegment>,
}

/// `compliance`: nobody removes it before `until`; `governance`: only
/// cluster-admin with the bypass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMode {
    Governance,
    Compliance,
}

impl LockMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LockMode::Governance => "governance",
            LockMode::Compliance => "compliance",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "governance" | "" => Some(LockMode::Governance),
            "compliance" => Some(LockMode::Compliance),
            _ => None,
        }
    }
}

/// A retention lock on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionLock {
    pub mode: LockMode,
    /// Cluster time, Unix ms.
    pub until_unix_ms: i64,
    /// Token id that set it ("" insecure).
    pub set_by: String,
    /// Cluster time it was set (filled in when the entry applies).
    pub set_unix_ms: i64,
}

impl RetentionLock {
    /// Whether it still holds at cluster time `now`.
    pub fn holds_at(&self, now_unix_ms: i64) -> bool {
        now_unix_ms < self.until_unix_ms
    }
}

/// restic's keep rules (0 / empty: rule not given).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepRules {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    pub within_ms: u64,
    pub tags: Vec<String>,
}

impl KeepRules {
    /// No rule given: such a forget removes nothing by policy.
    pub fn is_empty(&self) -> bool {
        *self == KeepRules::default()
    }
}

/// A dataset's policy, applied by the leader on a schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub dataset: String,
    pub keep: KeepRules,
    /// Legal ceiling; 0 = none.
    pub max_age_ms: u64,
    /// Tiering (cold storage class) after this long; 0 = never.
    pub cold_after_ms: u64,
    /// Cluster times, set when the entry applies.
    pub updated_unix_ms: i64,
    pub applied_unix_ms: i64,
}

/// A pack's life: when it was created and in which backup session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackLife {
    pub created_unix_ms: i64,
    pub session: Option<SessionId>,
    /// Sum of the lengths of the blobs the pack was stored with: what the
    /// collector weighs its live bytes against (the rest of a pack is its
    /// trailer, which is never garbage).
    pub blob_bytes: u64,
    /// Made by the collector from blobs already indexed: no backup waits
    /// to commit it, so the grace period never protects it.
    pub repacked: bool,
}

/// A backup session as the metadata group sees it: open from its first
/// pack until its commit. Its packs are protected while it is open and
/// active within the grace period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub opened_unix_ms: i64,
    /// Cluster time of its latest pack.
    pub active_unix_ms: i64,
    pub closed: bool,
}

/// Who did something, as an audit entry records it (never a secret).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// `token`, `node`, `anonymous` or `insecure`.
    pub kind: String,
    pub token_id: String,
    pub role: String,
    pub tenant: String,
    pub node_id: NodeId,
}

/// A bearer token as the metadata group keeps it: no secret, only the key
/// derived from it (under which the record is stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id: hex of the key's first 8 bytes.
    pub id: String,
    pub role: Role,
    /// `None`: cluster-wide (cluster-admin, monitor).
    pub tenant: Option<String>,
    /// Cluster time, Unix ms.
    pub created_unix_ms: i64,
    /// 0 = never.
    pub expires_unix_ms: i64,
    pub revoked: bool,
    pub label: String,
    /// Token id of the creator; empty for the bootstrap token.
    pub created_by: String,
}

impl TokenRecord {
    /// Whether the token may be used at `now_unix_ms`.
    pub fn usable_at(&self, now_unix_ms: i64) -> bool {
        !self.revoked && (self.expires_unix_ms == 0 || now_unix_ms < self.expires_unix_ms)
    }
}

/// One key slot of a tenant with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlotEntry {
    /// Hex of blake3(slot)[..8].
    pub id: String,
    pub slot: Vec<u8>,
    /// Cluster time it was added; 0 = before this was recorded.
    pub created_unix_ms: i64,
}

/// One audit log entry as stored; `cairn_proto::v1::AuditEntry` on the wire,
/// whose hash ([`cairn_proto::audit::entry_hash`]) it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_unix_ms: i64,
    pub actor: Actor,
    pub action: String,
    pub target: String,
    pub result: String,
    pub prev_hash: Id32,
    pub hash: Id32,
}

impl AuditRecord {
    /// The wire form, over which the hash is computed.
    pub fn to_wire(&self) -> cairn_proto::v1::AuditEntry {
        cairn_proto::v1::AuditEntry {
            seq: self.seq,
            time_unix_ms: self.time_unix_ms,
            actor_kind: self.actor.kind.clone(),
            token_id: self.actor.token_id.clone(),
            role: self.actor.role.clone(),
            tenant: self.actor.tenant.clone(),
            node_id: self.actor.node_id,
            action: self.action.clone(),
            target: self.target.clone(),
            result: self.result.clone(),
            prev_hash: self.prev_hash.to_vec(),
            hash: self.hash.to_vec(),
        }
    }
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
    /// `RevokeToken` for an id no token has.
    UnknownToken,
    /// `AddKeySlot` or `RemoveKeySlot` on a tenant without key slots.
    UnknownTenant,
    /// `RemoveKeySlot` for an id the tenant has no slot with.
    UnknownKeySlot,
    /// `RemoveKeySlot` of the tenant's only slot: nothing could unlock it after.
    LastKeySlot,
    /// `Audited` on behalf of a token that is unknown, revoked or expired
    /// when the entry applies: `cmd` is not applied. A revocation, once
    /// committed, stops every later change made with the token, whatever
    /// node's (possibly lagging) state let the call in.
    ActorRefused,
    /// `CommitSnapshotWithRefs` whose expected GC epoch is stale: blobs may
    /// have been swept since its references were checked. Nothing changes.
    GcRaced,
    /// `SweepBlobs` after a snapshot was committed past the collector's
    /// mark: it must mark the new snapshots first. Nothing changes.
    CatalogChanged,
    /// A lock forbids it (forget, shorten, unlock). Nothing changes.
    Locked,
    /// A snapshot id not in the tenant's catalog.
    UnknownSnapshot,
    /// `RemovePolicy` for a dataset without one.
    UnknownPolicy,
    /// A `CommitSnapshot` without a reference list for a tenant whose
    /// snapshots carry them: its dedup could not be checked against the
    /// collector's sweeps, so it could reference a swept blob. Nothing changes.
    NeedsReferences,
    /// `AppendStream` whose records were all committed already (a re-send).
    /// Nothing changes.
    StreamDuplicate,
    /// `AppendStream` that starts at or below the writer's committed
    /// sequence and ends above it. Nothing changes.
    StreamOverlap,
    /// `RetiringSegments` naming a segment that is gone (another compaction
    /// or a max-age drop ran). Nothing changes.
    SegmentsChanged,
    /// `PutDictionary`: the dataset's dictionary now, and whether this
    /// command stored it (false: an earlier one stays).
    Dictionary { id: Id32, stored: bool },
    /// `PutDictionary` for a tenant that holds the most dictionaries
    /// allowed. Nothing changes.
    TooManyDictionaries,
}

impl CommandResult {
    /// How an audit entry words this result.
    pub fn audit_text(&self) -> &'static str {
        match self {
            CommandResult::Ok => "ok",
            CommandResult::AlreadyExists => "failed: already exists",
            CommandResult::UnknownPack => "failed: unknown pack",
            CommandResult::MissingRootTree => "failed: root tree not stored",
            CommandResult::PlacementChanged => "failed: placement changed",
            CommandResult::UnknownToken => "failed: unknown token",
            CommandResult::UnknownTenant => "failed: tenant not initialized",
            CommandResult::UnknownKeySlot => "failed: unknown key slot",
            CommandResult::LastKeySlot => "failed: the last key slot cannot be removed",
            CommandResult::ActorRefused => "refused: token unknown, revoked or expired",
            CommandResult::GcRaced => "failed: garbage collection swept blobs meanwhile",
            CommandResult::CatalogChanged => "failed: catalog changed meanwhile",
            CommandResult::Locked => "refused: retention lock",
            CommandResult::UnknownSnapshot => "failed: unknown snapshot",
            CommandResult::UnknownPolicy => "failed: no policy for this dataset",
            CommandResult::NeedsReferences => "refused: a reference list is required",
            CommandResult::StreamDuplicate => "failed: stream batch already committed",
            CommandResult::StreamOverlap => "failed: stream batch overlaps committed records",
            CommandResult::SegmentsChanged => "failed: stream segments changed",
            CommandResult::Dictionary { stored: true, .. } => "ok",
            CommandResult::Dictionary { stored: false, .. } => "failed: already exists",
            CommandResult::TooManyDictionaries => "refused: too many dictionaries",
        }
    }
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
