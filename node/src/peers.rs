//! Connections from this node to the other nodes, and what we last saw of them.
//!
//! Owns one lazily connected gRPC channel per peer address and a small
//! liveness record per node (last success, last failure). It decides nothing
//! about data; the gateway asks it "is this node worth trying now?".

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cairn_proto::SHARD_MESSAGE_BYTES;
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
    channels: Mutex<HashMap<String, Channel>>,
    liveness: Mutex<HashMap<NodeId, Liveness>>,
}

impl Peers {
    pub fn new(connect_timeout: Duration, retry_after: Duration) -> Self {
        Self {
            connect_timeout,
            retry_after,
            channels: Mutex::new(HashMap::new()),
            liveness: Mutex::new(HashMap::new()),
        }
    }

    /// The shard client for a peer address (channel reused across calls).
    pub fn shards(&self, addr: &str) -> Result<ShardsClient<Channel>, tonic::transport::Error> {
        let channel = {
            let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            match channels.get(addr) {
                Some(channel) => channel.clone(),
                None => {
                    let channel = lazy_channel(addr, self.connect_timeout, None)?;
                    channels.insert(addr.to_string(), channel.clone());
                    channel
                }
            }
        };
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
