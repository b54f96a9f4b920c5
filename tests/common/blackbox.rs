//! Black-box helpers: `sluice run` as a child process with its output captured, bounded waits,
//! JSON-lines files read while they are being written, and raw Kafka access (partitions, keys,
//! tombstones, headers) for the robustness tests. Nothing here calls sluice's library.
#![allow(dead_code)]

use super::kafka::brokers;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A `sluice run` child whose stdout and stderr go to files (read them with `stdout()` / `stderr()`),
/// killed when dropped.
pub struct Sluice {
    child: Option<Child>,
    pub out_path: PathBuf,
    pub err_path: PathBuf,
    status: Option<ExitStatus>,
    pub started: Instant,
}

/// The `sluice` binary to run: `SLUICE_BIN` when set (worktrees sharing one target folder
/// overwrite each other's `debug/sluice`), else the one cargo built for these tests.
pub fn sluice_bin() -> String {
    std::env::var("SLUICE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice").to_string())
}

/// Starts `sluice run <topology> --no-progress` in `dir` (its current directory), with extra
/// arguments and environment variables.
pub fn spawn_sluice(dir: &Path, topology: &str, args: &[&str], env: &[(&str, &str)]) -> Sluice {
    let id = super::kafka::unique("run");
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, topology).unwrap();
    let out_path = dir.join(format!("{id}.stdout"));
    let err_path = dir.join(format!("{id}.stderr"));
    let mut cmd = Command::new(sluice_bin());
    cmd.current_dir(dir).args(["run", path.to_str().unwrap(), "--no-progress"]).args(args).env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("start sluice");
    Sluice { child: Some(child), out_path, err_path, status: None, started: Instant::now() }
}

impl Sluice {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal (`-TERM`, `-9`) with kill(1).
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            Command::new("kill").args([sig, &c.id().to_string()]).status().expect("kill");
        }
    }

    /// The exit status if the process has exited by now.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Some(s) = c.try_wait().expect("try_wait") {
                    self.status = Some(s);
                    self.child = None;
                }
            }
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the process (if it still runs) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            self.status = c.wait().ok();
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.out_path).unwrap_or_default()).to_string()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.err_path).unwrap_or_default()).to_string()
    }

    /// The last 3,000 characters of stderr, for failure messages.
    pub fn stderr_tail(&self) -> String {
        let e = self.stderr();
        let start = e.char_indices().rev().nth(3000).map(|(i, _)| i).unwrap_or(0);
        e[start..].to_string()
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes; returns its last answer.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The complete JSON lines of the files in `dir` whose names start with `prefix` (in file-name
/// order). A last line still being written (no newline yet) is skipped; any other line that is not
/// JSON is returned as `Err(line)`.
pub fn lines_in(dir: &Path, prefix: &str) -> Vec<Result<serde_json::Value, String>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let complete = match text.rfind('\n') {
            Some(i) => &text[..i],
            None => continue,
        };
        for line in complete.split('\n') {
            out.push(serde_json::from_str(line).map_err(|_| line.to_string()));
        }
    }
    out
}

/// The parsed complete JSON lines (see `lines_in`), panicking on a line that is not JSON.
pub fn json_lines(dir: &Path, prefix: &str) -> Vec<serde_json::Value> {
    lines_in(dir, prefix).into_iter().map(|l| l.unwrap_or_else(|bad| panic!("a line of {}/{prefix}* is not JSON: {bad:?}", dir.display()))).collect()
}

/// The `id` of every complete line of `answers.w*.jsonl` in `dir`, in file order.
pub fn answer_ids(dir: &Path) -> Vec<String> {
    lines_in(dir, "answers.w").into_iter().filter_map(|l| l.ok()).filter_map(|v| v["id"].as_str().map(String::from)).collect()
}

/// A QA CSV of `n` good rows with IDs `{prefix}{i}`.
pub fn qa_csv(prefix: &str, n: usize) -> String {
    let mut s = String::from("id,question,context\n");
    for i in 0..n {
        s.push_str(&format!("{prefix}{i},Who wrote the note number {i}?,\"The note number {i} was written by Ada Lovelace in 1843, in London.\"\n"));
    }
    s
}

// ---- Kafka -------------------------------------------------------------------------------------

/// A producer that also accepts messages of up to `max_bytes`.
pub fn big_producer(max_bytes: usize) -> BaseProducer {
    rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).set("linger.ms", "2").set("message.max.bytes", max_bytes.to_string()).create().unwrap()
}

/// One message to produce: any of key, payload (None = a tombstone) and partition may be absent.
#[derive(Clone, Debug, Default)]
pub struct Msg {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub partition: Option<i32>,
}

impl Msg {
    pub fn keyed(key: &str, payload: &[u8]) -> Msg {
        Msg { key: Some(key.as_bytes().to_vec()), payload: Some(payload.to_vec()), partition: None }
    }
    pub fn on_partition(mut self, p: i32) -> Msg {
        self.partition = Some(p);
        self
    }
}

/// Produces `messages` in order and waits until every one is acknowledged (panics if one is not).
pub fn produce_msgs(p: &BaseProducer, topic: &str, messages: &[Msg]) {
    for m in messages {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = &m.key {
            rec = rec.key(k.as_slice()).headers(OwnedHeaders::new().insert(Header { key: "request_id", value: Some(k.as_slice()) }));
        }
        if let Some(v) = &m.payload {
            rec = rec.payload(v.as_slice());
        }
        if let Some(part) = m.partition {
            rec = rec.partition(part);
        }
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    if !matches!(e, rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)) {
                        panic!("cannot produce to {topic}: {e}");
                    }
                    rec = r;
                    p.poll(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(30)).unwrap_or_else(|e| panic!("messages to {topic} not acknowledged: {e}"));
}

/// Adds partitions to `topic` until it has `total`.
pub fn create_partitions(topic: &str, total: usize) {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let results = rt
        .block_on(admin.create_partitions(&[NewPartitions::new(topic, total)], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))))
        .expect("create partitions");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("cannot add partitions to {t}: {e}"));
    }
}

/// Grows `topic` to `total` partitions while clients use it. With a broker that supports
/// CreatePartitions this is `create_partitions`. Tansu 0.6.0 (the test broker) answers
/// CreatePartitions with UNSUPPORTED_VERSION, so there the topic is deleted and created again with
/// `total` partitions: to a reader, partitions 1.. appear just as if they had been added (partition 0
/// starts over empty). Returns which way was taken. Waits until the broker reports `total`.
pub fn grow_partitions(topic: &str, total: usize) -> &'static str {
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let how = match rt.block_on(admin.create_partitions(&[NewPartitions::new(topic, total)], &opts)) {
        Ok(results) => {
            for r in results {
                r.unwrap_or_else(|(t, e)| panic!("cannot add partitions to {t}: {e}"));
            }
            "create_partitions"
        }
        Err(e) if e.to_string().contains("UnsupportedFeature") || e.to_string().contains("not supported") => {
            let deleted = rt.block_on(admin.delete_topics(&[topic], &opts)).expect("delete topic");
            for r in deleted {
                r.unwrap_or_else(|(t, e)| panic!("cannot delete topic {t}: {e}"));
            }
            let until = Instant::now() + Duration::from_secs(15);
            loop {
                let new = rdkafka::admin::NewTopic::new(topic, total as i32, rdkafka::admin::TopicReplication::Fixed(1));
                let r = rt.block_on(admin.create_topics(&[new], &opts)).expect("create topic");
                match r.into_iter().next().expect("one result") {
                    Ok(_) => break,
                    Err((t, e)) if Instant::now() < until => {
                        eprintln!("recreating {t}: {e}; retrying");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err((t, e)) => panic!("cannot create topic {t} again: {e}"),
                }
            }
            "delete and create again (the broker has no CreatePartitions)"
        }
        Err(e) => panic!("create partitions: {e}"),
    };
    assert!(wait_until(Duration::from_secs(15), || partition_count(topic) == total), "the broker does not report {total} partitions for {topic}");
    how
}

/// The number of partitions of `topic` the broker reports.
pub fn partition_count(topic: &str) -> usize {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
        Ok(md) => md.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().len()).unwrap_or(0),
        Err(_) => 0,
    }
}

/// A message read back: key, payload (None for a tombstone), headers, partition, offset.
#[derive(Clone, Debug)]
pub struct Got {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
}

impl Got {
    pub fn key_str(&self) -> String {
        self.key.as_deref().map(|k| String::from_utf8_lossy(k).to_string()).unwrap_or_default()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| String::from_utf8_lossy(v).to_string())
    }
}

/// Reads `topic` from the beginning of every partition until `done(messages so far)` holds or
/// `timeout` passes; then keeps reading for `linger` more (to catch late duplicates).
pub fn read_until(topic: &str, timeout: Duration, linger: Duration, mut done: impl FnMut(&[Got]) -> bool) -> Vec<Got> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", super::kafka::unique("reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.message.max.bytes", "8000000")
        .set("max.partition.fetch.bytes", "8000000")
        .create()
        .unwrap();
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)).unwrap();
    let parts = md.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let started = Instant::now();
    let mut out: Vec<Got> = Vec::new();
    let mut finished_at: Option<Instant> = None;
    loop {
        if finished_at.is_none() && done(&out) {
            finished_at = Some(Instant::now());
        }
        match finished_at {
            Some(t) if t.elapsed() >= linger => break,
            None if started.elapsed() >= timeout => break,
            _ => {}
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            let headers: HashMap<String, Vec<u8>> =
                m.headers().map(|h| h.iter().map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec())).collect()).unwrap_or_default();
            out.push(Got { key: m.key().map(|k| k.to_vec()), payload: m.payload().map(|p| p.to_vec()), headers, partition: m.partition(), offset: m.offset() });
        }
    }
    out
}

/// A ride request body with `request_id` written as the given raw JSON text (e.g. `"r1"` with its
/// quotes, or a bare number), features from the seed.
pub fn ride_body(raw_id_json: &str, seed: usize) -> Vec<u8> {
    let pu = 1 + (seed * 37) % 260;
    let du = 1 + (seed * 91 + 13) % 260;
    let dist = 0.5 + (seed % 40) as f64 * 0.37;
    format!(r#"{{"request_id":{raw_id_json},"PULocationID":{pu},"DOLocationID":{du},"trip_distance":{dist:.2}}}"#).into_bytes()
}

/// A ride with a string ID.
pub fn ride(id: &str, seed: usize) -> Vec<u8> {
    ride_body(&serde_json::to_string(id).unwrap(), seed)
}

// ---- Postgres, tolerant of a server that is briefly unreachable (for polling loops) -------------

/// Runs a query against the test Postgres; `Err` instead of a panic when it cannot connect or fails.
pub fn try_query(sql: &str) -> Result<Vec<tokio_postgres::Row>, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&super::pg_url(), tokio_postgres::NoTls).await.map_err(|e| format!("connect: {e}"))?;
        tokio::spawn(conn);
        client.query(sql, &[]).await.map_err(|e| format!("{sql}: {e}"))
    })
}

/// The rows of `table`; 0 while it does not exist yet or Postgres cannot be reached.
pub fn poll_rows(table: &str) -> i64 {
    if !poll_exists(table) {
        return 0;
    }
    try_query(&format!("SELECT count(*) FROM {}", quote_pg(table))).ok().and_then(|r| r.first().map(|r| r.get::<_, i64>(0))).unwrap_or(0)
}

/// Whether `table` exists (false when Postgres cannot be reached).
pub fn poll_exists(table: &str) -> bool {
    try_query(&format!("SELECT to_regclass('{}') IS NOT NULL", quote_pg(table).replace('\'', "''")))
        .ok()
        .and_then(|r| r.first().map(|r| r.get::<_, bool>(0)))
        .unwrap_or(false)
}

/// Whether `table` has a row with this `id` (false while it does not exist or Postgres is unreachable).
pub fn poll_has_id(table: &str, id: &str) -> bool {
    poll_exists(table)
        && try_query(&format!("SELECT count(*) FROM {} WHERE id = '{}'", quote_pg(table), id.replace('\'', "''")))
            .ok()
            .and_then(|r| r.first().map(|r| r.get::<_, i64>(0) > 0))
            .unwrap_or(false)
}

/// A quoted SQL identifier.
pub fn quote_pg(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
