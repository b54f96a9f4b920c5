//! The Kafka source, on the engine's source harness. Each timely worker owns the partitions
//! whose number is its index modulo the worker count (membership belongs to the timely cluster,
//! not to a broker rebalance), assigned manually. It resumes from the checkpoints the durable
//! sink stored with the answers (then the broker's committed offsets, then `start`), checks the
//! topic's partition count every `partition_refresh_ms` and reads new partitions from their
//! beginning, and commits offsets to the broker (for lag monitoring) once the harness says an
//! epoch is durable. A message with no value is a tombstone: a delete of its ID's answer.

use super::base_config;
use crate::record::{now_ms, DeadReason, SourcePos};
use crate::source::{Body, Checkpoint, IdFrom, Keying, Poll, RawRecord, Source, SourceError, SourceFactory};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
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
    pub fn check(&self) -> Result<(), (&'static str, String, &'static str)> {
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
    consumer: BaseConsumer,
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
}

fn transient(e: impl std::fmt::Display) -> SourceError {
    SourceError::Transient(e.to_string())
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
        let consumer: BaseConsumer = config
            .set("group.id", &f.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", if s.start == StartFrom::Latest { "latest" } else { "earliest" })
            .create()
            .map_err(|e| SourceError::Config(format!("cannot create a Kafka consumer (check source.client): {e}")))?;
        let topic: Arc<str> = s.topic.as_str().into();
        let resume: HashMap<i32, i64> =
            resume.iter().filter(|c| c.scope == *topic).filter_map(|c| Some((c.shard.parse::<i32>().ok()?, c.position.parse::<i64>().ok()?))).collect();
        let mut me = KafkaSource {
            consumer,
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
        };
        let count = me.partition_count()?;
        if count == 0 {
            return Err(transient(format!("topic {} has no partitions yet", me.topic)));
        }
        let mine: Vec<i32> = (0..count as i32).filter(|p| (*p as usize) % peers == worker).collect();
        let mut tpl = TopicPartitionList::new();
        for p in &mine {
            tpl.add_partition(&me.topic, *p);
        }
        let committed = if resume.is_empty() { me.consumer.committed_offsets(tpl, Duration::from_secs(2)).ok() } else { None };
        let mut assign = TopicPartitionList::new();
        for p in &mine {
            let offset = match resume.get(p) {
                Some(o) => Offset::Offset(*o),
                None => committed
                    .as_ref()
                    .and_then(|c| c.find_partition(&me.topic, *p))
                    .map(|e| e.offset())
                    .filter(|o| matches!(o, Offset::Offset(_)))
                    .unwrap_or(if s.start == StartFrom::Latest { Offset::End } else { Offset::Beginning }),
            };
            if let Offset::Offset(o) = offset {
                me.next.insert(*p, o);
            }
            assign.add_partition_offset(&me.topic, *p, offset).map_err(|e| SourceError::Config(format!("bad offset for partition {p}: {e}")))?;
        }
        me.consumer.assign(&assign).map_err(|e| transient(format!("cannot assign partitions: {e}")))?;
        me.owned = mine.into_iter().collect();
        me.partitions = count;
        tracing::info!(topic = %me.topic, partitions = ?me.owned, "worker {worker} owns its partitions");
        Ok(me)
    }

    fn partition_count(&self) -> Result<usize, SourceError> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(2))
            .map_err(|e| transient(format!("cannot read metadata of topic {}: {e}", self.topic)))?;
        let topic = metadata.topics().iter().find(|t| t.name() == &*self.topic).ok_or_else(|| transient(format!("topic {} not found", self.topic)))?;
        if let Some(e) = topic.error() {
            return Err(transient(format!("topic {}: {e:?}", self.topic)));
        }
        Ok(topic.partitions().len())
    }

    /// Picks up partitions added to the topic, from their beginning: whatever was produced to
    /// them before this worker saw them is a request too, whatever `start` says.
    fn refresh_partitions(&mut self) {
        self.last_refresh = Instant::now();
        let count = match self.partition_count() {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("kafka source: {e}");
                return;
            }
        };
        tracing::debug!(topic = %self.topic, count, known = self.partitions, "partition count");
        if count <= self.partitions {
            return;
        }
        let added = added_partitions(self.partitions, count, self.worker, self.peers);
        let mut tpl = TopicPartitionList::new();
        for p in &added {
            let _ = tpl.add_partition_offset(&self.topic, *p, Offset::Beginning);
        }
        if !added.is_empty() {
            if let Err(e) = self.consumer.incremental_assign(&tpl) {
                tracing::warn!("kafka source: cannot assign new partitions {added:?}: {e}; trying again later");
                return;
            }
            tracing::info!(topic = %self.topic, ?added, "worker {} reads partitions added to the topic", self.worker);
            self.owned.extend(added);
        }
        self.partitions = count;
    }

    fn header(m: &rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<Vec<u8>> {
        m.headers().and_then(|h| h.iter().find(|x| x.key == name).and_then(|x| x.value).map(|v| v.to_vec()))
    }
}

/// The partitions worker `worker` of `peers` starts reading when the topic grows from `known`
/// to `count` partitions.
pub fn added_partitions(known: usize, count: usize, worker: usize, peers: usize) -> Vec<i32> {
    (known as i32..count as i32).filter(|p| (*p as usize) % peers.max(1) == worker).collect()
}

impl Source for KafkaSource {
    fn poll(&mut self, _epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError> {
        if self.last_refresh.elapsed() >= self.refresh_every {
            self.refresh_partitions();
        }
        let now = now_ms();
        while out.len() < budget {
            let m = match self.consumer.poll(Duration::ZERO) {
                None => return Ok(Poll::Idle(Duration::from_millis(1))),
                Some(Err(e)) => {
                    tracing::debug!("kafka poll: {e}");
                    return Ok(Poll::Idle(Duration::from_millis(1)));
                }
                Some(Ok(m)) => m,
            };
            let id = match &self.id_from {
                IdFrom::Key => m.key().map(|k| k.to_vec()),
                IdFrom::Header { name } => Self::header(&m, name),
                IdFrom::Field { .. } | IdFrom::Position => None,
            };
            let (bytes, body) = match m.payload() {
                None => (Vec::new(), Body::Delete),
                Some(p) if p.len() > self.max_message_bytes => {
                    (p.to_vec(), Body::Refused(DeadReason::OversizeMessage, format!("message is {} bytes; the limit is {}", p.len(), self.max_message_bytes)))
                }
                Some(p) => (p.to_vec(), Body::Json),
            };
            self.next.insert(m.partition(), m.offset() + 1);
            out.push(RawRecord { bytes, body, pos: SourcePos::offset(self.topic.clone(), m.partition(), m.offset().max(0) as u64), id, ingest_ms: now });
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
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!("broker offset commit failed (the durable offsets are in the sink): {e}");
        }
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
