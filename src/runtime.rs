//! Builds and runs a topology: starts the inference service, assembles the timely dataflow on
//! every worker (source → key by ID → infer → durable sink, with dead letters beside), and waits
//! until finite input is fully durable.

use crate::batcher::BatchPolicy;
use crate::connectors::files::csv::{csv_source, CsvSettings};
use crate::connectors::files::{self, jsonl::JsonlWriter, InputFile};
use crate::connectors::postgres::{PostgresTarget, PostgresWriter};
use crate::connectors::SinkWriter;
use crate::inference::{self, InferenceHandle};
use crate::operators::{infer::infer, key_by_id::key_by_id, sink::durable_sink};
use crate::progress::{self, Progress};
use crate::tasks::extractive_qa::{ExtractiveQa, QaModel, QaSettings};
use crate::tasks::{self, Task};
use crate::topology::{BatchInvariance, SinkConfig, SourceConfig, TaskConfig, Topology};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
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
        vec![SinkConfig::Jsonl {
            dir: PathBuf::from("out").join(&topology.name),
        }]
    } else {
        topology.sinks.clone()
    }
}

/// Runs a topology to completion (for finite sources).
pub fn run(topology: &Topology, opts: &RunOptions) -> Result<Summary, String> {
    if let Some(listen) = &topology.metrics.listen {
        crate::metrics::install(listen.parse().map_err(|e| format!("metrics.listen: {e}"))?)?;
    }
    match &topology.task {
        TaskConfig::ExtractiveQa {
            model,
            tokenizer,
            max_seq_len,
            doc_stride,
            max_answer_len,
            model_name,
        } => {
            let name = model_name.clone().unwrap_or_else(|| {
                model
                    .parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_else(|| "model".into())
            });
            let label = tasks::model_label(&name, model)?;
            let settings = QaSettings {
                max_seq_len: *max_seq_len,
                doc_stride: *doc_stride,
                max_answer_len: *max_answer_len,
            };
            let task = Arc::new(ExtractiveQa::new(tokenizer, settings, label)?);
            let invariant = match topology.batching.batch_invariant {
                BatchInvariance::Auto => !tasks::uses_dynamic_quantization(model),
                BatchInvariance::Yes => true,
                BatchInvariance::No => false,
            };
            if !invariant {
                tracing::info!("{} uses dynamic quantization: running one window per model call so answers do not depend on batch-mates", model.display());
            }
            let policy = policy(topology);
            let (padding, seq, threads) = (
                topology.batching.padding,
                *max_seq_len,
                topology.batching.intra_threads,
            );
            let model = model.clone();
            let (handle, joins) = inference::start(1, policy, move || {
                QaModel::load(&model, padding, seq, threads, invariant)
            })?;
            let summary = run_dataflow(topology, opts, task, handle);
            for j in joins {
                let _ = j.join();
            }
            summary
        }
    }
}

/// The batching policy of a topology.
pub fn policy(topology: &Topology) -> BatchPolicy {
    BatchPolicy {
        max_batch: topology.batching.max_batch,
        max_delay: Duration::from_millis(topology.batching.max_delay_ms),
        lookahead: 4,
    }
}

fn timely_config(workers: usize, opts: &RunOptions) -> timely::Config {
    let communication = if opts.hosts.len() > 1 {
        timely::CommunicationConfig::Cluster {
            threads: workers,
            process: opts.process,
            addresses: opts.hosts.clone(),
            report: false,
            zerocopy: false,
        }
    } else if workers == 1 {
        timely::CommunicationConfig::Thread
    } else {
        timely::CommunicationConfig::Process(workers)
    };
    timely::Config {
        communication,
        worker: timely::WorkerConfig::default(),
    }
}

fn make_writers<T: Task>(
    sinks: &[SinkConfig],
    pipeline: &str,
    worker: usize,
    task: &T,
) -> Result<Vec<Box<dyn SinkWriter>>, String> {
    let mut out: Vec<Box<dyn SinkWriter>> = Vec::new();
    for s in sinks {
        match s {
            SinkConfig::Jsonl { dir } => out.push(Box::new(JsonlWriter::open(
                dir,
                worker,
                task.output_columns(),
            )?)),
            SinkConfig::Postgres {
                url,
                table,
                dead_letter_table,
                schema,
            } => out.push(Box::new(PostgresWriter::new(
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

fn run_dataflow<T: Task>(
    topology: &Topology,
    opts: &RunOptions,
    task: Arc<T>,
    handle: InferenceHandle<T::Model>,
) -> Result<Summary, String> {
    let workers = opts.workers.unwrap_or(topology.runtime.workers).max(1);
    let (path, max_field_bytes) = match &topology.source {
        SourceConfig::Csv {
            path,
            max_field_bytes,
        } => (path.clone(), *max_field_bytes),
    };
    let files: Vec<InputFile> = files::expand(&path)?;
    let sinks = resolve_sinks(topology);
    let mut outputs = Vec::new();
    for s in &sinks {
        match s {
            SinkConfig::Jsonl { dir } => {
                // This process's workers replace what an earlier run wrote.
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                for w in opts.process * workers..(opts.process + 1) * workers {
                    for f in [
                        format!("answers.w{w}.jsonl"),
                        format!("dead_letters.w{w}.jsonl"),
                    ] {
                        let _ = std::fs::remove_file(dir.join(f));
                    }
                }
                outputs.push(format!("{}/", dir.display()));
            }
            SinkConfig::Postgres {
                url,
                table,
                dead_letter_table,
                schema,
            } => {
                let target = PostgresTarget {
                    url: url.clone(),
                    schema: schema.clone(),
                    table: table.clone(),
                    dead_letter_table: dead_letter_table.clone(),
                    pipeline: topology.name.clone(),
                };
                let mut probe = PostgresWriter::new(target, task.output_columns())?;
                probe.connect_now().map_err(|e| format!("postgres sink: {e}\n  hint: start Postgres (scripts/pg.sh starts a local one) and check sinks.url"))?;
                outputs.push(format!("postgres table {schema}.{table} (dead letters in {schema}.{dead_letter_table})"));
            }
        }
    }
    let progress = Arc::new(Progress::default());
    let bar = progress::spawn_bar(progress.clone(), opts.progress && topology.runtime.progress);
    let settings = CsvSettings {
        max_field_bytes,
        epoch_records: topology.runtime.epoch_records,
        max_epochs_in_flight: topology.runtime.max_epochs_in_flight,
    };
    let started = Instant::now();
    let name = topology.name.clone();
    let p2 = progress.clone();
    let guards = timely::execute(
        timely_config(workers, opts),
        move |worker| -> Result<(), String> {
            let index = worker.index();
            let peers = worker.peers();
            let mine: Vec<InputFile> = files
                .iter()
                .enumerate()
                .filter(|(i, _)| i % peers == index)
                .map(|(_, f)| f.clone())
                .collect();
            let writers = make_writers(&sinks, &name, index, task.as_ref())?;
            let durable = ProbeHandle::new();
            worker.dataflow::<u64, _, _>(|scope| {
                let (requests, bad) = csv_source(
                    scope,
                    mine,
                    task.clone(),
                    settings.clone(),
                    durable.clone(),
                    p2.clone(),
                );
                let latest = key_by_id(requests);
                let (answers, refused) = infer(latest, task.clone(), handle.clone());
                let dead = bad.concat(refused);
                durable_sink(answers, dead, writers, p2.clone()).probe_with(&durable);
            });
            while worker.step_or_park(None) {}
            Ok(())
        },
    )?;
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
