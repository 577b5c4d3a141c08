//! Which nodes are alive, as this node sees them.
//!
//! A prober asks every member for its shard stats once per interval; a node
//! that has not answered for longer than `down_after` is declared down. The
//! repair worker rebuilds only what lives on down nodes, so a node restarting
//! or a short network blip costs nothing; writes do not wait for this (they
//! route around a failed call at once, see `peers`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cairn_proto::v1::ShardStatsRequest;
use tokio::sync::watch;

use crate::meta::Meta;
use crate::meta::types::NodeId;
use crate::peers::{Peers, addressed};

/// Last time each node answered.
pub struct Liveness {
    self_id: NodeId,
    down_after: Duration,
    started: Instant,
    seen: Mutex<HashMap<NodeId, Instant>>,
    /// The prober's own health, for metrics.
    pub prober: ProberStats,
}

/// Health of the prober worker.
#[derive(Debug, Default)]
pub struct ProberStats {
    /// End of the last probe round, Unix ms.
    pub last_success_unix_ms: AtomicU64,
    /// Probes that got no answer.
    pub errors_total: AtomicU64,
    /// Peers probed in the round in flight.
    pub queue: AtomicU64,
}

fn unix_ms(at: Instant) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    now - at.elapsed().as_millis() as i64
}

impl Liveness {
    pub fn new(self_id: NodeId, down_after: Duration) -> Self {
        Self {
            self_id,
            down_after,
            started: Instant::now(),
            seen: Mutex::new(HashMap::new()),
            prober: ProberStats::default(),
        }
    }

    pub fn down_after(&self) -> Duration {
        self.down_after
    }

    /// Records an answer from `node`.
    pub fn saw(&self, node: NodeId) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(node, Instant::now());
    }

    fn last(&self, node: NodeId) -> Option<Instant> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&node).copied()
    }

    /// Unreachable for longer than the grace period (never this node).
    pub fn is_down(&self, node: NodeId) -> bool {
        if node == self.self_id {
            return false;
        }
        let since = self.last(node).unwrap_or(self.started);
        since.elapsed() > self.down_after
    }

    /// When `node` last answered, as Unix milliseconds (0 = never).
    pub fn last_seen_unix_ms(&self, node: NodeId) -> i64 {
        if node == self.self_id {
            return unix_ms(Instant::now());
        }
        self.last(node).map(unix_ms).unwrap_or(0)
    }

    /// When `node` was declared down, as Unix milliseconds (0 = it is not).
    pub fn down_since_unix_ms(&self, node: NodeId) -> i64 {
        if !self.is_down(node) {
            return 0;
        }
        let since = self.last(node).unwrap_or(self.started);
        unix_ms(since) + self.down_after.as_millis() as i64
    }
}

/// Probes every member once per `interval` until `shutdown` flips.
pub async fn run_prober(
    liveness: Arc<Liveness>,
    peers: Arc<Peers>,
    meta: Meta,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let members = meta.node_views();
        let probes = members
            .iter()
            .filter(|(id, _)| **id != meta.node_id())
            .map(|(id, view)| {
                let peers = peers.clone();
                let liveness = liveness.clone();
                let (id, addr) = (*id, view.addr.clone());
                async move {
                    let Ok(mut client) = peers.shards(id, &addr) else {
                        return;
                    };
                    let request = addressed(
                        id,
                        ShardStatsRequest {},
                        interval.max(Duration::from_secs(1)),
                    );
                    if client.shard_stats(request).await.is_ok() {
                        liveness.saw(id);
                        peers.record_ok(id);
                    } else {
                        liveness.prober.errors_total.fetch_add(1, Ordering::Relaxed);
                        peers.record_failure(id);
                    }
                }
            });
        let probes: Vec<_> = probes.collect();
        liveness
            .prober
            .queue
            .store(probes.len() as u64, Ordering::Relaxed);
        futures::future::join_all(probes).await;
        liveness.prober.queue.store(0, Ordering::Relaxed);
        liveness
            .prober
            .last_success_unix_ms
            .store(crate::repair::unix_ms_now(), Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_down_only_after_the_grace_period() {
        let liveness = Liveness::new(1, Duration::from_millis(50));
        assert!(!liveness.is_down(1), "never this node");
        assert!(!liveness.is_down(2), "grace period from start");
        liveness.saw(2);
        assert!(!liveness.is_down(2));
        assert_eq!(liveness.down_since_unix_ms(2), 0);
        std::thread::sleep(Duration::from_millis(80));
        assert!(liveness.is_down(2));
        assert!(liveness.down_since_unix_ms(2) > 0);
        liveness.saw(2);
        assert!(!liveness.is_down(2), "back as soon as it answers");
    }
}
