//! Progress on a terminal: an indicatif bar fed from the SDK's backup and
//! restore counters, and the size estimate that gives it a total.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cairn_client::backup::Progress;

/// Shown on a terminal while a backup runs.
pub fn progress_ticker(progress: Arc<Progress>, total_hint: Option<u64>) -> ProgressDisplay {
    ProgressDisplay::start(progress, total_hint)
}

/// An indicatif bar fed from the counters, drawn only on a terminal.
pub struct ProgressDisplay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProgressDisplay {
    fn start(progress: Arc<Progress>, total_hint: Option<u64>) -> Self {
        let bar = match total_hint {
            Some(total) => indicatif::ProgressBar::new(total),
            None => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                bar.set_position(progress.bytes.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "{} files, {} packs",
                    progress.files.load(Ordering::Relaxed),
                    progress.packs.load(Ordering::Relaxed)
                ));
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
            bar.finish_and_clear();
        });
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Total size of regular files under `paths` (for the progress bar).
pub fn measure(paths: &[PathBuf]) -> u64 {
    fn walk(path: &Path, total: &mut u64, seen: &mut HashMap<(u64, u64), ()>) {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return;
        };
        if meta.is_file() {
            *total += meta.len();
        } else if meta.is_dir()
            && seen.insert((meta.dev(), meta.ino()), ()).is_none()
            && let Ok(read) = std::fs::read_dir(path)
        {
            for item in read.flatten() {
                walk(&item.path(), total, seen);
            }
        }
    }
    let mut total = 0;
    let mut seen = HashMap::new();
    for path in paths {
        walk(path, &mut total, &mut seen);
    }
    total
}
