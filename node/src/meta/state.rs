//! The metadata state: its key layout in a [`KvStore`], how one [`Command`]
//! changes it, and the reads the node serves from it.
//!
//! Owns the byte layout of the state tree (a versioned on-disk format) and the
//! business rules of every command. It must not know about openraft's
//! storage traits or the network: `state_machine.rs` adapts it to openraft,
//! `mod.rs` exposes its reads.
//!
//! Layout (every value is `codec::encode`d; `T` = tenant as u32-BE length + bytes):
//! ```text
//! 00 "format"           -> FORMAT_MAGIC                 (written when the tree is created)
//! 00 "applied"          -> Option<LogId>                (last applied entry)
//! 00 "membership"       -> StoredMembership             (last applied membership)
//! 00 "stats"            -> MetaStats
//! 01 "meta" / 01 "data" -> the current Raft snapshot    (not part of snapshots themselves)
//! 'k' T slot:u32-BE     -> key slot bytes
//! 'p' pack:32           -> PackRecord
//! 'b' T blob:32         -> BlobLocation
//! 's' T snapshot:32     -> SnapshotRecord
//! 'n' node:u64-BE       -> NodeMark                     (absent = every flag cleared)
//! 00 "clock"            -> i64                          (cluster time: latest leader stamp applied)
//! 00 "audit_head"       -> (u64, [u8; 32])              (seq and hash of the newest audit entry)
//! 'K' T slot:u32-BE     -> i64                          (when key slot `slot` was added, cluster time)
//! 't' key:32            -> TokenRecord                  (key = blake3 derive_key of the secret)
//! 'a' seq:u64-BE        -> AuditRecord
//! 00 "gc_epoch"         -> u64                          (bumped by every SweepBlobs)
//! 00 "catalog_seq"      -> u64                          (bumped by every snapshot commit)
//! 'S' T snapshot:32     -> SnapshotLife                 (commit time, catalog seq, reference list)
//! 'L' T snapshot:32     -> RetentionLock
//! 'y' T dataset         -> Policy
//! 'c' pack:32           -> PackLife                     (creation time and session)
//! 'w' session:16        -> SessionRecord
//! 'N' node:u64-BE       -> StorageClass                 (absent = hot)
//! 'T' pack:32           -> StorageClass                 (absent = hot; removed with the pack)
//! 'g' T D room:32 n:u64-BE -> SegmentRecord             (D = dataset, length-prefixed like T)
//! 'r' T blob:32 D room:32 n:u64-BE -> ()                (the live segments holding a blob)
//! 'W' T D writer        -> u64                          (the writer's committed sequence)
//! 'G' T D               -> StreamDatasetRecord          (segment counter, generation)
//! 00 "stream_segments"  -> u64                          (live segments, all tenants)
//! ```
//! Lifecycle records (from `S` on) are applied by `gc_state.rs` (packs,
//! sessions, references, sweeps) and `lifecycle_state.rs` (forget, locks,
//! policies); storage classes by `tier_state.rs`; live record streams by
//! `stream_state.rs`.
//! The `'n'` records came after the first release; older states simply have
//! none, which reads as "no marks", so the layout marker did not change.
//! Invariants: an entry's effects, `applied` and `stats` are written in one
//! batch, so the stored state is always exactly "every entry up to `applied`";
//! `stats` always equals the counts of the records it describes.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::codec::{self, CodecError};
use super::types::{
    Actor, AuditRecord, BlobLocation, Command, CommandResult, Id32, KeySlotEntry, MetaStats,
    NodeId, NodeInfo, NodeMark, PackRecord, Role, SnapshotRecord, TokenRecord,
};
use crate::kv::{KvError, KvPair, KvStore, WriteBatch};

/// Marker stored under [`FORMAT_KEY`]: names the layout and its version.
pub const FORMAT_MAGIC: &[u8] = b"cairn-meta-state/1";

/// Key of the layout marker.
pub const FORMAT_KEY: &[u8] = b"\x00format";
/// Key of the last applied log id.
pub const APPLIED_KEY: &[u8] = b"\x00applied";
/// Key of the last applied membership.
pub const MEMBERSHIP_KEY: &[u8] = b"\x00membership";
/// Key of the counters.
pub const STATS_KEY: &[u8] = b"\x00stats";
/// Prefix of the current snapshot's keys, excluded from snapshot images.
pub const SNAPSHOT_PREFIX: &[u8] = b"\x01";
/// Key of the current snapshot's metadata.
pub const SNAPSHOT_META_KEY: &[u8] = b"\x01meta";
/// Key of the current snapshot's image.
pub const SNAPSHOT_DATA_KEY: &[u8] = b"\x01data";

const KEY_SLOT: u8 = b'k';
pub(super) const PACK: u8 = b'p';
pub(super) const BLOB: u8 = b'b';
const SNAPSHOT: u8 = b's';
const NODE_MARK: u8 = b'n';
const KEY_SLOT_CREATED: u8 = b'K';
const TOKEN: u8 = b't';
const AUDIT: u8 = b'a';
pub(super) const SNAPSHOT_LIFE: u8 = b'S';
pub(super) const LOCK: u8 = b'L';
pub(super) const POLICY: u8 = b'y';
pub(super) const PACK_LIFE: u8 = b'c';
pub(super) const SESSION: u8 = b'w';
/// Key of the GC epoch (bumped by every sweep of index entries).
pub const GC_EPOCH_KEY: &[u8] = b"\x00gc_epoch";
/// Key of the catalog sequence (bumped by every snapshot commit).
pub const CATALOG_SEQ_KEY: &[u8] = b"\x00catalog_seq";
/// Key of the cluster clock (the latest leader stamp applied).
pub const CLOCK_KEY: &[u8] = b"\x00clock";
/// Key of the audit chain's head: seq and hash of the newest entry.
pub const AUDIT_HEAD_KEY: &[u8] = b"\x00audit_head";

/// Last applied log id as stored.
pub type AppliedLogId = Option<openraft::LogId<NodeId>>;
/// Last applied membership as stored.
pub type AppliedMembership = openraft::StoredMembership<NodeId, NodeInfo>;

/// Why the state could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("metadata state storage: {0}")]
    Kv(#[from] KvError),
    #[error("metadata state record: {0}")]
    Codec(#[from] CodecError),
    /// The tree holds data in another layout (another program, or a newer Cairn).
    #[error("metadata state has format {found:?}, expected {FORMAT_MAGIC:?}; refusing to touch it")]
    Format { found: String },
    /// A node mark stored under a key that does not hold a node id.
    #[error(
        "node mark key {key:02x?} does not end in an 8-byte node id: the metadata state is corrupt; restore it from a peer"
    )]
    NodeMarkKey { key: Vec<u8> },
    /// A snapshot image that is not one (wrong magic).
    #[error("snapshot image has magic {found:?}, expected {SNAPSHOT_MAGIC:?}")]
    SnapshotMagic { found: [u8; 8] },
}

/// Magic at the start of every snapshot image.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"CAIRNSM1";

/// A whole-state image, the content of a Raft snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotImage {
    pub magic: [u8; 8],
    /// Every pair of the state tree outside [`SNAPSHOT_PREFIX`], in key order.
    pub pairs: Vec<KvPair>,
}

impl SnapshotImage {
    /// Encodes the image (magic inside, codec version byte in front).
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        Ok(codec::encode("snapshot image", self)?)
    }

    /// Decodes and checks an image.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let image: Self = codec::decode("snapshot image", bytes)?;
        if image.magic != SNAPSHOT_MAGIC {
            return Err(StateError::SnapshotMagic { found: image.magic });
        }
        Ok(image)
    }
}

pub(super) fn tenant_prefix(kind: u8, tenant: &str) -> Vec<u8> {
    // Length-prefixed so that tenant "a" never prefixes tenant "ab".
    let len = u32::try_from(tenant.len()).unwrap_or(u32::MAX);
    let mut key = Vec::with_capacity(5 + tenant.len() + 32);
    key.push(kind);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(tenant.as_bytes());
    key
}

fn key_slot_key(tenant: &str, slot: u32) -> Vec<u8> {
    let mut key = tenant_prefix(KEY_SLOT, tenant);
    key.extend_from_slice(&slot.to_be_bytes());
    key
}

fn key_slot_created_key(tenant: &str, slot: u32) -> Vec<u8> {
    let mut key = tenant_prefix(KEY_SLOT_CREATED, tenant);
    key.extend_from_slice(&slot.to_be_bytes());
    key
}

fn token_key(key: &Id32) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(TOKEN);
    k.extend_from_slice(key);
    k
}

/// Key of audit entry `seq`.
pub fn audit_key(seq: u64) -> [u8; 9] {
    let mut key = [AUDIT; 9];
    key[1..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The public id of a key slot: hex of blake3(slot)[..8].
pub fn key_slot_id(slot: &[u8]) -> String {
    hex::encode(&blake3::hash(slot).as_bytes()[..8])
}

/// The public id of a token: hex of its key's first 8 bytes.
pub fn token_id(key: &Id32) -> String {
    hex::encode(&key[..8])
}

pub(super) fn pack_key(id: &Id32) -> Vec<u8> {
    let mut key = Vec::with_capacity(33);
    key.push(PACK);
    key.extend_from_slice(id);
    key
}

pub(super) fn blob_key(tenant: &str, id: &Id32) -> Vec<u8> {
    let mut key = tenant_prefix(BLOB, tenant);
    key.extend_from_slice(id);
    key
}

fn node_mark_key(node: NodeId) -> [u8; 9] {
    let mut key = [NODE_MARK; 9];
    key[1..].copy_from_slice(&node.to_be_bytes());
    key
}

pub(super) fn snapshot_key(tenant: &str, id: &Id32) -> Vec<u8> {
    let mut key = tenant_prefix(SNAPSHOT, tenant);
    key.extend_from_slice(id);
    key
}

/// Key of a snapshot's [`SnapshotLife`](super::types::SnapshotLife).
pub(super) fn snapshot_life_key(tenant: &str, id: &Id32) -> Vec<u8> {
    let mut key = tenant_prefix(SNAPSHOT_LIFE, tenant);
    key.extend_from_slice(id);
    key
}

/// Key of a snapshot's retention lock.
pub(super) fn lock_key(tenant: &str, id: &Id32) -> Vec<u8> {
    let mut key = tenant_prefix(LOCK, tenant);
    key.extend_from_slice(id);
    key
}

/// Key of a dataset's policy.
pub(super) fn policy_key(tenant: &str, dataset: &str) -> Vec<u8> {
    let mut key = tenant_prefix(POLICY, tenant);
    key.extend_from_slice(dataset.as_bytes());
    key
}

/// Key of a pack's [`PackLife`](super::types::PackLife).
pub(super) fn pack_life_key(id: &Id32) -> Vec<u8> {
    let mut key = Vec::with_capacity(33);
    key.push(PACK_LIFE);
    key.extend_from_slice(id);
    key
}

/// Key of a backup session's record.
pub(super) fn session_key(id: &super::types::SessionId) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    key.push(SESSION);
    key.extend_from_slice(id);
    key
}

/// Read access to the state, shared by the state machine and the node's reads.
#[derive(Clone)]
pub struct StateView {
    kv: Arc<dyn KvStore>,
}

impl StateView {
    /// Wraps `kv`, writing the layout marker into an empty tree and refusing a foreign one.
    pub fn open(kv: Arc<dyn KvStore>) -> Result<Self, StateError> {
        match kv.get(FORMAT_KEY)? {
            Some(found) if found == FORMAT_MAGIC => {}
            Some(found) => {
                return Err(StateError::Format {
                    found: String::from_utf8_lossy(&found).into_owned(),
                });
            }
            None if kv.last_with_prefix(b"")?.is_none() => kv.put(FORMAT_KEY, FORMAT_MAGIC)?,
            None => {
                return Err(StateError::Format {
                    found: "(no marker in a non-empty tree)".into(),
                });
            }
        }
        Ok(Self { kv })
    }

    /// The underlying store.
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    pub(super) fn get<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        key: &[u8],
    ) -> Result<Option<T>, StateError> {
        match self.kv.get(key)? {
            Some(bytes) => Ok(Some(codec::decode(what, &bytes)?)),
            None => Ok(None),
        }
    }

    pub(super) fn scan<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        prefix: &[u8],
    ) -> Result<Vec<T>, StateError> {
        self.kv
            .scan_prefix(prefix)?
            .into_iter()
            .map(|(_, v)| codec::decode(what, &v).map_err(StateError::from))
            .collect()
    }

    /// Decodes `pairs` whose keys are `prefix` + a 32-byte id into
    /// `(id, record)`; keys of another length are skipped.
    pub(super) fn decode_by_id<T: serde::de::DeserializeOwned, C: FromIterator<(Id32, T)>>(
        what: &'static str,
        prefix: &[u8],
        pairs: Vec<KvPair>,
    ) -> Result<C, StateError> {
        pairs
            .into_iter()
            .filter_map(|(key, value)| {
                let id = key
                    .get(prefix.len()..)
                    .and_then(|b| Id32::try_from(b).ok())?;
                Some(
                    codec::decode(what, &value)
                        .map(|record| (id, record))
                        .map_err(StateError::from),
                )
            })
            .collect()
    }

    /// Last applied log id and membership.
    pub fn applied_state(&self) -> Result<(AppliedLogId, AppliedMembership), StateError> {
        let applied = self
            .get::<AppliedLogId>("applied log id", APPLIED_KEY)?
            .flatten();
        let membership = self.get("membership", MEMBERSHIP_KEY)?.unwrap_or_default();
        Ok((applied, membership))
    }

    /// The counters (zero for an empty state).
    pub fn stats(&self) -> Result<MetaStats, StateError> {
        Ok(self.get("stats", STATS_KEY)?.unwrap_or_default())
    }

    /// The tenant's key slots in slot order (empty if the tenant is unknown).
    pub fn key_slots(&self, tenant: &str) -> Result<Vec<Vec<u8>>, StateError> {
        self.scan("key slot", &tenant_prefix(KEY_SLOT, tenant))
    }

    /// For each id, whether the tenant's blob index has it.
    pub fn find_blobs(&self, tenant: &str, ids: &[Id32]) -> Result<Vec<bool>, StateError> {
        // Looked up in id order, so the index pages stay warm from one
        // look-up to the next; answered in the order asked.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_unstable_by_key(|&i| ids[i]);
        let mut found = vec![false; ids.len()];
        for i in order {
            found[i] = self.kv.get(&blob_key(tenant, &ids[i]))?.is_some();
        }
        Ok(found)
    }

    /// Where the tenant's blob is stored.
    pub fn locate_blob(&self, tenant: &str, id: &Id32) -> Result<Option<BlobLocation>, StateError> {
        self.get("blob location", &blob_key(tenant, id))
    }

    /// One pack record.
    pub fn pack(&self, id: &Id32) -> Result<Option<PackRecord>, StateError> {
        self.get("pack record", &pack_key(id))
    }

    /// Every pack record, by id.
    pub fn packs(&self) -> Result<Vec<PackRecord>, StateError> {
        self.scan("pack record", &[PACK])
    }

    /// The tenant's snapshots (of one dataset, if given), oldest first:
    /// by commit time (cluster time, from the snapshot's life record; the
    /// client's `time_unix_ms` for snapshots committed before those
    /// existed), then id for equal times.
    pub fn snapshots(
        &self,
        tenant: &str,
        dataset: Option<&str>,
    ) -> Result<Vec<SnapshotRecord>, StateError> {
        let mut records: Vec<SnapshotRecord> =
            self.scan("snapshot record", &tenant_prefix(SNAPSHOT, tenant))?;
        if let Some(dataset) = dataset {
            records.retain(|r| r.dataset == dataset);
        }
        let mut keyed = Vec::with_capacity(records.len());
        for record in records {
            let at = self
                .snapshot_life(tenant, &record.id)?
                .map_or(record.time_unix_ms, |life| life.committed_unix_ms);
            keyed.push((at, record));
        }
        keyed.sort_by_key(|(at, r)| (*at, r.id));
        Ok(keyed.into_iter().map(|(_, r)| r).collect())
    }

    /// The marks of one node (every flag cleared if it has no record).
    pub fn node_mark(&self, node: NodeId) -> Result<NodeMark, StateError> {
        Ok(self
            .get("node mark", &node_mark_key(node))?
            .unwrap_or_default())
    }

    /// Every node with at least one mark set, by id.
    pub fn node_marks(&self) -> Result<std::collections::BTreeMap<NodeId, NodeMark>, StateError> {
        self.kv
            .scan_prefix(&[NODE_MARK])?
            .into_iter()
            .map(|(key, value)| {
                let id = key
                    .get(1..9)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(NodeId::from_be_bytes)
                    .ok_or_else(|| StateError::NodeMarkKey { key: key.clone() })?;
                Ok((id, codec::decode("node mark", &value)?))
            })
            .collect()
    }

    /// The tenant's key slots with their ids and times, in slot order.
    pub fn key_slot_entries(&self, tenant: &str) -> Result<Vec<KeySlotEntry>, StateError> {
        self.indexed_key_slots(tenant)?
            .into_iter()
            .map(|(index, slot)| {
                let created_unix_ms = self
                    .get::<i64>("key slot time", &key_slot_created_key(tenant, index))?
                    .unwrap_or(0);
                Ok::<_, StateError>(KeySlotEntry {
                    id: key_slot_id(&slot),
                    slot,
                    created_unix_ms,
                })
            })
            .collect()
    }

    /// The tenant's key slots with their index in the key.
    fn indexed_key_slots(&self, tenant: &str) -> Result<Vec<(u32, Vec<u8>)>, StateError> {
        let prefix = tenant_prefix(KEY_SLOT, tenant);
        self.kv
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|(key, value)| {
                let index = key
                    .get(prefix.len()..)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_be_bytes)
                    .unwrap_or(u32::MAX);
                Ok((index, codec::decode("key slot", &value)?))
            })
            .collect()
    }

    /// The token stored under `key` (the hash of its secret).
    pub fn token(&self, key: &Id32) -> Result<Option<TokenRecord>, StateError> {
        self.get("token record", &token_key(key))
    }

    /// Every token (revoked and expired ones too), by key.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        self.scan("token record", &[TOKEN])
    }

    /// Cluster time: the latest leader stamp applied (0 before any).
    pub fn clock(&self) -> Result<i64, StateError> {
        Ok(self.get("cluster clock", CLOCK_KEY)?.unwrap_or(0))
    }

    /// Seq and hash of the newest audit entry (0 and the genesis hash before any).
    pub fn audit_head(&self) -> Result<(u64, Id32), StateError> {
        Ok(self
            .get("audit head", AUDIT_HEAD_KEY)?
            .unwrap_or((0, cairn_proto::audit::GENESIS)))
    }

    /// Up to `limit` audit entries with seq greater than `after_seq`, oldest first.
    pub fn audit_entries(
        &self,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StateError> {
        let start = audit_key(after_seq.saturating_add(1));
        let end = [AUDIT + 1];
        if after_seq == u64::MAX {
            return Ok(Vec::new());
        }
        self.kv
            .range(&start, Some(&end), limit)?
            .into_iter()
            .map(|(_, v)| codec::decode("audit entry", &v).map_err(StateError::from))
            .collect()
    }

    /// Every pair that belongs in a snapshot image, in key order.
    pub fn image_pairs(&self) -> Result<Vec<KvPair>, StateError> {
        let mut pairs = self.kv.scan_prefix(b"")?;
        pairs.retain(|(k, _)| !k.starts_with(SNAPSHOT_PREFIX));
        Ok(pairs)
    }
}

/// Last applied log id and membership recorded in `pairs` (sorted by key, as
/// scans and snapshot images are).
pub fn applied_state_in(pairs: &[KvPair]) -> Result<(AppliedLogId, AppliedMembership), StateError> {
    let find = |key: &[u8]| {
        pairs
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| &pairs[i].1)
    };
    let applied = match find(APPLIED_KEY) {
        Some(bytes) => codec::decode::<AppliedLogId>("applied log id", bytes)?,
        None => None,
    };
    let membership = match find(MEMBERSHIP_KEY) {
        Some(bytes) => codec::decode("membership", bytes)?,
        None => AppliedMembership::default(),
    };
    Ok((applied, membership))
}

/// Queues the effects of `cmd` into `batch`, updating `stats`, and returns
/// the command's result. Reads the current state through `view`; nothing is
/// written unless the caller applies the batch. A refused command queues nothing.
pub fn apply_command(
    view: &StateView,
    cmd: &Command,
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    let now = advance_clock(view, cmd.stamped(), batch)?;
    apply_at(view, cmd, now, batch, stats)
}

/// Cluster time for an entry stamped `stamp`: never earlier than any entry
/// applied before it (a new leader's clock may lag the old one's), so times
/// in the state only move forward. The one place this rule lives.
fn advance_clock(
    view: &StateView,
    stamp: Option<i64>,
    batch: &mut WriteBatch,
) -> Result<i64, StateError> {
    let last = view.clock()?;
    let now = stamp.map_or(last, |stamp| stamp.max(last));
    if now != last {
        batch.put(CLOCK_KEY.to_vec(), codec::encode("cluster clock", &now)?);
    }
    Ok(now)
}

/// Appends one audit entry, chained to the stored head. At most one per
/// log entry: the head is read from the state, not from `batch`.
fn append_audit(
    view: &StateView,
    batch: &mut WriteBatch,
    now: i64,
    actor: &Actor,
    action: &str,
    target: &str,
    result: &str,
) -> Result<(), StateError> {
    let (seq, prev_hash) = view.audit_head()?;
    let mut record = AuditRecord {
        seq: seq + 1,
        time_unix_ms: now,
        actor: actor.clone(),
        action: action.to_string(),
        target: target.to_string(),
        result: result.to_string(),
        prev_hash,
        hash: [0; 32],
    };
    record.hash = cairn_proto::audit::entry_hash(&record.to_wire());
    batch.put(
        audit_key(record.seq).to_vec(),
        codec::encode("audit entry", &record)?,
    );
    batch.put(
        AUDIT_HEAD_KEY.to_vec(),
        codec::encode("audit head", &(record.seq, record.hash))?,
    );
    Ok(())
}

fn put_token(batch: &mut WriteBatch, key: &Id32, record: &TokenRecord) -> Result<(), StateError> {
    batch.put(token_key(key), codec::encode("token record", record)?);
    Ok(())
}

/// Whether the token with public id `id` exists, is unrevoked and unexpired
/// at cluster time `now`.
fn token_usable(view: &StateView, id: &str, now: i64) -> Result<bool, StateError> {
    Ok(view
        .tokens()?
        .iter()
        .any(|t| t.id == id && t.usable_at(now)))
}

pub(super) fn apply_at(
    view: &StateView,
    cmd: &Command,
    now: i64,
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    match cmd {
        Command::InitTenant { tenant, key_slot } => {
            if !view
                .kv
                .scan_prefix(&tenant_prefix(KEY_SLOT, tenant))?
                .is_empty()
            {
                return Ok(CommandResult::AlreadyExists);
            }
            batch.put(
                key_slot_key(tenant, 0),
                codec::encode("key slot", key_slot)?,
            );
            batch.put(
                key_slot_created_key(tenant, 0),
                codec::encode("key slot time", &now)?,
            );
            stats.tenants += 1;
            Ok(CommandResult::Ok)
        }
        Command::AddPack { pack, blobs } => add_pack(view, pack, blobs, batch, stats),
        Command::SetPlacement {
            pack_id,
            shards,
            needs_rebalance,
        }
        | Command::SetPlacementIf {
            pack_id,
            shards,
            needs_rebalance,
            ..
        } => {
            let Some(mut pack) = view.pack(pack_id)? else {
                return Ok(CommandResult::UnknownPack);
            };
            if let Command::SetPlacementIf { expected, .. } = cmd
                && pack.shards != *expected
            {
                return Ok(CommandResult::PlacementChanged);
            }
            match (pack.needs_rebalance, *needs_rebalance) {
                (false, true) => stats.packs_needing_rebalance += 1,
                (true, false) => {
                    stats.packs_needing_rebalance = stats.packs_needing_rebalance.saturating_sub(1)
                }
                _ => {}
            }
            pack.shards = shards.clone();
            pack.needs_rebalance = *needs_rebalance;
            batch.put(pack_key(pack_id), codec::encode("pack record", &pack)?);
            Ok(CommandResult::Ok)
        }
        Command::CommitSnapshot { tenant, snapshot } => {
            // Once a tenant's snapshots carry reference lists, the collector
            // works on it; a commit without one (an older client) carries no
            // GC epoch either, and could reference a blob swept during its
            // backup. Only tenants that never used reference lists take it.
            let lives = tenant_prefix(SNAPSHOT_LIFE, tenant);
            let mut end = lives.clone();
            end.extend_from_slice(&[0xff; 33]);
            if !view.kv.range(&lives, Some(&end), 1)?.is_empty() {
                return Ok(CommandResult::NeedsReferences);
            }
            if view
                .kv
                .get(&blob_key(tenant, &snapshot.root_tree))?
                .is_none()
            {
                return Ok(CommandResult::MissingRootTree);
            }
            let key = snapshot_key(tenant, &snapshot.id);
            // Snapshot ids are content hashes: the same id twice is a retried
            // commit, which must not count twice.
            if view.kv.get(&key)?.is_some() {
                return Ok(CommandResult::AlreadyExists);
            }
            batch.put(key, codec::encode("snapshot record", snapshot)?);
            // Every commit moves the catalog sequence, so a collector that
            // marked before it must look again (it then finds a snapshot
            // without references and leaves the tenant alone).
            let seq = view.catalog_seq()?.saturating_add(1);
            batch.put(
                CATALOG_SEQ_KEY.to_vec(),
                codec::encode("catalog seq", &seq)?,
            );
            stats.snapshots += 1;
            Ok(CommandResult::Ok)
        }
        Command::MarkRemoved { node } => {
            update_mark(view, *node, batch, |mark| mark.removed = true)
        }
        Command::MarkAdded { node } => update_mark(view, *node, batch, |mark| {
            mark.removed = false;
            mark.holds_log = false;
        }),
        Command::MarkHoldsLog { node } => {
            update_mark(view, *node, batch, |mark| mark.holds_log = true)
        }
        Command::CreateToken {
            key,
            role,
            tenant,
            ttl_ms,
            label,
            created_by,
        } => {
            if view.token(key)?.is_some() {
                return Ok(CommandResult::AlreadyExists);
            }
            let expires_unix_ms = match i64::try_from(*ttl_ms) {
                Ok(0) => 0,
                Ok(ttl) => now.saturating_add(ttl),
                Err(_) => i64::MAX,
            };
            let record = TokenRecord {
                id: token_id(key),
                role: *role,
                tenant: tenant.clone(),
                created_unix_ms: now,
                expires_unix_ms,
                revoked: false,
                label: label.clone(),
                created_by: created_by.clone(),
            };
            put_token(batch, key, &record)?;
            Ok(CommandResult::Ok)
        }
        Command::RevokeToken { id } => {
            for (key, value) in view.kv.scan_prefix(&[TOKEN])? {
                let mut record: TokenRecord = codec::decode("token record", &value)?;
                if record.id != *id {
                    continue;
                }
                if record.revoked {
                    return Ok(CommandResult::AlreadyExists);
                }
                record.revoked = true;
                batch.put(key, codec::encode("token record", &record)?);
                return Ok(CommandResult::Ok);
            }
            Ok(CommandResult::UnknownToken)
        }
        Command::BootstrapToken { node, key, .. } => {
            // Tokens are revoked, never deleted: any record means one was
            // created, and the bootstrap file no longer counts.
            if !view.kv.range(&[TOKEN], Some(&[TOKEN + 1]), 1)?.is_empty() {
                return Ok(CommandResult::AlreadyExists);
            }
            let record = TokenRecord {
                id: token_id(key),
                role: Role::ClusterAdmin,
                tenant: None,
                created_unix_ms: now,
                expires_unix_ms: 0,
                revoked: false,
                label: "bootstrap".into(),
                created_by: String::new(),
            };
            put_token(batch, key, &record)?;
            let actor = Actor {
                kind: "node".into(),
                node_id: *node,
                ..Actor::default()
            };
            append_audit(
                view,
                batch,
                now,
                &actor,
                "BootstrapToken",
                &format!("token {}", record.id),
                "ok",
            )?;
            Ok(CommandResult::Ok)
        }
        Command::AddKeySlot { tenant, key_slot } => {
            let slots = view.indexed_key_slots(tenant)?;
            if slots.is_empty() {
                return Ok(CommandResult::UnknownTenant);
            }
            if slots.iter().any(|(_, slot)| slot == key_slot) {
                return Ok(CommandResult::AlreadyExists);
            }
            let next = slots
                .iter()
                .map(|(index, _)| *index)
                .max()
                .unwrap_or(0)
                .saturating_add(1);
            batch.put(
                key_slot_key(tenant, next),
                codec::encode("key slot", key_slot)?,
            );
            batch.put(
                key_slot_created_key(tenant, next),
                codec::encode("key slot time", &now)?,
            );
            Ok(CommandResult::Ok)
        }
        Command::RemoveKeySlot { tenant, id } => {
            let slots = view.indexed_key_slots(tenant)?;
            if slots.is_empty() {
                return Ok(CommandResult::UnknownTenant);
            }
            let Some((index, _)) = slots.iter().find(|(_, slot)| key_slot_id(slot) == *id) else {
                return Ok(CommandResult::UnknownKeySlot);
            };
            if slots.len() == 1 {
                return Ok(CommandResult::LastKeySlot);
            }
            batch.delete(key_slot_key(tenant, *index));
            batch.delete(key_slot_created_key(tenant, *index));
            Ok(CommandResult::Ok)
        }
        Command::Audit {
            actor,
            action,
            target,
            result,
            ..
        } => {
            append_audit(view, batch, now, actor, action, target, result)?;
            Ok(CommandResult::Ok)
        }
        Command::Timed { cmd: inner, .. } => {
            if inner.stamped().is_some() {
                return Ok(CommandResult::AlreadyExists);
            }
            apply_at(view, inner, now, batch, stats)
        }
        Command::AddPackInSession { .. }
        | Command::AddPackIndexed { .. }
        | Command::CommitSnapshotWithRefs { .. }
        | Command::SweepBlobs { .. } => super::gc_state::apply(view, cmd, now, batch, stats),
        Command::DropPack { id } | Command::Repack { old: id, .. } => {
            let result = super::gc_state::apply(view, cmd, now, batch, stats)?;
            if result == CommandResult::Ok {
                super::tier_state::forget_pack(id, batch);
            }
            Ok(result)
        }
        Command::SetStorageClass { .. } | Command::SetPackClass { .. } => {
            super::tier_state::apply(view, cmd, now, batch, stats)
        }
        Command::AppendStream { .. }
        | Command::RetiringSegments { .. }
        | Command::DropSegments { .. } => super::stream_state::apply(view, cmd, now, batch, stats),
        Command::PutDictionary {
            tenant,
            dataset,
            id,
            sealed,
        } => super::dict_state::put(view, tenant, dataset, id, sealed, batch),
        Command::ForgetSnapshots { .. }
        | Command::SetLock { .. }
        | Command::RemoveLock { .. }
        | Command::SetPolicy { .. }
        | Command::RemovePolicy { .. }
        | Command::PolicyApplied { .. } => {
            super::lifecycle_state::apply(view, cmd, now, batch, stats)
        }
        Command::Audited {
            actor,
            action,
            target,
            cmd: inner,
            ..
        } => {
            // An inner command that writes its own audit entry would chain
            // two entries to the same head: refused, and recorded as such.
            let (result, text) = if inner.stamped().is_some() {
                (CommandResult::AlreadyExists, "failed: nested audit")
            } else if actor.kind == "token" && !token_usable(view, &actor.token_id, now)? {
                let refused = CommandResult::ActorRefused;
                (refused.clone(), refused.audit_text())
            } else {
                let result = apply_at(view, inner, now, batch, stats)?;
                let text = result.audit_text();
                (result, text)
            };
            append_audit(view, batch, now, actor, action, target, text)?;
            Ok(result)
        }
    }
}

/// `AddPack`'s effects (shared with `AddPackInSession`): the pack record and
/// the index entries of blobs not indexed yet.
pub(super) fn add_pack(
    view: &StateView,
    pack: &PackRecord,
    blobs: &[(Id32, BlobLocation)],
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    if view.kv.get(&pack_key(&pack.id))?.is_some() {
        return Ok(CommandResult::AlreadyExists);
    }
    batch.put(pack_key(&pack.id), codec::encode("pack record", pack)?);
    stats.packs += 1;
    if pack.needs_rebalance {
        stats.packs_needing_rebalance += 1;
    }
    // In id order, the look-ups below walk the index tree in key order
    // (its pages stay warm from one to the next) and a repeated id sits
    // beside its first listing; the sort is stable, so that one is kept.
    let mut sorted: Vec<&(Id32, BlobLocation)> = blobs.iter().collect();
    sorted.sort_by_key(|a| a.0);
    let mut previous: Option<&Id32> = None;
    for (blob_id, location) in sorted {
        if previous == Some(blob_id) {
            continue;
        }
        previous = Some(blob_id);
        let key = blob_key(&pack.tenant, blob_id);
        // A blob already indexed (a concurrent upload of the same
        // chunk) keeps its first location: both packs are durable, and
        // keeping the first makes the index independent of retries.
        if view.kv.get(&key)?.is_some() {
            continue;
        }
        batch.put(key, codec::encode("blob location", location)?);
        stats.blobs += 1;
    }
    Ok(CommandResult::Ok)
}

/// Queues `change` applied to `node`'s marks; `AlreadyExists` if it changes nothing.
fn update_mark(
    view: &StateView,
    node: NodeId,
    batch: &mut WriteBatch,
    change: impl FnOnce(&mut NodeMark),
) -> Result<CommandResult, StateError> {
    let before = view.node_mark(node)?;
    let mut after = before;
    change(&mut after);
    if after == before {
        return Ok(CommandResult::AlreadyExists);
    }
    let key = node_mark_key(node);
    if after == NodeMark::default() {
        // No record means no marks: keep the state free of empty records.
        batch.delete(key.to_vec());
    } else {
        batch.put(key.to_vec(), codec::encode("node mark", &after)?);
    }
    Ok(CommandResult::Ok)
}

/// What the state modules' tests share: a fresh in-memory state, and a
/// command applied the way the state machine applies it.
#[cfg(test)]
pub(super) mod testing {
    use super::*;
    use crate::kv::MemKv;

    pub fn view() -> StateView {
        StateView::open(Arc::new(MemKv::new())).expect("open")
    }

    /// Applies `cmd` the way the state machine does: one batch with the stats.
    pub fn run(view: &StateView, cmd: Command) -> CommandResult {
        let mut stats = view.stats().expect("stats");
        let mut batch = WriteBatch::new();
        let result = apply_command(view, &cmd, &mut batch, &mut stats).expect("apply");
        batch.put(
            STATS_KEY.to_vec(),
            codec::encode("stats", &stats).expect("encode"),
        );
        view.kv().apply_batch(batch).expect("batch");
        result
    }

    /// An id made of one repeated byte.
    pub fn id(n: u8) -> Id32 {
        [n; 32]
    }

    /// A small pack of tenant `t` with one shard on node 1.
    pub fn pack(n: u8) -> PackRecord {
        PackRecord {
            id: id(n),
            tenant: "t".into(),
            data_shards: 2,
            parity_shards: 1,
            pack_len: 100,
            shard_len: 50,
            shards: vec![crate::meta::types::ShardPlacement {
                index: 0,
                node: 1,
                checksum: id(0),
            }],
            needs_rebalance: false,
        }
    }

    /// [`run`] with `cmd` stamped at cluster time `at`, as the leader stamps it.
    pub fn run_at(view: &StateView, at: i64, cmd: Command) -> CommandResult {
        run(
            view,
            Command::Timed {
                at,
                cmd: Box::new(cmd),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{run, view};
    use super::*;
    use crate::kv::MemKv;
    use crate::meta::types::ShardPlacement;

    fn id(n: u8) -> Id32 {
        [n; 32]
    }

    fn pack(n: u8, tenant: &str, needs_rebalance: bool) -> PackRecord {
        PackRecord {
            id: id(n),
            tenant: tenant.into(),
            data_shards: 4,
            parity_shards: 2,
            pack_len: 100,
            shard_len: 25,
            shards: vec![ShardPlacement {
                index: 0,
                node: 1,
                checksum: id(0),
            }],
            needs_rebalance,
        }
    }

    fn location(n: u8, offset: u64) -> BlobLocation {
        BlobLocation {
            pack_id: id(n),
            offset,
            length: 10,
        }
    }

    fn snapshot(n: u8, dataset: &str, time: i64, root: Id32) -> SnapshotRecord {
        SnapshotRecord {
            id: id(n),
            dataset: dataset.into(),
            parent: None,
            time_unix_ms: time,
            kind: "full".into(),
            root_tree: root,
            sealed_info: vec![],
            files: 1,
            bytes: 2,
            bytes_added: 2,
            tags: vec![],
        }
    }

    #[test]
    fn init_tenant_once_per_tenant() {
        let v = view();
        let init = |t: &str, slot: &[u8]| Command::InitTenant {
            tenant: t.into(),
            key_slot: slot.to_vec(),
        };
        assert_eq!(run(&v, init("a", b"slot-a")), CommandResult::Ok);
        assert_eq!(run(&v, init("a", b"other")), CommandResult::AlreadyExists);
        // "a" must not shadow "ab": keys are length-prefixed.
        assert_eq!(run(&v, init("ab", b"slot-ab")), CommandResult::Ok);
        assert_eq!(v.key_slots("a").expect("read"), vec![b"slot-a".to_vec()]);
        assert_eq!(v.key_slots("ab").expect("read"), vec![b"slot-ab".to_vec()]);
        assert!(v.key_slots("b").expect("read").is_empty());
        assert_eq!(v.stats().expect("stats").tenants, 2);
    }

    #[test]
    fn add_pack_indexes_blobs_once_and_is_idempotent() {
        let v = view();
        let add = Command::AddPack {
            pack: pack(1, "t", false),
            blobs: vec![
                (id(10), location(1, 0)),
                (id(11), location(1, 10)),
                (id(10), location(1, 20)),
            ],
        };
        assert_eq!(run(&v, add.clone()), CommandResult::Ok);
        assert_eq!(run(&v, add), CommandResult::AlreadyExists);
        assert_eq!(
            v.locate_blob("t", &id(10)).expect("read"),
            Some(location(1, 0))
        );
        assert_eq!(
            v.locate_blob("other", &id(10)).expect("read"),
            None,
            "tenants are separate"
        );
        assert_eq!(
            v.find_blobs("t", &[id(10), id(12), id(11)]).expect("read"),
            vec![true, false, true]
        );
        // A second pack holding an already indexed blob keeps the first location.
        let add2 = Command::AddPack {
            pack: pack(2, "t", true),
            blobs: vec![(id(11), location(2, 0)), (id(12), location(2, 10))],
        };
        assert_eq!(run(&v, add2), CommandResult::Ok);
        assert_eq!(
            v.locate_blob("t", &id(11)).expect("read"),
            Some(location(1, 10))
        );
        let stats = v.stats().expect("stats");
        assert_eq!(
            (stats.packs, stats.blobs, stats.packs_needing_rebalance),
            (2, 3, 1)
        );
        assert_eq!(v.packs().expect("read").len(), 2);
    }

    #[test]
    fn set_placement_replaces_shards_and_tracks_rebalance() {
        let v = view();
        let set = |needs| Command::SetPlacement {
            pack_id: id(1),
            shards: vec![],
            needs_rebalance: needs,
        };
        assert_eq!(run(&v, set(true)), CommandResult::UnknownPack);
        run(
            &v,
            Command::AddPack {
                pack: pack(1, "t", false),
                blobs: vec![],
            },
        );
        assert_eq!(run(&v, set(true)), CommandResult::Ok);
        assert_eq!(run(&v, set(true)), CommandResult::Ok);
        assert_eq!(v.stats().expect("stats").packs_needing_rebalance, 1);
        let stored = v.pack(&id(1)).expect("read").expect("present");
        assert!(stored.shards.is_empty() && stored.needs_rebalance);
        assert_eq!(run(&v, set(false)), CommandResult::Ok);
        assert_eq!(v.stats().expect("stats").packs_needing_rebalance, 0);
    }

    #[test]
    fn set_placement_if_applies_only_over_the_expected_placement() {
        let v = view();
        let shard = |index, node| crate::model::ShardPlacement {
            index,
            node,
            checksum: [index as u8; 32],
        };
        let cas = |expected: Vec<_>, shards: Vec<_>, needs| Command::SetPlacementIf {
            pack_id: id(1),
            expected,
            shards,
            needs_rebalance: needs,
        };
        assert_eq!(
            run(&v, cas(vec![], vec![], false)),
            CommandResult::UnknownPack
        );
        let mut record = pack(1, "t", true);
        record.shards = vec![shard(0, 1), shard(1, 2)];
        run(
            &v,
            Command::AddPack {
                pack: record.clone(),
                blobs: vec![],
            },
        );
        // Two passes planned from the same placement: the first wins...
        let first = vec![shard(0, 1), shard(1, 3)];
        let second = vec![shard(0, 4), shard(1, 2)];
        assert_eq!(
            run(&v, cas(record.shards.clone(), first.clone(), false)),
            CommandResult::Ok
        );
        // ...the second is refused and changes nothing.
        assert_eq!(
            run(&v, cas(record.shards.clone(), second.clone(), true)),
            CommandResult::PlacementChanged
        );
        let stored = v.pack(&id(1)).expect("read").expect("present");
        assert_eq!(stored.shards, first);
        assert!(!stored.needs_rebalance);
        assert_eq!(v.stats().expect("stats").packs_needing_rebalance, 0);
        // Planned from the current placement, it applies.
        assert_eq!(run(&v, cas(first, second.clone(), true)), CommandResult::Ok);
        let stored = v.pack(&id(1)).expect("read").expect("present");
        assert_eq!(stored.shards, second);
        assert_eq!(v.stats().expect("stats").packs_needing_rebalance, 1);
    }

    #[test]
    fn commit_snapshot_needs_its_root_tree_and_lists_oldest_first() {
        let v = view();
        let commit = |s: SnapshotRecord| Command::CommitSnapshot {
            tenant: "t".into(),
            snapshot: s,
        };
        assert_eq!(
            run(&v, commit(snapshot(1, "d", 5, id(10)))),
            CommandResult::MissingRootTree
        );
        run(
            &v,
            Command::AddPack {
                pack: pack(1, "t", false),
                blobs: vec![(id(10), location(1, 0))],
            },
        );
        assert_eq!(
            run(&v, commit(snapshot(3, "d", 5, id(10)))),
            CommandResult::Ok
        );
        assert_eq!(
            run(&v, commit(snapshot(1, "d", 9, id(10)))),
            CommandResult::Ok
        );
        assert_eq!(
            run(&v, commit(snapshot(2, "e", 1, id(10)))),
            CommandResult::Ok
        );
        assert_eq!(
            run(&v, commit(snapshot(2, "e", 1, id(10)))),
            CommandResult::AlreadyExists
        );
        let all: Vec<Id32> = v
            .snapshots("t", None)
            .expect("read")
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(all, vec![id(2), id(3), id(1)]);
        let d: Vec<Id32> = v
            .snapshots("t", Some("d"))
            .expect("read")
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(d, vec![id(3), id(1)]);
        assert!(v.snapshots("u", None).expect("read").is_empty());
        assert_eq!(v.stats().expect("stats").snapshots, 3);
    }

    #[test]
    fn node_marks_set_clear_and_are_idempotent() {
        let v = view();
        let removed = |node| Command::MarkRemoved { node };
        let added = |node| Command::MarkAdded { node };
        let holds = |node| Command::MarkHoldsLog { node };
        assert_eq!(v.node_mark(7).expect("read"), NodeMark::default());
        assert_eq!(run(&v, added(7)), CommandResult::AlreadyExists);

        assert_eq!(run(&v, holds(7)), CommandResult::Ok);
        assert_eq!(run(&v, holds(7)), CommandResult::AlreadyExists);
        assert_eq!(run(&v, removed(7)), CommandResult::Ok);
        assert_eq!(run(&v, removed(7)), CommandResult::AlreadyExists);
        assert_eq!(
            v.node_mark(7).expect("read"),
            NodeMark {
                removed: true,
                holds_log: true
            },
            "removing a node does not forget that it held the log"
        );
        assert_eq!(run(&v, holds(2)), CommandResult::Ok);
        assert_eq!(
            v.node_marks()
                .expect("read")
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![2, 7]
        );

        // An explicit add starts a new incarnation: both marks go, and the
        // record with them.
        assert_eq!(run(&v, added(7)), CommandResult::Ok);
        assert_eq!(v.node_mark(7).expect("read"), NodeMark::default());
        assert_eq!(
            v.node_marks()
                .expect("read")
                .keys()
                .copied()
                .collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(v.stats().expect("stats"), MetaStats::default());
    }

    #[test]
    fn node_marks_travel_in_snapshot_images() {
        let v = view();
        run(&v, Command::MarkRemoved { node: 3 });
        run(&v, Command::MarkHoldsLog { node: u64::MAX });
        let image = SnapshotImage {
            magic: SNAPSHOT_MAGIC,
            pairs: v.image_pairs().expect("pairs"),
        };
        let decoded = SnapshotImage::decode(&image.encode().expect("encode")).expect("decode");
        let copy = StateView::open(Arc::new(MemKv::new())).expect("open");
        let mut batch = WriteBatch::new();
        for (key, value) in decoded.pairs {
            batch.put(key, value);
        }
        copy.kv().apply_batch(batch).expect("batch");
        assert_eq!(
            copy.node_marks().expect("read"),
            v.node_marks().expect("read")
        );
        assert!(copy.node_mark(3).expect("read").removed);
        assert!(copy.node_mark(u64::MAX).expect("read").holds_log);
    }

    #[test]
    fn refuses_a_foreign_tree_and_bad_images() {
        let kv = Arc::new(MemKv::new());
        kv.put(b"x", b"y").expect("put");
        assert!(matches!(
            StateView::open(kv),
            Err(StateError::Format { .. })
        ));
        let kv = Arc::new(MemKv::new());
        kv.put(FORMAT_KEY, b"cairn-meta-state/9").expect("put");
        assert!(matches!(
            StateView::open(kv),
            Err(StateError::Format { .. })
        ));
        let bad = SnapshotImage {
            magic: *b"NOTASNAP",
            pairs: vec![],
        };
        assert!(matches!(
            SnapshotImage::decode(&bad.encode().expect("encode")),
            Err(StateError::SnapshotMagic { .. })
        ));
    }

    /// A node actor: no token to be checked when its entries apply.
    fn actor() -> Actor {
        Actor {
            kind: "node".into(),
            node_id: 3,
            ..Actor::default()
        }
    }

    fn audited(at: i64, cmd: Command) -> Command {
        Command::Audited {
            at,
            actor: actor(),
            action: "Test".into(),
            target: "x".into(),
            cmd: Box::new(cmd),
        }
    }

    fn chain_of(v: &StateView) -> Vec<cairn_proto::v1::AuditEntry> {
        v.audit_entries(0, 1000)
            .expect("read")
            .iter()
            .map(AuditRecord::to_wire)
            .collect()
    }

    fn verify(
        entries: &[cairn_proto::v1::AuditEntry],
    ) -> Result<(), cairn_proto::audit::ChainBreak> {
        let mut verifier = cairn_proto::audit::ChainVerifier::default();
        entries.iter().try_for_each(|e| verifier.push(e))
    }

    #[test]
    fn bootstrap_applies_once_and_tokens_expire_and_revoke_in_cluster_time() {
        let v = view();
        let boot = |n: u8| Command::BootstrapToken {
            at: 1_000,
            node: 1,
            key: id(n),
        };
        assert_eq!(run(&v, boot(1)), CommandResult::Ok);
        // A second initial node proposing (even another file) changes nothing.
        assert_eq!(run(&v, boot(1)), CommandResult::AlreadyExists);
        assert_eq!(run(&v, boot(2)), CommandResult::AlreadyExists);
        let root = v.token(&id(1)).expect("read").expect("bootstrap token");
        assert_eq!((root.role, root.tenant.clone()), (Role::ClusterAdmin, None));
        assert!(v.token(&id(2)).expect("read").is_none());

        let create = Command::CreateToken {
            key: id(3),
            role: Role::Backup,
            tenant: Some("t".into()),
            ttl_ms: 60_000,
            label: "host".into(),
            created_by: root.id.clone(),
        };
        // Stamped earlier than the last entry: the clock does not go back.
        assert_eq!(run(&v, audited(500, create)), CommandResult::Ok);
        let backup = v.token(&id(3)).expect("read").expect("created");
        assert_eq!(backup.created_unix_ms, 1_000);
        assert_eq!(backup.expires_unix_ms, 61_000);
        assert!(backup.usable_at(60_999) && !backup.usable_at(61_000));
        assert_eq!(backup.id, token_id(&id(3)));

        let revoke = |id: &str| Command::RevokeToken { id: id.into() };
        assert_eq!(run(&v, revoke(&backup.id)), CommandResult::Ok);
        assert_eq!(run(&v, revoke(&backup.id)), CommandResult::AlreadyExists);
        assert_eq!(
            run(&v, revoke("ffffffffffffffff")),
            CommandResult::UnknownToken
        );
        assert!(!v.token(&id(3)).expect("read").expect("kept").usable_at(0));
        assert_eq!(v.tokens().expect("read").len(), 2);
        assert_eq!(v.clock().expect("clock"), 1_000);
    }

    #[test]
    fn a_revoked_or_expired_token_changes_nothing_once_its_revocation_is_applied() {
        let v = view();
        let key = id(4);
        let create = Command::CreateToken {
            key,
            role: Role::Admin,
            tenant: Some("t".into()),
            ttl_ms: 1_000,
            label: String::new(),
            created_by: String::new(),
        };
        run(&v, audited(100, create));
        let actor = Actor {
            kind: "token".into(),
            token_id: token_id(&key),
            role: "admin".into(),
            tenant: "t".into(),
            node_id: 0,
        };
        let init = |at| Command::Audited {
            at,
            actor: actor.clone(),
            action: "InitTenant".into(),
            target: "tenant t".into(),
            cmd: Box::new(Command::InitTenant {
                tenant: "t".into(),
                key_slot: b"s".to_vec(),
            }),
        };
        // Expired at 1_100 (created at 100 with a 1 s lifetime).
        assert_eq!(run(&v, init(1_100)), CommandResult::ActorRefused);
        assert!(v.key_slots("t").expect("read").is_empty());
        let v = view();
        run(
            &v,
            audited(
                100,
                Command::CreateToken {
                    key,
                    role: Role::Admin,
                    tenant: Some("t".into()),
                    ttl_ms: 0,
                    label: String::new(),
                    created_by: String::new(),
                },
            ),
        );
        run(&v, Command::RevokeToken { id: token_id(&key) });
        assert_eq!(run(&v, init(200)), CommandResult::ActorRefused);
        assert!(v.key_slots("t").expect("read").is_empty());
        let entries = chain_of(&v);
        assert_eq!(
            entries.last().map(|e| e.result.as_str()),
            Some("refused: token unknown, revoked or expired")
        );
    }

    #[test]
    fn key_slots_are_added_and_removed_but_never_the_last() {
        let v = view();
        let add = |slot: &[u8]| Command::AddKeySlot {
            tenant: "t".into(),
            key_slot: slot.to_vec(),
        };
        assert_eq!(run(&v, add(b"second")), CommandResult::UnknownTenant);
        run(
            &v,
            audited(
                7,
                Command::InitTenant {
                    tenant: "t".into(),
                    key_slot: b"first".to_vec(),
                },
            ),
        );
        assert_eq!(run(&v, audited(9, add(b"second"))), CommandResult::Ok);
        assert_eq!(run(&v, add(b"second")), CommandResult::AlreadyExists);
        let entries = v.key_slot_entries("t").expect("read");
        assert_eq!(
            entries
                .iter()
                .map(|e| (e.slot.as_slice(), e.created_unix_ms))
                .collect::<Vec<_>>(),
            vec![(&b"first"[..], 7), (&b"second"[..], 9)]
        );
        let remove = |id: &str| Command::RemoveKeySlot {
            tenant: "t".into(),
            id: id.into(),
        };
        assert_eq!(
            run(&v, remove("0000000000000000")),
            CommandResult::UnknownKeySlot
        );
        assert_eq!(run(&v, remove(&entries[0].id)), CommandResult::Ok);
        assert_eq!(v.key_slots("t").expect("read"), vec![b"second".to_vec()]);
        assert_eq!(run(&v, remove(&entries[1].id)), CommandResult::LastKeySlot);
        // A slot added after a removal never reuses a live index.
        assert_eq!(run(&v, add(b"third")), CommandResult::Ok);
        assert_eq!(
            v.key_slots("t").expect("read"),
            vec![b"second".to_vec(), b"third".to_vec()]
        );
    }

    #[test]
    fn the_audit_chain_verifies_records_failures_and_catches_an_edited_entry() {
        let v = view();
        run(
            &v,
            Command::BootstrapToken {
                at: 5,
                node: 2,
                key: id(1),
            },
        );
        run(
            &v,
            audited(
                6,
                Command::RevokeToken {
                    id: "0000000000000000".into(),
                },
            ),
        );
        run(
            &v,
            Command::Audit {
                at: 7,
                actor: actor(),
                action: "RemoveNode".into(),
                target: "node 4".into(),
                result: "refused: permission denied".into(),
            },
        );
        // A nested audit would chain two entries to one head: refused, recorded.
        let nested = audited(
            8,
            Command::Audit {
                at: 8,
                actor: actor(),
                action: "x".into(),
                target: String::new(),
                result: String::new(),
            },
        );
        assert_eq!(run(&v, nested), CommandResult::AlreadyExists);
        let entries = chain_of(&v);
        assert_eq!(entries.len(), 4);
        assert_eq!(verify(&entries), Ok(()));
        assert_eq!(entries[0].action, "BootstrapToken");
        assert_eq!(entries[1].result, "failed: unknown token");
        assert_eq!(entries[3].result, "failed: nested audit");
        let (seq, head) = v.audit_head().expect("head");
        assert_eq!((seq, head.to_vec()), (4, entries[3].hash.clone()));
        assert_eq!(v.audit_entries(2, 1).expect("page").len(), 1);
        assert_eq!(v.audit_entries(2, 1).expect("page")[0].seq, 3);

        // Someone with access to the store rewrites entry 2's result.
        let key = audit_key(2);
        let mut record: AuditRecord = codec::decode(
            "audit entry",
            &v.kv().get(&key).expect("get").expect("stored"),
        )
        .expect("decode");
        record.result = "ok".into();
        v.kv()
            .put(
                &key,
                &codec::encode("audit entry", &record).expect("encode"),
            )
            .expect("put");
        assert_eq!(
            verify(&chain_of(&v)),
            Err(cairn_proto::audit::ChainBreak::Altered { seq: 2 })
        );
        // Rehashing the edit does not help: the next entry no longer chains.
        record.hash = cairn_proto::audit::entry_hash(&record.to_wire());
        v.kv()
            .put(
                &key,
                &codec::encode("audit entry", &record).expect("encode"),
            )
            .expect("put");
        assert_eq!(
            verify(&chain_of(&v)),
            Err(cairn_proto::audit::ChainBreak::PrevMismatch { seq: 3 })
        );
        // Removing one is caught too.
        v.kv().delete(&audit_key(3)).expect("delete");
        assert_eq!(
            verify(&chain_of(&v)),
            Err(cairn_proto::audit::ChainBreak::Gap {
                expected: 3,
                found: 4
            })
        );
    }
}
