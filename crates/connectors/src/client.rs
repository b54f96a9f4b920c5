//! What a backend and the load generator ask of a broker, whichever it is: the one
//! [`RequestBroker`] trait that Kafka ([`crate::kafka::client::KafkaBroker`]) and Pub/Sub
//! ([`crate::pubsub::client::PubsubBroker`]) implement — send a request and wait for its own
//! answer by request ID, publish the load generator's requests, and read its answers — and the
//! request side's error, [`ClientError`].

use crate::error::{ConnectorError, Domain, Retry};
use crate::loadgen::{Answers, Publish};
use std::time::Duration;

/// A request-side error: the broker's (its message prefixed by the broker's name), or no answer
/// in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Kafka failed or refused.
    #[error("kafka: {0}")]
    Kafka(ConnectorError),
    /// Pub/Sub failed or refused.
    #[error("pubsub: {0}")]
    PubSub(ConnectorError),
    /// The request was published, but no answer carrying its ID came back in time.
    #[error("no answer for request {id} within {timeout:?}")]
    Timeout { id: String, timeout: Duration },
}

impl ClientError {
    /// Whose fault it is: a missing answer is the pipeline's, outside this client.
    pub fn domain(&self) -> Domain {
        match self {
            ClientError::Kafka(e) | ClientError::PubSub(e) => e.domain,
            ClientError::Timeout { .. } => Domain::External,
        }
    }

    /// Whether sending again may succeed: after a timeout it may.
    pub fn retry(&self) -> Retry {
        match self {
            ClientError::Kafka(e) | ClientError::PubSub(e) => e.retry,
            ClientError::Timeout { .. } => Retry::Transient,
        }
    }
}

/// The same class, with the message as the client error shows it (`kafka: ...`).
impl From<ClientError> for ConnectorError {
    fn from(e: ClientError) -> Self {
        ConnectorError::new(e.domain(), e.retry(), e.to_string())
    }
}

/// A broker through which backends send requests to a pipeline and read its answers: the
/// request ID travels with the request (a Kafka header and key, a Pub/Sub attribute) and comes
/// back with the answer on the results topic, where each client picks out its own.
pub trait RequestBroker {
    /// The requests and results topics of the ride pipeline on this broker, the defaults of
    /// `sluice request` and `sluice loadgen`.
    fn default_topics(&self) -> (&'static str, &'static str);

    /// Publishes `payload` (a JSON object) on `requests_topic` with a fresh request ID and
    /// waits up to `timeout` for the answer carrying that ID on `results_topic`, never another
    /// request's. Returns the ID and the answer.
    fn request(
        &self,
        requests_topic: &str,
        results_topic: &str,
        payload: serde_json::Map<String, serde_json::Value>,
        timeout: Duration,
    ) -> Result<(String, serde_json::Value), ClientError>;

    /// The load generator's listening side: the answers on `results_topic` from now on (at
    /// least those whose request ID starts with `id_prefix`). Open it before publishing.
    fn answers(&self, results_topic: &str, id_prefix: &str) -> Result<Box<dyn Answers>, ConnectorError>;

    /// The load generator's publishing side, on `requests_topic`.
    fn publisher(&self, requests_topic: &str) -> Result<Box<dyn Publish>, ConnectorError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_error_shows_its_broker_and_keeps_its_class() {
        let e = ClientError::Kafka(ConnectorError::config("topic rides does not exist"));
        assert_eq!(e.to_string(), "kafka: topic rides does not exist");
        let c = ConnectorError::from(e);
        assert_eq!((c.message.as_str(), c.http_status()), ("kafka: topic rides does not exist", 400));
        let t = ClientError::Timeout { id: "req-1".into(), timeout: Duration::from_millis(1500) };
        assert_eq!(t.to_string(), "no answer for request req-1 within 1.5s");
        assert_eq!(ConnectorError::from(t).http_status(), 503);
        assert_eq!(ClientError::PubSub(ConnectorError::unreachable("down")).to_string(), "pubsub: down");
    }
}
