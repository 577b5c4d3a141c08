//! Re-protection: rebuild what was lost, rebalance what was misplaced.
//!
//! The worker runs on every node but acts only on the Raft leader, so one
//! node at a time changes placements. Each pass assesses every pack against
//! the nodes that are down (past `--down-after`) and the shards scrubs
//! reported bad, then repairs the worst first: unrecoverable packs are
//! reported, at-risk and degraded ones rebuilt, misplaced ones rebalanced.
//! New shards are durable before the new placement is committed, and old
//! ones are deleted only after. Repair traffic is rate-limited so clients
//! keep priority. Decisions are in `plan` (pure); passes, drains and fault
//! intake are owned by [`repairer::Repairer`], which the gateway calls; the
//! shard I/O goes through [`crate::shard_io::ShardIo`].

pub mod plan;
pub mod repairer;

pub use repairer::{RepairError, Repairer};

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
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

/// The defaults are `[repair]`'s: one source for the file, the flags and code.
impl Default for RepairConfig {
    fn default() -> Self {
        (&crate::config::RepairSection::default()).into()
    }
}

/// Most bad-shard reports held at once; beyond it new reports are dropped
/// (scrub and check report them again) so a flood cannot exhaust memory.
pub const BAD_SHARDS_MAX: usize = 1_000_000;

/// Counters and inputs shared between the worker, fault reports and status.
#[derive(Default)]
pub struct RepairState {
    /// Shards found corrupt or missing (scrub, reads, check): `(pack, index, node)`.
    bad: Mutex<BTreeSet<(Id32, u32, NodeId)>>,
    pub kick: Notify,
    pub queue: AtomicU64,
    pub packs_repaired_total: AtomicU64,
    pub shards_written_total: AtomicU64,
    pub bytes_written_total: AtomicU64,
    pub errors_total: AtomicU64,
    pub last_pass_unix_ms: AtomicU64,
    /// End of the last pass that finished without errors (or of the last
    /// idle round on a follower), Unix ms: a stuck worker stops moving it.
    pub last_success_unix_ms: AtomicU64,
    /// Pack repairs that lost the compare-and-set to another writer.
    pub passes_lost_total: AtomicU64,
    /// Shards written by failed or lost repairs and deleted again.
    pub shards_cleaned_total: AtomicU64,
    /// Bytes per second over the last pass that wrote anything.
    pub rate_milli_bytes_per_s: AtomicU64,
}

impl RepairState {
    pub fn report_bad(&self, faults: impl IntoIterator<Item = (Id32, u32, NodeId)>) {
        let mut bad = self.bad.lock().unwrap_or_else(|p| p.into_inner());
        for fault in faults {
            if bad.len() >= BAD_SHARDS_MAX {
                tracing::warn!(
                    held = bad.len(),
                    "too many bad-shard reports held; dropping the rest until repair catches up"
                );
                break;
            }
            bad.insert(fault);
        }
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

    /// Records the end of a pass (`ok`: it finished without errors).
    pub fn mark_pass(&self, ok: bool) {
        let now = unix_ms_now();
        self.last_pass_unix_ms.store(now, Ordering::Relaxed);
        if ok {
            self.last_success_unix_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Reports held, waiting for a pass.
    pub fn bad_len(&self) -> usize {
        self.bad.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Now, as Unix milliseconds (0 if the clock is before 1970).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl RepairState {}

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

/// What one pass did.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassOutcome {
    pub queued: u64,
    pub repaired: u64,
    pub errors: u64,
    /// Packs whose new placement lost the compare-and-set (counted in errors too).
    pub lost: u64,
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
