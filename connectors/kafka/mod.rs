//! Kafka: the partition-owning source, the idempotent results sink, and the backend's request
//! client (plus the load generator built on it).

pub mod client;
pub mod mock;
pub mod sink;
pub mod source;

use rdkafka::ClientConfig;
use serde::Deserialize;

/// Where a Kafka request's ID comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdFrom {
    /// A top-level JSON field of the message (string or integer).
    Field { name: String },
    /// The message key.
    Key,
    /// A message header.
    Header { name: String },
    /// Always derived from topic, partition and offset.
    Position,
}

impl Default for IdFrom {
    fn default() -> Self {
        IdFrom::Field { name: "request_id".into() }
    }
}

/// The header that carries the request ID on every result message.
pub const ID_HEADER: &str = "request_id";

/// Client settings shared by sluice's consumers and producers.
pub fn base_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("socket.keepalive.enable", "true")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "5000")
        .set("log_level", "3");
    c
}

/// The derived ID of a message without one: `topic/partition/offset`, stable across replays.
pub fn position_id(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}
