//! The backend's side: publish a request with a fresh ID and wait for the answer carrying that ID
//! on the results topic, never another request's. One `RequestClient` serves many concurrent
//! requests: a listener thread routes each result to the request waiting for its ID. The load
//! generator's Kafka side is here too, and [`KafkaBroker`] offers all of it as a
//! [`RequestBroker`].

use super::{base_config, produce_error, ID_HEADER};
use crate::client::{ClientError, RequestBroker};
use crate::error::ConnectorError;
use crate::loadgen::{Answers, Publish};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Waiters = Arc<Mutex<HashMap<String, crossbeam_channel::Sender<(serde_json::Value, Instant)>>>>;

/// Publishes requests and matches answers to them by request ID.
pub struct RequestClient {
    producer: ThreadedProducer<DefaultProducerContext>,
    requests_topic: String,
    waiters: Waiters,
    stop: Arc<AtomicBool>,
    listener: Option<std::thread::JoinHandle<()>>,
    counter: AtomicU64,
    prefix: String,
    /// Answers that arrived for no waiting request (another client's, or a duplicate).
    pub unmatched: Arc<AtomicU64>,
}

/// The request ID a result message carries: its header, else its key.
pub fn result_id<M: Message>(m: &M) -> Option<String> {
    let from_header = m.headers().and_then(|h| h.iter().find(|x| x.key == ID_HEADER).and_then(|x| x.value).map(|v| String::from_utf8_lossy(v).to_string()));
    from_header.or_else(|| m.key().map(|k| String::from_utf8_lossy(k).to_string()))
}

/// Assigns every partition of `topic` at its current end (Tansu reports the end a little early,
/// which only means a few older results are read and ignored). Settings librdkafka refuses and a
/// missing topic are configuration errors; a broker that does not answer is transient.
pub fn consumer_at_end(brokers: &str, topic: &str) -> Result<BaseConsumer, ClientError> {
    let consumer: BaseConsumer = base_config(brokers)
        .set("group.id", format!("sluice-client-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        // Large fetches under load: fewer requests for this listener and for the broker.
        .set("max.partition.fetch.bytes", "4194304")
        .create()
        .map_err(|e| ClientError::Kafka(ConnectorError::config(e.to_string())))?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .map_err(|e| ClientError::Kafka(ConnectorError::unreachable(format!("metadata of {topic}: {e}"))))?;
    let partitions = md.topics().iter().find(|t| t.name() == topic).map(|t| t.partitions().len()).unwrap_or(0);
    if partitions == 0 {
        return Err(ClientError::Kafka(ConnectorError::config(format!("topic {topic} does not exist"))));
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(5))
            .map_err(|e| ClientError::Kafka(ConnectorError::unreachable(format!("watermarks of {topic}/{p}: {e}"))))?;
        tpl.add_partition_offset(topic, p, Offset::Offset(high.max(0))).map_err(|e| ClientError::Kafka(ConnectorError::internal(e.to_string())))?;
    }
    consumer.assign(&tpl).map_err(|e| ClientError::Kafka(ConnectorError::internal(e.to_string())))?;
    Ok(consumer)
}

impl RequestClient {
    /// Connects: a producer for `requests_topic` and a listener on `results_topic`.
    pub fn connect(brokers: &str, requests_topic: &str, results_topic: &str) -> Result<Self, ClientError> {
        let producer: ThreadedProducer<DefaultProducerContext> = base_config(brokers)
            .set("linger.ms", "1")
            .set("enable.idempotence", "false")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .map_err(|e| ClientError::Kafka(ConnectorError::config(e.to_string())))?;
        let consumer = consumer_at_end(brokers, results_topic)?;
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let unmatched = Arc::new(AtomicU64::new(0));
        let (w, s, u) = (waiters.clone(), stop.clone(), unmatched.clone());
        let listener = std::thread::Builder::new()
            .name("sluice-client".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match consumer.poll(Duration::from_millis(20)) {
                        Some(Ok(m)) => {
                            let arrived = Instant::now();
                            let Some(id) = result_id(&m) else { continue };
                            let waiter = w.lock().expect("waiters lock").remove(&id);
                            match waiter {
                                Some(tx) => {
                                    let body = m.payload().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or(serde_json::Value::Null);
                                    let _ = tx.send((body, arrived));
                                }
                                None => {
                                    u.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Some(Err(e)) => tracing::debug!("results poll: {e}"),
                        None => {}
                    }
                }
            })
            .map_err(|e| ClientError::Kafka(ConnectorError::internal(e.to_string())))?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Ok(RequestClient {
            producer,
            requests_topic: requests_topic.to_string(),
            waiters,
            stop,
            listener: Some(listener),
            counter: AtomicU64::new(0),
            prefix: format!("req-{:x}-{:x}", nanos, std::process::id()),
            unmatched,
        })
    }

    /// A request ID no other request of this or any other client has.
    pub fn fresh_id(&self) -> String {
        format!("{}-{}", self.prefix, self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Publishes `payload` (a JSON object) under `id` without waiting; the answer comes through `answer_rx`.
    pub fn publish(
        &self,
        id: &str,
        mut payload: serde_json::Map<String, serde_json::Value>,
    ) -> Result<crossbeam_channel::Receiver<(serde_json::Value, Instant)>, ClientError> {
        payload.insert("request_id".into(), id.into());
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.waiters.lock().expect("waiters lock").insert(id.to_string(), tx);
        let body = serde_json::to_vec(&payload).map_err(|e| ClientError::Kafka(ConnectorError::internal(e.to_string())))?;
        let headers = OwnedHeaders::new().insert(Header { key: ID_HEADER, value: Some(id.as_bytes()) });
        let mut record = BaseRecord::to(&self.requests_topic).key(id.as_bytes()).payload(&body).headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(rx),
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    self.waiters.lock().expect("waiters lock").remove(id);
                    return Err(ClientError::Kafka(produce_error(&e, format!("publish: {e}"))));
                }
            }
        }
    }

    /// Publishes a request with a fresh ID and waits up to `timeout` for its own answer.
    pub fn request(&self, payload: serde_json::Map<String, serde_json::Value>, timeout: Duration) -> Result<(String, serde_json::Value), ClientError> {
        let id = self.fresh_id();
        let rx = self.publish(&id, payload)?;
        match rx.recv_timeout(timeout) {
            Ok((answer, _)) => Ok((id, answer)),
            Err(_) => {
                self.waiters.lock().expect("waiters lock").remove(&id);
                Err(ClientError::Timeout { id, timeout })
            }
        }
    }

    /// Waits until every published message is delivered to the broker.
    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(30));
    }
}

impl Drop for RequestClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(l) = self.listener.take() {
            let _ = l.join();
        }
    }
}

/// The load generator's publishing side on Kafka: requests keyed by ID, the ID also in a header.
pub struct KafkaPublish {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
}

impl KafkaPublish {
    /// A producer for `topic`; `linger_ms` is how long it gathers requests into one produce
    /// request (librdkafka's default is 5), as a backend's client would. Settings librdkafka
    /// refuses are a configuration error.
    pub fn new(brokers: &str, topic: &str, linger_ms: u64) -> Result<Self, ConnectorError> {
        let producer = base_config(brokers)
            .set("linger.ms", linger_ms.to_string())
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "2000000")
            .create()
            .map_err(|e| ConnectorError::config(format!("cannot create a producer: {e}")))?;
        Ok(KafkaPublish { producer, topic: topic.to_string() })
    }
}

impl Publish for KafkaPublish {
    fn send(&mut self, id: &str, body: &[u8]) -> Result<(), ConnectorError> {
        let headers = OwnedHeaders::new().insert(Header { key: ID_HEADER, value: Some(id.as_bytes()) });
        let mut record = BaseRecord::to(&self.topic).key(id.as_bytes()).payload(body).headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err((e, _)) => return Err(produce_error(&e, format!("publish: {e}"))),
            }
        }
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.producer.flush(Duration::from_secs(60)).map_err(|e| produce_error(&e, format!("flush: {e}")))
    }
}

/// The load generator's listening side on Kafka: the results topic from its current end. The
/// topic is keyed by request ID, so the ID is read from the key, with no header parsing.
pub struct KafkaAnswers(pub BaseConsumer);

impl Answers for KafkaAnswers {
    fn poll(&mut self, wait: Duration, on_id: &mut dyn FnMut(Option<&[u8]>)) {
        match self.0.poll(wait) {
            Some(Ok(m)) => on_id(m.key()),
            Some(Err(e)) => tracing::debug!("loadgen poll: {e}"),
            None => {}
        }
    }
}

/// Kafka as a [`RequestBroker`]: requests keyed by ID (the ID also in a header), answers read
/// from the results topic's current end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaBroker {
    /// Bootstrap servers.
    pub brokers: String,
    /// The load generator's publisher linger, see [`KafkaPublish::new`]; the request client
    /// always lingers 1 ms.
    pub linger_ms: u64,
}

/// librdkafka's own default linger, in milliseconds.
pub const DEFAULT_LINGER_MS: u64 = 5;

impl KafkaBroker {
    /// The brokers at `brokers`, with librdkafka's default linger.
    pub fn new(brokers: &str) -> Self {
        KafkaBroker { brokers: brokers.to_string(), linger_ms: DEFAULT_LINGER_MS }
    }
}

impl RequestBroker for KafkaBroker {
    fn default_topics(&self) -> (&'static str, &'static str) {
        ("rides", "ride-durations")
    }

    fn request(
        &self,
        requests_topic: &str,
        results_topic: &str,
        payload: serde_json::Map<String, serde_json::Value>,
        timeout: Duration,
    ) -> Result<(String, serde_json::Value), ClientError> {
        RequestClient::connect(&self.brokers, requests_topic, results_topic)?.request(payload, timeout)
    }

    /// Every answer on the topic from its current end; the ID comes from the key, and
    /// `id_prefix` selects nothing (the load generator counts others' answers as foreign).
    fn answers(&self, results_topic: &str, _id_prefix: &str) -> Result<Box<dyn Answers>, ConnectorError> {
        Ok(Box::new(KafkaAnswers(consumer_at_end(&self.brokers, results_topic)?)))
    }

    fn publisher(&self, requests_topic: &str) -> Result<Box<dyn Publish>, ConnectorError> {
        Ok(Box::new(KafkaPublish::new(&self.brokers, requests_topic, self.linger_ms)?))
    }
}
