//! Live chat streams end to end, through the `cairn` binary against a TLS
//! cluster of `cairn-node` processes (3 regions × 2 nodes, 4+2):
//!
//! - four `cairn stream append` writers send 200,000 records over 50 rooms,
//!   each with a backup-role token; one writer is killed with SIGKILL
//!   mid-stream and re-sends from before its last acknowledgement; a whole
//!   region is killed while the others write;
//! - every record is exported exactly once, point-in-time exports of rooms
//!   equal a model computed from what was sent, and a room's export never
//!   holds another room's record;
//! - compaction changes nothing an export sees, and `restore latest` gives
//!   each room's days as files;
//! - no node's disk holds a room name or message text;
//! - a writer facing a stopped cluster stops reading its input instead of
//!   growing its memory, and finishes once the cluster is back.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn_node::local_cluster::wait_until;
use cairn_tests::process::{ProcessCluster, cli_binary};
use cairn_tests::{PASSWORD, TENANT, init_logging};

/// One cluster at a time: each is six node processes on a shared machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ROOMS: usize = 50;
const WRITERS: usize = 4;
const PER_WRITER: usize = 50_000;
/// 2026-11-28T22:00:00Z: the records span midnight, so rooms have two days.
const BASE_MS: i64 = 1_795_903_200_000;
/// Records are 100 ms apart across all writers: every `ts` is distinct.
const STEP_MS: i64 = 100;
/// Only ever in room names and message texts: the disk grep looks for them.
const ROOM_MARK: &str = "kitten-lounge";
const TEXT_MARK: &str = "tipjar-note";

/// One record as sent.
#[derive(Debug, Clone)]
struct Sent {
    room: String,
    ts: i64,
    line: String,
}

/// Writer `w`'s records, seq 1..=PER_WRITER, interleaved in time with the others.
fn records_of(w: usize) -> Vec<Sent> {
    (0..PER_WRITER)
        .map(|i| {
            let global = i * WRITERS + w;
            let room = format!("{ROOM_MARK}-{:02}", (global * 7 + i / 13) % ROOMS);
            let ts = BASE_MS + global as i64 * STEP_MS;
            let line = format!(
                r#"{{"room":"{room}","user":"viewer-{}","ts":{ts},"seq":{},"kind":"chat","text":"{TEXT_MARK} {w}/{i} gg wp"}}"#,
                global % 997,
                i + 1
            );
            Sent { room, ts, line }
        })
        .collect()
}

/// The cluster, the CLI's credentials and files.
struct Env {
    dir: PathBuf,
    cluster: ProcessCluster,
}

impl Env {
    async fn start(dir: &Path) -> Env {
        let cluster = ProcessCluster::start_secure(dir, &[2, 2, 2], "3s");
        cluster.wait_ready(Duration::from_secs(60)).await;
        std::fs::write(dir.join("password"), PASSWORD).expect("password file");
        let env = Env {
            dir: dir.to_path_buf(),
            cluster,
        };
        let tls = env.cluster.tls().expect("secure cluster");
        std::fs::write(dir.join("admin-token"), &tls.token).expect("token file");
        env.must(&env.dir.join("admin-token"), &["init"]);
        let out = env.must(
            &env.dir.join("admin-token"),
            &[
                "token", "create", "--role", "backup", "--tenant", TENANT, "--json",
            ],
        );
        let created: serde_json::Value = serde_json::from_slice(&out.stdout).expect("token json");
        let token = created["token"].as_str().expect("token secret");
        std::fs::write(dir.join("backup-token"), token).expect("token file");
        env
    }

    /// `cairn` with the cluster (`addrs`, in this order), CA, token and password.
    fn command(&self, token: &Path, addrs: &[String]) -> Command {
        let tls = self.cluster.tls().expect("secure cluster");
        let mut command = Command::new(cli_binary());
        command
            .args(["--cluster", &addrs.join(","), "--tenant", TENANT])
            .arg("--ca-file")
            .arg(tls.dir.join("ca.pem"))
            .arg("--token-file")
            .arg(token)
            .arg("--password-file")
            .arg(self.dir.join("password"));
        command
    }

    fn run(&self, token: &Path, args: &[&str]) -> Output {
        self.command(token, &self.cluster.addrs())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("cairn runs")
    }

    fn must(&self, token: &Path, args: &[&str]) -> Output {
        let out = self.run(token, args);
        assert!(
            out.status.success(),
            "cairn {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn admin(&self) -> PathBuf {
        self.dir.join("admin-token")
    }

    fn backup(&self) -> PathBuf {
        self.dir.join("backup-token")
    }

    /// `cairn stream export` lines.
    fn export(&self, args: &[&str]) -> Vec<String> {
        let mut full = vec!["stream", "export", "--dataset", "live"];
        full.extend_from_slice(args);
        let out = self.must(&self.backup(), &full);
        String::from_utf8(out.stdout)
            .expect("export is UTF-8")
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// A `cairn stream append` process fed from a thread.
struct Writer {
    child: Child,
    acked: Arc<AtomicU64>,
    acks_in_order: Arc<AtomicBool>,
    feeder: std::thread::JoinHandle<u64>,
    reader: std::thread::JoinHandle<()>,
}

impl Writer {
    /// Starts a writer sending `lines`, `chunk` lines every `pace`.
    fn spawn(
        env: &Env,
        name: &str,
        addrs: &[String],
        lines: Vec<String>,
        chunk: usize,
        pace: Duration,
    ) -> Writer {
        let mut child = env
            .command(&env.backup(), addrs)
            .args(["stream", "append", "--dataset", "live", "--writer", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cairn stream append starts");
        let mut stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let feeder = std::thread::spawn(move || {
            let mut sent = 0u64;
            for part in lines.chunks(chunk) {
                let mut text = part.join("\n");
                text.push('\n');
                if stdin.write_all(text.as_bytes()).is_err() {
                    break; // the writer died
                }
                sent += part.len() as u64;
                std::thread::sleep(pace);
            }
            sent
        });
        let acked = Arc::new(AtomicU64::new(0));
        let acks_in_order = Arc::new(AtomicBool::new(true));
        let reader = {
            let acked = acked.clone();
            let in_order = acks_in_order.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let value: serde_json::Value =
                        serde_json::from_str(&line).expect("append prints JSON lines");
                    let n = value["acked"].as_u64().expect("{\"acked\": N}");
                    if n < acked.load(Ordering::SeqCst) {
                        in_order.store(false, Ordering::SeqCst);
                    }
                    acked.store(n, Ordering::SeqCst);
                }
            })
        };
        Writer {
            child,
            acked,
            acks_in_order,
            feeder,
            reader,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to end; returns whether it succeeded, the lines
    /// fed and the final acknowledgement.
    async fn finish(mut self, timeout: Duration) -> (bool, u64, u64) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("writer status") {
                break status;
            }
            assert!(
                started.elapsed() < timeout,
                "writer still running after {timeout:?} (acked {})",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let fed = self.feeder.join().expect("feeder");
        self.reader.join().expect("reader");
        assert!(
            self.acks_in_order.load(Ordering::SeqCst),
            "acknowledgements went backwards"
        );
        (status.success(), fed, self.acked.load(Ordering::SeqCst))
    }
}

/// `kill -SIG pid`.
fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{sig} {pid}");
}

/// The model: records of `room` (all rooms: None) with from <= ts <= at, in
/// export order (rooms by name, then time).
fn model(sent: &[Sent], room: Option<&str>, from: i64, at: i64) -> Vec<String> {
    let mut rows: Vec<&Sent> = sent
        .iter()
        .filter(|s| room.is_none_or(|r| s.room == r) && s.ts >= from && s.ts <= at)
        .collect();
    rows.sort_by(|a, b| (&a.room, a.ts).cmp(&(&b.room, b.ts)));
    rows.into_iter().map(|s| s.line.clone()).collect()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_records_survive_a_killed_writer_and_a_lost_region() {
    let _serial = SERIAL.lock().await;
    init_logging();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut env = Env::start(tmp.path()).await;
    let addrs = env.cluster.addrs();
    // Writer 1 starts on region r3's nodes (5 and 6), which will die.
    let r3_first: Vec<String> = [4, 5, 0, 1, 2, 3]
        .iter()
        .map(|&i| addrs[i].clone())
        .collect();

    let sent: Vec<Vec<Sent>> = (0..WRITERS).map(records_of).collect();
    let lines = |w: usize, from: usize| -> Vec<String> {
        sent[w][from..].iter().map(|s| s.line.clone()).collect()
    };
    // Writer 0 is slower, so that it is surely mid-stream when killed.
    let mut writers: Vec<Option<Writer>> = Vec::new();
    for w in 0..WRITERS {
        let (order, pace) = match w {
            0 => (&addrs, Duration::from_millis(250)),
            1 => (&r3_first, Duration::from_millis(150)),
            _ => (&addrs, Duration::from_millis(150)),
        };
        writers.push(Some(Writer::spawn(
            &env,
            &format!("w{w}"),
            order,
            lines(w, 0),
            1_000,
            pace,
        )));
    }

    // SIGKILL writer 0 once it has 10,000 acknowledged records.
    {
        let w0 = writers[0].as_ref().expect("writer 0");
        wait_until(
            "writer 0 to acknowledge 10,000",
            Duration::from_secs(120),
            || {
                let acked = w0.acked();
                std::future::ready(if acked >= 10_000 {
                    Ok(())
                } else {
                    Err(format!("acked {acked}"))
                })
            },
        )
        .await;
        signal(w0.pid(), "KILL");
    }
    let (ok, _, acked0) = writers[0]
        .take()
        .expect("writer 0")
        .finish(Duration::from_secs(30))
        .await;
    assert!(!ok, "writer 0 was killed");
    assert!(
        (acked0 as usize) < PER_WRITER,
        "writer 0 must die mid-stream (acked {acked0})"
    );

    // Kill region r3 (nodes 5 and 6) while writers 1-3 are still sending.
    wait_until(
        "writers 1-3 to acknowledge 8,000 each",
        Duration::from_secs(120),
        || {
            let least = writers[1..]
                .iter()
                .map(|w| w.as_ref().map(Writer::acked).unwrap_or(0))
                .min()
                .unwrap_or(0);
            std::future::ready(if least >= 8_000 {
                Ok(())
            } else {
                Err(format!("least acked {least}"))
            })
        },
    )
    .await;
    let before_region_loss: Vec<u64> = writers[1..]
        .iter()
        .map(|w| w.as_ref().map(Writer::acked).unwrap_or(0))
        .collect();
    env.cluster.kill(5);
    env.cluster.kill(6);

    // Writer 0 comes back and re-sends 5,000 records it already had acknowledged.
    let resend_from = (acked0 as usize).saturating_sub(5_000);
    let rest: Vec<String> = addrs[..4].to_vec();
    let again = Writer::spawn(
        &env,
        "w0",
        &rest,
        lines(0, resend_from),
        2_000,
        Duration::from_millis(20),
    );
    let (ok, fed, acked) = again.finish(Duration::from_secs(180)).await;
    assert!(ok, "writer 0's re-send succeeds");
    assert_eq!(acked, fed, "every re-sent record is acknowledged");
    assert_eq!(fed as usize, PER_WRITER - resend_from);

    for (w, writer) in writers.iter_mut().enumerate().skip(1) {
        let (ok, fed, acked) = writer
            .take()
            .expect("writer")
            .finish(Duration::from_secs(180))
            .await;
        assert!(ok, "writer {w} continues through the surviving regions");
        assert_eq!(fed as usize, PER_WRITER);
        assert_eq!(acked as usize, PER_WRITER, "writer {w}: all acknowledged");
        assert!(
            before_region_loss[w - 1] < PER_WRITER as u64,
            "writer {w} was still sending when the region died"
        );
    }

    // With region r3 still gone: every record exactly once, in order.
    let all: Vec<Sent> = sent.concat();
    let exported = env.export(&["--all-rooms"]);
    let expected = model(&all, None, i64::MIN, i64::MAX);
    assert_eq!(exported.len(), expected.len(), "record count");
    assert!(exported == expected, "the whole dataset, once, in order");

    // Point-in-time exports per room, against the model.
    let midnight = BASE_MS + 2 * 3_600_000;
    let times = [BASE_MS + 30 * 60_000, midnight + 10, i64::MAX];
    for room in [0, 17, 49].map(|r| format!("{ROOM_MARK}-{r:02}")) {
        for at in times {
            let at_text = at.to_string();
            let mut args = vec!["--room", room.as_str()];
            if at != i64::MAX {
                args.extend(["--at", at_text.as_str()]);
            }
            let got = env.export(&args);
            assert!(
                got == model(&all, Some(&room), i64::MIN, at),
                "room {room} at {at}: {} records, model {}",
                got.len(),
                model(&all, Some(&room), i64::MIN, at).len()
            );
            let foreign = format!(r#""room":"{room}""#);
            assert!(
                got.iter().all(|l| l.contains(&foreign)),
                "room {room}'s export holds another room's record"
            );
        }
        // A window, with an RFC 3339 bound.
        let got = env.export(&[
            "--room",
            &room,
            "--from",
            "2026-11-28T23:30:00Z",
            "--at",
            "2026-11-29T00:30:00.000Z",
        ]);
        let from = BASE_MS + 90 * 60_000;
        assert!(got == model(&all, Some(&room), from, midnight + 30 * 60_000));
    }

    // Compaction folds the segments into a snapshot; exports do not change.
    env.must(
        &env.admin(),
        &["stream", "compact", "--dataset", "live", "--json"],
    );
    assert!(
        env.export(&["--all-rooms"]) == expected,
        "the same records after compaction"
    );
    let room = format!("{ROOM_MARK}-17");
    assert!(
        env.export(&["--room", &room, "--at", &(midnight + 10).to_string()])
            == model(&all, Some(&room), i64::MIN, midnight + 10)
    );

    // The compacted stream is an ordinary snapshot: restore gives day files.
    let target = tmp.path().join("restored");
    env.must(
        &env.backup(),
        &[
            "restore",
            "latest",
            "--dataset",
            "live",
            "--target",
            &target.to_string_lossy(),
        ],
    );
    let mut by_file: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for s in model_sorted(&all) {
        let day = if s.ts < midnight {
            "2026-11-28"
        } else {
            "2026-11-29"
        };
        by_file
            .entry(PathBuf::from(&s.room).join(format!("{day}.jsonl")))
            .or_default()
            .push(s.line.clone());
    }
    let mut restored = Vec::new();
    files(&target, &mut restored);
    assert_eq!(restored.len(), by_file.len(), "one file per room and day");
    for (rel, lines) in &by_file {
        let text = std::fs::read_to_string(target.join(rel)).expect("day file restored");
        assert!(
            text == format!("{}\n", lines.join("\n")),
            "{} holds that room-day's records",
            rel.display()
        );
    }

    // Nodes never saw a room name or a message text.
    let mut on_disk = Vec::new();
    for id in env.cluster.ids() {
        files(&env.dir.join(format!("node-{id}")), &mut on_disk);
    }
    assert!(on_disk.len() > 6, "the nodes stored files");
    for path in &on_disk {
        let bytes = std::fs::read(path).expect("read node file");
        for mark in [ROOM_MARK, TEXT_MARK] {
            assert!(
                !contains(&bytes, mark.as_bytes()),
                "{} holds {mark:?} in plaintext",
                path.display()
            );
        }
    }
}

/// Every record, sorted by room then time.
fn model_sorted(all: &[Sent]) -> Vec<&Sent> {
    let mut rows: Vec<&Sent> = all.iter().collect();
    rows.sort_by(|a, b| (&a.room, a.ts).cmp(&(&b.room, b.ts)));
    rows
}

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_facing_a_stopped_cluster_stops_reading_instead_of_growing() {
    let _serial = SERIAL.lock().await;
    init_logging();
    let tmp = tempfile::tempdir().expect("tempdir");
    let env = Env::start(tmp.path()).await;

    let mut child = env
        .command(&env.backup(), &env.cluster.addrs())
        .args([
            "stream",
            "append",
            "--dataset",
            "live",
            "--writer",
            "firehose",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cairn stream append starts");
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("stdin");
    let acked = Arc::new(AtomicU64::new(0));
    let reader = {
        let acked = acked.clone();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
                acked.store(value["acked"].as_u64().unwrap_or(0), Ordering::SeqCst);
            }
        })
    };
    let line = |n: u64| {
        format!(
            r#"{{"room":"{ROOM_MARK}-{:02}","user":"u","ts":{},"text":"{TEXT_MARK} {n} {}"}}"#,
            n % 50,
            BASE_MS + n as i64,
            "x".repeat(120)
        )
    };
    // Connected and acknowledging first.
    let mut next = 0u64;
    let mut batch = String::new();
    for _ in 0..10_000 {
        batch.push_str(&line(next));
        batch.push('\n');
        next += 1;
    }
    stdin.write_all(batch.as_bytes()).expect("feed");
    wait_until(
        "the first records acknowledged",
        Duration::from_secs(60),
        || {
            let n = acked.load(Ordering::SeqCst);
            std::future::ready(if n >= 10_000 {
                Ok(())
            } else {
                Err(format!("acked {n}"))
            })
        },
    )
    .await;

    // The whole cluster stops; the feeder offers as much as the writer takes for 6 s.
    let pids: Vec<u32> = env
        .cluster
        .ids()
        .iter()
        .filter_map(|&id| env.cluster.pid(id))
        .collect();
    for &p in &pids {
        signal(p, "STOP");
    }
    let feeding = Arc::new(AtomicBool::new(true));
    let feeder = {
        let feeding = feeding.clone();
        std::thread::spawn(move || {
            let mut fed_bytes = 0u64;
            while feeding.load(Ordering::SeqCst) {
                let mut chunk = String::new();
                for _ in 0..1_000 {
                    chunk.push_str(&line(next));
                    chunk.push('\n');
                    next += 1;
                }
                if stdin.write_all(chunk.as_bytes()).is_err() {
                    break;
                }
                fed_bytes += chunk.len() as u64;
            }
            (stdin, fed_bytes, next)
        })
    };
    let mut peak_rss = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak_rss = peak_rss.max(rss_bytes(pid));
    }
    feeding.store(false, Ordering::SeqCst);
    for &p in &pids {
        signal(p, "CONT");
    }
    let (stdin, fed_bytes, total) = feeder.join().expect("feeder");
    drop(stdin);
    // An unbounded writer would have taken gigabytes in 6 s; this one holds
    // at most its buffer (64 MiB of records) plus what pipes and parsing hold.
    assert!(
        fed_bytes < 200 * 1024 * 1024,
        "the writer took {fed_bytes} bytes while the cluster was stopped"
    );
    assert!(
        peak_rss < 400 * 1024 * 1024,
        "the writer grew to {peak_rss} bytes of RSS"
    );

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("status") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "writer still running, acked {}",
            acked.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    reader.join().expect("reader");
    assert!(
        status.success(),
        "the writer finishes once the cluster is back"
    );
    assert_eq!(
        acked.load(Ordering::SeqCst),
        total,
        "every record acknowledged"
    );
}
