//! The `sluice` command line: run, validate and check topologies.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sluice::runtime::{self, RunOptions};
use sluice::topology::Topology;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Streaming inference on timely dataflow and ONNX Runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a topology until its input is done (finite sources) or it is stopped.
    Run {
        /// The topology file, e.g. topologies/qa_csv.toml.
        topology: PathBuf,
        /// Timely worker threads in this process.
        #[arg(long)]
        workers: Option<usize>,
        /// This process's index in a cluster (with --hostfile).
        #[arg(long, default_value_t = 0)]
        process: usize,
        /// A file with one host:port per line, one line per process of the cluster.
        #[arg(long)]
        hostfile: Option<PathBuf>,
        /// Never draw the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Parse and validate a topology file without running it.
    Validate { topology: PathBuf },
    /// Validate a topology and load its model and tokenizer, to check the environment.
    Check { topology: PathBuf },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            topology,
            workers,
            process,
            hostfile,
            no_progress,
        } => {
            let t = Topology::load(&topology)?;
            let hosts = match hostfile {
                Some(f) => std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read hostfile {}", f.display()))?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect(),
                None => Vec::new(),
            };
            if !hosts.is_empty() && process >= hosts.len() {
                bail!(
                    "--process {process} is not below the {} hosts in the hostfile",
                    hosts.len()
                );
            }
            let opts = RunOptions {
                workers,
                process,
                hosts,
                progress: !no_progress,
            };
            let s = runtime::run(&t, &opts).map_err(anyhow::Error::msg)?;
            let secs = s.elapsed.as_secs_f64();
            println!(
                "{}: answered {}, dead letters {}, read {} rows in {:.1} s ({:.1} rows/s)",
                t.name,
                s.answered,
                s.dead_letters,
                s.read,
                secs,
                (s.answered + s.dead_letters) as f64 / secs.max(1e-9)
            );
            for o in s.outputs {
                println!("  wrote {o}");
            }
            Ok(())
        }
        Command::Validate { topology } => {
            let t = Topology::load(&topology)?;
            println!("{}: ok (pipeline `{}`)", topology.display(), t.name);
            Ok(())
        }
        Command::Check { topology } => {
            let t = Topology::load(&topology)?;
            sluice::ortlib::environment().map_err(anyhow::Error::msg)?;
            println!("onnx runtime: ok");
            match &t.task {
                sluice::topology::TaskConfig::ExtractiveQa {
                    model,
                    tokenizer,
                    max_seq_len,
                    doc_stride,
                    max_answer_len,
                    ..
                } => {
                    sluice::tasks::extractive_qa::QaModel::load(
                        model,
                        t.batching.padding,
                        *max_seq_len,
                        0,
                        true,
                    )
                    .map_err(anyhow::Error::msg)?;
                    println!("model {}: ok", model.display());
                    let settings = sluice::tasks::extractive_qa::QaSettings {
                        max_seq_len: *max_seq_len,
                        doc_stride: *doc_stride,
                        max_answer_len: *max_answer_len,
                    };
                    sluice::tasks::extractive_qa::ExtractiveQa::new(
                        tokenizer,
                        settings,
                        String::new(),
                    )
                    .map_err(anyhow::Error::msg)?;
                    println!("tokenizer {}: ok", tokenizer.display());
                }
            }
            Ok(())
        }
    }
}
