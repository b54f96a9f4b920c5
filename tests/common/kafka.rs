//! Kafka helpers for the integration tests: the broker scripts/kafka.sh starts, fresh topics,
//! producing, reading a topic back, and a sluice worker as a child process.
#![allow(dead_code)]

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn brokers() -> String {
    std::env::var("SLUICE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// A name no other test run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}_{:x}", nanos % 0xffff_ffff_ffff)
}

pub fn create_topics(names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap_or_else(|e| panic!("Kafka at {} is not reachable (run scripts/kafka.sh start): {e}", brokers()));
    let topics: Vec<NewTopic> = names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results = rt.block_on(admin.create_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))).expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot create topic {t}: {e}"));
    }
}

pub fn producer() -> BaseProducer {
    rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).set("linger.ms", "2").create().unwrap()
}

/// Produces `(key, payload)` messages and waits until all are delivered.
pub fn produce(p: &BaseProducer, topic: &str, messages: &[(String, Vec<u8>)]) {
    for (k, v) in messages {
        let mut rec = BaseRecord::to(topic)
            .key(k.as_bytes())
            .payload(v.as_slice())
            .headers(OwnedHeaders::new().insert(Header { key: "request_id", value: Some(k.as_bytes()) }));
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    p.poll(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Reads every message of `topic` until `expected` distinct keys have arrived or `timeout` passes
/// (Tansu's high watermark is unreliable, so count what arrives). Returns (key or request_id header, payload, headers).
pub fn read_topic(topic: &str, expected: usize, timeout: Duration) -> Vec<(String, Vec<u8>, HashMap<String, String>)> {
    let consumer: BaseConsumer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", unique("reader")).set("enable.auto.commit", "false").create().unwrap();
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap();
    let parts = md.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let mut keys = std::collections::HashSet::new();
    while keys.len() < expected && started.elapsed() < timeout {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            use rdkafka::message::Headers;
            let headers: HashMap<String, String> = m
                .headers()
                .map(|h| h.iter().map(|x| (x.key.to_string(), String::from_utf8_lossy(x.value.unwrap_or_default()).to_string())).collect())
                .unwrap_or_default();
            let key = m.key().map(|k| String::from_utf8_lossy(k).to_string()).unwrap_or_default();
            keys.insert(key.clone());
            out.push((key, m.payload().unwrap_or_default().to_vec(), headers));
        }
    }
    out
}

/// A ride topology over `topic` writing to `results` (and `dead`) and to Postgres `table`.
pub fn rides_topology(name: &str, topic: &str, results: &str, dead: &str, table: &str, pg_url: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    format!(
        r#"name = "{name}"
[source]
type = "kafka"
brokers = "{b}"
topic = "{topic}"
epoch_ms = 20
[task]
type = "tabular"
model = "{root}/models/rides/model.onnx"
[batching]
max_batch = 512
max_delay_ms = 1
[runtime]
epoch_records = 500
max_epochs_in_flight = 4
progress = false
[[sinks]]
type = "kafka"
brokers = "{b}"
topic = "{results}"
dead_letter_topic = "{dead}"
[[sinks]]
type = "postgres"
url = "{pg_url}"
table = "{table}"
dead_letter_table = "{table}_dead"
"#,
        b = brokers()
    )
}

/// A `sluice run` child process, killed when dropped so a failing test leaves no worker behind.
pub struct Worker {
    pub child: Option<Child>,
}

impl Worker {
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal (`-9`, `-TERM`) with kill(1).
    pub fn signal(&self, sig: &str) {
        Command::new("kill").args([sig, &self.id().to_string()]).status().expect("kill");
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().expect("wait")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `sluice run` on `topology` as a child process.
pub fn start_worker(dir: &Path, topology: &str, workers: usize) -> Worker {
    let path = dir.join(format!("{}.toml", unique("topology")));
    std::fs::write(&path, topology).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", path.to_str().unwrap(), "--no-progress", "--workers", &workers.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    Worker { child: Some(child) }
}
