//! The record envelope every stage carries: request ID, payload, source position and ingest time,
//! plus the answer and dead-letter shapes the sinks write.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a record came from, precise enough to replay or acknowledge it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SourcePos {
    /// A data row of a file: `row` counts data rows from 1 (the header is not a row).
    File { file: String, row: u64, byte_offset: u64 },
    /// A Kafka message.
    Kafka { topic: std::sync::Arc<str>, partition: i32, offset: i64 },
    /// A record made by a built-in generator.
    Generated { seq: u64 },
}

impl SourcePos {
    /// The source name (file or topic) as written to the dead-letter table.
    pub fn source(&self) -> String {
        match self {
            SourcePos::File { file, .. } => file.clone(),
            SourcePos::Kafka { topic, .. } => topic.to_string(),
            SourcePos::Generated { .. } => "generator".to_string(),
        }
    }

    /// The position within the source, as written to the dead-letter table.
    pub fn position(&self) -> String {
        match self {
            SourcePos::File { row, .. } => format!("row {row}"),
            SourcePos::Kafka { partition, offset, .. } => format!("partition {partition} offset {offset}"),
            SourcePos::Generated { seq } => format!("seq {seq}"),
        }
    }
}

impl fmt::Display for SourcePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.source(), self.position())
    }
}

/// A request on its way through the dataflow.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Envelope<P> {
    /// The request ID: from the message, or derived deterministically from the source position.
    pub id: String,
    /// The task's request payload.
    pub payload: P,
    /// Columns or fields that pass through to the answer unchanged, in source order.
    pub passthrough: Vec<(String, String)>,
    /// Where the request came from.
    pub pos: SourcePos,
    /// Wall-clock milliseconds since the Unix epoch when the source read it.
    pub ingest_ms: u64,
}

/// One typed output value of a task.
#[derive(Clone, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
pub enum Value {
    Text(String),
    Int(i64),
    Float(f64),
}

impl Value {
    /// The value as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Text(s) => serde_json::Value::String(s.clone()),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(x) => serde_json::Value::from(*x),
        }
    }
}

/// The SQL type of a task output column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    Text,
    Int,
    Float,
}

/// A task output column: its name and type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub kind: ColumnKind,
}

/// A task's answer to one request, keyed by the request's ID.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub id: String,
    /// Output values, in the order of the task's `output_columns`.
    pub values: Vec<Value>,
    pub passthrough: Vec<(String, String)>,
    /// Model name and version, e.g. `minilm-squad@3f2a9c01d4e5`.
    pub model: std::sync::Arc<str>,
    pub pos: SourcePos,
    pub ingest_ms: u64,
}

/// Why a record was refused. The label is a low-cardinality metric label and a table column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DeadReason {
    MissingColumn,
    ExtraColumn,
    EmptyField,
    InvalidUtf8,
    BrokenQuoting,
    OversizeField,
    OversizeMessage,
    NotJson,
    MissingField,
    WrongType,
    QuestionTooLong,
    InferenceFailed,
}

impl DeadReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [DeadReason; 12] = [
        DeadReason::MissingColumn,
        DeadReason::ExtraColumn,
        DeadReason::EmptyField,
        DeadReason::InvalidUtf8,
        DeadReason::BrokenQuoting,
        DeadReason::OversizeField,
        DeadReason::OversizeMessage,
        DeadReason::NotJson,
        DeadReason::MissingField,
        DeadReason::WrongType,
        DeadReason::QuestionTooLong,
        DeadReason::InferenceFailed,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            DeadReason::MissingColumn => "missing_column",
            DeadReason::ExtraColumn => "extra_column",
            DeadReason::EmptyField => "empty_field",
            DeadReason::InvalidUtf8 => "invalid_utf8",
            DeadReason::BrokenQuoting => "broken_quoting",
            DeadReason::OversizeField => "oversize_field",
            DeadReason::OversizeMessage => "oversize_message",
            DeadReason::NotJson => "not_json",
            DeadReason::MissingField => "missing_field",
            DeadReason::WrongType => "wrong_type",
            DeadReason::QuestionTooLong => "question_too_long",
            DeadReason::InferenceFailed => "inference_failed",
        }
    }
}

/// A refused record: the reason, a human detail, and the original bytes, so nothing is lost.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeadLetter {
    pub pos: SourcePos,
    pub reason: DeadReason,
    pub detail: String,
    pub raw: Vec<u8>,
    pub ingest_ms: u64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
