//! Scrub: this node re-reads its own shards in the background.
//!
//! A round verifies every local shard file (header, payload checksum) at a
//! bounded rate, quarantines (deletes) those that fail or that hold another
//! shard than their name says (misfiled), and compares the disk with the
//! index both ways: shards the index says this node holds but the disk
//! lacks are faults, and shard files no index entry names (orphans: failed
//! uploads, lost repairs, surplus copies a delete missed) are deleted once
//! older than a grace period, so a pack being uploaded now is never
//! touched. One bad file never ends a round: it is counted and the round
//! goes on. Faults are reported to the Raft leader's repairer. Scrub never
//! touches placements itself: one writer (the leader) keeps them coherent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use cairn_proto::v1 as pb;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::meta::Meta;
use crate::meta::types::{Id32, NodeId};
use crate::repair::{RateLimiter, unix_ms_now};
use crate::shard_store::{ShardStore, ShardStoreError};

/// Default age below which a shard file no index entry names is left alone:
/// well above the longest upload (a pack's shards are written before its
/// index entry is committed) and the longest repair.
pub const ORPHAN_GRACE_DEFAULT: Duration = Duration::from_secs(3600);

/// Settings of the scrub worker.
#[derive(Debug, Clone)]
pub struct ScrubConfig {
    pub interval: Duration,
    pub rate_bytes_per_s: u64,
    /// Orphans younger than this (by file mtime) are never deleted.
    pub orphan_grace: Duration,
}

/// Counters a status page or test can read.
#[derive(Debug, Default)]
pub struct ScrubStats {
    pub rounds_total: AtomicU64,
    pub shards_checked_total: AtomicU64,
    pub bytes_checked_total: AtomicU64,
    pub faults_total: AtomicU64,
    /// Rounds or files that failed with an I/O error (the round goes on).
    pub errors_total: AtomicU64,
    /// End of the last finished round, Unix ms (0 = none yet).
    pub last_success_unix_ms: AtomicU64,
    /// Faults found and not yet taken by the leader.
    pub queue: AtomicU64,
    /// Orphans (any age) left on disk at the end of the last round.
    pub orphan_shards: AtomicU64,
    pub orphan_bytes: AtomicU64,
    pub orphans_deleted_total: AtomicU64,
    pub orphan_bytes_deleted_total: AtomicU64,
    pub misfiled_total: AtomicU64,
}

impl ScrubStats {
    /// The wire form, for `ShardStats` and `cluster status`.
    pub fn report(&self) -> pb::ScrubReport {
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        pb::ScrubReport {
            rounds_total: load(&self.rounds_total),
            last_success_unix_ms: load(&self.last_success_unix_ms) as i64,
            errors_total: load(&self.errors_total),
            orphan_shards: load(&self.orphan_shards),
            orphan_bytes: load(&self.orphan_bytes),
            orphans_deleted_total: load(&self.orphans_deleted_total),
            orphan_bytes_deleted_total: load(&self.orphan_bytes_deleted_total),
            misfiled_total: load(&self.misfiled_total),
        }
    }
}

/// One fault found on this node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fault {
    pub pack_id: Id32,
    pub index: u32,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    Corrupt,
    Misfiled,
    Missing,
}

impl FaultKind {
    fn as_str(self) -> &'static str {
        match self {
            FaultKind::Corrupt => "corrupt",
            FaultKind::Misfiled => "misfiled",
            FaultKind::Missing => "missing",
        }
    }
}

/// Verifies every local shard, checks the index's expectations both ways,
/// deletes corrupt and misfiled files and old orphans. Fails only when the
/// directory cannot be listed at all.
pub async fn scrub_round(
    node_id: NodeId,
    store: &ShardStore,
    meta: &Meta,
    config: &ScrubConfig,
    stats: &ScrubStats,
) -> Result<Vec<Fault>, ShardStoreError> {
    let mut limiter = RateLimiter::new(config.rate_bytes_per_s);
    let mut faults = Vec::new();
    let listed = store.scan().await?;
    let mut present: BTreeSet<(Id32, u32)> = BTreeSet::new();
    for file in &listed {
        let (pack_id, index) = (file.pack_id, file.index);
        match store.get(&pack_id, index).await {
            Ok(bytes) => {
                present.insert((pack_id, index));
                stats.shards_checked_total.fetch_add(1, Ordering::Relaxed);
                stats
                    .bytes_checked_total
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                limiter.consume(bytes.len() as u64).await;
            }
            Err(error @ (ShardStoreError::Corrupt { .. } | ShardStoreError::Misfiled { .. })) => {
                let kind = if matches!(error, ShardStoreError::Misfiled { .. }) {
                    stats.misfiled_total.fetch_add(1, Ordering::Relaxed);
                    FaultKind::Misfiled
                } else {
                    FaultKind::Corrupt
                };
                warn!(pack_id = %hex::encode(pack_id), shard_idx = index, %error,
                    "scrub: bad shard file quarantined (deleted), repair scheduled");
                if let Err(error) = store.delete(&pack_id, index).await {
                    stats.errors_total.fetch_add(1, Ordering::Relaxed);
                    warn!(pack_id = %hex::encode(pack_id), shard_idx = index, %error,
                        "scrub: cannot delete a bad shard file; reads refuse it, the next round retries");
                }
                faults.push(Fault {
                    pack_id,
                    index,
                    kind,
                });
            }
            Err(ShardStoreError::NotFound { .. }) => {} // deleted meanwhile
            Err(error) => {
                // One unreadable file must not end the round.
                stats.errors_total.fetch_add(1, Ordering::Relaxed);
                warn!(pack_id = %hex::encode(pack_id), shard_idx = index, %error,
                    "scrub: shard file unreadable, skipped; the next round retries");
                present.insert((pack_id, index));
            }
        }
    }
    // The index, as of the leader's commit point: orphans are judged only
    // against an up-to-date index, never against a lagging local copy.
    let index_current = meta.read_barrier().await.is_ok();
    match meta.packs() {
        Ok(packs) => {
            let mut expected: BTreeSet<(Id32, u32)> = BTreeSet::new();
            for pack in &packs {
                for shard in pack.shards.iter().filter(|s| s.node == node_id) {
                    expected.insert((pack.id, shard.index));
                    // Listed before the index was read: look again before
                    // calling a shard written meanwhile missing.
                    if !present.contains(&(pack.id, shard.index))
                        && !store.contains(&pack.id, shard.index).await
                    {
                        warn!(pack_id = %hex::encode(pack.id), shard_idx = shard.index,
                            "scrub: shard missing from disk, repair scheduled");
                        faults.push(Fault {
                            pack_id: pack.id,
                            index: shard.index,
                            kind: FaultKind::Missing,
                        });
                    }
                }
            }
            if index_current {
                sweep_orphans(node_id, store, meta, config, stats, &listed, &expected).await;
            }
        }
        Err(error) => {
            stats.errors_total.fetch_add(1, Ordering::Relaxed);
            warn!(%error, "scrub: cannot read the index; missing shards and orphans are checked next round");
        }
    }
    stats.rounds_total.fetch_add(1, Ordering::Relaxed);
    stats
        .last_success_unix_ms
        .store(unix_ms_now(), Ordering::Relaxed);
    stats
        .faults_total
        .fetch_add(faults.len() as u64, Ordering::Relaxed);
    Ok(faults)
}

/// Deletes shard files the index does not name on this node and that are
/// older than the grace period; counts the younger ones.
async fn sweep_orphans(
    node_id: NodeId,
    store: &ShardStore,
    meta: &Meta,
    config: &ScrubConfig,
    stats: &ScrubStats,
    listed: &[crate::shard_store::StoredShard],
    expected: &BTreeSet<(Id32, u32)>,
) {
    let (mut left, mut left_bytes) = (0u64, 0u64);
    for file in listed {
        if expected.contains(&(file.pack_id, file.index)) {
            continue;
        }
        // Look again, file and index: a repair may have just written or
        // re-synced it (which refreshes its mtime) and committed it.
        let Some(fresh) = store.stat(&file.pack_id, file.index).await else {
            continue;
        };
        let named_now = meta.pack(&file.pack_id).ok().flatten().is_some_and(|p| {
            p.shards
                .iter()
                .any(|s| s.node == node_id && s.index == file.index)
        });
        if named_now {
            continue;
        }
        let age = SystemTime::now()
            .duration_since(fresh.modified)
            .unwrap_or_default();
        if age < config.orphan_grace {
            left += 1;
            left_bytes += fresh.bytes;
            continue;
        }
        match store.delete(&file.pack_id, file.index).await {
            Ok(_) => {
                info!(pack_id = %hex::encode(file.pack_id), shard_idx = file.index, bytes = fresh.bytes,
                    age_s = age.as_secs(), "scrub: orphan shard (no index entry names it) deleted");
                stats.orphans_deleted_total.fetch_add(1, Ordering::Relaxed);
                stats
                    .orphan_bytes_deleted_total
                    .fetch_add(fresh.bytes, Ordering::Relaxed);
            }
            Err(error) => {
                stats.errors_total.fetch_add(1, Ordering::Relaxed);
                left += 1;
                left_bytes += fresh.bytes;
                warn!(pack_id = %hex::encode(file.pack_id), shard_idx = file.index, %error,
                    "scrub: orphan shard not deleted; the next round retries");
            }
        }
    }
    stats.orphan_shards.store(left, Ordering::Relaxed);
    stats.orphan_bytes.store(left_bytes, Ordering::Relaxed);
}

/// Runs scrub rounds until `shutdown` flips, reporting faults to the leader
/// through `report` (the gateway's ReportFaults, local or remote). Faults a
/// report could not deliver are kept (bounded) and sent with the next round's.
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
    const PENDING_MAX: usize = 100_000;
    let mut pending: BTreeSet<Fault> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = shutdown.changed() => return,
        }
        match scrub_round(node_id, &store, &meta, &config, &stats).await {
            Ok(faults) => pending.extend(faults.into_iter().take(PENDING_MAX)),
            Err(error) => {
                stats.errors_total.fetch_add(1, Ordering::Relaxed);
                warn!(%error, "scrub round failed; next round retries");
            }
        }
        while pending.len() > PENDING_MAX {
            pending.pop_last();
        }
        stats.queue.store(pending.len() as u64, Ordering::Relaxed);
        if pending.is_empty() {
            continue;
        }
        let request = pb::ReportFaultsRequest {
            faults: pending
                .iter()
                .map(|f| pb::ShardFault {
                    pack_id: f.pack_id.to_vec(),
                    index: f.index,
                    node_id,
                    fault: f.kind.as_str().into(),
                })
                .collect(),
        };
        match report(request).await {
            Ok(()) => {
                info!(
                    faults = pending.len(),
                    "scrub faults reported to the leader"
                );
                pending.clear();
            }
            Err(reason) => {
                stats.errors_total.fetch_add(1, Ordering::Relaxed);
                warn!(%reason, "scrub could not report faults; the next round retries")
            }
        }
        stats.queue.store(pending.len() as u64, Ordering::Relaxed);
    }
}
