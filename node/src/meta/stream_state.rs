//! Live record streams in the metadata state: committed segments, each
//! writer's high-water mark and each dataset's counters (layout in
//! `state.rs`).
//!
//! A batch commits in one entry: its pack and blob index, its segments and
//! the writer's `committed_seq`, so a re-sent batch is recognised by its
//! sequence numbers and never stored twice. Segments leave only with a
//! snapshot commit that retires them (all or nothing) or by `max-age`;
//! both bump the dataset's generation so that a paged listing can tell it
//! raced them. Every live segment's blob is a root for garbage collection:
//! a reverse record (`'r'`) lets `SweepBlobs` refuse to remove it, whatever
//! the collector marked.
//!
//! Nodes see room keys (keyed hashes), never room names or record text.

use super::codec;
use super::state::{StateError, StateView, add_pack, blob_key, pack_life_key, tenant_prefix};
use super::types::{
    BlobLocation, Command, CommandResult, Id32, MetaStats, PackLife, SegmentId, SegmentRecord,
    StreamDatasetRecord,
};
use crate::kv::{WriteBatch, prefix_end};

/// `'g' T dataset room:32 number:u64-BE -> SegmentRecord`.
pub(super) const SEGMENT: u8 = b'g';
/// `'r' T blob:32 dataset room:32 number:u64-BE -> ()`: which live segments use a blob.
pub(super) const SEGMENT_REF: u8 = b'r';
/// `'W' T dataset writer -> u64`: the writer's committed sequence.
pub(super) const WRITER: u8 = b'W';
/// `'G' T dataset -> StreamDatasetRecord`.
pub(super) const STREAM_DATASET: u8 = b'G';
/// Key of the number of live segments (all tenants).
pub const STREAM_SEGMENTS_KEY: &[u8] = b"\x00stream_segments";

/// `bytes` with a u32-BE length in front: a dataset "a" never prefixes "ab".
fn push_len_prefixed(key: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(bytes);
}

fn dataset_prefix(kind: u8, tenant: &str, dataset: &str) -> Vec<u8> {
    let mut key = tenant_prefix(kind, tenant);
    push_len_prefixed(&mut key, dataset.as_bytes());
    key
}

fn segment_key(tenant: &str, dataset: &str, id: &SegmentId) -> Vec<u8> {
    let mut key = dataset_prefix(SEGMENT, tenant, dataset);
    key.extend_from_slice(&id.to_wire());
    key
}

fn blob_refs_prefix(tenant: &str, blob: &Id32) -> Vec<u8> {
    let mut key = tenant_prefix(SEGMENT_REF, tenant);
    key.extend_from_slice(blob);
    key
}

fn segment_ref_key(tenant: &str, blob: &Id32, dataset: &str, id: &SegmentId) -> Vec<u8> {
    let mut key = blob_refs_prefix(tenant, blob);
    push_len_prefixed(&mut key, dataset.as_bytes());
    key.extend_from_slice(&id.to_wire());
    key
}

fn writer_key(tenant: &str, dataset: &str, writer: &str) -> Vec<u8> {
    let mut key = dataset_prefix(WRITER, tenant, dataset);
    key.extend_from_slice(writer.as_bytes());
    key
}

fn stream_dataset_key(tenant: &str, dataset: &str) -> Vec<u8> {
    dataset_prefix(STREAM_DATASET, tenant, dataset)
}

impl StateView {
    /// The writer's committed sequence (`None`: nothing committed yet).
    pub fn stream_committed_seq(
        &self,
        tenant: &str,
        dataset: &str,
        writer: &str,
    ) -> Result<Option<u64>, StateError> {
        self.get("writer seq", &writer_key(tenant, dataset, writer))
    }

    /// The dataset's stream counters (zero before its first segment).
    pub fn stream_dataset(
        &self,
        tenant: &str,
        dataset: &str,
    ) -> Result<StreamDatasetRecord, StateError> {
        Ok(self
            .get("stream dataset", &stream_dataset_key(tenant, dataset))?
            .unwrap_or_default())
    }

    /// One segment, if it is live.
    pub fn segment(
        &self,
        tenant: &str,
        dataset: &str,
        id: &SegmentId,
    ) -> Result<Option<SegmentRecord>, StateError> {
        self.get("segment", &segment_key(tenant, dataset, id))
    }

    /// Up to `limit` of the dataset's segments after `after` (from the
    /// first when `None`), of one room if given, in key order (room, then
    /// commit order).
    pub fn segment_page(
        &self,
        tenant: &str,
        dataset: &str,
        room: Option<&Id32>,
        after: Option<&SegmentId>,
        limit: usize,
    ) -> Result<Vec<(SegmentId, SegmentRecord)>, StateError> {
        let mut prefix = dataset_prefix(SEGMENT, tenant, dataset);
        if let Some(room) = room {
            prefix.extend_from_slice(room);
        }
        let start = match after {
            Some(id) => {
                let mut key = segment_key(tenant, dataset, id);
                key.push(0);
                key.max(prefix.clone())
            }
            None => prefix.clone(),
        };
        let end = prefix_end(&prefix);
        let base = dataset_prefix(SEGMENT, tenant, dataset).len();
        self.kv()
            .range(&start, end.as_deref(), limit)?
            .into_iter()
            .filter_map(|(key, value)| {
                let id = key.get(base..).and_then(SegmentId::from_wire)?;
                Some(
                    codec::decode("segment", &value)
                        .map(|record| (id, record))
                        .map_err(StateError::from),
                )
            })
            .collect()
    }

    /// Whether a live segment of the tenant holds `blob`: such a blob is a
    /// garbage-collection root.
    pub fn blob_in_live_segment(&self, tenant: &str, blob: &Id32) -> Result<bool, StateError> {
        let prefix = blob_refs_prefix(tenant, blob);
        let end = prefix_end(&prefix);
        Ok(!self.kv().range(&prefix, end.as_deref(), 1)?.is_empty())
    }

    /// The blobs of every live segment of the tenant (with repeats when
    /// several segments share one).
    pub fn segment_blobs(&self, tenant: &str) -> Result<Vec<Id32>, StateError> {
        let prefix = tenant_prefix(SEGMENT_REF, tenant);
        Ok(self
            .kv()
            .scan_prefix(&prefix)?
            .into_iter()
            .filter_map(|(key, _)| {
                key.get(prefix.len()..prefix.len() + 32)
                    .and_then(|b| Id32::try_from(b).ok())
            })
            .collect())
    }

    /// Live segments of every tenant.
    pub fn stream_segment_count(&self) -> Result<u64, StateError> {
        Ok(self.get("segment count", STREAM_SEGMENTS_KEY)?.unwrap_or(0))
    }
}

fn put<T: serde::Serialize>(
    batch: &mut WriteBatch,
    key: Vec<u8>,
    what: &'static str,
    value: &T,
) -> Result<(), StateError> {
    batch.put(key, codec::encode(what, value)?);
    Ok(())
}

fn set_segment_count(
    view: &StateView,
    batch: &mut WriteBatch,
    change: impl FnOnce(u64) -> u64,
) -> Result<(), StateError> {
    let count = change(view.stream_segment_count()?);
    put(batch, STREAM_SEGMENTS_KEY.to_vec(), "segment count", &count)
}

/// Queues the removal of segments (known to exist) and bumps the generation.
fn remove_segments(
    view: &StateView,
    tenant: &str,
    dataset: &str,
    segments: &[(SegmentId, SegmentRecord)],
    batch: &mut WriteBatch,
) -> Result<(), StateError> {
    if segments.is_empty() {
        return Ok(());
    }
    for (id, record) in segments {
        batch.delete(segment_key(tenant, dataset, id));
        batch.delete(segment_ref_key(tenant, &record.blob, dataset, id));
    }
    let mut counters = view.stream_dataset(tenant, dataset)?;
    counters.generation = counters.generation.saturating_add(1);
    put(
        batch,
        stream_dataset_key(tenant, dataset),
        "stream dataset",
        &counters,
    )?;
    let removed = segments.len() as u64;
    set_segment_count(view, batch, |n| n.saturating_sub(removed))
}

/// Applies the stream commands (see [`Command`]).
pub(super) fn apply(
    view: &StateView,
    cmd: &Command,
    now: i64,
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    match cmd {
        Command::AppendStream {
            tenant,
            dataset,
            writer,
            first_seq,
            last_seq,
            pack,
            blobs,
            segments,
        } => {
            if first_seq > last_seq || pack.tenant != *tenant {
                return Ok(CommandResult::UnknownPack);
            }
            if let Some(committed) = view.stream_committed_seq(tenant, dataset, writer)? {
                if *last_seq <= committed {
                    return Ok(CommandResult::StreamDuplicate);
                }
                if *first_seq <= committed {
                    return Ok(CommandResult::StreamOverlap);
                }
            }
            if add_pack(view, pack, blobs, batch, stats)? == CommandResult::Ok {
                let life = PackLife {
                    created_unix_ms: now,
                    session: None,
                    blob_bytes: blobs.iter().map(|(_, l)| u64::from(l.length)).sum(),
                    repacked: false,
                };
                batch.put(pack_life_key(&pack.id), codec::encode("pack life", &life)?);
            }
            // A segment blob already indexed in an older pack (the same
            // records stored before) is pointed at this pack: its entry then
            // lives in a pack the collector cannot have judged before this
            // commit, and `SweepBlobs` keeps it while the segment lives.
            for segment in segments {
                let here = blobs.iter().find(|(id, _)| *id == segment.blob);
                let key = blob_key(tenant, &segment.blob);
                let current: Option<BlobLocation> = view.get("blob location", &key)?;
                if let (Some((_, location)), Some(current)) = (here, current)
                    && current.pack_id != pack.id
                {
                    batch.put(key, codec::encode("blob location", location)?);
                }
            }
            let mut counters = view.stream_dataset(tenant, dataset)?;
            for segment in segments {
                let id = SegmentId {
                    room: segment.room,
                    number: counters.next_segment,
                };
                counters.next_segment = counters.next_segment.saturating_add(1);
                let record = SegmentRecord {
                    blob: segment.blob,
                    first_ts_ms: segment.first_ts_ms,
                    last_ts_ms: segment.last_ts_ms,
                    records: segment.records,
                    writer: writer.clone(),
                    committed_unix_ms: now,
                };
                put(batch, segment_key(tenant, dataset, &id), "segment", &record)?;
                put(
                    batch,
                    segment_ref_key(tenant, &segment.blob, dataset, &id),
                    "segment ref",
                    &(),
                )?;
            }
            put(
                batch,
                stream_dataset_key(tenant, dataset),
                "stream dataset",
                &counters,
            )?;
            let added = segments.len() as u64;
            set_segment_count(view, batch, |n| n.saturating_add(added))?;
            put(
                batch,
                writer_key(tenant, dataset, writer),
                "writer seq",
                last_seq,
            )?;
            Ok(CommandResult::Ok)
        }
        Command::RetiringSegments {
            tenant,
            dataset,
            segments,
            cmd: inner,
        } => {
            let mut found = Vec::with_capacity(segments.len());
            let mut ids = segments.clone();
            ids.sort();
            ids.dedup();
            for id in &ids {
                match view.segment(tenant, dataset, id)? {
                    Some(record) => found.push((*id, record)),
                    None => {
                        // A retried commit whose first try applied: its
                        // segments are gone because of itself.
                        let retried = match inner.as_ref() {
                            Command::CommitSnapshot { snapshot, .. }
                            | Command::CommitSnapshotWithRefs { snapshot, .. } => view
                                .kv()
                                .get(&super::state::snapshot_key(tenant, &snapshot.id))?
                                .is_some(),
                            _ => false,
                        };
                        return Ok(if retried {
                            CommandResult::AlreadyExists
                        } else {
                            CommandResult::SegmentsChanged
                        });
                    }
                }
            }
            // Only a snapshot commit may retire segments: anything else
            // would drop records without keeping them elsewhere.
            let commits_snapshot = match inner.as_ref() {
                Command::CommitSnapshot { snapshot, .. }
                | Command::CommitSnapshotWithRefs { snapshot, .. } => snapshot.dataset == *dataset,
                _ => false,
            };
            if !commits_snapshot {
                return Ok(CommandResult::SegmentsChanged);
            }
            let result = super::state::apply_at(view, inner, now, batch, stats)?;
            if result == CommandResult::Ok {
                remove_segments(view, tenant, dataset, &found, batch)?;
            }
            Ok(result)
        }
        Command::DropSegments {
            tenant,
            dataset,
            committed_before_ms,
        } => {
            let mut old = Vec::new();
            let mut after: Option<SegmentId> = None;
            loop {
                let page = view.segment_page(tenant, dataset, None, after.as_ref(), 4096)?;
                let full = page.len() == 4096;
                after = page.last().map(|(id, _)| *id);
                old.extend(
                    page.into_iter()
                        .filter(|(_, r)| r.committed_unix_ms < *committed_before_ms),
                );
                if !full {
                    break;
                }
            }
            remove_segments(view, tenant, dataset, &old, batch)?;
            Ok(CommandResult::Ok)
        }
        _ => Ok(CommandResult::UnknownPack),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::state::testing::{id, pack, run_at, view};
    use crate::meta::types::{RefSegment, SnapshotRecord, StreamSegment};

    /// A batch in pack `p` with one segment per `(room, blob, first_ts, last_ts)`.
    fn batch(first: u64, last: u64, p: u8, segs: &[(u8, u8, i64, i64)]) -> Command {
        Command::AppendStream {
            tenant: "t".into(),
            dataset: "chat".into(),
            writer: "w1".into(),
            first_seq: first,
            last_seq: last,
            pack: pack(p),
            blobs: segs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    (
                        id(s.1),
                        BlobLocation {
                            pack_id: id(p),
                            offset: i as u64 * 10,
                            length: 10,
                        },
                    )
                })
                .collect(),
            segments: segs
                .iter()
                .map(|s| StreamSegment {
                    room: id(s.0),
                    blob: id(s.1),
                    first_ts_ms: s.2,
                    last_ts_ms: s.3,
                    records: 2,
                })
                .collect(),
        }
    }

    fn all(v: &StateView, room: Option<u8>) -> Vec<(SegmentId, SegmentRecord)> {
        let room = room.map(id);
        v.segment_page("t", "chat", room.as_ref(), None, usize::MAX)
            .expect("page")
    }

    fn commit(snap: u8, root: u8) -> Command {
        Command::CommitSnapshotWithRefs {
            tenant: "t".into(),
            snapshot: SnapshotRecord {
                id: id(snap),
                dataset: "chat".into(),
                parent: None,
                time_unix_ms: 5,
                kind: "full".into(),
                root_tree: id(root),
                sealed_info: vec![],
                files: 0,
                bytes: 0,
                bytes_added: 0,
                tags: vec![],
            },
            refs: vec![RefSegment {
                blob: id(root),
                first: id(root),
                last: id(root),
                count: 1,
            }],
            expect_epoch: 0,
            session: None,
        }
    }

    fn retiring(ids: Vec<SegmentId>, cmd: Command) -> Command {
        Command::RetiringSegments {
            tenant: "t".into(),
            dataset: "chat".into(),
            segments: ids,
            cmd: Box::new(cmd),
        }
    }

    #[test]
    fn a_batch_commits_once_and_a_resend_or_overlap_changes_nothing() {
        let v = view();
        assert_eq!(
            run_at(
                &v,
                1_000,
                batch(1, 10, 50, &[(1, 101, 5, 9), (2, 102, 6, 7)])
            ),
            CommandResult::Ok
        );
        assert_eq!(
            v.stream_committed_seq("t", "chat", "w1").expect("seq"),
            Some(10)
        );
        assert_eq!(
            v.stream_committed_seq("t", "chat", "w2").expect("seq"),
            None
        );
        let before = v.kv().scan_prefix(b"").expect("scan");
        // The same batch again, and one inside it: duplicates.
        assert_eq!(
            run_at(&v, 2_000, batch(1, 10, 51, &[(1, 103, 5, 9)])),
            CommandResult::StreamDuplicate
        );
        assert_eq!(
            run_at(&v, 2_000, batch(4, 8, 51, &[(1, 103, 5, 9)])),
            CommandResult::StreamDuplicate
        );
        assert_eq!(
            run_at(&v, 2_000, batch(10, 12, 51, &[(1, 103, 5, 9)])),
            CommandResult::StreamOverlap
        );
        let after = v.kv().scan_prefix(b"").expect("scan");
        // Only the cluster clock moved.
        let without_clock = |pairs: Vec<crate::kv::KvPair>| {
            pairs
                .into_iter()
                .filter(|(k, _)| k.as_slice() != super::super::state::CLOCK_KEY)
                .collect::<Vec<_>>()
        };
        assert_eq!(without_clock(before), without_clock(after));
        assert!(v.pack(&id(51)).expect("read").is_none());

        assert_eq!(
            run_at(&v, 3_000, batch(11, 12, 52, &[(1, 104, 10, 11)])),
            CommandResult::Ok
        );
        let segs = all(&v, None);
        assert_eq!(segs.len(), 3);
        assert_eq!(v.stream_segment_count().expect("count"), 3);
        // Room 1's segments in commit order, with cluster time.
        let room1 = all(&v, Some(1));
        assert_eq!(
            room1
                .iter()
                .map(|(s, r)| (s.number, r.blob, r.committed_unix_ms))
                .collect::<Vec<_>>(),
            vec![(0, id(101), 1_000), (2, id(104), 3_000)]
        );
        assert_eq!(room1[0].1.writer, "w1");
        assert!(v.locate_blob("t", &id(104)).expect("read").is_some());
        assert!(v.pack_life(&id(52)).expect("read").is_some());
    }

    #[test]
    fn pages_resume_after_the_last_segment() {
        let v = view();
        for n in 0..5u8 {
            let seq = u64::from(n) + 1;
            run_at(
                &v,
                1_000,
                batch(seq, seq, 50 + n, &[(n % 2, 100 + n, 1, 2)]),
            );
        }
        let first = v.segment_page("t", "chat", None, None, 2).expect("page");
        assert_eq!(first.len(), 2);
        let rest = v
            .segment_page("t", "chat", None, first.last().map(|(s, _)| s), 10)
            .expect("page");
        assert_eq!(rest.len(), 3);
        let mut ids: Vec<SegmentId> = first.iter().chain(&rest).map(|(s, _)| *s).collect();
        let sorted = ids.clone();
        ids.dedup();
        assert_eq!(ids, sorted);
        assert_eq!(ids.len(), 5);
        assert!(
            v.segment_page("u", "chat", None, None, 10)
                .expect("page")
                .is_empty(),
            "tenants are separate"
        );
        assert!(
            v.segment_page("t", "chat2", None, None, 10)
                .expect("page")
                .is_empty(),
            "datasets are separate"
        );
    }

    #[test]
    fn retiring_is_all_or_nothing_and_bumps_the_generation() {
        let v = view();
        run_at(
            &v,
            1_000,
            batch(1, 1, 50, &[(1, 101, 1, 2), (2, 102, 1, 2)]),
        );
        // The snapshot's root tree must be indexed.
        run_at(
            &v,
            1_000,
            Command::AddPackInSession {
                pack: pack(60),
                blobs: vec![(
                    id(200),
                    BlobLocation {
                        pack_id: id(60),
                        offset: 0,
                        length: 10,
                    },
                )],
                session: None,
            },
        );
        let segs: Vec<SegmentId> = all(&v, None).into_iter().map(|(s, _)| s).collect();
        let missing = SegmentId {
            room: id(9),
            number: 77,
        };
        let mut with_missing = segs.clone();
        with_missing.push(missing);
        assert_eq!(
            run_at(&v, 2_000, retiring(with_missing, commit(1, 200))),
            CommandResult::SegmentsChanged
        );
        assert!(v.snapshots("t", None).expect("read").is_empty());
        assert_eq!(all(&v, None).len(), 2);
        assert_eq!(v.stream_dataset("t", "chat").expect("read").generation, 0);

        assert_eq!(
            run_at(&v, 2_000, retiring(vec![segs[0]], commit(1, 200))),
            CommandResult::Ok
        );
        assert_eq!(v.snapshots("t", None).expect("read").len(), 1);
        assert_eq!(
            all(&v, None)
                .into_iter()
                .map(|(s, _)| s)
                .collect::<Vec<_>>(),
            vec![segs[1]]
        );
        assert_eq!(v.stream_dataset("t", "chat").expect("read").generation, 1);
        assert_eq!(v.stream_segment_count().expect("count"), 1);
        assert!(!v.blob_in_live_segment("t", &id(101)).expect("read"));
        assert!(v.blob_in_live_segment("t", &id(102)).expect("read"));
        // The same commit retried: already there, nothing else retired.
        assert_eq!(
            run_at(&v, 2_500, retiring(vec![segs[0]], commit(1, 200))),
            CommandResult::AlreadyExists
        );
        // A commit that fails (root not stored) retires nothing.
        assert_eq!(
            run_at(&v, 3_000, retiring(vec![segs[1]], commit(2, 201))),
            CommandResult::MissingRootTree
        );
        assert_eq!(all(&v, None).len(), 1);
        assert_eq!(v.stream_dataset("t", "chat").expect("read").generation, 1);
    }

    #[test]
    fn max_age_drops_old_segments_only() {
        let v = view();
        run_at(&v, 1_000, batch(1, 1, 50, &[(1, 101, 1, 2)]));
        run_at(&v, 5_000, batch(2, 2, 51, &[(1, 102, 1, 2)]));
        let drop = |before| Command::DropSegments {
            tenant: "t".into(),
            dataset: "chat".into(),
            committed_before_ms: before,
        };
        assert_eq!(run_at(&v, 6_000, drop(1_000)), CommandResult::Ok);
        assert_eq!(all(&v, None).len(), 2);
        assert_eq!(v.stream_dataset("t", "chat").expect("read").generation, 0);
        assert_eq!(run_at(&v, 6_000, drop(3_000)), CommandResult::Ok);
        let left = all(&v, None);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.blob, id(102));
        assert_eq!(v.stream_dataset("t", "chat").expect("read").generation, 1);
        assert_eq!(v.stream_segment_count().expect("count"), 1);
    }

    #[test]
    fn a_sweep_never_removes_a_live_segment_blob() {
        let v = view();
        // The collector marked before the segment existed and found its
        // blob unreferenced; the sweep applies after the segment commit.
        run_at(&v, 1_000, batch(1, 1, 50, &[(1, 101, 1, 2)]));
        let sweep = Command::SweepBlobs {
            tenant: "t".into(),
            ids: vec![id(101)],
            catalog_seq: 0,
        };
        assert_eq!(run_at(&v, 2_000, sweep.clone()), CommandResult::Ok);
        assert!(v.locate_blob("t", &id(101)).expect("read").is_some());
        assert_eq!(v.gc_epoch().expect("epoch"), 0, "nothing was removed");
        // Once the segment is gone the blob is garbage like any other.
        run_at(
            &v,
            3_000,
            Command::DropSegments {
                tenant: "t".into(),
                dataset: "chat".into(),
                committed_before_ms: 2_000,
            },
        );
        assert_eq!(run_at(&v, 4_000, sweep), CommandResult::Ok);
        assert!(v.locate_blob("t", &id(101)).expect("read").is_none());
    }

    #[test]
    fn a_segment_blob_indexed_in_an_older_pack_moves_to_the_new_one() {
        let v = view();
        run_at(
            &v,
            1_000,
            Command::AddPackInSession {
                pack: pack(60),
                blobs: vec![(
                    id(101),
                    BlobLocation {
                        pack_id: id(60),
                        offset: 0,
                        length: 10,
                    },
                )],
                session: None,
            },
        );
        run_at(&v, 2_000, batch(1, 1, 50, &[(1, 101, 1, 2)]));
        assert_eq!(
            v.locate_blob("t", &id(101))
                .expect("read")
                .map(|l| l.pack_id),
            Some(id(50))
        );
        assert_eq!(v.stats().expect("stats").blobs, 1);
    }
}
