//! The sink contract: what one epoch hands to the sinks (changes, dead letters, the sources'
//! checkpoints), how a sink reports errors (transient, record-level, configuration), and how
//! the registry builds a sink for each worker. The durable-sink operator
//! (`crate::operators::sink`) drives every sink through this contract.

use crate::record::{Change, Column, DeadLetter};
use crate::source::Checkpoint;

/// Everything one worker's sinks must make durable for one epoch (or a group of epochs), in one go.
#[derive(Clone, Debug, Default)]
pub struct EpochBatch {
    pub epoch: u64,
    /// Upserts and deletes, in the order they were made; for an ID the last one wins.
    pub changes: Vec<Change>,
    pub dead: Vec<DeadLetter>,
    /// The sources' checkpoints reached by these epochs; a sink that stores checkpoints writes
    /// them atomically with the changes.
    pub checkpoints: Vec<Checkpoint>,
}

/// A sink error, classified by what helps.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The system is unreachable or failed the write (connection lost, timeout, serialization
    /// failure, broker unavailable): the write is retried with backoff.
    #[error("{0}")]
    Transient(String),
    /// The sink refused some record of the batch (for Postgres a data exception or a program
    /// limit; for Kafka a message too large): the batch is split until the failing records are
    /// isolated; they become dead letters and the rest is written.
    #[error("{0}")]
    Record(String),
    /// The sink refused these records of the batch before writing any of it (by their
    /// [`crate::record::Change::seq`], each with the reason), as Postgres does a value whose type
    /// conflicts with its column: they become dead letters and the rest is written, with no
    /// splitting of the batch to find them.
    #[error("{} records refused, the first: {}", .0.len(), .0.first().map(|r| r.1.as_str()).unwrap_or(""))]
    Refused(Vec<(u64, String)>),
    /// The sink cannot work as configured: the run stops with this message.
    #[error("{0}")]
    Config(String),
}

/// A sink that makes one epoch durable at a time. It runs on a sink thread, never on a worker.
pub trait SinkWriter: Send + 'static {
    /// Short kind name for logs and metric labels.
    fn kind(&self) -> &'static str;
    /// Writes the batch; must be idempotent, as a batch is written again after a failure.
    fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError>;
    /// Whether this sink stores the sources' checkpoints with the changes. It is written last
    /// in each epoch, so checkpoints only become durable after every other sink holds the epoch.
    fn stores_checkpoints(&self) -> bool {
        false
    }
}

/// What a sink is told about the pipeline it serves.
#[derive(Clone, Debug)]
pub struct SinkContext {
    /// The pipeline's name; with the sink's target it is the pipeline's identity.
    pub pipeline: String,
    /// The task's output columns.
    pub columns: &'static [Column],
    /// Whether the source resumes from checkpoints. When not, a rerun reads everything again,
    /// and an append-only sink starts its output afresh.
    pub resumable: bool,
    /// Global indices of this process's workers.
    pub workers: std::ops::Range<usize>,
}

/// Builds a topology's sink: once per process to prepare it, then a writer per worker.
pub trait SinkFactory: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// Where it writes, for people.
    fn describe(&self) -> String;
    /// Prepares the sink before the run (connects, creates tables, restores files), so that a
    /// configuration error shows at start-up. A sink that stores checkpoints returns those it
    /// holds for this pipeline.
    fn open(&self, ctx: &SinkContext) -> Result<Option<Vec<Checkpoint>>, SinkError>;
    /// The writer of worker `worker`.
    fn writer(&self, ctx: &SinkContext, worker: usize) -> Result<Box<dyn SinkWriter>, SinkError>;
}
