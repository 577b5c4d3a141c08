//! End-to-end behaviour of a three-region cluster: real nodes, real gRPC,
//! real files. Each test would fail if the guarantee it names broke.

use std::path::Path;
use std::time::Duration;

use cairn_cli::datagen;
use cairn_client::seal::KdfParams;
use cairn_client::{ClientError, Repository};
use cairn_tests::*;

fn source_tree(dir: &Path) -> std::path::PathBuf {
    let source = dir.join("source");
    datagen::generate(&source, 3, 7).expect("data generated");
    source
}

/// Canaries no node may ever hold: 64 bytes each, unpredictable and
/// incompressible (a repeated marker would compress into something no grep
/// finds, so its absence would prove nothing).
fn canaries() -> Vec<Vec<u8>> {
    let seed = format!("{:?} {}", std::time::SystemTime::now(), std::process::id());
    (0..4u8)
        .map(|i| {
            let mut h = blake3::Hasher::new();
            h.update(seed.as_bytes()).update(&[i]);
            let mut out = vec![0u8; 64];
            h.finalize_xof().fill(&mut out);
            if i % 2 == 0 {
                // Text canaries: 64 hex characters, as a secret in a log line.
                blake3::hash(&out).to_hex().as_bytes().to_vec()
            } else {
                out
            }
        })
        .collect()
}

/// Embeds each canary in a different file of `source`: alone, inside text,
/// appended to a generated file, and inside a larger binary file.
fn plant_canaries(source: &Path, canaries: &[Vec<u8>]) {
    let generated = files_under(source);
    let big = generated
        .iter()
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("generated files")
        .clone();
    for (i, canary) in canaries.iter().enumerate() {
        match i % 4 {
            0 => std::fs::write(source.join("users/secret.txt"), canary),
            1 => {
                let mut text = b"{\"user\":42,\"token\":\"".to_vec();
                text.extend_from_slice(canary);
                text.extend_from_slice(b"\"}\n");
                std::fs::write(source.join("users/token.json"), text)
            }
            2 => {
                let mut data = std::fs::read(&big).expect("read generated file");
                data.extend_from_slice(canary);
                std::fs::write(&big, data)
            }
            _ => {
                let mut data = vec![0u8; 200_000];
                data.extend_from_slice(canary);
                data.extend(std::iter::repeat_n(7u8, 100_000));
                std::fs::write(source.join("users/blob.bin"), data)
            }
        }
        .expect("canary planted");
    }
}

/// Every file under `dir`, searched for `needle`.
fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<String> {
    files_under(dir)
        .into_iter()
        .filter(|path| {
            let data = std::fs::read(path).unwrap_or_default();
            data.windows(needle.len()).any(|w| w == needle)
        })
        .map(|path| path.display().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_survives_region_loss_and_nodes_hold_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let source = source_tree(dir.path());
    let canaries = canaries();
    plant_canaries(&source, &canaries);
    let repo = must_init(&cluster).await;
    let first = must_backup(&repo, &source, "chat-messages").await;
    assert!(first.files > 10 && first.bytes_added > 0);

    // Nothing a user wrote appears on any node's disk: every node holds
    // files (so the search is not vacuous) and none holds a canary.
    for id in cluster.members().keys() {
        let node_dir = cluster.data_dir(*id);
        assert!(
            !files_under(&node_dir).is_empty(),
            "node {id} holds no files"
        );
        for canary in &canaries {
            let hits = grep_dir(&node_dir, canary);
            assert!(hits.is_empty(), "plaintext found on node {id}: {hits:?}");
        }
        let hits = grep_dir(&node_dir, b"secret.txt");
        assert!(hits.is_empty(), "a file name found on node {id}: {hits:?}");
    }

    // Unchanged data dedups: a second backup adds only its new root.
    let second = must_backup(&repo, &source, "chat-messages").await;
    assert!(
        second.bytes_added < 4096,
        "unchanged backup added {} bytes",
        second.bytes_added
    );

    // A drill: every shard of r2 ignored, the rest decodes.
    must_restore_identical(&repo, &first.snapshot_id, &source, dir.path(), &["r2"]).await;

    cluster.stop_region("r1").await.expect("r1 stops");
    must_restore_identical(&repo, &first.snapshot_id, &source, dir.path(), &[]).await;

    // A client in a surviving region can still unlock the key.
    let reopened = must_open(&cluster).await;
    must_restore_identical(&reopened, "latest", &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_while_a_region_is_down_then_restore_without_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let source = source_tree(dir.path());
    let repo = must_init(&cluster).await;
    cluster.stop_region("r3").await.expect("r3 stops");
    let summary = must_backup(&repo, &source, "gift-records").await;
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    // Every pack written meanwhile is marked for rebalancing (its shards
    // doubled up on r1 and r2).
    let status = cluster.status().await.expect("status");
    assert!(status.packs > 0);
    assert_eq!(
        status.packs_degraded, status.packs,
        "all packs await rebalancing"
    );
    // The region comes back and the data still restores, from any nodes.
    cluster.start_region("r3").await.expect("r3 restarts");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_between_backups_loses_nothing_and_restart_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let source = source_tree(dir.path());
    let repo = must_init(&cluster).await;
    let first = must_backup(&repo, &source, "chat-messages").await;

    let leader = cluster.status().await.expect("status").leader_id;
    cluster.stop_node(leader).await.expect("leader stops");
    datagen::mutate(&source, 5, 3).expect("mutate");
    let second = must_backup(&repo, &source, "chat-messages").await;
    let new_leader = cluster.status().await.expect("status").leader_id;
    assert_ne!(leader, new_leader, "a new leader took over");

    // The whole cluster restarts from its data directories.
    let ids: Vec<u64> = cluster.members().keys().copied().collect();
    for id in &ids {
        cluster.stop_node(*id).await.expect("stop");
    }
    for id in &ids {
        cluster.start_node(*id).await.expect("start");
    }
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready after restart");
    let repo = must_open(&cluster).await;
    let snapshots = repo.snapshots(None).await.expect("list");
    assert_eq!(snapshots.len(), 2, "both acknowledged snapshots survive");
    assert!(snapshots.iter().any(|s| s.id_hex() == first.snapshot_id));
    must_restore_identical(&repo, &second.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupted_shards_are_detected_and_restore_stays_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let source = source_tree(dir.path());
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source, "chat-messages").await;
    let clean = repo.check_packs(true).await.expect("check");
    assert!(
        clean.problems.is_empty(),
        "fresh cluster is clean: {:?}",
        clean.problems
    );

    // Flip bytes in every shard file of node 2 (at most one shard per pack there).
    let mut flipped = 0;
    for path in files_under(&cluster.data_dir(2).join("shards")) {
        let mut data = std::fs::read(&path).expect("shard readable");
        let at = data.len() - 1;
        data[at] ^= 0xFF;
        std::fs::write(&path, data).expect("shard written");
        flipped += 1;
    }
    assert!(flipped > 0, "node 2 held shards");
    let report = repo.check_packs(true).await.expect("check");
    let on_node_2 = report.problems.iter().filter(|p| p.node_id == 2).count();
    assert_eq!(
        on_node_2, flipped,
        "every flipped shard is reported: {:?}",
        report.problems
    );
    assert!(report.unrecoverable.is_empty());
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_password_and_double_init_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let _repo = must_init(&cluster).await;
    let wrong = Repository::open(client(&cluster), TENANT, b"not the password").await;
    assert!(
        matches!(wrong, Err(ClientError::WrongPassword)),
        "got {:?}",
        wrong.err()
    );
    let again = Repository::init(
        client(&cluster),
        TENANT,
        PASSWORD,
        KdfParams::fast_for_tests(),
    )
    .await;
    assert!(matches!(again, Err(ClientError::AlreadyInitialized { .. })));
    let missing = Repository::open(client(&cluster), "nobody", PASSWORD).await;
    assert!(matches!(missing, Err(ClientError::NotInitialized { .. })));
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_node_names_the_addresses_tried() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    drop(listener);
    let cluster = cairn_client::Cluster::new(std::slice::from_ref(&addr))
        .expect("parses")
        .with_failover_budget(Duration::from_secs(1));
    let err = Repository::open(cluster, TENANT, PASSWORD)
        .await
        .err()
        .expect("fails");
    let text = err.to_string();
    assert!(
        text.contains("no reachable node") && text.contains(&addr),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_protection_and_raft_state() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let cluster = cairn_node::local_cluster::LocalCluster::start_tuned(
        &dir.path().join("cluster"),
        &[2, 2, 2],
        "4+2",
        |node| {
            if node.node_id == Some(1) {
                node.metrics_listen = Some(([127, 0, 0, 1], port).into());
            }
        },
    )
    .await
    .expect("cluster");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics port open");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    for name in [
        "cairn_raft_term",
        "cairn_protection_packs{state=\"fully_protected\"}",
        "cairn_repair_queue_packs",
        "cairn_scrub_faults_total",
        "cairn_liveness_node_up{node=\"2\",region=\"r1\"} 1",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_invalid_argument_and_the_node_keeps_serving() {
    use cairn_proto::v1 as pb;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let client = client(&cluster);
    let refused = |r: Result<_, ClientError>| match r {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a refusal, got {:?}", other.map(|_: ()| ())),
    };
    // A pack whose id is not its hash.
    let code = refused(
        client
            .call("put pack", |mut c| async move {
                c.put_pack(pb::PutPackRequest {
                    tenant: "t".into(),
                    pack_id: vec![7; 32],
                    data: vec![1, 2, 3].into(),
                    blobs: vec![],
                    session: vec![],
                })
                .await
            })
            .await
            .map(|_| ()),
    );
    assert_eq!(code, tonic::Code::InvalidArgument);
    // An id of the wrong length, a blob entry outside its pack.
    let data = b"sealed bytes".to_vec();
    let id = blake3::hash(&data).as_bytes().to_vec();
    let code = refused(
        client
            .call("put pack", |mut c| {
                let (data, id) = (data.clone(), id.clone());
                async move {
                    c.put_pack(pb::PutPackRequest {
                        tenant: "t".into(),
                        pack_id: id,
                        data: data.into(),
                        blobs: vec![pb::BlobEntry {
                            id: vec![1; 31],
                            offset: 5,
                            length: 100,
                        }],
                        session: vec![],
                    })
                    .await
                }
            })
            .await
            .map(|_| ()),
    );
    assert_eq!(code, tonic::Code::InvalidArgument);
    // A read of an unknown pack, a tenant name with control characters.
    let code = refused(
        client
            .call("read pack", |mut c| async move {
                c.read_pack(pb::ReadPackRequest {
                    pack_id: vec![9; 32],
                    ranges: vec![pb::ByteRange {
                        offset: 0,
                        length: u64::MAX,
                    }],
                    ..Default::default()
                })
                .await
            })
            .await
            .map(|_| ()),
    );
    assert_eq!(code, tonic::Code::NotFound);
    let code = refused(
        client
            .call("find blobs", |mut c| async move {
                c.find_blobs(pb::FindBlobsRequest {
                    tenant: "bad\u{0}tenant".into(),
                    ids: vec![vec![0; 32]],
                })
                .await
            })
            .await
            .map(|_| ()),
    );
    assert_eq!(code, tonic::Code::InvalidArgument);
    // Still serving.
    assert!(cluster.status().await.expect("status").has_leader);
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_two_regions_fails_writes_fast_with_quorum_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let source = source_tree(dir.path());
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source, "chat-messages").await;
    cluster.stop_region("r1").await.expect("r1 stops");
    cluster.stop_region("r2").await.expect("r2 stops");

    // Nothing can be acknowledged: the client says why instead of hanging.
    let started = std::time::Instant::now();
    let client = cairn_client::Cluster::new(&cluster.addrs())
        .expect("addresses")
        .with_failover_budget(Duration::from_secs(120));
    let err = Repository::init(
        client,
        "another-tenant",
        PASSWORD,
        KdfParams::fast_for_tests(),
    )
    .await
    .err()
    .expect("no quorum, no write");
    assert!(
        matches!(&err, ClientError::QuorumLost { detail } if detail.contains("2 of 3 regions")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "failed fast: {:?}",
        started.elapsed()
    );

    // The catalog still answers from the surviving region's metadata
    // (two regions hold four of the six shards, so data waits for them).
    let listed = repo.snapshots(None).await.expect("stale-allowed listing");
    assert!(listed.iter().any(|s| s.id_hex() == summary.snapshot_id));
    cluster.start_region("r1").await.expect("r1 back");
    cluster.start_region("r2").await.expect("r2 back");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

/// The catalog with hostile records in it: one that is not sealed at all,
/// one that reuses a good record's sealed part with another root tree (which
/// would become `latest`), committed straight through `CommitSnapshot`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_catalog_records_are_skipped_by_name_and_the_rest_still_works() {
    use cairn_proto::v1 as pb;
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let source = dir.path().join("source");
    datagen::generate(&source, 1, 3).expect("data generated");
    let repo = must_init(&cluster).await;
    let first = must_backup(&repo, &source, "chat-messages").await;
    std::fs::write(source.join("users/new.txt"), b"a second version").expect("write");
    let second = must_backup(&repo, &source, "chat-messages").await;

    // Raw catalog calls, as a hostile or buggy node or client could make.
    let raw = client(&cluster);
    let list_raw = || async {
        raw.call("list snapshots", |mut c| async move {
            c.list_snapshots(pb::ListSnapshotsRequest {
                tenant: TENANT.into(),
                dataset: String::new(),
            })
            .await
        })
        .await
        .expect("raw listing")
        .snapshots
    };
    let records = list_raw().await;
    let find = |id: &str| {
        records
            .iter()
            .find(|r| {
                <[u8; 32]>::try_from(r.id.as_slice())
                    .map(hex_of)
                    .ok()
                    .as_deref()
                    == Some(id)
            })
            .expect("record listed")
            .clone()
    };
    let (old, new) = (find(&first.snapshot_id), find(&second.snapshot_id));
    let junk = pb::SnapshotRecord {
        id: vec![0xa1; 32],
        time_unix_ms: new.time_unix_ms + 1000,
        sealed_info: b"not a sealed record".to_vec(),
        ..new.clone()
    };
    let swapped_root = pb::SnapshotRecord {
        id: vec![0xb2; 32],
        time_unix_ms: new.time_unix_ms + 2000,
        root_tree: old.root_tree.clone(),
        ..new.clone()
    };
    for record in [junk, swapped_root] {
        // A reference list naming the root tree, stored as its blob first:
        // the tenant's snapshots carry one, so a commit must too.
        let root: [u8; 32] = record.root_tree.as_slice().try_into().expect("32 bytes");
        let segment = cairn_proto::refs::build(vec![root]).remove(0);
        let put = pb::PutPackRequest {
            tenant: TENANT.into(),
            pack_id: blake3::hash(&segment.bytes).as_bytes().to_vec(),
            data: segment.bytes.clone().into(),
            blobs: vec![pb::BlobEntry {
                id: segment.id.to_vec(),
                offset: 0,
                length: segment.bytes.len() as u32,
            }],
            session: vec![],
        };
        raw.call("put pack", |mut c| {
            let put = put.clone();
            async move { c.put_pack(put).await }
        })
        .await
        .expect("reference segment stored");
        raw.call("commit snapshot", |mut c| {
            let record = record.clone();
            let refs = vec![segment.to_wire()];
            async move {
                let epoch = c
                    .find_blobs(pb::FindBlobsRequest {
                        tenant: TENANT.into(),
                        ids: vec![],
                    })
                    .await?
                    .into_inner()
                    .gc_epoch;
                c.commit_snapshot(pb::CommitSnapshotRequest {
                    tenant: TENANT.into(),
                    snapshot: Some(record),
                    refs,
                    gc_epoch: epoch,
                    session: vec![],
                    retire_segments: vec![],
                })
                .await
            }
        })
        .await
        .expect("the node stores what it cannot check");
    }
    assert_eq!(list_raw().await.len(), 4);
    let (junk_id, swapped_id) = ("a1".repeat(32), "b2".repeat(32));

    // A client collecting warnings: each bad record is named, once.
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let sink = warnings.clone();
    let repo = Arc::new(
        Repository::open(client(&cluster), TENANT, PASSWORD)
            .await
            .expect("open")
            .with_warning_sink(Arc::new(move |w: &cairn_client::CatalogWarning| {
                sink.lock().expect("lock").push(w.clone());
            })),
    );
    let list = repo.list_snapshots(None).await.expect("listing");
    let listed: Vec<String> = list.snapshots.iter().map(|s| s.id_hex()).collect();
    assert_eq!(
        listed,
        vec![first.snapshot_id.clone(), second.snapshot_id.clone()]
    );
    let skipped: Vec<&str> = list
        .skipped
        .iter()
        .map(|w| w.snapshot_id.as_str())
        .collect();
    assert_eq!(skipped, vec![junk_id.as_str(), swapped_id.as_str()]);
    assert!(
        list.skipped
            .iter()
            .all(|w| w.message.contains(&w.snapshot_id))
    );

    // `restore latest` restores the genuine newest snapshot.
    let latest = repo.find_snapshot("latest", None).await.expect("latest");
    assert_eq!(latest.id_hex(), second.snapshot_id);
    must_restore_identical(&repo, "latest", &source, dir.path(), &[]).await;

    // A parent-based backup uses the genuine newest snapshot as its parent.
    std::fs::write(source.join("users/third.txt"), b"a third version").expect("write");
    let third = must_backup(&repo, &source, "chat-messages").await;
    let third = repo
        .find_snapshot(&third.snapshot_id, None)
        .await
        .expect("third");
    assert_eq!(third.parent.map(hex_of), Some(second.snapshot_id.clone()));
    assert_eq!(third.kind, "incremental");

    let warned: Vec<String> = warnings
        .lock()
        .expect("lock")
        .iter()
        .map(|w| w.snapshot_id.clone())
        .collect();
    assert_eq!(
        warned,
        vec![junk_id, swapped_id],
        "each bad record named once"
    );
    cluster.shutdown().await.expect("shutdown");
}

fn hex_of(id: [u8; 32]) -> String {
    blake3::Hash::from_bytes(id).to_hex().to_string()
}
