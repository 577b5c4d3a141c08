//! One mover pass: which packs belong in which class, and moving them.
//!
//! "Hot blobs" are those a young snapshot references: younger than its
//! dataset's `cold_after` (cluster commit time, `SnapshotLife`), or of a
//! dataset without one. They are marked with the collector's bounded mark
//! (`gc::mark`: id-range partitions, the reference segments that overlap
//! each), so memory stays one partition's set plus a counter per pack.
//! A pack belongs in the cold tier when it holds at least one indexed blob,
//! none of them hot, and its backup session is committed (a running
//! backup's packs never move); a cold pack holding a hot blob is promoted
//! back. Tenants without a policy that has `cold_after` are left alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::config::TieringSection;
use crate::gateway::{Gateway, GatewayError};
use crate::gc::mark::{partition_count, partitions};
use crate::gc::scan::{
    Marks, UnreadableSegment, for_each_entry, for_each_pack, mark_partition, may_still_commit,
};
use crate::meta::state::StateView;
use crate::meta::types::Id32;
use crate::model::StorageClass;
use crate::repair::{RateLimiter, RepairError};

/// What one pass found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// Packs in the wrong class.
    pub queued: u64,
    pub moved: u64,
    pub bytes: u64,
    /// Packs due for the cold tier that the cold nodes cannot hold.
    pub blocked: u64,
    pub errors: u64,
}

/// One tenant's pack as the pass sees it.
#[derive(Default)]
struct PackAcc {
    indexed: u64,
    hot: bool,
    /// Its backup committed (or it was made by the collector).
    settled: bool,
}

/// Why a tenant's classes could not be decided this pass.
#[derive(Debug, thiserror::Error)]
enum Skip {
    #[error(
        "{0} snapshot(s) without a reference list (committed by an older client): nothing of this tenant moves until they are forgotten"
    )]
    NoReferences(usize),
    #[error("{0}; nothing of this tenant moves this pass")]
    Segment(#[from] UnreadableSegment),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

impl From<crate::meta::state::StateError> for Skip {
    fn from(error: crate::meta::state::StateError) -> Self {
        Skip::Gateway(error.into())
    }
}

/// Runs one pass on the leader: decide every pack's class, then move up to
/// `packs_per_pass` of the misplaced ones under the rate limit.
pub async fn pass(gw: &Gateway, config: &TieringSection) -> Result<PassOutcome, GatewayError> {
    let stats = gw.tiering().clone();
    gw.read_barrier().await;
    let view = gw.meta().view()?;
    let now = view.clock()?.max(crate::meta::wall_clock_ms());
    let grace_ms = i64::try_from(gw.lifecycle().gc_grace.as_millis()).unwrap_or(i64::MAX);
    let mut cold_after: BTreeMap<String, HashMap<String, u64>> = BTreeMap::new();
    for (tenant, policy) in view.all_policies()? {
        cold_after
            .entry(tenant)
            .or_default()
            .insert(policy.dataset, policy.cold_after_ms);
    }
    let classes = view.pack_classes()?;
    let mut outcome = PassOutcome::default();
    // (pack, wanted class), promotions first: a restore reads hot packs.
    let mut moves: Vec<(Id32, StorageClass)> = Vec::new();
    let mut decided: HashSet<&str> = HashSet::new();
    for (tenant, datasets) in &cold_after {
        if datasets.values().all(|&ms| ms == 0) {
            continue;
        }
        decided.insert(tenant.as_str());
        match wanted_classes(gw, &view, tenant, datasets, now, grace_ms).await {
            Ok(wanted) => {
                for (pack, class) in wanted {
                    if classes.get(&pack).copied().unwrap_or_default() != class {
                        moves.push((pack, class));
                    }
                }
            }
            Err(error) => {
                outcome.errors += 1;
                stats.errors_total.fetch_add(1, Ordering::Relaxed);
                warn!(%tenant, %error, "tiering skipped a tenant; retrying next pass");
            }
        }
    }
    // Cold packs of a tenant that no longer has a cold_after go back to hot.
    for (id, class) in &classes {
        if *class == StorageClass::Cold
            && let Some(pack) = view.pack(id)?
            && !decided.contains(pack.tenant.as_str())
        {
            moves.push((*id, StorageClass::Hot));
        }
    }
    moves.sort_by_key(|(id, class)| (*class == StorageClass::Cold, *id));
    outcome.queued = moves.len() as u64;
    stats.queue_packs.store(outcome.queued, Ordering::Relaxed);

    let started = Instant::now();
    let mut limiter = RateLimiter::new(config.rate_bytes_per_s);
    for (pack, class) in moves.into_iter().take(config.packs_per_pass) {
        if !gw.is_leader() {
            break;
        }
        match gw.repairer().move_pack(&pack, class, &mut limiter).await {
            Ok(Some(bytes)) => {
                outcome.moved += 1;
                outcome.bytes += bytes;
                stats.moved_packs_total.fetch_add(1, Ordering::Relaxed);
                stats.moved_bytes_total.fetch_add(bytes, Ordering::Relaxed);
                stats.queue_packs.fetch_sub(1, Ordering::Relaxed);
                debug!(pack_id = %hex::encode(pack), storage_class = %class, bytes, "pack moved");
            }
            Ok(None) if class == StorageClass::Cold => outcome.blocked += 1,
            Ok(None) => {}
            Err(RepairError::PackVanished) => {}
            Err(error) => {
                outcome.errors += 1;
                stats.errors_total.fetch_add(1, Ordering::Relaxed);
                warn!(pack_id = %hex::encode(pack), storage_class = %class, %error,
                    "pack not moved; retrying next pass");
            }
        }
    }
    stats
        .blocked_packs
        .store(outcome.blocked, Ordering::Relaxed);
    if outcome.blocked > 0 {
        warn!(
            packs = outcome.blocked,
            "packs due for the cold tier stay hot: the cold nodes up cannot hold them with at most m shards per region; add cold nodes in more regions"
        );
    }
    if outcome.moved > 0 {
        let rate = outcome.bytes as f64 / started.elapsed().as_secs_f64().max(1e-3);
        stats
            .rate_milli_bytes_per_s
            .store((rate * 1000.0) as u64, Ordering::Relaxed);
        info!(
            moved = outcome.moved,
            bytes = outcome.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            queued = outcome.queued,
            errors = outcome.errors,
            "tiering pass done"
        );
    }
    Ok(outcome)
}

/// The class every pack of `tenant` belongs in (packs that stay as they
/// are, e.g. of a running backup, are left out).
async fn wanted_classes(
    gw: &Gateway,
    view: &StateView,
    tenant: &str,
    cold_after: &HashMap<String, u64>,
    now: i64,
    grace_ms: i64,
) -> Result<Vec<(Id32, StorageClass)>, Skip> {
    // Hot: what the young snapshots (and those of datasets without a
    // cold-after) reference.
    let mut marks = Marks::of_tenant(view, tenant, |snapshot, life| {
        let after = cold_after.get(&snapshot.dataset).copied().unwrap_or(0);
        let age = u64::try_from(now.saturating_sub(life.committed_unix_ms)).unwrap_or(0);
        after == 0 || age < after
    })?
    .map_err(Skip::NoReferences)?;
    // Live stream segments are read by every export until compacted: hot.
    marks.add_stream_segments(view, tenant)?;

    let mut packs: HashMap<Id32, PackAcc> = HashMap::new();
    for_each_pack(view, |record, life| {
        if record.tenant == tenant {
            // A pack a running backup may still commit stays where it is.
            let settled = !may_still_commit(view, life.as_ref(), now, grace_ms)?;
            packs.insert(
                record.id,
                PackAcc {
                    settled,
                    ..PackAcc::default()
                },
            );
        }
        Ok::<_, Skip>(())
    })
    .await?;

    for partition in partitions(partition_count(view.stats()?.blobs)) {
        // An unreadable segment leaves the mark incomplete: moving on it
        // could send a young snapshot's blobs to the cold tier.
        let hot = mark_partition(gw, tenant, &marks.segments, &partition).await?;
        for_each_entry(view, tenant, &partition, |id, location| {
            if let Some(acc) = packs.get_mut(&location.pack_id) {
                acc.indexed += 1;
                acc.hot |= hot.contains(&id) || marks.always_live.contains(&id);
            }
            Ok::<_, Skip>(())
        })
        .await?;
    }
    Ok(packs
        .into_iter()
        .filter_map(|(id, acc)| {
            if acc.hot {
                Some((id, StorageClass::Hot))
            } else if acc.indexed > 0 && acc.settled {
                Some((id, StorageClass::Cold))
            } else {
                None
            }
        })
        .collect())
}
