//! Kafka: the partition-owning source, the idempotent results sink, and the backend's request
//! client (with the load generator's Kafka side).

pub mod client;
pub mod fetch;
pub mod mock;
pub mod sink;
pub mod source;

use crate::error::ConnectorError;
use rdkafka::error::KafkaError;
use rdkafka::ClientConfig;
use sink::{classify_delivery, DeliveryClass};

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

/// A failed produce or flush as a connector error, by its error code ([`classify_delivery`]): a
/// message refused for itself (too large, invalid) is the input's fault; a missing topic or a
/// refused authorization the configuration's; a fenced or failed producer a permanent refusal;
/// anything else (the broker unreachable, a timeout) transient.
pub fn produce_error(e: &KafkaError, message: String) -> ConnectorError {
    match e.rdkafka_error_code().map(classify_delivery).unwrap_or(DeliveryClass::Transient) {
        DeliveryClass::Record => ConnectorError::input(message),
        DeliveryClass::Config => ConnectorError::config(message),
        DeliveryClass::Rebuild => ConnectorError::refused(message),
        DeliveryClass::Transient => ConnectorError::unreachable(message),
    }
}
