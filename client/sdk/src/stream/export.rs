//! Export: the records of a room (or of every room) with `from <= ts <= at`,
//! as the exact lines appended, from the dataset's newest compaction
//! snapshot plus its live segments.
//!
//! The listing of live segments is consistent with the snapshot it names:
//! every page must name the same snapshot and generation, else a compaction
//! (or a retention drop) ran during the listing and it starts again, a
//! bounded number of times. The snapshot plus the listed segments then hold
//! every record exactly once.
//!
//! Order within a room: by `ts`; ties keep snapshot records first, then
//! segments in commit (listing) order, then position. Rooms in name order,
//! one at a time, so memory holds one room's window, not the dataset. A
//! record of another room inside a room's day file or segment is an
//! integrity error, never printed.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use cairn_proto::v1 as pb;
use futures::{StreamExt, TryStreamExt};

use crate::error::{ClientError, Result};
use crate::repo::{Repository, Snapshot};
use crate::seal::BlobId;
use crate::stream::record::{DAY_MS, StoredRecord, check_room, decode_segment, room_key};
use crate::tree::{ChunkRef, EntryKind, Tree};

/// Listings tried before giving up when compactions keep changing it.
pub const LISTING_ATTEMPTS_MAX: usize = 8;
/// Pages of one listing, at most (a bound on a misbehaving node).
const LISTING_PAGES_MAX: usize = 1_000_000;
/// Packs read at once when fetching segments and day files.
const PACKS_IN_FLIGHT_MAX: usize = 6;

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportQuery {
    pub dataset: String,
    /// One room, or `None` for every room (in name order).
    pub room: Option<String>,
    /// Records with `ts` at or after this (Unix ms); `None`: from the start.
    pub from_ms: Option<i64>,
    /// Records with `ts` up to this, inclusive (Unix ms); `None`: all.
    pub at_ms: Option<i64>,
}

/// What an export read and printed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExportSummary {
    /// Records printed.
    pub records: u64,
    /// Rooms with at least one record printed.
    pub rooms: u64,
    /// Live segments read.
    pub segments: u64,
    /// Day files of the snapshot read.
    pub day_files: u64,
    /// The compaction snapshot read (hex), if the dataset has one.
    pub snapshot: Option<String>,
}

/// A listing of live segments, consistent with its snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Listing {
    /// Rooms in key order, each room's in commit order.
    pub segments: Vec<pb::SegmentInfo>,
    /// The dataset's newest snapshot when listed.
    pub snapshot: Option<BlobId>,
    pub generation: u64,
}

/// Lists every page through `page` (called with the page token, empty for
/// the first), starting again whenever a page names another snapshot or
/// generation than the first page did.
pub(crate) async fn list_consistent<F, Fut>(dataset: &str, mut page: F) -> Result<Listing>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<pb::ListSegmentsReply>>,
{
    'listing: for attempt in 1..=LISTING_ATTEMPTS_MAX {
        let first = page(Vec::new()).await?;
        let snapshot = first.snapshot;
        let generation = first.generation;
        let mut segments = first.segments;
        let mut next = first.next_page;
        let mut pages = 1;
        while !next.is_empty() {
            pages += 1;
            if pages > LISTING_PAGES_MAX {
                return Err(ClientError::integrity(format!(
                    "segment listing of dataset {dataset:?} goes on past {LISTING_PAGES_MAX} pages"
                )));
            }
            let reply = page(std::mem::take(&mut next)).await?;
            if reply.snapshot != snapshot || reply.generation != generation {
                tracing::debug!(
                    dataset,
                    attempt,
                    "segment listing raced a compaction; listing again"
                );
                continue 'listing;
            }
            segments.extend(reply.segments);
            next = reply.next_page;
        }
        let snapshot = if snapshot.is_empty() {
            None
        } else {
            Some(id32(&snapshot, "listed snapshot id")?)
        };
        return Ok(Listing {
            segments,
            snapshot,
            generation,
        });
    }
    Err(ClientError::StreamListingUnstable {
        dataset: dataset.to_string(),
        attempts: LISTING_ATTEMPTS_MAX,
    })
}

/// The consistent listing of `dataset`'s live segments of `room` (a key;
/// `None` = every room) meeting `[from, to]`.
pub(crate) async fn list_segments(
    repo: &Repository,
    dataset: &str,
    room: Option<&[u8; 32]>,
    from: i64,
    to: i64,
) -> Result<Listing> {
    list_consistent(dataset, |page| async move {
        repo.list_segments(dataset, room, from, to, &page).await
    })
    .await
}

/// The snapshot a listing names, from the catalog.
pub(crate) async fn listed_snapshot(
    repo: &Repository,
    dataset: &str,
    id: Option<BlobId>,
) -> Result<Option<Snapshot>> {
    let Some(id) = id else { return Ok(None) };
    repo.snapshots(Some(dataset))
        .await?
        .into_iter()
        .find(|s| s.id == id)
        .map(Some)
        .ok_or_else(|| ClientError::SnapshotNotFound {
            query: format!(
                "{} (the newest snapshot of dataset {dataset} when its segments were listed)",
                hex::encode(id)
            ),
        })
}

pub(crate) fn id32(bytes: &[u8], what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| ClientError::integrity(format!("{what}: not a 32-byte id")))
}

/// Fetches, decrypts and checks blobs, a few packs at once (each pack's
/// ranges in one request).
pub(crate) async fn read_blobs_bulk(
    repo: &Repository,
    ids: &[BlobId],
) -> Result<HashMap<BlobId, Vec<u8>>> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let located = repo.locate(&ids).await?;
    let mut by_pack: BTreeMap<[u8; 32], Vec<(BlobId, u64, u64)>> = BTreeMap::new();
    for (id, loc) in located {
        by_pack
            .entry(loc.pack_id)
            .or_default()
            .push((id, loc.offset, u64::from(loc.length)));
    }
    let parts: Vec<Vec<(BlobId, Vec<u8>)>> = futures::stream::iter(by_pack)
        .map(|(pack_id, mut blobs)| async move {
            blobs.sort_by_key(|(_, offset, _)| *offset);
            let ranges: Vec<(u64, u64)> = blobs.iter().map(|(_, o, l)| (*o, *l)).collect();
            let data = repo.read_ranges(&pack_id, &ranges, &[]).await?;
            let key = repo.key().clone();
            tokio::task::spawn_blocking(move || {
                blobs
                    .iter()
                    .zip(data)
                    .map(|((id, _, _), sealed)| Ok((*id, key.decode_blob(id, &sealed)?)))
                    .collect::<Result<Vec<_>>>()
            })
            .await
            .map_err(|e| ClientError::integrity(format!("blob decoding task: {e}")))?
        })
        .buffer_unordered(PACKS_IN_FLIGHT_MAX)
        .try_collect()
        .await?;
    let mut out = HashMap::with_capacity(ids.len());
    for (id, plain) in parts.into_iter().flatten() {
        out.insert(id, plain);
    }
    for id in &ids {
        if !out.contains_key(id) {
            return Err(ClientError::integrity(format!(
                "blob {} missing from the answer",
                hex::encode(id)
            )));
        }
    }
    Ok(out)
}

/// The contents of files given by their chunk lists, each chunk checked
/// against its id.
pub(crate) async fn read_files(repo: &Repository, files: &[&[ChunkRef]]) -> Result<Vec<Vec<u8>>> {
    let ids: Vec<BlobId> = files.iter().flat_map(|f| f.iter().map(|c| c.id)).collect();
    let blobs = read_blobs_bulk(repo, &ids).await?;
    files
        .iter()
        .map(|chunks| {
            let mut content = Vec::with_capacity(chunks.iter().map(|c| c.len as usize).sum());
            for chunk in *chunks {
                let data = blobs
                    .get(&chunk.id)
                    .ok_or_else(|| ClientError::integrity("chunk missing from the answer"))?;
                content.extend_from_slice(data);
            }
            Ok(content)
        })
        .collect()
}

/// The first millisecond of the day a day file `YYYY-MM-DD.jsonl` holds;
/// `None` for any other name.
pub(crate) fn day_file_start(name: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(name).ok()?.strip_suffix(".jsonl")?;
    let bytes = text.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let year: i32 = text[..4].parse().ok()?;
    let month: u8 = text[5..7].parse().ok()?;
    let day: u8 = text[8..10].parse().ok()?;
    let month = time::Month::try_from(month).ok()?;
    let date = time::Date::from_calendar_date(year, month, day).ok()?;
    Some(date.midnight().assume_utc().unix_timestamp() * 1000)
}

/// Whether the day starting at `start` meets `[from, at]`.
pub(crate) fn day_meets(start: i64, from: i64, at: i64) -> bool {
    start <= at && start.saturating_add(DAY_MS - 1) >= from
}

/// One room's records in the window, in export order: `snapshot` holds the
/// day files' records (days in order, each sorted), `segments` each live
/// segment's records in commit order. Stable sort by `ts` keeps the ties
/// rule. A record naming another room is an integrity error.
pub(crate) fn merge_room(
    room: &str,
    snapshot: Vec<StoredRecord>,
    segments: Vec<Vec<StoredRecord>>,
    from: i64,
    at: i64,
) -> Result<Vec<StoredRecord>> {
    let mut out = Vec::with_capacity(snapshot.len() + segments.iter().map(Vec::len).sum::<usize>());
    for record in snapshot.into_iter().chain(segments.into_iter().flatten()) {
        if record.room != room {
            return Err(ClientError::integrity(format!(
                "a stored record of room {:?} was found among the records of room {room:?}",
                record.room
            )));
        }
        if record.ts_ms >= from && record.ts_ms <= at {
            out.push(record);
        }
    }
    out.sort_by_key(|r| r.ts_ms);
    Ok(out)
}

/// Where one room's records are.
#[derive(Debug, Default)]
struct RoomSources {
    /// The room's directory in the snapshot.
    dir: Option<BlobId>,
    /// Its live segments, in commit order.
    segments: Vec<pb::SegmentInfo>,
}

/// Prints the records of `query` through `out`, room after room; see the
/// module doc for the order and the checks.
pub async fn export(
    repo: &Repository,
    query: &ExportQuery,
    mut out: impl FnMut(&StoredRecord) -> Result<()>,
) -> Result<ExportSummary> {
    let dataset = query.dataset.as_str();
    let from = query.from_ms.unwrap_or(i64::MIN);
    let at = query.at_ms.unwrap_or(i64::MAX);
    if from > at {
        return Err(ClientError::BadInput {
            what: format!("--from ({from}) is after --at ({at})"),
        });
    }
    let wanted_key = match &query.room {
        Some(room) => {
            check_room(room)?;
            Some(room_key(repo.key(), dataset, room))
        }
        None => None,
    };
    let listing = list_segments(repo, dataset, wanted_key.as_ref(), from, at).await?;
    let snapshot = listed_snapshot(repo, dataset, listing.snapshot).await?;
    // Day files may use a dictionary stored since the repository was opened.
    if snapshot.is_some()
        && let Err(error) = repo.refresh_dictionaries().await
    {
        tracing::warn!(%error, "compression dictionaries not re-listed; using those loaded at open");
    }
    let root = match &snapshot {
        Some(s) => Some(repo.load_tree(&s.root_tree).await?),
        None => None,
    };
    let mut summary = ExportSummary {
        snapshot: snapshot.as_ref().map(Snapshot::id_hex),
        ..ExportSummary::default()
    };
    let rooms = match (&query.room, wanted_key) {
        (Some(room), Some(key)) => {
            let mut sources = RoomSources {
                dir: root
                    .as_ref()
                    .map(|t| room_dir(t, room))
                    .transpose()?
                    .flatten(),
                segments: listing.segments,
            };
            if sources.segments.iter().any(|s| s.room != key) {
                return Err(ClientError::integrity(
                    "the segment listing of one room named segments of another",
                ));
            }
            sources.segments.shrink_to_fit();
            BTreeMap::from([(room.clone(), sources)])
        }
        _ => all_rooms(repo, dataset, root.as_ref(), listing.segments).await?,
    };
    for (room, sources) in rooms {
        let records = room_records(repo, &room, &sources, from, at, &mut summary).await?;
        if !records.is_empty() {
            summary.rooms += 1;
        }
        for record in &records {
            out(record)?;
            summary.records += 1;
        }
    }
    Ok(summary)
}

/// The directory of `room` in a snapshot's root tree, if it has one.
fn room_dir(root: &Tree, room: &str) -> Result<Option<BlobId>> {
    match root
        .entries
        .binary_search_by(|e| e.name.as_slice().cmp(room.as_bytes()))
    {
        Ok(i) => match &root.entries[i].kind {
            EntryKind::Dir { subtree } => Ok(Some(*subtree)),
            other => Err(ClientError::integrity(format!(
                "room {room:?} of the stream snapshot is a {}, not a directory",
                other.word()
            ))),
        },
        Err(_) => Ok(None),
    }
}

/// Every room of the snapshot and of the listed segments, by name. A room
/// only in segments is named by its first segment's first record, checked
/// against the segment's room key.
async fn all_rooms(
    repo: &Repository,
    dataset: &str,
    root: Option<&Tree>,
    segments: Vec<pb::SegmentInfo>,
) -> Result<BTreeMap<String, RoomSources>> {
    let mut rooms: BTreeMap<String, RoomSources> = BTreeMap::new();
    let mut names: HashMap<[u8; 32], String> = HashMap::new();
    for entry in root.map(|t| t.entries.as_slice()).unwrap_or_default() {
        let EntryKind::Dir { subtree } = &entry.kind else {
            return Err(ClientError::integrity(format!(
                "{} in the stream snapshot is not a room directory",
                entry.display_name()
            )));
        };
        let name = String::from_utf8(entry.name.clone()).map_err(|_| {
            ClientError::integrity(format!(
                "room directory {} is not UTF-8",
                entry.display_name()
            ))
        })?;
        names.insert(room_key(repo.key(), dataset, &name), name.clone());
        rooms.insert(
            name,
            RoomSources {
                dir: Some(*subtree),
                segments: Vec::new(),
            },
        );
    }
    let mut by_key: Vec<([u8; 32], Vec<pb::SegmentInfo>)> = Vec::new();
    for segment in segments {
        let key = id32(&segment.room, "segment room key")?;
        match by_key.last_mut() {
            Some((k, list)) if *k == key => list.push(segment),
            _ => by_key.push((key, vec![segment])),
        }
    }
    let unknown: Vec<BlobId> = by_key
        .iter()
        .filter(|(k, _)| !names.contains_key(k))
        .map(|(_, list)| id32(&list[0].blob, "segment blob id"))
        .collect::<Result<_>>()?;
    let firsts = read_blobs_bulk(repo, &unknown).await?;
    for (key, list) in by_key {
        let name = match names.get(&key) {
            Some(name) => name.clone(),
            None => {
                let blob = id32(&list[0].blob, "segment blob id")?;
                let plain = firsts
                    .get(&blob)
                    .ok_or_else(|| ClientError::integrity("segment missing from the answer"))?;
                let first = decode_segment(plain)?.into_iter().next().ok_or_else(|| {
                    ClientError::integrity(format!("segment {} is empty", hex::encode(blob)))
                })?;
                if room_key(repo.key(), dataset, &first.room) != key {
                    return Err(ClientError::integrity(format!(
                        "segment {} holds records of a room its key does not name",
                        hex::encode(blob)
                    )));
                }
                names.insert(key, first.room.clone());
                first.room
            }
        };
        rooms.entry(name).or_default().segments.extend(list);
    }
    Ok(rooms)
}

/// One room's records in the window, read from its day files meeting the
/// window and its live segments.
async fn room_records(
    repo: &Repository,
    room: &str,
    sources: &RoomSources,
    from: i64,
    at: i64,
    summary: &mut ExportSummary,
) -> Result<Vec<StoredRecord>> {
    let mut snapshot_records = Vec::new();
    if let Some(dir) = &sources.dir {
        let tree = repo.load_tree(dir).await?;
        let mut files: Vec<&[ChunkRef]> = Vec::new();
        for entry in &tree.entries {
            let start = day_file_start(&entry.name).ok_or_else(|| {
                ClientError::integrity(format!(
                    "{room}/{} in the stream snapshot is not a day file (YYYY-MM-DD.jsonl)",
                    entry.display_name()
                ))
            })?;
            if !day_meets(start, from, at) {
                continue;
            }
            match &entry.kind {
                EntryKind::File { chunks, .. } => files.push(chunks),
                other => {
                    return Err(ClientError::integrity(format!(
                        "{room}/{} in the stream snapshot is a {}, not a file",
                        entry.display_name(),
                        other.word()
                    )));
                }
            }
        }
        summary.day_files += files.len() as u64;
        for content in read_files(repo, &files).await? {
            snapshot_records.extend(decode_segment(&content)?);
        }
    }
    let blobs: Vec<BlobId> = sources
        .segments
        .iter()
        .map(|s| id32(&s.blob, "segment blob id"))
        .collect::<Result<_>>()?;
    let plain = read_blobs_bulk(repo, &blobs).await?;
    let mut segment_records = Vec::with_capacity(blobs.len());
    for blob in &blobs {
        let bytes = plain
            .get(blob)
            .ok_or_else(|| ClientError::integrity("segment missing from the answer"))?;
        segment_records.push(decode_segment(bytes)?);
    }
    summary.segments += blobs.len() as u64;
    merge_room(room, snapshot_records, segment_records, from, at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::record::parse_time;

    fn rec(room: &str, ts: i64, tag: &str) -> StoredRecord {
        StoredRecord {
            room: room.into(),
            ts_ms: ts,
            line: format!(r#"{{"room":"{room}","ts":{ts},"tag":"{tag}"}}"#).into_bytes(),
        }
    }

    fn tags(records: &[StoredRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.line).expect("json");
                v["tag"].as_str().expect("tag").to_string()
            })
            .collect()
    }

    #[test]
    fn merge_orders_by_time_with_snapshot_first_then_commit_order() {
        let snapshot = vec![rec("r", 1, "s1"), rec("r", 5, "s5")];
        let segments = vec![
            vec![rec("r", 5, "a5"), rec("r", 7, "a7")],
            vec![rec("r", 0, "b0"), rec("r", 5, "b5"), rec("r", 5, "b5bis")],
        ];
        let merged = merge_room("r", snapshot, segments, i64::MIN, i64::MAX).expect("merge");
        assert_eq!(tags(&merged), ["b0", "s1", "s5", "a5", "b5", "b5bis", "a7"]);
    }

    #[test]
    fn merge_keeps_the_window_inclusive() {
        let segments = vec![(0..10).map(|t| rec("r", t, &t.to_string())).collect()];
        let merged = merge_room("r", Vec::new(), segments, 3, 6).expect("merge");
        assert_eq!(tags(&merged), ["3", "4", "5", "6"]);
    }

    #[test]
    fn a_record_of_another_room_is_an_integrity_error_not_output() {
        let segments = vec![vec![rec("r", 1, "a"), rec("other", 2, "b")]];
        let error = merge_room("r", Vec::new(), segments, i64::MIN, i64::MAX)
            .expect_err("another room's record");
        assert!(matches!(error, ClientError::Integrity { .. }), "{error}");
        // Even outside the window.
        let snapshot = vec![rec("other", 100, "x")];
        assert!(merge_room("r", snapshot, Vec::new(), 0, 10).is_err());
    }

    #[test]
    fn day_files_are_utc_days_and_meet_windows_at_their_edges() {
        let start = day_file_start(b"2026-11-28.jsonl").expect("a day file");
        assert_eq!(start, parse_time("2026-11-28T00:00:00Z").expect("t"));
        for bad in [
            &b"2026-11-28.json"[..],
            b"2026-13-01.jsonl",
            b"2026-1-01.jsonl",
            b"notes.txt",
            b"\xff.jsonl",
        ] {
            assert_eq!(day_file_start(bad), None, "{bad:?}");
        }
        let end = start + DAY_MS - 1;
        assert!(day_meets(start, end, end));
        assert!(!day_meets(start, end + 1, i64::MAX));
        assert!(day_meets(start, i64::MIN, start));
        assert!(!day_meets(start, i64::MIN, start - 1));
        assert!(day_meets(start, i64::MIN, i64::MAX));
    }

    fn page(segments: &[u8], next: &[u8], snapshot: u8, generation: u64) -> pb::ListSegmentsReply {
        pb::ListSegmentsReply {
            segments: segments
                .iter()
                .map(|&n| pb::SegmentInfo {
                    id: vec![n],
                    ..Default::default()
                })
                .collect(),
            next_page: next.to_vec(),
            snapshot: if snapshot == 0 {
                Vec::new()
            } else {
                vec![snapshot; 32]
            },
            generation,
        }
    }

    fn ids(listing: &Listing) -> Vec<u8> {
        listing.segments.iter().map(|s| s.id[0]).collect()
    }

    /// A fake node: `script` answers calls in order; records the pages asked.
    async fn run_listing(script: Vec<pb::ListSegmentsReply>) -> (Result<Listing>, Vec<Vec<u8>>) {
        let script = std::sync::Mutex::new(script.into_iter());
        let asked = std::sync::Mutex::new(Vec::new());
        let result = list_consistent("chat", |token| {
            asked.lock().expect("lock").push(token);
            let next = script.lock().expect("lock").next();
            async move { next.ok_or_else(|| ClientError::integrity("script ran out")) }
        })
        .await;
        (result, asked.into_inner().expect("lock"))
    }

    #[tokio::test]
    async fn a_listing_that_sees_a_compaction_starts_again() {
        let (listing, asked) = run_listing(vec![
            page(&[1, 2], b"p2", 7, 3),
            // A compaction committed between pages: new snapshot, new generation.
            page(&[3], b"", 8, 4),
            page(&[3], b"p2", 8, 4),
            page(&[4], b"", 8, 4),
        ])
        .await;
        let listing = listing.expect("listed");
        assert_eq!(ids(&listing), [3, 4]);
        assert_eq!(listing.snapshot, Some([8; 32]));
        assert_eq!(listing.generation, 4);
        assert_eq!(
            asked,
            [b"".to_vec(), b"p2".to_vec(), b"".to_vec(), b"p2".to_vec()]
        );

        // A generation change alone (a retention drop) restarts it too.
        let (listing, _) = run_listing(vec![
            page(&[1], b"p2", 0, 1),
            page(&[2], b"", 0, 2),
            page(&[2], b"", 0, 2),
        ])
        .await;
        let listing = listing.expect("listed");
        assert_eq!(ids(&listing), [2]);
        assert_eq!(listing.snapshot, None);
    }

    #[tokio::test]
    async fn a_listing_that_never_settles_is_a_clear_error() {
        let mut script = Vec::new();
        for generation in 0..(2 * LISTING_ATTEMPTS_MAX as u64) {
            script.push(page(&[1], b"p2", 1, generation * 2));
            script.push(page(&[2], b"", 1, generation * 2 + 1));
        }
        let (result, asked) = run_listing(script).await;
        assert!(
            matches!(result, Err(ClientError::StreamListingUnstable { attempts, .. }) if attempts == LISTING_ATTEMPTS_MAX),
            "{result:?}"
        );
        assert_eq!(asked.len(), 2 * LISTING_ATTEMPTS_MAX);
    }
}
