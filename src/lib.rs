//! sluice: a streaming inference engine on timely dataflow. This package is the binary crate's
//! library: the [`registry`] that lists every connector, and, re-exported, the engine core
//! (`sluice-core`) and the connectors (`sluice-connectors`), so that tools, tests and benches
//! name one crate.
#![forbid(unsafe_code)]

pub mod registry;

pub use sluice_connectors as connectors;
pub use sluice_connectors::{rides, sql};
pub use sluice_core::*;
