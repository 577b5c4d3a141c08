//! Startup of the metadata group: [`Meta::open`] opens the stores, asks the
//! initial cluster whether an empty store may take part ([`super::admission`]),
//! starts Raft and its background tasks; [`bootstrap`] forms a new cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::Raft;
use openraft::error::{InitializeError, RaftError};
use tokio::sync::watch;

use super::admission::{self, Admission, Decision};
use super::error::fatal;
use super::log_store::LogStore;
use super::network::{NetworkFactory, PeerChannels};
use super::state::StateView;
use super::state_machine::StateMachineStore;
use super::types::{NodeId, NodeInfo, TypeConfig};
use super::{Inner, Meta, MetaConfig, MetaError, membership, voters, wait_released};
use crate::kv::{KvError, SledDb};

impl Meta {
    /// Opens (or creates) the metadata store under `dir` (a sled database
    /// there) and starts Raft.
    ///
    /// `initial_cluster` is every node of the cluster with its region and
    /// address, the same on every node (a node added later lists the running
    /// nodes and itself). A store that holds a log starts at once. An empty
    /// store first asks the other nodes whether a cluster exists
    /// ([`admission`], at most [`MetaConfig::probe_timeout`](crate::meta::MetaConfig::probe_timeout) here, then in
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
        Self::open_with(node_id, dir, initial_cluster, config, None).await
    }

    /// [`Meta::open`], dialing peers over mutual TLS with `tls` (`None`:
    /// plaintext, `--insecure`).
    pub async fn open_with(
        node_id: NodeId,
        dir: &Path,
        initial_cluster: BTreeMap<NodeId, NodeInfo>,
        config: MetaConfig,
        tls: Option<cairn_proto::transport::DialTls>,
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
        let channels = PeerChannels::with_tls(Duration::from_millis(config.rpc_timeout_ms), tls);
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
    pub(super) fn tick(&self) -> Duration {
        Duration::from_millis(self.inner.config.heartbeat_ms.max(10))
    }

    /// Runs `task` in the background until shutdown (which waits for it).
    /// Nothing is started once shutdown has begun.
    pub(super) fn spawn_task(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if *self.inner.stop.borrow() {
            return;
        }
        tasks.push(tokio::spawn(task));
    }
}

/// Bootstraps the group with `voters` if this node is the lowest voter and
/// its log is empty; otherwise does nothing. Called only once admission has
/// shown that no cluster exists (a majority of the initial voters is empty).
pub(super) async fn bootstrap(
    raft: &Raft<TypeConfig>,
    node_id: NodeId,
    voters: &BTreeSet<NodeId>,
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
