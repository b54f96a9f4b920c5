//! PostgreSQL: the upserting answer sink and its dead-letter table, over TLS (`tls.rs`) where asked.

pub mod sink;
pub mod tls;

pub use sink::{PostgresTarget, PostgresWriter};
