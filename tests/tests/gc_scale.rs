//! Garbage collection at scale, run by hand for figures (not in CI):
//! `cargo test --release -p cairn-tests --test gc_scale -- --ignored --nocapture`
//!
//! One million blobs in real node processes: half of them referenced only by
//! a snapshot that is forgotten. Prints the prune time, the peak resident
//! memory of every node process (the leader runs the collector), and the
//! bytes reclaimed against the bytes forgotten, as one JSON line.

use std::time::{Duration, Instant};

use cairn_proto::refs;
use cairn_proto::v1 as pb;
use cairn_proto::v1::cairn_client::CairnClient;
use cairn_tests::process::ProcessCluster;

const BLOBS: usize = 1_000_000;
const BLOB_BYTES: usize = 48;
const TENANT: &str = "scale";

fn blob_id(i: usize) -> [u8; 32] {
    *blake3::hash(&(i as u64).to_le_bytes()).as_bytes()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A pack of `ids` (each blob `BLOB_BYTES` bytes, or the given bodies).
fn pack(bodies: Vec<([u8; 32], Vec<u8>)>, session: &[u8; 16]) -> pb::PutPackRequest {
    let mut data = Vec::new();
    let mut blobs = Vec::new();
    for (id, body) in bodies {
        blobs.push(pb::BlobEntry {
            id: id.to_vec(),
            offset: data.len() as u64,
            length: body.len() as u32,
        });
        data.extend_from_slice(&body);
    }
    pb::PutPackRequest {
        tenant: TENANT.into(),
        pack_id: blake3::hash(&data).as_bytes().to_vec(),
        data: data.into(),
        blobs,
        session: session.to_vec(),
    }
}

async fn commit(
    client: &mut CairnClient<tonic::transport::Channel>,
    ids: Vec<[u8; 32]>,
    name: u8,
) -> Vec<u8> {
    let session = [name; 16];
    let epoch = client
        .find_blobs(pb::FindBlobsRequest {
            tenant: TENANT.into(),
            ids: vec![],
        })
        .await
        .expect("epoch")
        .into_inner()
        .gc_epoch;
    let root = ids[0];
    let segments = refs::build(ids);
    for chunk in segments.chunks(8) {
        let bodies = chunk.iter().map(|s| (s.id, s.bytes.clone())).collect();
        client
            .put_pack(pack(bodies, &session))
            .await
            .expect("refs pack");
    }
    let id = vec![name; 32];
    client
        .commit_snapshot(pb::CommitSnapshotRequest {
            tenant: TENANT.into(),
            snapshot: Some(pb::SnapshotRecord {
                id: id.clone(),
                dataset: "scale".into(),
                time_unix_ms: 1,
                kind: "full".into(),
                root_tree: root.to_vec(),
                sealed_info: vec![1],
                ..Default::default()
            }),
            refs: segments.iter().map(refs::Segment::to_wire).collect(),
            gc_epoch: epoch,
            session: session.to_vec(),
            retire_segments: vec![],
        })
        .await
        .expect("commit");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a benchmark: run by hand with --release"]
async fn prune_of_a_million_blobs() {
    // Kept after the run: the node logs explain a slow step.
    let dir = std::env::temp_dir().join(format!("cairn-gc-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    eprintln!("cluster under {}", dir.display());
    let cluster = ProcessCluster::start(&dir, &[2, 2, 2], "10m");
    cluster.wait_ready(Duration::from_secs(60)).await;
    let channel =
        cairn_proto::transport::lazy_channel(cluster.addr(1), Duration::from_secs(1800), None)
            .expect("address");
    let mut client = CairnClient::new(channel)
        .max_decoding_message_size(cairn_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(cairn_proto::MAX_MESSAGE_BYTES);
    client
        .init_tenant(pb::InitTenantRequest {
            tenant: TENANT.into(),
            key_slot: vec![0; 64],
        })
        .await
        .expect("init");

    let started = Instant::now();
    // Real packs hold about 500 blobs (16 MiB of 32 KiB chunks); 8192 keeps
    // the upload short and each AddPack entry well under a Raft entry.
    let per_pack = 8192;
    for first in (0..BLOBS).step_by(per_pack) {
        if first % (per_pack * 16) == 0 {
            eprintln!("{first} blobs uploaded in {:?}", started.elapsed());
        }
        let bodies = (first..(first + per_pack).min(BLOBS))
            .map(|i| {
                let mut body = vec![0u8; BLOB_BYTES];
                blake3::Hasher::new()
                    .update(&(i as u64).to_be_bytes())
                    .finalize_xof()
                    .fill(&mut body);
                (blob_id(i), body)
            })
            .collect();
        // Uploaded in the session of snapshot 1, which its commit closes.
        client.put_pack(pack(bodies, &[1; 16])).await.expect("pack");
    }
    let upload_s = started.elapsed().as_secs_f64();
    // Snapshot 1 references every blob; snapshot 2 the even ones.
    let all: Vec<[u8; 32]> = (0..BLOBS).map(blob_id).collect();
    let first = commit(&mut client, all.clone(), 1).await;
    commit(&mut client, all.iter().step_by(2).copied().collect(), 2).await;
    let before = client
        .stats(pb::StatsRequest {
            tenant: TENANT.into(),
            dataset: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    client
        .forget(pb::ForgetRequest {
            tenant: TENANT.into(),
            ids: vec![first],
            ..Default::default()
        })
        .await
        .expect("forget");

    let started = Instant::now();
    let pruned = client
        .prune(pb::PruneRequest {
            tenant: TENANT.into(),
            dry_run: false,
        })
        .await
        .expect("prune")
        .into_inner();
    let prune_s = started.elapsed().as_secs_f64();
    let after = client
        .stats(pb::StatsRequest {
            tenant: TENANT.into(),
            dataset: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    let rss: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter_map(|id| cluster.pid(id))
        .map(peak_rss_kib)
        .collect();
    // The odd blobs, and the forgotten snapshot's own reference segments.
    assert!(pruned.blobs_removed as usize >= BLOBS / 2, "{pruned:?}");
    println!(
        "{}",
        serde_json::json!({
            "blobs": BLOBS,
            "upload_s": upload_s,
            "prune_s": prune_s,
            "blobs_removed": pruned.blobs_removed,
            "packs_deleted": pruned.packs_deleted,
            "packs_repacked": pruned.packs_repacked,
            "bytes_freed": pruned.bytes_freed,
            "stored_bytes_before": before.stored_bytes,
            "stored_bytes_after": after.stored_bytes,
            "pack_bytes_before": before.pack_bytes,
            "pack_bytes_after": after.pack_bytes,
            "peak_rss_mib_per_node": rss.iter().map(|k| k / 1024).collect::<Vec<_>>(),
        })
    );
}
