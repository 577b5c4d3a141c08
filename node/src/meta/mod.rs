//! The Raft metadata group: the cluster map, tenants and their key slots, the
//! pack and blob index and the snapshot catalog, replicated with openraft on
//! sled.
//!
//! [`Meta`] is the one handle the rest of the node uses: it opens the stores,
//! starts Raft, bootstraps the cluster, proposes commands (forwarding them to
//! the leader), offers a linearizable read barrier and serves local reads.
//! This file holds the handle, its local reads and shutdown; `open` the
//! startup and bootstrap, `write` the writes forwarded to the leader (and the
//! retry loop against the leader), `read` the read barrier, `settings` the
//! [`MetaConfig`] and `error` the [`MetaError`].
//! Submodules split the work so that openraft's API is touched only by the
//! adapters (`log_store`, `state_machine`, `network`, `service`); the business
//! rules live in `state` and the voter choice in `voters`, both free of
//! openraft's storage and network traits. `membership` adds and removes nodes
//! (and runs the leader's keeper task); `admission` decides whether a node
//! that starts with an empty store may take part in Raft (the wiped-disk trap).
//!
//! This module must not hold bulk data: packs and shards travel over other
//! services; only ids, placements and sealed records come here.
//!
//! Invariants:
//! - voters are chosen by [`voters::choose_voters`], so with three regions or
//!   more no region holds a majority (design invariant 3);
//! - `write` returns only once the command is applied on this node too, both
//!   in the state (a node reads its own writes) and in the Raft metrics (so
//!   `last_applied()` and metrics-based waits cover it);
//! - `read_barrier` returning `Ok` means every write committed before the call
//!   is in the local state;
//! - after `shutdown` returns, no handle on the sled files is left, so the
//!   same directory can be opened again in this process;
//! - a node that opened an empty store answers no vote, append or snapshot
//!   until its admission is decided, and never bootstraps a cluster unless a
//!   majority of the initial voters answered that they are empty too.

pub mod admission;
mod audit;
pub mod codec;
pub mod dict_state;
mod error;
mod gc_state;
mod lifecycle_state;
pub mod log_store;
pub mod membership;
pub mod network;
mod open;
mod read;
pub mod service;
mod settings;
pub mod state;
pub mod state_machine;
mod stream_state;
mod tier_state;
pub mod types;
pub mod voters;
mod write;

pub use error::MetaError;
pub use settings::MetaConfig;
pub use write::wall_clock_ms;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cairn_proto::MAX_MESSAGE_BYTES;
use cairn_proto::v1::raft_server::RaftServer;
use openraft::Raft;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::kv::ReleaseWatch;
use crate::model::NodeView;
use admission::Admission;
use network::PeerChannels;
use service::RaftService;
use state::StateView;
use types::{
    BlobLocation, Id32, MetaStats, NodeId, NodeInfo, NodeMark, PackRecord, SnapshotRecord,
    TypeConfig,
};

/// How long `shutdown` waits for openraft's tasks to release the files.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

struct Inner {
    node_id: NodeId,
    config: MetaConfig,
    raft: Raft<TypeConfig>,
    /// The nodes named at start (`--initial-cluster`), and the voters chosen from them.
    initial_cluster: BTreeMap<NodeId, NodeInfo>,
    initial_voters: BTreeSet<NodeId>,
    /// Whether this node takes part in Raft; read by the Raft service's gate.
    admission: watch::Sender<Admission>,
    /// Serializes membership changes run by this node as leader.
    change_lock: tokio::sync::Mutex<()>,
    /// `None` once shut down: reads then fail instead of holding the files open.
    state: RwLock<Option<StateView>>,
    channels: PeerChannels,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    released: ReleaseWatch,
}

/// Handle on the metadata group. Cheap to clone.
#[derive(Clone)]
pub struct Meta {
    inner: Arc<Inner>,
}

impl Meta {
    /// The gRPC service to mount on the node's server (Raft RPCs, Forward,
    /// ReadIndex, ChangeMembership, ClusterInfo).
    pub fn raft_service(&self) -> RaftServer<RaftService> {
        RaftServer::new(RaftService::new(self.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Where this node stands towards Raft: a node that opened an empty store
    /// is `Probing` until its peers' answers decide, then `Admitted`, or
    /// `Fenced` for good if it turned out to be a wiped member.
    pub fn admission(&self) -> Admission {
        *self.inner.admission.borrow()
    }

    /// Whether `id` is in the membership this node knows (voter or learner).
    pub fn is_member(&self, id: NodeId) -> bool {
        self.member_info(id).is_some()
    }

    /// Every node with a mark (removed on purpose, holds the log), by id
    /// (local, possibly stale).
    pub fn node_marks(&self) -> Result<BTreeMap<NodeId, NodeMark>, MetaError> {
        Ok(self.view()?.node_marks()?)
    }

    /// The local state (possibly stale: call after a read barrier when it matters).
    pub(crate) fn view(&self) -> Result<StateView, MetaError> {
        // Only `shutdown` writes it, and it cannot panic while holding it.
        let state = self.inner.state.read().unwrap_or_else(|p| p.into_inner());
        state.clone().ok_or(MetaError::ShuttingDown)
    }

    /// The tenant's compression dictionaries (local, possibly stale).
    pub fn dictionaries(
        &self,
        tenant: &str,
    ) -> Result<Vec<dict_state::DictionaryEntry>, MetaError> {
        Ok(self.view()?.dictionaries(tenant)?)
    }

    /// The tenant's key slots (local, possibly stale).
    pub fn key_slots(&self, tenant: &str) -> Result<Vec<Vec<u8>>, MetaError> {
        Ok(self.view()?.key_slots(tenant)?)
    }

    /// For each id, whether the tenant's blob index has it (local, possibly stale).
    pub fn find_blobs(&self, tenant: &str, ids: &[Id32]) -> Result<Vec<bool>, MetaError> {
        Ok(self.view()?.find_blobs(tenant, ids)?)
    }

    /// Where the tenant's blob lives (local, possibly stale).
    pub fn locate_blob(&self, tenant: &str, id: &Id32) -> Result<Option<BlobLocation>, MetaError> {
        Ok(self.view()?.locate_blob(tenant, id)?)
    }

    /// One pack (local, possibly stale).
    pub fn pack(&self, id: &Id32) -> Result<Option<PackRecord>, MetaError> {
        Ok(self.view()?.pack(id)?)
    }

    /// Every pack, by id (local, possibly stale).
    pub fn packs(&self) -> Result<Vec<PackRecord>, MetaError> {
        Ok(self.view()?.packs()?)
    }

    /// The tenant's snapshots, of one dataset if given, oldest first (local, possibly stale).
    pub fn snapshots(
        &self,
        tenant: &str,
        dataset: Option<&str>,
    ) -> Result<Vec<SnapshotRecord>, MetaError> {
        Ok(self.view()?.snapshots(tenant, dataset)?)
    }

    /// Counters of the local state.
    pub fn stats(&self) -> Result<MetaStats, MetaError> {
        Ok(self.view()?.stats()?)
    }

    /// The cluster map as this node's membership knows it, by id: voters and
    /// learners, presumed up and not draining (the gateway, which knows
    /// liveness and drains, fills those in).
    pub fn node_views(&self) -> BTreeMap<NodeId, NodeView> {
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        // Storage classes live beside the membership (tiering); unreadable
        // records read as hot, the class every node starts in.
        let classes = self.node_classes().unwrap_or_default();
        membership
            .nodes()
            .map(|(id, info)| {
                let mut view = NodeView::member(*id, info, voters.contains(id));
                view.storage_class = classes.get(id).copied().unwrap_or_default();
                (*id, view)
            })
            .collect()
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// This node's current term.
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow().current_term
    }

    /// Index of the last entry applied to the local state (0 before any).
    pub fn last_applied(&self) -> u64 {
        self.last_applied_index().unwrap_or(0)
    }

    fn last_applied_index(&self) -> Option<u64> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|id| id.index)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The settings this group runs with.
    pub fn config(&self) -> &MetaConfig {
        &self.inner.config
    }

    /// The underlying openraft handle, for tests and status pages that need
    /// its metrics (`raft().wait(..)`).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    /// Stops Raft and releases the sled files (so the node can be reopened
    /// in the same process). Later calls on this handle fail with `ShuttingDown`.
    pub async fn shutdown(&self) -> Result<(), MetaError> {
        self.inner.stop.send_replace(true);
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let raft_stopped = self.inner.raft.shutdown().await;
        for task in tasks {
            // Every background task races its work against the stop signal.
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "metadata background task ended abnormally; continuing shutdown");
            }
        }
        self.inner
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // openraft drops the log store and state machine from its own tasks
        // shortly after the core stops; wait for the last sled handle to go.
        wait_released(self.inner.node_id, &self.inner.released).await?;
        if let Err(e) = raft_stopped {
            tracing::warn!(error = %e, "metadata raft core ended abnormally");
        }
        tracing::info!(node_id = self.inner.node_id, "metadata group stopped");
        Ok(())
    }
}

/// Waits until the last handle on the sled files is gone.
async fn wait_released(node_id: NodeId, released: &ReleaseWatch) -> Result<(), MetaError> {
    let started = Instant::now();
    while !released.is_released() {
        if started.elapsed() >= RELEASE_TIMEOUT {
            tracing::error!(
                node_id,
                "metadata files still open after shutdown; reopening will fail until they close"
            );
            return Err(MetaError::FilesBusy {
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
