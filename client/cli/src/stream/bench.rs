//! `cairn bench stream`: live records through [`RecordStream`]s into the
//! embedded cluster `cairn bench` uses (3 regions × 2 nodes, 4+2, TLS).
//!
//! Each writer offers its share of `--rate` records per second (0: as fast
//! as backpressure lets it) of about `--record-bytes` each, rooms taken in
//! turn, times spread over one UTC day. A record's latency runs from the
//! `send()` call to its durable acknowledgement; durables resolve in send
//! order, so one collector per writer awaits them in order. Then one room's
//! day is exported from the live segments, everything is compacted, and the
//! same day is exported again from the snapshot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cairn_client::Repository;
use cairn_client::seal::KdfParams;
use cairn_client::stream::compact::{CompactOptions, compact};
use cairn_client::stream::export::{ExportQuery, ExportSummary, export};
use cairn_client::stream::record::DAY_MS;
use cairn_client::stream::{Durable, Record, RecordStream, StreamOptions, WriterStats};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::demo::{self, Transport};

const TENANT: &str = "bench";
const PASSWORD: &[u8] = b"bench-only passphrase";
const DATASET: &str = "bench-chat";
/// The day the records' times fall in (2026-11-28, UTC).
const DAY_START_MS: i64 = 1_764_288_000_000;

/// What `cairn bench stream` runs.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamBenchArgs {
    /// Records in all.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Rooms the records are spread over.
    #[arg(long, default_value_t = 100)]
    pub rooms: u64,
    /// Concurrent writers (one RecordStream each).
    #[arg(long, default_value_t = 4)]
    pub writers: u64,
    /// Bytes per record, about.
    #[arg(long, default_value_t = 200)]
    pub record_bytes: usize,
    /// Records per second offered, all writers together; 0 = as fast as
    /// the cluster takes them.
    #[arg(long, default_value_t = 60_000)]
    pub rate: u64,
}

/// Figures of one run.
#[derive(Debug, Serialize)]
pub struct StreamBenchReport {
    pub records: u64,
    pub rooms: u64,
    pub writers: u64,
    pub record_bytes: usize,
    pub offered_per_s: u64,
    pub duration_s: f64,
    pub records_per_s: f64,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
    pub ack_max_ms: f64,
    pub batches: u64,
    pub reconnects: u64,
    /// Export of one room's day from the live segments.
    pub export_room_day_s: f64,
    pub export_room_day_records: u64,
    /// Segments that export read.
    pub export_segments: u64,
    /// Compacting every live segment into a snapshot.
    pub compact_s: f64,
    /// The same export once compacted (one day file).
    pub export_compacted_s: f64,
    pub peak_rss_bytes: Option<u64>,
    pub note: &'static str,
}

/// Runs the benchmark on a fresh embedded cluster.
pub async fn run(args: &StreamBenchArgs, json: bool) -> anyhow::Result<StreamBenchReport> {
    anyhow::ensure!(
        args.records > 0 && args.rooms > 0 && args.writers > 0,
        "--records, --rooms and --writers must be above 0"
    );
    let work = tempfile::Builder::new()
        .prefix("cairn-bench-stream-")
        .tempdir()?;
    let cluster = demo::start_cluster_with(work.path(), Transport::Tls).await?;
    let options = demo::client_options(&cluster, Transport::Tls)?;
    let client = cairn_client::Cluster::with_options(&cluster.addrs(), options)?;
    let repo = Arc::new(Repository::init(client, TENANT, PASSWORD, KdfParams::default()).await?);
    if !json {
        println!(
            "stream benchmark: {} records of ~{} bytes, {} rooms, {} writers, offered {}/s; 3 regions x 2 nodes, 4+2, TLS, fsync on",
            args.records,
            args.record_bytes,
            args.rooms,
            args.writers,
            if args.rate == 0 {
                "unlimited".to_string()
            } else {
                args.rate.to_string()
            }
        );
    }
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let repo = repo.clone();
        let args = args.clone();
        writers.push(tokio::spawn(
            async move { one_writer(repo, &args, w).await },
        ));
    }
    let mut latencies_us: Vec<u32> = Vec::with_capacity(args.records as usize);
    let mut stats = WriterStats::default();
    for writer in writers {
        let (mut lat, s) = writer.await.context("a writer task failed")??;
        latencies_us.append(&mut lat);
        stats.records += s.records;
        stats.duplicates += s.duplicates;
        stats.batches += s.batches;
        stats.reconnects += s.reconnects;
        stats.bytes += s.bytes;
    }
    let duration_s = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    let pick = |q: f64| -> f64 {
        let i = ((latencies_us.len() as f64 - 1.0) * q).round() as usize;
        latencies_us
            .get(i)
            .map_or(0.0, |us| f64::from(*us) / 1000.0)
    };
    let report = StreamBenchReport {
        records: latencies_us.len() as u64,
        rooms: args.rooms,
        writers: args.writers,
        record_bytes: args.record_bytes,
        offered_per_s: args.rate,
        duration_s,
        records_per_s: latencies_us.len() as f64 / duration_s.max(1e-9),
        ack_p50_ms: pick(0.50),
        ack_p99_ms: pick(0.99),
        ack_max_ms: pick(1.0),
        batches: stats.batches,
        reconnects: stats.reconnects,
        export_room_day_s: 0.0,
        export_room_day_records: 0,
        export_segments: 0,
        compact_s: 0.0,
        export_compacted_s: 0.0,
        peak_rss_bytes: None,
        note: "client and all six nodes share this process; peak RSS covers them all",
    };
    let mut report = report;
    let (took, exported) = export_room_day(&repo).await?;
    report.export_room_day_s = took;
    report.export_room_day_records = exported.records;
    report.export_segments = exported.segments;
    let compacting = Instant::now();
    let compacted = compact(
        repo.clone(),
        &CompactOptions {
            dataset: DATASET.into(),
            before_ms: None,
        },
    )
    .await?;
    report.compact_s = compacting.elapsed().as_secs_f64();
    let (took, again) = export_room_day(&repo).await?;
    anyhow::ensure!(
        again.records == exported.records,
        "the compacted export has {} records, the live one {}",
        again.records,
        exported.records
    );
    report.export_compacted_s = took;
    report.peak_rss_bytes = demo::peak_rss();
    if !json {
        println!(
            "  sustained    {:>9.0} records/s over {:.1}s ({} batches, {} reconnects)",
            report.records_per_s, report.duration_s, report.batches, report.reconnects
        );
        println!(
            "  ack latency  p50 {:.0} ms   p99 {:.0} ms   max {:.0} ms",
            report.ack_p50_ms, report.ack_p99_ms, report.ack_max_ms
        );
        println!(
            "  export       {:.3}s  one room's day, {} records from {} live segments",
            report.export_room_day_s, report.export_room_day_records, report.export_segments
        );
        println!(
            "  compact      {:.2}s  {} segments into one snapshot",
            report.compact_s, compacted.segments
        );
        println!(
            "  export       {:.3}s  the same day once compacted",
            report.export_compacted_s
        );
    }
    drop(repo);
    cluster.shutdown().await?;
    Ok(report)
}

/// Exports room 0's day, counting records; (seconds, summary).
async fn export_room_day(repo: &Repository) -> anyhow::Result<(f64, ExportSummary)> {
    let query = ExportQuery {
        dataset: DATASET.into(),
        room: Some(room_name(0)),
        from_ms: Some(DAY_START_MS),
        at_ms: Some(DAY_START_MS + DAY_MS - 1),
    };
    let started = Instant::now();
    let summary = export(repo, &query, |_| Ok(())).await?;
    Ok((started.elapsed().as_secs_f64(), summary))
}

fn room_name(room: u64) -> String {
    format!("room-{room:04}")
}

/// One writer's share: sends at its pace, returns each record's ack latency (µs).
async fn one_writer(
    repo: Arc<Repository>,
    args: &StreamBenchArgs,
    w: u64,
) -> anyhow::Result<(Vec<u32>, WriterStats)> {
    let share = args.records / args.writers + u64::from(w < args.records % args.writers);
    let stream =
        RecordStream::open(repo, StreamOptions::new(DATASET, format!("bench-{w}"))).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Durable)>();
    let collector = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(share as usize);
        while let Some((sent, durable)) = rx.recv().await {
            durable.await?;
            let us = sent.elapsed().as_micros();
            latencies.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
        anyhow::Ok(latencies)
    });
    let per_s = args.rate as f64 / args.writers as f64;
    let started = Instant::now();
    let padding = "x".repeat(args.record_bytes.saturating_sub(90));
    let day_step = DAY_MS / (args.records as i64).max(1);
    let mut sent = 0u64;
    while sent < share {
        if per_s > 0.0 {
            let due = (started.elapsed().as_secs_f64() * per_s) as u64;
            if sent >= due {
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
        }
        let n = w + sent * args.writers;
        let room = n % args.rooms;
        let ts = DAY_START_MS + n as i64 * day_step;
        let line = format!(
            r#"{{"room":"{}","user":"user-{}","ts":{ts},"text":"{padding}"}}"#,
            room_name(room),
            n % 997
        );
        let record = Record::parse(line.as_bytes(), sent + 1)?;
        let at = Instant::now();
        let durable = stream.send(record).await?;
        if tx.send((at, durable)).is_err() {
            break;
        }
        sent += 1;
    }
    drop(tx);
    let latencies = collector.await.context("the collector failed")??;
    let stats = stream.close().await?;
    Ok((latencies, stats))
}
