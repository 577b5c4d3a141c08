//! The node's configuration: defaults, then a TOML file, then the
//! environment, then command-line flags.
//!
//! Precedence: defaults < `--config` file < `CAIRN_NODE_*` environment <
//! flags. Every default is defined once, in the `Default` impl of its
//! section (or a `DEFAULT_*` constant for top-level keys): serde fills
//! missing keys from it and the components are built from the sections, so
//! tests and production run the same numbers unless they say otherwise.
//! Each component gets its own section (`[raft]` → the metadata group,
//! `[gateway]`, `[repair]`, `[scrub]`, `[lifecycle]`), never the whole configuration.
//!
//! Validated once, at start: a configuration that could not keep its
//! promises (an erasure code that a region loss would break on this
//! topology, election timeouts below the heartbeat) is refused with the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::erasure::Code;
use crate::gateway::GatewayConfig;
use crate::model::{NodeId, NodeInfo, StorageClass};
use crate::placement::{Candidate, place};

/// Prefix of the environment variables that configure a node.
pub const ENV_PREFIX: &str = "CAIRN_NODE_";
/// The environment variable naming the config file (like `--config`).
pub const ENV_CONFIG: &str = "CAIRN_NODE_CONFIG";
/// Reed-Solomon code when none is given.
pub const DEFAULT_ERASURE: &str = "4+2";
/// Unreachable this long and a node counts as down, when not given.
pub const DEFAULT_DOWN_AFTER: Duration = Duration::from_secs(600);
/// How long a stopping node may take to drain calls and close its stores.
/// Shorter than the stop timeouts of `deploy/` (compose 30 s, systemd and
/// Kubernetes 60 s), so the node, not a SIGKILL, says why it stopped.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment {vars}: {source}")]
    Env {
        /// The `CAIRN_NODE_*` variables that were applied.
        vars: String,
        source: toml::de::Error,
    },
    #[error(
        "environment variable {var} is not a node setting: use {ENV_PREFIX}ID, _REGION, _LISTEN, _DATA_DIR, _INITIAL_CLUSTER, _ERASURE, _DOWN_AFTER, _METRICS_LISTEN, _INSECURE, _BOOTSTRAP_TOKEN_FILE, _STORAGE_CLASS or {ENV_PREFIX}<SECTION>_<KEY> with a section of raft, gateway, repair, scrub, tls, lifecycle, tiering"
    )]
    EnvUnknown { var: String },
    #[error("environment variable {var}={value:?}: expected a whole number")]
    EnvNumber { var: String, value: String },
    #[error("environment variable {var}={value:?}: expected true or false")]
    EnvBool { var: String, value: String },
    #[error(
        "no TLS configured: give --tls-ca, --tls-cert and --tls-key (or [tls] ca, cert and key in the config file; make them with `cairn-node ca init` and `cairn-node ca issue`), or --insecure for a plaintext cluster without authentication"
    )]
    NoTls,
    #[error(
        "incomplete TLS settings: {missing} missing (--tls-ca, --tls-cert and --tls-key go together)"
    )]
    TlsIncomplete { missing: String },
    #[error("--insecure and TLS settings are both given: drop one of them")]
    InsecureWithTls,
    #[error("missing setting: {name} (flag --{flag}, {env} or `{name}` in the config file)")]
    Missing {
        name: &'static str,
        flag: &'static str,
        env: &'static str,
    },
    #[error("--initial-cluster entry {entry:?}: expected ID=REGION@HOST:PORT")]
    ClusterEntry { entry: String },
    #[error("--initial-cluster does not contain this node (id {node_id})")]
    SelfMissing { node_id: NodeId },
    #[error(
        "--initial-cluster says node {node_id} is {cluster}, but this node was started as {flags}"
    )]
    SelfMismatch {
        node_id: NodeId,
        cluster: String,
        flags: String,
    },
    #[error("--erasure {value:?}: {reason}")]
    Erasure { value: String, reason: String },
    #[error(
        "erasure {code} cannot survive the loss of a region on this cluster ({topology}): use at least 3 regions with enough nodes, or a code with more parity"
    )]
    CodeTooWide { code: String, topology: String },
    #[error("setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Reads a byte size: a whole number of bytes (`67108864`) or a string with
/// a unit (`"64MiB"`, `"64 MB"`, `"512KiB"`), as `byte-unit` parses it.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let byte: byte_unit::Byte = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a size such as \"64MiB\": {e}"))?;
    Ok(byte.as_u64())
}

/// serde: a byte size as an integer or a string with a unit ([`parse_size`]).
fn size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(deserializer)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
    }
}

/// `[raft]`: timings of the metadata group. Multi-region deployments need a
/// heartbeat above the inter-region RTT and elections about 10× that.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    #[serde(with = "humantime_serde")]
    pub election_min: Duration,
    #[serde(with = "humantime_serde")]
    pub election_max: Duration,
    /// Build a snapshot (and purge older log) every this many entries; 0 = never.
    pub snapshot_every_logs: u64,
    /// Deadline of one call to a peer of the group (forwarded write, read
    /// index, snapshot chunk).
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
}

impl Default for RaftSection {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
            snapshot_every_logs: 5000,
            rpc_timeout: Duration::from_secs(20),
        }
    }
}

/// `[gateway]`: limits of the client-facing role.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Deadline of one shard call to a peer.
    #[serde(with = "humantime_serde")]
    pub rpc_timeout: Duration,
    pub packs_in_flight_max: usize,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            rpc_timeout: Duration::from_secs(20),
            packs_in_flight_max: 4,
        }
    }
}

/// `[repair]`: re-protection after node loss and rebalancing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepairSection {
    /// Time between passes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Shard bytes written per second at most (0 = unlimited); `"64MiB"` or bytes.
    #[serde(deserialize_with = "size")]
    pub rate_bytes_per_s: u64,
}

impl Default for RepairSection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            rate_bytes_per_s: 64 * 1024 * 1024,
        }
    }
}

impl From<&RepairSection> for crate::repair::RepairConfig {
    fn from(section: &RepairSection) -> Self {
        Self {
            interval: section.interval,
            rate_bytes_per_s: section.rate_bytes_per_s,
        }
    }
}

/// `[scrub]`: background verification of this node's shards.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubSection {
    /// Pause between two full rounds.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Shard bytes read per second at most (0 = unlimited); `"32MiB"` or bytes.
    #[serde(deserialize_with = "size")]
    pub rate_bytes_per_s: u64,
    /// Shard files no index entry names are deleted once older than this;
    /// keep it well above the longest upload.
    #[serde(with = "humantime_serde")]
    pub orphan_grace: Duration,
}

impl Default for ScrubSection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(3600),
            rate_bytes_per_s: 32 * 1024 * 1024,
            orphan_grace: crate::scrub::ORPHAN_GRACE_DEFAULT,
        }
    }
}

impl From<&ScrubSection> for crate::scrub::ScrubConfig {
    fn from(section: &ScrubSection) -> Self {
        Self {
            interval: section.interval,
            rate_bytes_per_s: section.rate_bytes_per_s,
            orphan_grace: section.orphan_grace,
        }
    }
}

/// `[lifecycle]`: garbage collection and dataset policies, run by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleSection {
    /// Pause between two garbage collections (mark, sweep, repack).
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// An unreferenced pack of a backup that has not committed yet is kept
    /// while the backup uploaded within this long (a killed backup's packs
    /// go after it); keep it above the longest pause between two packs.
    #[serde(with = "humantime_serde")]
    pub gc_grace: Duration,
    /// Pause between two applications of the dataset policies.
    #[serde(with = "humantime_serde")]
    pub policy_interval: Duration,
    /// Packs with less than this share of live bytes (percent) are repacked.
    /// 100 (the default): every pack holding a dead blob is rewritten, so a
    /// prune leaves no forgotten byte on any disk (right to erasure); lower
    /// it to rewrite less and keep dead blobs inside mostly-live packs.
    pub repack_below_percent: u8,
}

impl Default for LifecycleSection {
    fn default() -> Self {
        Self {
            gc_interval: Duration::from_secs(3600),
            gc_grace: Duration::from_secs(3600),
            policy_interval: Duration::from_secs(600),
            repack_below_percent: 100,
        }
    }
}

/// `[tiering]`: the leader's mover of packs between storage classes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TieringSection {
    /// Pause between two mover passes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Shard bytes the mover writes per second at most (0 = unlimited);
    /// `"64MiB"` or bytes. Client traffic keeps priority.
    #[serde(deserialize_with = "size")]
    pub rate_bytes_per_s: u64,
    /// Packs moved per pass at most; the rest waits for the next pass.
    pub packs_per_pass: usize,
}

impl Default for TieringSection {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            rate_bytes_per_s: 64 * 1024 * 1024,
            packs_per_pass: 256,
        }
    }
}

/// The sections an environment variable `CAIRN_NODE_<SECTION>_<KEY>` may set.
const SECTIONS: [&str; 7] = [
    "raft",
    "gateway",
    "repair",
    "scrub",
    "tls",
    "lifecycle",
    "tiering",
];
/// Top-level keys and their variables (`CAIRN_NODE_ID` is `node_id`).
const TOP_LEVEL: [(&str, &str); 12] = [
    ("STORAGE_CLASS", "storage_class"),
    ("ID", "node_id"),
    ("REGION", "region"),
    ("LISTEN", "listen"),
    ("DATA_DIR", "data_dir"),
    ("INITIAL_CLUSTER", "initial_cluster"),
    ("ERASURE", "erasure"),
    ("DOWN_AFTER", "down_after"),
    ("SHUTDOWN_GRACE", "shutdown_grace"),
    ("METRICS_LISTEN", "metrics_listen"),
    ("INSECURE", "insecure"),
    ("BOOTSTRAP_TOKEN_FILE", "bootstrap_token_file"),
];
/// Keys whose values are whole numbers (every other value is a string:
/// durations, sizes, addresses and names parse from text).
const NUMBER_KEYS: [&str; 4] = [
    "node_id",
    "snapshot_every_logs",
    "packs_in_flight_max",
    "packs_per_pass",
];
/// Keys whose values are `true` or `false`.
const BOOL_KEYS: [&str; 1] = ["insecure"];

/// The whole file, every section optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeFile {
    pub node_id: Option<NodeId>,
    pub region: Option<String>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub initial_cluster: Option<String>,
    pub erasure: Option<String>,
    #[serde(with = "humantime_serde::option")]
    pub down_after: Option<Duration>,
    #[serde(with = "humantime_serde::option")]
    pub shutdown_grace: Option<Duration>,
    pub metrics_listen: Option<SocketAddr>,
    /// Plaintext and no authentication: tests and experiments only.
    pub insecure: bool,
    /// At cluster initialization, the token in this file becomes the first
    /// `cluster-admin` token.
    pub bootstrap_token_file: Option<PathBuf>,
    /// `hot` (default) or `cold`: which packs this node's disks hold.
    pub storage_class: Option<StorageClass>,
    pub tls: TlsSection,
    pub raft: RaftSection,
    pub gateway: GatewaySection,
    pub repair: RepairSection,
    pub scrub: ScrubSection,
    pub lifecycle: LifecycleSection,
    pub tiering: TieringSection,
}

/// `[tls]`: the cluster CA and this node's certificate and key (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// How a node proves itself and checks its callers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// Plaintext, every caller trusted (`--insecure`).
    pub insecure: bool,
    pub tls: TlsSection,
    pub bootstrap_token_file: Option<PathBuf>,
}

impl NodeFile {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(Some(path), std::iter::empty())
    }

    /// Defaults, then the file at `path` (if any), then the `CAIRN_NODE_*`
    /// variables among `env` (other variables are ignored). A variable with
    /// that prefix that names no setting is refused, like an unknown key.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let parse = |source| ConfigError::Parse {
                    path: path.to_path_buf(),
                    source,
                };
                let table: toml::Table = toml::from_str(&text).map_err(parse)?;
                // Checked alone first, so its mistakes are blamed on the file.
                NodeFile::deserialize(table.clone()).map_err(parse)?;
                table
            }
        };
        let mut applied = Vec::new();
        for (var, value) in env {
            let Some(name) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if var == ENV_CONFIG {
                continue;
            }
            let (section, key) =
                env_key(name).ok_or_else(|| ConfigError::EnvUnknown { var: var.clone() })?;
            let item = if NUMBER_KEYS.contains(&key.as_str()) {
                let n: i64 = value.trim().parse().map_err(|_| ConfigError::EnvNumber {
                    var: var.clone(),
                    value: value.clone(),
                })?;
                toml::Value::Integer(n)
            } else if BOOL_KEYS.contains(&key.as_str()) {
                let flag = match value.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" | "" => false,
                    _ => {
                        return Err(ConfigError::EnvBool {
                            var: var.clone(),
                            value: value.clone(),
                        });
                    }
                };
                toml::Value::Boolean(flag)
            } else {
                toml::Value::String(value)
            };
            let target = match section {
                None => &mut table,
                Some(section) => table
                    .entry(section)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or(ConfigError::Invalid {
                        key: section,
                        reason: "must be a [section]".into(),
                    })?,
            };
            target.insert(key, item);
            applied.push(var);
        }
        NodeFile::deserialize(table).map_err(|source| ConfigError::Env {
            vars: applied.join(", "),
            source,
        })
    }
}

/// `CAIRN_NODE_` + `name` → (section, key): `REGION` → (None, "region"),
/// `SCRUB_INTERVAL` → (Some("scrub"), "interval").
fn env_key(name: &str) -> Option<(Option<&'static str>, String)> {
    if let Some((_, key)) = TOP_LEVEL.iter().find(|(var, _)| *var == name) {
        return Some((None, key.to_string()));
    }
    let lower = name.to_ascii_lowercase();
    SECTIONS.iter().find_map(|section| {
        let key = lower.strip_prefix(section)?.strip_prefix('_')?;
        (!key.is_empty()).then(|| (Some(*section), key.to_string()))
    })
}

/// The command line of `cairn-node`: flags win over the environment and
/// the file.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "cairn-node",
    version,
    about = "A Cairn storage node: Raft metadata member, shard store and gateway."
)]
pub struct NodeArgs {
    /// This node's id; unique and never reused in the cluster. [env: CAIRN_NODE_ID]
    #[arg(long)]
    pub node_id: Option<u64>,
    /// The region (failure domain) this node is in. [env: CAIRN_NODE_REGION]
    #[arg(long)]
    pub region: Option<String>,
    /// Address to serve gRPC on, as listed in --initial-cluster. [env: CAIRN_NODE_LISTEN]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Directory for shards and metadata. [env: CAIRN_NODE_DATA_DIR]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Every node: ID=REGION@HOST:PORT,... (the same on every node; a node
    /// added later lists the running nodes and itself). [env: CAIRN_NODE_INITIAL_CLUSTER]
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Reed-Solomon code, data+parity shards [default: 4+2]. [env: CAIRN_NODE_ERASURE]
    #[arg(long)]
    pub erasure: Option<String>,
    /// How long a node may be unreachable before it counts as down
    /// [default: 10m]. [env: CAIRN_NODE_DOWN_AFTER]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub down_after: Option<Duration>,
    /// How long a stop (SIGTERM, Ctrl-C) may take to drain calls and close
    /// the stores before the process exits anyway; a second signal exits at
    /// once [default: 25s]. [env: CAIRN_NODE_SHUTDOWN_GRACE]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Address for Prometheus metrics. [env: CAIRN_NODE_METRICS_LISTEN]
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// The cluster CA certificate (PEM) every node certificate must chain
    /// to. [env: CAIRN_NODE_TLS_CA]
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), made by `cairn-node ca issue` for its
    /// node id. [env: CAIRN_NODE_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM). [env: CAIRN_NODE_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Plaintext, no authentication: for tests and experiments only; without
    /// it a node needs --tls-ca, --tls-cert and --tls-key. [env: CAIRN_NODE_INSECURE]
    #[arg(long)]
    pub insecure: bool,
    /// At cluster initialization, the token in this file becomes the first
    /// cluster-admin token. [env: CAIRN_NODE_BOOTSTRAP_TOKEN_FILE]
    #[arg(long, value_name = "FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Storage tier of this node's disks: hot (new and recent packs) or
    /// cold (packs only old snapshots reference) [default: hot].
    /// [env: CAIRN_NODE_STORAGE_CLASS]
    #[arg(long, value_name = "hot|cold")]
    pub storage_class: Option<StorageClass>,
    /// TOML configuration file; the environment and flags override it.
    #[arg(long, env = ENV_CONFIG)]
    pub config: Option<PathBuf>,
}

impl NodeArgs {
    /// Sets every flag given on top of `file`.
    pub fn apply(self, file: &mut NodeFile) {
        fn set<T>(flag: Option<T>, key: &mut Option<T>) {
            if flag.is_some() {
                *key = flag;
            }
        }
        set(self.node_id, &mut file.node_id);
        set(self.region, &mut file.region);
        set(self.listen, &mut file.listen);
        set(self.data_dir, &mut file.data_dir);
        set(self.initial_cluster, &mut file.initial_cluster);
        set(self.erasure, &mut file.erasure);
        set(self.down_after, &mut file.down_after);
        set(self.shutdown_grace, &mut file.shutdown_grace);
        set(self.metrics_listen, &mut file.metrics_listen);
        set(self.tls_ca, &mut file.tls.ca);
        set(self.tls_cert, &mut file.tls.cert);
        set(self.tls_key, &mut file.tls.key);
        set(self.bootstrap_token_file, &mut file.bootstrap_token_file);
        set(self.storage_class, &mut file.storage_class);
        if self.insecure {
            file.insecure = true;
        }
    }

    /// The whole configuration: defaults < file < `env` < these flags,
    /// validated.
    pub fn load(
        self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<NodeConfig, ConfigError> {
        let mut file = NodeFile::load_with_env(self.config.as_deref(), env)?;
        self.apply(&mut file);
        NodeConfig::from_file(file)
    }
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub region: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub initial_cluster: BTreeMap<NodeId, NodeInfo>,
    pub code: Code,
    /// Unreachable this long and a node counts as down.
    pub down_after: Duration,
    /// A stop that takes longer ends the process anyway (see `main`).
    pub shutdown_grace: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub security: Security,
    pub raft: RaftSection,
    pub gateway: GatewaySection,
    pub repair: RepairSection,
    pub scrub: ScrubSection,
    pub lifecycle: LifecycleSection,
    /// This node's storage tier (announced to the metadata group at start).
    pub storage_class: StorageClass,
    pub tiering: TieringSection,
}

fn missing(name: &'static str, flag: &'static str, env: &'static str) -> ConfigError {
    ConfigError::Missing { name, flag, env }
}

fn positive(key: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            reason: "must be more than 0".into(),
        });
    }
    Ok(())
}

/// The checks of values that stand on their own (the topology is checked
/// with the initial cluster).
fn check_sections(file: &NodeFile) -> Result<(), ConfigError> {
    let raft = &file.raft;
    positive("raft.heartbeat", raft.heartbeat)?;
    positive("raft.rpc_timeout", raft.rpc_timeout)?;
    if raft.election_min <= raft.heartbeat {
        return Err(ConfigError::Invalid {
            key: "raft.election_min",
            reason: format!(
                "{} must be longer than the heartbeat ({}), or followers start elections while the leader is alive",
                humantime::format_duration(raft.election_min),
                humantime::format_duration(raft.heartbeat)
            ),
        });
    }
    if raft.election_max <= raft.election_min {
        return Err(ConfigError::Invalid {
            key: "raft.election_max",
            reason: format!(
                "{} must be longer than raft.election_min ({})",
                humantime::format_duration(raft.election_max),
                humantime::format_duration(raft.election_min)
            ),
        });
    }
    positive("gateway.rpc_timeout", file.gateway.rpc_timeout)?;
    if file.gateway.packs_in_flight_max == 0 {
        return Err(ConfigError::Invalid {
            key: "gateway.packs_in_flight_max",
            reason: "must be at least 1".into(),
        });
    }
    positive("repair.interval", file.repair.interval)?;
    positive("scrub.interval", file.scrub.interval)?;
    positive("lifecycle.gc_interval", file.lifecycle.gc_interval)?;
    positive("lifecycle.policy_interval", file.lifecycle.policy_interval)?;
    if !(1..=100).contains(&file.lifecycle.repack_below_percent) {
        return Err(ConfigError::Invalid {
            key: "lifecycle.repack_below_percent",
            reason: "must be 1 to 100".into(),
        });
    }
    if let Some(down_after) = file.down_after {
        positive("down_after", down_after)?;
    }
    if let Some(grace) = file.shutdown_grace {
        positive("shutdown_grace", grace)?;
    }
    positive("tiering.interval", file.tiering.interval)?;
    if file.tiering.packs_per_pass == 0 {
        return Err(ConfigError::Invalid {
            key: "tiering.packs_per_pass",
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}

/// Either `--insecure` or all three TLS files, never both nor a part.
fn check_security(insecure: bool, tls: &TlsSection) -> Result<(), ConfigError> {
    let given = [
        ("--tls-ca", tls.ca.is_some()),
        ("--tls-cert", tls.cert.is_some()),
        ("--tls-key", tls.key.is_some()),
    ];
    let missing: Vec<&str> = given
        .iter()
        .filter(|(_, set)| !set)
        .map(|(flag, _)| *flag)
        .collect();
    match (insecure, missing.len()) {
        (true, 3) => Ok(()),
        (true, _) => Err(ConfigError::InsecureWithTls),
        (false, 0) => Ok(()),
        (false, 3) => Err(ConfigError::NoTls),
        (false, _) => Err(ConfigError::TlsIncomplete {
            missing: missing.join(", "),
        }),
    }
}

impl NodeConfig {
    /// Validates a merged file (environment and flags already applied on top of it).
    pub fn from_file(file: NodeFile) -> Result<Self, ConfigError> {
        check_sections(&file)?;
        let node_id = file
            .node_id
            .ok_or(missing("node_id", "node-id", "CAIRN_NODE_ID"))?;
        let region = file
            .region
            .ok_or(missing("region", "region", "CAIRN_NODE_REGION"))?;
        let listen = file
            .listen
            .ok_or(missing("listen", "listen", "CAIRN_NODE_LISTEN"))?;
        let data_dir =
            file.data_dir
                .ok_or(missing("data_dir", "data-dir", "CAIRN_NODE_DATA_DIR"))?;
        let cluster_text = file.initial_cluster.ok_or(missing(
            "initial_cluster",
            "initial-cluster",
            "CAIRN_NODE_INITIAL_CLUSTER",
        ))?;
        let initial_cluster = parse_initial_cluster(&cluster_text)?;
        let me = initial_cluster
            .get(&node_id)
            .ok_or(ConfigError::SelfMissing { node_id })?;
        if me.region != region {
            return Err(ConfigError::SelfMismatch {
                node_id,
                cluster: me.to_string(),
                flags: format!("{region}@{listen}"),
            });
        }
        let erasure = file.erasure.unwrap_or_else(|| DEFAULT_ERASURE.into());
        let code: Code =
            erasure
                .parse()
                .map_err(|e: crate::erasure::ErasureError| ConfigError::Erasure {
                    value: erasure.clone(),
                    reason: e.to_string(),
                })?;
        check_code_fits(code, &initial_cluster)?;
        check_security(file.insecure, &file.tls)?;
        Ok(Self {
            node_id,
            region,
            listen,
            data_dir,
            initial_cluster,
            code,
            down_after: file.down_after.unwrap_or(DEFAULT_DOWN_AFTER),
            shutdown_grace: file.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
            metrics_listen: file.metrics_listen,
            security: Security {
                insecure: file.insecure,
                tls: file.tls,
                bootstrap_token_file: file.bootstrap_token_file,
            },
            raft: file.raft,
            gateway: file.gateway,
            repair: file.repair,
            lifecycle: file.lifecycle,
            scrub: file.scrub,
            storage_class: file.storage_class.unwrap_or_default(),
            tiering: file.tiering,
        })
    }

    /// The metadata group's settings: from `[raft]` alone.
    pub fn meta_config(&self) -> crate::meta::MetaConfig {
        crate::meta::MetaConfig::from(&self.raft)
    }

    /// The gateway's settings: the code, `[gateway]`, and `[repair]` for the
    /// repair worker it hosts.
    pub fn gateway_config(&self) -> GatewayConfig {
        GatewayConfig {
            code: self.code,
            rpc_timeout: self.gateway.rpc_timeout,
            packs_in_flight_max: self.gateway.packs_in_flight_max,
            repair: (&self.repair).into(),
            lifecycle: self.lifecycle.clone(),
            insecure: self.security.insecure,
        }
    }
}

/// Parses `1=r1@127.0.0.1:7101,2=r1@127.0.0.1:7102,...`.
pub fn parse_initial_cluster(text: &str) -> Result<BTreeMap<NodeId, NodeInfo>, ConfigError> {
    let mut nodes = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || ConfigError::ClusterEntry {
            entry: entry.to_string(),
        };
        let (id, rest) = entry.split_once('=').ok_or_else(bad)?;
        let (region, addr) = rest.split_once('@').ok_or_else(bad)?;
        let id: NodeId = id.trim().parse().map_err(|_| bad())?;
        if region.is_empty() || addr.is_empty() || nodes.contains_key(&id) {
            return Err(bad());
        }
        nodes.insert(
            id,
            NodeInfo {
                region: region.to_string(),
                addr: addr.to_string(),
            },
        );
    }
    if nodes.is_empty() {
        return Err(missing(
            "initial_cluster",
            "initial-cluster",
            "CAIRN_NODE_INITIAL_CLUSTER",
        ));
    }
    Ok(nodes)
}

/// Formats a cluster map back into the `--initial-cluster` syntax.
pub fn format_initial_cluster(nodes: &BTreeMap<NodeId, NodeInfo>) -> String {
    nodes
        .iter()
        .map(|(id, info)| format!("{id}={}@{}", info.region, info.addr))
        .collect::<Vec<_>>()
        .join(",")
}

/// Refuses a code whose healthy placement would break the region invariant.
fn check_code_fits(code: Code, nodes: &BTreeMap<NodeId, NodeInfo>) -> Result<(), ConfigError> {
    let candidates: Vec<Candidate> = nodes
        .iter()
        .map(|(id, info)| Candidate {
            node: *id,
            region: info.region.clone(),
            up: true,
            // Classes are announced after start: the code must fit all nodes.
            class: crate::model::StorageClass::Hot,
        })
        .collect();
    let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
    for info in nodes.values() {
        *per_region.entry(info.region.as_str()).or_default() += 1;
    }
    let topology = per_region
        .iter()
        .map(|(r, n)| format!("{r}: {n} node(s)"))
        .collect::<Vec<_>>()
        .join(", ");
    match place(code, &[0u8; 32], &candidates) {
        Ok(plan) if !plan.degraded => Ok(()),
        _ => Err(ConfigError::CodeTooWide {
            code: code.to_string(),
            topology,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_initial_cluster() {
        let nodes =
            parse_initial_cluster("1=r1@127.0.0.1:7101, 2=r2@127.0.0.1:7201").expect("valid");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[&2].region, "r2");
        assert_eq!(
            format_initial_cluster(&nodes),
            "1=r1@127.0.0.1:7101,2=r2@127.0.0.1:7201"
        );
        assert!(parse_initial_cluster("1=r1").is_err());
        assert!(parse_initial_cluster("x=r1@a:1").is_err());
        assert!(parse_initial_cluster("1=r1@a:1,1=r2@b:2").is_err());
    }

    fn file(cluster: &str, erasure: &str) -> NodeFile {
        NodeFile {
            node_id: Some(1),
            region: Some("r1".into()),
            listen: Some("127.0.0.1:7101".parse().expect("addr")),
            data_dir: Some("/nonexistent".into()),
            initial_cluster: Some(cluster.into()),
            erasure: Some(erasure.into()),
            insecure: true,
            ..Default::default()
        }
    }

    #[test]
    fn refuses_a_code_two_regions_cannot_hold() {
        let two_regions = "1=r1@a:1,2=r1@a:2,3=r1@a:3,4=r2@b:1,5=r2@b:2,6=r2@b:3";
        let err = NodeConfig::from_file(file(two_regions, "4+2")).expect_err("4+2 on 2 regions");
        assert!(
            err.to_string()
                .contains("cannot survive the loss of a region")
        );
        let three = "1=r1@a:1,2=r1@a:2,3=r2@b:1,4=r2@b:2,5=r3@c:1,6=r3@c:2";
        NodeConfig::from_file(file(three, "4+2")).expect("4+2 on 3x2 is fine");
    }
    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const CLUSTER: &str = "1=r1@127.0.0.1:7101,2=r1@127.0.0.1:7102,3=r2@127.0.0.1:7201,4=r2@127.0.0.1:7202,5=r3@127.0.0.1:7301,6=r3@127.0.0.1:7302";

    fn write_file(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("node.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_file(
            dir.path(),
            &format!(
                "node_id = 1\nregion = \"r1\"\nlisten = \"127.0.0.1:7101\"\ndata_dir = \"/srv/a\"\ninitial_cluster = \"{CLUSTER}\"\ninsecure = true\n\n[scrub]\ninterval = \"2h\"\nrate_bytes_per_s = \"8MiB\"\n[raft]\nheartbeat = \"200ms\"\nelection_min = \"2s\"\nelection_max = \"4s\"\n"
            ),
        );
        let args = |extra: &[&str]| {
            let mut argv = vec!["cairn-node", "--config", path.to_str().expect("utf-8 path")];
            argv.extend_from_slice(extra);
            <NodeArgs as clap::Parser>::try_parse_from(argv).expect("flags parse")
        };
        // The file over the defaults.
        let config = args(&[])
            .load(env(&[("PATH", "/bin")]))
            .expect("file alone");
        assert_eq!(config.data_dir, PathBuf::from("/srv/a"));
        assert_eq!(config.scrub.interval, Duration::from_secs(7200));
        assert_eq!(config.scrub.rate_bytes_per_s, 8 * 1024 * 1024);
        assert_eq!(config.repair, RepairSection::default());
        assert_eq!(config.raft.heartbeat, Duration::from_millis(200));

        // The environment over the file.
        let vars = env(&[
            ("CAIRN_NODE_DATA_DIR", "/srv/b"),
            ("CAIRN_NODE_SCRUB_INTERVAL", "30m"),
            ("CAIRN_NODE_REPAIR_RATE_BYTES_PER_S", "1GiB"),
            ("CAIRN_NODE_RAFT_SNAPSHOT_EVERY_LOGS", "77"),
            ("CAIRN_NODE_DOWN_AFTER", "45s"),
            ("CAIRN_NODE_SHUTDOWN_GRACE", "5s"),
        ]);
        let config = args(&[]).load(vars.clone()).expect("file and environment");
        assert_eq!(config.data_dir, PathBuf::from("/srv/b"));
        assert_eq!(config.scrub.interval, Duration::from_secs(1800));
        assert_eq!(
            config.scrub.rate_bytes_per_s,
            8 * 1024 * 1024,
            "kept from the file"
        );
        assert_eq!(config.repair.rate_bytes_per_s, 1 << 30);
        assert_eq!(config.raft.snapshot_every_logs, 77);
        assert_eq!(config.down_after, Duration::from_secs(45));
        assert_eq!(config.shutdown_grace, Duration::from_secs(5));

        // Flags over the environment.
        let config = args(&["--data-dir", "/srv/c", "--down-after", "1m"])
            .load(vars)
            .expect("all layers");
        assert_eq!(config.data_dir, PathBuf::from("/srv/c"));
        assert_eq!(config.down_after, Duration::from_secs(60));
        assert_eq!(config.scrub.interval, Duration::from_secs(1800));
    }

    #[test]
    fn storage_class_and_tiering_layer_like_every_setting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_file(
            dir.path(),
            &format!(
                "node_id = 1\nregion = \"r1\"\nlisten = \"127.0.0.1:7101\"\ndata_dir = \"/srv/a\"\ninitial_cluster = \"{CLUSTER}\"\ninsecure = true\nstorage_class = \"cold\"\n\n[tiering]\ninterval = \"5m\"\nrate_bytes_per_s = \"16MiB\"\n"
            ),
        );
        let args = |extra: &[&str]| {
            let mut argv = vec!["cairn-node", "--config", path.to_str().expect("utf-8 path")];
            argv.extend_from_slice(extra);
            <NodeArgs as clap::Parser>::try_parse_from(argv).expect("flags parse")
        };
        let config = args(&[]).load(env(&[])).expect("file");
        assert_eq!(config.storage_class, StorageClass::Cold);
        assert_eq!(config.tiering.interval, Duration::from_secs(300));
        assert_eq!(config.tiering.rate_bytes_per_s, 16 << 20);
        assert_eq!(
            config.tiering.packs_per_pass,
            TieringSection::default().packs_per_pass
        );
        let vars = env(&[
            ("CAIRN_NODE_STORAGE_CLASS", "hot"),
            ("CAIRN_NODE_TIERING_PACKS_PER_PASS", "9"),
        ]);
        let config = args(&[]).load(vars.clone()).expect("environment");
        assert_eq!(config.storage_class, StorageClass::Hot);
        assert_eq!(config.tiering.packs_per_pass, 9);
        let config = args(&["--storage-class", "cold"])
            .load(vars)
            .expect("flags");
        assert_eq!(config.storage_class, StorageClass::Cold);
        // Defaults: hot.
        let defaults = NodeConfig::from_file(file(CLUSTER, "4+2")).expect("defaults");
        assert_eq!(defaults.storage_class, StorageClass::Hot);
        // A misspelt class is one clear error, from the flag and the environment.
        let err =
            <NodeArgs as clap::Parser>::try_parse_from(["cairn-node", "--storage-class", "warm"])
                .expect_err("warm is no class");
        assert!(err.to_string().contains("not one of hot, cold"), "{err}");
        let err = args(&[])
            .load(env(&[("CAIRN_NODE_STORAGE_CLASS", "warm")]))
            .expect_err("warm is no class");
        assert!(err.to_string().contains("warm"), "{err}");
    }

    #[test]
    fn the_environment_alone_configures_a_node_and_typos_are_refused() {
        let vars = env(&[
            ("CAIRN_NODE_ID", "3"),
            ("CAIRN_NODE_REGION", "r2"),
            ("CAIRN_NODE_LISTEN", "127.0.0.1:7201"),
            ("CAIRN_NODE_DATA_DIR", "/srv/3"),
            ("CAIRN_NODE_INITIAL_CLUSTER", CLUSTER),
            ("CAIRN_NODE_INSECURE", "true"),
        ]);
        let config = NodeArgs::default()
            .load(vars.clone())
            .expect("from the environment");
        assert_eq!((config.node_id, config.region.as_str()), (3, "r2"));

        let mut typo = vars.clone();
        typo.push(("CAIRN_NODE_SCRUB_INTERVALL".into(), "1h".into()));
        let err = NodeArgs::default().load(typo).expect_err("unknown key");
        assert!(
            err.to_string().contains("CAIRN_NODE_SCRUB_INTERVALL"),
            "{err}"
        );

        let mut unknown = vars.clone();
        unknown.push(("CAIRN_NODE_COLOUR".into(), "blue".into()));
        let err = NodeArgs::default()
            .load(unknown)
            .expect_err("not a setting");
        assert!(err.to_string().contains("is not a node setting"), "{err}");

        let mut not_a_number = vars;
        not_a_number.push((
            "CAIRN_NODE_GATEWAY_PACKS_IN_FLIGHT_MAX".into(),
            "many".into(),
        ));
        let err = NodeArgs::default()
            .load(not_a_number)
            .expect_err("not a number");
        assert!(err.to_string().contains("whole number"), "{err}");
    }

    #[test]
    fn sizes_parse_with_units_or_as_bytes() {
        assert_eq!(parse_size("64MiB"), Ok(64 * 1024 * 1024));
        assert_eq!(parse_size("64 MiB"), Ok(64 * 1024 * 1024));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("fast").is_err());
        assert!(parse_size("-1MiB").is_err());
        let file: NodeFile = toml::from_str(
            "[repair]\nrate_bytes_per_s = 1048576\n[scrub]\nrate_bytes_per_s = \"2MiB\"\n",
        )
        .expect("integer and string sizes");
        assert_eq!(file.repair.rate_bytes_per_s, 1 << 20);
        assert_eq!(file.scrub.rate_bytes_per_s, 2 << 20);
        let err = toml::from_str::<NodeFile>("[scrub]\nrate_bytes_per_s = \"lots\"\n")
            .expect_err("not a size");
        assert!(err.to_string().contains("not a size"), "{err}");
    }

    #[test]
    fn one_default_for_every_setting() {
        // What an empty file gives is what the code's defaults are, and what
        // the metadata group runs with when nothing is configured.
        let empty: NodeFile = toml::from_str("").expect("empty file");
        assert_eq!(empty.raft, RaftSection::default());
        assert_eq!(empty.gateway, GatewaySection::default());
        assert_eq!(empty.repair, RepairSection::default());
        assert_eq!(empty.scrub, ScrubSection::default());
        let sections: NodeFile =
            toml::from_str("[raft]\n[gateway]\n[repair]\n[scrub]\n").expect("empty sections");
        assert_eq!(sections.raft, RaftSection::default());
        let config = NodeConfig::from_file(file(
            "1=r1@a:1,2=r1@a:2,3=r2@b:1,4=r2@b:2,5=r3@c:1,6=r3@c:2",
            "4+2",
        ))
        .expect("valid");
        assert_eq!(config.meta_config(), crate::meta::MetaConfig::default());
        assert_eq!(config.down_after, DEFAULT_DOWN_AFTER);
        assert_eq!(config.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let repair: crate::repair::RepairConfig = (&RepairSection::default()).into();
        assert_eq!(
            repair.rate_bytes_per_s,
            RepairSection::default().rate_bytes_per_s
        );
    }

    #[test]
    fn inconsistent_timings_are_refused_with_the_key() {
        let cluster = "1=r1@a:1,2=r1@a:2,3=r2@b:1,4=r2@b:2,5=r3@c:1,6=r3@c:2";
        let mut bad = file(cluster, "4+2");
        bad.raft.election_min = Duration::from_millis(50);
        let err = NodeConfig::from_file(bad).expect_err("election below heartbeat");
        assert!(err.to_string().contains("raft.election_min"), "{err}");
        let mut bad = file(cluster, "4+2");
        bad.raft.election_max = bad.raft.election_min;
        let err = NodeConfig::from_file(bad).expect_err("empty election range");
        assert!(err.to_string().contains("raft.election_max"), "{err}");
        let mut bad = file(cluster, "4+2");
        bad.gateway.packs_in_flight_max = 0;
        assert!(NodeConfig::from_file(bad).is_err());
    }

    #[test]
    fn deploy_examples_are_valid() {
        for text in [
            include_str!("../../deploy/systemd/node.toml.example"),
            include_str!("../../deploy/compose/config/node.toml"),
        ] {
            let file: NodeFile = toml::from_str(text).expect("example parses");
            check_sections(&file).expect("example is consistent");
        }
    }

    #[test]
    fn a_node_needs_tls_or_insecure() {
        let cluster = "1=r1@a:1,2=r1@a:2,3=r2@b:1,4=r2@b:2,5=r3@c:1,6=r3@c:2";
        let mut plain = file(cluster, "4+2");
        plain.insecure = false;
        let err = NodeConfig::from_file(plain.clone()).expect_err("neither");
        assert!(matches!(err, ConfigError::NoTls), "{err}");
        assert!(err.to_string().contains("--insecure"), "{err}");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
        let mut partial = plain.clone();
        partial.tls.ca = Some("ca.pem".into());
        let err = NodeConfig::from_file(partial).expect_err("a part");
        assert!(
            err.to_string().contains("--tls-cert, --tls-key missing"),
            "{err}"
        );
        let mut both = file(cluster, "4+2");
        both.tls.ca = Some("ca.pem".into());
        assert!(matches!(
            NodeConfig::from_file(both),
            Err(ConfigError::InsecureWithTls)
        ));

        // Flags, environment and file all reach the same settings.
        let vars = env(&[
            ("CAIRN_NODE_ID", "1"),
            ("CAIRN_NODE_REGION", "r1"),
            ("CAIRN_NODE_LISTEN", "127.0.0.1:7101"),
            ("CAIRN_NODE_DATA_DIR", "/srv/1"),
            ("CAIRN_NODE_INITIAL_CLUSTER", CLUSTER),
            ("CAIRN_NODE_TLS_CA", "/etc/cairn/ca.pem"),
            ("CAIRN_NODE_TLS_CERT", "/etc/cairn/node-1.pem"),
            ("CAIRN_NODE_BOOTSTRAP_TOKEN_FILE", "/etc/cairn/token"),
        ]);
        let args = <NodeArgs as clap::Parser>::try_parse_from([
            "cairn-node",
            "--tls-key",
            "/etc/cairn/node-1.key",
        ])
        .expect("flags parse");
        let config = args.load(vars.clone()).expect("TLS from env and flags");
        assert!(!config.security.insecure);
        assert_eq!(
            config.security.tls.key,
            Some(PathBuf::from("/etc/cairn/node-1.key"))
        );
        assert_eq!(
            config.security.tls.ca,
            Some(PathBuf::from("/etc/cairn/ca.pem"))
        );
        assert_eq!(
            config.security.bootstrap_token_file,
            Some(PathBuf::from("/etc/cairn/token"))
        );
        let args =
            <NodeArgs as clap::Parser>::try_parse_from(["cairn-node", "--insecure"]).expect("flag");
        let mut insecure_env = vars[..5].to_vec();
        insecure_env.push(("CAIRN_NODE_INSECURE".into(), "maybe".into()));
        assert!(matches!(
            args.load(insecure_env),
            Err(ConfigError::EnvBool { .. })
        ));
        let file: NodeFile =
            toml::from_str("insecure = false\n[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n")
                .expect("[tls] parses");
        assert_eq!(file.tls.cert, Some(PathBuf::from("b")));
    }
}
