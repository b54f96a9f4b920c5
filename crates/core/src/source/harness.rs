//! The source harness: one timely operator that drives any [`Source`] on its worker. It owns
//! epochs (clock ticks for streams, record counts for tables), the in-flight bounds (epochs and
//! records not yet durable), stopping on a signal or at the end of finite input, and
//! acknowledging to the source only what a probe on the sinks says is durable. After it stops
//! reading it stays until everything it read is durable, so a source can acknowledge the last
//! of it (or leave it to be redelivered when the process is cut short).

use super::{Checkpoint, Poll, RawRecord, Source, SourceError, SourceFactory};
use crate::progress::Progress;
use crate::record::now_ms;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, Inspect};
use timely::dataflow::{ProbeHandle, Scope, Stream};
use timely::scheduling::Activator;

/// The engine's bounds and pacing for a source.
#[derive(Clone, Debug)]
pub struct HarnessSettings {
    /// Most records per poll, and per epoch when epochs are counted in records.
    pub epoch_records: usize,
    pub max_epochs_in_flight: u64,
    /// A worker pauses while this many of its records are in epochs not yet durable.
    pub max_records_in_flight: usize,
    /// A worker pauses while its records not yet durable hold this many bytes.
    pub max_bytes_in_flight: usize,
    /// A worker admits no more records than it has been measured to make durable in this long,
    /// so a stop drains within the shutdown grace even when each record is slow.
    pub drain_within: Option<Duration>,
    /// The model version to tell the source about (`on_model_change = "recompute"`).
    pub model: Option<Arc<dyn crate::source::ModelVersion>>,
}

impl std::fmt::Debug for dyn crate::source::ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelVersion({})", self.label())
    }
}

/// A job-stopping error raised on a worker or sink thread (a source or sink that cannot work as
/// configured); the job stops, acknowledges nothing more, and ends failed with the first one.
#[derive(Clone, Default)]
pub struct FatalSlot(Arc<Mutex<FatalState>>);

#[derive(Default)]
struct FatalState {
    error: Option<crate::runtime::RunError>,
    message: Option<String>,
}

impl FatalSlot {
    pub fn set(&self, error: impl Into<crate::runtime::RunError>) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.message.is_none() {
            let error = error.into();
            slot.message = Some(error.to_string());
            slot.error = Some(error);
        }
    }

    /// Whether the job has failed: nothing from then on may be acknowledged.
    pub fn failed(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).message.is_some()
    }

    /// The failure's message, if any.
    pub fn peek(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).message.clone()
    }

    /// The failure itself the first time; its message after that.
    pub fn take(&self) -> Option<crate::runtime::RunError> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.error.take().or_else(|| slot.message.clone().map(crate::runtime::RunError::Failed))
    }
}

/// What a worker has read that the sinks have not yet made durable: records and bytes per
/// epoch. It bounds the number of such epochs, their records and bytes, and, once the pipeline's
/// pace is measured (records made durable per second while busy), the records to what it can
/// make durable within `drain_within`. Clock epochs can hold any number of records, so these
/// bounds are what keep memory flat and a stop prompt.
#[derive(Debug)]
pub struct InFlight {
    records: BTreeMap<u64, (usize, usize)>,
    max_epochs: u64,
    max_records: usize,
    max_bytes: usize,
    drain_within: Option<Duration>,
    /// Records made durable per second while something was in flight (a moving average).
    pace: Option<f64>,
    /// Since when the records in flight have been waiting (the last durability, or the first
    /// record after an idle spell).
    busy_since: Option<Instant>,
}

/// Records a worker may hold before its pace is measured, when a drain time bounds it: a small
/// first helping, since one slow record can take a second (the bound grows with the first
/// measurement).
const FIRST_RECORDS: usize = 16;
/// The least a measured pace may bound a worker to.
const MIN_RECORDS: usize = 4;

impl InFlight {
    pub fn new(max_epochs: u64, max_records: usize) -> Self {
        InFlight { records: BTreeMap::new(), max_epochs, max_records, max_bytes: usize::MAX, drain_within: None, pace: None, busy_since: None }
    }

    /// Bounds the bytes held, and the records to what the measured pace makes durable within
    /// `drain_within`.
    pub fn with_cost(mut self, max_bytes: usize, drain_within: Option<Duration>) -> Self {
        self.max_bytes = max_bytes;
        self.drain_within = drain_within.filter(|d| !d.is_zero());
        self
    }

    /// Every epoch before `oldest` is durable.
    pub fn durable_before(&mut self, oldest: u64) {
        let kept = self.records.split_off(&oldest);
        let done: usize = self.records.values().map(|e| e.0).sum();
        self.records = kept;
        if done == 0 {
            return;
        }
        let now = Instant::now();
        if let Some(since) = self.busy_since {
            let secs = now.duration_since(since).as_secs_f64().max(1e-3);
            let sample = done as f64 / secs;
            self.pace = Some(match self.pace {
                Some(p) => 0.7 * p + 0.3 * sample,
                None => sample,
            });
        }
        self.busy_since = if self.records.is_empty() { None } else { Some(now) };
    }

    /// The most records this worker may hold now.
    pub fn record_bound(&self) -> usize {
        match (self.drain_within, self.pace) {
            (None, _) => self.max_records,
            (Some(_), None) => self.max_records.min(FIRST_RECORDS),
            (Some(d), Some(pace)) => self.max_records.min(((pace * d.as_secs_f64()) as usize).max(MIN_RECORDS)),
        }
    }

    /// How many records may be read into `epoch` now; 0 means pause. Reading more into an epoch
    /// that already holds data adds no epoch, so only the record and byte bounds apply to it.
    pub fn budget(&self, epoch: u64) -> usize {
        if self.records.len() as u64 >= self.max_epochs && !self.records.contains_key(&epoch) {
            return 0;
        }
        // At most `max_epochs` entries: summing them is as cheap as keeping a counter.
        let (records, bytes) = self.records.values().fold((0, 0), |(r, b), e| (r + e.0, b + e.1));
        if bytes >= self.max_bytes {
            return 0;
        }
        self.record_bound().saturating_sub(records)
    }

    pub fn add(&mut self, epoch: u64, n: usize, bytes: usize) {
        if n > 0 {
            if self.records.is_empty() {
                self.busy_since = Some(Instant::now());
            }
            let e = self.records.entry(epoch).or_default();
            e.0 += n;
            e.1 += bytes;
        }
    }

    /// Records not yet durable.
    pub fn records(&self) -> usize {
        self.records.values().map(|e| e.0).sum()
    }

    /// Records made durable per second while busy, once measured.
    pub fn pace(&self) -> Option<f64> {
        self.pace
    }

    /// Epochs holding records that are not yet durable.
    pub fn epochs(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// What the operator is doing, with its source once built.
enum Phase {
    /// The source is not built yet (or its build failed transiently).
    Starting,
    Reading(Box<dyn Source>),
    /// No more reading: waiting until everything read is durable, then acknowledging it.
    Draining(Box<dyn Source>),
    Finished,
}

/// Builds this worker's source operator. Outputs: raw records, and each closed epoch's checkpoints.
/// Each activation runs inside `span` (the job's `<pipeline>.source`).
#[allow(clippy::too_many_arguments)]
pub fn source_harness<'s>(
    scope: Scope<'s, u64>,
    factory: Arc<dyn SourceFactory>,
    resume: Arc<Vec<Checkpoint>>,
    settings: HarnessSettings,
    durable: ProbeHandle<u64>,
    stop: Arc<AtomicBool>,
    fatal: FatalSlot,
    progress: Arc<Progress>,
    span: tracing::Span,
) -> (Stream<'s, u64, Vec<RawRecord>>, Stream<'s, u64, Vec<Checkpoint>>) {
    let (worker, peers) = (scope.index(), scope.peers());
    let kind = factory.kind();
    let mut builder = OperatorBuilder::new(format!("Source({kind})"), scope);
    let (rec_out, rec_stream) = builder.new_output::<Vec<RawRecord>>();
    let (cp_out, cp_stream) = builder.new_output::<Vec<Checkpoint>>();
    // Epochs closed early by an idle source, told to every worker (see `closes_epoch_when_idle`).
    let (pulse_out, pulse_stream) = builder.new_output::<Vec<u64>>();
    let out = Outputs {
        records: OutputBuilder::<_, CapacityContainerBuilder<Vec<RawRecord>>>::from(rec_out),
        checkpoints: OutputBuilder::<_, CapacityContainerBuilder<Vec<Checkpoint>>>::from(cp_out),
        pulses: OutputBuilder::<_, CapacityContainerBuilder<Vec<u64>>>::from(pulse_out),
        caps: None,
    };
    let closed_elsewhere = Rc::new(Cell::new(0u64));
    {
        let (closed, activator) = (closed_elsewhere.clone(), scope.activator_for(builder.operator_info().address));
        pulse_stream.broadcast().inspect(move |&e| {
            if e > closed.get() {
                closed.set(e);
                activator.activate();
            }
        });
    }
    let clock = factory.epoch_every().map(|d| d.as_millis().max(1) as u64);
    let mut harness = Harness {
        phase: Phase::Starting,
        state: State {
            worker,
            peers,
            kind,
            resume,
            clock,
            idle_exit: factory.idle_exit(),
            close_when_idle: clock.is_some() && factory.closes_epoch_when_idle(),
            factory,
            in_flight: InFlight::new(settings.max_epochs_in_flight, settings.max_records_in_flight)
                .with_cost(settings.max_bytes_in_flight, settings.drain_within),
            settings,
            durable,
            stop,
            fatal,
            progress,
            records_metric: metrics::counter!(crate::metrics::SOURCE_RECORDS, "connector" => kind),
            activator: scope.activator_for(builder.operator_info().address),
            closed_elsewhere,
            out,
            open: OpenEpoch { epoch: 0, records: 0 },
            acknowledged: 0,
            backoff: FIRST_BACKOFF,
            last_record: Instant::now(),
            buf: Vec::new(),
            model_told: None,
        },
    };
    builder.build_reschedule(move |caps| {
        harness.state.begin(caps);
        move |_frontiers| {
            let _entered = span.enter();
            harness.activate();
            // Incomplete while draining: an operator with no capabilities and no inputs is
            // otherwise shut down by timely at once, and dropped (with its source) before it
            // has acknowledged the last epochs' durability.
            matches!(harness.phase, Phase::Draining(_))
        }
    });
    (rec_stream, cp_stream)
}

/// The first wait before retrying a transient error; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between retries of a transient error.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The operator on one worker: its phase (which owns the source) and everything else it keeps.
/// An activation is [`Harness::activate`], whose steps are the methods below.
struct Harness {
    phase: Phase,
    state: State,
}

/// The harness's state apart from the source: the job's settings and controls, the open epoch,
/// what is in flight, and the outputs with the capabilities held on them.
struct State {
    worker: usize,
    peers: usize,
    kind: &'static str,
    factory: Arc<dyn SourceFactory>,
    resume: Arc<Vec<Checkpoint>>,
    settings: HarnessSettings,
    /// Clock epochs: their length in milliseconds; `None` when epochs are counted in records.
    clock: Option<u64>,
    idle_exit: Option<Duration>,
    /// Clock epochs that an idle source closes early, telling every worker (bursty sources).
    close_when_idle: bool,
    /// The sinks' probe: every epoch before its frontier is durable.
    durable: ProbeHandle<u64>,
    stop: Arc<AtomicBool>,
    fatal: FatalSlot,
    progress: Arc<Progress>,
    records_metric: metrics::Counter,
    activator: Activator,
    /// The latest epoch another worker's idle source closed.
    closed_elsewhere: Rc<Cell<u64>>,
    out: Outputs,
    open: OpenEpoch,
    in_flight: InFlight,
    /// Every epoch before this one has been acknowledged to the source.
    acknowledged: u64,
    /// How long until the next try after a transient error.
    backoff: Duration,
    /// When the source last supplied records (or was built), for `idle_exit`.
    last_record: Instant,
    buf: Vec<RawRecord>,
    /// The model generation the source was last told of ([`HarnessSettings::model`]).
    model_told: Option<u64>,
}

/// The epoch records are read into now, and how many it holds.
struct OpenEpoch {
    epoch: u64,
    records: usize,
}

/// The operator's outputs (records, checkpoints of closed epochs, epochs closed early for the
/// other workers) and its capabilities on them, dropped when it stops reading so that
/// downstream drains.
struct Outputs {
    records: OutputBuilder<u64, CapacityContainerBuilder<Vec<RawRecord>>>,
    checkpoints: OutputBuilder<u64, CapacityContainerBuilder<Vec<Checkpoint>>>,
    pulses: OutputBuilder<u64, CapacityContainerBuilder<Vec<u64>>>,
    caps: Option<Vec<Capability<u64>>>,
}

impl Outputs {
    fn give_records(&mut self, buf: &mut Vec<RawRecord>) {
        if let Some(cs) = &self.caps {
            self.records.activate().session(&cs[0]).give_container(buf);
        }
    }

    /// Sends the open epoch's checkpoints if it holds records or the source asks for them (their
    /// checkpoints travel with its answers), and counts it empty; whether it sent them.
    fn checkpoint(&mut self, source: &mut dyn Source, open: &mut OpenEpoch) -> bool {
        if open.records == 0 && !source.wants_checkpoint() {
            return false;
        }
        if let Some(cs) = &self.caps {
            self.checkpoints.activate().session(&cs[1]).give_iterator(source.checkpoint(open.epoch).into_iter());
        }
        open.records = 0;
        true
    }

    /// Closes a counted epoch (it holds records) and opens the next.
    fn close(&mut self, source: &mut dyn Source, open: &mut OpenEpoch) {
        self.checkpoint(source, open);
        open.epoch += 1;
        self.advance(open.epoch);
    }

    /// Tells every worker that this one closed `epoch` early.
    fn pulse(&mut self, epoch: u64) {
        if let Some(cs) = &self.caps {
            self.pulses.activate().session(&cs[2]).give(epoch);
        }
    }

    /// Nothing more will be sent before `epoch`.
    fn advance(&mut self, epoch: u64) {
        for c in self.caps.iter_mut().flatten() {
            c.downgrade(&epoch);
        }
    }
}

impl Harness {
    /// One activation: take in what is durable and acknowledge it; close a clock epoch the clock
    /// has left; then stop reading, or build the source and read from it.
    fn activate(&mut self) {
        let oldest = self.state.note_durable();
        if !self.acknowledge(oldest) || self.state.out.caps.is_none() {
            return;
        }
        // Decided before a clock epoch closes, so an idle exit still sees what the open one holds.
        let stopping = self.state.stopping();
        let source = match &mut self.phase {
            Phase::Reading(source) => Some(source),
            _ => None,
        };
        self.state.tick(source);
        if stopping {
            self.stop_reading();
        } else if self.start_source() {
            self.read();
        }
    }

    /// Acknowledges to the source every epoch before `oldest`. A draining operator does only
    /// that, until everything it read is durable; whether the activation goes on.
    fn acknowledge(&mut self, oldest: u64) -> bool {
        let state = &mut self.state;
        match &mut self.phase {
            Phase::Finished => false,
            Phase::Draining(source) => {
                state.acknowledge(source.as_mut(), oldest);
                // A failed job acknowledges nothing more, and may never be durable: done.
                if oldest == u64::MAX || state.fatal.failed() {
                    self.phase = Phase::Finished;
                } else {
                    state.activator.activate_after(Duration::from_millis(5));
                }
                false
            }
            Phase::Reading(source) => {
                state.acknowledge(source.as_mut(), oldest);
                true
            }
            Phase::Starting => true,
        }
    }

    /// On a stop signal or an idle exit: stops reading and drains what is in flight.
    fn stop_reading(&mut self) {
        if matches!(self.phase, Phase::Reading(_)) {
            tracing::info!(
                worker = self.state.worker,
                records = self.state.in_flight.records(),
                pace = self.state.in_flight.pace().unwrap_or(0.0),
                "{} source: stopping; draining what is in flight",
                self.state.kind
            );
        }
        self.finish();
        self.state.activator.activate();
    }

    /// Builds the source if it is not built yet; whether it is reading. A transient error is
    /// retried with backoff; a configuration error fails the job.
    fn start_source(&mut self) -> bool {
        if !matches!(self.phase, Phase::Starting) {
            return true;
        }
        let state = &mut self.state;
        match state.factory.build(state.worker, state.peers, &state.resume) {
            Ok(source) => {
                if let Some(total) = source.total_hint() {
                    state.progress.total.fetch_add(total, Ordering::Relaxed);
                }
                self.phase = Phase::Reading(source);
                state.backoff = FIRST_BACKOFF;
                state.last_record = Instant::now();
                true
            }
            Err(SourceError::Transient(e)) => {
                tracing::warn!("{} source: {e}; retrying in {:?}", state.kind, state.backoff);
                state.retry_later();
                false
            }
            Err(SourceError::Config(e)) => {
                state.fail(&e);
                self.phase = Phase::Finished;
                state.out.caps = None;
                false
            }
        }
    }

    /// Reads what the bounds admit into the open epoch, closes the epochs that are full or that
    /// an idle source leaves, and schedules the next activation.
    fn read(&mut self) {
        let Phase::Reading(source) = &mut self.phase else { return };
        if let Some(model) = &self.state.settings.model {
            let generation = model.generation();
            if self.state.model_told != Some(generation) {
                self.state.model_told = Some(generation);
                source.answer_with(&model.label());
            }
        }
        let Some(budget) = self.state.admit(source.as_mut()) else { return };
        let polled = self.state.poll(source.as_mut(), budget);
        self.state.close_epochs(source.as_mut(), &polled);
        self.schedule(polled);
    }

    /// When to run again after a poll, or, when the input is done, stop reading.
    fn schedule(&mut self, polled: Result<Poll, SourceError>) {
        match polled {
            Ok(Poll::More) => self.state.activator.activate(),
            Ok(Poll::Idle(d)) => self.state.activator.activate_after(self.state.clock.map(|ms| d.min(Duration::from_millis(ms))).unwrap_or(d)),
            Ok(Poll::Done) => {
                self.finish();
                self.state.activator.activate();
            }
            Err(SourceError::Transient(e)) => {
                tracing::warn!("{} source: {e}; polling again in {:?}", self.state.kind, self.state.backoff);
                self.state.retry_later();
            }
            Err(SourceError::Config(e)) => {
                self.state.fail(&e);
                self.state.activator.activate();
            }
        }
    }

    /// Stops reading: closes the open epoch (its checkpoints travel with its answers), drops the
    /// capabilities so downstream drains, and waits for durability to acknowledge the rest.
    fn finish(&mut self) {
        if self.state.out.caps.is_none() {
            return;
        }
        self.phase = match std::mem::replace(&mut self.phase, Phase::Finished) {
            Phase::Reading(mut source) => {
                source.stop();
                self.state.out.checkpoint(source.as_mut(), &mut self.state.open);
                Phase::Draining(source)
            }
            Phase::Draining(source) => Phase::Draining(source),
            Phase::Starting | Phase::Finished => Phase::Finished,
        };
        self.state.out.caps = None;
    }
}

impl State {
    /// Takes the operator's capabilities when it is built, and opens the first epoch: the
    /// clock's current tick, or 0 when epochs are counted.
    fn begin(&mut self, caps: Vec<Capability<u64>>) {
        self.out.caps = Some(caps);
        self.open.epoch = self.clock.map(|ms| now_ms() / ms).unwrap_or(0);
        self.last_record = Instant::now();
    }

    /// The oldest epoch not yet durable (`u64::MAX` when all are); what is older no longer
    /// counts against the in-flight bounds.
    fn note_durable(&mut self) -> u64 {
        let oldest = self.durable.with_frontier(|f| f.first().copied()).unwrap_or(u64::MAX);
        self.in_flight.durable_before(oldest);
        metrics::gauge!(crate::metrics::EPOCHS_IN_FLIGHT).set(self.in_flight.epochs() as f64);
        oldest
    }

    /// Tells the source that every epoch before `oldest` is durable, once, and never after the
    /// job has failed.
    fn acknowledge(&mut self, source: &mut dyn Source, oldest: u64) {
        if oldest > self.acknowledged && !self.fatal.failed() {
            self.acknowledged = oldest;
            source.durable(oldest);
        }
    }

    /// Whether to stop reading: a stop signal, or an idle exit once everything read is durable.
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self.idle_exit.is_some_and(|d| self.last_record.elapsed() >= d && self.in_flight.is_empty() && self.open.records == 0)
    }

    /// Clock epochs: closes the open one when the clock has moved on.
    fn tick(&mut self, source: Option<&mut Box<dyn Source>>) {
        let Some(ms) = self.clock else { return };
        let tick = now_ms() / ms;
        if tick > self.open.epoch {
            if let Some(source) = source {
                self.out.checkpoint(source.as_mut(), &mut self.open);
            }
            self.open.epoch = tick;
            self.out.advance(tick);
        }
    }

    /// How many records the bounds admit into the open epoch now; `None` pauses the source
    /// (backpressure: its input stays where it is until the sinks catch up).
    fn admit(&mut self, source: &mut dyn Source) -> Option<usize> {
        let epoch_records = self.settings.epoch_records;
        let mut budget = self.in_flight.budget(self.open.epoch).min(epoch_records);
        if self.clock.is_none() {
            budget = budget.min(epoch_records.saturating_sub(self.open.records));
        }
        if budget == 0 && self.clock.is_none() && self.open.records > 0 && self.in_flight.budget(self.open.epoch) == 0 {
            // Counted epochs: the in-flight bound is reached before the epoch is full. Close
            // it, or what it holds never becomes durable and nothing is admitted again.
            self.out.close(source, &mut self.open);
        }
        if budget == 0 {
            tracing::trace!(epoch = self.open.epoch, in_flight = self.in_flight.epochs(), "{} source paused", self.kind);
            self.activator.activate_after(Duration::from_millis(1));
            return None;
        }
        Some(budget)
    }

    /// Polls the source for at most `budget` records of the open epoch and sends them on.
    fn poll(&mut self, source: &mut dyn Source, budget: usize) -> Result<Poll, SourceError> {
        let polled = source.poll(self.open.epoch, budget, &mut self.buf);
        let n = self.buf.len();
        if n > 0 {
            let bytes: usize = self.buf.iter().map(|r| r.bytes.len()).sum();
            self.out.give_records(&mut self.buf);
            self.buf.clear();
            self.open.records += n;
            self.in_flight.add(self.open.epoch, n, bytes);
            self.last_record = Instant::now();
            self.progress.read.fetch_add(n as u64, Ordering::Relaxed);
            self.records_metric.increment(n as u64);
        }
        polled
    }

    /// After a poll: closes a full counted epoch, and the epoch an idle source leaves.
    fn close_epochs(&mut self, source: &mut dyn Source, polled: &Result<Poll, SourceError>) {
        if self.clock.is_none() && self.open.records >= self.settings.epoch_records {
            self.out.close(source, &mut self.open);
        }
        // An idle source closes its epoch, so what it supplied is answered now rather than
        // when more arrives: always with counted epochs, and with clock epochs for bursty
        // sources, which also tell every worker the epoch they closed; an idle worker moves
        // past the epochs others closed, so it holds nobody back.
        if (self.clock.is_none() || self.close_when_idle) && matches!(polled, Ok(Poll::Idle(_))) {
            let before = self.open.epoch;
            if self.out.checkpoint(source, &mut self.open) {
                if self.close_when_idle {
                    self.out.pulse(before);
                }
                self.open.epoch += 1;
            }
            if self.close_when_idle {
                self.open.epoch = self.open.epoch.max(self.closed_elsewhere.get().saturating_add(1));
            }
            if self.open.epoch != before {
                self.out.advance(self.open.epoch);
            }
        }
    }

    /// Schedules the next try after a transient error, and doubles the wait after it.
    fn retry_later(&mut self) {
        self.activator.activate_after(self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Fails the job with a configuration error of the source, and stops it.
    fn fail(&self, error: &str) {
        self.fatal.set(SourceError::Config(format!("{} source: {error}", self.kind)));
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourcePos;
    use timely::dataflow::operators::{Inspect, Probe};

    /// What a [`Counting`] source was told.
    #[derive(Default)]
    struct Told {
        durable: Vec<u64>,
        stopped: bool,
    }

    /// A finite source of `total` numbered records, at most three per poll.
    struct Counting {
        next: u64,
        total: u64,
        told: Arc<Mutex<Told>>,
    }

    impl Source for Counting {
        fn poll(&mut self, _epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError> {
            if self.next == self.total {
                return Ok(Poll::Done);
            }
            for _ in 0..budget.min(3).min((self.total - self.next) as usize) {
                let pos = SourcePos::seq("counting".into(), self.next);
                out.push(RawRecord { bytes: self.next.to_string().into_bytes(), body: super::super::Body::Json, pos, id: None, ingest_ms: 0 });
                self.next += 1;
            }
            Ok(Poll::More)
        }
        fn checkpoint(&mut self, _epoch: u64) -> Vec<Checkpoint> {
            vec![Checkpoint { scope: "counting".into(), shard: "0".into(), position: self.next.to_string() }]
        }
        fn stop(&mut self) {
            self.told.lock().unwrap().stopped = true;
        }
        fn durable(&mut self, before: u64) {
            self.told.lock().unwrap().durable.push(before);
        }
    }

    struct CountingFactory {
        total: u64,
        told: Arc<Mutex<Told>>,
    }

    impl SourceFactory for CountingFactory {
        fn kind(&self) -> &'static str {
            "counting"
        }
        fn build(&self, _worker: usize, _peers: usize, _resume: &[Checkpoint]) -> Result<Box<dyn Source>, SourceError> {
            Ok(Box::new(Counting { next: 0, total: self.total, told: self.told.clone() }))
        }
        fn resumable(&self) -> bool {
            true
        }
        fn keying(&self) -> super::super::Keying {
            super::super::Keying::Table
        }
        fn describe(&self) -> String {
            "counting".into()
        }
    }

    #[test]
    fn a_finite_source_is_read_once_in_counted_epochs_each_closed_with_its_checkpoint() {
        let told = Arc::new(Mutex::new(Told::default()));
        let factory = Arc::new(CountingFactory { total: 10, told: told.clone() });
        let watched = told.clone();
        let (records, checkpoints) = timely::execute_directly(move |worker| {
            let durable = ProbeHandle::new();
            let records = Rc::new(std::cell::RefCell::new(Vec::new()));
            let checkpoints = Rc::new(std::cell::RefCell::new(Vec::new()));
            let (r, c) = (records.clone(), checkpoints.clone());
            let settings = HarnessSettings {
                epoch_records: 4,
                max_epochs_in_flight: 4,
                max_records_in_flight: 6,
                max_bytes_in_flight: 1 << 20,
                drain_within: None,
                model: None,
            };
            worker.dataflow::<u64, _, _>(|scope| {
                let (recs, cps) = source_harness(
                    scope,
                    factory,
                    Arc::new(Vec::new()),
                    settings,
                    durable.clone(),
                    Arc::new(AtomicBool::new(false)),
                    FatalSlot::default(),
                    Arc::new(Progress::default()),
                    tracing::Span::none(),
                );
                recs.inspect_core(move |event| {
                    if let Ok((stamp, data)) = event {
                        let t = *stamp.expect_singleton();
                        r.borrow_mut().extend(data.iter().map(|rec| (t, String::from_utf8_lossy(&rec.bytes).to_string())));
                    }
                })
                .probe_with(&durable);
                cps.inspect_core(move |event| {
                    if let Ok((stamp, data)) = event {
                        let t = *stamp.expect_singleton();
                        c.borrow_mut().extend(data.iter().map(|cp| (t, cp.position.clone())));
                    }
                });
            });
            let deadline = Instant::now() + Duration::from_secs(10);
            while watched.lock().unwrap().durable.last() != Some(&u64::MAX) && Instant::now() < deadline {
                worker.step_or_park(Some(Duration::from_millis(5)));
            }
            let records = records.borrow().clone();
            let checkpoints = checkpoints.borrow().clone();
            (records, checkpoints)
        });
        let expected: Vec<(u64, String)> = (0..10u64).map(|i| (i / 4, i.to_string())).collect();
        assert_eq!(records, expected, "every record once, four to an epoch");
        assert_eq!(checkpoints, vec![(0, "4".to_string()), (1, "8".to_string()), (2, "10".to_string())], "each epoch closed with its checkpoint");
        let told = told.lock().unwrap();
        assert!(told.stopped, "the source is stopped at the end of its input");
        assert!(told.durable.windows(2).all(|w| w[0] < w[1]), "each acknowledgement once, in order: {:?}", told.durable);
        assert_eq!(told.durable.last(), Some(&u64::MAX), "the source hears that everything it read is durable: {:?}", told.durable);
    }

    #[test]
    fn in_flight_bounds_epochs_and_records() {
        let mut f = InFlight::new(2, 100);
        assert_eq!(f.budget(1), 100, "nothing in flight");
        f.add(1, 60, 0);
        assert_eq!(f.budget(1), 40, "the open epoch may take what is left of the record bound");
        f.add(2, 30, 0);
        assert_eq!(f.budget(3), 0, "a third epoch would exceed the epoch bound");
        assert_eq!(f.budget(2), 10, "the open epoch holds data already, so it adds no epoch");
        f.add(2, 10, 0);
        assert_eq!(f.budget(2), 0, "the record bound is reached");
        f.durable_before(2);
        assert_eq!(f.epochs(), 1);
        assert_eq!(f.budget(3), 60, "epoch 1's 60 records are durable");
        f.add(3, 0, 0);
        assert_eq!(f.epochs(), 1, "an epoch with no records is not in flight");
        f.durable_before(u64::MAX);
        assert!(f.is_empty());
        assert_eq!(f.budget(9), 100);
    }

    #[test]
    fn slow_records_are_admitted_only_as_many_as_drain_within_the_grace() {
        use std::time::Duration;
        let mut f = InFlight::new(100, 65_536).with_cost(1 << 20, Some(Duration::from_secs(2)));
        assert_eq!(f.budget(1), 16, "before the pace is known, a first helping");
        f.add(1, 40, 1000);
        std::thread::sleep(Duration::from_millis(200));
        f.durable_before(2);
        // 40 records in about 0.2 s: about 200 a second, so about 400 within 2 s.
        let bound = f.record_bound();
        assert!((100..=400).contains(&bound), "{bound}");
        f.add(2, 10, 2 << 20);
        assert_eq!(f.budget(2), 0, "the byte bound is reached");
        f.durable_before(3);
        assert_eq!(f.budget(3), f.record_bound());
        // Without a drain time only the record bound counts.
        let g = InFlight::new(4, 500).with_cost(1 << 20, None);
        assert_eq!(g.budget(1), 500);
    }
}
