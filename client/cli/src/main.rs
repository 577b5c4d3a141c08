//! `cairn`: the command line of the Cairn SDK.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use cairn_cli::lifecycle::{self as life, KeepArgs};
use cairn_cli::{access, check, demo, progress};
use cairn_client::admin;
use cairn_client::backup::{self, BackupOptions, Level, Progress};
use cairn_client::lifecycle::ForgetOptions;
use cairn_client::path_guard::display_name;
use cairn_client::repo::{DataRead, DataSubset};
use cairn_client::restore::{self, RestoreOptions};
use cairn_client::seal::KdfParams;
use cairn_client::tree::EntryKind;
use cairn_client::{Cluster, Repository};
use cairn_proto::v1 as pb;
use clap::{Args, Parser, Subcommand};
use zeroize::Zeroizing;

/// Cairn: encrypted, erasure-coded backups across regions.
#[derive(Debug, Parser)]
#[command(name = "cairn", version)]
struct Cli {
    /// Node addresses, any regions (host:port,...).
    #[arg(long, env = "CAIRN_CLUSTER", global = true, value_delimiter = ',')]
    cluster: Vec<String>,
    /// File holding the passphrase (else CAIRN_PASSWORD).
    #[arg(long, global = true)]
    password_file: Option<PathBuf>,
    /// Tenant whose data to use (default: the token's tenant, else "default").
    #[arg(long, env = "CAIRN_TENANT", global = true)]
    tenant: Option<String>,
    /// File holding the bearer token (else CAIRN_TOKEN, the token itself).
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The cluster CA node certificates must chain to (PEM). Without it the
    /// client speaks plaintext, which only --insecure clusters accept.
    #[arg(long, env = "CAIRN_CA", global = true, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// This client's region: reads prefer its nodes.
    #[arg(long, env = "CAIRN_REGION", global = true)]
    region: Option<String>,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the tenant's master key and first key slot.
    Init,
    /// Back up files and directories, or a stream with --stdin.
    Backup(BackupArgs),
    /// List snapshots: kind, commit time (cluster time), lock (L: locked).
    Snapshots {
        #[arg(long)]
        dataset: Option<String>,
    },
    /// Remove snapshots by keep rules (restic's) and/or by id; locked ones stay.
    Forget(ForgetArgs),
    /// Garbage-collect now: delete or repack packs no snapshot references.
    Prune {
        /// Report what would be freed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Lock a snapshot against forget until a time or for a duration.
    Lock(LockArgs),
    /// Lift a snapshot's lock (a governance lock before expiry: cluster-admin with --bypass-governance).
    Unlock {
        /// Snapshot id (hex prefix, at least 8 characters) or `latest`.
        id: String,
        #[arg(long)]
        bypass_governance: bool,
    },
    /// Dataset policies the cluster applies on its own: keep rules, max age, cold tier.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Storage: logical and stored bytes, dedup+compression ratio, packs, erasure overhead.
    Stats {
        #[arg(long)]
        dataset: Option<String>,
    },
    /// List the contents of a snapshot.
    Ls {
        snapshot: String,
        #[arg(long)]
        dataset: Option<String>,
    },
    /// Write one file of a snapshot to stdout.
    Dump {
        snapshot: String,
        path: String,
        #[arg(long)]
        dataset: Option<String>,
    },
    /// Restore a snapshot (or `latest`).
    Restore(RestoreArgs),
    /// Verify the index and trees; with --read-data every shard; --repair repairs what it found, then verifies again.
    Check {
        #[arg(long)]
        read_data: bool,
        /// Read and verify only slice N of M of the packs (1 <= N <= M): M runs with
        /// N = 1..M read every pack once (a month of daily checks reads everything).
        #[arg(long, value_name = "N/M", conflicts_with = "read_data", value_parser = parse_subset)]
        read_data_subset: Option<DataSubset>,
        /// If the check finds problems, run a repair pass on the leader now (rebuild the shards
        /// this check found bad, rebalance), then check again and report that verified result.
        #[arg(long)]
        repair: bool,
    },
    /// Bearer tokens: create, list, revoke, and which token this is.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Key slots: the passphrases that unlock the tenant's master key.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The hash-chained audit log of privileged and refused calls.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Cluster commands.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Run a whole multi-region cluster in this process: backup, lose a region, restore, verify.
    Demo {
        /// Size of the generated chat data.
        #[arg(long, default_value_t = 64)]
        size_mb: u64,
    },
    /// Measure backup, incremental and restore on the embedded cluster.
    Bench {
        #[arg(long, default_value_t = 256)]
        size_mb: u64,
        /// Back up this directory instead of generated data.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Transports to measure, one pass each on identical data.
        #[arg(long, value_enum, default_value = "both")]
        mode: demo::BenchModes,
        #[command(subcommand)]
        what: Option<BenchWhat>,
    },
    /// Live chat records: append from stdin, export a room as of a time, compact.
    Stream {
        #[command(subcommand)]
        command: cairn_cli::stream::StreamCommand,
    },
    /// Run scheduled jobs (backups at levels, dumps, forget, prune, check, drills) from a TOML file.
    Agent(AgentArgs),
    /// Failover drill: restore the latest snapshots without one region and verify them.
    Drill {
        #[arg(long)]
        without_region: String,
        /// Only this dataset (default: the latest snapshot of every dataset).
        #[arg(long)]
        dataset: Option<String>,
        /// Scratch directory (default: a temporary one, removed afterwards).
        #[arg(long)]
        scratch: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct AgentArgs {
    /// The agent's TOML file (cluster, state_dir, [[job]] tables).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Run every job that is due now, then exit (non-zero if one failed).
    #[arg(long)]
    once: bool,
    /// Serve Prometheus metrics on ADDR (GET /metrics); overrides metrics_listen.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Write the metrics to FILE (atomically, node_exporter textfile format) after each run.
    #[arg(long, value_name = "FILE")]
    metrics_file: Option<PathBuf>,
    /// For tests and drills: with --once, the scheduler's clock starts at TIME (RFC 3339).
    #[arg(long, value_name = "TIME", hide = true, value_parser = parse_now)]
    now: Option<chrono::DateTime<chrono::Utc>>,
}

fn parse_now(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e}: give an RFC 3339 time such as 2026-03-02T00:00:00Z"))
}

#[derive(Debug, Args)]
struct ForgetArgs {
    /// Snapshots to remove (hex prefixes of at least 8 characters).
    ids: Vec<String>,
    /// Only this dataset (default: every dataset, each on its own).
    #[arg(long)]
    dataset: Option<String>,
    #[command(flatten)]
    keep: KeepArgs,
    /// Show what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run `prune` afterwards (not on a dry run).
    #[arg(long)]
    prune: bool,
    /// Remove governance-locked snapshots given by id (cluster-admin only).
    #[arg(long)]
    bypass_governance: bool,
}

#[derive(Debug, Args)]
struct LockArgs {
    /// Snapshot id (hex prefix, at least 8 characters) or `latest`.
    id: String,
    /// Until this time: RFC 3339 or a date (2027-01-31).
    #[arg(
        long,
        value_name = "TIME",
        required_unless_present = "for_",
        conflicts_with = "for_"
    )]
    until: Option<String>,
    /// For this long from now (cluster time): 30d, 3y...
    #[arg(long = "for", id = "for_", value_name = "DUR")]
    for_: Option<String>,
    /// governance (a cluster-admin may lift it) or compliance (nobody can).
    #[arg(long, default_value = "governance", value_parser = ["governance", "compliance"])]
    mode: String,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Set (replace) a dataset's policy.
    Set {
        #[arg(long)]
        dataset: String,
        #[command(flatten)]
        keep: KeepArgs,
        /// Legal ceiling: forget snapshots older than DUR unless locked.
        #[arg(long, value_name = "DUR")]
        max_age: Option<String>,
        /// Move packs that only snapshots older than DUR reference to the
        /// cold storage class (0s: as soon as a snapshot commits).
        #[arg(long, value_name = "DUR")]
        cold_after: Option<String>,
    },
    /// Remove a dataset's policy (its snapshots stay).
    Remove {
        #[arg(long)]
        dataset: String,
    },
    /// Show the tenant's policies and warnings about them.
    Show,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; its secret is printed once (on stdout), nodes keep only its hash.
    Create {
        /// cluster-admin, admin, backup, restore or monitor.
        #[arg(long)]
        role: String,
        /// Expire after this long (e.g. 12h, 30d); default: never.
        #[arg(long, value_name = "DUR")]
        ttl: Option<String>,
        /// A note shown in `token list` (e.g. the host it is for).
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token: every node refuses it from now on.
    Revoke { id: String },
    /// Show the token in use as the cluster sees it: id, role, tenant, expiry.
    Whoami,
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// List the tenant's key slots; the one that unlocked this session is marked.
    List,
    /// Add a key slot: a new passphrase for the same master key.
    Add {
        /// File holding the new passphrase (else CAIRN_NEW_PASSWORD).
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
    /// Remove a key slot (an id or a unique prefix); its passphrase stops
    /// working. Neither the slot in use nor the last slot can be removed.
    Remove { id: String },
    /// Change the passphrase: add a slot for the new one, remove the one in use.
    Passwd {
        /// File holding the new passphrase (else CAIRN_NEW_PASSWORD).
        #[arg(long, value_name = "FILE")]
        new_password_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print audit entries, oldest first.
    Log {
        /// Only entries from this time on: RFC 3339, a date, or a duration ago (24h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
    /// Recompute the hash chain from the first entry; print the head; exit 1 if broken.
    Verify,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Nodes, regions, leader, shards per node, protection of the packs, repair progress.
    Status,
    /// Add a node (it joins as a learner; voters are re-chosen across regions).
    AddNode {
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        region: String,
        /// host:port the node serves on.
        #[arg(long)]
        addr: String,
    },
    /// Move a node's shards to the others, then remove it from the cluster.
    RemoveNode {
        node_id: u64,
        /// Its disk is gone: remove it now and rebuild its shards from the others.
        #[arg(long)]
        no_drain: bool,
    },
}

#[derive(Debug, Args)]
struct BackupArgs {
    paths: Vec<PathBuf>,
    #[arg(long, default_value = "default")]
    dataset: String,
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Read the data from standard input.
    #[arg(long)]
    stdin: bool,
    /// Name of the file the stdin data becomes.
    #[arg(long, default_value = "stdin")]
    stdin_filename: String,
    /// full (read every file), incremental (compare with the dataset's
    /// latest snapshot) or differential (compare with its latest full).
    #[arg(long, default_value = "incremental", value_parser = parse_level)]
    level: Level,
    /// Read every file again instead of trusting the parent snapshot's
    /// metadata (the same as --level full).
    #[arg(long)]
    force: bool,
    /// Leave out paths matching GLOB (restic's meaning: `/abs/...` matches
    /// from the root, anything else the end of the path, so `*.tmp` or
    /// `cache` match a name anywhere). Repeatable.
    #[arg(long = "exclude", value_name = "GLOB")]
    excludes: Vec<String>,
    /// Read exclude patterns from FILE: one per line, `#` comments and blank
    /// lines ignored. Repeatable.
    #[arg(long = "exclude-file", value_name = "FILE")]
    exclude_files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    snapshot: String,
    #[arg(long)]
    target: PathBuf,
    #[arg(long = "include")]
    include: Vec<String>,
    /// Dataset `latest` refers to.
    #[arg(long)]
    dataset: Option<String>,
    /// Read nothing from this region.
    #[arg(long)]
    without_region: Vec<String>,
}

fn parse_subset(text: &str) -> Result<DataSubset, String> {
    text.parse()
        .map_err(|e: cairn_client::ClientError| e.to_string())
}

fn parse_level(text: &str) -> Result<Level, String> {
    text.parse()
        .map_err(|e: cairn_client::ClientError| e.to_string())
}

fn main() {
    cairn_node::malloc::limit_arenas();
    // Resident memory bounded by the buffers in use, not by the data seen.
    let _ = cairn_node::malloc::map_large_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| "error,openraft=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Few blocking threads: file workers are bounded anyway, and every extra
    // thread can cost a malloc arena of resident memory.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {}", render_error(&e));
        std::process::exit(1);
    }
}

/// The one-line report of a failed command: every context and cause once,
/// outermost first (a cause its parent already quotes is not repeated).
fn render_error(error: &anyhow::Error) -> String {
    cairn_client::error::error_chain(error.as_ref())
}

/// Prints a catalog warning (a skipped or unauthenticated snapshot record).
fn print_catalog_warning(warning: &cairn_client::repo::CatalogWarning) {
    eprintln!("warning: {}", warning.message);
}

/// The passphrase from --password-file or CAIRN_PASSWORD, wiped when dropped.
fn passphrase(cli: &Cli) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    read_passphrase(
        cli.password_file.as_deref(),
        "CAIRN_PASSWORD",
        "no passphrase: set CAIRN_PASSWORD or pass --password-file FILE",
        "password file",
    )
}

/// The new passphrase of `key add` / `key passwd`.
fn new_passphrase(file: Option<&std::path::Path>) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    read_passphrase(
        file,
        "CAIRN_NEW_PASSWORD",
        "no new passphrase: pass --new-password-file FILE or set CAIRN_NEW_PASSWORD",
        "new password file",
    )
}

fn read_passphrase(
    file: Option<&std::path::Path>,
    env: &str,
    missing: &'static str,
    what: &str,
) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if let Some(path) = file {
        let text = Zeroizing::new(
            std::fs::read(path)
                .with_context(|| format!("cannot read {what} {}", path.display()))?,
        );
        let trimmed = text
            .strip_suffix(b"\n")
            .map(|t| t.strip_suffix(b"\r").unwrap_or(t))
            .unwrap_or(&text);
        return Ok(Zeroizing::new(trimmed.to_vec()));
    }
    match std::env::var_os(env) {
        Some(p) if !p.is_empty() => Ok(Zeroizing::new(p.into_encoded_bytes())),
        _ => bail!(missing),
    }
}

/// A connection with the CA and token the flags and environment give.
fn cluster(cli: &Cli) -> anyhow::Result<Cluster> {
    let token = access::read_token(
        cli.token_file.as_deref(),
        std::env::var(access::TOKEN_ENV).ok(),
    )?;
    let ca = access::read_ca(cli.ca_file.as_deref())?;
    Ok(Cluster::with_options(
        &cli.cluster,
        access::cluster_options(ca, token)?,
    )?)
}

async fn open(cli: &Cli) -> anyhow::Result<Arc<Repository>> {
    let mut cluster = cluster(cli)?;
    if let Some(region) = &cli.region {
        cluster = cluster.prefer_region(region).await?;
    }
    let tenant = cluster.resolve_tenant(cli.tenant.as_deref()).await?;
    let repo = Repository::open(cluster, &tenant, &passphrase(cli)?)
        .await?
        .with_warning_sink(Arc::new(print_catalog_warning));
    Ok(Arc::new(match &cli.region {
        Some(region) => repo.with_region(region),
        None => repo,
    }))
}

/// What `cairn bench` measures besides backup and restore.
#[derive(Debug, Subcommand)]
enum BenchWhat {
    /// Live records: sustained records/s and acknowledgement latency.
    Stream(cairn_cli::stream::bench::StreamBenchArgs),
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn show_progress(cli: &Cli) -> bool {
    !cli.json && std::io::stderr().is_terminal()
}

fn time_text(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init => {
            let cluster = cluster(&cli)?;
            let tenant = cluster.resolve_tenant(cli.tenant.as_deref()).await?;
            let repo = Repository::init(cluster, &tenant, &passphrase(&cli)?, KdfParams::default())
                .await?;
            if cli.json {
                print_json(&serde_json::json!({"tenant": repo.tenant(), "initialized": true}))?;
            } else {
                println!(
                    "initialized tenant {:?}: keep the passphrase safe, without it the data cannot be read",
                    repo.tenant()
                );
            }
        }
        Command::Backup(args) => {
            let mut excludes = args.excludes.clone();
            for file in &args.exclude_files {
                excludes.extend(backup::read_exclude_file(file)?);
            }
            // Refuse a bad pattern before connecting.
            backup::exclude_matcher(&excludes)?;
            let repo = open(&cli).await?;
            let options = BackupOptions {
                dataset: args.dataset.clone(),
                tags: args.tags.clone(),
                level: if args.force { Level::Full } else { args.level },
                excludes,
                ..BackupOptions::default()
            };
            let progress = Arc::new(Progress::default());
            let display = show_progress(&cli).then(|| {
                let total = (!args.stdin).then(|| progress::measure(&args.paths));
                progress::progress_ticker(progress.clone(), total)
            });
            let result = if args.stdin {
                backup::backup_stream(
                    repo,
                    std::io::stdin(),
                    &args.stdin_filename,
                    &options,
                    progress,
                )
                .await
            } else {
                backup::backup_paths(repo, &args.paths, &options, progress).await
            };
            if let Some(display) = display {
                display.finish().await;
            }
            let summary = result?;
            for skipped in &summary.skipped {
                eprintln!("skipped {}: {}", skipped.path, skipped.reason);
            }
            if let Some(note) = &summary.note
                && !cli.json
            {
                eprintln!("note: {note}");
            }
            if cli.json {
                print_json(&summary)?;
            } else {
                println!(
                    "snapshot {} saved ({}{}): {} files, {} bytes read, {} bytes added, {:.2}s",
                    summary.snapshot_id,
                    summary.level,
                    summary
                        .parent
                        .as_deref()
                        .map(|p| format!(" of {}", &p[..p.len().min(8)]))
                        .unwrap_or_default(),
                    summary.files,
                    summary.bytes,
                    summary.bytes_added,
                    summary.duration_s
                );
            }
        }
        Command::Snapshots { dataset } => {
            let repo = open(&cli).await?;
            let snapshots = repo.snapshots(dataset.as_deref()).await?;
            let now = now_ms();
            if cli.json {
                let rows = snapshots
                    .iter()
                    .map(snapshot_json)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                print_json(&rows)?;
            } else {
                println!(
                    "{:<10} {:<20} {:<16} {:<12} {:<1} {:>8} {:>14}  paths",
                    "id", "time", "dataset", "kind", "L", "files", "bytes"
                );
                for s in &snapshots {
                    println!(
                        "{:<10} {:<20} {:<16} {:<12} {:<1} {:>8} {:>14}  {}",
                        s.short_id(),
                        time_text(s.time_ms()),
                        s.dataset,
                        s.kind,
                        lock_marker(s, now),
                        s.files,
                        s.bytes,
                        s.info.paths.join(" ")
                    );
                }
                println!(
                    "{} snapshot(s); time: committed (cluster time); L: locked (G governance, C compliance)",
                    snapshots.len()
                );
            }
        }
        Command::Forget(args) => forget(&cli, args).await?,
        Command::Prune { dry_run } => {
            let repo = open(&cli).await?;
            let report = repo.prune(*dry_run).await?;
            if cli.json {
                print_json(&report)?;
            } else {
                print!("{}", life::prune_text(&report));
            }
        }
        Command::Lock(args) => {
            let until = life::lock_until(
                args.until.as_deref(),
                args.for_.as_deref(),
                std::time::SystemTime::now(),
            )?;
            let mode = life::lock_mode(&args.mode)?;
            let repo = open(&cli).await?;
            let lock = repo.lock(&args.id, until, mode).await?;
            if cli.json {
                print_json(&serde_json::json!({"id": args.id, "mode": lock.mode,
                    "until": access::time_or_none(lock.until_unix_ms)}))?;
            } else {
                println!(
                    "snapshot {} locked ({}) until {}: forget leaves it alone until then",
                    args.id,
                    lock.mode,
                    time_text(lock.until_unix_ms)
                );
            }
        }
        Command::Unlock {
            id,
            bypass_governance,
        } => {
            let repo = open(&cli).await?;
            repo.unlock(id, *bypass_governance).await?;
            if cli.json {
                print_json(&serde_json::json!({"unlocked": id}))?;
            } else {
                println!("snapshot {id} unlocked");
            }
        }
        Command::Policy { command } => policy_command(&cli, command).await?,
        Command::Stream { command } => {
            cairn_cli::stream::run(open(&cli).await?, command, cli.json).await?
        }
        Command::Stats { dataset } => {
            let repo = open(&cli).await?;
            let stats = repo.stats(dataset.as_deref()).await?;
            if cli.json {
                print_json(&stats)?;
            } else {
                print!("{}", life::stats_text(&stats));
            }
        }
        Command::Ls { snapshot, dataset } => {
            let repo = open(&cli).await?;
            let snapshot = repo.find_snapshot(snapshot, dataset.as_deref()).await?;
            let items = restore::walk(&repo, &snapshot, &[]).await?;
            if cli.json {
                let rows: Vec<_> = items
                    .iter()
                    .map(|i| {
                        let (size, target, hardlink) = match &i.entry.kind {
                            EntryKind::File { size, hardlink, .. } => (*size, None, *hardlink),
                            EntryKind::Symlink { target } => (0, Some(display_name(target)), None),
                            _ => (0, None, None),
                        };
                        let path = i.path_string();
                        let mut row = serde_json::json!({"path": path, "type": i.entry.kind.word(),
                            "size": size, "mode": format!("{:o}", i.entry.mode & 0o7777),
                            "mtime_ns": i.entry.mtime_ns, "target": target,
                            "hardlink_group": hardlink.map(|g| format!("{g:016x}"))});
                        // Names that are not plain UTF-8 are escaped in
                        // "path"; the exact bytes go along, hex per component.
                        if i.path
                            .iter()
                            .any(|c| display_name(c).as_bytes() != c.as_slice())
                        {
                            row["path_hex"] = serde_json::json!(
                                i.path.iter().map(hex::encode).collect::<Vec<_>>()
                            );
                        }
                        row
                    })
                    .collect();
                print_json(&rows)?;
            } else {
                for i in &items {
                    let (kind, size) = match &i.entry.kind {
                        EntryKind::File { size, .. } => ('-', *size),
                        EntryKind::Dir { .. } => ('d', 0),
                        EntryKind::Symlink { .. } => ('l', 0),
                        EntryKind::Fifo => ('p', 0),
                        EntryKind::Device {
                            character: true, ..
                        } => ('c', 0),
                        EntryKind::Device { .. } => ('b', 0),
                    };
                    let suffix = match &i.entry.kind {
                        EntryKind::Symlink { target } => format!(" -> {}", display_name(target)),
                        EntryKind::File {
                            hardlink: Some(group),
                            ..
                        } => format!("  (hard link group {group:016x})"),
                        _ => String::new(),
                    };
                    println!(
                        "{kind} {:04o} {:>12} {}{}",
                        i.entry.mode & 0o7777,
                        size,
                        i.path_string(),
                        suffix
                    );
                }
            }
        }
        Command::Dump {
            snapshot,
            path,
            dataset,
        } => {
            let repo = open(&cli).await?;
            let snapshot = repo.find_snapshot(snapshot, dataset.as_deref()).await?;
            let mut stdout = std::io::stdout();
            restore::dump(&repo, &snapshot, path, &mut stdout).await?;
        }
        Command::Restore(args) => {
            let repo = open(&cli).await?;
            let snapshot = repo
                .find_snapshot(&args.snapshot, args.dataset.as_deref())
                .await?;
            let options = RestoreOptions {
                include: args.include.clone(),
                exclude_regions: args.without_region.clone(),
                ..RestoreOptions::default()
            };
            let progress = Arc::new(Progress::default());
            let display = show_progress(&cli)
                .then(|| progress::progress_ticker(progress.clone(), Some(snapshot.bytes)));
            let result =
                restore::restore_report(&repo, &snapshot, &args.target, &options, progress).await;
            if let Some(display) = display {
                display.finish().await;
            }
            let summary = result?;
            for skipped in &summary.skipped {
                eprintln!("skipped {}: {}", skipped.path, skipped.reason);
            }
            for failed in &summary.failed {
                eprintln!(
                    "snapshot {}: {} not restored: {}",
                    snapshot.short_id(),
                    failed.path,
                    failed.reason
                );
            }
            if cli.json {
                print_json(
                    &serde_json::json!({"snapshot_id": snapshot.id_hex(), "summary": summary}),
                )?;
            } else {
                println!(
                    "restored {} to {}: {} files, {} dirs, {} symlinks, {} hard links, {} special, {} bytes in {:.2}s; {} failed, {} skipped",
                    snapshot.short_id(),
                    args.target.display(),
                    summary.files,
                    summary.dirs,
                    summary.symlinks,
                    summary.hardlinks,
                    summary.special,
                    summary.bytes,
                    summary.duration_s,
                    summary.failed.len(),
                    summary.skipped.len()
                );
            }
            restore::failures_to_error(&summary)?;
        }
        Command::Check {
            read_data,
            read_data_subset,
            repair,
        } => {
            let read = match (read_data_subset, read_data) {
                (Some(subset), _) => DataRead::Subset(*subset),
                (None, true) => DataRead::All,
                (None, false) => DataRead::None,
            };
            check(&cli, read, *repair).await?
        }
        Command::Token { command } => token_command(&cli, command).await?,
        Command::Key { command } => key_command(&cli, command).await?,
        Command::Audit { command } => audit_command(&cli, command).await?,
        Command::Cluster { command } => cluster_command(&cli, command).await?,
        Command::Demo { size_mb } => demo::demo(*size_mb).await?,
        Command::Bench {
            what: Some(BenchWhat::Stream(args)),
            ..
        } => {
            let report = cairn_cli::stream::bench::run(args, cli.json).await?;
            if cli.json {
                print_json(&report)?;
            }
        }
        Command::Bench {
            size_mb,
            data,
            mode,
            what: None,
        } => {
            let report = demo::bench(*size_mb, data.clone(), *mode, cli.json).await?;
            if cli.json {
                print_json(&report)?;
            }
        }
        Command::Agent(args) => {
            let ok = cairn_cli::agent::run(cairn_cli::agent::Options {
                config: args.config.clone(),
                once: args.once,
                now: args.now,
                metrics_listen: args.metrics_listen.clone(),
                metrics_file: args.metrics_file.clone(),
            })
            .await?;
            if !ok {
                eprintln!("error: agent: at least one job failed (see its log line above)");
                std::process::exit(1);
            }
        }
        Command::Drill {
            without_region,
            dataset,
            scratch,
        } => drill(&cli, without_region, dataset.as_deref(), scratch.clone()).await?,
    }
    Ok(())
}

/// A snapshot as `snapshots --json` shows it: the SDK's fields plus
/// `committed` (cluster time, RFC 3339) and `lock`.
fn snapshot_json(s: &cairn_client::Snapshot) -> anyhow::Result<serde_json::Value> {
    let mut row = serde_json::to_value(s)?;
    row["committed"] = serde_json::json!(access::time_or_none(s.committed_unix_ms));
    row["lock"] = match &s.lock {
        Some(l) => {
            serde_json::json!({"mode": l.mode, "until": access::time_or_none(l.until_unix_ms)})
        }
        None => serde_json::Value::Null,
    };
    Ok(row)
}

/// `G`/`C` for a lock still holding (by this client's clock: a hint only,
/// the cluster decides), `-` when none.
fn lock_marker(s: &cairn_client::Snapshot, now: i64) -> &'static str {
    match &s.lock {
        Some(l) if l.holds_at(now) && l.mode == "compliance" => "C",
        Some(l) if l.holds_at(now) => "G",
        _ => "-",
    }
}

async fn forget(cli: &Cli, args: &ForgetArgs) -> anyhow::Result<()> {
    let options = ForgetOptions {
        dataset: args.dataset.clone(),
        ids: args.ids.clone(),
        keep: args.keep.to_rules()?,
        dry_run: args.dry_run,
        bypass_governance: args.bypass_governance,
    };
    // Refuse a forget without any rule before connecting, as restic does.
    if options.ids.is_empty() && options.keep.is_empty() {
        return Err(cairn_client::ClientError::NoForgetPolicy.into());
    }
    let repo = open(cli).await?;
    let report = repo.forget(&options).await?;
    let pruned = if args.prune && !args.dry_run {
        Some(repo.prune(false).await?)
    } else {
        None
    };
    if cli.json {
        print_json(&life::forget_json(&report, args.dry_run, pruned.as_ref()))?;
    } else {
        print!("{}", life::forget_text(&report, args.dry_run));
        if let Some(pruned) = &pruned {
            print!("{}", life::prune_text(pruned));
        } else if args.prune {
            println!("dry run: prune not run");
        }
    }
    Ok(())
}

async fn policy_command(cli: &Cli, command: &PolicyCommand) -> anyhow::Result<()> {
    let spec = match command {
        PolicyCommand::Set {
            dataset,
            keep,
            max_age,
            cold_after,
        } => Some(life::policy_spec(
            dataset,
            keep,
            max_age.as_deref(),
            cold_after.as_deref(),
        )?),
        _ => None,
    };
    let repo = open(cli).await?;
    match (command, spec) {
        (PolicyCommand::Set { dataset, .. }, Some(spec)) => {
            repo.set_policy(&spec).await?;
            if cli.json {
                print_json(&serde_json::json!({"dataset": dataset, "set": true}))?;
            } else {
                println!(
                    "policy of dataset {dataset} set: {}; the leader applies it on its schedule",
                    life::rules_text(&spec.keep)
                );
            }
        }
        (PolicyCommand::Remove { dataset }, _) => {
            repo.remove_policy(dataset).await?;
            if cli.json {
                print_json(&serde_json::json!({"dataset": dataset, "removed": true}))?;
            } else {
                println!("policy of dataset {dataset} removed; its snapshots stay");
            }
        }
        (PolicyCommand::Show, _) => {
            let (policies, warnings) = repo.policies().await?;
            if cli.json {
                print_json(&life::policies_json(&policies, &warnings))?;
            } else {
                print!("{}", life::policies_text(&policies, &warnings));
            }
        }
        (PolicyCommand::Set { .. }, None) => bail!("policy set: no policy"),
    }
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The tenant a new token is for: `--tenant`; else, for a role that acts
/// on one tenant's data, the creator's own tenant; else none (cluster-wide).
async fn token_tenant(
    cluster: &Cluster,
    explicit: Option<&str>,
    role: &str,
) -> anyhow::Result<String> {
    if let Some(tenant) = explicit.filter(|t| !t.is_empty()) {
        return Ok(tenant.to_string());
    }
    if matches!(role, "cluster-admin" | "monitor") || !cluster.has_token() {
        return Ok(String::new());
    }
    Ok(cluster.who_am_i().await?.tenant)
}

async fn token_command(cli: &Cli, command: &TokenCommand) -> anyhow::Result<()> {
    let cluster = cluster(cli)?;
    match command {
        TokenCommand::Create { role, ttl, label } => {
            let ttl = ttl.as_deref().map(access::parse_ttl).transpose()?;
            let tenant = token_tenant(&cluster, cli.tenant.as_deref(), role).await?;
            let created = admin::create_token(&cluster, role, &tenant, ttl, label).await?;
            if cli.json {
                print_json(&access::created_token_json(&created.info, &created.secret))?;
            } else {
                let info = &created.info;
                eprintln!(
                    "token {} created: role {}, {}, expires {}; its secret follows, shown this once: keep it in a --token-file",
                    info.id,
                    info.role,
                    if info.tenant.is_empty() {
                        "all tenants".to_string()
                    } else {
                        format!("tenant {}", info.tenant)
                    },
                    access::time_or_none(info.expires_unix_ms).unwrap_or_else(|| "never".into())
                );
                println!("{}", created.secret.as_str());
            }
        }
        TokenCommand::List => {
            let tokens = admin::list_tokens(&cluster).await?;
            if cli.json {
                print_json(&tokens.iter().map(access::token_json).collect::<Vec<_>>())?;
            } else {
                println!("{}", access::token_header());
                let now = now_ms();
                for info in &tokens {
                    println!("{}", access::token_line(info, now));
                }
                println!("{} token(s)", tokens.len());
            }
        }
        TokenCommand::Revoke { id } => {
            admin::revoke_token(&cluster, id).await?;
            if cli.json {
                print_json(&serde_json::json!({"revoked": id}))?;
            } else {
                println!("token {id} revoked: every node refuses it from now on");
            }
        }
        TokenCommand::Whoami => {
            let me = cluster.who_am_i().await?;
            let expires = access::time_or_none(me.expires_unix_ms);
            if cli.json {
                print_json(&serde_json::json!({"insecure": me.insecure,
                    "token_id": (!me.token_id.is_empty()).then_some(&me.token_id),
                    "role": (!me.role.is_empty()).then_some(&me.role),
                    "tenant": (!me.tenant.is_empty()).then_some(&me.tenant),
                    "expires": expires}))?;
            } else if me.insecure {
                println!("the cluster runs --insecure: no token is needed or checked");
            } else {
                println!(
                    "token {}: role {}, {}, expires {}",
                    me.token_id,
                    me.role,
                    if me.tenant.is_empty() {
                        "all tenants".to_string()
                    } else {
                        format!("tenant {}", me.tenant)
                    },
                    expires.unwrap_or_else(|| "never".into())
                );
            }
        }
    }
    Ok(())
}

async fn key_command(cli: &Cli, command: &KeyCommand) -> anyhow::Result<()> {
    // Read the new passphrase before the slow unlock, so a missing one fails fast.
    let new = match command {
        KeyCommand::Add { new_password_file } | KeyCommand::Passwd { new_password_file } => {
            Some(new_passphrase(new_password_file.as_deref())?)
        }
        KeyCommand::List | KeyCommand::Remove { .. } => None,
    };
    let repo = open(cli).await?;
    match (command, new) {
        (KeyCommand::List, _) => {
            let slots = repo.key_slots().await?;
            if cli.json {
                print_json(
                    &slots
                        .iter()
                        .map(|s| {
                            serde_json::json!({"id": s.id,
                    "created": access::time_or_none(s.created_unix_ms), "current": s.current})
                        })
                        .collect::<Vec<_>>(),
                )?;
            } else {
                println!(" {:<18} created", "id");
                for slot in &slots {
                    println!(
                        "{}{:<18} {}",
                        if slot.current { "*" } else { " " },
                        slot.id,
                        access::time_or_none(slot.created_unix_ms).unwrap_or_else(|| "-".into())
                    );
                }
                println!(
                    "{} key slot(s) of tenant {:?}; * unlocked this session",
                    slots.len(),
                    repo.tenant()
                );
            }
        }
        (KeyCommand::Add { .. }, Some(new)) => {
            let id = repo.add_key_slot(&new, KdfParams::default()).await?;
            if cli.json {
                print_json(&serde_json::json!({"added": id}))?;
            } else {
                println!(
                    "key slot {id} added: the new passphrase unlocks tenant {:?}",
                    repo.tenant()
                );
            }
        }
        (KeyCommand::Remove { id }, _) => {
            let removed = repo.remove_key_slot(id).await?;
            if cli.json {
                print_json(&serde_json::json!({"removed": removed}))?;
            } else {
                println!("key slot {removed} removed: its passphrase no longer unlocks the key");
            }
        }
        (KeyCommand::Passwd { .. }, Some(new)) => {
            let old = repo.unlocked_slot();
            let id = repo.change_passphrase(&new, KdfParams::default()).await?;
            if cli.json {
                print_json(&serde_json::json!({"added": id, "removed": old}))?;
            } else {
                println!(
                    "passphrase changed: key slot {id} added{}",
                    old.map(|o| format!(", key slot {o} removed"))
                        .unwrap_or_default()
                );
            }
        }
        (KeyCommand::Add { .. } | KeyCommand::Passwd { .. }, None) => {
            bail!("no new passphrase")
        }
    }
    Ok(())
}

async fn audit_command(cli: &Cli, command: &AuditCommand) -> anyhow::Result<()> {
    let cluster = cluster(cli)?;
    match command {
        AuditCommand::Log { since } => {
            let since = since
                .as_deref()
                .map(|s| access::parse_since(s, std::time::SystemTime::now()))
                .transpose()?;
            let mut shown = Vec::new();
            let mut count = 0usize;
            admin::audit_entries(&cluster, 0, |page| {
                for entry in page {
                    if since.is_some_and(|s| entry.time_unix_ms < s) {
                        continue;
                    }
                    count += 1;
                    if cli.json {
                        shown.push(access::audit_json(entry));
                    } else {
                        println!("{}", access::audit_line(entry));
                    }
                }
            })
            .await?;
            if cli.json {
                print_json(&shown)?;
            } else {
                println!("{count} entr{}", if count == 1 { "y" } else { "ies" });
            }
        }
        AuditCommand::Verify => {
            let report = admin::audit_verify(&cluster).await?;
            if cli.json {
                print_json(&report)?;
            } else if report.ok {
                println!(
                    "audit log intact: {} entries; head {} {}",
                    report.entries, report.head_seq, report.head_hash
                );
            } else {
                println!(
                    "AUDIT LOG BROKEN: {}; {} entries verified before it, last good head {} {}",
                    report
                        .broken
                        .as_deref()
                        .unwrap_or("the chain does not verify"),
                    report.entries,
                    report.head_seq,
                    report.head_hash
                );
            }
            if !report.ok {
                eprintln!(
                    "error: audit log broken: {}",
                    report
                        .broken
                        .as_deref()
                        .unwrap_or("the chain does not verify")
                );
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

async fn cluster_command(cli: &Cli, command: &ClusterCommand) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status => status(cli).await,
        ClusterCommand::AddNode {
            node_id,
            region,
            addr,
        } => {
            let request = pb::AddNodeRequest {
                node_id: *node_id,
                region: region.clone(),
                addr: addr.clone(),
            };
            // A new node may have to catch up by snapshot before it votes:
            // give the change the same budget as a removal.
            let cluster = cluster(cli)?.with_failover_budget(std::time::Duration::from_secs(600));
            let before: pb::ClusterStatusReply = cluster
                .call("cluster status", |mut c| async move {
                    c.cluster_status(pb::ClusterStatusRequest {}).await
                })
                .await?;
            let already = before
                .nodes
                .iter()
                .any(|n| n.node_id == *node_id && n.region == *region && n.addr == *addr);
            cluster
                .call("add node", |mut c| {
                    let request = request.clone();
                    async move { c.add_node(request).await }
                })
                .await?;
            if cli.json {
                print_json(&serde_json::json!({"added": node_id, "already_member": already}))
            } else if already {
                println!(
                    "node {node_id} ({region}, {addr}) is already a member; voters re-checked across regions"
                );
                Ok(())
            } else {
                println!(
                    "node {node_id} ({region}, {addr}) added: it caught up as a learner; voters re-chosen across regions (see `cairn cluster status`)"
                );
                Ok(())
            }
        }
        ClusterCommand::RemoveNode { node_id, no_drain } => {
            let request = pb::RemoveNodeRequest {
                node_id: *node_id,
                drain: !no_drain,
            };
            let reply = cluster(cli)?
                .with_failover_budget(std::time::Duration::from_secs(600))
                .call("remove node", |mut c| async move {
                    c.remove_node(request).await
                })
                .await?;
            if cli.json {
                print_json(
                    &serde_json::json!({"removed": node_id, "shards_moved": reply.shards_moved}),
                )
            } else {
                if *no_drain {
                    println!(
                        "node {node_id} removed; its shards are rebuilt from the others (watch `cairn cluster status`)"
                    );
                } else {
                    println!(
                        "node {node_id} drained ({} shards moved) and removed",
                        reply.shards_moved
                    );
                }
                Ok(())
            }
        }
    }
}

async fn check(cli: &Cli, read: DataRead, repair: bool) -> anyhow::Result<()> {
    let read_data = read != DataRead::None;
    let repo = open(cli).await?;
    // The check reports every bad shard it finds to the leader's repair
    // queue; with --repair, a pass then repairs what it found and a second
    // check verifies the result, which is what is printed and exited on.
    let first = check::check_once(&repo, read).await?;
    let mut repaired = None;
    let result = if repair && !first.problems.is_empty() {
        let reply = repo.repair_now().await?;
        if !cli.json {
            println!(
                "found {} problem(s); repair pass: {} pack(s) needed work, {} repaired, {} error(s); checking again",
                first.problems.len(),
                reply.queued,
                reply.packs_repaired,
                reply.errors
            );
        }
        repaired = Some(reply);
        check::check_once(&repo, read).await?
    } else {
        first
    };
    let check::CheckOutcome {
        snapshots,
        packs_checked,
        packs_read,
        shards_checked,
        problems,
        misplaced,
        affected,
    } = result;
    let ok = problems.is_empty();
    if cli.json {
        print_json(&serde_json::json!({
            "ok": ok, "snapshots_checked": snapshots, "packs_checked": packs_checked,
            "shards_checked": shards_checked, "read_data": read_data, "problems": problems,
            "read_data_subset": match read { DataRead::Subset(s) => Some(s.to_string()), _ => None },
            "packs_read": packs_read,
            "misplaced_packs": misplaced, "affected_files": affected,
            "verified_after_repair": repaired.is_some(),
            "repair": repaired.map(|r| serde_json::json!({"queued": r.queued, "packs_repaired": r.packs_repaired, "errors": r.errors, "lost": r.lost}))}))?;
    } else {
        println!(
            "checked {} snapshot(s), {} pack(s){}",
            snapshots,
            packs_checked,
            if let DataRead::Subset(subset) = read {
                format!(", slice {subset}: {shards_checked} shard(s) of {packs_read} pack(s) read")
            } else if read_data {
                format!(", {shards_checked} shard(s) read")
            } else {
                String::new()
            }
        );
        for p in &problems {
            println!("problem: {p}");
        }
        for file in &affected {
            println!(
                "lost: snapshot {} ({}): {} needs unrecoverable pack {}",
                file.snapshot,
                file.dataset,
                file.path,
                file.packs.join(", ")
            );
        }
        if !misplaced.is_empty() {
            println!(
                "misplaced: {} pack(s) would not survive the loss of one region (more than m shards in a region), awaiting rebalance",
                misplaced.len()
            );
        }
        println!(
            "{}",
            if ok {
                "no problems found"
            } else {
                "PROBLEMS FOUND"
            }
        );
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

async fn status(cli: &Cli) -> anyhow::Result<()> {
    let cluster = cluster(cli)?;
    let reply: pb::ClusterStatusReply = cluster
        .call("cluster status", |mut c| async move {
            c.cluster_status(pb::ClusterStatusRequest {}).await
        })
        .await?;
    let protection = reply.protection.unwrap_or_default();
    let repair = reply.repair.unwrap_or_default();
    let time_or_null = |ms: i64| (ms > 0).then(|| time_text(ms));
    if cli.json {
        let nodes: Vec<_> = reply
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({"node_id": n.node_id, "region": n.region, "addr": n.addr,
                "storage_class": n.storage_class, "up": n.up, "voter": n.voter, "shards": n.shards, "bytes": n.bytes,
                "last_seen": time_or_null(n.last_seen_unix_ms),
                "scrub": n.scrub.as_ref().map(|s| serde_json::json!({"rounds_total": s.rounds_total,
                    "last_success": time_or_null(s.last_success_unix_ms), "errors_total": s.errors_total,
                    "orphan_shards": s.orphan_shards, "orphan_bytes": s.orphan_bytes,
                    "orphans_deleted_total": s.orphans_deleted_total, "misfiled_total": s.misfiled_total})),
                "down_since": time_or_null(n.down_since_unix_ms)})
            })
            .collect();
        print_json(&serde_json::json!({
            "leader": reply.has_leader.then_some(reply.leader_id), "term": reply.term,
            "last_applied": reply.last_applied, "erasure": format!("{}+{}", reply.k, reply.m),
            "packs": reply.packs,
            "protection": {"fully_protected": protection.fully_protected, "degraded": protection.degraded,
                "at_risk": protection.at_risk, "unrecoverable": protection.unrecoverable,
                "misplaced": protection.misplaced, "shards_missing": protection.shards_missing},
            "repair": {"queue": repair.queue, "rate_bytes_per_s": repair.rate_bytes_per_s,
                "rate_limit_bytes_per_s": repair.rate_limit_bytes_per_s,
                "packs_repaired_total": repair.packs_repaired_total,
                "shards_written_total": repair.shards_written_total,
                "bytes_written_total": repair.bytes_written_total,
                "errors_total": repair.errors_total,
                "lost_total": repair.lost_total,
                "last_pass": time_or_null(repair.last_pass_unix_ms)},
            "orphans": {"shards": reply.orphan_shards, "bytes": reply.orphan_bytes},
            "insecure": reply.insecure,
            "warnings": reply.warnings,
            "by_class": reply.by_class.iter().map(|c| serde_json::json!({
                "storage_class": c.storage_class, "nodes": c.nodes, "shards": c.shards,
                "bytes": c.bytes, "packs": c.packs})).collect::<Vec<_>>(),
            "tiering": {"queue": reply.tiering_queue_packs},
            "nodes": nodes}))?;
        return Ok(());
    }
    for warning in &reply.warnings {
        eprintln!("warning: {warning}");
    }
    println!(
        "leader: {}   term: {}   applied: {}   erasure: {}+{}   packs: {}",
        if reply.has_leader {
            format!("node {}", reply.leader_id)
        } else {
            "none".into()
        },
        reply.term,
        reply.last_applied,
        reply.k,
        reply.m,
        reply.packs
    );
    println!(
        "protection: {} fully protected, {} degraded ({} shards short), {} at risk, {} unrecoverable, {} awaiting rebalance",
        protection.fully_protected,
        protection.degraded,
        protection.shards_missing,
        protection.at_risk,
        protection.unrecoverable,
        protection.misplaced
    );
    println!(
        "repair: queue {}, {:.1} MB/s (limit {:.0} MB/s), {} packs repaired, {} errors, last pass {}",
        repair.queue,
        repair.rate_bytes_per_s / 1e6,
        repair.rate_limit_bytes_per_s as f64 / 1e6,
        repair.packs_repaired_total,
        repair.errors_total,
        time_or_null(repair.last_pass_unix_ms).unwrap_or_else(|| "never".into())
    );
    println!(
        "orphans: {} shard file(s), {} bytes no index entry names (deleted by scrub after the grace period)",
        reply.orphan_shards, reply.orphan_bytes
    );
    for c in &reply.by_class {
        println!(
            "class {:<4}: {} node(s), {} pack(s), {} shard(s), {} bytes",
            c.storage_class, c.nodes, c.packs, c.shards, c.bytes
        );
    }
    if reply.tiering_queue_packs > 0 {
        println!(
            "tiering: {} pack(s) waiting to move between classes",
            reply.tiering_queue_packs
        );
    }
    println!(
        "{:>5}  {:<8} {:<5} {:<22} {:<5} {:<8} {:>8} {:>14}  down since",
        "node", "region", "class", "address", "state", "role", "shards", "bytes"
    );
    for n in &reply.nodes {
        println!(
            "{:>5}  {:<8} {:<5} {:<22} {:<5} {:<8} {:>8} {:>14}  {}",
            n.node_id,
            n.region,
            if n.storage_class.is_empty() {
                "hot"
            } else {
                n.storage_class.as_str()
            },
            n.addr,
            if n.up { "up" } else { "DOWN" },
            if reply.has_leader && n.node_id == reply.leader_id {
                "leader"
            } else if n.voter {
                "voter"
            } else {
                "learner"
            },
            n.shards,
            n.bytes,
            time_or_null(n.down_since_unix_ms).unwrap_or_default()
        );
    }
    Ok(())
}

async fn drill(
    cli: &Cli,
    without_region: &str,
    dataset: Option<&str>,
    scratch: Option<PathBuf>,
) -> anyhow::Result<()> {
    let repo = open(cli).await?;
    let started = std::time::Instant::now();
    let snapshots = repo.snapshots(dataset).await?;
    let mut latest: std::collections::BTreeMap<String, cairn_client::Snapshot> = Default::default();
    for s in snapshots {
        latest.insert(s.dataset.clone(), s);
    }
    if latest.is_empty() {
        bail!(
            "nothing to drill: no snapshots{}",
            dataset
                .map(|d| format!(" in dataset {d}"))
                .unwrap_or_default()
        );
    }
    let temp = tempfile::Builder::new().prefix("cairn-drill-").tempdir()?;
    let root = scratch.unwrap_or_else(|| temp.path().to_path_buf());
    let options = RestoreOptions {
        include: Vec::new(),
        exclude_regions: vec![without_region.to_string()],
        ..RestoreOptions::default()
    };
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    let mut bytes = 0u64;
    let mut first_byte: Option<f64> = None;
    for (dataset, snapshot) in &latest {
        let target = root.join(snapshot.id_hex());
        let t = started.elapsed().as_secs_f64();
        match restore::restore(&repo, snapshot, &target, &options, Arc::new(Progress::default())).await {
            Ok(summary) => {
                bytes += summary.bytes;
                first_byte.get_or_insert(t + summary.time_to_first_byte_s);
                checked.push(serde_json::json!({"snapshot_id": snapshot.id_hex(), "dataset": dataset,
                    "files": summary.files, "bytes": summary.bytes, "duration_s": summary.duration_s}));
            }
            Err(e) => failures.push(serde_json::json!({"snapshot_id": snapshot.id_hex(), "dataset": dataset, "error": e.to_string()})),
        }
        let _ = std::fs::remove_dir_all(&target);
    }
    let duration = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "without_region": without_region,
        "time_to_first_byte_s": first_byte.unwrap_or(duration),
        "duration_s": duration,
        "bytes": bytes,
        "mb_per_s": bytes as f64 / 1e6 / duration.max(1e-9),
        "snapshots_checked": checked,
        "failures": failures,
    });
    if cli.json {
        print_json(&report)?;
    } else {
        println!(
            "drill without region {without_region}: {} snapshot(s) restored and verified chunk by chunk, {} failure(s)",
            checked.len(),
            failures.len()
        );
        println!(
            "  time to first byte {:.2}s, total {:.2}s, {} bytes, {:.0} MB/s",
            report["time_to_first_byte_s"].as_f64().unwrap_or_default(),
            duration,
            bytes,
            report["mb_per_s"].as_f64().unwrap_or_default()
        );
        for f in &failures {
            println!("  FAILED: {f}");
        }
    }
    if !failures.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_client::ClientError;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cairn").chain(args.iter().copied()))
    }

    #[test]
    fn backup_takes_a_level() {
        let Command::Backup(args) = parse(&["backup", "/srv", "--level", "differential"])
            .expect("parses")
            .command
        else {
            panic!("backup");
        };
        assert_eq!(args.level, Level::Differential);
        let Command::Backup(args) = parse(&["backup", "/srv"]).expect("parses").command else {
            panic!("backup");
        };
        assert_eq!(args.level, Level::Incremental);
        let error = parse(&["backup", "/srv", "--level", "weekly"]).expect_err("refused");
        assert!(
            error
                .to_string()
                .contains("full, incremental or differential"),
            "{error}"
        );
    }

    #[test]
    fn check_takes_a_data_subset_that_conflicts_with_read_data() {
        let Command::Check {
            read_data_subset, ..
        } = parse(&["check", "--read-data-subset", "3/30"])
            .expect("parses")
            .command
        else {
            panic!("check");
        };
        assert_eq!(
            read_data_subset,
            Some(DataSubset {
                index: 3,
                count: 30
            })
        );
        for bad in ["0/30", "31/30", "3", "a/b", "1/0"] {
            let error = parse(&["check", "--read-data-subset", bad]).expect_err(bad);
            assert!(error.to_string().contains("data subset"), "{bad}: {error}");
        }
        assert!(parse(&["check", "--read-data", "--read-data-subset", "1/2"]).is_err());
    }

    #[test]
    fn agent_takes_a_config_once_and_a_hidden_clock() {
        let Command::Agent(args) = parse(&[
            "agent",
            "--config",
            "/etc/cairn/agent.toml",
            "--once",
            "--now",
            "2026-03-02T00:00:00Z",
            "--metrics-file",
            "/tmp/m.prom",
        ])
        .expect("parses")
        .command
        else {
            panic!("agent");
        };
        assert!(args.once);
        assert_eq!(args.now.map(|t| t.timestamp()), Some(1_772_409_600));
        assert!(parse(&["agent", "--config", "a.toml", "--now", "monday"]).is_err());
        assert!(parse(&["agent"]).is_err(), "needs --config");
    }

    #[test]
    fn forget_takes_restic_flags() {
        let cli = parse(&[
            "forget",
            "--dataset",
            "chat",
            "--keep-last",
            "3",
            "--keep-hourly",
            "1",
            "--keep-daily",
            "7",
            "--keep-weekly",
            "4",
            "--keep-monthly",
            "12",
            "--keep-yearly",
            "2",
            "--keep-within",
            "30d",
            "--keep-tag",
            "gold",
            "--keep-tag",
            "legal",
            "--dry-run",
            "--prune",
            "--json",
            "--bypass-governance",
        ])
        .expect("parses");
        assert!(cli.json);
        let Command::Forget(args) = cli.command else {
            panic!("forget");
        };
        assert_eq!(args.dataset.as_deref(), Some("chat"));
        let rules = args.keep.to_rules().expect("rules");
        assert_eq!(
            (
                rules.last,
                rules.hourly,
                rules.daily,
                rules.weekly,
                rules.monthly,
                rules.yearly
            ),
            (3, 1, 7, 4, 12, 2)
        );
        assert_eq!(
            rules.within,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert_eq!(rules.tags, ["gold", "legal"]);
        assert!(args.dry_run && args.prune && args.bypass_governance);
        let Command::Forget(args) = parse(&["forget", "0123abcd", "89abcdef"])
            .expect("ids")
            .command
        else {
            panic!("forget");
        };
        assert_eq!(args.ids, ["0123abcd", "89abcdef"]);
        assert!(args.keep.to_rules().expect("none").is_empty());
    }

    #[test]
    fn prune_lock_unlock_policy_and_stats_parse() {
        assert!(matches!(
            parse(&["prune", "--dry-run", "--json"])
                .expect("prune")
                .command,
            Command::Prune { dry_run: true }
        ));
        let Command::Lock(lock) = parse(&["lock", "0123abcd", "--for", "3y"])
            .expect("lock")
            .command
        else {
            panic!("lock");
        };
        assert_eq!(
            (lock.for_.as_deref(), lock.mode.as_str()),
            (Some("3y"), "governance")
        );
        let Command::Lock(lock) = parse(&[
            "lock",
            "0123abcd",
            "--until",
            "2030-01-31",
            "--mode",
            "compliance",
        ])
        .expect("lock until")
        .command
        else {
            panic!("lock");
        };
        assert_eq!(
            (lock.until.as_deref(), lock.mode.as_str()),
            (Some("2030-01-31"), "compliance")
        );
        assert!(
            parse(&["lock", "0123abcd"]).is_err(),
            "needs --until or --for"
        );
        assert!(parse(&["lock", "0123abcd", "--until", "2030-01-31", "--for", "1d"]).is_err());
        assert!(parse(&["lock", "0123abcd", "--for", "1d", "--mode", "legal"]).is_err());
        assert!(matches!(
            parse(&["unlock", "0123abcd", "--bypass-governance"])
                .expect("unlock")
                .command,
            Command::Unlock {
                bypass_governance: true,
                ..
            }
        ));
        let Command::Policy {
            command:
                PolicyCommand::Set {
                    dataset,
                    keep,
                    max_age,
                    cold_after,
                },
        } = parse(&[
            "policy",
            "set",
            "--dataset",
            "chat",
            "--keep-daily",
            "7",
            "--keep-within",
            "1y",
            "--keep-tag",
            "gold",
            "--max-age",
            "7y",
            "--cold-after",
            "90d",
        ])
        .expect("policy set")
        .command
        else {
            panic!("policy set");
        };
        assert_eq!(dataset, "chat");
        assert_eq!(keep.keep_daily, 7);
        assert_eq!(
            (max_age.as_deref(), cold_after.as_deref()),
            (Some("7y"), Some("90d"))
        );
        assert!(
            parse(&["policy", "set", "--keep-last", "1"]).is_err(),
            "needs --dataset"
        );
        assert!(matches!(
            parse(&["policy", "remove", "--dataset", "chat"])
                .expect("remove")
                .command,
            Command::Policy {
                command: PolicyCommand::Remove { .. }
            }
        ));
        assert!(matches!(
            parse(&["policy", "show", "--json"]).expect("show").command,
            Command::Policy {
                command: PolicyCommand::Show
            }
        ));
        let Command::Stats { dataset } = parse(&["stats", "--dataset", "chat", "--json"])
            .expect("stats")
            .command
        else {
            panic!("stats");
        };
        assert_eq!(dataset.as_deref(), Some("chat"));
    }

    #[test]
    fn snapshots_json_adds_committed_kind_and_lock() {
        let snapshot = cairn_client::Snapshot {
            id: [1; 32],
            dataset: "chat".into(),
            parent: None,
            time_unix_ms: 1_000,
            kind: "differential".into(),
            root_tree: [2; 32],
            info: Default::default(),
            files: 1,
            bytes: 2,
            bytes_added: 3,
            tags: Vec::new(),
            committed_unix_ms: 1_764_000_000_000,
            lock: Some(cairn_client::LockInfo {
                mode: "compliance".into(),
                until_unix_ms: 1_900_000_000_000,
            }),
        };
        let row = snapshot_json(&snapshot).expect("json");
        assert_eq!(row["committed"], "2025-11-24T16:00:00Z");
        assert_eq!(row["kind"], "differential");
        assert_eq!(row["lock"]["mode"], "compliance");
        assert_eq!(lock_marker(&snapshot, 1_800_000_000_000), "C");
        assert_eq!(lock_marker(&snapshot, 1_950_000_000_000), "-");
    }

    #[test]
    fn an_io_error_is_printed_with_its_cause_once() {
        let missing = std::fs::metadata("/nonexistent/cairn-test-path").expect_err("missing");
        let error = anyhow::Error::new(ClientError::Io {
            path: "/nonexistent/cairn-test-path".into(),
            error: missing,
        });
        let text = render_error(&error);
        assert_eq!(
            text.matches("No such file or directory").count(),
            1,
            "{text}"
        );
        assert!(text.starts_with("/nonexistent/cairn-test-path: "), "{text}");
    }

    #[test]
    fn contexts_and_causes_are_each_printed_once() {
        let inner = std::fs::read("/nonexistent/password-file").expect_err("missing");
        let error = anyhow::Error::new(inner)
            .context("cannot read password file /nonexistent/password-file");
        let text = render_error(&error);
        assert_eq!(
            text,
            "cannot read password file /nonexistent/password-file: No such file or directory (os error 2)"
        );
    }
}
