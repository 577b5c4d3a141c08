//! The node's configuration: TOML file, then command-line flags on top.
//!
//! Precedence: defaults < `--config` file < flags. Validated once, at start:
//! a configuration that could not keep its promises (an erasure code that a
//! region loss would break on this topology) is refused with the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::erasure::Code;
use crate::gateway::GatewayConfig;
use crate::meta::MetaConfig;
use crate::meta::types::{NodeId, NodeInfo};
use crate::placement::{Candidate, place};

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
    #[error("missing setting: {name} (flag --{flag} or `{name}` in the config file)")]
    Missing {
        name: &'static str,
        flag: &'static str,
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
}

/// `[raft]`: timings of the metadata group. Multi-region deployments need a
/// heartbeat above the inter-region RTT and elections about 10× that.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    #[serde(with = "humantime_serde")]
    pub election_min: Duration,
    #[serde(with = "humantime_serde")]
    pub election_max: Duration,
    pub snapshot_every_logs: u64,
}

impl Default for RaftSection {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_millis(100),
            election_min: Duration::from_millis(500),
            election_max: Duration::from_millis(1000),
            snapshot_every_logs: 5000,
        }
    }
}

/// `[gateway]`: limits of the client-facing role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepairSection {
    /// Time between passes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Shard bytes written per second at most (0 = unlimited).
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

/// `[scrub]`: background verification of this node's shards.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubSection {
    /// Pause between two full rounds.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Shard bytes read per second at most (0 = unlimited).
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
    pub metrics_listen: Option<SocketAddr>,
    pub raft: RaftSection,
    pub gateway: GatewaySection,
    pub repair: RepairSection,
    pub scrub: ScrubSection,
}

impl NodeFile {
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
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
    pub metrics_listen: Option<SocketAddr>,
    pub raft: RaftSection,
    pub gateway: GatewaySection,
    pub repair: RepairSection,
    pub scrub: ScrubSection,
}

impl NodeConfig {
    /// Validates a merged file (flags already applied on top of it).
    pub fn from_file(file: NodeFile) -> Result<Self, ConfigError> {
        let node_id = file.node_id.ok_or(ConfigError::Missing {
            name: "node_id",
            flag: "node-id",
        })?;
        let region = file.region.ok_or(ConfigError::Missing {
            name: "region",
            flag: "region",
        })?;
        let listen = file.listen.ok_or(ConfigError::Missing {
            name: "listen",
            flag: "listen",
        })?;
        let data_dir = file.data_dir.ok_or(ConfigError::Missing {
            name: "data_dir",
            flag: "data-dir",
        })?;
        let cluster_text = file.initial_cluster.ok_or(ConfigError::Missing {
            name: "initial_cluster",
            flag: "initial-cluster",
        })?;
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
        let erasure = file.erasure.unwrap_or_else(|| "4+2".into());
        let code: Code =
            erasure
                .parse()
                .map_err(|e: crate::erasure::ErasureError| ConfigError::Erasure {
                    value: erasure.clone(),
                    reason: e.to_string(),
                })?;
        check_code_fits(code, &initial_cluster)?;
        Ok(Self {
            node_id,
            region,
            listen,
            data_dir,
            initial_cluster,
            code,
            down_after: file.down_after.unwrap_or(Duration::from_secs(600)),
            metrics_listen: file.metrics_listen,
            raft: file.raft,
            gateway: file.gateway,
            repair: file.repair,
            scrub: file.scrub,
        })
    }

    pub fn meta_config(&self) -> MetaConfig {
        MetaConfig {
            heartbeat_ms: self.raft.heartbeat.as_millis() as u64,
            election_min_ms: self.raft.election_min.as_millis() as u64,
            election_max_ms: self.raft.election_max.as_millis() as u64,
            snapshot_every_logs: self.raft.snapshot_every_logs,
            rpc_timeout_ms: self.gateway.rpc_timeout.as_millis() as u64,
        }
    }

    pub fn gateway_config(&self) -> GatewayConfig {
        GatewayConfig {
            code: self.code,
            rpc_timeout: self.gateway.rpc_timeout,
            packs_in_flight_max: self.gateway.packs_in_flight_max,
            repair: crate::repair::RepairConfig {
                interval: self.repair.interval,
                rate_bytes_per_s: self.repair.rate_bytes_per_s,
            },
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
        return Err(ConfigError::Missing {
            name: "initial_cluster",
            flag: "initial-cluster",
        });
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
}
