//! [`MetaError`]: everything an operation on the metadata group may fail
//! with, each variant saying what the caller can do about it.

use std::path::PathBuf;

use openraft::error::{Fatal, InitializeError, RaftError};

use super::log_store::LogStoreError;
use super::membership::ChangeError;
use super::network::CallError;
use super::state::StateError;
use super::types::{NodeId, NodeInfo};
use crate::kv::KvError;

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// No leader was known (or reachable) within the deadline; retry later or elsewhere.
    #[error("no metadata leader after {waited_ms} ms; a majority of voters may be down")]
    NoLeader { waited_ms: u64 },
    /// The leader was known but a forwarded call failed in a way that may or
    /// may not have applied the command; the caller may retry.
    #[error("metadata leader {leader} unavailable: {source}")]
    Unavailable {
        leader: NodeId,
        #[source]
        source: CallError,
    },
    /// The leader cannot reach a quorum of voters.
    #[error(
        "metadata leader cannot reach a quorum after {waited_ms} ms; check the voters' regions"
    )]
    NoQuorum { waited_ms: u64 },
    /// The leader took the command but did not confirm it in time (a quorum
    /// may be unreachable); it may still be applied later.
    #[error(
        "metadata write not confirmed after {waited_ms} ms; it may still be applied, retrying is safe"
    )]
    Unconfirmed { waited_ms: u64 },
    /// The command is committed but this node did not apply it in time.
    #[error(
        "entry {index} is committed but this node had applied only up to {applied:?} after {waited_ms} ms"
    )]
    ApplyLagging {
        index: u64,
        applied: Option<u64>,
        waited_ms: u64,
    },
    #[error("metadata storage: {0}")]
    Storage(#[from] KvError),
    #[error("metadata state: {0}")]
    State(#[from] StateError),
    #[error("metadata log: {0}")]
    Log(#[from] LogStoreError),
    /// Raft stopped on a storage error or a panic; the node must restart.
    #[error("metadata raft stopped: {source}; restart the node")]
    Raft {
        #[source]
        source: Box<Fatal<NodeId>>,
    },
    /// Bootstrapping the cluster failed.
    #[error("cannot initialize the metadata group: {source}")]
    Initialize {
        #[source]
        source: Box<RaftError<NodeId, InitializeError<NodeId, NodeInfo>>>,
    },
    /// A change that only membership commands can produce (a bug if seen here).
    #[error("unexpected membership error: {source}")]
    Membership {
        #[source]
        source: openraft::error::ChangeMembershipError<NodeId>,
    },
    #[error("invalid metadata configuration: {source}")]
    Config {
        #[source]
        source: Box<openraft::ConfigError>,
    },
    #[error("node {node_id} is not in the initial cluster; add it there (same list on every node)")]
    NotInCluster { node_id: NodeId },
    /// The store is empty, but the running cluster counts this node as a
    /// member that held the log: the disk was wiped (or replaced).
    #[error(
        "node {node_id} has an empty data directory but is still a member of the running cluster: its log is gone. Remove it first with \"cairn cluster remove-node {node_id}\" (its shards are rebuilt from the others), then start it again to rejoin as a new learner."
    )]
    WipedMember { node_id: NodeId },
    /// A membership change (`add_node`, `remove_node`) was refused or did not finish.
    #[error("metadata membership change: {0}")]
    Change(#[from] ChangeError),
    #[error("cannot create the metadata directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Opening the store did not complete (the blocking task failed).
    #[error("opening the metadata store did not complete: {reason}")]
    OpenTask { reason: String },
    /// The files are still held after shutdown (a task kept a handle).
    #[error("metadata files still in use {waited_ms} ms after shutdown")]
    FilesBusy { waited_ms: u64 },
    /// The metadata group is shut down (or shutting down).
    #[error("metadata group is shutting down")]
    ShuttingDown,
}

/// A fatal Raft error as a [`MetaError`] (`Stopped` means shutting down).
pub(super) fn fatal(source: Fatal<NodeId>) -> MetaError {
    match source {
        Fatal::Stopped => MetaError::ShuttingDown,
        source => MetaError::Raft {
            source: Box::new(source),
        },
    }
}
