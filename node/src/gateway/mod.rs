//! The client-facing service: every node is a gateway.
//!
//! It turns a client's pack into durable shards and index entries
//! (`write`), serves byte ranges of packs back (`read`), and fronts the
//! metadata group for key slots, dedup look-ups and the snapshot catalog.
//! It never sees plaintext: packs, trees and key slots arrive sealed.
//! Errors become gRPC statuses in exactly one place, [`GatewayError::into_status`].

mod read;
mod write;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::v1 as pb;
use cairn_proto::v1::cairn_server::{Cairn, CairnServer};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::erasure::Code;
use crate::liveness::Liveness;
use crate::meta::membership::{AddPlan, AddRefused, check_add};
use crate::meta::types::{Command, CommandResult, Id32, NodeId, NodeInfo, SnapshotRecord};
use crate::meta::{Meta, MetaError};
use crate::model::NodeView;
use crate::peers::addressed;
use crate::placement::PlacementError;
use crate::repair::{RepairError, RepairState, Repairer};
use crate::scrub::ScrubStats;
use crate::shard_io::ShardIo;

/// Most ids one FindBlobs/LocateBlobs request may carry.
pub const IDS_PER_REQUEST_MAX: usize = 100_000;
/// Pack reads one gateway serves at once.
pub const READS_IN_FLIGHT_MAX: usize = 4;
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
}

/// Everything one gateway request may fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid request: {what}")]
    InvalidArgument { what: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("snapshot refused: its root tree {tree} is not stored; upload it first")]
    MissingRootTree { tree: String },
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
            GatewayError::AlreadyExists { .. } => Status::already_exists(message),
            GatewayError::MissingRootTree { .. } => Status::failed_precondition(message),
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
        }
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
    /// (node, region, up)
    pub nodes: Vec<(NodeId, String, bool)>,
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
    /// Pack reads served at once; bounds memory (each holds up to k shards
    /// and the answer).
    read_permits: Semaphore,
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
            read_permits: Semaphore::new(READS_IN_FLIGHT_MAX),
        }
    }

    /// The gRPC service over a shared gateway (the repair worker holds it too).
    pub fn server(self: &Arc<Self>) -> CairnServer<Self> {
        CairnServer::from_arc(self.clone())
            .max_decoding_message_size(cairn_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(cairn_proto::MAX_MESSAGE_BYTES)
    }

    fn members(&self) -> BTreeMap<NodeId, (NodeInfo, bool)> {
        self.meta.members()
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

    /// The cluster map as this gateway sees it: the membership, with `up`
    /// from liveness (not declared down) and `draining` from drains in progress.
    pub fn node_views(&self) -> Vec<NodeView> {
        self.meta
            .node_views()
            .into_values()
            .map(|view| NodeView {
                up: view.id == self.node_id || !self.liveness.is_down(view.id),
                draining: self.repairer.is_draining(view.id),
                ..view
            })
            .collect()
    }

    /// Checks that `addr` is served by node `id` before it is added: a node
    /// that is not running (or another node at that address) must not enter
    /// the membership, where it would count for placement and voting.
    async fn must_answer_as(&self, id: NodeId, addr: &str) -> Result<(), GatewayError> {
        let unreachable = |reason: String| GatewayError::NodeUnreachable {
            node: id,
            addr: addr.to_string(),
            reason,
        };
        // Asked as a one-node map: the node is not a member yet.
        let candidate = BTreeMap::from([(
            id,
            (
                NodeInfo {
                    region: String::new(),
                    addr: addr.to_string(),
                },
                false,
            ),
        )]);
        match self.io.stats(id, &candidate).await {
            Ok(_) => Ok(()),
            Err(crate::shard_io::ShardIoError::Remote {
                code: tonic::Code::FailedPrecondition,
                message,
                ..
            }) => Err(GatewayError::WrongNodeAtAddress {
                node: id,
                addr: addr.to_string(),
                answer: message,
            }),
            Err(error) => Err(unreachable(error.to_string())),
        }
    }

    /// The status for an error, with what this node knows of the outage
    /// when the metadata group has no quorum (clients fail fast on it):
    /// a write that cannot commit or place its shards for that reason says
    /// "quorum lost", not a retryable "unavailable" the client would cycle on.
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

    /// Values for the metrics page.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let (shards, shard_bytes) = self.io.store().stats();
        MetricsSnapshot {
            term: self.meta.term(),
            is_leader: self.is_leader(),
            last_applied: self.meta.last_applied(),
            shards,
            shard_bytes,
            protection: self.repairer.protection().unwrap_or_default(),
            nodes: self
                .members()
                .iter()
                .map(|(id, (info, _))| (*id, info.region.clone(), !self.liveness.is_down(*id)))
                .collect(),
        }
    }

    pub fn repair_state(&self) -> Arc<RepairState> {
        self.repairer.state()
    }

    /// The repairer this gateway hands repair work to.
    pub fn repairer(&self) -> &Arc<Repairer> {
        &self.repairer
    }

    /// Reports bad shards to the leader's repairer (this node's if it leads).
    /// Bounded by the RPC deadline; a failed report is logged, and scrub or
    /// the next check finds the shard again.
    pub(crate) async fn report_to_leader(
        &self,
        faults: Vec<pb::ShardFault>,
    ) -> Result<(), GatewayError> {
        if faults.is_empty() {
            return Ok(());
        }
        if self.is_leader() {
            return self.take_faults(&faults);
        }
        let (leader, mut client) = self.leader_client()?;
        client
            .report_faults(addressed(
                leader,
                pb::ReportFaultsRequest { faults },
                self.config.rpc_timeout,
            ))
            .await
            .map(|_| ())
            .map_err(|status| GatewayError::Leader {
                leader,
                message: status.message().to_string(),
            })
    }

    /// Parses reported faults and hands them to the repairer.
    fn take_faults(&self, faults: &[pb::ShardFault]) -> Result<(), GatewayError> {
        let mut parsed = Vec::with_capacity(faults.len());
        for fault in faults {
            parsed.push((id32(&fault.pack_id, "pack id")?, fault.index, fault.node_id));
        }
        self.repairer.report_faults(parsed);
        Ok(())
    }

    /// Repair counters for `cluster status`.
    fn repair_status(&self) -> pb::RepairStatus {
        use std::sync::atomic::Ordering;
        let r: Arc<RepairState> = self.repairer.state();
        pb::RepairStatus {
            queue: r.queue.load(Ordering::Relaxed),
            rate_bytes_per_s: r.rate_milli_bytes_per_s.load(Ordering::Relaxed) as f64 / 1000.0,
            packs_repaired_total: r.packs_repaired_total.load(Ordering::Relaxed),
            shards_written_total: r.shards_written_total.load(Ordering::Relaxed),
            bytes_written_total: r.bytes_written_total.load(Ordering::Relaxed),
            last_pass_unix_ms: r.last_pass_unix_ms.load(Ordering::Relaxed) as i64,
            errors_total: r.errors_total.load(Ordering::Relaxed),
            rate_limit_bytes_per_s: self.repairer.config().rate_bytes_per_s,
            lost_total: r.passes_lost_total.load(Ordering::Relaxed),
            shards_cleaned_total: r.shards_cleaned_total.load(Ordering::Relaxed),
            bad_shards_reported: r.bad_len() as u64,
        }
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
        let (info, _) = members.get(&leader).ok_or_else(|| GatewayError::NotFound {
            what: format!("leader node {leader} in the membership"),
        })?;
        let channel = crate::peers::lazy_channel(&info.addr, self.config.rpc_timeout)
            .map_err(|e| invalid(format!("leader address {}: {e}", info.addr)))?;
        Ok((
            leader,
            cairn_proto::v1::cairn_client::CairnClient::new(channel),
        ))
    }

    /// Shard and scrub stats of one node; `None` if it did not answer.
    async fn node_stats(
        &self,
        node: NodeId,
        members: &crate::shard_io::Members,
    ) -> Option<pb::ShardStatsReply> {
        if node == self.node_id {
            let (shards, bytes) = self.io.store().stats();
            return Some(pb::ShardStatsReply {
                shards,
                bytes,
                scrub: Some(self.scrub.report()),
            });
        }
        self.io.stats(node, members).await.ok()
    }
}

fn snapshot_to_wire(s: SnapshotRecord) -> pb::SnapshotRecord {
    pb::SnapshotRecord {
        id: s.id.to_vec(),
        dataset: s.dataset,
        parent: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
        time_unix_ms: s.time_unix_ms,
        kind: s.kind,
        root_tree: s.root_tree.to_vec(),
        sealed_info: s.sealed_info,
        files: s.files,
        bytes: s.bytes,
        bytes_added: s.bytes_added,
        tags: s.tags,
    }
}

fn snapshot_from_wire(s: pb::SnapshotRecord) -> Result<SnapshotRecord, GatewayError> {
    check_name(&s.dataset, "dataset")?;
    if !matches!(s.kind.as_str(), "full" | "incremental" | "differential") {
        return Err(invalid(format!("unknown snapshot kind {:?}", s.kind)));
    }
    if s.sealed_info.len() > 1024 * 1024 || s.tags.len() > 64 {
        return Err(invalid("snapshot info too large"));
    }
    for tag in &s.tags {
        check_name(tag, "tag")?;
    }
    Ok(SnapshotRecord {
        id: id32(&s.id, "snapshot id")?,
        dataset: s.dataset,
        parent: if s.parent.is_empty() {
            None
        } else {
            Some(id32(&s.parent, "parent")?)
        },
        time_unix_ms: s.time_unix_ms,
        kind: s.kind,
        root_tree: id32(&s.root_tree, "root tree")?,
        sealed_info: s.sealed_info,
        files: s.files,
        bytes: s.bytes,
        bytes_added: s.bytes_added,
        tags: s.tags,
    })
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

#[tonic::async_trait]
impl Cairn for Gateway {
    async fn init_tenant(
        &self,
        request: Request<pb::InitTenantRequest>,
    ) -> Result<Response<pb::InitTenantReply>, Status> {
        let req = request.into_inner();
        let run = async {
            check_name(&req.tenant, "tenant")?;
            if req.key_slot.is_empty() || req.key_slot.len() > 64 * 1024 {
                return Err(invalid("key slot must be 1 byte to 64 KiB"));
            }
            let tenant = req.tenant.clone();
            match self
                .meta
                .write(Command::InitTenant {
                    tenant: req.tenant,
                    key_slot: req.key_slot,
                })
                .await?
            {
                CommandResult::AlreadyExists => Err(GatewayError::AlreadyExists {
                    what: format!("a key for tenant {tenant:?}"),
                }),
                _ => Ok(pb::InitTenantReply {}),
            }
        };
        run.await.map(Response::new).map_err(|e| self.status(e))
    }

    async fn get_key_slots(
        &self,
        request: Request<pb::GetKeySlotsRequest>,
    ) -> Result<Response<pb::GetKeySlotsReply>, Status> {
        let req = request.into_inner();
        let run = async {
            check_name(&req.tenant, "tenant")?;
            self.catch_up().await;
            let key_slots = self.meta.key_slots(&req.tenant)?;
            Ok(pb::GetKeySlotsReply { key_slots })
        };
        run.await.map(Response::new).map_err(|e| self.status(e))
    }

    async fn find_blobs(
        &self,
        request: Request<pb::FindBlobsRequest>,
    ) -> Result<Response<pb::FindBlobsReply>, Status> {
        let req = request.into_inner();
        let run = async {
            check_name(&req.tenant, "tenant")?;
            // A stale "absent" only costs a re-upload; "present" is never
            // stale because index entries are added only for durable packs.
            let present = self.meta.find_blobs(&req.tenant, &ids(&req.ids)?)?;
            Ok(pb::FindBlobsReply { present })
        };
        run.await.map(Response::new).map_err(|e| self.status(e))
    }

    async fn locate_blobs(
        &self,
        request: Request<pb::LocateBlobsRequest>,
    ) -> Result<Response<pb::LocateBlobsReply>, Status> {
        let req = request.into_inner();
        let run = async {
            check_name(&req.tenant, "tenant")?;
            let ids = ids(&req.ids)?;
            let mut found = Vec::with_capacity(ids.len());
            let mut barrier_done = false;
            for id in &ids {
                let mut location = self.meta.locate_blob(&req.tenant, id)?;
                if location.is_none() && !barrier_done {
                    // This node may lag the leader: catch up once, then answer.
                    self.catch_up().await;
                    barrier_done = true;
                    location = self.meta.locate_blob(&req.tenant, id)?;
                }
                found.push(match location {
                    Some(loc) => pb::BlobLocation {
                        id: id.to_vec(),
                        found: true,
                        pack_id: loc.pack_id.to_vec(),
                        offset: loc.offset,
                        length: loc.length,
                    },
                    None => pb::BlobLocation {
                        id: id.to_vec(),
                        found: false,
                        ..Default::default()
                    },
                });
            }
            Ok(pb::LocateBlobsReply { locations: found })
        };
        run.await.map(Response::new).map_err(|e| self.status(e))
    }

    async fn put_pack(
        &self,
        request: Request<pb::PutPackRequest>,
    ) -> Result<Response<pb::PutPackReply>, Status> {
        self.put_pack_inner(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| self.status(e))
    }

    async fn read_pack(
        &self,
        request: Request<pb::ReadPackRequest>,
    ) -> Result<Response<pb::ReadPackReply>, Status> {
        self.read_pack_inner(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| self.status(e))
    }

    async fn commit_snapshot(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<pb::CommitSnapshotReply>, Status> {
        let req = request.into_inner();
        let run = async {
            check_name(&req.tenant, "tenant")?;
            let snapshot = snapshot_from_wire(
                req.snapshot
                    .ok_or_else(|| invalid("snapshot record missing"))?,
            )?;
            let tree = hex::encode(snapshot.root_tree);
            match self
                .meta
                .write(Command::CommitSnapshot {
                    tenant: req.tenant,
                    snapshot,
                })
                .await?
            {
                CommandResult::MissingRootTree => Err(GatewayError::MissingRootTree { tree }),
                _ => Ok(pb::CommitSnapshotReply {}),
            }
        };
        run.await.map(Response::new).map_err(|e| self.status(e))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsReply>, Status> {
        let req = request.into_inner();
        let run = async {
            check_name(&req.tenant, "tenant")?;
            self.catch_up().await;
            let dataset = (!req.dataset.is_empty()).then_some(req.dataset.as_str());
            let snapshots = self
                .meta
                .snapshots(&req.tenant, dataset)?
                .into_iter()
                .map(snapshot_to_wire)
                .collect();
            Ok(pb::ListSnapshotsReply { snapshots })
        };
        run.await.map(Response::new).map_err(|e| self.status(e))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        let run = async {
            let views = self.node_views();
            let members = self.members();
            let stats = futures::future::join_all(
                views.iter().map(|view| self.node_stats(view.id, &members)),
            )
            .await;
            let (orphan_shards, orphan_bytes) = stats
                .iter()
                .flatten()
                .filter_map(|s| s.scrub.as_ref())
                .fold((0, 0), |(n, b), s| {
                    (n + s.orphan_shards, b + s.orphan_bytes)
                });
            let nodes = views
                .into_iter()
                .zip(stats)
                .map(|(view, stats)| {
                    if stats.is_some() {
                        self.liveness.saw(view.id);
                    }
                    pb::NodeStatus {
                        node_id: view.id,
                        up: stats.is_some(),
                        voter: view.voter,
                        shards: stats.as_ref().map(|s| s.shards).unwrap_or_default(),
                        bytes: stats.as_ref().map(|s| s.bytes).unwrap_or_default(),
                        scrub: stats.and_then(|s| s.scrub),
                        last_seen_unix_ms: self.liveness.last_seen_unix_ms(view.id),
                        down_since_unix_ms: self.liveness.down_since_unix_ms(view.id),
                        region: view.region,
                        addr: view.addr,
                    }
                })
                .collect();
            let meta_stats = self.meta.stats()?;
            let leader = self.meta.leader();
            Ok::<_, GatewayError>(pb::ClusterStatusReply {
                nodes,
                leader_id: leader.unwrap_or_default(),
                has_leader: leader.is_some(),
                term: self.meta.term(),
                last_applied: self.meta.last_applied(),
                packs: meta_stats.packs,
                packs_degraded: meta_stats.packs_needing_rebalance,
                k: self.config.code.data,
                m: self.config.code.parity,
                protection: Some(self.repairer.protection()?.into_wire()),
                repair: Some(self.repair_status()),
                orphan_shards,
                orphan_bytes,
            })
        };
        run.await.map(Response::new).map_err(|e| self.status(e))
    }

    async fn check_packs(
        &self,
        request: Request<pb::CheckPacksRequest>,
    ) -> Result<Response<pb::CheckPacksReply>, Status> {
        self.check_packs_inner(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| self.status(e))
    }

    async fn repair(
        &self,
        request: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairReply>, Status> {
        if !self.is_leader() {
            let (leader, mut client) = self.leader_client().map_err(|e| self.status(e))?;
            return client
                .repair(addressed(
                    leader,
                    request.into_inner(),
                    self.config.rpc_timeout * 30,
                ))
                .await;
        }
        let outcome = self.repairer.pass(0).await;
        Ok(Response::new(pb::RepairReply {
            queued: outcome.queued,
            packs_repaired: outcome.repaired,
            errors: outcome.errors,
            lost: outcome.lost,
        }))
    }

    async fn report_faults(
        &self,
        request: Request<pb::ReportFaultsRequest>,
    ) -> Result<Response<pb::ReportFaultsReply>, Status> {
        let req = request.into_inner();
        if !self.is_leader() {
            let (leader, mut client) = self.leader_client().map_err(|e| self.status(e))?;
            return client
                .report_faults(addressed(leader, req, self.config.rpc_timeout))
                .await;
        }
        self.take_faults(&req.faults)
            .map(|()| Response::new(pb::ReportFaultsReply {}))
            .map_err(|e| self.status(e))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeReply>, Status> {
        let req = request.into_inner();
        let run = async {
            check_name(&req.region, "region")?;
            let (id, info) = (
                req.node_id,
                NodeInfo {
                    region: req.region,
                    addr: req.addr,
                },
            );
            let plan = check_add(&self.meta.node_views(), id, &info)?;
            if plan == AddPlan::Join {
                self.must_answer_as(id, &info.addr).await?;
            }
            // Runs on the leader: `Meta::add_node` forwards the change there.
            self.meta.add_node(id, info.clone()).await?;
            tracing::info!(node_id = self.node_id, added = id, region = %info.region, addr = %info.addr, ?plan, "node added to the cluster");
            Ok(pb::AddNodeReply {})
        };
        run.await.map(Response::new).map_err(|e| self.status(e))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        let req = request.into_inner();
        if !self.is_leader() {
            let (leader, mut client) = self.leader_client().map_err(|e| self.status(e))?;
            return client
                .remove_node(addressed(leader, req, self.config.rpc_timeout * 30))
                .await;
        }
        self.repairer
            .drain_and_remove(req.node_id, req.drain)
            .await
            .map(|shards_moved| Response::new(pb::RemoveNodeReply { shards_moved }))
            .map_err(|e| self.status(e.into()))
    }
}
