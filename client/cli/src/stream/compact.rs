//! `cairn stream compact`: folds a dataset's live segments into per-room,
//! per-day files of a new snapshot that retires them, and prints what it
//! did (text, or one JSON object with `--json`).

use std::sync::Arc;

use cairn_client::Repository;
use cairn_client::stream::compact::{CompactOptions, compact};
use cairn_client::stream::record::parse_time;

use super::CompactArgs;

pub async fn run(repo: Arc<Repository>, args: &CompactArgs, json: bool) -> anyhow::Result<()> {
    let options = CompactOptions {
        dataset: args.dataset.clone(),
        before_ms: args.before.as_deref().map(parse_time).transpose()?,
    };
    let summary = compact(repo, &options).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    match &summary.snapshot_id {
        None => println!("dataset {}: no live segments to compact", options.dataset),
        Some(id) => println!(
            "snapshot {id} of dataset {}: {} segments ({} records, {} rooms) compacted into {} day files; {} day files past max-age left out; {:.1}s",
            options.dataset,
            summary.segments,
            summary.records,
            summary.rooms,
            summary.day_files,
            summary.dropped_day_files,
            summary.duration_s
        ),
    }
    Ok(())
}
