//! The `Cairn` gRPC service: a thin adapter. Each call decodes its request,
//! runs the gateway operation (`catalog`, `ingest`, `read`, `admin`) and maps
//! the outcome to a status in one place; calls only the leader serves are
//! forwarded to it here.

use cairn_proto::v1 as pb;
use cairn_proto::v1::cairn_server::Cairn;
use tonic::{Request, Response, Status};

use super::Gateway;
use crate::peers::addressed;

#[tonic::async_trait]
impl Cairn for Gateway {
    async fn init_tenant(
        &self,
        request: Request<pb::InitTenantRequest>,
    ) -> Result<Response<pb::InitTenantReply>, Status> {
        self.answer(self.init_tenant_inner(request.into_inner()).await)
    }

    async fn get_key_slots(
        &self,
        request: Request<pb::GetKeySlotsRequest>,
    ) -> Result<Response<pb::GetKeySlotsReply>, Status> {
        self.answer(self.get_key_slots_inner(request.into_inner()).await)
    }

    async fn find_blobs(
        &self,
        request: Request<pb::FindBlobsRequest>,
    ) -> Result<Response<pb::FindBlobsReply>, Status> {
        self.answer(self.find_blobs_inner(request.into_inner()).await)
    }

    async fn locate_blobs(
        &self,
        request: Request<pb::LocateBlobsRequest>,
    ) -> Result<Response<pb::LocateBlobsReply>, Status> {
        self.answer(self.locate_blobs_inner(request.into_inner()).await)
    }

    async fn put_pack(
        &self,
        request: Request<pb::PutPackRequest>,
    ) -> Result<Response<pb::PutPackReply>, Status> {
        self.answer(self.put_pack_inner(request.into_inner()).await)
    }

    async fn read_pack(
        &self,
        request: Request<pb::ReadPackRequest>,
    ) -> Result<Response<pb::ReadPackReply>, Status> {
        self.answer(self.read_pack_inner(request.into_inner()).await)
    }

    async fn commit_snapshot(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<pb::CommitSnapshotReply>, Status> {
        self.answer(self.commit_snapshot_inner(request.into_inner()).await)
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsReply>, Status> {
        self.answer(self.list_snapshots_inner(request.into_inner()).await)
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        self.answer(self.cluster_status_inner(request.into_inner()).await)
    }

    async fn check_packs(
        &self,
        request: Request<pb::CheckPacksRequest>,
    ) -> Result<Response<pb::CheckPacksReply>, Status> {
        self.answer(self.check_packs_inner(request.into_inner()).await)
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
        self.answer(self.add_node_inner(request.into_inner()).await)
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

    // Trust-boundary calls: not served yet (issue 7 in progress).
    async fn create_token(
        &self,
        _request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenReply>, Status> {
        Err(Status::unimplemented("tokens are not available yet"))
    }

    async fn list_tokens(
        &self,
        _request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensReply>, Status> {
        Err(Status::unimplemented("tokens are not available yet"))
    }

    async fn revoke_token(
        &self,
        _request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenReply>, Status> {
        Err(Status::unimplemented("tokens are not available yet"))
    }

    async fn add_key_slot(
        &self,
        _request: Request<pb::AddKeySlotRequest>,
    ) -> Result<Response<pb::AddKeySlotReply>, Status> {
        Err(Status::unimplemented(
            "key slot changes are not available yet",
        ))
    }

    async fn remove_key_slot(
        &self,
        _request: Request<pb::RemoveKeySlotRequest>,
    ) -> Result<Response<pb::RemoveKeySlotReply>, Status> {
        Err(Status::unimplemented(
            "key slot changes are not available yet",
        ))
    }

    async fn audit_log(
        &self,
        _request: Request<pb::AuditLogRequest>,
    ) -> Result<Response<pb::AuditLogReply>, Status> {
        Err(Status::unimplemented("the audit log is not available yet"))
    }

    async fn who_am_i(
        &self,
        _request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIReply>, Status> {
        Err(Status::unimplemented("tokens are not available yet"))
    }
}
