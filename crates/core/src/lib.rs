//! sluice's engine core: requests from sources (behind the [`source`] and [`sink`] contracts and
//! the [`connector`] trait that builds them from a topology) are batched through ONNX Runtime
//! models by a shared inference service, and every answer is written, keyed by its request ID,
//! to durable sinks, exactly once in effect. This crate names no connector: those live in
//! `sluice-connectors`, and the binary's registry lists them.
#![forbid(unsafe_code)]

pub mod batcher;
pub mod connector;
pub mod engine;
pub mod execution;
pub mod fault;
pub mod guard;
pub mod hash;
pub mod inference;
pub mod json;
pub mod metrics;
pub mod online;
pub mod operators;
pub mod ortlib;
pub mod progress;
pub mod record;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod tasks;
pub mod topology;
