//! Tiering's records in the metadata state: the storage class of each node
//! and of each pack (layout in `state.rs`).
//!
//! Both are new records beside the older ones, never fields of them:
//! `NodeInfo` travels in openraft's membership and `PackRecord`'s encoding
//! is fixed, so a state written before tiering reads as "everything hot".
//! A pack's class changes only together with its placement
//! ([`Command::SetPackClass`], a compare-and-set on the placement), so the
//! class always names the tier the current placement was planned for.

use std::collections::BTreeMap;

use super::codec;
use super::state::{StateError, StateView};
use super::types::{Command, CommandResult, Id32, MetaStats, NodeId, StorageClass};
use super::{Meta, MetaError};
use crate::kv::WriteBatch;

/// `'N' node:u64-BE -> StorageClass` (absent = hot).
pub(super) const NODE_CLASS: u8 = b'N';
/// `'T' pack:32 -> StorageClass` (absent = hot).
pub(super) const PACK_CLASS: u8 = b'T';

fn node_class_key(node: NodeId) -> [u8; 9] {
    let mut key = [NODE_CLASS; 9];
    key[1..].copy_from_slice(&node.to_be_bytes());
    key
}

/// Key of a pack's class record.
pub(super) fn pack_class_key(id: &Id32) -> Vec<u8> {
    let mut key = Vec::with_capacity(33);
    key.push(PACK_CLASS);
    key.extend_from_slice(id);
    key
}

impl StateView {
    /// Every node with a class record (the others are hot).
    pub fn node_classes(&self) -> Result<BTreeMap<NodeId, StorageClass>, StateError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.kv().scan_prefix(&[NODE_CLASS])? {
            let Some(id) = key.get(1..).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                continue;
            };
            out.insert(
                NodeId::from_be_bytes(id),
                codec::decode("node class", &value)?,
            );
        }
        Ok(out)
    }

    /// A pack's class (hot without a record).
    pub fn pack_class(&self, id: &Id32) -> Result<StorageClass, StateError> {
        Ok(self
            .get("pack class", &pack_class_key(id))?
            .unwrap_or_default())
    }

    /// Every pack with a class record (the others are hot).
    pub fn pack_classes(&self) -> Result<BTreeMap<Id32, StorageClass>, StateError> {
        let prefix = [PACK_CLASS];
        let pairs = self.kv().scan_prefix(&prefix)?;
        Self::decode_by_id("pack class", &prefix, pairs)
    }
}

impl Meta {
    /// Every node with a class record (local, possibly stale; others are hot).
    pub fn node_classes(&self) -> Result<BTreeMap<NodeId, StorageClass>, MetaError> {
        Ok(self.view()?.node_classes()?)
    }

    /// A pack's class (local, possibly stale).
    pub fn pack_class(&self, id: &Id32) -> Result<StorageClass, MetaError> {
        Ok(self.view()?.pack_class(id)?)
    }

    /// Every pack with a class record (local, possibly stale; others are hot).
    pub fn pack_classes(&self) -> Result<BTreeMap<Id32, StorageClass>, MetaError> {
        Ok(self.view()?.pack_classes()?)
    }
}

fn put_class(batch: &mut WriteBatch, key: Vec<u8>, class: StorageClass) -> Result<(), StateError> {
    // No record means hot: keep the state free of default records.
    match class {
        StorageClass::Hot => batch.delete(key),
        other => batch.put(key, codec::encode("storage class", &other)?),
    }
    Ok(())
}

/// Applies tiering's commands.
pub(super) fn apply(
    view: &StateView,
    cmd: &Command,
    now: i64,
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    match cmd {
        Command::SetStorageClass { node, class } => {
            let key = node_class_key(*node);
            let before: StorageClass = view.get("node class", &key)?.unwrap_or_default();
            if before == *class {
                return Ok(CommandResult::AlreadyExists);
            }
            put_class(batch, key.to_vec(), *class)?;
            Ok(CommandResult::Ok)
        }
        Command::SetPackClass {
            pack,
            class,
            expected,
            shards,
            needs_rebalance,
        } => {
            // The placement half is exactly `SetPlacementIf`.
            let placement = Command::SetPlacementIf {
                pack_id: *pack,
                expected: expected.clone(),
                shards: shards.clone(),
                needs_rebalance: *needs_rebalance,
            };
            let result = super::state::apply_at(view, &placement, now, batch, stats)?;
            if result == CommandResult::Ok {
                put_class(batch, pack_class_key(pack), *class)?;
            }
            Ok(result)
        }
        _ => Ok(CommandResult::Ok),
    }
}

/// Called after a pack record is removed (dropped or repacked): its class
/// record goes with it, so the same bytes stored again start hot.
pub(super) fn forget_pack(id: &Id32, batch: &mut WriteBatch) {
    batch.delete(pack_class_key(id));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemKv;
    use crate::meta::state::apply_command;
    use crate::meta::types::{PackRecord, ShardPlacement};
    use std::sync::Arc;

    fn view() -> StateView {
        StateView::open(Arc::new(MemKv::default())).expect("open")
    }

    fn run(view: &StateView, cmd: Command) -> CommandResult {
        let mut batch = WriteBatch::default();
        let mut stats = view.stats().expect("stats");
        let result = apply_command(view, &cmd, &mut batch, &mut stats).expect("apply");
        view.kv().apply_batch(batch).expect("batch");
        result
    }

    fn at(placement: &[(u32, NodeId)]) -> Vec<ShardPlacement> {
        placement
            .iter()
            .map(|&(index, node)| ShardPlacement {
                index,
                node,
                checksum: [index as u8; 32],
            })
            .collect()
    }

    #[test]
    fn node_classes_default_to_hot_and_hot_removes_the_record() {
        let v = view();
        assert!(v.node_classes().expect("read").is_empty());
        let set = |node, class| Command::SetStorageClass { node, class };
        assert_eq!(run(&v, set(3, StorageClass::Cold)), CommandResult::Ok);
        assert_eq!(
            run(&v, set(3, StorageClass::Cold)),
            CommandResult::AlreadyExists
        );
        assert_eq!(
            run(&v, set(4, StorageClass::Hot)),
            CommandResult::AlreadyExists
        );
        assert_eq!(
            v.node_classes().expect("read"),
            BTreeMap::from([(3, StorageClass::Cold)])
        );
        assert_eq!(run(&v, set(3, StorageClass::Hot)), CommandResult::Ok);
        assert!(v.node_classes().expect("read").is_empty());
    }

    #[test]
    fn a_pack_class_changes_only_with_its_expected_placement() {
        let v = view();
        let id = [7u8; 32];
        let hot = at(&[(0, 1), (1, 2), (2, 4), (3, 5), (4, 7), (5, 8)]);
        let cold = at(&[(0, 3), (1, 6), (2, 9), (3, 3), (4, 6), (5, 9)]);
        let cas =
            |expected: &[ShardPlacement], shards: &[ShardPlacement], class| Command::SetPackClass {
                pack: id,
                class,
                expected: expected.to_vec(),
                shards: shards.to_vec(),
                needs_rebalance: false,
            };
        assert_eq!(
            run(&v, cas(&hot, &cold, StorageClass::Cold)),
            CommandResult::UnknownPack
        );
        let record = PackRecord {
            id,
            tenant: "t".into(),
            data_shards: 4,
            parity_shards: 2,
            pack_len: 100,
            shard_len: 25,
            shards: hot.clone(),
            needs_rebalance: false,
        };
        run(
            &v,
            Command::AddPack {
                pack: record,
                blobs: vec![],
            },
        );
        assert_eq!(v.pack_class(&id).expect("read"), StorageClass::Hot);
        // A stale expectation changes neither placement nor class.
        assert_eq!(
            run(&v, cas(&cold, &cold, StorageClass::Cold)),
            CommandResult::PlacementChanged
        );
        assert_eq!(v.pack_class(&id).expect("read"), StorageClass::Hot);
        assert_eq!(
            run(&v, cas(&hot, &cold, StorageClass::Cold)),
            CommandResult::Ok
        );
        assert_eq!(v.pack_class(&id).expect("read"), StorageClass::Cold);
        assert_eq!(v.pack(&id).expect("read").expect("pack").shards, cold);
        // Dropping the pack forgets its class.
        run(&v, Command::DropPack { id });
        assert!(v.pack_classes().expect("read").is_empty());
    }
}
