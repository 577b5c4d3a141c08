//! The metadata group as a real cluster: several `Meta`s in this process, each
//! behind its own gRPC server on `127.0.0.1:0`, in three regions. Every wait
//! polls Raft metrics with a deadline; nothing sleeps for a fixed time.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_node::meta::types::{
    BlobLocation, Command, CommandResult, NodeId, NodeInfo, PackRecord, ShardPlacement,
};
use cairn_node::meta::{Meta, MetaConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

/// Longest any single condition in these tests may take to become true.
const WAIT: Duration = Duration::from_secs(15);

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
}

impl Cluster {
    /// Binds one listener per node first (so addresses are known), then
    /// opens every node with the same initial cluster.
    async fn start(regions: &[(&str, &[NodeId])], config: MetaConfig) -> Cluster {
        let mut listeners = BTreeMap::new();
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
                listeners.insert(*id, listener);
            }
        }
        let mut cluster = Cluster {
            root: tempfile::tempdir().expect("tempdir"),
            map,
            config,
            nodes: BTreeMap::new(),
        };
        for (id, listener) in listeners {
            cluster.open(id, listener).await;
        }
        cluster
    }

    fn dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    async fn open(&mut self, id: NodeId, listener: TcpListener) {
        let meta = Meta::open(id, &self.dir(id), self.map.clone(), self.config.clone())
            .await
            .expect("open meta");
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

    /// Reopens a stopped node from its directory, on its old address.
    async fn restart(&mut self, id: NodeId) {
        let addr: SocketAddr = self.map[&id].addr.parse().expect("addr");
        let listener = TcpListener::bind(addr)
            .await
            .expect("rebind the node's address");
        self.open(id, listener).await;
    }

    fn meta(&self, id: NodeId) -> &Meta {
        &self.nodes[&id].meta
    }

    /// Waits until every running node agrees on one running leader, and
    /// returns it. On timeout, panics with every node's metrics.
    async fn leader(&self) -> NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leaders: BTreeSet<Option<NodeId>> = self
                .nodes
                .values()
                .map(|n| n.meta.raft().metrics().borrow().current_leader)
                .collect();
            if let [Some(leader)] = leaders.iter().copied().collect::<Vec<_>>()[..]
                && self.nodes.contains_key(&leader)
            {
                return leader;
            }
            if tokio::time::Instant::now() >= deadline {
                let dump: Vec<String> = self
                    .nodes
                    .values()
                    .map(|n| n.meta.raft().metrics().borrow().to_string())
                    .collect();
                panic!(
                    "no agreed running leader after {WAIT:?}:\n{}",
                    dump.join("\n")
                );
            }
            // Poll the metrics (cheap, in memory) until they agree.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every running node has applied at least `index`.
    async fn all_applied(&self, index: u64) {
        for (id, node) in &self.nodes {
            node.meta
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

fn assert_no_region_majority(members: &BTreeMap<NodeId, (NodeInfo, bool)>) {
    let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
    let mut voters = 0;
    for (info, voter) in members.values() {
        if *voter {
            voters += 1;
            *per_region.entry(info.region.as_str()).or_default() += 1;
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
    let members = cluster.meta(leader).members();
    let voters: BTreeSet<NodeId> = members
        .iter()
        .filter(|(_, (_, v))| *v)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(voters, [1, 2, 3, 4, 5].into_iter().collect());
    assert!(!members[&6].1, "node 6 is a learner");
    assert_eq!(
        members[&3].0, cluster.map[&3],
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
