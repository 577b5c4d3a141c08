//! Prometheus metrics on `--metrics-listen` (`GET /metrics`).
//!
//! Counters are read from the subsystems' atomics at scrape time (a fresh
//! registry per scrape), so no subsystem carries metric objects around. The
//! one expensive value, the protection of every pack (a scan of the whole
//! index), comes from a snapshot refreshed at most every
//! [`SNAPSHOT_MAX_AGE`] on a blocking thread, so scraping in a loop cannot
//! turn into a loop of full scans.
//! Names follow `cairn_<subsystem>_<name>_<unit>`; labels stay low-cardinality.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::audit::{ChainStatus, ChainWatch};
use crate::gateway::{Gateway, MetricsSnapshot};
use crate::rpc_metrics::RpcStats;
use crate::scrub::ScrubStats;

/// Oldest snapshot of the node's state a scrape may be answered from.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(10);

/// What the metrics page reads from.
#[derive(Clone)]
pub struct Sources {
    pub gateway: Arc<Gateway>,
    pub scrub: Arc<ScrubStats>,
    pub liveness: Arc<crate::liveness::Liveness>,
    /// The data directory, whose filesystem's space is reported.
    pub data_dir: std::path::PathBuf,
    /// End dates of the node certificate and the CA (`None`: `--insecure`).
    pub tls_expiry: Option<crate::tls::CertExpiry>,
    /// This node's incremental check of its copy of the audit chain.
    pub audit: Arc<ChainWatch>,
    /// Per-method latency and errors, filled by the server's layer.
    pub rpc: RpcStats,
}

/// Values read on a blocking thread at each scrape (a filesystem call and
/// a store read); `None` where the read failed (the metric is left out,
/// which the alert rules treat as "absent", never as healthy zero).
#[derive(Debug, Default, Clone, Copy)]
pub struct Probes {
    /// Capacity and space available to the node, in bytes.
    pub disk: Option<(u64, u64)>,
    pub audit: Option<ChainStatus>,
}

impl Probes {
    /// Reads the disk space of the data directory and advances the audit
    /// chain check.
    pub fn read(sources: &Sources) -> Self {
        let disk = match rustix::fs::statvfs(&sources.data_dir) {
            Ok(fs) => Some((
                fs.f_blocks.saturating_mul(fs.f_frsize),
                fs.f_bavail.saturating_mul(fs.f_frsize),
            )),
            Err(error) => {
                tracing::warn!(%error, path = %sources.data_dir.display(), "cannot read the data directory's disk space; leaving the disk metrics out of this scrape");
                None
            }
        };
        let audit = match sources.audit.check(sources.gateway.meta()) {
            Ok(status) => Some(status),
            Err(error) => {
                tracing::warn!(%error, "cannot read the audit log; leaving the audit metrics out of this scrape");
                None
            }
        };
        Self { disk, audit }
    }
}

/// A snapshot and when it was taken.
type Taken = Option<(Instant, Arc<MetricsSnapshot>)>;

/// The last state snapshot and when it was taken. The async mutex makes one
/// scrape refresh it while the others wait for that refresh.
#[derive(Default, Clone)]
pub struct SnapshotCache {
    last: Arc<tokio::sync::Mutex<Taken>>,
    /// Refreshes so far (each one a scan of the index).
    pub refreshes: Arc<AtomicU64>,
}

impl SnapshotCache {
    /// The cached snapshot, or one taken by `take` (on a blocking thread)
    /// when the cached one is older than `max_age`. `None` only if `take`
    /// panicked and there is no earlier snapshot.
    pub async fn get(
        &self,
        max_age: Duration,
        take: impl FnOnce() -> MetricsSnapshot + Send + 'static,
    ) -> Option<Arc<MetricsSnapshot>> {
        let mut last = self.last.lock().await;
        if let Some((at, snapshot)) = last.as_ref()
            && at.elapsed() < max_age
        {
            return Some(snapshot.clone());
        }
        match tokio::task::spawn_blocking(take).await {
            Ok(snapshot) => {
                let fresh = Arc::new(snapshot);
                self.refreshes.fetch_add(1, Ordering::Relaxed);
                *last = Some((Instant::now(), fresh.clone()));
                Some(fresh)
            }
            Err(error) => {
                tracing::warn!(%error, "metrics snapshot failed; serving the previous one");
                last.as_ref().map(|(_, snapshot)| snapshot.clone())
            }
        }
    }
}

/// Registers a counter with `value` (read from a subsystem's atomic).
pub(crate) fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric: Counter = Counter::default();
    metric.inc_by(value);
    registry.register(name, help, metric);
}

/// Registers a gauge with `value`.
pub(crate) fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let metric: Gauge = Gauge::default();
    metric.set(value);
    registry.register(name, help, metric);
}

fn load(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

/// Space, certificates, the audit chain, gateway bytes, RPCs and the
/// per-region view the dashboard and the alert rules read.
fn render_health(
    registry: &mut Registry,
    sources: &Sources,
    snapshot: &MetricsSnapshot,
    probes: &Probes,
) {
    if let Some((capacity, available)) = probes.disk {
        gauge(
            registry,
            "cairn_disk_capacity_bytes",
            "Size of the filesystem holding the data directory",
            capacity as i64,
        );
        gauge(
            registry,
            "cairn_disk_available_bytes",
            "Bytes of that filesystem available to the node",
            available as i64,
        );
    }
    if let Some(expiry) = sources.tls_expiry {
        let family = Family::<Vec<(&'static str, &'static str)>, Gauge>::default();
        for (certificate, not_after) in [
            ("node", expiry.node_not_after_unix),
            ("ca", expiry.ca_not_after_unix),
        ] {
            family
                .get_or_create(&vec![("certificate", certificate)])
                .set(not_after);
        }
        registry.register(
            "cairn_tls_certificate_expiry_timestamp_seconds",
            "End of validity of this node's certificate and of the cluster CA (Unix seconds)",
            family,
        );
    }
    if let Some(audit) = probes.audit {
        gauge(
            registry,
            "cairn_audit_chain_valid",
            "1 while this node's copy of the audit chain verifies, 0 once a break is found",
            i64::from(audit.valid),
        );
        gauge(
            registry,
            "cairn_audit_entries",
            "Entries in the audit log (seq of the newest)",
            audit.entries as i64,
        );
    }
    let traffic = sources.gateway.traffic();
    counter(
        registry,
        "cairn_gateway_ingest_bytes",
        "Pack bytes acknowledged by PutPack on this gateway",
        load(&traffic.ingest_bytes_total),
    );
    counter(
        registry,
        "cairn_gateway_read_bytes",
        "Pack range bytes answered by ReadPack on this gateway",
        load(&traffic.read_bytes_total),
    );
    sources.rpc.register(registry);
    // Nodes per region from this node's view: one series per region, so the
    // dashboard shows a region going dark without a series per node.
    let mut regions: std::collections::BTreeMap<&str, (i64, i64)> = Default::default();
    for view in &snapshot.nodes {
        let entry = regions.entry(view.region.as_str()).or_default();
        entry.0 += 1;
        entry.1 += i64::from(view.up);
    }
    let nodes = Family::<Vec<(String, String)>, Gauge>::default();
    let nodes_up = Family::<Vec<(String, String)>, Gauge>::default();
    for (region, (all, up)) in regions {
        let labels = vec![("region".to_string(), region.to_string())];
        nodes.get_or_create(&labels).set(all);
        nodes_up.get_or_create(&labels).set(up);
    }
    registry.register(
        "cairn_region_nodes",
        "Member nodes per region (this node's view)",
        nodes,
    );
    registry.register(
        "cairn_region_nodes_up",
        "Member nodes per region not declared down (this node's view)",
        nodes_up,
    );
}

/// Renders the metrics text from `snapshot`, the probes and the live counters.
pub fn render(
    sources: &Sources,
    snapshot: &MetricsSnapshot,
    probes: &Probes,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let repair = sources.gateway.repair_state();
    gauge(
        &mut registry,
        "cairn_raft_term",
        "Current Raft term",
        snapshot.term as i64,
    );
    gauge(
        &mut registry,
        "cairn_raft_leader",
        "1 if this node is the Raft leader",
        i64::from(snapshot.is_leader),
    );
    gauge(
        &mut registry,
        "cairn_raft_last_applied",
        "Last applied log index",
        snapshot.last_applied as i64,
    );
    gauge(
        &mut registry,
        "cairn_shard_store_shards",
        "Shard files held by this node",
        snapshot.shards as i64,
    );
    gauge(
        &mut registry,
        "cairn_shard_store_bytes",
        "Bytes of shard files held by this node",
        snapshot.shard_bytes as i64,
    );
    let packs = Family::<Vec<(String, String)>, Gauge>::default();
    for (state, value) in [
        ("fully_protected", snapshot.protection.fully_protected),
        ("degraded", snapshot.protection.degraded),
        ("at_risk", snapshot.protection.at_risk),
        ("unrecoverable", snapshot.protection.unrecoverable),
        ("misplaced", snapshot.protection.misplaced),
    ] {
        packs
            .get_or_create(&vec![("state".to_string(), state.to_string())])
            .set(value as i64);
    }
    registry.register("cairn_protection_packs", "Packs by protection state", packs);
    let nodes_up = Family::<Vec<(String, String)>, Gauge>::default();
    for view in &snapshot.nodes {
        nodes_up
            .get_or_create(&vec![
                ("node".to_string(), view.id.to_string()),
                ("region".to_string(), view.region.clone()),
            ])
            .set(i64::from(view.up));
    }
    registry.register(
        "cairn_liveness_node_up",
        "1 unless the node is declared down",
        nodes_up,
    );
    let gc = sources.gateway.gc_stats();
    counter(
        &mut registry,
        "cairn_gc_runs",
        "Garbage collections run on this node (as leader; dry runs aside)",
        load(&gc.runs_total),
    );
    counter(
        &mut registry,
        "cairn_gc_errors",
        "Garbage collections that failed",
        load(&gc.failures_total),
    );
    counter(
        &mut registry,
        "cairn_gc_blobs_removed",
        "Index entries swept",
        load(&gc.blobs_removed_total),
    );
    counter(
        &mut registry,
        "cairn_gc_packs_deleted",
        "Packs without a live blob deleted",
        load(&gc.packs_deleted_total),
    );
    counter(
        &mut registry,
        "cairn_gc_packs_repacked",
        "Packs rewritten without their dead blobs",
        load(&gc.packs_repacked_total),
    );
    counter(
        &mut registry,
        "cairn_gc_freed_bytes",
        "Pack bytes (before erasure coding) freed",
        load(&gc.bytes_freed_total),
    );
    gauge(
        &mut registry,
        "cairn_gc_last_success_timestamp_seconds",
        "End of the last garbage collection that finished (0: none on this node)",
        (load(&gc.last_success_unix_ms) / 1000) as i64,
    );
    gauge(
        &mut registry,
        "cairn_gc_last_duration_milliseconds",
        "Duration of the last garbage collection",
        load(&gc.last_duration_ms) as i64,
    );
    gauge(
        &mut registry,
        "cairn_gc_tenants_skipped",
        "Tenants the last garbage collection could not collect",
        load(&gc.last_skipped) as i64,
    );
    gauge(
        &mut registry,
        "cairn_repair_queue_packs",
        "Packs waiting for repair",
        load(&repair.queue) as i64,
    );
    counter(
        &mut registry,
        "cairn_repair_packs_repaired",
        "Packs re-protected or rebalanced",
        load(&repair.packs_repaired_total),
    );
    counter(
        &mut registry,
        "cairn_repair_shards_written",
        "Shards written by repair",
        load(&repair.shards_written_total),
    );
    counter(
        &mut registry,
        "cairn_repair_written_bytes",
        "Bytes written by repair",
        load(&repair.bytes_written_total),
    );
    counter(
        &mut registry,
        "cairn_repair_errors",
        "Failed pack repairs",
        load(&repair.errors_total),
    );
    gauge(
        &mut registry,
        "cairn_repair_last_pass_timestamp_seconds",
        "End of the last repair pass",
        (load(&repair.last_pass_unix_ms) / 1000) as i64,
    );
    counter(
        &mut registry,
        "cairn_scrub_rounds",
        "Completed scrub rounds",
        load(&sources.scrub.rounds_total),
    );
    counter(
        &mut registry,
        "cairn_scrub_shards_checked",
        "Shards verified by scrub",
        load(&sources.scrub.shards_checked_total),
    );
    counter(
        &mut registry,
        "cairn_scrub_checked_bytes",
        "Bytes verified by scrub",
        load(&sources.scrub.bytes_checked_total),
    );
    counter(
        &mut registry,
        "cairn_scrub_faults",
        "Corrupt or missing shards found by scrub",
        load(&sources.scrub.faults_total),
    );
    // Every background worker: a last-success timestamp, an error counter
    // and a queue length, so a stuck worker can raise an alert.
    gauge(
        &mut registry,
        "cairn_repair_last_success_timestamp_seconds",
        "End of the last repair round that finished without errors (followers: last idle round)",
        (load(&repair.last_success_unix_ms) / 1000) as i64,
    );
    counter(
        &mut registry,
        "cairn_repair_lost",
        "Pack repairs that lost the placement compare-and-set to another writer",
        load(&repair.passes_lost_total),
    );
    counter(
        &mut registry,
        "cairn_repair_shards_cleaned",
        "Shards written by failed or lost repairs and deleted again",
        load(&repair.shards_cleaned_total),
    );
    gauge(
        &mut registry,
        "cairn_repair_bad_shards",
        "Bad shards reported and not yet repaired",
        repair.bad_len() as i64,
    );
    let scrub = &sources.scrub;
    gauge(
        &mut registry,
        "cairn_scrub_last_success_timestamp_seconds",
        "End of the last finished scrub round",
        (load(&scrub.last_success_unix_ms) / 1000) as i64,
    );
    counter(
        &mut registry,
        "cairn_scrub_errors",
        "Scrub rounds, files or reports that failed",
        load(&scrub.errors_total),
    );
    gauge(
        &mut registry,
        "cairn_scrub_queue_faults",
        "Faults found by scrub and not yet taken by the leader",
        load(&scrub.queue) as i64,
    );
    gauge(
        &mut registry,
        "cairn_scrub_orphan_shards",
        "Shard files no index entry names, left at the end of the last round (younger than the grace period)",
        load(&scrub.orphan_shards) as i64,
    );
    gauge(
        &mut registry,
        "cairn_scrub_orphan_bytes",
        "Bytes of the orphan shard files left at the end of the last round",
        load(&scrub.orphan_bytes) as i64,
    );
    counter(
        &mut registry,
        "cairn_scrub_orphans_deleted",
        "Orphan shard files deleted after the grace period",
        load(&scrub.orphans_deleted_total),
    );
    counter(
        &mut registry,
        "cairn_scrub_orphan_deleted_bytes",
        "Bytes of orphan shard files deleted",
        load(&scrub.orphan_bytes_deleted_total),
    );
    counter(
        &mut registry,
        "cairn_scrub_misfiled",
        "Shard files holding another shard than their name, quarantined",
        load(&scrub.misfiled_total),
    );
    let prober = &sources.liveness.prober;
    gauge(
        &mut registry,
        "cairn_liveness_last_success_timestamp_seconds",
        "End of the last liveness probe round",
        (load(&prober.last_success_unix_ms) / 1000) as i64,
    );
    counter(
        &mut registry,
        "cairn_liveness_probe_errors",
        "Liveness probes that got no answer",
        load(&prober.errors_total),
    );
    gauge(
        &mut registry,
        "cairn_liveness_queue_probes",
        "Probes in the round in flight",
        load(&prober.queue) as i64,
    );
    crate::tiering::register_metrics(&mut registry, &sources.gateway, snapshot);
    crate::gateway::stream::register_metrics(&mut registry, &sources.gateway);
    render_health(&mut registry, sources, snapshot, probes);
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

/// Whether a scrape may read the page: on a secure node, a bearer token of
/// a `monitor` or `cluster-admin` (Prometheus: `authorization:
/// credentials_file`). 401 without a valid token, 403 for another role.
fn scrape_allowed(sources: &Sources, headers: &header::HeaderMap) -> Result<(), StatusCode> {
    use crate::auth::layer::Authenticator;
    use crate::auth::permission::{Op, authorize};
    let auth = sources.gateway.authenticator();
    if auth.insecure() {
        return Ok(());
    }
    let token = Authenticator::bearer(headers)
        .ok_or(StatusCode::UNAUTHORIZED)?
        .map_err(|_| StatusCode::UNAUTHORIZED)?;
    let caller = auth
        .token_caller(token)
        .map_err(|_| StatusCode::UNAUTHORIZED)?;
    authorize(&caller, Op::Metrics, "")
        .map(|_| ())
        .map_err(|_| StatusCode::FORBIDDEN)
}

/// Serves `/metrics` until `shutdown` flips.
pub async fn serve(listener: TcpListener, sources: Sources, mut shutdown: watch::Receiver<bool>) {
    let cache = SnapshotCache::default();
    let app = Router::new().route(
        "/metrics",
        get(move |headers: header::HeaderMap| {
            let sources = sources.clone();
            let cache = cache.clone();
            async move {
                if let Err(code) = scrape_allowed(&sources, &headers) {
                    return (
                        code,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        "metrics need a monitor or cluster-admin token\n",
                    )
                        .into_response();
                }
                let gateway = sources.gateway.clone();
                let snapshot = cache
                    .get(SNAPSHOT_MAX_AGE, move || gateway.metrics_snapshot())
                    .await;
                let probed = sources.clone();
                let probes = tokio::task::spawn_blocking(move || Probes::read(&probed))
                    .await
                    .unwrap_or_default();
                match snapshot.map(|snapshot| render(&sources, &snapshot, &probes)) {
                    Some(Ok(text)) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                }
            }
        }),
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(term: u64) -> MetricsSnapshot {
        MetricsSnapshot {
            term,
            is_leader: false,
            last_applied: 0,
            shards: 0,
            shard_bytes: 0,
            protection: Default::default(),
            nodes: Vec::new(),
        }
    }

    #[tokio::test]
    async fn scrapes_in_a_loop_take_one_snapshot_per_max_age() {
        let cache = SnapshotCache::default();
        let taken = Arc::new(AtomicU64::new(0));
        for _ in 0..100 {
            let taken = taken.clone();
            let got = cache
                .get(Duration::from_secs(60), move || {
                    snapshot(taken.fetch_add(1, Ordering::Relaxed) + 1)
                })
                .await
                .expect("snapshot");
            assert_eq!(got.term, 1);
        }
        assert_eq!(taken.load(Ordering::Relaxed), 1);
        // An expired snapshot is taken again.
        let got = cache
            .get(Duration::ZERO, || snapshot(2))
            .await
            .expect("snapshot");
        assert_eq!(got.term, 2);
        assert_eq!(cache.refreshes.load(Ordering::Relaxed), 2);
        // A failed refresh serves the previous snapshot.
        let got = cache
            .get(Duration::ZERO, || panic!("scan failed"))
            .await
            .expect("previous snapshot");
        assert_eq!(got.term, 2);
    }
}
