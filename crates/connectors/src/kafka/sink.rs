//! The Kafka results sink: every answer goes to the results topic keyed by its request ID (and,
//! with `id_header = true`, in a `request_id` header too), through an idempotent producer. An epoch counts as
//! written only when every message is acknowledged; otherwise the whole epoch is sent again, so
//! the topic is at-least-once and a duplicate carries the same ID. Dead letters go to their own
//! topic with the reason in a header and the original bytes as the payload. A delete is a
//! tombstone: the ID as key (and header) and no value, which log compaction also honours.
//! Failures are classified by their error code ([`classify_delivery`]): a message the producer
//! or the broker refuses (too large, an invalid or corrupt record, one a broker's schema refuses)
//! is the record's fault: it is isolated and dead-lettered while the rest of the epoch is
//! written. A topic that does not exist once the producer gave up on it, an invalid topic name
//! or a refused authorization stop the run with the cause. A fenced or failed producer is built
//! again; everything else is retried with backoff.

use super::{base_config, ID_HEADER};
use crate::error::ConnectorError;
use crate::results::ResultJson;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::Deserialize;
use sluice_core::connector::{ConfigError, SinkConnector};
use sluice_core::record::{Change, Column};
use sluice_core::sink::{EpochBatch, SinkContext, SinkError, SinkFactory, SinkWriter};
use sluice_core::source::Checkpoint;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The producer's context: it keeps the failures of the messages the producer gave up on. Only
/// failures are reported (`delivery.report.only.error`): a successful message is freed by
/// librdkafka's broker thread as soon as it is acknowledged, with no report to hand to a polling
/// thread (that path was 5% of the worker's CPU in a profile of a drain).
#[derive(Default, Clone)]
pub struct DeliveryErrors {
    failed: Arc<Mutex<Failures>>,
}

/// The delivery failures since the last write began: how many, and the first of each class.
#[derive(Default, Debug)]
struct Failures {
    count: u64,
    first: BTreeMap<DeliveryClass, String>,
}

impl ClientContext for DeliveryErrors {}

impl ProducerContext for DeliveryErrors {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            tracing::debug!("kafka delivery failed: {e}");
            let class = e.rdkafka_error_code().map(classify_delivery).unwrap_or(DeliveryClass::Transient);
            let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            f.count += 1;
            f.first.entry(class).or_insert_with(|| format!("{}: {e} ({} bytes)", m.topic(), m.payload().map(|p| p.len()).unwrap_or(0)));
        }
    }
}

/// What a failed delivery (or send) says about what helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeliveryClass {
    /// The message itself is refused (too large, invalid, corrupt): dead-letter it.
    Record,
    /// Broker or network trouble, a timeout: send the epoch again after a backoff.
    Transient,
    /// The producer was fenced or failed fatally: build a new one, then send again.
    Rebuild,
    /// The topic does not exist (after the producer waited for it), its name is invalid, or
    /// access is refused: no retry can succeed.
    Config,
}

/// Classifies a producer error code.
pub fn classify_delivery(code: RDKafkaErrorCode) -> DeliveryClass {
    use RDKafkaErrorCode as C;
    match code {
        // InvalidMessage is also Kafka's CORRUPT_MESSAGE (code 2); BadMessage is librdkafka's own.
        C::MessageSizeTooLarge | C::InvalidRecord | C::InvalidMessage | C::InvalidMessageSize | C::BadMessage => DeliveryClass::Record,
        // A delivery report of an unknown topic comes only once the producer has given up
        // waiting for it (`topic.metadata.propagation.max.ms`).
        C::UnknownTopicOrPartition | C::UnknownTopic | C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed | C::InvalidTopic => DeliveryClass::Config,
        C::ProducerFenced | C::Fatal => DeliveryClass::Rebuild,
        _ => DeliveryClass::Transient,
    }
}

/// Waits until `pending()` is 0: it checks again after 50 µs, then after twice as long each time,
/// up to 1 ms between checks. `Err` holds what is still pending at the timeout.
fn wait_drained(pending: impl Fn() -> u64, timeout: Duration) -> Result<(), u64> {
    let started = Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        let left = pending();
        if left == 0 {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(left);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// `[[sinks]] type = "kafka"`: answers keyed by request ID; at-least-once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers. `${VAR}` is read from the environment.
    pub brokers: String,
    /// Results topic.
    pub topic: String,
    /// Dead-letter topic; omit to keep dead letters in the other sinks only.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Use Kafka's idempotent producer.
    #[serde(default = "default_true")]
    pub idempotent: bool,
    /// Also put the request ID in a `request_id` header of every answer and tombstone (the key
    /// always holds it). Off by default: the header is a copy of the key, and librdkafka
    /// allocates, writes and frees it per message, which was an eighth of the worker's CPU in a
    /// profile of the ride drain (docs/benchmarks.md).
    #[serde(default)]
    pub id_header: bool,
    /// librdkafka producer properties applied over sluice's defaults, e.g. `client = { "linger.ms" = "5" }`.
    #[serde(default)]
    pub client: std::collections::BTreeMap<String, String>,
}

fn default_true() -> bool {
    true
}

impl SinkFactory for KafkaSinkConfig {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn describe(&self) -> String {
        format!("kafka topic {}{}", self.topic, self.dead_letter_topic.as_ref().map(|d| format!(" (dead letters in {d})")).unwrap_or_default())
    }

    fn open(&self, _ctx: &SinkContext) -> Result<Option<Vec<Checkpoint>>, SinkError> {
        Ok(None)
    }

    fn writer(&self, ctx: &SinkContext, _worker: usize) -> Result<Box<dyn SinkWriter>, SinkError> {
        let brokers = sluice_core::topology::expand_env(&self.brokers);
        let mut w = KafkaWriter::new(&brokers, &self.topic, self.dead_letter_topic.as_deref(), self.idempotent, &self.client, ctx.columns)?;
        w.id_header = self.id_header;
        Ok(Box::new(w))
    }
}

/// Writes answers and dead letters to Kafka topics.
pub struct KafkaWriter {
    producer: ThreadedProducer<DeliveryErrors>,
    /// The producer's settings, to build it again after it was fenced or failed fatally.
    config: rdkafka::ClientConfig,
    deliveries: DeliveryErrors,
    topic: String,
    dead_letter_topic: Option<String>,
    json: ResultJson,
    /// Put the request ID in a `request_id` header as well as in the key.
    pub id_header: bool,
}

impl KafkaWriter {
    /// A producer for `topic` (and `dead_letter_topic`); `idempotent` turns on Kafka's idempotent producer.
    /// Settings librdkafka refuses are a configuration error.
    pub fn new(
        brokers: &str,
        topic: &str,
        dead_letter_topic: Option<&str>,
        idempotent: bool,
        client: &std::collections::BTreeMap<String, String>,
        columns: &'static [Column],
    ) -> Result<Self, ConnectorError> {
        let deliveries = DeliveryErrors::default();
        let mut config = base_config(brokers);
        // A short linger lets librdkafka pack an epoch into few produce requests (0 sends one
        // request per message, measured 2x slower on Tansu); the write then awaits the acks.
        // LZ4 on the answers' JSON: measured side by side on the 1M-ride drain, the broker's CPU
        // halved and the worker's fell (fewer bytes to copy into requests and sockets) for the
        // cost of compressing (docs/benchmarks.md).
        config
            .set("compression.type", "lz4")
            .set("linger.ms", "1")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "30000")
            .set("delivery.report.only.error", "true");
        for (k, v) in client {
            config.set(k, v);
        }
        config.set("enable.idempotence", if idempotent { "true" } else { "false" }).set("acks", "all");
        let producer: ThreadedProducer<DeliveryErrors> = config
            .create_with_context(deliveries.clone())
            .map_err(|e| ConnectorError::config(format!("cannot create a Kafka producer (check sinks.client): {e}")))?;
        // Connect now: the idempotent producer asks for its producer ID on a 500 ms timer once a
        // broker connection is up, so connecting at start-up rather than at the first write saves
        // a timer round (measured: the first write waited about 1 s for its ID). A broker that is
        // down is not an error here; the writes retry.
        if let Err(e) = producer.client().fetch_metadata(Some(topic), Duration::from_secs(1)) {
            tracing::debug!("kafka sink: no metadata yet for {topic}: {e}");
        }
        Ok(KafkaWriter {
            producer,
            config,
            deliveries,
            topic: topic.to_string(),
            dead_letter_topic: dead_letter_topic.map(String::from),
            json: ResultJson::new(columns),
            id_header: false,
        })
    }

    /// Hands one message (`None`: a tombstone) to the producer, waiting while its queue is full.
    fn send(&self, topic: &str, key: &[u8], payload: Option<&[u8]>, headers: Option<OwnedHeaders>) -> Result<(), SinkError> {
        let mut record = BaseRecord::to(topic).key(key);
        if let Some(h) = headers {
            record = record.headers(h);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    let class = e.rdkafka_error_code().map(classify_delivery).unwrap_or(DeliveryClass::Transient);
                    let what = format!("{topic}: {e} ({} bytes)", payload.map(|p| p.len()).unwrap_or(0));
                    return Err(match class {
                        DeliveryClass::Record => SinkError::Record(what),
                        DeliveryClass::Config => SinkError::Config(format!("cannot produce to {what}")),
                        DeliveryClass::Transient | DeliveryClass::Rebuild => SinkError::Transient(format!("cannot produce to {what}")),
                    });
                }
            }
        }
    }

    /// Sends the changes, then the dead letters.
    fn send_all(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        let mut buf = Vec::with_capacity(256);
        for c in &batch.changes {
            let id = c.id();
            let headers = self.id_header.then(|| OwnedHeaders::new_with_capacity(1).insert(Header { key: ID_HEADER, value: Some(id.as_bytes()) }));
            match c {
                Change::Upsert(a) => {
                    buf.clear();
                    self.json.write(&mut buf, a);
                    self.send(&self.topic, id.as_bytes(), Some(&buf), headers)?;
                }
                Change::Delete(_) => self.send(&self.topic, id.as_bytes(), None, headers)?,
            }
        }
        if let Some(dead_topic) = &self.dead_letter_topic {
            for d in &batch.dead {
                let position = d.pos.to_string();
                let raw_len = d.raw_len.to_string();
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "reason", value: Some(d.reason.as_str().as_bytes()) })
                    .insert(Header { key: "detail", value: Some(d.detail.as_bytes()) })
                    .insert(Header { key: "source", value: Some(position.as_bytes()) })
                    .insert(Header { key: "raw_len", value: Some(raw_len.as_bytes()) })
                    .insert(Header { key: "raw_sha256", value: Some(d.raw_sha256.as_bytes()) });
                self.send(dead_topic, position.as_bytes(), Some(&d.raw), Some(headers))?;
            }
        }
        Ok(())
    }
}

impl SinkWriter for KafkaWriter {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        *self.deliveries.failed.lock().unwrap_or_else(|p| p.into_inner()) = Failures::default();
        let sent = self.send_all(batch);
        // Wait until every message is acknowledged or given up on (and its failure reported):
        // only then is nothing of this batch left in the producer's queue.
        let drained = wait_drained(|| self.producer.in_flight_count().max(0) as u64, Duration::from_secs(30));
        let failures = std::mem::take(&mut *self.deliveries.failed.lock().unwrap_or_else(|p| p.into_inner()));
        let fatal = self.producer.client().fatal_error();
        let rebuilt = if fatal.is_some() || failures.first.contains_key(&DeliveryClass::Rebuild) {
            // A fenced idempotent producer (Tansu fences it after refusing a record) or one with
            // a fatal error fails every later message: go on with a new one.
            let why =
                fatal.map(|(code, text)| format!("{code:?}: {text}")).or_else(|| failures.first.get(&DeliveryClass::Rebuild).cloned()).unwrap_or_default();
            tracing::warn!("kafka sink: the producer cannot go on ({why}); building a new one");
            self.producer = self
                .config
                .create_with_context(self.deliveries.clone())
                .map_err(|e| SinkError::Config(format!("cannot create a Kafka producer again: {e}")))?;
            Some(why)
        } else {
            None
        };
        if let Some(why) = failures.first.get(&DeliveryClass::Config) {
            return Err(SinkError::Config(format!("cannot produce to {why}")));
        }
        sent?;
        if let Err(pending) = drained {
            return Err(SinkError::Transient(format!("{pending} messages not acknowledged within 30 s")));
        }
        if let Some(why) = failures.first.get(&DeliveryClass::Transient) {
            return Err(SinkError::Transient(format!("{} messages were not acknowledged ({why}); sending the epoch again", failures.count)));
        }
        if let Some(why) = failures.first.get(&DeliveryClass::Record) {
            // The broker refused records (with the whole produce request they came in): the
            // sink's caller isolates them by splitting the batch; the rest is written again.
            return Err(SinkError::Record(format!("refused: {why}")));
        }
        if let Some(why) = rebuilt {
            return Err(SinkError::Transient(format!("the producer was replaced ({why}); sending the epoch again")));
        }
        Ok(())
    }
}

impl SinkConnector for KafkaSinkConfig {
    const TYPE: &'static str = "kafka";
    const ABOUT: &'static str = "Kafka: answers keyed by request ID (with `id_header = true`, also in a `request_id` header); at-least-once";
    fn check(&self) -> Result<(), ConfigError> {
        if self.brokers.is_empty() || self.topic.is_empty() {
            return Err(ConfigError::new("", "needs `brokers` and `topic`", "e.g. brokers = \"127.0.0.1:19092\", topic = \"ride-durations\""));
        }
        Ok(())
    }
    fn factory(&self) -> Arc<dyn SinkFactory> {
        Arc::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_failures_are_classified_by_code() {
        use RDKafkaErrorCode as C;
        for c in [C::MessageSizeTooLarge, C::InvalidRecord, C::InvalidMessage, C::InvalidMessageSize, C::BadMessage] {
            assert_eq!(classify_delivery(c), DeliveryClass::Record, "{c:?}");
        }
        for c in [C::UnknownTopicOrPartition, C::UnknownTopic, C::TopicAuthorizationFailed, C::ClusterAuthorizationFailed, C::InvalidTopic] {
            assert_eq!(classify_delivery(c), DeliveryClass::Config, "{c:?}");
        }
        for c in [C::MessageTimedOut, C::NotLeaderForPartition, C::BrokerTransportFailure, C::RequestTimedOut, C::AllBrokersDown] {
            assert_eq!(classify_delivery(c), DeliveryClass::Transient, "{c:?}");
        }
        assert_eq!(classify_delivery(C::ProducerFenced), DeliveryClass::Rebuild);
    }

    #[test]
    fn waiting_ends_when_nothing_is_pending_or_at_the_timeout() {
        use std::sync::atomic::{AtomicU64, Ordering};
        assert_eq!(wait_drained(|| 0, Duration::ZERO), Ok(()), "nothing pending");
        assert_eq!(wait_drained(|| 3, Duration::from_millis(5)), Err(3));
        let pending = Arc::new(AtomicU64::new(3));
        let p2 = pending.clone();
        let settler = std::thread::spawn(move || {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(5));
                p2.fetch_sub(1, Ordering::SeqCst);
            }
        });
        assert_eq!(wait_drained(|| pending.load(Ordering::SeqCst), Duration::from_secs(10)), Ok(()));
        assert_eq!(pending.load(Ordering::SeqCst), 0, "it returned only once the count reached zero");
        settler.join().unwrap();
    }
}
