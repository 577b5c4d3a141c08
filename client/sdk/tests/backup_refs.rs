//! A backup against a small in-memory node: the reference list it commits
//! covers every tree and chunk of the snapshot, every pack goes up in the
//! backup's session, the commit carries the GC epoch read first, levels pick
//! their parents, and a commit refused because blobs were collected during
//! the backup is rerun once as a full backup (the real node side is tested
//! in the multi-node tests).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_client::backup::{BackupOptions, Level, Progress, backup_paths};
use cairn_client::seal::{BlobId, KdfParams};
use cairn_client::tree::EntryKind;
use cairn_client::{ClientError, Cluster, Repository};
use cairn_proto::v1 as pb;
use cairn_proto::v1::cairn_server::{Cairn, CairnServer};
use tonic::{Request, Response, Status};

type Reply<T> = Result<Response<T>, Status>;

fn unimplemented<T>() -> Reply<T> {
    Err(Status::unimplemented("not in the fake node"))
}

#[derive(Default)]
struct Store {
    slots: Vec<pb::KeySlotInfo>,
    packs: HashMap<Vec<u8>, Vec<u8>>,
    index: HashMap<Vec<u8>, (Vec<u8>, u64, u32)>,
    /// Every pack upload: (session, blob ids in it).
    uploads: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
    commits: Vec<pb::CommitSnapshotRequest>,
    snapshots: Vec<pb::SnapshotRecord>,
    gc_epoch: u64,
    /// Commits still to refuse, each after "sweeping" the whole index.
    abort_commits: usize,
    /// FindBlobs calls answered.
    lookups: usize,
}

#[derive(Default, Clone)]
struct FakeNode(Arc<Mutex<Store>>);

impl FakeNode {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl Cairn for FakeNode {
    async fn init_tenant(&self, r: Request<pb::InitTenantRequest>) -> Reply<pb::InitTenantReply> {
        let slot = r.into_inner().key_slot;
        self.store().slots.push(pb::KeySlotInfo {
            id: cairn_client::repo::key_slot_id(&slot),
            slot,
            created_unix_ms: 1,
        });
        Ok(Response::new(pb::InitTenantReply {}))
    }
    async fn get_key_slots(
        &self,
        _: Request<pb::GetKeySlotsRequest>,
    ) -> Reply<pb::GetKeySlotsReply> {
        Ok(Response::new(pb::GetKeySlotsReply {
            key_slots: Vec::new(),
            slots: self.store().slots.clone(),
        }))
    }
    async fn find_blobs(&self, r: Request<pb::FindBlobsRequest>) -> Reply<pb::FindBlobsReply> {
        let mut store = self.store();
        store.lookups += 1;
        Ok(Response::new(pb::FindBlobsReply {
            present: r
                .into_inner()
                .ids
                .iter()
                .map(|id| store.index.contains_key(id))
                .collect(),
            gc_epoch: store.gc_epoch,
        }))
    }
    async fn locate_blobs(
        &self,
        r: Request<pb::LocateBlobsRequest>,
    ) -> Reply<pb::LocateBlobsReply> {
        let store = self.store();
        let locations = r
            .into_inner()
            .ids
            .into_iter()
            .map(|id| match store.index.get(&id) {
                Some((pack_id, offset, length)) => pb::BlobLocation {
                    id,
                    found: true,
                    pack_id: pack_id.clone(),
                    offset: *offset,
                    length: *length,
                },
                None => pb::BlobLocation {
                    id,
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(pb::LocateBlobsReply { locations }))
    }
    async fn put_pack(&self, r: Request<pb::PutPackRequest>) -> Reply<pb::PutPackReply> {
        let request = r.into_inner();
        let mut store = self.store();
        for blob in &request.blobs {
            store.index.insert(
                blob.id.clone(),
                (request.pack_id.clone(), blob.offset, blob.length),
            );
        }
        store.uploads.push((
            request.session.clone(),
            request.blobs.iter().map(|b| b.id.clone()).collect(),
        ));
        store.packs.insert(request.pack_id, request.data.to_vec());
        Ok(Response::new(pb::PutPackReply::default()))
    }
    async fn read_pack(&self, r: Request<pb::ReadPackRequest>) -> Reply<pb::ReadPackReply> {
        let request = r.into_inner();
        let store = self.store();
        let pack = store
            .packs
            .get(&request.pack_id)
            .ok_or_else(|| Status::not_found("pack"))?;
        let ranges = request
            .ranges
            .iter()
            .map(|r| {
                prost::bytes::Bytes::copy_from_slice(
                    &pack[r.offset as usize..(r.offset + r.length) as usize],
                )
            })
            .collect();
        Ok(Response::new(pb::ReadPackReply {
            ranges,
            shards_repaired_around: 0,
        }))
    }
    async fn commit_snapshot(
        &self,
        r: Request<pb::CommitSnapshotRequest>,
    ) -> Reply<pb::CommitSnapshotReply> {
        let request = r.into_inner();
        let mut store = self.store();
        store.commits.push(request.clone());
        if store.abort_commits > 0 {
            store.abort_commits -= 1;
            // A sweep ran during the backup: everything unreferenced is gone.
            store.index.clear();
            store.gc_epoch += 1;
            return Err(Status::aborted(
                "blobs this snapshot references were garbage-collected during the backup; it is retried as a full backup",
            ));
        }
        let mut record = request.snapshot.unwrap_or_default();
        record.committed_unix_ms = 1_764_000_000_000 + store.snapshots.len() as i64;
        record.has_refs = !request.refs.is_empty();
        store.snapshots.push(record);
        Ok(Response::new(pb::CommitSnapshotReply {}))
    }
    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Reply<pb::ListSnapshotsReply> {
        Ok(Response::new(pb::ListSnapshotsReply {
            snapshots: self.store().snapshots.clone(),
        }))
    }
    async fn add_key_slot(&self, _: Request<pb::AddKeySlotRequest>) -> Reply<pb::AddKeySlotReply> {
        unimplemented()
    }
    async fn remove_key_slot(
        &self,
        _: Request<pb::RemoveKeySlotRequest>,
    ) -> Reply<pb::RemoveKeySlotReply> {
        unimplemented()
    }
    async fn audit_log(&self, _: Request<pb::AuditLogRequest>) -> Reply<pb::AuditLogReply> {
        unimplemented()
    }
    async fn who_am_i(&self, _: Request<pb::WhoAmIRequest>) -> Reply<pb::WhoAmIReply> {
        unimplemented()
    }
    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Reply<pb::ClusterStatusReply> {
        unimplemented()
    }
    async fn remove_node(&self, _: Request<pb::RemoveNodeRequest>) -> Reply<pb::RemoveNodeReply> {
        unimplemented()
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
        futures::stream::BoxStream<'static, Result<pb::AppendStreamReply, tonic::Status>>;
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
    async fn check_packs(&self, _: Request<pb::CheckPacksRequest>) -> Reply<pb::CheckPacksReply> {
        unimplemented()
    }
    async fn repair(&self, _: Request<pb::RepairRequest>) -> Reply<pb::RepairReply> {
        unimplemented()
    }
    async fn add_node(&self, _: Request<pb::AddNodeRequest>) -> Reply<pb::AddNodeReply> {
        unimplemented()
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

async fn serve(node: FakeNode) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("address").to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CairnServer::new(node))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

async fn repo(node: &FakeNode) -> Arc<Repository> {
    let addr = serve(node.clone()).await;
    let cluster = Cluster::new(&[addr])
        .expect("address")
        .with_failover_budget(Duration::from_secs(5));
    Arc::new(
        Repository::init(cluster, "t", b"pw", KdfParams::fast_for_tests())
            .await
            .expect("init"),
    )
}

/// A small tree: nested directories, a file of several chunks, an empty
/// file and directory, a symlink, and a file repeated in two places.
fn source() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("a/b/c")).expect("dirs");
    std::fs::create_dir_all(root.join("empty")).expect("dir");
    let big: Vec<u8> = (0..600_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("a/big.bin"), &big).expect("big");
    std::fs::write(root.join("a/b/note.txt"), b"hello").expect("note");
    std::fs::write(root.join("a/b/c/same.txt"), b"twice").expect("same");
    std::fs::write(root.join("same.txt"), b"twice").expect("same");
    std::fs::write(root.join("zero"), b"").expect("zero");
    std::os::unix::fs::symlink("a/b/note.txt", root.join("link")).expect("symlink");
    dir
}

/// Every blob the snapshot references, computed from its trees.
async fn expected_refs(repo: &Repository, root: &BlobId) -> BTreeSet<BlobId> {
    let trees = repo.load_trees(root, &[]).await.expect("trees");
    let mut ids: BTreeSet<BlobId> = trees.keys().copied().collect();
    for tree in trees.values() {
        for entry in &tree.entries {
            match &entry.kind {
                EntryKind::File { chunks, .. } => ids.extend(chunks.iter().map(|c| c.id)),
                EntryKind::Dir { subtree } => {
                    ids.insert(*subtree);
                }
                _ => {}
            }
        }
    }
    ids
}

/// The ids a commit's segments list, read back from the packs as a node
/// would (unsealed bytes, checked against the segment id).
fn committed_refs(node: &FakeNode, commit: &pb::CommitSnapshotRequest) -> BTreeSet<BlobId> {
    let store = node.store();
    let mut ids = BTreeSet::new();
    for segment in &commit.refs {
        let (pack, offset, length) = store.index.get(&segment.blob).expect("segment indexed");
        let bytes = &store.packs[pack][*offset as usize..*offset as usize + *length as usize];
        let id: [u8; 32] = segment.blob.as_slice().try_into().expect("32 bytes");
        let listed = cairn_proto::refs::decode(&id, bytes).expect("a valid segment");
        assert_eq!(listed.len(), segment.count as usize);
        assert_eq!(
            listed.first().map(|f| f.to_vec()),
            Some(segment.first.clone())
        );
        assert_eq!(
            listed.last().map(|l| l.to_vec()),
            Some(segment.last.clone())
        );
        ids.extend(listed);
    }
    ids
}

async fn run(
    repo: &Arc<Repository>,
    path: &std::path::Path,
    level: Level,
) -> Result<cairn_client::backup::BackupSummary, ClientError> {
    let options = BackupOptions {
        dataset: "chat".into(),
        level,
        files_in_flight_max: 2,
        ..BackupOptions::default()
    };
    backup_paths(
        repo.clone(),
        &[path.to_path_buf()],
        &options,
        Arc::new(Progress::default()),
    )
    .await
}

#[tokio::test]
async fn the_commit_references_every_tree_and_chunk_in_one_session() {
    let node = FakeNode::default();
    node.store().gc_epoch = 7;
    let repo = repo(&node).await;
    let dir = source();

    let first = run(&repo, dir.path(), Level::Incremental)
        .await
        .expect("first backup");
    assert_eq!(
        (first.level.as_str(), first.parent.as_deref()),
        ("full", None)
    );
    // Change one file: the incremental reuses every other entry of its parent.
    std::fs::write(dir.path().join("a/b/note.txt"), b"hello again").expect("edit");
    let second = run(&repo, dir.path(), Level::Incremental)
        .await
        .expect("incremental");
    assert_eq!(second.level, "incremental");
    assert_eq!(second.parent.as_deref(), Some(first.snapshot_id.as_str()));
    let third = run(&repo, dir.path(), Level::Differential)
        .await
        .expect("differential");
    assert_eq!(third.level, "differential");
    assert_eq!(third.parent.as_deref(), Some(first.snapshot_id.as_str()));
    let fourth = run(&repo, dir.path(), Level::Full).await.expect("full");
    assert_eq!(
        (fourth.level.as_str(), fourth.parent.as_deref()),
        ("full", None)
    );

    let snapshots = repo.snapshots(Some("chat")).await.expect("list");
    assert_eq!(snapshots.len(), 4);
    assert_eq!(
        snapshots
            .iter()
            .map(|s| s.kind.as_str())
            .collect::<Vec<_>>(),
        ["full", "incremental", "differential", "full"]
    );
    assert!(
        snapshots
            .iter()
            .all(|s| s.committed_unix_ms > 0 && s.time_ms() == s.committed_unix_ms)
    );
    let commits = node.store().commits.clone();
    assert_eq!(commits.len(), 4);
    let mut sessions = BTreeSet::new();
    for (commit, snapshot) in commits.iter().zip(&snapshots) {
        assert_eq!(commit.gc_epoch, 7, "the epoch read at the start");
        assert_eq!(commit.session.len(), 16);
        assert!(
            sessions.insert(commit.session.clone()),
            "a fresh session per backup"
        );
        let expected = expected_refs(&repo, &snapshot.root_tree).await;
        assert!(expected.contains(&snapshot.root_tree));
        assert_eq!(
            committed_refs(&node, commit),
            expected,
            "snapshot {}",
            snapshot.short_id()
        );
    }
    // Every pack went up in a backup's session, and segments travel in
    // packs of their own.
    let store = node.store();
    let segment_ids: BTreeSet<Vec<u8>> = commits
        .iter()
        .flat_map(|c| c.refs.iter().map(|s| s.blob.clone()))
        .collect();
    for (session, blobs) in &store.uploads {
        assert!(
            sessions.contains(session),
            "pack uploaded outside any session"
        );
        let segments = blobs.iter().filter(|b| segment_ids.contains(*b)).count();
        assert!(
            segments == 0 || segments == blobs.len(),
            "segments mixed with other blobs"
        );
    }
}

#[tokio::test]
async fn blobs_collected_during_a_backup_make_it_rerun_once_as_full() {
    let node = FakeNode::default();
    let repo = repo(&node).await;
    let dir = source();
    run(&repo, dir.path(), Level::Incremental)
        .await
        .expect("first backup");

    node.store().abort_commits = 1;
    let summary = run(&repo, dir.path(), Level::Incremental)
        .await
        .expect("rerun commits");
    assert_eq!(summary.level, "full");
    assert!(summary.parent.is_none());
    let note = summary.note.expect("a note");
    assert!(note.contains("rerun as a full backup"), "{note}");
    let commits = node.store().commits.clone();
    assert_eq!(commits.len(), 3);
    assert_ne!(commits[1].session, commits[2].session, "a fresh session");
    assert_eq!(
        (commits[1].gc_epoch, commits[2].gc_epoch),
        (0, 1),
        "a fresh epoch"
    );
    // The sweep emptied the index: the rerun uploaded every blob again.
    let snapshot = repo
        .find_snapshot(&summary.snapshot_id, None)
        .await
        .expect("committed");
    let expected = expected_refs(&repo, &snapshot.root_tree).await;
    assert_eq!(committed_refs(&node, &commits[2]), expected);

    node.store().abort_commits = 2;
    let error = run(&repo, dir.path(), Level::Incremental)
        .await
        .expect_err("aborted twice");
    assert!(
        matches!(error, ClientError::CollectedDuringBackup { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("during the full rerun"),
        "{error}"
    );
    assert_eq!(node.store().commits.len(), 5, "one rerun, no more");
}

#[tokio::test]
async fn small_files_share_index_look_ups_and_deduplicate() {
    let node = FakeNode::default();
    let repo = repo(&node).await;
    let dir = tempfile::tempdir().expect("temp dir");
    for d in 0..10 {
        let sub = dir.path().join(format!("room={d}"));
        std::fs::create_dir(&sub).expect("dir");
        for f in 0..300 {
            let line = format!(
                "{{\"room\":{d},\"file\":{f},\"text\":\"gg {}\"}}\n",
                d * 1000 + f
            );
            std::fs::write(sub.join(format!("{f:03}.jsonl")), line.repeat(1 + f % 7))
                .expect("file");
        }
    }
    let first = run(&repo, dir.path(), Level::Full).await.expect("backup");
    assert_eq!(first.files, 3_000);
    // 3,000 new chunks and 12 trees: a handful of look-ups, not one a file.
    let lookups = node.store().lookups;
    assert!(
        lookups <= 8,
        "{lookups} index look-ups for 3,000 small files"
    );
    let uploaded: usize = node.store().uploads.iter().map(|(_, ids)| ids.len()).sum();
    assert!(
        uploaded > 3_000,
        "every file's chunk uploaded: {uploaded} blobs"
    );

    // Everything is in the index now: a full backup of the same tree
    // uploads nothing.
    let before = node.store().uploads.len();
    let second = run(&repo, dir.path(), Level::Full).await.expect("again");
    assert_eq!(second.bytes_added, 0);
    assert_eq!(node.store().uploads.len(), before, "nothing uploaded twice");
}

#[tokio::test]
async fn grouped_small_files_keep_every_entry_and_reuse_unchanged_ones() {
    let node = FakeNode::default();
    let repo = repo(&node).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // More small files than one group holds, beside a file streamed on its
    // own (over the read-whole limit) and a subdirectory.
    for f in 0..150 {
        std::fs::write(
            dir.path().join(format!("{f:03}.log")),
            format!("line {f}\n").repeat(1 + f % 5),
        )
        .expect("small file");
    }
    let big: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(dir.path().join("big.bin"), &big).expect("big file");
    std::fs::create_dir(dir.path().join("sub")).expect("dir");
    std::fs::write(dir.path().join("sub/inner.log"), b"inner").expect("inner");

    let first = run(&repo, dir.path(), Level::Incremental)
        .await
        .expect("full");
    assert_eq!(first.files, 152);
    // One small file changes size: it is read again. Another changes its
    // bytes but keeps size and mtime: it is reused unread, as in restic.
    std::fs::write(dir.path().join("007.log"), b"edited\n").expect("edit");
    let same = dir.path().join("042.log");
    let mtime = std::fs::metadata(&same)
        .and_then(|m| m.modified())
        .expect("mtime");
    let bytes = std::fs::read(&same).expect("read");
    std::fs::write(&same, bytes.to_ascii_uppercase()).expect("rewrite");
    std::fs::File::options()
        .write(true)
        .open(&same)
        .and_then(|f| f.set_modified(mtime))
        .expect("keep mtime");
    let second = run(&repo, dir.path(), Level::Incremental)
        .await
        .expect("incremental");
    assert_eq!(second.level, "incremental");
    assert_eq!(second.files, 152);

    let snapshots = repo.snapshots(Some("chat")).await.expect("list");
    let entries = |root| {
        let repo = repo.clone();
        async move {
            let trees = repo.load_trees(&root, &[]).await.expect("trees");
            let top = &trees[&root].entries;
            assert_eq!(top.len(), 1, "the source directory");
            let EntryKind::Dir { subtree } = &top[0].kind else {
                panic!("a directory")
            };
            trees[subtree].entries.clone()
        }
    };
    let before = entries(snapshots[0].root_tree).await;
    let after = entries(snapshots[1].root_tree).await;
    let names: Vec<String> = after
        .iter()
        .map(|e| String::from_utf8_lossy(&e.name).into_owned())
        .collect();
    let mut expected: Vec<String> = (0..150).map(|f| format!("{f:03}.log")).collect();
    expected.extend(["big.bin".to_string(), "sub".to_string()]);
    expected.sort();
    assert_eq!(names, expected, "every entry, sorted by name");
    for (old, new) in before.iter().zip(&after) {
        let (
            EntryKind::File {
                size: old_size,
                chunks: old_chunks,
                ..
            },
            EntryKind::File { size, chunks, .. },
        ) = (&old.kind, &new.kind)
        else {
            continue;
        };
        let path = dir.path().join(String::from_utf8_lossy(&new.name).as_ref());
        assert_eq!(
            *size,
            std::fs::metadata(&path).expect("stat").len(),
            "{path:?}"
        );
        if new.name == b"007.log" {
            assert_ne!(chunks, old_chunks, "the edited file is read again");
        } else {
            // 042.log too: same size and mtime, so not read.
            assert_eq!((size, chunks), (old_size, old_chunks), "{path:?} reused");
        }
    }
}
