//! The Kafka results sink: every answer goes to the results topic keyed by its request ID, with
//! the ID also in a `request_id` header, through an idempotent producer. An epoch counts as
//! written only when every message is acknowledged; otherwise the whole epoch is sent again, so
//! the topic is at-least-once and a duplicate carries the same ID. Dead letters go to their own
//! topic with the reason in a header and the original bytes as the payload. A delete is a
//! tombstone: the ID as key (and header) and no value, which log compaction also honours.
//! A message the producer refuses as too large is the record's fault, not the broker's: it is
//! isolated and dead-lettered while the rest of the epoch is written.

use super::{base_config, ID_HEADER};
use crate::connectors::results::ResultJson;
use crate::record::{Change, Column};
use crate::sink::{EpochBatch, SinkContext, SinkError, SinkFactory, SinkWriter};
use crate::source::Checkpoint;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The producer's context: it counts the messages the producer gave up on. Only failures are
/// reported (`delivery.report.only.error`): a successful message is freed by librdkafka's broker
/// thread as soon as it is acknowledged, with no report to hand to a polling thread (that path
/// was 5% of the worker's CPU in a profile of a drain).
#[derive(Default, Clone)]
pub struct DeliveryErrors {
    failed: Arc<AtomicU64>,
}

impl ClientContext for DeliveryErrors {}

impl ProducerContext for DeliveryErrors {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::debug!("kafka delivery failed: {e}");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
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

/// `[[sinks]] type = "kafka"`: answers keyed by request ID (also in a `request_id` header); at-least-once.
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
        let brokers = crate::topology::expand_env(&self.brokers);
        let w = KafkaWriter::new(&brokers, &self.topic, self.dead_letter_topic.as_deref(), self.idempotent, &self.client, ctx.columns)
            .map_err(SinkError::Config)?;
        Ok(Box::new(w))
    }
}

/// Writes answers and dead letters to Kafka topics.
pub struct KafkaWriter {
    producer: ThreadedProducer<DeliveryErrors>,
    deliveries: DeliveryErrors,
    topic: String,
    dead_letter_topic: Option<String>,
    json: ResultJson,
}

impl KafkaWriter {
    /// A producer for `topic` (and `dead_letter_topic`); `idempotent` turns on Kafka's idempotent producer.
    pub fn new(
        brokers: &str,
        topic: &str,
        dead_letter_topic: Option<&str>,
        idempotent: bool,
        client: &std::collections::BTreeMap<String, String>,
        columns: &'static [Column],
    ) -> Result<Self, String> {
        let deliveries = DeliveryErrors::default();
        let mut config = base_config(brokers);
        // A short linger lets librdkafka pack an epoch into few produce requests (0 sends one
        // request per message, measured 2x slower on Tansu); the write then awaits the acks.
        config
            .set("linger.ms", "1")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "30000")
            .set("delivery.report.only.error", "true");
        for (k, v) in client {
            config.set(k, v);
        }
        let producer: ThreadedProducer<DeliveryErrors> = config
            .set("enable.idempotence", if idempotent { "true" } else { "false" })
            .set("acks", "all")
            .create_with_context(deliveries.clone())
            .map_err(|e| format!("cannot create a Kafka producer (check sinks.client): {e}"))?;
        // Connect now: the idempotent producer asks for its producer ID on a 500 ms timer once a
        // broker connection is up, so connecting at start-up rather than at the first write saves
        // a timer round (measured: the first write waited about 1 s for its ID). A broker that is
        // down is not an error here; the writes retry.
        if let Err(e) = producer.client().fetch_metadata(Some(topic), Duration::from_secs(1)) {
            tracing::debug!("kafka sink: no metadata yet for {topic}: {e}");
        }
        Ok(KafkaWriter {
            producer,
            deliveries,
            topic: topic.to_string(),
            dead_letter_topic: dead_letter_topic.map(String::from),
            json: ResultJson::new(columns),
        })
    }

    /// Hands one message (`None`: a tombstone) to the producer, waiting while its queue is full.
    fn send(&self, topic: &str, key: &[u8], payload: Option<&[u8]>, headers: OwnedHeaders) -> Result<(), SinkError> {
        let mut record = BaseRecord::to(topic).key(key).headers(headers);
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
                Err((e @ KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    return Err(SinkError::Record(format!("{topic}: {e} ({} bytes)", payload.map(|p| p.len()).unwrap_or(0))))
                }
                Err((e, _)) => return Err(SinkError::Transient(format!("cannot produce to {topic}: {e}"))),
            }
        }
    }

    /// Sends the changes, then the dead letters.
    fn send_all(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        let mut buf = Vec::with_capacity(256);
        for c in &batch.changes {
            let id = c.id();
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header { key: ID_HEADER, value: Some(id.as_bytes()) });
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
                self.send(dead_topic, position.as_bytes(), Some(&d.raw), headers)?;
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
        let failed_before = self.deliveries.failed.load(Ordering::Relaxed);
        self.send_all(batch)?;
        // Wait until every message is acknowledged or given up on (and its failure reported):
        // only then is nothing of this batch left in the producer's queue.
        if let Err(pending) = wait_drained(|| self.producer.in_flight_count().max(0) as u64, Duration::from_secs(30)) {
            return Err(SinkError::Transient(format!("{pending} messages not acknowledged within 30 s")));
        }
        let failed = self.deliveries.failed.load(Ordering::Relaxed) - failed_before;
        if failed > 0 {
            return Err(SinkError::Transient(format!("{failed} messages were not acknowledged; sending the epoch again")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_ends_when_nothing_is_pending_or_at_the_timeout() {
        use std::sync::atomic::AtomicU64;
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
