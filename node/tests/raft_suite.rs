//! openraft's storage conformance suite on the metadata log store and state
//! machine, over sled (the real engine) and the in-memory engine, plus the
//! state machine's own guarantees: snapshots carry the whole state, and a
//! reopened store resumes exactly where it was.
//!
//! The suite makes its own runtime per case, so these are plain `#[test]`s.

use std::io::Cursor;
use std::sync::Arc;

use cairn_node::kv::{KvStore, MemKv, SledDb};
use cairn_node::meta::log_store::LogStore;
use cairn_node::meta::state::StateView;
use cairn_node::meta::state_machine::StateMachineStore;
use cairn_node::meta::types::{
    BlobLocation, Command, CommandResult, NodeId, PackRecord, TypeConfig,
};
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError};
use tempfile::TempDir;

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, sm) = open_sled(&dir);
        Ok((dir, log, sm))
    }
}

struct MemBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, ()> for MemBuilder {
    async fn build(&self) -> Result<((), LogStore, StateMachineStore), StorageError<NodeId>> {
        let log = LogStore::open(Arc::new(MemKv::new())).expect("log store");
        let view = StateView::open(Arc::new(MemKv::new())).expect("state");
        Ok(((), log, StateMachineStore::new(view)))
    }
}

fn open_sled(dir: &TempDir) -> (LogStore, StateMachineStore) {
    let db = SledDb::open(dir.path()).expect("open sled");
    let log = LogStore::open(Arc::new(db.tree("raft_log").expect("tree"))).expect("log store");
    let view = StateView::open(Arc::new(db.tree("raft_state").expect("tree"))).expect("state");
    (log, StateMachineStore::new(view))
}

#[test]
fn openraft_suite_passes_on_sled() {
    Suite::test_all(SledBuilder).expect("openraft storage suite on sled");
}

#[test]
fn openraft_suite_passes_in_memory() {
    Suite::test_all(MemBuilder).expect("openraft storage suite in memory");
}

fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    }
}

fn add_pack(n: u8) -> Command {
    Command::AddPack {
        pack: PackRecord {
            id: [n; 32],
            tenant: "tenant".into(),
            data_shards: 4,
            parity_shards: 2,
            pack_len: 10,
            shard_len: 3,
            shards: vec![],
            needs_rebalance: n.is_multiple_of(2),
        },
        blobs: vec![(
            [n.wrapping_add(100); 32],
            BlobLocation {
                pack_id: [n; 32],
                offset: 0,
                length: 10,
            },
        )],
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn snapshot_carries_the_whole_state_to_another_node() {
    runtime().block_on(async {
        let dir_a = tempfile::tempdir().expect("tempdir");
        let dir_b = tempfile::tempdir().expect("tempdir");
        let (log_a, mut sm_a) = open_sled(&dir_a);
        let (log_b, mut sm_b) = open_sled(&dir_b);
        let results = sm_a
            .apply(
                (1..=6)
                    .map(|i| entry(i, add_pack(i as u8)))
                    .chain([entry(7, add_pack(1))]),
            )
            .await
            .expect("apply");
        assert_eq!(results.len(), 7, "one result per entry");
        assert_eq!(results[6], CommandResult::AlreadyExists);

        // B had its own (diverging) state: the install must replace it, not merge.
        sm_b.apply([entry(1, add_pack(99))]).await.expect("apply");

        let snapshot = sm_a
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        assert_eq!(snapshot.meta.last_log_id.map(|id| id.index), Some(7));
        let mut receiving = sm_b.begin_receiving_snapshot().await.expect("begin");
        *receiving = Cursor::new(snapshot.snapshot.into_inner());
        sm_b.install_snapshot(&snapshot.meta, receiving)
            .await
            .expect("install");

        assert_eq!(
            sm_b.applied_state().await.expect("state").0,
            snapshot.meta.last_log_id
        );
        drop((log_a, sm_a, log_b, sm_b)); // release the sled files
        let view_a = reopen_view(&dir_a);
        let view_b = reopen_view(&dir_b);
        assert_eq!(
            view_b.packs().expect("packs"),
            view_a.packs().expect("packs")
        );
        assert_eq!(
            view_b.stats().expect("stats"),
            view_a.stats().expect("stats")
        );
        assert_eq!(view_b.stats().expect("stats").packs, 6);
        assert_eq!(
            view_b.pack(&[99; 32]).expect("read"),
            None,
            "old state replaced"
        );
        assert_eq!(
            view_b.locate_blob("tenant", &[103; 32]).expect("read"),
            view_a.locate_blob("tenant", &[103; 32]).expect("read")
        );
    });
}

fn reopen_view(dir: &TempDir) -> StateView {
    let db = SledDb::open(dir.path()).expect("reopen sled");
    StateView::open(Arc::new(db.tree("raft_state").expect("tree"))).expect("state")
}

#[test]
fn reopened_state_machine_resumes_from_what_it_applied() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (_log, mut sm) = open_sled(&dir);
            sm.apply((1..=3).map(|i| entry(i, add_pack(i as u8))))
                .await
                .expect("apply");
            let built = sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("build");
            sm.apply([entry(4, add_pack(4))]).await.expect("apply");
            assert_eq!(built.meta.last_log_id.map(|id| id.index), Some(3));
        }
        let (_log, mut sm) = open_sled(&dir);
        let (applied, _) = sm.applied_state().await.expect("state");
        assert_eq!(applied.map(|id| id.index), Some(4), "apply is durable");
        let current = sm
            .get_current_snapshot()
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(current.meta.last_log_id.map(|id| id.index), Some(3));
        // The snapshot image is the state as of its own last log id.
        let pairs_len = {
            let kv = Arc::new(MemKv::new());
            let view = StateView::open(kv.clone()).expect("state");
            let image = cairn_node::meta::state::SnapshotImage::decode(current.snapshot.get_ref())
                .expect("image");
            for (k, v) in image.pairs {
                kv.put(&k, &v).expect("put");
            }
            view.stats().expect("stats").packs
        };
        assert_eq!(pairs_len, 3);
    });
}
