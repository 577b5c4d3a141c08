//! Lifecycle calls behind the gateway: forget (retention rules over cluster
//! times), retention locks and dataset policies.

use cairn_proto::v1 as pb;

use super::{Gateway, GatewayError};
use crate::auth::Caller;

fn not_yet(what: &str) -> GatewayError {
    GatewayError::Precondition {
        what: format!("{what} is not available yet"),
    }
}

impl Gateway {
    pub(super) async fn forget_inner(
        &self,
        req: pb::ForgetRequest,
        caller: &Caller,
    ) -> Result<pb::ForgetReply, GatewayError> {
        let _ = (req, caller);
        Err(not_yet("forget"))
    }

    pub(super) async fn lock_snapshot_inner(
        &self,
        req: pb::LockSnapshotRequest,
        caller: &Caller,
    ) -> Result<pb::LockSnapshotReply, GatewayError> {
        let _ = (req, caller);
        Err(not_yet("lock"))
    }

    pub(super) async fn unlock_snapshot_inner(
        &self,
        req: pb::UnlockSnapshotRequest,
        caller: &Caller,
    ) -> Result<pb::UnlockSnapshotReply, GatewayError> {
        let _ = (req, caller);
        Err(not_yet("unlock"))
    }

    pub(super) async fn set_policy_inner(
        &self,
        req: pb::SetPolicyRequest,
        caller: &Caller,
    ) -> Result<pb::SetPolicyReply, GatewayError> {
        let _ = (req, caller);
        Err(not_yet("policy set"))
    }

    pub(super) async fn get_policies_inner(
        &self,
        req: pb::GetPoliciesRequest,
    ) -> Result<pb::GetPoliciesReply, GatewayError> {
        let _ = req;
        Err(not_yet("policy show"))
    }
}
