//! The per-process inference service: it owns the ONNX Runtime session(s) on threads of its own,
//! forms dynamic batches across all timely workers, and wakes each worker when its results are
//! ready. A worker thread submits and returns at once; it never blocks on a model.

use crate::batcher::{self, BatchPolicy};
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use timely::scheduling::SyncActivator;

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
    fn run(&mut self, units: &[&Self::Unit]) -> Result<Vec<Self::Out>, String>;
}

/// One unit's result, addressed to the requester's ticket.
pub struct Completion<O> {
    pub ticket: u64,
    pub index: usize,
    pub result: Result<O, String>,
}

/// Where a requester (one timely operator) receives its completions, and how it is woken.
pub struct ReplyTo<O> {
    tx: Sender<Completion<O>>,
    activator: Option<SyncActivator>,
}

impl<O> ReplyTo<O> {
    /// A reply address; `activator` wakes the requesting operator when results arrive.
    pub fn new(activator: Option<SyncActivator>) -> (Arc<Self>, Receiver<Completion<O>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Arc::new(ReplyTo { tx, activator }), rx)
    }
}

struct Job<U, O> {
    unit: U,
    ticket: u64,
    index: usize,
    reply: Arc<ReplyTo<O>>,
}

/// A cloneable handle to submit units to the service. The service stops once every handle is dropped.
pub struct InferenceHandle<M: Model> {
    tx: Sender<Job<M::Unit, M::Out>>,
    queued: Arc<AtomicI64>,
}

impl<M: Model> Clone for InferenceHandle<M> {
    fn clone(&self) -> Self {
        InferenceHandle { tx: self.tx.clone(), queued: self.queued.clone() }
    }
}

impl<M: Model> InferenceHandle<M> {
    /// Queues `units` for the request `ticket`; completions arrive on `reply`'s channel.
    pub fn submit(&self, ticket: u64, units: Vec<M::Unit>, reply: &Arc<ReplyTo<M::Out>>) {
        self.queued.fetch_add(units.len() as i64, Ordering::Relaxed);
        for (index, unit) in units.into_iter().enumerate() {
            if let Err(err) = self.tx.send(Job { unit, ticket, index, reply: reply.clone() }) {
                // The service is gone (a model thread panicked): answer with an error, never drop.
                let job = err.into_inner();
                let _ = job.reply.tx.send(Completion { ticket, index: job.index, result: Err("inference service stopped".into()) });
            }
        }
    }
}

/// Starts `threads` model threads, each with its own model from `factory`. Returns the handle and
/// the threads to join after the last handle is dropped.
pub fn start<M, F>(threads: usize, policy: BatchPolicy, factory: F) -> Result<(InferenceHandle<M>, Vec<JoinHandle<()>>), String>
where
    M: Model,
    F: Fn() -> Result<M, String>,
{
    let (tx, rx) = crossbeam_channel::unbounded::<Job<M::Unit, M::Out>>();
    let queued = Arc::new(AtomicI64::new(0));
    let mut joins = Vec::new();
    for i in 0..threads.max(1) {
        let model = factory()?;
        let rx = rx.clone();
        let queued = queued.clone();
        let join = std::thread::Builder::new()
            .name(format!("sluice-infer-{i}"))
            .spawn(move || serve(model, rx, policy, queued))
            .map_err(|e| format!("cannot start an inference thread: {e}"))?;
        joins.push(join);
    }
    Ok((InferenceHandle { tx, queued }, joins))
}

fn serve<M: Model>(mut model: M, rx: Receiver<Job<M::Unit, M::Out>>, policy: BatchPolicy, queued: Arc<AtomicI64>) {
    let invariant = model.batch_invariant();
    let run_size = if invariant { policy.max_batch } else { 1 };
    while let Some(jobs) = batcher::collect(&rx, &policy) {
        queued.fetch_sub(jobs.len() as i64, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::INFERENCE_QUEUE).set(queued.load(Ordering::Relaxed).max(0) as f64);
        for batch in batcher::group_by_cost(jobs, |j| M::cost(&j.unit), run_size) {
            let units: Vec<&M::Unit> = batch.iter().map(|j| &j.unit).collect();
            let started = Instant::now();
            let outs = model.run(&units);
            metrics::histogram!(crate::metrics::INFERENCE_LATENCY).record(started.elapsed().as_secs_f64());
            metrics::histogram!(crate::metrics::BATCH_SIZE).record(units.len() as f64);
            deliver(batch, outs);
        }
    }
}

fn deliver<U, O>(batch: Vec<Job<U, O>>, outs: Result<Vec<O>, String>) {
    let mut woken: Vec<*const ReplyTo<O>> = Vec::new();
    let mut outs = match outs {
        Ok(outs) if outs.len() == batch.len() => outs.into_iter().map(Ok).collect::<Vec<_>>(),
        Ok(outs) => {
            let msg = format!("model returned {} outputs for {} units", outs.len(), batch.len());
            batch.iter().map(|_| Err(msg.clone())).collect()
        }
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    };
    for (job, result) in batch.into_iter().zip(outs.drain(..)) {
        let _ = job.reply.tx.send(Completion { ticket: job.ticket, index: job.index, result });
        let ptr = Arc::as_ptr(&job.reply);
        if !woken.contains(&ptr) {
            woken.push(ptr);
            if let Some(a) = &job.reply.activator {
                let _ = a.activate();
            }
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
        fn run(&mut self, units: &[&usize]) -> Result<Vec<usize>, String> {
            self.sizes.lock().unwrap().push(units.len());
            Ok(units.iter().map(|u| **u * 2).collect())
        }
    }

    fn run_service(invariant: bool) -> (Vec<(u64, usize, usize)>, Vec<usize>) {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s2 = sizes.clone();
        let policy = BatchPolicy { max_batch: 4, max_delay: Duration::from_millis(20), lookahead: 2 };
        let (handle, joins) = start(1, policy, move || Ok(Doubler { sizes: s2.clone(), invariant })).unwrap();
        let (reply, rx) = ReplyTo::new(None);
        handle.submit(1, vec![5, 1, 3], &reply);
        handle.submit(2, vec![2, 4, 6, 8, 10], &reply);
        let mut got: Vec<(u64, usize, usize)> = (0..8)
            .map(|_| {
                let c = rx.recv_timeout(Duration::from_secs(10)).unwrap();
                (c.ticket, c.index, c.result.unwrap())
            })
            .collect();
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
}
