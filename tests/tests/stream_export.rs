//! Stream export and compaction end to end on a three-region cluster:
//! records over three rooms and two UTC days appended through
//! `RecordStream`; exports at three points in time equal a model the test
//! computes from what it sent, before and after compaction; `restore
//! latest` of a compaction snapshot gives `ROOM/YYYY-MM-DD.jsonl` files
//! equal to the model's room-days; a second compaction after more records;
//! two concurrent compactions: one wins, the other errors cleanly, and the
//! export stays exact.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_client::restore::{RestoreOptions, restore};
use cairn_client::stream::compact::{CompactOptions, CompactSummary, compact};
use cairn_client::stream::export::{ExportQuery, export};
use cairn_client::stream::record::{Record, day_of, parse_time};
use cairn_client::stream::writer::{RecordStream, StreamOptions};
use cairn_client::{ClientError, Repository};
use cairn_tests::*;

const DATASET: &str = "chat-live";
const ROOMS: [&str; 3] = ["lobby", "room-42", "vip"];

/// The model: every record sent, in send order (one writer: commit order).
#[derive(Default)]
struct Model {
    sent: Vec<(String, i64, Vec<u8>)>,
}

impl Model {
    /// A room's lines with `ts <= at`, by ts, ties in send order.
    fn room_at(&self, room: &str, at: i64) -> Vec<Vec<u8>> {
        let mut lines: Vec<&(String, i64, Vec<u8>)> = self
            .sent
            .iter()
            .filter(|(r, ts, _)| r == room && *ts <= at)
            .collect();
        lines.sort_by_key(|(_, ts, _)| *ts);
        lines.into_iter().map(|(_, _, l)| l.clone()).collect()
    }

    /// Every room's day files as compaction writes them.
    fn day_files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut files: BTreeMap<String, Vec<(i64, Vec<u8>)>> = BTreeMap::new();
        for (room, ts, line) in &self.sent {
            files
                .entry(format!("{room}/{}.jsonl", day_of(*ts)))
                .or_default()
                .push((*ts, line.clone()));
        }
        files
            .into_iter()
            .map(|(name, mut lines)| {
                lines.sort_by_key(|(ts, _)| *ts);
                let mut content = Vec::new();
                for (_, line) in lines {
                    content.extend_from_slice(&line);
                    content.push(b'\n');
                }
                (name, content)
            })
            .collect()
    }
}

/// Appends `count` records from `start_seq` spread over the rooms and over
/// the two days around `midnight`, some with equal timestamps.
async fn must_append(repo: &Arc<Repository>, model: &mut Model, start_seq: u64, count: u64) {
    let stream = RecordStream::open(repo.clone(), StreamOptions::new(DATASET, "w1"))
        .await
        .expect("stream opens");
    let midnight = parse_time("2026-11-29T00:00:00Z").expect("time");
    let mut pending = Vec::new();
    for n in start_seq..start_seq + count {
        let room = ROOMS[(n % 3) as usize];
        // From three hours before midnight to three hours after; every
        // fifth record shares the previous one's time.
        let offset = ((n * 7_919) % 21_600_000) as i64 - 10_800_000;
        let ts = midnight + offset - offset % 5_000;
        let line = format!(r#"{{"room":"{room}","user":"u{n}","ts":{ts},"text":"message {n}"}}"#);
        let record = Record::parse(line.as_bytes(), n).expect("a valid record");
        model.sent.push((room.to_string(), ts, record.line.clone()));
        pending.push(stream.send(record).await.expect("queued"));
    }
    for durable in pending {
        durable.await.expect("durable");
    }
    stream.close().await.expect("closed cleanly");
}

async fn must_export_room(repo: &Repository, room: &str, at: i64) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    export(
        repo,
        &ExportQuery {
            dataset: DATASET.into(),
            room: Some(room.into()),
            from_ms: None,
            at_ms: Some(at),
        },
        |record| {
            assert_eq!(record.room, room, "a room filter returned another room");
            lines.push(record.line.clone());
            Ok(())
        },
    )
    .await
    .expect("export");
    lines
}

/// Every room at three times (before, around and after midnight) equals the model.
async fn must_export_like_the_model(repo: &Repository, model: &Model) {
    for at in [
        "2026-11-28T22:30:00Z",
        "2026-11-29T00:00:00Z",
        "2026-11-30T00:00:00Z",
    ] {
        let at = parse_time(at).expect("time");
        for room in ROOMS {
            let got = must_export_room(repo, room, at).await;
            let want = model.room_at(room, at);
            assert!(!want.is_empty(), "the model has records of {room} by {at}");
            assert_eq!(got, want, "export of {room} at {at}");
        }
    }
    // All rooms: rooms in name order, each in order.
    let mut all = Vec::new();
    let summary = export(
        repo,
        &ExportQuery {
            dataset: DATASET.into(),
            room: None,
            from_ms: None,
            at_ms: None,
        },
        |record| {
            all.push(record.line.clone());
            Ok(())
        },
    )
    .await
    .expect("export of every room");
    let want: Vec<Vec<u8>> = ROOMS
        .iter()
        .flat_map(|room| model.room_at(room, i64::MAX))
        .collect();
    assert_eq!(all, want, "export of every room");
    assert_eq!(summary.rooms, 3);
}

async fn must_compact(repo: &Arc<Repository>) -> CompactSummary {
    compact(
        repo.clone(),
        &CompactOptions {
            dataset: DATASET.into(),
            before_ms: None,
        },
    )
    .await
    .expect("compaction")
}

/// `restore latest` of the dataset gives the model's room-day files.
async fn must_restore_day_files(repo: &Repository, model: &Model) {
    let target = tempfile::tempdir().expect("temp dir");
    let snapshot = repo
        .find_snapshot("latest", Some(DATASET))
        .await
        .expect("a compaction snapshot");
    restore(
        repo,
        &snapshot,
        target.path(),
        &RestoreOptions::default(),
        Default::default(),
    )
    .await
    .expect("restore");
    let mut got = BTreeMap::new();
    for path in files_under(target.path()) {
        let name = path
            .strip_prefix(target.path())
            .expect("under the target")
            .to_string_lossy()
            .into_owned();
        got.insert(name, std::fs::read(&path).expect("restored file"));
    }
    let want = model.day_files();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(got == want, "restored day files differ from the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_compact_restore_and_concurrent_compactions_stay_exact() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = must_start_cluster(dir.path()).await;
    let repo = must_init(&cluster).await;
    let mut model = Model::default();

    must_append(&repo, &mut model, 1, 3_000).await;
    must_export_like_the_model(&repo, &model).await;

    let first = must_compact(&repo).await;
    assert!(first.snapshot_id.is_some(), "{first:?}");
    assert_eq!(first.records, 3_000);
    assert_eq!(first.rooms, 3);
    assert_eq!(first.day_files, 6, "3 rooms × 2 days");
    must_export_like_the_model(&repo, &model).await;
    must_restore_day_files(&repo, &model).await;
    // Nothing left to compact.
    assert_eq!(must_compact(&repo).await.snapshot_id, None);

    // More records, a second compaction merges them into the same days.
    must_append(&repo, &mut model, 3_001, 1_500).await;
    must_export_like_the_model(&repo, &model).await;
    let second = must_compact(&repo).await;
    assert_eq!(second.records, 1_500);
    must_export_like_the_model(&repo, &model).await;
    must_restore_day_files(&repo, &model).await;

    // Two compactions of the same segments at once: one wins, the other
    // is refused with the clear error, and nothing is lost or doubled.
    must_append(&repo, &mut model, 4_501, 900).await;
    let options = CompactOptions {
        dataset: DATASET.into(),
        before_ms: None,
    };
    let (a, b) = tokio::join!(
        compact(repo.clone(), &options),
        compact(repo.clone(), &options)
    );
    let outcomes = [a, b];
    let won = outcomes
        .iter()
        .filter(|r| matches!(r, Ok(s) if s.snapshot_id.is_some()))
        .count();
    assert!(won >= 1, "{outcomes:?}");
    for outcome in &outcomes {
        match outcome {
            Ok(_) => {}
            Err(ClientError::CompactionRaced { .. }) => {
                let text = outcome.as_ref().expect_err("an error").to_string();
                assert!(text.contains("run compact again"), "{text}");
            }
            Err(e) => panic!("a concurrent compaction failed unclearly: {e}"),
        }
    }
    assert_eq!(won, 1, "both compactions committed: {outcomes:?}");
    must_export_like_the_model(&repo, &model).await;
    must_restore_day_files(&repo, &model).await;

    cluster.shutdown().await.expect("shutdown");
}
