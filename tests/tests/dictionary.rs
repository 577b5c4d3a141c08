//! Compression dictionaries end to end on a three-region cluster: a first
//! backup of chat data trains and stores one for its dataset, a fresh
//! process restores byte for byte with it, and a chunk compressed with one
//! dataset's dictionary stays readable from another dataset after every
//! snapshot of the first is forgotten and pruned (dictionaries are tenant
//! metadata, never garbage collected).

use std::path::Path;
use std::time::Duration;

use cairn_client::Repository;
use cairn_client::lifecycle::ForgetOptions;
use cairn_proto::v1 as pb;
use cairn_tests::*;

/// JSON lines that compress, different for each seed, `mib` MiB in
/// several files.
fn write_chat(dir: &Path, mib: usize, seed: u64) {
    std::fs::create_dir_all(dir).expect("dir");
    let words = [
        "hello", "there", "lunch", "meeting", "deploy", "coffee", "tomorrow", "ok", "thanks",
        "review", "please", "merged", "ship", "it", "friday", "release",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for file in 0..8 {
        let mut out = String::new();
        let mut ts = 1_700_000_000_000u64 + seed * 1_000_000;
        while out.len() < mib * 1024 * 1024 / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ts += x % 60_000;
            let n = 2 + (x % 11) as usize;
            let text: Vec<&str> = (0..n)
                .map(|j| words[((x >> (j * 4)) % words.len() as u64) as usize])
                .collect();
            out.push_str(&format!(
                "{{\"id\":\"{:016x}\",\"ts\":{ts},\"room\":\"room-{file}\",\"user\":{{\"id\":{},\"name\":\"user{}\"}},\"type\":\"message\",\"text\":\"{}\"}}\n",
                x,
                (x >> 20) % 700,
                (x >> 20) % 700,
                text.join(" ")
            ));
        }
        std::fs::write(dir.join(format!("room-{file}.jsonl")), out).expect("write");
    }
}

async fn dictionaries(repo: &Repository) -> Vec<pb::DictionaryInfo> {
    let tenant = repo.tenant().to_string();
    repo.cluster()
        .call("list dictionaries", |mut c| {
            let request = pb::ListDictionariesRequest {
                tenant: tenant.clone(),
            };
            async move { c.list_dictionaries(request).await }
        })
        .await
        .expect("listed")
        .dictionaries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dataset_dictionary_is_stored_used_and_outlives_its_dataset() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = must_start_tuned(dir.path(), &[2, 2, 2], |file| {
        file.lifecycle.gc_grace = Duration::ZERO
    })
    .await;
    let repo = must_init(&cluster).await;

    // First backup of "a": trains, stores, then compresses with it.
    let source = dir.path().join("chat");
    write_chat(&source, 24, 1);
    must_backup(&repo, &source, "a").await;
    let listed = dictionaries(&repo).await;
    assert_eq!(listed.len(), 1, "one dictionary, for dataset a");
    assert_eq!(listed[0].dataset, "a");
    assert_eq!(listed[0].id.len(), 32);
    // Sealed: it opens only with the key, and is not the plaintext.
    assert!(listed[0].sealed.len() > 1024);
    assert!(!listed[0].sealed.windows(9).any(|w| w == b"\"room\":\"r"));

    // A second backup of "a" with new data uses the same dictionary.
    let more = dir.path().join("more");
    write_chat(&more, 8, 2);
    must_backup(&repo, &more, "a").await;
    assert_eq!(dictionaries(&repo).await.len(), 1);

    // A fresh process (a new repository handle) restores byte for byte.
    let fresh = must_open(&cluster).await;
    must_restore_identical(&fresh, "latest", &more, dir.path(), &[]).await;
    let snapshots = fresh.snapshots(Some("a")).await.expect("list");
    must_restore_identical(&fresh, &snapshots[0].id_hex(), &source, dir.path(), &[]).await;

    // Dataset "b" holds the same files: its chunks deduplicate into the
    // ones compressed with a's dictionary.
    must_backup(&fresh, &source, "b").await;
    // Forget every snapshot of "a" and prune with no grace: a's dictionary
    // must survive, as b's chunks need it.
    let report = fresh
        .forget(&ForgetOptions {
            dataset: Some("a".into()),
            ids: snapshots.iter().map(|s| s.id_hex()).collect(),
            ..ForgetOptions::default()
        })
        .await
        .expect("forget a");
    assert_eq!(report.removed, 2, "{report:?}");
    let pruned = fresh.prune(false).await.expect("prune");
    assert!(pruned.bytes_freed > 0, "{pruned:?}");
    assert!(
        dictionaries(&fresh)
            .await
            .iter()
            .any(|d| d.dataset == "a" && d.id == listed[0].id),
        "a's dictionary is tenant metadata and stays"
    );
    let again = must_open(&cluster).await;
    must_restore_identical(&again, "latest", &source, dir.path(), &[]).await;
    let check = again.check_packs(true).await.expect("check");
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    cluster.shutdown().await.expect("shutdown");
}
