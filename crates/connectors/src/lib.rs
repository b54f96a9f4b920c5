//! sluice's connectors to external systems, one folder per system: `files` (CSV, Parquet and
//! JSON lines in folders and buckets, JSON lines out), `kafka` (partition-owning source, results
//! sink, request client), `postgres` (upserting sink), `pubsub` (shared-subscription source and
//! sink) and `generator` (built-in rides). Each implements the core's connector contract
//! (`sluice_core::connector`) and its source or sink contract; the binary's registry lists them.
//! Their errors are one type, [`ConnectorError`] (`error`), classed by domain and retry; `client`
//! is the request side that Kafka and Pub/Sub share.
// `unsafe` only where allowed by name: the Kafka source's batched reads (`kafka::fetch`).
#![deny(unsafe_code)]

pub mod client;
pub mod error;
pub mod files;
pub mod generator;
pub mod kafka;
pub mod loadgen;
pub mod postgres;
pub mod pubsub;
pub mod results;
pub mod rides;
pub mod sql;

pub use error::{ConnectorError, Domain, Retry};
