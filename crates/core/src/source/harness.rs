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
use timely::dataflow::operators::Inspect;
use timely::dataflow::{ProbeHandle, Scope, Stream};

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

/// What the operator is doing.
enum Phase {
    /// The source is not built yet (or its build failed transiently).
    Starting,
    Reading(Box<dyn Source>),
    /// No more reading: waiting until everything read is durable, then acknowledging it.
    Draining(Box<dyn Source>),
    Finished,
}

/// Builds this worker's source operator. Outputs: raw records, and each closed epoch's checkpoints.
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
) -> (Stream<'s, u64, Vec<RawRecord>>, Stream<'s, u64, Vec<Checkpoint>>) {
    let (index, peers) = (scope.index(), scope.peers());
    let kind = factory.kind();
    let mut builder = OperatorBuilder::new(format!("Source({kind})"), scope);
    let (rec_out, rec_stream) = builder.new_output::<Vec<RawRecord>>();
    let (cp_out, cp_stream) = builder.new_output::<Vec<Checkpoint>>();
    let mut rec_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<RawRecord>>>::from(rec_out);
    let mut cp_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Checkpoint>>>::from(cp_out);
    // Epochs closed early by an idle source, told to every worker (see `closes_epoch_when_idle`).
    let (pulse_out, pulse_stream) = builder.new_output::<Vec<u64>>();
    let mut pulse_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<u64>>>::from(pulse_out);
    let activator = scope.activator_for(builder.operator_info().address);
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
    let records_metric = metrics::counter!(crate::metrics::SOURCE_RECORDS, "connector" => kind);

    builder.build(move |caps| {
        let mut caps = Some(caps);
        let mut phase = Phase::Starting;
        let mut backoff = Duration::from_millis(100);
        let clock = factory.epoch_every().map(|d| d.as_millis().max(1) as u64);
        let idle_exit = factory.idle_exit();
        let close_when_idle = clock.is_some() && factory.closes_epoch_when_idle();
        let mut epoch: u64 = clock.map(|ms| now_ms() / ms).unwrap_or(0);
        let mut open_records = 0usize;
        let mut in_flight =
            InFlight::new(settings.max_epochs_in_flight, settings.max_records_in_flight).with_cost(settings.max_bytes_in_flight, settings.drain_within);
        let mut acknowledged: u64 = 0;
        let mut last_record = Instant::now();
        let mut buf: Vec<RawRecord> = Vec::new();
        move |_frontiers| {
            let oldest = durable.with_frontier(|f| f.first().copied()).unwrap_or(u64::MAX);
            in_flight.durable_before(oldest);
            metrics::gauge!(crate::metrics::EPOCHS_IN_FLIGHT).set(in_flight.epochs() as f64);
            match &mut phase {
                Phase::Finished => return,
                Phase::Draining(source) => {
                    if oldest > acknowledged && !fatal.failed() {
                        acknowledged = oldest;
                        source.durable(oldest);
                    }
                    if oldest == u64::MAX {
                        phase = Phase::Finished;
                    } else {
                        activator.activate_after(Duration::from_millis(5));
                    }
                    return;
                }
                Phase::Reading(source) if oldest > acknowledged && !fatal.failed() => {
                    acknowledged = oldest;
                    source.durable(oldest);
                }
                _ => {}
            }
            let Some(cs) = caps.as_mut() else { return };
            let stopping = stop.load(Ordering::Relaxed) || idle_exit.is_some_and(|d| last_record.elapsed() >= d && in_flight.is_empty() && open_records == 0);
            // Clock epochs: close the open one when the clock has moved on.
            if let Some(ms) = clock {
                let tick = now_ms() / ms;
                if tick > epoch {
                    if let Phase::Reading(source) = &mut phase {
                        if open_records > 0 || source.wants_checkpoint() {
                            cp_out.activate().session(&cs[1]).give_iterator(source.checkpoint(epoch).into_iter());
                            open_records = 0;
                        }
                    }
                    epoch = tick;
                    for c in cs.iter_mut() {
                        c.downgrade(&epoch);
                    }
                }
            }
            if stopping {
                if matches!(phase, Phase::Reading(_)) {
                    tracing::info!(
                        worker = index,
                        records = in_flight.records(),
                        pace = in_flight.pace().unwrap_or(0.0),
                        "{kind} source: stopping; draining what is in flight"
                    );
                }
                finish(&mut phase, &mut caps, &mut cp_out, epoch, open_records);
                activator.activate();
                return;
            }
            if let Phase::Starting = phase {
                match factory.build(index, peers, &resume) {
                    Ok(source) => {
                        if let Some(total) = source.total_hint() {
                            progress.total.fetch_add(total, Ordering::Relaxed);
                        }
                        phase = Phase::Reading(source);
                        backoff = Duration::from_millis(100);
                        last_record = Instant::now();
                    }
                    Err(SourceError::Transient(e)) => {
                        tracing::warn!("{kind} source: {e}; retrying in {backoff:?}");
                        activator.activate_after(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        return;
                    }
                    Err(SourceError::Config(e)) => {
                        fatal.set(SourceError::Config(format!("{kind} source: {e}")));
                        stop.store(true, Ordering::Relaxed);
                        phase = Phase::Finished;
                        caps = None;
                        return;
                    }
                }
            }
            let Phase::Reading(source) = &mut phase else { return };
            let mut budget = in_flight.budget(epoch).min(settings.epoch_records);
            if clock.is_none() {
                budget = budget.min(settings.epoch_records.saturating_sub(open_records));
            }
            if budget == 0 && clock.is_none() && open_records > 0 && in_flight.budget(epoch) == 0 {
                // Counted epochs: the in-flight bound is reached before the epoch is full. Close
                // it, or what it holds never becomes durable and nothing is admitted again.
                cp_out.activate().session(&cs[1]).give_iterator(source.checkpoint(epoch).into_iter());
                open_records = 0;
                epoch += 1;
                for c in cs.iter_mut() {
                    c.downgrade(&epoch);
                }
            }
            if budget == 0 {
                tracing::trace!(epoch, in_flight = in_flight.epochs(), "{kind} source paused");
                // Backpressure: leave the input where it is until the sinks catch up.
                activator.activate_after(Duration::from_millis(1));
                return;
            }
            let polled = source.poll(epoch, budget, &mut buf);
            let n = buf.len();
            if n > 0 {
                let bytes: usize = buf.iter().map(|r| r.bytes.len()).sum();
                rec_out.activate().session(&cs[0]).give_container(&mut buf);
                buf.clear();
                open_records += n;
                in_flight.add(epoch, n, bytes);
                last_record = Instant::now();
                progress.read.fetch_add(n as u64, Ordering::Relaxed);
                records_metric.increment(n as u64);
            }
            if clock.is_none() && open_records >= settings.epoch_records {
                cp_out.activate().session(&cs[1]).give_iterator(source.checkpoint(epoch).into_iter());
                open_records = 0;
                epoch += 1;
                for c in cs.iter_mut() {
                    c.downgrade(&epoch);
                }
            }
            // An idle source closes its epoch, so what it supplied is answered now rather than
            // when more arrives: always with counted epochs, and with clock epochs for bursty
            // sources, which also tell every worker the epoch they closed; an idle worker moves
            // past the epochs others closed, so it holds nobody back.
            if (clock.is_none() || close_when_idle) && matches!(polled, Ok(Poll::Idle(_))) {
                let before = epoch;
                if open_records > 0 || source.wants_checkpoint() {
                    cp_out.activate().session(&cs[1]).give_iterator(source.checkpoint(epoch).into_iter());
                    if close_when_idle {
                        pulse_out.activate().session(&cs[2]).give(epoch);
                    }
                    open_records = 0;
                    epoch += 1;
                }
                if close_when_idle {
                    epoch = epoch.max(closed_elsewhere.get().saturating_add(1));
                }
                if epoch != before {
                    for c in cs.iter_mut() {
                        c.downgrade(&epoch);
                    }
                }
            }
            match polled {
                Ok(Poll::More) => activator.activate(),
                Ok(Poll::Idle(d)) => activator.activate_after(clock.map(|ms| d.min(Duration::from_millis(ms))).unwrap_or(d)),
                Ok(Poll::Done) => {
                    finish(&mut phase, &mut caps, &mut cp_out, epoch, open_records);
                    activator.activate();
                }
                Err(SourceError::Transient(e)) => {
                    tracing::warn!("{kind} source: {e}; polling again in {backoff:?}");
                    activator.activate_after(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(SourceError::Config(e)) => {
                    fatal.set(SourceError::Config(format!("{kind} source: {e}")));
                    stop.store(true, Ordering::Relaxed);
                    activator.activate();
                }
            }
        }
    });
    (rec_stream, cp_stream)
}

type CpOut<'s> = OutputBuilder<u64, CapacityContainerBuilder<Vec<Checkpoint>>>;

/// Stops reading: closes the open epoch (its checkpoints travel with its answers), drops the
/// capabilities so downstream drains, and waits for durability to acknowledge the rest.
fn finish(phase: &mut Phase, caps: &mut Option<Vec<timely::dataflow::operators::Capability<u64>>>, cp_out: &mut CpOut<'_>, epoch: u64, open_records: usize) {
    let Some(cs) = caps.as_ref() else { return };
    *phase = match std::mem::replace(phase, Phase::Finished) {
        Phase::Reading(mut source) => {
            source.stop();
            if open_records > 0 || source.wants_checkpoint() {
                cp_out.activate().session(&cs[1]).give_iterator(source.checkpoint(epoch).into_iter());
            }
            Phase::Draining(source)
        }
        Phase::Draining(source) => Phase::Draining(source),
        Phase::Starting | Phase::Finished => Phase::Finished,
    };
    *caps = None;
}

#[cfg(test)]
mod tests {
    use super::InFlight;

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
