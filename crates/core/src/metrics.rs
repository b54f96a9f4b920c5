//! Every metric name sluice emits, in one place, and the Prometheus exporter.
//!
//! Names follow `sluice_<subsystem>_<name>_<unit>`; counters end in `_total`. Labels stay low in
//! cardinality: a connector name, a dead-letter reason, a sink kind.

use crate::record::DeadReason;
use std::net::SocketAddr;

/// Records read by a source. Label: `connector`.
pub const SOURCE_RECORDS: &str = "sluice_source_records_total";
/// Counter: errors a source's client reported (a missing topic, refused authorization, a broker
/// unreachable). Labels: `connector`, `kind` (`unknown_topic`, `authorization`, `broker`, `other`).
pub const SOURCE_ERRORS: &str = "sluice_source_errors_total";
/// Answers made durable by the sinks.
pub const ANSWERS: &str = "sluice_sink_answers_total";
/// Dead letters, by `reason`.
pub const DEAD_LETTERS: &str = "sluice_dead_letters_total";
/// Units (windows, rows) per model run.
pub const BATCH_SIZE: &str = "sluice_inference_batch_size";
/// Seconds one model run took.
pub const INFERENCE_LATENCY: &str = "sluice_inference_latency_seconds";
/// Units waiting for the model.
pub const INFERENCE_QUEUE: &str = "sluice_inference_queue_depth";
/// Seconds from ingest to a durable answer.
pub const END_TO_END_LATENCY: &str = "sluice_end_to_end_latency_seconds";
/// Epochs a source has opened that the sinks have not yet made durable.
pub const EPOCHS_IN_FLIGHT: &str = "sluice_source_epochs_in_flight";
/// Counter: records dropped because their ID's content was unchanged (no inference, no write).
pub const UNCHANGED: &str = "sluice_records_unchanged_total";
/// Counter: records a sink refused (isolated from their batch and dead-lettered), by sink.
pub const SINK_REJECTED: &str = "sluice_sink_rejected_total";
/// Counter: model runs retried or split after an error.
pub const INFERENCE_RETRIES: &str = "sluice_inference_retries_total";
/// Sink write failures that were retried. Label: `sink`.
pub const SINK_RETRIES: &str = "sluice_sink_retries_total";
/// Counter: rows a file source read (changed or not).
pub const FILE_ROWS_SEEN: &str = "sluice_file_rows_seen_total";
/// Counter: rows a file source sent on because they were new or changed.
pub const FILE_ROWS_RECOMPUTED: &str = "sluice_file_rows_recomputed_total";
/// Counter: rows whose answers a file source deleted (gone from their file, or the file gone).
pub const FILE_ROWS_RETRACTED: &str = "sluice_file_rows_retracted_total";
/// Gauge: files a file source knows, by `state` (current, settling) and `worker`.
pub const FILES: &str = "sluice_files";
/// 1 while a watched location that had files lists none (its answers are kept), else 0.
pub const FILES_ROOT_EMPTY: &str = "sluice_files_root_empty";
/// Counter: sessions that ran on the CPU because CUDA could not be used and
/// `execution.fallback = "cpu"` allowed it.
pub const EXECUTION_FALLBACKS: &str = "sluice_execution_fallbacks_total";
/// Gauge: model sessions open, by `provider` (cpu, cuda).
pub const MODEL_SESSIONS: &str = "sluice_model_sessions";
/// Seconds one sink epoch write took. Label: `sink`.
pub const SINK_WRITE_LATENCY: &str = "sluice_sink_write_seconds";
/// Counter: Pub/Sub streaming pulls that ended (an error outside the client library's retry
/// set, such as UNKNOWN or CANCELLED) and were opened again.
pub const PUBSUB_PULL_RESTARTS: &str = "sluice_pubsub_pull_restarts_total";

/// Installs the Prometheus exporter on `addr` and registers every metric with a description.
pub fn install(addr: SocketAddr) -> Result<(), metrics_exporter_prometheus::BuildError> {
    builder()?.with_http_listener(addr).install()?;
    describe();
    Ok(())
}

static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();

/// Installs the Prometheus recorder without a listener of its own (`sluice serve` renders
/// `/metrics` on its port, see [`render`]); its upkeep runs every second on a thread.
pub fn install_recorder() -> Result<(), String> {
    let handle = builder().and_then(|b| b.install_recorder()).map_err(|e| e.to_string())?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("sluice-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            upkeep.run_upkeep();
        })
        .map_err(|e| e.to_string())?;
    let _ = HANDLE.set(handle);
    describe();
    Ok(())
}

/// The metrics in Prometheus's text format, once [`install_recorder`] has run.
pub fn render() -> Option<String> {
    HANDLE.get().map(|h| h.render())
}

fn builder() -> Result<metrics_exporter_prometheus::PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        // Histogram samples wait in memory until the next upkeep folds them into the buckets:
        // at 300,000 answers a second the default 5 s held about 20 MB of them.
        .upkeep_timeout(std::time::Duration::from_secs(1))
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.to_string()), &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0])
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Suffix("_seconds".to_string()),
                &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            )
        })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(SOURCE_RECORDS, "Records read by a source.");
    describe_counter!(SOURCE_ERRORS, "Errors a source's client reported, by connector and kind.");
    describe_counter!(ANSWERS, "Answers made durable by the sinks.");
    describe_counter!(DEAD_LETTERS, "Records refused, by reason.");
    describe_counter!(UNCHANGED, "Records whose ID's content was unchanged: not recomputed.");
    describe_counter!(SINK_REJECTED, "Records a sink refused, isolated and dead-lettered, by sink.");
    describe_counter!(INFERENCE_RETRIES, "Model runs retried or split after an error.");
    describe_histogram!(BATCH_SIZE, "Units per model run.");
    describe_histogram!(INFERENCE_LATENCY, "Seconds per model run.");
    describe_gauge!(INFERENCE_QUEUE, "Units waiting for the model.");
    describe_histogram!(END_TO_END_LATENCY, "Seconds from ingest to a durable answer.");
    describe_gauge!(EPOCHS_IN_FLIGHT, "Epochs not yet durable at the sinks.");
    describe_counter!(SINK_RETRIES, "Sink writes retried after an error.");
    describe_counter!(FILE_ROWS_SEEN, "Rows a file source read, changed or not.");
    describe_counter!(FILE_ROWS_RECOMPUTED, "Rows a file source sent to the model because they were new or changed.");
    describe_counter!(FILE_ROWS_RETRACTED, "Rows whose answers a file source deleted.");
    describe_gauge!(FILES, "Files a file source knows, by state.");
    describe_gauge!(FILES_ROOT_EMPTY, "1 while a file source's location that had files lists none; its answers are kept until it lists again.");
    describe_counter!(EXECUTION_FALLBACKS, "Sessions run on the CPU because CUDA could not be used (execution.fallback = cpu).");
    describe_gauge!(MODEL_SESSIONS, "Model sessions open, by provider.");
    describe_histogram!(SINK_WRITE_LATENCY, "Seconds per sink epoch write.");
    describe_counter!(PUBSUB_PULL_RESTARTS, "Pub/Sub streaming pulls that ended on an error the client does not retry, and were opened again.");
    for reason in DeadReason::ALL {
        metrics::counter!(DEAD_LETTERS, "reason" => reason.as_str()).increment(0);
    }
}
