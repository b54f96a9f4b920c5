//! Connectors to external systems, one folder per system: `files` (CSV in, JSON lines out),
//! `kafka` (partition-owning source, results sink, request client) and `postgres` (upserting sink).

pub mod files;
pub mod kafka;
pub mod postgres;

use crate::record::{Answer, DeadLetter};

/// Everything one worker's sinks must make durable for one epoch, in one go.
#[derive(Debug, Default)]
pub struct EpochBatch {
    pub epoch: u64,
    pub answers: Vec<Answer>,
    pub dead: Vec<DeadLetter>,
    /// Source offsets reached by this epoch; a transactional sink stores them with the answers.
    pub offsets: Vec<kafka::source::SourceOffset>,
}

/// A sink error, with a retry hint.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The system is unreachable or failed the write; retrying later can succeed.
    #[error("{0}")]
    Transient(String),
    /// The sink cannot work as configured; retrying cannot help.
    #[error("{0}")]
    Fatal(String),
}

/// A sink that makes one epoch durable at a time. It runs on a sink thread, never on a worker.
pub trait SinkWriter: Send + 'static {
    /// Short kind name for logs and metric labels.
    fn kind(&self) -> &'static str;
    /// Writes the epoch; must be idempotent, as an epoch is written again after a failure.
    fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError>;
    /// Whether this sink stores source offsets with the answers. It is written last in each epoch,
    /// so offsets only become durable after every other sink holds the epoch's answers.
    fn stores_offsets(&self) -> bool {
        false
    }
}
