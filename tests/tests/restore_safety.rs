//! Restores that can be trusted: every name Linux allows round-trips, hard
//! links, FIFOs, sparse and empty files come back as they were, a lost data
//! pack fails only its own files (named, with the pack id), an interrupted
//! restore leaves every file old or complete, existing links at restored
//! names are replaced and never written through, and open files stay
//! bounded whatever the number of files.
//!
//! The tests of this file run one at a time (they share [`SERIAL`]): one of
//! them lowers the process's open-file limit.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cairn_cli::verify::compare_dirs;
use cairn_client::backup::{BackupOptions, BackupSummary, Progress, backup_paths};
use cairn_client::restore::{self, RestoreOptions, RestoreSummary};
use cairn_client::tree::EntryKind;
use cairn_client::{ClientError, Repository, Snapshot};
use cairn_node::local_cluster::wait_until;
use cairn_tests::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

async fn snapshot(repo: &Repository, summary: &BackupSummary) -> Snapshot {
    repo.find_snapshot(&summary.snapshot_id, None)
        .await
        .expect("snapshot is listed")
}

fn fast() -> RestoreOptions {
    RestoreOptions {
        no_fsync: true,
        ..RestoreOptions::default()
    }
}

async fn restore_report(repo: &Repository, snapshot: &Snapshot, target: &Path) -> RestoreSummary {
    restore::restore_report(
        repo,
        snapshot,
        target,
        &fast(),
        Arc::new(Progress::default()),
    )
    .await
    .expect("restore runs to the end")
}

fn must_be_identical(source: &Path, restored: &Path) {
    let differences = compare_dirs(source, restored);
    assert!(
        differences.is_empty(),
        "restore differs from source: {differences:?}"
    );
}

fn temp_files_under(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b".cairn-restore-"))
        })
        .collect()
}

/// The names Linux allows that a restore once refused or mangled.
fn awkward_names() -> Vec<Vec<u8>> {
    vec![
        b"a\\b".to_vec(),
        b"line\nbreak".to_vec(),
        b":*?\"<>|".to_vec(),
        b"-rf".to_vec(),
        b" spaced ".to_vec(),
        b"\xff\xfe not utf-8".to_vec(),
        "日志.jsonl".as_bytes().to_vec(),
        vec![b'n'; 255],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn awkward_names_hardlinks_fifo_sparse_and_empty_files_round_trip() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let repo = must_init(&cluster).await;

    let source = dir.path().join("src");
    std::fs::create_dir_all(&source).expect("mkdir");
    for (i, name) in awkward_names().iter().enumerate() {
        std::fs::write(source.join(os(name)), format!("file {i}\n").repeat(i + 1)).expect("write");
    }
    let odd_dir = source.join(os(b"dir\xc3("));
    std::fs::create_dir(&odd_dir).expect("mkdir");
    std::fs::write(odd_dir.join("inner"), b"inner").expect("write");
    // Three names of one inode, one of them in a subdirectory.
    std::fs::write(source.join("linked-1"), b"one inode, three names").expect("write");
    std::fs::hard_link(source.join("linked-1"), source.join("linked-2")).expect("link");
    std::fs::hard_link(source.join("linked-1"), odd_dir.join("linked-3")).expect("link");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        source.join("pipe"),
        rustix::fs::Mode::from_raw_mode(0o640),
    )
    .expect("mkfifo");
    // Sparse: 8 MiB with two islands of data.
    let sparse = std::fs::File::create(source.join("sparse")).expect("create");
    sparse.set_len(8 << 20).expect("size");
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 4 << 20).expect("write");
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", (8 << 20) - 3).expect("write");
    drop(sparse);
    std::fs::write(source.join("empty"), b"").expect("write");
    std::fs::create_dir(source.join("empty-dir")).expect("mkdir");
    std::os::unix::fs::symlink(os(b"\xff/nowhere"), source.join("odd-link")).expect("symlink");
    let socket = std::os::unix::net::UnixListener::bind(source.join("sock")).expect("bind");

    let summary = must_backup(&repo, &source, "awkward").await;
    assert!(
        summary
            .skipped
            .iter()
            .any(|s| s.path.ends_with("/sock") && s.reason.contains("socket")),
        "the socket is named as skipped: {:?}",
        summary.skipped
    );
    drop(socket);
    std::fs::remove_file(source.join("sock")).expect("socket removed");
    let snap = snapshot(&repo, &summary).await;

    // The listing holds every name as bytes, the FIFO and the link groups.
    let items = restore::walk(&repo, &snap, &[]).await.expect("walk");
    for name in awkward_names() {
        assert!(
            items
                .iter()
                .any(|i| i.path == [b"src".to_vec(), name.clone()]),
            "{:?} is listed",
            String::from_utf8_lossy(&name)
        );
    }
    assert!(
        items
            .iter()
            .any(|i| i.path_string() == "src/pipe" && matches!(i.entry.kind, EntryKind::Fifo))
    );
    let groups: Vec<Option<u64>> = items
        .iter()
        .filter(|i| i.path.last().is_some_and(|n| n.starts_with(b"linked-")))
        .map(|i| match i.entry.kind {
            EntryKind::File { hardlink, .. } => hardlink,
            _ => None,
        })
        .collect();
    assert_eq!(groups.len(), 3);
    assert!(groups[0].is_some() && groups.iter().all(|g| *g == groups[0]));
    assert!(
        items.iter().all(|i| !i.path_string().ends_with("sock")),
        "the socket is not in the snapshot"
    );

    // Restore over hostile leftovers: a symlink and a hard link to files
    // outside the target sit at two restored names.
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("victim-1"), b"must not change").expect("write");
    std::fs::write(outside.join("victim-2"), b"must not change").expect("write");
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("src")).expect("mkdir");
    std::os::unix::fs::symlink(
        outside.join("victim-1"),
        target.join("src").join(os(b"a\\b")),
    )
    .expect("symlink");
    std::fs::hard_link(outside.join("victim-2"), target.join("src/-rf")).expect("link");
    let report = restore_report(&repo, &snap, &target).await;
    assert!(
        report.failed.is_empty(),
        "nothing fails: {:?}",
        report.failed
    );
    assert_eq!(report.hardlinks, 2, "two names restored as links");
    assert_eq!(report.special, 1, "the FIFO is restored");
    must_be_identical(&source, &target.join("src"));
    for victim in ["victim-1", "victim-2"] {
        assert_eq!(
            std::fs::read(outside.join(victim)).expect("read"),
            b"must not change",
            "{victim} was written through"
        );
    }
    let restored = std::fs::metadata(target.join("src/sparse")).expect("stat");
    assert!(
        restored.blocks() * 512 < restored.len() / 2,
        "the sparse file stays sparse ({} blocks for {} bytes)",
        restored.blocks(),
        restored.len()
    );
    assert!(temp_files_under(&target).is_empty());

    // A directory that exists as a symlink is refused, with all below it.
    let target2 = dir.path().join("target2");
    let outside2 = dir.path().join("outside2");
    std::fs::create_dir_all(target2.join("src")).expect("mkdir");
    std::fs::create_dir(&outside2).expect("mkdir");
    std::os::unix::fs::symlink(&outside2, target2.join("src").join(os(b"dir\xc3(")))
        .expect("symlink");
    let report = restore_report(&repo, &snap, &target2).await;
    assert!(
        report.failed.iter().any(|f| f.path == "src/dir\\xc3("),
        "the symlinked directory is named: {:?}",
        report.failed
    );
    assert_eq!(
        std::fs::read_dir(&outside2).expect("readable").count(),
        0,
        "nothing was written through the symlink"
    );
    assert!(restore::failures_to_error(&report).is_err());

    // --include globs select non-UTF-8 names by their bytes.
    let target3 = dir.path().join("target3");
    let options = RestoreOptions {
        include: vec!["src/dir*".into()],
        ..fast()
    };
    let report = restore::restore(&repo, &snap, &target3, &options, Default::default())
        .await
        .expect("partial restore");
    assert_eq!(report.files, 2, "inner and linked-3");
    must_be_identical(&odd_dir, &target3.join("src").join(os(b"dir\xc3(")));
    assert!(!target3.join("src/sparse").exists());

    // --exclude and --exclude-file, restic's meaning.
    let exclude_file = dir.path().join("excludes");
    std::fs::write(&exclude_file, "# no logs\n\n*.jsonl\n").expect("write");
    let mut excludes = cairn_client::backup::read_exclude_file(&exclude_file).expect("read");
    excludes.push("sparse".into());
    excludes.push(format!("{}/empty-dir", source.display()));
    let options = BackupOptions {
        dataset: "excluded".into(),
        excludes,
        ..BackupOptions::default()
    };
    let summary = backup_paths(
        repo.clone(),
        std::slice::from_ref(&source),
        &options,
        Arc::new(Progress::default()),
    )
    .await
    .expect("backup with excludes");
    let snap = snapshot(&repo, &summary).await;
    let names: Vec<String> = restore::walk(&repo, &snap, &[])
        .await
        .expect("walk")
        .iter()
        .map(|i| i.path_string())
        .collect();
    for gone in ["src/日志.jsonl", "src/sparse", "src/empty-dir"] {
        assert!(
            !names.iter().any(|n| n == gone),
            "{gone} is excluded: {names:?}"
        );
    }
    for kept in ["src/empty", "src/linked-1", "src/a\\b"] {
        assert!(names.iter().any(|n| n == kept), "{kept} is kept: {names:?}");
    }
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_data_pack_fails_only_its_files_which_are_named() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let repo = must_init(&cluster).await;

    // Files of `a/` go into the first backup's data pack; the second backup
    // reuses them and adds `b/` in a new pack.
    let source = dir.path().join("src");
    std::fs::create_dir_all(source.join("a")).expect("mkdir");
    for i in 0..20 {
        std::fs::write(
            source.join(format!("a/old-{i}")),
            format!("old {i}\n").repeat(50),
        )
        .expect("write");
    }
    let first = must_backup(&repo, &source, "packs").await;
    std::fs::create_dir_all(source.join("b")).expect("mkdir");
    for i in 0..20 {
        std::fs::write(
            source.join(format!("b/new-{i}")),
            format!("new {i}\n").repeat(60),
        )
        .expect("write");
    }
    let second = must_backup(&repo, &source, "packs").await;
    assert_eq!(second.parent.as_deref(), Some(first.snapshot_id.as_str()));
    let snap = snapshot(&repo, &second).await;

    // The data pack of `a/`.
    let items = restore::walk(&repo, &snap, &[]).await.expect("walk");
    let chunk_of = |path: &str| {
        items
            .iter()
            .find(|i| i.path_string() == path)
            .and_then(|i| match &i.entry.kind {
                EntryKind::File { chunks, .. } => chunks.first().map(|c| c.id),
                _ => None,
            })
            .expect("file with a chunk")
    };
    let located = repo
        .locate(&[chunk_of("src/a/old-0"), chunk_of("src/b/new-0")])
        .await
        .expect("located");
    let lost_pack = located[&chunk_of("src/a/old-0")].pack_id;
    assert_ne!(lost_pack, located[&chunk_of("src/b/new-0")].pack_id);
    let lost_hex = hex_id(&lost_pack);

    // Delete m+1 = 3 of its 6 shards: the pack is unreadable.
    let mut shards: Vec<PathBuf> = Vec::new();
    for id in cluster.members().keys() {
        shards.extend(
            files_under(&cluster.data_dir(*id).join("shards"))
                .into_iter()
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{lost_hex}.")))
                }),
        );
    }
    assert_eq!(shards.len(), 6, "4+2 shards of the pack: {shards:?}");
    for shard in &shards[..3] {
        std::fs::remove_file(shard).expect("shard deleted");
    }

    // The user's old copies of the lost files stay as they were.
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("src/a")).expect("mkdir");
    for i in 0..10 {
        std::fs::write(target.join(format!("src/a/old-{i}")), b"the user's copy").expect("write");
    }
    let report = restore_report(&repo, &snap, &target).await;
    let failed: Vec<&str> = report.failed.iter().map(|f| f.path.as_str()).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("src/a/old-{i}")).collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        failed, expected_sorted,
        "exactly the files of the lost pack fail"
    );
    for failure in &report.failed {
        assert!(
            failure.reason.contains(&lost_hex),
            "the failure names the pack: {failure:?}"
        );
    }
    for (i, name) in expected.iter().enumerate() {
        let now = std::fs::read(target.join(name));
        if i < 10 {
            assert_eq!(
                now.expect("kept"),
                b"the user's copy",
                "{name} keeps its old copy"
            );
        } else {
            assert!(now.is_err(), "{name} is absent, not zero-filled");
        }
    }
    for i in 0..20 {
        let name = format!("b/new-{i}");
        assert_eq!(
            std::fs::read(target.join("src").join(&name)).expect("restored"),
            std::fs::read(source.join(&name)).expect("source"),
            "{name} restored byte for byte"
        );
    }
    assert!(temp_files_under(&target).is_empty());
    let err = restore::restore(
        &repo,
        &snap,
        &dir.path().join("target-b"),
        &fast(),
        Default::default(),
    )
    .await
    .expect_err("a restore with lost files is an error");
    assert!(
        matches!(err, ClientError::RestoreFailed { count: 20, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&lost_hex), "{err}");

    // `cairn check` names the lost pack and exactly the files (and the
    // snapshots) it takes with it.
    let (code, stdout, stderr) = cairn(
        &cluster,
        1024,
        &[
            OsStr::new("check"),
            OsStr::new("--read-data"),
            OsStr::new("--json"),
        ],
    );
    assert_eq!(
        code,
        1,
        "a lost pack fails the check: {stderr}\n{}",
        String::from_utf8_lossy(&stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&stdout).expect("check --json");
    let mut affected: Vec<(String, String)> = report["affected_files"]
        .as_array()
        .expect("affected_files")
        .iter()
        .map(|f| {
            assert_eq!(f["packs"], serde_json::json!([lost_hex]), "{f}");
            (
                f["snapshot"].as_str().expect("snapshot").to_string(),
                f["path"].as_str().expect("path").to_string(),
            )
        })
        .collect();
    affected.sort();
    let mut wanted: Vec<(String, String)> = [&first.snapshot_id, &second.snapshot_id]
        .into_iter()
        .flat_map(|snapshot| {
            expected_sorted
                .iter()
                .map(move |path| (snapshot.clone(), path.clone()))
        })
        .collect();
    wanted.sort();
    assert_eq!(affected, wanted, "both snapshots' files of the lost pack");
    cluster.shutdown().await.expect("shutdown");
}

fn hex_id(id: &[u8; 32]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interrupted_restore_leaves_every_file_old_or_complete() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let repo = must_init(&cluster).await;

    let source = dir.path().join("src");
    std::fs::create_dir_all(&source).expect("mkdir");
    // Many small files in one pack, each fsynced: writing takes seconds,
    // so the abort lands while some files are new and others still old.
    let count = 2000;
    for i in 0..count {
        let seed = blake3::hash(format!("new {i}").as_bytes());
        let mut data = vec![0u8; 1024];
        seed_fill(&mut data, seed.as_bytes());
        std::fs::write(source.join(format!("f-{i:04}")), data).expect("write");
    }
    let summary = must_backup(&repo, &source, "interrupt").await;
    let snap = snapshot(&repo, &summary).await;

    // The user's old copies.
    let target = dir.path().join("target");
    std::fs::create_dir_all(target.join("src")).expect("mkdir");
    for i in 0..count {
        std::fs::write(
            target.join(format!("src/f-{i:04}")),
            format!("old copy {i}"),
        )
        .expect("write");
    }
    let progress = Arc::new(Progress::default());
    let task = {
        let repo = repo.clone();
        let target = target.clone();
        let progress = progress.clone();
        // With fsync, as users restore.
        tokio::spawn(async move {
            restore::restore(&repo, &snap, &target, &RestoreOptions::default(), progress).await
        })
    };
    // Abort as soon as data is being written.
    wait_until("the restore writes data", Duration::from_secs(60), || {
        let written = progress.bytes.load(Ordering::Relaxed);
        let finished = task.is_finished();
        async move {
            if written > 0 || finished {
                Ok(())
            } else {
                Err("no byte written yet".to_string())
            }
        }
    })
    .await;
    task.abort();
    let _ = task.await;
    // Temporary files go when the last writer lets go of the restore.
    wait_until("temporary files removed", Duration::from_secs(30), || {
        let left = temp_files_under(&target);
        async move {
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{} left", left.len()))
            }
        }
    })
    .await;
    let (mut old, mut new) = (0, 0);
    for i in 0..count {
        let name = format!("src/f-{i:04}");
        let restored = std::fs::read(target.join(&name)).expect("the file is still there");
        if restored == format!("old copy {i}").as_bytes() {
            old += 1;
        } else {
            assert_eq!(
                restored,
                std::fs::read(source.join(format!("f-{i:04}"))).expect("source"),
                "{name} is neither its old copy nor complete"
            );
            new += 1;
        }
    }
    tracing::info!(old, new, "after the interrupted restore");
    assert!(old > 0, "the restore was interrupted before it finished");
    // A complete restore afterwards replaces every old copy.
    let snap = snapshot(&repo, &summary).await;
    let report = restore_report(&repo, &snap, &target).await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    must_be_identical(&source, &target.join("src"));
    cluster.shutdown().await.expect("shutdown");
}

fn seed_fill(data: &mut [u8], seed: &[u8; 32]) {
    let mut reader = blake3::Hasher::new_keyed(seed).finalize_xof();
    reader.fill(data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_small_files_restore_under_a_low_open_file_limit() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let repo = must_init(&cluster).await;

    let files = 100_000;
    let dirs = 300;
    let source = dir.path().join("src");
    for d in 0..dirs {
        std::fs::create_dir_all(source.join(format!("d{d:03}"))).expect("mkdir");
    }
    for i in 0..files {
        // 4096 distinct contents of 16 to 2,000 bytes: every file's bytes
        // are checked, and backup stays quick through deduplication.
        let k = i % 4096;
        let body = format!("content {k:04}\n").repeat(1 + k % 150);
        std::fs::write(source.join(format!("d{:03}/f{i:06}", i % dirs)), body).expect("write");
    }
    let summary = must_backup(&repo, &source, "many").await;
    assert_eq!(summary.files, files as u64);
    let snap = snapshot(&repo, &summary).await;

    // Far fewer descriptors than files: the restore must not need one per file.
    let open_now = std::fs::read_dir("/proc/self/fd").expect("fds").count() as u64;
    let old = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let low = rustix::process::Rlimit {
        current: Some(open_now + 256),
        maximum: old.maximum,
    };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, low).expect("lower the limit");
    let target = dir.path().join("target");
    let result = restore::restore(&repo, &snap, &target, &fast(), Default::default()).await;
    rustix::process::setrlimit(rustix::process::Resource::Nofile, old).expect("limit restored");
    let restored = result.expect("restore succeeds under the low limit");
    assert_eq!(restored.files, files as u64);
    must_be_identical(&source, &target.join("src"));
    cluster.shutdown().await.expect("shutdown");
}

/// A name Linux allows: any bytes but `/` and NUL, not `.` or `..`.
fn linux_name() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    proptest::collection::vec(any::<u8>(), 1..=64).prop_filter_map("not a Linux name", |mut n| {
        n.retain(|&b| b != b'/' && b != 0);
        (!n.is_empty() && n != b"." && n != b"..").then_some(n)
    })
}

/// Backup walk → tree encode/decode → restore writer, with arbitrary byte
/// names, against a real cluster (one for all cases).
#[test]
fn arbitrary_byte_names_round_trip() {
    use proptest::test_runner::{Config, TestRunner};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let _serial = runtime.block_on(SERIAL.lock());
    let dir = tempfile::tempdir().expect("tempdir");
    let (cluster, repo) = runtime.block_on(async {
        let cluster = must_start_cluster(&dir.path().join("cluster")).await;
        let repo = must_init(&cluster).await;
        (cluster, repo)
    });
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::btree_set(linux_name(), 1..10),
        proptest::collection::btree_set(linux_name(), 0..4),
    );
    let cases = std::sync::atomic::AtomicUsize::new(0);
    let result = runner.run(&strategy, |(names, sub_names)| {
        let case = cases.fetch_add(1, Ordering::Relaxed);
        let source = dir.path().join(format!("case-{case}")).join("src");
        std::fs::create_dir_all(&source).expect("mkdir");
        for (i, name) in names.iter().enumerate() {
            let path = source.join(os(name));
            if i == 0 {
                // One directory with its own arbitrary names.
                std::fs::create_dir(&path).expect("mkdir");
                for sub in &sub_names {
                    std::fs::write(path.join(os(sub)), sub).expect("write");
                }
            } else {
                std::fs::write(&path, name.repeat(i)).expect("write");
            }
        }
        let differences = runtime.block_on(async {
            let summary = must_backup(&repo, &source, &format!("prop-{case}")).await;
            let snap = snapshot(&repo, &summary).await;
            let target = dir.path().join(format!("case-{case}")).join("target");
            let report = restore_report(&repo, &snap, &target).await;
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            compare_dirs(&source, &target.join("src"))
        });
        proptest::prop_assert!(differences.is_empty(), "{:?}", differences);
        Ok(())
    });
    runtime.block_on(cluster.shutdown()).expect("shutdown");
    if let Err(e) = result {
        panic!("byte names did not round-trip: {e}");
    }
}

/// Runs `cairn ARGS` under `ulimit -n FDS` against `cluster`; (exit code, stdout, stderr).
fn cairn(
    cluster: &cairn_node::local_cluster::LocalCluster,
    fds: u32,
    args: &[&OsStr],
) -> (i32, Vec<u8>, String) {
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
        .arg(cairn_tests::process::cli_binary())
        .args(args)
        .env("CAIRN_CLUSTER", cluster.addrs().join(","))
        .env("CAIRN_TENANT", TENANT)
        .env("CAIRN_PASSWORD", OsStr::from_bytes(PASSWORD))
        .output()
        .expect("cairn runs");
    (
        output.status.code().unwrap_or(-1),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_backup_ls_and_restore_of_awkward_names_under_ulimit() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let _repo = must_init(&cluster).await;

    let source = dir.path().join("src");
    for d in 0..30 {
        std::fs::create_dir_all(source.join(format!("d{d:02}"))).expect("mkdir");
    }
    for i in 0..1000 {
        std::fs::write(
            source.join(format!("d{:02}/f{i:04}", i % 30)),
            format!("small file {i}\n").repeat(1 + i % 40),
        )
        .expect("write");
    }
    for name in awkward_names() {
        std::fs::write(source.join(os(&name)), &name).expect("write");
    }
    std::fs::write(source.join("noise.skip"), b"excluded").expect("write");
    let src = source.as_os_str();

    let (code, _, stderr) = cairn(
        &cluster,
        1024,
        &[
            OsStr::new("backup"),
            src,
            OsStr::new("--dataset"),
            OsStr::new("cli"),
            OsStr::new("--exclude"),
            OsStr::new("*.skip"),
        ],
    );
    assert_eq!(code, 0, "backup succeeds: {stderr}");
    let (code, listing, stderr) = cairn(
        &cluster,
        1024,
        &[
            OsStr::new("ls"),
            OsStr::new("latest"),
            OsStr::new("--dataset"),
            OsStr::new("cli"),
        ],
    );
    assert_eq!(code, 0, "ls succeeds: {stderr}");
    let listing = String::from_utf8(listing).expect("the listing is UTF-8 (odd bytes escaped)");
    for shown in [
        "src/a\\b\n",
        "src/line\\nbreak\n",
        "src/\\xff\\xfe not utf-8\n",
        "src/-rf\n",
    ] {
        assert!(listing.contains(shown), "{shown:?} is listed: {listing}");
    }
    assert!(!listing.contains("noise.skip"), "excluded");

    // 1,000 files restored with at most 64 descriptors.
    let target = dir.path().join("target");
    let (code, _, stderr) = cairn(
        &cluster,
        64,
        &[
            OsStr::new("restore"),
            OsStr::new("latest"),
            OsStr::new("--dataset"),
            OsStr::new("cli"),
            OsStr::new("--target"),
            target.as_os_str(),
        ],
    );
    assert_eq!(code, 0, "restore succeeds under ulimit -n 64: {stderr}");
    std::fs::remove_file(source.join("noise.skip")).expect("remove");
    must_be_identical(&source, &target.join("src"));
    cluster.shutdown().await.expect("shutdown");
}
