//! `cairn stream export`: a room's records (or every room's) with `ts` in
//! `[--from, --at]`, in order, as the exact JSON lines appended, on stdout.
//! The output is already JSON; `--json` adds the summary as one JSON object
//! on stderr. A closed pipe (`| head`) ends the export quietly.

use std::io::Write;
use std::sync::Arc;

use cairn_client::stream::export::{ExportQuery, export};
use cairn_client::stream::record::parse_time;
use cairn_client::{ClientError, Repository};

use super::ExportArgs;

pub async fn run(repo: Arc<Repository>, args: &ExportArgs, json: bool) -> anyhow::Result<()> {
    let query = ExportQuery {
        dataset: args.dataset.clone(),
        room: if args.all_rooms {
            None
        } else {
            args.room.clone()
        },
        from_ms: time_flag("--from", args.from.as_deref())?,
        at_ms: time_flag("--at", args.at.as_deref())?,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let result = export(&repo, &query, |record| {
        out.write_all(&record.line)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(stdout_error)
    })
    .await;
    let result = result.and_then(|summary| out.flush().map_err(stdout_error).map(|()| summary));
    match result {
        Ok(summary) => {
            if json {
                eprintln!("{}", serde_json::to_string(&summary)?);
            }
            Ok(())
        }
        Err(ClientError::Io { error, .. }) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// A time flag as Unix ms; the error names the flag.
fn time_flag(flag: &str, text: Option<&str>) -> anyhow::Result<Option<i64>> {
    text.map(|t| {
        parse_time(t).map_err(|e| match e {
            ClientError::BadInput { what } => anyhow::anyhow!("{flag}: {what}"),
            other => anyhow::anyhow!("{flag}: {other}"),
        })
    })
    .transpose()
}

fn stdout_error(error: std::io::Error) -> ClientError {
    ClientError::Io {
        path: "<stdout>".into(),
        error,
    }
}
