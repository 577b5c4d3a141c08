//! Live record streams against an in-process cluster (insecure), through
//! raw gRPC: `AppendStream` with hand-built packs, deduplication by
//! sequence, `ListSegments`, a collection that must keep segment blobs,
//! and a compaction commit that retires segments all or nothing.

use std::path::PathBuf;
use std::time::Duration;

use cairn_node::local_cluster::LocalCluster;
use cairn_proto::transport::lazy_channel;
use cairn_proto::v1 as pb;
use pb::append_stream_reply::Outcome;
use pb::cairn_client::CairnClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const TENANT: &str = "t";
const DATASET: &str = "chat";

fn client(addr: &str) -> CairnClient<Channel> {
    CairnClient::new(lazy_channel(addr, Duration::from_secs(2), None).expect("channel"))
}

fn random(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// A pack of `blobs` back to back: (data, entries, pack id).
fn pack(blobs: &[([u8; 32], Vec<u8>)]) -> (Vec<u8>, Vec<pb::BlobEntry>, [u8; 32]) {
    let mut data = Vec::new();
    let mut entries = Vec::new();
    for (id, bytes) in blobs {
        entries.push(pb::BlobEntry {
            id: id.to_vec(),
            offset: data.len() as u64,
            length: bytes.len() as u32,
        });
        data.extend_from_slice(bytes);
    }
    let id = *blake3::hash(&data).as_bytes();
    (data, entries, id)
}

/// A batch holding one room's segment (a made-up sealed blob).
fn batch(first: u64, last: u64, room: [u8; 32], blob: [u8; 32]) -> (pb::StreamBatch, [u8; 32]) {
    let (data, blobs, pack_id) = pack(&[(blob, random(700))]);
    (
        pb::StreamBatch {
            first_seq: first,
            last_seq: last,
            pack_id: pack_id.to_vec(),
            data,
            blobs,
            segments: vec![pb::StreamSegment {
                room: room.to_vec(),
                blob: blob.to_vec(),
                first_ts_ms: 1_000,
                last_ts_ms: 2_000,
                records: (last - first + 1) as u32,
            }],
        },
        pack_id,
    )
}

/// One open `AppendStream` call: send messages, read replies in order.
struct Writer {
    tx: mpsc::Sender<pb::AppendStreamRequest>,
    rx: tonic::Streaming<pb::AppendStreamReply>,
}

impl Writer {
    async fn open(c: &mut CairnClient<Channel>, writer: &str) -> (Self, pb::AppendStreamReply) {
        let (tx, requests) = mpsc::channel(4);
        tx.send(open_message(writer)).await.expect("send open");
        let mut rx = c
            .append_stream(ReceiverStream::new(requests))
            .await
            .expect("append stream")
            .into_inner();
        let opened = rx.message().await.expect("opened").expect("a reply");
        (Self { tx, rx }, opened)
    }

    async fn send(
        &mut self,
        batch: pb::StreamBatch,
    ) -> Result<pb::AppendStreamReply, tonic::Status> {
        let message = pb::AppendStreamRequest {
            msg: Some(pb::append_stream_request::Msg::Batch(batch)),
        };
        self.tx.send(message).await.expect("send batch");
        self.rx
            .message()
            .await
            .and_then(|m| m.ok_or_else(|| tonic::Status::internal("stream ended")))
    }
}

fn open_message(writer: &str) -> pb::AppendStreamRequest {
    pb::AppendStreamRequest {
        msg: Some(pb::append_stream_request::Msg::Open(pb::StreamOpen {
            tenant: TENANT.into(),
            dataset: DATASET.into(),
            writer: writer.into(),
        })),
    }
}

async fn list(c: &mut CairnClient<Channel>) -> pb::ListSegmentsReply {
    c.list_segments(pb::ListSegmentsRequest {
        tenant: TENANT.into(),
        dataset: DATASET.into(),
        ..Default::default()
    })
    .await
    .expect("list segments")
    .into_inner()
}

/// Every shard file of `pack` on any node.
fn shard_files(cluster: &LocalCluster, pack: &[u8; 32]) -> Vec<PathBuf> {
    let hex = hex::encode(pack);
    let mut found = Vec::new();
    for id in cluster.members().keys() {
        let dir = cluster.data_dir(*id).join("shards").join(&hex[..2]);
        for index in 0..8 {
            let path = dir.join(format!("{hex}.{index}"));
            if path.exists() {
                found.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_commit_once_are_listed_survive_a_collection_and_retire_with_a_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = LocalCluster::start_tuned(&dir.path().join("cluster"), &[1, 1, 1], "2+1", |f| {
        f.lifecycle.gc_grace = Duration::ZERO;
        f.lifecycle.gc_interval = Duration::from_secs(3600);
    })
    .await
    .expect("cluster");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    let addrs = cluster.addrs();
    let mut c = client(&addrs[0]);
    let room = [5u8; 32];
    let blob = *blake3::hash(b"segment one").as_bytes();

    let (mut w, opened) = Writer::open(&mut c, "w1").await;
    assert_eq!(opened.outcome, Outcome::Opened as i32);
    assert_eq!(opened.committed_seq, 0);

    let (first, _) = batch(1, 3, room, blob);
    let reply = w.send(first.clone()).await.expect("commit");
    assert_eq!(
        (reply.outcome, reply.last_seq, reply.committed_seq),
        (Outcome::Committed as i32, 3, 3)
    );
    // The same batch again: nothing stored twice.
    let reply = w.send(first).await.expect("duplicate");
    assert_eq!(
        (reply.outcome, reply.committed_seq),
        (Outcome::Duplicate as i32, 3)
    );
    // Overlapping what is committed: refused, its shards removed.
    let (overlap, overlap_pack) = batch(3, 5, room, *blake3::hash(b"two").as_bytes());
    let reply = w.send(overlap).await.expect("overlap");
    assert_eq!(
        (reply.outcome, reply.committed_seq),
        (Outcome::Overlap as i32, 3)
    );
    assert!(
        shard_files(&cluster, &overlap_pack).is_empty(),
        "an overlapping batch leaves no shards"
    );

    let listed = list(&mut c).await;
    assert_eq!(listed.segments.len(), 1, "exactly one segment");
    let segment = listed.segments[0].clone();
    assert_eq!(
        (
            segment.room.as_slice(),
            segment.blob.as_slice(),
            segment.records
        ),
        (&room[..], &blob[..], 3)
    );
    assert_eq!(segment.writer, "w1");
    assert!(listed.snapshot.is_empty() && listed.next_page.is_empty());
    assert_eq!(listed.generation, 0);
    // Another room, or a time range the segment does not meet: nothing.
    let other = c
        .list_segments(pb::ListSegmentsRequest {
            tenant: TENANT.into(),
            dataset: DATASET.into(),
            room: vec![6; 32],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(other.segments.is_empty());
    let later = c
        .list_segments(pb::ListSegmentsRequest {
            tenant: TENANT.into(),
            dataset: DATASET.into(),
            from_ts_ms: 2_001,
            to_ts_ms: 9_000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert!(later.segments.is_empty());

    // A collection with no grace period: no snapshot references the
    // segment's blob, yet it is a root.
    c.prune(pb::PruneRequest {
        tenant: TENANT.into(),
        dry_run: false,
    })
    .await
    .expect("prune");
    let found = c
        .find_blobs(pb::FindBlobsRequest {
            tenant: TENANT.into(),
            ids: vec![blob.to_vec()],
        })
        .await
        .expect("find")
        .into_inner();
    assert_eq!(found.present, vec![true], "a live segment's blob is kept");

    // A writer that reconnects learns its high-water mark.
    drop(w);
    let (_w, opened) = Writer::open(&mut c, "w1").await;
    assert_eq!(opened.committed_seq, 3);

    // A call that does not start with `open` is refused.
    let (tx, requests) = mpsc::channel(1);
    let (not_open, _) = batch(9, 9, room, blob);
    tx.send(pb::AppendStreamRequest {
        msg: Some(pb::append_stream_request::Msg::Batch(not_open)),
    })
    .await
    .expect("send");
    let refused = match c.append_stream(ReceiverStream::new(requests)).await {
        Err(status) => status,
        Ok(mut replies) => replies
            .get_mut()
            .message()
            .await
            .expect_err("refused on its first reply"),
    };
    assert_eq!(refused.code(), Code::InvalidArgument);

    // Compaction: a snapshot whose commit retires the segment.
    let root = *blake3::hash(b"root tree").as_bytes();
    let segments = cairn_proto::refs::build(vec![root]);
    let mut blobs = vec![(root, random(300))];
    blobs.extend(segments.iter().map(|s| (s.id, s.bytes.clone())));
    let (data, entries, pack_id) = pack(&blobs);
    c.put_pack(pb::PutPackRequest {
        tenant: TENANT.into(),
        pack_id: pack_id.to_vec(),
        data: data.into(),
        blobs: entries,
        session: vec![],
    })
    .await
    .expect("put pack");
    let commit = |snapshot: u8, retire: Vec<Vec<u8>>| pb::CommitSnapshotRequest {
        tenant: TENANT.into(),
        snapshot: Some(pb::SnapshotRecord {
            id: vec![snapshot; 32],
            dataset: DATASET.into(),
            time_unix_ms: 1,
            kind: "full".into(),
            root_tree: root.to_vec(),
            ..Default::default()
        }),
        refs: segments.iter().map(|s| s.to_wire()).collect(),
        gc_epoch: found.gc_epoch,
        session: vec![],
        retire_segments: retire,
    };
    // One unknown id among them: nothing is committed, nothing retired.
    let mut unknown = segment.id.clone();
    unknown[39] ^= 0xff;
    let stale = c
        .commit_snapshot(commit(1, vec![segment.id.clone(), unknown]))
        .await
        .expect_err("unknown segment");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("compact again"), "{stale:?}");
    assert_eq!(list(&mut c).await.segments.len(), 1);

    c.commit_snapshot(commit(1, vec![segment.id.clone()]))
        .await
        .expect("compaction commit");
    let listed = list(&mut c).await;
    assert!(listed.segments.is_empty());
    assert_eq!(listed.snapshot, vec![1u8; 32]);
    assert_eq!(listed.generation, 1);
    // A second compaction of the same segment loses.
    let lost = c
        .commit_snapshot(commit(2, vec![segment.id]))
        .await
        .expect_err("already retired");
    assert_eq!(lost.code(), Code::FailedPrecondition);

    cluster.shutdown().await.expect("shutdown");
}
