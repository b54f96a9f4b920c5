//! Online inference: a request whose caller waits for it (over HTTP), decoded and prepared by its
//! task, run in the interactive lane of the model's shared inference service (the one the
//! streams and jobs on that model use), and answered through a callback. It owns admission (a
//! bounded number of requests in flight per model), deadlines, cancellation when the caller goes
//! away, and loading a new model version, checked, while everything runs.

use crate::inference::{Delivery, InferenceError, InferenceHandle, Interest, Model, ReplyTo, Unit};
use crate::json::JsonFields;
use crate::record::{Column, DeadReason, Value};
use crate::tasks::{Refusal, Task};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Builds one model per model thread from a model file, as the task's service was started.
pub type Loader<M> = Arc<dyn Fn(&Path) -> Result<Vec<M>, InferenceError> + Send + Sync>;

/// How a model takes online requests.
#[derive(Clone, Copy, Debug)]
pub struct OnlineSettings {
    /// Requests in flight (queued or running) at most; past it a request is refused at once.
    pub max_queue: usize,
}

/// One row of an online request: named text fields (as a CSV row or a tensor's element gives
/// them), or a JSON object as a Kafka or Pub/Sub request carries it.
#[derive(Clone, Debug)]
pub enum Row {
    Fields(Vec<(String, String)>),
    Json(String),
}

/// An online request: its rows, its priority (lower runs first; Triton's levels) and its timeout.
#[derive(Clone, Debug)]
pub struct OnlineRequest {
    pub rows: Vec<Row>,
    pub priority: u32,
    pub timeout: Option<Duration>,
}

/// A row's answer values (in the order of [`ModelInfo::outputs`]), or why it was refused.
pub type RowAnswer = Result<Vec<Value>, Refusal>;

/// The answer to an online request: one entry per row, and the model version that ran it.
#[derive(Debug)]
pub struct OnlineReply {
    pub model: Arc<str>,
    pub rows: Vec<RowAnswer>,
}

/// Why an online request got no answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OnlineError {
    #[error("the model's queue is full ({0} requests in flight)")]
    Overloaded(usize),
    #[error("the request's timeout passed before it ran")]
    Expired,
    #[error("the request was canceled before it ran")]
    Canceled,
    #[error("{0}")]
    Stopped(String),
}

/// Called once with the request's outcome, on the thread that finished it.
pub type Done = Box<dyn FnOnce(Result<OnlineReply, OnlineError>) + Send>;

/// The caller's hold on a request: dropping it before the answer cancels the work still queued.
pub struct Ticket {
    interest: Arc<Interest>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.interest.cancel();
    }
}

/// A model input as the Open Inference Protocol describes it.
#[derive(Clone, Debug)]
pub struct InputInfo {
    pub name: String,
    /// `BYTES`, `INT64`, `INT32`, `FP32` or `FP64`.
    pub datatype: &'static str,
}

/// What a served model takes and gives.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// The task's `type`.
    pub kind: &'static str,
    pub inputs: Vec<InputInfo>,
    pub outputs: &'static [Column],
    /// `name@version` of the newest version loaded.
    pub label: Arc<str>,
}

/// What the model's service has done, and the online requests in flight now.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct OnlineStats {
    pub runs: u64,
    pub units: u64,
    pub online_units: u64,
    pub online_submitted: u64,
    pub canceled_units: u64,
    pub expired_units: u64,
    pub run_micros: u64,
    pub in_flight: usize,
}

/// A model that answers online requests.
pub trait OnlineModel: Send + Sync {
    fn info(&self) -> ModelInfo;
    /// Admits the request (or refuses it at once, [`OnlineError::Overloaded`]), queues its units
    /// in the interactive lane and returns; `done` gets its answer. Dropping the ticket before
    /// then cancels what has not run.
    fn infer(&self, request: OnlineRequest, done: Done) -> Result<Ticket, OnlineError>;
    fn stats(&self) -> OnlineStats;
    /// Loads the model file at `path` beside the version serving, checks it (it fits the task;
    /// a test batch runs) and swaps it in between batches; its answers carry `label`
    /// (`name@version`). A version that fails is refused with the reason and the old one keeps
    /// serving.
    fn load_version(&self, path: &Path, label: &str) -> Result<Arc<str>, String>;
}

/// The online side of one task's model service.
pub struct OnlineService<T: Task> {
    pub(crate) task: Arc<T>,
    pub(crate) handle: InferenceHandle<T::Model>,
    pub(crate) settings: OnlineSettings,
    pub(crate) kind: &'static str,
    pub(crate) loader: Loader<T::Model>,
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) loading: Mutex<()>,
}

/// A row on its way through the model.
enum Slot<T: Task> {
    Refused(Refusal),
    Waiting { request: T::Request, prepared: Option<T::Prepared>, outs: Vec<Option<<T::Model as Model>::Out>>, error: Option<InferenceError> },
}

/// A request's rows and what is still out, shared with the callback the service calls.
struct Collect<T: Task> {
    slots: Vec<Slot<T>>,
    remaining: usize,
    dropped: Option<OnlineError>,
    model: Option<Arc<str>>,
    done: Option<Done>,
}

impl<T: Task> OnlineService<T> {
    fn decode(&self, row: &Row) -> Result<T::Request, Refusal> {
        match row {
            Row::Fields(fields) => {
                let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                self.task.decode_fields(&fields).map(|(request, _)| request)
            }
            Row::Json(text) => {
                let obj = JsonFields::parse(text).map_err(|e| (DeadReason::NotJson, e))?;
                self.task.decode_json(&obj)
            }
        }
    }
}

/// Turns the collected outputs into the reply, once every unit is back.
fn finish<T: Task>(task: &T, c: &mut Collect<T>) -> Result<OnlineReply, OnlineError> {
    if let Some(e) = c.dropped.take() {
        return Err(e);
    }
    let model = c.model.clone().unwrap_or_else(|| Arc::from(task.model_label()));
    let rows = std::mem::take(&mut c.slots)
        .into_iter()
        .map(|slot| match slot {
            Slot::Refused(r) => Err(r),
            Slot::Waiting { error: Some(e), .. } => Err((DeadReason::InferenceFailed, e.to_string())),
            Slot::Waiting { request, prepared, outs, error: None } => {
                let outs: Vec<_> = outs.into_iter().map(|o| o.expect("every unit completed")).collect();
                let prepared = prepared.expect("prepared once");
                crate::guard::contain(|| task.finish(&request, prepared, &outs))
                    .map_err(|panic| (DeadReason::TaskFailed, format!("the task panicked finishing the answer: {panic}")))
            }
        })
        .collect();
    Ok(OnlineReply { model, rows })
}

impl<T: Task> OnlineModel for OnlineService<T> {
    fn info(&self) -> ModelInfo {
        ModelInfo { kind: self.kind, inputs: self.task.online_inputs(), outputs: self.task.output_columns(), label: self.handle.label() }
    }

    fn infer(&self, request: OnlineRequest, done: Done) -> Result<Ticket, OnlineError> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= self.settings.max_queue {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(OnlineError::Overloaded(before));
        }
        let interest = Interest::new(request.priority, request.timeout.map(|t| Instant::now() + t));
        let mut slots = Vec::with_capacity(request.rows.len());
        let mut units = Vec::new();
        for (row, fields) in request.rows.iter().enumerate() {
            let prepared = self.decode(fields).and_then(|r| {
                let p = crate::guard::contain(|| self.task.prepare(&r))
                    .unwrap_or_else(|panic| Err((DeadReason::TaskFailed, format!("the task panicked preparing the request: {panic}"))));
                p.map(|(prepared, u)| (r, prepared, u))
            });
            match prepared {
                Err(refusal) => slots.push(Slot::Refused(refusal)),
                Ok((request, prepared, row_units)) => {
                    let before = units.len();
                    units.extend(row_units.into_iter().enumerate().map(|(index, unit)| Unit { ticket: row as u64, index, unit }));
                    let n = units.len() - before;
                    slots.push(Slot::Waiting { request, prepared: Some(prepared), outs: (0..n).map(|_| None).collect(), error: None });
                }
            }
        }
        let remaining = units.len();
        let collect = Arc::new(Mutex::new(Collect::<T> { slots, remaining, dropped: None, model: None, done: Some(done) }));
        let in_flight = self.in_flight.clone();
        let task = self.task.clone();
        let complete = move |c: &mut Collect<T>| -> Option<(Done, Result<OnlineReply, OnlineError>)> {
            let done = c.done.take()?;
            let reply = finish(&*task, c);
            Some((done, reply))
        };
        if remaining == 0 {
            let mut c = lock(&collect);
            let finished = complete(&mut c);
            drop(c);
            in_flight.fetch_sub(1, Ordering::AcqRel);
            if let Some((done, reply)) = finished {
                done(reply);
            }
            return Ok(Ticket { interest });
        }
        let reply = ReplyTo::call(move |d: Delivery<<T::Model as Model>::Out>| {
            let mut c = lock(&collect);
            for comp in d.completions {
                c.remaining -= 1;
                match comp.result {
                    Err(InferenceError::Canceled) => c.dropped = Some(OnlineError::Canceled),
                    Err(InferenceError::Expired) => c.dropped = Some(OnlineError::Expired),
                    Err(InferenceError::Stopped) => c.dropped = Some(OnlineError::Stopped("the model's inference service stopped".into())),
                    result => {
                        if let Some(Slot::Waiting { outs, error, .. }) = c.slots.get_mut(comp.ticket as usize) {
                            match result {
                                Ok(out) => outs[comp.index] = Some(out),
                                Err(e) => *error = Some(e),
                            }
                        }
                    }
                }
            }
            c.model = Some(d.model);
            if c.remaining == 0 {
                let finished = complete(&mut c);
                drop(c);
                in_flight.fetch_sub(1, Ordering::AcqRel);
                if let Some((done, reply)) = finished {
                    done(reply);
                }
            }
        });
        self.handle.submit_online(units, &reply, interest.clone());
        Ok(Ticket { interest })
    }

    fn stats(&self) -> OnlineStats {
        let s = self.handle.stats();
        OnlineStats {
            runs: s.runs.load(Ordering::Relaxed),
            units: s.units.load(Ordering::Relaxed),
            online_units: s.online_units.load(Ordering::Relaxed),
            online_submitted: s.online_submitted.load(Ordering::Relaxed),
            canceled_units: s.canceled_units.load(Ordering::Relaxed),
            expired_units: s.expired_units.load(Ordering::Relaxed),
            run_micros: s.run_micros.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    fn load_version(&self, path: &Path, label: &str) -> Result<Arc<str>, String> {
        let _one_at_a_time = lock(&self.loading);
        let mut models = (self.loader)(path).map_err(|e| e.to_string())?;
        for m in &models {
            self.task.accepts(m).map_err(|why| format!("{}: {why}", path.display()))?;
        }
        // One test batch on the new version before it takes any traffic.
        let probe = self.task.probe_fields();
        let fields: Vec<(&str, &str)> = probe.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (request, _) = self.task.decode_fields(&fields).map_err(|(_, why)| format!("the test request cannot be decoded: {why}"))?;
        let (_, units) = self.task.prepare(&request).map_err(|(_, why)| format!("the test request cannot be prepared: {why}"))?;
        let units: Vec<_> = units.into_iter().collect();
        let refs: Vec<&<T::Model as Model>::Unit> = units.iter().collect();
        let first = models.first_mut().ok_or("the model loader gave no model")?;
        let outs = first.run(&refs).map_err(|e| format!("{}: the test batch failed: {e}", path.display()))?;
        if outs.len() != refs.len() {
            return Err(format!("{}: the test batch gave {} outputs for {} inputs", path.display(), outs.len(), refs.len()));
        }
        let label: Arc<str> = Arc::from(label);
        self.handle.swap(models, label.clone())?;
        tracing::info!(model = %label, path = %path.display(), "new model version checked and given to the service");
        Ok(label)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
