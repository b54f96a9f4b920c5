//! Run-wide counters shared by sources and sinks, and the progress bar drawn from them.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counters for one process's run.
#[derive(Default, Debug)]
pub struct Progress {
    /// Records the finite sources will read, once known.
    pub total: AtomicU64,
    /// Records read by the sources.
    pub read: AtomicU64,
    /// Answers made durable.
    pub answered: AtomicU64,
    /// Deletes of answers made durable (rows that went away).
    pub deleted: AtomicU64,
    /// Dead letters made durable.
    pub dead: AtomicU64,
    /// Set when the run is over.
    pub finished: AtomicBool,
}

impl Progress {
    /// Records whose outcome (answer or dead letter) is durable.
    pub fn done(&self) -> u64 {
        self.answered.load(Ordering::Relaxed) + self.deleted.load(Ordering::Relaxed) + self.dead.load(Ordering::Relaxed)
    }
}

/// Draws a bar on stderr (rows done of total, rows/s) until the run finishes, when stderr is a terminal.
pub fn spawn_bar(progress: Arc<Progress>, enabled: bool) -> Option<std::thread::JoinHandle<()>> {
    if !enabled || !std::io::stderr().is_terminal() {
        return None;
    }
    std::thread::Builder::new()
        .name("sluice-progress".into())
        .spawn(move || {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec}, eta {eta}) {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            while !progress.finished.load(Ordering::Relaxed) {
                bar.set_length(progress.total.load(Ordering::Relaxed));
                bar.set_position(progress.done());
                let dead = progress.dead.load(Ordering::Relaxed);
                if dead > 0 {
                    bar.set_message(format!("{dead} dead letters"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.set_position(progress.done());
            bar.finish_and_clear();
        })
        .ok()
}
