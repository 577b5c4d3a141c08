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

/// Ceiling of any gRPC message between Cairn endpoints. Servers apply the
/// tighter per-method limits below (see the node's `limits` module); this is
/// what a client that does not know the method may send or receive.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Largest pack the SDK builds: it closes a pack once it holds 16 MiB, so a
/// pack is under 16 MiB of blobs, plus one last blob (a tree of up to 32 MiB,
/// sealed), plus its trailer ([`BLOBS_PER_PACK_MAX`] entries of 45 bytes).
pub const PACK_BYTES_MAX: usize = 50 * MIB;

/// Most blobs one pack may list. The blob index of a pack travels in one
/// Raft entry (about 80 bytes a blob), which must stay under
/// [`RAFT_ENTRY_BYTES_MAX`]; the SDK closes a pack at this count.
pub const BLOBS_PER_PACK_MAX: usize = 32 * 1024;

/// Largest `PutPack` request: a full pack and its blob list (at most
/// [`BLOBS_PER_PACK_MAX`] entries of about 50 bytes).
pub const PUT_PACK_MESSAGE_BYTES: usize = PACK_BYTES_MAX + 2 * MIB;

/// Largest `PutShard` request or `GetShard` reply: a shard is at most a
/// whole pack (one data shard) plus its header.
pub const SHARD_MESSAGE_BYTES: usize = PACK_BYTES_MAX + 64 * KIB;

/// Most bytes one `ReadPack` may ask for (its ranges lie inside one pack).
pub const READ_PACK_BYTES_MAX: usize = PACK_BYTES_MAX;

/// Largest `ReadPack` reply: the bytes asked for plus a few bytes of framing
/// per range ([`READ_RANGES_MAX`] of them).
pub const READ_PACK_REPLY_BYTES: usize = READ_PACK_BYTES_MAX + MIB;

/// Most ranges one `ReadPack` may ask for.
pub const READ_RANGES_MAX: usize = 64 * 1024;

/// Largest encoded Raft entry a gateway proposes (an `AddPack` of a full pack).
pub const RAFT_ENTRY_BYTES_MAX: usize = 4 * MIB;

/// Entries the Raft leader sends in one `AppendEntries`.
pub const RAFT_ENTRIES_PER_APPEND: u64 = 16;

/// Largest Raft message (`AppendEntries`, an `InstallSnapshot` chunk of 3 MiB):
/// [`RAFT_ENTRIES_PER_APPEND`] entries of at most [`RAFT_ENTRY_BYTES_MAX`].
pub const RAFT_MESSAGE_BYTES: usize = RAFT_ENTRIES_PER_APPEND as usize * RAFT_ENTRY_BYTES_MAX + MIB;

/// Largest request of every other method (ids, names, records, key slots):
/// 100,000 blob ids of 32 bytes fit.
pub const CONTROL_MESSAGE_BYTES: usize = 4 * MIB;

/// Most faults one `ReportFaults` may carry.
pub const FAULTS_PER_REPORT_MAX: usize = 10_000;

/// Largest sealed compression dictionary `PutDictionary` accepts.
pub const DICTIONARY_SEALED_BYTES_MAX: usize = 128 * 1024;

/// Most compression dictionaries a tenant may hold (one per dataset); past
/// it `PutDictionary` stores nothing and clients compress without one. So a
/// `ListDictionaries` reply is at most 32 MiB.
pub const DICTIONARIES_PER_TENANT_MAX: usize = 256;

pub mod audit;
pub mod codec;
pub mod refs;
pub mod transport;
