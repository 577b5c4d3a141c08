//! The server side of the `Raft` gRPC service: hands openraft's RPCs to the
//! local `Raft`, runs forwarded commands and membership changes, and answers
//! read-index and cluster-info requests.
//!
//! This is an openraft adapter (a move to openraft 0.10 touches it). It owns
//! the node-id check, the admission gate and the gRPC status mapping of this
//! service, in one place: a request for another node is `FailedPrecondition`,
//! an undecodable payload is `InvalidArgument`, a vote, append or snapshot
//! reaching a node that is not admitted (see `admission`) is `Unavailable`
//! (the sender treats it as unreachable and backs off), and a state read that
//! fails while answering cluster-info is `Unavailable` too. Raft-level
//! outcomes (including errors such as "forward to leader" or a refused
//! membership change) travel inside the payload as an encoded `Result`, so
//! the caller sees the typed error, never a gRPC status.

use std::time::{Duration, Instant};

use cairn_proto::v1::RaftPayload;
use cairn_proto::v1::raft_server::Raft as RaftRpc;
use openraft::Raft;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use super::Meta;
use super::admission::{Admission, ClusterInfoRequest};
use super::codec;
use super::membership::{ChangeRequest, MembershipChange};
use super::network::NODE_ID_HEADER;
use super::types::{Command, NodeId, TypeConfig};
use crate::auth::VerifiedPeer;

/// The `Raft` gRPC service of one node.
#[derive(Clone)]
pub struct RaftService {
    node_id: NodeId,
    raft: Raft<TypeConfig>,
    meta: Meta,
}

impl RaftService {
    /// Serves `meta`'s Raft.
    pub fn new(meta: Meta) -> Self {
        Self {
            node_id: meta.node_id(),
            raft: meta.raft().clone(),
            meta,
        }
    }

    /// Lets Raft traffic through only once this node is admitted: a node
    /// that started empty must not vote or take entries before it knows its
    /// disk was not wiped.
    fn gate(&self) -> Result<(), Status> {
        match self.meta.admission() {
            Admission::Admitted => Ok(()),
            Admission::Probing => Err(Status::unavailable(format!(
                "node {} started with an empty store and is still checking with its peers that its log was not lost; not taking part in raft yet",
                self.node_id
            ))),
            Admission::Fenced => Err(Status::unavailable(format!(
                "node {} lost its log while a member (wiped data directory) and is fenced; remove it from the cluster and restart it",
                self.node_id
            ))),
        }
    }

    /// Checks the target header and decodes the payload.
    fn accept<T: DeserializeOwned>(
        &self,
        what: &'static str,
        request: Request<RaftPayload>,
    ) -> Result<T, Status> {
        let target = request
            .metadata()
            .get(NODE_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<NodeId>().ok());
        match target {
            Some(target) if target == self.node_id => {}
            Some(target) => {
                return Err(Status::failed_precondition(format!(
                    "request for node {target} reached node {}; the sender's cluster map is wrong",
                    self.node_id
                )));
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "request without a valid {NODE_ID_HEADER} header refused by node {}",
                    self.node_id
                )));
            }
        }
        codec::decode(what, &request.into_inner().data)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

/// The node id the request's certificate proved (`None` in `--insecure`
/// mode: the server's layer refuses node services without one otherwise).
fn peer_of<T>(request: &Request<T>) -> Option<NodeId> {
    request.extensions().get::<VerifiedPeer>().map(|p| p.0)
}

/// A payload that names its sender (a vote's candidate, an append's or a
/// snapshot's leader, a cluster-info asker) must name the certificate's node:
/// a node cannot speak for another.
fn same_sender(peer: Option<NodeId>, claimed: Option<NodeId>, what: &str) -> Result<(), Status> {
    match (peer, claimed) {
        (Some(peer), Some(claimed)) if peer != claimed => {
            tracing::warn!(
                peer,
                claimed,
                what,
                "refused a raft payload naming another node as its sender"
            );
            Err(Status::permission_denied(format!(
                "{what} claims to come from node {claimed}, but the certificate is node {peer}'s"
            )))
        }
        (Some(peer), None) => {
            tracing::warn!(peer, what, "refused a raft payload naming no sender");
            Err(Status::permission_denied(format!("{what} names no sender")))
        }
        _ => Ok(()),
    }
}

fn reply<T: Serialize>(what: &'static str, value: &T) -> Result<Response<RaftPayload>, Status> {
    match codec::encode(what, value) {
        Ok(data) => Ok(Response::new(RaftPayload { data })),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a raft reply; the caller will retry");
            Err(Status::internal("cannot encode the reply"))
        }
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let peer = peer_of(&request);
        let rpc: AppendEntriesRequest<TypeConfig> =
            self.accept("append-entries request", request)?;
        same_sender(
            peer,
            rpc.vote.leader_id().voted_for(),
            "append-entries request",
        )?;
        self.gate()?;
        reply(
            "append-entries response",
            &self.raft.append_entries(rpc).await,
        )
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let peer = peer_of(&request);
        let rpc: VoteRequest<NodeId> = self.accept("vote request", request)?;
        same_sender(peer, rpc.vote.leader_id().voted_for(), "vote request")?;
        self.gate()?;
        reply("vote response", &self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let peer = peer_of(&request);
        let rpc: InstallSnapshotRequest<TypeConfig> =
            self.accept("install-snapshot request", request)?;
        same_sender(
            peer,
            rpc.vote.leader_id().voted_for(),
            "install-snapshot request",
        )?;
        self.gate()?;
        reply(
            "install-snapshot response",
            &self.raft.install_snapshot(rpc).await,
        )
    }

    async fn forward(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let mut cmd: Command = self.accept("forwarded command", request)?;
        // Forwarded proposals carry the leader's time, not the sender's.
        cmd.stamp(super::wall_clock_ms());
        reply(
            "forwarded command response",
            &self.raft.client_write(cmd).await,
        )
    }

    async fn read_index(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let () = self.accept("read-index request", request)?;
        // Only the read log id matters to the caller, which then waits for
        // its own state machine to reach it.
        let answer = self
            .raft
            .get_read_log_id()
            .await
            .map(|(read_log_id, _applied)| read_log_id);
        reply("read-index response", &answer)
    }

    async fn change_membership(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let peer = peer_of(&request);
        let ChangeRequest { change, within_ms } =
            self.accept("membership change request", request)?;
        // Members relay operators' changes; a node that is not a member
        // (admission lets it through) may only ask to add itself.
        if let Some(peer) = peer
            && !crate::tls::MemberCheck::admits(&self.meta, peer)
        {
            let own = matches!(&change, MembershipChange::Add { id, .. } if *id == peer);
            if !own {
                tracing::warn!(
                    peer,
                    ?change,
                    "refused a membership change from a node that is not a member"
                );
                return Err(Status::permission_denied(format!(
                    "node {peer} is not a member and may only ask to add itself"
                )));
            }
        }
        // The caller's budget, capped by ours.
        let within = Duration::from_millis(within_ms).min(self.meta.config().membership_timeout());
        let answer = self
            .meta
            .change_on_leader(&change, Instant::now() + within)
            .await;
        reply("membership change response", &answer)
    }

    async fn cluster_info(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let peer = peer_of(&request);
        let ClusterInfoRequest { asker } = self.accept("cluster-info request", request)?;
        same_sender(peer, Some(asker), "cluster-info request")?;
        match self.meta.cluster_info(asker) {
            Ok(info) => reply("cluster-info response", &info),
            Err(e) => {
                tracing::warn!(node_id = self.node_id, asker, error = %e, "cannot answer cluster-info; the asker will ask again");
                Err(Status::unavailable(format!(
                    "node {} cannot read its metadata state",
                    self.node_id
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_must_name_the_certificates_node() {
        assert!(same_sender(Some(3), Some(3), "vote request").is_ok());
        let err = same_sender(Some(7), Some(3), "vote request").expect_err("7 speaking for 3");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("node 3"), "{}", err.message());
        assert!(same_sender(Some(7), None, "append-entries request").is_err());
        // --insecure: no certificate, nothing to compare.
        assert!(same_sender(None, Some(3), "vote request").is_ok());
    }
}
