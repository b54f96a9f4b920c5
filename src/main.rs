//! The `sluice` command line: run, validate and check topologies; send a request; generate load.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sluice::connectors::client::RequestBroker;
use sluice::connectors::kafka::client::{KafkaBroker, DEFAULT_LINGER_MS};
use sluice::connectors::loadgen;
use sluice::connectors::pubsub::{self, client::PubsubBroker};
use sluice::runtime::{self, RunOptions};
use std::path::PathBuf;
use std::time::Duration;

mod serve;

// mimalloc instead of glibc's malloc: answers are allocated on a timely worker and freed on a sink
// thread, and glibc's per-arena free lists made that cross-thread traffic a tenth of the worker's
// CPU in a profile of a Kafka drain (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "Streaming inference on timely dataflow and ONNX Runtime")]
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
    /// Start the engine and the HTTP job API: uploads, jobs, their progress and answers.
    Serve {
        /// The serve config; default: the embedded one (the bundled QA and ride models,
        /// state in ./sluice-state, listening on 127.0.0.1:8080).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen here instead of the config's address.
        #[arg(long)]
        listen: Option<String>,
        /// Keep the state here instead of the config's folder.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Parse and validate a topology file without running it.
    Validate { topology: PathBuf },
    /// Validate a topology and load its model and tokenizer, to check the environment.
    Check { topology: PathBuf },
    /// Publish one request with a fresh ID and print the answer that carries that ID.
    Request {
        #[command(flatten)]
        broker: Broker,
        /// The request as a JSON object, e.g. '{"PULocationID": 161, "DOLocationID": 236, "trip_distance": 2.1}'.
        #[arg(long)]
        json: String,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Publish generated rides at a rate and report throughput, latency percentiles, lost and duplicate answers.
    Loadgen {
        #[command(flatten)]
        broker: Broker,
        /// Rides to send.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Rides per second; 0 sends as fast as possible.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// How long to wait for the last answers after the last send.
        #[arg(long, default_value_t = 10_000)]
        drain_ms: u64,
        /// Publish every ride first and print `preloaded`; then measure how fast a worker started
        /// afterwards answers the backlog (first to last answer).
        #[arg(long)]
        preload: bool,
        /// Kafka: the publisher's linger.ms, how long it gathers requests into one produce request.
        #[arg(long, default_value_t = 5)]
        linger_ms: u64,
    },
    /// Serve librdkafka's in-memory mock Kafka broker on a loopback port until killed, for the
    /// long latency benchmark (see docs/benchmarks.md; not durable, not for production).
    /// Prints `mock broker at HOST:PORT` once it is up.
    MockBroker {
        /// A topic to create, as NAME:PARTITIONS; repeat for more.
        #[arg(long = "topic", required = true)]
        topics: Vec<sluice::connectors::kafka::mock::MockTopic>,
    },
}

/// Which broker a client command talks to, and its topics.
#[derive(clap::Args)]
struct Broker {
    /// Talk to Google Pub/Sub (or its emulator) instead of Kafka.
    #[arg(long)]
    pubsub: bool,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
    /// Pub/Sub endpoint, e.g. http://127.0.0.1:8085; default: PUBSUB_EMULATOR_HOST, else Google's.
    #[arg(long)]
    endpoint: Option<String>,
    /// Pub/Sub service-account key file; default: anonymous on an emulator, else Application Default Credentials.
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Requests topic [Kafka: rides; Pub/Sub: projects/sluice-local/topics/rides].
    #[arg(long)]
    topic: Option<String>,
    /// Results topic [Kafka: ride-durations; Pub/Sub: projects/sluice-local/topics/ride-durations].
    #[arg(long)]
    results: Option<String>,
}

impl Broker {
    /// The broker these flags name, picked once; `linger_ms` is the Kafka load generator's.
    fn client(&self, linger_ms: u64) -> Box<dyn RequestBroker> {
        if self.pubsub {
            Box::new(PubsubBroker { connection: pubsub::Connection { endpoint: self.endpoint.clone(), credentials_file: self.credentials_file.clone() } })
        } else {
            Box::new(KafkaBroker { brokers: self.brokers.clone(), linger_ms })
        }
    }

    /// The requests and results topics: the flags', else the broker's defaults.
    fn topics(&self, client: &dyn RequestBroker) -> (String, String) {
        let (t, r) = client.default_topics();
        (self.topic.clone().unwrap_or_else(|| t.into()), self.results.clone().unwrap_or_else(|| r.into()))
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    // A panic on any thread (worker, inference, sink) ends the process, non-zero, naming the
    // thread, so that a supervisor restarts it; a task's panic on one record is contained.
    sluice::guard::install_panic_hook();
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run { topology, workers, process, hostfile, no_progress } => {
            let t = sluice::registry::load(&topology)?;
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
                bail!("--process {process} is not below the {} hosts in the hostfile", hosts.len());
            }
            let opts = RunOptions { workers, process, hosts, progress: !no_progress };
            let s = runtime::run(&t, &opts)?;
            let secs = s.elapsed.as_secs_f64();
            let deleted = if s.deleted > 0 { format!(", deleted {}", s.deleted) } else { String::new() };
            println!(
                "{}: answered {}{deleted}, dead letters {}, read {} rows in {:.1} s ({:.1} rows/s)",
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
        Command::Serve { config, listen, state } => {
            let mut c = match config {
                Some(path) => serve::config::ServeConfig::load(&path)?,
                None => serve::config::ServeConfig::default(),
            };
            if let Some(l) = listen {
                c.listen = l;
            }
            if let Some(s) = state {
                c.state = s;
            }
            c.check("serve config")?;
            serve::serve(c)
        }
        Command::Validate { topology } => {
            let t = sluice::registry::load(&topology)?;
            println!("{}: ok (pipeline `{}`)", topology.display(), t.name);
            Ok(())
        }
        Command::Check { topology } => {
            let t = sluice::registry::load(&topology)?;
            let provider = t.execution.provider;
            let (_, library) = sluice::ortlib::environment_for(provider == sluice::topology::Provider::Cuda)?;
            println!("onnx runtime: ok ({})", library.display());
            for line in t.task.check(&t)? {
                println!("{line}");
            }
            Ok(())
        }
        Command::MockBroker { topics } => {
            use std::io::Write as _;
            let cluster = sluice::connectors::kafka::mock::start(&topics)?;
            println!("mock broker at {}", cluster.bootstrap_servers());
            std::io::stdout().flush()?;
            loop {
                std::thread::park();
            }
        }
        Command::Request { broker, json, timeout_ms } => {
            let payload: serde_json::Value = serde_json::from_str(&json).context("--json must be a JSON object")?;
            let obj = payload.as_object().context("--json must be a JSON object")?.clone();
            let client = broker.client(DEFAULT_LINGER_MS);
            let (topic, results) = broker.topics(client.as_ref());
            let (id, answer) = client.request(&topic, &results, obj, Duration::from_millis(timeout_ms))?;
            println!("{}", serde_json::json!({"request_id": id, "answer": answer}));
            Ok(())
        }
        Command::Loadgen { broker, count, rate, seed, drain_ms, preload, linger_ms } => {
            let spec = loadgen::LoadSpec { run_id: loadgen::new_run_id(), count, rate, seed, drain: Duration::from_millis(drain_ms), preload };
            let client = broker.client(linger_ms);
            let (topic, results) = broker.topics(client.as_ref());
            // Listening first: every answer arrives after its request.
            let answers = client.answers(&results, &format!("{}-", spec.run_id))?;
            let mut publish = client.publisher(&topic)?;
            let report = loadgen::run(&spec, publish.as_mut(), answers)?;
            println!("{report}");
            if report.lost > 0 {
                bail!("{} requests got no answer", report.lost);
            }
            Ok(())
        }
    }
}
