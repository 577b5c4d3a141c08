//! Connections from this node to the other nodes, and what we last saw of them.
//!
//! Owns one lazily connected gRPC channel per peer address and a small
//! liveness record per node (last success, last failure). It decides nothing
//! about data; the gateway asks it "is this node worth trying now?".

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto::SHARD_MESSAGE_BYTES;
use cairn_proto::transport::DialTls;
use cairn_proto::v1::shards_client::ShardsClient;
use tonic::Request;
use tonic::transport::Channel;

use crate::meta::types::NodeId;

pub use cairn_proto::transport::{NODE_ID_HEADER, lazy_channel};

/// Wraps a message with the target node id header and a deadline.
pub fn addressed<T>(node: NodeId, message: T, timeout: Duration) -> Request<T> {
    cairn_proto::transport::addressed(node, message, timeout)
}

#[derive(Debug, Clone, Copy, Default)]
struct Liveness {
    last_ok: Option<Instant>,
    last_failure: Option<Instant>,
}

/// Channels to peers and their liveness.
pub struct Peers {
    connect_timeout: Duration,
    /// How long a failed node is skipped before it is tried again.
    retry_after: Duration,
    /// How to prove ourselves and check the peer; `None` is `--insecure`.
    tls: Option<DialTls>,
    /// Keyed by node id and address: over TLS a channel only ever talks to
    /// the node whose certificate it checked.
    channels: Mutex<HashMap<(NodeId, String), Channel>>,
    liveness: Mutex<HashMap<NodeId, Liveness>>,
}

impl Peers {
    pub fn new(connect_timeout: Duration, retry_after: Duration) -> Self {
        Self {
            connect_timeout,
            retry_after,
            tls: None,
            channels: Mutex::new(HashMap::new()),
            liveness: Mutex::new(HashMap::new()),
        }
    }

    /// Dial peers over mutual TLS with this node's identity.
    pub fn with_tls(mut self, tls: Option<DialTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The channel to node `node` at `addr` (reused across calls); over TLS
    /// the server must prove it is that node.
    pub fn channel(&self, node: NodeId, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (node, addr.to_string());
        if let Some(channel) = channels.get(&key) {
            return Ok(channel.clone());
        }
        let tls = self.tls.as_ref().map(|tls| tls.for_node(node));
        let channel = lazy_channel(addr, self.connect_timeout, tls.as_ref())?;
        channels.insert(key, channel.clone());
        Ok(channel)
    }

    /// The shard client for node `node` at `addr`.
    pub fn shards(
        &self,
        node: NodeId,
        addr: &str,
    ) -> Result<ShardsClient<Channel>, tonic::transport::Error> {
        let channel = self.channel(node, addr)?;
        Ok(ShardsClient::new(channel)
            .max_decoding_message_size(SHARD_MESSAGE_BYTES)
            .max_encoding_message_size(SHARD_MESSAGE_BYTES))
    }

    pub fn record_ok(&self, node: NodeId) {
        let mut map = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(node).or_default().last_ok = Some(Instant::now());
    }

    pub fn record_failure(&self, node: NodeId) {
        let mut map = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(node).or_default().last_failure = Some(Instant::now());
    }

    /// A node is presumed up unless its last call failed and it has not
    /// answered since. The liveness prober calls every node regularly, so
    /// a node that returns is seen within a probe interval; `retry_after`
    /// only bounds how long a node nobody probes stays shunned.
    pub fn presumed_up(&self, node: NodeId) -> bool {
        let map = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&node) {
            Some(Liveness {
                last_failure: Some(failed),
                last_ok,
            }) => last_ok.is_some_and(|ok| ok > *failed) || failed.elapsed() >= self.retry_after,
            _ => true,
        }
    }
}
