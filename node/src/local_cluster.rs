//! A whole cluster inside one process, on loopback: real gRPC, real sled,
//! real files. Used by `cairn demo`, `cairn bench` and the cluster tests;
//! every node can be stopped and restarted on its address to inject faults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_proto::v1::cairn_client::CairnClient;
use cairn_proto::v1::{ClusterStatusReply, ClusterStatusRequest};
use tokio::net::TcpListener;

use crate::ca::{self, NodeCertSpec, Pems};
use crate::config::{
    GatewaySection, NodeConfig, NodeFile, RaftSection, TlsSection, format_initial_cluster,
};
use crate::meta::types::{NodeId, NodeInfo};
use crate::peers::lazy_channel;
use crate::server::{NodeHandle, ServerError};

/// Why a local cluster could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    #[error("cannot bind a loopback port: {0}")]
    Bind(std::io::Error),
    #[error("node configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("node {node_id}: {source}")]
    Node {
        node_id: NodeId,
        source: ServerError,
    },
    #[error("cluster certificates: {0}")]
    Ca(#[from] ca::CaError),
    #[error("cannot write the cluster's TLS files: {0}")]
    Files(std::io::Error),
    #[error("no such node {0}")]
    UnknownNode(NodeId),
    #[error("cluster not ready after {waited:?}: {last}")]
    NotReady { waited: Duration, last: String },
}

/// A cluster of in-process nodes.
pub struct LocalCluster {
    base_dir: PathBuf,
    members: BTreeMap<NodeId, NodeInfo>,
    configs: BTreeMap<NodeId, NodeConfig>,
    running: BTreeMap<NodeId, NodeHandle>,
    /// The settings every node started with (after `tune`), without the
    /// per-node keys: what an extra node is configured from.
    template: NodeFile,
    /// The CA and admin token of a TLS cluster; `None` when insecure.
    secure: Option<Secure>,
}

/// What a TLS cluster made for itself in its base directory.
struct Secure {
    ca: Pems,
    dir: PathBuf,
    token: String,
}

/// Header carrying a client's bearer token.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// A fresh random token in the form clients and nodes use: `cairn_<64 hex>`.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("cairn_{}", hex::encode(bytes))
}

impl Secure {
    /// A CA and a bootstrap token under `base_dir/tls`.
    fn create(base_dir: &Path) -> Result<Self, LocalClusterError> {
        let dir = base_dir.join("tls");
        let ca = ca::init_dir(&dir, 30)?;
        let token = new_token();
        write_private(&dir.join("bootstrap-token"), &token)?;
        Ok(Self { ca, dir, token })
    }

    /// Issues node `id`'s certificate (loopback names) and points `file` at it.
    fn node_files(
        &self,
        id: NodeId,
        region: &str,
        file: &mut NodeFile,
    ) -> Result<(), LocalClusterError> {
        let cert_path = self.dir.join(ca::node_cert_file(id));
        if !cert_path.exists() {
            ca::issue_dir(
                &self.dir,
                &NodeCertSpec::new(id, region, &["127.0.0.1", "localhost"]),
                &self.dir,
            )?;
        }
        file.tls = TlsSection {
            ca: Some(self.dir.join(ca::CA_CERT_FILE)),
            cert: Some(cert_path),
            key: Some(self.dir.join(ca::node_key_file(id))),
        };
        file.bootstrap_token_file = Some(self.dir.join("bootstrap-token"));
        file.insecure = false;
        Ok(())
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), LocalClusterError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(LocalClusterError::Files)?;
    file.write_all(text.as_bytes())
        .map_err(LocalClusterError::Files)
}

/// After `tune`: a node tuned to `insecure` drops the TLS files.
fn settle_security(file: &mut NodeFile) {
    if file.insecure {
        file.tls = TlsSection::default();
    }
}

impl LocalCluster {
    /// Starts `nodes_per_region[i]` nodes in region `r{i+1}`, ids 1.., data
    /// under `base_dir/node-ID`. `erasure` is like "4+2". The cluster runs
    /// `--insecure` (plaintext, no tokens); [`LocalCluster::start_secure`]
    /// starts one with mutual TLS and a bootstrap token.
    pub async fn start(
        base_dir: &Path,
        nodes_per_region: &[usize],
        erasure: &str,
    ) -> Result<Self, LocalClusterError> {
        Self::start_tuned(base_dir, nodes_per_region, erasure, |_| {}).await
    }

    /// Like [`LocalCluster::start`], with `tune` adjusting every node's
    /// settings (timings of failure detection, repair and scrub in tests).
    pub async fn start_tuned(
        base_dir: &Path,
        nodes_per_region: &[usize],
        erasure: &str,
        tune: impl Fn(&mut NodeFile),
    ) -> Result<Self, LocalClusterError> {
        Self::start_with(base_dir, nodes_per_region, erasure, false, tune).await
    }

    /// A cluster with mutual TLS between nodes: a CA, node certificates and
    /// a bootstrap token are made under `base_dir/tls` (see
    /// [`LocalCluster::ca_pem`], [`LocalCluster::admin_token`]). `tune` may
    /// still set `file.insecure = true` to opt out.
    pub async fn start_secure(
        base_dir: &Path,
        nodes_per_region: &[usize],
        erasure: &str,
        tune: impl Fn(&mut NodeFile),
    ) -> Result<Self, LocalClusterError> {
        Self::start_with(base_dir, nodes_per_region, erasure, true, tune).await
    }

    async fn start_with(
        base_dir: &Path,
        nodes_per_region: &[usize],
        erasure: &str,
        secure: bool,
        tune: impl Fn(&mut NodeFile),
    ) -> Result<Self, LocalClusterError> {
        let secure = if secure {
            Some(Secure::create(base_dir)?)
        } else {
            None
        };
        let mut listeners = BTreeMap::new();
        let mut members = BTreeMap::new();
        let mut id: NodeId = 0;
        for (region_index, &count) in nodes_per_region.iter().enumerate() {
            for _ in 0..count {
                id += 1;
                let listener = TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(LocalClusterError::Bind)?;
                let addr = listener.local_addr().map_err(LocalClusterError::Bind)?;
                members.insert(
                    id,
                    NodeInfo {
                        region: format!("r{}", region_index + 1),
                        addr: addr.to_string(),
                    },
                );
                listeners.insert(id, listener);
            }
        }
        let initial = format_initial_cluster(&members);
        let base = NodeFile {
            erasure: Some(erasure.to_string()),
            // Loopback: a peer that does not answer within 5 s is gone.
            raft: RaftSection {
                rpc_timeout: Duration::from_secs(5),
                ..RaftSection::default()
            },
            gateway: GatewaySection {
                rpc_timeout: Duration::from_secs(5),
                ..GatewaySection::default()
            },
            insecure: secure.is_none(),
            ..NodeFile::default()
        };
        let mut configs = BTreeMap::new();
        for (id, info) in &members {
            let mut file = node_file(&base, base_dir, *id, info, &initial);
            if let Some(secure) = &secure {
                secure.node_files(*id, &info.region, &mut file)?;
            }
            tune(&mut file);
            settle_security(&mut file);
            configs.insert(*id, NodeConfig::from_file(file)?);
        }
        // What `tune` does to every node (it may single out nodes by id).
        let mut template = base;
        tune(&mut template);
        // An opt-out through `tune` makes the whole cluster insecure.
        let mut secure = secure.filter(|_| !template.insecure);
        // A test that brings its own bootstrap token: the harness uses it too.
        if let (Some(secure), Some(path)) = (&mut secure, &template.bootstrap_token_file)
            && let Ok(token) = std::fs::read_to_string(path)
        {
            secure.token = token.trim().to_string();
        }
        let mut cluster = Self {
            base_dir: base_dir.to_path_buf(),
            members,
            configs,
            running: BTreeMap::new(),
            template,
            secure,
        };
        for (id, listener) in listeners {
            cluster.spawn(id, listener)?;
        }
        Ok(cluster)
    }

    /// Starts one more node in `region`, with the next free id, configured
    /// like the others. The running nodes do not list it in their initial
    /// cluster; its own lists them and itself (as an operator starts a new
    /// node), so it starts with an empty store, finds the cluster through
    /// admission and asks to join as a learner. `cairn cluster add-node`
    /// (the `AddNode` RPC) adds it too; both are idempotent.
    pub async fn start_extra_node(&mut self, region: &str) -> Result<NodeId, LocalClusterError> {
        let id = self.members.keys().last().copied().unwrap_or(0) + 1;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(LocalClusterError::Bind)?;
        let addr = listener.local_addr().map_err(LocalClusterError::Bind)?;
        let info = NodeInfo {
            region: region.to_string(),
            addr: addr.to_string(),
        };
        let mut known = self.members.clone();
        known.insert(id, info.clone());
        let mut file = node_file(
            &self.template,
            &self.base_dir,
            id,
            &info,
            &format_initial_cluster(&known),
        );
        if let Some(secure) = &self.secure {
            secure.node_files(id, region, &mut file)?;
        }
        settle_security(&mut file);
        self.configs.insert(id, NodeConfig::from_file(file)?);
        self.members.insert(id, info);
        self.spawn(id, listener)?;
        Ok(id)
    }

    fn spawn(&mut self, id: NodeId, listener: TcpListener) -> Result<(), LocalClusterError> {
        let config = self
            .configs
            .get(&id)
            .cloned()
            .ok_or(LocalClusterError::UnknownNode(id))?;
        let handle = NodeHandle::spawn(config, listener).map_err(LocalClusterError::Bind)?;
        self.running.insert(id, handle);
        Ok(())
    }

    /// The cluster CA (PEM) node certificates chain to; `None` when insecure.
    pub fn ca_pem(&self) -> Option<&str> {
        self.secure.as_ref().map(|s| s.ca.cert_pem.as_str())
    }

    /// The cluster CA's file (for `--ca-file` / `CAIRN_CA`); `None` when insecure.
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.secure.as_ref().map(|s| s.dir.join(ca::CA_CERT_FILE))
    }

    /// The directory holding the CA, node certificates and bootstrap token.
    pub fn tls_dir(&self) -> Option<&Path> {
        self.secure.as_ref().map(|s| s.dir.as_path())
    }

    /// The bootstrap `cluster-admin` token ("" when insecure: none is needed).
    pub fn admin_token(&self) -> &str {
        self.secure.as_ref().map_or("", |s| s.token.as_str())
    }

    /// Whether the cluster runs with TLS.
    pub fn is_secure(&self) -> bool {
        self.secure.is_some()
    }

    /// Where data lives.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Data directory of one node.
    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.base_dir.join(format!("node-{id}"))
    }

    /// Every node with its region and address.
    pub fn members(&self) -> &BTreeMap<NodeId, NodeInfo> {
        &self.members
    }

    /// Addresses of every node, running or not.
    pub fn addrs(&self) -> Vec<String> {
        self.members.values().map(|m| m.addr.clone()).collect()
    }

    /// Node ids of a region.
    pub fn region_nodes(&self, region: &str) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| m.region == region)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The metadata handle of running node `id` (its local state: pack
    /// records, classes), for tests that check placements from the index.
    pub fn meta(&self, id: NodeId) -> Option<crate::meta::Meta> {
        self.running.get(&id).and_then(NodeHandle::meta)
    }

    pub fn is_running(&self, id: NodeId) -> bool {
        self.running.contains_key(&id)
    }

    /// Stops a node (its port closes, its files are released).
    pub async fn stop_node(&mut self, id: NodeId) -> Result<(), LocalClusterError> {
        if let Some(handle) = self.running.remove(&id) {
            handle
                .stop()
                .await
                .map_err(|source| LocalClusterError::Node {
                    node_id: id,
                    source,
                })?;
        }
        Ok(())
    }

    /// Deletes a stopped node's data directory (a disk replaced).
    pub fn wipe_node(&self, id: NodeId) -> std::io::Result<()> {
        if self.running.contains_key(&id) {
            return Err(std::io::Error::other("stop the node before wiping it"));
        }
        match std::fs::remove_dir_all(self.data_dir(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Stops every node of a region.
    pub async fn stop_region(&mut self, region: &str) -> Result<(), LocalClusterError> {
        for id in self.region_nodes(region) {
            self.stop_node(id).await?;
        }
        Ok(())
    }

    /// Restarts a stopped node on its old address with its data directory.
    pub async fn start_node(&mut self, id: NodeId) -> Result<(), LocalClusterError> {
        if self.running.contains_key(&id) {
            return Ok(());
        }
        let addr: SocketAddr = self
            .members
            .get(&id)
            .ok_or(LocalClusterError::UnknownNode(id))?
            .addr
            .parse()
            .map_err(|_| LocalClusterError::UnknownNode(id))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(node_id = id, error = %e, "port still busy, retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(LocalClusterError::Bind(e)),
            }
        };
        self.spawn(id, listener)
    }

    /// Restarts every node of a region.
    pub async fn start_region(&mut self, region: &str) -> Result<(), LocalClusterError> {
        for id in self.region_nodes(region) {
            self.start_node(id).await?;
        }
        Ok(())
    }

    /// Asks any running node for the cluster status.
    pub async fn status(&self) -> Result<ClusterStatusReply, String> {
        let mut last = String::from("no node running");
        for id in self.running.keys() {
            let addr = &self.members[id].addr;
            let tls = self
                .secure
                .as_ref()
                .map(|s| cairn_proto::transport::DialTls::new(&s.ca.cert_pem));
            let channel = lazy_channel(addr, Duration::from_secs(1), tls.as_ref())
                .map_err(|e| e.to_string())?;
            let mut client = CairnClient::new(channel);
            let mut request = tonic::Request::new(ClusterStatusRequest {});
            request.set_timeout(Duration::from_secs(5));
            if let Some(secure) = &self.secure
                && let Ok(value) = format!("Bearer {}", secure.token).parse()
            {
                request.metadata_mut().insert(AUTHORIZATION_HEADER, value);
            }
            match client.cluster_status(request).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status) => last = format!("node {id}: {}", status.message()),
            }
        }
        Err(last)
    }

    /// Waits until the running nodes have a leader and every member has
    /// joined the metadata group.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), LocalClusterError> {
        let started = Instant::now();
        let mut last;
        loop {
            match self.status().await {
                Ok(status)
                    if status.has_leader
                        && status.nodes.len() == self.members.len()
                        && self
                            .running
                            .keys()
                            .all(|id| status.nodes.iter().any(|n| n.node_id == *id && n.up)) =>
                {
                    return Ok(());
                }
                Ok(status) => {
                    last = format!(
                        "leader: {}, members: {}/{}",
                        status.has_leader,
                        status.nodes.len(),
                        self.members.len()
                    )
                }
                Err(e) => last = e,
            }
            if started.elapsed() > timeout {
                return Err(LocalClusterError::NotReady {
                    waited: timeout,
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every node.
    pub async fn shutdown(mut self) -> Result<(), LocalClusterError> {
        let ids: Vec<NodeId> = self.running.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await?;
        }
        Ok(())
    }
}

/// The settings of node `id`: the shared `template` with its own keys.
fn node_file(
    template: &NodeFile,
    base_dir: &Path,
    id: NodeId,
    info: &NodeInfo,
    initial_cluster: &str,
) -> NodeFile {
    NodeFile {
        node_id: Some(id),
        region: Some(info.region.clone()),
        listen: info.addr.parse().ok(),
        data_dir: Some(base_dir.join(format!("node-{id}"))),
        initial_cluster: Some(initial_cluster.to_string()),
        ..template.clone()
    }
}

/// Polls `condition` until it yields a value or `timeout` passes, then
/// panics naming `what` and the last reason the condition gave. The one way
/// tests wait: on a condition, with a deadline and a reason, never a bare
/// sleep. `condition` returns `Ok(value)` when satisfied, `Err(reason)` while not.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    let mut pause = Duration::from_millis(20);
    loop {
        let reason = match condition().await {
            Ok(value) => return value,
            Err(reason) => reason,
        };
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}: {reason}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}
