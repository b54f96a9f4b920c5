//! `sluice run`: a topology run as an engine with one job (see `engine.rs`), and what the
//! engine's jobs share: run errors, summaries, the sinks a topology resolves to, the batching
//! policy and the QA tensor shapes.

use crate::batcher::BatchPolicy;
use crate::engine::{Engine, EngineSettings, JobOptions};
use crate::inference::InferenceError;
use crate::sink::SinkError;
use crate::source::SourceError;
use crate::tasks::extractive_qa::QaShapes;
use crate::topology::{ExecutionConfig, Provider, Topology};
use std::time::Duration;

/// How this process takes part in the run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Worker threads in this process; overrides the topology's `runtime.workers`.
    pub workers: Option<usize>,
    /// This process's index in a cluster.
    pub process: usize,
    /// `host:port` of every process in a cluster; empty for a single process.
    pub hosts: Vec<String>,
    /// Draw a progress bar when stderr is a terminal.
    pub progress: bool,
}

/// Why a run could not start or did not finish: one component's error, with its message. The
/// message holds the cause's text (no `source()` chain), so `{:#}` at the CLI prints it once.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The Prometheus exporter cannot serve `metrics.listen`.
    #[error("cannot serve metrics on {listen}: {reason}")]
    Metrics { listen: String, reason: String },
    /// The process cannot handle SIGTERM and SIGINT.
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    /// The model, its tokenizer or ONNX Runtime cannot be loaded.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// The source cannot be built, or failed as configured while reading.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A sink cannot be opened or cannot give a worker its writer.
    #[error("{kind} sink: {error}")]
    Sink { kind: &'static str, error: SinkError },
    /// Timely cannot start its workers (e.g. a cluster peer is unreachable).
    #[error("cannot start the timely workers: {0}")]
    Timely(String),
    /// A timely worker thread panicked.
    #[error("a timely worker panicked: {0}")]
    WorkerPanicked(String),
    /// The job failed (its error was reported to an earlier waiter).
    #[error("{0}")]
    Failed(String),
    /// The engine is stopping and takes no new job.
    #[error("the engine is stopping")]
    Stopping,
}

/// What a finished run did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub read: u64,
    pub answered: u64,
    /// Answers deleted (their rows went away).
    pub deleted: u64,
    pub dead_letters: u64,
    pub elapsed: Duration,
    /// Where the answers went, for people.
    pub outputs: Vec<String>,
}

/// Runs a topology until its finite input is durable, or until SIGTERM/SIGINT: then sources
/// stop reading, the batches in flight drain, the sinks commit, and the run returns. It is an
/// engine with this one job.
pub fn run(topology: &Topology, opts: &RunOptions) -> Result<Summary, RunError> {
    let settings = EngineSettings {
        workers: opts.workers.unwrap_or(topology.runtime.workers).max(1),
        process: opts.process,
        hosts: opts.hosts.clone(),
        metrics_listen: topology.metrics.listen.clone(),
        metrics_recorder: false,
        signals_grace: Some(Duration::from_millis(topology.runtime.shutdown_grace_ms)),
        worker_nice: 0,
    };
    let engine = Engine::start(settings)?;
    let job = engine.submit(&topology.name, topology, JobOptions { progress_bar: opts.progress, opened: None, ended: None })?;
    let summary = job.wait();
    engine.shutdown()?;
    summary
}

/// One model per run in flight: the first decides the provider, and so the default count.
pub(crate) fn open_models<M>(
    exec: &ExecutionConfig,
    load: impl Fn() -> Result<M, InferenceError>,
    provider: impl Fn(&M) -> Provider,
) -> Result<Vec<M>, InferenceError> {
    let first = load()?;
    let runs = exec.runs_on(provider(&first));
    std::iter::once(Ok(first)).chain((1..runs).map(|_| load())).collect()
}

/// The tensor shapes a QA topology's batches take on `provider`.
pub fn qa_shapes(topology: &Topology, provider: Provider, max_seq_len: usize) -> QaShapes {
    QaShapes {
        padding: topology.batching.padding_on(provider),
        pad_multiple: topology.batching.pad_multiple,
        pad_rows: topology.batching.pad_rows_on(provider),
        max_seq_len,
    }
}

pub(crate) fn model_name_or_folder(name: &Option<String>, model: &std::path::Path) -> String {
    name.clone().unwrap_or_else(|| model.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into()))
}

/// The batching policy of a topology.
pub fn policy(topology: &Topology) -> BatchPolicy {
    BatchPolicy { max_batch: topology.batching.max_batch, max_delay: Duration::from_millis(topology.batching.max_delay_ms), lookahead: 4 }
}
