//! Kafka: the partition-owning source, the idempotent results sink, and the backend's request
//! client (with the load generator's Kafka side).

pub mod client;
pub mod mock;
pub mod sink;
pub mod source;

use rdkafka::ClientConfig;

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
