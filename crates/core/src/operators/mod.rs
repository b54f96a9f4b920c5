//! Timely operators of the engine, one per file: keying requests by ID (a differential
//! collection), asynchronous inference, and the durable sink whose progress acknowledges sources.

pub mod decode;
pub mod infer;
pub mod key_by_id;
pub mod sink;
