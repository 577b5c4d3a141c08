//! `cairn stream`: live chat records. `append` reads JSON lines on stdin and
//! acknowledges them once durable; `export` prints a room (or every room) as
//! of a point in time; `compact` folds live segments into a snapshot.

pub mod append;
pub mod bench;
pub mod compact;
pub mod export;

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum StreamCommand {
    /// Append JSON lines from stdin ({"room", "user", "ts", ...}); prints
    /// {"acked": N} each time the first N input records are durable.
    Append(AppendArgs),
    /// Print a room's records (or every room's) with ts up to --at, in order, as JSON lines.
    Export(ExportArgs),
    /// Fold live segments into per-room, per-day files of a new snapshot.
    Compact(CompactArgs),
}

#[derive(Debug, Args)]
pub struct AppendArgs {
    #[arg(long)]
    pub dataset: String,
    /// Writer id: sequence numbers (a record's "seq", else numbered from the
    /// writer's last committed one) are deduplicated per writer.
    #[arg(long, default_value = "default")]
    pub writer: String,
    /// Send a batch at most this long after its first record (at most 1s).
    #[arg(long, default_value = "200ms")]
    pub max_delay: String,
    /// Records per batch, at most.
    #[arg(long, default_value_t = 20_000)]
    pub batch_records: usize,
    /// Read records from this file instead of stdin.
    #[arg(long)]
    pub input: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long)]
    pub dataset: String,
    /// The room to export.
    #[arg(
        long,
        required_unless_present = "all_rooms",
        conflicts_with = "all_rooms"
    )]
    pub room: Option<String>,
    /// Every room, one after another (rooms in name order).
    #[arg(long)]
    pub all_rooms: bool,
    /// Records with ts at or after this time (RFC 3339 or Unix ms).
    #[arg(long)]
    pub from: Option<String>,
    /// Records with ts up to this time, inclusive (RFC 3339 or Unix ms).
    #[arg(long)]
    pub at: Option<String>,
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    #[arg(long)]
    pub dataset: String,
    /// Only segments whose records are all older than this (RFC 3339 or Unix
    /// ms); default: every live segment.
    #[arg(long)]
    pub before: Option<String>,
}

/// Runs one `cairn stream` command on an opened repository.
pub async fn run(
    repo: std::sync::Arc<cairn_client::Repository>,
    command: &StreamCommand,
    json: bool,
) -> anyhow::Result<()> {
    match command {
        StreamCommand::Append(args) => append::run(repo, args, json).await,
        StreamCommand::Export(args) => export::run(repo, args, json).await,
        StreamCommand::Compact(args) => compact::run(repo, args, json).await,
    }
}
