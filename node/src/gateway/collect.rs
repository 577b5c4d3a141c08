//! Garbage collection and space accounting behind the gateway: `Prune`
//! (forwarded to the leader, which runs the collector) and `Stats`.

use cairn_proto::v1 as pb;
use tonic::metadata::AsciiMetadataValue;

use super::{Gateway, GatewayError};
use crate::auth::Caller;

fn not_yet(what: &str) -> GatewayError {
    GatewayError::Precondition {
        what: format!("{what} is not available yet"),
    }
}

impl Gateway {
    pub(super) async fn prune_inner(
        &self,
        req: pb::PruneRequest,
        caller: &Caller,
        credential: Option<AsciiMetadataValue>,
    ) -> Result<pb::PruneReply, GatewayError> {
        let _ = (req, caller, credential);
        Err(not_yet("prune"))
    }

    pub(super) async fn stats_inner(
        &self,
        req: pb::StatsRequest,
    ) -> Result<pb::StatsReply, GatewayError> {
        let _ = req;
        Err(not_yet("stats"))
    }
}
