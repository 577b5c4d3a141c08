//! Garbage collection without the tenant's key, run by the Raft leader.
//!
//! Liveness comes from the snapshots' reference lists (plaintext segments
//! of opaque blob ids, `cairn_proto::refs`). Per tenant: mark what the
//! snapshots reference, sweep the index entries nothing references (except
//! in packs a running backup may still commit: the grace period), then
//! drop packs left without a live blob and repack packs mostly dead.
//!
//! Memory is bounded: the id space is cut into partitions of at most
//! [`mark::PARTITION_ENTRIES_MAX`] index entries; each is marked and swept
//! on its own, the index read page by page. Safety against a backup
//! committing meanwhile is the state machine's (see `meta/gc_state.rs`):
//! a sweep carries the catalog sequence it marked at and is refused after
//! any commit; the collector then marks the new snapshots and tries again.
//!
//! A run may stop anywhere (a caller's deadline, a leader change, a
//! crash) and leave nothing unsafe: a pack whose entries were swept but
//! which was not dropped yet has no entry left and is dropped by the next
//! run; shards written for a repack that was not committed, or of a pack
//! dropped but not yet deleted, are orphans the scrub removes.

pub mod mark;
pub mod repack;
pub mod scan;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_proto::v1 as pb;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::gateway::{Gateway, GatewayError};
use crate::meta::state::StateView;
use crate::meta::types::{
    Actor, BlobLocation, Command, CommandResult, Id32, PackRecord, RefSegment, SnapshotLife,
};
use mark::{Partition, partition_count, partitions};
use scan::{Marks, for_each_entry, for_each_pack, may_still_commit};
/// Most ids in one `SweepBlobs` entry.
const SWEEP_BATCH: usize = 8192;
/// Packs repacked per index scan: the scan gathers their live blobs' locations,
/// so memory stays bounded; a run scans again for the next batch until every
/// pack below the threshold is rewritten (a prune leaves no dead blob behind).
const REPACK_PACKS_PER_SCAN: usize = 64;
/// Sweeps of one batch tried while backups keep committing.
const SWEEP_ATTEMPTS_MAX: usize = 20;

/// What one collection did (or, on a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub blobs_live: u64,
    pub blobs_removed: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub bytes_freed: u64,
    pub bytes_repacked: u64,
    pub shards_deleted: u64,
    pub packs_in_grace: u64,
    pub duration_ms: u64,
    pub dry_run: bool,
    pub skipped: Vec<String>,
}

impl PruneReport {
    pub fn to_wire(&self) -> pb::PruneReply {
        pb::PruneReply {
            blobs_live: self.blobs_live,
            blobs_removed: self.blobs_removed,
            packs_deleted: self.packs_deleted,
            packs_repacked: self.packs_repacked,
            bytes_freed: self.bytes_freed,
            bytes_repacked: self.bytes_repacked,
            shards_deleted: self.shards_deleted,
            packs_in_grace: self.packs_in_grace,
            duration_ms: self.duration_ms,
            dry_run: self.dry_run,
            skipped: self.skipped.clone(),
        }
    }

    /// One line for the audit log and the node's log.
    pub fn summary(&self) -> String {
        format!(
            "ok{}: {} blobs removed ({} live), {} packs deleted, {} repacked, {} bytes freed, {} shards deleted, {} packs in grace{}",
            if self.dry_run { " (dry run)" } else { "" },
            self.blobs_removed,
            self.blobs_live,
            self.packs_deleted,
            self.packs_repacked,
            self.bytes_freed,
            self.shards_deleted,
            self.packs_in_grace,
            if self.skipped.is_empty() {
                String::new()
            } else {
                format!("; skipped: {}", self.skipped.join("; "))
            }
        )
    }
}

/// What this node's collections did, for `/metrics` (counters since start).
#[derive(Debug, Default)]
pub struct GcStats {
    pub runs_total: AtomicU64,
    pub failures_total: AtomicU64,
    pub blobs_removed_total: AtomicU64,
    pub packs_deleted_total: AtomicU64,
    pub packs_repacked_total: AtomicU64,
    pub bytes_freed_total: AtomicU64,
    /// End of the last collection that finished (dry runs aside), Unix ms.
    pub last_success_unix_ms: AtomicU64,
    pub last_duration_ms: AtomicU64,
    /// Tenants the last collection skipped (e.g. snapshots without references).
    pub last_skipped: AtomicU64,
}

impl GcStats {
    fn record(&self, outcome: &Result<PruneReport, GatewayError>) {
        let add = |counter: &AtomicU64, n: u64| counter.fetch_add(n, Ordering::Relaxed);
        match outcome {
            Ok(report) if report.dry_run => {}
            Ok(report) => {
                add(&self.runs_total, 1);
                add(&self.blobs_removed_total, report.blobs_removed);
                add(&self.packs_deleted_total, report.packs_deleted);
                add(&self.packs_repacked_total, report.packs_repacked);
                add(&self.bytes_freed_total, report.bytes_freed);
                self.last_duration_ms
                    .store(report.duration_ms, Ordering::Relaxed);
                self.last_skipped
                    .store(report.skipped.len() as u64, Ordering::Relaxed);
                self.last_success_unix_ms.store(
                    u64::try_from(crate::meta::wall_clock_ms()).unwrap_or(0),
                    Ordering::Relaxed,
                );
            }
            Err(_) => {
                add(&self.runs_total, 1);
                add(&self.failures_total, 1);
            }
        }
    }
}

/// One pack of the tenant as the collection sees it.
struct PackAcc {
    record: PackRecord,
    /// Bytes of the blobs it was stored with (live share = live / this).
    blob_bytes: u64,
    /// A backup may still commit it: nothing of it is swept or dropped.
    protected: bool,
    live_blobs: u64,
    live_bytes: u64,
    /// Dead entries kept because the pack is protected.
    kept_blobs: u64,
}

/// Why one tenant's collection stopped.
enum Stop {
    /// Not collectable now; the reason goes into `skipped`.
    Skip(String),
    Failed(GatewayError),
}

impl From<GatewayError> for Stop {
    fn from(error: GatewayError) -> Self {
        Stop::Failed(error)
    }
}

impl From<crate::meta::state::StateError> for Stop {
    fn from(error: crate::meta::state::StateError) -> Self {
        Stop::Failed(error.into())
    }
}

impl From<crate::meta::MetaError> for Stop {
    fn from(error: crate::meta::MetaError) -> Self {
        Stop::Failed(error.into())
    }
}

/// Runs one collection of `tenant` (every tenant when `None`). One at a
/// time per node: a second caller waits for the running one, then runs.
/// Call on the leader only (the periodic task and `Prune` make sure).
pub async fn collect(
    gw: &Gateway,
    tenant: Option<&str>,
    dry_run: bool,
) -> Result<PruneReport, GatewayError> {
    let _one_at_a_time = gw.gc_lock().lock().await;
    let outcome = collect_locked(gw, tenant, dry_run).await;
    gw.gc_stats().record(&outcome);
    outcome
}

async fn collect_locked(
    gw: &Gateway,
    tenant: Option<&str>,
    dry_run: bool,
) -> Result<PruneReport, GatewayError> {
    let started = Instant::now();
    let mut report = PruneReport {
        dry_run,
        ..PruneReport::default()
    };
    gw.read_barrier().await;
    let tenants: Vec<String> = match tenant {
        Some(t) => vec![t.to_string()],
        None => tenants_with_packs(&gw.meta().view()?).await?,
    };
    for tenant in &tenants {
        match collect_tenant(gw, tenant, dry_run, &mut report).await {
            Ok(()) => {}
            Err(Stop::Skip(reason)) => report.skipped.push(format!("tenant {tenant}: {reason}")),
            Err(Stop::Failed(error)) if tenants.len() > 1 => {
                warn!(%tenant, %error, "garbage collection of a tenant failed; the next run retries it");
                report.skipped.push(format!(
                    "tenant {tenant}: failed ({error}); retried next run"
                ));
            }
            Err(Stop::Failed(error)) => return Err(error),
        }
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    info!(
        tenants = tenants.len(),
        dry_run,
        blobs_removed = report.blobs_removed,
        packs_deleted = report.packs_deleted,
        packs_repacked = report.packs_repacked,
        bytes_freed = report.bytes_freed,
        shards_deleted = report.shards_deleted,
        packs_in_grace = report.packs_in_grace,
        duration_ms = report.duration_ms,
        "garbage collection done"
    );
    Ok(report)
}

/// Every tenant that owns a pack (paged over the pack records).
async fn tenants_with_packs(view: &StateView) -> Result<Vec<String>, GatewayError> {
    let mut tenants = BTreeSet::new();
    for_each_pack(view, |pack, _| {
        tenants.insert(pack.tenant);
        Ok::<_, GatewayError>(())
    })
    .await?;
    Ok(tenants.into_iter().collect())
}

/// The marks of all the tenant's snapshots; a snapshot without a life
/// (committed by an older client) makes the tenant uncollectable.
fn tenant_marks(view: &StateView, tenant: &str) -> Result<Marks, Stop> {
    Marks::of_tenant(view, tenant, |_, _| true)?.map_err(|without| {
        Stop::Skip(format!(
            "{without} snapshot(s) without a reference list (committed by an older client); forget them, or back up again with a current client and forget them, before this tenant's space can be collected"
        ))
    })
}

async fn collect_tenant(
    gw: &Gateway,
    tenant: &str,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<(), Stop> {
    let view = gw.meta().view()?;
    // The sequence first: every snapshot read below is at or before it.
    let mut seq = view.catalog_seq()?;
    // Cluster time is the leader's clock, and the collector runs on the
    // leader: the applied clock only moves with writes, so an idle cluster
    // would otherwise never see a killed backup's grace period end.
    let now = view.clock()?.max(crate::meta::wall_clock_ms());
    let grace_ms = i64::try_from(gw.lifecycle().gc_grace.as_millis()).unwrap_or(i64::MAX);
    let mut marks = tenant_marks(&view, tenant)?;

    // The tenant's packs, with their protection.
    let mut packs: HashMap<Id32, PackAcc> = HashMap::new();
    for_each_pack(&view, |record, life| {
        if record.tenant != tenant {
            return Ok(());
        }
        let protected = may_still_commit(&view, life.as_ref(), now, grace_ms)?;
        // Old packs (no life) weigh against their whole length, trailer
        // included: repacked once at the 100% threshold, then exact.
        let blob_bytes = life.map_or(record.pack_len, |l| l.blob_bytes);
        packs.insert(
            record.id,
            PackAcc {
                record,
                blob_bytes,
                protected,
                live_blobs: 0,
                live_bytes: 0,
                kept_blobs: 0,
            },
        );
        Ok::<_, Stop>(())
    })
    .await?;

    marks.add_stream_segments(&view, tenant)?;

    let entries = view.stats()?.blobs;
    for partition in partitions(partition_count(entries)) {
        let mut live = mark_partition(gw, tenant, &marks.segments, &partition).await?;
        let mut candidates: Vec<(Id32, BlobLocation)> = Vec::new();
        for_each_entry(&view, tenant, &partition, |id, location| {
            let acc = packs.get_mut(&location.pack_id);
            if live.contains(&id) || marks.always_live.contains(&id) {
                report.blobs_live += 1;
                if let Some(acc) = acc {
                    acc.live_blobs += 1;
                    acc.live_bytes += u64::from(location.length);
                }
                return Ok(());
            }
            match acc {
                // A pack record and its entries are added in one batch: an
                // entry whose pack has no record is dangling (left by a
                // crash), one whose pack appeared after the pack scan
                // belongs to a running backup and stays.
                None if view.pack(&location.pack_id)?.is_none() => candidates.push((id, location)),
                None => {}
                Some(acc) if acc.protected => acc.kept_blobs += 1,
                Some(_) => candidates.push((id, location)),
            }
            Ok::<_, Stop>(())
        })
        .await?;
        if dry_run {
            report.blobs_removed += candidates.len() as u64;
            continue;
        }
        // Sweep in batches; after a commit, mark the new snapshots first.
        let mut done = 0usize;
        let mut attempts = 0usize;
        while done < candidates.len() {
            let end = (done + SWEEP_BATCH).min(candidates.len());
            let ids: Vec<Id32> = candidates[done..end].iter().map(|(id, _)| *id).collect();
            let cmd = Command::SweepBlobs {
                tenant: tenant.to_string(),
                ids,
                catalog_seq: seq,
            };
            match gw.meta().write(cmd).await? {
                CommandResult::CatalogChanged => {
                    attempts += 1;
                    if attempts > SWEEP_ATTEMPTS_MAX {
                        return Err(Stop::Skip(
                            "backups kept committing during the sweep; retried next run".into(),
                        ));
                    }
                    let view = gw.meta().view()?;
                    let new_seq = view.catalog_seq()?;
                    let rescued =
                        mark_new_snapshots(gw, tenant, seq, &partition, &mut marks).await?;
                    live.extend(rescued);
                    seq = new_seq;
                    // Candidates the new snapshots reference are live now.
                    let (still_dead, now_live): (Vec<_>, Vec<_>) = candidates
                        .drain(done..)
                        .partition(|(id, _)| !live.contains(id) && !marks.always_live.contains(id));
                    for (_, location) in now_live {
                        report.blobs_live += 1;
                        if let Some(acc) = packs.get_mut(&location.pack_id) {
                            acc.live_blobs += 1;
                            acc.live_bytes += u64::from(location.length);
                        }
                    }
                    candidates.extend(still_dead);
                }
                _ => {
                    report.blobs_removed += (end - done) as u64;
                    done = end;
                }
            }
        }
        debug!(%tenant, lo = %hex::encode(&partition.lo[..2]), swept = candidates.len(), "partition swept");
    }

    // Packs: drop those without a live blob, repack those mostly dead.
    let threshold = u64::from(gw.lifecycle().repack_below_percent.min(100));
    let mut to_repack: Vec<Id32> = Vec::new();
    let mut pack_list: Vec<PackAcc> = packs.into_values().collect();
    pack_list.sort_by_key(|p| p.record.id);
    for acc in &pack_list {
        if acc.protected {
            if acc.live_blobs == 0 {
                report.packs_in_grace += 1;
            }
            continue;
        }
        if acc.live_blobs == 0 && acc.kept_blobs == 0 {
            drop_pack(gw, &acc.record, dry_run, report).await?;
        } else if acc.live_bytes.saturating_mul(100) < acc.blob_bytes.saturating_mul(threshold) {
            to_repack.push(acc.record.id);
        }
    }
    let by_id: HashMap<Id32, &PackAcc> = pack_list.iter().map(|p| (p.record.id, p)).collect();
    for batch in to_repack.chunks(REPACK_PACKS_PER_SCAN) {
        repack_batch(gw, tenant, batch, &by_id, dry_run, report).await?;
    }
    Ok(())
}

/// Repacks `batch`: one paged scan of the tenant's index finds the live
/// blobs of those packs, then each is rewritten.
async fn repack_batch(
    gw: &Gateway,
    tenant: &str,
    batch: &[Id32],
    by_id: &HashMap<Id32, &PackAcc>,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<(), Stop> {
    let mut live_of: HashMap<Id32, Vec<(Id32, BlobLocation)>> =
        batch.iter().map(|id| (*id, Vec::new())).collect();
    let view = gw.meta().view()?;
    for_each_entry(&view, tenant, &Partition::WHOLE, |id, location| {
        if let Some(list) = live_of.get_mut(&location.pack_id) {
            list.push((id, location));
        }
        Ok::<_, Stop>(())
    })
    .await?;
    for old in batch {
        let (Some(acc), Some(blobs)) = (by_id.get(old), live_of.remove(old)) else {
            continue;
        };
        if let Err(error) = repack_pack(gw, &acc.record, blobs, dry_run, report).await {
            warn!(pack_id = %hex::encode(old), %error, "repacking failed; the next run retries it");
        }
    }
    Ok(())
}

/// The ids in `partition` that `segments` list. A segment that cannot be
/// read leaves the mark incomplete: stop the tenant rather than sweep what
/// it may reference.
async fn mark_partition(
    gw: &Gateway,
    tenant: &str,
    segments: &[RefSegment],
    partition: &Partition,
) -> Result<HashSet<Id32>, Stop> {
    scan::mark_partition(gw, tenant, segments, partition)
        .await
        .map_err(|unreadable| Stop::Skip(format!("{unreadable}; nothing swept")))
}

/// Marks the snapshots committed after catalog sequence `seq`: adds them
/// to `marks` (for the partitions still to come) and returns the ids of
/// `partition` they reference.
async fn mark_new_snapshots(
    gw: &Gateway,
    tenant: &str,
    seq: u64,
    partition: &Partition,
    marks: &mut Marks,
) -> Result<HashSet<Id32>, Stop> {
    let view = gw.meta().view()?;
    let lives: HashMap<Id32, SnapshotLife> = view.snapshot_lives(tenant)?.into_iter().collect();
    let mut new_segments = Vec::new();
    for snapshot in view.snapshots(tenant, None)? {
        match lives.get(&snapshot.id) {
            Some(life) if life.catalog_seq > seq => {
                new_segments.extend(life.refs.iter().copied());
                marks.add(Some(snapshot.root_tree), life);
            }
            Some(_) => {}
            // A new snapshot without a life (an older client) stops the tenant.
            None => {
                return Err(Stop::Skip(
                    "a snapshot without a reference list was committed during the collection; nothing more swept".into(),
                ));
            }
        }
    }
    mark_partition(gw, tenant, &new_segments, partition).await
}

/// Distinct blobs that `snapshots` (root tree and life of each) reference,
/// and their stored bytes: a mark of their reference lists, partition by
/// partition, so memory stays bounded as in a collection.
pub async fn referenced(
    gw: &Gateway,
    tenant: &str,
    snapshots: &[(Id32, SnapshotLife)],
) -> Result<(u64, u64), GatewayError> {
    let mut marks = Marks::default();
    for (root, life) in snapshots {
        marks.add(Some(*root), life);
    }
    let view = gw.meta().view()?;
    let (mut blobs, mut bytes) = (0u64, 0u64);
    for partition in partitions(partition_count(view.stats()?.blobs)) {
        let mut live = mark_partition(gw, tenant, &marks.segments, &partition)
            .await
            .map_err(|stop| match stop {
                Stop::Skip(what) => GatewayError::Precondition { what },
                Stop::Failed(error) => error,
            })?;
        live.extend(
            marks
                .always_live
                .iter()
                .filter(|id| partition.contains(id))
                .copied(),
        );
        for id in live {
            if let Some(location) = view.locate_blob(tenant, &id)? {
                blobs += 1;
                bytes += u64::from(location.length);
            }
        }
    }
    Ok((blobs, bytes))
}

/// Deletes every shard of `pack` (after its record is gone); failures are
/// logged: the scrub's orphan sweep removes what is left.
async fn delete_shards(gw: &Gateway, pack: &PackRecord) -> u64 {
    let members = gw.member_views();
    let mut deleted = 0;
    for placement in &pack.shards {
        // The same bytes uploaded again since (same id) own these files
        // now; when in doubt, the orphan sweep decides later.
        if !matches!(gw.meta().pack(&pack.id), Ok(None)) {
            debug!(pack_id = %hex::encode(pack.id), "pack stored again meanwhile (or unknown); its shards stay");
            break;
        }
        match gw
            .shard_io()
            .delete(placement.node, &pack.id, placement.index, &members)
            .await
        {
            Ok(()) => deleted += 1,
            Err(error) => {
                debug!(pack_id = %hex::encode(pack.id), shard_idx = placement.index, node_id = placement.node, %error,
                    "shard of a collected pack not deleted; the orphan sweep removes it")
            }
        }
    }
    deleted
}

async fn drop_pack(
    gw: &Gateway,
    pack: &PackRecord,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<(), Stop> {
    if dry_run {
        report.packs_deleted += 1;
        report.bytes_freed += pack.pack_len;
        report.shards_deleted += pack.shards.len() as u64;
        return Ok(());
    }
    match gw.meta().write(Command::DropPack { id: pack.id }).await? {
        CommandResult::Ok => {
            report.packs_deleted += 1;
            report.bytes_freed += pack.pack_len;
            report.shards_deleted += delete_shards(gw, pack).await;
        }
        other => {
            debug!(pack_id = %hex::encode(pack.id), result = other.audit_text(), "pack already gone")
        }
    }
    Ok(())
}

/// Copies the live blobs of `old` into a node-made pack, commits the move
/// and deletes the old shards. One pack in memory at a time.
async fn repack_pack(
    gw: &Gateway,
    old: &PackRecord,
    mut blobs: Vec<(Id32, BlobLocation)>,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<(), GatewayError> {
    if blobs.is_empty() {
        return Ok(());
    }
    blobs.sort_by_key(|(_, loc)| loc.offset);
    let live: u64 = blobs.iter().map(|(_, l)| u64::from(l.length)).sum();
    if dry_run {
        report.packs_repacked += 1;
        report.bytes_repacked += live;
        report.bytes_freed += old.pack_len.saturating_sub(live);
        report.shards_deleted += old.shards.len() as u64;
        return Ok(());
    }
    let ranges: Vec<(u64, u64)> = blobs
        .iter()
        .map(|(_, l)| (l.offset, u64::from(l.length)))
        .collect();
    let data = gw.read_pack_ranges(&old.id, &ranges).await?;
    let contents: Vec<(Id32, Vec<u8>)> = blobs.iter().map(|(id, _)| *id).zip(data).collect();
    let new = repack::build(&contents);
    drop(contents);
    let new_len = new.bytes.len() as u64;
    let record = gw
        .store_pack(&old.tenant, new.id, prost::bytes::Bytes::from(new.bytes))
        .await?;
    let cmd = Command::Repack {
        old: old.id,
        new: record.clone(),
        blobs: new.locations,
    };
    match gw.meta().write(cmd).await? {
        CommandResult::Ok => {
            report.packs_repacked += 1;
            report.bytes_repacked += live;
            report.bytes_freed += old.pack_len.saturating_sub(new_len);
            report.shards_deleted += delete_shards(gw, old).await;
        }
        other => {
            // Not applied (the old pack went meanwhile). The new shards are
            // left to the scrub's orphan sweep rather than deleted here: a
            // pack of the same bytes (same id) may have been committed by
            // another collector, and its shards must not be touched.
            debug!(pack_id = %hex::encode(old.id), new_pack = %hex::encode(record.id),
                result = other.audit_text(), "repack not applied; its shards are left to the orphan sweep");
        }
    }
    Ok(())
}

/// The actor of the leader's own collections in the audit log.
fn node_actor(node_id: u64) -> Actor {
    Actor {
        kind: "node".into(),
        node_id,
        ..Actor::default()
    }
}

/// Every `interval`, while this node leads, collects every tenant and
/// records the run in the audit log. Stops with `shutdown`.
pub async fn run(gw: Arc<Gateway>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    let interval = interval.max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        if !gw.is_leader() {
            continue;
        }
        let result = match collect(&gw, None, false).await {
            Ok(report) => report.summary(),
            Err(error) => {
                warn!(%error, "garbage collection failed; retrying next interval");
                format!("failed: {error}")
            }
        };
        let entry = Command::Audit {
            at: 0,
            actor: node_actor(gw.meta().node_id()),
            action: "Prune".into(),
            target: "every tenant (periodic)".into(),
            result,
        };
        if let Err(error) = gw.meta().write(entry).await {
            warn!(%error, "garbage collection ran but its audit entry was not written");
        }
    }
}
