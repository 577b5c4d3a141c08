//! The client side of the `Raft` gRPC service: openraft's `RaftNetworkFactory`
//! and `RaftNetwork`, plus the calls `Meta` makes itself (`Forward`,
//! `ReadIndex`, `ChangeMembership`, `ClusterInfo`).
//!
//! This is an openraft adapter (a move to openraft 0.10 touches it). It owns
//! one lazily connected channel per peer address and the error mapping from
//! transport failures to openraft's `RPCError`. It must not retry on its own:
//! openraft (or `Meta`) decides.
//!
//! Invariants:
//! - no connection is made before the first RPC (`new_client` only records the target);
//! - every request names its target in `x-cairn-node-id`, and the server
//!   refuses a mismatch, so a reused address never answers for another node;
//! - a refused connection maps to `RPCError::Unreachable` (openraft backs off),
//!   a deadline to `RPCError::Timeout`, anything else on the way to
//!   `RPCError::Network`; the peer's own Raft error to `RPCError::RemoteError`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_proto::RAFT_MESSAGE_BYTES;
use cairn_proto::transport::{DialTls, lazy_channel};
use cairn_proto::v1::RaftPayload;
use cairn_proto::v1::raft_client::RaftClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RPCTypes, RaftNetwork, RaftNetworkFactory};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Code;
use tonic::transport::Channel;

use super::codec::{self, CodecError};
use super::types::{NodeId, NodeInfo, TypeConfig};

/// gRPC metadata key naming the node a request is meant for.
pub use crate::peers::NODE_ID_HEADER;

/// The RPCs of the `Raft` service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Forward,
    ReadIndex,
    ChangeMembership,
    ClusterInfo,
}

impl Rpc {
    fn request_name(self) -> &'static str {
        match self {
            Rpc::AppendEntries => "append-entries request",
            Rpc::Vote => "vote request",
            Rpc::InstallSnapshot => "install-snapshot request",
            Rpc::Forward => "forwarded command",
            Rpc::ReadIndex => "read-index request",
            Rpc::ChangeMembership => "membership change request",
            Rpc::ClusterInfo => "cluster-info request",
        }
    }

    fn response_name(self) -> &'static str {
        match self {
            Rpc::AppendEntries => "append-entries response",
            Rpc::Vote => "vote response",
            Rpc::InstallSnapshot => "install-snapshot response",
            Rpc::Forward => "forwarded command response",
            Rpc::ReadIndex => "read-index response",
            Rpc::ChangeMembership => "membership change response",
            Rpc::ClusterInfo => "cluster-info response",
        }
    }
}

/// Why a call to a peer failed before its answer could be read.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The address is not a valid URI.
    #[error("node {target} has an invalid address {addr:?}: {source}; fix the cluster map")]
    BadAddress {
        target: NodeId,
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// Nothing answered (connection refused, reset, DNS): the request was not processed.
    #[error("node {target} at {addr} is unreachable: {}; will retry after a backoff", status.message())]
    Unreachable {
        target: NodeId,
        addr: String,
        status: tonic::Status,
    },
    /// Another node answers at that address (or an old one without the header check).
    #[error("the server at {addr} is not node {target}: {}; check the cluster map", status.message())]
    WrongNode {
        target: NodeId,
        addr: String,
        status: tonic::Status,
    },
    /// No answer within the deadline: the request may or may not have been processed.
    #[error("{rpc:?} to node {target} at {addr} timed out after {timeout:?}")]
    Timeout {
        rpc: Rpc,
        target: NodeId,
        addr: String,
        timeout: Duration,
    },
    /// The server answered with an error status.
    #[error("{rpc:?} to node {target} at {addr} failed: {} ({:?})", status.message(), status.code())]
    Failed {
        rpc: Rpc,
        target: NodeId,
        addr: String,
        status: tonic::Status,
    },
    /// The payload could not be encoded or the answer decoded.
    #[error("{rpc:?} with node {target}: {source}")]
    Codec {
        rpc: Rpc,
        target: NodeId,
        #[source]
        source: CodecError,
    },
}

impl CallError {
    /// True if the request certainly did not reach a Raft handler, so it is
    /// safe to send it again (elsewhere).
    pub fn not_delivered(&self) -> bool {
        matches!(
            self,
            CallError::BadAddress { .. }
                | CallError::Unreachable { .. }
                | CallError::WrongNode { .. }
        )
    }
}

/// Lazily connected channels to peers, keyed by node id and address (over
/// TLS a channel checked one node's certificate). Cheap to clone.
#[derive(Clone)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<(NodeId, String), Channel>>>,
    connect_timeout: Duration,
    /// This node's identity and the cluster CA; `None` is `--insecure`.
    tls: Option<DialTls>,
}

impl PeerChannels {
    /// No channel is opened until the first call to an address.
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_tls(connect_timeout, None)
    }

    /// Like [`PeerChannels::new`]; over mutual TLS when `tls` is given, each
    /// peer proving it is the node dialed.
    pub fn with_tls(connect_timeout: Duration, tls: Option<DialTls>) -> Self {
        Self {
            channels: Arc::new(Mutex::new(HashMap::new())),
            connect_timeout,
            tls,
        }
    }

    fn client(&self, target: NodeId, addr: &str) -> Result<RaftClient<Channel>, CallError> {
        // The map only caches channels; a panic elsewhere cannot corrupt it.
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (target, addr.to_string());
        let channel = match channels.get(&key) {
            Some(channel) => channel.clone(),
            None => {
                // The shared transport policy: HTTP/2 keep-alive finds a
                // partitioned peer in seconds, as on the shard channels.
                let tls = self.tls.as_ref().map(|tls| tls.for_node(target));
                let channel =
                    lazy_channel(addr, self.connect_timeout, tls.as_ref()).map_err(|source| {
                        CallError::BadAddress {
                            target,
                            addr: addr.to_string(),
                            source,
                        }
                    })?;
                channels.insert(key, channel.clone());
                channel
            }
        };
        Ok(RaftClient::new(channel)
            .max_decoding_message_size(RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(RAFT_MESSAGE_BYTES))
    }

    /// Sends `request` to node `target` at `addr` and decodes its answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: NodeId,
        addr: &str,
        rpc: Rpc,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let codec_err = |source| CallError::Codec {
            rpc,
            target,
            source,
        };
        let data = codec::encode(rpc.request_name(), request).map_err(codec_err)?;
        let mut client = self.client(target, addr)?;
        let mut request = tonic::Request::new(RaftPayload { data });
        request
            .metadata_mut()
            .insert(NODE_ID_HEADER, tonic::metadata::MetadataValue::from(target));
        request.set_timeout(timeout);
        let sent = async {
            match rpc {
                Rpc::AppendEntries => client.append_entries(request).await,
                Rpc::Vote => client.vote(request).await,
                Rpc::InstallSnapshot => client.install_snapshot(request).await,
                Rpc::Forward => client.forward(request).await,
                Rpc::ReadIndex => client.read_index(request).await,
                Rpc::ChangeMembership => client.change_membership(request).await,
                Rpc::ClusterInfo => client.cluster_info(request).await,
            }
        };
        let addr = addr.to_string();
        let response = match tokio::time::timeout(timeout, sent).await {
            Err(_elapsed) => {
                return Err(CallError::Timeout {
                    rpc,
                    target,
                    addr,
                    timeout,
                });
            }
            Ok(Err(status)) => {
                return Err(match status.code() {
                    Code::Unavailable => CallError::Unreachable {
                        target,
                        addr,
                        status,
                    },
                    Code::FailedPrecondition => CallError::WrongNode {
                        target,
                        addr,
                        status,
                    },
                    Code::DeadlineExceeded => CallError::Timeout {
                        rpc,
                        target,
                        addr,
                        timeout,
                    },
                    _ => CallError::Failed {
                        rpc,
                        target,
                        addr,
                        status,
                    },
                });
            }
            Ok(Ok(response)) => response.into_inner(),
        };
        codec::decode(rpc.response_name(), &response.data).map_err(codec_err)
    }
}

/// Creates one [`PeerNetwork`] per replication target.
pub struct NetworkFactory {
    node_id: NodeId,
    channels: PeerChannels,
}

impl NetworkFactory {
    /// A factory for node `node_id`, sharing `channels` with the rest of `Meta`.
    pub fn new(node_id: NodeId, channels: PeerChannels) -> Self {
        Self { node_id, channels }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerNetwork {
        PeerNetwork {
            node_id: self.node_id,
            target,
            node: node.clone(),
            channels: self.channels.clone(),
        }
    }
}

/// openraft's view of one peer.
pub struct PeerNetwork {
    node_id: NodeId,
    target: NodeId,
    node: NodeInfo,
    channels: PeerChannels,
}

impl PeerNetwork {
    async fn send<Req, Resp, E>(
        &self,
        rpc: Rpc,
        action: RPCTypes,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<Resp, RaftError<NodeId, E>> = self
            .channels
            .call(
                self.target,
                &self.node.addr,
                rpc,
                request,
                option.hard_ttl(),
            )
            .await
            .map_err(|e| match e {
                CallError::BadAddress { .. }
                | CallError::Unreachable { .. }
                | CallError::WrongNode { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                CallError::Timeout { timeout, .. } => RPCError::Timeout(Timeout {
                    action,
                    id: self.node_id,
                    target: self.target,
                    timeout,
                }),
                CallError::Failed { .. } | CallError::Codec { .. } => {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        answer.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send(Rpc::AppendEntries, RPCTypes::AppendEntries, &rpc, &option)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(
            Rpc::InstallSnapshot,
            RPCTypes::InstallSnapshot,
            &rpc,
            &option,
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send(Rpc::Vote, RPCTypes::Vote, &rpc, &option).await
    }
}
