//! The Kafka results sink: every answer goes to the results topic keyed by its request ID, with
//! the ID also in a `request_id` header, through an idempotent producer. An epoch counts as
//! written only when every message is acknowledged; otherwise the whole epoch is sent again, so
//! the topic is at-least-once and a duplicate carries the same ID. Dead letters go to their own
//! topic with the reason in a header and the original bytes as the payload.

use super::{base_config, ID_HEADER};
use crate::connectors::{EpochBatch, SinkError, SinkWriter};
use crate::record::{Answer, Column, Value};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Tracks an epoch's deliveries: how many are still unacknowledged and how many failed. The sink
/// thread waits on a condition variable that the producer's own polling thread signals when the
/// count reaches zero; the count itself is atomic, so an acknowledgement costs no lock.
#[derive(Default, Clone)]
pub struct DeliveryCounter {
    pending: Arc<AtomicU64>,
    zero: Arc<(Mutex<()>, Condvar)>,
    failed: Arc<AtomicU64>,
}

impl DeliveryCounter {
    fn add(&self, n: u64) {
        self.pending.fetch_add(n, Ordering::SeqCst);
    }

    /// `n` messages are settled (acknowledged, failed, or never handed over).
    fn settle(&self, n: u64) {
        if n > 0 && self.pending.fetch_sub(n, Ordering::SeqCst) == n {
            // Taking the lock orders this signal after a waiter's check of the count.
            let _guard = self.zero.0.lock().expect("delivery lock");
            self.zero.1.notify_all();
        }
    }

    /// Waits until nothing is pending; `Err` holds what is still pending at the timeout.
    fn wait(&self, timeout: Duration) -> Result<(), u64> {
        let guard = self.zero.0.lock().expect("delivery lock");
        let (_guard, result) = self.zero.1.wait_timeout_while(guard, timeout, |_| self.pending.load(Ordering::SeqCst) > 0).expect("delivery lock");
        if result.timed_out() {
            Err(self.pending.load(Ordering::SeqCst))
        } else {
            Ok(())
        }
    }
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            tracing::debug!("kafka delivery failed: {e}");
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.settle(1);
    }
}

/// Writes answers and dead letters to Kafka topics.
pub struct KafkaWriter {
    producer: ThreadedProducer<DeliveryCounter>,
    deliveries: DeliveryCounter,
    topic: String,
    dead_letter_topic: Option<String>,
    columns: &'static [Column],
}

/// Writes the JSON payload of a result message into `buf`: the request ID, the outputs (a
/// non-finite number is `null`), the model's name and version, and the ingest time. Written
/// directly, without building a `serde_json::Value` per answer.
pub fn write_result_json(buf: &mut Vec<u8>, a: &Answer, columns: &[Column]) {
    use std::io::Write as _;
    let string = |buf: &mut Vec<u8>, s: &str| serde_json::to_writer(&mut *buf, s).expect("writing to a Vec cannot fail");
    buf.extend_from_slice(b"{\"id\":");
    string(buf, &a.id);
    for (c, v) in columns.iter().zip(&a.values) {
        buf.push(b',');
        string(buf, c.name);
        buf.push(b':');
        match v {
            Value::Text(s) => string(buf, s),
            Value::Int(i) => write!(buf, "{i}").expect("writing to a Vec cannot fail"),
            Value::Float(x) => serde_json::to_writer(&mut *buf, x).expect("writing to a Vec cannot fail"),
        }
    }
    let (name, version) = a.model.split_once('@').unwrap_or((&*a.model, ""));
    buf.extend_from_slice(b",\"model\":");
    string(buf, name);
    buf.extend_from_slice(b",\"model_version\":");
    string(buf, version);
    write!(buf, ",\"ingest_ms\":{}}}", a.ingest_ms).expect("writing to a Vec cannot fail");
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
        let deliveries = DeliveryCounter::default();
        let mut config = base_config(brokers);
        // A short linger lets librdkafka pack an epoch into few produce requests (0 sends one
        // request per message, measured 2x slower on Tansu); the write then awaits the acks.
        config.set("linger.ms", "1").set("batch.num.messages", "10000").set("queue.buffering.max.messages", "1000000").set("message.timeout.ms", "30000");
        for (k, v) in client {
            config.set(k, v);
        }
        let producer: ThreadedProducer<DeliveryCounter> = config
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
        Ok(KafkaWriter { producer, deliveries, topic: topic.to_string(), dead_letter_topic: dead_letter_topic.map(String::from), columns })
    }

    /// Hands one message to the producer. The caller has already counted it as pending; on an
    /// error it is not pending any more.
    fn send(&self, topic: &str, key: &[u8], payload: &[u8], headers: OwnedHeaders) -> Result<(), SinkError> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload).headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(SinkError::Transient(format!("cannot produce to {topic}: {e}"))),
            }
        }
    }

    /// Sends every message of `batch`, after counting them all as pending at once; messages not
    /// handed over are taken off the count again.
    fn send_all(&self, batch: &EpochBatch) -> Result<(), SinkError> {
        let dead = if self.dead_letter_topic.is_some() { batch.dead.len() } else { 0 };
        let total = (batch.answers.len() + dead) as u64;
        self.deliveries.add(total);
        let mut sent = 0u64;
        let result = self.send_each(batch, &mut sent);
        if result.is_err() {
            self.deliveries.settle(total - sent);
        }
        result
    }

    /// Sends the answers, then the dead letters, counting in `sent` each one handed over.
    fn send_each(&self, batch: &EpochBatch, sent: &mut u64) -> Result<(), SinkError> {
        let mut buf = Vec::with_capacity(256);
        for a in &batch.answers {
            buf.clear();
            write_result_json(&mut buf, a, self.columns);
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header { key: ID_HEADER, value: Some(a.id.as_bytes()) });
            self.send(&self.topic, a.id.as_bytes(), &buf, headers)?;
            *sent += 1;
        }
        if let Some(dead_topic) = &self.dead_letter_topic {
            for d in &batch.dead {
                let position = d.pos.to_string();
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "reason", value: Some(d.reason.as_str().as_bytes()) })
                    .insert(Header { key: "detail", value: Some(d.detail.as_bytes()) })
                    .insert(Header { key: "source", value: Some(position.as_bytes()) });
                self.send(dead_topic, position.as_bytes(), &d.raw, headers)?;
                *sent += 1;
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
        // Wait for every acknowledgement; the producer's polling thread wakes us on the last one.
        if let Err(pending) = self.deliveries.wait(Duration::from_secs(30)) {
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
    fn the_waiter_wakes_when_the_last_delivery_settles() {
        let d = DeliveryCounter::default();
        assert_eq!(d.wait(Duration::from_millis(1)), Ok(()), "nothing pending");
        d.add(3);
        assert_eq!(d.wait(Duration::from_millis(10)), Err(3));
        let d2 = d.clone();
        let settler = std::thread::spawn(move || {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(5));
                d2.settle(1);
            }
        });
        assert_eq!(d.wait(Duration::from_secs(10)), Ok(()));
        settler.join().unwrap();
    }
    use crate::record::{ColumnKind, SourcePos};

    #[test]
    fn result_json_carries_id_outputs_and_model() {
        let columns = [Column { name: "prediction", kind: ColumnKind::Float }, Column { name: "label", kind: ColumnKind::Text }];
        let answer = |x: f64| Answer {
            id: "ride \"7\"".into(),
            values: vec![Value::Float(x), Value::Text("fast\nride".into())],
            passthrough: Vec::new(),
            model: "rides@0123456789ab".into(),
            pos: SourcePos::Generated { seq: 7 },
            ingest_ms: 42,
        };
        let mut buf = Vec::new();
        write_result_json(&mut buf, &answer(12.5), &columns);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "ride \"7\"", "prediction": 12.5, "label": "fast\nride", "model": "rides", "model_version": "0123456789ab", "ingest_ms": 42})
        );
        buf.clear();
        write_result_json(&mut buf, &answer(f64::NAN), &columns);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert!(v["prediction"].is_null(), "a non-finite prediction is null: {v}");
    }
}
