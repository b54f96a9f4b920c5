//! The Kafka source, on the engine's source harness. Each timely worker owns the partitions
//! whose number is its index modulo the worker count (membership belongs to the timely cluster,
//! not to a broker rebalance), assigned manually. It resumes from the checkpoints the durable
//! sink stored with the answers (then the broker's committed offsets, then `start`), checks the
//! topic's partition count every `partition_refresh_ms` and reads new partitions from their
//! beginning, and commits offsets to the broker (for lag monitoring) once the harness says an
//! epoch is durable. A message with no value is a tombstone: a delete of its ID's answer.
//! In a resumed run (the sink holds checkpoints for the topic), a partition without one had no
//! traffic in the runs before: it is read from its beginning, whatever `start` says, so what
//! arrived on it while sluice was down is answered.
//!
//! Consumer errors are counted (`sluice_source_errors_total`, by `connector` and `kind`) and
//! logged at `warn`, one line every few seconds at most. Refused authorization stops the run
//! with the cause at once, and so does a topic that does not exist (it was deleted, or never
//! made) for longer than `missing_topic_grace_ms`.

use super::base_config;
use super::fetch::{FetchQueue, Fetched};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use sluice_core::connector::{ConfigError, SourceConnector};
use sluice_core::record::{now_ms, DeadReason, SourcePos};
use sluice_core::source::{Body, Checkpoint, IdFrom, Keying, Poll, RawRecord, Source, SourceError, SourceFactory};
use sluice_core::topology::RuntimeConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `[source] type = "kafka"`: partitions are owned by timely workers (partition % workers == worker index).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, e.g. `127.0.0.1:19092`. `${VAR}` is read from the environment.
    pub brokers: String,
    /// Topic of requests.
    pub topic: String,
    /// Consumer group the offsets are committed under (for lag monitoring only); defaults to `sluice-<name>`.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Where the request ID comes from: `{ from = "field", name = "request_id" }`, `{ from = "key" }`,
    /// `{ from = "header", name = "..." }` or `{ from = "position" }`. Without one it is topic/partition/offset.
    #[serde(default)]
    pub id: IdFrom,
    /// A larger message is a dead letter (`oversize_message`).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Close an epoch after this many milliseconds.
    #[serde(default = "default_epoch_ms")]
    pub epoch_ms: u64,
    /// Where partitions with no stored offset start: `earliest` or `latest`. Partitions added
    /// while sluice runs are always read from their beginning.
    #[serde(default)]
    pub start: StartFrom,
    /// Stop after this long with no new message (benchmarks, tests); omit to run forever.
    #[serde(default)]
    pub idle_exit_ms: Option<u64>,
    /// How often to look for partitions added to the topic.
    #[serde(default = "default_partition_refresh_ms")]
    pub partition_refresh_ms: u64,
    /// librdkafka consumer properties applied over sluice's defaults, e.g.
    /// `client = { "fetch.wait.max.ms" = "5" }`. Assignment, offsets and commits stay sluice's.
    #[serde(default)]
    pub client: BTreeMap<String, String>,
    /// How long the topic may be missing (not yet made, or deleted while sluice runs) before the
    /// run stops with that cause, in milliseconds; default 60,000. It is looked for at start and
    /// every `partition_refresh_ms`.
    #[serde(default = "default_missing_topic_grace_ms")]
    pub missing_topic_grace_ms: u64,
}

fn default_missing_topic_grace_ms() -> u64 {
    60_000
}

/// Where a partition without a stored offset starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

fn default_max_message_bytes() -> usize {
    65_536
}
fn default_epoch_ms() -> u64 {
    50
}
fn default_partition_refresh_ms() -> u64 {
    5_000
}

impl KafkaSourceConfig {
    /// Refuses settings that cannot work: `(field, message, hint)`.
    fn check_fields(&self) -> Result<(), (&'static str, String, &'static str)> {
        if self.brokers.is_empty() {
            return Err(("source.brokers", "is empty".into(), "use host:port of a broker, e.g. 127.0.0.1:19092"));
        }
        if self.topic.is_empty() {
            return Err(("source.topic", "is empty".into(), "name the requests topic, e.g. rides"));
        }
        if self.max_message_bytes == 0 {
            return Err(("source.max_message_bytes", "must be at least 1".into(), "use e.g. 65536"));
        }
        if self.epoch_ms == 0 {
            return Err(("source.epoch_ms", "must be at least 1".into(), "use e.g. 50"));
        }
        if self.partition_refresh_ms == 0 {
            return Err(("source.partition_refresh_ms", "must be at least 1".into(), "use e.g. 5000"));
        }
        Ok(())
    }
}

/// Builds each worker's Kafka source.
pub struct KafkaFactory {
    pub config: KafkaSourceConfig,
    /// Brokers with `${VAR}` expanded.
    pub brokers: String,
    pub group_id: String,
    /// Since when the workers found the topic missing at start, across their retries.
    pub missing_since: std::sync::Mutex<Option<Instant>>,
}

impl SourceFactory for KafkaFactory {
    fn kind(&self) -> &'static str {
        "kafka"
    }
    fn build(&self, worker: usize, peers: usize, resume: &[Checkpoint]) -> Result<Box<dyn Source>, SourceError> {
        Ok(Box::new(KafkaSource::connect(self, worker, peers, resume)?))
    }
    fn resumable(&self) -> bool {
        true
    }
    fn keying(&self) -> Keying {
        Keying::Stream
    }
    fn epoch_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(self.config.epoch_ms.max(1)))
    }
    fn idle_exit(&self) -> Option<Duration> {
        self.config.idle_exit_ms.map(Duration::from_millis)
    }
    fn id_from(&self) -> IdFrom {
        self.config.id.clone()
    }
    fn describe(&self) -> String {
        format!("kafka topic {}", self.config.topic)
    }
}

/// One worker's share of the topic.
pub struct KafkaSource {
    /// The consumer, with the queue its partitions' messages are read from in batches.
    fetch: FetchQueue,
    /// A client of its own for the topic's metadata: on its own connections, a metadata request
    /// never waits behind the consumer's fetches (Tansu holds a fetch of a deleted topic open,
    /// and the consumer's metadata requests on that connection with it).
    metadata: BaseConsumer,
    topic: Arc<str>,
    worker: usize,
    peers: usize,
    id_from: IdFrom,
    max_message_bytes: usize,
    /// Partitions this worker reads.
    owned: BTreeSet<i32>,
    /// The partition count last seen.
    partitions: usize,
    refresh_every: Duration,
    last_refresh: Instant,
    /// Next offset to read, by partition.
    next: BTreeMap<i32, i64>,
    /// Offsets each closed epoch reached, to commit to the broker once durable.
    to_commit: BTreeMap<u64, Vec<(i32, i64)>>,
    /// How long the topic may be missing, and since when it is.
    missing_grace: Duration,
    missing_since: Option<Instant>,
    /// Consumer errors are logged once per [`ERROR_LOG_EVERY`]: when the last line was, and how
    /// many errors came since.
    last_error_log: Option<Instant>,
    errors_unlogged: u64,
}

/// At most one log line of consumer errors this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(5);

fn transient(e: impl std::fmt::Display) -> SourceError {
    SourceError::Transient(e.to_string())
}

/// The `kind` label of a consumer error, and whether it stops the run at once.
fn error_kind(code: Option<rdkafka::types::RDKafkaErrorCode>) -> (&'static str, bool) {
    use rdkafka::types::RDKafkaErrorCode as C;
    match code {
        Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed | C::SaslAuthenticationFailed | C::Authentication) => ("authorization", true),
        Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => ("unknown_topic", false),
        Some(C::BrokerTransportFailure | C::AllBrokersDown | C::Resolve | C::OperationTimedOut | C::RequestTimedOut | C::NetworkException) => ("broker", false),
        _ => ("other", false),
    }
}

/// What the metadata says of the topic.
enum TopicState {
    Partitions(usize),
    Missing,
}

impl KafkaSource {
    fn connect(f: &KafkaFactory, worker: usize, peers: usize, resume: &[Checkpoint]) -> Result<Self, SourceError> {
        let s = &f.config;
        let mut config = base_config(&f.brokers);
        // A fetch returns as soon as there is data (fetch.min.bytes 1) or after 5 ms: latency over
        // request count. Under load the responses are large anyway.
        // Prefetch: librdkafka keeps up to `queued.min.messages` messages per partition (100,000 by
        // default) in its queue, about 375 bytes of bookkeeping each on top of the payload; with two
        // partitions per worker that was 75 MB per worker when the sinks were the bottleneck. 20,000 a
        // partition still covers a fetch round trip at full speed, and a queue that was full is
        // fetched again after 10 ms, not librdkafka's default 1 s (which emptied it first and stalled).
        // A fetch may return up to 4 MiB a partition (librdkafka's default is 1 MiB): a quarter of the
        // fetch requests under load, and Tansu lists a partition's stored batches on every fetch.
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
        config.set("group.id", &f.group_id);
        let metadata: BaseConsumer = config.create().map_err(|e| SourceError::Config(format!("cannot create a Kafka client (check source.client): {e}")))?;
        let consumer: BaseConsumer = config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", if s.start == StartFrom::Latest { "latest" } else { "earliest" })
            .create()
            .map_err(|e| SourceError::Config(format!("cannot create a Kafka consumer (check source.client): {e}")))?;
        let topic: Arc<str> = s.topic.as_str().into();
        let resume: HashMap<i32, i64> =
            resume.iter().filter(|c| c.scope == *topic).filter_map(|c| Some((c.shard.parse::<i32>().ok()?, c.position.parse::<i64>().ok()?))).collect();
        let mut me = KafkaSource {
            fetch: FetchQueue::new(consumer),
            metadata,
            topic,
            worker,
            peers,
            id_from: s.id.clone(),
            max_message_bytes: s.max_message_bytes,
            owned: BTreeSet::new(),
            partitions: 0,
            refresh_every: Duration::from_millis(s.partition_refresh_ms),
            last_refresh: Instant::now(),
            next: BTreeMap::new(),
            to_commit: BTreeMap::new(),
            missing_grace: Duration::from_millis(s.missing_topic_grace_ms),
            missing_since: None,
            last_error_log: None,
            errors_unlogged: 0,
        };
        let count = match me.topic_state()? {
            TopicState::Partitions(n) => {
                *f.missing_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
                n
            }
            TopicState::Missing => {
                let since = *f.missing_since.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Instant::now);
                if since.elapsed() >= me.missing_grace {
                    return Err(missing_error(&me.topic, since));
                }
                return Err(transient(format!("topic {} does not exist (yet)", me.topic)));
            }
        };
        if count == 0 {
            return Err(transient(format!("topic {} has no partitions yet", me.topic)));
        }
        let mine: Vec<i32> = (0..count as i32).filter(|p| (*p as usize) % peers == worker).collect();
        let mut tpl = TopicPartitionList::new();
        for p in &mine {
            tpl.add_partition(&me.topic, *p);
        }
        // A resumed run: a partition without a checkpoint had no traffic in the runs before, so
        // all it holds arrived since they began (or was skipped by a first run's `latest`):
        // it is read from its beginning, else what arrived on it while sluice was down is lost.
        let resumed = !resume.is_empty();
        let committed = if resumed { None } else { me.fetch.consumer().committed_offsets(tpl, Duration::from_secs(2)).ok() };
        let mut assign = TopicPartitionList::new();
        for p in &mine {
            let offset = match resume.get(p) {
                Some(o) => Offset::Offset(*o),
                None => committed
                    .as_ref()
                    .and_then(|c| c.find_partition(&me.topic, *p))
                    .map(|e| e.offset())
                    .filter(|o| matches!(o, Offset::Offset(_)))
                    .unwrap_or(if s.start == StartFrom::Latest && !resumed { Offset::End } else { Offset::Beginning }),
            };
            if let Offset::Offset(o) = offset {
                me.next.insert(*p, o);
            }
            assign.add_partition_offset(&me.topic, *p, offset).map_err(|e| SourceError::Config(format!("bad offset for partition {p}: {e}")))?;
        }
        for p in &mine {
            me.fetch.take(&me.topic, *p).map_err(transient)?;
        }
        me.fetch.consumer().assign(&assign).map_err(|e| transient(format!("cannot assign partitions: {e}")))?;
        me.owned = mine.into_iter().collect();
        me.partitions = count;
        tracing::info!(topic = %me.topic, partitions = ?me.owned, "worker {worker} owns its partitions");
        Ok(me)
    }

    /// The topic's partition count, or that it does not exist. Refused authorization is a
    /// configuration error.
    fn topic_state(&self) -> Result<TopicState, SourceError> {
        let metadata = self
            .metadata
            .fetch_metadata(Some(&self.topic), Duration::from_secs(2))
            .map_err(|e| transient(format!("cannot read metadata of topic {}: {e}", self.topic)))?;
        let Some(topic) = metadata.topics().iter().find(|t| t.name() == &*self.topic) else {
            return Ok(TopicState::Missing);
        };
        if let Some(e) = topic.error() {
            let code = rdkafka::types::RDKafkaErrorCode::from(e);
            return match error_kind(Some(code)) {
                (_, true) => Err(SourceError::Config(format!("topic {}: {code}", self.topic))),
                ("unknown_topic", _) => Ok(TopicState::Missing),
                _ => Err(transient(format!("topic {}: {code}", self.topic))),
            };
        }
        Ok(TopicState::Partitions(topic.partitions().len()))
    }

    /// Notes that the topic is missing; an error once it has been for longer than the grace.
    fn topic_missing(&mut self) -> Result<(), SourceError> {
        let since = *self.missing_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.missing_grace {
            return Err(missing_error(&self.topic, since));
        }
        Ok(())
    }

    /// Counts a consumer error, logs it (at most once per [`ERROR_LOG_EVERY`]), and says whether
    /// the run must stop.
    fn consumer_error(&mut self, code: Option<rdkafka::types::RDKafkaErrorCode>, e: &str) -> Result<(), SourceError> {
        let (kind, fatal) = error_kind(code);
        metrics::counter!(sluice_core::metrics::SOURCE_ERRORS, "connector" => "kafka", "kind" => kind).increment(1);
        self.errors_unlogged += 1;
        if self.last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
            tracing::warn!(topic = %self.topic, kind, "kafka source: consumer error: {e} ({} since the last report)", self.errors_unlogged);
            self.last_error_log = Some(Instant::now());
            self.errors_unlogged = 0;
        }
        if fatal {
            return Err(SourceError::Config(format!("topic {}: {e}", self.topic)));
        }
        if kind == "unknown_topic" {
            return self.topic_missing();
        }
        Ok(())
    }

    /// Picks up partitions added to the topic, from their beginning: whatever was produced to
    /// them before this worker saw them is a request too, whatever `start` says. Notes a topic
    /// that went missing.
    fn refresh_partitions(&mut self) -> Result<(), SourceError> {
        self.last_refresh = Instant::now();
        let count = match self.topic_state() {
            Ok(TopicState::Partitions(c)) => {
                self.missing_since = None;
                c
            }
            Ok(TopicState::Missing) => {
                metrics::counter!(sluice_core::metrics::SOURCE_ERRORS, "connector" => "kafka", "kind" => "unknown_topic").increment(1);
                if self.last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
                    tracing::warn!(topic = %self.topic, "kafka source: the topic does not exist (any more)");
                    self.last_error_log = Some(Instant::now());
                }
                return self.topic_missing();
            }
            Err(SourceError::Config(e)) => return Err(SourceError::Config(e)),
            Err(e) => {
                tracing::debug!("kafka source: {e}");
                return Ok(());
            }
        };
        tracing::debug!(topic = %self.topic, count, known = self.partitions, "partition count");
        if count <= self.partitions {
            return Ok(());
        }
        let added = added_partitions(self.partitions, count, self.worker, self.peers);
        let mut tpl = TopicPartitionList::new();
        for p in &added {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Beginning);
        }
        if !added.is_empty() {
            for p in &added {
                if let Err(e) = self.fetch.take(&self.topic, *p) {
                    tracing::warn!("kafka source: {e}; trying again later");
                    return Ok(());
                }
            }
            if let Err(e) = self.fetch.consumer().incremental_assign(&tpl) {
                tracing::warn!("kafka source: cannot assign new partitions {added:?}: {e}; trying again later");
                return Ok(());
            }
            tracing::info!(topic = %self.topic, ?added, "worker {} reads partitions added to the topic", self.worker);
            self.owned.extend(added);
        }
        self.partitions = count;
        Ok(())
    }

    fn header(m: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<Vec<u8>> {
        m.headers().and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value).map(|v| v.to_vec()))
    }
}

/// Most messages taken from librdkafka in one batch.
const FETCH_BATCH: usize = 1024;

/// A fetched message as the harness takes it.
#[allow(clippy::too_many_arguments)]
fn raw_record(
    topic: &Arc<str>,
    id_from: &IdFrom,
    max_message_bytes: usize,
    partition: i32,
    offset: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    header: impl FnOnce(&str) -> Option<Vec<u8>>,
    ingest_ms: u64,
) -> RawRecord {
    let id = match id_from {
        IdFrom::Key => key.map(|k| k.to_vec()),
        IdFrom::Header { name } => header(name),
        IdFrom::Field { .. } | IdFrom::Position => None,
    };
    let (bytes, body) = match payload {
        None => (Vec::new(), Body::Delete),
        Some(p) if p.len() > max_message_bytes => {
            (p.to_vec(), Body::Refused(DeadReason::OversizeMessage, format!("message is {} bytes; the limit is {max_message_bytes}", p.len())))
        }
        Some(p) => (p.to_vec(), Body::Json),
    };
    RawRecord { bytes, body, pos: SourcePos::offset(topic.clone(), partition, offset.max(0) as u64), id, ingest_ms }
}

fn missing_error(topic: &str, since: Instant) -> SourceError {
    SourceError::Config(format!(
        "topic {topic} does not exist (missing for {:.0} s, longer than source.missing_topic_grace_ms); create it or fix source.topic",
        since.elapsed().as_secs_f64()
    ))
}

/// The partitions worker `worker` of `peers` starts reading when the topic grows from `known`
/// to `count` partitions.
pub fn added_partitions(known: usize, count: usize, worker: usize, peers: usize) -> Vec<i32> {
    (known as i32..count as i32).filter(|p| (*p as usize) % peers.max(1) == worker).collect()
}

impl Source for KafkaSource {
    fn poll(&mut self, _epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError> {
        if self.last_refresh.elapsed() >= self.refresh_every {
            self.refresh_partitions()?;
        }
        let now = now_ms();
        // The consumer's own queue: client errors, and a message that was fetched before its
        // partition's queue was forwarded.
        match self.fetch.consumer().poll(Duration::ZERO) {
            None => {}
            Some(Err(e)) => self.consumer_error(e.rdkafka_error_code(), &e.to_string())?,
            Some(Ok(m)) => {
                self.next.insert(m.partition(), m.offset() + 1);
                let header = |name: &str| Self::header(&m, name);
                out.push(raw_record(&self.topic, &self.id_from, self.max_message_bytes, m.partition(), m.offset(), m.key(), m.payload(), header, now));
            }
        }
        let mut errors = Vec::new();
        while out.len() < budget {
            let room = (budget - out.len()).min(FETCH_BATCH);
            let KafkaSource { fetch, topic, id_from, max_message_bytes, next, .. } = self;
            let read = fetch.read(room, |item| match item {
                Fetched::Message(m) => {
                    next.insert(m.partition, m.offset + 1);
                    let header = |name: &str| m.header(name).map(<[u8]>::to_vec);
                    out.push(raw_record(topic, id_from, *max_message_bytes, m.partition, m.offset, m.key, m.payload, header, now));
                }
                Fetched::Error { code, partition, text } => errors.push((code, format!("partition {partition}: {text}"))),
            });
            for (code, text) in errors.drain(..) {
                self.consumer_error(Some(code), &text)?;
            }
            if read < room {
                return Ok(Poll::Idle(Duration::from_millis(1)));
            }
        }
        Ok(Poll::More)
    }

    fn checkpoint(&mut self, epoch: u64) -> Vec<Checkpoint> {
        let reached: Vec<(i32, i64)> = self.next.iter().map(|(p, o)| (*p, *o)).collect();
        let checkpoints = reached.iter().map(|(p, o)| Checkpoint { scope: self.topic.to_string(), shard: p.to_string(), position: o.to_string() }).collect();
        self.to_commit.insert(epoch, reached);
        checkpoints
    }

    fn durable(&mut self, before: u64) {
        let done: Vec<u64> = self.to_commit.range(..before).map(|(e, _)| *e).collect();
        if done.is_empty() {
            return;
        }
        let mut latest: BTreeMap<i32, i64> = BTreeMap::new();
        for e in done {
            for (p, o) in self.to_commit.remove(&e).unwrap_or_default() {
                latest.insert(p, o);
            }
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &latest {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o));
        }
        if let Err(e) = self.fetch.consumer().commit(&tpl, CommitMode::Async) {
            tracing::debug!("broker offset commit failed (the durable offsets are in the sink): {e}");
        }
    }
}

impl SourceConnector for KafkaSourceConfig {
    const TYPE: &'static str = "kafka";
    const ABOUT: &'static str = "Kafka: partitions owned by timely workers (partition % workers == worker index)";
    fn check(&self) -> Result<(), ConfigError> {
        self.check_fields().map_err(ConfigError::from)
    }
    fn bounded(&self) -> bool {
        false
    }
    fn factory(&self, pipeline: &str, _runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError> {
        Ok(Arc::new(KafkaFactory {
            config: self.clone(),
            brokers: sluice_core::topology::expand_env(&self.brokers),
            group_id: self.group_id.clone().unwrap_or_else(|| format!("sluice-{pipeline}")),
            missing_since: Default::default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::added_partitions;

    #[test]
    fn partitions_added_to_a_topic_go_to_the_worker_that_owns_their_number() {
        assert_eq!(added_partitions(1, 3, 0, 2), vec![2]);
        assert_eq!(added_partitions(1, 3, 1, 2), vec![1]);
        assert_eq!(added_partitions(3, 3, 0, 2), Vec::<i32>::new(), "no growth, nothing new");
        assert_eq!(added_partitions(0, 4, 0, 1), vec![0, 1, 2, 3]);
    }
}
