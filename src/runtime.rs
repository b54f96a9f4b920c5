//! Builds and runs a topology: starts the inference service, assembles the timely dataflow on
//! every worker (source → [key by ID for files] → infer → durable sink, with dead letters and
//! source offsets beside), and waits until finite input is durable or a signal stops it.

use crate::batcher::BatchPolicy;
use crate::connectors::files::csv::{csv_source, CsvSettings};
use crate::connectors::files::{self, jsonl::JsonlWriter, InputFile};
use crate::connectors::kafka::sink::KafkaWriter;
use crate::connectors::kafka::source::{kafka_source, KafkaSettings};
use crate::connectors::postgres::sink::expand_env;
use crate::connectors::postgres::{PostgresTarget, PostgresWriter};
use crate::connectors::SinkWriter;
use crate::generator::{generator_source, GeneratorSettings};
use crate::inference::{self, InferenceHandle};
use crate::operators::{infer::infer, key_by_id::key_by_id, sink::durable_sink};
use crate::progress::{self, Progress};
use crate::tasks::extractive_qa::{ExtractiveQa, QaModel, QaSettings};
use crate::tasks::tabular::{Tabular, TabularModel};
use crate::tasks::{self, Task};
use crate::topology::{BatchInvariance, SinkConfig, SourceConfig, StartFrom, TaskConfig, Topology};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::dataflow::operators::{Concat, Probe};
use timely::dataflow::ProbeHandle;

/// How this process takes part in the run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Worker threads in this process; overrides the topology's `runtime.workers`.
    pub workers: Option<usize>,
    /// This process's index in a cluster.
    pub process: usize,
    /// `host:port` of every process in a cluster; empty for a single process.
    pub hosts: Vec<String>,
    /// Draw a progress bar when stderr is a terminal.
    pub progress: bool,
}

/// What a finished run did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub read: u64,
    pub answered: u64,
    pub dead_letters: u64,
    pub elapsed: Duration,
    /// Where the answers went, for people.
    pub outputs: Vec<String>,
}

/// The sinks a topology writes to: its own, or the embedded default (JSON lines in `out/<name>`).
pub fn resolve_sinks(topology: &Topology) -> Vec<SinkConfig> {
    if topology.sinks.is_empty() {
        vec![SinkConfig::Jsonl { dir: PathBuf::from("out").join(&topology.name) }]
    } else {
        topology.sinks.clone()
    }
}

/// Runs a topology until its finite input is durable, or until SIGTERM/SIGINT: then sources
/// stop reading, the batches in flight drain, the sinks commit, and the run returns.
pub fn run(topology: &Topology, opts: &RunOptions) -> Result<Summary, String> {
    if let Some(listen) = &topology.metrics.listen {
        crate::metrics::install(listen.parse().map_err(|e| format!("metrics.listen: {e}"))?)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    let policy = policy(topology);
    let threads = topology.batching.intra_threads;
    match &topology.task {
        TaskConfig::ExtractiveQa { model, tokenizer, max_seq_len, doc_stride, max_answer_len, model_name } => {
            let label = tasks::model_label(&model_name_or_folder(model_name, model), model)?;
            let settings = QaSettings { max_seq_len: *max_seq_len, doc_stride: *doc_stride, max_answer_len: *max_answer_len };
            let task = Arc::new(ExtractiveQa::new(tokenizer, settings, label)?);
            let invariant = match topology.batching.batch_invariant {
                BatchInvariance::Auto => !tasks::uses_dynamic_quantization(model),
                BatchInvariance::Yes => true,
                BatchInvariance::No => false,
            };
            if !invariant {
                tracing::info!("{} uses dynamic quantization: running one window per model call so answers do not depend on batch-mates", model.display());
            }
            let (padding, seq) = (topology.batching.padding, *max_seq_len);
            let model = model.clone();
            let (handle, joins) = inference::start(1, policy, move || QaModel::load(&model, padding, seq, threads, invariant))?;
            let summary = run_dataflow(topology, opts, task, handle, stop);
            for j in joins {
                let _ = j.join();
            }
            summary
        }
        TaskConfig::Tabular { model, output, model_name } => {
            let label = tasks::model_label(&model_name_or_folder(model_name, model), model)?;
            let task = Arc::new(Tabular::new(model, output.as_deref(), label)?);
            let (model, output) = (model.clone(), output.clone());
            let (handle, joins) = inference::start(1, policy, move || TabularModel::load(&model, output.as_deref(), threads))?;
            let summary = run_dataflow(topology, opts, task, handle, stop);
            for j in joins {
                let _ = j.join();
            }
            summary
        }
    }
}

fn model_name_or_folder(name: &Option<String>, model: &std::path::Path) -> String {
    name.clone().unwrap_or_else(|| model.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into()))
}

/// The batching policy of a topology.
pub fn policy(topology: &Topology) -> BatchPolicy {
    BatchPolicy { max_batch: topology.batching.max_batch, max_delay: Duration::from_millis(topology.batching.max_delay_ms), lookahead: 4 }
}

fn timely_config(workers: usize, opts: &RunOptions) -> timely::Config {
    let communication = if opts.hosts.len() > 1 {
        timely::CommunicationConfig::Cluster { threads: workers, process: opts.process, addresses: opts.hosts.clone(), report: false, zerocopy: false }
    } else if workers == 1 {
        timely::CommunicationConfig::Thread
    } else {
        timely::CommunicationConfig::Process(workers)
    };
    timely::Config { communication, worker: timely::WorkerConfig::default() }
}

fn make_writers<T: Task>(sinks: &[SinkConfig], pipeline: &str, worker: usize, task: &T) -> Result<Vec<Box<dyn SinkWriter>>, String> {
    let mut out: Vec<Box<dyn SinkWriter>> = Vec::new();
    for s in sinks {
        match s {
            SinkConfig::Jsonl { dir } => out.push(Box::new(JsonlWriter::open(dir, worker, task.output_columns())?)),
            SinkConfig::Kafka { brokers, topic, dead_letter_topic, idempotent, client } => {
                out.push(Box::new(KafkaWriter::new(&expand_env(brokers), topic, dead_letter_topic.as_deref(), *idempotent, client, task.output_columns())?))
            }
            SinkConfig::Postgres { url, table, dead_letter_table, schema } => out.push(Box::new(PostgresWriter::new(
                PostgresTarget {
                    url: url.clone(),
                    schema: schema.clone(),
                    table: table.clone(),
                    dead_letter_table: dead_letter_table.clone(),
                    pipeline: pipeline.to_string(),
                },
                task.output_columns(),
            )?)),
        }
    }
    Ok(out)
}

/// A source as each worker builds it.
#[derive(Clone)]
enum SourcePlan {
    Csv { files: Vec<InputFile>, settings: CsvSettings },
    Kafka(KafkaSettings),
    Generator(GeneratorSettings),
}

fn run_dataflow<T: Task>(
    topology: &Topology,
    opts: &RunOptions,
    task: Arc<T>,
    handle: InferenceHandle<T::Model>,
    stop: Arc<AtomicBool>,
) -> Result<Summary, String> {
    let workers = opts.workers.unwrap_or(topology.runtime.workers).max(1);
    let rt = &topology.runtime;
    let sinks = resolve_sinks(topology);
    let mut outputs = Vec::new();
    let mut resume: HashMap<i32, i64> = HashMap::new();
    for s in &sinks {
        match s {
            SinkConfig::Jsonl { dir } => {
                // This process's workers replace what an earlier run wrote.
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                for w in opts.process * workers..(opts.process + 1) * workers {
                    for f in [format!("answers.w{w}.jsonl"), format!("dead_letters.w{w}.jsonl")] {
                        let _ = std::fs::remove_file(dir.join(f));
                    }
                }
                outputs.push(format!("{}/", dir.display()));
            }
            SinkConfig::Postgres { url, table, dead_letter_table, schema } => {
                let target = PostgresTarget {
                    url: url.clone(),
                    schema: schema.clone(),
                    table: table.clone(),
                    dead_letter_table: dead_letter_table.clone(),
                    pipeline: topology.name.clone(),
                };
                let mut pg = PostgresWriter::new(target, task.output_columns())?;
                pg.connect_now().map_err(|e| format!("postgres sink: {e}\n  hint: start Postgres (scripts/pg.sh starts a local one) and check sinks.url"))?;
                if let SourceConfig::Kafka { topic, .. } = &topology.source {
                    resume = pg.load_offsets(topic).map_err(|e| format!("cannot read stored offsets: {e}"))?;
                }
                outputs.push(format!("postgres table {schema}.{table} (dead letters in {schema}.{dead_letter_table})"));
            }
            SinkConfig::Kafka { topic, dead_letter_topic, .. } => {
                outputs.push(format!("kafka topic {topic}{}", dead_letter_topic.as_ref().map(|d| format!(" (dead letters in {d})")).unwrap_or_default()));
            }
        }
    }
    let plan = match &topology.source {
        SourceConfig::Csv { path, max_field_bytes } => SourcePlan::Csv {
            files: files::expand(path)?,
            settings: CsvSettings { max_field_bytes: *max_field_bytes, epoch_records: rt.epoch_records, max_epochs_in_flight: rt.max_epochs_in_flight },
        },
        SourceConfig::Kafka { brokers, topic, group_id, id, max_message_bytes, epoch_ms, start, idle_exit_ms, client } => SourcePlan::Kafka(KafkaSettings {
            client: client.clone(),
            brokers: expand_env(brokers),
            topic: topic.as_str().into(),
            group_id: group_id.clone().unwrap_or_else(|| format!("sluice-{}", topology.name)),
            id_from: id.clone(),
            max_message_bytes: *max_message_bytes,
            epoch_records: rt.epoch_records,
            epoch_ms: *epoch_ms,
            max_epochs_in_flight: rt.max_epochs_in_flight,
            max_records_in_flight: rt.max_records_in_flight,
            start_latest: *start == StartFrom::Latest,
            idle_exit: idle_exit_ms.map(Duration::from_millis),
            resume,
        }),
        SourceConfig::Generator { count, rate, seed } => SourcePlan::Generator(GeneratorSettings {
            count: *count,
            rate: *rate,
            seed: *seed,
            epoch_records: rt.epoch_records,
            max_epochs_in_flight: rt.max_epochs_in_flight,
        }),
    };
    let progress = Arc::new(Progress::default());
    let bar = progress::spawn_bar(progress.clone(), opts.progress && rt.progress);
    let started = Instant::now();
    let name = topology.name.clone();
    let p2 = progress.clone();
    let guards = timely::execute(timely_config(workers, opts), move |worker| -> Result<(), String> {
        let index = worker.index();
        let peers = worker.peers();
        let writers = make_writers(&sinks, &name, index, task.as_ref())?;
        let durable = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let (requests, bad, offsets) = match plan.clone() {
                SourcePlan::Csv { files, settings } => {
                    let mine: Vec<InputFile> = files.into_iter().enumerate().filter(|(i, _)| i % peers == index).map(|(_, f)| f).collect();
                    let (requests, bad, offsets) = csv_source(scope, mine, task.clone(), settings, durable.clone(), p2.clone());
                    // File rows become a differential collection keyed by ID: one answer per ID.
                    (key_by_id(requests), bad, offsets)
                }
                SourcePlan::Kafka(settings) => kafka_source(scope, settings, task.clone(), durable.clone(), stop.clone(), p2.clone()),
                SourcePlan::Generator(settings) => generator_source(scope, settings, task.clone(), durable.clone(), stop.clone(), p2.clone()),
            };
            let (answers, refused) = infer(requests, task.clone(), handle.clone());
            let dead = bad.concat(refused);
            durable_sink(answers, dead, offsets, writers, p2.clone()).probe_with(&durable);
        });
        while worker.step_or_park(None) {}
        Ok(())
    })?;
    let results = guards.join();
    progress.finished.store(true, Ordering::Relaxed);
    if let Some(b) = bar {
        let _ = b.join();
    }
    for r in results {
        r??;
    }
    Ok(Summary {
        read: progress.read.load(Ordering::Relaxed),
        answered: progress.answered.load(Ordering::Relaxed),
        dead_letters: progress.dead.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        outputs,
    })
}
