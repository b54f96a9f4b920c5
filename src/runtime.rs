//! Builds and runs a topology: starts the inference service, assembles the timely dataflow on
//! every worker (source harness → decode → key by ID → infer → durable sink, with dead letters
//! and checkpoints beside), and waits until finite input is durable or a signal stops it. It
//! knows sources and sinks only through their contracts and the registry.

use crate::batcher::BatchPolicy;
use crate::inference::{self, InferenceError, InferenceHandle};
use crate::operators::decode::{decode, DecodeSettings};
use crate::operators::{infer::infer, key_by_id::key_by_id, sink::durable_sink};
use crate::progress::{self, Progress};
use crate::sink::{SinkContext, SinkError, SinkFactory, SinkWriter};
use crate::source::harness::{source_harness, FatalSlot, HarnessSettings};
use crate::source::SourceError;
use crate::tasks::extractive_qa::{ExtractiveQa, QaModel, QaSettings, QaShapes};
use crate::tasks::tabular::{Tabular, TabularModel};
use crate::tasks::{self, Task};
use crate::topology::{BatchInvariance, ExecutionConfig, Provider, SinkConfig, TaskConfig, Topology};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::{Concat, Probe};
use timely::dataflow::ProbeHandle;

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

/// The sinks a topology writes to: its own, or the embedded default (JSON lines in `out/<name>`).
pub fn resolve_sinks(topology: &Topology) -> Vec<SinkConfig> {
    if topology.sinks.is_empty() {
        vec![SinkConfig::default_jsonl(PathBuf::from("out").join(&topology.name))]
    } else {
        topology.sinks.clone()
    }
}

/// Runs a topology until its finite input is durable, or until SIGTERM/SIGINT: then sources
/// stop reading, the batches in flight drain, the sinks commit, and the run returns.
pub fn run(topology: &Topology, opts: &RunOptions) -> Result<Summary, RunError> {
    if let Some(listen) = &topology.metrics.listen {
        let metrics_error = |reason: String| RunError::Metrics { listen: listen.clone(), reason };
        let addr = listen.parse().map_err(|e| metrics_error(format!("`metrics.listen` is not an address ({e})")))?;
        crate::metrics::install(addr).map_err(|e| metrics_error(e.to_string()))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(RunError::Signals)?;
    }
    crate::guard::start_watchdog(stop.clone(), Duration::from_millis(topology.runtime.shutdown_grace_ms));
    let policy = policy(topology);
    let exec = &topology.execution;
    match &topology.task {
        TaskConfig::ExtractiveQa { model, tokenizer, max_seq_len, doc_stride, max_answer_len, model_name } => {
            let label = tasks::model_label(&model_name_or_folder(model_name, model), model)?;
            let settings = QaSettings { max_seq_len: *max_seq_len, doc_stride: *doc_stride, max_answer_len: *max_answer_len };
            let task = Arc::new(ExtractiveQa::new(tokenizer, settings, label)?);
            let invariant = match topology.batching.batch_invariant {
                BatchInvariance::Auto => !tasks::uses_dynamic_quantization(model),
                BatchInvariance::Yes => true,
                BatchInvariance::No => false,
            };
            if !invariant {
                tracing::info!("{} uses dynamic quantization: running one window per model call so answers do not depend on batch-mates", model.display());
            }
            let shapes = |provider| qa_shapes(topology, provider, *max_seq_len);
            let models = open_models(exec, || QaModel::load(model, shapes, invariant, exec), QaModel::provider)?;
            let (handle, joins) = inference::start(models, policy)?;
            let summary = run_dataflow(topology, opts, task, handle, stop);
            for j in joins {
                let _ = j.join();
            }
            summary
        }
        TaskConfig::Tabular { model, output, model_name } => {
            let label = tasks::model_label(&model_name_or_folder(model_name, model), model)?;
            let models = open_models(exec, || TabularModel::load(model, output.as_deref(), exec), TabularModel::provider)?;
            let task = Arc::new(Tabular::new(&models[0], label));
            let (handle, joins) = inference::start(models, policy)?;
            let summary = run_dataflow(topology, opts, task, handle, stop);
            for j in joins {
                let _ = j.join();
            }
            summary
        }
    }
}

/// One model per run in flight: the first decides the provider, and so the default count.
fn open_models<M>(exec: &ExecutionConfig, load: impl Fn() -> Result<M, InferenceError>, provider: impl Fn(&M) -> Provider) -> Result<Vec<M>, InferenceError> {
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

fn model_name_or_folder(name: &Option<String>, model: &std::path::Path) -> String {
    name.clone().unwrap_or_else(|| model.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into()))
}

/// The batching policy of a topology.
pub fn policy(topology: &Topology) -> BatchPolicy {
    BatchPolicy { max_batch: topology.batching.max_batch, max_delay: Duration::from_millis(topology.batching.max_delay_ms), lookahead: 4 }
}

fn timely_config(workers: usize, opts: &RunOptions) -> timely::Config {
    let communication = if opts.hosts.len() > 1 {
        timely::CommunicationConfig::Cluster { threads: workers, process: opts.process, addresses: opts.hosts.clone(), report: false, zerocopy: false }
    } else if workers == 1 {
        timely::CommunicationConfig::Thread
    } else {
        timely::CommunicationConfig::Process(workers)
    };
    timely::Config { communication, worker: timely::WorkerConfig::default() }
}

fn run_dataflow<T: Task>(
    topology: &Topology,
    opts: &RunOptions,
    task: Arc<T>,
    handle: InferenceHandle<T::Model>,
    stop: Arc<AtomicBool>,
) -> Result<Summary, RunError> {
    let workers = opts.workers.unwrap_or(topology.runtime.workers).max(1);
    let rt = &topology.runtime;
    let source = topology.source.factory(&topology.name, &topology.runtime)?;
    let ctx = SinkContext {
        pipeline: topology.name.clone(),
        columns: task.output_columns(),
        resumable: source.resumable(),
        workers: opts.process * workers..(opts.process + 1) * workers,
    };
    let sinks: Vec<Arc<dyn SinkFactory>> = resolve_sinks(topology).iter().map(|s| s.factory()).collect();
    let mut outputs = Vec::new();
    // The sinks that store checkpoints are written last, in the order given, so the last of
    // them holds the oldest: the source resumes from there.
    let mut resume = Vec::new();
    for s in &sinks {
        if let Some(stored) = s.open(&ctx).map_err(|error| RunError::Sink { kind: s.kind(), error })? {
            resume = stored;
        }
        outputs.push(s.describe());
    }
    if !resume.is_empty() {
        tracing::info!(checkpoints = resume.len(), "resuming {} from the checkpoints stored with the answers", source.describe());
    }
    let resume = Arc::new(resume);
    let harness = HarnessSettings {
        epoch_records: rt.epoch_records,
        max_epochs_in_flight: rt.max_epochs_in_flight,
        max_records_in_flight: rt.max_records_in_flight,
        max_bytes_in_flight: rt.max_bytes_in_flight,
        // A quarter of the grace: the pace is measured under the load of the moment, and a busier
        // machine at the stop drains slower.
        drain_within: Some(Duration::from_millis(rt.shutdown_grace_ms / 4)),
    };
    // A table that supplies changes retracts the answer of a row that fails (a fresh read would
    // give it none).
    let retract = source.keying() == crate::source::Keying::Changes;
    let decoding = DecodeSettings { id_from: source.id_from(), max_id_bytes: rt.max_id_bytes, retract_failures: retract };
    let (keying, window, max_dead) = (source.keying(), rt.dedupe_window, rt.max_dead_letter_bytes);
    let fatal = FatalSlot::default();
    let progress = Arc::new(Progress::default());
    let bar = progress::spawn_bar(progress.clone(), opts.progress && rt.progress);
    let started = Instant::now();
    let p2 = progress.clone();
    let f2 = fatal.clone();
    let guards = timely::execute(timely_config(workers, opts), move |worker| -> Result<(), RunError> {
        let index = worker.index();
        let mut writers: Vec<Box<dyn SinkWriter>> = Vec::new();
        for s in &sinks {
            let w = s.writer(&ctx, index).map_err(|error| RunError::Sink { kind: s.kind(), error })?;
            writers.push(crate::fault::FaultySink::wrap(w));
        }
        let durable = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let (records, checkpoints) =
                source_harness(scope, source.clone(), resume.clone(), harness.clone(), durable.clone(), stop.clone(), f2.clone(), p2.clone());
            let (requests, bad) = decode(records, task.clone(), decoding.clone());
            let forget = crate::operators::key_by_id::Forget::default();
            let (requests, deletes) = key_by_id(requests, keying, window, forget.clone());
            let (answers, refused, retracted) = infer(requests, task.clone(), handle.clone(), retract, forget.clone());
            let dead = bad.concat(refused);
            let deletes = deletes.concat(retracted);
            durable_sink(answers, deletes, dead, checkpoints, writers, max_dead, retract, forget, p2.clone()).probe_with(&durable);
        });
        while worker.step_or_park(None) {}
        Ok(())
    })
    .map_err(RunError::Timely)?;
    let results = guards.join();
    progress.finished.store(true, Ordering::Relaxed);
    if let Some(b) = bar {
        let _ = b.join();
    }
    for r in results {
        r.map_err(RunError::WorkerPanicked)??;
    }
    if let Some(e) = fatal.take() {
        return Err(e.into());
    }
    Ok(Summary {
        read: progress.read.load(Ordering::Relaxed),
        answered: progress.answered.load(Ordering::Relaxed),
        deleted: progress.deleted.load(Ordering::Relaxed),
        dead_letters: progress.dead.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        outputs,
    })
}
