//! The transport policy every Cairn endpoint shares: how channels are built
//! (timeouts, HTTP/2 windows, keep-alive) and how a request names the node
//! it is meant for. Clients and nodes both dial through here, so a partition
//! is noticed equally fast on every path.

use std::time::Duration;

use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Metadata key naming the node a request is meant for; servers refuse a
/// mismatch so a reused address can never answer for another node.
pub const NODE_ID_HEADER: &str = "x-cairn-node-id";

/// HTTP/2 stream window, sized for whole shards and packs in flight.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// HTTP/2 connection window (several streams of the above).
pub const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// Interval of HTTP/2 keep-alive pings; a silently dead connection (a
/// partition drops packets) is found in seconds, not at the next deadline.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// How long a keep-alive ping may go unanswered before the connection is dropped.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The DNS name a node certificate carries for node `id`. A node dialing node
/// `id` expects this name in the server's certificate, and a server checks it
/// in a peer's client certificate, so a node id is proven, never just claimed.
pub fn node_server_name(id: u64) -> String {
    format!("node-{id}.cairn")
}

/// How to speak TLS to Cairn nodes: the cluster CA that their certificates
/// must chain to, this side's own certificate when it is a node (mutual TLS),
/// and the name expected in the server's certificate.
#[derive(Clone, Debug)]
pub struct DialTls {
    ca: Certificate,
    identity: Option<Identity>,
    server_name: Option<String>,
}

impl DialTls {
    /// Trust node certificates signed by this CA (PEM); the server is checked
    /// against the host of the address dialed.
    pub fn new(ca_pem: impl AsRef<[u8]>) -> Self {
        Self {
            ca: Certificate::from_pem(ca_pem),
            identity: None,
            server_name: None,
        }
    }

    /// Present this certificate and key (PEM) to the server: node to node.
    pub fn with_identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.identity = Some(Identity::from_pem(cert_pem, key_pem));
        self
    }

    /// Expect node `id`'s certificate ([`node_server_name`]) instead of the
    /// address's host: whoever answers at a reused address must be that node.
    pub fn for_node(&self, id: u64) -> Self {
        let mut tls = self.clone();
        tls.server_name = Some(node_server_name(id));
        tls
    }

    fn client_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(self.ca.clone());
        if let Some(identity) = &self.identity {
            config = config.identity(identity.clone());
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

/// Builds a channel with Cairn's transport settings; TLS when `tls` is given
/// (then `addr` is dialed as `https://`). It connects on first use.
pub fn lazy_channel(
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&DialTls>,
) -> Result<Channel, tonic::transport::Error> {
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{bare}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client_config())?;
    }
    Ok(endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// Wraps a message with a deadline and the id of the node it is meant for.
pub fn addressed<T>(node: u64, message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    if let Ok(value) = node.to_string().parse() {
        request.metadata_mut().insert(NODE_ID_HEADER, value);
    }
    request
}
