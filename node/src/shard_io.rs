//! Shard calls on any node: put, get, delete and stats of a shard on node X,
//! local store or peer over the `Shards` service alike.
//!
//! It owns the choice "local store or RPC", the deadline of every call, and
//! the liveness bookkeeping of [`Peers`] (a call that got no answer marks the
//! peer failed, any answer marks it up), and [`verify_shard`], the check of
//! a shard read back against what the index recorded. It must not decide
//! which shards go where (placement, repair). Gateway writes and reads and
//! the repairer share it, so neither imports the other.
//!
//! Errors keep the meaning of the gRPC code the peer answered with
//! ([`ShardIoError::kind`]): a corrupt shard (DataLoss) is a fault to report
//! and repair, a missing one (NotFound) too, a full disk (ResourceExhausted)
//! means place elsewhere, and no answer (Unavailable) means try another node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_proto::v1 as pb;
use tonic::Status;

use crate::erasure::parse_shard_file;
use crate::meta::types::PackRecord;
use crate::model::{Id32, NodeId, NodeView, ShardPlacement};
use crate::peers::{Peers, addressed};
use crate::shard_store::{ShardStore, ShardStoreError};

/// The cluster map by node id, as [`crate::meta::Meta::node_views`] returns it.
pub type Members = BTreeMap<NodeId, NodeView>;

/// What kind of failure a shard call met, whichever node served it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The node holds no such shard.
    NotFound,
    /// The node holds it but it fails its checksums or holds another shard.
    Corrupt,
    /// Disk full (or another limit) on that node.
    Exhausted,
    /// No answer: down, partitioned, or past the deadline.
    Unreachable,
    /// The node answered with any other refusal.
    Refused,
}

impl FaultKind {
    /// Faults of the stored shard itself: repair must rewrite it.
    pub fn is_shard_fault(self) -> bool {
        matches!(self, FaultKind::NotFound | FaultKind::Corrupt)
    }
}

/// Why a shard call failed.
#[derive(Debug, thiserror::Error)]
pub enum ShardIoError {
    #[error("node {node} is not a member of the cluster; refresh the cluster map")]
    NotMember { node: NodeId },
    #[error("node {node}: cannot connect to {addr}: {reason}; the node is treated as unreachable")]
    Connect {
        node: NodeId,
        addr: String,
        reason: String,
    },
    #[error("node {node} (this node): {source}")]
    Local {
        node: NodeId,
        #[source]
        source: ShardStoreError,
    },
    #[error("node {node}: {message}")]
    Remote {
        node: NodeId,
        code: tonic::Code,
        message: String,
    },
}

impl ShardIoError {
    /// The kind of failure, the same for a local store error and for the
    /// status a peer answered with.
    pub fn kind(&self) -> FaultKind {
        match self {
            ShardIoError::NotMember { .. } | ShardIoError::Connect { .. } => FaultKind::Unreachable,
            ShardIoError::Local { source, .. } => match source {
                ShardStoreError::NotFound { .. } => FaultKind::NotFound,
                ShardStoreError::Corrupt { .. } | ShardStoreError::Misfiled { .. } => {
                    FaultKind::Corrupt
                }
                ShardStoreError::DiskFull { .. } => FaultKind::Exhausted,
                _ => FaultKind::Refused,
            },
            ShardIoError::Remote { code, .. } => kind_of_code(*code),
        }
    }

    /// The node the call was for.
    pub fn node(&self) -> NodeId {
        match self {
            ShardIoError::NotMember { node }
            | ShardIoError::Connect { node, .. }
            | ShardIoError::Local { node, .. }
            | ShardIoError::Remote { node, .. } => *node,
        }
    }
}

fn kind_of_code(code: tonic::Code) -> FaultKind {
    match code {
        tonic::Code::NotFound => FaultKind::NotFound,
        tonic::Code::DataLoss => FaultKind::Corrupt,
        tonic::Code::ResourceExhausted => FaultKind::Exhausted,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
            FaultKind::Unreachable
        }
        _ => FaultKind::Refused,
    }
}

/// Shard calls to this node's store or to peers.
pub struct ShardIo {
    node_id: NodeId,
    store: Arc<ShardStore>,
    peers: Arc<Peers>,
    rpc_timeout: Duration,
}

impl ShardIo {
    /// The channels to peers (shared with the gateway's leader calls).
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    pub fn new(
        node_id: NodeId,
        store: Arc<ShardStore>,
        peers: Arc<Peers>,
        rpc_timeout: Duration,
    ) -> Self {
        Self {
            node_id,
            store,
            peers,
            rpc_timeout,
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// This node's store.
    pub fn store(&self) -> &Arc<ShardStore> {
        &self.store
    }

    /// Whether the last calls to `node` got answers (placement avoids it otherwise).
    pub fn presumed_up(&self, node: NodeId) -> bool {
        self.peers.presumed_up(node)
    }

    fn client(
        &self,
        node: NodeId,
        members: &Members,
    ) -> Result<pb::shards_client::ShardsClient<tonic::transport::Channel>, ShardIoError> {
        let view = members.get(&node).ok_or(ShardIoError::NotMember { node })?;
        self.peers
            .shards(node, &view.addr)
            .map_err(|e| ShardIoError::Connect {
                node,
                addr: view.addr.clone(),
                reason: e.to_string(),
            })
    }

    fn answered<T>(&self, node: NodeId, result: Result<T, Status>) -> Result<T, ShardIoError> {
        match result {
            Ok(value) => {
                self.peers.record_ok(node);
                Ok(value)
            }
            Err(status) => {
                if kind_of_code(status.code()) == FaultKind::Unreachable {
                    self.peers.record_failure(node);
                } else {
                    self.peers.record_ok(node);
                }
                Err(ShardIoError::Remote {
                    node,
                    code: status.code(),
                    message: status.message().to_string(),
                })
            }
        }
    }

    fn local(&self, source: ShardStoreError) -> ShardIoError {
        ShardIoError::Local {
            node: self.node_id,
            source,
        }
    }

    /// Writes one whole shard file to `node`; durable there when this returns Ok.
    pub async fn put(
        &self,
        node: NodeId,
        file: impl Into<prost::bytes::Bytes>,
        members: &Members,
    ) -> Result<(), ShardIoError> {
        let file = file.into();
        if node == self.node_id {
            return self
                .store
                .put(file)
                .await
                .map(|_| ())
                .map_err(|e| self.local(e));
        }
        let mut client = self.client(node, members)?;
        let request = pb::PutShardRequest { shard: file };
        let result = client
            .put_shard(addressed(node, request, self.rpc_timeout))
            .await;
        self.answered(node, result).map(|_| ())
    }

    /// Reads one whole shard file (header and payload, verified by its store).
    pub async fn get(
        &self,
        node: NodeId,
        pack_id: &Id32,
        index: u32,
        members: &Members,
    ) -> Result<Vec<u8>, ShardIoError> {
        if node == self.node_id {
            return self
                .store
                .get(pack_id, index)
                .await
                .map_err(|e| self.local(e));
        }
        let mut client = self.client(node, members)?;
        let request = pb::GetShardRequest {
            pack_id: pack_id.to_vec(),
            index,
        };
        let result = client
            .get_shard(addressed(node, request, self.rpc_timeout))
            .await;
        self.answered(node, result).map(|r| r.into_inner().shard)
    }

    /// Deletes one shard on `node`; deleting a missing shard succeeds.
    pub async fn delete(
        &self,
        node: NodeId,
        pack_id: &Id32,
        index: u32,
        members: &Members,
    ) -> Result<(), ShardIoError> {
        if node == self.node_id {
            return self
                .store
                .delete(pack_id, index)
                .await
                .map(|_| ())
                .map_err(|e| self.local(e));
        }
        let mut client = self.client(node, members)?;
        let request = pb::DeleteShardRequest {
            pack_id: pack_id.to_vec(),
            index,
        };
        let result = client
            .delete_shard(addressed(node, request, self.rpc_timeout))
            .await;
        self.answered(node, result).map(|_| ())
    }

    /// The shard stats `node` reports about itself.
    pub async fn stats(
        &self,
        node: NodeId,
        members: &Members,
    ) -> Result<pb::ShardStatsReply, ShardIoError> {
        let mut client = self.client(node, members)?;
        let request = addressed(node, pb::ShardStatsRequest {}, self.rpc_timeout);
        let result = client.shard_stats(request).await;
        self.answered(node, result).map(|r| r.into_inner())
    }
}

/// The pair of checks on a shard read back: its own header and checksum,
/// then agreement with what the index recorded when it was written.
/// Returns the payload, or why the shard is bad (a fault to repair).
pub fn verify_shard(
    pack: &PackRecord,
    placement: &ShardPlacement,
    file: &[u8],
) -> Result<Vec<u8>, String> {
    let (header, payload) = parse_shard_file(file)
        .map_err(|e| format!("node {}: shard {}: {e}", placement.node, placement.index))?;
    if header.pack_id != pack.id
        || header.index != placement.index
        || header.checksum != placement.checksum
        || header.shard_len != pack.shard_len
    {
        return Err(format!(
            "node {}: shard {} does not match the index (wrong pack, index or checksum)",
            placement.node, placement.index
        ));
    }
    Ok(payload.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_store_errors_map_to_the_same_kinds() {
        assert_eq!(kind_of_code(tonic::Code::DataLoss), FaultKind::Corrupt);
        assert_eq!(kind_of_code(tonic::Code::NotFound), FaultKind::NotFound);
        assert_eq!(
            kind_of_code(tonic::Code::ResourceExhausted),
            FaultKind::Exhausted
        );
        assert_eq!(
            kind_of_code(tonic::Code::Unavailable),
            FaultKind::Unreachable
        );
        let local = |source| ShardIoError::Local { node: 1, source };
        assert_eq!(
            local(ShardStoreError::NotFound {
                pack_id: [0; 32],
                index: 1
            })
            .kind(),
            FaultKind::NotFound
        );
        assert_eq!(
            local(ShardStoreError::Misfiled {
                pack_id: [0; 32],
                index: 1,
                found_pack_id: [1; 32],
                found_index: 0
            })
            .kind(),
            FaultKind::Corrupt
        );
        assert!(FaultKind::Corrupt.is_shard_fault());
        assert!(!FaultKind::Unreachable.is_shard_fault());
    }
}
