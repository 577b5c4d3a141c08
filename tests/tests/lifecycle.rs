//! Lifecycle end to end on a three-region cluster: forget by retention
//! rules over cluster time, prune without the tenant's key (mark and sweep
//! from reference lists, repack, shards really deleted), garbage collection
//! racing backups, the grace period of a killed backup, retention locks and
//! the right to erasure. Each test fails if the guarantee it names breaks.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cairn_client::backup::{BackupOptions, BackupSummary, Level, Progress, backup_paths};
use cairn_client::lifecycle::{ForgetOptions, KeepRules, LockMode, LockUntil};
use cairn_client::seal::BlobId;
use cairn_client::tree::EntryKind;
use cairn_client::{ClientError, Repository};
use cairn_node::local_cluster::{LocalCluster, wait_until};
use cairn_tests::*;

/// Incompressible bytes, the same for the same seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut data);
    data
}

async fn start(dir: &Path, tune: impl Fn(&mut cairn_node::config::NodeFile)) -> LocalCluster {
    must_start_tuned(dir, &[2, 2, 2], tune).await
}

async fn backup_as(
    repo: &Arc<Repository>,
    source: &Path,
    dataset: &str,
    level: Level,
) -> Result<BackupSummary, ClientError> {
    let options = BackupOptions {
        dataset: dataset.into(),
        level,
        ..BackupOptions::default()
    };
    backup_paths(
        repo.clone(),
        &[source.to_path_buf()],
        &options,
        Arc::new(Progress::default()),
    )
    .await
}

/// Day `day` of a chat service's data: a shared history, the day's new
/// messages, the two days before (older days were rotated away), and a
/// profile file rewritten every day.
fn write_day(source: &Path, day: u64) {
    let _ = std::fs::remove_dir_all(source);
    std::fs::create_dir_all(source.join("days")).expect("source dir");
    std::fs::write(source.join("history.bin"), noise(1_000, 300_000)).expect("history");
    for d in day.saturating_sub(2)..=day {
        std::fs::write(
            source.join(format!("days/day-{d:02}.bin")),
            noise(d, 200_000),
        )
        .expect("day file");
    }
    std::fs::write(source.join("profile.json"), noise(5_000 + day, 40_000)).expect("profile");
}

/// A copy of `source` at `copy/<name of source>`, times and modes kept,
/// to compare a later restore with.
fn keep_copy(source: &Path, copy: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(copy);
    std::fs::create_dir_all(copy).expect("copy dir");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(source)
        .arg(copy)
        .status()
        .expect("cp runs");
    assert!(status.success(), "cp -a {}", source.display());
    copy.join(source.file_name().expect("source has a name"))
}

/// Every blob a snapshot references (trees, chunks), walked with the key.
async fn referenced_blobs(repo: &Repository, snapshot: &str) -> BTreeSet<BlobId> {
    let snapshot = repo.find_snapshot(snapshot, None).await.expect("listed");
    let trees = repo
        .load_trees(&snapshot.root_tree, &[])
        .await
        .expect("trees load");
    let mut ids: BTreeSet<BlobId> = trees.keys().copied().collect();
    for tree in trees.values() {
        for entry in &tree.entries {
            if let EntryKind::File { chunks, .. } = &entry.kind {
                ids.extend(chunks.iter().map(|c| c.id));
            }
        }
    }
    ids
}

/// Encoded bytes of these blobs as the index records them.
async fn stored_bytes_of(repo: &Repository, ids: &BTreeSet<BlobId>) -> u64 {
    let ids: Vec<BlobId> = ids.iter().copied().collect();
    let located = repo
        .locate(&ids)
        .await
        .expect("every referenced blob is indexed");
    located.values().map(|l| u64::from(l.length)).sum()
}

/// Shard files of `pack` on every node of the cluster.
fn shard_files_of(cluster: &LocalCluster, pack: &[u8; 32]) -> Vec<PathBuf> {
    let hex = hex::encode(pack);
    cluster
        .members()
        .keys()
        .flat_map(|id| files_under(&cluster.data_dir(*id)))
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&hex))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forget_keep_last_3_and_prune_leaves_what_the_three_need_and_they_restore() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start(dir.path(), |_| {}).await;
    let repo = must_init(&cluster).await;
    let source = dir.path().join("chat");
    let mut ids = Vec::new();
    for day in 1..=20 {
        write_day(&source, day);
        let summary = backup_as(&repo, &source, "chat", Level::Incremental)
            .await
            .expect("backup");
        if day > 17 {
            keep_copy(&source, &dir.path().join(format!("day-{day}")));
        }
        ids.push(summary.snapshot_id);
    }
    let before = repo.stats(None).await.expect("stats");
    assert_eq!(before.snapshots, 20);

    let report = repo
        .forget(&ForgetOptions {
            dataset: Some("chat".into()),
            keep: KeepRules {
                last: 3,
                ..KeepRules::default()
            },
            ..ForgetOptions::default()
        })
        .await
        .expect("forget");
    assert_eq!(report.removed, 17);
    let kept: Vec<&str> = report
        .decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(
        kept,
        ids[17..].iter().map(String::as_str).collect::<Vec<_>>()
    );

    let pruned = repo.prune(false).await.expect("prune");
    assert!(
        pruned.packs_deleted + pruned.packs_repacked > 0,
        "{pruned:?}"
    );
    assert!(pruned.bytes_freed > 0, "{pruned:?}");

    // What the three kept snapshots need: every blob they reference.
    let mut needed = BTreeSet::new();
    for id in &ids[17..] {
        needed.extend(referenced_blobs(&repo, id).await);
    }
    let need = stored_bytes_of(&repo, &needed).await;
    let after = repo.stats(None).await.expect("stats");
    assert_eq!(after.snapshots, 3);
    // Live blobs: exactly the referenced ones, plus the three reference
    // lists (32 bytes per id, a few segments).
    let lists = 3 * (needed.len() as u64 * 32 + 4096);
    assert!(
        after.stored_bytes >= need && after.stored_bytes <= need + lists,
        "stored {} bytes, the three snapshots need {need}",
        after.stored_bytes
    );
    // Packs: no pack below the repack threshold (50% or more) survives.
    assert!(
        after.pack_bytes <= 2 * after.stored_bytes,
        "{} pack bytes hold {} live bytes",
        after.pack_bytes,
        after.stored_bytes
    );
    assert!(
        after.pack_bytes < before.pack_bytes / 2,
        "{before:?} -> {after:?}"
    );

    for (offset, day) in (18..=20).enumerate() {
        let copy = dir.path().join(format!("day-{day}")).join("chat");
        must_restore_identical(&repo, &ids[17 + offset], &copy, dir.path(), &[]).await;
    }
    let check = repo.check_packs(true).await.expect("check");
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    assert!(check.unrecoverable.is_empty());
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prune_in_a_loop_while_four_clients_back_up_never_loses_a_retained_snapshot() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start(dir.path(), |_| {}).await;
    let repo = must_init(&cluster).await;
    // What every client's data dedups against: a first snapshot that the
    // pruner forgets at once, so its blobs are garbage while the clients
    // find them in the index.
    let shared = dir.path().join("seed");
    std::fs::create_dir_all(&shared).expect("seed dir");
    for i in 0..6 {
        std::fs::write(
            shared.join(format!("shared-{i}.bin")),
            noise(900 + i, 150_000),
        )
        .expect("shared file");
    }
    let seed = backup_as(&repo, &shared, "seed", Level::Full)
        .await
        .expect("seed backup");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pruner = {
        let repo = repo.clone();
        let stop = stop.clone();
        let seed = seed.snapshot_id.clone();
        tokio::spawn(async move {
            repo.forget(&ForgetOptions {
                ids: vec![seed],
                ..ForgetOptions::default()
            })
            .await
            .expect("forget the seed");
            let mut rounds = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < 2 {
                for client in 0..4 {
                    repo.forget(&ForgetOptions {
                        dataset: Some(format!("client-{client}")),
                        keep: KeepRules {
                            last: 1,
                            ..KeepRules::default()
                        },
                        ..ForgetOptions::default()
                    })
                    .await
                    .expect("forget while backing up");
                }
                repo.prune(false).await.expect("prune while backing up");
                rounds += 1;
            }
            rounds
        })
    };

    let mut clients = Vec::new();
    for client in 0..4u64 {
        let repo = repo.clone();
        let base = dir.path().join(format!("client-{client}"));
        let shared = shared.clone();
        clients.push(tokio::spawn(async move {
            let mut last = None;
            for round in 0..4u64 {
                let source = base.join("data");
                let _ = std::fs::remove_dir_all(&source);
                std::fs::create_dir_all(&source).expect("source");
                // Half of the shared files, a different half each round.
                for i in 0..6 {
                    if (i + round + client) % 2 == 0 {
                        std::fs::copy(
                            shared.join(format!("shared-{i}.bin")),
                            source.join(format!("shared-{i}.bin")),
                        )
                        .expect("copy shared");
                    }
                }
                std::fs::write(
                    source.join("own.bin"),
                    noise(10_000 + client * 100 + round, 120_000),
                )
                .expect("own file");
                let summary = backup_as(
                    &repo,
                    &source,
                    &format!("client-{client}"),
                    Level::Incremental,
                )
                .await
                .unwrap_or_else(|e| panic!("client {client} round {round}: {e}"));
                let copy = keep_copy(&source, &base.join("last"));
                last = Some((summary.snapshot_id, copy));
            }
            (client, last.expect("four rounds"))
        }));
    }
    let mut latest = Vec::new();
    for client in clients {
        latest.push(client.await.expect("client task"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = pruner.await.expect("pruner task");
    assert!(rounds >= 2, "the pruner ran {rounds} rounds");

    // One final collection, then every retained snapshot restores byte for
    // byte, and every blob it references is still indexed.
    repo.prune(false).await.expect("final prune");
    for (_client, (snapshot, expected)) in latest {
        let referenced = referenced_blobs(&repo, &snapshot).await;
        assert!(stored_bytes_of(&repo, &referenced).await > 0);
        must_restore_identical(&repo, &snapshot, &expected, dir.path(), &[]).await;
    }
    let check = repo.check_packs(true).await.expect("check");
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_backup_leaves_packs_that_prune_removes_after_the_grace_period_never_before() {
    let grace = Duration::from_secs(8);
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start(dir.path(), |file| file.lifecycle.gc_grace = grace).await;
    let repo = must_init(&cluster).await;
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).expect("dir");
    std::fs::write(small.join("a.bin"), noise(1, 10_000)).expect("file");
    backup_as(&repo, &small, "small", Level::Full)
        .await
        .expect("first backup");
    let baseline = repo.stats(None).await.expect("stats");

    // A backup of 60 MB killed once its first packs are acknowledged.
    let big = dir.path().join("big");
    std::fs::create_dir_all(&big).expect("dir");
    for i in 0..6 {
        std::fs::write(big.join(format!("{i}.bin")), noise(100 + i, 10_000_000)).expect("file");
    }
    let progress = Arc::new(Progress::default());
    let task = {
        let repo = repo.clone();
        let big = big.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let options = BackupOptions {
                dataset: "big".into(),
                ..BackupOptions::default()
            };
            backup_paths(repo, &[big], &options, progress).await
        })
    };
    wait_until(
        "two packs of the doomed backup",
        Duration::from_secs(60),
        || {
            let progress = progress.clone();
            async move {
                let packs = progress.packs.load(std::sync::atomic::Ordering::Relaxed);
                if packs >= 2 {
                    Ok(())
                } else {
                    Err(format!("{packs} pack(s) acknowledged"))
                }
            }
        },
    )
    .await;
    task.abort();
    let _ = task.await;
    // An upload the node had already taken in may still land.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let orphaned = repo.stats(None).await.expect("stats");
    assert!(
        orphaned.packs > baseline.packs,
        "{baseline:?} -> {orphaned:?}"
    );

    let early = repo
        .prune(false)
        .await
        .expect("prune within the grace period");
    assert_eq!(early.packs_deleted, 0, "{early:?}");
    assert!(early.packs_in_grace > 0, "{early:?}");
    assert_eq!(repo.stats(None).await.expect("stats").packs, orphaned.packs);

    tokio::time::sleep(grace + Duration::from_secs(2)).await;
    let late = repo
        .prune(false)
        .await
        .expect("prune after the grace period");
    assert!(
        late.packs_deleted >= orphaned.packs - baseline.packs,
        "{late:?}"
    );
    let after = repo.stats(None).await.expect("stats");
    assert_eq!(after.packs, baseline.packs, "{baseline:?} -> {after:?}");
    must_restore_identical(&repo, "latest", &small, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locks_compliance_survives_cluster_admin_and_governance_yields_only_to_the_bypass() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = LocalCluster::start_secure(dir.path(), &[2, 2, 2], "4+2", |_| {})
        .await
        .expect("cluster starts");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("ready");
    // The tenant's admin (not cluster-admin) makes the backups and locks.
    let root = must_init(&cluster).await;
    let admin_token = must_create_token(&cluster, "admin", TENANT).await;
    let admin = Arc::new(
        Repository::open(client_with_token(&cluster, &admin_token), TENANT, PASSWORD)
            .await
            .expect("admin opens"),
    );
    let source = dir.path().join("src");
    let mut ids = Vec::new();
    for day in 1..=3 {
        write_day(&source, day);
        ids.push(
            backup_as(&admin, &source, "chat", Level::Incremental)
                .await
                .expect("backup")
                .snapshot_id,
        );
    }
    let (compliance, governance) = (&ids[0], &ids[1]);
    admin
        .lock(
            compliance,
            LockUntil::For(Duration::from_secs(3600)),
            LockMode::Compliance,
        )
        .await
        .expect("compliance lock");
    admin
        .lock(
            governance,
            LockUntil::For(Duration::from_secs(3600)),
            LockMode::Governance,
        )
        .await
        .expect("governance lock");

    // A retention rule never removes a locked snapshot.
    let report = admin
        .forget(&ForgetOptions {
            dataset: Some("chat".into()),
            keep: KeepRules {
                last: 1,
                ..KeepRules::default()
            },
            ..ForgetOptions::default()
        })
        .await
        .expect("forget by rule");
    assert_eq!(report.removed, 0, "{report:?}");
    assert!(report.decisions.iter().all(|d| d.keep), "{report:?}");

    let by_id = |id: &str, bypass: bool| ForgetOptions {
        ids: vec![id.to_string()],
        bypass_governance: bypass,
        ..ForgetOptions::default()
    };
    // Compliance: nobody, not even cluster-admin with the bypass.
    root.forget(&by_id(compliance, true))
        .await
        .expect_err("compliance lock holds against cluster-admin");
    root.unlock(compliance, true)
        .await
        .expect_err("compliance lock cannot be removed");
    // Governance: not the tenant's admin, not cluster-admin without the bypass.
    admin
        .forget(&by_id(governance, false))
        .await
        .expect_err("governance holds against admin");
    admin
        .unlock(governance, false)
        .await
        .expect_err("admin cannot unlock governance");
    admin
        .unlock(governance, true)
        .await
        .expect_err("admin has no bypass");
    root.unlock(governance, false)
        .await
        .expect_err("cluster-admin needs the bypass");
    root.unlock(governance, true)
        .await
        .expect("cluster-admin with the bypass");
    admin
        .forget(&by_id(governance, false))
        .await
        .expect("unlocked snapshot can be forgotten");
    let left: Vec<String> = admin
        .snapshots(Some("chat"))
        .await
        .expect("list")
        .iter()
        .map(|s| s.id_hex())
        .collect();
    assert_eq!(left, vec![compliance.clone(), ids[2].clone()]);
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forgotten_and_pruned_files_leave_no_shard_on_any_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = start(dir.path(), |_| {}).await;
    let repo = must_init(&cluster).await;
    let source = dir.path().join("users");
    std::fs::create_dir_all(&source).expect("dir");
    // A user's data among others': incompressible canaries of a few chunks,
    // in the same backup (and so the same packs) as data that stays.
    for i in 0..20 {
        std::fs::write(source.join(format!("other-{i}.bin")), noise(i, 100_000)).expect("file");
    }
    for i in 0..3 {
        std::fs::write(
            source.join(format!("user-42-{i}.bin")),
            noise(4200 + i, 90_000),
        )
        .expect("canary");
    }
    let first = backup_as(&repo, &source, "users", Level::Full)
        .await
        .expect("backup with the user's files");

    // The blob ids of the user's files, followed through the tree.
    let with_user = referenced_blobs(&repo, &first.snapshot_id).await;
    for i in 0..3 {
        std::fs::remove_file(source.join(format!("user-42-{i}.bin"))).expect("user leaves");
    }
    let second = backup_as(&repo, &source, "users", Level::Incremental)
        .await
        .expect("backup without them");
    let without_user = referenced_blobs(&repo, &second.snapshot_id).await;
    let only_user: Vec<BlobId> = with_user.difference(&without_user).copied().collect();
    assert!(
        only_user.len() >= 3,
        "the user's files make blobs of their own"
    );
    let located = repo.locate(&only_user).await.expect("indexed before");
    let packs: BTreeMap<[u8; 32], ()> = located.values().map(|l| (l.pack_id, ())).collect();
    for pack in packs.keys() {
        assert!(
            !shard_files_of(&cluster, pack).is_empty(),
            "shards on disk before"
        );
    }

    repo.forget(&ForgetOptions {
        ids: vec![first.snapshot_id.clone()],
        ..ForgetOptions::default()
    })
    .await
    .expect("forget the snapshot that held them");
    repo.prune(false).await.expect("prune");

    for id in &only_user {
        repo.locate(std::slice::from_ref(id))
            .await
            .expect_err("the user's blob is gone from the index");
    }
    for pack in packs.keys() {
        let left = shard_files_of(&cluster, pack);
        assert!(
            left.is_empty(),
            "shards of a pack that held the user's blobs remain: {left:?}"
        );
    }
    // Whatever still holds live data was rewritten without the user's blobs.
    let live: HashSet<[u8; 32]> = repo
        .locate(&without_user.iter().copied().collect::<Vec<_>>())
        .await
        .expect("the rest is indexed")
        .values()
        .map(|l| l.pack_id)
        .collect();
    assert!(packs.keys().all(|p| !live.contains(p)));
    must_restore_identical(&repo, &second.snapshot_id, &source, dir.path(), &[]).await;
    cluster.shutdown().await.expect("shutdown");
}
