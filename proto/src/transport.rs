//! The transport policy every Cairn endpoint shares: how channels are built
//! (timeouts, HTTP/2 windows, keep-alive) and how a request names the node
//! it is meant for. Clients and nodes both dial through here, so a partition
//! is noticed equally fast on every path.

use std::time::Duration;

use tonic::Request;
use tonic::transport::{Channel, Endpoint};

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

/// Builds a channel with Cairn's transport settings. It connects on first use.
pub fn lazy_channel(
    addr: &str,
    connect_timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let uri = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(uri)?
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
