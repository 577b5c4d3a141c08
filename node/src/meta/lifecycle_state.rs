//! Lifecycle records in the metadata state: forgetting snapshots,
//! retention locks and dataset policies (layout in `state.rs`).

use super::state::{StateError, StateView};
use super::types::{Command, CommandResult, MetaStats};
use crate::kv::WriteBatch;

/// Applies the lifecycle commands (see [`Command`]).
pub(super) fn apply(
    view: &StateView,
    cmd: &Command,
    now: i64,
    batch: &mut WriteBatch,
    stats: &mut MetaStats,
) -> Result<CommandResult, StateError> {
    let _ = (view, now, batch, stats);
    match cmd {
        _ => Ok(CommandResult::UnknownSnapshot),
    }
}
