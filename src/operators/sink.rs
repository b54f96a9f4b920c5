//! The durable sink operator: gathers each epoch's answers and dead letters, and once the epoch is
//! complete hands it to a chain of sink threads, one per configured sink, each writing it in turn
//! and retrying with backoff until it is durable. The operator holds a capability on its (empty) output until then,
//! so a probe on that output says exactly which epochs are durable.

use crate::connectors::kafka::source::SourceOffset;
use crate::connectors::{EpochBatch, SinkError, SinkWriter};
use crate::progress::Progress;
use crate::record::{now_ms, Answer, DeadLetter};
use std::collections::BTreeMap;
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
    dead: u64,
}

/// Writes `answers`, `dead` and the source `offsets` through `writers`. The returned stream carries no data; probe it to
/// learn which epochs are durable.
pub fn durable_sink<'s>(
    answers: Stream<'s, u64, Vec<Answer>>,
    dead: Stream<'s, u64, Vec<DeadLetter>>,
    offsets: Stream<'s, u64, Vec<SourceOffset>>,
    mut writers: Vec<Box<dyn SinkWriter>>,
    progress: Arc<Progress>,
) -> Stream<'s, u64, Vec<()>> {
    let scope = answers.scope();
    let worker_index = scope.index();
    let mut builder = OperatorBuilder::new("DurableSink".to_owned(), scope);
    let mut ans_in = builder.new_input(answers, Pipeline);
    let mut dead_in = builder.new_input(dead, Pipeline);
    let mut off_in = builder.new_input(offsets, Pipeline);
    // The sink that stores offsets goes last, after every other sink holds the epoch.
    writers.sort_by_key(|w| w.stores_offsets());
    let (out, stream) = builder.new_output::<Vec<()>>();
    let _out = OutputBuilder::<_, CapacityContainerBuilder<Vec<()>>>::from(out);
    let address = builder.operator_info().address.to_vec();
    let activator = scope.worker().sync_activator_for(address);

    let (batch_tx, ack_rx, threads) = spawn_stages(writers, worker_index, activator);

    builder.build(move |_initial| {
        let mut threads = Some(threads);
        let mut batch_tx = Some(batch_tx);
        let mut buffered: BTreeMap<u64, (Capability<u64>, EpochBatch)> = BTreeMap::new();
        let mut writing: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
        // The size of the last epoch handed over: a new epoch's answers are allocated at that size
        // at once, rather than grown (and copied) step by step as its containers arrive.
        let mut answers_hint = 0;
        move |frontiers| {
            ans_in.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = buffered.entry(t).or_insert_with(|| {
                    (cap.delayed(&t, 0), EpochBatch { epoch: t, answers: Vec::with_capacity(answers_hint.min(16_384)), ..Default::default() })
                });
                entry.1.answers.append(data);
            });
            dead_in.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = buffered.entry(t).or_insert_with(|| (cap.delayed(&t, 0), EpochBatch { epoch: t, ..Default::default() }));
                entry.1.dead.append(data);
            });
            off_in.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = buffered.entry(t).or_insert_with(|| (cap.delayed(&t, 0), EpochBatch { epoch: t, ..Default::default() }));
                entry.1.offsets.append(data);
            });
            // Hand over every complete epoch, oldest first.
            while let Some((&t, _)) = buffered.first_key_value() {
                if frontiers.iter().any(|f| f.frontier().less_equal(&t)) {
                    break;
                }
                let (cap, batch) = buffered.remove(&t).expect("first key exists");
                answers_hint = batch.answers.len();
                writing.insert(t, cap);
                if let Some(tx) = &batch_tx {
                    let ack = Ack { epoch: batch.epoch, answers: batch.answers.len() as u64, dead: batch.dead.len() as u64 };
                    tx.send((batch, vec![ack])).expect("the sink threads outlive the operator");
                }
            }
            while let Ok(ack) = ack_rx.try_recv() {
                writing.remove(&ack.epoch);
                progress.answered.fetch_add(ack.answers, Ordering::Relaxed);
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
/// the threads.
fn spawn_stages(
    writers: Vec<Box<dyn SinkWriter>>,
    worker_index: usize,
    activator: timely::scheduling::SyncActivator,
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
        let (ack_tx, activator) = (ack_tx.clone(), activator.clone());
        let kind = writer.as_ref().map(|w| w.kind()).unwrap_or("none");
        let thread = std::thread::Builder::new()
            .name(format!("sluice-sink-{worker_index}-{kind}"))
            .spawn(move || stage_loop(writer, input, forward, ack_tx, activator))
            .expect("cannot start a sink thread");
        threads.push(thread);
    }
    (first_tx, ack_rx, threads)
}

fn stage_loop(
    mut writer: Option<Box<dyn SinkWriter>>,
    rx: crossbeam_channel::Receiver<Group>,
    forward: Option<crossbeam_channel::Sender<Group>>,
    acks: crossbeam_channel::Sender<Ack>,
    activator: timely::scheduling::SyncActivator,
) {
    let latency = metrics::histogram!(crate::metrics::END_TO_END_LATENCY);
    let answers = metrics::counter!(crate::metrics::ANSWERS);
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
        let (batch, epochs) = merge(queued);
        if let Some(w) = writer.as_mut() {
            write_with_retry(w.as_mut(), &batch);
        }
        if let Some(next) = &forward {
            next.send((batch, epochs)).expect("the next sink stage outlives this one");
            continue;
        }
        let now = now_ms();
        for a in &batch.answers {
            latency.record(now.saturating_sub(a.ingest_ms) as f64 / 1000.0);
        }
        answers.increment(batch.answers.len() as u64);
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

/// Concatenates groups, oldest first, into one batch (sinks keep the latest answer per ID and the
/// latest offset per partition, so later epochs win), keeping every epoch's acknowledgement.
fn merge(queued: Vec<Group>) -> Group {
    let mut acks = Vec::new();
    let mut merged = EpochBatch::default();
    for (mut b, a) in queued {
        acks.extend(a);
        if merged.answers.is_empty() {
            std::mem::swap(&mut merged.answers, &mut b.answers);
        } else {
            merged.answers.append(&mut b.answers);
        }
        merged.dead.append(&mut b.dead);
        merged.offsets.append(&mut b.offsets);
        merged.epoch = b.epoch;
    }
    (merged, acks)
}

/// Writes until the sink accepts the epoch: nothing is dropped. Transient errors back off
/// exponentially up to 10 s; a fatal error stops the process, since no later write can succeed.
fn write_with_retry(writer: &mut dyn SinkWriter, batch: &EpochBatch) {
    let mut delay = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match writer.write(batch) {
            Ok(()) => {
                metrics::histogram!(crate::metrics::SINK_WRITE_LATENCY, "sink" => writer.kind()).record(started.elapsed().as_secs_f64());
                return;
            }
            Err(SinkError::Transient(e)) => {
                metrics::counter!(crate::metrics::SINK_RETRIES, "sink" => writer.kind()).increment(1);
                tracing::warn!(sink = writer.kind(), epoch = batch.epoch, "write failed, retrying in {:?}: {e}", delay);
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(SinkError::Fatal(e)) => {
                tracing::error!(sink = writer.kind(), "cannot write: {e}");
                eprintln!("error: {} sink: {e}", writer.kind());
                std::process::exit(2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SourcePos;

    fn batch(epoch: u64, ids: &[&str], offset: i64) -> EpochBatch {
        EpochBatch {
            epoch,
            answers: ids
                .iter()
                .map(|id| Answer {
                    id: id.to_string(),
                    values: Vec::new(),
                    passthrough: Vec::new(),
                    model: "m@0".into(),
                    pos: SourcePos::Generated { seq: epoch },
                    ingest_ms: 0,
                })
                .collect(),
            dead: Vec::new(),
            offsets: vec![SourceOffset { topic: "t".into(), partition: 0, next_offset: offset }],
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
            log.extend(batch.answers.iter().map(|a| (self.name, a.id.clone())));
            Ok(())
        }
        fn stores_offsets(&self) -> bool {
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
                writers.sort_by_key(|w| w.stores_offsets());
                let (tx, acks, threads) = spawn_stages(writers, 0, activator);
                for e in 0..8u64 {
                    let ids = [format!("e{e}a"), format!("e{e}b")];
                    let b = batch(e, &[ids[0].as_str(), ids[1].as_str()], e as i64);
                    let ack = Ack { epoch: e, answers: 2, dead: 0 };
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
            let ack = Ack { epoch: b.epoch, answers: b.answers.len() as u64, dead: 0 };
            (b, vec![ack])
        };
        let (merged, acks) = merge(vec![group(batch(3, &["a", "b"], 10)), group(batch(4, &["a"], 12)), group(batch(7, &[], 15))]);
        let order: Vec<(&str, u64)> =
            merged.answers.iter().map(|a| (a.id.as_str(), a.ingest_ms + if let SourcePos::Generated { seq } = a.pos { seq } else { 0 })).collect();
        assert_eq!(order, vec![("a", 3), ("b", 3), ("a", 4)], "older epochs first, so the later answer for an ID wins in the sinks");
        assert_eq!(merged.offsets.last().map(|o| o.next_offset), Some(15), "the newest offset comes last");
        assert_eq!(merged.epoch, 7);
        let acked: Vec<(u64, u64)> = acks.iter().map(|a| (a.epoch, a.answers)).collect();
        assert_eq!(acked, vec![(3, 2), (4, 1), (7, 0)]);
    }
}
