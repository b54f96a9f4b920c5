//! The Pub/Sub results sink: every answer is published to the results topic with the request
//! ID, the model's name and its version as attributes (optionally the request ID as ordering
//! key), batched by the client library. An epoch counts as written only once every publish is
//! confirmed; otherwise the whole epoch is published again, so the topic is at-least-once and a
//! duplicate carries the same ID. A delete is a message with no data and an `op = "delete"`
//! attribute. Dead letters go to their own topic with the reason as an attribute and the
//! original bytes as data.

use super::admin::Admin;
use super::{check_name, classify, runtime, Connection, Failure, ID_ATTRIBUTE};
use crate::results::ResultJson;
use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::Message;
use serde::Deserialize;
use sluice_core::connector::{ConfigError, SinkConnector};
use sluice_core::record::{Change, DeadLetter};
use sluice_core::sink::{EpochBatch, SinkContext, SinkError, SinkFactory, SinkWriter};
use sluice_core::source::Checkpoint;
use std::collections::HashMap;
use std::time::Duration;

/// Pub/Sub's limit on an attribute value, in bytes.
const MAX_ATTRIBUTE_BYTES: usize = 1024;

/// `[[sinks]] type = "pubsub"`: answers to a results topic, attributes carry the request ID.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PubsubSinkConfig {
    /// The results topic, `projects/<project>/topics/<name>`.
    pub topic: String,
    /// The dead-letter topic; omit to keep dead letters in the other sinks only.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// The service's address, e.g. `http://127.0.0.1:8085`; omitted: `PUBSUB_EMULATOR_HOST`,
    /// else Google's own endpoint. `${VAR}` is read from the environment.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// A service-account key file; omitted: anonymous on an emulator, else Application Default
    /// Credentials. Its content never appears in logs or errors.
    #[serde(default)]
    pub credentials_file: Option<std::path::PathBuf>,
    /// Publish each answer with its request ID as ordering key (the topic's subscribers then
    /// see an ID's answers in order, if their subscription orders).
    #[serde(default)]
    pub ordering_key: bool,
    /// A publish batch is sent at this many messages...
    #[serde(default = "default_batch_messages")]
    pub batch_messages: u32,
    /// ...or this many bytes...
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: u32,
    /// ...or after this many milliseconds, whichever comes first.
    #[serde(default = "default_batch_delay_ms")]
    pub batch_delay_ms: u64,
}

fn default_batch_messages() -> u32 {
    1000
}
fn default_batch_bytes() -> u32 {
    4 << 20
}
fn default_batch_delay_ms() -> u64 {
    5
}

impl PubsubSinkConfig {
    /// Where and as whom to connect.
    pub fn connection(&self) -> Connection {
        Connection { endpoint: self.endpoint.clone(), credentials_file: self.credentials_file.clone() }
    }

    /// Refuses settings that cannot work: `(field within the sink, message, hint)`.
    fn check_fields(&self) -> Result<(), (&'static str, String, String)> {
        if let Err(e) = check_name(&self.topic, "topics") {
            return Err(("topic", e.message, "name the topic in full, e.g. projects/sluice-local/topics/ride-durations".into()));
        }
        if let Some(d) = &self.dead_letter_topic {
            if let Err(e) = check_name(d, "topics") {
                return Err(("dead_letter_topic", e.message, "e.g. projects/sluice-local/topics/ride-dead-letters".into()));
            }
        }
        if self.batch_messages == 0 || self.batch_messages > 1000 {
            return Err(("batch_messages", format!("is {}; Pub/Sub takes 1 to 1000 messages a request", self.batch_messages), "use e.g. 1000".into()));
        }
        if self.batch_bytes == 0 || self.batch_bytes > 10_000_000 {
            return Err(("batch_bytes", format!("is {}; Pub/Sub takes up to 10 MB a request", self.batch_bytes), "use e.g. 4194304".into()));
        }
        Ok(())
    }

    fn publisher(&self, conn: &super::Resolved, topic: &str) -> Result<Publisher, SinkError> {
        conn.publisher(topic, self.batch_messages, self.batch_bytes, Duration::from_millis(self.batch_delay_ms)).map_err(SinkError::from)
    }
}

impl SinkFactory for PubsubSinkConfig {
    fn kind(&self) -> &'static str {
        "pubsub"
    }

    fn describe(&self) -> String {
        format!("pubsub topic {}{}", self.topic, self.dead_letter_topic.as_ref().map(|d| format!(" (dead letters in {d})")).unwrap_or_default())
    }

    /// Checks that the topics exist, so a typo stops the run at start-up with the fix.
    fn open(&self, _ctx: &SinkContext) -> Result<Option<Vec<Checkpoint>>, SinkError> {
        let conn = self.connection().resolve();
        let admin = Admin::connect(&conn)?;
        for topic in std::iter::once(&self.topic).chain(self.dead_letter_topic.as_ref()) {
            match admin.topic_exists(topic) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(SinkError::Config(format!(
                        "topic {topic} does not exist at {}; create it (scripts/pubsub.sh start creates the project's own, or `gcloud pubsub topics create`)",
                        conn.describe()
                    )))
                }
                Err(e) if !e.is_transient() => return Err(e.into()),
                // Unreachable now: the writes will retry.
                Err(e) => tracing::warn!("pubsub sink: {e}"),
            }
        }
        Ok(None)
    }

    fn writer(&self, ctx: &SinkContext, _worker: usize) -> Result<Box<dyn SinkWriter>, SinkError> {
        let conn = self.connection().resolve();
        let answers = self.publisher(&conn, &self.topic)?;
        let dead = match &self.dead_letter_topic {
            Some(d) => Some(self.publisher(&conn, d)?),
            None => None,
        };
        Ok(Box::new(PubsubWriter { answers, dead, ordering_key: self.ordering_key, json: ResultJson::new(ctx.columns) }))
    }
}

/// Publishes one worker's answers and dead letters.
pub struct PubsubWriter {
    answers: Publisher,
    dead: Option<Publisher>,
    ordering_key: bool,
    json: ResultJson,
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The message for one change.
fn change_message(json: &mut ResultJson, c: &Change, ordering_key: bool) -> Message {
    let id = c.id();
    let mut attributes = HashMap::with_capacity(3);
    attributes.insert(ID_ATTRIBUTE.to_string(), id.to_string());
    let mut m = Message::new();
    match c {
        Change::Upsert(a) => {
            let (name, version) = a.model.split_once('@').unwrap_or((&a.model, ""));
            attributes.insert("model".into(), name.to_string());
            attributes.insert("model_version".into(), version.to_string());
            let mut buf = Vec::with_capacity(256);
            json.write(&mut buf, a);
            m = m.set_data(buf);
        }
        Change::Delete(_) => {
            attributes.insert("op".into(), "delete".into());
        }
    }
    if ordering_key {
        m = m.set_ordering_key(id.to_string());
    }
    m.set_attributes(attributes)
}

/// The message for one dead letter: the original bytes (as bounded) as data, the rest as attributes.
fn dead_letter_message(d: &DeadLetter) -> Message {
    let attributes = [
        ("reason", d.reason.as_str().to_string()),
        ("detail", cut(&d.detail, MAX_ATTRIBUTE_BYTES).to_string()),
        ("source", cut(&d.pos.source(), MAX_ATTRIBUTE_BYTES).to_string()),
        ("position", d.pos.position()),
        ("raw_len", d.raw_len.to_string()),
        ("raw_sha256", d.raw_sha256.clone()),
    ];
    // A message needs data or attributes; these always have attributes.
    Message::new().set_data(d.raw.clone()).set_attributes(attributes.into_iter().map(|(k, v)| (k.to_string(), v)))
}

fn sink_error(e: PublishError, what: &str) -> SinkError {
    match &e {
        PublishError::Rpc(inner) => match classify(inner) {
            Failure::Record => SinkError::Record(format!("{what}: {e}")),
            Failure::Config => SinkError::Config(format!("{what}: {e}")),
            Failure::Transient => SinkError::Transient(format!("{what}: {e}")),
        },
        _ => SinkError::Transient(format!("{what}: {e}")),
    }
}

impl SinkWriter for PubsubWriter {
    fn kind(&self) -> &'static str {
        "pubsub"
    }

    fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        let _enter = runtime().enter();
        let mut answers = Vec::with_capacity(batch.changes.len());
        for c in &batch.changes {
            answers.push((c.id(), self.answers.publish(change_message(&mut self.json, c, self.ordering_key))));
        }
        let dead: Vec<_> = match &self.dead {
            Some(p) => batch.dead.iter().map(|d| p.publish(dead_letter_message(d))).collect(),
            None => Vec::new(),
        };
        runtime().block_on(async {
            let mut first: Option<SinkError> = None;
            for (id, f) in answers {
                if let Err(e) = f.await {
                    if self.ordering_key {
                        // A failed publish pauses its ordering key; the epoch is sent again.
                        self.answers.resume_publish(id.to_string());
                    }
                    first.get_or_insert(sink_error(e, "publishing an answer"));
                }
            }
            for f in dead {
                if let Err(e) = f.await {
                    first.get_or_insert(sink_error(e, "publishing a dead letter"));
                }
            }
            first.map_or(Ok(()), Err)
        })
    }
}

impl SinkConnector for PubsubSinkConfig {
    const TYPE: &'static str = "pubsub";
    const ABOUT: &'static str = "Google Pub/Sub: answers with the request ID as an attribute; at-least-once";
    fn check(&self) -> Result<(), ConfigError> {
        self.check_fields().map_err(ConfigError::from)
    }
    fn factory(&self) -> std::sync::Arc<dyn SinkFactory> {
        std::sync::Arc::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::record::{Answer, Column, ColumnKind, DeadReason, SourcePos, Value};

    #[test]
    fn answers_carry_the_id_and_model_as_attributes_and_deletes_have_no_data() {
        let columns = [Column { name: "prediction", kind: ColumnKind::Float }];
        let mut json = ResultJson::new(&columns);
        let a = Answer {
            id: "ride-7".into(),
            values: vec![Value::Float(12.5)],
            passthrough: Vec::new(),
            model: "rides@0123".into(),
            pos: SourcePos::message("s".into(), 7),
            ingest_ms: 1,
            raw: Vec::new(),
            seq: 0,
            replaces: false,
        };
        let m = change_message(&mut json, &Change::Upsert(a), true);
        assert_eq!(m.attributes.get("request_id").map(String::as_str), Some("ride-7"));
        assert_eq!((m.attributes["model"].as_str(), m.attributes["model_version"].as_str()), ("rides", "0123"));
        assert_eq!(m.ordering_key, "ride-7");
        let v: serde_json::Value = serde_json::from_slice(&m.data).unwrap();
        assert_eq!(v["prediction"], 12.5);
        let d = change_message(
            &mut json,
            &Change::Delete(sluice_core::record::Deleted { id: "ride-8".into(), pos: SourcePos::message("s".into(), 8), ingest_ms: 1, seq: 0 }),
            false,
        );
        assert!(d.data.is_empty());
        assert_eq!((d.attributes["op"].as_str(), d.attributes["request_id"].as_str(), d.ordering_key.as_str()), ("delete", "ride-8", ""));
    }

    #[test]
    fn a_dead_letter_keeps_its_bytes_and_fits_the_attribute_limit() {
        let mut d = DeadLetter::new(SourcePos::message("projects/p/subscriptions/s".into(), 9), DeadReason::NotJson, "é".repeat(2000), b"not json".to_vec(), 1);
        d.bound(1 << 20);
        let m = dead_letter_message(&d);
        assert_eq!(&m.data[..], b"not json");
        assert_eq!(m.attributes["reason"], "not_json");
        assert!(m.attributes["detail"].len() <= MAX_ATTRIBUTE_BYTES, "cut at the attribute limit, on a character boundary");
        assert_eq!(m.attributes["position"], "message 9");
        assert_eq!(m.attributes["raw_len"], "8");
    }
}
