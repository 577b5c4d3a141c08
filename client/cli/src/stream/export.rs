//! `cairn stream export` (being written).

use std::sync::Arc;

use cairn_client::Repository;

use super::ExportArgs;

pub async fn run(_repo: Arc<Repository>, _args: &ExportArgs, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("cairn stream export is not built yet")
}
