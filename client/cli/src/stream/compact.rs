//! `cairn stream compact` (being written).

use std::sync::Arc;

use cairn_client::Repository;

use super::CompactArgs;

pub async fn run(_repo: Arc<Repository>, _args: &CompactArgs, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!("cairn stream compact is not built yet")
}
