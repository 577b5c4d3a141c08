//! Back up a directory and restore it with the SDK.
//!
//! `cargo run --example backup_and_restore -- [DIR]` uses the cluster in
//! `CAIRN_CLUSTER` (passphrase in `CAIRN_PASSWORD`, CA file in `CAIRN_CA`,
//! token in `CAIRN_TOKEN`), or, without it, starts a three-region cluster
//! inside this process for the occasion.

use std::sync::Arc;

use cairn_cli::{datagen, verify};
use cairn_client::seal::KdfParams;
use cairn_client::{Cluster, ClusterOptions, Repository, backup, restore};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let source = match std::env::args().nth(1) {
        Some(dir) => dir.into(),
        None => {
            let dir = scratch.path().join("chat");
            datagen::generate(&dir, 4, 1)?;
            dir
        }
    };

    // A cluster: the one configured, or a local one.
    let mut local = None;
    let (addrs, options, password, fresh) = match std::env::var("CAIRN_CLUSTER") {
        Ok(list) => {
            let mut options = ClusterOptions::default();
            if let Ok(ca) = std::env::var("CAIRN_CA") {
                options = options.ca_pem(std::fs::read(ca)?);
            }
            if let Ok(token) = std::env::var("CAIRN_TOKEN") {
                options = options.token(token)?;
            }
            (
                list.split(',').map(String::from).collect::<Vec<_>>(),
                options,
                std::env::var("CAIRN_PASSWORD")?,
                false,
            )
        }
        Err(_) => {
            let cluster = cairn_node::local_cluster::LocalCluster::start(
                &scratch.path().join("cluster"),
                &[2, 2, 2],
                "4+2",
            )
            .await?;
            cluster
                .wait_ready(std::time::Duration::from_secs(30))
                .await?;
            let addrs = cluster.addrs();
            let options =
                cairn_cli::demo::client_options(&cluster, cairn_cli::demo::Transport::Tls)?;
            local = Some(cluster);
            (addrs, options, "example passphrase".to_string(), true)
        }
    };

    let cluster = Cluster::with_options(&addrs, options)?;
    // The token's tenant, or "default".
    let tenant = cluster.resolve_tenant(None).await?;
    let repo = Arc::new(if fresh {
        Repository::init(cluster, &tenant, password.as_bytes(), KdfParams::default()).await?
    } else {
        Repository::open(cluster, &tenant, password.as_bytes()).await?
    });

    // Back up.
    let options = backup::BackupOptions {
        dataset: "chat-messages".into(),
        ..Default::default()
    };
    let summary = backup::backup_paths(
        repo.clone(),
        std::slice::from_ref(&source),
        &options,
        Default::default(),
    )
    .await?;
    println!(
        "snapshot {}: {} files, {} bytes",
        summary.snapshot_id, summary.files, summary.bytes
    );

    // Restore and compare.
    let snapshot = repo.find_snapshot(&summary.snapshot_id, None).await?;
    let target = scratch.path().join("restored");
    restore::restore(
        &repo,
        &snapshot,
        &target,
        &Default::default(),
        Default::default(),
    )
    .await?;
    let name = source.file_name().unwrap_or_default();
    let differences = verify::compare_dirs(&source, &target.join(name));
    println!(
        "restored to {}: {} difference(s)",
        target.display(),
        differences.len()
    );

    if let Some(cluster) = local {
        cluster.shutdown().await?;
    }
    Ok(())
}
