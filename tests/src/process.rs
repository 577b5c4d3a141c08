//! Real `cairn-node` processes for the tests that kill nodes with SIGKILL.
//!
//! Ports are found by binding `127.0.0.1:0` and releasing the port just
//! before the node binds it (every node must know every address up front,
//! as `--initial-cluster` requires).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_node::local_cluster::wait_until;

/// The `cairn-node` binary next to this test's build.
pub fn node_binary() -> PathBuf {
    workspace_binary("cairn-node", "cairn-node")
}

/// The `cairn` command line next to this test's build.
pub fn cli_binary() -> PathBuf {
    workspace_binary("cairn-cli", "cairn")
}

/// A binary of this workspace next to the test's build. `cargo test
/// --workspace` builds them all; when this crate's tests run alone (`cargo
/// test -p cairn-tests`), a missing one is built here, once, with the same
/// profile.
fn workspace_binary(package: &str, name: &str) -> PathBuf {
    use std::sync::{Mutex, OnceLock};
    static BUILT: OnceLock<Mutex<BTreeMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(bin) = built.get(name) {
        return bin.clone();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = dir.join(name);
    if !bin.exists() {
        let mut build = Command::new(std::env::var("CARGO").unwrap_or("cargo".into()));
        build.args(["build", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|profile| profile == "release") {
            build.arg("--release");
        }
        let status = build
            .status()
            .expect("cargo runs to build a workspace binary");
        assert!(status.success(), "building {name} failed");
    }
    assert!(bin.exists(), "{} is missing after a build", bin.display());
    built.insert(name.to_string(), bin.clone());
    bin
}

/// A port no other test of this process was given, below the kernel's
/// ephemeral range (32768+) so outgoing connections never hold it when a
/// killed node binds it again.
/// A loopback port no other caller of this function in the process got
/// and nothing listens on now.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for _ in 0..10_000 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = 20_000 + ((state >> 33) % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port between 20000 and 32000");
}

/// One node process and how to start it again.
struct NodeProcess {
    region: String,
    addr: String,
    /// Its `--metrics-listen` address (every process node serves /metrics).
    metrics_addr: String,
    child: Option<Child>,
    /// TLS files when they differ from the cluster's own (a stranger's node).
    tls: Option<NodeTlsFiles>,
    /// Its `--initial-cluster` when it is not the cluster's (a newcomer).
    initial: Option<String>,
}

/// The CA, certificate and key a node process starts with.
#[derive(Debug, Clone)]
pub struct NodeTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The TLS material of a process cluster, made with the real `cairn-node ca`.
#[derive(Debug, Clone)]
pub struct ClusterTls {
    /// Holds `ca.pem`, `ca.key`, `node-N.pem`, `node-N.key`, `bootstrap-token`.
    pub dir: PathBuf,
    pub ca_pem: String,
    /// The bootstrap cluster-admin token.
    pub token: String,
}

/// How a process cluster runs.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// Mutual TLS between nodes (certificates from `cairn-node ca`) and a
    /// bootstrap token; `false` runs `--insecure`.
    pub secure: bool,
    pub erasure: String,
    /// More flags every node starts with.
    pub node_args: Vec<String>,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        Self {
            secure: false,
            erasure: "4+2".into(),
            node_args: Vec::new(),
        }
    }
}

/// Runs `cairn-node` with `args` to completion; panics with its stderr on failure.
pub fn run_node_tool(args: &[&str]) -> String {
    let out = Command::new(node_binary())
        .args(args)
        .output()
        .expect("cairn-node runs");
    assert!(
        out.status.success(),
        "cairn-node {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cairn-node ca init --out DIR`; returns the CA PEM.
pub fn ca_init(dir: &Path) -> String {
    run_node_tool(&["ca", "init", "--out", &dir.to_string_lossy()]);
    std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem written")
}

/// `cairn-node ca issue` for node `id` on loopback; returns its files.
pub fn ca_issue(ca_dir: &Path, id: u64, region: &str, out: &Path) -> NodeTlsFiles {
    run_node_tool(&[
        "ca",
        "issue",
        "--ca",
        &ca_dir.to_string_lossy(),
        "--node-id",
        &id.to_string(),
        "--region",
        region,
        "--host",
        "127.0.0.1,localhost",
        "--out",
        &out.to_string_lossy(),
    ]);
    NodeTlsFiles {
        ca: ca_dir.join("ca.pem"),
        cert: out.join(format!("node-{id}.pem")),
        key: out.join(format!("node-{id}.key")),
    }
}

/// A cluster of `cairn-node` processes.
pub struct ProcessCluster {
    dir: PathBuf,
    initial: String,
    nodes: BTreeMap<u64, NodeProcess>,
    options: ProcessOptions,
    tls: Option<ClusterTls>,
}

impl ProcessCluster {
    /// Starts `per_region[i]` nodes in region `r{i+1}`, erasure 4+2,
    /// failure detection after `down_after`, `--insecure`.
    pub fn start(dir: &Path, per_region: &[usize], down_after: &str) -> Self {
        Self::start_with(dir, per_region, down_after, ProcessOptions::default())
    }

    /// Like [`ProcessCluster::start`], with TLS and a bootstrap token.
    pub fn start_secure(dir: &Path, per_region: &[usize], down_after: &str) -> Self {
        Self::start_with(
            dir,
            per_region,
            down_after,
            ProcessOptions {
                secure: true,
                ..ProcessOptions::default()
            },
        )
    }

    pub fn start_with(
        dir: &Path,
        per_region: &[usize],
        down_after: &str,
        options: ProcessOptions,
    ) -> Self {
        let mut nodes = BTreeMap::new();
        let mut id = 0;
        for (r, count) in per_region.iter().enumerate() {
            for _ in 0..*count {
                id += 1;
                nodes.insert(
                    id,
                    NodeProcess {
                        region: format!("r{}", r + 1),
                        addr: format!("127.0.0.1:{}", free_port()),
                        metrics_addr: format!("127.0.0.1:{}", free_port()),
                        child: None,
                        tls: None,
                        initial: None,
                    },
                );
            }
        }
        let initial = nodes
            .iter()
            .map(|(id, n)| format!("{id}={}@{}", n.region, n.addr))
            .collect::<Vec<_>>()
            .join(",");
        let tls = options.secure.then(|| {
            let tls_dir = dir.join("tls");
            let ca_pem = ca_init(&tls_dir);
            for (id, node) in &nodes {
                ca_issue(&tls_dir, *id, &node.region, &tls_dir);
            }
            let token = cairn_node::local_cluster::new_token();
            std::fs::write(tls_dir.join("bootstrap-token"), &token).expect("token file");
            ClusterTls {
                dir: tls_dir,
                ca_pem,
                token,
            }
        });
        let mut cluster = Self {
            dir: dir.to_path_buf(),
            initial,
            nodes,
            options,
            tls,
        };
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in ids {
            cluster.start_node(id, down_after);
        }
        cluster
    }

    /// The cluster's TLS material; `None` for an `--insecure` cluster.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref()
    }

    /// The files node `id` of this cluster starts with.
    pub fn node_tls_files(&self, id: u64) -> Option<NodeTlsFiles> {
        let tls = self.tls.as_ref()?;
        Some(NodeTlsFiles {
            ca: tls.dir.join("ca.pem"),
            cert: tls.dir.join(format!("node-{id}.pem")),
            key: tls.dir.join(format!("node-{id}.key")),
        })
    }

    /// Starts one more node in `region` with the next id and `tls` as its
    /// files (the cluster's own certificate for it when `None`); the
    /// running nodes do not list it, it lists them and itself, as an
    /// operator starts a newcomer. Returns its id.
    pub fn start_newcomer(
        &mut self,
        region: &str,
        down_after: &str,
        tls: Option<NodeTlsFiles>,
    ) -> u64 {
        let id = self.nodes.keys().last().copied().unwrap_or(0) + 1;
        let addr = format!("127.0.0.1:{}", free_port());
        let initial = format!("{},{id}={region}@{addr}", self.initial);
        let tls = tls.or_else(|| {
            let cluster = self.tls.as_ref()?;
            Some(ca_issue(&cluster.dir, id, region, &cluster.dir))
        });
        self.nodes.insert(
            id,
            NodeProcess {
                region: region.to_string(),
                addr,
                metrics_addr: format!("127.0.0.1:{}", free_port()),
                child: None,
                tls,
                initial: Some(initial),
            },
        );
        self.start_node(id, down_after);
        id
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.addr.clone()).collect()
    }

    pub fn addr(&self, id: u64) -> &str {
        &self.nodes[&id].addr
    }

    /// Where node `id` serves `GET /metrics`.
    pub fn metrics_addr(&self, id: u64) -> &str {
        &self.nodes[&id].metrics_addr
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// (Re)starts a node with its data directory.
    pub fn start_node(&mut self, id: u64, down_after: &str) {
        let own_tls = self.node_tls_files(id);
        let token_file = self.tls.as_ref().map(|t| t.dir.join("bootstrap-token"));
        let node = self.nodes.get_mut(&id).expect("known node");
        let data = self.dir.join(format!("node-{id}"));
        std::fs::create_dir_all(&data).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.log")))
            .expect("log file");
        let mut command = Command::new(node_binary());
        let initial = node.initial.as_deref().unwrap_or(&self.initial);
        command
            .args(["--node-id", &id.to_string(), "--region", &node.region])
            .args(["--listen", &node.addr, "--initial-cluster", initial])
            .args(["--metrics-listen", &node.metrics_addr])
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--erasure",
                &self.options.erasure,
                "--down-after",
                down_after,
            ])
            .args(&self.options.node_args);
        match node.tls.clone().or(own_tls) {
            Some(files) => {
                command
                    .arg("--tls-ca")
                    .arg(files.ca)
                    .arg("--tls-cert")
                    .arg(files.cert)
                    .arg("--tls-key")
                    .arg(files.key);
                if let Some(token_file) = token_file {
                    command.arg("--bootstrap-token-file").arg(token_file);
                }
            }
            None => {
                command.arg("--insecure");
            }
        }
        let child = command
            .env("RUST_LOG", "info,openraft=warn")
            // The test's own RUST_BACKTRACE would bury a node's one-line error.
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cairn-node starts");
        node.child = Some(child);
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The operating-system process id of a running node.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(Child::id)
    }

    /// Deletes a killed node's data directory (its disk was replaced).
    pub fn wipe(&self, id: u64) {
        let data = self.dir.join(format!("node-{id}"));
        if data.exists() {
            std::fs::remove_dir_all(&data).expect("wipe data dir");
        }
    }

    /// Waits for a node process to exit on its own and returns its exit
    /// status; panics with the node's log tail if it still runs after `timeout`.
    pub async fn must_exit(&mut self, id: u64, timeout: Duration) -> std::process::ExitStatus {
        wait_until(&format!("node {id} to exit"), timeout, || {
            let node = self.nodes.get_mut(&id).expect("known node");
            let outcome = match node.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => {
                    node.child = None;
                    Ok(status)
                }
                Some(Ok(None)) => Err(format!("still running; log:\n{}", self.log_tail(id))),
                Some(Err(e)) => Err(format!("cannot tell whether it exited: {e}")),
                None => Err("no process was started".to_string()),
            };
            std::future::ready(outcome)
        })
        .await
    }

    /// The tail of a node's log, for failure messages.
    pub fn log_tail(&self, id: u64) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("node-{id}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until some node reports a leader and all running nodes up, and
    /// returns that node's status; panics with node 1's log tail after `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> cairn_proto::v1::ClusterStatusReply {
        let running: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.child.is_some())
            .map(|(id, _)| *id)
            .collect();
        wait_until("the process cluster to be ready", timeout, || async {
            let mut seen = Vec::new();
            for id in &running {
                match status_with(self.addr(*id), self.tls.as_ref()).await {
                    Ok(s) => {
                        let not_up: Vec<u64> = running
                            .iter()
                            .copied()
                            .filter(|r| !s.nodes.iter().any(|m| m.node_id == *r && m.up))
                            .collect();
                        if s.has_leader && not_up.is_empty() {
                            return Ok(s);
                        }
                        seen.push(format!(
                            "node {id}: leader {}, not up {not_up:?}",
                            s.has_leader
                        ));
                    }
                    Err(e) => seen.push(format!("node {id}: {e}")),
                }
            }
            Err(format!("{}\n{}", seen.join("; "), self.log_tail(1)))
        })
        .await
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// One ClusterStatus call (plaintext: an `--insecure` cluster).
pub async fn status(addr: &str) -> Result<cairn_proto::v1::ClusterStatusReply, String> {
    status_with(addr, None).await
}

/// A raw channel to a node: plaintext when `tls` is `None`, otherwise TLS
/// trusting the CA in `tls`, which also says what certificate (if any) this
/// side presents and which node the server must prove to be.
pub fn raw_channel(
    addr: &str,
    tls: Option<&cairn_proto::transport::DialTls>,
) -> tonic::transport::Channel {
    cairn_proto::transport::lazy_channel(addr, Duration::from_secs(2), tls)
        .expect("a valid loopback address")
}

/// TLS as a client (no certificate) trusting `ca_pem`.
pub fn client_tls(ca_pem: &str) -> cairn_proto::transport::DialTls {
    cairn_proto::transport::DialTls::new(ca_pem)
}

/// Mutual TLS as the node whose files are `files`, expecting node `server` on the other side.
pub fn node_tls(files: &NodeTlsFiles, server: u64) -> cairn_proto::transport::DialTls {
    let read = |p: &Path| std::fs::read(p).expect("TLS file");
    cairn_proto::transport::DialTls::new(read(&files.ca))
        .with_identity(read(&files.cert), read(&files.key))
        .for_node(server)
}

/// Adds `authorization: Bearer <token>`.
pub fn with_token<T>(mut request: tonic::Request<T>, token: &str) -> tonic::Request<T> {
    if let Ok(value) = format!("Bearer {token}").parse() {
        request
            .metadata_mut()
            .insert(cairn_node::local_cluster::AUTHORIZATION_HEADER, value);
    }
    request
}

/// One ClusterStatus call, over TLS with the bootstrap token when `tls` is given.
pub async fn status_with(
    addr: &str,
    tls: Option<&ClusterTls>,
) -> Result<cairn_proto::v1::ClusterStatusReply, String> {
    let dial = tls.map(|t| client_tls(&t.ca_pem));
    let channel = cairn_proto::transport::lazy_channel(addr, Duration::from_secs(1), dial.as_ref())
        .map_err(|e| e.to_string())?;
    let mut client = cairn_proto::v1::cairn_client::CairnClient::new(channel);
    let mut request = tonic::Request::new(cairn_proto::v1::ClusterStatusRequest {});
    request.set_timeout(Duration::from_secs(3));
    if let Some(tls) = tls {
        request = with_token(request, &tls.token);
    }
    client
        .cluster_status(request)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| s.message().to_string())
}
