//! `cairn stream append`: JSON lines in, `{"acked": N}` lines out.
//!
//! Input is read on a blocking thread and parsed there (a record's `seq`
//! defaults to the previous one's plus 1, the first to the writer's
//! committed seq plus 1). Records are sent through one [`RecordStream`];
//! their durable futures resolve in input order, so "the first N input
//! records are durable" is a counter. Stdout carries only ack lines, at most
//! one per [`ACK_EVERY`] and always a final one; the summary goes to stderr.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cairn_client::Repository;
use cairn_client::error::ClientError;
use cairn_client::stream::{Durable, Record, RecordStream, StreamOptions};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::mpsc;

use super::AppendArgs;

/// Ack lines are coalesced to at most one per this period.
const ACK_EVERY: Duration = Duration::from_millis(50);
/// Parsed lines queued between the reader thread and the sender.
const LINES_QUEUED: usize = 4096;

/// One input line, parsed (or why not), with its line number.
struct Line {
    number: u64,
    record: Result<Record, ClientError>,
}

pub async fn run(repo: Arc<Repository>, args: &AppendArgs, _json: bool) -> anyhow::Result<()> {
    let mut options = StreamOptions::new(args.dataset.clone(), args.writer.clone());
    options.max_delay = humantime::parse_duration(&args.max_delay)
        .with_context(|| format!("--max-delay {:?}", args.max_delay))?;
    options.max_batch_records = args.batch_records;
    let stream = RecordStream::open(repo, options).await?;
    let (tx, rx) = mpsc::channel(LINES_QUEUED);
    let first_seq = stream.committed_at_open().saturating_add(1);
    let input = args.input.clone();
    let reader = std::thread::Builder::new()
        .name("stream-input".into())
        .spawn(move || read_lines(input.as_deref(), first_seq, tx))
        .context("starting the input reader")?;
    let outcome = pump(&stream, rx).await;
    let stats = stream.close().await;
    // On a failure the reader may be blocked on stdin: it is left behind.
    let acked = outcome?;
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("the input reader panicked"))??;
    let stats = stats?;
    eprintln!(
        "appended {acked} records: {} stored in {} batches, {} already durable, {} reconnects",
        stats.records, stats.batches, stats.duplicates, stats.reconnects
    );
    Ok(())
}

/// Sends every record, printing acks; returns how many are durable.
async fn pump(stream: &RecordStream, mut lines: mpsc::Receiver<Line>) -> anyhow::Result<u64> {
    let mut acks = Acks::default();
    let mut pending: FuturesOrdered<Durable> = FuturesOrdered::new();
    let mut tick = tokio::time::interval(ACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut input_done = false;
    let mut bad_line: Option<anyhow::Error> = None;
    let result = loop {
        if input_done && pending.is_empty() {
            break Ok(());
        }
        tokio::select! {
            biased;
            Some(durable) = pending.next(), if !pending.is_empty() => {
                if let Err(e) = durable {
                    break Err(anyhow::Error::new(e));
                }
                acks.acked += 1;
                acks.print(false)?;
            }
            line = lines.recv(), if !input_done => match line {
                Some(Line { number, record: Ok(record) }) => match stream.send(record).await {
                    Ok(durable) => pending.push_back(durable),
                    Err(ClientError::BadInput { what }) => {
                        bad_line = Some(anyhow::anyhow!("line {number}: {what}"));
                        input_done = true;
                        lines.close();
                    }
                    Err(e) => break Err(e.into()),
                },
                Some(Line { number, record: Err(e) }) => {
                    bad_line = Some(anyhow::anyhow!("line {number}: {}", reason(&e)));
                    input_done = true;
                    lines.close();
                }
                None => input_done = true,
            },
            _ = tick.tick() => acks.print(false)?,
        }
    };
    acks.print(true)?;
    result?;
    match bad_line {
        Some(e) => Err(e),
        None => Ok(acks.acked),
    }
}

/// The ack counter and what was last printed.
#[derive(Default)]
struct Acks {
    acked: u64,
    printed: Option<u64>,
    at: Option<Instant>,
}

impl Acks {
    fn print(&mut self, last: bool) -> anyhow::Result<()> {
        // Nothing durable yet is not news; the last line is always printed.
        if self.printed == Some(self.acked) || (!last && self.acked == 0) {
            return Ok(());
        }
        if !last && self.at.is_some_and(|at| at.elapsed() < ACK_EVERY) {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{{\"acked\": {}}}", self.acked)
            .and_then(|()| out.flush())
            .context("writing acks to stdout")?;
        self.printed = Some(self.acked);
        self.at = Some(Instant::now());
        Ok(())
    }
}

/// A parse error without the SDK's "invalid input:" prefix.
fn reason(error: &ClientError) -> String {
    match error {
        ClientError::BadInput { what } => what.clone(),
        other => other.to_string(),
    }
}

/// Reads and parses lines until EOF, a bad line (sent, then stop) or the
/// receiver going away.
fn read_lines(
    input: Option<&std::path::Path>,
    first_seq: u64,
    tx: mpsc::Sender<Line>,
) -> anyhow::Result<()> {
    let reader: Box<dyn BufRead> = match input {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("{}", path.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut reader = reader;
    let mut next_seq = first_seq;
    let mut number = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .context("reading input")?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        if buf.trim_ascii().is_empty() {
            continue;
        }
        let record = Record::parse(&buf, next_seq);
        let stop = record.is_err();
        if let Ok(r) = &record {
            next_seq = r.seq.saturating_add(1);
        }
        if tx.blocking_send(Line { number, record }).is_err() || stop {
            return Ok(());
        }
    }
}
