//! `cairn demo` and `cairn bench`: a whole three-region cluster inside this
//! process on loopback (real gRPC, real sled, real fsync'd shard files in a
//! temporary directory), driven through the same SDK a user calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cairn_node::local_cluster::LocalCluster;
use serde::Serialize;

use crate::{datagen, verify};
use cairn_client::backup::{BackupOptions, BackupSummary, Progress, backup_paths};
use cairn_client::restore::{RestoreOptions, RestoreSummary, restore};
use cairn_client::seal::KdfParams;
use cairn_client::{Cluster, ClusterOptions, Repository};

const TENANT: &str = "demo";
const PASSWORD: &[u8] = b"demo-only passphrase";

/// The demo's cluster: 3 regions × 2 nodes, 4+2.
const TOPOLOGY: [usize; 3] = [2, 2, 2];

struct Stage<'a> {
    json: bool,
    out: &'a mut Vec<String>,
}

impl Stage<'_> {
    fn say(&mut self, line: String) {
        if !self.json {
            println!("{line}");
        }
        self.out.push(line);
    }
}

/// How the embedded cluster's nodes talk to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The cluster's default: TLS with the CA and a bootstrap token that
    /// `LocalCluster` makes in its directory.
    Tls,
    /// `--insecure`: plaintext, no token.
    Insecure,
}

/// Which transports `cairn bench` measures, one pass each, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModes {
    Tls,
    Insecure,
    /// Both, on identical data, so the cost of TLS shows in one run.
    Both,
}

impl BenchModes {
    fn transports(self) -> &'static [Transport] {
        match self {
            Self::Tls => &[Transport::Tls],
            Self::Insecure => &[Transport::Insecure],
            Self::Both => &[Transport::Tls, Transport::Insecure],
        }
    }
}

async fn start_cluster(dir: &Path) -> anyhow::Result<LocalCluster> {
    start_cluster_with(dir, Transport::Tls).await
}

/// The embedded cluster of demo and bench, ready to serve.
pub async fn start_cluster_with(dir: &Path, transport: Transport) -> anyhow::Result<LocalCluster> {
    let base = dir.join("cluster");
    let cluster = match transport {
        Transport::Tls => LocalCluster::start_secure(&base, &TOPOLOGY, "4+2", |_| {}).await,
        Transport::Insecure => {
            LocalCluster::start_tuned(&base, &TOPOLOGY, "4+2", |file| file.insecure = true).await
        }
    }
    .context("starting the local cluster")?;
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .context("waiting for the metadata group")?;
    Ok(cluster)
}

async fn backup_once(repo: &Arc<Repository>, source: &Path) -> anyhow::Result<BackupSummary> {
    let options = BackupOptions {
        dataset: "chat-messages".into(),
        ..BackupOptions::default()
    };
    Ok(backup_paths(
        repo.clone(),
        &[source.to_path_buf()],
        &options,
        Arc::new(Progress::default()),
    )
    .await?)
}

/// How the SDK reaches an embedded cluster: its CA and bootstrap
/// cluster-admin token when it runs TLS, nothing when it runs `--insecure`.
/// The one place demo, bench, the SDK example and the test harness get
/// their credentials from.
pub fn client_options(
    cluster: &LocalCluster,
    transport: Transport,
) -> anyhow::Result<ClusterOptions> {
    match (transport, cluster.ca_pem()) {
        (Transport::Tls, Some(ca)) => Ok(ClusterOptions::default()
            .ca_pem(ca)
            .token(cluster.admin_token())?),
        _ => Ok(ClusterOptions::default()),
    }
}

/// A client of the embedded cluster, with the credentials it needs.
fn connect(cluster: &LocalCluster, transport: Transport) -> anyhow::Result<Cluster> {
    Ok(Cluster::with_options(
        &cluster.addrs(),
        client_options(cluster, transport)?,
    )?)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

/// Runs the demo; prints what happens. Fails unless the restore is identical.
pub async fn demo(size_mb: u64) -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("cairn-demo-").tempdir()?;
    let mut lines = Vec::new();
    let mut stage = Stage {
        json: false,
        out: &mut lines,
    };
    let t = Instant::now();
    let mut cluster = start_cluster(work.path()).await?;
    stage.say(format!(
        "1. cluster up in {:.2}s: 3 regions x 2 nodes on loopback, Raft leader elected, erasure 4+2",
        t.elapsed().as_secs_f64()
    ));
    stage.say(
        "     mutual TLS between nodes (a fresh cluster CA, one certificate per node id); \
         the client speaks TLS with the bootstrap cluster-admin token"
            .to_string(),
    );
    for (id, info) in cluster.members() {
        stage.say(format!(
            "     node {id}  region {}  {}",
            info.region, info.addr
        ));
    }

    let source = work.path().join("chat-data");
    let t = Instant::now();
    let generated = datagen::generate(&source, size_mb, 1)?;
    stage.say(format!(
        "2. generated {:.1} MB of chat data in {:.2}s (chat logs, gifts, profiles, media, a symlink, an empty dir)",
        mb(generated),
        t.elapsed().as_secs_f64()
    ));

    let client = connect(&cluster, Transport::Tls)?;
    let repo = Arc::new(
        Repository::init(client, TENANT, PASSWORD, KdfParams::default())
            .await
            .context("cairn init")?,
    );
    let full = backup_once(&repo, &source).await?;
    stage.say(format!(
        "3. backup {}: {} files, {:.1} MB in {:.2}s ({:.0} MB/s), {:.1} MB stored after dedup+zstd, sealed and 4+2-coded",
        &full.snapshot_id[..8],
        full.files,
        mb(full.bytes),
        full.duration_s,
        mb(full.bytes) / full.duration_s,
        mb(full.bytes_added)
    ));
    let appended = datagen::mutate(&source, 1, 2)?;
    let incr = backup_once(&repo, &source).await?;
    stage.say(format!(
        "4. one more day of chat (+{:.2} MB appended to 1% of the logs): incremental {} in {:.2}s, {:.2} MB new",
        mb(appended),
        &incr.snapshot_id[..8],
        incr.duration_s,
        mb(incr.bytes_added)
    ));

    let t = Instant::now();
    cluster.stop_region("r1").await?;
    stage.say(format!(
        "5. region r1 stopped (nodes {:?}, including the first Raft leader) in {:.2}s",
        cluster.region_nodes("r1"),
        t.elapsed().as_secs_f64()
    ));

    let target = work.path().join("restored");
    let t = Instant::now();
    let snapshot = repo
        .find_snapshot("latest", Some("chat-messages"))
        .await
        .context("listing snapshots without r1")?;
    let summary = restore(
        &repo,
        &snapshot,
        &target,
        &RestoreOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .context("restoring without r1")?;
    let source_name = source.file_name().map(PathBuf::from).unwrap_or_default();
    let differences = verify::compare_dirs(&source, &target.join(&source_name));
    stage.say(format!(
        "6. restored {} from regions r2+r3 in {:.2}s ({:.0} MB/s, first byte after {:.2}s): {} files, {:.1} MB",
        &snapshot.id_hex()[..8],
        t.elapsed().as_secs_f64(),
        mb(summary.bytes) / summary.duration_s.max(1e-9),
        summary.time_to_first_byte_s,
        summary.files,
        mb(summary.bytes)
    ));
    if !differences.is_empty() {
        bail!(
            "restore differs from the source in {} place(s): {}",
            differences.len(),
            differences
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    stage.say(
        "7. verified byte for byte: contents, modes, mtimes, symlinks, empty dirs — identical"
            .into(),
    );
    cluster.shutdown().await?;
    stage.say(format!(
        "done; the cluster's files were in {} (now removed)",
        work.path().display()
    ));
    Ok(())
}

/// Figures of one benchmark pass (one transport).
#[derive(Debug, Serialize)]
pub struct BenchPass {
    pub transport: Transport,
    /// The client spoke TLS (checked against the cluster CA) in this pass.
    pub client_tls: bool,
    pub backup: BackupSummary,
    pub backup_mb_s: f64,
    pub incremental: BackupSummary,
    pub restore: RestoreSummary,
    pub restore_mb_s: f64,
}

/// Figures of one benchmark run: a pass per transport, on identical data.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub dataset_bytes: u64,
    pub passes: Vec<BenchPass>,
    /// TLS throughput as a share of insecure throughput (1.0 = no cost),
    /// when both were measured.
    pub tls_vs_insecure: Option<TlsCost>,
    pub peak_rss_bytes: Option<u64>,
    pub note: &'static str,
}

/// What TLS costs, as ratios of MB/s (TLS / insecure).
#[derive(Debug, Serialize)]
pub struct TlsCost {
    pub backup_ratio: f64,
    pub restore_ratio: f64,
}

impl BenchReport {
    fn tls_cost(passes: &[BenchPass]) -> Option<TlsCost> {
        let find = |t: Transport| passes.iter().find(|p| p.transport == t);
        let (tls, insecure) = (find(Transport::Tls)?, find(Transport::Insecure)?);
        Some(TlsCost {
            backup_ratio: tls.backup_mb_s / insecure.backup_mb_s.max(1e-9),
            restore_ratio: tls.restore_mb_s / insecure.restore_mb_s.max(1e-9),
        })
    }
}

/// Runs backup, 1% incremental and restore on the embedded cluster, once
/// per transport in `modes`, each on a fresh cluster and identical data.
pub async fn bench(
    size_mb: u64,
    data: Option<PathBuf>,
    modes: BenchModes,
    json: bool,
) -> anyhow::Result<BenchReport> {
    let work = tempfile::Builder::new().prefix("cairn-bench-").tempdir()?;
    let mut passes = Vec::new();
    let mut dataset_bytes = 0;
    for (index, &transport) in modes.transports().iter().enumerate() {
        let dir = work.path().join(format!("pass-{index}"));
        let source = match &data {
            Some(dir) => dir.clone(),
            None => {
                // The same seed: every pass backs up identical bytes.
                let source = dir.join("data");
                datagen::generate(&source, size_mb, 1)?;
                source
            }
        };
        dataset_bytes = crate::progress::measure(std::slice::from_ref(&source));
        if !json {
            println!(
                "benchmark ({}): {:.0} MB, 3 regions x 2 nodes, 4+2, fsync on",
                match transport {
                    Transport::Tls => "TLS",
                    Transport::Insecure => "insecure",
                },
                mb(dataset_bytes)
            );
        }
        let pass = bench_pass(&dir, &source, data.is_none(), transport, json).await?;
        passes.push(pass);
        // Each pass's cluster files go before the next pass starts.
        let _ = std::fs::remove_dir_all(&dir);
    }
    let tls_vs_insecure = BenchReport::tls_cost(&passes);
    if let (Some(cost), false) = (&tls_vs_insecure, json) {
        println!(
            "TLS vs insecure: backup {:.0}%, restore {:.0}% of the insecure MB/s",
            cost.backup_ratio * 100.0,
            cost.restore_ratio * 100.0
        );
    }
    Ok(BenchReport {
        dataset_bytes,
        passes,
        tls_vs_insecure,
        peak_rss_bytes: peak_rss(),
        note: "client and all six nodes share this process; peak RSS covers them all",
    })
}

async fn bench_pass(
    dir: &Path,
    source: &Path,
    mutate: bool,
    transport: Transport,
    json: bool,
) -> anyhow::Result<BenchPass> {
    let cluster = start_cluster_with(dir, transport).await?;
    let options = client_options(&cluster, transport)?;
    let client_tls = options.ca_pem.is_some();
    let client = Cluster::with_options(&cluster.addrs(), options)?;
    let repo = Arc::new(Repository::init(client, TENANT, PASSWORD, KdfParams::default()).await?);
    let full = backup_once(&repo, source).await?;
    let backup_mb_s = mb(full.bytes) / full.duration_s.max(1e-9);
    if !json {
        println!(
            "  backup       {:>7.2}s  {:>6.0} MB/s",
            full.duration_s, backup_mb_s
        );
    }
    if mutate {
        datagen::mutate(source, 1, 2)?;
    }
    let incremental = backup_once(&repo, source).await?;
    if !json {
        println!(
            "  incremental  {:>7.2}s  {:.2} MB new",
            incremental.duration_s,
            mb(incremental.bytes_added)
        );
    }
    let snapshot = repo.find_snapshot("latest", Some("chat-messages")).await?;
    let target = dir.join("restore");
    let restored = restore(
        &repo,
        &snapshot,
        &target,
        &RestoreOptions::default(),
        Arc::new(Progress::default()),
    )
    .await?;
    let restore_mb_s = mb(restored.bytes) / restored.duration_s.max(1e-9);
    if !json {
        println!(
            "  restore      {:>7.2}s  {:>6.0} MB/s",
            restored.duration_s, restore_mb_s
        );
    }
    drop(repo);
    cluster.shutdown().await?;
    Ok(BenchPass {
        transport,
        client_tls,
        backup: full,
        backup_mb_s,
        incremental,
        restore: restored,
        restore_mb_s,
    })
}

/// Peak resident memory of this process (Linux).
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
