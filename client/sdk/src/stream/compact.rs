//! Compaction: live segments folded into per-room, per-day files
//! (`ROOM/YYYY-MM-DD.jsonl`, UTC days, JSON lines sorted by `ts`) of a new
//! snapshot of the dataset, which retires those segments in its own commit.
//!
//! It runs on the client because it needs the key: nodes only hold sealed
//! segments and room keys. The new tree is the previous snapshot's tree
//! with every day the segments touch rewritten (old lines first on equal
//! `ts`, then the segments' in commit order); untouched rooms and days keep
//! their tree entries, so nothing of them is read or uploaded again. Day
//! files wholly older than the dataset's max-age are left out.
//!
//! The commit names the retired segments: the catalog entry and their
//! removal are one Raft entry, and if any of them is gone already (another
//! compaction won) nothing changes, so snapshot + live segments always hold
//! every record exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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

/// Compacts the dataset's live segments (those older than
/// `options.before_ms`, if given) into a new snapshot that retires them.
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

    // The new records, by room, in commit order.
    let blob_ids: Vec<BlobId> = segments
        .iter()
        .map(|s| id32(&s.blob, "segment blob id"))
        .collect::<Result<_>>()?;
    let blobs = read_blobs_bulk(&repo, &blob_ids).await?;
    let mut new: BTreeMap<String, Vec<StoredRecord>> = BTreeMap::new();
    for (segment, blob) in segments.iter().zip(&blob_ids) {
        let plain = blobs
            .get(blob)
            .ok_or_else(|| ClientError::integrity("segment missing from the answer"))?;
        let records = decode_segment(plain)?;
        let Some(room) = records.first().map(|r| r.room.clone()) else {
            return Err(ClientError::integrity(format!(
                "segment {} is empty",
                hex::encode(blob)
            )));
        };
        if room_key(repo.key(), dataset, &room).as_slice() != segment.room.as_slice() {
            return Err(ClientError::integrity(format!(
                "segment {} holds records of a room its key does not name",
                hex::encode(blob)
            )));
        }
        summary.records += records.len() as u64;
        new.entry(room).or_default().extend(records);
    }
    drop(blobs);
    summary.segments = segments.len() as u64;
    summary.rooms = new.len() as u64;

    // The previous day files the new records fall in.
    let mut wanted: Vec<(String, Vec<u8>, Vec<ChunkRef>)> = Vec::new();
    for (room, records) in &new {
        let Some((_, tree)) = previous.get(room) else {
            continue;
        };
        let days: BTreeSet<Vec<u8>> = records.iter().map(|r| day_file_name(r.ts_ms)).collect();
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
            wanted.push((room.clone(), entry.name.clone(), chunks.clone()));
        }
    }
    let files: Vec<&[ChunkRef]> = wanted.iter().map(|(_, _, c)| c.as_slice()).collect();
    let contents = read_files(&repo, &files).await?;
    let mut old: HashMap<String, HashMap<Vec<u8>, Vec<StoredRecord>>> = HashMap::new();
    for ((room, name, _), content) in wanted.into_iter().zip(contents) {
        old.entry(room)
            .or_default()
            .insert(name, decode_segment(&content)?);
    }

    let cutoff = max_age_cutoff(&repo, dataset).await?;
    let no_old = HashMap::new();
    let names: BTreeSet<String> = previous.keys().chain(new.keys()).cloned().collect();
    let mut plans: Vec<(String, Option<BlobId>, RoomPlan)> = Vec::with_capacity(names.len());
    for room in names {
        let before = previous.remove(&room);
        let plan = plan_room(
            &room,
            before.as_ref().map(|(_, t)| t),
            new.remove(&room).unwrap_or_default(),
            old.get(&room).unwrap_or(&no_old),
            cutoff,
        )?;
        summary.dropped_day_files += plan.dropped;
        summary.day_files += plan
            .days
            .iter()
            .filter(|d| matches!(d, DayPlan::Write { .. }))
            .count() as u64;
        plans.push((room, before.map(|(id, _)| id), plan));
    }

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
        move |writer| build_root(writer, plans),
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
    summary.duration_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Stores the planned day files and room trees; returns the root tree.
fn build_root(writer: &TreeWriter, plans: Vec<(String, Option<BlobId>, RoomPlan)>) -> Result<Tree> {
    let mut rooms = Vec::with_capacity(plans.len());
    for (room, previous, plan) in plans {
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
            continue; // every day past max-age
        }
        let mtime_ns = entries.iter().map(|e| e.mtime_ns).max().unwrap_or(0);
        let tree = Tree::new(entries)?;
        let subtree = writer.tree(&tree, previous)?;
        rooms.push(TreeEntry {
            name: room.into_bytes(),
            kind: EntryKind::Dir { subtree },
            mode: 0o040755,
            mtime_ns,
            uid: 0,
            gid: 0,
        });
    }
    Ok(Tree::new(rooms)?)
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
    fn a_record_of_another_room_is_refused() {
        let new = vec![rec("r", 1, "a"), rec("s", 2, "b")];
        assert!(matches!(
            plan_room("r", None, new, &HashMap::new(), None),
            Err(ClientError::Integrity { .. })
        ));
    }
}
