//! `sluice mock-broker`: librdkafka's built-in mock Kafka cluster, served on a loopback port, for
//! the latency benchmark's long runs (docs/benchmarks.md).
//!
//! It speaks the Kafka protocol over TCP (metadata, produce, fetch, list offsets, idempotent
//! producer IDs, group offsets), keeps each partition's log in memory, and evicts a partition's
//! oldest batches beyond 5 MB or 100,000 messages. Finding a fetch offset walks that bounded
//! in-memory list, so a fetch costs the same after an hour as after a second. Tansu, the broker
//! the tests use, lists every stored batch of a partition on every fetch, so its fetch cost grows
//! with the run; this broker shows what sluice itself does over a long run. It is not durable and
//! not for production: it stands in for a Kafka broker only in that benchmark.

use crate::error::ConnectorError;
use rdkafka::mocking::MockCluster;

/// A topic to create at start-up: `name:partitions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MockTopic {
    pub name: String,
    pub partitions: i32,
}

impl std::str::FromStr for MockTopic {
    type Err = ConnectorError;

    /// A malformed topic is a configuration error.
    fn from_str(s: &str) -> Result<Self, ConnectorError> {
        let (name, partitions) = s.rsplit_once(':').ok_or_else(|| ConnectorError::config(format!("`{s}`: write a topic as NAME:PARTITIONS, e.g. rides:4")))?;
        let partitions: i32 = partitions.parse().map_err(|_| ConnectorError::config(format!("`{s}`: the partition count `{partitions}` is not a number")))?;
        if name.is_empty() || partitions < 1 {
            return Err(ConnectorError::config(format!("`{s}`: a topic needs a name and at least 1 partition")));
        }
        Ok(MockTopic { name: name.to_string(), partitions })
    }
}

/// Starts a one-broker mock cluster with `topics`; `bootstrap_servers()` gives its address.
/// The cluster lives as long as the returned handle. librdkafka failing to start it is internal;
/// a topic it refuses to create (a bad name) is a configuration error.
pub fn start(topics: &[MockTopic]) -> Result<MockCluster<'static, rdkafka::producer::DefaultProducerContext>, ConnectorError> {
    let cluster = MockCluster::new(1).map_err(|e| ConnectorError::internal(format!("cannot start the mock cluster: {e}")))?;
    for t in topics {
        cluster.create_topic(&t.name, t.partitions, 1).map_err(|e| ConnectorError::config(format!("cannot create topic {}: {e}", t.name)))?;
    }
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use rdkafka::{ClientConfig, Message, TopicPartitionList};
    use std::time::Duration;

    #[test]
    fn topics_are_written_name_colon_partitions() {
        assert_eq!("rides:4".parse(), Ok(MockTopic { name: "rides".into(), partitions: 4 }));
        assert_eq!("a:b:2".parse::<MockTopic>().map(|t| t.name), Ok("a:b".to_string()), "the last colon splits");
        assert_eq!("rides".parse::<MockTopic>().map_err(|e| e.to_string()), Err("`rides`: write a topic as NAME:PARTITIONS, e.g. rides:4".to_string()));
        for bad in ["rides", "rides:x", ":3", "rides:0"] {
            assert!(bad.parse::<MockTopic>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn the_mock_broker_serves_produce_and_fetch_with_its_partitions() {
        let cluster = start(&["in:3".parse().unwrap()]).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: ThreadedProducer<DefaultProducerContext> =
            ClientConfig::new().set("bootstrap.servers", &brokers).set("enable.idempotence", "true").create().unwrap();
        for i in 0..30 {
            let key = format!("k{i}");
            producer.send(BaseRecord::to("in").key(&key).payload("v").partition(i % 3)).map_err(|(e, _)| e).unwrap();
        }
        producer.flush(Duration::from_secs(10)).unwrap();
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", "t").create().unwrap();
        let metadata = consumer.fetch_metadata(Some("in"), Duration::from_secs(5)).unwrap();
        assert_eq!(metadata.topics()[0].partitions().len(), 3, "the topic has the partitions asked for");
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset("in", p, rdkafka::Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut keys = std::collections::BTreeSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while keys.len() < 30 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                keys.insert(String::from_utf8(m.key().unwrap().to_vec()).unwrap());
            }
        }
        assert_eq!(keys.len(), 30, "every message produced is fetched back");
    }
}
