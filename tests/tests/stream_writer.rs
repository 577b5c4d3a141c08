//! The live record writer against real clusters: every record acknowledged,
//! a re-send after reopening stores nothing, and a stopped cluster makes
//! `send()` wait instead of growing memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cairn_client::seal::KdfParams;
use cairn_client::stream::{Durable, Record, RecordStream, StreamOptions};
use cairn_client::{Cluster, Repository};
use cairn_proto::v1 as pb;
use cairn_tests::process::ProcessCluster;
use cairn_tests::{PASSWORD, TENANT, must_init, must_start_cluster};

const DATASET: &str = "chat";

fn record(seq: u64, rooms: u64, text: &str) -> Record {
    let line = format!(
        r#"{{"room":"room-{}","user":"u{}","ts":{},"text":"{text}"}}"#,
        seq % rooms,
        seq % 7,
        1_764_288_000_000 + seq as i64
    );
    Record::parse(line.as_bytes(), seq).expect("a valid record")
}

/// Records of every live segment of the dataset, summed over all pages.
async fn must_count_segment_records(repo: &Repository) -> u64 {
    let mut page = Vec::new();
    let mut total = 0u64;
    loop {
        let request = pb::ListSegmentsRequest {
            tenant: repo.tenant().to_string(),
            dataset: DATASET.into(),
            room: Vec::new(),
            from_ts_ms: i64::MIN,
            to_ts_ms: i64::MAX,
            page: page.clone(),
        };
        let reply = repo
            .cluster()
            .call("list segments", |mut c| {
                let request = request.clone();
                async move { c.list_segments(request).await }
            })
            .await
            .expect("ListSegments answers");
        total += reply
            .segments
            .iter()
            .map(|s| u64::from(s.records))
            .sum::<u64>();
        if reply.next_page.is_empty() {
            return total;
        }
        page = reply.next_page;
    }
}

async fn must_all_be_durable(durables: Vec<Durable>) {
    for (i, durable) in durables.into_iter().enumerate() {
        durable
            .await
            .unwrap_or_else(|e| panic!("record {i} not durable: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_record_is_acked_and_a_resend_after_reopening_stores_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(dir.path()).await;
    let repo = must_init(&cluster).await;

    let stream = RecordStream::open(repo.clone(), StreamOptions::new(DATASET, "w1"))
        .await
        .expect("writer opens");
    assert_eq!(stream.committed_at_open(), 0);
    let mut durables = Vec::new();
    for seq in 1..=100_000 {
        durables.push(stream.send(record(seq, 50, "hello")).await.expect("queued"));
    }
    must_all_be_durable(durables).await;
    let stats = stream.close().await.expect("closes cleanly");
    assert_eq!(stats.records, 100_000, "{stats:?}");
    assert_eq!(stats.duplicates, 0, "{stats:?}");
    assert!(
        stats.batches >= 1 && stats.batches < 1000,
        "group commit: {stats:?}"
    );
    assert_eq!(must_count_segment_records(&repo).await, 100_000);

    // The same writer again, re-sending its last 10,000 records.
    let stream = RecordStream::open(repo.clone(), StreamOptions::new(DATASET, "w1"))
        .await
        .expect("writer reopens");
    assert_eq!(stream.committed_at_open(), 100_000);
    let mut durables = Vec::new();
    for seq in 90_001..=100_000 {
        durables.push(stream.send(record(seq, 50, "hello")).await.expect("queued"));
    }
    must_all_be_durable(durables).await;
    // A sequence number must go up.
    let refused = stream.send(record(99_999, 50, "late")).await;
    assert!(refused.is_err(), "a seq below the previous one is refused");
    let stats = stream.close().await.expect("closes cleanly");
    assert_eq!(stats.duplicates, 10_000, "{stats:?}");
    assert_eq!((stats.records, stats.batches), (0, 0), "{stats:?}");
    assert_eq!(
        must_count_segment_records(&repo).await,
        100_000,
        "nothing new committed"
    );
    cluster.shutdown().await.expect("shutdown");
}

fn signal(cluster: &ProcessCluster, sig: &str) {
    for id in cluster.ids() {
        let pid = cluster.pid(id).expect("node runs");
        let status = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {sig} {pid}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_cluster_makes_send_wait_instead_of_buffering() {
    cairn_tests::init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = ProcessCluster::start(dir.path(), &[2, 2, 2], "10s");
    cluster.wait_ready(Duration::from_secs(60)).await;
    let client = Cluster::new(&cluster.addrs())
        .expect("addresses")
        .with_failover_budget(Duration::from_secs(60));
    let repo = Arc::new(
        Repository::init(client, TENANT, PASSWORD, KdfParams::fast_for_tests())
            .await
            .expect("init"),
    );
    const BUFFER: usize = 256 * 1024;
    let mut options = StreamOptions::new(DATASET, "slow");
    options.max_buffered_bytes = BUFFER;
    let stream = Arc::new(
        RecordStream::open(repo.clone(), options)
            .await
            .expect("opens"),
    );
    stream
        .append(record(1, 10, "first"))
        .await
        .expect("durable while the cluster runs");

    signal(&cluster, "-STOP");
    let text = "x".repeat(1000);
    let queued = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stream, queued) = (stream.clone(), queued.clone());
        tokio::spawn(async move {
            let mut durables = Vec::new();
            for seq in 2..=5_001 {
                durables.push(stream.send(record(seq, 10, &text)).await?);
                queued.fetch_add(1, Ordering::SeqCst);
            }
            for d in durables {
                d.await?;
            }
            Ok::<(), cairn_client::ClientError>(())
        })
    };
    let mut sender = sender;
    let waited = tokio::time::timeout(Duration::from_secs(4), &mut sender).await;
    assert!(
        waited.is_err(),
        "5,000 records of 1 kB cannot all be queued in a 256 KiB buffer while the cluster is stopped"
    );
    let held = queued.load(Ordering::SeqCst);
    assert!(
        held <= (BUFFER / 1000) as u64 + 1,
        "send() returned for {held} records: more than the buffer holds"
    );

    signal(&cluster, "-CONT");
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("the sender finishes once the cluster runs again")
        .expect("sender task")
        .expect("every record durable");
    let stats = Arc::into_inner(stream)
        .expect("the only handle")
        .close()
        .await
        .expect("closes");
    assert_eq!(stats.records, 5_001, "{stats:?}");
    assert_eq!(must_count_segment_records(&repo).await, 5_001);
}

/// Runs `cairn stream append ARGS` on `input` against `cluster`; (exit code,
/// stdout lines, stderr).
fn cli_append(
    cluster: &cairn_node::local_cluster::LocalCluster,
    input: &std::path::Path,
    dataset: &str,
) -> (i32, Vec<String>, String) {
    let output = std::process::Command::new(cairn_tests::process::cli_binary())
        .args(["stream", "append", "--dataset", dataset, "--input"])
        .arg(input)
        .env("CAIRN_CLUSTER", cluster.addrs().join(","))
        .env("CAIRN_TENANT", TENANT)
        .env(
            "CAIRN_PASSWORD",
            std::str::from_utf8(PASSWORD).expect("ascii"),
        )
        .output()
        .expect("cairn runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Every stdout line is `{"acked": N}` with N never going down; the last N.
fn must_read_acks(lines: &[String]) -> u64 {
    let mut last = 0;
    for line in lines {
        let n: u64 = line
            .strip_prefix("{\"acked\": ")
            .and_then(|rest| rest.strip_suffix('}'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("stdout line {line:?} is not an ack"));
        assert!(n >= last, "acks went down: {lines:?}");
        last = n;
    }
    assert!(!lines.is_empty(), "a final ack line is always printed");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_append_acks_every_record_and_stops_at_a_bad_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    let _repo = must_init(&cluster).await;

    let good = dir.path().join("good.jsonl");
    let mut text = String::new();
    for seq in 1..=3000u64 {
        text.push_str(&String::from_utf8(record(seq, 5, "hi").line).expect("utf-8"));
        text.push('\n');
        if seq == 10 {
            text.push('\n'); // skipped, not counted
        }
    }
    std::fs::write(&good, text).expect("input");
    let (code, stdout, stderr) = cli_append(&cluster, &good, "cli-good");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(must_read_acks(&stdout), 3000, "{stdout:?}");

    let bad = dir.path().join("bad.jsonl");
    let mut text = String::new();
    for seq in 1..=100u64 {
        text.push_str(&String::from_utf8(record(seq, 5, "hi").line).expect("utf-8"));
        text.push('\n');
    }
    text.push_str("not json\n");
    text.push_str(&String::from_utf8(record(102, 5, "after").line).expect("utf-8"));
    text.push('\n');
    std::fs::write(&bad, text).expect("input");
    let (code, stdout, stderr) = cli_append(&cluster, &bad, "cli-bad");
    assert_ne!(code, 0, "a bad line fails the command");
    assert!(stderr.contains("line 101:"), "{stderr}");
    assert_eq!(
        must_read_acks(&stdout),
        100,
        "the records before the bad line are durable and acked"
    );
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_continues_through_another_region_when_its_region_dies() {
    cairn_tests::init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = ProcessCluster::start(dir.path(), &[2, 2, 2], "3s");
    cluster.wait_ready(Duration::from_secs(60)).await;
    // Region r1's nodes (1 and 2) come first: the writer's call goes there.
    let client = Cluster::new(&cluster.addrs())
        .expect("addresses")
        .with_failover_budget(Duration::from_secs(60));
    let repo = Arc::new(
        Repository::init(client, TENANT, PASSWORD, KdfParams::fast_for_tests())
            .await
            .expect("init"),
    );
    let stream = RecordStream::open(repo.clone(), StreamOptions::new(DATASET, "failover"))
        .await
        .expect("opens");
    let mut durables = Vec::new();
    for seq in 1..=20_000u64 {
        durables.push(
            stream
                .send(record(seq, 20, "before"))
                .await
                .expect("queued"),
        );
    }
    must_all_be_durable(durables).await;

    for id in [1, 2] {
        cluster.kill(id);
    }
    let started = std::time::Instant::now();
    let mut durables = Vec::new();
    for seq in 20_001..=40_000u64 {
        durables.push(stream.send(record(seq, 20, "after")).await.expect("queued"));
    }
    must_all_be_durable(durables).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the writer took {took:?} to continue through another region"
    );
    let stats = stream.close().await.expect("closes");
    assert!(stats.reconnects >= 1, "{stats:?}");
    assert_eq!(stats.records + stats.duplicates, 40_000, "{stats:?}");
    assert_eq!(must_count_segment_records(&repo).await, 40_000);
}
