//! The reads the collector and the tiering mover share: the pack records
//! and a partition's index entries, page by page (yielding between pages,
//! so a scan of millions of entries never holds a runtime worker that Raft
//! heartbeats need); what a set of snapshots references, one partition at a
//! time; and whether a pack may still be committed by a running backup.

use std::collections::{HashMap, HashSet};

use crate::gateway::Gateway;
use crate::meta::state::{StateError, StateView};
use crate::meta::types::{
    BlobLocation, Id32, PackLife, PackRecord, RefSegment, SnapshotLife, SnapshotRecord,
};

use super::mark::{Partition, next_id};

/// Records read per page.
const PAGE: usize = 4096;

/// Calls `f` on every pack record with its life, in id order.
pub async fn for_each_pack<E: From<StateError>>(
    view: &StateView,
    mut f: impl FnMut(PackRecord, Option<PackLife>) -> Result<(), E>,
) -> Result<(), E> {
    let mut after: Option<Id32> = None;
    loop {
        tokio::task::yield_now().await;
        let page = view.pack_page(after.as_ref(), PAGE)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.id);
        let full = page.len() == PAGE;
        for (record, life) in page {
            f(record, life)?;
        }
        if !full {
            return Ok(());
        }
    }
}

/// Calls `f` on every index entry of `tenant` in `partition`, in id order.
pub async fn for_each_entry<E: From<StateError>>(
    view: &StateView,
    tenant: &str,
    partition: &Partition,
    mut f: impl FnMut(Id32, BlobLocation) -> Result<(), E>,
) -> Result<(), E> {
    let mut start = partition.lo;
    loop {
        tokio::task::yield_now().await;
        let page = view.blob_page(tenant, &start, partition.hi.as_ref(), PAGE)?;
        let full = page.len() == PAGE;
        let next = page.last().and_then(|(id, _)| next_id(id));
        for (id, location) in page {
            f(id, location)?;
        }
        match next {
            Some(next) if full => start = next,
            _ => return Ok(()),
        }
    }
}

/// What a set of snapshots references: their reference segments, and the
/// segment blobs and root trees themselves (which no segment lists).
#[derive(Default)]
pub struct Marks {
    pub segments: Vec<RefSegment>,
    pub always_live: HashSet<Id32>,
}

impl Marks {
    pub fn add(&mut self, root: Option<Id32>, life: &SnapshotLife) {
        self.segments.extend(life.refs.iter().copied());
        self.always_live.extend(life.refs.iter().map(|r| r.blob));
        self.always_live.extend(root);
    }

    /// Adds the blobs of the tenant's live stream segments: roots like
    /// snapshots' trees. The collector calls it after its pack scan, so a
    /// segment committed before that scan is marked and one committed
    /// after it lives in a pack the scan never judged (and `SweepBlobs`
    /// keeps a live segment's blob in any case).
    pub fn add_stream_segments(
        &mut self,
        view: &StateView,
        tenant: &str,
    ) -> Result<(), StateError> {
        self.always_live.extend(view.segment_blobs(tenant)?);
        Ok(())
    }

    /// The tenant's snapshots that `keep` selects. A snapshot without a
    /// life (committed by an older client, so without a reference list)
    /// leaves the marks incomplete: `Err` counts them.
    pub fn of_tenant(
        view: &StateView,
        tenant: &str,
        keep: impl Fn(&SnapshotRecord, &SnapshotLife) -> bool,
    ) -> Result<Result<Marks, usize>, StateError> {
        let lives: HashMap<Id32, SnapshotLife> = view.snapshot_lives(tenant)?.into_iter().collect();
        let mut marks = Marks::default();
        let mut without = 0usize;
        for snapshot in view.snapshots(tenant, None)? {
            match lives.get(&snapshot.id) {
                Some(life) if keep(&snapshot, life) => marks.add(Some(snapshot.root_tree), life),
                Some(_) => {}
                None => without += 1,
            }
        }
        Ok(if without > 0 { Err(without) } else { Ok(marks) })
    }
}

/// A reference segment that could not be read: the mark is incomplete, so
/// nothing may be decided on it.
#[derive(Debug, thiserror::Error)]
#[error("reference segment {segment} unreadable ({error})")]
pub struct UnreadableSegment {
    pub segment: String,
    pub error: String,
}

/// The ids in `partition` that `segments` list.
pub async fn mark_partition(
    gw: &Gateway,
    tenant: &str,
    segments: &[RefSegment],
    partition: &Partition,
) -> Result<HashSet<Id32>, UnreadableSegment> {
    let mut live = HashSet::new();
    for segment in segments.iter().filter(|s| partition.overlaps(s)) {
        let ids = gw
            .read_segment(tenant, segment)
            .await
            .map_err(|error| UnreadableSegment {
                segment: hex::encode(segment.blob),
                error: error.to_string(),
            })?;
        live.extend(ids.into_iter().filter(|id| partition.contains(id)));
    }
    Ok(live)
}

/// Whether a pack may still be committed by a running backup at `now`: its
/// session is open and was active within `grace_ms` (or, without a
/// session record, the pack itself is that young). Node-made (repacked)
/// packs and packs stored before pack lives existed never are.
pub fn may_still_commit(
    view: &StateView,
    life: Option<&PackLife>,
    now: i64,
    grace_ms: i64,
) -> Result<bool, StateError> {
    let Some(life) = life else {
        return Ok(false);
    };
    if life.repacked {
        return Ok(false);
    }
    let young = |at: i64| now.saturating_sub(at) < grace_ms;
    Ok(match life.session {
        None => young(life.created_unix_ms),
        Some(session) => match view.session(&session)? {
            Some(record) if record.closed => false,
            Some(record) => young(record.active_unix_ms),
            None => young(life.created_unix_ms),
        },
    })
}
