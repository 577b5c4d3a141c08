//! Garbage collection against an in-process cluster (insecure), through
//! raw gRPC: packs of made-up blobs, a reference segment, a commit that
//! references some of them, then `Prune`.

use std::path::PathBuf;
use std::time::Duration;

use cairn_node::local_cluster::{LocalCluster, wait_until};
use cairn_proto::transport::lazy_channel;
use cairn_proto::v1 as pb;
use pb::cairn_client::CairnClient;
use tonic::Code;
use tonic::transport::Channel;

const TENANT: &str = "t";

fn client(addr: &str) -> CairnClient<Channel> {
    CairnClient::new(lazy_channel(addr, Duration::from_secs(2), None).expect("channel"))
}

fn random(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// A blob id made up for the test.
fn blob_id(name: &str) -> [u8; 32] {
    *blake3::hash(name.as_bytes()).as_bytes()
}

/// A pack of `blobs` back to back; returns the request and the pack id.
fn pack(blobs: &[([u8; 32], &[u8])], session: &[u8]) -> (pb::PutPackRequest, [u8; 32]) {
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
    let pack_id = *blake3::hash(&data).as_bytes();
    (
        pb::PutPackRequest {
            tenant: TENANT.into(),
            pack_id: pack_id.to_vec(),
            data: data.into(),
            blobs: entries,
            session: session.to_vec(),
        },
        pack_id,
    )
}

async fn put(c: &mut CairnClient<Channel>, request: pb::PutPackRequest) {
    let reply = c.put_pack(request).await.expect("put pack").into_inner();
    assert!(!reply.existed);
}

/// Uploads the reference segment of `ids` and returns its description.
async fn upload_refs(
    c: &mut CairnClient<Channel>,
    ids: Vec<[u8; 32]>,
    session: &[u8],
) -> Vec<pb::RefSegment> {
    let segments = cairn_proto::refs::build(ids);
    for segment in &segments {
        let (request, _) = pack(&[(segment.id, &segment.bytes)], session);
        put(c, request).await;
    }
    segments.iter().map(|s| s.to_wire()).collect()
}

fn commit(
    snapshot: u8,
    root: [u8; 32],
    refs: Vec<pb::RefSegment>,
    gc_epoch: u64,
    session: &[u8],
) -> pb::CommitSnapshotRequest {
    pb::CommitSnapshotRequest {
        tenant: TENANT.into(),
        snapshot: Some(pb::SnapshotRecord {
            id: vec![snapshot; 32],
            dataset: "d".into(),
            time_unix_ms: 1,
            kind: "full".into(),
            root_tree: root.to_vec(),
            ..Default::default()
        }),
        refs,
        gc_epoch,
        session: session.to_vec(),
        retire_segments: vec![],
    }
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

async fn prune(c: &mut CairnClient<Channel>, dry_run: bool) -> pb::PruneReply {
    c.prune(pb::PruneRequest {
        tenant: TENANT.into(),
        dry_run,
    })
    .await
    .expect("prune")
    .into_inner()
}

async fn find(c: &mut CairnClient<Channel>, ids: &[[u8; 32]]) -> (Vec<bool>, u64) {
    let reply = c
        .find_blobs(pb::FindBlobsRequest {
            tenant: TENANT.into(),
            ids: ids.iter().map(|i| i.to_vec()).collect(),
        })
        .await
        .expect("find blobs")
        .into_inner();
    (reply.present, reply.gc_epoch)
}

async fn read_blob(c: &mut CairnClient<Channel>, id: [u8; 32]) -> (Vec<u8>, Vec<u8>) {
    let location = c
        .locate_blobs(pb::LocateBlobsRequest {
            tenant: TENANT.into(),
            ids: vec![id.to_vec()],
        })
        .await
        .expect("locate")
        .into_inner()
        .locations
        .remove(0);
    assert!(location.found, "blob still indexed");
    let bytes = c
        .read_pack(pb::ReadPackRequest {
            pack_id: location.pack_id.clone(),
            ranges: vec![pb::ByteRange {
                offset: location.offset,
                length: u64::from(location.length),
            }],
            ..Default::default()
        })
        .await
        .expect("read pack")
        .into_inner()
        .ranges
        .remove(0);
    (location.pack_id, bytes.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_dead_packs_repacks_half_dead_ones_and_refuses_a_stale_commit() {
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
    let session = [7u8; 16];
    let (_, epoch) = find(&mut c, &[]).await;
    assert_eq!(epoch, 0);

    let (a1, a2, b1, b2, c1, c2) = (
        blob_id("a1"),
        blob_id("a2"),
        blob_id("b1"),
        blob_id("b2"),
        blob_id("c1"),
        blob_id("c2"),
    );
    let (a1_data, a2_data) = (random(2000), random(2000));
    let (b1_data, b2_data) = (random(1000), random(3000));
    let (c1_data, c2_data) = (random(1500), random(1500));
    let (req, pack_a) = pack(&[(a1, &a1_data), (a2, &a2_data)], &session);
    put(&mut c, req).await;
    let (req, pack_b) = pack(&[(b1, &b1_data), (b2, &b2_data)], &session);
    put(&mut c, req).await;
    let (req, pack_c) = pack(&[(c1, &c1_data), (c2, &c2_data)], &session);
    put(&mut c, req).await;
    let refs = upload_refs(&mut c, vec![a1, a2, b1], &session).await;
    c.commit_snapshot(commit(1, a1, refs, epoch, &session))
        .await
        .expect("commit with references");
    let listed = c
        .list_snapshots(pb::ListSnapshotsRequest {
            tenant: TENANT.into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .snapshots;
    assert!(listed[0].has_refs && listed[0].committed_unix_ms > 1);
    assert_eq!(shard_files(&cluster, &pack_c).len(), 3);

    // A dry run says what would go and changes nothing.
    let dry = prune(&mut client(&addrs[1]), true).await;
    assert!(dry.dry_run);
    assert_eq!(
        (dry.blobs_removed, dry.packs_deleted, dry.packs_repacked),
        (3, 1, 1),
        "{dry:?}"
    );
    assert_eq!(find(&mut c, &[b2, c1]).await, (vec![true, true], 0));
    assert_eq!(shard_files(&cluster, &pack_c).len(), 3);

    // The real run, asked of a follower or the leader alike.
    let report = prune(&mut client(&addrs[1]), false).await;
    assert!(report.skipped.is_empty(), "{report:?}");
    assert_eq!(
        report.blobs_live, 4,
        "a1, a2, b1 and the segment: {report:?}"
    );
    assert_eq!(report.blobs_removed, 3, "b2, c1, c2: {report:?}");
    assert_eq!(report.packs_deleted, 1, "{report:?}");
    assert_eq!(report.packs_repacked, 1, "{report:?}");
    assert_eq!(report.bytes_repacked, 1000, "{report:?}");
    assert_eq!(
        report.shards_deleted, 6,
        "pack C and old pack B: {report:?}"
    );
    assert_eq!(report.packs_in_grace, 0);
    // Freed: all of C, and B less its repacked copy (1000 bytes + a 44-byte
    // entry + count and magic).
    assert_eq!(
        report.bytes_freed,
        3000 + (4000 - (1000 + 44 + 12)),
        "{report:?}"
    );
    assert!(
        shard_files(&cluster, &pack_c).is_empty(),
        "pack C's shards are gone"
    );
    assert!(
        shard_files(&cluster, &pack_b).is_empty(),
        "old pack B's shards are gone"
    );
    assert_eq!(shard_files(&cluster, &pack_a).len(), 3);

    let (present, epoch_after) = find(&mut c, &[a1, a2, b1, b2, c1, c2]).await;
    assert_eq!(present, vec![true, true, true, false, false, false]);
    assert!(epoch_after > epoch);
    let (new_pack, bytes) = read_blob(&mut c, b1).await;
    assert_ne!(new_pack, pack_b.to_vec(), "b1 moved to a new pack");
    assert_eq!(bytes, b1_data, "the repacked blob reads back byte for byte");
    assert_eq!(read_blob(&mut c, a2).await, (pack_a.to_vec(), a2_data));

    // A backup that started before the sweep and references a swept blob
    // is refused and told to retry; one whose blobs are all there commits.
    let later = [8u8; 16];
    let refs = upload_refs(&mut c, vec![a1, b2], &later).await;
    let refused = c
        .commit_snapshot(commit(2, a1, refs, epoch, &later))
        .await
        .expect_err("a swept blob is referenced");
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("retried as a full backup"));
    let refs = upload_refs(&mut c, vec![a1, a2, blob_id("x")], &later).await;
    let stale = epoch;
    // x is not stored at all: same refusal.
    let refused = c
        .commit_snapshot(commit(3, a1, refs, stale, &later))
        .await
        .expect_err("an unknown blob is referenced");
    assert_eq!(refused.code(), Code::Aborted);
    let refs = upload_refs(&mut c, vec![a1, b1], &later).await;
    c.commit_snapshot(commit(4, a1, refs, stale, &later))
        .await
        .expect("every referenced blob is still stored");

    let stats = c
        .stats(pb::StatsRequest {
            tenant: TENANT.into(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.snapshots, 2);
    assert_eq!(stats.datasets, vec!["d".to_string()]);
    // The whole index: a1, a2, b1 and four segments (12 bytes + 32 per id).
    assert_eq!(
        (stats.blobs, stats.stored_bytes),
        (7, 5000 + 108 + 76 + 108 + 76)
    );
    assert_eq!(stats.packs, 6, "A, repacked B and four segment packs");
    // 2+1: every pack is stored as three shards of half its length.
    assert!(stats.raw_bytes >= stats.pack_bytes * 3 / 2, "{stats:?}");
    let of_dataset = c
        .stats(pb::StatsRequest {
            tenant: TENANT.into(),
            dataset: "d".into(),
        })
        .await
        .expect("stats of a dataset")
        .into_inner();
    // What snapshots 1 and 4 reference: a1, a2, b1 and their own segments.
    assert_eq!(
        (of_dataset.blobs, of_dataset.stored_bytes),
        (5, 5000 + 108 + 76)
    );
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_session_keeps_its_packs_for_the_grace_period() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = LocalCluster::start_tuned(&dir.path().join("cluster"), &[1, 1, 1], "2+1", |f| {
        f.lifecycle.gc_grace = Duration::from_secs(3600);
        f.lifecycle.gc_interval = Duration::from_secs(3600);
    })
    .await
    .expect("cluster");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    let mut c = client(&cluster.addrs()[0]);
    let d1 = blob_id("d1");
    let (req, pack_d) = pack(&[(d1, &random(1000))], &[9u8; 16]);
    put(&mut c, req).await;
    let report = prune(&mut c, false).await;
    assert_eq!(report.packs_in_grace, 1, "{report:?}");
    assert_eq!((report.blobs_removed, report.packs_deleted), (0, 0));
    assert_eq!(shard_files(&cluster, &pack_d).len(), 3);
    assert_eq!(find(&mut c, &[d1]).await.0, vec![true]);

    // A tenant with a snapshot committed without references (an older
    // client) is left alone, and a run over every tenant says why.
    let old_tree = blob_id("old tree");
    let (mut req, _) = pack(&[(old_tree, &random(500))], &[]);
    req.tenant = "old".into();
    put(&mut c, req).await;
    let mut old_commit = commit(5, old_tree, Vec::new(), 0, &[]);
    old_commit.tenant = "old".into();
    c.commit_snapshot(old_commit)
        .await
        .expect("a commit without references");
    let report = c
        .prune(pb::PruneRequest {
            tenant: String::new(),
            dry_run: false,
        })
        .await
        .expect("prune every tenant")
        .into_inner();
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert!(
        report.skipped[0].starts_with("tenant old: 1 snapshot(s) without a reference list"),
        "{report:?}"
    );
    assert_eq!((report.packs_in_grace, report.blobs_removed), (1, 0));
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_collects_on_its_own_and_audits_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = LocalCluster::start_tuned(&dir.path().join("cluster"), &[1, 1, 1], "2+1", |f| {
        f.lifecycle.gc_grace = Duration::ZERO;
        f.lifecycle.gc_interval = Duration::from_secs(1);
    })
    .await
    .expect("cluster");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    let mut c = client(&cluster.addrs()[0]);
    // A killed backup's pack: never committed, its session long inactive.
    let lost = blob_id("lost");
    let (req, pack_lost) = pack(&[(lost, &random(1000))], &[4u8; 16]);
    put(&mut c, req).await;
    let running = &cluster;
    wait_until(
        "the periodic collection deletes the uncommitted pack",
        Duration::from_secs(30),
        || async move {
            let left = shard_files(running, &pack_lost).len();
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} shard file(s) left"))
            }
        },
    )
    .await;
    assert_eq!(find(&mut c, &[lost]).await.0, vec![false]);
    let entries = c
        .audit_log(pb::AuditLogRequest {
            after_seq: 0,
            limit: 1000,
        })
        .await
        .expect("audit log")
        .into_inner()
        .entries;
    let run = entries
        .iter()
        .find(|e| e.action == "Prune" && e.result.contains("1 packs deleted"))
        .expect("the run is in the audit log");
    assert_eq!(run.actor_kind, "node");
    assert!(run.node_id > 0);
    cluster.shutdown().await.expect("shutdown");
}
