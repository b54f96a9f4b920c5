//! The engine: what a sluice process owns for its whole life (the timely workers, the metrics
//! exporter, signal handling and the model registry) and the jobs it runs on them. A job is one
//! pipeline (source → decode → key by ID → infer → durable sinks) installed as a named dataflow
//! on every worker, in the order jobs were submitted, with its own stop, progress, checkpoints
//! and failure: a job that fails ends `failed` with its error while the engine and every other
//! job go on. Jobs on the same model file, task settings, execution and batching share one
//! inference service, so their requests are batched together.

use crate::inference::InferenceHandle;
use crate::online::{Loader, OnlineModel, OnlineService, OnlineSettings};
use crate::operators::decode::{decode, DecodeSettings};
use crate::operators::{infer::infer, key_by_id::key_by_id, operator_span, sink::durable_sink};
use crate::progress::{self, Progress};
use crate::runtime::{RunError, Summary};
use crate::sink::{SinkContext, SinkFactory, SinkWriter};
use crate::source::harness::{source_harness, FatalSlot, HarnessSettings};
use crate::source::{Checkpoint, Keying, SourceFactory};
use crate::tasks::Task;
use crate::topology::Topology;
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use timely::dataflow::operators::{Concat, Probe};
use timely::dataflow::ProbeHandle;

/// What the process runs with, for its whole life (the topology's `runtime.workers` and
/// `metrics` for `sluice run`; the serve config for `sluice serve`).
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// Timely worker threads in this process.
    pub workers: usize,
    /// This process's index in a cluster.
    pub process: usize,
    /// `host:port` of every process in a cluster; empty for a single process.
    pub hosts: Vec<String>,
    /// Serve Prometheus metrics on this address (its own listener); `None` for none.
    pub metrics_listen: Option<String>,
    /// Install the Prometheus recorder without a listener (`sluice serve` renders `/metrics`
    /// on its own port).
    pub metrics_recorder: bool,
    /// After SIGTERM or SIGINT, how long the jobs have to drain before the process exits
    /// non-zero; `None` leaves signals alone (tests that run an engine in-process).
    pub signals_grace: Option<Duration>,
    /// The nice value of the timely worker threads (and the threads they start): the jobs' and
    /// pipelines' bulk work. `sluice serve` raises it so that online requests (its HTTP threads
    /// and the model threads, at the process's own) come first for the CPU; 0 leaves it.
    pub worker_nice: i32,
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Enqueued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Enqueued => "enqueued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }
}

/// A running engine. Dropping it stops every job (as a signal would) and waits for them.
pub struct Engine {
    inner: Arc<Inner>,
    timely: Option<JoinHandle<Result<(), RunError>>>,
}

struct Inner {
    settings: EngineSettings,
    /// Every job ever submitted, in order; each worker installs them in this order. An entry
    /// counts the workers that installed it and is emptied by the last (its dataflow holds what
    /// it needs from then on), so a long-lived engine keeps no finished job's setup.
    log: Mutex<Vec<LogEntry>>,
    /// The log's length, read by the workers on every step without the lock.
    submitted: AtomicUsize,
    /// The worker threads, woken when a job is submitted.
    threads: Mutex<Vec<std::thread::Thread>>,
    /// Set at shutdown: workers return once their jobs are done.
    shutdown: AtomicBool,
    /// Set by SIGTERM/SIGINT: every job stops reading and drains, within the grace period
    /// the watchdog gives them.
    signalled: Arc<AtomicBool>,
    /// Set by [`Engine::stop`] or shutdown: every job stops reading and drains (no deadline).
    stop: AtomicBool,
    jobs: Mutex<Vec<Arc<JobShared>>>,
    models: ModelRegistry,
    /// The first error of a worker (timely could not start, a worker panicked).
    broken: Mutex<Option<String>>,
}

impl Inner {
    fn stopping(&self) -> bool {
        self.signalled.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed)
    }
}

impl Engine {
    /// Starts the workers, the metrics exporter and signal handling.
    pub fn start(settings: EngineSettings) -> Result<Engine, RunError> {
        if let Some(listen) = &settings.metrics_listen {
            let metrics_error = |reason: String| RunError::Metrics { listen: listen.clone(), reason };
            let addr = listen.parse().map_err(|e| metrics_error(format!("`metrics.listen` is not an address ({e})")))?;
            crate::metrics::install(addr).map_err(|e| metrics_error(e.to_string()))?;
        } else if settings.metrics_recorder {
            crate::metrics::install_recorder().map_err(|e| RunError::Metrics { listen: "/metrics".into(), reason: e })?;
        }
        let signalled = Arc::new(AtomicBool::new(false));
        if let Some(grace) = settings.signals_grace {
            for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                signal_hook::flag::register(signal, signalled.clone()).map_err(RunError::Signals)?;
            }
            crate::guard::start_watchdog(signalled.clone(), grace);
        }
        let inner = Arc::new(Inner {
            settings: settings.clone(),
            log: Mutex::new(Vec::new()),
            submitted: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
            signalled,
            stop: AtomicBool::new(false),
            jobs: Mutex::new(Vec::new()),
            models: ModelRegistry::default(),
            broken: Mutex::new(None),
        });
        // A stop (signal or shutdown) stops every job, including those submitted later.
        {
            let inner = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("sluice-engine-stop".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_millis(20));
                    let Some(inner) = inner.upgrade() else { return };
                    let mut jobs = lock(&inner.jobs);
                    // Ended jobs leave the list (their handles keep what they report).
                    jobs.retain(|j| !lock(&j.state).status.is_final());
                    if inner.stopping() {
                        for j in jobs.iter() {
                            j.stop.store(true, Ordering::Relaxed);
                        }
                    }
                })
                .map_err(RunError::Signals)?;
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let worker_inner = inner.clone();
        let config = timely_config(&settings);
        let timely = std::thread::Builder::new()
            .name("sluice-engine".into())
            .spawn(move || -> Result<(), RunError> {
                let guards = match timely::execute(config, move |worker| worker_loop(worker, &worker_inner)) {
                    Ok(g) => {
                        let _ = ready_tx.send(Ok(()));
                        g
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.clone()));
                        return Err(RunError::Timely(e));
                    }
                };
                for r in guards.join() {
                    r.map_err(RunError::WorkerPanicked)??;
                }
                Ok(())
            })
            .map_err(RunError::Signals)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = timely.join();
                return Err(RunError::Timely(e));
            }
            Err(_) => return Err(RunError::Timely("the engine thread ended while starting".into())),
        }
        Ok(Engine { inner, timely: Some(timely) })
    }

    /// The flag SIGTERM/SIGINT set: once set, every job drains and no new one starts.
    pub fn stopping(&self) -> bool {
        self.inner.stopping()
    }

    /// Stops every job as a signal would (they drain and keep what is durable).
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
    }

    /// The workers of this process.
    pub fn workers(&self) -> usize {
        self.inner.settings.workers.max(1)
    }

    /// Prepares a job (loads or shares its model, opens its sinks, reads the checkpoints they
    /// hold) and installs its dataflow on every worker. An error here is the job's, returned
    /// before anything runs; errors met while it runs end it `failed` (see [`Job::wait`]).
    pub fn submit(&self, id: &str, topology: &Topology, opts: JobOptions) -> Result<Job, RunError> {
        if self.inner.stopping() {
            return Err(RunError::Stopping);
        }
        if self.inner.settings.hosts.len() > 1 && !lock(&self.inner.log).is_empty() {
            return Err(RunError::Timely("a cluster engine runs the one job it was started with".into()));
        }
        if let Some(e) = lock(&self.inner.broken).clone() {
            return Err(RunError::WorkerPanicked(e));
        }
        let shared = Arc::new(JobShared::new(id, topology, self.inner.settings.workers.max(1), opts.ended.clone()));
        // The task starts (or shares) its model service and prepares the job's dataflow.
        let start = JobStart { inner: &self.inner, job: shared.clone(), topology, opts };
        let Installed(install) = topology.task.start(start)?;
        lock(&self.inner.jobs).push(shared.clone());
        shared.set_status(JobStatus::Running);
        if self.inner.stopping() {
            shared.stop.store(true, Ordering::Relaxed);
        }
        {
            let mut log = lock(&self.inner.log);
            log.push((0, Some(install)));
            self.inner.submitted.store(log.len(), Ordering::Release);
        }
        for t in lock(&self.inner.threads).iter() {
            t.unpark();
        }
        Ok(Job { shared })
    }

    /// Serves `topology`'s model online: its task decodes and prepares each request, and the
    /// units run in the interactive lane of the model service its jobs share.
    pub fn online(&self, topology: &Topology, settings: OnlineSettings) -> Result<Arc<dyn OnlineModel>, RunError> {
        if let Some(e) = lock(&self.inner.broken).clone() {
            return Err(RunError::WorkerPanicked(e));
        }
        topology.task.online(OnlineStart { inner: &self.inner, topology, settings })
    }

    /// The inference services running: one per model file, task settings, execution and
    /// batching, however many jobs use it.
    pub fn model_services(&self) -> usize {
        lock(&self.inner.models.services).len()
    }

    /// Jobs whose setup the log still holds (not yet installed by every worker).
    pub fn pending_installs(&self) -> usize {
        lock(&self.inner.log).iter().filter(|(_, e)| e.is_some()).count()
    }

    /// The jobs not yet ended, oldest first.
    pub fn jobs(&self) -> Vec<Job> {
        lock(&self.inner.jobs).iter().map(|s| Job { shared: s.clone() }).collect()
    }

    /// Stops every job, waits for them to drain, and stops the workers and inference services.
    pub fn shutdown(mut self) -> Result<(), RunError> {
        self.close()
    }

    fn close(&mut self) -> Result<(), RunError> {
        self.inner.stop.store(true, Ordering::Relaxed);
        for j in lock(&self.inner.jobs).iter() {
            j.stop.store(true, Ordering::Relaxed);
        }
        self.inner.shutdown.store(true, Ordering::Relaxed);
        for t in lock(&self.inner.threads).iter() {
            t.unpark();
        }
        let result = match self.timely.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err(RunError::WorkerPanicked("the engine thread panicked".into()))),
            None => Ok(()),
        };
        lock(&self.inner.log).clear();
        self.inner.models.close();
        result
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.timely.is_some() {
            let _ = self.close();
        }
    }
}

/// How a job reports.
#[derive(Clone, Default)]
pub struct JobOptions {
    /// Draw a progress bar on stderr while it runs (when stderr is a terminal).
    pub progress_bar: bool,
    /// Called once the job's sinks are open (files cut back to their checkpoints) and before its
    /// dataflow reads anything.
    pub opened: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Called once the job has ended (any status), on the worker thread that saw it end last.
    pub ended: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// A job's shared state: what the workers, the sinks and its handles see.
pub struct JobShared {
    pub id: String,
    pub pipeline: String,
    /// Set to stop reading (a cancel, a failure, the engine's stop); the job then drains.
    stop: Arc<AtomicBool>,
    canceled: Arc<AtomicBool>,
    fatal: FatalSlot,
    progress: Arc<Progress>,
    /// Workers of this process still running the job's dataflow.
    remaining: AtomicUsize,
    ended: Option<Arc<dyn Fn() + Send + Sync>>,
    state: Mutex<JobState>,
    done: Condvar,
}

struct JobState {
    status: JobStatus,
    started: SystemTime,
    started_at: Instant,
    finished: Option<SystemTime>,
    elapsed: Option<Duration>,
    error: Option<String>,
    outputs: Vec<String>,
    bar: Option<JoinHandle<()>>,
}

impl JobShared {
    fn new(id: &str, topology: &Topology, workers: usize, ended: Option<Arc<dyn Fn() + Send + Sync>>) -> JobShared {
        JobShared {
            id: id.to_string(),
            pipeline: topology.name.clone(),
            stop: Arc::new(AtomicBool::new(false)),
            canceled: Arc::new(AtomicBool::new(false)),
            fatal: FatalSlot::default(),
            progress: Arc::new(Progress::default()),
            remaining: AtomicUsize::new(workers),
            ended,
            state: Mutex::new(JobState {
                status: JobStatus::Enqueued,
                started: SystemTime::now(),
                started_at: Instant::now(),
                finished: None,
                elapsed: None,
                error: None,
                outputs: Vec::new(),
                bar: None,
            }),
            done: Condvar::new(),
        }
    }

    fn set_status(&self, status: JobStatus) {
        lock(&self.state).status = status;
    }

    /// One worker's dataflow is done; the last one decides how the job ended.
    fn worker_done(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        self.progress.finished.store(true, Ordering::Relaxed);
        {
            let mut s = lock(&self.state);
            s.finished = Some(SystemTime::now());
            s.elapsed = Some(s.started_at.elapsed());
            // A canceled job is canceled, with the error it met meanwhile if any (a sink that
            // gave up retrying because of the cancel).
            if self.canceled.load(Ordering::Relaxed) {
                s.status = JobStatus::Canceled;
                s.error = self.fatal.peek();
            } else if let Some(e) = self.fatal.peek() {
                s.status = JobStatus::Failed;
                s.error = Some(e);
            } else {
                s.status = JobStatus::Succeeded;
            }
        }
        self.done.notify_all();
        if let Some(ended) = &self.ended {
            ended();
        }
    }
}

/// A handle on a submitted job.
#[derive(Clone)]
pub struct Job {
    shared: Arc<JobShared>,
}

/// A job's state at one moment.
#[derive(Clone, Debug)]
pub struct JobSnapshot {
    pub status: JobStatus,
    pub read: u64,
    pub answered: u64,
    pub deleted: u64,
    pub dead_letters: u64,
    /// Records the source will read, once known (0 until then).
    pub total: u64,
    pub started: SystemTime,
    pub finished: Option<SystemTime>,
    pub elapsed: Duration,
    pub error: Option<String>,
}

impl Job {
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Stops the job: its source stops reading, what is read drains, and it ends `canceled`
    /// (what was made durable stays).
    pub fn cancel(&self) {
        self.shared.canceled.store(true, Ordering::Relaxed);
        self.shared.stop.store(true, Ordering::Relaxed);
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.shared.progress.clone()
    }

    pub fn snapshot(&self) -> JobSnapshot {
        let p = &self.shared.progress;
        let s = lock(&self.shared.state);
        JobSnapshot {
            status: s.status,
            read: p.read.load(Ordering::Relaxed),
            answered: p.answered.load(Ordering::Relaxed),
            deleted: p.deleted.load(Ordering::Relaxed),
            dead_letters: p.dead.load(Ordering::Relaxed),
            total: p.total.load(Ordering::Relaxed),
            started: s.started,
            finished: s.finished,
            elapsed: s.elapsed.unwrap_or_else(|| s.started_at.elapsed()),
            error: s.error.clone(),
        }
    }

    /// Waits until the job has ended, at most `timeout`; its status then.
    pub fn wait_timeout(&self, timeout: Duration) -> JobStatus {
        let s = lock(&self.shared.state);
        let (s, _) = self.shared.done.wait_timeout_while(s, timeout, |s| !s.status.is_final()).unwrap_or_else(|e| e.into_inner());
        s.status
    }

    /// Waits until the job has ended: its summary, or the error that failed it.
    pub fn wait(&self) -> Result<Summary, RunError> {
        let mut s = lock(&self.shared.state);
        while !s.status.is_final() {
            s = self.shared.done.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let outputs = s.outputs.clone();
        let elapsed = s.elapsed.unwrap_or_default();
        let bar = s.bar.take();
        drop(s);
        if let Some(b) = bar {
            let _ = b.join();
        }
        if let Some(e) = self.shared.fatal.take() {
            return Err(e);
        }
        let p = &self.shared.progress;
        Ok(Summary {
            read: p.read.load(Ordering::Relaxed),
            answered: p.answered.load(Ordering::Relaxed),
            deleted: p.deleted.load(Ordering::Relaxed),
            dead_letters: p.dead.load(Ordering::Relaxed),
            elapsed,
            outputs,
        })
    }
}

/// A submitted job: the workers that installed it, and its setup until the last of them has.
type LogEntry = (usize, Option<Arc<dyn Install>>);

/// A job's dataflow, ready to be built on each worker.
trait Install: Send + Sync {
    fn install(&self, worker: &mut timely::worker::Worker) -> ProbeHandle<u64>;
    fn job(&self) -> Arc<JobShared>;
}

/// A job being submitted, handed to its task ([`TaskConfig::start`](crate::topology::TaskConfig::start)),
/// which starts or shares its model service and prepares the job with [`JobStart::install`].
pub struct JobStart<'e> {
    inner: &'e Inner,
    job: Arc<JobShared>,
    topology: &'e Topology,
    opts: JobOptions,
}

/// A model service as a task starts it: the task, the handle its units are submitted through,
/// and the service's threads (joined when the engine shuts down).
pub type Started<T> = (Arc<T>, InferenceHandle<<T as Task>::Model>, Vec<JoinHandle<()>>);

/// A job's dataflow, prepared by [`JobStart::install`] and ready to be installed on every worker.
pub struct Installed(Arc<dyn Install>);

impl<'e> JobStart<'e> {
    /// The job's topology.
    pub fn topology(&self) -> &'e Topology {
        self.topology
    }

    /// Prepares the job (opens its sinks, reads the checkpoints they hold) on the inference
    /// service for its model file, task settings, execution and batching: the one already
    /// running for them, shared with the jobs on it so their requests are batched together, or
    /// the one `start` starts.
    pub fn install<T: Task>(self, start: impl FnOnce() -> Result<Started<T>, RunError>) -> Result<Installed, RunError> {
        let t = self.topology;
        let (task, handle) = self.inner.models.get_or_start(&service_key(t), start)?;
        prepare(self.inner, self.job, t, task, handle, self.opts).map(Installed)
    }
}

/// The key of a topology's model service: jobs and online models with the same model file, task
/// settings, execution and batching share one service, so their requests are batched together.
fn service_key(t: &Topology) -> String {
    format!("{:?} {:?} {:?}", t.task, t.execution, t.batching)
}

/// A model being served online, handed to its task ([`TaskConfig::online`](crate::topology::TaskConfig::online)).
pub struct OnlineStart<'e> {
    inner: &'e Inner,
    topology: &'e Topology,
    settings: OnlineSettings,
}

impl<'e> OnlineStart<'e> {
    /// The topology whose task, execution and batching the model is served with.
    pub fn topology(&self) -> &'e Topology {
        self.topology
    }

    /// Serves the model on the inference service for its model file, task settings, execution
    /// and batching (the jobs' on it, or the one `start` starts); `loader` opens new versions.
    pub fn serve<T: Task>(self, start: impl FnOnce() -> Result<Started<T>, RunError>, loader: Loader<T::Model>) -> Result<Arc<dyn OnlineModel>, RunError> {
        let (task, handle) = self.inner.models.get_or_start(&service_key(self.topology), start)?;
        Ok(Arc::new(OnlineService {
            task,
            handle,
            settings: self.settings,
            kind: self.topology.task.kind(),
            loader,
            in_flight: Default::default(),
            loading: Default::default(),
        }))
    }
}

/// One worker's sink writers, in the topology's order.
type Writers = Vec<Box<dyn SinkWriter>>;

/// Everything one job's dataflow needs on every worker, prepared once per process.
struct Prepared<T: Task> {
    job: Arc<JobShared>,
    task: Arc<T>,
    handle: InferenceHandle<T::Model>,
    source: Arc<dyn SourceFactory>,
    resume: Arc<Vec<Checkpoint>>,
    harness: HarnessSettings,
    decoding: DecodeSettings,
    keying: Keying,
    window: usize,
    max_dead: usize,
    retract: bool,
    /// Each local worker's sink writers, taken when it installs the dataflow.
    writers: Mutex<Vec<Option<Writers>>>,
    first_worker: usize,
}

fn prepare<T: Task>(
    inner: &Inner,
    job: Arc<JobShared>,
    topology: &Topology,
    task: Arc<T>,
    handle: InferenceHandle<T::Model>,
    opts: JobOptions,
) -> Result<Arc<dyn Install>, RunError> {
    let settings = &inner.settings;
    let workers = settings.workers.max(1);
    let rt = &topology.runtime;
    let source = topology.source.factory(&topology.name, &topology.runtime)?;
    let first_worker = settings.process * workers;
    let ctx = SinkContext {
        pipeline: topology.name.clone(),
        columns: task.output_columns(),
        resumable: source.resumable(),
        workers: first_worker..first_worker + workers,
    };
    let sinks: Vec<Arc<dyn SinkFactory>> = topology.sinks.iter().map(|s| s.factory()).collect();
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
    if let Some(opened) = &opts.opened {
        opened();
    }
    if !resume.is_empty() {
        tracing::info!(checkpoints = resume.len(), job = %job.id, "resuming {} from the checkpoints stored with the answers", source.describe());
    }
    let mut writers = Vec::with_capacity(workers);
    for index in first_worker..first_worker + workers {
        let mut ws: Vec<Box<dyn SinkWriter>> = Vec::new();
        for s in &sinks {
            let w = s.writer(&ctx, index).map_err(|error| RunError::Sink { kind: s.kind(), error })?;
            ws.push(crate::fault::FaultySink::wrap(w));
        }
        writers.push(Some(ws));
    }
    let harness = HarnessSettings {
        epoch_records: rt.epoch_records,
        max_epochs_in_flight: rt.max_epochs_in_flight,
        max_records_in_flight: rt.max_records_in_flight,
        max_bytes_in_flight: rt.max_bytes_in_flight,
        // A quarter of the grace: the pace is measured under the load of the moment, and a busier
        // machine at the stop drains slower.
        drain_within: Some(Duration::from_millis(rt.shutdown_grace_ms / 4)),
        model: None,
    };
    let mut harness = harness;
    if rt.on_model_change == crate::topology::OnModelChange::Recompute {
        if !source.recomputes() {
            return Err(RunError::Source(crate::source::SourceError::Config(format!(
                "{}: runtime.on_model_change = \"recompute\" needs a source that can answer every live row again (a watched files source: type = \"files\", watch = true); {} cannot\n  hint: remove on_model_change, or read the rows from a watched folder",
                topology.name,
                source.describe()
            ))));
        }
        harness.model = Some(Arc::new(handle.clone()));
    }
    // A table that supplies changes retracts the answer of a row that fails (a fresh read would
    // give it none).
    let retract = source.keying() == Keying::Changes;
    let decoding = DecodeSettings { id_from: source.id_from(), max_id_bytes: rt.max_id_bytes, retract_failures: retract };
    {
        let mut s = lock(&job.state);
        s.outputs = outputs;
        s.started = SystemTime::now();
        s.started_at = Instant::now();
        s.bar = progress::spawn_bar(job.progress.clone(), opts.progress_bar && rt.progress);
    }
    Ok(Arc::new(Prepared {
        keying: source.keying(),
        job,
        task,
        handle,
        source,
        resume: Arc::new(resume),
        harness,
        decoding,
        window: rt.dedupe_window,
        max_dead: rt.max_dead_letter_bytes,
        retract,
        writers: Mutex::new(writers),
        first_worker,
    }))
}

impl<T: Task> Install for Prepared<T> {
    fn install(&self, worker: &mut timely::worker::Worker) -> ProbeHandle<u64> {
        let local = worker.index() - self.first_worker;
        let writers = lock(&self.writers).get_mut(local).and_then(Option::take).unwrap_or_default();
        let durable = ProbeHandle::new();
        let job = &self.job;
        let (stop, fatal, progress) = (job.stop.clone(), job.fatal.clone(), job.progress.clone());
        let name = format!("{}:{}", job.pipeline, job.id);
        let span = |operator| operator_span(&job.pipeline, operator, worker.index());
        let spans = [span("source"), span("decode"), span("key_by_id"), span("infer"), span("sink")];
        worker.dataflow_named::<u64, _, _>(&name, |scope| {
            let [source, decoding, keying, inferring, sinking] = spans;
            let (records, checkpoints) = source_harness(
                scope,
                self.source.clone(),
                self.resume.clone(),
                self.harness.clone(),
                durable.clone(),
                stop.clone(),
                fatal.clone(),
                progress.clone(),
                source,
            );
            let (requests, bad) = decode(records, self.task.clone(), self.decoding.clone(), decoding);
            let forget = crate::operators::key_by_id::Forget::default();
            let (requests, deletes) = key_by_id(requests, self.keying, self.window, forget.clone(), keying);
            let (answers, refused, retracted) = infer(requests, self.task.clone(), self.handle.clone(), self.retract, forget.clone(), inferring);
            let dead = bad.concat(refused);
            let deletes = deletes.concat(retracted);
            let control = crate::operators::sink::JobControl { stop: stop.clone(), fatal: fatal.clone(), canceled: job.canceled.clone() };
            durable_sink(answers, deletes, dead, checkpoints, writers, self.max_dead, self.retract, forget, progress.clone(), control, sinking)
                .probe_with(&durable);
        });
        durable
    }

    fn job(&self) -> Arc<JobShared> {
        self.job.clone()
    }
}

/// A worker's life: install each submitted job in order, step them, and note each one done.
/// The loop, not a dataflow, keeps the worker alive while it has no job (timely's own
/// `step_or_park` loop would return once no dataflow is left).
fn worker_loop(worker: &mut timely::worker::Worker, inner: &Arc<Inner>) -> Result<(), RunError> {
    lock(&inner.threads).push(std::thread::current());
    if inner.settings.worker_nice != 0 {
        // This thread only: Linux keeps a nice value per thread.
        if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), inner.settings.worker_nice) {
            tracing::warn!("cannot set the worker threads' nice value to {}: {e}", inner.settings.worker_nice);
        }
    }
    let mut installed = 0usize;
    let mut running: Vec<(Arc<JobShared>, ProbeHandle<u64>)> = Vec::new();
    loop {
        let fresh: Vec<Arc<dyn Install>> = if inner.submitted.load(Ordering::Acquire) > installed {
            let mut log = lock(&inner.log);
            let workers = inner.settings.workers.max(1);
            let fresh: Vec<Arc<dyn Install>> = log
                .iter_mut()
                .skip(installed)
                .filter_map(|(count, entry)| {
                    *count += 1;
                    if *count >= workers {
                        entry.take()
                    } else {
                        entry.clone()
                    }
                })
                .collect();
            installed = log.len();
            fresh
        } else {
            Vec::new()
        };
        for cmd in fresh {
            let probe = cmd.install(worker);
            running.push((cmd.job(), probe));
        }
        let busy = worker.step_or_park(Some(Duration::from_millis(50)));
        running.retain(|(job, probe)| {
            if probe.done() {
                job.worker_done();
                false
            } else {
                true
            }
        });
        if inner.shutdown.load(Ordering::Relaxed) && running.is_empty() && !busy && installed >= inner.submitted.load(Ordering::Acquire) {
            return Ok(());
        }
    }
}

/// The inference services of the engine, one per model and settings, shared by every job on them.
#[derive(Default)]
struct ModelRegistry {
    services: Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>,
    joins: Mutex<Vec<JoinHandle<()>>>,
}

type Service<T> = (Arc<T>, InferenceHandle<<T as Task>::Model>);

impl ModelRegistry {
    /// The service for `key`, started by `start` the first time.
    fn get_or_start<T: Task>(&self, key: &str, start: impl FnOnce() -> Result<Started<T>, RunError>) -> Result<Service<T>, RunError> {
        let mut services = lock(&self.services);
        if let Some(s) = services.get(key).and_then(|s| s.clone().downcast::<Service<T>>().ok()) {
            return Ok((s.0.clone(), s.1.clone()));
        }
        let (task, handle, joins) = start()?;
        lock(&self.joins).extend(joins);
        services.insert(key.to_string(), Arc::new((task.clone(), handle.clone())));
        Ok((task, handle))
    }

    /// Drops every service's handle and waits for their threads.
    fn close(&self) {
        lock(&self.services).clear();
        for j in std::mem::take(&mut *lock(&self.joins)) {
            let _ = j.join();
        }
    }
}

fn timely_config(settings: &EngineSettings) -> timely::Config {
    let workers = settings.workers.max(1);
    let communication = if settings.hosts.len() > 1 {
        timely::CommunicationConfig::Cluster { threads: workers, process: settings.process, addresses: settings.hosts.clone(), report: false, zerocopy: false }
    } else if workers == 1 {
        timely::CommunicationConfig::Thread
    } else {
        timely::CommunicationConfig::Process(workers)
    };
    timely::Config { communication, worker: timely::WorkerConfig::default() }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
