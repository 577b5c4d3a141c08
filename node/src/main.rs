//! `cairn-node`: one Cairn storage node. Its flags, environment variables
//! and config file are defined in `cairn_node::config`.

use std::path::PathBuf;

use anyhow::Context;
use cairn_node::ca;
use cairn_node::config::NodeArgs;
use clap::{Parser, Subcommand};

/// `cairn-node [flags]` runs a node; `cairn-node ca ...` manages certificates.
#[derive(Debug, Parser)]
#[command(
    name = "cairn-node",
    version,
    about = "A Cairn storage node: Raft metadata member, shard store and gateway.",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The cluster's certificate authority and node certificates.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a cluster CA: writes ca.pem and ca.key (0600) into DIR.
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = ca::CA_DAYS_DEFAULT)]
        days: u32,
    },
    /// Issue a node certificate: writes node-N.pem and node-N.key (0600).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        region: String,
        /// Host names or IP addresses the node is reached at, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        host: Vec<String>,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = ca::NODE_DAYS_DEFAULT)]
        days: u32,
    },
}

fn run_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { out, days } => {
            ca::init_dir(&out, days)?;
            println!(
                "wrote {} and {} (keep ca.key offline)",
                ca::CA_CERT_FILE,
                ca::CA_KEY_FILE
            );
        }
        CaCommand::Issue {
            ca: ca_dir,
            node_id,
            region,
            host,
            out,
            days,
        } => {
            let spec = ca::NodeCertSpec {
                node_id,
                region,
                hosts: host,
                days,
                not_before: None,
            };
            ca::issue_dir(&ca_dir, &spec, &out)?;
            println!(
                "wrote {} and {}",
                ca::node_cert_file(node_id),
                ca::node_key_file(node_id)
            );
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Ca(command)) = cli.command {
        return run_ca(command);
    }
    cairn_node::malloc::limit_arenas();
    let buffers_kept = cairn_node::malloc::keep_large_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,sled=warn,h2=warn,tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if !buffers_kept {
        tracing::warn!(
            "the C library refused the malloc thresholds; large buffers stay mapped per use"
        );
    }
    // Defaults < --config file < CAIRN_NODE_* environment < flags.
    let config = cli.node.load(std::env::vars())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cairn-node")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let grace = config.shutdown_grace;
        cairn_node::server::run(config, listener, stop_requested(grace)).await?;
        Ok(())
    })
}

/// Resolves at the first SIGTERM or Ctrl-C and bounds the stop it starts:
/// draining calls and closing the stores may take `grace`, after which, or
/// at a second signal, the process exits at once. Nothing acknowledged is
/// lost by that exit (every acknowledged write is already fsync'd, as after
/// a power loss), and a stalled client or a store whose disk is gone can no
/// longer hold a node in its stop until the service manager kills it.
async fn stop_requested(grace: std::time::Duration) {
    stop_signal().await;
    tracing::info!(
        grace_s = grace.as_secs_f64(),
        "stopping: draining calls and closing the stores; a second signal stops at once"
    );
    let watchdog = std::thread::Builder::new()
        .name("stop-watchdog".into())
        .spawn(move || {
            std::thread::sleep(grace);
            tracing::error!(
                grace_s = grace.as_secs_f64(),
                "stop did not finish within its grace; exiting now"
            );
            std::process::exit(1);
        });
    if let Err(e) = watchdog {
        tracing::warn!(error = %e, "no stop watchdog: the stop is not bounded");
    }
    tokio::spawn(async {
        stop_signal().await;
        tracing::warn!("second stop signal: exiting now");
        std::process::exit(1);
    });
}

/// SIGTERM or Ctrl-C.
async fn stop_signal() {
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
