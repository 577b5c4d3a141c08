//! [`MetaConfig`]: the timings and compaction settings of the metadata
//! group, built from the node's `[raft]` section, and the openraft
//! configuration derived from them.

use std::time::Duration;

use openraft::SnapshotPolicy;

use super::MetaError;
use crate::config::RaftSection;

/// Timing and compaction settings of the metadata group, built from the
/// node's `[raft]` section ([`RaftSection`]); its defaults are that
/// section's defaults, so tests run the timings production runs.
///
/// Across regions, `heartbeat_ms` must exceed the round-trip time and
/// elections should be about ten heartbeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaConfig {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Lower bound of the randomized election timeout.
    pub election_min_ms: u64,
    /// Upper bound of the randomized election timeout.
    pub election_max_ms: u64,
    /// Build a snapshot (and purge older log) every this many applied
    /// entries; 0 disables automatic snapshots.
    pub snapshot_every_logs: u64,
    /// Deadline of one RPC to a peer (forwarded command, read index,
    /// snapshot chunk). `write` and `read_barrier` give up after
    /// `rpc_timeout_ms + 2 × election_max_ms` (one election plus one call).
    pub rpc_timeout_ms: u64,
}

impl From<&RaftSection> for MetaConfig {
    fn from(raft: &RaftSection) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            heartbeat_ms: ms(raft.heartbeat),
            election_min_ms: ms(raft.election_min),
            election_max_ms: ms(raft.election_max),
            snapshot_every_logs: raft.snapshot_every_logs,
            rpc_timeout_ms: ms(raft.rpc_timeout),
        }
    }
}

impl Default for MetaConfig {
    fn default() -> Self {
        Self::from(&RaftSection::default())
    }
}

impl MetaConfig {
    /// How long `write` and `read_barrier` keep retrying.
    pub fn op_timeout(&self) -> Duration {
        Duration::from_millis(
            self.rpc_timeout_ms
                .saturating_add(self.election_max_ms.saturating_mul(2)),
        )
    }

    /// How long `add_node` and `remove_node` keep trying: a new node may
    /// have to catch up by snapshot before it can vote.
    pub fn membership_timeout(&self) -> Duration {
        self.op_timeout().saturating_mul(3)
    }

    /// Deadline of one `ClusterInfo` question to a peer: three heartbeats
    /// (a connection and a round trip), at least 100 ms, at most one RPC
    /// deadline. A node opening an empty store waits this long at most.
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(
            self.heartbeat_ms
                .saturating_mul(3)
                .max(100)
                .min(self.rpc_timeout_ms.max(1)),
        )
    }

    pub(super) fn raft_config(&self) -> Result<openraft::Config, MetaError> {
        let snapshot_policy = match self.snapshot_every_logs {
            0 => SnapshotPolicy::Never,
            n => SnapshotPolicy::LogsSinceLast(n),
        };
        openraft::Config {
            cluster_name: "cairn-meta".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            install_snapshot_timeout: self.rpc_timeout_ms,
            snapshot_policy,
            // Keep one snapshot interval of log behind the snapshot, so a
            // briefly lagging follower catches up from the log, not a snapshot.
            max_in_snapshot_log_to_keep: self.snapshot_every_logs,
            // With entries of at most RAFT_ENTRY_BYTES_MAX, an append stays
            // within the message limit every follower accepts.
            max_payload_entries: cairn_proto::RAFT_ENTRIES_PER_APPEND,
            ..Default::default()
        }
        .validate()
        .map_err(|source| MetaError::Config {
            source: Box::new(source),
        })
    }
}
