//! Compaction: live segments folded into per-room, per-day files
//! (`ROOM/YYYY-MM-DD.jsonl`, UTC days, JSON lines sorted by `ts`) of a new
//! snapshot of the dataset, which retires those segments in its own commit.
//!
//! It runs on the client because it needs the key: nodes only hold sealed
//! segments and room keys. The new tree is the previous snapshot's tree
//! with every day the segments touch rewritten (old lines first on equal
//! `ts`, then the segments' in commit order); untouched rooms and days keep
//! their tree entries, so nothing of them is read or uploaded again. Day
//! files wholly older than the dataset's max-age are left out. Rooms are
//! folded one at a time (the listing groups segments by room key), so
//! memory holds one room's new records and touched day files, whatever the
//! size of the window; only the segment blobs of consecutive small rooms
//! are fetched together, up to [`FETCH_BYTES_MAX`] of plaintext.
//!
//! The commit names the retired segments: the catalog entry and their
//! removal are one Raft entry, and if any of them is gone already (another
//! compaction won) nothing changes, so snapshot + live segments always hold
//! every record exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cairn_proto::v1 as pb;

use crate::backup::{BackupOptions, Level, Progress, TreeWriter, backup_tree};
use crate::error::{ClientError, Result};
use crate::repo::Repository;
use crate::seal::BlobId;
use crate::stream::export::{
    day_file_start, id32, list_segments, listed_snapshot, read_blobs_bulk, read_files,
};
use crate::stream::record::{DAY_MS, StoredRecord, day_of, day_start, decode_segment, room_key};
use crate::tree::{ChunkRef, EntryKind, Tree, TreeEntry};

/// The tag every compaction snapshot carries.
pub const COMPACTION_TAG: &str = "stream";

/// What to compact.
#[derive(Debug, Clone, Default)]
pub struct CompactOptions {
    pub dataset: String,
    /// Only segments whose records are all older than this (`last_ts_ms <
    /// before_ms`); `None`: every live segment.
    pub before_ms: Option<i64>,
}

/// What a compaction did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CompactSummary {
    /// The new snapshot (hex); `None` when there was nothing to compact.
    pub snapshot_id: Option<String>,
    /// Segments retired.
    pub segments: u64,
    /// Records they held.
    pub records: u64,
    /// Rooms they touched.
    pub rooms: u64,
    /// Day files written (new or rewritten).
    pub day_files: u64,
    /// Day files left out as wholly older than the dataset's max-age.
    pub dropped_day_files: u64,
    pub duration_s: f64,
}

/// One day file of the new tree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum DayPlan {
    /// Unchanged from the previous snapshot.
    Keep(TreeEntry),
    /// New or rewritten: its full content.
    Write {
        name: Vec<u8>,
        content: Vec<u8>,
        /// Largest `ts` of the day, the file's mtime.
        last_ts_ms: i64,
    },
}

/// One room of the new tree.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RoomPlan {
    /// Day files in name (= date) order.
    pub days: Vec<DayPlan>,
    pub dropped: u64,
}

/// `YYYY-MM-DD.jsonl` of the day holding `ts_ms`.
pub(crate) fn day_file_name(ts_ms: i64) -> Vec<u8> {
    format!("{}.jsonl", day_of(ts_ms)).into_bytes()
}

/// Plans one room: `previous` is its directory in the previous snapshot,
/// `new` its records from the segments in commit order, `old` the decoded
/// previous day files of the days `new` touches (by file name), `cutoff`
/// the max-age limit (a day ending at or before it is left out).
pub(crate) fn plan_room(
    room: &str,
    previous: Option<&Tree>,
    new: Vec<StoredRecord>,
    old: &HashMap<Vec<u8>, Vec<StoredRecord>>,
    cutoff_ms: Option<i64>,
) -> Result<RoomPlan> {
    let mut new_by_day: BTreeMap<i64, Vec<StoredRecord>> = BTreeMap::new();
    for record in new {
        if record.room != room {
            return Err(ClientError::integrity(format!(
                "a segment of room {room:?} holds a record of room {:?}",
                record.room
            )));
        }
        new_by_day
            .entry(day_start(record.ts_ms))
            .or_default()
            .push(record);
    }
    let mut previous_by_day: BTreeMap<i64, &TreeEntry> = BTreeMap::new();
    for entry in previous.map(|t| t.entries.as_slice()).unwrap_or_default() {
        let start = day_file_start(&entry.name).ok_or_else(|| {
            ClientError::integrity(format!(
                "{room}/{} in the stream snapshot is not a day file (YYYY-MM-DD.jsonl)",
                entry.display_name()
            ))
        })?;
        previous_by_day.insert(start, entry);
    }
    let days: BTreeSet<i64> = new_by_day
        .keys()
        .chain(previous_by_day.keys())
        .copied()
        .collect();
    let mut plan = RoomPlan::default();
    for start in days {
        if cutoff_ms.is_some_and(|cutoff| start.saturating_add(DAY_MS) <= cutoff) {
            plan.dropped += 1;
            continue;
        }
        let Some(added) = new_by_day.remove(&start) else {
            if let Some(entry) = previous_by_day.get(&start) {
                plan.days.push(DayPlan::Keep((*entry).clone()));
            }
            continue;
        };
        let name = day_file_name(start);
        let mut records = match previous_by_day.get(&start) {
            Some(_) => old.get(&name).cloned().ok_or_else(|| {
                ClientError::integrity(format!(
                    "day file {room}/{} was not read before merging",
                    String::from_utf8_lossy(&name)
                ))
            })?,
            None => Vec::new(),
        };
        if let Some(stray) = records.iter().find(|r| r.room != room) {
            return Err(ClientError::integrity(format!(
                "day file {room}/{} holds a record of room {:?}",
                String::from_utf8_lossy(&name),
                stray.room
            )));
        }
        records.extend(added);
        // Stable: on equal ts, old lines first, then commit order.
        records.sort_by_key(|r| r.ts_ms);
        let last_ts_ms = records.last().map(|r| r.ts_ms).unwrap_or(start);
        let mut content = Vec::with_capacity(records.iter().map(|r| r.line.len() + 1).sum());
        for record in &records {
            content.extend_from_slice(&record.line);
            content.push(b'\n');
        }
        plan.days.push(DayPlan::Write {
            name,
            content,
            last_ts_ms,
        });
    }
    Ok(plan)
}

/// The dataset's max-age limit now (Unix ms), if its policy sets one and
/// this token may read policies.
async fn max_age_cutoff(repo: &Repository, dataset: &str) -> Result<Option<i64>> {
    let policies = match repo.policies().await {
        Ok((policies, _)) => policies,
        Err(ClientError::LifecycleRefused { .. } | ClientError::PermissionDenied { .. }) => {
            tracing::warn!(
                dataset,
                "this token may not read dataset policies: day files past max-age are kept (the leader's policy worker still drops old segments)"
            );
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let Some(max_age) = policies
        .into_iter()
        .find(|p| p.dataset == dataset)
        .and_then(|p| p.max_age)
    else {
        return Ok(None);
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    Ok(Some(now.saturating_sub(
        i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX),
    )))
}

/// Splits listed segment room keys (rooms in key order, each room's in
/// commit order) into runs of one room each, as index ranges. A key seen
/// again after another room's run means the listing is not grouped by room:
/// an integrity error, never a second directory of the same room.
pub(crate) fn room_runs<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Range<usize>>> {
    let mut runs: Vec<Range<usize>> = Vec::new();
    let mut seen: HashSet<&[u8]> = HashSet::new();
    let mut current: Option<&[u8]> = None;
    for (i, key) in keys.into_iter().enumerate() {
        if current == Some(key) {
            if let Some(run) = runs.last_mut() {
                run.end = i + 1;
            }
            continue;
        }
        if !seen.insert(key) {
            return Err(ClientError::integrity(format!(
                "the segment listing names room key {} in two separate runs",
                hex::encode(key)
            )));
        }
        current = Some(key);
        runs.push(i..i + 1);
    }
    Ok(runs)
}

/// Segment plaintext fetched at once, about. A batch pack holds segments
/// of many rooms, so fetching room by room would read every pack once per
/// room (≈ 9× slower measured with 100 rooms); consecutive small rooms are
/// fetched together up to this, and memory stays bounded by it plus one
/// room's decoded records.
const FETCH_BYTES_MAX: u64 = 64 << 20;
/// Listed records of the first fetch, before a record's size is known.
const FIRST_FETCH_RECORDS: u64 = 16_384;

/// The rooms fetched together from `start`: consecutive rooms (given by
/// their listed record counts) while they hold at most `max_records`; a
/// room is never split, so one larger than that is fetched alone.
pub(crate) fn fetch_group(room_records: &[u64], start: usize, max_records: u64) -> Range<usize> {
    let mut total = 0u64;
    let mut end = start;
    while let Some(&records) = room_records.get(end) {
        if end > start && total.saturating_add(records) > max_records {
            break;
        }
        total = total.saturating_add(records);
        end += 1;
    }
    start..end
}

/// Compacts the dataset's live segments (those older than
/// `options.before_ms`, if given) into a new snapshot that retires them.
///
/// Rooms are folded one at a time inside the tree builder, so memory holds
/// one room's new records and touched day files, never the whole window.
pub async fn compact(repo: Arc<Repository>, options: &CompactOptions) -> Result<CompactSummary> {
    let started = Instant::now();
    let dataset = options.dataset.as_str();
    let to = options
        .before_ms
        .map(|b| b.saturating_sub(1))
        .unwrap_or(i64::MAX);
    let listing = list_segments(&repo, dataset, None, i64::MIN, to).await?;
    let segments: Vec<_> = listing
        .segments
        .into_iter()
        .filter(|s| options.before_ms.is_none_or(|b| s.last_ts_ms < b))
        .collect();
    let mut summary = CompactSummary::default();
    if segments.is_empty() {
        summary.duration_s = started.elapsed().as_secs_f64();
        return Ok(summary);
    }
    // Before anything is read: a listing not grouped by room is refused.
    let runs = room_runs(segments.iter().map(|s| s.room.as_slice()))?;
    let parent = listed_snapshot(&repo, dataset, listing.snapshot).await?;
    let mut trees = match &parent {
        Some(p) => repo.load_trees(&p.root_tree, &[]).await?,
        None => HashMap::new(),
    };
    let root = match &parent {
        Some(p) => trees
            .remove(&p.root_tree)
            .ok_or_else(|| ClientError::integrity("the snapshot's root tree was not loaded"))?,
        None => Tree::default(),
    };
    let mut previous: BTreeMap<String, (BlobId, Tree)> = BTreeMap::new();
    for entry in root.entries {
        let EntryKind::Dir { subtree } = entry.kind else {
            return Err(ClientError::integrity(format!(
                "{} in the stream snapshot is not a room directory",
                entry.display_name()
            )));
        };
        let name = String::from_utf8(entry.name)
            .map_err(|_| ClientError::integrity("a room directory name is not UTF-8"))?;
        let tree = trees
            .get(&subtree)
            .cloned()
            .ok_or_else(|| ClientError::integrity("a room's tree was not loaded"))?;
        previous.insert(name, (subtree, tree));
    }
    drop(trees);

    summary.segments = segments.len() as u64;
    summary.rooms = runs.len() as u64;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let folder = RoomFolder {
        repo: repo.clone(),
        runtime: tokio::runtime::Handle::current(),
        dataset: dataset.to_string(),
        cutoff: max_age_cutoff(&repo, dataset).await?,
        tally: tally.clone(),
    };
    let backup_options = BackupOptions {
        dataset: dataset.to_string(),
        tags: vec![COMPACTION_TAG.to_string()],
        level: Level::Full,
        use_parent: true,
        retire_segments: segments.iter().map(|s| s.id.clone()).collect(),
        ..BackupOptions::default()
    };
    let result = backup_tree(
        repo.clone(),
        &backup_options,
        parent,
        vec![format!("<stream {dataset}>")],
        Arc::new(Progress::default()),
        move |writer| folder.build_root(writer, &segments, runs, previous),
    )
    .await;
    match result {
        Ok(backup) => summary.snapshot_id = Some(backup.snapshot_id),
        Err(ClientError::Server {
            code: tonic::Code::FailedPrecondition,
            message,
            ..
        }) => return Err(ClientError::CompactionRaced { detail: message }),
        Err(e) => return Err(e),
    }
    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    summary.records = tally.records;
    summary.day_files = tally.day_files;
    summary.dropped_day_files = tally.dropped_day_files;
    summary.duration_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// One fetch group's segment plaintexts. Identical segments share a blob,
/// so each is freed after its last use, not before.
struct Blobs {
    plain: HashMap<BlobId, Vec<u8>>,
    uses: HashMap<BlobId, usize>,
}

impl Blobs {
    fn fetch(folder: &RoomFolder, ids: &[BlobId]) -> Result<Blobs> {
        let plain = folder
            .runtime
            .block_on(read_blobs_bulk(&folder.repo, ids))?;
        let mut uses: HashMap<BlobId, usize> = HashMap::new();
        for id in ids {
            *uses.entry(*id).or_default() += 1;
        }
        Ok(Blobs { plain, uses })
    }

    /// The records of one use of segment blob `id`.
    fn decode(&mut self, id: &BlobId) -> Result<Vec<StoredRecord>> {
        let plain = self
            .plain
            .get(id)
            .ok_or_else(|| ClientError::integrity("segment missing from the answer"))?;
        let records = decode_segment(plain)?;
        if let Some(left) = self.uses.get_mut(id) {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.plain.remove(id);
            }
        }
        Ok(records)
    }
}

/// The counts the tree builder reports back (it returns only the root).
#[derive(Debug, Default)]
struct Tally {
    records: u64,
    day_files: u64,
    dropped_day_files: u64,
}

/// The per-room fold, run inside [`backup_tree`]'s build closure. That
/// closure runs on a blocking thread, so reads go through
/// `runtime.block_on`, as the backup session's index look-ups do.
struct RoomFolder {
    repo: Arc<Repository>,
    runtime: tokio::runtime::Handle,
    dataset: String,
    /// The max-age limit (Unix ms), if any.
    cutoff: Option<i64>,
    tally: Arc<Mutex<Tally>>,
}

impl RoomFolder {
    /// Folds each run of `segments` (one room each) into its previous
    /// directory, then carries over the rooms without new segments; stores
    /// every day file and room tree and returns the root tree. Only the
    /// rooms' tree entries outlive a room's turn (and a fetch group's
    /// not yet decoded segment plaintexts).
    fn build_root(
        &self,
        writer: &TreeWriter,
        segments: &[pb::SegmentInfo],
        runs: Vec<Range<usize>>,
        mut previous: BTreeMap<String, (BlobId, Tree)>,
    ) -> Result<Tree> {
        let mut rooms = Vec::with_capacity(previous.len() + runs.len());
        let listed: Vec<u64> = runs
            .iter()
            .map(|run| {
                segments[run.clone()]
                    .iter()
                    .map(|s| u64::from(s.records))
                    .sum()
            })
            .collect();
        let mut max_records = FIRST_FETCH_RECORDS;
        let mut next = 0;
        while next < runs.len() {
            let group = fetch_group(&listed, next, max_records);
            next = group.end;
            let first = runs[group.start].start;
            let blob_ids: Vec<BlobId> = segments[first..runs[group.end - 1].end]
                .iter()
                .map(|s| id32(&s.blob, "segment blob id"))
                .collect::<Result<_>>()?;
            let mut blobs = Blobs::fetch(self, &blob_ids)?;
            // The next fetch sized from the record size seen in this one.
            let records: u64 = listed[group.clone()].iter().sum();
            let bytes: u64 = blobs.plain.values().map(|p| p.len() as u64).sum();
            max_records = u64::try_from(
                u128::from(FETCH_BYTES_MAX) * u128::from(records.max(1)) / u128::from(bytes.max(1)),
            )
            .unwrap_or(u64::MAX)
            .max(1);
            for run in &runs[group] {
                let (room, new) = self.room_records(
                    &segments[run.clone()],
                    &blob_ids[run.start - first..run.end - first],
                    &mut blobs,
                )?;
                rooms.extend(self.fold_room(writer, room, new, &mut previous)?);
            }
        }
        // Rooms without new segments: nothing read, days past max-age left out.
        for (room, (id, tree)) in previous {
            let plan = plan_room(&room, Some(&tree), Vec::new(), &HashMap::new(), self.cutoff)?;
            rooms.extend(self.store_room(writer, room, Some(id), plan)?);
        }
        Ok(Tree::new(rooms)?)
    }

    /// Merges one room's new records into its previous directory (taken out
    /// of `previous`) and stores the result; returns its root entry.
    fn fold_room(
        &self,
        writer: &TreeWriter,
        room: String,
        new: Vec<StoredRecord>,
        previous: &mut BTreeMap<String, (BlobId, Tree)>,
    ) -> Result<Option<TreeEntry>> {
        let before = previous.remove(&room);
        let old = self.touched_days(&room, before.as_ref().map(|(_, t)| t), &new)?;
        let plan = plan_room(
            &room,
            before.as_ref().map(|(_, t)| t),
            new,
            &old,
            self.cutoff,
        )?;
        drop(old);
        self.store_room(writer, room, before.map(|(id, _)| id), plan)
    }

    /// One room's segments (one key, commit order): its name and its
    /// records in commit order, each segment checked against the key.
    fn room_records(
        &self,
        segments: &[pb::SegmentInfo],
        blob_ids: &[BlobId],
        blobs: &mut Blobs,
    ) -> Result<(String, Vec<StoredRecord>)> {
        // Not sized from the listed counts: they are the node's word.
        let mut new: Vec<StoredRecord> = Vec::new();
        let mut name: Option<String> = None;
        for (segment, blob) in segments.iter().zip(blob_ids) {
            let records = blobs.decode(blob)?;
            let Some(room) = records.first().map(|r| r.room.as_str()) else {
                return Err(ClientError::integrity(format!(
                    "segment {} is empty",
                    hex::encode(blob)
                )));
            };
            if room_key(self.repo.key(), &self.dataset, room).as_slice() != segment.room.as_slice()
            {
                return Err(ClientError::integrity(format!(
                    "segment {} holds records of a room its key does not name",
                    hex::encode(blob)
                )));
            }
            if name.is_none() {
                name = Some(room.to_string());
            }
            new.extend(records);
        }
        let name = name.ok_or_else(|| ClientError::integrity("a room run without segments"))?;
        self.tally().records += new.len() as u64;
        Ok((name, new))
    }

    /// The previous day files of `room` that `new` falls in, decoded, by
    /// file name.
    fn touched_days(
        &self,
        room: &str,
        previous: Option<&Tree>,
        new: &[StoredRecord],
    ) -> Result<HashMap<Vec<u8>, Vec<StoredRecord>>> {
        let Some(tree) = previous else {
            return Ok(HashMap::new());
        };
        let starts: BTreeSet<i64> = new.iter().map(|r| day_start(r.ts_ms)).collect();
        let days: BTreeSet<Vec<u8>> = starts.into_iter().map(day_file_name).collect();
        let mut names = Vec::new();
        let mut files: Vec<&[ChunkRef]> = Vec::new();
        for entry in &tree.entries {
            if !days.contains(&entry.name) {
                continue;
            }
            let EntryKind::File { chunks, .. } = &entry.kind else {
                return Err(ClientError::integrity(format!(
                    "{room}/{} in the stream snapshot is not a file",
                    entry.display_name()
                )));
            };
            names.push(entry.name.clone());
            files.push(chunks);
        }
        let contents = self.runtime.block_on(read_files(&self.repo, &files))?;
        names
            .into_iter()
            .zip(contents)
            .map(|(name, content)| Ok((name, decode_segment(&content)?)))
            .collect()
    }

    /// Stores one room's planned day files and its tree; returns its entry
    /// in the root, `None` when every day is past max-age.
    fn store_room(
        &self,
        writer: &TreeWriter,
        room: String,
        previous: Option<BlobId>,
        plan: RoomPlan,
    ) -> Result<Option<TreeEntry>> {
        {
            let mut tally = self.tally();
            tally.dropped_day_files += plan.dropped;
            tally.day_files += plan
                .days
                .iter()
                .filter(|d| matches!(d, DayPlan::Write { .. }))
                .count() as u64;
        }
        let mut entries = Vec::with_capacity(plan.days.len());
        for day in plan.days {
            match day {
                DayPlan::Keep(entry) => {
                    if let EntryKind::File { size, .. } = &entry.kind {
                        writer.reuse_file(*size);
                    }
                    entries.push(entry);
                }
                DayPlan::Write {
                    name,
                    content,
                    last_ts_ms,
                } => entries.push(TreeEntry {
                    name,
                    kind: writer.file(&content)?,
                    mode: 0o100644,
                    mtime_ns: last_ts_ms.saturating_mul(1_000_000),
                    uid: 0,
                    gid: 0,
                }),
            }
        }
        if entries.is_empty() {
            return Ok(None);
        }
        let mtime_ns = entries.iter().map(|e| e.mtime_ns).max().unwrap_or(0);
        let tree = Tree::new(entries)?;
        let subtree = writer.tree(&tree, previous)?;
        Ok(Some(TreeEntry {
            name: room.into_bytes(),
            kind: EntryKind::Dir { subtree },
            mode: 0o040755,
            mtime_ns,
            uid: 0,
            gid: 0,
        }))
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }
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

    fn t(text: &str) -> i64 {
        parse_time(text).expect("time")
    }

    fn lines(content: &[u8]) -> Vec<String> {
        decode_segment(content)
            .expect("decodes")
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.line).expect("json");
                v["tag"].as_str().expect("tag").to_string()
            })
            .collect()
    }

    fn written(plan: &RoomPlan) -> Vec<(String, Vec<String>)> {
        plan.days
            .iter()
            .filter_map(|d| match d {
                DayPlan::Write { name, content, .. } => {
                    Some((String::from_utf8_lossy(name).into_owned(), lines(content)))
                }
                DayPlan::Keep(_) => None,
            })
            .collect()
    }

    fn kept_file(name: &str) -> TreeEntry {
        TreeEntry {
            name: name.as_bytes().to_vec(),
            kind: EntryKind::File {
                size: 1,
                chunks: vec![ChunkRef {
                    id: [7; 32],
                    len: 1,
                }],
                hardlink: None,
            },
            mode: 0o100644,
            mtime_ns: 0,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn records_split_at_utc_midnight() {
        let new = vec![
            rec("r", t("2026-11-29T00:00:00Z"), "after"),
            rec("r", t("2026-11-28T23:59:59.999Z"), "before"),
            rec("r", t("2026-11-29T00:00:00.001Z"), "later"),
        ];
        let plan = plan_room("r", None, new, &HashMap::new(), None).expect("plan");
        assert_eq!(
            written(&plan),
            [
                ("2026-11-28.jsonl".to_string(), vec!["before".to_string()]),
                (
                    "2026-11-29.jsonl".to_string(),
                    vec!["after".to_string(), "later".to_string()]
                ),
            ]
        );
        assert_eq!(plan.dropped, 0);
    }

    #[test]
    fn touched_days_merge_old_lines_first_and_untouched_days_are_kept() {
        let day = t("2026-11-28T00:00:00Z");
        let previous = Tree::new(vec![
            kept_file("2026-11-27.jsonl"),
            kept_file("2026-11-28.jsonl"),
        ])
        .expect("tree");
        let old = HashMap::from([(
            b"2026-11-28.jsonl".to_vec(),
            vec![rec("r", day + 10, "old10"), rec("r", day + 20, "old20")],
        )]);
        let new = vec![
            rec("r", day + 20, "new20"),
            rec("r", day + 5, "new5"),
            rec("r", day + 20, "new20bis"),
        ];
        let plan = plan_room("r", Some(&previous), new, &old, None).expect("plan");
        assert_eq!(plan.days[0], DayPlan::Keep(kept_file("2026-11-27.jsonl")));
        assert_eq!(
            written(&plan),
            [(
                "2026-11-28.jsonl".to_string(),
                ["new5", "old10", "old20", "new20", "new20bis"]
                    .map(String::from)
                    .to_vec()
            )]
        );
        // A touched day whose old file was not read is refused, not lost.
        let new = vec![rec("r", day + 1, "x")];
        assert!(plan_room("r", Some(&previous), new, &HashMap::new(), None).is_err());
    }

    #[test]
    fn days_wholly_older_than_max_age_are_dropped() {
        let previous = Tree::new(vec![
            kept_file("2026-11-26.jsonl"),
            kept_file("2026-11-27.jsonl"),
        ])
        .expect("tree");
        // The cutoff falls inside the 28th: the 26th and 27th end before it.
        let cutoff = t("2026-11-28T12:00:00Z");
        let new = vec![
            rec("r", t("2026-11-27T23:00:00Z"), "too-old"),
            rec("r", t("2026-11-28T01:00:00Z"), "young-day"),
        ];
        let plan =
            plan_room("r", Some(&previous), new, &HashMap::new(), Some(cutoff)).expect("plan");
        assert_eq!(plan.dropped, 2);
        assert_eq!(
            written(&plan),
            [(
                "2026-11-28.jsonl".to_string(),
                vec!["young-day".to_string()]
            )]
        );
        assert_eq!(plan.days.len(), 1);
        // A day ending exactly at the cutoff is wholly older.
        let plan = plan_room(
            "r",
            Some(&previous),
            Vec::new(),
            &HashMap::new(),
            Some(t("2026-11-28T00:00:00Z")),
        )
        .expect("plan");
        assert_eq!(plan.dropped, 2);
        assert!(plan.days.is_empty());
    }

    #[test]
    fn segments_group_into_consecutive_runs_by_room_key() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let keys = [&a, &a, &b, &c, &c, &c].map(|k| k.as_slice());
        assert_eq!(room_runs(keys).expect("runs"), vec![0..2, 2..3, 3..6]);
        assert!(room_runs(std::iter::empty()).expect("runs").is_empty());
        // A room key coming back after another room's run is refused.
        let keys = [&a, &b, &a].map(|k| k.as_slice());
        assert!(matches!(
            room_runs(keys),
            Err(ClientError::Integrity { .. })
        ));
    }

    #[test]
    fn small_rooms_share_a_fetch_and_a_large_one_is_fetched_alone() {
        let rooms = [10, 20, 30, 100, 5, 45];
        let groups: Vec<_> = [0, 2, 3, 4]
            .into_iter()
            .map(|start| fetch_group(&rooms, start, 50))
            .collect();
        assert_eq!(groups, vec![0..2, 2..3, 3..4, 4..6]);
        assert_eq!(fetch_group(&rooms, 6, 50), 6..6);
    }

    #[test]
    fn a_record_of_another_room_is_refused() {
        let new = vec![rec("r", 1, "a"), rec("s", 2, "b")];
        assert!(matches!(
            plan_room("r", None, new, &HashMap::new(), None),
            Err(ClientError::Integrity { .. })
        ));
    }
}
