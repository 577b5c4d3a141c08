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
    wait_until(
        "scrub and repair to rewrite the flipped shards",
        Duration::from_secs(60),
        || async {
            let still_bad = flipped
                .iter()
                .filter(|(path, bad)| std::fs::read(path).map(|now| now == *bad).unwrap_or(true))
                .count();
            if still_bad == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{still_bad} of {} shard files not rewritten yet",
                    flipped.len()
                ))
            }
        },
    )
    .await;
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

/// A 4+2 cluster with a scrub interval of `scrub` (an hour: only checks and
/// reads find faults) and repair acting in seconds.
async fn must_start_cluster_scrubbing_every(
    dir: &Path,
    nodes_per_region: &[usize],
    scrub: Duration,
) -> LocalCluster {
    init_logging();
    let cluster = LocalCluster::start_tuned(dir, nodes_per_region, "4+2", |node| {
        node.down_after = Some(Duration::from_secs(2));
        node.repair.interval = Duration::from_secs(3600);
        node.repair.rate_bytes_per_s = 0;
        node.scrub.interval = scrub;
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

/// Every node's scrub rounds, from `cluster status` (0 for a silent node).
async fn scrub_rounds(cluster: &LocalCluster) -> Result<Vec<(u64, u64)>, String> {
    let status = cluster.status().await?;
    Ok(status
        .nodes
        .iter()
        .map(|n| {
            (
                n.node_id,
                n.scrub.as_ref().map(|s| s.rounds_total).unwrap_or(0),
            )
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_scrubs_and_reports_its_rounds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster_scrubbing_every(
        &dir.path().join("cluster"),
        &[3, 3, 3],
        Duration::from_millis(300),
    )
    .await;
    let repo = must_init(&cluster).await;
    must_backup(&repo, &source(dir.path()), "chat-messages").await;
    // Two nodes hold a file that names another shard than it holds (a
    // swapped or misplaced file): that used to end every round of theirs
    // before it was counted, so they never completed one.
    let holders: Vec<u64> = (1..=9)
        .filter(|id| !files_under(&cluster.data_dir(*id).join("shards")).is_empty())
        .take(2)
        .collect();
    assert_eq!(holders.len(), 2, "two nodes hold shards");
    let mut misfiled = Vec::new();
    let before: std::collections::BTreeMap<u64, u64> = scrub_rounds(&cluster)
        .await
        .expect("status")
        .into_iter()
        .collect();
    for id in holders {
        let shards = cluster.data_dir(id).join("shards");
        let held = files_under(&shards);
        let first = held.first().expect("node holds a shard");
        let name = first.file_name().and_then(|n| n.to_str()).expect("name");
        let index = name.rsplit('.').next().expect("index");
        let other = shards
            .join("00")
            .join(format!("{}.{index}", "0".repeat(64)));
        std::fs::create_dir_all(other.parent().expect("dir")).expect("dir");
        std::fs::copy(first, &other).expect("misfiled copy");
        misfiled.push(other);
    }
    wait_until(
        "every node counts scrub rounds",
        Duration::from_secs(30),
        || async {
            let rounds = scrub_rounds(&cluster).await?;
            if rounds.len() == 9
                && rounds
                    .iter()
                    .all(|(id, r)| *r >= before.get(id).copied().unwrap_or(0) + 3)
                && misfiled.iter().all(|f| !f.exists())
            {
                Ok(())
            } else {
                Err(format!("rounds per node: {rounds:?}"))
            }
        },
    )
    .await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_read_data_repair_fixes_what_it_found_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Scrub hourly: only the check can find these faults.
    let cluster = must_start_cluster_scrubbing_every(
        &dir.path().join("cluster"),
        &[2, 2, 2],
        Duration::from_secs(3600),
    )
    .await;
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source(dir.path()), "chat-messages").await;
    let source = dir.path().join("source");
    // A second pack, so that two packs' shard files can be swapped.
    let more = dir.path().join("more");
    datagen::generate(&more, 1, 12).expect("data generated");
    must_backup(&repo, &more, "gift-records").await;

    // At most m = 2 faults per pack: node 6 swaps its files of packs P and
    // Q (each then "holds shard i of pack …"), node 2's shard of P gets
    // flipped bytes, node 4's shard of Q is deleted.
    let files = |id| files_under(&cluster.data_dir(id).join("shards"));
    let pack_of = |path: &std::path::PathBuf| {
        path.file_stem()
            .and_then(|s| s.to_str())
            .map(str::to_owned)
            .expect("shard file name")
    };
    // Six nodes, 4+2: every node holds one shard of every pack (two data
    // packs and their tree packs); any two of node 6's files will do.
    let six = files(6);
    assert!(
        six.len() >= 2,
        "node 6 holds one shard of each pack: {six:?}"
    );
    let (p, q) = (pack_of(&six[0]), pack_of(&six[1]));
    let (a, b) = (
        std::fs::read(&six[0]).expect("a"),
        std::fs::read(&six[1]).expect("b"),
    );
    std::fs::write(&six[0], &b).expect("swap");
    std::fs::write(&six[1], &a).expect("swap");
    let of_pack = |id, pack: &str| {
        files(id)
            .into_iter()
            .find(|f| pack_of(f) == pack)
            .expect("a shard of that pack")
    };
    let on_two = of_pack(2, &p);
    let mut flipped = std::fs::read(&on_two).expect("shard");
    let at = flipped.len() / 2;
    flipped[at] ^= 0x5A;
    std::fs::write(&on_two, &flipped).expect("corrupt");
    std::fs::remove_file(of_pack(4, &q)).expect("delete");

    let found = repo.check_packs(true).await.expect("check");
    assert!(
        found.problems.len() >= 4,
        "check finds every planted fault: {:?}",
        found.problems
    );
    assert_eq!(found.faults_reported, found.problems.len() as u64);
    // The reports woke the leader's repairer (its interval is an hour); an
    // explicit pass waits for that one and finishes whatever is left.
    repo.repair_now().await.expect("repair");
    // Verified at once: what the check found was rebuilt by that one pass.
    let after = repo.check_packs(true).await.expect("check again");
    assert!(
        after.problems.is_empty() && after.unrecoverable.is_empty(),
        "still bad after check --repair: {:?}",
        after.problems
    );
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_read_reports_the_shard_to_repair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster_scrubbing_every(
        &dir.path().join("cluster"),
        &[2, 2, 2],
        Duration::from_secs(3600),
    )
    .await;
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source(dir.path()), "chat-messages").await;
    let source = dir.path().join("source");
    // Corrupt data shard 0 wherever it is; a restore reads it.
    let mut corrupted = 0;
    for id in 1..=6 {
        for path in files_under(&cluster.data_dir(id).join("shards")) {
            if path.extension().and_then(|e| e.to_str()) == Some("0") {
                let mut data = std::fs::read(&path).expect("shard");
                let at = data.len() - 1;
                data[at] ^= 0x01;
                std::fs::write(&path, &data).expect("corrupt");
                corrupted += 1;
            }
        }
    }
    assert!(corrupted > 0, "shard 0 found");
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    // Reported by the read itself (scrub is hourly, no check ran): the
    // leader holds the report, and one pass rewrites the shard.
    wait_until(
        "the read's report repaired the pack",
        Duration::from_secs(10),
        || async {
            let repair = cluster.status().await?.repair.unwrap_or_default();
            if repair.packs_repaired_total > 0 {
                Ok(())
            } else {
                Err(format!("{repair:?}"))
            }
        },
    )
    .await;
    must_check_clean(
        &repo,
        "after the read-reported repair",
        Duration::from_secs(10),
    )
    .await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_repair_passes_never_leave_fewer_good_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_fast_cluster(&dir.path().join("cluster"), &[3, 2, 2]).await;
    let repo = must_init(&cluster).await;
    let summary = must_backup(&repo, &source(dir.path()), "chat-messages").await;
    let source = dir.path().join("source");
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
    cluster.stop_node(victim).await.expect("stop");
    // Explicit passes race the worker (500 ms interval) while the node is
    // declared down and its shards are rebuilt.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let mut passes = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let repo = repo.clone();
            passes.spawn(async move { repo.repair_now().await });
        }
        while let Some(result) = passes.join_next().await {
            result.expect("repair task").expect("repair call");
        }
    }
    must_check_clean(&repo, "after racing passes", Duration::from_secs(60)).await;
    let status = must_reach(
        &cluster,
        "every pack fully protected without the victim",
        Duration::from_secs(30),
        |s, p| s.packs > 0 && p.fully_protected + p.misplaced == s.packs,
    )
    .await;
    // No good shard was lost: every pack has k+m good shards, and no shard
    // file on disk is left without an index entry.
    let p = status.protection.unwrap_or_default();
    assert_eq!(p.shards_missing, 0, "{p:?}");
    must_restore_identical(&repo, &summary.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

/// A valid shard file of a pack no index entry names, at its canonical path
/// under `shards`, with the given age.
fn must_plant_orphan(shards: &Path, seed: u8, age: Duration) -> std::path::PathBuf {
    use cairn_node::erasure::{Code, encode_pack};
    let pack = vec![seed; 4096];
    let id = *blake3::hash(&pack).as_bytes();
    let shard = encode_pack(Code::default(), id, &pack).remove(1);
    let hex_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let dir = shards.join(&hex_id[..2]);
    std::fs::create_dir_all(&dir).expect("fan-out dir");
    let path = dir.join(format!("{hex_id}.1"));
    std::fs::write(&path, shard.to_file_bytes()).expect("orphan");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now() - age))
        .expect("age it");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scrub_sweeps_old_orphans_keeps_young_ones_and_survives_a_misfiled_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster_scrubbing_every(
        &dir.path().join("cluster"),
        &[2, 2, 2],
        Duration::from_millis(300),
    )
    .await;
    let repo = must_init(&cluster).await;
    must_backup(&repo, &source(dir.path()), "chat-messages").await;
    let shards = cluster.data_dir(3).join("shards");
    // A misfiled file first in scan order: before, it ended every round.
    let held = files_under(&shards);
    let mut misfiled = held[0].clone();
    misfiled.set_file_name(format!(
        "{}.{}",
        "0".repeat(64),
        held[0].extension().and_then(|e| e.to_str()).unwrap_or("0")
    ));
    let zero_dir = shards.join("00");
    std::fs::create_dir_all(&zero_dir).expect("dir");
    let misfiled = zero_dir.join(misfiled.file_name().expect("name"));
    std::fs::copy(&held[0], &misfiled).expect("misfile a copy");
    let old = must_plant_orphan(&shards, 1, Duration::from_secs(7200));
    let young = must_plant_orphan(&shards, 2, Duration::from_secs(1));

    wait_until(
        "old orphan and misfiled file gone",
        Duration::from_secs(30),
        || async {
            if old.exists() || misfiled.exists() {
                return Err(format!(
                    "old {} misfiled {}",
                    old.exists(),
                    misfiled.exists()
                ));
            }
            let status = cluster.status().await?;
            let node = status
                .nodes
                .iter()
                .find(|n| n.node_id == 3)
                .ok_or("node 3")?;
            let scrub = node.scrub.unwrap_or_default();
            if scrub.orphans_deleted_total >= 1
                && scrub.misfiled_total >= 1
                && scrub.orphan_shards >= 1
                && status.orphan_shards >= 1
            {
                Ok(())
            } else {
                Err(format!("{scrub:?}"))
            }
        },
    )
    .await;
    assert!(
        young.exists(),
        "an orphan younger than the grace period is kept"
    );
    must_check_clean(&repo, "after the sweep", Duration::from_secs(10)).await;
    cluster.shutdown().await.expect("shutdown");
}
