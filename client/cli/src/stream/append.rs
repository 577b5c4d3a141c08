//! `cairn stream append` (being written).

use std::sync::Arc;

use cairn_client::Repository;

use super::AppendArgs;

pub async fn run(_repo: Arc<Repository>, _args: &AppendArgs, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("cairn stream append is not built yet")
}
