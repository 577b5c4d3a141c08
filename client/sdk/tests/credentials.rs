//! The SDK's credentials, key slots and audit paging over real gRPC, against
//! a small in-test node that checks bearer tokens the way Cairn nodes do
//! (the real node side is tested in the multi-node tests).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cairn_client::admin;
use cairn_client::repo::key_slot_id;
use cairn_client::seal::KdfParams;
use cairn_client::{ClientError, Cluster, ClusterOptions, Repository};
use cairn_proto::audit::{GENESIS, entry_hash};
use cairn_proto::v1 as pb;
use cairn_proto::v1::cairn_server::{Cairn, CairnServer};
use tonic::{Request, Response, Status};

type Reply<T> = Result<Response<T>, Status>;

/// A node holding one tenant's key slots and an audit log, accepting one token.
#[derive(Default)]
struct FakeNode {
    token: String,
    tenant: String,
    calls: AtomicUsize,
    headers: Mutex<Vec<String>>,
    slots: Mutex<Vec<pb::KeySlotInfo>>,
    audit: Mutex<Vec<pb::AuditEntry>>,
}

impl FakeNode {
    fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(header.clone());
        if header != format!("Bearer {}", self.token) {
            return Err(Status::unauthenticated("unknown token"));
        }
        Ok(())
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<pb::KeySlotInfo>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_slot(&self, slot: Vec<u8>) -> String {
        let id = key_slot_id(&slot);
        let mut slots = self.slots();
        let created_unix_ms = slots.len() as i64 + 1;
        slots.push(pb::KeySlotInfo {
            id: id.clone(),
            slot,
            created_unix_ms,
        });
        id
    }
}

fn unimplemented<T>() -> Reply<T> {
    Err(Status::unimplemented("not in the fake node"))
}

/// The served handle (the test keeps another to look inside).
struct Shared(std::sync::Arc<FakeNode>);

impl std::ops::Deref for Shared {
    type Target = FakeNode;
    fn deref(&self) -> &FakeNode {
        &self.0
    }
}

#[tonic::async_trait]
impl Cairn for Shared {
    async fn init_tenant(&self, r: Request<pb::InitTenantRequest>) -> Reply<pb::InitTenantReply> {
        self.check(&r)?;
        if !self.slots().is_empty() {
            return Err(Status::already_exists("initialized"));
        }
        self.add_slot(r.into_inner().key_slot);
        Ok(Response::new(pb::InitTenantReply {}))
    }
    async fn get_key_slots(
        &self,
        r: Request<pb::GetKeySlotsRequest>,
    ) -> Reply<pb::GetKeySlotsReply> {
        self.check(&r)?;
        let slots = self.slots().clone();
        Ok(Response::new(pb::GetKeySlotsReply {
            key_slots: slots.iter().map(|s| s.slot.clone()).collect(),
            slots,
        }))
    }
    async fn add_key_slot(&self, r: Request<pb::AddKeySlotRequest>) -> Reply<pb::AddKeySlotReply> {
        self.check(&r)?;
        let id = self.add_slot(r.into_inner().key_slot);
        Ok(Response::new(pb::AddKeySlotReply { id }))
    }
    async fn remove_key_slot(
        &self,
        r: Request<pb::RemoveKeySlotRequest>,
    ) -> Reply<pb::RemoveKeySlotReply> {
        self.check(&r)?;
        let id = r.into_inner().id;
        let mut slots = self.slots();
        if slots.len() <= 1 {
            return Err(Status::failed_precondition("last key slot"));
        }
        let before = slots.len();
        slots.retain(|s| s.id != id);
        if slots.len() == before {
            return Err(Status::not_found("no such key slot"));
        }
        Ok(Response::new(pb::RemoveKeySlotReply {}))
    }
    async fn audit_log(&self, r: Request<pb::AuditLogRequest>) -> Reply<pb::AuditLogReply> {
        self.check(&r)?;
        let request = r.into_inner();
        let log = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        // Pages smaller than asked, as a node capping `limit` would send.
        let limit = request.limit.min(700) as usize;
        let entries: Vec<_> = log
            .iter()
            .filter(|e| e.seq > request.after_seq)
            .take(limit)
            .cloned()
            .collect();
        let more = entries
            .last()
            .is_some_and(|last| log.last().is_some_and(|head| head.seq > last.seq));
        let head = log.last();
        Ok(Response::new(pb::AuditLogReply {
            entries,
            more,
            head_seq: head.map(|h| h.seq).unwrap_or_default(),
            head_hash: head.map(|h| h.hash.clone()).unwrap_or_default(),
        }))
    }
    async fn forget(&self, _: Request<pb::ForgetRequest>) -> Reply<pb::ForgetReply> {
        unimplemented()
    }
    async fn prune(&self, _: Request<pb::PruneRequest>) -> Reply<pb::PruneReply> {
        unimplemented()
    }
    async fn lock_snapshot(
        &self,
        _: Request<pb::LockSnapshotRequest>,
    ) -> Reply<pb::LockSnapshotReply> {
        unimplemented()
    }
    async fn unlock_snapshot(
        &self,
        _: Request<pb::UnlockSnapshotRequest>,
    ) -> Reply<pb::UnlockSnapshotReply> {
        unimplemented()
    }
    async fn set_policy(&self, _: Request<pb::SetPolicyRequest>) -> Reply<pb::SetPolicyReply> {
        unimplemented()
    }
    async fn get_policies(
        &self,
        _: Request<pb::GetPoliciesRequest>,
    ) -> Reply<pb::GetPoliciesReply> {
        unimplemented()
    }
    async fn stats(&self, _: Request<pb::StatsRequest>) -> Reply<pb::StatsReply> {
        unimplemented()
    }
    type AppendStreamStream =
        futures::stream::BoxStream<'static, Result<pb::AppendStreamReply, Status>>;
    async fn append_stream(
        &self,
        _: Request<tonic::Streaming<pb::AppendStreamRequest>>,
    ) -> Reply<Self::AppendStreamStream> {
        unimplemented()
    }
    async fn list_segments(
        &self,
        _: Request<pb::ListSegmentsRequest>,
    ) -> Reply<pb::ListSegmentsReply> {
        unimplemented()
    }
    async fn put_dictionary(
        &self,
        _: Request<pb::PutDictionaryRequest>,
    ) -> Reply<pb::PutDictionaryReply> {
        unimplemented()
    }
    async fn list_dictionaries(
        &self,
        _: Request<pb::ListDictionariesRequest>,
    ) -> Reply<pb::ListDictionariesReply> {
        unimplemented()
    }
    async fn who_am_i(&self, r: Request<pb::WhoAmIRequest>) -> Reply<pb::WhoAmIReply> {
        self.check(&r)?;
        Ok(Response::new(pb::WhoAmIReply {
            insecure: false,
            token_id: "t1".into(),
            role: "admin".into(),
            tenant: self.tenant.clone(),
            expires_unix_ms: 0,
        }))
    }
    async fn cluster_status(
        &self,
        r: Request<pb::ClusterStatusRequest>,
    ) -> Reply<pb::ClusterStatusReply> {
        self.check(&r)?;
        Ok(Response::new(pb::ClusterStatusReply::default()))
    }
    async fn find_blobs(&self, _: Request<pb::FindBlobsRequest>) -> Reply<pb::FindBlobsReply> {
        unimplemented()
    }
    async fn locate_blobs(
        &self,
        _: Request<pb::LocateBlobsRequest>,
    ) -> Reply<pb::LocateBlobsReply> {
        unimplemented()
    }
    async fn put_pack(&self, _: Request<pb::PutPackRequest>) -> Reply<pb::PutPackReply> {
        unimplemented()
    }
    async fn read_pack(&self, _: Request<pb::ReadPackRequest>) -> Reply<pb::ReadPackReply> {
        unimplemented()
    }
    async fn commit_snapshot(
        &self,
        _: Request<pb::CommitSnapshotRequest>,
    ) -> Reply<pb::CommitSnapshotReply> {
        unimplemented()
    }
    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Reply<pb::ListSnapshotsReply> {
        unimplemented()
    }
    async fn check_packs(&self, _: Request<pb::CheckPacksRequest>) -> Reply<pb::CheckPacksReply> {
        unimplemented()
    }
    async fn repair(&self, _: Request<pb::RepairRequest>) -> Reply<pb::RepairReply> {
        unimplemented()
    }
    async fn add_node(&self, _: Request<pb::AddNodeRequest>) -> Reply<pb::AddNodeReply> {
        unimplemented()
    }
    async fn remove_node(&self, r: Request<pb::RemoveNodeRequest>) -> Reply<pb::RemoveNodeReply> {
        self.check(&r)?;
        Err(Status::permission_denied("role admin may not RemoveNode"))
    }
    async fn report_faults(
        &self,
        _: Request<pb::ReportFaultsRequest>,
    ) -> Reply<pb::ReportFaultsReply> {
        unimplemented()
    }
    async fn create_token(
        &self,
        _: Request<pb::CreateTokenRequest>,
    ) -> Reply<pb::CreateTokenReply> {
        unimplemented()
    }
    async fn list_tokens(&self, _: Request<pb::ListTokensRequest>) -> Reply<pb::ListTokensReply> {
        unimplemented()
    }
    async fn revoke_token(
        &self,
        _: Request<pb::RevokeTokenRequest>,
    ) -> Reply<pb::RevokeTokenReply> {
        unimplemented()
    }
}

/// Serves `node` on a loopback port; returns its address.
async fn serve(node: std::sync::Arc<FakeNode>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("address").to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CairnServer::new(Shared(node)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// A CA and a certificate it signed for `localhost` (PEM: CA, cert, key).
fn ca_and_server_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("signed");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// Serves `node` over TLS with `cert`/`key`; returns `localhost:PORT`.
async fn serve_tls(node: std::sync::Arc<FakeNode>, cert: &str, key: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let port = listener.local_addr().expect("address").port();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key));
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .expect("TLS config")
        .add_service(CairnServer::new(Shared(node)))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    format!("localhost:{port}")
}

fn node(token: &str, tenant: &str) -> std::sync::Arc<FakeNode> {
    std::sync::Arc::new(FakeNode {
        token: token.into(),
        tenant: tenant.into(),
        ..FakeNode::default()
    })
}

fn client(addrs: &[String], token: &str) -> Cluster {
    Cluster::with_options(
        addrs,
        ClusterOptions::default().token(token).expect("valid"),
    )
    .expect("addresses parse")
    .with_failover_budget(Duration::from_secs(5))
}

#[tokio::test]
async fn the_token_goes_with_every_call_and_names_the_tenant() {
    let fake = node("tok-right", "chat");
    let addr = serve(fake.clone()).await;
    let cluster = client(&[addr], "tok-right");
    assert_eq!(cluster.resolve_tenant(None).await.expect("whoami"), "chat");
    assert_eq!(
        cluster.resolve_tenant(Some("other")).await.expect("flag"),
        "other"
    );
    cluster
        .call("cluster status", |mut c| async move {
            c.cluster_status(pb::ClusterStatusRequest {}).await
        })
        .await
        .expect("accepted");
    let headers = fake.headers.lock().expect("lock").clone();
    assert_eq!(headers, vec!["Bearer tok-right".to_string(); 2]);
}

#[tokio::test]
async fn a_refused_token_or_role_is_answered_at_once_without_failover() {
    let (one, two) = (node("tok-right", "chat"), node("tok-right", "chat"));
    let addrs = vec![serve(one.clone()).await, serve(two.clone()).await];
    let started = std::time::Instant::now();
    let error = client(&addrs, "tok-wrong")
        .resolve_tenant(None)
        .await
        .expect_err("refused");
    assert!(matches!(error, ClientError::TokenRefused), "{error}");
    let calls = one.calls.load(Ordering::SeqCst) + two.calls.load(Ordering::SeqCst);
    assert_eq!(
        calls, 1,
        "a refusal is a real answer: no other node is asked"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    let error = client(&addrs, "tok-right")
        .call("remove node", |mut c| async move {
            c.remove_node(pb::RemoveNodeRequest {
                node_id: 6,
                drain: true,
            })
            .await
        })
        .await
        .expect_err("denied");
    assert_eq!(
        error.to_string(),
        "this token's role may not remove node (role admin may not RemoveNode)"
    );
    // Without a token the message says one is needed.
    let plain = Cluster::new(&addrs).expect("parses");
    let error = plain.who_am_i().await.expect_err("needs a token");
    assert!(matches!(error, ClientError::TokenRequired), "{error}");
}

#[tokio::test]
async fn key_slots_add_remove_and_passwd_over_the_wire() {
    let fake = node("tok", "chat");
    let addrs = vec![serve(fake.clone()).await];
    let kdf = KdfParams::fast_for_tests();
    let repo = Repository::init(client(&addrs, "tok"), "chat", b"old", kdf)
        .await
        .expect("init");
    let old_id = repo.unlocked_slot().expect("unlocked with a known slot");
    let new_id = repo.add_key_slot(b"new", kdf).await.expect("added");
    let slots = repo.key_slots().await.expect("listed");
    assert_eq!(
        slots
            .iter()
            .map(|s| (s.id.as_str(), s.current))
            .collect::<Vec<_>>(),
        vec![(old_id.as_str(), true), (new_id.as_str(), false)]
    );
    let error = repo.remove_key_slot(&old_id).await.expect_err("in use");
    assert!(matches!(error, ClientError::KeySlotInUse { .. }), "{error}");

    let with_new = Repository::open(client(&addrs, "tok"), "chat", b"new")
        .await
        .expect("the new passphrase unlocks");
    assert_eq!(with_new.unlocked_slot(), Some(new_id.clone()));
    let removed = with_new
        .remove_key_slot(&old_id[..6])
        .await
        .expect("removed by prefix");
    assert_eq!(removed, old_id);
    let error = Repository::open(client(&addrs, "tok"), "chat", b"old")
        .await
        .err()
        .expect("old passphrase refused");
    assert!(matches!(error, ClientError::WrongPassword), "{error}");

    let third_id = with_new
        .change_passphrase(b"third", kdf)
        .await
        .expect("passwd");
    assert_eq!(with_new.unlocked_slot(), Some(third_id.clone()));
    let slots = with_new.key_slots().await.expect("listed");
    assert_eq!(slots.len(), 1);
    assert!(slots[0].current && slots[0].id == third_id);
    let error = Repository::open(client(&addrs, "tok"), "chat", b"new")
        .await
        .err()
        .expect("replaced passphrase refused");
    assert!(matches!(error, ClientError::WrongPassword), "{error}");
    Repository::open(client(&addrs, "tok"), "chat", b"third")
        .await
        .expect("the third passphrase unlocks");
}

fn audit_chain(n: u64) -> Vec<pb::AuditEntry> {
    let mut prev = GENESIS;
    (1..=n)
        .map(|seq| {
            let mut entry = pb::AuditEntry {
                seq,
                time_unix_ms: seq as i64,
                actor_kind: "token".into(),
                token_id: "t1".into(),
                action: "CommitSnapshot".into(),
                result: "ok".into(),
                prev_hash: prev.to_vec(),
                ..Default::default()
            };
            prev = entry_hash(&entry);
            entry.hash = prev.to_vec();
            entry
        })
        .collect()
}

#[tokio::test]
async fn audit_verify_pages_through_a_long_log_and_names_an_edited_entry() {
    let fake = node("tok", "chat");
    *fake.audit.lock().expect("lock") = audit_chain(2_500);
    let addrs = vec![serve(fake.clone()).await];
    let cluster = client(&addrs, "tok");
    let report = admin::audit_verify(&cluster).await.expect("verifies");
    assert!(report.ok, "{report:?}");
    assert_eq!((report.entries, report.head_seq), (2_500, 2_500));
    let mut seen = 0;
    admin::audit_entries(&cluster, 2_000, |page| seen += page.len())
        .await
        .expect("pages");
    assert_eq!(seen, 500);

    fake.audit.lock().expect("lock")[1_699].target = "rewritten".into();
    let report = admin::audit_verify(&cluster).await.expect("answers");
    assert!(!report.ok);
    assert_eq!(report.broken_seq, Some(1_700));
    assert_eq!(report.head_seq, 1_699);
    assert_eq!(
        report.broken.as_deref(),
        Some("entry 1700 was altered after it was written")
    );
}

#[tokio::test]
async fn with_the_cluster_ca_the_client_speaks_tls_and_refuses_other_servers() {
    let (ca, cert, key) = ca_and_server_cert();
    let fake = node("tok", "chat");
    let addrs = vec![serve_tls(fake.clone(), &cert, &key).await];
    let options = ClusterOptions::default()
        .ca_pem(ca.as_bytes())
        .token("tok")
        .expect("valid");
    let cluster = Cluster::with_options(&addrs, options).expect("parses");
    assert_eq!(
        cluster.resolve_tenant(None).await.expect("over TLS"),
        "chat"
    );
    assert_eq!(
        fake.headers.lock().expect("lock").as_slice(),
        ["Bearer tok".to_string()]
    );

    // A server whose certificate another CA signed is not this cluster.
    let started = std::time::Instant::now();
    let (other_ca, _, _) = ca_and_server_cert();
    let options = ClusterOptions::default()
        .ca_pem(other_ca.as_bytes())
        .token("tok")
        .expect("valid");
    let error = Cluster::with_options(&addrs, options)
        .expect("parses")
        .with_failover_budget(Duration::from_secs(20))
        .who_am_i()
        .await
        .expect_err("refused");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "every node failing verification is reported at once, not after the budget"
    );
    let text = error.to_string();
    assert!(
        matches!(error, ClientError::NoNodeReachable { .. }),
        "{text}"
    );
    assert!(
        text.contains("invalid peer certificate"),
        "the cause is named: {text}"
    );
    assert!(text.contains("is it this cluster's CA?"), "{text}");

    // Plaintext to a TLS node gets nothing either, and with the default
    // failover budget the user is told at once to give the CA.
    let started = std::time::Instant::now();
    let error = client(&addrs, "tok").who_am_i().await.expect_err("refused");
    assert!(
        error
            .to_string()
            .ends_with("; if the cluster runs TLS, give its CA with --ca-file or CAIRN_CA"),
        "{error}"
    );
    assert!(
        started.elapsed() < cairn_client::connection::FAILOVER_BUDGET,
        "said after one round, not after the whole budget"
    );
    let error = client(&addrs, "tok")
        .with_failover_budget(Duration::from_millis(300))
        .who_am_i()
        .await
        .expect_err("refused");
    assert!(
        matches!(error, ClientError::NoNodeReachable { .. }),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .ends_with("; if the cluster runs TLS, give its CA with --ca-file or CAIRN_CA"),
        "{error}"
    );
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        1,
        "only the TLS call got through"
    );
}
