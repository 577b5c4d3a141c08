//! [`RecordStream`]: the group-committing writer of a live record stream.
//!
//! One bidirectional `AppendStream` call per writer. Records queue in
//! memory (at most [`StreamOptions::max_buffered_bytes`] unacknowledged
//! record bytes: past that, [`RecordStream::send`] waits) and a background
//! task owns the call: it cuts a batch every
//! [`StreamOptions::max_delay`] (or sooner, at the size limits), seals one
//! segment blob per room into one pack, sends up to
//! [`StreamOptions::max_in_flight`] batches ahead and resolves each record's
//! [`Durable`] when the node answers its batch, in batch order.
//!
//! Invariants:
//! - sequence numbers strictly increase in send order, so "durable" is a
//!   watermark: every record with `seq <= committed_seq` is durable;
//! - a record is dropped from memory only once the node says it is
//!   committed (COMMITTED, DUPLICATE, or a `committed_seq` at or above it);
//! - after the call is (re)opened, batches that were in flight are sent
//!   again with the same boundaries, one at a time until the first answer,
//!   so a batch of the broken call that lands late is recognised as a
//!   duplicate instead of overlapping a rebuilt one.
//!
//! It does not parse input (see [`Record::parse`]) and holds no room name
//! beyond the sealing of a batch: nodes get room keys and sealed blobs.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cairn_proto::v1 as pb;
use pb::append_stream_reply::Outcome;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::{Code, Status};
use tracing::{debug, warn};

use super::record::{RECORD_BYTES_MAX, Record, encode_segment, room_key};
use crate::connection::retryable;
use crate::error::{ClientError, Result, error_chain};
use crate::pack::{BlobKind, PackBuilder};
use crate::repo::Repository;
use crate::seal::{MAX_BLOB_BYTES, MasterKey};

/// Longest group-commit delay a writer may ask for: the stream's promise is
/// an RPO under a second.
pub const MAX_DELAY_LIMIT: Duration = Duration::from_secs(1);
/// How long the oldest batch in flight may go unanswered before the call is
/// given up and reopened (on another node when this one is stuck).
const REPLY_TIMEOUT: Duration = Duration::from_secs(20);
/// Rooms (segments) in one batch, at most: what a node accepts.
pub const ROOMS_PER_BATCH_MAX: usize = 4096;
/// Writer ids: 1 to this many bytes of `[A-Za-z0-9._-]`.
const WRITER_ID_MAX: usize = 64;
/// The operation named in errors.
const OP: &str = "append stream";

/// How a [`RecordStream`] batches and how much it holds.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub dataset: String,
    /// Sequence numbers are deduplicated per (tenant, dataset, writer).
    pub writer: String,
    /// A batch leaves at most this long after its first record (≤ 1 s).
    pub max_delay: Duration,
    /// Records per batch, at most.
    pub max_batch_records: usize,
    /// Record bytes per batch, at most (a batch is cut once it reaches this).
    pub max_batch_bytes: usize,
    /// Batches sent and not yet answered, at most.
    pub max_in_flight: usize,
    /// Unacknowledged record bytes held before [`RecordStream::send`] waits.
    pub max_buffered_bytes: usize,
}

impl StreamOptions {
    /// The defaults: 200 ms, 20,000 records or 8 MiB per batch, 4 batches in
    /// flight, 64 MiB buffered.
    pub fn new(dataset: impl Into<String>, writer: impl Into<String>) -> Self {
        Self {
            dataset: dataset.into(),
            writer: writer.into(),
            max_delay: Duration::from_millis(200),
            max_batch_records: 20_000,
            max_batch_bytes: 8 * 1024 * 1024,
            max_in_flight: 4,
            max_buffered_bytes: 64 * 1024 * 1024,
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(ClientError::BadInput { what });
        if self.dataset.is_empty() {
            return bad("a stream needs a dataset name".into());
        }
        let w = &self.writer;
        if w.is_empty()
            || w.len() > WRITER_ID_MAX
            || !w
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return bad(format!(
                "writer id {w:?} must be 1 to {WRITER_ID_MAX} bytes of A-Z a-z 0-9 . _ -"
            ));
        }
        if self.max_delay.is_zero() || self.max_delay > MAX_DELAY_LIMIT {
            return bad(format!(
                "max delay {:?} must be above 0 and at most {MAX_DELAY_LIMIT:?}",
                self.max_delay
            ));
        }
        if self.max_batch_records == 0 || self.max_batch_records > cairn_proto::BLOBS_PER_PACK_MAX {
            return bad(format!(
                "records per batch must be 1 to {} (one pack holds a blob per room), got {}",
                cairn_proto::BLOBS_PER_PACK_MAX,
                self.max_batch_records
            ));
        }
        let batch_bytes_max = MAX_BLOB_BYTES / 2;
        if self.max_batch_bytes == 0 || self.max_batch_bytes > batch_bytes_max {
            return bad(format!(
                "bytes per batch must be 1 to {batch_bytes_max}, got {}",
                self.max_batch_bytes
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 64 {
            return bad(format!(
                "batches in flight must be 1 to 64, got {}",
                self.max_in_flight
            ));
        }
        if self.max_buffered_bytes < RECORD_BYTES_MAX || self.max_buffered_bytes > u32::MAX as usize
        {
            return bad(format!(
                "buffered bytes must be {RECORD_BYTES_MAX} (one record) to {}, got {}",
                u32::MAX,
                self.max_buffered_bytes
            ));
        }
        Ok(())
    }
}

/// What a writer did, for logs and benchmarks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WriterStats {
    /// Records made durable by this writer's batches.
    pub records: u64,
    /// Records that were durable already (a re-send), stored nothing.
    pub duplicates: u64,
    /// Batches committed.
    pub batches: u64,
    /// Times the call was reopened after it broke.
    pub reconnects: u64,
    /// Record bytes made durable.
    pub bytes: u64,
}

/// Resolves once a record is durable (or the writer failed).
pub struct Durable {
    state: DurableState,
}

enum DurableState {
    Ready(Option<Result<()>>),
    Waiting(oneshot::Receiver<Result<()>>),
}

impl Durable {
    fn ready(result: Result<()>) -> Self {
        Self {
            state: DurableState::Ready(Some(result)),
        }
    }
}

impl Future for Durable {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match &mut self.state {
            DurableState::Ready(result) => {
                Poll::Ready(result.take().unwrap_or_else(|| Err(stopped())))
            }
            DurableState::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(result)) => Poll::Ready(result),
                Poll::Ready(Err(_)) => Poll::Ready(Err(stopped())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

fn stopped() -> ClientError {
    ClientError::Server {
        op: OP,
        addr: String::new(),
        code: Code::Aborted,
        message: "the writer stopped before the record was durable".into(),
    }
}

/// A live record stream's writer: `Send + Sync`, every method takes `&self`.
///
/// ```no_run
/// # async fn example(repo: std::sync::Arc<cairn_client::Repository>) -> cairn_client::error::Result<()> {
/// use cairn_client::stream::{Record, RecordStream, StreamOptions};
/// let stream = RecordStream::open(repo, StreamOptions::new("chat", "ingest-1")).await?;
/// let seq = stream.committed_at_open() + 1;
/// let record = Record::parse(br#"{"room":"42","user":"ann","ts":1700000000000,"text":"hi"}"#, seq)?;
/// stream.append(record).await?; // durable: sealed, erasure-coded, committed
/// let stats = stream.close().await?;
/// # let _ = stats; Ok(()) }
/// ```
pub struct RecordStream {
    shared: Arc<Shared>,
    input: mpsc::UnboundedSender<Input>,
    /// Serialises senders: the seq check and the enqueue are one step, and
    /// a sender waiting for buffer space holds the others back in order.
    gate: tokio::sync::Mutex<SeqGate>,
    task: JoinHandle<Result<()>>,
    committed_at_open: u64,
}

/// State the senders and the background task share.
struct Shared {
    /// The writer's committed sequence number as last heard from the node.
    committed: AtomicU64,
    /// Unacknowledged record bytes (closed when the writer fails).
    buffer: Arc<Semaphore>,
    /// Why the writer stopped, once it did.
    failure: Mutex<Option<Arc<ClientError>>>,
    records: AtomicU64,
    duplicates: AtomicU64,
    batches: AtomicU64,
    reconnects: AtomicU64,
    bytes: AtomicU64,
}

impl Shared {
    fn failure(&self) -> Option<ClientError> {
        let guard = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_deref().map(copy_error)
    }

    fn stats(&self) -> WriterStats {
        WriterStats {
            records: self.records.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// The sequence rule of [`RecordStream::send`], kept pure.
#[derive(Debug, Default)]
pub(crate) struct SeqGate {
    last: Option<u64>,
}

/// What to do with a record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// At or below the committed seq: durable already.
    Duplicate,
    /// Queue it.
    Queue,
}

impl SeqGate {
    /// Checks `seq` against the previous one and the committed seq; on
    /// success the record counts as sent.
    #[cfg(test)]
    pub(crate) fn admit(&mut self, seq: u64, committed: u64) -> Result<Admit> {
        let admit = self.check(seq, committed)?;
        self.sent(seq);
        Ok(admit)
    }

    /// Checks `seq` against the previous one and the committed seq.
    pub(crate) fn check(&self, seq: u64, committed: u64) -> Result<Admit> {
        if let Some(last) = self.last
            && seq <= last
        {
            return Err(ClientError::BadInput {
                what: format!(
                    "record seq {seq} is not above the previous record's seq {last}: sequence numbers must strictly increase"
                ),
            });
        }
        Ok(if seq <= committed {
            Admit::Duplicate
        } else {
            Admit::Queue
        })
    }

    /// The record was queued (or resolved): later ones must be above it.
    pub(crate) fn sent(&mut self, seq: u64) {
        self.last = Some(seq);
    }
}

impl RecordStream {
    /// Opens the writer's call (failing over between nodes) and starts its
    /// background task.
    pub async fn open(repo: Arc<Repository>, options: StreamOptions) -> Result<RecordStream> {
        options.check()?;
        let shared = Arc::new(Shared {
            committed: AtomicU64::new(0),
            buffer: Arc::new(Semaphore::new(options.max_buffered_bytes)),
            failure: Mutex::new(None),
            records: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let conn = connect(&repo, &options, 0).await?;
        let committed_at_open = conn.committed;
        shared.committed.store(committed_at_open, Ordering::Release);
        let (input, incoming) = mpsc::unbounded_channel();
        let task = Task {
            repo,
            options,
            shared: shared.clone(),
            incoming,
            closing: false,
            unsent: VecDeque::new(),
            unsent_bytes: 0,
            to_send: VecDeque::new(),
            in_flight: VecDeque::new(),
            conn: Some(conn),
            confirmed: false,
            flushes: Vec::new(),
            last_progress: Instant::now(),
        };
        let task = tokio::spawn(task.run());
        Ok(RecordStream {
            shared,
            input,
            gate: tokio::sync::Mutex::new(SeqGate::default()),
            task,
            committed_at_open,
        })
    }

    /// The writer's committed sequence number when opened (0 = none).
    pub fn committed_at_open(&self) -> u64 {
        self.committed_at_open
    }

    /// Queues a record, waiting while max_buffered_bytes are unacknowledged
    /// (backpressure); the returned future resolves once the record is durable.
    pub async fn send(&self, record: Record) -> Result<Durable> {
        if let Some(failure) = self.shared.failure() {
            return Err(failure);
        }
        let mut gate = self.gate.lock().await;
        let committed = self.shared.committed.load(Ordering::Acquire);
        let seq = record.seq;
        // The gate moves only once the record is queued: a send() dropped
        // while it waits for buffer space leaves no trace.
        match gate.check(seq, committed)? {
            Admit::Duplicate => {
                gate.sent(seq);
                self.shared.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(Durable::ready(Ok(())));
            }
            Admit::Queue => {}
        }
        // At most RECORD_BYTES_MAX, which the buffer is checked to hold.
        let cost = u32::try_from(record.line.len().max(1)).unwrap_or(u32::MAX);
        let permit = match self.shared.buffer.clone().acquire_many_owned(cost).await {
            Ok(permit) => permit,
            Err(_) => return Err(self.shared.failure().unwrap_or_else(stopped)),
        };
        let (done, rx) = oneshot::channel();
        let pending = Pending {
            record,
            queued_at: Instant::now(),
            done,
            _permit: permit,
        };
        if self.input.send(Input::Record(pending)).is_err() {
            return Err(self.shared.failure().unwrap_or_else(stopped));
        }
        gate.sent(seq);
        drop(gate);
        Ok(Durable {
            state: DurableState::Waiting(rx),
        })
    }

    /// send(), then wait until durable.
    pub async fn append(&self, record: Record) -> Result<()> {
        self.send(record).await?.await
    }

    /// Waits until everything sent is durable (the batch being filled
    /// leaves at once instead of at its deadline).
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.input.send(Input::Flush(tx)).is_err() {
            return Err(self.shared.failure().unwrap_or_else(stopped));
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(self.shared.failure().unwrap_or_else(stopped)),
        }
    }

    /// Flushes, ends the call cleanly and returns what the writer did.
    pub async fn close(self) -> Result<WriterStats> {
        let flushed = self.flush().await;
        let RecordStream {
            shared,
            input,
            task,
            ..
        } = self;
        drop(input);
        let ended = match task.await {
            Ok(result) => result,
            Err(e) => Err(ClientError::Server {
                op: OP,
                addr: String::new(),
                code: Code::Internal,
                message: format!("the writer task failed: {e}"),
            }),
        };
        flushed?;
        ended?;
        Ok(shared.stats())
    }

    /// What the writer did so far.
    pub fn stats(&self) -> WriterStats {
        self.shared.stats()
    }
}

/// A record waiting to be durable.
struct Pending {
    record: Record,
    queued_at: Instant,
    done: oneshot::Sender<Result<()>>,
    /// Its share of the buffer, released when it is durable or failed.
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    fn seq(&self) -> u64 {
        self.record.seq
    }
}

enum Input {
    Record(Pending),
    Flush(oneshot::Sender<Result<()>>),
}

/// A batch: consecutive records, cut once; its boundaries are kept when it
/// is sent again on a new call.
struct Batch {
    records: Vec<Pending>,
    sent_at: Instant,
}

impl Batch {
    fn first_seq(&self) -> u64 {
        self.records.first().map_or(0, Pending::seq)
    }
    fn last_seq(&self) -> u64 {
        self.records.last().map_or(0, Pending::seq)
    }
}

/// How many of `records` ((bytes, room), in order) the next batch takes:
/// at least one, then up to the record, byte and room limits.
fn batch_len<'a>(
    records: impl Iterator<Item = (usize, &'a str)>,
    max_records: usize,
    max_bytes: usize,
) -> usize {
    let mut taken = 0usize;
    let mut bytes = 0usize;
    let mut rooms: HashSet<&str> = HashSet::new();
    for (len, room) in records {
        let new_room = !rooms.contains(room);
        if taken > 0
            && (taken >= max_records
                || bytes + len > max_bytes
                || (new_room && rooms.len() >= ROOMS_PER_BATCH_MAX))
        {
            break;
        }
        rooms.insert(room);
        bytes += len;
        taken += 1;
    }
    taken
}

/// Splits records (in seq order) into those at or below `committed`,
/// durable already, and the rest, to send again.
fn split_committed<T>(
    records: impl IntoIterator<Item = T>,
    committed: u64,
    seq: impl Fn(&T) -> u64,
) -> (Vec<T>, Vec<T>) {
    records.into_iter().partition(|r| seq(r) <= committed)
}

/// The batch message of `records`: one segment blob per room (rooms in
/// name order), all in one pack.
pub(crate) fn build_batch<'a>(
    key: &MasterKey,
    dataset: &str,
    records: impl IntoIterator<Item = &'a Record>,
) -> Result<pb::StreamBatch> {
    let mut rooms: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    let mut first_seq = None;
    let mut last_seq = 0;
    let mut total = 0usize;
    for record in records {
        first_seq.get_or_insert(record.seq);
        last_seq = record.seq;
        total += record.line.len() + 1;
        rooms.entry(record.room.as_str()).or_default().push(record);
    }
    let Some(first_seq) = first_seq else {
        return Err(ClientError::BadInput {
            what: "an empty batch".into(),
        });
    };
    let mut pack = PackBuilder::new(total + 64 * rooms.len());
    let mut segments = Vec::with_capacity(rooms.len());
    for (room, records) in &rooms {
        let plaintext = encode_segment(records.iter().map(|r| (r.ts_ms, r.line.as_slice())));
        let id = key.blob_id(&plaintext);
        let sealed = key.encode_blob(&id, &plaintext)?;
        pack.add(id, BlobKind::Data, &sealed);
        let (first_ts_ms, last_ts_ms) = records.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| {
            (lo.min(r.ts_ms), hi.max(r.ts_ms))
        });
        segments.push(pb::StreamSegment {
            room: room_key(key, dataset, room).to_vec(),
            blob: id.to_vec(),
            first_ts_ms,
            last_ts_ms,
            records: u32::try_from(records.len()).unwrap_or(u32::MAX),
        });
    }
    let pack = pack.finish(key)?;
    Ok(pb::StreamBatch {
        first_seq,
        last_seq,
        pack_id: pack.id.to_vec(),
        blobs: pack
            .blobs
            .iter()
            .map(|b| pb::BlobEntry {
                id: b.id.to_vec(),
                offset: b.offset,
                length: b.length,
            })
            .collect(),
        data: pack.data,
        segments,
    })
}

/// One open call.
struct Conn {
    requests: mpsc::Sender<pb::AppendStreamRequest>,
    replies: tonic::Streaming<pb::AppendStreamReply>,
    committed: u64,
}

/// Opens the call on some node (`skip` past the preferred one) and reads
/// OPENED.
async fn connect(repo: &Repository, options: &StreamOptions, skip: usize) -> Result<Conn> {
    let open = pb::StreamOpen {
        tenant: repo.tenant().to_string(),
        dataset: options.dataset.clone(),
        writer: options.writer.clone(),
    };
    let depth = options.max_in_flight + 1;
    repo.cluster()
        .open_call(OP, skip, |mut client| {
            let open = open.clone();
            async move {
                let (requests, rx) = mpsc::channel(depth);
                let first = pb::AppendStreamRequest {
                    msg: Some(pb::append_stream_request::Msg::Open(open)),
                };
                requests
                    .send(first)
                    .await
                    .map_err(|_| Status::internal("request channel closed"))?;
                let mut replies = client
                    .append_stream(receiver_stream(rx))
                    .await?
                    .into_inner();
                let reply = replies
                    .message()
                    .await?
                    .ok_or_else(|| Status::unavailable("the call ended before it opened"))?;
                if reply.outcome() != Outcome::Opened {
                    return Err(Status::internal(format!(
                        "the node answered the opening with {:?}",
                        reply.outcome()
                    )));
                }
                Ok(Conn {
                    requests,
                    replies,
                    committed: reply.committed_seq,
                })
            }
        })
        .await
}

/// The request side of the call: what the task queues, in order.
fn receiver_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// Why the call stopped being usable.
enum Broken {
    /// Reopen (on another node) and carry on.
    Retry(String),
    /// Every pending record fails with this.
    Fatal(ClientError),
}

fn from_status(status: Status) -> Broken {
    // A node whose memory budget is in use (or that holds too many open
    // streams) refuses the batch unread: another node may take it.
    if retryable(&status) || status.code() == Code::ResourceExhausted {
        Broken::Retry(format!("{:?}: {}", status.code(), status.message()))
    } else {
        Broken::Fatal(match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => ClientError::PermissionDenied {
                op: OP,
                reason: status.message().to_string(),
            },
            code => ClientError::Server {
                op: OP,
                addr: String::new(),
                code,
                message: status.message().to_string(),
            },
        })
    }
}

fn protocol(what: String) -> Broken {
    Broken::Fatal(ClientError::Server {
        op: OP,
        addr: String::new(),
        code: Code::Internal,
        message: what,
    })
}

/// What woke the task.
enum Event {
    Reply(std::result::Result<Option<pb::AppendStreamReply>, Status>),
    Input(Option<Input>),
    Tick,
    Stuck,
}

/// The background task owning the call.
struct Task {
    repo: Arc<Repository>,
    options: StreamOptions,
    shared: Arc<Shared>,
    incoming: mpsc::UnboundedReceiver<Input>,
    /// The writer was dropped or closed: drain and stop.
    closing: bool,
    /// Records not yet in a batch, in seq order.
    unsent: VecDeque<Pending>,
    unsent_bytes: usize,
    /// Batches cut but not sent on the current call (resends first).
    to_send: VecDeque<Batch>,
    /// Batches sent on the current call, unanswered, in order.
    in_flight: VecDeque<Batch>,
    conn: Option<Conn>,
    /// The current call answered a batch: until then one batch at a time.
    confirmed: bool,
    /// Flush waiters and the seq they wait for.
    flushes: Vec<(u64, oneshot::Sender<Result<()>>)>,
    /// Last time the node made progress (opened or answered).
    last_progress: Instant,
}

impl Task {
    async fn run(mut self) -> Result<()> {
        let result = self.drive().await;
        if let Err(error) = &result {
            self.fail_all(error);
        }
        result
    }

    async fn drive(&mut self) -> Result<()> {
        let mut last_break = String::new();
        loop {
            if self.conn.is_none() {
                if self.last_progress.elapsed() > self.repo.cluster().failover_budget() {
                    return Err(ClientError::NoNodeReachable {
                        tried: vec![(String::from("append stream"), last_break)],
                        hint: "",
                    });
                }
                match connect(&self.repo, &self.options, 1).await {
                    Ok(conn) => self.opened(conn),
                    Err(e) => return Err(e),
                }
            }
            match self.step().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(Broken::Fatal(e)) => return Err(e),
                Err(Broken::Retry(why)) => {
                    warn!(reason = %why, "record stream call broke; reopening on another node");
                    last_break = why;
                    self.conn = None;
                    self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    // In-flight batches go back first, with their boundaries.
                    while let Some(batch) = self.in_flight.pop_back() {
                        self.to_send.push_front(batch);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// A (re)opened call: what it says is committed is durable.
    fn opened(&mut self, conn: Conn) {
        let committed = conn.committed;
        debug!(committed, "record stream opened");
        self.conn = Some(conn);
        self.confirmed = false;
        self.last_progress = Instant::now();
        self.advance(committed);
        let batches = std::mem::take(&mut self.to_send);
        for batch in batches {
            let (durable, rest) = split_committed(batch.records, committed, Pending::seq);
            self.resolve(durable, false);
            if !rest.is_empty() {
                self.to_send.push_back(Batch {
                    records: rest,
                    sent_at: Instant::now(),
                });
            }
        }
        let unsent = std::mem::take(&mut self.unsent);
        let (durable, rest) = split_committed(unsent, committed, Pending::seq);
        self.unsent_bytes = rest.iter().map(|p| p.record.line.len()).sum();
        self.unsent = rest.into();
        self.resolve(durable, false);
        self.advance(committed);
    }

    /// One turn: send what may go, then wait for one event. `Ok(true)`
    /// once closed and drained.
    async fn step(&mut self) -> std::result::Result<bool, Broken> {
        self.pump().await?;
        if self.closing
            && self.unsent.is_empty()
            && self.to_send.is_empty()
            && self.in_flight.is_empty()
        {
            self.finish().await;
            return Ok(true);
        }
        let deadline = self.cut_deadline();
        let reply_deadline = self.in_flight.front().map(|b| b.sent_at + REPLY_TIMEOUT);
        let Some(conn) = self.conn.as_mut() else {
            return Err(Broken::Retry("no call".into()));
        };
        let event = tokio::select! {
            reply = conn.replies.message() => Event::Reply(reply),
            input = self.incoming.recv(), if !self.closing => Event::Input(input),
            () = sleep_until(deadline), if deadline.is_some() => Event::Tick,
            () = sleep_until(reply_deadline), if reply_deadline.is_some() => Event::Stuck,
        };
        match event {
            Event::Reply(Ok(Some(reply))) => self.on_reply(reply)?,
            Event::Reply(Ok(None)) => return Err(Broken::Retry("the node ended the call".into())),
            Event::Reply(Err(status)) => return Err(from_status(status)),
            Event::Input(Some(Input::Record(pending))) => {
                self.unsent_bytes += pending.record.line.len();
                self.unsent.push_back(pending);
            }
            Event::Input(Some(Input::Flush(tx))) => self.on_flush(tx),
            Event::Input(None) => self.closing = true,
            Event::Tick => {}
            Event::Stuck => {
                return Err(Broken::Retry(format!(
                    "no answer to a batch in {REPLY_TIMEOUT:?}"
                )));
            }
        }
        Ok(false)
    }

    fn window(&self) -> usize {
        if self.confirmed {
            self.options.max_in_flight
        } else {
            1
        }
    }

    /// When the batch being filled must leave, if it may leave now or later.
    fn cut_deadline(&self) -> Option<Instant> {
        if self.in_flight.len() >= self.window() || !self.to_send.is_empty() {
            return None;
        }
        let oldest = self.unsent.front()?;
        Some(oldest.queued_at + self.options.max_delay)
    }

    fn batch_full(&self) -> bool {
        self.unsent.len() >= self.options.max_batch_records
            || self.unsent_bytes >= self.options.max_batch_bytes
    }

    /// Whether the records not yet batched should leave now.
    fn should_cut(&self) -> bool {
        if self.unsent.is_empty() {
            return false;
        }
        self.closing
            || self.batch_full()
            || !self.flushes.is_empty()
            || self
                .unsent
                .front()
                .is_some_and(|p| p.queued_at.elapsed() >= self.options.max_delay)
    }

    /// Cuts one batch off the front of `unsent`, within the size limits.
    fn cut(&mut self) -> Batch {
        let take = batch_len(
            self.unsent
                .iter()
                .map(|p| (p.record.line.len(), p.record.room.as_str())),
            self.options.max_batch_records,
            self.options.max_batch_bytes,
        );
        let records: Vec<Pending> = self.unsent.drain(..take).collect();
        let bytes: usize = records.iter().map(|p| p.record.line.len()).sum();
        self.unsent_bytes -= bytes;
        Batch {
            records,
            sent_at: Instant::now(),
        }
    }

    /// Seals and sends batches while the window allows.
    async fn pump(&mut self) -> std::result::Result<(), Broken> {
        while self.in_flight.len() < self.window() {
            let batch = match self.to_send.pop_front() {
                Some(batch) => batch,
                None if self.should_cut() => self.cut(),
                None => break,
            };
            let (batch, message) = self.seal(batch).await?;
            let Some(conn) = self.conn.as_ref() else {
                self.to_send.push_front(batch);
                return Err(Broken::Retry("no call".into()));
            };
            let request = pb::AppendStreamRequest {
                msg: Some(pb::append_stream_request::Msg::Batch(message)),
            };
            let sent = conn.requests.send(request).await;
            let mut batch = batch;
            batch.sent_at = Instant::now();
            self.in_flight.push_back(batch);
            if sent.is_err() {
                return Err(Broken::Retry("the call closed its request stream".into()));
            }
        }
        Ok(())
    }

    /// Seals a batch off the async threads (zstd and AES over a few MB).
    async fn seal(&self, batch: Batch) -> std::result::Result<(Batch, pb::StreamBatch), Broken> {
        let repo = self.repo.clone();
        let dataset = self.options.dataset.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let message = build_batch(
                repo.key(),
                &dataset,
                batch.records.iter().map(|p| &p.record),
            );
            (batch, message)
        })
        .await;
        match joined {
            Ok((batch, Ok(message))) => Ok((batch, message)),
            Ok((batch, Err(e))) => {
                let error = Arc::new(e);
                self.fail(batch.records, &error);
                Err(Broken::Fatal(copy_error(&error)))
            }
            Err(e) => Err(protocol(format!("sealing a batch failed: {e}"))),
        }
    }

    fn on_reply(&mut self, reply: pb::AppendStreamReply) -> std::result::Result<(), Broken> {
        let outcome = reply.outcome();
        let Some(batch) = self.in_flight.pop_front() else {
            return Err(protocol(format!(
                "the node answered {outcome:?} with no batch in flight"
            )));
        };
        if reply.last_seq != batch.last_seq() {
            let what = format!(
                "the node answered batch ending at seq {} for the batch ending at seq {}",
                reply.last_seq,
                batch.last_seq()
            );
            self.in_flight.push_front(batch);
            return Err(protocol(what));
        }
        self.last_progress = Instant::now();
        match outcome {
            Outcome::Committed | Outcome::Duplicate => {
                let committed = reply.committed_seq.max(batch.last_seq());
                self.confirmed = true;
                if outcome == Outcome::Committed {
                    self.shared.batches.fetch_add(1, Ordering::Relaxed);
                    self.resolve(batch.records, true);
                } else {
                    self.resolve(batch.records, false);
                }
                self.advance(committed);
            }
            Outcome::Overlap => {
                let committed = reply.committed_seq;
                debug!(
                    committed,
                    first_seq = batch.first_seq(),
                    "batch overlaps committed records; sending the rest again"
                );
                let (durable, rest) = split_committed(batch.records, committed, Pending::seq);
                self.resolve(durable, false);
                if !rest.is_empty() {
                    self.to_send.push_front(Batch {
                        records: rest,
                        sent_at: Instant::now(),
                    });
                }
                self.advance(committed);
                if !self.in_flight.is_empty() {
                    // Later batches were sent past the overlap: reopen, so
                    // everything is sent again in order from what is committed.
                    return Err(Broken::Retry(
                        "a batch overlapped with others in flight".into(),
                    ));
                }
            }
            Outcome::Opened => {
                return Err(protocol("the node answered a batch with OPENED".into()));
            }
        }
        Ok(())
    }

    /// Everything up to `committed` is durable: tell senders and waiters.
    fn advance(&mut self, committed: u64) {
        self.shared.committed.fetch_max(committed, Ordering::AcqRel);
        let committed = self.shared.committed.load(Ordering::Acquire);
        let waiting = self.pending_low();
        let flushes = std::mem::take(&mut self.flushes);
        for (seq, tx) in flushes {
            if seq <= committed || waiting.is_none_or(|low| low > seq) {
                let _ = tx.send(Ok(()));
            } else {
                self.flushes.push((seq, tx));
            }
        }
    }

    /// The lowest seq not yet durable.
    fn pending_low(&self) -> Option<u64> {
        self.in_flight
            .front()
            .or(self.to_send.front())
            .map(Batch::first_seq)
            .or(self.unsent.front().map(Pending::seq))
    }

    /// The highest seq held.
    fn pending_high(&self) -> Option<u64> {
        self.unsent
            .back()
            .map(Pending::seq)
            .or(self.to_send.back().map(Batch::last_seq))
            .or(self.in_flight.back().map(Batch::last_seq))
    }

    fn on_flush(&mut self, tx: oneshot::Sender<Result<()>>) {
        match self.pending_high() {
            Some(seq) => self.flushes.push((seq, tx)),
            None => {
                let _ = tx.send(Ok(()));
            }
        }
    }

    fn resolve(&self, records: Vec<Pending>, stored: bool) {
        let n = records.len() as u64;
        if stored {
            let bytes: usize = records.iter().map(|p| p.record.line.len()).sum();
            self.shared.records.fetch_add(n, Ordering::Relaxed);
            self.shared.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        } else {
            self.shared.duplicates.fetch_add(n, Ordering::Relaxed);
        }
        for p in records {
            let _ = p.done.send(Ok(()));
        }
    }

    fn fail(&self, records: Vec<Pending>, error: &ClientError) {
        for p in records {
            let _ = p.done.send(Err(copy_error(error)));
        }
    }

    /// The writer stopped: every record still held fails with `error`, and
    /// so do later sends.
    fn fail_all(&mut self, error: &ClientError) {
        {
            let mut failure = self
                .shared
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            failure.get_or_insert_with(|| Arc::new(copy_error(error)));
        }
        self.shared.buffer.close();
        self.incoming.close();
        while let Ok(input) = self.incoming.try_recv() {
            match input {
                Input::Record(p) => self.unsent.push_back(p),
                Input::Flush(tx) => self.flushes.push((u64::MAX, tx)),
            }
        }
        let held: Vec<Pending> = self
            .in_flight
            .drain(..)
            .chain(self.to_send.drain(..))
            .flat_map(|b| b.records)
            .chain(self.unsent.drain(..))
            .collect();
        self.fail(held, error);
        for (_, tx) in self.flushes.drain(..) {
            let _ = tx.send(Err(copy_error(error)));
        }
    }

    /// Ends the call: the request stream closes, and the node's end of the
    /// reply stream is awaited briefly.
    async fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            let Conn {
                requests,
                mut replies,
                ..
            } = conn;
            drop(requests);
            let _ = tokio::time::timeout(Duration::from_secs(2), replies.message()).await;
        }
        for (_, tx) in self.flushes.drain(..) {
            let _ = tx.send(Ok(()));
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A copy of a failure for each record it fails (the error type is not
/// `Clone`: it may hold an I/O error).
fn copy_error(error: &ClientError) -> ClientError {
    match error {
        ClientError::NoNodeReachable { tried, hint } => ClientError::NoNodeReachable {
            tried: tried.clone(),
            hint,
        },
        ClientError::QuorumLost { detail } => ClientError::QuorumLost {
            detail: detail.clone(),
        },
        ClientError::TokenRefused => ClientError::TokenRefused,
        ClientError::TokenRequired => ClientError::TokenRequired,
        ClientError::PermissionDenied { op, reason } => ClientError::PermissionDenied {
            op,
            reason: reason.clone(),
        },
        ClientError::Server {
            op,
            addr,
            code,
            message,
        } => ClientError::Server {
            op,
            addr: addr.clone(),
            code: *code,
            message: message.clone(),
        },
        ClientError::BadInput { what } => ClientError::BadInput { what: what.clone() },
        ClientError::Integrity { what } => ClientError::Integrity { what: what.clone() },
        other => ClientError::Server {
            op: OP,
            addr: String::new(),
            code: Code::Unknown,
            message: error_chain(other),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::read_pack_index;
    use crate::stream::record::decode_segment;

    fn record(seq: u64, room: &str, ts: i64) -> Record {
        Record::parse(
            format!(r#"{{"room":"{room}","user":"u","ts":{ts},"n":{seq}}}"#).as_bytes(),
            seq,
        )
        .expect("record")
    }

    #[test]
    fn a_batch_holds_one_sealed_segment_per_room_sorted_by_time() {
        let key = MasterKey::generate();
        let records = vec![
            record(5, "b", 30),
            record(6, "a", 20),
            record(7, "b", 10),
            record(8, "c", 5),
            record(9, "a", 20),
        ];
        let batch = build_batch(&key, "chat", &records).expect("batch");
        assert_eq!((batch.first_seq, batch.last_seq), (5, 9));
        assert_eq!(batch.pack_id, blake3::hash(&batch.data).as_bytes().to_vec());
        let index = read_pack_index(&key, &batch.data).expect("pack index");
        assert_eq!(index.len(), 3);
        assert_eq!(batch.blobs.len(), 3);
        assert_eq!(batch.segments.len(), 3);
        for (room, seqs, ts) in [
            ("a", vec![6, 9], (20, 20)),
            ("b", vec![7, 5], (10, 30)),
            ("c", vec![8], (5, 5)),
        ] {
            let rk = room_key(&key, "chat", room).to_vec();
            let segment = batch
                .segments
                .iter()
                .find(|s| s.room == rk)
                .expect("a segment per room");
            assert_eq!((segment.first_ts_ms, segment.last_ts_ms), ts, "{room}");
            assert_eq!(segment.records as usize, seqs.len());
            let blob = index
                .iter()
                .find(|b| b.id.to_vec() == segment.blob)
                .expect("segment blob in the pack");
            let start = blob.offset as usize;
            let sealed = &batch.data[start..start + blob.length as usize];
            let plain = key.decode_blob(&blob.id, sealed).expect("opens");
            let stored = decode_segment(&plain).expect("segment");
            let expect: Vec<Vec<u8>> = seqs
                .iter()
                .map(|s| {
                    records
                        .iter()
                        .find(|r| r.seq == *s)
                        .expect("sent")
                        .line
                        .clone()
                })
                .collect();
            let got: Vec<Vec<u8>> = stored.iter().map(|r| r.line.clone()).collect();
            assert_eq!(got, expect, "room {room}: only its records, in ts order");
            assert!(stored.iter().all(|r| r.room == room));
        }
        // The room names never appear in what a node gets.
        for room in [b"\"a\"", b"\"b\"", b"\"c\""] {
            assert!(!batch.data.windows(3).any(|w| w == room));
        }
    }

    #[test]
    fn batches_are_cut_at_the_record_byte_and_room_limits() {
        let same = |n: usize, len: usize| vec![(len, "r"); n];
        assert_eq!(batch_len(same(10, 100).into_iter(), 4, 1 << 20), 4);
        assert_eq!(batch_len(same(10, 100).into_iter(), 100, 350), 3);
        assert_eq!(batch_len(same(3, 100).into_iter(), 100, 1 << 20), 3);
        // One record over the byte limit still goes, alone.
        assert_eq!(batch_len(same(3, 500).into_iter(), 100, 100), 1);
        assert_eq!(batch_len(std::iter::empty(), 100, 100), 0);
        // Rooms: a new room past the limit ends the batch, a known one does not.
        let names: Vec<String> = (0..ROOMS_PER_BATCH_MAX + 5)
            .map(|i| format!("r{i}"))
            .collect();
        let mut input: Vec<(usize, &str)> = names.iter().map(|n| (10, n.as_str())).collect();
        input.insert(ROOMS_PER_BATCH_MAX, (10, "r0"));
        assert_eq!(
            batch_len(input.into_iter(), usize::MAX, usize::MAX),
            ROOMS_PER_BATCH_MAX + 1
        );
    }

    #[test]
    fn seq_must_strictly_increase_and_committed_ones_are_duplicates() {
        let mut gate = SeqGate::default();
        assert_eq!(gate.admit(3, 5).expect("first"), Admit::Duplicate);
        assert_eq!(gate.admit(5, 5).expect("up"), Admit::Duplicate);
        assert_eq!(gate.admit(6, 5).expect("up"), Admit::Queue);
        let error = gate.admit(6, 5).expect_err("equal");
        let text = error.to_string();
        assert!(text.contains("seq 6") && text.contains("seq 6"), "{text}");
        let error = gate.admit(4, 0).expect_err("down");
        let text = error.to_string();
        assert!(text.contains("seq 4") && text.contains("seq 6"), "{text}");
        assert_eq!(gate.admit(7, 0).expect("up"), Admit::Queue);
    }

    #[test]
    fn an_overlap_drops_exactly_the_committed_records() {
        let seqs = [10u64, 11, 13, 14, 20];
        for committed in [0, 10, 12, 13, 19, 20, 99] {
            let (durable, rest) = split_committed(seqs, committed, |s| *s);
            assert!(durable.iter().all(|s| *s <= committed));
            assert!(rest.iter().all(|s| *s > committed));
            assert_eq!(durable.len() + rest.len(), seqs.len());
            let mut back = durable.clone();
            back.extend(&rest);
            assert_eq!(back, seqs, "order kept");
        }
    }

    #[test]
    fn options_are_checked() {
        let ok = StreamOptions::new("chat", "w-1.a_b");
        assert!(ok.check().is_ok());
        let mut o = ok.clone();
        o.max_delay = Duration::from_millis(1001);
        assert!(o.check().is_err());
        let mut o = ok.clone();
        o.writer = "has space".into();
        assert!(o.check().is_err());
        let mut o = ok.clone();
        o.max_buffered_bytes = 100;
        assert!(o.check().is_err());
        let mut o = ok;
        o.max_batch_records = cairn_proto::BLOBS_PER_PACK_MAX + 1;
        assert!(o.check().is_err());
    }
}
