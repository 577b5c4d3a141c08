//! The client-facing service: every node is a gateway.
//!
//! `service` is the thin gRPC adapter; behind it, `ingest` turns a client's
//! pack into durable shards and index entries, `read` serves byte ranges of
//! packs back (and checks them), `catalog` fronts the metadata group for key
//! slots, dedup look-ups and snapshot records, and `admin` answers for the
//! cluster itself (status, node view, adding nodes, fault intake). It never
//! sees plaintext: packs, trees and key slots arrive sealed. Errors become
//! gRPC statuses in exactly one place, `GatewayError::into_status`.

mod admin;
mod catalog;
mod check;
mod collect;
mod ingest;
mod lifecycle;
mod read;
mod service;
pub mod stream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::v1::cairn_server::CairnServer;
use tokio::sync::Semaphore;
use tonic::{Response, Status};
use tracing::warn;

use crate::auth::audit::Auditor;
use crate::auth::layer::Authenticator;
use crate::erasure::Code;
use crate::liveness::Liveness;
use crate::meta::membership::AddRefused;
use crate::meta::types::{Id32, NodeId};
use crate::meta::{Meta, MetaError};
use crate::placement::PlacementError;
use crate::repair::{RepairError, RepairState, Repairer};
use crate::scrub::ScrubStats;
use crate::shard_io::{Members, ShardIo};

/// Most ids one FindBlobs/LocateBlobs request may carry.
pub const IDS_PER_REQUEST_MAX: usize = 100_000;
/// Longest tenant or dataset name.
pub const NAME_LEN_MAX: usize = 128;

/// Settings of the gateway role.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub code: Code,
    /// Deadline of one shard RPC to a peer.
    pub rpc_timeout: Duration,
    /// Packs encoded at once; bounds memory (each holds ~2.5× a pack).
    pub packs_in_flight_max: usize,
    pub repair: crate::repair::RepairConfig,
    /// Garbage collection and policies (`[lifecycle]`).
    pub lifecycle: crate::config::LifecycleSection,
    /// `--insecure`: reported in `cluster status`.
    pub insecure: bool,
}

/// Everything one gateway request may fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid request: {what}")]
    InvalidArgument { what: String },
    #[error("{what} not found")]
    NotFound { what: String },
    /// The node's memory budget for this kind of work is in use.
    #[error("{what}")]
    Busy { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("{what}")]
    Precondition { what: String },
    #[error("token unknown, revoked or expired")]
    Unauthenticated,
    #[error(transparent)]
    Denied(#[from] crate::auth::permission::Denied),
    #[error("snapshot refused: its root tree {tree} is not stored; upload it first")]
    MissingRootTree { tree: String },
    /// Blobs a snapshot references were garbage-collected while its backup
    /// ran: the commit is refused and the client backs up again in full.
    #[error(
        "snapshot refused: {missing} blob(s) this snapshot references were garbage-collected during the backup (e.g. {example}); it is retried as a full backup"
    )]
    ReferencesCollected { missing: u64, example: String },
    /// The commit kept losing the race against garbage collection.
    #[error(
        "snapshot refused: garbage collection kept sweeping while it committed ({attempts} attempts); retry the backup"
    )]
    GcRaced { attempts: u32 },
    #[error("metadata group: {0}")]
    Meta(#[from] MetaError),
    #[error("cannot add node: {0}")]
    AddRefused(#[from] AddRefused),
    #[error(
        "cannot add node {node}: nothing answers as it at {addr} ({reason}); start it first (cairn-node --node-id {node} --listen {addr} ...) and check that this node can reach it"
    )]
    NodeUnreachable {
        node: NodeId,
        addr: String,
        reason: String,
    },
    #[error("cannot add node {node}: another node answers at {addr} ({answer})")]
    WrongNodeAtAddress {
        node: NodeId,
        addr: String,
        answer: String,
    },
    #[error("repair: {0}")]
    Repair(#[from] RepairError),
    /// The leader's own answer to a call forwarded to it, passed on as is.
    #[error("{}", .0.message())]
    Forwarded(Status),
    #[error("the Raft leader (node {leader}) did not take the request: {message}; retry")]
    Leader { leader: NodeId, message: String },
    #[error("cannot place pack: {0}")]
    Placement(#[from] PlacementError),
    #[error(
        "only {durable} shard(s) of pack {pack} became durable, {needed} needed ({failures}); nothing was acknowledged"
    )]
    TooFewShards {
        pack: String,
        durable: usize,
        needed: usize,
        failures: String,
    },
    #[error(
        "pack {pack} cannot be read: {good} good shard(s) reachable, {needed} needed ({failures})"
    )]
    Unrecoverable {
        pack: String,
        good: usize,
        needed: usize,
        failures: String,
    },
}

impl GatewayError {
    /// The one mapping from gateway errors to gRPC codes.
    fn into_status(self) -> Status {
        let message = self.to_string();
        match self {
            GatewayError::InvalidArgument { .. } => Status::invalid_argument(message),
            GatewayError::NotFound { .. } => Status::not_found(message),
            GatewayError::Busy { .. } => Status::resource_exhausted(message),
            GatewayError::AlreadyExists { .. } => Status::already_exists(message),
            GatewayError::Precondition { .. } => Status::failed_precondition(message),
            GatewayError::Unauthenticated => Status::unauthenticated(message),
            GatewayError::Denied(_) => Status::permission_denied(message),
            GatewayError::MissingRootTree { .. } => Status::failed_precondition(message),
            GatewayError::ReferencesCollected { .. } | GatewayError::GcRaced { .. } => {
                Status::aborted(message)
            }
            GatewayError::AddRefused(refused) if refused.is_bad_request() => {
                Status::invalid_argument(message)
            }
            GatewayError::AddRefused(_)
            | GatewayError::NodeUnreachable { .. }
            | GatewayError::WrongNodeAtAddress { .. } => Status::failed_precondition(message),
            GatewayError::Meta(MetaError::Change(change)) if !change.is_transient() => {
                Status::failed_precondition(message)
            }
            GatewayError::Meta(_) => Status::unavailable(message),
            GatewayError::Repair(RepairError::Meta(MetaError::Change(change)))
                if !change.is_transient() =>
            {
                Status::failed_precondition(message)
            }
            GatewayError::Repair(_) | GatewayError::Leader { .. } => Status::unavailable(message),
            GatewayError::Placement(_) | GatewayError::TooFewShards { .. } => {
                Status::unavailable(message)
            }
            GatewayError::Unrecoverable { .. } => Status::data_loss(message),
            GatewayError::Forwarded(status) => status,
        }
    }
}

impl From<crate::meta::state::StateError> for GatewayError {
    fn from(error: crate::meta::state::StateError) -> Self {
        GatewayError::Meta(MetaError::from(error))
    }
}

fn invalid(what: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument { what: what.into() }
}

/// Parses a 32-byte id from the wire.
pub(crate) fn id32(bytes: &[u8], field: &str) -> Result<Id32, GatewayError> {
    bytes
        .try_into()
        .map_err(|_| invalid(format!("{field} must be 32 bytes, got {}", bytes.len())))
}

fn check_name(name: &str, field: &str) -> Result<(), GatewayError> {
    if name.is_empty() || name.len() > NAME_LEN_MAX || name.chars().any(|c| c.is_control()) {
        return Err(invalid(format!(
            "{field} must be 1..={NAME_LEN_MAX} printable characters"
        )));
    }
    Ok(())
}

/// A point-in-time view for the metrics page.
pub struct MetricsSnapshot {
    pub term: u64,
    pub is_leader: bool,
    pub last_applied: u64,
    pub shards: u64,
    pub shard_bytes: u64,
    pub protection: crate::repair::plan::ProtectionCounts,
    /// The cluster map as this node sees it.
    pub nodes: Vec<crate::model::NodeView>,
}

/// Bytes through this gateway's client calls (metrics): pack bytes
/// acknowledged by `PutPack` and range bytes answered by `ReadPack`.
#[derive(Debug, Default)]
pub struct TrafficStats {
    pub ingest_bytes_total: std::sync::atomic::AtomicU64,
    pub read_bytes_total: std::sync::atomic::AtomicU64,
}

/// The gateway: shared by every request on this node.
pub struct Gateway {
    node_id: NodeId,
    region: String,
    config: GatewayConfig,
    meta: Meta,
    /// Shard calls on this node's store and on peers.
    io: Arc<ShardIo>,
    liveness: Arc<Liveness>,
    /// Owns repair passes, drains and fault intake; the gateway only calls it.
    repairer: Arc<Repairer>,
    /// This node's scrub counters (for `cluster status`).
    scrub: Arc<ScrubStats>,
    pack_permits: Semaphore,
    /// Writes audit entries for this node's requests (refusals rate-limited).
    auditor: Arc<Auditor>,
    /// Resolves callers: the service's front door and the metrics page's.
    auth: Arc<Authenticator>,
    /// This node's memory pools (`limits`): the server reserves request
    /// bytes in them; pack reads reserve their answer's bytes here.
    budget: crate::limits::Budget,
    /// Serializes garbage collections (user `Prune`s and the periodic run).
    gc_lock: tokio::sync::Mutex<()>,
    gc_stats: crate::gc::GcStats,
    /// Tiering's counters: the mover's and shard read latencies by class.
    tiering: Arc<crate::tiering::TierStats>,
    traffic: TrafficStats,
    /// Live record streams' counters (metrics).
    streams: stream::StreamStats,
    /// This gateway as its server shares it: `AppendStream`'s reply stream
    /// outlives the call's borrow of it.
    shared: std::sync::OnceLock<std::sync::Weak<Gateway>>,
    /// Flipped when the node starts shutting down: open `AppendStream`
    /// calls end (the writer reconnects elsewhere) instead of holding the
    /// server's drain open forever.
    closing: tokio::sync::watch::Sender<bool>,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)] // one owner wires these once, in `server::run`
    pub fn new(
        node_id: NodeId,
        region: String,
        config: GatewayConfig,
        meta: Meta,
        io: Arc<ShardIo>,
        liveness: Arc<Liveness>,
        repairer: Arc<Repairer>,
        scrub: Arc<ScrubStats>,
    ) -> Self {
        let pack_permits = Semaphore::new(config.packs_in_flight_max.max(1));
        let auditor = Arc::new(Auditor::new(meta.clone()));
        // Secure unless told otherwise (`secured(true)`).
        let auth = Arc::new(Authenticator::new(meta.clone(), false, auditor.clone()));
        Self {
            node_id,
            region,
            config,
            meta,
            io,
            liveness,
            repairer,
            scrub,
            pack_permits,
            auditor,
            auth,
            budget: crate::limits::Budget::default(),
            gc_lock: tokio::sync::Mutex::new(()),
            gc_stats: crate::gc::GcStats::default(),
            tiering: Arc::default(),
            traffic: TrafficStats::default(),
            streams: stream::StreamStats::default(),
            shared: std::sync::OnceLock::new(),
            closing: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Sets whether callers are trusted without credentials (`--insecure`).
    pub fn secured(mut self, insecure: bool) -> Self {
        self.auth = Arc::new(Authenticator::new(
            self.meta.clone(),
            insecure,
            self.auditor.clone(),
        ));
        self
    }

    /// How this node resolves callers (the metrics page asks it too).
    pub fn authenticator(&self) -> &Arc<Authenticator> {
        &self.auth
    }

    /// This node's memory pools, shared with the server's request limits.
    pub fn budget(&self) -> &crate::limits::Budget {
        &self.budget
    }

    /// The gRPC service over a shared gateway (the repair worker holds it
    /// too). `limits::routes` mounts it method by method, each behind the
    /// [`Gateway::authenticator`], with that method's message limits (set
    /// there, the one place every bound lives).
    pub fn server(self: &Arc<Self>) -> CairnServer<Self> {
        let _first = self.shared.set(Arc::downgrade(self));
        CairnServer::from_arc(self.clone())
    }

    fn members(&self) -> Members {
        self.meta.node_views()
    }

    /// What this node knows of a lost quorum: `Some(reason)` when a
    /// majority of the voters is unreachable from here (a peer counts as
    /// unreachable once its last call failed or the prober declared it down).
    fn quorum_lost(&self) -> Option<String> {
        let views = self.node_views();
        let mut regions: BTreeMap<&str, bool> = BTreeMap::new();
        let (mut voters, mut voters_up) = (0usize, 0usize);
        for view in &views {
            let reachable = view.id == self.node_id || (view.up && self.io.presumed_up(view.id));
            *regions.entry(view.region.as_str()).or_default() |= reachable;
            if view.voter {
                voters += 1;
                voters_up += usize::from(reachable);
            }
        }
        if voters == 0 || voters_up * 2 > voters {
            return None;
        }
        let lost: Vec<&str> = regions
            .iter()
            .filter(|(_, up)| !**up)
            .map(|(r, _)| *r)
            .collect();
        Some(format!(
            "quorum lost: {} of {} regions unreachable ({}); {voters_up} of {voters} voters reachable, writes need a majority of voters",
            lost.len(),
            regions.len(),
            if lost.is_empty() {
                "none".to_string()
            } else {
                lost.join(", ")
            },
        ))
    }

    /// The status for an error, with what this node knows of the outage
    /// when the metadata group has no quorum (clients fail fast on it):
    /// a write that cannot commit or place its shards for that reason says
    /// "quorum lost", not a retryable "unavailable" the client would cycle on.
    /// The one mapping from an operation's outcome to a gRPC answer.
    fn answer<T>(&self, outcome: Result<T, GatewayError>) -> Result<Response<T>, Status> {
        outcome.map(Response::new).map_err(|e| self.status(e))
    }

    fn status(&self, error: GatewayError) -> Status {
        let quorum_related = matches!(
            &error,
            GatewayError::Meta(
                MetaError::NoLeader { .. }
                    | MetaError::NoQuorum { .. }
                    | MetaError::Unavailable { .. }
                    | MetaError::Unconfirmed { .. }
            ) | GatewayError::Placement(_)
                | GatewayError::TooFewShards { .. }
                // Shards out of reach because their regions are: not lost,
                // and not worth retrying elsewhere until they return.
                | GatewayError::Unrecoverable { .. }
        );
        if quorum_related && let Some(reason) = self.quorum_lost() {
            return Status::unavailable(format!("{reason}; {error}"));
        }
        error.into_status()
    }

    /// Brings the local state up to date with the leader when it can. Without
    /// a quorum, reads go on from the local state: snapshots are immutable,
    /// so at worst the newest commits are missing — and a restore during a
    /// disaster must not wait for the metadata group to heal. When no leader
    /// is known and a majority of voters is unreachable, the barrier is not
    /// even tried: it could only wait out its whole deadline on every read.
    async fn catch_up(&self) {
        if self.meta.leader().is_none()
            && let Some(reason) = self.quorum_lost()
        {
            warn!(%reason, "no linearizable read possible; serving the local (possibly stale) state");
            return;
        }
        if let Err(error) = self.meta.read_barrier().await {
            warn!(%error, "no linearizable read possible; serving the local (possibly stale) state");
        }
    }

    /// The metadata group handle (the collector proposes through it).
    pub(crate) fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Shard calls (the collector deletes the shards of dropped packs).
    pub(crate) fn shard_io(&self) -> &Arc<ShardIo> {
        &self.io
    }

    /// The `[lifecycle]` settings.
    pub(crate) fn lifecycle(&self) -> &crate::config::LifecycleSection {
        &self.config.lifecycle
    }

    /// The cluster map with liveness, for shard calls.
    pub(crate) fn member_views(&self) -> Members {
        self.members()
    }

    /// [`Gateway::catch_up`] for the collector: a read barrier when possible.
    pub(crate) async fn read_barrier(&self) {
        self.catch_up().await
    }

    /// One garbage collection at a time on this node ([`crate::gc`]).
    pub(crate) fn gc_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.gc_lock
    }

    /// What this node's garbage collections did (metrics).
    pub fn gc_stats(&self) -> &crate::gc::GcStats {
        &self.gc_stats
    }

    /// Tiering's counters on this node (mover, shard reads by class).
    pub fn tiering(&self) -> &Arc<crate::tiering::TierStats> {
        &self.tiering
    }

    /// Ends every open `AppendStream` call (the node is shutting down).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Flips when the node starts shutting down.
    pub(crate) fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Live record streams' counters (metrics).
    pub fn streams(&self) -> &stream::StreamStats {
        &self.streams
    }

    /// Bytes through this gateway (metrics).
    pub fn traffic(&self) -> &TrafficStats {
        &self.traffic
    }

    pub fn repair_state(&self) -> Arc<RepairState> {
        self.repairer.state()
    }

    /// The repairer this gateway hands repair work to.
    pub fn repairer(&self) -> &Arc<Repairer> {
        &self.repairer
    }

    pub fn is_leader(&self) -> bool {
        self.meta.leader() == Some(self.node_id)
    }

    /// A client for the current Raft leader, for the few calls only it serves.
    fn leader_client(
        &self,
    ) -> Result<
        (
            NodeId,
            cairn_proto::v1::cairn_client::CairnClient<tonic::transport::Channel>,
        ),
        GatewayError,
    > {
        let leader = self
            .meta
            .leader()
            .ok_or(GatewayError::Meta(MetaError::NoLeader { waited_ms: 0 }))?;
        let members = self.members();
        let view = members.get(&leader).ok_or_else(|| GatewayError::NotFound {
            what: format!("leader node {leader} in the membership"),
        })?;
        // Over TLS as this node, checking the leader's certificate.
        let channel = self
            .io
            .peers()
            .channel(leader, &view.addr)
            .map_err(|e| invalid(format!("leader address {}: {e}", view.addr)))?;
        Ok((
            leader,
            cairn_proto::v1::cairn_client::CairnClient::new(channel),
        ))
    }
}

/// Refuses a fault report over [`cairn_proto::FAULTS_PER_REPORT_MAX`]
/// (scrub and readers report a few at a time).
fn check_fault_count(count: usize) -> Result<(), GatewayError> {
    if count > cairn_proto::FAULTS_PER_REPORT_MAX {
        return Err(invalid(format!(
            "{count} faults in one report, at most {}",
            cairn_proto::FAULTS_PER_REPORT_MAX
        )));
    }
    Ok(())
}

fn ids(raw: &[Vec<u8>]) -> Result<Vec<Id32>, GatewayError> {
    if raw.len() > IDS_PER_REQUEST_MAX {
        return Err(invalid(format!(
            "{} ids in one request, at most {IDS_PER_REQUEST_MAX}",
            raw.len()
        )));
    }
    raw.iter().map(|id| id32(id, "blob id")).collect()
}
