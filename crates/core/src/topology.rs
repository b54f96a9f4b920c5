//! The topology file: what a pipeline reads, which task and model it runs, how it batches and
//! where it writes. Parsing refuses unknown fields; validation names the file, the field and the fix.
//! The `[source]` and `[[sinks]]` tables are parsed by the connectors a [`Registry`] lists.

use crate::connector::{Registry, SinkSpec, SourceSpec};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A refused topology: the file, the field, what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError {
    pub file: String,
    pub field: String,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: field `{}`: {}\n  hint: {}", self.file, self.field, self.message, self.hint)
    }
}

impl std::error::Error for TopologyError {}

/// A whole pipeline.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Pipeline name; used for the default output folder and in logs.
    pub name: String,
    /// Where requests come from.
    pub source: Arc<dyn SourceSpec>,
    /// What the model computes.
    pub task: TaskConfig,
    /// Dynamic batching in the per-process inference service.
    pub batching: BatchingConfig,
    /// Where and how ONNX Runtime runs the model: CPU or CUDA, threads, device memory.
    pub execution: ExecutionConfig,
    /// Timely workers, epochs and backpressure.
    pub runtime: RuntimeConfig,
    /// Where answers and dead letters go: the file's, or the registry's default when it names none.
    pub sinks: Vec<Arc<dyn SinkSpec>>,
    /// Whether `sinks` is the registry's default (the file named none).
    pub default_sinks: bool,
    /// Prometheus metrics endpoint.
    pub metrics: MetricsConfig,
}

/// The file as written: connector tables still raw, with their place in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyFile {
    name: String,
    source: toml::Spanned<toml::Table>,
    task: TaskConfig,
    #[serde(default)]
    batching: BatchingConfig,
    #[serde(default)]
    execution: ExecutionConfig,
    #[serde(default)]
    runtime: RuntimeConfig,
    #[serde(default)]
    sinks: Vec<toml::Spanned<toml::Table>>,
    #[serde(default)]
    metrics: MetricsConfig,
}

/// Expands `${VAR}` and `${VAR:-default}` from the environment.
pub fn expand_env(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                let spec = &rest[start + 2..start + end];
                let (var, default) = spec.split_once(":-").unwrap_or((spec, ""));
                out.push_str(&std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string()));
                rest = &rest[start + end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The task and its model, tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskConfig {
    /// Extractive question answering over `question` and `context`.
    ExtractiveQa {
        /// ONNX model with inputs `input_ids`, `attention_mask` (and optionally `token_type_ids`) and
        /// outputs `start_logits`, `end_logits`.
        model: PathBuf,
        /// HF tokenizers `tokenizer.json`.
        tokenizer: PathBuf,
        /// Tokens per window, question and special tokens included.
        #[serde(default = "default_max_seq_len")]
        max_seq_len: usize,
        /// Tokens of overlap between consecutive context windows.
        #[serde(default = "default_doc_stride")]
        doc_stride: usize,
        /// Longest answer span, in tokens.
        #[serde(default = "default_max_answer_len")]
        max_answer_len: usize,
        /// Model name written with each answer; defaults to the model's folder name.
        #[serde(default)]
        model_name: Option<String>,
    },
    /// Tabular prediction: each model input is fed from the record field of the same name.
    Tabular {
        /// ONNX model (e.g. an sklearn pipeline exported with skl2onnx).
        model: PathBuf,
        /// Output holding the prediction; defaults to the model's first output.
        #[serde(default)]
        output: Option<String>,
        /// Model name written with each answer; defaults to the model's folder name.
        #[serde(default)]
        model_name: Option<String>,
    },
}

fn default_max_seq_len() -> usize {
    384
}
fn default_doc_stride() -> usize {
    128
}
fn default_max_answer_len() -> usize {
    30
}

/// How the inference service forms batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most units (QA windows, tabular rows) per model run.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Longest wait, after the first unit arrives, for a batch to fill.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// `longest` pads each batch only to its longest unit and groups units of similar length
    /// (the CPU default); `bucket` pads up to a multiple of `pad_multiple`, so a GPU sees few
    /// distinct shapes (the CUDA default); `max` pads every unit to the task's maximum.
    #[serde(default)]
    pub padding: Option<Padding>,
    /// The step of `bucket` padding, in tokens.
    #[serde(default = "default_pad_multiple")]
    pub pad_multiple: usize,
    /// Pad each batch's row count up to a power of two (rows the model computes and sluice
    /// discards), so batch sizes too come from a small set. Default: on with CUDA, off on the CPU.
    #[serde(default)]
    pub pad_rows: Option<bool>,
    /// Whether answers are independent of which units share a batch. `auto` says no for models
    /// with dynamic quantization (their activation scale spans the whole batch), which then run
    /// one unit per model call so every answer is reproducible.
    #[serde(default)]
    pub batch_invariant: BatchInvariance,
}

impl BatchingConfig {
    /// The padding in effect on `provider`: as configured, else `longest` on the CPU and
    /// `bucket` on CUDA.
    pub fn padding_on(&self, provider: Provider) -> Padding {
        self.padding.unwrap_or(match provider {
            Provider::Cpu => Padding::Longest,
            Provider::Cuda => Padding::Bucket,
        })
    }

    /// Whether batches' row counts are padded to powers of two on `provider`.
    pub fn pad_rows_on(&self, provider: Provider) -> bool {
        self.pad_rows.unwrap_or(provider == Provider::Cuda)
    }
}

/// Padding strategy for variable-length units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    #[default]
    Longest,
    Bucket,
    Max,
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    #[default]
    Cpu,
    Cuda,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
        }
    }
}

/// What a run does when its provider cannot be used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Refuse to start, saying what is missing.
    #[default]
    None,
    /// Run on the CPU instead, with a warning and the `sluice_execution_fallbacks_total` metric.
    Cpu,
}

/// Where and how ONNX Runtime runs the model. One place builds every session from it
/// (`crate::execution`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionConfig {
    /// `cpu` (the default) or `cuda`.
    #[serde(default)]
    pub provider: Provider,
    /// CUDA: which GPU.
    #[serde(default)]
    pub device_id: u32,
    /// ONNX Runtime intra-op threads; 0 means the task's default (one per core for QA, one for
    /// tabular models, whose runs take microseconds).
    #[serde(default)]
    pub intra_threads: usize,
    /// CUDA: the most device memory the provider's arena may take, in MiB; omit for no limit.
    #[serde(default)]
    pub gpu_mem_limit_mb: Option<u64>,
    /// `none` (the default) refuses to start when the provider cannot be used; `cpu` runs on the
    /// CPU instead, with a warning and a metric. Never silent.
    #[serde(default)]
    pub fallback: Fallback,
    /// Model runs in flight at once, each on its own session and thread, so the next batch is
    /// assembled and copied while the current one runs. Default: 1 on the CPU, 2 on CUDA.
    #[serde(default)]
    pub runs_in_flight: Option<usize>,
}

impl ExecutionConfig {
    /// Model runs in flight, as configured or by the provider's default.
    pub fn runs(&self) -> usize {
        self.runs_on(self.provider)
    }

    /// Model runs in flight on `provider` (where a session ended up: a CUDA run that fell back
    /// to the CPU runs as the CPU does unless configured).
    pub fn runs_on(&self, provider: Provider) -> usize {
        self.runs_in_flight.unwrap_or(match provider {
            Provider::Cpu => 1,
            Provider::Cuda => 2,
        })
    }
}

fn default_pad_multiple() -> usize {
    64
}

/// Whether batching may change a unit's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchInvariance {
    #[default]
    Auto,
    Yes,
    No,
}

fn default_max_batch() -> usize {
    8
}
fn default_max_delay_ms() -> u64 {
    5
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch: default_max_batch(),
            max_delay_ms: default_max_delay_ms(),
            padding: None,
            pad_multiple: default_pad_multiple(),
            pad_rows: None,
            batch_invariant: BatchInvariance::default(),
        }
    }
}

/// Worker threads, epochs and backpressure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Timely worker threads in this process (overridden by `--workers`).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// A source closes an epoch after this many records.
    #[serde(default = "default_epoch_records")]
    pub epoch_records: usize,
    /// A source pauses when this many of its epochs are not yet durable at the sinks.
    #[serde(default = "default_max_epochs_in_flight")]
    pub max_epochs_in_flight: u64,
    /// A source pauses while this many of a worker's records are not yet durable. Clock epochs
    /// can hold any number of records, so this (with the bytes and the drain-time bound) is what
    /// bounds memory. Within it, a worker admits no more than its pipeline has been measured to
    /// make durable in a quarter of `shutdown_grace_ms`, so a stop drains within the grace even when
    /// each record is slow (long QA contexts).
    #[serde(default = "default_max_records_in_flight")]
    pub max_records_in_flight: usize,
    /// A source pauses while a worker's records not yet durable hold this many bytes.
    #[serde(default = "default_max_bytes_in_flight")]
    pub max_bytes_in_flight: usize,
    /// Show a progress bar for finite inputs when stderr is a terminal.
    #[serde(default = "default_true")]
    pub progress: bool,
    /// A longer request ID is a dead letter (`invalid_id`).
    #[serde(default = "default_max_id_bytes")]
    pub max_id_bytes: usize,
    /// A dead letter keeps at most this many of its original bytes (with the full length and
    /// SHA-256), so that no dead letter is too large for a sink.
    #[serde(default = "default_max_dead_letter_bytes")]
    pub max_dead_letter_bytes: usize,
    /// After SIGTERM or SIGINT, the run has this long to drain; a sink still failing then ends
    /// the process non-zero, with nothing undurable acknowledged.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Streams: request IDs (per worker) whose content hash is remembered, so that an ID
    /// arriving again unchanged is answered once. Tables remember every ID.
    #[serde(default = "default_dedupe_window")]
    pub dedupe_window: usize,
    /// What a new model version does to the answers already made: `new_requests` (the default)
    /// answers later requests with it; `recompute` (a watched-files source) answers every live
    /// row again with it, replacing its answer in every sink.
    #[serde(default)]
    pub on_model_change: OnModelChange,
}

/// See [`RuntimeConfig::on_model_change`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnModelChange {
    #[default]
    NewRequests,
    Recompute,
}

fn default_max_id_bytes() -> usize {
    512
}
fn default_max_dead_letter_bytes() -> usize {
    262_144
}
fn default_shutdown_grace_ms() -> u64 {
    30_000
}
fn default_dedupe_window() -> usize {
    262_144
}

fn default_workers() -> usize {
    1
}
fn default_epoch_records() -> usize {
    256
}
fn default_max_epochs_in_flight() -> u64 {
    4
}
fn default_max_records_in_flight() -> usize {
    65536
}
fn default_max_bytes_in_flight() -> usize {
    64 << 20
}
fn default_true() -> bool {
    true
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            workers: default_workers(),
            epoch_records: default_epoch_records(),
            max_epochs_in_flight: default_max_epochs_in_flight(),
            max_records_in_flight: default_max_records_in_flight(),
            max_bytes_in_flight: default_max_bytes_in_flight(),
            progress: true,
            max_id_bytes: default_max_id_bytes(),
            max_dead_letter_bytes: default_max_dead_letter_bytes(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            dedupe_window: default_dedupe_window(),
            on_model_change: OnModelChange::default(),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve `/metrics` on; omit to serve none.
    #[serde(default)]
    pub listen: Option<String>,
}

impl Topology {
    /// Reads, parses and validates a topology file.
    pub fn load(path: &Path, registry: &Registry) -> Result<Topology, TopologyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            file: file.clone(),
            field: "(file)".into(),
            message: format!("cannot read the file: {e}"),
            hint: "pass the path of a topology .toml file, e.g. topologies/qa_csv.toml".into(),
        })?;
        Topology::parse(&file, &text, registry)
    }

    /// Parses and validates topology text; `file` names it in errors.
    pub fn parse(file: &str, text: &str, registry: &Registry) -> Result<Topology, TopologyError> {
        let raw: TopologyFile = toml::from_str(text).map_err(|e| parse_error(file, text, e.message(), e.span()))?;
        let source_span = raw.source.span();
        let source = registry.parse_source(raw.source.into_inner()).map_err(|m| parse_error(file, text, &m, Some(source_span.clone())))?;
        let mut sinks = Vec::with_capacity(raw.sinks.len());
        for (i, table) in raw.sinks.into_iter().enumerate() {
            let span = table.span();
            let sink = registry.parse_sink(table.into_inner()).map_err(|m| {
                let mut e = parse_error(file, text, &m, Some(span));
                e.field = if e.field == "(syntax)" { format!("sinks[{i}]") } else { format!("sinks[{i}].{}", e.field) };
                e
            })?;
            sinks.push(sink);
        }
        let default_sinks = sinks.is_empty();
        if default_sinks {
            sinks = registry.default_sinks(&raw.name);
        }
        let topology = Topology {
            name: raw.name,
            source,
            task: raw.task,
            batching: raw.batching,
            execution: raw.execution,
            runtime: raw.runtime,
            sinks,
            default_sinks,
            metrics: raw.metrics,
        };
        topology.validate(file)?;
        Ok(topology)
    }

    fn validate(&self, file: &str) -> Result<(), TopologyError> {
        let err =
            |field: &str, message: String, hint: &str| TopologyError { file: file.to_string(), field: field.to_string(), message, hint: hint.to_string() };
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(err("name", format!("`{}` is not a usable name", self.name), "use letters, digits, `_` and `-`, e.g. name = \"qa_csv\""));
        }
        if let Err(e) = self.source.check() {
            return Err(err(&e.field, e.message, &e.hint));
        }
        match &self.task {
            TaskConfig::ExtractiveQa { model, tokenizer, max_seq_len, doc_stride, max_answer_len, .. } => {
                if !model.is_file() {
                    return Err(err(
                        "task.model",
                        format!("no file at `{}`", model.display()),
                        "point it at an ONNX QA model, e.g. models/minilm-squad/model.onnx (relative paths resolve from the current directory)",
                    ));
                }
                if !tokenizer.is_file() {
                    return Err(err(
                        "task.tokenizer",
                        format!("no file at `{}`", tokenizer.display()),
                        "point it at the model's HF tokenizer.json, e.g. models/minilm-squad/tokenizer.json",
                    ));
                }
                if *max_seq_len < 32 {
                    return Err(err(
                        "task.max_seq_len",
                        format!("{max_seq_len} is too short for a question and a context"),
                        "use 384 (the default) or another value of at least 32",
                    ));
                }
                if *doc_stride >= *max_seq_len {
                    return Err(err(
                        "task.doc_stride",
                        format!("{doc_stride} is not below max_seq_len {max_seq_len}"),
                        "use a stride well below max_seq_len, e.g. 128 for 384",
                    ));
                }
                if *max_answer_len == 0 {
                    return Err(err("task.max_answer_len", "must be at least 1".into(), "use 30 (the default)"));
                }
            }
            TaskConfig::Tabular { model, .. } => {
                if !model.is_file() {
                    return Err(err("task.model", format!("no file at `{}`", model.display()), "point it at an ONNX model, e.g. models/rides/model.onnx"));
                }
            }
        }
        if self.batching.max_batch == 0 {
            return Err(err("batching.max_batch", "must be at least 1".into(), "set the most units per model run, e.g. 8"));
        }
        if self.batching.max_delay_ms > 60_000 {
            return Err(err("batching.max_delay_ms", format!("{} ms is over a minute", self.batching.max_delay_ms), "use a few milliseconds, e.g. 5"));
        }
        if self.batching.pad_multiple == 0 || self.batching.pad_multiple > 1024 {
            return Err(err("batching.pad_multiple", format!("{} is outside 1..=1024", self.batching.pad_multiple), "use 64 (the default) or 128"));
        }
        if let TaskConfig::ExtractiveQa { max_seq_len, .. } = &self.task {
            if self.batching.padding_on(self.execution.provider) == Padding::Bucket && self.batching.pad_multiple > *max_seq_len {
                return Err(err(
                    "batching.pad_multiple",
                    format!("{} is above task.max_seq_len {max_seq_len}: every batch would pad to the maximum", self.batching.pad_multiple),
                    "use a step well below max_seq_len, e.g. 64 for 384",
                ));
            }
        }
        if self.execution.runs() == 0 || self.execution.runs() > 16 {
            return Err(err("execution.runs_in_flight", format!("{} is outside 1..=16", self.execution.runs()), "use 1 on the CPU, 2 or 3 on a GPU"));
        }
        if self.execution.provider == Provider::Cpu && (self.execution.gpu_mem_limit_mb.is_some() || self.execution.device_id != 0) {
            return Err(err(
                "execution.provider",
                "`device_id` or `gpu_mem_limit_mb` is set but the provider is the CPU".into(),
                "set provider = \"cuda\" to run on a GPU, or remove the GPU settings",
            ));
        }
        if self.runtime.workers == 0 {
            return Err(err("runtime.workers", "must be at least 1".into(), "use 1 or the number of cores"));
        }
        if self.runtime.epoch_records == 0 {
            return Err(err("runtime.epoch_records", "must be at least 1".into(), "use e.g. 256"));
        }
        if self.runtime.max_epochs_in_flight == 0 {
            return Err(err("runtime.max_epochs_in_flight", "must be at least 1".into(), "use e.g. 4"));
        }
        if self.runtime.max_id_bytes == 0 || self.runtime.max_id_bytes > 2048 {
            return Err(err(
                "runtime.max_id_bytes",
                format!("{} is outside 1..=2048", self.runtime.max_id_bytes),
                "use 512 (the default); a Postgres key must fit in an index row",
            ));
        }
        if self.runtime.max_dead_letter_bytes < 1024 {
            return Err(err("runtime.max_dead_letter_bytes", "must be at least 1024".into(), "use 262144 (the default)"));
        }
        if self.runtime.dedupe_window == 0 {
            return Err(err("runtime.dedupe_window", "must be at least 1".into(), "use 262144 (the default)"));
        }
        if self.runtime.max_bytes_in_flight == 0 {
            return Err(err("runtime.max_bytes_in_flight", "must be at least 1".into(), "use e.g. 67108864 (64 MiB)"));
        }
        if self.runtime.max_records_in_flight == 0 {
            return Err(err("runtime.max_records_in_flight", "must be at least 1".into(), "use e.g. 65536"));
        }
        for (i, sink) in self.sinks.iter().enumerate() {
            if let Err(e) = sink.check() {
                let field = if e.field.is_empty() { format!("sinks[{i}]") } else { format!("sinks[{i}].{}", e.field) };
                return Err(err(&field, e.message, &e.hint));
            }
        }
        if let Some(listen) = &self.metrics.listen {
            if listen.parse::<SocketAddr>().is_err() {
                return Err(err("metrics.listen", format!("`{listen}` is not an address"), "use host:port, e.g. 127.0.0.1:9464"));
            }
        }
        Ok(())
    }
}

fn parse_error(file: &str, text: &str, message: &str, span: Option<std::ops::Range<usize>>) -> TopologyError {
    let message = message.to_string();
    let line = span.map(|s| text[..s.start.min(text.len())].lines().count().max(1));
    let field = field_from_message(&message).unwrap_or_else(|| "(syntax)".to_string());
    let hint = if message.contains("unknown field `intra_threads`") {
        "`intra_threads` moved from [batching] to [execution]".to_string()
    } else if message.contains("unknown field") {
        "remove the field or fix its spelling; the message lists the fields allowed here".to_string()
    } else if message.contains("unknown variant") {
        "use one of the listed `type` values".to_string()
    } else if message.contains("missing field") {
        "add the field; see topologies/ for complete examples".to_string()
    } else {
        "check the TOML syntax and value types against topologies/qa_csv.toml".to_string()
    };
    TopologyError {
        file: match line {
            Some(l) => format!("{file}:{l}"),
            None => file.to_string(),
        },
        field,
        message,
        hint,
    }
}

fn field_from_message(message: &str) -> Option<String> {
    let start = message.find('`')?;
    let rest = &message[start + 1..];
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}
