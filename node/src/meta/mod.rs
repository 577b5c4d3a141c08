//! The Raft metadata group: the cluster map, tenants and their key slots, the
//! pack and blob index and the snapshot catalog, replicated with openraft on
//! sled.
//!
//! [`Meta`] is the one handle the rest of the node uses: it opens the stores,
//! starts Raft, bootstraps the cluster, proposes commands (forwarding them to
//! the leader), offers a linearizable read barrier and serves local reads.
//! Submodules split the work so that openraft's API is touched only by the
//! adapters (`log_store`, `state_machine`, `network`, `service`); the business
//! rules live in `state` and the voter choice in `voters`, both free of
//! openraft's storage and network traits. `membership` adds and removes nodes
//! (and runs the leader's keeper task); `admission` decides whether a node
//! that starts with an empty store may take part in Raft (the wiped-disk trap).
//!
//! This module must not hold bulk data: packs and shards travel over other
//! services; only ids, placements and sealed records come here.
//!
//! Invariants:
//! - voters are chosen by [`voters::choose_voters`], so with three regions or
//!   more no region holds a majority (design invariant 3);
//! - `write` returns only once the command is applied on this node too, both
//!   in the state (a node reads its own writes) and in the Raft metrics (so
//!   `last_applied()` and metrics-based waits cover it);
//! - `read_barrier` returning `Ok` means every write committed before the call
//!   is in the local state;
//! - after `shutdown` returns, no handle on the sled files is left, so the
//!   same directory can be opened again in this process;
//! - a node that opened an empty store answers no vote, append or snapshot
//!   until its admission is decided, and never bootstraps a cluster unless a
//!   majority of the initial voters answered that they are empty too.

pub mod admission;
pub mod codec;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod service;
pub mod state;
pub mod state_machine;
pub mod types;
pub mod voters;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cairn_proto::MAX_MESSAGE_BYTES;
use cairn_proto::v1::raft_server::RaftServer;
use openraft::error::{CheckIsLeaderError, ClientWriteError, Fatal, InitializeError, RaftError};
use openraft::metrics::WaitError;
use openraft::raft::ClientWriteResponse;
use openraft::{LogId, Raft, SnapshotPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::RaftSection;
use crate::kv::{KvError, ReleaseWatch, SledDb};
use crate::model::NodeView;
use admission::{Admission, Decision};
use log_store::{LogStore, LogStoreError};
use membership::ChangeError;
use network::{CallError, NetworkFactory, PeerChannels, Rpc};
use service::RaftService;
use state::{StateError, StateView};
use state_machine::StateMachineStore;
use types::{
    BlobLocation, Command, CommandResult, Id32, MetaStats, NodeId, NodeInfo, NodeMark, PackRecord,
    SnapshotRecord, TypeConfig,
};

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

    fn raft_config(&self) -> Result<openraft::Config, MetaError> {
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
            ..Default::default()
        }
        .validate()
        .map_err(|source| MetaError::Config {
            source: Box::new(source),
        })
    }
}

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

fn fatal(source: Fatal<NodeId>) -> MetaError {
    match source {
        Fatal::Stopped => MetaError::ShuttingDown,
        source => MetaError::Raft {
            source: Box::new(source),
        },
    }
}

/// Answer of a forwarded command, as the leader's `Raft::client_write` gave it.
type ForwardAnswer =
    Result<ClientWriteResponse<TypeConfig>, RaftError<NodeId, ClientWriteError<NodeId, NodeInfo>>>;
/// Answer of a read-index call.
type ReadIndexAnswer =
    Result<Option<LogId<NodeId>>, RaftError<NodeId, CheckIsLeaderError<NodeId, NodeInfo>>>;

/// How long `shutdown` waits for openraft's tasks to release the files.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

struct Inner {
    node_id: NodeId,
    config: MetaConfig,
    raft: Raft<TypeConfig>,
    /// The nodes named at start (`--initial-cluster`), and the voters chosen from them.
    initial_cluster: BTreeMap<NodeId, NodeInfo>,
    initial_voters: BTreeSet<NodeId>,
    /// Whether this node takes part in Raft; read by the Raft service's gate.
    admission: watch::Sender<Admission>,
    /// Serializes membership changes run by this node as leader.
    change_lock: tokio::sync::Mutex<()>,
    /// `None` once shut down: reads then fail instead of holding the files open.
    state: RwLock<Option<StateView>>,
    channels: PeerChannels,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    released: ReleaseWatch,
}

/// Handle on the metadata group. Cheap to clone.
#[derive(Clone)]
pub struct Meta {
    inner: Arc<Inner>,
}

enum Attempt<T> {
    Done(T),
    /// Not applied anywhere; safe to try again after a pause.
    Retry,
}

impl Meta {
    /// Opens (or creates) the metadata store under `dir` (a sled database
    /// there) and starts Raft.
    ///
    /// `initial_cluster` is every node of the cluster with its region and
    /// address, the same on every node (a node added later lists the running
    /// nodes and itself). A store that holds a log starts at once. An empty
    /// store first asks the other nodes whether a cluster exists
    /// ([`admission`], at most [`MetaConfig::probe_timeout`] here, then in
    /// the background):
    /// - if the cluster counts this node as a member that held the log, the
    ///   disk was wiped: `open` fails with [`MetaError::WipedMember`] (or, if
    ///   that only shows later, the node fences itself);
    /// - if the cluster exists without this node (it was removed, or is new),
    ///   the node starts empty and asks the leader to add it ([`Meta::add_node`]
    ///   on itself, retried in the background): restarting a removed node with
    ///   an empty directory is how it rejoins;
    /// - if no cluster exists yet, the lowest of the voters chosen from
    ///   `initial_cluster` bootstraps it, once a majority of the other initial
    ///   voters answered that they are empty too.
    ///
    /// On the leader, a background task adds every other initial node as a
    /// learner (unless removed on purpose; bounded retries, logged) and
    /// records which members hold the log.
    pub async fn open(
        node_id: NodeId,
        dir: &Path,
        initial_cluster: BTreeMap<NodeId, NodeInfo>,
        config: MetaConfig,
    ) -> Result<Meta, MetaError> {
        if !initial_cluster.contains_key(&node_id) {
            return Err(MetaError::NotInCluster { node_id });
        }
        let raft_config = Arc::new(config.raft_config()?);
        std::fs::create_dir_all(dir).map_err(|source| MetaError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        // sled recovers its log on open: blocking work, off the runtime.
        let path = dir.to_path_buf();
        let (db, log_kv, state_kv) = tokio::task::spawn_blocking(move || {
            let db = SledDb::open(&path)?;
            let log = db.tree("raft_log")?;
            let state = db.tree("raft_state")?;
            Ok::<_, KvError>((db, log, state))
        })
        .await
        .map_err(|e| MetaError::OpenTask {
            reason: e.to_string(),
        })??;
        let released = db.release_watch();
        drop(db);
        let log_store = LogStore::open(Arc::new(log_kv))?;
        let view = StateView::open(Arc::new(state_kv))?;
        let empty = log_store.is_empty()? && view.applied_state()?.0.is_none();

        let initial_voters = voters::choose_voters(&initial_cluster);
        let region = initial_cluster[&node_id].region.clone();
        let channels = PeerChannels::new(Duration::from_millis(config.rpc_timeout_ms));
        let decision = if empty {
            let answers =
                admission::probe(&channels, node_id, &initial_cluster, config.probe_timeout())
                    .await;
            let decision = admission::decide(node_id, &initial_voters, &answers);
            tracing::info!(node_id, answers = answers.len(), decision = ?decision, "empty metadata store: asked the initial cluster");
            Some(decision)
        } else {
            None
        };
        if let Some(Decision::Wiped { told_by }) = decision {
            let refused = MetaError::WipedMember { node_id };
            tracing::error!(node_id, told_by, error = %refused, "refusing to start");
            drop((log_store, view));
            wait_released(node_id, &released).await?;
            return Err(refused);
        }

        let state_machine = StateMachineStore::new(view.clone());
        let network = NetworkFactory::new(node_id, channels.clone());
        let raft = Raft::new(node_id, raft_config, network, log_store, state_machine)
            .await
            .map_err(fatal)?;
        tracing::info!(node_id, region = %region, voters = ?initial_voters, "metadata group opened");

        let admitted = match &decision {
            None => Admission::Admitted,
            Some(Decision::Undecided { .. }) => Admission::Probing,
            // Taken over by `act_on` below.
            Some(_) => Admission::Probing,
        };
        let (stop, stop_rx) = watch::channel(false);
        let meta = Meta {
            inner: Arc::new(Inner {
                node_id,
                config,
                raft,
                initial_cluster,
                initial_voters,
                admission: watch::Sender::new(admitted),
                change_lock: tokio::sync::Mutex::new(()),
                state: RwLock::new(Some(view)),
                channels,
                stop,
                tasks: Mutex::new(Vec::new()),
                released,
            }),
        };
        if let Some(decision) = decision {
            let undecided = matches!(decision, Decision::Undecided { .. });
            if let Err(e) = meta.act_on(decision).await {
                // Do not leave Raft running (and the files locked) behind an error.
                tracing::error!(node_id, error = %e, "metadata bootstrap failed; stopping raft");
                let _ = meta.shutdown().await;
                return Err(e);
            }
            if undecided {
                meta.spawn_task(admission::probe_until_decided(
                    Arc::downgrade(&meta.inner),
                    meta.tick(),
                    stop_rx.clone(),
                ));
            }
        }
        meta.spawn_task(membership::keep_membership(
            Arc::downgrade(&meta.inner),
            meta.tick(),
            stop_rx,
        ));
        Ok(meta)
    }

    /// Pause between two rounds of a background task: one heartbeat.
    fn tick(&self) -> Duration {
        Duration::from_millis(self.inner.config.heartbeat_ms.max(10))
    }

    /// Runs `task` in the background until shutdown (which waits for it).
    /// Nothing is started once shutdown has begun.
    fn spawn_task(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if *self.inner.stop.borrow() {
            return;
        }
        tasks.push(tokio::spawn(task));
    }

    /// The gRPC service to mount on the node's server (Raft RPCs, Forward,
    /// ReadIndex, ChangeMembership, ClusterInfo).
    pub fn raft_service(&self) -> RaftServer<RaftService> {
        RaftServer::new(RaftService::new(self.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Where this node stands towards Raft: a node that opened an empty store
    /// is `Probing` until its peers' answers decide, then `Admitted`, or
    /// `Fenced` for good if it turned out to be a wiped member.
    pub fn admission(&self) -> Admission {
        *self.inner.admission.borrow()
    }

    /// Whether `id` is in the membership this node knows (voter or learner).
    pub fn is_member(&self, id: NodeId) -> bool {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some()
    }

    /// Every node with a mark (removed on purpose, holds the log), by id
    /// (local, possibly stale).
    pub fn node_marks(&self) -> Result<BTreeMap<NodeId, NodeMark>, MetaError> {
        Ok(self.view()?.node_marks()?)
    }

    /// Proposes a command on the leader (locally, or forwarded over the
    /// `Forward` RPC), retrying while there is no leader, for at most
    /// [`MetaConfig::op_timeout`]. Returns only once the command is applied
    /// on this node too (read-your-writes on the proposing node).
    ///
    /// A call that fails with [`MetaError::Unavailable`] may have been
    /// applied; commands are idempotent (`AlreadyExists` on a repeat).
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, MetaError> {
        self.retrying(|leader, deadline| {
            let cmd = cmd.clone();
            async move {
                if leader == self.inner.node_id {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let proposed =
                        tokio::time::timeout(remaining, self.inner.raft.client_write(cmd)).await;
                    let Ok(answer) = proposed else {
                        return Err(MetaError::Unconfirmed {
                            waited_ms: remaining.as_millis() as u64,
                        });
                    };
                    return match answer {
                        // openraft answers as soon as the state machine has
                        // applied the entry, before its metrics say so: wait
                        // for them too, so `last_applied()` (and every
                        // metrics-based wait) covers this write on return.
                        Ok(response) => {
                            self.wait_applied(response.log_id.index, deadline).await?;
                            Ok(Attempt::Done(response.data))
                        }
                        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                            Ok(Attempt::Retry)
                        }
                        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                            source,
                        ))) => Err(MetaError::Membership { source }),
                        Err(RaftError::Fatal(f)) => Err(fatal(f)),
                    };
                }
                let Some(addr) = self.address_of(leader) else {
                    return Ok(Attempt::Retry);
                };
                let timeout = self.call_timeout(deadline);
                let answer: Result<ForwardAnswer, CallError> = self
                    .inner
                    .channels
                    .call(leader, &addr, Rpc::Forward, &cmd, timeout)
                    .await;
                match answer {
                    Ok(Ok(response)) => {
                        self.wait_applied(response.log_id.index, deadline).await?;
                        Ok(Attempt::Done(response.data))
                    }
                    // Leadership moved, or the leader is stopping: not applied.
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                        Ok(Attempt::Retry)
                    }
                    Ok(Err(RaftError::Fatal(_))) => Ok(Attempt::Retry),
                    Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                        source,
                    )))) => Err(MetaError::Membership { source }),
                    Err(e) if e.not_delivered() => Ok(Attempt::Retry),
                    Err(source) => Err(MetaError::Unavailable { leader, source }),
                }
            }
        })
        .await
    }

    /// Linearizable read barrier: when it returns `Ok`, the local state
    /// includes every write committed before the call (leader: a quorum
    /// round; follower: a read index from the leader, then a wait for the
    /// local apply).
    pub async fn read_barrier(&self) -> Result<(), MetaError> {
        let started = Instant::now();
        // Shared with each attempt's future; the future must stay `Send`.
        let last_failure: Mutex<Option<(NodeId, CallError)>> = Mutex::new(None);
        let quorum_missing = AtomicBool::new(false);
        let result = self
            .retrying(|leader, deadline| {
                let last_failure = &last_failure;
                let quorum_missing = &quorum_missing;
                async move {
                    if leader == self.inner.node_id {
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        return match tokio::time::timeout(
                            remaining,
                            self.inner.raft.ensure_linearizable(),
                        )
                        .await
                        {
                            Err(_elapsed) => Ok(Attempt::Retry),
                            Ok(Ok(_)) => Ok(Attempt::Done(())),
                            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(
                                _,
                            )))) => Ok(Attempt::Retry),
                            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(
                                _,
                            )))) => {
                                quorum_missing.store(true, Ordering::Relaxed);
                                Ok(Attempt::Retry)
                            }
                            Ok(Err(RaftError::Fatal(f))) => Err(fatal(f)),
                        };
                    }
                    let Some(addr) = self.address_of(leader) else {
                        return Ok(Attempt::Retry);
                    };
                    let timeout = self.call_timeout(deadline);
                    let answer: Result<ReadIndexAnswer, CallError> = self
                        .inner
                        .channels
                        .call(leader, &addr, Rpc::ReadIndex, &(), timeout)
                        .await;
                    match answer {
                        Ok(Ok(read_log_id)) => {
                            if let Some(log_id) = read_log_id {
                                self.wait_applied(log_id.index, deadline).await?;
                            }
                            Ok(Attempt::Done(()))
                        }
                        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                            quorum_missing.store(true, Ordering::Relaxed);
                            Ok(Attempt::Retry)
                        }
                        Ok(Err(_)) => Ok(Attempt::Retry),
                        // A read changes nothing: any failure may be retried.
                        Err(e) => {
                            *last_failure.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some((leader, e));
                            Ok(Attempt::Retry)
                        }
                    }
                }
            })
            .await;
        let waited_ms = started.elapsed().as_millis() as u64;
        let last_failure = last_failure.into_inner().unwrap_or_else(|p| p.into_inner());
        match (result, last_failure) {
            (Err(MetaError::NoLeader { .. }), _) if quorum_missing.load(Ordering::Relaxed) => {
                Err(MetaError::NoQuorum { waited_ms })
            }
            (Err(MetaError::NoLeader { .. }), Some((leader, source))) => {
                Err(MetaError::Unavailable { leader, source })
            }
            (other, _) => other,
        }
    }

    /// Runs `attempt` against the current leader until it is done, an error
    /// is final, or [`MetaConfig::op_timeout`] has passed.
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, MetaError>
    where
        F: FnMut(NodeId, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, MetaError>>,
    {
        let started = Instant::now();
        let deadline = started + self.inner.config.op_timeout();
        let pause = Duration::from_millis(self.inner.config.heartbeat_ms.max(10));
        loop {
            if *self.inner.stop.borrow() {
                return Err(MetaError::ShuttingDown);
            }
            let no_leader = || MetaError::NoLeader {
                waited_ms: started.elapsed().as_millis() as u64,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(no_leader());
            }
            let leader = match self
                .inner
                .raft
                .wait(Some(remaining))
                .metrics(|m| m.current_leader.is_some(), "a metadata leader is known")
                .await
            {
                Ok(metrics) => metrics
                    .current_leader
                    .expect("the wait condition ensures a leader"),
                Err(WaitError::Timeout(..)) => return Err(no_leader()),
                Err(WaitError::ShuttingDown) => return Err(MetaError::ShuttingDown),
            };
            match attempt(leader, deadline).await? {
                Attempt::Done(value) => return Ok(value),
                Attempt::Retry => {
                    // Back off a heartbeat: a new leader shows up in the
                    // metrics within an election; hammering does not help.
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(remaining)).await;
                }
            }
        }
    }

    fn call_timeout(&self, deadline: Instant) -> Duration {
        let remaining = deadline.saturating_duration_since(Instant::now());
        Duration::from_millis(self.inner.config.rpc_timeout_ms)
            .min(remaining)
            .max(Duration::from_millis(1))
    }

    /// Waits until the local state machine has applied `index`.
    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), MetaError> {
        let started = Instant::now();
        let remaining = deadline
            .saturating_duration_since(started)
            .max(Duration::from_millis(1));
        match self
            .inner
            .raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "a committed entry is applied locally")
            .await
        {
            Ok(_) => Ok(()),
            Err(WaitError::ShuttingDown) => Err(MetaError::ShuttingDown),
            Err(WaitError::Timeout(..)) => Err(MetaError::ApplyLagging {
                index,
                applied: self.last_applied_index(),
                waited_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }

    fn address_of(&self, node: NodeId) -> Option<String> {
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow();
        metrics
            .membership_config
            .membership()
            .get_node(&node)
            .map(|info| info.addr.clone())
    }

    fn view(&self) -> Result<StateView, MetaError> {
        // Only `shutdown` writes it, and it cannot panic while holding it.
        let state = self.inner.state.read().unwrap_or_else(|p| p.into_inner());
        state.clone().ok_or(MetaError::ShuttingDown)
    }

    /// The tenant's key slots (local, possibly stale).
    pub fn key_slots(&self, tenant: &str) -> Result<Vec<Vec<u8>>, MetaError> {
        Ok(self.view()?.key_slots(tenant)?)
    }

    /// For each id, whether the tenant's blob index has it (local, possibly stale).
    pub fn find_blobs(&self, tenant: &str, ids: &[Id32]) -> Result<Vec<bool>, MetaError> {
        Ok(self.view()?.find_blobs(tenant, ids)?)
    }

    /// Where the tenant's blob lives (local, possibly stale).
    pub fn locate_blob(&self, tenant: &str, id: &Id32) -> Result<Option<BlobLocation>, MetaError> {
        Ok(self.view()?.locate_blob(tenant, id)?)
    }

    /// One pack (local, possibly stale).
    pub fn pack(&self, id: &Id32) -> Result<Option<PackRecord>, MetaError> {
        Ok(self.view()?.pack(id)?)
    }

    /// Every pack, by id (local, possibly stale).
    pub fn packs(&self) -> Result<Vec<PackRecord>, MetaError> {
        Ok(self.view()?.packs()?)
    }

    /// The tenant's snapshots, of one dataset if given, oldest first (local, possibly stale).
    pub fn snapshots(
        &self,
        tenant: &str,
        dataset: Option<&str>,
    ) -> Result<Vec<SnapshotRecord>, MetaError> {
        Ok(self.view()?.snapshots(tenant, dataset)?)
    }

    /// Counters of the local state.
    pub fn stats(&self) -> Result<MetaStats, MetaError> {
        Ok(self.view()?.stats()?)
    }

    /// Every member (voters and learners) with its info and whether it votes.
    /// Older shape of [`Meta::node_views`], kept for its callers.
    pub fn members(&self) -> BTreeMap<NodeId, (NodeInfo, bool)> {
        self.node_views()
            .into_values()
            .map(|view| (view.id, (view.info(), view.voter)))
            .collect()
    }

    /// The cluster map as this node's membership knows it, by id: voters and
    /// learners, presumed up and not draining (the gateway, which knows
    /// liveness and drains, fills those in).
    pub fn node_views(&self) -> BTreeMap<NodeId, NodeView> {
        let metrics = self.inner.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, info)| (*id, NodeView::member(*id, info, voters.contains(id))))
            .collect()
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// This node's current term.
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow().current_term
    }

    /// Index of the last entry applied to the local state (0 before any).
    pub fn last_applied(&self) -> u64 {
        self.last_applied_index().unwrap_or(0)
    }

    fn last_applied_index(&self) -> Option<u64> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map(|id| id.index)
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// The settings this group runs with.
    pub fn config(&self) -> &MetaConfig {
        &self.inner.config
    }

    /// The underlying openraft handle, for tests and status pages that need
    /// its metrics (`raft().wait(..)`).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.inner.raft
    }

    /// Stops Raft and releases the sled files (so the node can be reopened
    /// in the same process). Later calls on this handle fail with `ShuttingDown`.
    pub async fn shutdown(&self) -> Result<(), MetaError> {
        self.inner.stop.send_replace(true);
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let raft_stopped = self.inner.raft.shutdown().await;
        for task in tasks {
            // Every background task races its work against the stop signal.
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "metadata background task ended abnormally; continuing shutdown");
            }
        }
        self.inner
            .state
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // openraft drops the log store and state machine from its own tasks
        // shortly after the core stops; wait for the last sled handle to go.
        wait_released(self.inner.node_id, &self.inner.released).await?;
        if let Err(e) = raft_stopped {
            tracing::warn!(error = %e, "metadata raft core ended abnormally");
        }
        tracing::info!(node_id = self.inner.node_id, "metadata group stopped");
        Ok(())
    }
}

/// Bootstraps the group with `voters` if this node is the lowest voter and
/// its log is empty; otherwise does nothing. Called only once admission has
/// shown that no cluster exists (a majority of the initial voters is empty).
async fn bootstrap(
    raft: &Raft<TypeConfig>,
    node_id: NodeId,
    voters: &std::collections::BTreeSet<NodeId>,
    initial_cluster: &BTreeMap<NodeId, NodeInfo>,
) -> Result<(), MetaError> {
    if voters.first() != Some(&node_id) || raft.is_initialized().await.map_err(fatal)? {
        return Ok(());
    }
    let members: BTreeMap<NodeId, NodeInfo> = voters
        .iter()
        .map(|id| (*id, initial_cluster[id].clone()))
        .collect();
    match raft.initialize(members).await {
        Ok(()) => {
            tracing::info!(node_id, "metadata group bootstrapped");
            Ok(())
        }
        // Already initialized (raced with a vote from a peer): nothing to do.
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(source) => Err(MetaError::Initialize {
            source: Box::new(source),
        }),
    }
}

/// Waits until the last handle on the sled files is gone.
async fn wait_released(node_id: NodeId, released: &ReleaseWatch) -> Result<(), MetaError> {
    let started = Instant::now();
    while !released.is_released() {
        if started.elapsed() >= RELEASE_TIMEOUT {
            tracing::error!(
                node_id,
                "metadata files still open after shutdown; reopening will fail until they close"
            );
            return Err(MetaError::FilesBusy {
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
