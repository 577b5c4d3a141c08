//! Forget, retention locks, roles and dataset policies against an
//! in-process cluster with TLS and tokens. Raw gRPC, not the SDK: snapshots
//! are committed with the plain `CommitSnapshot` (no reference lists), as a
//! client from before the lifecycle would.

use std::time::Duration;

use cairn_node::local_cluster::{LocalCluster, wait_until};
use cairn_proto::transport::{DialTls, lazy_channel};
use cairn_proto::v1 as pb;
use pb::cairn_client::CairnClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const HOUR_MS: u64 = 3_600_000;

fn client(addr: &str, ca: &DialTls) -> CairnClient<Channel> {
    CairnClient::new(lazy_channel(addr, Duration::from_secs(2), Some(ca)).expect("channel"))
}

fn with<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(Duration::from_secs(20));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

fn refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) -> Status {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    status
}

async fn create(
    c: &mut CairnClient<Channel>,
    by: &str,
    role: &str,
    tenant: &str,
) -> (String, String) {
    let reply = c
        .create_token(with(
            by,
            pb::CreateTokenRequest {
                role: role.into(),
                tenant: tenant.into(),
                ttl_seconds: 0,
                label: format!("{role} lifecycle test"),
            },
        ))
        .await
        .expect("create token")
        .into_inner();
    (reply.token, reply.info.expect("info").id)
}

fn snapshot(n: u8, dataset: &str, root_tree: &[u8]) -> pb::SnapshotRecord {
    pb::SnapshotRecord {
        id: vec![n; 32],
        dataset: dataset.into(),
        kind: "full".into(),
        root_tree: root_tree.to_vec(),
        // No commit time is recorded for a plain commit: retention falls
        // back to this time, so the order is known.
        time_unix_ms: i64::from(n) * 1000,
        ..Default::default()
    }
}

fn forget(dataset: &str, ids: &[u8], last: u32, dry_run: bool, bypass: bool) -> pb::ForgetRequest {
    pb::ForgetRequest {
        tenant: "alpha".into(),
        dataset: dataset.into(),
        ids: ids.iter().map(|n| vec![*n; 32]).collect(),
        keep: Some(pb::KeepRules {
            last,
            ..Default::default()
        }),
        dry_run,
        bypass_governance: bypass,
    }
}

fn lock(n: u8, mode: &str) -> pb::LockSnapshotRequest {
    pb::LockSnapshotRequest {
        tenant: "alpha".into(),
        id: vec![n; 32],
        until_unix_ms: 0,
        for_ms: HOUR_MS,
        mode: mode.into(),
    }
}

fn unlock(n: u8, bypass: bool) -> pb::UnlockSnapshotRequest {
    pb::UnlockSnapshotRequest {
        tenant: "alpha".into(),
        id: vec![n; 32],
        bypass_governance: bypass,
    }
}

async fn listed(c: &mut CairnClient<Channel>, token: &str, dataset: &str) -> Vec<u8> {
    c.list_snapshots(with(
        token,
        pb::ListSnapshotsRequest {
            tenant: "alpha".into(),
            dataset: dataset.into(),
        },
    ))
    .await
    .expect("list")
    .into_inner()
    .snapshots
    .iter()
    .map(|s| s.id[0])
    .collect()
}

async fn audit(c: &mut CairnClient<Channel>, root: &str) -> Vec<pb::AuditEntry> {
    let mut entries = Vec::new();
    loop {
        let reply = c
            .audit_log(with(
                root,
                pb::AuditLogRequest {
                    after_seq: entries.last().map_or(0, |e: &pb::AuditEntry| e.seq),
                    limit: 500,
                },
            ))
            .await
            .expect("audit log")
            .into_inner();
        entries.extend(reply.entries);
        if !reply.more {
            return entries;
        }
    }
}

fn decisions(reply: &pb::ForgetReply) -> Vec<(u8, bool)> {
    reply
        .decisions
        .iter()
        .map(|d| (d.snapshot.as_ref().expect("record").id[0], d.keep))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_locks_roles_and_policies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = LocalCluster::start_secure(dir.path(), &[1, 1, 1], "2+1", |node| {
        node.lifecycle.policy_interval = Duration::from_secs(1);
    })
    .await
    .expect("cluster");
    let ca = DialTls::new(cluster.ca_pem().expect("a TLS cluster"));
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    let root = cluster.admin_token().to_string();
    let addrs = cluster.addrs();
    let mut c = client(&addrs[0], &ca);

    let (admin, _) = create(&mut c, &root, "admin", "alpha").await;
    let (backup, backup_id) = create(&mut c, &admin, "backup", "alpha").await;
    c.init_tenant(with(
        &admin,
        pb::InitTenantRequest {
            tenant: "alpha".into(),
            key_slot: b"slot".to_vec(),
        },
    ))
    .await
    .expect("init");

    // One pack holding the blob every snapshot names as its root tree.
    let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let tree = blake3::hash(b"root tree").as_bytes().to_vec();
    c.put_pack(with(
        &backup,
        pb::PutPackRequest {
            tenant: "alpha".into(),
            pack_id: blake3::hash(&data).as_bytes().to_vec(),
            blobs: vec![pb::BlobEntry {
                id: tree.clone(),
                offset: 0,
                length: data.len() as u32,
            }],
            data: data.into(),
            session: Vec::new(),
        },
    ))
    .await
    .expect("put pack");
    for (n, dataset) in [
        (1, "chat"),
        (2, "chat"),
        (3, "chat"),
        (4, "chat"),
        (10, "mail"),
        (11, "mail"),
    ] {
        c.commit_snapshot(with(
            &backup,
            pb::CommitSnapshotRequest {
                tenant: "alpha".into(),
                snapshot: Some(snapshot(n, dataset, &tree)),
                ..Default::default()
            },
        ))
        .await
        .expect("commit");
    }

    // A forget with neither ids nor rules is refused (it would keep everything).
    refused(
        c.forget(with(&admin, forget("chat", &[], 0, false, false)))
            .await,
        Code::InvalidArgument,
        "forget without rules",
    );

    // Dry run: decided, nothing removed.
    let dry = c
        .forget(with(&admin, forget("chat", &[], 2, true, false)))
        .await
        .expect("dry run")
        .into_inner();
    assert_eq!(
        decisions(&dry),
        vec![(1, false), (2, false), (3, true), (4, true)]
    );
    assert_eq!(dry.removed, 0);
    assert_eq!(dry.decisions[3].reasons, vec!["latest", "last snapshot"]);
    assert_eq!(listed(&mut c, &admin, "chat").await, vec![1, 2, 3, 4]);

    // Locks: 1 compliance, 2 governance; a real forget keeps both.
    let locked = c
        .lock_snapshot(with(&admin, lock(1, "compliance")))
        .await
        .expect("lock compliance")
        .into_inner()
        .lock
        .expect("lock");
    assert_eq!(locked.mode, "compliance");
    assert!(locked.set_unix_ms > 0 && locked.until_unix_ms > locked.set_unix_ms);
    c.lock_snapshot(with(&admin, lock(2, "governance")))
        .await
        .expect("lock governance");
    refused(
        c.lock_snapshot(with(&admin, lock(99, "governance"))).await,
        Code::NotFound,
        "lock of an unknown snapshot",
    );
    let real = c
        .forget(with(&admin, forget("chat", &[], 1, false, false)))
        .await
        .expect("forget")
        .into_inner();
    assert_eq!(
        decisions(&real),
        vec![(1, true), (2, true), (3, false), (4, true)]
    );
    assert_eq!(real.removed, 1);
    let first = real.decisions[0].snapshot.as_ref().expect("record");
    assert_eq!(
        first.lock.as_ref().map(|l| l.mode.as_str()),
        Some("compliance")
    );
    assert!(
        real.decisions[0].reasons[0].starts_with("locked (compliance) until "),
        "{:?}",
        real.decisions[0].reasons
    );
    assert_eq!(listed(&mut c, &admin, "chat").await, vec![1, 2, 4]);

    // Compliance: nobody, not even the bootstrap cluster-admin with the bypass.
    let status = refused(
        c.forget(with(&root, forget("", &[1], 0, false, true)))
            .await,
        Code::FailedPrecondition,
        "forget of a compliance-locked snapshot",
    );
    assert!(status.message().contains("compliance"), "{status:?}");
    refused(
        c.unlock_snapshot(with(&root, unlock(1, true))).await,
        Code::FailedPrecondition,
        "unlock of a compliance lock",
    );
    refused(
        c.forget(with(&admin, forget("", &[1, 4], 0, false, false)))
            .await,
        Code::FailedPrecondition,
        "forget naming a locked snapshot among others",
    );
    assert_eq!(
        listed(&mut c, &admin, "chat").await,
        vec![1, 2, 4],
        "nothing went"
    );
    wait_until(
        "the attempt on locked data is audited",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            let root = root.clone();
            async move {
                let entries = audit(&mut c, &root).await;
                entries
                    .iter()
                    .find(|e| {
                        e.action == "Forget"
                            && e.result.starts_with("refused: ")
                            && e.result.contains("locked (compliance)")
                    })
                    .map(|_| ())
                    .ok_or_else(|| "no refused Forget entry".to_string())
            }
        },
    )
    .await;

    // Governance: refused for admin (with or without the bypass), for
    // cluster-admin without the bypass; allowed with it.
    let status = refused(
        c.forget(with(&admin, forget("", &[2], 0, false, false)))
            .await,
        Code::FailedPrecondition,
        "admin forgets a governance-locked snapshot",
    );
    assert!(
        status.message().contains("--bypass-governance"),
        "{status:?}"
    );
    refused(
        c.forget(with(&admin, forget("", &[2], 0, false, true)))
            .await,
        Code::PermissionDenied,
        "admin with the bypass",
    );
    refused(
        c.unlock_snapshot(with(&admin, unlock(2, false))).await,
        Code::FailedPrecondition,
        "admin unlocks governance",
    );
    refused(
        c.unlock_snapshot(with(&admin, unlock(2, true))).await,
        Code::PermissionDenied,
        "admin unlocks governance with the bypass",
    );
    refused(
        c.forget(with(&root, forget("", &[2], 0, false, false)))
            .await,
        Code::FailedPrecondition,
        "cluster-admin without the bypass",
    );
    let bypassed = c
        .forget(with(&root, forget("", &[2], 0, false, true)))
        .await
        .expect("cluster-admin with the bypass")
        .into_inner();
    assert_eq!(bypassed.removed, 1);
    assert_eq!(listed(&mut c, &admin, "chat").await, vec![1, 4]);

    // A backup token never forgets, prunes, locks, unlocks or sets policies;
    // each refusal is audited.
    refused(
        c.forget(with(&backup, forget("chat", &[], 1, false, false)))
            .await,
        Code::PermissionDenied,
        "backup forgets",
    );
    refused(
        c.prune(with(&backup, pb::PruneRequest::default())).await,
        Code::PermissionDenied,
        "backup prunes",
    );
    refused(
        c.lock_snapshot(with(&backup, lock(4, "governance"))).await,
        Code::PermissionDenied,
        "backup locks",
    );
    refused(
        c.unlock_snapshot(with(&backup, unlock(1, false))).await,
        Code::PermissionDenied,
        "backup unlocks",
    );
    let keep_last_1 = pb::SetPolicyRequest {
        tenant: "alpha".into(),
        policy: Some(pb::Policy {
            dataset: "mail".into(),
            keep: Some(pb::KeepRules {
                last: 1,
                ..Default::default()
            }),
            ..Default::default()
        }),
        remove: false,
    };
    refused(
        c.set_policy(with(&backup, keep_last_1.clone())).await,
        Code::PermissionDenied,
        "backup sets a policy",
    );
    let actions = [
        "Forget",
        "Prune",
        "LockSnapshot",
        "UnlockSnapshot",
        "SetPolicy",
    ];
    wait_until(
        "every refusal of the backup token is audited",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            let root = root.clone();
            let backup_id = backup_id.clone();
            async move {
                let entries = audit(&mut c, &root).await;
                let missing: Vec<&str> = actions
                    .iter()
                    .copied()
                    .filter(|action| {
                        !entries.iter().any(|e| {
                            e.action == *action
                                && e.token_id == backup_id
                                && e.result.starts_with("refused")
                        })
                    })
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("not audited: {missing:?}"))
                }
            }
        },
    )
    .await;

    // A policy without any rule is refused; keep-last 1 on "mail" is applied
    // by the leader on its own, and audited as the node's action.
    let mut empty = keep_last_1.clone();
    empty.policy.as_mut().expect("policy").keep = None;
    refused(
        c.set_policy(with(&admin, empty)).await,
        Code::InvalidArgument,
        "a policy without rules",
    );
    c.set_policy(with(&admin, keep_last_1))
        .await
        .expect("admin sets a policy");
    wait_until(
        "the policy forgets the older mail snapshot",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            let admin = admin.clone();
            async move {
                let left = listed(&mut c, &admin, "mail").await;
                if left == vec![11] {
                    Ok(())
                } else {
                    Err(format!("mail snapshots: {left:?}"))
                }
            }
        },
    )
    .await;
    let entries = audit(&mut c, &root).await;
    let applied = entries
        .iter()
        .find(|e| e.action == "ApplyPolicy" && e.target.contains("removed 1"))
        .expect("an ApplyPolicy entry");
    assert_eq!(applied.actor_kind, "node");
    assert_eq!(applied.result, "ok");
    assert_eq!(
        applied.target,
        "tenant alpha dataset mail: removed 1, kept 1"
    );
    // The other datasets are untouched by it.
    assert_eq!(listed(&mut c, &admin, "chat").await, vec![1, 4]);
    let policies = c
        .get_policies(with(&admin, pb::GetPoliciesRequest::default()))
        .await
        .expect("policies")
        .into_inner();
    assert_eq!(policies.policies.len(), 1);
    assert!(policies.policies[0].applied_unix_ms > 0);

    // Max-age on "chat" (its snapshots are from 1970): the leader forgets
    // snapshot 4 even though it is the latest, keeps the compliance-locked
    // 1, and both GetPolicies and the cluster status warn about it.
    let max_age = pb::SetPolicyRequest {
        tenant: "alpha".into(),
        policy: Some(pb::Policy {
            dataset: "chat".into(),
            max_age_ms: 24 * HOUR_MS,
            ..Default::default()
        }),
        remove: false,
    };
    c.set_policy(with(&admin, max_age))
        .await
        .expect("a max-age policy");
    wait_until(
        "max-age forgets snapshot 4",
        Duration::from_secs(30),
        || {
            let mut c = c.clone();
            let admin = admin.clone();
            async move {
                let left = listed(&mut c, &admin, "chat").await;
                if left == vec![1] {
                    Ok(())
                } else {
                    Err(format!("chat snapshots: {left:?}"))
                }
            }
        },
    )
    .await;
    let warning = "tenant alpha dataset chat: snapshot 01010101 is past max-age 1d but locked (compliance) until ";
    let policies = c
        .get_policies(with(&admin, pb::GetPoliciesRequest::default()))
        .await
        .expect("policies")
        .into_inner();
    assert_eq!(policies.policies.len(), 2);
    assert!(
        policies.warnings.len() == 1 && policies.warnings[0].starts_with(warning),
        "{:?}",
        policies.warnings
    );
    let status = c
        .cluster_status(with(&root, pb::ClusterStatusRequest {}))
        .await
        .expect("status")
        .into_inner();
    assert!(
        status.warnings.iter().any(|w| w.starts_with(warning)),
        "{:?}",
        status.warnings
    );
    // Removing a policy stops it; removing it twice names what is missing.
    let remove = pb::SetPolicyRequest {
        tenant: "alpha".into(),
        policy: Some(pb::Policy {
            dataset: "chat".into(),
            ..Default::default()
        }),
        remove: true,
    };
    c.set_policy(with(&admin, remove.clone()))
        .await
        .expect("remove policy");
    refused(
        c.set_policy(with(&admin, remove)).await,
        Code::NotFound,
        "remove a policy twice",
    );

    cluster.shutdown().await.expect("shutdown");
}
