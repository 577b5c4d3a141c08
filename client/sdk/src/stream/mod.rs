//! Live record streams: chat records appended as they happen (RPO under a
//! second), exported per room as of a point in time.
//!
//! - [`record`]: one record, the segment format and the room key.
//! - [`writer`]: [`RecordStream`], the group-committing writer over one
//!   bidirectional `AppendStream` call per writer.
//! - [`export`]: the records of a room (or of every room) from the dataset's
//!   newest compaction snapshot plus its live segments.
//! - [`compact`]: live segments folded into per-room, per-day files of a new
//!   snapshot, which retires them in the same commit.

pub mod compact;
pub mod export;
pub mod record;
pub mod writer;

pub use compact::{CompactOptions, CompactSummary, compact};
pub use export::{ExportQuery, ExportSummary, export};
pub use record::{Record, StoredRecord};
pub use writer::{Durable, RecordStream, StreamOptions, WriterStats};
