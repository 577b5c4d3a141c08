//! Hot/cold tiering: packs that only old snapshots reference move to cold
//! nodes, and back when a young snapshot references them again.
//!
//! Owns the mover (`mover`: a leader-only background worker, every
//! `[tiering] interval`), the announcement of this node's own storage class
//! to the metadata group, and tiering's metrics. It decides which class a
//! pack belongs in; where its shards go within a class is `placement`'s
//! ([`crate::placement::Target`]) and how they get there is the repairer's
//! ([`crate::repair::Repairer::move_pack`]): the same rebuild, the same
//! placement compare-and-set, the same clean-up of a lost race. It must
//! never lower a pack's protection to honour a class: when the cold nodes
//! cannot hold a pack with at most m shards per region, the pack stays hot
//! and the mover says why (log and `cairn_tiering_blocked_packs`).

pub mod mover;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::gateway::{Gateway, MetricsSnapshot};
use crate::meta::Meta;
use crate::meta::types::Command;
use crate::model::{NodeId, StorageClass};

type Labels = Vec<(String, String)>;

/// Tiering's counters on one node (the mover's on the leader, shard read
/// latencies on every gateway).
pub struct TierStats {
    pub moved_packs_total: AtomicU64,
    pub moved_bytes_total: AtomicU64,
    /// Packs the last pass found in the wrong class.
    pub queue_packs: AtomicU64,
    /// Packs old enough for the cold tier that the cold nodes cannot hold
    /// with at most m shards per region (they stay hot).
    pub blocked_packs: AtomicU64,
    /// End of the last pass that finished without errors (or of an idle
    /// round on a follower), Unix ms.
    pub last_success_unix_ms: AtomicU64,
    pub errors_total: AtomicU64,
    /// Bytes per second of the last pass that moved anything (× 1000).
    pub rate_milli_bytes_per_s: AtomicU64,
    /// Gateway shard fetches by the storage class of the node read.
    shard_reads: Family<Labels, Histogram>,
}

impl Default for TierStats {
    fn default() -> Self {
        let stats = Self {
            moved_packs_total: AtomicU64::new(0),
            moved_bytes_total: AtomicU64::new(0),
            queue_packs: AtomicU64::new(0),
            blocked_packs: AtomicU64::new(0),
            last_success_unix_ms: AtomicU64::new(0),
            errors_total: AtomicU64::new(0),
            rate_milli_bytes_per_s: AtomicU64::new(0),
            // 1 ms .. ~33 s: a local hot read to a slow cold disk far away.
            shard_reads: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
        };
        // Both classes exist from the start (zero counts), so a dashboard's
        // quantile query has a series before the first cold read.
        for class in [StorageClass::Hot, StorageClass::Cold] {
            let _created = stats
                .shard_reads
                .get_or_create(&vec![("storage_class".to_string(), class.to_string())]);
        }
        stats
    }
}

impl TierStats {
    /// Records one shard fetch from a node of `class` that took `elapsed`.
    pub fn observe_shard_read(&self, class: StorageClass, elapsed: Duration) {
        self.shard_reads
            .get_or_create(&vec![("storage_class".to_string(), class.to_string())])
            .observe(elapsed.as_secs_f64());
    }

    fn mark_success(&self) {
        self.last_success_unix_ms.store(
            u64::try_from(crate::meta::wall_clock_ms()).unwrap_or(0),
            Ordering::Relaxed,
        );
    }
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

/// Tiering's part of `/metrics`: called once at the end of
/// `metrics::render`.
pub fn register_metrics(registry: &mut Registry, gateway: &Gateway, snapshot: &MetricsSnapshot) {
    let stats = gateway.tiering();
    let info = Family::<Labels, Gauge>::default();
    for view in &snapshot.nodes {
        info.get_or_create(&vec![
            ("node".to_string(), view.id.to_string()),
            ("region".to_string(), view.region.clone()),
            ("storage_class".to_string(), view.storage_class.to_string()),
        ])
        .set(1);
    }
    registry.register(
        "cairn_node_info",
        "Every member of the cluster map with its region and storage class",
        info,
    );
    registry.register(
        "cairn_shard_read_duration_seconds",
        "Gateway shard fetches by the storage class of the node read (a cold read shows by its label)",
        stats.shard_reads.clone(),
    );
    use crate::metrics::{counter, gauge};
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: u64| {
        gauge(
            registry,
            name,
            help,
            i64::try_from(value).unwrap_or(i64::MAX),
        );
    };
    counter(
        registry,
        "cairn_tiering_moved_packs",
        "Packs moved between storage classes by this node's mover",
        load(&stats.moved_packs_total),
    );
    counter(
        registry,
        "cairn_tiering_moved_bytes",
        "Shard bytes written by this node's mover",
        load(&stats.moved_bytes_total),
    );
    gauge(
        registry,
        "cairn_tiering_queue_packs",
        "Packs the last mover pass found in the wrong storage class",
        load(&stats.queue_packs),
    );
    gauge(
        registry,
        "cairn_tiering_blocked_packs",
        "Packs due for the cold tier that the cold nodes cannot hold with at most m shards per region",
        load(&stats.blocked_packs),
    );
    gauge(
        registry,
        "cairn_tiering_last_success_timestamp_seconds",
        "End of the last mover pass that finished without errors (followers: last idle round)",
        load(&stats.last_success_unix_ms) / 1000,
    );
    counter(
        registry,
        "cairn_tiering_errors",
        "Mover passes or pack moves that failed",
        load(&stats.errors_total),
    );
}

/// Proposes this node's storage class once the group has a leader, and
/// again until the record says so (a retried write is harmless:
/// `AlreadyExists`). Ends once applied, or with `shutdown`.
pub async fn announce_class(
    meta: Meta,
    node: NodeId,
    class: StorageClass,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut delay = Duration::from_millis(200);
    loop {
        if meta.leader().is_some() {
            let recorded = meta
                .node_classes()
                .map(|classes| classes.get(&node).copied().unwrap_or_default());
            if recorded.as_ref().is_ok_and(|c| *c == class) {
                info!(node_id = node, storage_class = %class, "storage class recorded");
                return;
            }
            if let Err(error) = meta.write(Command::SetStorageClass { node, class }).await {
                warn!(node_id = node, %error, "storage class not recorded yet; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Runs mover passes every `interval` while this node leads, until
/// `shutdown` flips.
pub async fn run(
    gw: Arc<Gateway>,
    config: crate::config::TieringSection,
    mut shutdown: watch::Receiver<bool>,
) {
    let stats = gw.tiering().clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = shutdown.changed() => return,
        }
        if !gw.is_leader() {
            // Followers have nothing to move; they are not stuck.
            stats.mark_success();
            continue;
        }
        match mover::pass(&gw, &config).await {
            Ok(outcome) if outcome.errors == 0 => stats.mark_success(),
            Ok(outcome) => {
                warn!(
                    errors = outcome.errors,
                    moved = outcome.moved,
                    "tiering pass left packs unmoved; retrying next pass"
                );
            }
            Err(error) => {
                stats.errors_total.fetch_add(1, Ordering::Relaxed);
                warn!(%error, "tiering pass failed; retrying next pass");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text a scrape shows for the read histogram.
    fn scraped(stats: &TierStats) -> String {
        let mut registry = Registry::default();
        registry.register(
            "cairn_shard_read_duration_seconds",
            "",
            stats.shard_reads.clone(),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        text
    }

    #[test]
    fn a_cold_read_shows_by_its_label() {
        let stats = TierStats::default();
        stats.observe_shard_read(StorageClass::Hot, Duration::from_millis(2));
        stats.observe_shard_read(StorageClass::Cold, Duration::from_millis(300));
        stats.observe_shard_read(StorageClass::Cold, Duration::from_millis(500));
        let text = scraped(&stats);
        assert!(
            text.contains("cairn_shard_read_duration_seconds_count{storage_class=\"cold\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("cairn_shard_read_duration_seconds_count{storage_class=\"hot\"} 1"),
            "{text}"
        );
    }
}
