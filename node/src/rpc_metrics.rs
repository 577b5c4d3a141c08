//! Per-method RPC latency and errors: a tower layer on the node's gRPC
//! server (`cairn_rpc_duration_seconds{method}`,
//! `cairn_rpc_errors_total{method,code}`).
//!
//! The `method` label is the last segment of the gRPC path, looked up in
//! [`METHODS`], the closed set of the `.proto`'s RPCs (a unit test keeps the
//! two equal); any other path counts as `unknown`, so nothing a client
//! types ever becomes a label value. The time measured runs until the
//! response headers: for Cairn's unary calls, the whole handler. The code
//! is read from a trailers-only answer's `grpc-status` header, which is how
//! tonic answers a handler's error.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Every RPC of `cairn.v1` (Raft, Shards, Cairn), the values the `method`
/// label may take besides `unknown`.
pub const METHODS: &[&str] = &[
    "AppendEntries",
    "Vote",
    "InstallSnapshot",
    "Forward",
    "ReadIndex",
    "ChangeMembership",
    "ClusterInfo",
    "PutShard",
    "GetShard",
    "DeleteShard",
    "ShardStats",
    "InitTenant",
    "GetKeySlots",
    "FindBlobs",
    "LocateBlobs",
    "PutPack",
    "ReadPack",
    "CommitSnapshot",
    "ListSnapshots",
    "ClusterStatus",
    "CheckPacks",
    "Repair",
    "AddNode",
    "RemoveNode",
    "ReportFaults",
    "CreateToken",
    "ListTokens",
    "RevokeToken",
    "AddKeySlot",
    "RemoveKeySlot",
    "AuditLog",
    "WhoAmI",
    "Forget",
    "Prune",
    "LockSnapshot",
    "UnlockSnapshot",
    "SetPolicy",
    "GetPolicies",
    "Stats",
    "AppendStream",
    "ListSegments",
    "PutDictionary",
    "ListDictionaries",
];

/// Histogram buckets (seconds): a millisecond Raft call up to a long repair.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

type Labels = Vec<(&'static str, &'static str)>;
type HistogramFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS.iter().copied())
}

/// The label value of a gRPC path: its method if it is one of [`METHODS`].
pub fn method_label(path: &str) -> &'static str {
    let last = path.rsplit('/').next().unwrap_or_default();
    METHODS
        .iter()
        .find(|m| **m == last)
        .copied()
        .unwrap_or("unknown")
}

/// The label value of a gRPC status code (a closed set).
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// The counters the layer fills and the metrics page renders (shared: a
/// clone of a family is the same family).
#[derive(Clone)]
pub struct RpcStats {
    duration: HistogramFamily,
    errors: Family<Labels, Counter>,
}

impl Default for RpcStats {
    fn default() -> Self {
        Self {
            duration: Family::new_with_constructor(histogram),
            errors: Family::default(),
        }
    }
}

impl RpcStats {
    fn record(&self, method: &'static str, elapsed_seconds: f64, code: tonic::Code) {
        self.duration
            .get_or_create(&vec![("method", method)])
            .observe(elapsed_seconds);
        if code != tonic::Code::Ok {
            self.errors
                .get_or_create(&vec![("method", method), ("code", code_label(code))])
                .inc();
        }
    }

    /// Adds both families to a scrape's registry.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cairn_rpc_duration_seconds",
            "Time from a gRPC request to its response headers, by method",
            self.duration.clone(),
        );
        registry.register(
            "cairn_rpc_errors",
            "gRPC calls answered with a status other than OK, by method and code",
            self.errors.clone(),
        );
    }
}

/// The layer mounted on the node's server.
#[derive(Clone, Default)]
pub struct RpcMetricsLayer {
    stats: RpcStats,
}

impl RpcMetricsLayer {
    pub fn new(stats: RpcStats) -> Self {
        Self { stats }
    }
}

impl<S> tower_layer::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            stats: self.stats.clone(),
        }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    stats: RpcStats,
}

/// The status of an answer whose headers carry one (trailers-only: an
/// error); otherwise OK, the status then follows in the trailers.
fn status_of<B>(response: &http::Response<B>) -> tonic::Code {
    match response.headers().get("grpc-status") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map_or(tonic::Code::Unknown, tonic::Code::from),
        None if response.status().is_success() => tonic::Code::Ok,
        None => tonic::Code::Unknown,
    }
}

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let stats = self.stats.clone();
        let started = Instant::now();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            let code = match &result {
                Ok(response) => status_of(response),
                Err(_) => tonic::Code::Internal,
            };
            stats.record(method, started.elapsed().as_secs_f64(), code);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::future::{Ready, ready};
    use tower_layer::Layer;
    use tower_service::Service;

    use super::*;

    #[test]
    fn methods_are_exactly_the_protos_rpcs() {
        let proto = include_str!("../../proto/proto/cairn.proto");
        let mut declared: Vec<&str> = proto
            .lines()
            .filter_map(|line| line.trim().strip_prefix("rpc "))
            .filter_map(|rest| rest.split('(').next())
            .map(str::trim)
            .collect();
        declared.sort_unstable();
        let mut known = METHODS.to_vec();
        known.sort_unstable();
        assert_eq!(
            declared, known,
            "rpc_metrics::METHODS must list every rpc of cairn.proto"
        );
    }

    /// Answers every call with `grpc-status` = `code` in the headers
    /// (tonic's trailers-only error), or a plain 200 for OK.
    #[derive(Clone)]
    struct Answer(tonic::Code);

    impl Service<http::Request<()>> for Answer {
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let mut response = http::Response::new(());
            if self.0 != tonic::Code::Ok {
                response
                    .headers_mut()
                    .insert("grpc-status", (self.0 as i32).into());
            }
            ready(Ok(response))
        }
    }

    async fn call(stats: &RpcStats, code: tonic::Code, path: &str) {
        let mut service = RpcMetricsLayer::new(stats.clone()).layer(Answer(code));
        let request = http::Request::builder()
            .uri(path)
            .body(())
            .expect("request");
        service.call(request).await.expect("answer");
    }

    fn rendered(stats: &RpcStats) -> String {
        let mut registry = Registry::default();
        stats.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    }

    #[tokio::test]
    async fn calls_are_timed_and_errors_counted_by_method_and_code() {
        let stats = RpcStats::default();
        call(&stats, tonic::Code::Ok, "/cairn.v1.Cairn/PutPack").await;
        call(&stats, tonic::Code::Unavailable, "/cairn.v1.Cairn/PutPack").await;
        call(&stats, tonic::Code::Ok, "/cairn.v1.Raft/Vote").await;
        call(
            &stats,
            tonic::Code::Unimplemented,
            "/evil.v1.Nope/DropTables",
        )
        .await;
        let text = rendered(&stats);
        assert!(
            text.contains("cairn_rpc_duration_seconds_count{method=\"PutPack\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("cairn_rpc_duration_seconds_count{method=\"Vote\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cairn_rpc_errors_total{method=\"PutPack\",code=\"unavailable\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cairn_rpc_errors_total{method=\"unknown\",code=\"unimplemented\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("DropTables"),
            "a typed path never becomes a label"
        );
        assert!(!text.contains("code=\"ok\""), "OK is not an error");
    }
}
