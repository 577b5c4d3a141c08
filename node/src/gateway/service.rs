//! The `Cairn` gRPC service: a thin adapter. Each call takes its caller
//! (resolved before decoding by `auth::layer`), authorizes it
//! (`auth::permission`; a refusal is audited), runs the gateway operation
//! (`catalog`, `ingest`, `read`, `admin`) and maps the outcome to a status in
//! one place; calls only the leader serves are forwarded to it here, with
//! the caller's token, so the leader authorizes and audits them again.

use cairn_proto::v1 as pb;
use cairn_proto::v1::cairn_server::Cairn;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Request, Response, Status};

use super::stream::{OpenStream, WriterGuard};
use super::{Gateway, GatewayError};
use crate::auth::Caller;
use crate::auth::audit::actor_of;
use crate::auth::permission::{Denied, Op, authorize};
use crate::limits::StreamReservations;
use crate::peers::addressed;

/// The caller's `authorization` header, to forward with a call to the leader.
fn credential(metadata: &MetadataMap) -> Option<AsciiMetadataValue> {
    metadata.get("authorization").cloned()
}

/// A request to the leader carrying the original caller's credential.
pub(super) fn to_leader<T>(
    leader: u64,
    message: T,
    timeout: std::time::Duration,
    credential: Option<AsciiMetadataValue>,
) -> Request<T> {
    let mut request = addressed(leader, message, timeout);
    if let Some(value) = credential {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

impl Gateway {
    /// Records a refusal (rate-limited) and says why, naming no other tenant.
    fn refuse(&self, caller: &Caller, op: Op, target: &str, denied: Denied) -> Status {
        self.auditor
            .refused(actor_of(caller), op.name(), target, &denied.0);
        Status::permission_denied(denied.to_string())
    }

    /// Authorizes `op` for the request's caller: the caller and the tenant
    /// the call acts on.
    fn admit<T>(
        &self,
        request: &Request<T>,
        op: Op,
        requested_tenant: &str,
    ) -> Result<(Caller, String), Status> {
        let caller = Caller::of(request)?;
        let target = if requested_tenant.is_empty() {
            String::new()
        } else {
            format!("tenant {requested_tenant}")
        };
        let tenant = authorize(&caller, op, requested_tenant)
            .map_err(|denied| self.refuse(&caller, op, &target, denied))?;
        Ok((caller, tenant))
    }

    /// [`Gateway::answer`], auditing a refusal found inside the operation
    /// (a pack of another tenant, a token creation out of scope).
    fn answer_for<T>(
        &self,
        caller: &Caller,
        op: Op,
        outcome: Result<T, GatewayError>,
    ) -> Result<Response<T>, Status> {
        match outcome {
            Err(GatewayError::Denied(denied)) => Err(self.refuse(caller, op, "", denied)),
            other => self.answer(other),
        }
    }

    /// Audits a privileged call that ran here (membership, repair).
    pub(super) async fn audit_ran(&self, caller: &Caller, op: Op, target: &str, result: &str) {
        if let Err(error) = self.auditor.record(caller, op.name(), target, result).await {
            tracing::warn!(%error, action = op.name(), "audit entry not written");
        }
    }
}

fn outcome_text<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(status) => format!("failed: {}", status.message()),
    }
}

#[tonic::async_trait]
impl Cairn for Gateway {
    async fn init_tenant(
        &self,
        request: Request<pb::InitTenantRequest>,
    ) -> Result<Response<pb::InitTenantReply>, Status> {
        let (caller, tenant) = self.admit(&request, Op::InitTenant, &request.get_ref().tenant)?;
        let req = pb::InitTenantRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.init_tenant_inner(req, &caller).await)
    }

    async fn get_key_slots(
        &self,
        request: Request<pb::GetKeySlotsRequest>,
    ) -> Result<Response<pb::GetKeySlotsReply>, Status> {
        let (_, tenant) = self.admit(&request, Op::GetKeySlots, &request.get_ref().tenant)?;
        self.answer(
            self.get_key_slots_inner(pb::GetKeySlotsRequest { tenant })
                .await,
        )
    }

    async fn find_blobs(
        &self,
        request: Request<pb::FindBlobsRequest>,
    ) -> Result<Response<pb::FindBlobsReply>, Status> {
        let (_, tenant) = self.admit(&request, Op::FindBlobs, &request.get_ref().tenant)?;
        let req = pb::FindBlobsRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.find_blobs_inner(req).await)
    }

    async fn locate_blobs(
        &self,
        request: Request<pb::LocateBlobsRequest>,
    ) -> Result<Response<pb::LocateBlobsReply>, Status> {
        // The blob index is per tenant, so every location found is a pack
        // of this tenant.
        let (_, tenant) = self.admit(&request, Op::LocateBlobs, &request.get_ref().tenant)?;
        let req = pb::LocateBlobsRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.locate_blobs_inner(req).await)
    }

    async fn put_pack(
        &self,
        request: Request<pb::PutPackRequest>,
    ) -> Result<Response<pb::PutPackReply>, Status> {
        let (_, tenant) = self.admit(&request, Op::PutPack, &request.get_ref().tenant)?;
        let req = pb::PutPackRequest {
            tenant,
            ..request.into_inner()
        };
        let bytes = req.data.len() as u64;
        let outcome = self.put_pack_inner(req).await;
        if outcome.is_ok() {
            self.traffic()
                .ingest_bytes_total
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        }
        self.answer(outcome)
    }

    async fn read_pack(
        &self,
        request: Request<pb::ReadPackRequest>,
    ) -> Result<Response<pb::ReadPackReply>, Status> {
        let (caller, tenant) = self.admit(&request, Op::ReadPack, "")?;
        let scope = (!tenant.is_empty()).then_some(tenant.as_str());
        let outcome = self.read_pack_inner(request.into_inner(), scope).await;
        if let Ok(reply) = &outcome {
            let bytes: usize = reply.ranges.iter().map(|r| r.len()).sum();
            self.traffic()
                .read_bytes_total
                .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.answer_for(&caller, Op::ReadPack, outcome)
    }

    async fn commit_snapshot(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<pb::CommitSnapshotReply>, Status> {
        let (caller, tenant) =
            self.admit(&request, Op::CommitSnapshot, &request.get_ref().tenant)?;
        let req = pb::CommitSnapshotRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.commit_snapshot_inner(req, &caller).await)
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsReply>, Status> {
        let (_, tenant) = self.admit(&request, Op::ListSnapshots, &request.get_ref().tenant)?;
        let req = pb::ListSnapshotsRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.list_snapshots_inner(req).await)
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        self.admit(&request, Op::ClusterStatus, "")?;
        self.answer(self.cluster_status_inner(request.into_inner()).await)
    }

    async fn check_packs(
        &self,
        request: Request<pb::CheckPacksRequest>,
    ) -> Result<Response<pb::CheckPacksReply>, Status> {
        let op = Op::CheckPacks {
            read_data: request.get_ref().read_data,
        };
        let (_, tenant) = self.admit(&request, op, &request.get_ref().tenant)?;
        let req = pb::CheckPacksRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.check_packs_inner(req).await)
    }

    async fn repair(
        &self,
        request: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairReply>, Status> {
        let (caller, _) = self.admit(&request, Op::Repair, "")?;
        if !self.is_leader() {
            let credential = credential(request.metadata());
            let (leader, mut client) = self.leader_client().map_err(|e| self.status(e))?;
            return client
                .repair(to_leader(
                    leader,
                    request.into_inner(),
                    self.config.rpc_timeout * 30,
                    credential,
                ))
                .await;
        }
        let outcome = self.repairer.pass(0).await;
        let result = format!(
            "ok: {} queued, {} repaired, {} errors, {} lost",
            outcome.queued, outcome.repaired, outcome.errors, outcome.lost
        );
        self.audit_ran(&caller, Op::Repair, "", &result).await;
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
        self.admit(&request, Op::ReportFaults, "")?;
        let credential = credential(request.metadata());
        let req = request.into_inner();
        if !self.is_leader() {
            let (leader, mut client) = self.leader_client().map_err(|e| self.status(e))?;
            return client
                .report_faults(to_leader(leader, req, self.config.rpc_timeout, credential))
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
        let (caller, _) = self.admit(&request, Op::AddNode, "")?;
        let req = request.into_inner();
        let target = format!("node {} ({}, {})", req.node_id, req.region, req.addr);
        let result = self.answer(self.add_node_inner(req).await);
        self.audit_ran(&caller, Op::AddNode, &target, &outcome_text(&result))
            .await;
        result
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        let (caller, _) = self.admit(&request, Op::RemoveNode, "")?;
        let credential = credential(request.metadata());
        let req = request.into_inner();
        if !self.is_leader() {
            let (leader, mut client) = self.leader_client().map_err(|e| self.status(e))?;
            return client
                .remove_node(to_leader(
                    leader,
                    req,
                    self.config.rpc_timeout * 30,
                    credential,
                ))
                .await;
        }
        let target = format!(
            "node {}{}",
            req.node_id,
            if req.drain { "" } else { " (no drain)" }
        );
        let result = self
            .repairer
            .drain_and_remove(req.node_id, req.drain)
            .await
            .map(|shards_moved| Response::new(pb::RemoveNodeReply { shards_moved }))
            .map_err(|e| self.status(e.into()));
        self.audit_ran(&caller, Op::RemoveNode, &target, &outcome_text(&result))
            .await;
        result
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenReply>, Status> {
        let caller = Caller::of(&request)?;
        let outcome = self.create_token_inner(request.into_inner(), &caller).await;
        self.answer_for(&caller, Op::CreateToken, outcome)
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensReply>, Status> {
        let (caller, _) = self.admit(&request, Op::ListTokens, "")?;
        self.answer(self.list_tokens_inner(&caller).await)
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenReply>, Status> {
        let (caller, _) = self.admit(&request, Op::RevokeToken, "")?;
        self.answer(self.revoke_token_inner(request.into_inner(), &caller).await)
    }

    async fn add_key_slot(
        &self,
        request: Request<pb::AddKeySlotRequest>,
    ) -> Result<Response<pb::AddKeySlotReply>, Status> {
        let (caller, tenant) = self.admit(&request, Op::AddKeySlot, &request.get_ref().tenant)?;
        let req = pb::AddKeySlotRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.add_key_slot_inner(req, &caller).await)
    }

    async fn put_dictionary(
        &self,
        request: Request<pb::PutDictionaryRequest>,
    ) -> Result<Response<pb::PutDictionaryReply>, Status> {
        let (caller, tenant) =
            self.admit(&request, Op::PutDictionary, &request.get_ref().tenant)?;
        let req = pb::PutDictionaryRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.put_dictionary_inner(req, &caller).await)
    }

    async fn list_dictionaries(
        &self,
        request: Request<pb::ListDictionariesRequest>,
    ) -> Result<Response<pb::ListDictionariesReply>, Status> {
        let (_, tenant) = self.admit(&request, Op::ListDictionaries, &request.get_ref().tenant)?;
        self.answer(
            self.list_dictionaries_inner(pb::ListDictionariesRequest { tenant })
                .await,
        )
    }

    async fn remove_key_slot(
        &self,
        request: Request<pb::RemoveKeySlotRequest>,
    ) -> Result<Response<pb::RemoveKeySlotReply>, Status> {
        let (caller, tenant) =
            self.admit(&request, Op::RemoveKeySlot, &request.get_ref().tenant)?;
        let req = pb::RemoveKeySlotRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.remove_key_slot_inner(req, &caller).await)
    }

    async fn audit_log(
        &self,
        request: Request<pb::AuditLogRequest>,
    ) -> Result<Response<pb::AuditLogReply>, Status> {
        self.admit(&request, Op::AuditLog, "")?;
        self.answer(self.audit_log_inner(request.into_inner()).await)
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIReply>, Status> {
        let (caller, _) = self.admit(&request, Op::WhoAmI, "")?;
        self.answer(self.who_am_i_inner(&caller))
    }
    async fn forget(
        &self,
        request: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetReply>, Status> {
        let op = Op::Forget;
        let (caller, tenant) = self.admit(&request, op, &request.get_ref().tenant)?;
        if request.get_ref().bypass_governance {
            self.admit(&request, Op::UnlockSnapshot { bypass: true }, &tenant)?;
        }
        let req = pb::ForgetRequest {
            tenant,
            ..request.into_inner()
        };
        let outcome = self.forget_inner(req, &caller).await;
        self.answer_for(&caller, op, outcome)
    }

    async fn prune(
        &self,
        request: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneReply>, Status> {
        let (caller, tenant) = self.admit(&request, Op::Prune, &request.get_ref().tenant)?;
        let credential = credential(request.metadata());
        let req = pb::PruneRequest {
            tenant,
            ..request.into_inner()
        };
        let outcome = self.prune_inner(req, &caller, credential).await;
        self.answer_for(&caller, Op::Prune, outcome)
    }

    async fn lock_snapshot(
        &self,
        request: Request<pb::LockSnapshotRequest>,
    ) -> Result<Response<pb::LockSnapshotReply>, Status> {
        let (caller, tenant) = self.admit(&request, Op::LockSnapshot, &request.get_ref().tenant)?;
        let req = pb::LockSnapshotRequest {
            tenant,
            ..request.into_inner()
        };
        let outcome = self.lock_snapshot_inner(req, &caller).await;
        self.answer_for(&caller, Op::LockSnapshot, outcome)
    }

    async fn unlock_snapshot(
        &self,
        request: Request<pb::UnlockSnapshotRequest>,
    ) -> Result<Response<pb::UnlockSnapshotReply>, Status> {
        let op = Op::UnlockSnapshot {
            bypass: request.get_ref().bypass_governance,
        };
        let (caller, tenant) = self.admit(&request, op, &request.get_ref().tenant)?;
        let req = pb::UnlockSnapshotRequest {
            tenant,
            ..request.into_inner()
        };
        let outcome = self.unlock_snapshot_inner(req, &caller).await;
        self.answer_for(&caller, op, outcome)
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyReply>, Status> {
        let (caller, tenant) = self.admit(&request, Op::SetPolicy, &request.get_ref().tenant)?;
        let req = pb::SetPolicyRequest {
            tenant,
            ..request.into_inner()
        };
        let outcome = self.set_policy_inner(req, &caller).await;
        self.answer_for(&caller, Op::SetPolicy, outcome)
    }

    async fn get_policies(
        &self,
        request: Request<pb::GetPoliciesRequest>,
    ) -> Result<Response<pb::GetPoliciesReply>, Status> {
        let (_, tenant) = self.admit(&request, Op::GetPolicies, &request.get_ref().tenant)?;
        self.answer(
            self.get_policies_inner(pb::GetPoliciesRequest { tenant })
                .await,
        )
    }

    async fn stats(
        &self,
        request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsReply>, Status> {
        let (_, tenant) = self.admit(&request, Op::Stats, &request.get_ref().tenant)?;
        let req = pb::StatsRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.stats_inner(req).await)
    }

    type AppendStreamStream =
        futures::stream::BoxStream<'static, Result<pb::AppendStreamReply, Status>>;

    async fn append_stream(
        &self,
        request: Request<tonic::Streaming<pb::AppendStreamRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        use pb::append_stream_request::Msg;
        // The caller comes from the headers, before the stream is read.
        let caller = Caller::of(&request)?;
        // Each message's pool reservation, made by the route from its
        // length prefix; taken here with the message, dropped once it is
        // answered. Without it the call would be unbounded: refuse it.
        let reservations = request
            .extensions()
            .get::<StreamReservations>()
            .cloned()
            .ok_or_else(|| {
                Status::internal("AppendStream is served only behind its memory budget")
            })?;
        let mut inbound = request.into_inner();
        let first = inbound.message().await.map_err(inbound_error)?;
        drop(reservations.take());
        let open = match first.and_then(|m| m.msg) {
            Some(Msg::Open(open)) => open,
            _ => {
                return Err(Status::invalid_argument(
                    "the first AppendStream message must be `open` (tenant, dataset, writer)",
                ));
            }
        };
        let op = Op::AppendStream;
        let target = if open.tenant.is_empty() {
            String::new()
        } else {
            format!("tenant {}", open.tenant)
        };
        let tenant = authorize(&caller, op, &open.tenant)
            .map_err(|denied| self.refuse(&caller, op, &target, denied))?;
        let (stream, opened) = self
            .open_stream(tenant, open)
            .await
            .map_err(|e| self.status(e))?;
        let gateway = self
            .shared
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| Status::unavailable("the node is shutting down; retry elsewhere"))?;
        let state = AppendState {
            closing: gateway.closing(),
            writer: WriterGuard::new(gateway),
            inbound,
            reservations,
            stream,
            opened: Some(opened),
            done: false,
        };
        let replies = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            if let Some(opened) = st.opened.take() {
                return Some((Ok(opened), st));
            }
            let next = tokio::select! {
                next = st.inbound.message() => Some(next),
                _ = st.closing.wait_for(|closing| *closing) => None,
            };
            let Some(next) = next else {
                st.done = true;
                let closing = Status::unavailable(
                    "this node is shutting down; reconnect to another node and resend from the committed sequence",
                );
                return Some((Err(closing), st));
            };
            // Held until this message is answered (at the end of this step).
            let _reserved = st.reservations.take();
            let answer = match next {
                Ok(None) => return None,
                Err(status) => Err(inbound_error(status)),
                Ok(Some(pb::AppendStreamRequest {
                    msg: Some(Msg::Batch(batch)),
                })) => {
                    let gw = st.writer.gateway();
                    gw.append_batch(&st.stream, batch)
                        .await
                        .map_err(|e| gw.status(e))
                }
                Ok(Some(_)) => Err(Status::invalid_argument(
                    "after `open`, an AppendStream call carries only batches",
                )),
            };
            // An error ends the call: the writer reopens and resends from
            // the committed sequence it is told.
            st.done = answer.is_err();
            Some((answer, st))
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsReply>, Status> {
        let (_, tenant) = self.admit(&request, Op::ListSegments, &request.get_ref().tenant)?;
        let req = pb::ListSegmentsRequest {
            tenant,
            ..request.into_inner()
        };
        self.answer(self.list_segments_inner(req).await)
    }
}

/// An error reading a call's own request stream is the caller's (bad
/// framing, a cut message), never the node's: `InvalidArgument` where the
/// transport says `Internal` or `Unknown`.
fn inbound_error(status: Status) -> Status {
    match status.code() {
        tonic::Code::Internal | tonic::Code::Unknown => Status::invalid_argument(format!(
            "malformed AppendStream request stream: {}",
            status.message()
        )),
        _ => status,
    }
}

/// One `AppendStream` call's state between its messages.
struct AppendState {
    closing: tokio::sync::watch::Receiver<bool>,
    writer: WriterGuard,
    inbound: tonic::Streaming<pb::AppendStreamRequest>,
    /// The pool reservations of the messages `inbound` reads.
    reservations: StreamReservations,
    stream: OpenStream,
    opened: Option<pb::AppendStreamReply>,
    done: bool,
}
