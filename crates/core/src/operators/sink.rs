//! The durable sink operator: gathers each epoch's changes (answers and deletes), dead letters
//! and source checkpoints, and once the epoch is complete hands it, in change order, to a chain
//! of sink threads, one per configured sink, each writing it in turn. Transient errors are
//! retried with backoff; a record a sink refuses is isolated by splitting the batch and becomes
//! a dead letter while the rest is written; a configuration error fails the job (it stops
//! reading, writes and acknowledges nothing more, and ends failed with the error). The
//! operator holds a capability on its (empty) output until the last sink has written an epoch,
//! so a probe on that output says exactly which epochs are durable.

use crate::progress::Progress;
use crate::record::{now_ms, Answer, Change, DeadLetter, DeadReason, Deleted};
use crate::sink::{EpochBatch, SinkError, SinkWriter};
use crate::source::Checkpoint;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

/// An epoch made durable: its number and what it held.
struct Ack {
    epoch: u64,
    answers: u64,
    deleted: u64,
    dead: u64,
}

/// What the sink tells its job: a configuration error fails it.
#[derive(Clone)]
pub struct JobControl {
    /// Stops the job's source.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// The job's failure, if any.
    pub fatal: crate::source::harness::FatalSlot,
    /// Set when the job is canceled: a sink retrying a transient error gives up (nothing more
    /// is written or acknowledged) instead of holding the cancel back.
    pub canceled: Arc<std::sync::atomic::AtomicBool>,
}

impl JobControl {
    fn fail(&self, kind: &'static str, error: String) {
        self.fatal.set(crate::runtime::RunError::Sink { kind, error: SinkError::Config(error) });
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Writes `answers`, `deletes`, `dead` and the sources' `checkpoints` through `writers`; dead
/// letters are bounded to `max_dead_letter_bytes` of raw bytes first. The returned stream
/// carries no data; probe it to learn which epochs are durable. The operator's activations, and
/// the sink threads' writes, run inside `span` (the job's `<pipeline>.sink`).
#[allow(clippy::too_many_arguments)]
pub fn durable_sink<'s>(
    answers: Stream<'s, u64, Vec<Answer>>,
    deletes: Stream<'s, u64, Vec<Deleted>>,
    dead: Stream<'s, u64, Vec<DeadLetter>>,
    checkpoints: Stream<'s, u64, Vec<Checkpoint>>,
    mut writers: Vec<Box<dyn SinkWriter>>,
    max_dead_letter_bytes: usize,
    retract_refused: bool,
    forget: crate::operators::key_by_id::Forget,
    progress: Arc<Progress>,
    control: JobControl,
    span: tracing::Span,
) -> Stream<'s, u64, Vec<()>> {
    let scope = answers.scope();
    let worker_index = scope.index();
    let mut builder = OperatorBuilder::new("DurableSink".to_owned(), scope);
    let mut ans_in = builder.new_input(answers, Pipeline);
    let mut del_in = builder.new_input(deletes, Pipeline);
    let mut dead_in = builder.new_input(dead, Pipeline);
    let mut cp_in = builder.new_input(checkpoints, Pipeline);
    // The sink that stores checkpoints goes last, after every other sink holds the epoch.
    writers.sort_by_key(|w| w.stores_checkpoints());
    let (out, stream) = builder.new_output::<Vec<()>>();
    let _out = OutputBuilder::<_, CapacityContainerBuilder<Vec<()>>>::from(out);
    let address = builder.operator_info().address.to_vec();
    let activator = scope.worker().sync_activator_for(address);

    let failed = control.fatal.clone();
    let (batch_tx, ack_rx, threads) = spawn_stages(writers, worker_index, activator, retract_refused, forget, control, span.clone());

    builder.build(move |_initial| {
        let mut threads = Some(threads);
        let mut batch_tx = Some(batch_tx);
        let mut buffered: BTreeMap<u64, (Capability<u64>, EpochBatch)> = BTreeMap::new();
        let mut writing: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
        // The size of the last epoch handed over: a new epoch's answers are allocated at that size
        // at once, rather than grown (and copied) step by step as its containers arrive.
        let mut answers_hint = 0;
        move |frontiers| {
            let _entered = span.enter();
            ans_in.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = buffered.entry(t).or_insert_with(|| {
                    (cap.delayed(&t, 0), EpochBatch { epoch: t, changes: Vec::with_capacity(answers_hint.min(16_384)), ..Default::default() })
                });
                entry.1.changes.extend(data.drain(..).map(Change::Upsert));
            });
            del_in.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = buffered.entry(t).or_insert_with(|| (cap.delayed(&t, 0), EpochBatch { epoch: t, ..Default::default() }));
                entry.1.changes.extend(data.drain(..).map(Change::Delete));
            });
            dead_in.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = buffered.entry(t).or_insert_with(|| (cap.delayed(&t, 0), EpochBatch { epoch: t, ..Default::default() }));
                entry.1.dead.append(data);
            });
            cp_in.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = buffered.entry(t).or_insert_with(|| (cap.delayed(&t, 0), EpochBatch { epoch: t, ..Default::default() }));
                entry.1.checkpoints.append(data);
            });
            // Hand over every complete epoch, oldest first.
            while let Some((&t, _)) = buffered.first_key_value() {
                if frontiers.iter().any(|f| f.frontier().less_equal(&t)) {
                    break;
                }
                let (cap, mut batch) = buffered.remove(&t).expect("first key exists");
                answers_hint = batch.changes.len();
                // Answers come back from the model in completion order: apply every change in
                // the order it was made, so an ID's last change wins in every sink.
                batch.changes.sort_unstable_by_key(Change::seq);
                for d in &mut batch.dead {
                    d.bound(max_dead_letter_bytes);
                }
                writing.insert(t, cap);
                if let Some(tx) = &batch_tx {
                    let deleted = batch.changes.iter().filter(|c| matches!(c, Change::Delete(_))).count() as u64;
                    let ack = Ack { epoch: batch.epoch, answers: batch.changes.len() as u64 - deleted, deleted, dead: batch.dead.len() as u64 };
                    tx.send((batch, vec![ack])).expect("the sink threads outlive the operator");
                }
            }
            while let Ok(ack) = ack_rx.try_recv() {
                writing.remove(&ack.epoch);
                // A failed job's later epochs were not written: they count for nothing.
                if failed.failed() {
                    continue;
                }
                progress.answered.fetch_add(ack.answers, Ordering::Relaxed);
                progress.deleted.fetch_add(ack.deleted, Ordering::Relaxed);
                progress.dead.fetch_add(ack.dead, Ordering::Relaxed);
            }
            // All input is in and durable: stop the sink threads (each ends when the one before it does).
            if buffered.is_empty() && writing.is_empty() && frontiers.iter().all(|f| f.frontier().is_empty()) {
                batch_tx = None;
                for t in threads.take().unwrap_or_default() {
                    let _ = t.join();
                }
            }
        }
    });
    stream
}

/// A group of epochs on its way through the sink stages, with the acknowledgement of each.
type Group = (EpochBatch, Vec<Ack>);

/// Starts one thread per sink, chained in order: stage *i* hands a group to stage *i+1* only once
/// it has made it durable, so the last sink (the one storing offsets) never gets ahead of the
/// others, while different sinks work on different epochs at the same time. The last stage
/// acknowledges every epoch of a group. Returns the first stage's input, the acknowledgements and
/// the threads. Each thread runs inside `span`.
fn spawn_stages(
    writers: Vec<Box<dyn SinkWriter>>,
    worker_index: usize,
    activator: timely::scheduling::SyncActivator,
    retract_refused: bool,
    forget: crate::operators::key_by_id::Forget,
    control: JobControl,
    span: tracing::Span,
) -> (crossbeam_channel::Sender<Group>, crossbeam_channel::Receiver<Ack>, Vec<std::thread::JoinHandle<()>>) {
    let (first_tx, mut rx) = crossbeam_channel::unbounded::<Group>();
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded::<Ack>();
    let mut stages: Vec<Option<Box<dyn SinkWriter>>> = writers.into_iter().map(Some).collect();
    if stages.is_empty() {
        stages.push(None);
    }
    let count = stages.len();
    let mut threads = Vec::with_capacity(count);
    for (i, writer) in stages.into_iter().enumerate() {
        // Each stage reads what the one before forwards; the last one forwards nothing and acknowledges.
        let (input, forward) = if i + 1 < count {
            let (tx, next_rx) = crossbeam_channel::unbounded::<Group>();
            (std::mem::replace(&mut rx, next_rx), Some(tx))
        } else {
            (rx.clone(), None)
        };
        let (ack_tx, activator, forget, control, span) = (ack_tx.clone(), activator.clone(), forget.clone(), control.clone(), span.clone());
        let kind = writer.as_ref().map(|w| w.kind()).unwrap_or("none");
        let thread = std::thread::Builder::new()
            .name(format!("sluice-sink-{worker_index}-{kind}"))
            .spawn(move || span.in_scope(|| stage_loop(writer, input, forward, ack_tx, activator, retract_refused, forget, control)))
            .expect("cannot start a sink thread");
        threads.push(thread);
    }
    (first_tx, ack_rx, threads)
}

#[allow(clippy::too_many_arguments)]
fn stage_loop(
    mut writer: Option<Box<dyn SinkWriter>>,
    rx: crossbeam_channel::Receiver<Group>,
    forward: Option<crossbeam_channel::Sender<Group>>,
    acks: crossbeam_channel::Sender<Ack>,
    activator: timely::scheduling::SyncActivator,
    retract_refused: bool,
    forget: crate::operators::key_by_id::Forget,
    control: JobControl,
) {
    let latency = metrics::histogram!(crate::metrics::END_TO_END_LATENCY);
    let answers = metrics::counter!(crate::metrics::ANSWERS);
    STAGE_CANCELED.with(|c| *c.borrow_mut() = Some(control.canceled.clone()));
    while let Ok(first) = rx.recv() {
        // Group commit: groups that queued up while the last write was in flight are written
        // together, so a busy sink pays one round trip (and one transaction) for all of them.
        let mut queued = vec![first];
        while queued.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(g) => queued.push(g),
                Err(_) => break,
            }
        }
        let (mut batch, epochs) = merge(queued);
        if let Some(w) = writer.as_mut() {
            // A failed job writes nothing more: its epochs pass through unwritten, unacknowledged
            // to the source, so that its dataflow ends.
            if !control.fatal.failed() {
                write_durably(w.as_mut(), &mut batch, retract_refused, &forget);
                if let Some(e) = CONFIG_ERROR.with(|c| c.borrow_mut().take()) {
                    control.fail(w.kind(), e);
                }
            }
        }
        if let Some(next) = &forward {
            next.send((batch, epochs)).expect("the next sink stage outlives this one");
            continue;
        }
        let now = now_ms();
        for c in &batch.changes {
            if let Change::Upsert(a) = c {
                latency.record(now.saturating_sub(a.ingest_ms) as f64 / 1000.0);
            }
        }
        answers.increment(batch.changes.len() as u64);
        for d in &batch.dead {
            metrics::counter!(crate::metrics::DEAD_LETTERS, "reason" => d.reason.as_str()).increment(1);
        }
        for ack in epochs {
            let _ = acks.send(ack);
        }
        let _ = activator.activate();
    }
}

/// Most groups written as one.
const MAX_GROUP: usize = 16;

/// Concatenates groups, oldest first, into one batch (sinks apply changes in order and keep the
/// latest checkpoint per shard, so later epochs win), keeping every epoch's acknowledgement.
fn merge(queued: Vec<Group>) -> Group {
    let mut acks = Vec::new();
    let mut merged = EpochBatch::default();
    // Sized once: growing it group by group copied every earlier group's changes again.
    let changes: usize = queued.iter().map(|(b, _)| b.changes.len()).sum();
    for (mut b, a) in queued {
        acks.extend(a);
        if merged.changes.is_empty() && b.changes.capacity() >= changes {
            std::mem::swap(&mut merged.changes, &mut b.changes);
        } else {
            merged.changes.reserve(changes - merged.changes.len());
            merged.changes.append(&mut b.changes);
        }
        merged.dead.append(&mut b.dead);
        merged.checkpoints.append(&mut b.checkpoints);
        merged.epoch = b.epoch;
    }
    (merged, acks)
}

/// Writes `batch` until the sink holds it. Records the sink refuses are isolated and become
/// dead letters, written to this sink and, through `batch`, to the sinks after it. With
/// `retract_refused` (a table's rows), a refused answer also deletes its ID's old answer, here
/// and in the sinks after it, as a fresh read would leave none.
fn write_durably(writer: &mut dyn SinkWriter, batch: &mut EpochBatch, retract_refused: bool, forget: &crate::operators::key_by_id::Forget) {
    let Err(first) = write_retrying(writer, batch) else { return };
    tracing::warn!(sink = writer.kind(), epoch = batch.epoch, "the sink refused a record ({first}); isolating it");
    let whole = std::mem::take(batch);
    let part = EpochBatch { epoch: whole.epoch, changes: whole.changes.clone(), dead: whole.dead.clone(), checkpoints: Vec::new() };
    let (refused_changes, refused_dead) = match first {
        // A sink that named the records it refuses is not asked again.
        named @ Refusal::These(_) => isolate_refused(writer, part, named),
        // Anything else is tried again without the checkpoints first.
        Refusal::One(_) => isolate(writer, part.changes, part.dead, part.epoch),
    };
    let kind = writer.kind();
    let mut dead: Vec<DeadLetter> = refused_changes
        .iter()
        .map(|(c, why)| {
            let (raw, ingest_ms) = match c {
                Change::Upsert(a) => (a.raw.clone(), a.ingest_ms),
                Change::Delete(d) => (d.id.clone().into_bytes(), d.ingest_ms),
            };
            let mut d = DeadLetter::new(c.pos().clone(), DeadReason::SinkRejected, format!("the {kind} sink refused it: {why}"), raw, ingest_ms);
            d.bound(usize::MAX);
            d
        })
        .collect();
    for (mut d, why) in refused_dead {
        // A dead letter the sink itself refuses (too large for it): keep its first KiB, its length and hash.
        d.detail = format!("{} (the {kind} sink refused the full dead letter: {why})", d.detail);
        d.raw.truncate(1024);
        dead.push(d);
    }
    metrics::counter!(crate::metrics::SINK_REJECTED, "sink" => kind).increment(dead.len() as u64);
    // The same record sent again is tried again, not dropped as a duplicate.
    for (c, _) in &refused_changes {
        forget.failed(c.id());
    }
    let refused_seqs: std::collections::HashSet<u64> = refused_changes.iter().map(|(c, _)| c.seq()).collect();
    // A refused answer's retraction (a delete of its ID, in its place among the changes).
    let retractions: HashMap<u64, Change> = if retract_refused {
        refused_changes
            .iter()
            .filter_map(|(c, _)| match c {
                Change::Upsert(a) if a.replaces => {
                    Some((a.seq, Change::Delete(Deleted { id: a.id.clone(), pos: a.pos.clone(), ingest_ms: a.ingest_ms, seq: a.seq })))
                }
                _ => None,
            })
            .collect()
    } else {
        HashMap::new()
    };
    // Not when a later change of the same ID in this batch stands.
    let latest: HashMap<&str, u64> = whole.changes.iter().fold(HashMap::new(), |mut m, c| {
        let e = m.entry(c.id()).or_insert(0);
        *e = (*e).max(c.seq());
        m
    });
    let retractions: HashMap<u64, Change> = retractions.into_iter().filter(|(seq, c)| latest.get(c.id()).is_none_or(|l| l <= seq)).collect();
    let mut retract: Vec<Change> = retractions.values().cloned().collect();
    retract.sort_unstable_by_key(Change::seq);
    let last = EpochBatch { epoch: whole.epoch, changes: retract, dead: dead.clone(), checkpoints: whole.checkpoints.clone() };
    if let Err(e) = write_retrying(writer, &last) {
        // Even the bounded dead letters were refused: say so loudly rather than stall.
        for d in &dead {
            tracing::error!(sink = kind, source = %d.pos, sha256 = %d.raw_sha256, "a dead letter could not be written: {e}");
        }
        let _ = write_retrying(writer, &EpochBatch { epoch: whole.epoch, checkpoints: whole.checkpoints.clone(), ..Default::default() });
    }
    let mut kept_dead: Vec<DeadLetter> = whole.dead;
    kept_dead.extend(dead.into_iter().filter(|d| d.reason == DeadReason::SinkRejected));
    let mut retractions = retractions;
    *batch = EpochBatch {
        epoch: whole.epoch,
        changes: whole.changes.into_iter().filter_map(|c| if refused_seqs.contains(&c.seq()) { retractions.remove(&c.seq()) } else { Some(c) }).collect(),
        dead: kept_dead,
        checkpoints: whole.checkpoints,
    };
}

/// Writes the changes and dead letters in ever smaller parts until each part is written or is
/// one record the sink refuses. Records the sink names as refused are taken out at once, and
/// the rest of their part is written. Returns the refused records with the sink's reason.
#[allow(clippy::type_complexity)]
fn isolate(writer: &mut dyn SinkWriter, changes: Vec<Change>, dead: Vec<DeadLetter>, epoch: u64) -> (Vec<(Change, String)>, Vec<(DeadLetter, String)>) {
    let part = EpochBatch { epoch, changes, dead, checkpoints: Vec::new() };
    match write_retrying(writer, &part) {
        Ok(()) => (Vec::new(), Vec::new()),
        Err(refusal) => isolate_refused(writer, part, refusal),
    }
}

/// [`isolate`] for a part the sink has just refused.
#[allow(clippy::type_complexity)]
fn isolate_refused(writer: &mut dyn SinkWriter, part: EpochBatch, refusal: Refusal) -> (Vec<(Change, String)>, Vec<(DeadLetter, String)>) {
    let epoch = part.epoch;
    let why = match refusal {
        Refusal::These(named) => {
            let mut reasons: HashMap<u64, String> = named.into_iter().collect();
            let EpochBatch { changes, dead, .. } = part;
            let (refused, rest): (Vec<Change>, Vec<Change>) = changes.into_iter().partition(|c| reasons.contains_key(&c.seq()));
            if !refused.is_empty() {
                let refused: Vec<(Change, String)> = refused
                    .into_iter()
                    .map(|c| {
                        let why = reasons.remove(&c.seq()).unwrap_or_default();
                        (c, why)
                    })
                    .collect();
                let (c, d) = isolate(writer, rest, dead, epoch);
                return ([refused, c].concat(), d);
            }
            // It named none of this part's records: find them by splitting.
            return split(writer, rest, dead, epoch, "the sink refused records it did not name".to_string());
        }
        Refusal::One(why) => why,
    };
    split(writer, part.changes, part.dead, epoch, why)
}

/// Splits a refused part in two and isolates each half (`why`: the sink's reason, kept for a
/// part of one record).
#[allow(clippy::type_complexity)]
fn split(
    writer: &mut dyn SinkWriter,
    mut changes: Vec<Change>,
    mut dead: Vec<DeadLetter>,
    epoch: u64,
    why: String,
) -> (Vec<(Change, String)>, Vec<(DeadLetter, String)>) {
    match (changes.len(), dead.len()) {
        (0, 0) => (Vec::new(), Vec::new()),
        (1, 0) => (vec![(changes.remove(0), why)], Vec::new()),
        (0, 1) => (Vec::new(), vec![(dead.remove(0), why)]),
        // One change and dead letters: each side alone.
        (1, _) => {
            let (c1, d1) = isolate(writer, changes, Vec::new(), epoch);
            let (c2, d2) = isolate(writer, Vec::new(), dead, epoch);
            ([c1, c2].concat(), [d1, d2].concat())
        }
        (0, n) => {
            let rest = dead.split_off(n / 2);
            let (c1, d1) = isolate(writer, Vec::new(), dead, epoch);
            let (c2, d2) = isolate(writer, Vec::new(), rest, epoch);
            ([c1, c2].concat(), [d1, d2].concat())
        }
        (n, _) => {
            // Changes in order: the first half is written before the second.
            let rest = changes.split_off(n / 2);
            let (c1, d1) = isolate(writer, changes, Vec::new(), epoch);
            let (c2, d2) = isolate(writer, rest, dead, epoch);
            ([c1, c2].concat(), [d1, d2].concat())
        }
    }
}

/// Why a sink would not take a batch.
enum Refusal {
    /// Some record of it, unnamed.
    One(String),
    /// These records (by sequence number), each with its reason.
    These(Vec<(u64, String)>),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::One(why) => f.write_str(why),
            Refusal::These(named) => write!(f, "{} records, the first: {}", named.len(), named.first().map(|r| r.1.as_str()).unwrap_or("")),
        }
    }
}

thread_local! {
    /// A configuration error a sink stage met while writing: no later write can succeed, so the
    /// stage fails its job once the write in progress returns (nothing from then on is written
    /// or acknowledged, so the write reports success to end its retries and splits).
    static CONFIG_ERROR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
    /// The cancel flag of the job this sink stage serves: a canceled job stops retrying, and
    /// ends the same way (see [`CONFIG_ERROR`]).
    static STAGE_CANCELED: std::cell::RefCell<Option<Arc<std::sync::atomic::AtomicBool>>> = const { std::cell::RefCell::new(None) };
}

/// Writes until the sink accepts the batch or refuses a record in it (`Err` with the sink's
/// reason). Transient errors back off exponentially up to 10 s. A configuration error fails the
/// job (see [`CONFIG_ERROR`]), since no later write can succeed. After a stop signal the watchdog ends the process
/// once the grace period is over, with nothing undurable acknowledged.
fn write_retrying(writer: &mut dyn SinkWriter, batch: &EpochBatch) -> Result<(), Refusal> {
    let mut delay = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match writer.write(batch) {
            Ok(()) => {
                metrics::histogram!(crate::metrics::SINK_WRITE_LATENCY, "sink" => writer.kind()).record(started.elapsed().as_secs_f64());
                return Ok(());
            }
            Err(SinkError::Record(e)) => return Err(Refusal::One(e)),
            Err(SinkError::Refused(named)) => return Err(Refusal::These(named)),
            Err(SinkError::Transient(e)) => {
                if STAGE_CANCELED.with(|c| c.borrow().as_ref().is_some_and(|f| f.load(Ordering::Relaxed))) {
                    tracing::warn!(sink = writer.kind(), "the job was canceled while this sink retried ({e}); what it had not written is not acknowledged");
                    CONFIG_ERROR.with(|c| {
                        c.borrow_mut().get_or_insert(format!("canceled while the sink retried: {e}"));
                    });
                    return Ok(());
                }
                metrics::counter!(crate::metrics::SINK_RETRIES, "sink" => writer.kind()).increment(1);
                tracing::warn!(sink = writer.kind(), epoch = batch.epoch, "write failed, retrying in {:?}: {e}", delay);
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(SinkError::Config(e)) => {
                tracing::error!(sink = writer.kind(), "cannot write: {e}; the job fails");
                CONFIG_ERROR.with(|c| {
                    c.borrow_mut().get_or_insert(e);
                });
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourcePos;

    fn answer(id: &str, epoch: u64, seq: u64) -> Change {
        Change::Upsert(Answer {
            id: id.to_string(),
            values: Vec::new(),
            passthrough: Vec::new(),
            model: "m@0".into(),
            pos: SourcePos::seq("generator".into(), epoch),
            ingest_ms: 0,
            raw: id.as_bytes().to_vec(),
            seq,
            replaces: false,
        })
    }

    fn batch(epoch: u64, ids: &[&str], offset: i64) -> EpochBatch {
        EpochBatch {
            epoch,
            changes: ids.iter().enumerate().map(|(i, id)| answer(id, epoch, epoch * 100 + i as u64)).collect(),
            dead: Vec::new(),
            checkpoints: vec![Checkpoint { scope: "t".into(), shard: "0".into(), position: offset.to_string() }],
        }
    }

    /// A stand-in sink that records, in one log shared by all stages, which answers it wrote.
    struct Recorder {
        name: &'static str,
        offsets: bool,
        delay: Duration,
        log: Arc<std::sync::Mutex<Vec<(&'static str, String)>>>,
    }

    impl SinkWriter for Recorder {
        fn kind(&self) -> &'static str {
            self.name
        }
        fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
            std::thread::sleep(self.delay);
            let mut log = self.log.lock().unwrap();
            log.extend(batch.changes.iter().map(|c| (self.name, c.id().to_string())));
            Ok(())
        }
        fn stores_checkpoints(&self) -> bool {
            self.offsets
        }
    }

    #[test]
    fn the_offset_sink_writes_an_epoch_only_after_the_others_and_every_epoch_is_acknowledged_once() {
        // The offset-storing sink is the fast one, so it would overtake the topic if the stages
        // were not chained.
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let acked = timely::execute_directly({
            let log = log.clone();
            move |worker| {
                let activator = worker.sync_activator_for(vec![0]);
                let mut writers: Vec<Box<dyn SinkWriter>> = vec![
                    Box::new(Recorder { name: "offsets", offsets: true, delay: Duration::from_millis(1), log: log.clone() }),
                    Box::new(Recorder { name: "topic", offsets: false, delay: Duration::from_millis(10), log: log.clone() }),
                ];
                writers.sort_by_key(|w| w.stores_checkpoints());
                let (tx, acks, threads) = spawn_stages(
                    writers,
                    0,
                    activator,
                    false,
                    Default::default(),
                    JobControl { stop: Default::default(), fatal: Default::default(), canceled: Default::default() },
                    tracing::Span::none(),
                );
                for e in 0..8u64 {
                    let ids = [format!("e{e}a"), format!("e{e}b")];
                    let b = batch(e, &[ids[0].as_str(), ids[1].as_str()], e as i64);
                    let ack = Ack { epoch: e, answers: 2, deleted: 0, dead: 0 };
                    tx.send((b, vec![ack])).unwrap();
                    std::thread::sleep(Duration::from_millis(3));
                }
                drop(tx);
                for t in threads {
                    t.join().unwrap();
                }
                acks.try_iter().map(|a| a.epoch).collect::<Vec<u64>>()
            }
        });
        assert_eq!(acked, (0..8).collect::<Vec<u64>>(), "every epoch acknowledged once, in order");
        let log = log.lock().unwrap();
        for e in 0..8 {
            for suffix in ["a", "b"] {
                let id = format!("e{e}{suffix}");
                let at = |sink: &str| log.iter().position(|(s, i)| *s == sink && *i == id).unwrap_or_else(|| panic!("{sink} never wrote {id}"));
                assert!(at("topic") < at("offsets"), "{id}: the offset-storing sink wrote before the topic");
            }
        }
        assert_eq!(log.len(), 32, "each answer written once per sink: {log:?}");
    }

    #[test]
    fn a_group_keeps_epoch_order_and_acknowledges_every_epoch() {
        let group = |b: EpochBatch| {
            let ack = Ack { epoch: b.epoch, answers: b.changes.len() as u64, deleted: 0, dead: 0 };
            (b, vec![ack])
        };
        let (merged, acks) = merge(vec![group(batch(3, &["a", "b"], 10)), group(batch(4, &["a"], 12)), group(batch(7, &[], 15))]);
        let order: Vec<(&str, u64)> = merged.changes.iter().map(|c| (c.id(), c.pos().offset)).collect();
        assert_eq!(order, vec![("a", 3), ("b", 3), ("a", 4)], "older epochs first, so the later answer for an ID wins in the sinks");
        assert_eq!(merged.checkpoints.last().map(|o| o.position.as_str()), Some("15"), "the newest checkpoint comes last");
        assert_eq!(merged.epoch, 7);
        let acked: Vec<(u64, u64)> = acks.iter().map(|a| (a.epoch, a.answers)).collect();
        assert_eq!(acked, vec![(3, 2), (4, 1), (7, 0)]);
    }

    /// A sink that refuses any batch holding a change whose ID starts with `bad` (naming them all
    /// when `names`), and logs what it wrote and how many writes it was asked for.
    #[derive(Default)]
    struct Picky {
        names: bool,
        written: Vec<String>,
        dead: Vec<(String, DeadReason)>,
        checkpoints: usize,
        writes: usize,
    }

    impl SinkWriter for Picky {
        fn kind(&self) -> &'static str {
            "picky"
        }
        fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
            self.writes += 1;
            let bad: Vec<(u64, String)> =
                batch.changes.iter().filter(|c| c.id().starts_with("bad")).map(|c| (c.seq(), format!("cannot store {}", c.id()))).collect();
            if self.names && !bad.is_empty() {
                return Err(SinkError::Refused(bad));
            }
            if let Some(c) = batch.changes.iter().find(|c| c.id().starts_with("bad")) {
                return Err(SinkError::Record(format!("cannot store {}", c.id())));
            }
            self.written.extend(batch.changes.iter().map(|c| c.id().to_string()));
            self.dead.extend(batch.dead.iter().map(|d| (String::from_utf8_lossy(&d.raw).to_string(), d.reason)));
            self.checkpoints += batch.checkpoints.len();
            Ok(())
        }
    }

    #[test]
    fn a_record_the_sink_refuses_becomes_a_dead_letter_and_the_rest_is_written_in_order() {
        let mut sink = Picky::default();
        let mut b = batch(1, &["a", "b", "bad1", "c", "d", "bad2", "e"], 9);
        write_durably(&mut sink, &mut b, false, &Default::default());
        assert_eq!(sink.written, vec!["a", "b", "c", "d", "e"], "the good changes, each once, in order");
        assert_eq!(sink.dead, vec![("bad1".to_string(), DeadReason::SinkRejected), ("bad2".to_string(), DeadReason::SinkRejected)]);
        assert_eq!(sink.checkpoints, 1, "the checkpoint is written once, after everything else");
        let forwarded: Vec<&str> = b.changes.iter().map(|c| c.id()).collect();
        assert_eq!(forwarded, vec!["a", "b", "c", "d", "e"], "later sinks get the batch without the refused changes");
        assert_eq!(b.dead.len(), 2, "and with their dead letters");
    }

    #[test]
    fn records_the_sink_names_as_refused_are_taken_out_without_splitting_the_batch() {
        let ids: Vec<String> = (0..64).map(|i| if i % 3 == 0 { format!("bad{i}") } else { format!("ok{i}") }).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut named = Picky { names: true, ..Picky::default() };
        let mut b = batch(1, &ids, 9);
        write_durably(&mut named, &mut b, false, &Default::default());
        let good: Vec<&str> = ids.iter().copied().filter(|i| i.starts_with("ok")).collect();
        assert_eq!(named.written, good, "the good changes, each once, in order");
        assert_eq!(named.dead.len(), 22);
        assert!(named.dead.iter().all(|(raw, reason)| raw.starts_with("bad") && *reason == DeadReason::SinkRejected));
        assert_eq!(b.changes.len(), 42);
        // The batch, the rest, then the dead letters.
        assert_eq!(named.writes, 3, "no splitting");
        let mut unnamed = Picky::default();
        write_durably(&mut unnamed, &mut batch(1, &ids, 9), false, &Default::default());
        assert_eq!(unnamed.written, good);
        assert!(unnamed.writes > 40, "an unnamed refusal splits the batch down to each bad record: {} writes", unnamed.writes);
    }

    #[test]
    fn a_refused_last_change_in_a_batch_with_dead_letters_is_isolated() {
        let mut sink = Picky::default();
        let mut b = batch(1, &["a", "bad"], 9);
        b.dead.push(DeadLetter::new(SourcePos::row("f.csv".into(), 3), DeadReason::MissingColumn, "short".into(), b"x,".to_vec(), 1));
        write_durably(&mut sink, &mut b, false, &Default::default());
        assert_eq!(sink.written, vec!["a"]);
        assert_eq!(sink.dead, vec![("x,".to_string(), DeadReason::MissingColumn), ("bad".to_string(), DeadReason::SinkRejected)]);
    }
}
