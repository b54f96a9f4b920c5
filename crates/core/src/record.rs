//! The record envelope every stage carries: request ID, payload, source position and ingest time,
//! plus the changes (upserts and deletes) and dead-letter shapes the sinks write.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a position's number counts, for people and for derived IDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PosUnit {
    /// A data row of a file, counted from 1 (the header is not a row); `shard` is unused.
    Row,
    /// An offset within a shard (a Kafka partition).
    Offset,
    /// A sequence number of a generated record.
    Seq,
    /// A message ID (a Pub/Sub message); `shard` is unused.
    Message,
}

/// Where a record came from, precise enough to replay or acknowledge it. It names no connector:
/// `source` is a file's path relative to its source root, a topic or a subscription; `shard` a
/// partition; `offset` a row, an offset or a sequence number, as `unit` says.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SourcePos {
    pub source: std::sync::Arc<str>,
    pub shard: i32,
    pub offset: u64,
    pub unit: PosUnit,
}

impl SourcePos {
    /// A data row of a file (`file` relative to the source root).
    pub fn row(file: std::sync::Arc<str>, row: u64) -> Self {
        SourcePos { source: file, shard: 0, offset: row, unit: PosUnit::Row }
    }

    /// An offset within a shard of a stream.
    pub fn offset(source: std::sync::Arc<str>, shard: i32, offset: u64) -> Self {
        SourcePos { source, shard, offset, unit: PosUnit::Offset }
    }

    /// A message of a subscription, by its message ID.
    pub fn message(source: std::sync::Arc<str>, id: u64) -> Self {
        SourcePos { source, shard: 0, offset: id, unit: PosUnit::Message }
    }

    /// A generated record.
    pub fn seq(source: std::sync::Arc<str>, seq: u64) -> Self {
        SourcePos { source, shard: 0, offset: seq, unit: PosUnit::Seq }
    }

    /// The source name (file or topic) as written to the dead-letter table.
    pub fn source(&self) -> String {
        self.source.to_string()
    }

    /// The position within the source, as written to the dead-letter table.
    pub fn position(&self) -> String {
        match self.unit {
            PosUnit::Row => format!("row {}", self.offset),
            PosUnit::Offset => format!("partition {} offset {}", self.shard, self.offset),
            PosUnit::Seq => format!("seq {}", self.offset),
            PosUnit::Message => format!("message {}", self.offset),
        }
    }

    /// The ID of a record that carries none: stable across replays, never random.
    /// `2024/q.csv:17` for a file row, `rides/2/1043` for a stream offset, `1043` for a message.
    pub fn derived_id(&self) -> String {
        match self.unit {
            PosUnit::Row => format!("{}:{}", self.source, self.offset),
            PosUnit::Offset => format!("{}/{}/{}", self.source, self.shard, self.offset),
            PosUnit::Seq => format!("{}-{}", self.source, self.offset),
            PosUnit::Message => self.offset.to_string(),
        }
    }
}

impl fmt::Display for SourcePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.source(), self.position())
    }
}

/// A request on its way through the dataflow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<P> {
    /// The request ID: from the message, or derived deterministically from the source position.
    pub id: String,
    /// The task's request payload; `None` asks to delete the ID's answer (a tombstone).
    pub payload: Option<P>,
    /// Columns or fields that pass through to the answer unchanged, in source order.
    pub passthrough: Vec<PassField>,
    /// Where the request came from.
    pub pos: SourcePos,
    /// Wall-clock milliseconds since the Unix epoch when the source read it.
    pub ingest_ms: u64,
    /// The original bytes, so that a dead letter from any later stage carries them.
    pub raw: Vec<u8>,
    /// Hash of the record's content (its bytes; not its position or ingest time): an ID that
    /// arrives again with the same hash is not recomputed.
    pub content: u64,
    /// Order of this change among the changes of its ID's worker, given when it is keyed by ID;
    /// sinks apply an epoch's changes in this order.
    pub seq: u64,
    /// The record replaces an answer its ID has (a table's changed row): if it fails (the model
    /// or a sink refuses it), that answer is retracted, as a fresh read would give none.
    #[serde(default)]
    pub replaces: bool,
}

/// The content hash of a record's bytes (XXH3: stable across builds and processes, and a
/// fraction of SipHash's cost per byte).
pub fn content_hash(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
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

/// The type of a column: a task output's, or a pass-through column's as the source inferred it
/// (arrow's CSV inference, or a Parquet file's schema).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ColumnKind {
    #[default]
    Text,
    Int,
    Float,
    Bool,
    Timestamp,
}

impl ColumnKind {
    /// The kind's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            ColumnKind::Text => "text",
            ColumnKind::Int => "integer",
            ColumnKind::Float => "float",
            ColumnKind::Bool => "boolean",
            ColumnKind::Timestamp => "timestamp",
        }
    }

    /// A pass-through value of this kind as JSON: a number or boolean when it reads as one,
    /// else the text as it came.
    pub fn json(self, text: &str) -> serde_json::Value {
        let t = text.trim();
        let typed = match self {
            ColumnKind::Int => t.parse::<i64>().ok().map(serde_json::Value::from),
            ColumnKind::Float => t.parse::<f64>().ok().filter(|x| x.is_finite()).map(serde_json::Value::from),
            ColumnKind::Bool => match t.to_ascii_lowercase().as_str() {
                "true" => Some(serde_json::Value::Bool(true)),
                "false" => Some(serde_json::Value::Bool(false)),
                _ => None,
            },
            ColumnKind::Text | ColumnKind::Timestamp => None,
        };
        typed.unwrap_or_else(|| serde_json::Value::String(text.to_string()))
    }
}

/// A column that passes through from the request to its answer: its name, its value as the
/// source read it, and its kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassField {
    pub name: String,
    pub value: String,
    pub kind: ColumnKind,
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
    pub passthrough: Vec<PassField>,
    /// Model name and version, e.g. `minilm-squad@3f2a9c01d4e5`.
    pub model: std::sync::Arc<str>,
    pub pos: SourcePos,
    pub ingest_ms: u64,
    /// The request's original bytes, for a dead letter if a sink refuses this answer.
    pub raw: Vec<u8>,
    /// Order among its worker's changes (see [`Envelope::seq`]).
    pub seq: u64,
    /// See [`Envelope::replaces`].
    #[serde(default)]
    pub replaces: bool,
}

/// The removal of an ID's answer, in every sink.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deleted {
    pub id: String,
    pub pos: SourcePos,
    pub ingest_ms: u64,
    pub seq: u64,
}

/// What reaches a sink: an answer to upsert by its ID, or an ID whose answer is deleted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    Upsert(Answer),
    Delete(Deleted),
}

impl Change {
    pub fn id(&self) -> &str {
        match self {
            Change::Upsert(a) => &a.id,
            Change::Delete(d) => &d.id,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Change::Upsert(a) => a.seq,
            Change::Delete(d) => d.seq,
        }
    }

    pub fn pos(&self) -> &SourcePos {
        match self {
            Change::Upsert(a) => &a.pos,
            Change::Delete(d) => &d.pos,
        }
    }
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
    /// A request ID with a NUL byte, invalid UTF-8, or longer than `runtime.max_id_bytes`.
    InvalidId,
    /// A text field with a NUL byte, which no SQL text column can hold.
    InvalidText,
    /// A sink refused the record itself (for Postgres a data exception or a program limit; for
    /// Kafka a message too large); the rest of its batch was written.
    SinkRejected,
    /// The task's code panicked on this record; the panic was contained.
    TaskFailed,
    /// A row of a file whose `id` an earlier row of the same file already has.
    DuplicateId,
}

impl DeadReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [DeadReason; 17] = [
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
        DeadReason::InvalidId,
        DeadReason::InvalidText,
        DeadReason::SinkRejected,
        DeadReason::TaskFailed,
        DeadReason::DuplicateId,
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
            DeadReason::InvalidId => "invalid_id",
            DeadReason::InvalidText => "invalid_text",
            DeadReason::SinkRejected => "sink_rejected",
            DeadReason::TaskFailed => "task_failed",
            DeadReason::DuplicateId => "duplicate_id",
        }
    }
}

/// A refused record: the reason, a human detail, and the original bytes, so nothing is lost.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeadLetter {
    pub pos: SourcePos,
    pub reason: DeadReason,
    pub detail: String,
    /// The original bytes, cut to `runtime.max_dead_letter_bytes` by [`DeadLetter::bound`].
    pub raw: Vec<u8>,
    pub ingest_ms: u64,
    /// The full length of the original bytes (set by [`DeadLetter::bound`]).
    pub raw_len: u64,
    /// Hex SHA-256 of the full original bytes (set by [`DeadLetter::bound`]).
    pub raw_sha256: String,
}

impl DeadLetter {
    pub fn new(pos: SourcePos, reason: DeadReason, detail: String, raw: Vec<u8>, ingest_ms: u64) -> Self {
        DeadLetter { pos, reason, detail, raw, ingest_ms, raw_len: 0, raw_sha256: String::new() }
    }

    /// Bounds the dead letter before a sink sees it: raw bytes above `limit` are cut, and the
    /// full length and SHA-256 are kept; a detail is cut to 1,000 bytes; NUL bytes in the
    /// detail (which no text column can hold) become U+FFFD.
    pub fn bound(&mut self, limit: usize) {
        use sha2::{Digest, Sha256};
        if self.raw_sha256.is_empty() {
            self.raw_len = self.raw.len() as u64;
            self.raw_sha256 = hex::encode(Sha256::digest(&self.raw));
        }
        self.raw.truncate(limit);
        if self.detail.len() > 1000 {
            let mut cut = 1000;
            while !self.detail.is_char_boundary(cut) {
                cut -= 1;
            }
            self.detail.truncate(cut);
            self.detail.push('…');
        }
        if self.detail.contains('\0') {
            self.detail = self.detail.replace('\0', "\u{FFFD}");
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
