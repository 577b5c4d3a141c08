//! Hot/cold tiering on a real in-process cluster: three regions of two hot
//! and one cold node, 4+2. After `--cold-after 0s` every pack of the old
//! snapshots has its shards on cold nodes only, at most m per region (the
//! metadata's pack records and the shard files on every disk agree); the
//! repairer leaves the move alone; restores are identical; a new dataset's
//! backup lands on hot nodes; losing a whole region still loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_client::lifecycle::PolicySpec;
use cairn_node::config::{NodeFile, TieringSection};
use cairn_node::local_cluster::{LocalCluster, wait_until};
use cairn_node::meta::Meta;
use cairn_node::meta::types::PackRecord;
use cairn_node::model::{NodeId, StorageClass};
use cairn_tests::{files_under, must_backup, must_init, must_restore_identical, must_start_tuned};

/// Region-major ids: the third node of each region is cold.
const COLD: [NodeId; 3] = [3, 6, 9];
const M: usize = 2;

fn tune(file: &mut NodeFile) {
    if file.node_id.is_some_and(|id| COLD.contains(&id)) {
        file.storage_class = Some(StorageClass::Cold);
    }
    // Short passes, no rate limit: tests wait on conditions, not timers.
    file.tiering = TieringSection {
        interval: Duration::from_millis(300),
        rate_bytes_per_s: 0,
        ..TieringSection::default()
    };
}

async fn must_start_tiered(dir: &Path) -> LocalCluster {
    let cluster = must_start_tuned(dir, &[3, 3, 3], tune).await;
    // Every node announces its class; placement needs them all.
    wait_until(
        "every node's storage class in the map",
        Duration::from_secs(30),
        || async {
            let status = cluster.status().await?;
            let cold: BTreeSet<NodeId> = status
                .nodes
                .iter()
                .filter(|n| n.storage_class == "cold")
                .map(|n| n.node_id)
                .collect();
            if cold == COLD.into_iter().collect() {
                Ok(())
            } else {
                Err(format!("cold nodes so far: {cold:?}"))
            }
        },
    )
    .await;
    cluster
}

/// `bytes` of incompressible data in files of 1 MiB under `dir/name`.
fn random_tree(dir: &Path, name: &str, bytes: usize, seed: u64) -> PathBuf {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).expect("source dir");
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = bytes;
    let mut n = 0;
    while left > 0 {
        let len = left.min(1 << 20);
        let mut data = vec![0u8; len];
        for chunk in data.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let word = state.to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        std::fs::write(root.join(format!("f{n:03}.bin")), data).expect("write source");
        left -= len;
        n += 1;
    }
    root
}

/// The leader's metadata handle (its local state is the freshest).
async fn leader_meta(cluster: &LocalCluster) -> Meta {
    wait_until(
        "a leader with a readable state",
        Duration::from_secs(30),
        || async {
            let status = cluster.status().await?;
            if !status.has_leader {
                return Err("no leader".into());
            }
            cluster
                .meta(status.leader_id)
                .ok_or_else(|| format!("leader {} not running here", status.leader_id))
        },
    )
    .await
}

fn region_of(cluster: &LocalCluster, node: NodeId) -> String {
    cluster.members()[&node].region.clone()
}

/// Why `pack` is not on cold nodes only, at most m per region, per the index.
fn cold_placement_problem(cluster: &LocalCluster, pack: &PackRecord) -> Option<String> {
    let mut per_region: BTreeMap<String, usize> = BTreeMap::new();
    for shard in &pack.shards {
        if !COLD.contains(&shard.node) {
            return Some(format!("shard {} on hot node {}", shard.index, shard.node));
        }
        *per_region
            .entry(region_of(cluster, shard.node))
            .or_default() += 1;
    }
    if pack.shards.len() != 6 || per_region.values().any(|&n| n > M) {
        return Some(format!(
            "{} shards, per region {per_region:?}",
            pack.shards.len()
        ));
    }
    None
}

/// Node ids holding a shard file of `pack` on their disk.
fn holders_on_disk(cluster: &LocalCluster, pack: &[u8; 32]) -> BTreeMap<NodeId, usize> {
    let hex = hex::encode(pack);
    cluster
        .members()
        .keys()
        .map(|id| {
            let files = files_under(&cluster.data_dir(*id).join("shards"))
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&hex))
                })
                .count();
            (*id, files)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Waits until every pack in `packs` is cold per the index, then checks
/// the disks agree: its shard files only on cold nodes, ≤ m per region.
async fn must_be_cold(cluster: &LocalCluster, packs: &BTreeSet<[u8; 32]>) {
    let meta = leader_meta(cluster).await;
    wait_until(
        "every old pack on cold nodes",
        Duration::from_secs(120),
        || async {
            let classes = meta.pack_classes().map_err(|e| e.to_string())?;
            for id in packs {
                let pack = meta
                    .pack(id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("pack {} gone", hex::encode(id)))?;
                if classes.get(id) != Some(&StorageClass::Cold) {
                    return Err(format!("pack {} not cold yet", hex::encode(id)));
                }
                if let Some(problem) = cold_placement_problem(cluster, &pack) {
                    return Err(format!("pack {}: {problem}", hex::encode(id)));
                }
            }
            Ok(())
        },
    )
    .await;
    for id in packs {
        let holders = holders_on_disk(cluster, id);
        let mut per_region: BTreeMap<String, usize> = BTreeMap::new();
        for (node, files) in &holders {
            assert!(
                COLD.contains(node),
                "pack {} still has {files} shard file(s) on hot node {node}",
                hex::encode(id)
            );
            *per_region.entry(region_of(cluster, *node)).or_default() += files;
        }
        assert_eq!(per_region.values().sum::<usize>(), 6, "{per_region:?}");
        assert!(
            per_region.values().all(|&n| n <= M),
            "more than m shard files in a region: {per_region:?}"
        );
    }
}

/// Every pack in the index right now.
fn pack_ids(meta: &Meta) -> BTreeSet<[u8; 32]> {
    meta.packs()
        .expect("pack records")
        .into_iter()
        .map(|p| p.id)
        .collect()
}

/// Asserts the packs are hot: class record absent, shards on hot nodes only.
fn must_be_hot(meta: &Meta, packs: &BTreeSet<[u8; 32]>) {
    assert!(!packs.is_empty());
    for id in packs {
        assert_eq!(meta.pack_class(id).expect("class"), StorageClass::Hot);
        let pack = meta.pack(id).expect("read").expect("pack stored");
        for shard in &pack.shards {
            assert!(
                !COLD.contains(&shard.node),
                "new pack {} has shard {} on cold node {}",
                hex::encode(id),
                shard.index,
                shard.node
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_snapshots_move_to_cold_nodes_and_everything_still_restores() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = must_start_tiered(&dir.path().join("cluster")).await;
    let repo = must_init(&cluster).await;
    let first_src = random_tree(dir.path(), "first", 6 << 20, 1);
    let second_src = random_tree(dir.path(), "second", 6 << 20, 2);
    let first = must_backup(&repo, &first_src, "archive").await;
    let second = must_backup(&repo, &second_src, "archive").await;
    let meta = leader_meta(&cluster).await;
    let old = pack_ids(&meta);
    assert!(old.len() >= 6, "several packs: {}", old.len());
    // New backups land on hot nodes.
    must_be_hot(&meta, &old);

    repo.set_policy(&PolicySpec {
        dataset: "archive".into(),
        cold_after: Some(Duration::ZERO),
        ..PolicySpec::default()
    })
    .await
    .expect("policy set");
    must_be_cold(&cluster, &old).await;

    // The repairer judges cold packs against cold nodes: a pass moves nothing.
    let pass = repo.repair_now().await.expect("repair pass");
    assert_eq!(
        pass.queued, 0,
        "repair wants to move tiered packs: {pass:?}"
    );
    must_be_cold(&cluster, &old).await;

    // Every moved shard verifies, and no cold pack counts as at risk.
    let check = repo.check_packs(true).await.expect("check --read-data");
    assert!(
        check.problems.is_empty() && check.misplaced.is_empty() && check.unrecoverable.is_empty(),
        "check after the move: {check:?}"
    );

    // Status reports bytes per class.
    let status = cluster.status().await.expect("status");
    let cold = status
        .by_class
        .iter()
        .find(|c| c.storage_class == "cold")
        .expect("cold usage");
    assert_eq!((cold.nodes, cold.packs), (3, old.len() as u64));
    assert!(cold.bytes > 0 && cold.shards >= 6 * old.len() as u64);

    must_restore_identical(&repo, &first.snapshot_id, &first_src, dir.path(), &[]).await;
    must_restore_identical(&repo, &second.snapshot_id, &second_src, dir.path(), &[]).await;

    // A dataset without cold_after: its backup lands (and stays) hot.
    let fresh_src = random_tree(dir.path(), "fresh", 3 << 20, 3);
    let fresh = must_backup(&repo, &fresh_src, "fresh").await;
    let meta = leader_meta(&cluster).await;
    let new: BTreeSet<[u8; 32]> = pack_ids(&meta).difference(&old).copied().collect();
    must_be_hot(&meta, &new);

    // Losing a whole region (with a cold node) loses nothing.
    cluster.stop_region("r1").await.expect("r1 stops");
    must_restore_identical(&repo, &first.snapshot_id, &first_src, dir.path(), &[]).await;
    must_restore_identical(&repo, &second.snapshot_id, &second_src, dir.path(), &[]).await;
    must_restore_identical(&repo, &fresh.snapshot_id, &fresh_src, dir.path(), &[]).await;
    let meta = leader_meta(&cluster).await;
    must_be_hot(&meta, &new);
    cluster.shutdown().await.expect("shutdown");
}

/// The figure: mover throughput on a few hundred MB (run by hand:
/// `cargo test -p cairn-tests --release --test tiering -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a check: a few hundred MB through the mover"]
async fn mover_throughput() {
    let mb: usize = std::env::var("CAIRN_TIERING_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_tiered(&dir.path().join("cluster")).await;
    let repo = must_init(&cluster).await;
    let src = random_tree(dir.path(), "bulk", mb << 20, 7);
    must_backup(&repo, &src, "bulk").await;
    let meta = leader_meta(&cluster).await;
    let packs = pack_ids(&meta);
    let pack_bytes: u64 = meta
        .packs()
        .expect("packs")
        .iter()
        .map(|p| p.pack_len)
        .sum();
    let shard_bytes: u64 = meta
        .packs()
        .expect("packs")
        .iter()
        .map(|p| p.shard_len * u64::from(p.data_shards + p.parity_shards))
        .sum();
    let started = Instant::now();
    repo.set_policy(&PolicySpec {
        dataset: "bulk".into(),
        cold_after: Some(Duration::ZERO),
        ..PolicySpec::default()
    })
    .await
    .expect("policy set");
    must_be_cold(&cluster, &packs).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "mover: {} packs, {:.1} MB of packs ({:.1} MB of shards written) in {secs:.1} s: {:.1} MB/s of packs, {:.1} MB/s of shards",
        packs.len(),
        pack_bytes as f64 / 1e6,
        shard_bytes as f64 / 1e6,
        pack_bytes as f64 / 1e6 / secs,
        shard_bytes as f64 / 1e6 / secs
    );
    cluster.shutdown().await.expect("shutdown");
}
