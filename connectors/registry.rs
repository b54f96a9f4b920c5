//! The registry: the one place that maps a topology's `[source] type` and `[[sinks]] type` to
//! connectors. The engine core knows sources and sinks only through the contracts in
//! `crate::source` and `crate::sink`; adding a connector is a folder and a variant here.

use super::files::csv::{CsvConfig, CsvFactory};
use super::files::jsonl::JsonlConfig;
use super::generator::GeneratorConfig;
use super::kafka::sink::KafkaSinkConfig;
use super::kafka::source::{KafkaFactory, KafkaSourceConfig};
use super::postgres::sink::PostgresConfig;
use crate::sink::SinkFactory;
use crate::source::SourceFactory;
use serde::Deserialize;
use std::sync::Arc;

/// A source of requests, tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// CSV files: one file, a glob, or a directory of `*.csv`.
    Csv(CsvConfig),
    /// Kafka: partitions are owned by timely workers (partition % workers == worker index).
    Kafka(KafkaSourceConfig),
    /// The built-in ride generator (no server needed).
    Generator(GeneratorConfig),
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
}

impl SourceConfig {
    /// Refuses settings that cannot work: `(field, message, hint)`.
    pub fn check(&self) -> Result<(), (&'static str, String, &'static str)> {
        match self {
            SourceConfig::Csv(c) => c.check(),
            SourceConfig::Kafka(c) => c.check(),
            SourceConfig::Generator(c) => c.check(),
        }
    }

    /// The factory that builds each worker's source; `pipeline` names the default consumer group.
    pub fn factory(&self, pipeline: &str) -> Result<Arc<dyn SourceFactory>, String> {
        Ok(match self {
            SourceConfig::Csv(c) => Arc::new(CsvFactory { config: c.clone(), files: super::files::expand(&c.path)? }),
            SourceConfig::Kafka(c) => Arc::new(KafkaFactory {
                config: c.clone(),
                brokers: crate::topology::expand_env(&c.brokers),
                group_id: c.group_id.clone().unwrap_or_else(|| format!("sluice-{pipeline}")),
            }),
            SourceConfig::Generator(c) => Arc::new(c.clone()),
        })
    }
}

impl SinkConfig {
    /// The sink's factory.
    pub fn factory(&self) -> Arc<dyn SinkFactory> {
        match self {
            SinkConfig::Jsonl(c) => Arc::new(c.clone()),
            SinkConfig::Postgres(c) => Arc::new(c.clone()),
            SinkConfig::Kafka(c) => Arc::new(c.clone()),
        }
    }

    /// The embedded default: JSON lines in `dir`.
    pub fn default_jsonl(dir: std::path::PathBuf) -> Self {
        SinkConfig::Jsonl(JsonlConfig { dir })
    }
}
