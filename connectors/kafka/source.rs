//! The Kafka source: each timely worker owns the partitions whose number is its index modulo the
//! worker count (membership belongs to the timely cluster, not to a broker rebalance). It resumes
//! from the offsets the durable sink stored with the answers, stamps records with wall-clock
//! epochs of `epoch_ms` (reading at most `epoch_records` per activation), pauses while too many
//! epochs holding data are not yet durable, and commits offsets to the broker (for lag
//! monitoring) once a probe on the sinks says an epoch is durable.

use super::{base_config, position_id, IdFrom};
use crate::json::{JsonFields, TextValue};
use crate::record::{now_ms, DeadLetter, DeadReason, Envelope, SourcePos};
use crate::tasks::Task;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::{ProbeHandle, Scope, Stream};

/// A partition's next offset to read, as stored with the answers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct SourceOffset {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// Settings of the Kafka source.
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: Arc<str>,
    pub group_id: String,
    pub id_from: IdFrom,
    pub max_message_bytes: usize,
    pub epoch_records: usize,
    pub epoch_ms: u64,
    pub max_epochs_in_flight: u64,
    /// A worker pauses while this many of its records are in epochs not yet durable.
    pub max_records_in_flight: usize,
    /// Where to start partitions with no stored and no committed offset: `earliest` or `latest`.
    pub start_latest: bool,
    /// Stop once no message has arrived for this long (benchmarks and tests); `None` runs forever.
    pub idle_exit: Option<Duration>,
    /// Offsets stored durably with the answers, by partition; they win over the broker's.
    pub resume: HashMap<i32, i64>,
    /// librdkafka properties over the defaults.
    pub client: std::collections::BTreeMap<String, String>,
}

/// Turns one message, read at `now` (ms since the Unix epoch), into a request or a dead letter.
#[allow(clippy::too_many_arguments)]
pub fn decode_message<T: Task>(
    task: &T,
    s: &KafkaSettings,
    now: u64,
    partition: i32,
    offset: i64,
    payload: Option<&[u8]>,
    key: Option<&[u8]>,
    header_id: Option<String>,
) -> Result<Envelope<T::Request>, DeadLetter> {
    let pos = SourcePos::Kafka { topic: s.topic.clone(), partition, offset };
    let raw = payload.unwrap_or_default();
    let dead = |reason, detail: String| DeadLetter { pos: pos.clone(), reason, detail, raw: raw.to_vec(), ingest_ms: now };
    if raw.len() > s.max_message_bytes {
        return Err(dead(DeadReason::OversizeMessage, format!("message is {} bytes; the limit is {}", raw.len(), s.max_message_bytes)));
    }
    let text = std::str::from_utf8(raw).map_err(|e| dead(DeadReason::InvalidUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    let obj = JsonFields::parse(text).map_err(|e| dead(DeadReason::NotJson, format!("not a JSON object: {e}")))?;
    let id = match &s.id_from {
        IdFrom::Field { name } => match obj.text(name) {
            Some(TextValue::String(v)) if !v.is_empty() => Some(v),
            Some(TextValue::Number(n)) => Some(n),
            _ => None,
        },
        IdFrom::Key => key.and_then(|k| std::str::from_utf8(k).ok()).filter(|k| !k.is_empty()).map(String::from),
        IdFrom::Header { .. } => header_id,
        IdFrom::Position => None,
    }
    .unwrap_or_else(|| position_id(&s.topic, partition, offset));
    let payload = task.decode_json(&obj).map_err(|(reason, detail)| dead(reason, detail))?;
    Ok(Envelope { id, payload, passthrough: Vec::new(), pos, ingest_ms: now })
}

/// What a worker has read that the sinks have not yet made durable: records per epoch. It bounds
/// both the number of such epochs and their records. Epochs are clock ticks, so a fast source
/// can put any number of records into one; the record bound is what keeps memory flat.
#[derive(Debug)]
pub struct InFlight {
    records: BTreeMap<u64, usize>,
    max_epochs: u64,
    max_records: usize,
}

impl InFlight {
    pub fn new(max_epochs: u64, max_records: usize) -> Self {
        InFlight { records: BTreeMap::new(), max_epochs, max_records }
    }

    /// Every epoch before `oldest` is durable.
    pub fn durable_before(&mut self, oldest: u64) {
        self.records = self.records.split_off(&oldest);
    }

    /// How many records may be read into `epoch` now; 0 means pause. Reading more into an epoch
    /// that already holds data adds no epoch, so only the record bound applies to it.
    pub fn budget(&self, epoch: u64) -> usize {
        if self.records.len() as u64 >= self.max_epochs && !self.records.contains_key(&epoch) {
            return 0;
        }
        // At most `max_epochs` entries: summing them is as cheap as keeping a counter.
        self.max_records.saturating_sub(self.records.values().sum())
    }

    pub fn add(&mut self, epoch: u64, n: usize) {
        if n > 0 {
            *self.records.entry(epoch).or_default() += n;
        }
    }

    /// Epochs holding records that are not yet durable.
    pub fn epochs(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

struct Assigned {
    consumer: BaseConsumer,
    partitions: Vec<i32>,
}

fn connect(s: &KafkaSettings, index: usize, peers: usize) -> Result<Assigned, String> {
    let mut config = base_config(&s.brokers);
    // A fetch returns as soon as there is data (fetch.min.bytes 1) or after 5 ms: latency over
    // request count. Under load the responses are large anyway.
    // Prefetch: librdkafka keeps up to `queued.min.messages` messages per partition (100,000 by
    // default) in its queue, about 375 bytes of bookkeeping each on top of the payload; with two
    // partitions per worker that was 75 MB per worker when the sinks were the bottleneck. 20,000 a
    // partition still covers a fetch round trip at full speed, and a queue that was full is
    // fetched again after 10 ms, not librdkafka's default 1 s (which emptied it first and stalled).
    // A fetch may return up to 4 MiB a partition (librdkafka's default is 1 MiB): a quarter of the
    // fetch requests under load, and Tansu lists a partition's stored batches on every fetch.
    // Measured side by side in 1M-ride drains: less CPU in the worker and the broker, and 3-23%
    // more answers a second in each of 5 pairs of runs.
    config
        .set("max.partition.fetch.bytes", "4194304")
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "20000")
        .set("fetch.queue.backoff.ms", "10")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1");
    for (k, v) in &s.client {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config
        .set("group.id", &s.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", if s.start_latest { "latest" } else { "earliest" })
        .create()
        .map_err(|e| format!("cannot create a Kafka consumer (check source.client): {e}"))?;
    let metadata = consumer.fetch_metadata(Some(&*s.topic), Duration::from_secs(2)).map_err(|e| format!("cannot read metadata of topic {}: {e}", s.topic))?;
    let topic = metadata.topics().iter().find(|t| t.name() == &*s.topic).ok_or_else(|| format!("topic {} not found", s.topic))?;
    if let Some(e) = topic.error() {
        return Err(format!("topic {}: {e:?}", s.topic));
    }
    let count = topic.partitions().len();
    if count == 0 {
        return Err(format!("topic {} has no partitions yet", s.topic));
    }
    let partitions: Vec<i32> = (0..count as i32).filter(|p| (*p as usize) % peers == index).collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(&s.topic, *p);
    }
    let committed = if s.resume.is_empty() { consumer.committed_offsets(tpl.clone(), Duration::from_secs(2)).ok() } else { None };
    let mut assign = TopicPartitionList::new();
    for p in &partitions {
        let offset = match s.resume.get(p) {
            Some(o) => Offset::Offset(*o),
            None => committed
                .as_ref()
                .and_then(|c| c.find_partition(&s.topic, *p))
                .map(|e| e.offset())
                .filter(|o| matches!(o, Offset::Offset(_)))
                .unwrap_or(if s.start_latest { Offset::End } else { Offset::Beginning }),
        };
        assign.add_partition_offset(&s.topic, *p, offset).map_err(|e| format!("bad offset for partition {p}: {e}"))?;
    }
    consumer.assign(&assign).map_err(|e| format!("cannot assign partitions: {e}"))?;
    tracing::info!(topic = %s.topic, ?partitions, "worker {index} owns its partitions");
    Ok(Assigned { consumer, partitions })
}

/// The streams a source produces: requests, dead letters, and per-epoch offsets for the sinks.
pub type SourceStreams<'s, R> = (Stream<'s, u64, Vec<Envelope<R>>>, Stream<'s, u64, Vec<DeadLetter>>, Stream<'s, u64, Vec<SourceOffset>>);

/// Builds this worker's Kafka source.
pub fn kafka_source<'s, T: Task>(
    scope: Scope<'s, u64>,
    settings: KafkaSettings,
    task: Arc<T>,
    durable: ProbeHandle<u64>,
    stop: Arc<AtomicBool>,
    progress: Arc<crate::progress::Progress>,
) -> SourceStreams<'s, T::Request> {
    let index = scope.index();
    let peers = scope.peers();
    let mut builder = OperatorBuilder::new("KafkaSource".to_owned(), scope);
    let (ok_out, ok_stream) = builder.new_output::<Vec<Envelope<T::Request>>>();
    let (dead_out, dead_stream) = builder.new_output::<Vec<DeadLetter>>();
    let (off_out, off_stream) = builder.new_output::<Vec<SourceOffset>>();
    let mut ok_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Envelope<T::Request>>>>::from(ok_out);
    let mut dead_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<DeadLetter>>>::from(dead_out);
    let mut off_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<SourceOffset>>>::from(off_out);
    let activator = scope.activator_for(builder.operator_info().address);

    builder.build(move |caps| {
        let mut caps = Some(caps);
        let mut assigned: Option<Assigned> = None;
        let mut backoff = Duration::from_millis(100);
        // Epochs are wall-clock ticks of `epoch_ms`, so every worker (and every process) advances
        // together even when its partitions are idle, and no worker holds back another's answers.
        let epoch_ms = settings.epoch_ms.max(1);
        let tick = move |now: u64| now / epoch_ms;
        let mut epoch: u64 = 0;
        let mut epoch_records = 0usize;
        let mut in_flight = InFlight::new(settings.max_epochs_in_flight, settings.max_records_in_flight);
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        let mut to_commit: BTreeMap<u64, Vec<SourceOffset>> = BTreeMap::new();
        let mut last_message = Instant::now();
        move |_frontiers| {
            let Some(cs) = caps.as_mut() else { return };
            let oldest = durable.with_frontier(|f| f.first().copied()).unwrap_or(u64::MAX);
            in_flight.durable_before(oldest);
            // Commit to the broker, for lag monitoring, what every sink has made durable.
            if let Some(a) = &assigned {
                let done: Vec<u64> = to_commit.range(..oldest).map(|(e, _)| *e).collect();
                if !done.is_empty() {
                    let mut latest: BTreeMap<i32, i64> = BTreeMap::new();
                    for e in &done {
                        for o in to_commit.remove(e).unwrap_or_default() {
                            latest.insert(o.partition, o.next_offset);
                        }
                    }
                    let mut tpl = TopicPartitionList::new();
                    for (p, o) in &latest {
                        let _ = tpl.add_partition_offset(&settings.topic, *p, Offset::Offset(*o));
                    }
                    if let Err(e) = a.consumer.commit(&tpl, CommitMode::Async) {
                        tracing::debug!("broker offset commit failed (the durable offsets are in the sink): {e}");
                    }
                }
            }
            // Close the open epoch when the clock has moved on: its offsets travel with its answers.
            let now_tick = tick(now_ms());
            let stopping =
                stop.load(Ordering::Relaxed) || settings.idle_exit.is_some_and(|d| last_message.elapsed() >= d && in_flight.is_empty() && epoch_records == 0);
            if epoch_records > 0 && (now_tick > epoch || stopping) {
                let offsets: Vec<SourceOffset> =
                    next.iter().map(|(p, o)| SourceOffset { topic: settings.topic.to_string(), partition: *p, next_offset: *o }).collect();
                off_out.activate().session(&cs[2]).give_iterator(offsets.clone().into_iter());
                to_commit.insert(epoch, offsets);
                epoch_records = 0;
            }
            if stopping {
                // Dropping the capabilities lets downstream drain; the sinks commit and the worker exits.
                caps = None;
                return;
            }
            if now_tick > epoch {
                epoch = now_tick;
                for c in cs.iter_mut() {
                    c.downgrade(&epoch);
                }
            }
            if assigned.is_none() {
                match connect(&settings, index, peers) {
                    Ok(a) => {
                        for p in &a.partitions {
                            if let Some(o) = settings.resume.get(p) {
                                next.insert(*p, *o);
                            }
                        }
                        assigned = Some(a);
                        backoff = Duration::from_millis(100);
                        last_message = Instant::now();
                    }
                    Err(e) => {
                        tracing::warn!("kafka source: {e}; retrying in {backoff:?}");
                        activator.activate_after(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        return;
                    }
                }
            }
            let a = assigned.as_ref().expect("assigned");
            metrics::gauge!(crate::metrics::EPOCHS_IN_FLIGHT).set(in_flight.epochs() as f64);
            let budget = in_flight.budget(epoch).min(settings.epoch_records);
            if budget == 0 {
                // Backpressure: leave messages in the consumer's bounded queue.
                activator.activate_after(Duration::from_millis(1));
                return;
            }
            let mut ok = ok_out.activate();
            let mut dead = dead_out.activate();
            let mut ok_session = ok.session(&cs[0]);
            let mut dead_session = dead.session(&cs[1]);
            let mut read = 0u64;
            let mut drained = false;
            let now = now_ms();
            while (read as usize) < budget {
                match a.consumer.poll(Duration::ZERO) {
                    None => {
                        drained = true;
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::debug!("kafka poll: {e}");
                        drained = true;
                        break;
                    }
                    Some(Ok(m)) => {
                        let header_id = match &settings.id_from {
                            IdFrom::Header { name } => m.headers().and_then(|h| {
                                h.iter().find(|x| x.key == name).and_then(|x| x.value).and_then(|v| std::str::from_utf8(v).ok()).map(String::from)
                            }),
                            _ => None,
                        };
                        match decode_message(task.as_ref(), &settings, now, m.partition(), m.offset(), m.payload(), m.key(), header_id) {
                            Ok(env) => ok_session.give(env),
                            Err(d) => dead_session.give(d),
                        }
                        next.insert(m.partition(), m.offset() + 1);
                        read += 1;
                    }
                }
            }
            drop(ok_session);
            drop(dead_session);
            if read > 0 {
                epoch_records += read as usize;
                in_flight.add(epoch, read as usize);
                last_message = Instant::now();
                progress.read.fetch_add(read, Ordering::Relaxed);
                metrics::counter!(crate::metrics::SOURCE_RECORDS, "connector" => "kafka").increment(read);
            }
            if drained {
                activator.activate_after(Duration::from_millis(1));
            } else {
                activator.activate();
            }
        }
    });
    (ok_stream, dead_stream, off_stream)
}

#[cfg(test)]
mod tests {
    use super::InFlight;

    #[test]
    fn in_flight_bounds_epochs_and_records() {
        let mut f = InFlight::new(2, 100);
        assert_eq!(f.budget(1), 100, "nothing in flight");
        f.add(1, 60);
        assert_eq!(f.budget(1), 40, "the open epoch may take what is left of the record bound");
        f.add(2, 30);
        assert_eq!(f.budget(3), 0, "a third epoch would exceed the epoch bound");
        assert_eq!(f.budget(2), 10, "the open epoch holds data already, so it adds no epoch");
        f.add(2, 10);
        assert_eq!(f.budget(2), 0, "the record bound is reached");
        f.durable_before(2);
        assert_eq!(f.epochs(), 1);
        assert_eq!(f.budget(3), 60, "epoch 1's 60 records are durable");
        f.add(3, 0);
        assert_eq!(f.epochs(), 1, "an epoch with no records is not in flight");
        f.durable_before(u64::MAX);
        assert!(f.is_empty());
        assert_eq!(f.budget(9), 100);
    }
}
