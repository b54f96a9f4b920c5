//! The registry: the one place that maps a topology's `[source] type` and `[[sinks]] type` to
//! connectors. The engine core knows sources and sinks only through the contracts in
//! `crate::source` and `crate::sink`; adding a connector is a folder and a variant here.

use super::files::csv::{CsvConfig, CsvFactory};
use super::files::jsonl::JsonlConfig;
use super::files::live::{FilesConfig, FilesFactory};
use super::generator::GeneratorConfig;
use super::kafka::sink::KafkaSinkConfig;
use super::kafka::source::{KafkaFactory, KafkaSourceConfig};
use super::postgres::sink::PostgresConfig;
use super::pubsub::sink::PubsubSinkConfig;
use super::pubsub::source::{PubsubFactory, PubsubSourceConfig};
use crate::sink::SinkFactory;
use crate::source::{SourceError, SourceFactory};
use crate::topology::RuntimeConfig;
use serde::Deserialize;
use std::sync::Arc;

/// A source of requests, tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// CSV files: one file, a glob, or a directory of `*.csv`.
    Csv(CsvConfig),
    /// Files in a folder or a bucket (S3, GCS), read once or watched; only changed rows are
    /// recomputed, and removed rows' answers are deleted.
    Files(FilesConfig),
    /// Kafka: partitions are owned by timely workers (partition % workers == worker index).
    Kafka(KafkaSourceConfig),
    /// The built-in ride generator (no server needed).
    Generator(GeneratorConfig),
    /// Google Pub/Sub: a pull subscription shared by every worker; acked once durable.
    Pubsub(PubsubSourceConfig),
}

/// A sink, tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SinkConfig {
    /// JSON lines: `answers.w<worker>.jsonl` and `dead_letters.w<worker>.jsonl` in `dir`.
    Jsonl(JsonlConfig),
    /// PostgreSQL: one upserted row per request ID, written in one transaction per epoch.
    Postgres(PostgresConfig),
    /// Kafka: answers keyed by request ID (also in a `request_id` header); at-least-once.
    Kafka(KafkaSinkConfig),
    /// Google Pub/Sub: answers with the request ID as an attribute; at-least-once.
    Pubsub(PubsubSinkConfig),
}

impl SourceConfig {
    /// Refuses settings that cannot work: `(field, message, hint)`.
    pub fn check(&self) -> Result<(), (&'static str, String, &'static str)> {
        match self {
            SourceConfig::Csv(c) => c.check(),
            SourceConfig::Files(c) => c.check(),
            SourceConfig::Kafka(c) => c.check(),
            SourceConfig::Generator(c) => c.check(),
            SourceConfig::Pubsub(c) => c.check(),
        }
    }

    /// The factory that builds each worker's source; `pipeline` names the default consumer group,
    /// and `runtime` bounds what a source may hold unacknowledged. A source whose input cannot be
    /// found (no file matches) is a configuration error.
    pub fn factory(&self, pipeline: &str, runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError> {
        Ok(match self {
            SourceConfig::Csv(c) => Arc::new(CsvFactory { config: c.clone(), files: super::files::expand(&c.path).map_err(SourceError::Config)? }),
            SourceConfig::Files(c) => Arc::new(FilesFactory::new(c.clone())?),
            SourceConfig::Kafka(c) => Arc::new(KafkaFactory {
                config: c.clone(),
                brokers: crate::topology::expand_env(&c.brokers),
                group_id: c.group_id.clone().unwrap_or_else(|| format!("sluice-{pipeline}")),
                missing_since: Default::default(),
            }),
            SourceConfig::Generator(c) => Arc::new(c.clone()),
            SourceConfig::Pubsub(c) => Arc::new(PubsubFactory::new(c.clone(), runtime.max_records_in_flight)),
        })
    }
}

impl SinkConfig {
    /// Refuses settings that cannot work: `(field within the sink, message, hint)`.
    pub fn check(&self) -> Result<(), (&'static str, String, String)> {
        match self {
            SinkConfig::Jsonl(_) => Ok(()),
            SinkConfig::Pubsub(p) => p.check(),
            SinkConfig::Kafka(k) => {
                if k.brokers.is_empty() || k.topic.is_empty() {
                    return Err(("", "needs `brokers` and `topic`".into(), "e.g. brokers = \"127.0.0.1:19092\", topic = \"ride-durations\"".into()));
                }
                Ok(())
            }
            SinkConfig::Postgres(pg) => {
                if pg.url.is_empty() {
                    return Err(("url", "is empty".into(), "use postgres://user:password@host:5432/database".into()));
                }
                for (field, name) in [("table", &pg.table), ("dead_letter_table", &pg.dead_letter_table), ("schema", &pg.schema)] {
                    if let Err(why) = crate::sql::check_identifier(name) {
                        return Err((field, why, "use 1 to 63 bytes with no NUL or control characters, e.g. qa_answers".into()));
                    }
                }
                super::postgres::tls::check(&crate::topology::expand_env(&pg.url), pg.tls_root_cert.as_deref(), pg.tls_verify)
            }
        }
    }

    /// The sink's factory.
    pub fn factory(&self) -> Arc<dyn SinkFactory> {
        match self {
            SinkConfig::Jsonl(c) => Arc::new(c.clone()),
            SinkConfig::Postgres(c) => Arc::new(c.clone()),
            SinkConfig::Kafka(c) => Arc::new(c.clone()),
            SinkConfig::Pubsub(c) => Arc::new(c.clone()),
        }
    }

    /// The embedded default: JSON lines in `dir`.
    pub fn default_jsonl(dir: std::path::PathBuf) -> Self {
        SinkConfig::Jsonl(JsonlConfig { dir })
    }
}

#[cfg(test)]
mod tests {
    use super::{SinkConfig, SourceConfig};

    #[test]
    fn kafka_source_and_sinks_parse_with_defaults() {
        let text = r#"name = "k"
[source]
type = "kafka"
brokers = "127.0.0.1:19092"
topic = "rides"
id = { from = "key" }
[task]
type = "tabular"
model = "Cargo.toml"
[[sinks]]
type = "kafka"
brokers = "127.0.0.1:19092"
topic = "out"
"#;
        let t = crate::topology::Topology::parse("k.toml", text).unwrap();
        let SourceConfig::Kafka(k) = t.source else { panic!("kafka source") };
        assert_eq!(k.id, crate::source::IdFrom::Key);
        assert_eq!((k.epoch_ms, k.start), (50, super::super::kafka::source::StartFrom::Earliest));
        assert!(matches!(&t.sinks[0], SinkConfig::Kafka(s) if s.idempotent));
        let tuned = text.replace("id = { from = \"key\" }", "id = { from = \"key\" }\nclient = { \"fetch.wait.max.ms\" = \"20\" }");
        let SourceConfig::Kafka(k) = crate::topology::Topology::parse("k.toml", &tuned).unwrap().source else { panic!("kafka source") };
        let client = k.client;
        assert_eq!(client.get("fetch.wait.max.ms").map(String::as_str), Some("20"), "librdkafka properties pass through");
        let bad = text.replace("id = { from = \"key\" }", "id = { from = \"nowhere\" }");
        assert!(crate::topology::Topology::parse("k.toml", &bad).is_err());
    }
}
