//! The `Shards` gRPC service: the network face of this node's shard store.
//!
//! It owns request validation (ids, the addressed node) and the one mapping
//! from store errors to gRPC status codes ([`to_status`]). It must not decide
//! anything about placement or repair and must not leak internal detail
//! (paths, `Debug` output) to callers.
//!
//! Invariants: a request addressed to another node (metadata
//! `x-cairn-node-id`) is refused before it touches the store, so a reused
//! address can never answer for the wrong node; every shard crossing this
//! service is verified by the store on the way in and on the way out.

use std::sync::Arc;

use cairn_proto::v1::shards_server::{Shards, ShardsServer};
use cairn_proto::v1::{
    DeleteShardReply, DeleteShardRequest, GetShardReply, GetShardRequest, PutShardReply,
    PutShardRequest, ShardStatsReply, ShardStatsRequest,
};
use cairn_proto::{CONTROL_MESSAGE_BYTES, SHARD_MESSAGE_BYTES};
use tonic::{Request, Response, Status};
use tracing::warn;

use super::{ShardStore, ShardStoreError};
use crate::erasure::MAX_TOTAL_SHARDS;
use crate::meta::types::{Id32, NodeId};

/// Request metadata key naming the node a request is meant for.
pub use crate::peers::NODE_ID_HEADER as NODE_ID_METADATA;

/// Errors of the shard service, before they become gRPC statuses.
#[derive(Debug, thiserror::Error)]
pub enum ShardServiceError {
    /// `pack_id` is not 32 bytes.
    #[error("pack_id must be 32 bytes, got {len}")]
    BadPackId { len: usize },
    /// A shard index no pack can have.
    #[error("shard index {index} out of range: a pack has at most {MAX_TOTAL_SHARDS} shards")]
    BadIndex { index: u32 },
    /// A shard over the largest a pack can produce.
    #[error("shard of {len} bytes is over the limit of {SHARD_MESSAGE_BYTES} bytes")]
    TooLarge { len: usize },
    /// The node id metadata is not a decimal node id.
    #[error("{NODE_ID_METADATA} metadata must be a decimal node id")]
    BadNodeIdMetadata,
    /// The request names another node: the address now belongs to someone else.
    #[error(
        "wrong node: this is node {this}, the request is for node {wanted}; refresh the cluster map"
    )]
    WrongNode { this: NodeId, wanted: NodeId },
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] ShardStoreError),
}

/// The one place where shard service errors become gRPC statuses.
///
/// InvalidArgument: the request is wrong (bad shard, bad id). NotFound: no
/// such shard here. DataLoss: the stored shard fails its checksum (read
/// another, repair this one). ResourceExhausted: disk full (place elsewhere).
/// FailedPrecondition: wrong node. Internal: anything else, with a short
/// message; the full error is logged here, never sent.
pub fn to_status(err: &ShardServiceError) -> Status {
    use ShardStoreError as S;
    match err {
        ShardServiceError::BadPackId { .. }
        | ShardServiceError::BadIndex { .. }
        | ShardServiceError::BadNodeIdMetadata => Status::invalid_argument(err.to_string()),
        ShardServiceError::WrongNode { .. } => Status::failed_precondition(err.to_string()),
        ShardServiceError::TooLarge { .. } => Status::resource_exhausted(err.to_string()),
        ShardServiceError::Store(store) => match store {
            S::BadShard(_) => Status::invalid_argument(err.to_string()),
            S::NotFound { .. } => Status::not_found(err.to_string()),
            S::Corrupt { .. } | S::Misfiled { .. } => Status::data_loss(err.to_string()),
            S::DiskFull { .. } => Status::resource_exhausted("disk full on this node"),
            S::Conflict { .. } => Status::already_exists(err.to_string()),
            S::Io { op, source, .. } => {
                warn!(error = %store, "shard store I/O failure, request failed; the caller will try another shard or node");
                Status::internal(format!(
                    "shard store I/O failure during {op} ({})",
                    source.kind()
                ))
            }
            S::Open { .. } | S::TaskFailed { .. } => {
                warn!(error = %store, "shard store failure, request failed");
                Status::internal("shard store failure")
            }
        },
    }
}

impl From<ShardServiceError> for Status {
    fn from(err: ShardServiceError) -> Self {
        to_status(&err)
    }
}

/// Serves this node's [`ShardStore`] over gRPC.
pub struct ShardService {
    store: Arc<ShardStore>,
    node_id: NodeId,
    /// This node's scrub counters, reported with the shard stats.
    scrub: Option<Arc<crate::scrub::ScrubStats>>,
}

impl ShardService {
    /// A service for `store`, answering as node `node_id`.
    pub fn new(store: Arc<ShardStore>, node_id: NodeId) -> Self {
        Self {
            store,
            node_id,
            scrub: None,
        }
    }

    /// Also reports these scrub counters in `ShardStats`.
    pub fn with_scrub(mut self, scrub: Arc<crate::scrub::ScrubStats>) -> Self {
        self.scrub = Some(scrub);
        self
    }

    /// The tonic server, with message limits large enough for whole
    /// shards; the node's server narrows them per method (`limits`).
    pub fn into_server(self) -> ShardsServer<ShardService> {
        ShardsServer::new(self)
            .max_decoding_message_size(SHARD_MESSAGE_BYTES.max(CONTROL_MESSAGE_BYTES))
            .max_encoding_message_size(SHARD_MESSAGE_BYTES.max(CONTROL_MESSAGE_BYTES))
    }

    /// Refuses requests addressed to another node. Requests without the
    /// metadata are accepted (tools and tests talking to one node directly).
    fn check_addressee<T>(&self, request: &Request<T>) -> Result<(), ShardServiceError> {
        let Some(value) = request.metadata().get(NODE_ID_METADATA) else {
            return Ok(());
        };
        let wanted: NodeId = value
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or(ShardServiceError::BadNodeIdMetadata)?;
        if wanted != self.node_id {
            return Err(ShardServiceError::WrongNode {
                this: self.node_id,
                wanted,
            });
        }
        Ok(())
    }
}

fn shard_index(index: u32) -> Result<u32, ShardServiceError> {
    if index >= MAX_TOTAL_SHARDS {
        return Err(ShardServiceError::BadIndex { index });
    }
    Ok(index)
}

fn pack_id(bytes: &[u8]) -> Result<Id32, ShardServiceError> {
    bytes
        .try_into()
        .map_err(|_| ShardServiceError::BadPackId { len: bytes.len() })
}

#[tonic::async_trait]
impl Shards for ShardService {
    async fn put_shard(
        &self,
        request: Request<PutShardRequest>,
    ) -> Result<Response<PutShardReply>, Status> {
        self.check_addressee(&request)?;
        let shard = request.into_inner().shard;
        if shard.len() > SHARD_MESSAGE_BYTES {
            return Err(ShardServiceError::TooLarge { len: shard.len() }.into());
        }
        self.store
            .put(shard)
            .await
            .map_err(ShardServiceError::from)?;
        Ok(Response::new(PutShardReply {}))
    }

    async fn get_shard(
        &self,
        request: Request<GetShardRequest>,
    ) -> Result<Response<GetShardReply>, Status> {
        self.check_addressee(&request)?;
        let req = request.into_inner();
        let id = pack_id(&req.pack_id)?;
        let shard = self
            .store
            .get(&id, shard_index(req.index)?)
            .await
            .map_err(ShardServiceError::from)?;
        Ok(Response::new(GetShardReply { shard }))
    }

    async fn delete_shard(
        &self,
        request: Request<DeleteShardRequest>,
    ) -> Result<Response<DeleteShardReply>, Status> {
        self.check_addressee(&request)?;
        let req = request.into_inner();
        let id = pack_id(&req.pack_id)?;
        self.store
            .delete(&id, shard_index(req.index)?)
            .await
            .map_err(ShardServiceError::from)?;
        Ok(Response::new(DeleteShardReply {}))
    }

    async fn shard_stats(
        &self,
        request: Request<ShardStatsRequest>,
    ) -> Result<Response<ShardStatsReply>, Status> {
        self.check_addressee(&request)?;
        let (shards, bytes) = self.store.stats();
        Ok(Response::new(ShardStatsReply {
            shards,
            bytes,
            scrub: self.scrub.as_ref().map(|s| s.report()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erasure::{Code, encode_pack};
    use cairn_proto::v1::shards_client::ShardsClient;
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::Code as GrpcCode;
    use tonic::transport::Channel;

    const NODE: NodeId = 7;

    /// Serves a fresh store on 127.0.0.1:0; returns a client and the guards.
    async fn serve() -> (
        ShardsClient<Channel>,
        tokio::sync::oneshot::Sender<()>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(ShardStore::open(dir.path()).expect("open store"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = ShardService::new(store, NODE).into_server();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("server runs until stopped");
        });
        let client = ShardsClient::connect(format!("http://{addr}"))
            .await
            .expect("connect")
            .max_decoding_message_size(cairn_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(cairn_proto::MAX_MESSAGE_BYTES);
        (client, stop, dir)
    }

    fn to_node<T>(node: NodeId, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let value = node.to_string().parse().expect("digits are valid metadata");
        request.metadata_mut().insert(NODE_ID_METADATA, value);
        request
    }

    #[tokio::test]
    async fn put_get_round_trip_over_grpc() {
        let (mut client, _stop, _dir) = serve().await;
        // A shard larger than tonic's 4 MiB default limit.
        let pack: Vec<u8> = (0..20_000_000u32).map(|i| (i % 251) as u8).collect();
        let shards = encode_pack(Code::default(), *blake3::hash(&pack).as_bytes(), &pack);
        let file = shards[5].to_file_bytes();
        client
            .put_shard(to_node(
                NODE,
                PutShardRequest {
                    shard: file.clone().into(),
                },
            ))
            .await
            .expect("put");
        let got = client
            .get_shard(to_node(
                NODE,
                GetShardRequest {
                    pack_id: shards[5].header.pack_id.to_vec(),
                    index: 5,
                },
            ))
            .await
            .expect("get")
            .into_inner()
            .shard;
        assert_eq!(got, file);
        let stats = client
            .shard_stats(ShardStatsRequest {})
            .await
            .expect("stats")
            .into_inner();
        assert_eq!((stats.shards, stats.bytes), (1, file.len() as u64));
        client
            .delete_shard(DeleteShardRequest {
                pack_id: shards[5].header.pack_id.to_vec(),
                index: 5,
            })
            .await
            .expect("delete");
        let missing = client
            .get_shard(GetShardRequest {
                pack_id: shards[5].header.pack_id.to_vec(),
                index: 5,
            })
            .await
            .expect_err("deleted");
        assert_eq!(missing.code(), GrpcCode::NotFound);
    }

    #[tokio::test]
    async fn bad_requests_get_precise_codes_and_the_server_keeps_serving() {
        let (mut client, _stop, _dir) = serve().await;
        let garbage = client
            .put_shard(PutShardRequest {
                shard: b"definitely not a shard".to_vec().into(),
            })
            .await
            .expect_err("garbage refused");
        assert_eq!(garbage.code(), GrpcCode::InvalidArgument);

        let mut tampered = encode_pack(Code::default(), [3; 32], b"pack")[0].to_file_bytes();
        let last = tampered.len() - 1;
        tampered[last] ^= 0xff;
        let status = client
            .put_shard(PutShardRequest {
                shard: tampered.into(),
            })
            .await
            .expect_err("tampered refused");
        assert_eq!(status.code(), GrpcCode::InvalidArgument);
        assert!(
            !status.message().contains('{'),
            "no Debug output: {}",
            status.message()
        );

        let short_id = client
            .get_shard(GetShardRequest {
                pack_id: vec![1; 31],
                index: 0,
            })
            .await
            .expect_err("short id");
        assert_eq!(short_id.code(), GrpcCode::InvalidArgument);

        let bad_index = client
            .delete_shard(DeleteShardRequest {
                pack_id: vec![1; 32],
                index: u32::MAX,
            })
            .await
            .expect_err("index out of range");
        assert_eq!(bad_index.code(), GrpcCode::InvalidArgument);
        assert!(
            bad_index.message().contains("at most 32 shards"),
            "{bad_index}"
        );

        let wrong = client
            .shard_stats(to_node(NODE + 1, ShardStatsRequest {}))
            .await
            .expect_err("wrong node");
        assert_eq!(wrong.code(), GrpcCode::FailedPrecondition);
        assert!(
            wrong.message().contains("wrong node: this is node 7"),
            "{}",
            wrong.message()
        );

        // Still serving after all of that.
        let good = encode_pack(Code::default(), [3; 32], b"pack")[0].to_file_bytes();
        client
            .put_shard(to_node(NODE, PutShardRequest { shard: good.into() }))
            .await
            .expect("good put after bad ones");
    }

    #[test]
    fn status_mapping() {
        let id = [0u8; 32];
        let code = |e: ShardStoreError| to_status(&ShardServiceError::Store(e)).code();
        assert_eq!(
            code(ShardStoreError::Corrupt {
                pack_id: id,
                index: 0,
                reason: crate::erasure::ShardFormatError::PayloadChecksum,
            }),
            GrpcCode::DataLoss
        );
        assert_eq!(
            code(ShardStoreError::DiskFull { dir: "x".into() }),
            GrpcCode::ResourceExhausted
        );
        let io = to_status(&ShardServiceError::Store(ShardStoreError::Io {
            op: "read",
            path: "/secret/place".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        }));
        assert_eq!(io.code(), GrpcCode::Internal);
        assert!(
            !io.message().contains("/secret"),
            "paths stay on the node: {}",
            io.message()
        );
        assert_eq!(
            code(ShardStoreError::NotFound {
                pack_id: id,
                index: 1
            }),
            GrpcCode::NotFound
        );
    }
}
