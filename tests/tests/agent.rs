//! `cairn agent --once` against a three-region cluster of in-process nodes,
//! the `cairn` binary run as a process with the scheduler's clock set by
//! `--now`: a weekly-full / daily-differential / hourly-incremental scheme
//! stepped through a week, a failing dump command, an overlapping run,
//! catch-up after downtime, a forget job, restore drills, and
//! `check --read-data-subset` finding a corrupted shard in exactly one slice.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cairn_client::repo::{DataRead, DataSubset};
use cairn_node::local_cluster::{LocalCluster, wait_until};
use cairn_tests::process::cli_binary;
use cairn_tests::*;

/// One cluster at a time: each is six nodes on a shared machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An agent's files: config, state directory, metrics file, password.
struct AgentDir {
    root: PathBuf,
    addrs: Vec<String>,
}

impl AgentDir {
    fn new(root: &Path, cluster: &LocalCluster) -> AgentDir {
        std::fs::create_dir_all(root).expect("agent dir");
        std::fs::write(root.join("password"), PASSWORD).expect("password file");
        AgentDir {
            root: root.to_path_buf(),
            addrs: cluster.addrs(),
        }
    }

    fn config(&self) -> PathBuf {
        self.root.join("agent.toml")
    }

    fn metrics(&self) -> PathBuf {
        self.root.join("agent.prom")
    }

    fn write_jobs(&self, jobs: &str) {
        let addrs: Vec<String> = self.addrs.iter().map(|a| format!("{a:?}")).collect();
        let text = format!(
            "state_dir = {:?}\ntime_zone = \"UTC\"\n[cluster]\naddresses = [{}]\npassword_file = {:?}\ntenant = {TENANT:?}\n\n{jobs}",
            self.root.join("state"),
            addrs.join(", "),
            self.root.join("password"),
        );
        std::fs::write(self.config(), text).expect("agent config");
    }

    fn once_command(&self, now: &str) -> Command {
        let mut command = Command::new(cli_binary());
        command
            .arg("agent")
            .arg("--config")
            .arg(self.config())
            .arg("--once")
            .arg("--now")
            .arg(now)
            .arg("--metrics-file")
            .arg(self.metrics())
            .stdin(Stdio::null());
        command
    }

    /// `cairn agent --once --now NOW`: its exit code and its log lines.
    async fn once(&self, now: &str) -> (i32, String) {
        let mut command = self.once_command(now);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("cairn agent runs");
        outcome(output)
    }

    fn metrics_text(&self) -> String {
        std::fs::read_to_string(self.metrics()).expect("metrics file written")
    }

    fn state(&self, job: &str) -> serde_json::Value {
        let text = std::fs::read(self.root.join("state").join(format!("{job}.json")))
            .expect("job state written");
        serde_json::from_slice(&text).expect("job state is JSON")
    }

    /// `cairn snapshots --json` of a dataset, oldest first.
    async fn snapshots(&self, dataset: &str) -> Vec<serde_json::Value> {
        let mut command = Command::new(cli_binary());
        command
            .args(["--cluster", &self.addrs.join(","), "--tenant", TENANT])
            .arg("--password-file")
            .arg(self.root.join("password"))
            .args(["snapshots", "--dataset", dataset, "--json"]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("cairn snapshots runs");
        assert!(
            output.status.success(),
            "snapshots: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("snapshots --json")
    }
}

fn outcome(output: Output) -> (i32, String) {
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The JSON log lines of a run for `job`.
fn lines_of(log: &str, job: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["job"] == job)
        .collect()
}

/// The value of the metric line starting with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn start() -> (tempfile::TempDir, LocalCluster) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = must_start_cluster(&dir.path().join("cluster")).await;
    must_init(&cluster).await;
    (dir, cluster)
}

fn write_source(source: &Path, version: u64) {
    std::fs::create_dir_all(source).expect("source");
    std::fs::write(source.join("fixed.txt"), b"the same every hour").expect("fixed");
    std::fs::write(
        source.join("changing.txt"),
        format!("version {version}\n").repeat(1000),
    )
    .expect("changing");
}

const HYBRID: &str = r#"
[[job]]
name = "files-weekly"
schedule = "0 0 * * MON"
kind = "backup"
dataset = "files"
level = "full"
paths = [SOURCE]
retries = 0

[[job]]
name = "files-daily"
schedule = "0 0 * * *"
kind = "backup"
dataset = "files"
level = "differential"
paths = [SOURCE]
retries = 0

[[job]]
name = "files-hourly"
schedule = "0 * * * *"
kind = "backup"
dataset = "files"
level = "incremental"
paths = [SOURCE]
retries = 0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_weekly_daily_hourly_scheme_makes_the_right_kinds_and_parents() {
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let source = dir.path().join("source");
    let agent = AgentDir::new(&dir.path().join("agent"), &cluster);
    agent.write_jobs(&HYBRID.replace("SOURCE", &format!("{source:?}")));

    // (clock, kind expected, index of the expected parent among the
    // snapshots so far, or None)
    let steps: [(&str, &str, Option<usize>); 6] = [
        ("2026-03-02T00:00:00Z", "full", None), // Monday: one full, not three snapshots
        ("2026-03-02T01:00:00Z", "incremental", Some(0)),
        ("2026-03-02T02:00:00Z", "incremental", Some(1)),
        ("2026-03-03T00:00:00Z", "differential", Some(0)), // Tuesday: parent is the full
        ("2026-03-03T01:00:00Z", "incremental", Some(3)),
        ("2026-03-09T00:00:00Z", "full", None), // next Monday
    ];
    for (i, (now, kind, parent)) in steps.iter().enumerate() {
        write_source(&source, i as u64);
        let (code, log) = agent.once(now).await;
        assert_eq!(code, 0, "agent at {now}: {log}");
        let snapshots = agent.snapshots("files").await;
        assert_eq!(
            snapshots.len(),
            i + 1,
            "one snapshot per step at {now}: {log}"
        );
        let newest = &snapshots[i];
        assert_eq!(newest["kind"], *kind, "kind at {now}: {newest}");
        if i == 0 {
            for weaker in ["files-daily", "files-hourly"] {
                let line = &lines_of(&log, weaker)[0];
                assert_eq!(line["outcome"], "satisfied", "{log}");
                assert_eq!(line["by"], "files-weekly", "{log}");
            }
        }
        let expected = parent.map(|p| snapshots[p]["id"].clone());
        assert_eq!(
            newest["parent"],
            expected.unwrap_or(serde_json::Value::Null),
            "parent at {now}"
        );
    }
    // A satisfied fire time counts with the outcome of the run that
    // satisfied it: every fire time of the hourly job is a success.
    let state = agent.state("files-hourly");
    assert_eq!(state["runs_success"], 6, "{state}");
    let daily = agent.state("files-daily");
    assert_eq!(
        daily["runs_success"], 3,
        "satisfied twice, ran once: {daily}"
    );
    let (_, log) = agent.once("2026-03-09T00:10:00Z").await;
    assert!(
        lines_of(&log, "files-hourly").is_empty(),
        "nothing due: {log}"
    );
    let metrics = agent.metrics_text();
    assert_eq!(
        metric(
            &metrics,
            "cairn_agent_job_interval_seconds{job=\"files-weekly\",kind=\"backup\"}"
        ),
        Some(7.0 * 86_400.0),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "cairn_agent_job_bytes_added_total{job=\"files-weekly\",kind=\"backup\"}"
        )
        .is_some_and(|b| b > 0.0),
        "{metrics}"
    );
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_dump_commits_nothing_and_raises_the_failure_metric() {
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let agent = AgentDir::new(&dir.path().join("agent"), &cluster);
    agent.write_jobs(
        r#"
[[job]]
name = "db-broken"
schedule = "0 2 * * *"
kind = "backup"
dataset = "db"
command = "printf 'half a dump'; echo 'connection refused' >&2; exit 3"
stdin_filename = "db.sql"
retries = 0

[[job]]
name = "db-good"
schedule = "0 2 * * *"
kind = "backup"
dataset = "db-good"
command = "printf 'a whole dump'"
stdin_filename = "db.sql"
retries = 0
"#,
    );
    let (code, log) = agent.once("2026-03-02T02:00:00Z").await;
    assert_ne!(code, 0, "a failed job fails --once: {log}");
    assert!(
        agent.snapshots("db").await.is_empty(),
        "nothing committed: {log}"
    );
    assert_eq!(agent.snapshots("db-good").await.len(), 1, "{log}");
    let broken = lines_of(&log, "db-broken");
    assert_eq!(broken.len(), 1, "one line per run: {log}");
    assert_eq!(broken[0]["outcome"], "failure");
    let error = broken[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("exit status: 3") && error.contains("connection refused"),
        "{error}"
    );
    let metrics = agent.metrics_text();
    assert_eq!(
        metric(
            &metrics,
            "cairn_agent_job_failures_total{job=\"db-broken\",kind=\"backup\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "cairn_agent_job_consecutive_failures{job=\"db-broken\",kind=\"backup\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "cairn_agent_job_failures_total{job=\"db-good\",kind=\"backup\"}"
        ),
        Some(0.0)
    );
    assert!(
        !metrics.contains("cairn_agent_job_last_success_timestamp_seconds{job=\"db-broken\""),
        "no success yet: {metrics}"
    );
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overlapping_run_is_skipped_not_doubled() {
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let agent = AgentDir::new(&dir.path().join("agent"), &cluster);
    let started = dir.path().join("started");
    agent.write_jobs(&format!(
        r#"
[[job]]
name = "slow-dump"
schedule = "0 * * * *"
kind = "backup"
dataset = "slow"
command = "touch {}; sleep 4; printf dump"
retries = 0
"#,
        started.display()
    ));
    let mut first = agent
        .once_command("2026-03-02T10:00:00Z")
        .stderr(Stdio::piped())
        .spawn()
        .expect("first agent starts");
    wait_until(
        "the first agent runs the dump",
        Duration::from_secs(30),
        || {
            let started = started.clone();
            async move {
                started
                    .exists()
                    .then_some(())
                    .ok_or_else(|| "the dump command has not started".to_string())
            }
        },
    )
    .await;
    let (code, second_log) = agent.once("2026-03-02T10:00:00Z").await;
    let first = tokio::task::spawn_blocking(move || {
        let _ = first.stdout.take();
        first.wait_with_output()
    })
    .await
    .expect("join")
    .expect("first agent finishes");
    let (first_code, first_log) = outcome(first);
    assert_eq!((first_code, code), (0, 0), "{first_log}\n{second_log}");
    let second = lines_of(&second_log, "slow-dump");
    assert_eq!(second.len(), 1, "{second_log}");
    assert_eq!(second[0]["outcome"], "skipped", "{second_log}");
    assert_eq!(lines_of(&first_log, "slow-dump")[0]["outcome"], "success");
    assert_eq!(
        agent.snapshots("slow").await.len(),
        1,
        "exactly one snapshot"
    );
    let state = agent.state("slow-dump");
    assert_eq!(
        (state["runs_success"].clone(), state["runs_skipped"].clone()),
        (1.into(), 1.into())
    );
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_long_running_agent_never_overlaps_a_job_serves_metrics_and_stops_on_sigterm() {
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let agent = AgentDir::new(&dir.path().join("agent"), &cluster);
    let spans = dir.path().join("spans");
    // Fires every second; each run takes 3 s, so most fire times arrive
    // while the previous run still goes.
    agent.write_jobs(&format!(
        r#"
[[job]]
name = "every-second"
schedule = "* * * * * *"
kind = "backup"
dataset = "busy"
command = "echo start $(date +%s.%N) >> {spans}; sleep 3; echo end $(date +%s.%N) >> {spans}; printf dump"
retries = 0
"#,
        spans = spans.display()
    ));
    let listen = format!("127.0.0.1:{}", cairn_tests::process::free_port());
    let mut child = Command::new(cli_binary())
        .arg("agent")
        .arg("--config")
        .arg(agent.config())
        .args(["--metrics-listen", &listen])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the agent starts");
    let url = format!("http://{listen}/metrics");
    let page = wait_until(
        "two finished runs and a skipped fire time on the agent's /metrics",
        Duration::from_secs(60),
        || {
            let url = url.clone();
            async move {
                let page = tokio::task::spawn_blocking(move || {
                    ureq::get(&url)
                        .call()
                        .map_err(|e| format!("GET {url}: {e}"))?
                        .body_mut()
                        .read_to_string()
                        .map_err(|e| format!("GET {url}: {e}"))
                })
                .await
                .map_err(|e| e.to_string())??;
                let runs = |outcome: &str| {
                    metric(
                        &page,
                        &format!(
                            "cairn_agent_job_runs_total{{job=\"every-second\",kind=\"backup\",outcome=\"{outcome}\"}}"
                        ),
                    )
                    .unwrap_or(0.0)
                };
                if runs("success") >= 2.0 && runs("skipped") >= 1.0 {
                    Ok(page)
                } else {
                    Err(format!("not yet:\n{page}"))
                }
            }
        },
    )
    .await;
    assert!(
        page.contains("cairn_agent_job_interval_seconds{job=\"every-second\",kind=\"backup\"} 1"),
        "{page}"
    );
    // SIGTERM: the agent stops promptly and cleanly.
    let pid = child.id().to_string();
    let stopped = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs")
            .success()
    );
    let output = tokio::task::spawn_blocking(move || {
        let _ = child.stdout.take();
        child.wait_with_output()
    })
    .await
    .expect("join")
    .expect("the agent exits");
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "exit after SIGTERM: {log}");
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "SIGTERM took {:?}",
        stopped.elapsed()
    );
    // Never two runs at once: every run ends before the next one starts.
    let text = std::fs::read_to_string(&spans).expect("the command ran");
    let mut open = false;
    let mut finished = 0;
    for line in text.lines() {
        match line.split(' ').next() {
            Some("start") => {
                assert!(!open, "a run started while another was running:\n{text}");
                open = true;
            }
            Some("end") => {
                assert!(open, "{text}");
                open = false;
                finished += 1;
            }
            _ => panic!("unexpected line {line:?}"),
        }
    }
    // Each finished run committed exactly one snapshot (the one cut short
    // by SIGTERM, if any, committed none).
    let successes = lines_of(&log, "every-second")
        .iter()
        .filter(|l| l["outcome"] == "success")
        .count();
    assert!(successes >= 2, "{log}");
    assert!(finished >= successes, "{text}\n{log}");
    assert_eq!(agent.snapshots("busy").await.len(), successes, "{log}");
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_downtime_a_job_catches_up_once() {
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let source = dir.path().join("source");
    write_source(&source, 0);
    let agent = AgentDir::new(&dir.path().join("agent"), &cluster);
    agent.write_jobs(&format!(
        "[[job]]\nname = \"hourly\"\nschedule = \"0 * * * *\"\nkind = \"backup\"\ndataset = \"files\"\npaths = [{source:?}]\nretries = 0\n"
    ));
    let (code, log) = agent.once("2026-03-02T00:00:00Z").await;
    assert_eq!(code, 0, "{log}");
    assert_eq!(agent.snapshots("files").await.len(), 1);
    // Five days down: 120 missed fire times, one run.
    let (code, log) = agent.once("2026-03-07T00:30:00Z").await;
    assert_eq!(code, 0, "{log}");
    let runs = lines_of(&log, "hourly");
    assert_eq!(runs.len(), 1, "{log}");
    assert_eq!(runs[0]["fire_time"], "2026-03-07T00:00:00+00:00");
    assert_eq!(agent.snapshots("files").await.len(), 2);
    let (_, log) = agent.once("2026-03-07T00:45:00Z").await;
    assert!(lines_of(&log, "hourly").is_empty(), "handled: {log}");
    assert_eq!(agent.snapshots("files").await.len(), 2);
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forget_job_applies_its_policy() {
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let repo = must_open(&cluster).await;
    let source = dir.path().join("source");
    let mut made = Vec::new();
    for version in 0..4 {
        write_source(&source, version);
        made.push(must_backup(&repo, &source, "files").await.snapshot_id);
    }
    must_backup(&repo, &source, "other").await;
    let agent = AgentDir::new(&dir.path().join("agent"), &cluster);
    agent.write_jobs(
        "[[job]]\nname = \"forget-files\"\nschedule = \"0 3 * * *\"\nkind = \"forget\"\ndataset = \"files\"\nkeep_last = 2\nprune = true\nretries = 0\n",
    );
    let (code, log) = agent.once("2026-03-02T03:00:00Z").await;
    assert_eq!(code, 0, "{log}");
    let left: Vec<String> = agent
        .snapshots("files")
        .await
        .iter()
        .map(|s| s["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(left, made[2..].to_vec(), "the two newest stay: {log}");
    assert_eq!(
        agent.snapshots("other").await.len(),
        1,
        "other datasets untouched"
    );
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compact_job_folds_live_records_into_a_snapshot() {
    use cairn_client::stream::{ExportQuery, Record, RecordStream, StreamOptions, export};
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let repo = must_open(&cluster).await;
    let writer = RecordStream::open(repo.clone(), StreamOptions::new("live", "w1"))
        .await
        .expect("open writer");
    let mut lines = Vec::new();
    for i in 0..500u64 {
        let line = format!(
            r#"{{"room":"r{}","user":"u","ts":{},"text":"t{i}"}}"#,
            i % 3,
            1_795_903_200_000 + i as i64 * 1_000
        );
        writer
            .send(Record::parse(line.as_bytes(), i + 1).expect("record"))
            .await
            .expect("send");
        lines.push(line);
    }
    writer.close().await.expect("close");
    let export_all = || async {
        let mut out = Vec::new();
        let query = ExportQuery {
            dataset: "live".into(),
            room: None,
            from_ms: None,
            at_ms: None,
        };
        export(&repo, &query, |r| {
            out.push(String::from_utf8_lossy(&r.line).into_owned());
            Ok(())
        })
        .await
        .expect("export");
        out
    };
    let before = export_all().await;
    assert_eq!(before.len(), lines.len());

    let agent = AgentDir::new(&dir.path().join("agent"), &cluster);
    agent.write_jobs(
        "[[job]]\nname = \"compact-live\"\nschedule = \"0 * * * *\"\nkind = \"compact\"\ndataset = \"live\"\nretries = 0\n",
    );
    let (code, log) = agent.once("2026-03-02T03:00:00Z").await;
    assert_eq!(code, 0, "{log}");
    let snapshots = agent.snapshots("live").await;
    assert_eq!(snapshots.len(), 1, "one compaction snapshot: {log}");
    let listed = repo
        .list_segments("live", None, i64::MIN, i64::MAX, &[])
        .await
        .expect("list segments");
    assert!(listed.segments.is_empty(), "every segment retired");
    assert_eq!(export_all().await, before, "the export does not change");
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drill_records_its_rto_and_fails_over_its_target() {
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let repo = must_open(&cluster).await;
    let source = dir.path().join("source");
    write_source(&source, 1);
    std::fs::write(source.join("big.bin"), vec![7u8; 3_000_000]).expect("big");
    must_backup(&repo, &source, "files").await;
    let scratch = dir.path().join("scratch");
    let agent = AgentDir::new(&dir.path().join("agent"), &cluster);
    agent.write_jobs(&format!(
        r#"
[[job]]
name = "drill"
schedule = "0 6 * * SUN"
kind = "drill"
dataset = "files"
scratch_dir = {scratch:?}
rto_target = "1h"

[[job]]
name = "drill-tight"
schedule = "0 6 * * SUN"
kind = "drill"
dataset = "files"
scratch_dir = {scratch:?}
rto_target = "1ms"
"#
    ));
    let (code, log) = agent.once("2026-03-08T06:00:00Z").await;
    assert_ne!(code, 0, "the 1ms drill fails: {log}");
    let metrics = agent.metrics_text();
    let rto = metric(
        &metrics,
        "cairn_agent_drill_rto_seconds{job=\"drill\",dataset=\"files\"}",
    );
    assert!(rto.is_some_and(|r| r > 0.0), "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "cairn_agent_drill_rto_target_seconds{job=\"drill\",dataset=\"files\"}"
        ),
        Some(3600.0)
    );
    assert_eq!(lines_of(&log, "drill")[0]["outcome"], "success", "{log}");
    let tight = &lines_of(&log, "drill-tight")[0];
    assert_eq!(tight["outcome"], "failure", "{log}");
    assert_eq!(tight["attempt"], 1, "an RTO over target is not retried");
    assert!(
        tight["error"]
            .as_str()
            .unwrap_or_default()
            .contains("rto_target")
    );
    assert!(
        metric(
            &metrics,
            "cairn_agent_drill_rto_seconds{job=\"drill-tight\",dataset=\"files\"}"
        )
        .is_some_and(|r| r > 0.001),
        "the time is recorded even when over target: {metrics}"
    );
    assert_eq!(
        std::fs::read_dir(&scratch).expect("scratch").count(),
        0,
        "drill directories are removed"
    );
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_subsets_partition_the_packs_and_one_finds_a_corrupted_shard() {
    let _serial = SERIAL.lock().await;
    let (dir, cluster) = start().await;
    let repo = must_open(&cluster).await;
    let source = dir.path().join("source");
    for version in 0..4 {
        write_source(&source, version);
        std::fs::write(source.join("noise.bin"), vec![version as u8; 200_000]).expect("noise");
        must_backup(&repo, &source, &format!("set-{version}")).await;
    }
    const M: u32 = 3;
    let subset = |index| DataRead::Subset(DataSubset { index, count: M });
    let all = repo.check_packs(true).await.expect("full check");
    assert!(all.problems.is_empty(), "{:?}", all.problems);
    let mut read = 0;
    let mut shards = 0;
    for index in 1..=M {
        let slice = repo
            .check_packs_reading(subset(index))
            .await
            .expect("slice");
        assert_eq!(
            slice.packs_checked, all.packs_checked,
            "the index of every pack"
        );
        assert_eq!((slice.subset_index, slice.subset_count), (index, M));
        read += slice.packs_read;
        shards += slice.shards_checked;
    }
    assert_eq!(read, all.packs_checked, "the slices partition the packs");
    assert_eq!(shards, all.shards_checked);
    assert!(
        all.packs_checked >= 6,
        "enough packs to split: {}",
        all.packs_checked
    );

    // Flip a byte of one shard file; the rule on its pack id names the
    // slice that must find it.
    let shard = files_under(&cluster.data_dir(1).join("shards"))
        .into_iter()
        .next()
        .expect("node 1 holds a shard");
    let name = shard
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_string();
    let pack_hex = name.split('.').next().expect("pack id").to_string();
    let pack = hex::decode(&pack_hex).expect("hex pack id");
    let head = u64::from_be_bytes(pack[..8].try_into().expect("8 bytes"));
    let holding = ((u128::from(head) * u128::from(M)) >> 64) as u32 + 1;
    let mut data = std::fs::read(&shard).expect("read shard");
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&shard, data).expect("write shard");
    // The other slices first (the finding one reports the shard to repair,
    // which may rebuild it at once).
    for index in (1..=M).filter(|i| *i != holding) {
        let slice = repo
            .check_packs_reading(subset(index))
            .await
            .expect("slice");
        assert!(
            !slice
                .problems
                .iter()
                .any(|p| hex::encode(&p.pack_id) == pack_hex),
            "slice {index} does not read pack {pack_hex}: {:?}",
            slice.problems
        );
    }
    // The CLI on the slice holding it finds it and shows the slice.
    let output = Command::new(cli_binary())
        .args(["--cluster", &cluster.addrs().join(","), "--tenant", TENANT])
        .env(
            "CAIRN_PASSWORD",
            std::ffi::OsStr::new(std::str::from_utf8(PASSWORD).expect("utf8")),
        )
        .args([
            "check",
            "--read-data-subset",
            &format!("{holding}/{M}"),
            "--json",
        ])
        .output()
        .expect("cairn check runs");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("check --json");
    assert_eq!(report["read_data_subset"], format!("{holding}/{M}"));
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["problems"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["pack"] == pack_hex.as_str())),
        "{report}"
    );
    assert_ne!(output.status.code(), Some(0));
    cluster.shutdown().await.expect("shutdown");
}
