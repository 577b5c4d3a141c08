//! Growing a running cluster: a node started with the right flags joins
//! through `cairn cluster add-node` (the `AddNode` RPC, as the CLI sends it),
//! shows up in `cluster status` and takes shards of new packs; wrong requests
//! are refused with a reason before anything changes.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_node::local_cluster::wait_until;
use cairn_proto::v1::{AddNodeRequest, ClusterStatusReply};
use cairn_tests::*;
use tonic::Code;

/// Sends `AddNode` the way `cairn cluster add-node` does.
async fn add_node(
    client: &cairn_client::Cluster,
    node_id: u64,
    region: &str,
    addr: &str,
) -> Result<(), cairn_client::ClientError> {
    let request = AddNodeRequest {
        node_id,
        region: region.into(),
        addr: addr.into(),
    };
    client
        .call("add node", |mut c| {
            let request = request.clone();
            async move { c.add_node(request).await }
        })
        .await
        .map(|_| ())
}

fn refused_with(result: Result<(), cairn_client::ClientError>, code: Code, text: &str) {
    match result {
        Err(cairn_client::ClientError::Server {
            code: got, message, ..
        }) => {
            assert_eq!(got, code, "{message}");
            assert!(message.contains(text), "{message:?} should say {text:?}");
        }
        other => panic!("expected a refusal saying {text:?}, got {other:?}"),
    }
}

/// No region holds a majority of the voters.
fn assert_voters_spread(status: &ClusterStatusReply) {
    let voters: Vec<_> = status.nodes.iter().filter(|n| n.voter).collect();
    let mut per_region: BTreeMap<&str, usize> = BTreeMap::new();
    for n in &voters {
        *per_region.entry(n.region.as_str()).or_default() += 1;
    }
    for (region, count) in per_region {
        assert!(
            count * 2 < voters.len(),
            "region {region} holds {count} of {} voters",
            voters.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seventh_node_joins_through_add_node_and_takes_shards_of_new_packs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let repo = must_init(&cluster).await;
    let admin = client(&cluster);

    // Refused before anything changes, each with its reason.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .to_string();
    refused_with(
        add_node(&admin, 7, "r9", &nobody).await,
        Code::InvalidArgument,
        "not a region of this cluster",
    );
    refused_with(
        add_node(&admin, 7, "r2", &nobody).await,
        Code::FailedPrecondition,
        "nothing answers as it",
    );
    let node_1 = cluster.members()[&1].addr.clone();
    refused_with(
        add_node(&admin, 7, "r2", &node_1).await,
        Code::FailedPrecondition,
        "already belongs to member node 1",
    );
    refused_with(
        add_node(&admin, 3, "r2", &nobody).await,
        Code::FailedPrecondition,
        "already a member",
    );

    let id = cluster
        .start_extra_node("r2")
        .await
        .expect("seventh node starts");
    assert_eq!(id, 7);
    let addr = cluster.members()[&id].addr.clone();
    // Through a follower: the change is sent on to the leader.
    let status = cluster.status().await.expect("status");
    let follower = status
        .nodes
        .iter()
        .find(|n| n.node_id != status.leader_id && n.node_id != id)
        .expect("a follower");
    let via_follower = cairn_client::Cluster::new(std::slice::from_ref(&follower.addr))
        .expect("address parses")
        .with_failover_budget(Duration::from_secs(60));
    add_node(&via_follower, id, "r2", &addr)
        .await
        .expect("add-node succeeds");
    // Again: adding is idempotent.
    add_node(&admin, id, "r2", &addr)
        .await
        .expect("adding a member again succeeds");

    let status = wait_until(
        "node 7 listed up in r2 by cluster status",
        Duration::from_secs(30),
        || async {
            let status = cluster.status().await?;
            match status.nodes.iter().find(|n| n.node_id == id) {
                Some(n) if n.up && n.region == "r2" && n.addr == addr => Ok(status),
                Some(n) => Err(format!("listed as {n:?}")),
                None => Err(format!("not listed among {} nodes", status.nodes.len())),
            }
        },
    )
    .await;
    assert_eq!(status.nodes.len(), 7);
    assert_voters_spread(&status);
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("all seven nodes ready");

    // Placement is rendezvous-hashed on the pack id: back up small, distinct
    // datasets (at least a pack each) until one pack has a shard on node 7.
    // Node 7 takes a shard of a pack with probability about 2/3, so twelve
    // packs miss it with probability below 1e-5.
    let shard_dir = cluster.data_dir(id).join("shards");
    let source = dir.path().join("source");
    let mut backups = 0;
    while files_under(&shard_dir).is_empty() && backups < 12 {
        backups += 1;
        std::fs::create_dir_all(&source).expect("source dir");
        let body: Vec<u8> = (0..64 * 1024u32)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(backups) >> 13) as u8)
            .collect();
        std::fs::write(source.join(format!("room-{backups}.jsonl")), body).expect("write");
        must_backup(&repo, &source, &format!("chat-{backups}")).await;
    }
    assert!(
        !files_under(&shard_dir).is_empty(),
        "node 7 holds no shard after {backups} backups"
    );
    let status = cluster.status().await.expect("status");
    let seventh = status
        .nodes
        .iter()
        .find(|n| n.node_id == id)
        .expect("node 7 listed");
    assert!(seventh.shards > 0, "status shows no shard on node 7");

    must_restore_identical(&repo, "latest", &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}
