//! PostgreSQL: the upserting answer sink and its dead-letter table.

pub mod sink;

pub use sink::{PostgresTarget, PostgresWriter};
