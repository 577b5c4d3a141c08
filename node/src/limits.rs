//! Bounded requests: every limit of the node's gRPC server, and the server
//! assembled with them.
//!
//! A request is limited before it is decoded into memory:
//! - **per-method message sizes**: tonic checks its limit per service, so
//!   each method with its own size is mounted as its own route (an axum
//!   route per method path, the service's wildcard for the rest);
//! - **a memory budget**: before a message is read past its 5-byte gRPC
//!   length prefix, its bytes are reserved in a pool (pack ingest, shard
//!   traffic, Raft, control calls), waiting a bounded time behind a bounded
//!   queue; a message over its method's limit is refused from the prefix;
//! - **list lengths**: counted on the wire ([`check_lists`]) before prost
//!   turns each 2-byte empty entry into a value ten times its size;
//! - **a deadline on every call**, streams and concurrent calls per
//!   connection, and the size of a request's headers;
//! - **`AppendStream`**, a long-lived call: each message reserved in the
//!   gateway pool from its prefix until it is answered ([`CheckedFrames`]),
//!   and at most [`OPEN_STREAMS_MAX`] calls open per node.
//!
//! An undecodable message is `InvalidArgument` (see `cairn_proto::codec`),
//! an oversized one or an exhausted budget `ResourceExhausted`. Handlers
//! check the caps again on the decoded values (`gateway`, `shard_store`).
//!
//! Not bounded here: the number of connections (each may hold up to
//! [`CONNECTION_WINDOW_BYTES`] unread), postcard's expansion of a Raft
//! payload, which only cluster members may send once TLS is on. (The
//! capacity tonic's decode buffer of an open `AppendStream` call keeps after
//! its largest message is counted: [`CheckedFrames`] keeps that many bytes
//! of the gateway pool reserved until the call ends.)

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use cairn_proto::v1::cairn_server::CairnServer;
use cairn_proto::v1::raft_server::RaftServer;
use cairn_proto::v1::shards_server::ShardsServer;
use cairn_proto::{
    CONTROL_MESSAGE_BYTES, MAX_MESSAGE_BYTES, PUT_PACK_MESSAGE_BYTES, RAFT_ENTRY_BYTES_MAX,
    RAFT_MESSAGE_BYTES, READ_PACK_REPLY_BYTES, SHARD_MESSAGE_BYTES,
};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::codegen::Service;
use tonic::service::Routes;
use tonic::transport::Server;

use crate::auth::layer::{AuthService, Authenticator};
use crate::gateway::Gateway;
use crate::meta::service::RaftService;
use crate::shard_store::service::ShardService;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Deadline of an ordinary call (the SDK gives up on an attempt after 60 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of calls that run a whole pass (repair, check, membership).
pub const LONG_CALL_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long a call waits for its bytes in a memory pool before it is
/// refused with `ResourceExhausted`.
pub const BUDGET_WAIT: Duration = Duration::from_secs(20);
/// Calls waiting for one pool at once; more are refused at once. Bounds the
/// bytes HTTP/2 holds for streams that wait (one stream window each).
pub const WAITERS_PER_POOL_MAX: usize = 4;
/// Waiters of the shard pool: a gateway takes a refused shard write for a
/// full node and places the shard elsewhere, so shard writes queue longer.
pub const SHARD_WAITERS_MAX: usize = 8;
/// Messages up to this size skip the pools: a status query always gets
/// through, whatever large traffic does.
pub const UNMETERED_BYTES: usize = 64 * KIB;

/// Pack ingest and reads (`PutPack`, `ReadPack`): three 16 MiB packs at
/// once (a pack, its shards and copies: about three times its size).
pub const GATEWAY_POOL_BYTES: usize = 160 * MIB;
/// Shard traffic (`PutShard`, `GetShard`): kept apart from the gateway's
/// pool so a gateway waiting for a peer's shard store never waits for
/// itself.
pub const STORE_POOL_BYTES: usize = 64 * MIB;
/// Raft traffic (`AppendEntries`, `InstallSnapshot`, `Forward`).
pub const RAFT_POOL_BYTES: usize = 48 * MIB;
/// Every other call over [`UNMETERED_BYTES`].
pub const CONTROL_POOL_BYTES: usize = 32 * MIB;
/// Bytes reserved for a `GetShard` reply (a 4+2 shard of a 16 MiB pack is
/// 4 MiB; the reply is read, then encoded).
pub const GET_SHARD_REPLY_WEIGHT: usize = 16 * MIB;

/// `AppendStream` calls open at once on one node; one more is refused with
/// `Unavailable` (the writer reconnects elsewhere). Bounds what each open
/// call costs whatever its messages (its state, its frame buffers); the
/// messages themselves are reserved in the gateway pool.
pub const OPEN_STREAMS_MAX: usize = 64;

/// HTTP/2 streams one connection may open.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 64;
/// Calls one connection runs at once; the rest queue (their bytes stay
/// within the connection's flow-control window).
pub const CALLS_PER_CONNECTION_MAX: usize = 32;
/// Largest header block of a request (a token, the node id, tracing).
pub const HEADER_LIST_BYTES_MAX: u32 = 16 * 1024;
/// HTTP/2 window of one stream on this server: the bytes a waiting call
/// may have buffered (4 MiB per round trip is 4 GB/s on a LAN, 80 MB/s
/// per stream at 50 ms between regions).
pub const STREAM_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
/// HTTP/2 window of a whole connection: bytes a peer may send ahead of the
/// node reading them.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

// The limits checked against each other when the node is compiled.
const _: () = {
    // 100,000 ids of 32 bytes (with their 2-byte tags) fit a control message.
    assert!(crate::gateway::IDS_PER_REQUEST_MAX * 34 < CONTROL_MESSAGE_BYTES);
    // A full AddPack entry (about 80 bytes a blob) fits a Raft entry.
    assert!(cairn_proto::BLOBS_PER_PACK_MAX * 80 + 64 * KIB < RAFT_ENTRY_BYTES_MAX);
    // The largest pack (and its framing) fits PutPack and a shard.
    assert!(cairn_proto::PACK_BYTES_MAX < PUT_PACK_MESSAGE_BYTES);
    assert!(cairn_proto::PACK_BYTES_MAX < SHARD_MESSAGE_BYTES);
    assert!(PUT_PACK_MESSAGE_BYTES <= MAX_MESSAGE_BYTES);
    // A full pack's weight (pack, shards, buffers) fits the gateway pool,
    // for `PutPack` and for each `AppendStream` message alike: a reservation
    // is never clamped to the pool, so never under-counted.
    assert!(PUT_PACK_MESSAGE_BYTES * 3 <= GATEWAY_POOL_BYTES);
    // A stream message's weight plus the capacity its call retains.
    assert!(APPEND_STREAM_LIMITS.request * (APPEND_STREAM_LIMITS.factor + 1) <= GATEWAY_POOL_BYTES);
    // 512 MiB per node: the pools, the windows of the streams waiting for
    // them, and about 100 MiB for the runtime, sled's cache and the state.
    let pools = GATEWAY_POOL_BYTES + STORE_POOL_BYTES + RAFT_POOL_BYTES + CONTROL_POOL_BYTES;
    let waiting = (3 * WAITERS_PER_POOL_MAX + SHARD_WAITERS_MAX) * STREAM_WINDOW_BYTES as usize;
    assert!(pools + waiting + 100 * MIB <= 512 * MIB);
};

/// A memory pool: bytes reserved before a message is read, released when
/// its reply has been sent.
pub struct Pool {
    name: &'static str,
    bytes: usize,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    waiters_max: usize,
}

/// Counts a waiter for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// A pool of `bytes`, in KiB units, with at most `waiters_max` calls waiting.
    pub fn new(name: &'static str, bytes: usize, waiters_max: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            bytes,
            permits: Arc::new(Semaphore::new(bytes.div_ceil(KIB))),
            waiting: AtomicUsize::new(0),
            waiters_max,
        })
    }

    /// Reserves `bytes` (at most the whole pool), waiting at most
    /// [`BUDGET_WAIT`] behind at most `waiters_max` others.
    pub async fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, Status> {
        let units = u32::try_from(bytes.min(self.bytes).div_ceil(KIB).max(1)).unwrap_or(u32::MAX);
        if let Ok(permit) = self.permits.clone().try_acquire_many_owned(units) {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.waiters_max {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(self.busy());
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(BUDGET_WAIT, self.permits.clone().acquire_many_owned(units))
            .await
        {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(Status::unavailable("node shutting down")),
            Err(_elapsed) => Err(self.busy()),
        }
    }

    fn busy(&self) -> Status {
        Status::resource_exhausted(format!(
            "node busy: its {} memory budget ({} MiB) is in use; retry later",
            self.name,
            self.bytes / MIB
        ))
    }

    /// Bytes free now (tests and metrics).
    pub fn available_bytes(&self) -> usize {
        self.permits.available_permits() * KIB
    }
}

/// The pools of one node.
#[derive(Clone)]
pub struct Budget {
    pub gateway: Arc<Pool>,
    pub store: Arc<Pool>,
    pub raft: Arc<Pool>,
    pub control: Arc<Pool>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            gateway: Pool::new("pack", GATEWAY_POOL_BYTES, WAITERS_PER_POOL_MAX),
            store: Pool::new("shard", STORE_POOL_BYTES, SHARD_WAITERS_MAX),
            raft: Pool::new("raft", RAFT_POOL_BYTES, WAITERS_PER_POOL_MAX),
            control: Pool::new("control", CONTROL_POOL_BYTES, WAITERS_PER_POOL_MAX),
        }
    }
}

/// Limits of one method (or of the rest of a service).
#[derive(Debug, Clone, Copy)]
pub struct MethodLimits {
    /// Largest request message.
    pub request: usize,
    /// Largest reply message.
    pub reply: usize,
    pub timeout: Duration,
    /// Bytes reserved per request byte (decoded copy, work buffers).
    pub factor: usize,
    /// Bytes reserved for the reply, whatever the request's size.
    pub reply_weight: usize,
}

const CONTROL: MethodLimits = MethodLimits {
    request: CONTROL_MESSAGE_BYTES,
    reply: MAX_MESSAGE_BYTES,
    timeout: CALL_TIMEOUT,
    factor: 2,
    reply_weight: 0,
};

const LONG: MethodLimits = MethodLimits {
    timeout: LONG_CALL_TIMEOUT,
    ..CONTROL
};

/// Which pool a route draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolKind {
    Gateway,
    Store,
    Raft,
    Control,
}

/// Every route with its own limits: `(path, limits, pool)`. Paths not
/// listed take their service's wildcard route ([`CONTROL`]).
const ROUTES: &[(&str, MethodLimits, PoolKind)] = &[
    (
        "/cairn.v1.Raft/AppendEntries",
        MethodLimits {
            request: RAFT_MESSAGE_BYTES,
            reply: CONTROL_MESSAGE_BYTES,
            ..CONTROL
        },
        PoolKind::Raft,
    ),
    (
        "/cairn.v1.Raft/InstallSnapshot",
        MethodLimits {
            request: RAFT_MESSAGE_BYTES,
            reply: CONTROL_MESSAGE_BYTES,
            ..CONTROL
        },
        PoolKind::Raft,
    ),
    (
        "/cairn.v1.Raft/Forward",
        MethodLimits {
            request: RAFT_ENTRY_BYTES_MAX + 64 * KIB,
            reply: CONTROL_MESSAGE_BYTES,
            ..CONTROL
        },
        PoolKind::Raft,
    ),
    ("/cairn.v1.Raft/ChangeMembership", LONG, PoolKind::Control),
    (
        "/cairn.v1.Shards/PutShard",
        MethodLimits {
            request: SHARD_MESSAGE_BYTES,
            reply: CONTROL_MESSAGE_BYTES,
            ..CONTROL
        },
        PoolKind::Store,
    ),
    (
        "/cairn.v1.Shards/GetShard",
        MethodLimits {
            request: CONTROL_MESSAGE_BYTES,
            reply: SHARD_MESSAGE_BYTES,
            reply_weight: GET_SHARD_REPLY_WEIGHT,
            ..CONTROL
        },
        PoolKind::Store,
    ),
    (
        "/cairn.v1.Cairn/PutPack",
        MethodLimits {
            request: PUT_PACK_MESSAGE_BYTES,
            reply: CONTROL_MESSAGE_BYTES,
            // The pack, its k+m shards (1.5× for 4+2) and their buffers.
            factor: 3,
            ..CONTROL
        },
        PoolKind::Gateway,
    ),
    (
        // The reply's bytes are reserved by the handler once it knows the
        // ranges (`Gateway::read_budget`).
        "/cairn.v1.Cairn/ReadPack",
        MethodLimits {
            request: CONTROL_MESSAGE_BYTES,
            reply: READ_PACK_REPLY_BYTES,
            ..CONTROL
        },
        PoolKind::Control,
    ),
    (
        // A compaction's commit names up to 100,000 retired segments.
        "/cairn.v1.Cairn/CommitSnapshot",
        MethodLimits {
            request: 2 * CONTROL_MESSAGE_BYTES,
            ..CONTROL
        },
        PoolKind::Control,
    ),
    ("/cairn.v1.Cairn/Repair", LONG, PoolKind::Control),
    ("/cairn.v1.Cairn/CheckPacks", LONG, PoolKind::Control),
    ("/cairn.v1.Cairn/AddNode", LONG, PoolKind::Control),
    ("/cairn.v1.Cairn/RemoveNode", LONG, PoolKind::Control),
    ("/cairn.v1.Cairn/Prune", LONG, PoolKind::Control),
    ("/cairn.v1.Cairn/Forget", LONG, PoolKind::Control),
    ("/cairn.v1.Cairn/Stats", LONG, PoolKind::Control),
    (
        // One sealed dictionary, a dataset name and an id.
        "/cairn.v1.Cairn/PutDictionary",
        MethodLimits {
            request: cairn_proto::DICTIONARY_SEALED_BYTES_MAX + 16 * KIB,
            ..CONTROL
        },
        PoolKind::Control,
    ),
    (
        // Every dictionary of a tenant, each capped, their number capped.
        "/cairn.v1.Cairn/ListDictionaries",
        MethodLimits {
            reply: cairn_proto::DICTIONARIES_PER_TENANT_MAX
                * (cairn_proto::DICTIONARY_SEALED_BYTES_MAX + KIB),
            ..CONTROL
        },
        PoolKind::Control,
    ),
];

/// Occurrences of any top-level field a request may carry unless
/// [`LISTS`] says otherwise: no field of a request is a longer list.
pub const FIELD_REPEATS_MAX: usize = 1024;

/// Most tags of a snapshot record (the catalog's own check agrees).
pub const TAGS_MAX: usize = 64;

/// Most regions a read may exclude.
pub const EXCLUDED_REGIONS_MAX: usize = 64;

/// List lengths counted on the wire before a request is decoded: prost
/// turns a 2-byte empty entry into a 24-byte (or larger) value, so a list
/// must be capped before decoding, not after. `(path, field path, name,
/// most)`: the last number of the field path is the list, the others the
/// embedded messages leading to it.
const LISTS: &[(&str, &[u64], &str, usize)] = &[
    (
        "/cairn.v1.Cairn/FindBlobs",
        &[2],
        "ids",
        crate::gateway::IDS_PER_REQUEST_MAX,
    ),
    (
        "/cairn.v1.Cairn/LocateBlobs",
        &[2],
        "ids",
        crate::gateway::IDS_PER_REQUEST_MAX,
    ),
    (
        "/cairn.v1.Cairn/PutPack",
        &[4],
        "blobs",
        cairn_proto::BLOBS_PER_PACK_MAX,
    ),
    (
        "/cairn.v1.Cairn/ReadPack",
        &[2],
        "ranges",
        cairn_proto::READ_RANGES_MAX,
    ),
    (
        "/cairn.v1.Cairn/ReadPack",
        &[4],
        "excluded regions",
        EXCLUDED_REGIONS_MAX,
    ),
    (
        "/cairn.v1.Cairn/ReportFaults",
        &[1],
        "faults",
        cairn_proto::FAULTS_PER_REPORT_MAX,
    ),
    ("/cairn.v1.Cairn/CommitSnapshot", &[2, 11], "tags", TAGS_MAX),
    (
        "/cairn.v1.Cairn/AppendStream",
        &[2, 5],
        "blobs",
        cairn_proto::BLOBS_PER_PACK_MAX,
    ),
    (
        "/cairn.v1.Cairn/AppendStream",
        &[2, 6],
        "segments",
        crate::gateway::stream::SEGMENTS_PER_BATCH_MAX,
    ),
    (
        "/cairn.v1.Cairn/CommitSnapshot",
        &[6],
        "retired segments",
        crate::gateway::IDS_PER_REQUEST_MAX,
    ),
];

/// `AppendStream`: a long-lived bidirectional call, so neither one message
/// read up front nor a call deadline applies. Each message is refused from
/// its prefix over a full pack, and its weight (the pack, its shards and
/// buffers, as `PutPack`) is reserved in the gateway pool before its body
/// is read and until the handler has answered it ([`CheckedFrames`],
/// [`StreamReservations`]); a call holds one message at a time, and a node
/// at most [`OPEN_STREAMS_MAX`] calls.
///
/// tonic's decode buffer of a call keeps the capacity of its largest message
/// until the call ends, so a call also holds that many bytes of the pool for
/// its lifetime; a batch is a fraction of a second of records (a few MiB),
/// so its message limit is well below a backup's pack.
const APPEND_STREAM_PATH: &str = "/cairn.v1.Cairn/AppendStream";
pub const APPEND_STREAM_MESSAGE_BYTES: usize = 24 * MIB;
const APPEND_STREAM_LIMITS: MethodLimits = MethodLimits {
    request: APPEND_STREAM_MESSAGE_BYTES,
    reply: CONTROL_MESSAGE_BYTES,
    factor: 3,
    ..CONTROL
};

/// Walks the top-level fields of a protobuf message: `(field number,
/// payload of a length-delimited field)`. Refuses what prost would refuse
/// (bad wire types, truncation) and groups, which no Cairn message uses.
fn walk_fields(mut buf: &[u8], mut visit: impl FnMut(u64, Option<&[u8]>)) -> Result<(), String> {
    fn varint(buf: &mut &[u8]) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in 0..10 {
            let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << (7 * shift);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }
    fn skip<'a>(buf: &mut &'a [u8], len: u64) -> Result<&'a [u8], String> {
        let len = usize::try_from(len).map_err(|_| "field length out of range")?;
        if len > buf.len() {
            return Err("field longer than the message".into());
        }
        let (field, rest) = buf.split_at(len);
        *buf = rest;
        Ok(field)
    }
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = key >> 3;
        if field == 0 {
            return Err("field number 0".into());
        }
        match key & 7 {
            0 => {
                varint(&mut buf)?;
                visit(field, None);
            }
            1 => {
                skip(&mut buf, 8)?;
                visit(field, None);
            }
            2 => {
                let len = varint(&mut buf)?;
                let payload = skip(&mut buf, len)?;
                visit(field, Some(payload));
            }
            5 => {
                skip(&mut buf, 4)?;
                visit(field, None);
            }
            wire => return Err(format!("unsupported wire type {wire}")),
        }
    }
    Ok(())
}

/// Counts the lists of a request on the wire and refuses one over its cap
/// (or any field repeated over [`FIELD_REPEATS_MAX`] times).
pub fn check_lists(path: &str, message: &[u8]) -> Result<(), Status> {
    let malformed =
        |e: String| Status::invalid_argument(format!("malformed protobuf message: {e}"));
    let mut counts: std::collections::BTreeMap<u64, usize> = Default::default();
    let mut embedded: Vec<(&[u64], &str, usize, usize)> = Vec::new();
    let caps: Vec<_> = LISTS.iter().filter(|(p, ..)| *p == path).collect();
    walk_fields(message, |field, payload| {
        *counts.entry(field).or_default() += 1;
        if let Some(payload) = payload {
            for (_, fields, name, most) in &caps {
                if fields.len() == 2 && fields[0] == field {
                    let mut inner = 0;
                    // An embedded message that does not walk is refused by prost.
                    let _ = walk_fields(payload, |f, _| inner += usize::from(f == fields[1]));
                    embedded.push((fields, name, *most, inner));
                }
            }
        }
    })
    .map_err(malformed)?;
    for (field, count) in counts {
        let cap = caps
            .iter()
            .find(|(_, fields, ..)| fields.len() == 1 && fields[0] == field);
        let (name, most) = cap.map_or(("a field", FIELD_REPEATS_MAX), |(_, _, name, most)| {
            (*name, *most)
        });
        if count > most {
            return Err(Status::invalid_argument(format!(
                "{path}: {count} {name} in one request, at most {most}"
            )));
        }
    }
    for (_, name, most, count) in embedded {
        if count > most {
            return Err(Status::invalid_argument(format!(
                "{path}: {count} {name} in one request, at most {most}"
            )));
        }
    }
    Ok(())
}

/// The limits a path is served with.
pub fn limits_of(path: &str) -> MethodLimits {
    if path == APPEND_STREAM_PATH {
        return APPEND_STREAM_LIMITS;
    }
    ROUTES
        .iter()
        .find(|(p, _, _)| *p == path)
        .map(|(_, limits, _)| *limits)
        .unwrap_or(CONTROL)
}

/// The server builder with every per-connection limit. TLS and layers are
/// added by the caller.
pub fn server() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .tcp_nodelay(true)
        // The backstop: each route has its own, shorter deadline.
        .timeout(LONG_CALL_TIMEOUT)
        .max_concurrent_streams(STREAMS_PER_CONNECTION_MAX)
        .concurrency_limit_per_connection(CALLS_PER_CONNECTION_MAX)
        .http2_max_header_list_size(HEADER_LIST_BYTES_MAX)
        .http2_max_pending_accept_reset_streams(Some(32))
}

/// The three services, each method mounted with its limits. Every Cairn
/// route sits behind `auth`: a caller is resolved (or refused) from the
/// headers before its message is read or any pool is reserved for it, so an
/// unauthenticated client can never hold memory meant for real work.
pub fn routes(
    raft: RaftServer<RaftService>,
    shards: ShardsServer<ShardService>,
    cairn: CairnServer<Gateway>,
    budget: &Budget,
    auth: &Arc<Authenticator>,
) -> Routes {
    let mut router = axum::Router::new();
    let pool = |kind: PoolKind| match kind {
        PoolKind::Gateway => budget.gateway.clone(),
        PoolKind::Store => budget.store.clone(),
        PoolKind::Raft => budget.raft.clone(),
        PoolKind::Control => budget.control.clone(),
    };
    for &(path, limits, kind) in ROUTES {
        let pool = pool(kind);
        router = if path.starts_with("/cairn.v1.Raft/") {
            mount(router, path, limited_raft(&raft, limits), limits, pool)
        } else if path.starts_with("/cairn.v1.Shards/") {
            mount(router, path, limited_shards(&shards, limits), limits, pool)
        } else {
            mount_behind(
                router,
                path,
                limited_cairn(&cairn, limits),
                limits,
                pool,
                auth,
            )
        };
    }
    // Behind the caller's resolution: an unauthenticated client takes
    // neither an open-call slot nor pool bytes.
    router = router.route_service(
        APPEND_STREAM_PATH,
        AuthService::new(
            streaming(
                limited_cairn(&cairn, APPEND_STREAM_LIMITS),
                pool(PoolKind::Gateway),
                Arc::new(Semaphore::new(OPEN_STREAMS_MAX)),
            ),
            auth.clone(),
        ),
    );
    let control = pool(PoolKind::Control);
    router = mount(
        router,
        "/cairn.v1.Raft/{*rest}",
        limited_raft(&raft, CONTROL),
        CONTROL,
        control.clone(),
    );
    router = mount(
        router,
        "/cairn.v1.Shards/{*rest}",
        limited_shards(&shards, CONTROL),
        CONTROL,
        control.clone(),
    );
    router = mount_behind(
        router,
        "/cairn.v1.Cairn/{*rest}",
        limited_cairn(&cairn, CONTROL),
        CONTROL,
        control,
        auth,
    );
    // Unknown methods and services: gRPC's UNIMPLEMENTED, as tonic's router answers.
    Routes::from(
        router.fallback(|| async { status_response(Status::unimplemented("no such method")) }),
    )
}

fn limited_raft(svc: &RaftServer<RaftService>, limits: MethodLimits) -> RaftServer<RaftService> {
    svc.clone()
        .max_decoding_message_size(limits.request)
        .max_encoding_message_size(limits.reply)
}

fn limited_shards(
    svc: &ShardsServer<ShardService>,
    limits: MethodLimits,
) -> ShardsServer<ShardService> {
    svc.clone()
        .max_decoding_message_size(limits.request)
        .max_encoding_message_size(limits.reply)
}

fn limited_cairn(svc: &CairnServer<Gateway>, limits: MethodLimits) -> CairnServer<Gateway> {
    svc.clone()
        .max_decoding_message_size(limits.request)
        .max_encoding_message_size(limits.reply)
}

/// A streaming method: the call goes to `svc` as it arrives, without a
/// deadline on the whole call; each message is checked by [`CheckedFrames`]
/// and its bytes reserved in `pool` before the decoder sees it. At most
/// `open` calls run at once; the call holds its slot until its reply
/// stream ends.
fn streaming(
    svc: CairnServer<Gateway>,
    pool: Arc<Pool>,
    open: Arc<Semaphore>,
) -> axum::routing::MethodRouter {
    any(move |request: Request| {
        let mut svc = svc.clone();
        let pool = pool.clone();
        let open = open.clone();
        async move {
            let Ok(slot) = open.try_acquire_owned() else {
                return status_response(Status::unavailable(
                    "too many open record streams on this node; retry on another node",
                ));
            };
            let path = request.uri().path().to_string();
            let reservations = StreamReservations::default();
            let (mut parts, body) = request.into_parts();
            parts.extensions.insert(reservations.clone());
            let body = Body::new(CheckedFrames::new(
                body,
                path,
                APPEND_STREAM_LIMITS,
                pool,
                reservations,
            ));
            match svc.call(http::Request::from_parts(parts, body)).await {
                Ok(response) => response
                    .map(move |body| {
                        Body::new(ReplyBody {
                            body: Box::pin(body),
                            _permit: Some(slot),
                        })
                    })
                    .into_response(),
                Err(never) => match never {},
            }
        }
    })
}

/// The pool reservations of one streaming call's messages, in arrival
/// order: [`CheckedFrames`] pushes one per message once its prefix is read
/// (before its body), the handler takes the front one as it takes that
/// message and drops it once the message is answered. The request's
/// extensions carry it from the route to the handler.
#[derive(Clone, Default)]
pub struct StreamReservations(Arc<Mutex<VecDeque<OwnedSemaphorePermit>>>);

impl StreamReservations {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<OwnedSemaphorePermit>> {
        // A panic elsewhere cannot leave a queue of permits inconsistent.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, permit: OwnedSemaphorePermit) {
        self.queue().push_back(permit);
    }

    /// The reservation of the message the handler takes next.
    pub fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.queue().pop_front()
    }

    /// Messages read and not yet taken by the handler (tests).
    pub fn len(&self) -> usize {
        self.queue().len()
    }

    /// Whether no reservation waits for the handler (tests).
    pub fn is_empty(&self) -> bool {
        self.queue().is_empty()
    }
}

type Reserving = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, Status>> + Send>>;

/// A streaming request body passed on one whole gRPC message at a time,
/// each refused from its prefix when over `limit` or compressed, its weight
/// reserved in `pool` before its body is read (while the reservation
/// waits nothing more is read, so HTTP/2's window holds the sender back),
/// and its lists counted on the wire ([`check_lists`]) before prost decodes
/// it, as [`read_message`] does for unary calls.
struct CheckedFrames {
    inner: Body,
    path: String,
    limit: usize,
    /// Bytes reserved per message byte.
    factor: usize,
    pool: Arc<Pool>,
    /// Where each message's reservation goes for the handler.
    reservations: StreamReservations,
    /// The reservation being waited for, for the message whose prefix is read.
    reserving: Option<Reserving>,
    /// Whether the message at the front of `buf` has its reservation.
    reserved: bool,
    /// The pool bytes held for the call's lifetime: the capacity of its
    /// largest message, which tonic's decode buffer keeps until the call ends.
    retained: Option<OwnedSemaphorePermit>,
    retained_len: usize,
    buf: Vec<u8>,
}

impl CheckedFrames {
    fn new(
        inner: Body,
        path: String,
        limits: MethodLimits,
        pool: Arc<Pool>,
        reservations: StreamReservations,
    ) -> Self {
        Self {
            inner,
            path,
            limit: limits.request,
            factor: limits.factor.max(1),
            pool,
            reservations,
            reserving: None,
            reserved: false,
            retained: None,
            retained_len: 0,
            buf: Vec::new(),
        }
    }
}

impl http_body::Body for CheckedFrames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if this.buf.len() >= 5 {
                let path = &this.path;
                match this.buf[0] {
                    0 => {}
                    1 => {
                        return Poll::Ready(Some(Err(Status::invalid_argument(format!(
                            "{path}: compressed messages are not accepted"
                        )))));
                    }
                    flag => {
                        return Poll::Ready(Some(Err(Status::invalid_argument(format!(
                            "{path}: invalid gRPC message flag {flag}"
                        )))));
                    }
                }
                let len = u32::from_be_bytes([this.buf[1], this.buf[2], this.buf[3], this.buf[4]])
                    as usize;
                if len > this.limit {
                    return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                        "{path}: message of {len} bytes is over this method's limit of {} bytes",
                        this.limit
                    )))));
                }
                if !this.reserved {
                    let growth = len.saturating_sub(this.retained_len);
                    let reserving = this.reserving.get_or_insert_with(|| {
                        let pool = this.pool.clone();
                        let weight = len.saturating_mul(this.factor) + growth;
                        Box::pin(async move { pool.reserve(weight).await })
                    });
                    match reserving.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(status)) => {
                            this.reserving = None;
                            return Poll::Ready(Some(Err(status)));
                        }
                        Poll::Ready(Ok(mut permit)) => {
                            this.reserving = None;
                            this.reserved = true;
                            if growth > 0 {
                                // The growth stays with the call, the rest
                                // goes with the message to its handler.
                                let units = growth.div_ceil(KIB).min(permit.num_permits());
                                if let Some(kept) = permit.split(units) {
                                    match this.retained.as_mut() {
                                        Some(retained) => retained.merge(kept),
                                        None => this.retained = Some(kept),
                                    }
                                }
                                this.retained_len = len;
                            }
                            this.reservations.push(permit);
                            // The message's exact size, not a doubling Vec's.
                            this.buf
                                .reserve_exact((5 + len).saturating_sub(this.buf.len()));
                        }
                    }
                }
                if this.buf.len() >= 5 + len {
                    let rest = this.buf.split_off(5 + len);
                    let message = std::mem::replace(&mut this.buf, rest);
                    this.reserved = false;
                    if let Err(status) = check_lists(path, &message[5..]) {
                        // Refused here: the handler never takes it.
                        drop(this.reservations.queue().pop_back());
                        return Poll::Ready(Some(Err(status)));
                    }
                    return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(message)))));
                }
            }
            match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.buf.extend_from_slice(&data);
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    return Poll::Ready(Some(Err(Status::cancelled("request body interrupted"))));
                }
                // A cut message is passed on: the decoder reports it.
                Poll::Ready(None) if this.buf.is_empty() => return Poll::Ready(None),
                Poll::Ready(None) => {
                    let rest = std::mem::take(&mut this.buf);
                    return Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(rest)))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Mounts `svc` on `path` behind the size check, the pool and the deadline.
fn mount<S, B>(
    router: axum::Router,
    path: &'static str,
    svc: S,
    limits: MethodLimits,
    pool: Arc<Pool>,
) -> axum::Router
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    router.route(path, limited(svc, limits, pool))
}

/// Like [`mount`], with caller resolution in front of the limits.
fn mount_behind<S, B>(
    router: axum::Router,
    path: &'static str,
    svc: S,
    limits: MethodLimits,
    pool: Arc<Pool>,
    auth: &Arc<Authenticator>,
) -> axum::Router
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    router.route_service(
        path,
        AuthService::new(limited(svc, limits, pool), auth.clone()),
    )
}

/// A handler that reads the message prefix, reserves the pool, then calls `svc`.
fn limited<S, B>(svc: S, limits: MethodLimits, pool: Arc<Pool>) -> axum::routing::MethodRouter
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    any(move |request: Request| {
        let svc = svc.clone();
        let pool = pool.clone();
        async move { serve_limited(svc, request, limits, pool).await }
    })
}

async fn serve_limited<S, B>(
    mut svc: S,
    request: Request,
    limits: MethodLimits,
    pool: Arc<Pool>,
) -> Response
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = std::convert::Infallible>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let path = request.uri().path().to_string();
    let call = async {
        let (parts, body) = request.into_parts();
        let (message, permit) = read_message(body, &path, limits, &pool).await?;
        let request = http::Request::from_parts(parts, Body::from(message));
        match poll_fn(|cx| svc.poll_ready(cx)).await {
            Ok(()) => {}
            Err(never) => match never {},
        }
        let response = match svc.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        // The permit lives as long as the reply body: a reply is counted
        // until it has been sent.
        Ok::<_, Status>(response.map(move |body| {
            Body::new(ReplyBody {
                body: Box::pin(body),
                _permit: permit,
            })
        }))
    };
    match tokio::time::timeout(limits.timeout, call).await {
        Ok(Ok(response)) => response.into_response(),
        Ok(Err(status)) => status_response(status),
        Err(_elapsed) => status_response(Status::deadline_exceeded(format!(
            "{path} did not finish within {}s",
            limits.timeout.as_secs()
        ))),
    }
}

fn status_response(status: Status) -> Response {
    status.into_http::<Body>().into_response()
}

/// Reads one gRPC message (the 5-byte prefix and its body) from `body`:
/// refused from its prefix when over the method's limit, its bytes reserved
/// in `pool` before they are read. Anything but exactly one uncompressed
/// message is the caller's error.
async fn read_message(
    body: Body,
    path: &str,
    limits: MethodLimits,
    pool: &Pool,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Status> {
    let mut stream = body.into_data_stream();
    let mut message: Vec<u8> = Vec::new();
    let mut pending = std::collections::VecDeque::<Bytes>::new();
    let mut head = [0u8; 5];
    let mut have = 0;
    while have < head.len() {
        match stream.next().await {
            Some(Ok(chunk)) => {
                let take = (head.len() - have).min(chunk.len());
                head[have..have + take].copy_from_slice(&chunk[..take]);
                have += take;
                pending.push_back(chunk);
            }
            Some(Err(_)) => return Err(Status::cancelled("request body interrupted")),
            None if have == 0 => {
                return Err(Status::invalid_argument(format!(
                    "{path}: empty request, expected one gRPC message"
                )));
            }
            None => {
                return Err(Status::invalid_argument(format!(
                    "{path}: truncated gRPC message prefix ({have} of 5 bytes)"
                )));
            }
        }
    }
    match head[0] {
        0 => {}
        1 => {
            return Err(Status::invalid_argument(format!(
                "{path}: compressed messages are not accepted"
            )));
        }
        flag => {
            return Err(Status::invalid_argument(format!(
                "{path}: invalid gRPC message flag {flag}"
            )));
        }
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > limits.request {
        return Err(Status::resource_exhausted(format!(
            "{path}: message of {len} bytes is over this method's limit of {} bytes",
            limits.request
        )));
    }
    let weight = len
        .saturating_mul(limits.factor)
        .saturating_add(limits.reply_weight);
    let permit = if weight > UNMETERED_BYTES {
        Some(pool.reserve(weight).await?)
    } else {
        None
    };
    let total = 5 + len;
    message.reserve_exact(total);
    loop {
        let chunk = match pending.pop_front() {
            Some(chunk) => chunk,
            None => match stream.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(_)) => return Err(Status::cancelled("request body interrupted")),
                None => break,
            },
        };
        if message.len() + chunk.len() > total {
            return Err(Status::invalid_argument(format!(
                "{path}: more bytes than one message of {len} bytes; unary calls carry exactly one"
            )));
        }
        message.extend_from_slice(&chunk);
    }
    if message.len() < total {
        return Err(Status::invalid_argument(format!(
            "{path}: truncated message: {} of {len} bytes",
            message.len() - 5
        )));
    }
    let message = Bytes::from(message);
    if len <= UNMETERED_BYTES {
        check_lists(path, &message[5..])?;
    } else {
        // Walking millions of fields takes a while: off the async workers,
        // which keep answering pings and other calls meanwhile.
        let (path, scanned) = (path.to_string(), message.clone());
        tokio::task::spawn_blocking(move || check_lists(&path, &scanned[5..]))
            .await
            .map_err(|_| Status::internal("request check failed"))??;
    }
    Ok((message, permit))
}

/// A reply body that keeps its call's pool reservation until it is dropped.
struct ReplyBody<B> {
    body: std::pin::Pin<Box<B>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<B: http_body::Body<Data = Bytes>> http_body::Body for ReplyBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.get_mut().body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavy_methods_have_their_own_limits_and_the_rest_is_small() {
        assert_eq!(
            limits_of("/cairn.v1.Cairn/PutPack").request,
            PUT_PACK_MESSAGE_BYTES
        );
        assert_eq!(
            limits_of("/cairn.v1.Shards/PutShard").request,
            SHARD_MESSAGE_BYTES
        );
        assert_eq!(
            limits_of("/cairn.v1.Shards/GetShard").reply,
            SHARD_MESSAGE_BYTES
        );
        assert_eq!(
            limits_of("/cairn.v1.Raft/AppendEntries").request,
            RAFT_MESSAGE_BYTES
        );
        assert_eq!(
            limits_of("/cairn.v1.Cairn/FindBlobs").request,
            CONTROL_MESSAGE_BYTES
        );
    }

    #[test]
    fn stream_batches_are_counted_on_the_wire_before_decoding() {
        use cairn_proto::v1 as pb;
        use prost::Message;
        let batch = |blobs: usize, segments: usize| pb::AppendStreamRequest {
            msg: Some(pb::append_stream_request::Msg::Batch(pb::StreamBatch {
                blobs: vec![pb::BlobEntry::default(); blobs],
                segments: vec![pb::StreamSegment::default(); segments],
                ..Default::default()
            })),
        };
        let path = APPEND_STREAM_PATH;
        check_lists(path, &batch(1000, 100).encode_to_vec()).expect("within the caps");
        let refused = check_lists(
            path,
            &batch(cairn_proto::BLOBS_PER_PACK_MAX + 1, 1).encode_to_vec(),
        )
        .expect_err("blobs");
        assert!(refused.message().contains("blobs"), "{refused:?}");
        let refused = check_lists(
            path,
            &batch(1, crate::gateway::stream::SEGMENTS_PER_BATCH_MAX + 1).encode_to_vec(),
        )
        .expect_err("segments");
        assert!(refused.message().contains("segments"), "{refused:?}");
        assert_eq!(limits_of(path).request, APPEND_STREAM_MESSAGE_BYTES);
    }

    #[test]
    fn lists_are_counted_on_the_wire_before_decoding() {
        use prost::Message;
        // 100,001 empty ids: 200 KB on the wire, refused by count.
        let find = cairn_proto::v1::FindBlobsRequest {
            tenant: "t".into(),
            ids: vec![Vec::new(); crate::gateway::IDS_PER_REQUEST_MAX + 1],
        };
        let refused = check_lists("/cairn.v1.Cairn/FindBlobs", &find.encode_to_vec())
            .expect_err("too many ids");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused
                .message()
                .contains("ids in one request, at most 100000"),
            "{refused}"
        );
        let ok = cairn_proto::v1::FindBlobsRequest {
            tenant: "t".into(),
            ids: vec![vec![1; 32]; 1000],
        };
        check_lists("/cairn.v1.Cairn/FindBlobs", &ok.encode_to_vec()).expect("1000 ids");
        // Empty blob entries in a pack.
        let pack = cairn_proto::v1::PutPackRequest {
            blobs: vec![Default::default(); cairn_proto::BLOBS_PER_PACK_MAX + 1],
            ..Default::default()
        };
        let refused =
            check_lists("/cairn.v1.Cairn/PutPack", &pack.encode_to_vec()).expect_err("blobs");
        assert!(refused.message().contains("blobs"), "{refused}");
        // Tags inside the embedded snapshot record.
        let commit = cairn_proto::v1::CommitSnapshotRequest {
            tenant: "t".into(),
            snapshot: Some(cairn_proto::v1::SnapshotRecord {
                tags: vec![String::new(); TAGS_MAX + 1],
                ..Default::default()
            }),
            ..Default::default()
        };
        let refused = check_lists("/cairn.v1.Cairn/CommitSnapshot", &commit.encode_to_vec())
            .expect_err("tags");
        assert!(refused.message().contains("tags"), "{refused}");
        // Any other field repeated beyond reason.
        let repeated: Vec<u8> = [0x08, 0x01].repeat(FIELD_REPEATS_MAX + 1);
        assert!(check_lists("/cairn.v1.Cairn/ClusterStatus", &repeated).is_err());
        // Malformed wire data is the caller's error too.
        let bad = check_lists("/cairn.v1.Cairn/FindBlobs", &[0x0a, 0xff]).expect_err("bad");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    }

    /// One gRPC message (prefix and body) of an `AppendStream` batch
    /// carrying `data_len` bytes.
    fn stream_message(data_len: usize) -> Vec<u8> {
        use cairn_proto::v1 as pb;
        use prost::Message;
        let body = pb::AppendStreamRequest {
            msg: Some(pb::append_stream_request::Msg::Batch(pb::StreamBatch {
                data: vec![7; data_len],
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let mut message = vec![0];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes());
        message.extend_from_slice(&body);
        message
    }

    /// A request body of `chunks`, counting how many were read.
    fn counted_body(chunks: Vec<Vec<u8>>) -> (Body, Arc<AtomicUsize>) {
        let read = Arc::new(AtomicUsize::new(0));
        let counter = read.clone();
        let stream = futures::stream::iter(chunks).map(move |chunk| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(chunk))
        });
        (Body::from_stream(stream), read)
    }

    fn poll_once(frames: &mut CheckedFrames) -> Option<Option<Result<Bytes, Status>>> {
        use futures::FutureExt;
        use http_body::Body as _;
        poll_fn(|cx| Pin::new(&mut *frames).poll_frame(cx))
            .now_or_never()
            .map(|frame| frame.map(|f| f.map(|f| f.into_data().unwrap_or_default())))
    }

    #[tokio::test]
    async fn stream_messages_wait_for_their_bytes_before_their_body_is_read() {
        let (one, two) = (stream_message(10 * KIB), stream_message(10 * KIB));
        let len = one.len() - 5;
        // The first message weighs three times its size for its handler,
        // plus its size for the call's lifetime (tonic's decode buffer).
        let units = |bytes: usize| bytes.div_ceil(KIB) * KIB;
        let first_weight = units(len * APPEND_STREAM_LIMITS.factor + len);
        let kept = units(len);
        let pool = Pool::new("test", 48 * KIB, WAITERS_PER_POOL_MAX);
        assert!(
            first_weight <= 48 * KIB && first_weight > 40 * KIB,
            "{first_weight}"
        );
        let (prefix1, body1) = one.split_at(5);
        let (prefix2, body2) = two.split_at(5);
        let chunks = [prefix1, body1, prefix2, body2]
            .map(<[u8]>::to_vec)
            .to_vec();
        let (body, read) = counted_body(chunks);
        let reservations = StreamReservations::default();
        let mut frames = CheckedFrames::new(
            body,
            APPEND_STREAM_PATH.into(),
            APPEND_STREAM_LIMITS,
            pool.clone(),
            reservations.clone(),
        );
        // The pool is in use: the prefix is read, the body is not.
        let all = pool.reserve(48 * KIB).await.expect("whole pool");
        assert!(poll_once(&mut frames).is_none(), "waits for the pool");
        assert_eq!(read.load(Ordering::SeqCst), 1, "only the prefix was read");
        assert!(reservations.is_empty());
        // Freed: the message is reserved, then read, and its reservation
        // waits for the handler.
        drop(all);
        let message = poll_once(&mut frames).expect("reserved").expect("a frame");
        assert_eq!(message.expect("checked").as_ref(), one.as_slice());
        assert_eq!(reservations.len(), 1);
        assert_eq!(pool.available_bytes(), 48 * KIB - first_weight);
        // The next message waits while the first is not answered: a call
        // never holds more than the pool.
        assert!(poll_once(&mut frames).is_none(), "waits for the first");
        assert_eq!(read.load(Ordering::SeqCst), 3, "the second's prefix only");
        let first = reservations.take().expect("the first message's bytes");
        drop(first);
        let message = poll_once(&mut frames).expect("reserved").expect("a frame");
        assert_eq!(message.expect("checked").as_ref(), two.as_slice());
        drop(reservations.take());
        // Both answered: the call still holds its largest message's size.
        assert_eq!(pool.available_bytes(), 48 * KIB - kept);
        assert!(
            matches!(poll_once(&mut frames), Some(None)),
            "end of stream"
        );
        drop(frames);
        assert_eq!(
            pool.available_bytes(),
            48 * KIB,
            "all back when the call ends"
        );
    }

    #[tokio::test]
    async fn a_stream_message_the_pool_refuses_ends_the_call_unread() {
        // No room and no queue: refused as a unary call would be.
        let pool = Pool::new("test", 32 * KIB, 0);
        let _all = pool.reserve(32 * KIB).await.expect("whole pool");
        let message = stream_message(KIB);
        let (prefix, rest) = message.split_at(5);
        let (body, read) = counted_body(vec![prefix.to_vec(), rest.to_vec()]);
        let reservations = StreamReservations::default();
        let mut frames = CheckedFrames::new(
            body,
            APPEND_STREAM_PATH.into(),
            APPEND_STREAM_LIMITS,
            pool.clone(),
            reservations.clone(),
        );
        let refused = poll_once(&mut frames)
            .expect("answered at once")
            .expect("a frame")
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("test memory budget"),
            "{refused}"
        );
        assert_eq!(read.load(Ordering::SeqCst), 1, "the body was never read");
        assert!(reservations.is_empty());
    }

    #[tokio::test]
    async fn a_full_pool_refuses_after_the_queue_is_full() {
        let pool = Pool::new("test", MIB, WAITERS_PER_POOL_MAX);
        let all = pool.reserve(MIB).await.expect("whole pool");
        assert_eq!(pool.available_bytes(), 0);
        // Over-large reservations are clamped to the pool, never stuck forever.
        let waiters: Vec<_> = (0..WAITERS_PER_POOL_MAX)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.reserve(10 * MIB).await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = pool.reserve(KIB).await.expect_err("queue full");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("test memory budget"),
            "{refused}"
        );
        drop(all);
        for waiter in waiters {
            waiter.await.expect("join").expect("served once freed");
        }
        assert_eq!(pool.available_bytes(), MIB);
    }
}
