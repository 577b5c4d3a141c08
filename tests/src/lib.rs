//! Cluster harness for the multi-node tests: a three-region cluster of
//! in-process nodes (real gRPC on 127.0.0.1:0, real sled, real shard files)
//! and helpers that panic with a reason when an expectation fails.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_cli::verify;
use cairn_client::backup::{BackupOptions, BackupSummary, Progress, backup_paths};
use cairn_client::restore::{RestoreOptions, restore};
use cairn_client::seal::KdfParams;
use cairn_client::{Cluster, ClusterOptions, Repository};
use cairn_node::local_cluster::LocalCluster;

pub const PASSWORD: &[u8] = b"correct horse battery staple";
pub const TENANT: &str = "chat-platform";

/// Logs to stderr when CAIRN_TEST_LOG is set.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("CAIRN_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// 3 regions × 2 nodes, 4+2, ready to serve.
pub async fn must_start_cluster(dir: &Path) -> LocalCluster {
    must_start_tuned(dir, &[2, 2, 2], |_| {}).await
}

/// `per_region[i]` nodes in region `r{i+1}`, 4+2, every node's settings
/// adjusted by `tune`, ready to serve.
pub async fn must_start_tuned(
    dir: &Path,
    per_region: &[usize],
    tune: impl Fn(&mut cairn_node::config::NodeFile),
) -> LocalCluster {
    init_logging();
    let cluster = LocalCluster::start_tuned(dir, per_region, "4+2", tune)
        .await
        .expect("cluster starts");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("cluster becomes ready");
    cluster
}

/// How the SDK reaches `cluster` as its operator: the cluster CA and the
/// bootstrap cluster-admin token once it runs TLS.
pub fn admin_options(cluster: &LocalCluster) -> ClusterOptions {
    cairn_cli::demo::client_options(cluster, cairn_cli::demo::Transport::Tls)
        .expect("the cluster's credentials")
}

/// Like [`admin_options`] with another token (a tenant's, with its role).
pub fn token_options(cluster: &LocalCluster, token: &str) -> ClusterOptions {
    let options = admin_options(cluster);
    let ca = options.ca_pem.clone();
    let with_token = ClusterOptions {
        ca_pem: ca,
        ..ClusterOptions::default()
    };
    with_token.token(token).expect("token is valid")
}

/// A client for every node of the cluster (it fails over between them),
/// presenting the cluster-admin token.
pub fn client(cluster: &LocalCluster) -> Cluster {
    client_with(cluster, admin_options(cluster))
}

/// A client for every node of the cluster with these credentials.
pub fn client_with(cluster: &LocalCluster, options: ClusterOptions) -> Cluster {
    Cluster::with_options(&cluster.addrs(), options)
        .expect("addresses parse")
        .with_failover_budget(Duration::from_secs(20))
}

/// A client presenting `token` (with the cluster's CA when it runs TLS).
pub fn client_with_token(cluster: &LocalCluster, token: &str) -> Cluster {
    client_with(cluster, token_options(cluster, token))
}

/// Creates a token of `role` for `tenant` (empty: cluster-wide) with the
/// cluster-admin token; returns its secret.
pub async fn must_create_token(cluster: &LocalCluster, role: &str, tenant: &str) -> String {
    let created = cairn_client::admin::create_token(&client(cluster), role, tenant, None, "test")
        .await
        .unwrap_or_else(|e| panic!("create a {role} token for {tenant:?}: {e}"));
    created.secret.to_string()
}

/// Initializes `tenant` through `cluster` (whatever token it presents).
pub async fn must_init_as(cluster: Cluster, tenant: &str) -> Arc<Repository> {
    Arc::new(
        Repository::init(cluster, tenant, PASSWORD, KdfParams::fast_for_tests())
            .await
            .unwrap_or_else(|e| panic!("init {tenant}: {e}")),
    )
}

pub async fn must_init(cluster: &LocalCluster) -> Arc<Repository> {
    Arc::new(
        Repository::init(
            client(cluster),
            TENANT,
            PASSWORD,
            KdfParams::fast_for_tests(),
        )
        .await
        .expect("init succeeds"),
    )
}

pub async fn must_open(cluster: &LocalCluster) -> Arc<Repository> {
    Arc::new(
        Repository::open(client(cluster), TENANT, PASSWORD)
            .await
            .expect("open succeeds"),
    )
}

pub async fn must_backup(repo: &Arc<Repository>, source: &Path, dataset: &str) -> BackupSummary {
    let options = BackupOptions {
        dataset: dataset.into(),
        ..BackupOptions::default()
    };
    backup_paths(
        repo.clone(),
        &[source.to_path_buf()],
        &options,
        Arc::new(Progress::default()),
    )
    .await
    .expect("backup succeeds")
}

/// Every regular file under `dir` (symlinks not followed), e.g. a node's
/// shard files or its whole data directory.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            let entries = std::fs::read_dir(&path).expect("readable directory");
            stack.extend(entries.flatten().map(|e| e.path()));
        } else if meta.is_file() {
            files.push(path);
        }
    }
    files
}

/// Restores `snapshot` (an id or `latest`) and asserts it equals `source`.
pub async fn must_restore_identical(
    repo: &Repository,
    snapshot: &str,
    source: &Path,
    scratch: &Path,
    exclude_regions: &[&str],
) {
    let snapshot = repo
        .find_snapshot(snapshot, None)
        .await
        .expect("snapshot is listed");
    let target = scratch.join(format!("restore-{}", snapshot.short_id()));
    let _ = std::fs::remove_dir_all(&target);
    let options = RestoreOptions {
        include: Vec::new(),
        exclude_regions: exclude_regions.iter().map(|r| r.to_string()).collect(),
        ..RestoreOptions::default()
    };
    restore(
        repo,
        &snapshot,
        &target,
        &options,
        Arc::new(Progress::default()),
    )
    .await
    .expect("restore succeeds");
    let name = source.file_name().expect("source has a name");
    let differences = verify::compare_dirs(source, &target.join(name));
    assert!(
        differences.is_empty(),
        "restore differs from source: {differences:?}"
    );
}

pub mod process;
