//! Garbage collection and space accounting behind the gateway: `Prune`
//! (forwarded to the leader, which runs the collector in `crate::gc`) and
//! `Stats`.

use std::collections::BTreeSet;

use cairn_proto::v1 as pb;
use tonic::metadata::AsciiMetadataValue;

use super::service::to_leader;
use super::{Gateway, GatewayError, check_name};
use crate::auth::Caller;
use crate::auth::permission::Op;
use crate::meta::types::Id32;

/// Index entries and pack records read per page by `Stats`.
const PAGE: usize = 4096;

impl Gateway {
    /// Runs the collector on the leader (forwarding the call there with the
    /// caller's credential, so the leader authorizes and audits it again).
    /// An empty tenant (cluster-admin, or `--insecure`) collects every tenant.
    pub(super) async fn prune_inner(
        &self,
        req: pb::PruneRequest,
        caller: &Caller,
        credential: Option<AsciiMetadataValue>,
    ) -> Result<pb::PruneReply, GatewayError> {
        if !req.tenant.is_empty() {
            check_name(&req.tenant, "tenant")?;
        }
        if !self.is_leader() {
            let (leader, mut client) = self.leader_client()?;
            // A collection pages through the whole index: the long deadline.
            let timeout = crate::limits::LONG_CALL_TIMEOUT;
            return client
                .prune(to_leader(leader, req, timeout, credential))
                .await
                .map(tonic::Response::into_inner)
                .map_err(GatewayError::Forwarded);
        }
        let tenant = (!req.tenant.is_empty()).then_some(req.tenant.as_str());
        let target = match tenant {
            Some(t) => format!("tenant {t}{}", if req.dry_run { " (dry run)" } else { "" }),
            None => format!(
                "every tenant{}",
                if req.dry_run { " (dry run)" } else { "" }
            ),
        };
        let outcome = crate::gc::collect(self, tenant, req.dry_run).await;
        let result = match &outcome {
            Ok(report) => report.summary(),
            Err(error) => format!("failed: {error}"),
        };
        self.audit_ran(caller, Op::Prune, &target, &result).await;
        outcome.map(|report| report.to_wire())
    }

    /// Space accounting of a tenant, or of one dataset's snapshots.
    ///
    /// Without a dataset, `blobs` and `stored_bytes` count the tenant's
    /// whole index. With one, they count the distinct blobs its snapshots
    /// reference (a mark of their reference lists; blobs shared with other
    /// datasets count in each) — or the whole index again if one of its
    /// snapshots has no reference list (an older client). Packs and their
    /// bytes are always the tenant's, live and garbage alike.
    pub(super) async fn stats_inner(
        &self,
        req: pb::StatsRequest,
    ) -> Result<pb::StatsReply, GatewayError> {
        check_name(&req.tenant, "tenant")?;
        if !req.dataset.is_empty() {
            check_name(&req.dataset, "dataset")?;
        }
        self.catch_up().await;
        let view = self.meta.view()?;
        let mut reply = pb::StatsReply::default();
        let dataset = (!req.dataset.is_empty()).then_some(req.dataset.as_str());
        let mut datasets = BTreeSet::new();
        let mut lives = Vec::new();
        let mut all_have_refs = true;
        for snapshot in view.snapshots(&req.tenant, dataset)? {
            reply.snapshots += 1;
            reply.logical_bytes = reply.logical_bytes.saturating_add(snapshot.bytes);
            match view.snapshot_life(&req.tenant, &snapshot.id)? {
                Some(life) => lives.push((snapshot.root_tree, life)),
                None => all_have_refs = false,
            }
            datasets.insert(snapshot.dataset);
        }
        reply.datasets = datasets.into_iter().collect();
        if dataset.is_some() && all_have_refs {
            (reply.blobs, reply.stored_bytes) =
                crate::gc::referenced(self, &req.tenant, &lives).await?;
        } else {
            // The whole index, streamed page by page.
            let mut start: Id32 = [0; 32];
            loop {
                // A page at a time, yielding between pages: a scan of millions of
                // entries must not hold a runtime worker (Raft heartbeats share it).
                tokio::task::yield_now().await;
                let page = view.blob_page(&req.tenant, &start, None, PAGE)?;
                let full = page.len() == PAGE;
                let next = page.last().and_then(|(id, _)| crate::gc::mark::next_id(id));
                for (_, location) in &page {
                    reply.blobs += 1;
                    reply.stored_bytes += u64::from(location.length);
                }
                match next {
                    Some(next) if full => start = next,
                    _ => break,
                }
            }
        }
        let mut after: Option<Id32> = None;
        loop {
            // A page at a time, yielding between pages: a scan of millions of
            // entries must not hold a runtime worker (Raft heartbeats share it).
            tokio::task::yield_now().await;
            let page = view.pack_page(after.as_ref(), PAGE)?;
            let full = page.len() == PAGE;
            after = page.last().map(|(p, _)| p.id);
            for (pack, _) in page.iter().filter(|(p, _)| p.tenant == req.tenant) {
                reply.packs += 1;
                reply.pack_bytes += pack.pack_len;
                reply.raw_bytes += pack.shard_len.saturating_mul(pack.shards.len() as u64);
            }
            if !full {
                break;
            }
        }
        Ok(reply)
    }
}
