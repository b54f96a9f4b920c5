//! The per-process inference service: it owns the ONNX Runtime session(s) on threads of its own,
//! forms dynamic batches across all timely workers, and wakes each worker when its results are
//! ready. A worker thread submits and returns at once; it never blocks on a model.

use crate::batcher::{self, BatchPolicy};
use crossbeam_channel::{Receiver, Sender};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
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

/// Where a requester (one timely operator) receives its completions, and how it is woken. The
/// service sends one message per model run per requester, holding every completion of that run.
pub struct ReplyTo<O> {
    tx: Sender<Vec<Completion<O>>>,
    activator: Option<SyncActivator>,
}

impl<O> ReplyTo<O> {
    /// A reply address; `activator` wakes the requesting operator when results arrive.
    pub fn new(activator: Option<SyncActivator>) -> (Arc<Self>, Receiver<Vec<Completion<O>>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Arc::new(ReplyTo { tx, activator }), rx)
    }

    fn send(&self, completions: Vec<Completion<O>>) {
        let _ = self.tx.send(completions);
        if let Some(a) = &self.activator {
            let _ = a.activate();
        }
    }
}

/// One unit of a submission: the requester's ticket and the unit's index within its request.
pub struct Unit<U> {
    pub ticket: u64,
    pub index: usize,
    pub unit: U,
}

/// What a worker sends in one message: the units of a whole chunk of requests and where to reply.
struct Submission<U, O> {
    units: Vec<Unit<U>>,
    reply: Arc<ReplyTo<O>>,
}

/// A cloneable handle to submit units to the service. The service stops once every handle is dropped.
pub struct InferenceHandle<M: Model> {
    tx: Sender<Submission<M::Unit, M::Out>>,
    queued: Arc<AtomicI64>,
}

impl<M: Model> Clone for InferenceHandle<M> {
    fn clone(&self) -> Self {
        InferenceHandle { tx: self.tx.clone(), queued: self.queued.clone() }
    }
}

impl<M: Model> InferenceHandle<M> {
    /// Queues `units` (of any number of requests) in one message; their completions arrive on
    /// `reply`'s channel, addressed by ticket and index.
    pub fn submit(&self, units: Vec<Unit<M::Unit>>, reply: &Arc<ReplyTo<M::Out>>) {
        if units.is_empty() {
            return;
        }
        self.queued.fetch_add(units.len() as i64, Ordering::Relaxed);
        if let Err(err) = self.tx.send(Submission { units, reply: reply.clone() }) {
            // The service is gone (a model thread panicked): answer with an error, never drop.
            let sub = err.into_inner();
            let failed = sub.units.into_iter().map(|u| Completion { ticket: u.ticket, index: u.index, result: Err(InferenceError::Stopped) }).collect();
            sub.reply.send(failed);
        }
    }
}

/// Starts one model thread per model (each its own session): with several, one thread forms and
/// copies the next batch while another's runs, so that many model runs are in flight. The
/// threads share one queue. Returns the handle and the threads to join after the last handle is
/// dropped.
pub fn start<M: Model>(models: Vec<M>, policy: BatchPolicy) -> Result<(InferenceHandle<M>, Vec<JoinHandle<()>>), InferenceError> {
    let (tx, rx) = crossbeam_channel::unbounded::<Submission<M::Unit, M::Out>>();
    let queued = Arc::new(AtomicI64::new(0));
    let mut joins = Vec::new();
    for (i, model) in models.into_iter().enumerate() {
        let rx = rx.clone();
        let queued = queued.clone();
        let join = std::thread::Builder::new()
            .name(format!("sluice-inference-{i}"))
            .spawn(move || serve(model, rx, policy, queued))
            .map_err(|e| InferenceError::Spawn(Arc::new(e)))?;
        joins.push(join);
    }
    Ok((InferenceHandle { tx, queued }, joins))
}

fn serve<M: Model>(mut model: M, rx: Receiver<Submission<M::Unit, M::Out>>, policy: BatchPolicy, queued: Arc<AtomicI64>) {
    let invariant = model.batch_invariant();
    let run_size = if invariant { policy.max_batch } else { 1 };
    let latency = metrics::histogram!(crate::metrics::INFERENCE_LATENCY);
    let batch_size = metrics::histogram!(crate::metrics::BATCH_SIZE);
    let queue = metrics::gauge!(crate::metrics::INFERENCE_QUEUE);
    let mut inject_panic = crate::fault::injected(crate::fault::Fault::ModelPanic);
    while let Some(subs) = batcher::collect(&rx, &policy, |s| s.units.len()) {
        let replies: Vec<Arc<ReplyTo<M::Out>>> = subs.iter().map(|s| s.reply.clone()).collect();
        let mut units: Vec<(usize, Unit<M::Unit>)> = Vec::with_capacity(subs.iter().map(|s| s.units.len()).sum());
        for (r, sub) in subs.into_iter().enumerate() {
            units.extend(sub.units.into_iter().map(|u| (r, u)));
        }
        queued.fetch_sub(units.len() as i64, Ordering::Relaxed);
        queue.set(queued.load(Ordering::Relaxed).max(0) as f64);
        for batch in batcher::group_by_cost(units, |(_, u)| M::cost(&u.unit), run_size) {
            let inputs: Vec<&M::Unit> = batch.iter().map(|(_, u)| &u.unit).collect();
            let started = Instant::now();
            if std::mem::take(&mut inject_panic) {
                panic!("injected fault: the model panicked (SLUICE_FAULT=model-panic)");
            }
            let outs = run_isolating(&mut model, &inputs);
            latency.record(started.elapsed().as_secs_f64());
            batch_size.record(inputs.len() as f64);
            drop(inputs);
            deliver(batch, outs, &replies);
        }
    }
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
fn deliver<U, O>(batch: Vec<(usize, Unit<U>)>, results: Vec<Result<O, InferenceError>>, replies: &[Arc<ReplyTo<O>>]) {
    let mut by_reply: Vec<Vec<Completion<O>>> = (0..replies.len()).map(|_| Vec::new()).collect();
    for ((r, u), result) in batch.into_iter().zip(results) {
        by_reply[r].push(Completion { ticket: u.ticket, index: u.index, result });
    }
    for (r, completions) in by_reply.into_iter().enumerate() {
        if !completions.is_empty() {
            replies[r].send(completions);
        }
    }
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
        let (handle, joins) = start(vec![Doubler { sizes: s2, invariant }], policy).unwrap();
        let (reply, rx) = ReplyTo::new(None);
        let units = |ticket: u64, values: Vec<usize>| values.into_iter().enumerate().map(|(index, unit)| Unit { ticket, index, unit }).collect();
        handle.submit(units(1, vec![5, 1, 3]), &reply);
        handle.submit(units(2, vec![2, 4, 6, 8, 10]), &reply);
        let mut got: Vec<(u64, usize, usize)> = Vec::new();
        while got.len() < 8 {
            for c in rx.recv_timeout(Duration::from_secs(10)).unwrap() {
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
        let (handle, joins) = start(models, policy).unwrap();
        let (reply, rx) = ReplyTo::new(None);
        for ticket in 0..8u64 {
            handle.submit((0..4).map(|index| Unit { ticket, index, unit: index }).collect(), &reply);
        }
        let mut got = 0;
        while got < 32 {
            got += rx.recv_timeout(Duration::from_secs(10)).unwrap().len();
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
}
