//! Keeping the promise over time: re-protection after node and region loss,
//! rebalancing when a region returns, scrub finding and repairing rot.
//! Failure detection and repair are tuned to seconds; every wait is bounded.

use std::path::Path;
use std::time::{Duration, Instant};

use cairn_cli::datagen;
use cairn_node::local_cluster::{LocalCluster, wait_until};
use cairn_proto::v1::{ClusterStatusReply, Protection};
use cairn_tests::*;

/// A 4+2 cluster whose failure detection, repair and scrub act in seconds.
async fn must_start_fast_cluster(dir: &Path, nodes_per_region: &[usize]) -> LocalCluster {
    init_logging();
    let cluster = LocalCluster::start_tuned(dir, nodes_per_region, "4+2", |node| {
        node.down_after = Some(Duration::from_secs(2));
        node.repair.interval = Duration::from_millis(500);
        node.repair.rate_bytes_per_s = 0;
        node.scrub.interval = Duration::from_millis(500);
        node.scrub.rate_bytes_per_s = 0;
    })
    .await
    .expect("cluster starts");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("cluster ready");
    cluster
}

/// Waits until the cluster status satisfies `done`, or panics saying `what`.
async fn must_reach(
    cluster: &LocalCluster,
    what: &str,
    timeout: Duration,
    done: impl Fn(&ClusterStatusReply, &Protection) -> bool,
) -> ClusterStatusReply {
    wait_until(what, timeout, || async {
        let status = cluster.status().await?;
        let protection = status.protection.unwrap_or_default();
        if done(&status, &protection) {
            Ok(status)
        } else {
            Err(format!("{protection:?} packs={}", status.packs))
        }
    })
    .await
}

/// Waits until `check --read-data` finds every recorded shard good.
async fn must_check_clean(repo: &cairn_client::Repository, what: &str, timeout: Duration) {
    wait_until(what, timeout, || async {
        let report = repo.check_packs(true).await.map_err(|e| e.to_string())?;
        if report.problems.is_empty() && report.unrecoverable.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} problem(s), first {:?}",
                report.problems.len(),
                report.problems.first()
            ))
        }
    })
    .await
}

fn fully_protected(status: &ClusterStatusReply, p: &Protection) -> bool {
    status.packs > 0 && p.fully_protected == status.packs
}

fn source(dir: &Path) -> std::path::PathBuf {
    let source = dir.join("source");
    datagen::generate(&source, 3, 11).expect("data generated");
    source
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_node_is_rebuilt_elsewhere_and_check_is_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_fast_cluster(&dir.path().join("cluster"), &[2, 2, 2]).await;
    let source = source(dir.path());
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source, "chat-messages").await;
    must_reach(
        &cluster,
        "initial protection",
        Duration::from_secs(20),
        fully_protected,
    )
    .await;

    let status = cluster.status().await.expect("status");
    let victim = status
        .nodes
        .iter()
        .find(|n| n.node_id != status.leader_id && n.shards > 0)
        .expect("a follower holding shards")
        .node_id;
    cluster.stop_node(victim).await.expect("node stops");
    cluster.wipe_node(victim).expect("disk gone");

    // Declared down after 2 s, then every pack rebuilt without it: no
    // placement names it any more and every shard reads back good.
    must_check_clean(
        &repo,
        "re-protection after node loss",
        Duration::from_secs(60),
    )
    .await;
    must_reach(
        &cluster,
        "fully protected on five nodes",
        Duration::from_secs(20),
        |s, p| s.packs > 0 && p.fully_protected + p.misplaced == s.packs,
    )
    .await;
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_loss_is_reprotected_survives_one_more_node_and_rebalances_on_return() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_fast_cluster(&dir.path().join("cluster"), &[2, 2, 2]).await;
    let source = source(dir.path());
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source, "chat-messages").await;
    must_reach(
        &cluster,
        "initial protection",
        Duration::from_secs(20),
        fully_protected,
    )
    .await;

    cluster.stop_region("r3").await.expect("r3 stops");
    // Every pack back to k+m good shards on r1 and r2 (doubled up on nodes).
    must_check_clean(&repo, "re-protection without r3", Duration::from_secs(60)).await;

    // One more node goes, in another region: everything still restores.
    let leader = cluster.status().await.expect("status").leader_id;
    let extra = cluster
        .region_nodes("r1")
        .into_iter()
        .chain(cluster.region_nodes("r2"))
        .find(|id| *id != leader)
        .expect("a non-leader in r1 or r2");
    cluster.stop_node(extra).await.expect("node stops");
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;

    // Everything returns: rebalanced to ≤ m per region, one shard per node.
    cluster.start_node(extra).await.expect("node restarts");
    cluster.start_region("r3").await.expect("r3 restarts");
    must_reach(
        &cluster,
        "rebalanced after r3 returns",
        Duration::from_secs(90),
        fully_protected,
    )
    .await;
    must_check_clean(&repo, "after rebalance", Duration::from_secs(30)).await;
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_finds_flipped_bytes_and_repair_rewrites_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_fast_cluster(&dir.path().join("cluster"), &[2, 2, 2]).await;
    let source = source(dir.path());
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source, "chat-messages").await;
    must_reach(
        &cluster,
        "initial protection",
        Duration::from_secs(20),
        fully_protected,
    )
    .await;

    let mut flipped = Vec::new();
    for path in files_under(&cluster.data_dir(3).join("shards")) {
        let mut data = std::fs::read(&path).expect("shard");
        let at = data.len() / 2;
        data[at] ^= 0x5A;
        std::fs::write(&path, &data).expect("write");
        flipped.push((path, data));
    }
    assert!(!flipped.is_empty(), "node 3 held shards");

    // Scrub quarantines, the leader rebuilds: every file is good again.
    let started = Instant::now();
    while !flipped
        .iter()
        .all(|(path, bad)| std::fs::read(path).map(|now| now != *bad).unwrap_or(false))
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "scrub and repair did not rewrite the flipped shards"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    must_check_clean(&repo, "after scrub repair", Duration::from_secs(30)).await;
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_node_is_removed_only_after_its_shards_moved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_fast_cluster(&dir.path().join("cluster"), &[3, 2, 2]).await;
    let source = source(dir.path());
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source, "chat-messages").await;

    let status = cluster.status().await.expect("status");
    let victim = status
        .nodes
        .iter()
        .filter(|n| n.node_id != status.leader_id && n.shards > 0)
        .map(|n| n.node_id)
        .next()
        .expect("a follower holding shards");
    let client = client(&cluster);
    let reply = client
        .call("remove node", |mut c| async move {
            c.remove_node(cairn_proto::v1::RemoveNodeRequest {
                node_id: victim,
                drain: true,
            })
            .await
        })
        .await
        .expect("drain and remove");
    assert!(reply.shards_moved > 0);
    let status = cluster.status().await.expect("status");
    assert!(
        status.nodes.iter().all(|n| n.node_id != victim),
        "node {victim} left the membership"
    );
    // Its shards are elsewhere: stopping it costs nothing.
    cluster.stop_node(victim).await.expect("stop");
    must_check_clean(&repo, "after drain", Duration::from_secs(30)).await;
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}
