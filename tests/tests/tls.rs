//! The trust boundary between nodes, against real `cairn-node` processes
//! whose certificates come from the real `cairn-node ca init/issue`: every
//! node port speaks TLS only; Raft and Shards RPCs need a node certificate of
//! the cluster's CA, of a member, whose payload does not speak for another
//! node; a stranger's CA, an expired certificate or no certificate get
//! nothing; a node with a foreign CA's certificate cannot join; a node
//! without TLS settings (and without `--insecure`) does not start.

use std::path::Path;
use std::time::{Duration, SystemTime};

use cairn_node::ca::{self, NodeCertSpec};
use cairn_node::local_cluster::wait_until;
use cairn_proto::transport::addressed;
use cairn_proto::v1::cairn_client::CairnClient;
use cairn_proto::v1::raft_client::RaftClient;
use cairn_proto::v1::shards_client::ShardsClient;
use cairn_proto::v1::{
    ClusterStatusRequest, DeleteShardRequest, GetShardRequest, PutShardRequest, RaftPayload,
    ShardStatsRequest,
};
use cairn_tests::process::{
    NodeTlsFiles, ProcessCluster, ProcessOptions, ca_init, ca_issue, client_tls, node_binary,
    node_tls, raw_channel, status_with, with_token,
};
use tonic::Code;

const DOWN_AFTER: &str = "30s";
const CALL: Duration = Duration::from_secs(5);

fn three_regions(dir: &Path) -> ProcessCluster {
    ProcessCluster::start_with(
        dir,
        &[1, 1, 1],
        DOWN_AFTER,
        ProcessOptions {
            secure: true,
            erasure: "1+2".into(),
            ..ProcessOptions::default()
        },
    )
}

/// Writes PEM texts as a node's files under `dir`.
fn write_files(dir: &Path, ca_pem: &str, node: &ca::Pems) -> NodeTlsFiles {
    std::fs::create_dir_all(dir).expect("dir");
    let files = NodeTlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
    };
    std::fs::write(&files.ca, ca_pem).expect("ca");
    std::fs::write(&files.cert, &node.cert_pem).expect("cert");
    std::fs::write(&files.key, &node.key_pem).expect("key");
    files
}

/// A whole, valid shard file for a small pack.
fn shard_file(pack_id: [u8; 32]) -> Vec<u8> {
    let code = cairn_node::erasure::Code::new(1, 2).expect("code");
    let shards = cairn_node::erasure::encode_pack(code, pack_id, b"a pack that must survive");
    shards[0].to_file_bytes()
}

fn shard_files_on_disk(dir: &Path) -> usize {
    fn walk(dir: &Path, count: &mut usize) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, count);
            } else {
                *count += 1;
            }
        }
    }
    let mut count = 0;
    walk(&dir.join("node-1").join("shards"), &mut count);
    count
}

fn payload(node: u64) -> tonic::Request<RaftPayload> {
    addressed(node, RaftPayload { data: vec![0; 8] }, CALL)
}

#[tokio::test(flavor = "multi_thread")]
async fn node_services_accept_only_member_certificates_of_the_cluster_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = three_regions(dir.path());
    let ready = cluster.wait_ready(Duration::from_secs(60)).await;
    assert!(!ready.insecure, "a TLS cluster reports insecure = false");
    assert_eq!(ready.nodes.len(), 3);
    let tls = cluster.tls().expect("secure cluster").clone();
    let addr = cluster.addr(1).to_string();

    // cluster status over TLS from every node.
    for id in cluster.ids() {
        wait_until(
            &format!("node {id} to report a leader over TLS"),
            Duration::from_secs(30),
            || async {
                match status_with(cluster.addr(id), Some(&tls)).await {
                    Ok(status) if status.has_leader => Ok(()),
                    Ok(_) => Err("no leader yet".to_string()),
                    Err(e) => Err(e),
                }
            },
        )
        .await;
    }

    // Plaintext gets no answer on any node port.
    for id in cluster.ids() {
        let mut plain = CairnClient::new(raw_channel(cluster.addr(id), None));
        let mut request = tonic::Request::new(ClusterStatusRequest {});
        request.set_timeout(CALL);
        let err = plain
            .cluster_status(request)
            .await
            .expect_err("plaintext must be refused");
        assert_ne!(err.code(), Code::Ok, "node {id}");
    }

    // A member (node 2's certificate) stores a real shard on node 1.
    let pack_id = *blake3::hash(b"tls test pack").as_bytes();
    let member = node_tls(&cluster.node_tls_files(2).expect("files"), 1);
    let mut as_member = ShardsClient::new(raw_channel(&addr, Some(&member)));
    as_member
        .put_shard(addressed(
            1,
            PutShardRequest {
                shard: shard_file(pack_id).into(),
            },
            CALL,
        ))
        .await
        .expect("a member may put a shard");
    let on_disk = shard_files_on_disk(dir.path());
    assert!(on_disk >= 1, "the shard file is on disk");

    // A client without a certificate, even with the admin token, gets no
    // node service: the shard survives, Raft refuses.
    let anonymous = raw_channel(&addr, Some(&client_tls(&tls.ca_pem)));
    let err = ShardsClient::new(anonymous.clone())
        .delete_shard(with_token(
            addressed(
                1,
                DeleteShardRequest {
                    pack_id: pack_id.to_vec(),
                    index: 0,
                },
                CALL,
            ),
            &tls.token,
        ))
        .await
        .expect_err("DeleteShard without a node certificate");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("node certificate"),
        "{}",
        err.message()
    );
    assert_eq!(shard_files_on_disk(dir.path()), on_disk, "nothing deleted");
    as_member
        .get_shard(addressed(
            1,
            GetShardRequest {
                pack_id: pack_id.to_vec(),
                index: 0,
            },
            CALL,
        ))
        .await
        .expect("the shard is still there");
    let mut raft = RaftClient::new(anonymous.clone());
    for (rpc, result) in [
        ("Forward", raft.forward(payload(1)).await),
        ("InstallSnapshot", raft.install_snapshot(payload(1)).await),
        ("AppendEntries", raft.append_entries(payload(1)).await),
        ("Vote", raft.vote(payload(1)).await),
        ("ClusterInfo", raft.cluster_info(payload(1)).await),
        ("ChangeMembership", raft.change_membership(payload(1)).await),
    ] {
        let err = result.expect_err(rpc);
        assert_eq!(err.code(), Code::Unauthenticated, "{rpc}: {err:?}");
    }

    // A certificate of the cluster CA for a node that is not a member
    // (node 7) is refused beyond admission, and cannot speak for node 3.
    let seven_dir = dir.path().join("seven");
    let seven = ca_issue(&tls.dir, 7, "r1", &seven_dir);
    let mut as_seven = RaftClient::new(raw_channel(&addr, Some(&node_tls(&seven, 1))));
    let err = as_seven
        .forward(payload(1))
        .await
        .expect_err("a non-member's Forward");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = ShardsClient::new(raw_channel(&addr, Some(&node_tls(&seven, 1))))
        .delete_shard(addressed(
            1,
            DeleteShardRequest {
                pack_id: pack_id.to_vec(),
                index: 0,
            },
            CALL,
        ))
        .await
        .expect_err("a non-member's DeleteShard");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(shard_files_on_disk(dir.path()), on_disk, "nothing deleted");
    let claims_three = cairn_node::meta::codec::encode(
        "cluster-info request",
        &cairn_node::meta::admission::ClusterInfoRequest { asker: 3 },
    )
    .expect("encode");
    let err = as_seven
        .cluster_info(addressed(1, RaftPayload { data: claims_three }, CALL))
        .await
        .expect_err("node 7 asking as node 3");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node 3"), "{}", err.message());

    // A member (node 2) cannot speak for another node (3) in Raft payloads.
    let mut as_two = RaftClient::new(raw_channel(&addr, Some(&member)));
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(1, 3u64), None);
    let vote = cairn_node::meta::codec::encode("vote request", &vote).expect("encode");
    let err = as_two
        .vote(addressed(1, RaftPayload { data: vote }, CALL))
        .await
        .expect_err("node 2 voting as node 3");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node 3"), "{}", err.message());
    let append: openraft::raft::AppendEntriesRequest<cairn_node::meta::types::TypeConfig> =
        openraft::raft::AppendEntriesRequest {
            vote: openraft::Vote::new_committed(1, 3),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
    let append =
        cairn_node::meta::codec::encode("append-entries request", &append).expect("encode");
    let err = as_two
        .append_entries(addressed(1, RaftPayload { data: append }, CALL))
        .await
        .expect_err("node 2 appending as leader 3");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Another CA's certificate, and an expired one of this CA, fail the
    // handshake: no call gets an answer from the server.
    let other_ca = ca::init(30).expect("other CA");
    let stranger =
        ca::issue(&other_ca, &NodeCertSpec::new(2, "r1", &["127.0.0.1"])).expect("stranger cert");
    let stranger = write_files(&dir.path().join("stranger"), &tls.ca_pem, &stranger);
    let mut expired_spec = NodeCertSpec::new(2, "r1", &["127.0.0.1"]);
    expired_spec.not_before = Some(SystemTime::now() - Duration::from_secs(30 * 86_400));
    expired_spec.days = 2;
    let cluster_ca = ca::load_dir(&tls.dir).expect("cluster CA");
    let expired = ca::issue(&cluster_ca, &expired_spec).expect("expired cert");
    let expired = write_files(&dir.path().join("expired"), &tls.ca_pem, &expired);
    for (what, files) in [("foreign CA", &stranger), ("expired", &expired)] {
        let mut shards = ShardsClient::new(raw_channel(&addr, Some(&node_tls(files, 1))));
        let err = shards
            .shard_stats(addressed(1, ShardStatsRequest {}, CALL))
            .await
            .expect_err(what);
        assert!(
            !matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated),
            "{what}: refused by the TLS handshake, not after it: {err:?}"
        );
    }

    // A node started with a foreign CA's certificate cannot join.
    let foreign_dir = dir.path().join("foreign");
    let foreign_ca = dir.path().join("foreign-ca");
    ca_init(&foreign_ca);
    let foreign = ca_issue(&foreign_ca, 4, "r2", &foreign_dir);
    let newcomer = cluster.start_newcomer("r2", DOWN_AFTER, Some(foreign));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let status = status_with(&addr, Some(&tls)).await.expect("status");
    assert!(
        !status.nodes.iter().any(|n| n.node_id == newcomer),
        "the foreign node joined: {:?}\n{}",
        status.nodes,
        cluster.log_tail(newcomer)
    );
    assert_eq!(status.nodes.len(), 3);
    cluster.kill(newcomer);

    // With the cluster's own certificate, a newcomer is admitted.
    let welcome = cluster.start_newcomer("r2", DOWN_AFTER, None);
    wait_until("the newcomer to join", Duration::from_secs(60), || async {
        match status_with(&addr, Some(&tls)).await {
            Ok(s) if s.nodes.iter().any(|n| n.node_id == welcome) => Ok(()),
            Ok(s) => Err(format!(
                "members {:?}\n{}",
                s.nodes.iter().map(|n| n.node_id).collect::<Vec<_>>(),
                cluster.log_tail(welcome)
            )),
            Err(e) => Err(e),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_tls_or_with_another_nodes_certificate_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |extra: &[&str]| {
        let data = dir.path().join("data");
        std::process::Command::new(node_binary())
            .args(["--node-id", "3", "--region", "r3", "--erasure", "1+2"])
            .args(["--listen", "127.0.0.1:3", "--initial-cluster"])
            .arg("1=r1@127.0.0.1:1,2=r2@127.0.0.1:2,3=r3@127.0.0.1:3")
            .arg("--data-dir")
            .arg(&data)
            .args(extra)
            .env("RUST_BACKTRACE", "0")
            .env_remove("CAIRN_NODE_INSECURE")
            .output()
            .expect("cairn-node runs")
    };
    let out = run(&[]);
    assert!(!out.status.success(), "started without TLS");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no TLS configured"), "{stderr}");
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

    let ca_dir = dir.path().join("ca");
    ca_init(&ca_dir);
    let seven = ca_issue(&ca_dir, 7, "r1", &ca_dir);
    let out = run(&[
        "--tls-ca",
        &seven.ca.to_string_lossy(),
        "--tls-cert",
        &seven.cert.to_string_lossy(),
        "--tls-key",
        &seven.key.to_string_lossy(),
    ]);
    assert!(!out.status.success(), "started with node 7's certificate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is for node 7"), "{stderr}");
    assert!(!stderr.contains("BEGIN"), "no key material: {stderr}");
    assert!(
        !dir.path().join("data").join("meta").exists(),
        "refused before opening anything"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_process_cluster_runs_tls_by_choice_and_reports_insecure_otherwise() {
    use cairn_node::local_cluster::LocalCluster;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut secure = LocalCluster::start_secure(&dir.path().join("tls"), &[1, 1, 1], "1+2", |_| {})
        .await
        .expect("secure cluster starts");
    secure
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("forms over mutual TLS");
    assert!(secure.is_secure());
    let token = secure.admin_token().to_string();
    assert!(
        token.starts_with("cairn_") && token.len() == 6 + 64,
        "{token}"
    );
    let ca_path = secure.ca_path().expect("a CA file");
    assert_eq!(
        std::fs::read_to_string(&ca_path).expect("CA file"),
        secure.ca_pem().expect("CA")
    );
    assert!(!secure.status().await.expect("status").insecure);
    // A node added later gets its certificate and joins through admission.
    let extra = secure.start_extra_node("r2").await.expect("extra node");
    let status = wait_until(
        "the extra node to join",
        Duration::from_secs(60),
        || async {
            let status = secure.status().await?;
            if status.nodes.iter().any(|n| n.node_id == extra) {
                Ok(status)
            } else {
                Err(format!("{} members", status.nodes.len()))
            }
        },
    )
    .await;
    assert_eq!(status.nodes.len(), 4);
    // Plaintext to a node of this cluster gets nothing.
    let mut plain = CairnClient::new(raw_channel(&secure.members()[&1].addr, None));
    assert!(
        plain
            .cluster_status(tonic::Request::new(ClusterStatusRequest {}))
            .await
            .is_err()
    );
    secure.shutdown().await.expect("stops");

    let insecure = LocalCluster::start(&dir.path().join("plain"), &[1, 1, 1], "1+2")
        .await
        .expect("insecure cluster starts");
    insecure
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("forms in plaintext");
    assert!(insecure.status().await.expect("status").insecure);
    assert_eq!(insecure.admin_token(), "");
    insecure.shutdown().await.expect("stops");
}
