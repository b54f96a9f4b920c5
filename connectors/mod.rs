//! Connectors to external systems, one folder per system: `files` (CSV in, JSON lines out),
//! `kafka` (partition-owning source, results sink, request client), `postgres` (upserting
//! sink) and `generator` (built-in rides). `registry` maps topology types to them; each
//! implements the engine's source or sink contract (`crate::source`, `crate::sink`).

pub mod files;
pub mod generator;
pub mod kafka;
pub mod loadgen;
pub mod postgres;
pub mod pubsub;
pub mod registry;
pub mod results;
