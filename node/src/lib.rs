//! Cairn storage node.
//!
//! A node plays three roles at once: member of the Raft metadata group
//! (`meta`), holder of erasure-coded shards (`shard_store`), and gateway for
//! clients (`gateway`), which encodes packs (`erasure`) and decides where their
//! shards go (`placement`). Nodes only ever see ciphertext.

pub mod auth;
pub mod ca;
pub mod config;
pub mod erasure;
pub mod gateway;
pub mod gc;
pub mod kv;
pub mod lifecycle;
pub mod limits;
pub mod liveness;
pub mod local_cluster;
pub mod malloc;
pub mod meta;
pub mod metrics;
pub mod model;
pub mod peers;
pub mod placement;
pub mod repair;
pub mod rpc_metrics;
pub mod scrub;
pub mod server;
pub mod shard_io;
pub mod shard_store;
pub mod tiering;
pub mod tls;
