//! The ride pipeline on Google Pub/Sub, against Google's real emulator (scripts/pubsub.sh) and
//! the real Postgres (scripts/pg.sh): every backend request gets its own answer; kill -9,
//! SIGTERM and a sink stalled past the ack deadline lose and duplicate nothing in Postgres; bad
//! messages become dead letters (table and topic) and are acknowledged; workers and processes
//! share one subscription.

mod common;
#[path = "common/grpc_proxy.rs"]
mod grpc_proxy;

use common::blackbox::{spawn_sluice, wait_until, Sluice};
use common::kafka::unique;
use common::rides::{expected, rides, wait_for_rows};
use common::*;
use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::model::Message;
use grpc_proxy::GrpcProxy;
use sluice::connectors::pubsub::admin::Admin;
use sluice::connectors::pubsub::client::{ReplySubscription, RequestClient};
use sluice::connectors::pubsub::{runtime, Connection};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

const PROJECT: &str = "sluice-local";

/// A message's attributes.
type Attrs = Vec<(String, String)>;

/// The emulator the scripts start; override with SLUICE_PUBSUB_HOST (`host:port`).
fn emulator() -> String {
    std::env::var("SLUICE_PUBSUB_HOST").unwrap_or_else(|_| "127.0.0.1:8085".into())
}

fn connection() -> Connection {
    Connection::emulator(&emulator())
}

/// Fresh topics (requests, results, dead letters), the source's subscription and a table.
struct Setup {
    name: String,
    rides: String,
    results: String,
    dead: String,
    subscription: String,
    table: String,
    dir: tempfile::TempDir,
    admin: Admin,
}

fn setup(prefix: &str, ack_deadline_s: i32) -> Setup {
    setup_with(prefix, ack_deadline_s, false)
}

fn setup_with(prefix: &str, ack_deadline_s: i32, exactly_once: bool) -> Setup {
    let name = unique(prefix);
    let topic = |t: &str| format!("projects/{PROJECT}/topics/{name}-{t}");
    let admin = Admin::connect(&connection().resolve()).expect("the Pub/Sub emulator (scripts/pubsub.sh start)");
    let s = Setup {
        rides: topic("rides"),
        results: topic("results"),
        dead: topic("dead"),
        subscription: format!("projects/{PROJECT}/subscriptions/{name}-sluice"),
        table: format!("{name}_answers"),
        dir: tempfile::tempdir().unwrap(),
        name,
        admin,
    };
    for t in [&s.rides, &s.results, &s.dead] {
        s.admin.ensure_topic(t).unwrap();
    }
    s.admin.ensure_subscription(&s.subscription, &s.rides, "", ack_deadline_s, exactly_once).unwrap();
    s
}

impl Setup {
    /// Pub/Sub in, Pub/Sub and Postgres out; `extra` goes into `[source]`, `runtime` into `[runtime]`.
    fn topology(&self, extra: &str, runtime: &str) -> String {
        let root = env!("CARGO_MANIFEST_DIR");
        format!(
            r#"name = "{name}"
[source]
type = "pubsub"
subscription = "{sub}"
endpoint = "http://{emu}"
epoch_ms = 20
{extra}
[task]
type = "tabular"
model = "{root}/models/rides/model.onnx"
[batching]
max_batch = 256
max_delay_ms = 1
[runtime]
workers = 2
progress = false
{runtime}
[[sinks]]
type = "pubsub"
endpoint = "http://{emu}"
topic = "{results}"
dead_letter_topic = "{dead}"
[[sinks]]
type = "postgres"
url = "{pg}"
table = "{table}"
dead_letter_table = "{table}_dead"
"#,
            name = self.name,
            sub = self.subscription,
            emu = emulator(),
            results = self.results,
            dead = self.dead,
            table = self.table,
            pg = pg_url()
        )
    }

    fn run(&self, topology: &str) -> Sluice {
        spawn_sluice(self.dir.path(), topology, &[], &[])
    }

    /// Publishes `(attributes, data)` messages to the requests topic and waits for every confirmation.
    fn publish(&self, messages: Vec<(Attrs, Vec<u8>)>) {
        let _enter = runtime().enter();
        let publisher = runtime().block_on(async {
            Publisher::builder(self.rides.clone())
                .with_endpoint(format!("http://{}", emulator()))
                .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
                .build()
                .await
                .unwrap()
        });
        let futures: Vec<_> = messages.into_iter().map(|(attrs, data)| publisher.publish(Message::new().set_data(data).set_attributes(attrs))).collect();
        runtime().block_on(async {
            for f in futures {
                f.await.expect("published");
            }
        });
    }

    /// Publishes rides with their ID as the `request_id` attribute.
    fn publish_rides(&self, messages: &[(String, Vec<u8>)]) {
        self.publish(messages.iter().map(|(id, body)| (vec![("request_id".to_string(), id.clone())], body.clone())).collect());
    }

    /// A subscription of the test's own on `topic`, from now on.
    fn listen(&self, topic: &str) -> ReplySubscription {
        ReplySubscription::open(&connection().resolve(), topic, None).unwrap()
    }

    /// Every row of the answers table: ID to prediction.
    fn answers(&self) -> HashMap<String, f64> {
        query(&format!("SELECT id, prediction FROM {}", sluice::sql::quote_ident(&self.table)))
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, f64>(1)))
            .collect()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.admin.delete_subscription(&self.subscription);
        for t in [&self.rides, &self.results, &self.dead] {
            let _ = self.admin.delete_topic(t);
        }
    }
}

/// Reads messages from `sub` until `done` says so or `timeout` passes.
fn collect(sub: &ReplySubscription, timeout: Duration, mut done: impl FnMut(&[Message]) -> bool) -> Vec<Message> {
    let started = Instant::now();
    let mut got = Vec::new();
    while started.elapsed() < timeout && !done(&got) {
        if let Some(m) = sub.recv(Duration::from_millis(100)) {
            got.push(m);
        }
    }
    got
}

/// Every ride is in Postgres exactly once with the model's own prediction.
fn assert_exactly_once(s: &Setup, messages: &[(String, Vec<u8>)]) {
    let want = expected(messages);
    let rows = s.answers();
    assert_eq!(rows.len(), messages.len(), "one row per request");
    for (id, p) in &rows {
        let w = want.get(id).unwrap_or_else(|| panic!("unexpected id {id}"));
        // The model's f32 output for one row moves in its last bits with the shape of the batch
        // it ran in (up to 4e-6 between a row alone and in 512; ONNX Runtime picks kernels by
        // shape), and a lone redelivered ride runs alone: another ride's answer is far off.
        assert!((p - w).abs() <= 1e-5 * w.abs().max(1.0), "{id}: stored {p}, the model says {w}");
    }
}

fn exit_of(w: &mut Sluice, timeout: Duration) -> i32 {
    let status = w.wait_timeout(timeout).unwrap_or_else(|| panic!("sluice did not exit within {timeout:?}; stderr:\n{}", w.stderr_tail()));
    status.code().unwrap_or(-1)
}

#[test]
fn a_thousand_concurrent_pubsub_requests_each_get_their_own_answer() {
    let s = setup("psreq", 60);
    let mut worker = s.run(&s.topology("", ""));
    let client = RequestClient::connect(&connection(), &s.rides, &s.results).unwrap();
    let parity = std::fs::read_to_string(repo().join("models/rides/parity.jsonl")).unwrap();
    let rides: Vec<serde_json::Value> = parity.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rides.len(), 1000);
    // Publish all 1,000 first, then wait for each: they are all in flight at once.
    let mut pending = Vec::new();
    for r in &rides {
        let mut obj = r.as_object().unwrap().clone();
        let expected = obj.remove("expected_duration").unwrap().as_f64().unwrap();
        let id = client.fresh_id();
        let rx = client.publish(&id, obj).unwrap();
        pending.push((id, expected, rx));
    }
    client.flush().unwrap();
    let mut mismatches = 0;
    for (id, expected, rx) in pending {
        let (answer, _) = rx.recv_timeout(Duration::from_secs(90)).unwrap_or_else(|_| panic!("no answer for {id}; sluice said:\n{}", worker.stderr_tail()));
        if answer["id"] != id.as_str() || (answer["prediction"].as_f64().unwrap() - expected).abs() > 1e-4 {
            mismatches += 1;
        }
        assert_eq!(answer["model"], "rides");
    }
    assert_eq!(mismatches, 0, "every answer is the one for its own request");
    // One request through the blocking call, as `sluice request --pubsub` makes it.
    let mut one = rides[0].as_object().unwrap().clone();
    one.remove("expected_duration");
    let (id, answer) = client.request(one, Duration::from_secs(30)).unwrap();
    assert_eq!(answer["id"], id.as_str());
    assert_eq!(wait_for_rows(&s.table, 1001, Duration::from_secs(30)), 1001, "every request is in Postgres too");
    worker.signal("-TERM");
    assert_eq!(exit_of(&mut worker, Duration::from_secs(30)), 0, "{}", worker.stderr_tail());
}

/// Ignored on the emulator: after a client goes away (kill -9, or a clean shutdown that nacks what
/// it holds), Google's emulator redelivers the messages that client held late or never. Reproduced
/// with Google's own Python client (google-cloud-pubsub 2.x) and no sluice: a subscriber receives
/// 6,000 messages, acks 1,000 and nacks the rest; a second subscriber then receives none of the
/// 5,000 within 30 s and 900 within 90 s. Real Pub/Sub redelivers a lapsed lease or a nack at
/// once. Run with `cargo test --test pubsub -- --ignored` against a service that does.
#[test]
#[ignore = "the Pub/Sub emulator does not redeliver what a departed client held (see the comment)"]
fn kill_9_mid_stream_then_restart_answers_every_pubsub_request_exactly_once() {
    let s = setup("pskill", 10);
    let messages = rides("pk", 6000, 21);
    let results = s.listen(&s.results);
    s.publish_rides(&messages);
    let topology = s.topology("", "");
    let mut first = s.run(&topology);
    assert!(wait_until(Duration::from_secs(60), || count_rows(&s.table) >= 500), "no progress before the kill: {}", first.stderr_tail());
    first.signal("-9");
    let _ = first.wait_timeout(Duration::from_secs(10));
    let at_kill = count_rows(&s.table);
    let mut second = s.run(&topology);
    assert_eq!(wait_for_rows(&s.table, 6000, Duration::from_secs(120)), 6000, "{}", second.stderr_tail());
    second.signal("-TERM");
    assert_eq!(exit_of(&mut second, Duration::from_secs(30)), 0, "{}", second.stderr_tail());
    assert_exactly_once(&s, &messages);
    // At least once on the results topic.
    let mut seen = HashSet::new();
    collect(&results, Duration::from_secs(60), |got| {
        if let Some(m) = got.last() {
            seen.insert(m.attributes.get("request_id").cloned().unwrap_or_default());
        }
        seen.len() >= 6000
    });
    let missing: Vec<&String> = messages.iter().map(|(id, _)| id).filter(|id| !seen.contains(*id)).take(5).collect();
    assert!(missing.is_empty(), "answers missing from the results topic (killed at {at_kill} rows), e.g. {missing:?}");
}

#[test]
fn bad_pubsub_messages_become_dead_letters_with_their_bytes() {
    let s = setup("psbad", 10);
    let good = rides("pb", 50, 5);
    let id = |v: &str| vec![("request_id".to_string(), v.to_string())];
    let oversize = format!(r#"{{"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0, "pad": "{}"}}"#, "x".repeat(3000));
    let bad: Vec<(Attrs, Vec<u8>, &str)> = vec![
        (id("bad-json"), b"{not json".to_vec(), "not_json"),
        (id("bad-missing"), br#"{"PULocationID": 1, "trip_distance": 1.0}"#.to_vec(), "missing_field"),
        (id("bad-type"), br#"{"PULocationID": "north", "DOLocationID": 2, "trip_distance": 1.0}"#.to_vec(), "wrong_type"),
        (id("bad-big"), oversize.into_bytes(), "oversize_message"),
        (id("poison\u{0}id"), br#"{"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}"#.to_vec(), "invalid_id"),
        (id(&"L".repeat(600)), br#"{"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}"#.to_vec(), "invalid_id"),
    ];
    let dead_topic = s.listen(&s.dead);
    let mut all: Vec<(Attrs, Vec<u8>)> = Vec::new();
    for (i, (rid, body)) in good.iter().enumerate() {
        all.push((id(rid), body.clone()));
        if let Some((attrs, data, _)) = bad.get(i / 8) {
            if i % 8 == 0 {
                all.push((attrs.clone(), data.clone()));
            }
        }
    }
    s.publish(all);
    let mut w = s.run(&s.topology("max_message_bytes = 2000", ""));
    assert_eq!(wait_for_rows(&s.table, 50, Duration::from_secs(60)), 50, "the good rides around the bad ones are answered: {}", w.stderr_tail());
    let dead_table = format!("{}_dead", s.table);
    assert!(wait_until(Duration::from_secs(30), || count_rows(&dead_table) >= bad.len() as i64), "dead letters in Postgres: {}", w.stderr_tail());
    w.signal("-TERM");
    assert_eq!(exit_of(&mut w, Duration::from_secs(30)), 0, "{}", w.stderr_tail());
    // The table: each bad message with its reason and its original bytes.
    let rows = query(&format!("SELECT reason, raw, position FROM {}", sluice::sql::quote_ident(&dead_table)));
    assert_eq!(rows.len(), bad.len(), "one dead letter per bad message");
    for (_, data, reason) in &bad {
        let found = rows.iter().any(|r| r.get::<_, String>(0) == *reason && r.get::<_, Vec<u8>>(1) == *data);
        assert!(found, "no `{reason}` dead letter with the original bytes");
    }
    assert!(rows.iter().all(|r| r.get::<_, String>(2).starts_with("message ")), "positioned by message ID");
    // The topic: the same, the reason as an attribute and the bytes as data.
    let got = collect(&dead_topic, Duration::from_secs(30), |g| g.len() >= bad.len());
    assert_eq!(got.len(), bad.len(), "every dead letter on the dead-letter topic");
    for (_, data, reason) in &bad {
        assert!(got.iter().any(|m| m.attributes.get("reason").map(String::as_str) == Some(*reason) && m.data[..] == data[..]), "no `{reason}` on the topic");
    }
}

/// Ignored on the emulator for the reason given above the kill -9 test.
#[test]
#[ignore = "the Pub/Sub emulator does not redeliver what a departed client nacked (see the comment)"]
fn sigterm_acks_what_is_durable_and_a_restart_answers_the_rest() {
    let s = setup("psterm", 10);
    let messages = rides("pt", 20_000, 8);
    s.publish_rides(&messages);
    let results = s.listen(&s.results);
    let topology = s.topology("", "max_records_in_flight = 2000");
    let mut first = s.run(&topology);
    assert!(wait_until(Duration::from_secs(60), || count_rows(&s.table) >= 1000), "no progress: {}", first.stderr_tail());
    first.signal("-TERM");
    assert_eq!(exit_of(&mut first, Duration::from_secs(40)), 0, "SIGTERM drains and exits 0: {}", first.stderr_tail());
    let after_first = count_rows(&s.table);
    // What the first run answered was acknowledged: the results topic will see the rest (and
    // at most the few not yet acknowledged) again, not everything.
    let first_answers = collect(&results, Duration::from_secs(5), |_| false).len();
    let mut second = s.run(&topology);
    assert_eq!(wait_for_rows(&s.table, 20_000, Duration::from_secs(120)), 20_000, "{}", second.stderr_tail());
    second.signal("-TERM");
    assert_eq!(exit_of(&mut second, Duration::from_secs(40)), 0, "{}", second.stderr_tail());
    assert_exactly_once(&s, &messages);
    let second_answers = collect(&results, Duration::from_secs(10), |_| false).len();
    let rest = 20_000 - after_first as usize;
    assert!(
        second_answers >= rest && second_answers < rest + (after_first as usize) / 2,
        "the restart answered {second_answers} for the {rest} not answered before (first run: {after_first} rows, {first_answers} answers)"
    );
}

/// VmRSS of a process in MB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
}

#[test]
fn a_sink_stalled_past_the_ack_deadline_loses_nothing_and_memory_stays_bounded() {
    // An ack deadline of 10 s, and Postgres held for 25 s: the leases must be extended.
    let s = setup("psstall", 10);
    let messages = rides("ps", 12_000, 13);
    let topology = s.topology("", "max_records_in_flight = 2000");
    let mut w = s.run(&topology);
    s.publish_rides(&messages[..1000]);
    assert_eq!(wait_for_rows(&s.table, 1000, Duration::from_secs(60)), 1000, "{}", w.stderr_tail());
    // Stall the Postgres sink: hold an exclusive lock on its table for 25 s.
    let table = sluice::sql::quote_ident(&s.table);
    let locker = std::thread::spawn(move || {
        exec(&format!("BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(25); COMMIT"));
    });
    std::thread::sleep(Duration::from_millis(500));
    s.publish_rides(&messages[1000..]);
    let mut peak = 0f64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(22) {
        peak = peak.max(rss_mb(w.pid()));
        std::thread::sleep(Duration::from_millis(250));
    }
    locker.join().unwrap();
    assert_eq!(wait_for_rows(&s.table, 12_000, Duration::from_secs(120)), 12_000, "{}", w.stderr_tail());
    w.signal("-TERM");
    assert_eq!(exit_of(&mut w, Duration::from_secs(30)), 0, "{}", w.stderr_tail());
    assert_exactly_once(&s, &messages);
    assert!(peak < 400.0, "peak RSS during the stall was {peak:.0} MB");
    eprintln!("peak RSS while the sink was stalled: {peak:.0} MB");
}

/// Two processes of two workers each (`cluster`: one timely cluster of both) read one
/// subscription; every ride is answered exactly once in Postgres and both processes take part.
fn two_processes_share_one_subscription(prefix: &str, cluster: bool) {
    let s = setup(prefix, 10);
    let messages = rides(prefix, 8000, 17);
    let topology = s.topology("", "");
    let hosts = s.dir.path().join("hosts.txt");
    let base = 25000 + (std::process::id() % 1000) as u16 * 2;
    std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", base, base + 1)).unwrap();
    let h = hosts.to_str().unwrap();
    // At info, each process logs `pubsub source` once it has looked the subscription up, just
    // before its workers open their streaming pulls.
    let env = [("RUST_LOG", "sluice=info")];
    let start = |i: &str| {
        if cluster {
            spawn_sluice(s.dir.path(), &topology, &["--process", i, "--hostfile", h], &env)
        } else {
            spawn_sluice(s.dir.path(), &topology, &[], &env)
        }
    };
    let mut a = start("0");
    let mut b = start("1");
    // Publish once both processes are pulling, however long they take to start.
    let ready = wait_until(Duration::from_secs(60), || a.stderr().contains("pubsub source") && b.stderr().contains("pubsub source"));
    assert!(ready, "both processes open the subscription within 60 s:\n{}\n{}", a.stderr_tail(), b.stderr_tail());
    s.publish_rides(&messages);
    assert_eq!(wait_for_rows(&s.table, 8000, Duration::from_secs(120)), 8000, "{}\n{}", a.stderr_tail(), b.stderr_tail());
    a.signal("-TERM");
    b.signal("-TERM");
    assert_eq!(exit_of(&mut a, Duration::from_secs(30)), 0, "{}", a.stderr_tail());
    assert_eq!(exit_of(&mut b, Duration::from_secs(30)), 0, "{}", b.stderr_tail());
    assert_exactly_once(&s, &messages);
    // From each summary line `<name>: answered N, dead letters D, read R rows in …`.
    let summary = |w: &Sluice| -> (u64, u64) {
        let out = w.stdout();
        let field = |after: &str| out.split(after).nth(1).and_then(|r| r.split([',', ' ']).next()).and_then(|n| n.trim().parse::<u64>().ok());
        match (field("answered "), field("dead letters ")) {
            (Some(n), Some(d)) => (n, d),
            _ => panic!("no summary in {out:?}"),
        }
    };
    let ((na, da), (nb, db)) = (summary(&a), summary(&b));
    assert!(na > 0 && nb > 0, "both processes read from the subscription: {na} and {nb}");
    assert_eq!(na + nb, 8000, "every ride answered once between the two processes ({na} + {nb}), none twice");
    assert_eq!((da, db), (0, 0), "no dead letters");
}

#[test]
fn two_processes_of_two_workers_share_one_subscription_with_no_loss() {
    two_processes_share_one_subscription("psshare", false);
}

#[test]
fn a_timely_cluster_of_two_processes_shares_one_subscription_with_no_loss() {
    two_processes_share_one_subscription("psclus", true);
}

#[test]
fn an_exactly_once_subscription_is_answered_with_confirmed_acknowledgements() {
    let s = setup_with("pseo", 10, true);
    let messages = rides("pe", 3000, 23);
    s.publish_rides(&messages);
    let mut w = spawn_sluice(s.dir.path(), &s.topology("", ""), &[], &[("RUST_LOG", "sluice=info")]);
    assert_eq!(wait_for_rows(&s.table, 3000, Duration::from_secs(60)), 3000, "{}", w.stderr_tail());
    w.signal("-TERM");
    assert_eq!(exit_of(&mut w, Duration::from_secs(30)), 0, "{}", w.stderr_tail());
    assert_exactly_once(&s, &messages);
    let log = w.stderr();
    assert!(log.contains("exactly_once=true"), "the source saw the subscription's delivery type: {log}");
    assert!(!log.contains("confirmed acknowledgement failed"), "no confirmed acknowledgement failed: {log}");
}

#[test]
fn pubsub_mixes_with_kafka_and_json_lines_either_way() {
    use common::blackbox::answer_ids;
    use common::kafka::{brokers, create_topics, produce, producer, read_topic};
    let s = setup("psmix", 10);
    let root = env!("CARGO_MANIFEST_DIR");
    let out = s.dir.path().join("answers");
    let kafka_results = format!("{}_results", s.name);
    let kafka_rides = format!("{}_rides", s.name);
    create_topics(&[&kafka_results, &kafka_rides], 2);
    // Pub/Sub -> JSON lines + Kafka.
    let messages = rides("mx", 500, 3);
    s.publish_rides(&messages);
    let to_jsonl_and_kafka = format!(
        r#"name = "{name}_a"
[source]
type = "pubsub"
subscription = "{sub}"
endpoint = "http://{emu}"
[task]
type = "tabular"
model = "{root}/models/rides/model.onnx"
[runtime]
workers = 2
progress = false
[[sinks]]
type = "jsonl"
dir = "{out}"
[[sinks]]
type = "kafka"
brokers = "{b}"
topic = "{kafka_results}"
"#,
        name = s.name,
        sub = s.subscription,
        emu = emulator(),
        out = out.display(),
        b = brokers()
    );
    let mut w = s.run(&to_jsonl_and_kafka);
    let want: HashSet<String> = messages.iter().map(|(id, _)| id.clone()).collect();
    assert!(
        wait_until(Duration::from_secs(60), || answer_ids(&out).into_iter().collect::<HashSet<_>>() == want),
        "every ride in the JSON lines: {}",
        w.stderr_tail()
    );
    // The JSON lines are written before the Kafka sink's produce is confirmed: give a loaded
    // machine time to finish it.
    let on_kafka: HashSet<String> = read_topic(&kafka_results, 500, Duration::from_secs(90)).into_iter().map(|(k, _, _)| k).collect();
    assert!(
        on_kafka == want,
        "every ride on the Kafka results topic: {} of {}, {} foreign; worker log:\n{}",
        on_kafka.intersection(&want).count(),
        want.len(),
        on_kafka.difference(&want).count(),
        w.stderr_tail()
    );
    w.signal("-TERM");
    assert_eq!(exit_of(&mut w, Duration::from_secs(30)), 0, "{}", w.stderr_tail());
    // Kafka -> Pub/Sub.
    let answers = s.listen(&s.results);
    let kafka_messages = rides("kx", 500, 4);
    produce(&producer(), &kafka_rides, &kafka_messages);
    let to_pubsub = format!(
        r#"name = "{name}_b"
[source]
type = "kafka"
brokers = "{b}"
topic = "{kafka_rides}"
epoch_ms = 20
[task]
type = "tabular"
model = "{root}/models/rides/model.onnx"
[runtime]
workers = 2
progress = false
[[sinks]]
type = "pubsub"
endpoint = "http://{emu}"
topic = "{results}"
"#,
        name = s.name,
        b = brokers(),
        emu = emulator(),
        results = s.results
    );
    let mut k = s.run(&to_pubsub);
    let mut seen = HashSet::new();
    collect(&answers, Duration::from_secs(60), |got| {
        if let Some(m) = got.last() {
            assert_eq!(m.attributes.get("model").map(String::as_str), Some("rides"));
            seen.insert(m.attributes.get("request_id").cloned().unwrap_or_default());
        }
        seen.len() >= 500
    });
    let want: HashSet<String> = kafka_messages.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(seen, want, "every Kafka ride answered on the Pub/Sub topic: {}", k.stderr_tail());
    k.signal("-TERM");
    assert_eq!(exit_of(&mut k, Duration::from_secs(30)), 0, "{}", k.stderr_tail());
}

/// The body of `GET /metrics` on `port`, or None while nothing answers there.
fn scrape(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of the unlabelled counter `name` in a `/metrics` body.
fn counter(body: &str, name: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Issue 19, item 7. The client library closes a streaming pull for good on a status outside
/// its retry set (UNKNOWN, or CANCELLED from a proxy or load balancer); sluice then polled the
/// dead pull forever and answered nothing more. A gRPC proxy between sluice and the emulator
/// ends exactly one StreamingPull call with UNKNOWN once rides have flowed through it and some
/// are answered (others are typically read and not yet durable): the pull must be rebuilt (a
/// warning with the status, `sluice_pubsub_pull_restarts_total` = 1), the rides published
/// after the abort answered, and every ride be in Postgres exactly once. One worker, so that
/// nothing else pulls while its pull is dead.
#[test]
fn a_streaming_pull_aborted_with_unknown_is_rebuilt_and_every_ride_is_answered_once() {
    let s = setup("psabort", 10);
    let proxy = GrpcProxy::start(&emulator(), "/google.pubsub.v1.Subscriber/StreamingPull");
    let messages = rides("pa", 2000, 31);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let topology = s
        .topology("lease_extension_s = 10", "")
        .replacen(&format!("endpoint = \"http://{}\"", emulator()), &format!("endpoint = \"http://{}\"", proxy.addr), 1)
        .replacen("workers = 2", "workers = 1", 1)
        + &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    assert!(topology.contains(&proxy.addr.to_string()), "the source reads through the proxy:\n{topology}");
    let mut w = spawn_sluice(s.dir.path(), &topology, &[], &[("RUST_LOG", "sluice=info")]);
    s.publish_rides(&messages[..1000]);
    // The emulator sends up to 100 messages a response.
    let flowed = wait_until(Duration::from_secs(60), || proxy.messages() >= 3 && count_rows(&s.table) > 0);
    assert!(flowed, "rides flow through the proxy and are answered before the abort: {}", w.stderr_tail());
    proxy.abort_one(2, "injected by the test proxy");
    assert!(wait_until(Duration::from_secs(10), || proxy.aborted() == 1), "the proxy aborted a StreamingPull call");
    let at_abort = count_rows(&s.table);
    s.publish_rides(&messages[1000..]);
    let rows = wait_for_rows(&s.table, 2000, Duration::from_secs(60));
    assert_eq!(
        rows,
        2000,
        "the rides must all be answered after the abort (at {at_abort} rows); {} StreamingPull calls, {} responses dropped by the proxy; stderr:\n{}",
        proxy.calls(),
        proxy.dropped(),
        w.stderr_tail()
    );
    let answers = s.answers();
    let late: Vec<&String> = messages[1000..].iter().map(|(id, _)| id).filter(|id| !answers.contains_key(*id)).take(5).collect();
    assert!(late.is_empty(), "rides published after the abort are answered, e.g. missing {late:?}");
    assert!(proxy.calls() >= 2, "a new StreamingPull call was opened after the abort ({} calls)", proxy.calls());
    assert_eq!(proxy.aborted(), 1, "exactly one call was aborted");
    let body = scrape(port).unwrap_or_default();
    assert_eq!(counter(&body, "sluice_pubsub_pull_restarts_total"), Some(1.0), "one pull restart counted; /metrics:\n{body}");
    w.signal("-TERM");
    assert_eq!(exit_of(&mut w, Duration::from_secs(30)), 0, "{}", w.stderr_tail());
    assert_exactly_once(&s, &messages);
    let log = w.stderr();
    let warning = log.lines().find(|l| l.contains("WARN") && l.contains("streaming pull ended"));
    assert!(warning.is_some_and(|l| l.contains("Unknown")), "the end of the pull is a warning with its status:\n{log}");
}
