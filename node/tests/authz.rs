//! Tokens, roles and tenants against an in-process cluster with
//! authentication on (no TLS here: callers are told apart by their tokens).
//! Raw gRPC with the `authorization` header, not the SDK.

use std::sync::Arc;
use std::time::Duration;

use cairn_node::local_cluster::{LocalCluster, wait_until};
use cairn_node::meta::state::StateView;
use cairn_proto::audit::ChainVerifier;
use cairn_proto::transport::{DialTls, lazy_channel};
use cairn_proto::v1 as pb;
use pb::cairn_client::CairnClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const ROOT: &str = "root-token-of-the-authz-test-0123456789";

/// The cluster CA every test client trusts (set once the cluster exists).
static CA: std::sync::OnceLock<DialTls> = std::sync::OnceLock::new();

fn client(addr: &str) -> CairnClient<Channel> {
    CairnClient::new(lazy_channel(addr, Duration::from_secs(2), CA.get()).expect("channel"))
}

fn with<T>(token: Option<&str>, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(Duration::from_secs(20));
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    request
}

fn denied<T: std::fmt::Debug>(result: Result<T, Status>, what: &str) -> Status {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    status
}

async fn create(
    c: &mut CairnClient<Channel>,
    by: &str,
    role: &str,
    tenant: &str,
    ttl_seconds: u64,
) -> (String, String) {
    let reply = c
        .create_token(with(
            Some(by),
            pb::CreateTokenRequest {
                role: role.into(),
                tenant: tenant.into(),
                ttl_seconds,
                label: format!("{role} test"),
            },
        ))
        .await
        .expect("create token")
        .into_inner();
    let info = reply.info.expect("info");
    assert_eq!(info.role, role);
    if !tenant.is_empty() {
        assert_eq!(info.tenant, tenant);
    }
    assert!(reply.token.starts_with("cairn_"));
    (reply.token, info.id)
}

/// A pack holding one blob (its whole content); the pack id is its hash.
fn pack(tenant: &str, seed: u8) -> (pb::PutPackRequest, Vec<u8>) {
    let data: Vec<u8> = (0..4096u32).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let pack_id = blake3::hash(&data).as_bytes().to_vec();
    let blob_id = blake3::hash(&[seed; 7]).as_bytes().to_vec();
    let request = pb::PutPackRequest {
        tenant: tenant.into(),
        pack_id,
        blobs: vec![pb::BlobEntry {
            id: blob_id.clone(),
            offset: 0,
            length: data.len() as u32,
        }],
        data: data.into(),
        session: Vec::new(),
    };
    (request, blob_id)
}

fn snapshot(root_tree: Vec<u8>, seed: u8) -> pb::SnapshotRecord {
    pb::SnapshotRecord {
        id: vec![seed; 32],
        dataset: "chat".into(),
        kind: "full".into(),
        root_tree,
        time_unix_ms: 1,
        ..Default::default()
    }
}

/// Waits until `token` gets `code` (or succeeds, for `None`) from every node:
/// a revocation reaches each node with the next entry it applies.
async fn wait_everywhere(addrs: &[String], token: &str, code: Option<Code>, what: &str) {
    wait_until(what, Duration::from_secs(20), || async {
        for addr in addrs {
            let got = client(addr)
                .who_am_i(with(Some(token), pb::WhoAmIRequest {}))
                .await
                .map(|_| ())
                .map_err(|s| s.code());
            if got.err() != code {
                return Err(format!("{addr}: {got:?}"));
            }
        }
        Ok(())
    })
    .await;
}

/// `GET /metrics` with an optional bearer token: the status line and body.
async fn scrape(port: u16, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics port open");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: localhost\r\n{auth}\r\n").as_bytes())
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_roles_tenants_key_slots_and_the_audit_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("root-token");
    std::fs::write(&token_file, format!("{ROOT}\n")).expect("write token");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let cluster = LocalCluster::start_secure(&dir.path().join("cluster"), &[1, 1, 1], "2+1", {
        let token_file = token_file.clone();
        move |node| {
            node.bootstrap_token_file = Some(token_file.clone());
            if node.node_id == Some(2) {
                node.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
            }
        }
    })
    .await
    .expect("cluster");
    let _ = CA.set(DialTls::new(cluster.ca_pem().expect("a TLS cluster")));
    // Status calls of the harness carry the bootstrap token.
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    let addrs = cluster.addrs();
    wait_everywhere(
        &addrs,
        ROOT,
        None,
        "the bootstrap token works on every node",
    )
    .await;
    let mut c = client(&addrs[0]);

    // No credential, a malformed one, an unknown one.
    let status = c
        .list_snapshots(with(None, pb::ListSnapshotsRequest::default()))
        .await
        .expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("needs a token"), "{status:?}");
    let status = c
        .cluster_status(with(
            Some("cairn_not-a-token-of-this-cluster"),
            pb::ClusterStatusRequest {},
        ))
        .await
        .expect_err("unknown token");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(status.message(), "token unknown, revoked or expired");

    let who = c
        .who_am_i(with(Some(ROOT), pb::WhoAmIRequest {}))
        .await
        .expect("whoami")
        .into_inner();
    assert_eq!(
        (who.role.as_str(), who.tenant.as_str(), who.insecure),
        ("cluster-admin", "", false)
    );

    // An admin token for a tenant that does not exist yet initializes it.
    let (admin_a, _) = create(&mut c, ROOT, "admin", "alpha", 0).await;
    let (admin_b, _) = create(&mut c, ROOT, "admin", "beta-secret-name", 0).await;
    c.init_tenant(with(
        Some(&admin_a),
        pb::InitTenantRequest {
            tenant: "alpha".into(),
            key_slot: b"slot-one".to_vec(),
        },
    ))
    .await
    .expect("admin inits its tenant");
    // Squatting: another tenant's admin, or a tenant-less request naming it.
    let status = denied(
        c.init_tenant(with(
            Some(&admin_a),
            pb::InitTenantRequest {
                tenant: "gamma".into(),
                key_slot: b"x".to_vec(),
            },
        ))
        .await,
        "admin of alpha inits gamma",
    );
    assert!(!status.message().contains("gamma"), "{status:?}");
    c.init_tenant(with(
        Some(&admin_b),
        pb::InitTenantRequest {
            tenant: String::new(),
            key_slot: b"slot-b".to_vec(),
        },
    ))
    .await
    .expect("admin of beta inits its own (tenant from the token)");

    let (backup_a, backup_a_id) = create(&mut c, &admin_a, "backup", "", 0).await;
    let (restore_a, _) = create(&mut c, &admin_a, "restore", "alpha", 0).await;
    let (backup_b, _) = create(&mut c, &admin_b, "backup", "beta-secret-name", 0).await;
    let (monitor, _) = create(&mut c, ROOT, "monitor", "", 0).await;
    denied(
        c.create_token(with(
            Some(&admin_a),
            pb::CreateTokenRequest {
                role: "cluster-admin".into(),
                ..Default::default()
            },
        ))
        .await,
        "an admin creating a cluster-admin",
    );
    for token in [&backup_a, &restore_a] {
        denied(
            c.init_tenant(with(
                Some(token),
                pb::InitTenantRequest {
                    tenant: "alpha".into(),
                    key_slot: b"x".to_vec(),
                },
            ))
            .await,
            "backup or restore inits",
        );
    }

    // Backup: upload, commit and list its tenant (through another node too).
    let (put, blob) = pack("", 3);
    let pack_id = put.pack_id.clone();
    client(&addrs[1])
        .put_pack(with(Some(&backup_a), put))
        .await
        .expect("backup puts a pack");
    c.commit_snapshot(with(
        Some(&backup_a),
        pb::CommitSnapshotRequest {
            tenant: "alpha".into(),
            snapshot: Some(snapshot(blob.clone(), 1)),
            ..Default::default()
        },
    ))
    .await
    .expect("backup commits");
    let listed = c
        .list_snapshots(with(Some(&backup_a), pb::ListSnapshotsRequest::default()))
        .await
        .expect("backup lists")
        .into_inner();
    assert_eq!(listed.snapshots.len(), 1);

    // ...but never removes nodes, creates tokens or touches another tenant.
    for addr in &addrs {
        denied(
            client(addr)
                .remove_node(with(
                    Some(&backup_a),
                    pb::RemoveNodeRequest {
                        node_id: 3,
                        drain: false,
                    },
                ))
                .await,
            "backup removes a node",
        );
    }
    denied(
        c.create_token(with(
            Some(&backup_a),
            pb::CreateTokenRequest {
                role: "backup".into(),
                ..Default::default()
            },
        ))
        .await,
        "backup creates a token",
    );
    denied(
        c.remove_key_slot(with(
            Some(&backup_a),
            pb::RemoveKeySlotRequest {
                tenant: String::new(),
                id: "0000000000000000".into(),
            },
        ))
        .await,
        "backup removes a key slot",
    );
    let status = denied(
        c.list_snapshots(with(
            Some(&backup_a),
            pb::ListSnapshotsRequest {
                tenant: "beta-secret-name".into(),
                ..Default::default()
            },
        ))
        .await,
        "alpha lists beta",
    );
    assert!(!status.message().contains("beta"), "{status:?}");

    // Restore reads and lists, never commits or uploads.
    let read = c
        .read_pack(with(
            Some(&restore_a),
            pb::ReadPackRequest {
                pack_id: pack_id.clone(),
                ranges: vec![pb::ByteRange {
                    offset: 0,
                    length: 16,
                }],
                ..Default::default()
            },
        ))
        .await
        .expect("restore reads its pack")
        .into_inner();
    assert_eq!(read.ranges[0].len(), 16);
    denied(
        c.commit_snapshot(with(
            Some(&restore_a),
            pb::CommitSnapshotRequest {
                tenant: String::new(),
                snapshot: Some(snapshot(blob.clone(), 2)),
                ..Default::default()
            },
        ))
        .await,
        "restore commits",
    );
    denied(
        c.put_pack(with(Some(&restore_a), pack("", 5).0)).await,
        "restore uploads",
    );

    // Tenant beta cannot list, read or get the key slots of alpha.
    for token in [&backup_b, &admin_b] {
        let status = denied(
            c.read_pack(with(
                Some(token),
                pb::ReadPackRequest {
                    pack_id: pack_id.clone(),
                    ranges: vec![pb::ByteRange {
                        offset: 0,
                        length: 16,
                    }],
                    ..Default::default()
                },
            ))
            .await,
            "beta reads alpha's pack",
        );
        assert!(!status.message().contains("alpha"), "{status:?}");
        let status = denied(
            c.get_key_slots(with(
                Some(token),
                pb::GetKeySlotsRequest {
                    tenant: "alpha".into(),
                },
            ))
            .await,
            "beta gets alpha's key slots",
        );
        assert!(!status.message().contains("alpha"), "{status:?}");
        denied(
            c.list_snapshots(with(
                Some(token),
                pb::ListSnapshotsRequest {
                    tenant: "alpha".into(),
                    ..Default::default()
                },
            ))
            .await,
            "beta lists alpha",
        );
    }
    // Beta's own listing (tenant from its token) shows none of alpha's.
    let listed = c
        .list_snapshots(with(Some(&backup_b), pb::ListSnapshotsRequest::default()))
        .await
        .expect("beta lists itself")
        .into_inner();
    assert!(listed.snapshots.is_empty());
    let located = c
        .locate_blobs(with(
            Some(&backup_b),
            pb::LocateBlobsRequest {
                tenant: String::new(),
                ids: vec![blob.clone()],
            },
        ))
        .await
        .expect("beta locates")
        .into_inner();
    assert!(
        !located.locations[0].found,
        "alpha's blob is invisible to beta"
    );

    // Monitor: status yes, tenant data no.
    c.cluster_status(with(Some(&monitor), pb::ClusterStatusRequest {}))
        .await
        .expect("monitor reads the status");
    denied(
        c.get_key_slots(with(
            Some(&monitor),
            pb::GetKeySlotsRequest {
                tenant: "alpha".into(),
            },
        ))
        .await,
        "monitor reads key slots",
    );
    denied(
        c.check_packs(with(
            Some(&monitor),
            pb::CheckPacksRequest {
                read_data: true,
                tenant: String::new(),
                ..Default::default()
            },
        ))
        .await,
        "monitor reads data",
    );

    // Metrics: a monitor or cluster-admin token, nothing else.
    let code = |body: String| {
        body.split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(code(scrape(metrics_port, None).await), "401");
    assert_eq!(
        code(scrape(metrics_port, Some("cairn_unknown-token-000000000000")).await),
        "401"
    );
    assert_eq!(code(scrape(metrics_port, Some(&backup_b)).await), "403");
    let page = scrape(metrics_port, Some(&monitor)).await;
    assert_eq!(code(page.clone()), "200");
    assert!(page.contains("cairn_raft_term"), "{page}");
    assert_eq!(code(scrape(metrics_port, Some(ROOT)).await), "200");

    // Repair is cluster-admin's; asked of a follower, it is forwarded to the
    // leader with the caller's token and audited there.
    denied(
        c.repair(with(Some(&admin_a), pb::RepairRequest::default()))
            .await,
        "admin repairs",
    );
    for addr in &addrs {
        client(addr)
            .repair(with(Some(ROOT), pb::RepairRequest::default()))
            .await
            .expect("cluster-admin repairs through any node");
    }

    // Key slots: add one, remove the first, never the last.
    let added = c
        .add_key_slot(with(
            Some(&admin_a),
            pb::AddKeySlotRequest {
                tenant: String::new(),
                key_slot: b"slot-two".to_vec(),
            },
        ))
        .await
        .expect("add slot")
        .into_inner();
    let slots = c
        .get_key_slots(with(Some(&backup_a), pb::GetKeySlotsRequest::default()))
        .await
        .expect("slots")
        .into_inner();
    assert_eq!(slots.slots.len(), 2);
    assert_eq!(slots.slots[1].id, added.id);
    assert!(slots.slots.iter().all(|s| s.created_unix_ms > 0));
    let first = slots.slots[0].id.clone();
    c.remove_key_slot(with(
        Some(&admin_a),
        pb::RemoveKeySlotRequest {
            tenant: String::new(),
            id: first.clone(),
        },
    ))
    .await
    .expect("remove the first slot");
    let slots = client(&addrs[2])
        .get_key_slots(with(Some(&restore_a), pb::GetKeySlotsRequest::default()))
        .await
        .expect("slots")
        .into_inner();
    assert_eq!(slots.key_slots, vec![b"slot-two".to_vec()]);
    assert!(
        slots.slots.iter().all(|s| s.id != first),
        "removed slot is gone"
    );
    let status = c
        .remove_key_slot(with(
            Some(&admin_a),
            pb::RemoveKeySlotRequest {
                tenant: String::new(),
                id: added.id.clone(),
            },
        ))
        .await
        .expect_err("the last slot");
    assert_eq!(status.code(), Code::FailedPrecondition);

    // Revoked and expired tokens are refused on every node.
    let listed = c
        .list_tokens(with(Some(&admin_a), pb::ListTokensRequest {}))
        .await
        .expect("admin lists")
        .into_inner();
    assert!(
        listed.tokens.iter().all(|t| t.tenant == "alpha"),
        "{listed:?}"
    );
    assert!(listed.tokens.iter().any(|t| t.id == backup_a_id));
    denied(
        c.revoke_token(with(
            Some(&backup_b),
            pb::RevokeTokenRequest {
                id: backup_a_id.clone(),
            },
        ))
        .await,
        "backup revokes",
    );
    let status = c
        .revoke_token(with(
            Some(&admin_b),
            pb::RevokeTokenRequest {
                id: backup_a_id.clone(),
            },
        ))
        .await
        .expect_err("another tenant's admin revokes");
    assert_eq!(status.code(), Code::NotFound);
    c.revoke_token(with(
        Some(&admin_a),
        pb::RevokeTokenRequest {
            id: backup_a_id.clone(),
        },
    ))
    .await
    .expect("admin revokes its backup token");
    wait_everywhere(
        &addrs,
        &backup_a,
        Some(Code::Unauthenticated),
        "revoked everywhere",
    )
    .await;
    let (short, _) = create(&mut c, ROOT, "restore", "alpha", 1).await;
    wait_everywhere(
        &addrs,
        &short,
        Some(Code::Unauthenticated),
        "expired everywhere",
    )
    .await;

    // The audit log: cluster-admin only, a verified chain, every change in it.
    denied(
        c.audit_log(with(Some(&admin_a), pb::AuditLogRequest::default()))
            .await,
        "admin reads the audit log",
    );
    let mut verifier = ChainVerifier::default();
    let mut entries = Vec::new();
    loop {
        let page = client(&addrs[1])
            .audit_log(with(
                Some(ROOT),
                pb::AuditLogRequest {
                    after_seq: verifier.seq,
                    limit: 7,
                },
            ))
            .await
            .expect("audit log")
            .into_inner();
        for entry in &page.entries {
            verifier.push(entry).expect("the chain verifies");
        }
        entries.extend(page.entries);
        if !page.more {
            assert_eq!(verifier.seq, page.head_seq);
            assert_eq!(verifier.head.to_vec(), page.head_hash);
            break;
        }
    }
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    for action in [
        "BootstrapToken",
        "CreateToken",
        "InitTenant",
        "CommitSnapshot",
        "AddKeySlot",
        "RemoveKeySlot",
        "RevokeToken",
        "Repair",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
    assert_eq!(
        actions.iter().filter(|a| **a == "BootstrapToken").count(),
        1
    );
    let repairs: Vec<&pb::AuditEntry> = entries.iter().filter(|e| e.action == "Repair").collect();
    assert!(
        repairs
            .iter()
            .filter(|e| e.result.starts_with("ok"))
            .count()
            == addrs.len()
            && repairs
                .iter()
                .filter(|e| e.result.starts_with("ok"))
                .all(|e| e.role == "cluster-admin"),
        "each repair recorded once, as the cluster-admin: {repairs:?}"
    );
    let refused: Vec<&pb::AuditEntry> = entries
        .iter()
        .filter(|e| e.result.starts_with("refused"))
        .collect();
    assert!(
        refused
            .iter()
            .any(|e| e.action == "RemoveNode" && e.role == "backup" && e.tenant == "alpha"),
        "refused RemoveNode recorded: {refused:?}"
    );
    assert!(
        refused.iter().any(|e| e.actor_kind == "anonymous"),
        "refused anonymous call recorded"
    );
    let commit = entries
        .iter()
        .find(|e| e.action == "CommitSnapshot")
        .expect("commit");
    assert_eq!(
        (commit.role.as_str(), commit.result.as_str()),
        ("backup", "ok")
    );
    assert!(
        entries
            .windows(2)
            .all(|w| w[0].time_unix_ms <= w[1].time_unix_ms)
    );
    for entry in &entries {
        for secret in [ROOT, &backup_a, &admin_a] {
            assert!(
                !format!("{entry:?}").contains(secret),
                "a secret in {entry:?}"
            );
        }
    }

    // On a stopped node, someone with the disk rewrites an entry through the
    // store: the chain no longer verifies.
    let meta_dir = cluster.data_dir(2).join("meta");
    cluster.shutdown().await.expect("shutdown");
    let db = cairn_node::kv::SledDb::open(&meta_dir).expect("open the stopped node's store");
    let view =
        StateView::open(Arc::new(db.tree("raft_state").expect("state tree"))).expect("state");
    let stored = view.audit_entries(0, 100_000).expect("entries");
    assert!(stored.len() >= entries.len());
    let verify = |view: &StateView| {
        let mut verifier = ChainVerifier::default();
        view.audit_entries(0, 100_000)
            .expect("entries")
            .iter()
            .try_for_each(|e| verifier.push(&e.to_wire()))
    };
    assert_eq!(verify(&view), Ok(()));
    let target = stored
        .iter()
        .find(|e| e.result.starts_with("refused"))
        .expect("a refusal");
    let mut edited = target.clone();
    edited.result = "ok".into();
    view.kv()
        .put(
            &cairn_node::meta::state::audit_key(edited.seq),
            &cairn_node::meta::codec::encode("audit entry", &edited).expect("encode"),
        )
        .expect("put");
    assert_eq!(
        verify(&view),
        Err(cairn_proto::audit::ChainBreak::Altered { seq: edited.seq })
    );
}

#[tokio::test]
async fn a_missing_or_malformed_bootstrap_token_file_is_a_start_error() {
    use cairn_node::config::{NodeConfig, NodeFile};
    let dir = tempfile::tempdir().expect("tempdir");
    let short = dir.path().join("short-token");
    std::fs::write(&short, "too-short\n").expect("write");
    for (file, expected) in [
        (dir.path().join("absent-token"), "cannot be read"),
        (short, "must hold one token"),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = NodeConfig::from_file(NodeFile {
            node_id: Some(1),
            region: Some("r1".into()),
            listen: Some(addr),
            data_dir: Some(dir.path().join("node-1")),
            initial_cluster: Some(format!("1=r1@{addr},2=r2@127.0.0.1:1,3=r3@127.0.0.1:2")),
            erasure: Some("2+1".into()),
            bootstrap_token_file: Some(file.clone()),
            // The token file is checked whatever the transport.
            insecure: true,
            ..NodeFile::default()
        })
        .expect("config");
        let error = cairn_node::server::run(config, listener, std::future::pending())
            .await
            .expect_err("refused to start");
        let message = error.to_string();
        assert!(message.contains(expected), "{message}");
        assert!(
            !message.contains(&*dir.path().to_string_lossy()),
            "no path in {message}"
        );
        assert!(!dir.path().join("node-1").exists(), "nothing opened");
    }
}
