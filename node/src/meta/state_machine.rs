//! openraft's `RaftStateMachine` and `RaftSnapshotBuilder` over the metadata
//! state of `state.rs`.
//!
//! This is an openraft adapter: a move to openraft 0.10 touches it, not the
//! state's rules. It owns how entries become batches and how snapshots are
//! built, kept and installed; it must not decide what a command means.
//!
//! Invariants:
//! - each entry is one atomic batch holding its effects, `applied`,
//!   `membership` (for membership entries) and `stats`; `apply` flushes before
//!   returning, so the persisted state is always a prefix of the log and a
//!   restarted node resumes from it (no snapshot replay is needed on open);
//! - a snapshot image is read under `write_lock`, which every state batch also
//!   takes, so it never contains half an entry even though the builder runs
//!   concurrently with `apply` (sled has no point-in-time reads);
//! - `install_snapshot` replaces the state, `applied`, `membership` and the
//!   current snapshot in one batch and flushes before returning.

use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};

use super::codec;
use super::state::{
    self, AppliedLogId, AppliedMembership, SNAPSHOT_DATA_KEY, SNAPSHOT_META_KEY, SnapshotImage,
    StateError, StateView,
};
use super::types::{CommandResult, NodeId, NodeInfo, TypeConfig};
use crate::kv::{KvError, WriteBatch};

type Meta = SnapshotMeta<NodeId, NodeInfo>;

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(AnyError::new(&e)).into()
}

fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::new(&e)).into()
}

fn snap_read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_snapshot(None, AnyError::new(&e)).into()
}

fn snap_write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, AnyError::new(&e)).into()
}

/// Serializes state batches against snapshot reads. Held only in synchronous
/// sections, never across an await.
#[derive(Clone, Default)]
struct WriteLock(Arc<Mutex<()>>);

impl WriteLock {
    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic elsewhere cannot leave it
        // inconsistent, and the batches themselves are atomic.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The metadata state machine.
pub struct StateMachineStore {
    view: StateView,
    write_lock: WriteLock,
}

impl StateMachineStore {
    /// Opens the state machine on `view`'s store; what is persisted is the state.
    pub fn new(view: StateView) -> Self {
        Self {
            view,
            write_lock: WriteLock::default(),
        }
    }

    async fn flush(&self) -> Result<(), KvError> {
        crate::kv::flush_blocking(self.view.kv()).await
    }

    fn stored_snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>, StateError> {
        let kv = self.view.kv();
        let (Some(meta), Some(data)) = (kv.get(SNAPSHOT_META_KEY)?, kv.get(SNAPSHOT_DATA_KEY)?)
        else {
            return Ok(None);
        };
        Ok(Some((codec::decode("snapshot meta", &meta)?, data)))
    }
}

/// Builds snapshots from a shared handle on the state.
pub struct SnapshotBuilder {
    view: StateView,
    write_lock: WriteLock,
}

impl SnapshotBuilder {
    fn build(&self) -> Result<(Meta, Vec<u8>), StateError> {
        let pairs = {
            let _guard = self.write_lock.lock();
            self.view.image_pairs()?
        };
        // Read applied/membership from the image itself, so they describe
        // exactly the data it holds.
        let (last_log_id, last_membership) = state::applied_state_in(&pairs)?;
        let data = SnapshotImage {
            magic: state::SNAPSHOT_MAGIC,
            pairs,
        }
        .encode()?;
        let snapshot_id = match &last_log_id {
            Some(id) => format!(
                "{}-{}-{:08x}",
                id.leader_id,
                id.index,
                rand::random::<u32>()
            ),
            None => format!("empty-{:08x}", rand::random::<u32>()),
        };
        let meta = Meta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        // Keep it as the current snapshot unless a newer one (installed from
        // the leader meanwhile) is already there.
        let _guard = self.write_lock.lock();
        let kv = self.view.kv();
        let newer_exists = match kv.get(SNAPSHOT_META_KEY)? {
            Some(bytes) => {
                codec::decode::<Meta>("snapshot meta", &bytes)?.last_log_id > meta.last_log_id
            }
            None => false,
        };
        if !newer_exists {
            let mut batch = WriteBatch::new();
            batch.put(
                SNAPSHOT_META_KEY.to_vec(),
                codec::encode("snapshot meta", &meta)?,
            );
            batch.put(SNAPSHOT_DATA_KEY.to_vec(), data.clone());
            kv.apply_batch(batch)?;
        }
        Ok((meta, data))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (meta, data) = self.build().map_err(snap_write_err)?;
        crate::kv::flush_blocking(self.view.kv())
            .await
            .map_err(snap_write_err)?;
        tracing::info!(snapshot_id = %meta.snapshot_id, bytes = data.len(), "metadata snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(AppliedLogId, AppliedMembership), StorageError<NodeId>> {
        self.view.applied_state().map_err(sm_read_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut stats = self.view.stats().map_err(sm_read_err)?;
        for entry in entries {
            let log_id = entry.log_id;
            let apply_err = |e: StateError| {
                StorageError::from(StorageIOError::apply(log_id, AnyError::new(&e)))
            };
            let mut batch = WriteBatch::new();
            let mut next_stats = stats.clone();
            let result = match &entry.payload {
                EntryPayload::Blank => CommandResult::Ok,
                EntryPayload::Normal(cmd) => {
                    state::apply_command(&self.view, cmd, &mut batch, &mut next_stats)
                        .map_err(apply_err)?
                }
                EntryPayload::Membership(membership) => {
                    let stored = StoredMembership::new(Some(log_id), membership.clone());
                    batch.put(
                        state::MEMBERSHIP_KEY.to_vec(),
                        codec::encode("membership", &stored).map_err(|e| apply_err(e.into()))?,
                    );
                    CommandResult::Ok
                }
            };
            let applied: AppliedLogId = Some(log_id);
            batch.put(
                state::APPLIED_KEY.to_vec(),
                codec::encode("applied log id", &applied).map_err(|e| apply_err(e.into()))?,
            );
            if next_stats != stats {
                batch.put(
                    state::STATS_KEY.to_vec(),
                    codec::encode("stats", &next_stats).map_err(|e| apply_err(e.into()))?,
                );
            }
            {
                let _guard = self.write_lock.lock();
                self.view
                    .kv()
                    .apply_batch(batch)
                    .map_err(|e| apply_err(e.into()))?;
            }
            stats = next_stats;
            results.push(result);
        }
        // Durable before openraft reports the entries applied: a client that
        // saw its write succeed must find it after any restart.
        self.flush().await.map_err(sm_write_err)?;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            view: self.view.clone(),
            write_lock: self.write_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let image = SnapshotImage::decode(&data).map_err(snap_read_err)?;
        {
            let _guard = self.write_lock.lock();
            let kv = self.view.kv();
            let mut batch = WriteBatch::new();
            // Replace everything: delete what is there, then write the image.
            for (key, _) in kv.scan_prefix(b"").map_err(sm_read_err)? {
                batch.delete(key);
            }
            for (key, value) in image.pairs {
                batch.put(key, value);
            }
            // The meta is authoritative for what the snapshot covers.
            let applied: AppliedLogId = meta.last_log_id;
            batch.put(
                state::APPLIED_KEY.to_vec(),
                codec::encode("applied log id", &applied).map_err(snap_write_err)?,
            );
            batch.put(
                state::MEMBERSHIP_KEY.to_vec(),
                codec::encode("membership", &meta.last_membership).map_err(snap_write_err)?,
            );
            batch.put(state::FORMAT_KEY.to_vec(), state::FORMAT_MAGIC.to_vec());
            batch.put(
                SNAPSHOT_META_KEY.to_vec(),
                codec::encode("snapshot meta", meta).map_err(snap_write_err)?,
            );
            batch.put(SNAPSHOT_DATA_KEY.to_vec(), data);
            kv.apply_batch(batch).map_err(snap_write_err)?;
        }
        self.flush().await.map_err(snap_write_err)?;
        tracing::info!(snapshot_id = %meta.snapshot_id, "metadata snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self
            .stored_snapshot()
            .map_err(snap_read_err)?
            .map(|(meta, data)| Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            }))
    }
}
