//! Scrub: this node re-reads its own shards in the background.
//!
//! A round verifies every local shard file (header, payload checksum) at a
//! bounded rate, quarantines (deletes) those that fail, and compares what is
//! on disk with what the index says this node holds, so shards that should
//! exist but don't are noticed too. Faults are reported to the Raft leader,
//! whose repair worker rebuilds them from the other shards. Scrub never
//! touches placements itself: one writer (the leader) keeps them coherent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_proto::v1 as pb;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::meta::Meta;
use crate::meta::types::{Id32, NodeId};
use crate::repair::RateLimiter;
use crate::shard_store::{ShardStore, ShardStoreError};

/// Settings of the scrub worker.
#[derive(Debug, Clone)]
pub struct ScrubConfig {
    pub interval: Duration,
    pub rate_bytes_per_s: u64,
}

/// Counters a status page or test can read.
#[derive(Debug, Default)]
pub struct ScrubStats {
    pub rounds_total: AtomicU64,
    pub shards_checked_total: AtomicU64,
    pub bytes_checked_total: AtomicU64,
    pub faults_total: AtomicU64,
}

/// One fault found on this node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fault {
    pub pack_id: Id32,
    pub index: u32,
    pub corrupt: bool,
}

/// Verifies every local shard and checks the index's expectations; deletes
/// corrupt files (they would only be served as errors).
pub async fn scrub_round(
    node_id: NodeId,
    store: &ShardStore,
    meta: &Meta,
    rate_bytes_per_s: u64,
    stats: &ScrubStats,
) -> Result<Vec<Fault>, ShardStoreError> {
    let mut limiter = RateLimiter::new(rate_bytes_per_s);
    let mut faults = Vec::new();
    let present: BTreeSet<(Id32, u32)> = store.list()?.into_iter().collect();
    for (pack_id, index) in &present {
        match store.get(pack_id, *index).await {
            Ok(file) => {
                stats.shards_checked_total.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes_checked_total
                    .fetch_add(file.len() as u64, Ordering::Relaxed);
                limiter.consume(file.len() as u64).await;
            }
            Err(ShardStoreError::Corrupt { reason, .. }) => {
                warn!(pack_id = %hex::encode(pack_id), shard_idx = index, %reason,
                    "scrub: corrupt shard quarantined, repair scheduled");
                let _ = store.delete(pack_id, *index).await;
                faults.push(Fault {
                    pack_id: *pack_id,
                    index: *index,
                    corrupt: true,
                });
            }
            Err(ShardStoreError::NotFound { .. }) => {} // deleted meanwhile
            Err(e) => return Err(e),
        }
    }
    // What the index says this node holds must be here.
    if let Ok(packs) = meta.packs() {
        for pack in packs {
            for shard in pack.shards.iter().filter(|s| s.node == node_id) {
                if !present.contains(&(pack.id, shard.index)) {
                    warn!(pack_id = %hex::encode(pack.id), shard_idx = shard.index,
                        "scrub: shard missing from disk, repair scheduled");
                    faults.push(Fault {
                        pack_id: pack.id,
                        index: shard.index,
                        corrupt: false,
                    });
                }
            }
        }
    }
    stats.rounds_total.fetch_add(1, Ordering::Relaxed);
    stats
        .faults_total
        .fetch_add(faults.len() as u64, Ordering::Relaxed);
    Ok(faults)
}

/// Runs scrub rounds until `shutdown` flips, reporting faults to the leader
/// through `report` (the gateway's ReportFaults, local or remote).
pub async fn run<R, Fut>(
    node_id: NodeId,
    store: Arc<ShardStore>,
    meta: Meta,
    config: ScrubConfig,
    stats: Arc<ScrubStats>,
    report: R,
    mut shutdown: watch::Receiver<bool>,
) where
    R: Fn(pb::ReportFaultsRequest) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = shutdown.changed() => return,
        }
        match scrub_round(node_id, &store, &meta, config.rate_bytes_per_s, &stats).await {
            Ok(faults) if faults.is_empty() => {}
            Ok(faults) => {
                let request = pb::ReportFaultsRequest {
                    faults: faults
                        .iter()
                        .map(|f| pb::ShardFault {
                            pack_id: f.pack_id.to_vec(),
                            index: f.index,
                            node_id,
                            fault: if f.corrupt { "corrupt" } else { "missing" }.into(),
                        })
                        .collect(),
                };
                match report(request).await {
                    Ok(()) => info!(faults = faults.len(), "scrub faults reported to the leader"),
                    Err(reason) => {
                        warn!(%reason, "scrub could not report faults; next round retries")
                    }
                }
            }
            Err(e) => warn!(error = %e, "scrub round failed; next round retries"),
        }
    }
}
