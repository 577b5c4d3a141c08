//! One node, all roles, one port: `run(config, listener, shutdown)`.
//!
//! Opens the shard store and the metadata group under the data directory,
//! mounts the Raft, Shards and Cairn services on one gRPC server, and on
//! shutdown drains requests, then stops Raft so the sled files are released.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

use crate::config::NodeConfig;
use crate::gateway::Gateway;
use crate::liveness::{Liveness, run_prober};
use crate::meta::{Meta, MetaError};
use crate::peers::Peers;
use crate::repair::Repairer;
use crate::scrub::ScrubStats;
use crate::shard_io::ShardIo;
use crate::shard_store::service::ShardService;
use crate::shard_store::{ShardStore, ShardStoreError};

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("shard store: {0}")]
    ShardStore(#[from] ShardStoreError),
    #[error("metadata group: {0}")]
    Meta(#[from] MetaError),
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    BootstrapToken(#[from] crate::auth::token::BootstrapFileError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Runs a node until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_publishing(config, listener, shutdown, None).await
}

/// Where an in-process node publishes its metadata handle (tests read pack
/// records and classes through it); emptied when the node stops.
type MetaSlot = Arc<std::sync::Mutex<Option<Meta>>>;

async fn run_publishing(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    publish: Option<MetaSlot>,
) -> Result<(), ServerError> {
    // Checked before anything is opened: a node with a certificate its
    // peers would refuse must not start at all.
    let tls = if config.security.insecure {
        tracing::warn!(
            node_id = config.node_id,
            "--insecure: plaintext and no authentication; anyone who reaches this port controls the cluster"
        );
        None
    } else {
        Some(crate::tls::NodeTls::load(
            config.node_id,
            &config.security.tls,
        )?)
    };
    let dial = tls.as_ref().map(crate::tls::NodeTls::dial);
    // A bad bootstrap file is a start error, before anything is opened.
    let bootstrap_key = match &config.security.bootstrap_token_file {
        Some(path) => Some(crate::auth::token::token_key(
            &crate::auth::token::read_bootstrap_file(path)?,
        )),
        None => None,
    };
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Arc::new(ShardStore::open(config.data_dir.join("shards"))?);
    let meta = Meta::open_with(
        config.node_id,
        &config.data_dir.join("meta"),
        config.initial_cluster.clone(),
        config.meta_config(),
        dial.clone(),
    )
    .await?;
    if let Some(slot) = &publish {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(meta.clone());
    }
    let peers = Arc::new(
        Peers::new(
            Duration::from_secs(2),
            // A failed peer is avoided by placement until the prober (or any
            // call) hears from it again; being declared down, and repaired
            // around, takes `down_after`.
            Duration::from_secs(60),
        )
        .with_tls(dial),
    );
    let liveness = Arc::new(Liveness::new(config.node_id, config.down_after));
    let gateway_config = config.gateway_config();
    let io = Arc::new(ShardIo::new(
        config.node_id,
        store.clone(),
        peers.clone(),
        gateway_config.rpc_timeout,
    ));
    let repairer = Arc::new(Repairer::new(
        config.node_id,
        meta.clone(),
        io.clone(),
        liveness.clone(),
        gateway_config.repair.clone(),
    ));
    let scrub_stats = Arc::new(ScrubStats::default());
    let gateway = Arc::new(
        Gateway::new(
            config.node_id,
            config.region.clone(),
            gateway_config,
            meta.clone(),
            io,
            liveness.clone(),
            repairer.clone(),
            scrub_stats.clone(),
        )
        .secured(config.security.insecure),
    );
    let shards = ShardService::new(store.clone(), config.node_id).with_scrub(scrub_stats.clone());

    // Background workers, each with a name, an owner (this function) and a
    // shutdown path (the watch below); joined before Raft stops.
    let (stop_workers, workers_stopped) = watch::channel(false);
    let probe_interval =
        (config.down_after / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut workers = vec![
        tokio::spawn(run_prober(
            liveness.clone(),
            peers,
            meta.clone(),
            probe_interval,
            workers_stopped.clone(),
        )),
        tokio::spawn(repairer.run(workers_stopped.clone())),
        // Dataset policies, applied by the leader only.
        tokio::spawn(crate::lifecycle::policy::run(
            meta.clone(),
            config.lifecycle.policy_interval,
            workers_stopped.clone(),
        )),
        // Garbage collection: the leader collects every tenant each interval.
        tokio::spawn(crate::gc::run(
            gateway.clone(),
            config.lifecycle.gc_interval,
            workers_stopped.clone(),
        )),
        // Tiering: this node's class into the map; the leader moves packs.
        tokio::spawn(crate::tiering::announce_class(
            meta.clone(),
            config.node_id,
            config.storage_class,
            workers_stopped.clone(),
        )),
        tokio::spawn(crate::tiering::run(
            gateway.clone(),
            config.tiering.clone(),
            workers_stopped.clone(),
        )),
    ];
    if let Some(key) = bootstrap_key {
        workers.push(tokio::spawn(crate::auth::token::bootstrap(
            meta.clone(),
            key,
            workers_stopped.clone(),
        )));
    }
    // Filled by the server's layer below, read by the metrics page.
    let rpc_stats = crate::rpc_metrics::RpcStats::default();
    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::MetricsListen { addr, source })?;
        workers.push(tokio::spawn(crate::metrics::serve(
            listener,
            crate::metrics::Sources {
                gateway: gateway.clone(),
                scrub: scrub_stats.clone(),
                liveness: liveness.clone(),
                data_dir: config.data_dir.clone(),
                tls_expiry: tls.as_ref().and_then(crate::tls::NodeTls::expiry),
                audit: Arc::new(crate::auth::audit::ChainWatch::default()),
                rpc: rpc_stats.clone(),
            },
            workers_stopped.clone(),
        )));
    }
    {
        let reporter = gateway.clone();
        let node_id = config.node_id;
        workers.push(tokio::spawn(crate::scrub::run(
            config.node_id,
            store,
            meta.clone(),
            (&config.scrub).into(),
            scrub_stats,
            move |request| {
                let reporter = reporter.clone();
                async move {
                    use cairn_proto::v1::cairn_server::Cairn;
                    // In-process: this node reports as itself.
                    let mut request = tonic::Request::new(request);
                    request
                        .extensions_mut()
                        .insert(crate::auth::Caller::Node(node_id));
                    reporter
                        .report_faults(request)
                        .await
                        .map(|_| ())
                        .map_err(|status| status.message().to_string())
                }
            },
            workers_stopped,
        )));
    }

    info!(node_id = config.node_id, region = %config.region, storage_class = %config.storage_class,
        addr = %config.listen, "node serving");
    let peer_auth = match &tls {
        Some(_) => crate::tls::PeerAuthLayer::new(Arc::new(meta.clone())),
        None => crate::tls::PeerAuthLayer::disabled(),
    };
    let mut builder = crate::limits::server();
    if let Some(tls) = &tls {
        builder = builder.tls_config(tls.server_config())?;
    }
    let served = builder
        .layer(crate::rpc_metrics::RpcMetricsLayer::new(rpc_stats))
        .layer(peer_auth)
        .add_routes(crate::limits::routes(
            meta.raft_service(),
            shards.into_server(),
            gateway.server(),
            gateway.budget(),
            gateway.authenticator(),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), {
            let gateway = gateway.clone();
            async move {
                shutdown.await;
                let _ = stop_workers.send(true);
                // Long-lived calls end now, so the drain can finish.
                gateway.close_streams();
            }
        })
        .await;
    for worker in workers {
        let _ = worker.await;
    }
    drop(gateway);
    if let Some(slot) = &publish {
        slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
    let stopped = meta.shutdown().await;
    info!(node_id = config.node_id, "node stopped");
    served?;
    stopped?;
    Ok(())
}

/// A node running in this process (tests, `cairn demo`).
pub struct NodeHandle {
    pub node_id: u64,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
    meta: MetaSlot,
}

impl NodeHandle {
    /// Starts a node on an already bound listener.
    pub fn spawn(config: NodeConfig, listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let node_id = config.node_id;
        let (stop, stopped) = oneshot::channel::<()>();
        let meta = MetaSlot::default();
        let task = tokio::spawn(run_publishing(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
            Some(meta.clone()),
        ));
        Ok(Self {
            node_id,
            addr,
            stop: Some(stop),
            task,
            meta,
        })
    }

    /// The node's metadata handle while it runs (local reads: pack records,
    /// storage classes); `None` before it opened its store and once stopped.
    pub fn meta(&self) -> Option<Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the node and waits until its files are released.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => Ok(()),
        }
    }
}
