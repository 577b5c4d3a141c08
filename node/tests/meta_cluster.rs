//! The metadata group as a real cluster: several `Meta`s in this process, each
//! behind its own gRPC server on `127.0.0.1:0`, in three regions: replication,
//! failover, restarts, snapshots, membership changes and the wiped-disk trap.
//! Every wait is a `wait_until`: a condition with a deadline and a reason;
//! nothing sleeps for a fixed time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_node::local_cluster::wait_until;
use cairn_node::meta::admission::Admission;
use cairn_node::meta::membership::ChangeError;
use cairn_node::meta::types::{
    BlobLocation, Command, CommandResult, NodeId, NodeInfo, PackRecord, ShardPlacement,
};
use cairn_node::meta::{Meta, MetaConfig, MetaError};
use cairn_node::model::NodeView;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

/// Longest any single condition in these tests may take to become true.
const WAIT: Duration = Duration::from_secs(15);
/// How often a check that must keep holding for a while looks again (all
/// in memory, cheap). Waits for a condition use [`wait_until`] instead.
const RECHECK: Duration = Duration::from_millis(10);

struct Node {
    meta: Meta,
    stop_server: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
}

struct Cluster {
    root: tempfile::TempDir,
    map: BTreeMap<NodeId, NodeInfo>,
    config: MetaConfig,
    nodes: BTreeMap<NodeId, Node>,
    /// Listeners of nodes in the map that are not running and never served
    /// (or whose open was refused): holding them keeps their ports ours.
    spare: BTreeMap<NodeId, TcpListener>,
}

impl Cluster {
    /// Binds one listener per node first (so addresses are known), then
    /// opens every node at once with the same initial cluster, as nodes
    /// started together do.
    async fn start(regions: &[(&str, &[NodeId])], config: MetaConfig) -> Cluster {
        let all: Vec<NodeId> = regions
            .iter()
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        Self::start_some(regions, config, &all).await
    }

    /// Like [`Cluster::start`], but only the nodes in `running` are started;
    /// the others are in the initial cluster and start later (or never).
    async fn start_some(
        regions: &[(&str, &[NodeId])],
        config: MetaConfig,
        running: &[NodeId],
    ) -> Cluster {
        let mut listeners = Vec::new();
        let mut map = BTreeMap::new();
        for (region, ids) in regions {
            for id in *ids {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("local addr");
                map.insert(
                    *id,
                    NodeInfo {
                        region: region.to_string(),
                        addr: addr.to_string(),
                    },
                );
                listeners.push((*id, listener));
            }
        }
        let (listeners, spare): (Vec<_>, Vec<_>) = listeners
            .into_iter()
            .partition(|(id, _)| running.contains(id));
        let mut cluster = Cluster {
            root: tempfile::tempdir().expect("tempdir"),
            map,
            config,
            nodes: BTreeMap::new(),
            spare: spare.into_iter().collect(),
        };
        cluster.open_together(listeners).await;
        cluster
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    async fn open_meta(&self, id: NodeId) -> Result<Meta, MetaError> {
        Meta::open(id, &self.dir(id), self.map.clone(), self.config.clone()).await
    }

    /// Opens every given node concurrently, then serves each.
    async fn open_together(&mut self, listeners: Vec<(NodeId, TcpListener)>) {
        let opened =
            futures::future::join_all(listeners.iter().map(|(id, _)| self.open_meta(*id))).await;
        for ((id, listener), meta) in listeners.into_iter().zip(opened) {
            self.serve(id, meta.expect("open meta"), listener);
        }
    }

    fn serve(&mut self, id: NodeId, meta: Meta, listener: TcpListener) {
        let (stop_server, stopped) = oneshot::channel::<()>();
        let service = meta.raft_service();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                }),
        );
        self.nodes.insert(
            id,
            Node {
                meta,
                stop_server,
                server,
            },
        );
    }

    /// Stops a node's server and its metadata group, releasing its files.
    async fn stop(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).expect("node is running");
        let _ = node.stop_server.send(());
        node.server.await.expect("server task").expect("server");
        node.meta.shutdown().await.expect("meta shutdown");
    }

    /// The listener of a node's own address: its spare one, or the address
    /// bound again after the node stopped. The kernel may briefly hand a
    /// freed port to an outgoing connection, so binding is retried.
    async fn bind(&mut self, id: NodeId) -> TcpListener {
        if let Some(listener) = self.spare.remove(&id) {
            return listener;
        }
        let addr: SocketAddr = self.map[&id].addr.parse().expect("addr");
        wait_until(
            &format!("node {id}'s address {addr} to be free to bind again"),
            WAIT,
            || async move {
                match TcpListener::bind(addr).await {
                    Ok(listener) => Ok(listener),
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e.to_string()),
                    Err(e) => panic!("rebind node {id}'s address {addr}: {e}"),
                }
            },
        )
        .await
    }

    /// Reopens a stopped node from its directory, on its old address.
    async fn restart(&mut self, id: NodeId) {
        self.try_restart(id).await.expect("restart");
    }

    /// Like [`Cluster::restart`], returning `Meta::open`'s refusal instead of panicking.
    async fn try_restart(&mut self, id: NodeId) -> Result<(), MetaError> {
        let listener = self.bind(id).await;
        match self.open_meta(id).await {
            Ok(meta) => {
                self.serve(id, meta, listener);
                Ok(())
            }
            Err(e) => {
                self.spare.insert(id, listener);
                Err(e)
            }
        }
    }

    /// Deletes a stopped node's whole data directory (a wiped or replaced disk).
    fn wipe(&self, id: NodeId) {
        assert!(!self.nodes.contains_key(&id), "wipe only a stopped node");
        std::fs::remove_dir_all(self.dir(id)).expect("wipe the node's directory");
    }

    /// Puts a node that is not part of the cluster yet into the map, on a
    /// fresh loopback port; returns its listener.
    async fn add_to_map(&mut self, id: NodeId, region: &str) -> TcpListener {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        self.map.insert(
            id,
            NodeInfo {
                region: region.into(),
                addr: addr.to_string(),
            },
        );
        listener
    }

    fn meta(&self, id: NodeId) -> &Meta {
        &self.nodes[&id].meta
    }

    /// Waits until every running node agrees on one running leader, and
    /// returns it. On timeout, panics with every node's metrics.
    async fn leader(&self) -> NodeId {
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        self.leader_of(&all).await
    }

    /// Like [`Cluster::leader`], among the running nodes `ids` only.
    async fn leader_of(&self, ids: &[NodeId]) -> NodeId {
        wait_until(
            &format!("nodes {ids:?} to agree on one running leader"),
            WAIT,
            || async {
                let leaders: BTreeSet<Option<NodeId>> = ids
                    .iter()
                    .map(|id| self.meta(*id).raft().metrics().borrow().current_leader)
                    .collect();
                if let [Some(leader)] = leaders.iter().copied().collect::<Vec<_>>()[..]
                    && self.nodes.contains_key(&leader)
                {
                    return Ok(leader);
                }
                let dump: Vec<String> = self
                    .nodes
                    .values()
                    .map(|n| n.meta.raft().metrics().borrow().to_string())
                    .collect();
                Err(format!(
                    "leaders seen {leaders:?}; metrics:\n{}",
                    dump.join("\n")
                ))
            },
        )
        .await
    }

    /// Waits until every running node has applied at least `index`.
    async fn all_applied(&self, index: u64) {
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        self.applied_on(&all, index).await;
    }

    /// Waits until the running nodes `ids` have applied at least `index`.
    async fn applied_on(&self, ids: &[NodeId], index: u64) {
        for id in ids {
            self.meta(*id)
                .raft()
                .wait(Some(WAIT))
                .applied_index_at_least(Some(index), format!("node {id} applies {index}"))
                .await
                .expect("node catches up");
        }
    }

    async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

fn pack(n: u8) -> Command {
    let id = [n; 32];
    Command::AddPack {
        pack: PackRecord {
            id,
            tenant: "acme".into(),
            data_shards: 4,
            parity_shards: 2,
            pack_len: 1000,
            shard_len: 250,
            shards: (0..6)
                .map(|index| ShardPlacement {
                    index,
                    node: u64::from(index) + 1,
                    checksum: [index as u8; 32],
                })
                .collect(),
            needs_rebalance: false,
        },
        blobs: vec![(
            [n.wrapping_add(128); 32],
            BlobLocation {
                pack_id: id,
                offset: 0,
                length: 1000,
            },
        )],
    }
}

fn init_tenant(tenant: &str) -> Command {
    Command::InitTenant {
        tenant: tenant.into(),
        key_slot: format!("sealed master key of {tenant}").into_bytes(),
    }
}

fn assert_no_region_majority(members: &BTreeMap<NodeId, NodeView>) {
    let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
    let mut voters = 0;
    for node in members.values() {
        if node.voter {
            voters += 1;
            *per_region.entry(node.region.as_str()).or_default() += 1;
        }
    }
    assert!(voters > 0);
    for (region, count) in per_region {
        assert!(
            count <= voters / 2,
            "region {region} holds {count} of {voters} voters"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_region_cluster_replicates_fails_over_and_restarts() {
    let mut cluster = Cluster::start(
        &[("r1", &[1, 2]), ("r2", &[3, 4]), ("r3", &[5, 6])],
        MetaConfig::default(),
    )
    .await;
    let leader = cluster.leader().await;

    // Every initial node becomes a member; voters are 2/2/1 and node 6 learns.
    for (id, node) in &cluster.nodes {
        node.meta
            .raft()
            .wait(Some(WAIT))
            .metrics(
                |m| m.membership_config.membership().nodes().count() == 6,
                format!("node {id} sees all six members"),
            )
            .await
            .expect("learners are added");
    }
    let members = cluster.meta(leader).node_views();
    assert_eq!(voters_of(&members), [1, 2, 3, 4, 5].into_iter().collect());
    assert!(!members[&6].voter, "node 6 is a learner");
    assert_eq!(
        members[&3].info(),
        cluster.map[&3],
        "members carry region and address"
    );
    assert_no_region_majority(&members);

    // A write proposed on a follower is forwarded, and applied everywhere.
    let follower = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    let writer = cluster.meta(follower);
    assert_eq!(
        writer.write(init_tenant("acme")).await.expect("write"),
        CommandResult::Ok
    );
    assert_eq!(
        writer.key_slots("acme").expect("read own write"),
        vec![b"sealed master key of acme".to_vec()]
    );
    cluster.all_applied(writer.last_applied()).await;
    for node in cluster.nodes.values() {
        assert_eq!(node.meta.stats().expect("stats").tenants, 1);
    }
    // A second init of the same tenant, from the learner this time, is refused.
    assert_eq!(
        cluster
            .meta(6)
            .write(init_tenant("acme"))
            .await
            .expect("write"),
        CommandResult::AlreadyExists
    );

    // read_barrier on a follower sees a write the leader just committed.
    let reader = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader && **id != follower)
        .expect("another follower");
    assert_eq!(
        cluster.meta(leader).write(pack(1)).await.expect("write"),
        CommandResult::Ok
    );
    cluster
        .meta(reader)
        .read_barrier()
        .await
        .expect("read barrier");
    assert!(cluster.meta(reader).pack(&[1; 32]).expect("read").is_some());
    cluster
        .meta(leader)
        .read_barrier()
        .await
        .expect("read barrier on the leader");

    // The leader goes away: a new one is elected and writes go on.
    let old_term = cluster.meta(leader).term();
    cluster.stop(leader).await;
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    assert!(cluster.meta(new_leader).term() > old_term);
    let writer = *cluster
        .nodes
        .keys()
        .find(|id| **id != new_leader)
        .expect("a follower");
    assert_eq!(
        cluster
            .meta(writer)
            .write(pack(2))
            .await
            .expect("write after failover"),
        CommandResult::Ok
    );
    assert_eq!(
        cluster
            .meta(writer)
            .write(init_tenant("globex"))
            .await
            .expect("write"),
        CommandResult::Ok
    );

    // The old leader restarts from its directory: it keeps what it had and catches up.
    cluster.restart(leader).await;
    let restarted = cluster.meta(leader);
    assert_eq!(
        restarted.key_slots("acme").expect("read").len(),
        1,
        "state survives restart"
    );
    assert!(restarted.pack(&[1; 32]).expect("read").is_some());
    cluster
        .all_applied(cluster.meta(writer).last_applied())
        .await;
    let restarted = cluster.meta(leader);
    assert!(
        restarted.pack(&[2; 32]).expect("read").is_some(),
        "caught up"
    );
    assert_eq!(
        restarted.stats().expect("stats"),
        cluster.meta(writer).stats().expect("stats")
    );
    assert_eq!(
        cluster.leader().await,
        new_leader,
        "a returning node does not disrupt the leader"
    );

    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_survives_snapshot_purge_and_restart() {
    let config = MetaConfig {
        snapshot_every_logs: 5,
        ..MetaConfig::default()
    };
    // Voters 1/2/3 (one per region), node 4 a learner.
    let mut cluster = Cluster::start(&[("r1", &[1]), ("r2", &[2]), ("r3", &[3, 4])], config).await;
    let leader = cluster.leader().await;
    cluster
        .meta(4)
        .raft()
        .wait(Some(WAIT))
        .metrics(
            |m| m.membership_config.membership().get_node(&4).is_some(),
            "node 4 is a member",
        )
        .await
        .expect("learner added");
    let lagging = 4;
    cluster.stop(lagging).await;

    for n in 0..30 {
        assert_eq!(
            cluster.meta(leader).write(pack(n)).await.expect("write"),
            CommandResult::Ok
        );
    }
    let last = cluster.meta(leader).last_applied();
    // Snapshots are built and the log behind them purged, on every running node.
    for (id, node) in &cluster.nodes {
        node.meta
            .raft()
            .wait(Some(WAIT))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index + 10 >= last) && m.purged.is_some(),
                format!("node {id} snapshots and purges"),
            )
            .await
            .expect("snapshot and purge");
    }

    // The node that was away is behind the purge point: it must get a snapshot.
    cluster.restart(lagging).await;
    cluster.all_applied(last).await;
    let caught_up = cluster.meta(lagging);
    assert_eq!(caught_up.stats().expect("stats").packs, 30);
    assert_eq!(
        caught_up.packs().expect("packs"),
        cluster.meta(leader).packs().expect("packs")
    );
    assert!(
        caught_up.raft().metrics().borrow().snapshot.is_some(),
        "the lagging node caught up through a snapshot"
    );

    // A follower whose own log is purged restarts with its state in place.
    let follower = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader && **id != lagging)
        .expect("a voting follower");
    let before = cluster.meta(follower).stats().expect("stats");
    cluster.stop(follower).await;
    cluster.restart(follower).await;
    assert_eq!(
        cluster.meta(follower).stats().expect("stats"),
        before,
        "state persisted"
    );
    assert_eq!(
        cluster
            .meta(follower)
            .write(pack(200))
            .await
            .expect("write after restart"),
        CommandResult::Ok
    );
    assert_eq!(cluster.meta(follower).stats().expect("stats").packs, 31);

    // The leader too: a whole-cluster restart resumes from disk.
    let ids: Vec<NodeId> = cluster.nodes.keys().copied().collect();
    for id in &ids {
        cluster.stop(*id).await;
    }
    for id in &ids {
        cluster.restart(*id).await;
    }
    let leader = cluster.leader().await;
    assert_eq!(cluster.meta(leader).stats().expect("stats").packs, 31);
    assert_eq!(
        cluster.meta(leader).write(pack(201)).await.expect("write"),
        CommandResult::Ok
    );
    cluster
        .all_applied(cluster.meta(leader).last_applied())
        .await;
    for node in cluster.nodes.values() {
        assert_eq!(node.meta.stats().expect("stats").packs, 32);
    }
    cluster.shutdown().await;
}

/// Regression: openraft answers a write once the state machine applied it but
/// before its metrics say so; `write` must cover both, or a caller that
/// waits for "everyone applied `last_applied()`" waits for too little.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_write_is_in_last_applied() {
    let cluster = Cluster::start(
        &[("r1", &[1]), ("r2", &[2]), ("r3", &[3])],
        MetaConfig::default(),
    )
    .await;
    let leader = cluster.leader().await;
    let follower = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    for (n, writer) in (0..40u8).zip([leader, follower].into_iter().cycle()) {
        let meta = cluster.meta(writer);
        let before = meta.last_applied();
        assert_eq!(meta.write(pack(n)).await.expect("write"), CommandResult::Ok);
        let packs = meta.stats().expect("stats").packs;
        assert_eq!(packs, u64::from(n) + 1, "node {writer} reads its own write");
        assert!(
            meta.last_applied() > before,
            "node {writer}: write {n} returned but last_applied is still {before}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_node_is_refused() {
    let cluster = Cluster::start(
        &[("r1", &[1]), ("r2", &[2]), ("r3", &[3])],
        MetaConfig::default(),
    )
    .await;
    cluster.leader().await;
    // Node 2's address, but the request names node 7.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.map[&2].addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
    let mut client = cairn_proto::v1::raft_client::RaftClient::new(channel);
    let mut request = tonic::Request::new(cairn_proto::v1::RaftPayload { data: vec![1] });
    request
        .metadata_mut()
        .insert(cairn_node::meta::network::NODE_ID_HEADER, 7u64.into());
    let status = client.read_index(request).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    // Without the header, too.
    let status = client
        .vote(tonic::Request::new(cairn_proto::v1::RaftPayload {
            data: vec![1],
        }))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_node_outside_the_initial_cluster_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let map: BTreeMap<NodeId, NodeInfo> = [(1, NodeInfo::default())].into_iter().collect();
    let err = Meta::open(
        9,
        Path::new(&dir.path().join("m")),
        map,
        MetaConfig::default(),
    )
    .await
    .err()
    .expect("refused");
    assert!(matches!(
        err,
        cairn_node::meta::MetaError::NotInCluster { node_id: 9 }
    ));
}

fn voters_of(members: &BTreeMap<NodeId, NodeView>) -> BTreeSet<NodeId> {
    members
        .values()
        .filter(|node| node.voter)
        .map(|node| node.id)
        .collect()
}

/// Waits until node `on` knows that every node of `ids` holds the log (the
/// leader's keeper records it): from then on, wiping one of them is detected.
async fn wait_log_holders(cluster: &Cluster, on: NodeId, ids: &[NodeId]) {
    let meta = cluster.meta(on);
    wait_until(
        &format!("node {on} to record {ids:?} as holding the log"),
        WAIT,
        || async {
            let marks = meta.node_marks().expect("marks");
            let missing: Vec<NodeId> = ids
                .iter()
                .copied()
                .filter(|id| !marks.get(id).is_some_and(|m| m.holds_log))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet recorded as holding it: {missing:?}"))
            }
        },
    )
    .await;
}

/// Writes `packs`, then waits until every running node has applied them.
async fn write_packs(cluster: &Cluster, via: NodeId, packs: std::ops::Range<u8>) {
    for n in packs {
        assert_eq!(
            cluster.meta(via).write(pack(n)).await.expect("write"),
            CommandResult::Ok
        );
    }
    cluster.all_applied(cluster.meta(via).last_applied()).await;
}

const SIX: &[(&str, &[NodeId])] = &[("r1", &[1, 2]), ("r2", &[3, 4]), ("r3", &[5, 6])];

/// Waits until all six initial nodes are members on every running node.
async fn wait_six_members(cluster: &Cluster) {
    for (id, node) in &cluster.nodes {
        node.meta
            .raft()
            .wait(Some(WAIT))
            .metrics(
                |m| m.membership_config.membership().nodes().count() >= 6,
                format!("node {id} sees the six initial members"),
            )
            .await
            .expect("initial learners are added");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seventh_node_joins_as_a_learner_and_catches_up() {
    let mut cluster = Cluster::start(SIX, MetaConfig::default()).await;
    let leader = cluster.leader().await;
    wait_six_members(&cluster).await;
    write_packs(&cluster, leader, 0..10).await;

    // Node 7 (r2) lists the running nodes and itself; it starts empty while
    // an operator adds it through another node, both at once.
    let listener = cluster.add_to_map(7, "r2").await;
    let info = cluster.map[&7].clone();
    let follower = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    let adder = cluster.meta(follower).clone();
    let added = tokio::spawn({
        let info = info.clone();
        async move { adder.add_node(7, info).await }
    });
    let opened = cluster.open_meta(7).await.expect("node 7 opens");
    cluster.serve(7, opened, listener);
    added.await.expect("add task").expect("add node 7");
    assert_eq!(cluster.meta(7).admission(), Admission::Admitted);

    // A learner on every node; voters unchanged (still 2/2/1) and spread.
    for (id, node) in &cluster.nodes {
        node.meta
            .raft()
            .wait(Some(WAIT))
            .metrics(
                |m| m.membership_config.membership().get_node(&7).is_some(),
                format!("node {id} sees node 7"),
            )
            .await
            .expect("node 7 is a member everywhere");
    }
    let members = cluster.meta(follower).node_views();
    assert_eq!(
        members[&7],
        NodeView::member(7, &info, false),
        "node 7 is a learner"
    );
    assert_eq!(voters_of(&members), [1, 2, 3, 4, 5].into_iter().collect());
    assert_no_region_majority(&members);

    // It catches up: the latest entry and every pack are on it.
    write_packs(&cluster, follower, 10..12).await;
    assert_eq!(
        cluster.meta(7).packs().expect("packs"),
        cluster.meta(leader).packs().expect("packs")
    );
    assert_eq!(cluster.meta(7).stats().expect("stats").packs, 12);

    // Idempotent; another address for the same id is refused.
    cluster
        .meta(7)
        .add_node(7, info.clone())
        .await
        .expect("adding a member again is a no-op");
    let moved = NodeInfo {
        region: "r3".into(),
        addr: info.addr.clone(),
    };
    let err = cluster
        .meta(leader)
        .add_node(7, moved)
        .await
        .expect_err("a different region is refused");
    assert!(
        matches!(
            err,
            MetaError::Change(ChangeError::AddressConflict { node: 7, .. })
        ),
        "{err}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_voter_rechooses_spread_voters() {
    let mut cluster = Cluster::start(SIX, MetaConfig::default()).await;
    let leader = cluster.leader().await;
    wait_six_members(&cluster).await;
    write_packs(&cluster, leader, 0..5).await;

    // Remove a voter that is not the leader, from another region than the
    // leader's (the leader goes next: three regions must remain), through
    // another follower.
    let region = |id: NodeId| cluster.map[&id].region.clone();
    let victim = *[3, 4, 1, 2]
        .iter()
        .find(|id| **id != leader && region(**id) != region(leader))
        .expect("a voter outside the leader's region");
    let via = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader && **id != victim)
        .expect("another node");
    cluster.meta(via).remove_node(victim).await.expect("remove");
    cluster.stop(victim).await;

    // Five voters again (the learner of r3 is promoted), 2/1/2, no majority.
    let members = cluster.meta(via).node_views();
    assert!(!members.contains_key(&victim));
    assert_eq!(voters_of(&members).len(), 5);
    assert!(
        voters_of(&members).contains(&6),
        "the caught-up learner votes"
    );
    assert_no_region_majority(&members);
    for (id, node) in &cluster.nodes {
        wait_until(
            &format!("node {id} to no longer list node {victim}"),
            WAIT,
            || async {
                if node.meta.is_member(victim) {
                    Err(format!("node {victim} is still a member"))
                } else {
                    Ok(())
                }
            },
        )
        .await;
    }
    assert!(
        cluster.meta(leader).node_marks().expect("marks")[&victim].removed,
        "removed on purpose"
    );

    // Writes go on, and removing again changes nothing.
    write_packs(&cluster, via, 5..8).await;
    cluster
        .meta(leader)
        .remove_node(victim)
        .await
        .expect("idempotent");
    assert_eq!(cluster.meta(via).node_views(), members);

    // The leader itself can be removed: it hands over, and the change
    // completes on the next leader.
    cluster
        .meta(via)
        .remove_node(leader)
        .await
        .expect("remove the leader");
    cluster.stop(leader).await;
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    let members = cluster.meta(new_leader).node_views();
    assert!(!members.contains_key(&leader) && !members.contains_key(&victim));
    assert_eq!(
        voters_of(&members).len(),
        3,
        "four members left: three voters"
    );
    assert_no_region_majority(&members);
    write_packs(&cluster, new_leader, 8..10).await;

    // The new leader's keeper (fresh attempts) does not add the removed
    // initial nodes back: give it ten rounds, one per heartbeat, to err.
    let heartbeat = Duration::from_millis(cluster.config.heartbeat_ms);
    let until = tokio::time::Instant::now() + heartbeat * 10;
    while tokio::time::Instant::now() < until {
        for gone in [victim, leader] {
            assert!(
                !cluster.meta(new_leader).is_member(gone),
                "node {gone} was re-added"
            );
        }
        // Not a wait: the check must keep holding for the whole window, so
        // it is repeated at a steady pace until the window ends.
        tokio::time::sleep(RECHECK).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_voter_is_refused_then_rejoins_after_removal() {
    let mut cluster = Cluster::start(SIX, MetaConfig::default()).await;
    let leader = cluster.leader().await;
    wait_six_members(&cluster).await;
    assert_eq!(
        cluster
            .meta(leader)
            .write(init_tenant("acme"))
            .await
            .expect("write"),
        CommandResult::Ok
    );
    write_packs(&cluster, leader, 0..20).await;
    let victim = *[1, 2, 3, 4, 5]
        .iter()
        .find(|id| **id != leader)
        .expect("a voter that does not lead");
    wait_log_holders(&cluster, leader, &[victim]).await;

    // The disk is replaced: the node comes back empty under its old id.
    cluster.stop(victim).await;
    cluster.wipe(victim);
    let err = cluster
        .try_restart(victim)
        .await
        .expect_err("a wiped member must not start");
    assert!(
        matches!(err, MetaError::WipedMember { node_id } if node_id == victim),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("empty data directory")
            && message.contains(&format!("cairn cluster remove-node {victim}")),
        "the refusal tells the operator what to do: {message}"
    );
    write_packs(&cluster, leader, 20..22).await;

    // The operator removes it, then starts it again with the empty directory:
    // it joins as a new member and gets everything.
    let via = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    cluster.meta(via).remove_node(victim).await.expect("remove");
    assert_no_region_majority(&cluster.meta(via).node_views());
    cluster.restart(victim).await;
    assert_eq!(cluster.meta(victim).admission(), Admission::Admitted);
    wait_until(
        &format!("node {victim} to be a member again"),
        WAIT,
        || async {
            let on_leader = cluster.meta(leader).is_member(victim);
            let on_itself = cluster.meta(victim).is_member(victim);
            if on_leader && on_itself {
                Ok(())
            } else {
                Err(format!(
                    "member on the leader: {on_leader}, on itself: {on_itself}"
                ))
            }
        },
    )
    .await;
    write_packs(&cluster, leader, 22..24).await;
    let rejoined = cluster.meta(victim);
    assert_eq!(
        rejoined.packs().expect("packs"),
        cluster.meta(leader).packs().expect("packs"),
        "every committed pack is on the rejoined node"
    );
    assert_eq!(
        rejoined.stats().expect("stats"),
        cluster.meta(leader).stats().expect("stats")
    );
    assert_eq!(rejoined.key_slots("acme").expect("slots").len(), 1);
    let leader = cluster.leader().await;
    let members = cluster.meta(leader).node_views();
    assert_eq!(members.len(), 6);
    assert_eq!(voters_of(&members).len(), 5);
    assert_no_region_majority(&members);
    let marks = cluster.meta(leader).node_marks().expect("marks");
    assert!(
        !marks.get(&victim).is_some_and(|m| m.removed),
        "joining again clears the removed mark"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_bootstrapper_never_starts_a_second_cluster() {
    // Voters 1/2/3 (one per region); node 4 (r3) is in the initial cluster
    // but never started, so it becomes a learner that never held the log.
    let regions: &[(&str, &[NodeId])] = &[("r1", &[1]), ("r2", &[2]), ("r3", &[3, 4])];
    let mut cluster = Cluster::start_some(regions, MetaConfig::default(), &[1, 2, 3]).await;
    let leader = cluster.leader().await;
    write_packs(&cluster, leader, 0..8).await;
    wait_log_holders(&cluster, leader, &[1, 2, 3]).await;
    let before = cluster.meta(leader).stats().expect("stats");

    // Node 1, the bootstrapper, loses its disk: refused while the others run.
    cluster.stop(1).await;
    cluster.wipe(1);
    let err = cluster.try_restart(1).await.expect_err("refused");
    assert!(
        matches!(err, MetaError::WipedMember { node_id: 1 }),
        "{err}"
    );
    let leader = cluster.leader().await;
    assert_ne!(leader, 1);

    // Worse: the whole cluster is down, and node 1 (wiped) starts next to
    // node 4 (empty, never started). Nobody can show node 1 a cluster and
    // only one initial voter answers at all: neither may start anything.
    cluster.stop(2).await;
    cluster.stop(3).await;
    let listeners = vec![(1, cluster.bind(1).await), (4, cluster.bind(4).await)];
    cluster.open_together(listeners).await;
    for id in [1, 4] {
        assert_eq!(
            cluster.meta(id).admission(),
            Admission::Probing,
            "node {id}"
        );
        let metrics = cluster.meta(id).raft().metrics().borrow().clone();
        assert_eq!(metrics.membership_config.membership().nodes().count(), 0);
        assert_eq!(metrics.current_leader, None);
    }

    // The old cluster comes back: node 1 learns it is a wiped member and
    // fences itself; node 4, a member that never held the log, joins.
    cluster.restart(2).await;
    cluster.restart(3).await;
    for (id, expected) in [(1, Admission::Fenced), (4, Admission::Admitted)] {
        wait_until(
            &format!("node {id}'s admission to become {expected:?}"),
            WAIT,
            || async {
                match cluster.meta(id).admission() {
                    now if now == expected => Ok(()),
                    now => Err(format!("admission is {now:?}")),
                }
            },
        )
        .await;
    }
    let leader = cluster.leader_of(&[2, 3, 4]).await;
    assert!([2, 3].contains(&leader));
    let index = cluster.meta(leader).last_applied();
    cluster.applied_on(&[2, 3, 4], index).await;
    assert_eq!(cluster.meta(4).stats().expect("stats"), before);
    let wiped = cluster.meta(1).raft().metrics().borrow().clone();
    assert_eq!(
        wiped.membership_config.membership().nodes().count(),
        0,
        "node 1 never initialized anything"
    );
    assert_eq!(wiped.vote, openraft::Vote::default(), "nor voted");
    assert_eq!(wiped.last_log_index, None);
    let members = cluster.meta(leader).node_views();
    assert!(
        members[&1].voter,
        "node 1 still counts as a voter until removed"
    );
    assert_eq!(members.len(), 4);
    cluster.shutdown().await;
}
