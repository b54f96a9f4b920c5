//! The durable sink operator: gathers each epoch's answers and dead letters, and once the epoch is
//! complete hands it to a sink thread that writes it to every configured sink, retrying with
//! backoff until it is durable. The operator holds a capability on its (empty) output until then,
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

    let (batch_tx, batch_rx) = crossbeam_channel::unbounded::<EpochBatch>();
    let (ack_tx, ack_rx) = crossbeam_channel::unbounded::<Ack>();
    let thread = std::thread::Builder::new()
        .name(format!("sluice-sink-{worker_index}"))
        .spawn(move || write_loop(writers, batch_rx, ack_tx, activator))
        .expect("cannot start a sink thread");

    builder.build(move |_initial| {
        let mut thread = Some(thread);
        let mut batch_tx = Some(batch_tx);
        let mut buffered: BTreeMap<u64, (Capability<u64>, EpochBatch)> = BTreeMap::new();
        let mut writing: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
        move |frontiers| {
            ans_in.for_each(|cap, data| {
                let Some(&t) = cap.least() else { return };
                let entry = buffered.entry(t).or_insert_with(|| (cap.delayed(&t, 0), EpochBatch { epoch: t, ..Default::default() }));
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
                writing.insert(t, cap);
                if let Some(tx) = &batch_tx {
                    tx.send(batch).expect("the sink thread outlives the operator");
                }
            }
            while let Ok(ack) = ack_rx.try_recv() {
                writing.remove(&ack.epoch);
                progress.answered.fetch_add(ack.answers, Ordering::Relaxed);
                progress.dead.fetch_add(ack.dead, Ordering::Relaxed);
            }
            // All input is in and durable: stop the sink thread.
            if buffered.is_empty() && writing.is_empty() && frontiers.iter().all(|f| f.frontier().is_empty()) {
                batch_tx = None;
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
        }
    });
    stream
}

fn write_loop(
    mut writers: Vec<Box<dyn SinkWriter>>,
    rx: crossbeam_channel::Receiver<EpochBatch>,
    acks: crossbeam_channel::Sender<Ack>,
    activator: timely::scheduling::SyncActivator,
) {
    let latency = metrics::histogram!(crate::metrics::END_TO_END_LATENCY);
    let answers = metrics::counter!(crate::metrics::ANSWERS);
    while let Ok(first) = rx.recv() {
        // Group commit: epochs that queued up while the last write was in flight are written
        // together, so a busy sink pays one round trip (and one transaction) for all of them.
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(b) => group.push(b),
                Err(_) => break,
            }
        }
        let (batch, epochs) = merge(group);
        for writer in writers.iter_mut() {
            write_with_retry(writer.as_mut(), &batch);
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

/// Most epochs written as one group.
const MAX_GROUP: usize = 16;

/// Concatenates epochs, oldest first, into one batch (sinks keep the latest answer per ID and the
/// latest offset per partition, so later epochs win), and returns the acknowledgement of each.
fn merge(group: Vec<EpochBatch>) -> (EpochBatch, Vec<Ack>) {
    let mut acks = Vec::with_capacity(group.len());
    let mut merged = EpochBatch::default();
    for mut b in group {
        acks.push(Ack { epoch: b.epoch, answers: b.answers.len() as u64, dead: b.dead.len() as u64 });
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

    #[test]
    fn a_group_keeps_epoch_order_and_acknowledges_every_epoch() {
        let (merged, acks) = merge(vec![batch(3, &["a", "b"], 10), batch(4, &["a"], 12), batch(7, &[], 15)]);
        let order: Vec<(&str, u64)> =
            merged.answers.iter().map(|a| (a.id.as_str(), a.ingest_ms + if let SourcePos::Generated { seq } = a.pos { seq } else { 0 })).collect();
        assert_eq!(order, vec![("a", 3), ("b", 3), ("a", 4)], "older epochs first, so the later answer for an ID wins in the sinks");
        assert_eq!(merged.offsets.last().map(|o| o.next_offset), Some(15), "the newest offset comes last");
        assert_eq!(merged.epoch, 7);
        let acked: Vec<(u64, u64)> = acks.iter().map(|a| (a.epoch, a.answers)).collect();
        assert_eq!(acked, vec![(3, 2), (4, 1), (7, 0)]);
    }
}
