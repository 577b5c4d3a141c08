//! `cairn check`'s one pass, shared by the command and the agent's check
//! jobs: the nodes verify the pack index (and shards, all or a slice), the
//! client walks every snapshot's trees and locates their chunks, and files
//! in unrecoverable packs are named.

use cairn_client::repo::DataRead;
use cairn_client::restore;
use cairn_client::tree::EntryKind;

/// What one check found.
pub struct CheckOutcome {
    pub snapshots: usize,
    pub packs_checked: u64,
    /// Packs whose shards were read (all of them, or the slice's).
    pub packs_read: u64,
    pub shards_checked: u64,
    /// Every problem, misplaced packs included (each is a problem too).
    pub problems: Vec<serde_json::Value>,
    /// Packs a region loss would make unrecoverable (hex ids).
    pub misplaced: Vec<String>,
    /// Files that unrecoverable packs hold.
    pub affected: Vec<AffectedFile>,
}

/// A file that cannot be restored because a pack it needs is lost.
#[derive(serde::Serialize)]
pub struct AffectedFile {
    pub snapshot: String,
    pub dataset: String,
    pub path: String,
    /// The unrecoverable packs holding its chunks (hex ids).
    pub packs: Vec<String>,
}

/// The files of `snapshot` with at least one chunk in a pack of `lost`, each
/// with the lost packs it needs (what `check` names when data is lost).
fn files_in_packs(
    snapshot: &cairn_client::Snapshot,
    items: &[restore::Item],
    located: &std::collections::HashMap<cairn_client::seal::BlobId, cairn_client::repo::Located>,
    lost: &std::collections::HashSet<[u8; 32]>,
) -> Vec<AffectedFile> {
    items
        .iter()
        .filter_map(|item| {
            let EntryKind::File { chunks, .. } = &item.entry.kind else {
                return None;
            };
            let packs: std::collections::BTreeSet<String> = chunks
                .iter()
                .filter_map(|c| located.get(&c.id))
                .filter(|l| lost.contains(&l.pack_id))
                .map(|l| hex::encode(l.pack_id))
                .collect();
            (!packs.is_empty()).then(|| AffectedFile {
                snapshot: snapshot.id_hex(),
                dataset: snapshot.dataset.clone(),
                path: item.path_string(),
                packs: packs.into_iter().collect(),
            })
        })
        .collect()
}

/// Checks the index of every pack, the data `read` asks for, and every
/// snapshot's trees with their chunks located: what `cairn check` and the
/// agent's check jobs report.
pub async fn check_once(
    repo: &cairn_client::Repository,
    read: DataRead,
) -> anyhow::Result<CheckOutcome> {
    let mut problems: Vec<serde_json::Value> = Vec::new();
    let reply = repo.check_packs_reading(read).await?;
    // Packs with fewer than k good shards: the files they hold are named below.
    let unrecoverable: std::collections::HashSet<[u8; 32]> = reply
        .unrecoverable
        .iter()
        .filter_map(|p| <[u8; 32]>::try_from(p.as_slice()).ok())
        .collect();
    let mut affected: Vec<AffectedFile> = Vec::new();
    // Trees: every snapshot's trees decode and every chunk is indexed.
    let snapshots = repo.snapshots(None).await?;
    for snapshot in &snapshots {
        match restore::walk(repo, snapshot, &[]).await {
            Ok(items) => {
                let ids: Vec<_> = items
                    .iter()
                    .flat_map(|i| match &i.entry.kind {
                        EntryKind::File { chunks, .. } => chunks.iter().map(|c| c.id).collect(),
                        _ => Vec::new(),
                    })
                    .collect();
                match repo.locate(&ids).await {
                    Ok(located) if !unrecoverable.is_empty() => {
                        affected.extend(files_in_packs(snapshot, &items, &located, &unrecoverable));
                    }
                    Ok(_) => {}
                    Err(e) => problems.push(
                        serde_json::json!({"snapshot": snapshot.id_hex(), "fault": e.to_string()}),
                    ),
                }
            }
            Err(e) => problems
                .push(serde_json::json!({"snapshot": snapshot.id_hex(), "dataset": snapshot.dataset, "fault": format!("directory trees unreadable: {e}")})),
        }
    }
    for p in &reply.problems {
        problems.push(serde_json::json!({
            "node": p.node_id, "pack": hex::encode(&p.pack_id), "shard": p.shard_index, "fault": p.fault}));
    }
    for pack in &reply.unrecoverable {
        problems.push(serde_json::json!({"pack": hex::encode(pack), "fault": "unrecoverable: fewer than k good shards"}));
    }
    let misplaced: Vec<String> = reply.misplaced.iter().map(hex::encode).collect();
    for pack in &misplaced {
        problems.push(serde_json::json!({"pack": pack, "class": "misplaced",
            "fault": "misplaced: more than m shards in one region, a region loss would make it unrecoverable; awaiting rebalance"}));
    }
    Ok(CheckOutcome {
        affected,
        snapshots: snapshots.len(),
        packs_checked: reply.packs_checked,
        packs_read: reply.packs_read,
        shards_checked: reply.shards_checked,
        problems,
        misplaced,
    })
}
