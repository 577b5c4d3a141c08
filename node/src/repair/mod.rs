//! Re-protection: rebuild what was lost, rebalance what was misplaced.
//!
//! The worker runs on every node but acts only on the Raft leader, so one
//! node at a time changes placements. Each pass assesses every pack against
//! the nodes that are down (past `--down-after`) and the shards scrubs
//! reported bad, then repairs the worst first: unrecoverable packs are
//! reported, at-risk and degraded ones rebuilt, misplaced ones rebalanced.
//! New shards are durable before the new placement is committed, and old
//! ones are deleted only after. Repair traffic is rate-limited so clients
//! keep priority. Decisions are in `plan` (pure); I/O is in the gateway.

pub mod plan;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::meta::types::{Id32, NodeId};

/// Settings of the repair worker.
#[derive(Debug, Clone)]
pub struct RepairConfig {
    /// Time between passes (a pass also starts on demand).
    pub interval: Duration,
    /// Bytes of shards written per second at most (0 = unlimited).
    pub rate_bytes_per_s: u64,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            rate_bytes_per_s: 64 * 1024 * 1024,
        }
    }
}

/// Counters and inputs shared between the worker, scrub reports and status.
#[derive(Default)]
pub struct RepairState {
    /// Shards scrubs found corrupt or missing: `(pack, index, node)`.
    bad: Mutex<BTreeSet<(Id32, u32, NodeId)>>,
    pub kick: Notify,
    pub queue: AtomicU64,
    pub packs_repaired_total: AtomicU64,
    pub shards_written_total: AtomicU64,
    pub bytes_written_total: AtomicU64,
    pub errors_total: AtomicU64,
    pub last_pass_unix_ms: AtomicU64,
    /// Bytes per second over the last pass that wrote anything.
    pub rate_milli_bytes_per_s: AtomicU64,
}

impl RepairState {
    pub fn report_bad(&self, faults: impl IntoIterator<Item = (Id32, u32, NodeId)>) {
        let mut bad = self.bad.lock().unwrap_or_else(|p| p.into_inner());
        bad.extend(faults);
        drop(bad);
        self.kick.notify_one();
    }

    pub fn bad_shards(&self) -> BTreeSet<(Id32, u32, NodeId)> {
        self.bad.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Forgets reports about a pack once its placement was rewritten.
    pub fn clear_pack(&self, pack: &Id32) {
        let mut bad = self.bad.lock().unwrap_or_else(|p| p.into_inner());
        bad.retain(|(p, _, _)| p != pack);
    }

    pub fn mark_pass(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.last_pass_unix_ms.store(now, Ordering::Relaxed);
    }
}

/// Keeps a stream of writes under `rate` bytes per second.
pub struct RateLimiter {
    rate: u64,
    started: Instant,
    bytes: u64,
}

impl RateLimiter {
    pub fn new(rate_bytes_per_s: u64) -> Self {
        Self {
            rate: rate_bytes_per_s,
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts for `bytes` and waits as long as needed to stay under the rate.
    pub async fn consume(&mut self, bytes: u64) {
        self.bytes += bytes;
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }

    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }
}

/// Runs repair passes until `shutdown` flips: every `interval`, or at once
/// when kicked (a scrub report, `cairn check --repair`).
pub async fn run(
    gateway: std::sync::Arc<crate::gateway::Gateway>,
    config: RepairConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = gateway.repair_state();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.interval) => {}
            _ = state.kick.notified() => {}
            _ = shutdown.changed() => return,
        }
        if gateway.is_leader() {
            let outcome = gateway.repair_pass(config.rate_bytes_per_s).await;
            if outcome.errors > 0 {
                tracing::warn!(
                    errors = outcome.errors,
                    repaired = outcome.repaired,
                    "repair pass left work undone; retrying next pass"
                );
            }
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassOutcome {
    pub queued: u64,
    pub repaired: u64,
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_limiter_spaces_writes() {
        let mut limiter = RateLimiter::new(1000);
        let started = tokio::time::Instant::now();
        limiter.consume(500).await;
        limiter.consume(1500).await;
        assert!(started.elapsed() >= Duration::from_millis(1990));
        let mut unlimited = RateLimiter::new(0);
        unlimited.consume(u64::MAX / 2).await;
    }
}
