//! sluice: a streaming inference engine on timely dataflow. Requests come from files, Kafka or a
//! built-in generator (connectors behind the `source` and `sink` contracts), are batched through ONNX Runtime models by a per-process inference service,
//! and every answer is written, keyed by its request ID, to durable sinks, exactly once in effect.
#![forbid(unsafe_code)]

pub mod batcher;
#[path = "../connectors/mod.rs"]
pub mod connectors;
pub mod engine;
pub mod execution;
pub mod fault;
pub mod guard;
pub mod hash;
pub mod inference;
pub mod json;
pub mod metrics;
pub mod operators;
pub mod ortlib;
pub mod progress;
pub mod record;
pub mod rides;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod sql;
pub mod tasks;
pub mod topology;
