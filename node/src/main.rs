//! `cairn-node`: one Cairn storage node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cairn_node::config::{NodeConfig, NodeFile};
use clap::Parser;

/// A Cairn storage node: Raft metadata member, shard store and gateway.
#[derive(Debug, Parser)]
#[command(name = "cairn-node", version)]
struct Args {
    /// This node's id; unique and never reused in the cluster.
    #[arg(long)]
    node_id: Option<u64>,
    /// The region (failure domain) this node is in.
    #[arg(long)]
    region: Option<String>,
    /// Address to serve gRPC on, as listed in --initial-cluster.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for shards and metadata.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Every node: ID=REGION@HOST:PORT,... (the same on every node).
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Reed-Solomon code, data+parity shards.
    #[arg(long)]
    erasure: Option<String>,
    /// How long a node may be unreachable before it counts as down.
    #[arg(long, value_parser = humantime::parse_duration)]
    down_after: Option<Duration>,
    /// Address for Prometheus metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    cairn_node::malloc::limit_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,sled=warn,h2=warn,tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut file = match &args.config {
        Some(path) => NodeFile::load(path)?,
        None => NodeFile::default(),
    };
    file.node_id = args.node_id.or(file.node_id);
    file.region = args.region.or(file.region);
    file.listen = args.listen.or(file.listen);
    file.data_dir = args.data_dir.or(file.data_dir);
    file.initial_cluster = args.initial_cluster.or(file.initial_cluster);
    file.erasure = args.erasure.or(file.erasure);
    file.down_after = args.down_after.or(file.down_after);
    file.metrics_listen = args.metrics_listen.or(file.metrics_listen);
    let config = NodeConfig::from_file(file)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cairn-node")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        cairn_node::server::run(config, listener, shutdown_signal()).await?;
        Ok(())
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
