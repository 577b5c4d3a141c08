//! Cairn's wire protocol: generated gRPC clients, servers and messages.
//!
//! The `.proto` source in `proto/cairn.proto` is the contract; this crate only
//! compiles it, plus the transport policy both sides share (`transport`). Versioning: the package is `cairn.v1`; a breaking change adds
//! `cairn.v2` beside it.

/// Messages and services of `cairn.v1`.
#[allow(clippy::all, missing_docs)] // generated code
pub mod v1 {
    tonic::include_proto!("cairn.v1");
}

/// Largest gRPC message a Cairn endpoint accepts: a full pack (16 MiB) plus framing.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

pub mod audit;
pub mod transport;
