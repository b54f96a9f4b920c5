//! The source contract: what every source supplies (raw records with a position, an ID hint
//! and, per epoch, opaque checkpoints) and what the engine's harness does for all of them
//! (`harness`: epochs, in-flight bounds, stopping, acknowledging only what is durable).
//! Decoding and validation are one engine stage (`crate::operators::decode`). A new source is
//! one folder under `connectors/` implementing [`Source`] and [`SourceFactory`], and one line
//! in `connectors/registry.rs`.

pub mod harness;

use crate::record::{DeadReason, SourcePos};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Where a request's ID comes from, for sources whose records are JSON messages.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdFrom {
    /// A top-level JSON field of the message (a string, or a number kept as its exact text).
    Field { name: String },
    /// The message key.
    Key,
    /// A message header (or attribute).
    Header { name: String },
    /// Always derived from the record's position.
    Position,
}

impl Default for IdFrom {
    fn default() -> Self {
        IdFrom::Field { name: "request_id".into() }
    }
}

/// How a record's payload is shaped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// A JSON object in `RawRecord::bytes`.
    Json,
    /// Named text fields the source already split (a CSV row); `RawRecord::bytes` keeps the
    /// original bytes for dead letters.
    Fields(Vec<(Arc<str>, String)>),
    /// Fields as `Fields`, with each field's kind as the source inferred it (a live file's schema),
    /// and whether the row replaces an answer its ID has (a changed row, not a new one): a row
    /// that then fails retracts that answer.
    Typed(Vec<(Arc<str>, String)>, Arc<[crate::record::ColumnKind]>, bool),
    /// No payload: a request to delete the ID's answer (a Kafka tombstone).
    Delete,
    /// The source could not frame the record; it becomes a dead letter with this reason.
    Refused(DeadReason, String),
}

/// One record as a source supplies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRecord {
    pub bytes: Vec<u8>,
    pub body: Body,
    pub pos: SourcePos,
    /// An ID the source read itself (a key, a header, an `id` cell), not yet validated. Without
    /// one, the decode stage reads it as `IdFrom` says, or derives it from the position.
    pub id: Option<Vec<u8>>,
    /// Wall-clock milliseconds since the Unix epoch when the source read it.
    pub ingest_ms: u64,
}

/// A source's opaque position, stored by a transactional sink with the answers of the epoch
/// that reached it, and handed back to the source on restart. `scope` names what it covers (a
/// topic), `shard` a part of it (a partition), `position` where to resume (the next offset).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Checkpoint {
    pub scope: String,
    pub shard: String,
    pub position: String,
}

/// What one poll of a source found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Records may be waiting: poll again soon.
    More,
    /// Nothing now: poll again after this long.
    Idle(Duration),
    /// A finite source has supplied everything.
    Done,
}

/// A source error, with a retry hint.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The system is unreachable or refused for now; the harness polls again after a backoff.
    #[error("{0}")]
    Transient(String),
    /// The source cannot work as configured; the run stops with this message.
    #[error("{0}")]
    Config(String),
}

/// One worker's instance of a source. It runs on its worker thread, driven by the harness.
pub trait Source: 'static {
    /// Reads at most `budget` records, stamped for `epoch`, into `out`.
    fn poll(&mut self, epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError>;
    /// Closes `epoch`: the checkpoints that the records read so far reach. A transactional sink
    /// stores them with that epoch's answers.
    fn checkpoint(&mut self, _epoch: u64) -> Vec<Checkpoint> {
        Vec::new()
    }
    /// Reading stops (a signal, or the end of finite input): the harness closes the open epoch
    /// right after, with [`Source::checkpoint`]. A source half-way through something (a long
    /// file) makes a checkpoint of how far it got, so a restart resumes there.
    fn stop(&mut self) {}
    /// Whether checkpoints are waiting even though no record is (a file whose new version
    /// changed nothing): the harness then closes the epoch to carry them.
    fn wants_checkpoint(&self) -> bool {
        false
    }
    /// Every epoch before `before` is durable in every sink: acknowledge its input (commit
    /// offsets, ack messages). Called again as durability advances, and with `u64::MAX` once
    /// everything read is durable at the end of a run.
    fn durable(&mut self, _before: u64) {}
    /// Records this worker will supply in total, when known in advance (for progress).
    fn total_hint(&self) -> Option<u64> {
        None
    }
    /// The model version (`name@version`) that answers from now on, told when the reading
    /// starts and whenever it changes, for a pipeline with `on_model_change = "recompute"`. A
    /// source that recomputes ([`SourceFactory::recomputes`]) supplies again every live row that
    /// another version answered, and stores the version with its checkpoints once all are, so a
    /// restart finishes what was left.
    fn answer_with(&mut self, _model: &str) {}
}

/// The model version a pipeline's answers come from, as its source harness follows it.
pub trait ModelVersion: Send + Sync {
    /// Changes whenever a new version is given to the model service.
    fn generation(&self) -> u64;
    /// `name@version` of the newest version.
    fn label(&self) -> std::sync::Arc<str>;
}

/// How the engine keys a source's records by ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keying {
    /// A table (files): within an epoch the record latest in its source wins, and the state
    /// (ID and content hash) is kept for every ID.
    Table,
    /// A table whose source supplies only changes (it diffs against its own durable state, as
    /// the live file source does), each ID's on the worker that answers it: no exchange, no
    /// per-ID state here, changes applied in the order supplied. A failed change (a row that
    /// no longer decodes, that the model or a sink refuses) retracts the ID's old answer, as a
    /// fresh read would give none.
    Changes,
    /// A stream: records are keyed as they arrive (no added latency), and the state remembers
    /// the most recent IDs only (a bounded window).
    Stream,
}

/// Builds each worker's [`Source`] from a topology's `[source]`.
pub trait SourceFactory: Send + Sync + 'static {
    /// The connector's name, for logs and metric labels.
    fn kind(&self) -> &'static str;
    /// This worker's source, resuming from `resume` (the checkpoints a sink stored).
    fn build(&self, worker: usize, peers: usize, resume: &[Checkpoint]) -> Result<Box<dyn Source>, SourceError>;
    /// Whether the source resumes from stored checkpoints. When not, a rerun reads everything
    /// again, and an append-only sink starts its output afresh.
    fn resumable(&self) -> bool;
    /// Whether this is a table or a stream.
    fn keying(&self) -> Keying;
    /// Whether its sources answer every live row again on a model change
    /// ([`Source::answer_with`]); only those can run `on_model_change = "recompute"`.
    fn recomputes(&self) -> bool {
        false
    }
    /// Clock epochs: close an epoch every this long (streams, so idle workers never hold back
    /// busy ones). `None`: close one every `runtime.epoch_records` records.
    fn epoch_every(&self) -> Option<Duration> {
        None
    }
    /// With clock epochs: whether a source that goes idle closes its epoch at once, instead of
    /// at the next tick, and while idle keeps its epoch a tick ahead, so that a worker with
    /// nothing to do never holds back the others' answers. For sources whose input comes in
    /// bursts with quiet between (a watched folder): a burst is answered as soon as it is read.
    fn closes_epoch_when_idle(&self) -> bool {
        false
    }
    /// Stop once nothing has arrived for this long (benchmarks and tests).
    fn idle_exit(&self) -> Option<Duration> {
        None
    }
    /// Where the request ID of a JSON record comes from.
    fn id_from(&self) -> IdFrom {
        IdFrom::Position
    }
    /// Names of what the source reads, for people (`kafka topic rides`).
    fn describe(&self) -> String;
}
