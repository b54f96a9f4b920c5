//! The per-process inference service: it owns the ONNX Runtime session(s) on threads of its own,
//! forms dynamic batches across all timely workers, and wakes each worker when its results are
//! ready. A worker thread submits and returns at once; it never blocks on a model. Interactive
//! (online) requests have a lane of their own that runs ahead of the streams' and jobs' bulk
//! lane, and a new model version is swapped in between batches.

use crate::batcher::{self, BatchPolicy};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{BinaryHeap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use timely::scheduling::SyncActivator;

/// An inference error: the model (or ONNX Runtime) cannot be set up, or a batch cannot be run.
/// Set-up errors stop the run before it starts; run errors fail only the units they hit.
#[derive(Clone, Debug, thiserror::Error)]
pub enum InferenceError {
    /// The ONNX Runtime shared library cannot be found, loaded or started, so no model can run.
    /// The message says how to install it.
    #[error("{0}")]
    Library(String),
    /// A model or tokenizer file cannot be read or loaded, or does not fit its task (missing
    /// inputs or outputs, unsupported element types or shapes): the run cannot start.
    #[error("{reason}")]
    Load { path: PathBuf, reason: String },
    /// An inference thread cannot be started.
    #[error("cannot start an inference thread: {0}")]
    Spawn(Arc<std::io::Error>),
    /// The model's input tensors cannot be built from the batch's units (a value the tensor
    /// refuses): the same units would fail again, so the batch is split at once to isolate them.
    #[error("{0}")]
    Input(String),
    /// ONNX Runtime failed the run, or its outputs are not what the task expects: the batch is
    /// retried once, then split until the failing units are isolated.
    #[error("{0}")]
    Run(String),
    /// The inference service stopped (its model thread panicked) before running the unit.
    #[error("inference service stopped")]
    Stopped,
    /// The interactive request was canceled (its caller went away) before the unit ran.
    #[error("the request was canceled before it ran")]
    Canceled,
    /// The interactive request's deadline passed before the unit ran.
    #[error("the request's timeout passed before it ran")]
    Expired,
}

impl InferenceError {
    /// Whether running the same batch again may succeed. A batch whose error is not retryable
    /// is split without a second try.
    pub fn retryable(&self) -> bool {
        matches!(self, InferenceError::Run(_))
    }
}

/// A model the service can run: it turns a batch of units into one output per unit.
pub trait Model: Send + 'static {
    /// One unit of model input: a QA window, a tabular row.
    type Unit: Send + 'static;
    /// The model's output for one unit.
    type Out: Send + 'static;
    /// Padding cost of a unit (its sequence length); units of similar cost are batched together.
    fn cost(unit: &Self::Unit) -> usize;
    /// Whether a unit's output is independent of the other units in its batch.
    fn batch_invariant(&self) -> bool;
    /// Runs one batch. The output has one entry per unit, in order.
    fn run(&mut self, units: &[&Self::Unit]) -> Result<Vec<Self::Out>, InferenceError>;
}

/// One unit's result, addressed to the requester's ticket.
pub struct Completion<O> {
    pub ticket: u64,
    pub index: usize,
    pub result: Result<O, InferenceError>,
}

/// What one model run sends one requester: its units' results and the model (`name@version`)
/// that made them, which changes when a new version is swapped in.
pub struct Delivery<O> {
    pub model: Arc<str>,
    pub completions: Vec<Completion<O>>,
}

/// Where a requester receives its completions: a timely operator's channel (woken by its
/// activator), or a callback run on the model thread (an online request's collector).
enum Route<O> {
    Channel { tx: Sender<Delivery<O>>, activator: Option<SyncActivator> },
    Call(Box<dyn Fn(Delivery<O>) + Send + Sync>),
}

/// Where a requester receives its completions, and how it is woken. The service sends one
/// message per model run per requester, holding every completion of that run.
pub struct ReplyTo<O> {
    route: Route<O>,
}

impl<O> ReplyTo<O> {
    /// A reply address; `activator` wakes the requesting operator when results arrive.
    pub fn new(activator: Option<SyncActivator>) -> (Arc<Self>, Receiver<Delivery<O>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Arc::new(ReplyTo { route: Route::Channel { tx, activator } }), rx)
    }

    /// A reply address that hands each delivery to `f`, on the model thread.
    pub fn call(f: impl Fn(Delivery<O>) + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(ReplyTo { route: Route::Call(Box::new(f)) })
    }

    fn send(&self, delivery: Delivery<O>) {
        match &self.route {
            Route::Channel { tx, activator } => {
                let _ = tx.send(delivery);
                if let Some(a) = activator {
                    let _ = a.activate();
                }
            }
            Route::Call(f) => f(delivery),
        }
    }
}

/// One unit of a submission: the requester's ticket and the unit's index within its request.
pub struct Unit<U> {
    pub ticket: u64,
    pub index: usize,
    pub unit: U,
}

/// What an interactive request asks of the service beyond its units: its priority (lower runs
/// first, as Triton's priority levels), its deadline, and whether its caller still waits. Units
/// of a request that is canceled or past its deadline are dropped before they reach the model.
#[derive(Debug)]
pub struct Interest {
    pub priority: u32,
    pub deadline: Option<Instant>,
    canceled: AtomicBool,
}

impl Interest {
    pub fn new(priority: u32, deadline: Option<Instant>) -> Arc<Interest> {
        Arc::new(Interest { priority, deadline, canceled: AtomicBool::new(false) })
    }

    /// The caller stopped waiting (it disconnected, or gave up): what is still queued is dropped.
    pub fn cancel(&self) {
        self.canceled.store(true, Ordering::Relaxed);
    }

    fn dropped(&self, now: Instant) -> Option<InferenceError> {
        if self.canceled.load(Ordering::Relaxed) {
            Some(InferenceError::Canceled)
        } else if self.deadline.is_some_and(|d| d <= now) {
            Some(InferenceError::Expired)
        } else {
            None
        }
    }
}

/// What a worker sends in one message: the units of a whole chunk of requests and where to
/// reply; an interactive submission also carries its request's [`Interest`].
struct Submission<U, O> {
    units: Vec<Unit<U>>,
    reply: Arc<ReplyTo<O>>,
    interest: Option<Arc<Interest>>,
}

/// What the service has done since it started: model runs, the units they ran (interactive ones
/// among them), and the interactive units dropped before running (canceled, past their deadline).
#[derive(Debug, Default)]
pub struct ServiceStats {
    pub runs: AtomicU64,
    pub units: AtomicU64,
    pub online_units: AtomicU64,
    /// Interactive units submitted: each is run, canceled or expired.
    pub online_submitted: AtomicU64,
    pub canceled_units: AtomicU64,
    pub expired_units: AtomicU64,
    /// Time spent in model runs, in microseconds.
    pub run_micros: AtomicU64,
}

/// A new version waiting to be swapped in: one model per model thread, and its label.
struct NextVersion<M> {
    generation: u64,
    models: Vec<M>,
    label: Arc<str>,
}

/// The service's model version: each model thread swaps in the newest between two batches, so a
/// batch in flight finishes on the version it started on.
struct Versions<M> {
    generation: AtomicU64,
    next: Mutex<NextVersion<M>>,
}

/// A cloneable handle to submit units to the service. The service stops once every handle is dropped.
pub struct InferenceHandle<M: Model> {
    bulk: Sender<Submission<M::Unit, M::Out>>,
    online: Sender<Submission<M::Unit, M::Out>>,
    queued: Arc<AtomicI64>,
    stats: Arc<ServiceStats>,
    versions: Arc<Versions<M>>,
    threads: usize,
}

impl<M: Model> Clone for InferenceHandle<M> {
    fn clone(&self) -> Self {
        InferenceHandle {
            bulk: self.bulk.clone(),
            online: self.online.clone(),
            queued: self.queued.clone(),
            stats: self.stats.clone(),
            versions: self.versions.clone(),
            threads: self.threads,
        }
    }
}

impl<M: Model> InferenceHandle<M> {
    /// Queues `units` (of any number of requests) in one message on the bulk lane (streams and
    /// jobs); their completions arrive on `reply`'s channel, addressed by ticket and index.
    pub fn submit(&self, units: Vec<Unit<M::Unit>>, reply: &Arc<ReplyTo<M::Out>>) {
        self.send(&self.bulk, Submission { units, reply: reply.clone(), interest: None });
    }

    /// Queues one interactive request's units on the lane that runs ahead of bulk work, in order
    /// of `interest.priority`; they are dropped unrun if it is canceled or its deadline passes.
    pub fn submit_online(&self, units: Vec<Unit<M::Unit>>, reply: &Arc<ReplyTo<M::Out>>, interest: Arc<Interest>) {
        self.stats.online_submitted.fetch_add(units.len() as u64, Ordering::Relaxed);
        self.send(&self.online, Submission { units, reply: reply.clone(), interest: Some(interest) });
    }

    fn send(&self, lane: &Sender<Submission<M::Unit, M::Out>>, sub: Submission<M::Unit, M::Out>) {
        if sub.units.is_empty() {
            return;
        }
        self.queued.fetch_add(sub.units.len() as i64, Ordering::Relaxed);
        if let Err(err) = lane.send(sub) {
            // The service is gone (a model thread panicked): answer with an error, never drop.
            let sub = err.into_inner();
            let failed = sub.units.into_iter().map(|u| Completion { ticket: u.ticket, index: u.index, result: Err(InferenceError::Stopped) }).collect();
            sub.reply.send(Delivery { model: self.label(), completions: failed });
        }
    }

    /// What the service has run.
    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// Units queued and not yet taken into a batch.
    pub fn queued(&self) -> i64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// The label (`name@version`) of the newest version given to the service.
    pub fn label(&self) -> Arc<str> {
        lock(&self.versions.next).label.clone()
    }

    /// Model threads: a new version brings one model for each.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Swaps in a new version: each model thread takes one of `models` before its next batch (a
    /// batch in flight finishes on the old one), and its answers carry `label`.
    pub fn swap(&self, models: Vec<M>, label: Arc<str>) -> Result<(), String> {
        if models.len() != self.threads {
            return Err(format!("a new version needs one model for each of the {} model threads, got {}", self.threads, models.len()));
        }
        let mut next = lock(&self.versions.next);
        let generation = next.generation + 1;
        *next = NextVersion { generation, models, label };
        self.versions.generation.store(generation, Ordering::Release);
        Ok(())
    }
}

impl<M: Model> crate::source::ModelVersion for InferenceHandle<M> {
    fn generation(&self) -> u64 {
        self.versions.generation.load(Ordering::Acquire)
    }

    fn label(&self) -> Arc<str> {
        InferenceHandle::label(self)
    }
}

/// Starts one model thread per model (each its own session): with several, one thread forms and
/// copies the next batch while another's runs, so that many model runs are in flight. The
/// threads share one queue per lane. Their answers carry `label` until a new version is swapped
/// in. Returns the handle and the threads to join after the last handle is dropped.
pub fn start<M: Model>(models: Vec<M>, policy: BatchPolicy, label: Arc<str>) -> Result<(InferenceHandle<M>, Vec<JoinHandle<()>>), InferenceError> {
    let (bulk, bulk_rx) = crossbeam_channel::unbounded::<Submission<M::Unit, M::Out>>();
    let (online, online_rx) = crossbeam_channel::unbounded::<Submission<M::Unit, M::Out>>();
    let queued = Arc::new(AtomicI64::new(0));
    let stats = Arc::new(ServiceStats::default());
    let versions =
        Arc::new(Versions { generation: AtomicU64::new(0), next: Mutex::new(NextVersion { generation: 0, models: Vec::new(), label: label.clone() }) });
    let threads = models.len();
    let mut joins = Vec::new();
    for (i, model) in models.into_iter().enumerate() {
        let lanes = Lanes { bulk: bulk_rx.clone(), online: online_rx.clone() };
        let shared = Shared { queued: queued.clone(), stats: stats.clone(), versions: versions.clone() };
        let label = label.clone();
        let join = std::thread::Builder::new()
            .name(format!("sluice-inference-{i}"))
            .spawn(move || serve(model, label, lanes, policy, shared))
            .map_err(|e| InferenceError::Spawn(Arc::new(e)))?;
        joins.push(join);
    }
    Ok((InferenceHandle { bulk, online, queued, stats, versions, threads }, joins))
}

struct Lanes<U, O> {
    bulk: Receiver<Submission<U, O>>,
    online: Receiver<Submission<U, O>>,
}

struct Shared<M> {
    queued: Arc<AtomicI64>,
    stats: Arc<ServiceStats>,
    versions: Arc<Versions<M>>,
}

/// An interactive submission waiting on one model thread, ordered by priority, then arrival.
struct Waiting<U, O> {
    priority: u32,
    seq: u64,
    sub: Submission<U, O>,
}

impl<U, O> PartialEq for Waiting<U, O> {
    fn eq(&self, other: &Self) -> bool {
        (self.priority, self.seq) == (other.priority, other.seq)
    }
}
impl<U, O> Eq for Waiting<U, O> {}
impl<U, O> PartialOrd for Waiting<U, O> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<U, O> Ord for Waiting<U, O> {
    /// The heap is a max-heap: the lowest priority number, then the earliest, is the greatest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.priority, other.seq).cmp(&(self.priority, self.seq))
    }
}

/// One model run's units, each with the index of its reply address in the list beside them.
type Run<U, O> = (Arc<Vec<Arc<ReplyTo<O>>>>, Vec<(usize, Unit<U>)>);

/// Batches cut from bulk submissions, waiting on one model thread, with the replies their
/// units are addressed to (by index).
struct BulkBatches<U, O> {
    replies: Arc<Vec<Arc<ReplyTo<O>>>>,
    batches: VecDeque<Vec<(usize, Unit<U>)>>,
}

/// One model thread. Before each batch it takes a newer version if one was given. Interactive
/// submissions run first, in priority order, batched with one another as they wait (no delay:
/// a request arriving at an idle model runs at once, and those arriving during a run form the
/// next batch, so the batch grows with the load); bulk submissions are
/// collected as [`batcher`] says and cut into batches of similar cost, and an interactive
/// request that arrives meanwhile waits for at most the one bulk batch in flight.
fn serve<M: Model>(mut model: M, mut label: Arc<str>, lanes: Lanes<M::Unit, M::Out>, policy: BatchPolicy, shared: Shared<M>) {
    let invariant = model.batch_invariant();
    let mut run_size = if invariant { policy.max_batch } else { 1 };
    let latency = metrics::histogram!(crate::metrics::INFERENCE_LATENCY);
    let batch_size = metrics::histogram!(crate::metrics::BATCH_SIZE);
    let queue = metrics::gauge!(crate::metrics::INFERENCE_QUEUE);
    let mut inject_panic = crate::fault::injected(crate::fault::Fault::ModelPanic);
    let mut generation = 0u64;
    let mut waiting: BinaryHeap<Waiting<M::Unit, M::Out>> = BinaryHeap::new();
    let mut bulk: VecDeque<BulkBatches<M::Unit, M::Out>> = VecDeque::new();
    let mut seq = 0u64;
    let mut bulk_open = true;
    let mut online_open = true;
    loop {
        // A newer version: swap it in between batches.
        let newest = shared.versions.generation.load(Ordering::Acquire);
        if newest != generation {
            let mut next = lock(&shared.versions.next);
            if next.generation == newest {
                if let Some(m) = next.models.pop() {
                    model = m;
                    run_size = if model.batch_invariant() { policy.max_batch } else { 1 };
                    label = next.label.clone();
                    tracing::info!(model = %label, "model version swapped in");
                }
            }
            generation = newest;
        }
        while let Ok(sub) = lanes.online.try_recv() {
            seq += 1;
            waiting.push(Waiting { priority: sub.interest.as_ref().map_or(u32::MAX, |i| i.priority), seq, sub });
        }
        let run: Option<Run<M::Unit, M::Out>> = if !waiting.is_empty() {
            online_batch(&mut waiting, run_size, &shared, &label)
        } else if let Some(front) = bulk.front_mut() {
            let batch = front.batches.pop_front();
            let replies = front.replies.clone();
            if front.batches.is_empty() {
                bulk.pop_front();
            }
            batch.map(|b| (replies, b))
        } else {
            // Idle: wait for either lane.
            if !bulk_open && !online_open {
                return;
            }
            let mut select = crossbeam_channel::Select::new();
            let b = bulk_open.then(|| select.recv(&lanes.bulk));
            let o = online_open.then(|| select.recv(&lanes.online));
            let op = select.select();
            let index = op.index();
            if Some(index) == o {
                match op.recv(&lanes.online) {
                    Ok(sub) => {
                        seq += 1;
                        waiting.push(Waiting { priority: sub.interest.as_ref().map_or(u32::MAX, |i| i.priority), seq, sub });
                    }
                    Err(_) => online_open = false,
                }
            } else if Some(index) == b {
                match op.recv(&lanes.bulk) {
                    Ok(first) => {
                        let subs = batcher::collect_after(first, &lanes.bulk, &policy, |s| s.units.len(), Some(&lanes.online));
                        let replies: Vec<Arc<ReplyTo<M::Out>>> = subs.iter().map(|s| s.reply.clone()).collect();
                        let mut units: Vec<(usize, Unit<M::Unit>)> = Vec::with_capacity(subs.iter().map(|s| s.units.len()).sum());
                        for (r, sub) in subs.into_iter().enumerate() {
                            units.extend(sub.units.into_iter().map(|u| (r, u)));
                        }
                        shared.queued.fetch_sub(units.len() as i64, Ordering::Relaxed);
                        queue.set(shared.queued.load(Ordering::Relaxed).max(0) as f64);
                        let batches = batcher::group_by_cost(units, |(_, u)| M::cost(&u.unit), run_size);
                        bulk.push_back(BulkBatches { replies: Arc::new(replies), batches: batches.into() });
                    }
                    Err(_) => bulk_open = false,
                }
            }
            continue;
        };
        let Some((replies, batch)) = run else { continue };
        if batch.is_empty() {
            continue;
        }
        let inputs: Vec<&M::Unit> = batch.iter().map(|(_, u)| &u.unit).collect();
        let started = Instant::now();
        if std::mem::take(&mut inject_panic) {
            panic!("injected fault: the model panicked (SLUICE_FAULT=model-panic)");
        }
        let outs = run_isolating(&mut model, &inputs);
        let took = started.elapsed();
        latency.record(took.as_secs_f64());
        batch_size.record(inputs.len() as f64);
        shared.stats.runs.fetch_add(1, Ordering::Relaxed);
        shared.stats.units.fetch_add(inputs.len() as u64, Ordering::Relaxed);
        shared.stats.run_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        drop(inputs);
        deliver(batch, outs, &replies, &label);
    }
}

/// The next interactive batch: whole submissions in priority order, up to `run_size` units (a
/// submission larger than that runs in batches of its own). Submissions canceled or past their
/// deadline are answered with that error and never reach the model.
fn online_batch<M: Model>(
    waiting: &mut BinaryHeap<Waiting<M::Unit, M::Out>>,
    run_size: usize,
    shared: &Shared<M>,
    label: &Arc<str>,
) -> Option<Run<M::Unit, M::Out>> {
    let now = Instant::now();
    let mut replies = Vec::new();
    let mut batch: Vec<(usize, Unit<M::Unit>)> = Vec::new();
    while let Some(top) = waiting.peek() {
        if !batch.is_empty() && batch.len() + top.sub.units.len() > run_size {
            break;
        }
        let mut w = waiting.pop().expect("peeked");
        if let Some(why) = w.sub.interest.as_ref().and_then(|i| i.dropped(now)) {
            let n = w.sub.units.len();
            shared.queued.fetch_sub(n as i64, Ordering::Relaxed);
            let counter = if matches!(why, InferenceError::Canceled) { &shared.stats.canceled_units } else { &shared.stats.expired_units };
            counter.fetch_add(n as u64, Ordering::Relaxed);
            let failed = w.sub.units.into_iter().map(|u| Completion { ticket: u.ticket, index: u.index, result: Err(why.clone()) }).collect();
            w.sub.reply.send(Delivery { model: label.clone(), completions: failed });
            continue;
        }
        if w.sub.units.len() > run_size {
            // Too large for one batch: run its first `run_size` units now, the rest stays first.
            let rest = w.sub.units.split_off(run_size);
            let head = std::mem::replace(&mut w.sub.units, rest);
            shared.queued.fetch_sub(head.len() as i64, Ordering::Relaxed);
            shared.stats.online_units.fetch_add(head.len() as u64, Ordering::Relaxed);
            replies.push(w.sub.reply.clone());
            batch.extend(head.into_iter().map(|u| (0, u)));
            waiting.push(w);
            break;
        }
        let r = replies.len();
        shared.queued.fetch_sub(w.sub.units.len() as i64, Ordering::Relaxed);
        shared.stats.online_units.fetch_add(w.sub.units.len() as u64, Ordering::Relaxed);
        replies.push(w.sub.reply);
        batch.extend(w.sub.units.into_iter().map(|u| (r, u)));
    }
    Some((Arc::new(replies), batch))
}

/// One model run whose output count is checked.
fn run_checked<M: Model>(model: &mut M, units: &[&M::Unit]) -> Result<Vec<M::Out>, InferenceError> {
    let outs = model.run(units)?;
    if outs.len() != units.len() {
        return Err(InferenceError::Run(format!("model returned {} outputs for {} units", outs.len(), units.len())));
    }
    Ok(outs)
}

/// Runs a batch; a failed run is retried once (if its error is retryable), then split in halves
/// until the failing units are isolated, so only they fail and their batch-mates (other
/// workers' included) get answers.
fn run_isolating<M: Model>(model: &mut M, units: &[&M::Unit]) -> Vec<Result<M::Out, InferenceError>> {
    match run_checked(model, units) {
        Ok(outs) => outs.into_iter().map(Ok).collect(),
        Err(e) if !e.retryable() => {
            tracing::warn!(units = units.len(), "model refused the batch, splitting it: {e}");
            split_run(model, units, e)
        }
        Err(e) => {
            metrics::counter!(crate::metrics::INFERENCE_RETRIES).increment(1);
            tracing::warn!(units = units.len(), "model run failed, retrying once: {e}");
            match run_checked(model, units) {
                Ok(outs) => outs.into_iter().map(Ok).collect(),
                Err(e) => split_run(model, units, e),
            }
        }
    }
}

fn split_run<M: Model>(model: &mut M, units: &[&M::Unit], error: InferenceError) -> Vec<Result<M::Out, InferenceError>> {
    if units.len() <= 1 {
        return units.iter().map(|_| Err(error.clone())).collect();
    }
    metrics::counter!(crate::metrics::INFERENCE_RETRIES).increment(1);
    let (a, b) = units.split_at(units.len() / 2);
    let mut out = Vec::with_capacity(units.len());
    for half in [a, b] {
        match run_checked(model, half) {
            Ok(outs) => out.extend(outs.into_iter().map(Ok)),
            Err(e) => out.extend(split_run(model, half, e)),
        }
    }
    out
}

/// Sends each unit's result to its requester: one message per requester.
fn deliver<U, O>(batch: Vec<(usize, Unit<U>)>, results: Vec<Result<O, InferenceError>>, replies: &[Arc<ReplyTo<O>>], label: &Arc<str>) {
    let mut by_reply: Vec<Vec<Completion<O>>> = (0..replies.len()).map(|_| Vec::new()).collect();
    for ((r, u), result) in batch.into_iter().zip(results) {
        by_reply[r].push(Completion { ticket: u.ticket, index: u.index, result });
    }
    for (r, completions) in by_reply.into_iter().enumerate() {
        if !completions.is_empty() {
            replies[r].send(Delivery { model: label.clone(), completions });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A stand-in model for the service's own plumbing: doubles each unit and records batch sizes.
    struct Doubler {
        sizes: Arc<std::sync::Mutex<Vec<usize>>>,
        invariant: bool,
    }

    impl Model for Doubler {
        type Unit = usize;
        type Out = usize;
        fn cost(unit: &usize) -> usize {
            *unit
        }
        fn batch_invariant(&self) -> bool {
            self.invariant
        }
        fn run(&mut self, units: &[&usize]) -> Result<Vec<usize>, InferenceError> {
            self.sizes.lock().unwrap().push(units.len());
            Ok(units.iter().map(|u| **u * 2).collect())
        }
    }

    fn run_service(invariant: bool) -> (Vec<(u64, usize, usize)>, Vec<usize>) {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = sizes.clone();
        let policy = BatchPolicy { max_batch: 4, max_delay: Duration::from_millis(20), lookahead: 2 };
        let (handle, joins) = start(vec![Doubler { sizes: s2, invariant }], policy, Arc::from("doubler@1")).unwrap();
        let (reply, rx) = ReplyTo::new(None);
        let units = |ticket: u64, values: Vec<usize>| values.into_iter().enumerate().map(|(index, unit)| Unit { ticket, index, unit }).collect();
        handle.submit(units(1, vec![5, 1, 3]), &reply);
        handle.submit(units(2, vec![2, 4, 6, 8, 10]), &reply);
        let mut got: Vec<(u64, usize, usize)> = Vec::new();
        while got.len() < 8 {
            for c in rx.recv_timeout(Duration::from_secs(10)).unwrap().completions {
                got.push((c.ticket, c.index, c.result.unwrap()));
            }
        }
        drop(handle);
        for j in joins {
            j.join().unwrap();
        }
        got.sort();
        let sizes = sizes.lock().unwrap().clone();
        (got, sizes)
    }

    #[test]
    fn every_unit_gets_its_own_result_back() {
        let (got, sizes) = run_service(true);
        assert_eq!(got, vec![(1, 0, 10), (1, 1, 2), (1, 2, 6), (2, 0, 4), (2, 1, 8), (2, 2, 12), (2, 3, 16), (2, 4, 20)]);
        assert_eq!(sizes.iter().sum::<usize>(), 8);
        assert!(sizes.iter().all(|s| *s <= 4), "{sizes:?}");
    }

    #[test]
    fn batch_dependent_models_run_one_unit_per_call() {
        let (got, sizes) = run_service(false);
        assert_eq!(got.len(), 8);
        assert!(sizes.iter().all(|s| *s == 1), "{sizes:?}");
    }

    /// Fails every run that holds a unit equal to `poison`, and counts runs. With `refuse`, the
    /// failure is a refused input (not retryable) rather than a failed run.
    struct Poisoned {
        poison: usize,
        runs: usize,
        refuse: bool,
    }

    impl Model for Poisoned {
        type Unit = usize;
        type Out = usize;
        fn cost(_: &usize) -> usize {
            1
        }
        fn batch_invariant(&self) -> bool {
            true
        }
        fn run(&mut self, units: &[&usize]) -> Result<Vec<usize>, InferenceError> {
            self.runs += 1;
            if units.iter().any(|u| **u == self.poison) {
                let why = format!("cannot run unit {}", self.poison);
                return Err(if self.refuse { InferenceError::Input(why) } else { InferenceError::Run(why) });
            }
            Ok(units.iter().map(|u| **u + 100).collect())
        }
    }

    #[test]
    fn a_failing_run_is_retried_then_split_so_only_the_failing_unit_fails() {
        let mut model = Poisoned { poison: 5, runs: 0, refuse: false };
        let units: Vec<usize> = (0..8).collect();
        let refs: Vec<&usize> = units.iter().collect();
        let results = run_isolating(&mut model, &refs);
        assert_eq!(results.len(), 8);
        for (u, r) in units.iter().zip(&results) {
            if *u == 5 {
                assert!(matches!(r, Err(InferenceError::Run(why)) if why == "cannot run unit 5"), "unit 5 fails with the model's error");
            } else {
                assert_eq!(r.as_ref().ok(), Some(&(u + 100)), "unit {u} keeps its answer");
            }
        }
        // 2 whole-batch tries, then halves down to the unit: at most 2 + 2 * log2(8) runs.
        assert!(model.runs <= 8, "{} runs", model.runs);
        let mut healthy = Poisoned { poison: 99, runs: 0, refuse: false };
        assert!(run_isolating(&mut healthy, &refs).iter().all(|r| r.is_ok()));
        assert_eq!(healthy.runs, 1, "a good batch runs once");
    }

    #[test]
    fn a_refused_input_is_split_without_a_retry() {
        let units: Vec<usize> = (0..8).collect();
        let refs: Vec<&usize> = units.iter().collect();
        let mut retried = Poisoned { poison: 5, runs: 0, refuse: false };
        run_isolating(&mut retried, &refs);
        let mut refused = Poisoned { poison: 5, runs: 0, refuse: true };
        let results = run_isolating(&mut refused, &refs);
        assert_eq!(refused.runs, retried.runs - 1, "the same split, less the whole-batch retry");
        assert!(matches!(&results[5], Err(e) if !e.retryable() && e.to_string() == "cannot run unit 5"));
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 7);
    }

    /// Records when each of its runs starts and ends, and takes `run_ms` per run.
    struct Slow {
        name: usize,
        runs: Arc<std::sync::Mutex<Vec<(usize, Instant, Instant)>>>,
    }

    impl Model for Slow {
        type Unit = usize;
        type Out = usize;
        fn cost(_: &usize) -> usize {
            1
        }
        fn batch_invariant(&self) -> bool {
            true
        }
        fn run(&mut self, units: &[&usize]) -> Result<Vec<usize>, InferenceError> {
            let started = Instant::now();
            std::thread::sleep(Duration::from_millis(40));
            self.runs.lock().unwrap().push((self.name, started, Instant::now()));
            Ok(units.iter().map(|u| **u).collect())
        }
    }

    #[test]
    fn two_models_keep_two_runs_in_flight() {
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let models = (0..2).map(|name| Slow { name, runs: runs.clone() }).collect();
        let policy = BatchPolicy { max_batch: 4, max_delay: Duration::from_millis(1), lookahead: 1 };
        let (handle, joins) = start(models, policy, Arc::from("slow@1")).unwrap();
        let (reply, rx) = ReplyTo::new(None);
        for ticket in 0..8u64 {
            handle.submit((0..4).map(|index| Unit { ticket, index, unit: index }).collect(), &reply);
        }
        let mut got = 0;
        while got < 32 {
            got += rx.recv_timeout(Duration::from_secs(10)).unwrap().completions.len();
        }
        drop(handle);
        for j in joins {
            j.join().unwrap();
        }
        let runs = runs.lock().unwrap().clone();
        assert!(runs.iter().any(|r| r.0 == 0) && runs.iter().any(|r| r.0 == 1), "both models ran: {runs:?}");
        let overlapping = runs.iter().any(|a| runs.iter().any(|b| a.0 != b.0 && a.1 < b.2 && b.1 < a.2));
        assert!(overlapping, "a run of one model overlapped a run of the other");
    }

    /// Records the units of each run, in order, and takes `run_ms` per run.
    struct Recorder {
        runs: Arc<std::sync::Mutex<Vec<Vec<usize>>>>,
        run_ms: u64,
    }

    impl Model for Recorder {
        type Unit = usize;
        type Out = usize;
        fn cost(_: &usize) -> usize {
            1
        }
        fn batch_invariant(&self) -> bool {
            true
        }
        fn run(&mut self, units: &[&usize]) -> Result<Vec<usize>, InferenceError> {
            self.runs.lock().unwrap().push(units.iter().map(|u| **u).collect());
            std::thread::sleep(Duration::from_millis(self.run_ms));
            Ok(units.iter().map(|u| **u).collect())
        }
    }

    fn units(ticket: u64, values: impl IntoIterator<Item = usize>) -> Vec<Unit<usize>> {
        values.into_iter().enumerate().map(|(index, unit)| Unit { ticket, index, unit }).collect()
    }

    #[test]
    fn an_interactive_request_waits_for_at_most_the_bulk_batch_in_flight() {
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let policy = BatchPolicy { max_batch: 4, max_delay: Duration::from_millis(1), lookahead: 8 };
        let (handle, joins) = start(vec![Recorder { runs: runs.clone(), run_ms: 20 }], policy, Arc::from("m@1")).unwrap();
        let (bulk, bulk_rx) = ReplyTo::new(None);
        // A backlog of 8 bulk batches (0..32), then, once the first is running, one interactive unit.
        handle.submit(units(1, 0..32), &bulk);
        std::thread::sleep(Duration::from_millis(5));
        let (online, online_rx) = ReplyTo::new(None);
        handle.submit_online(units(2, [1000]), &online, Interest::new(1, None));
        let got = online_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!((got.completions[0].result.as_ref().ok(), &*got.model), (Some(&1000), "m@1"));
        let mut bulk_done = 0;
        while bulk_done < 32 {
            bulk_done += bulk_rx.recv_timeout(Duration::from_secs(10)).unwrap().completions.len();
        }
        drop(handle);
        joins.into_iter().for_each(|j| j.join().unwrap());
        let runs = runs.lock().unwrap().clone();
        let at = runs.iter().position(|r| r == &vec![1000]).expect("the interactive unit ran");
        assert!(at <= 1, "the interactive unit ran after {at} bulk batches, not after at most the one in flight: {runs:?}");
        assert_eq!(runs.len(), 9, "8 bulk batches and the interactive one: {runs:?}");
    }

    #[test]
    fn canceled_and_expired_interactive_units_never_reach_the_model() {
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let policy = BatchPolicy { max_batch: 4, max_delay: Duration::from_millis(1), lookahead: 1 };
        let (handle, joins) = start(vec![Recorder { runs: runs.clone(), run_ms: 50 }], policy, Arc::from("m@1")).unwrap();
        let (reply, rx) = ReplyTo::new(None);
        // Keep the model busy, then queue three interactive requests: one canceled, one past its
        // deadline by the time the model is free, one that runs.
        handle.submit_online(units(1, [1]), &reply, Interest::new(1, None));
        std::thread::sleep(Duration::from_millis(10));
        let canceled = Interest::new(1, None);
        handle.submit_online(units(2, [2, 2]), &reply, canceled.clone());
        handle.submit_online(units(3, [3]), &reply, Interest::new(1, Some(Instant::now() + Duration::from_millis(5))));
        handle.submit_online(units(4, [4]), &reply, Interest::new(1, None));
        canceled.cancel();
        let mut results = Vec::new();
        while results.len() < 5 {
            for c in rx.recv_timeout(Duration::from_secs(10)).unwrap().completions {
                results.push((c.ticket, c.result.map_err(|e| e.to_string())));
            }
        }
        let stats = (
            handle.stats().units.load(Ordering::Relaxed),
            handle.stats().canceled_units.load(Ordering::Relaxed),
            handle.stats().expired_units.load(Ordering::Relaxed),
        );
        drop(handle);
        joins.into_iter().for_each(|j| j.join().unwrap());
        results.sort_by_key(|r| r.0);
        assert_eq!(results[0], (1, Ok(1)));
        assert_eq!(results[1], (2, Err(InferenceError::Canceled.to_string())));
        assert_eq!(results[3], (3, Err(InferenceError::Expired.to_string())));
        assert_eq!(results[4], (4, Ok(4)));
        assert_eq!(runs.lock().unwrap().clone(), vec![vec![1], vec![4]], "only units 1 and 4 reached the model");
        assert_eq!(stats, (2, 2, 1), "units run, canceled, expired");
    }

    #[test]
    fn a_new_version_is_swapped_in_between_batches_and_named_in_its_answers() {
        let runs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let policy = BatchPolicy { max_batch: 2, max_delay: Duration::from_millis(1), lookahead: 1 };
        let (handle, joins) = start(vec![Recorder { runs: runs.clone(), run_ms: 1 }], policy, Arc::from("m@1")).unwrap();
        let (reply, rx) = ReplyTo::new(None);
        handle.submit(units(1, [1, 2]), &reply);
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(handle.swap(vec![], Arc::from("m@2")).is_err(), "one model per model thread");
        handle.swap(vec![Recorder { runs: runs.clone(), run_ms: 1 }], Arc::from("m@2")).unwrap();
        assert_eq!(&*handle.label(), "m@2");
        handle.submit(units(2, [3, 4]), &reply);
        let second = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        drop(handle);
        joins.into_iter().for_each(|j| j.join().unwrap());
        assert_eq!((&*first.model, &*second.model), ("m@1", "m@2"));
    }
}
