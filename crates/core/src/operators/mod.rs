//! Timely operators of the engine, one per file: keying requests by ID (a differential
//! collection), asynchronous inference, and the durable sink whose progress acknowledges sources;
//! and the tracing span each operator's work runs in.

pub mod decode;
pub mod infer;
pub mod key_by_id;
pub mod sink;

/// The span an operator of a job runs in on one worker, named `<pipeline>.<operator>` (e.g.
/// `rides.infer`), with the fields `pipeline`, `operator` and `worker`, so that log lines and any
/// tracing subscriber attribute work to the operator. Create it once per operator instance and
/// enter it per activation: about 2 ns when no subscriber wants it (the CLI's default `warn`
/// filter), under 40 ns with the `fmt` subscriber at `info`. A `tracing` span's own name is fixed
/// where it is written, so every operator span is named `operator`, and `<pipeline>.<operator>`
/// is its `name` field: `operator{name=rides.infer pipeline="rides" operator="infer" worker=0}`.
pub fn operator_span(pipeline: &str, operator: &'static str, worker: usize) -> tracing::Span {
    tracing::info_span!("operator", name = %format_args!("{pipeline}.{operator}"), pipeline, operator, worker)
}
