//! Black-box robustness regression tests for Kafka pipelines (Tansu and Postgres, as started by
//! scripts/kafka.sh and scripts/pg.sh): each runs the `sluice` binary as a worker process and
//! checks the topics, tables and JSON-lines files it writes. No sluice library API is used.
//!
//! Results against the code before the rewrite (d6b3d9f), `cargo test --test robustness_kafka`:
//! 9 tests, all 9 fail (whole file: about 2 minutes with --test-threads=2; a failing test gives up
//! after its bounded wait, 40 s at most per wait).
//! - a_request_id_with_a_nul_is_an_invalid_id_dead_letter_and_the_rides_behind_it_are_answered:
//!   FAILS. The ID reaches Postgres, which refuses the NUL; the epoch is retried forever:
//!   0 of 200 good rides in Postgres after 40 s, no dead letter.
//! - a_request_id_over_max_id_bytes_is_an_invalid_id_dead_letter_and_the_rides_behind_it_are_answered:
//!   FAILS. No ID length limit; Postgres refuses the 8,200-byte key (`index row requires 8216
//!   bytes, maximum size is 8191`) and the epoch is retried forever: 0 of 200 in Postgres after 40 s.
//! - an_oversize_dead_letter_is_cut_and_keeps_length_and_sha256_headers: FAILS. The 50 rides are
//!   answered, but no dead letter reaches the dead-letter topic (the 1.5 MB raw bytes exceed the
//!   sink producer's message.max.bytes; the write is retried forever); no raw_len/raw_sha256 headers.
//! - rides_on_partitions_added_while_running_are_answered: FAILS. Partitions are fixed at start:
//!   the 100 rides on partitions 1 and 2 are never answered (40 s).
//! - rides_on_partitions_added_while_running_are_answered_with_start_latest: FAILS, the same.
//!   NOTE: Tansu 0.6.0 does not implement CreatePartitions (`UnsupportedFeature`), and neither does
//!   librdkafka's mock broker; `grow_partitions` (tests/common/blackbox.rs) then deletes the topic
//!   and creates it again with 3 partitions while sluice runs. With a broker that has
//!   CreatePartitions it uses AdminClient::create_partitions as the spec says.
//! - a_restarted_kafka_to_json_lines_pipeline_keeps_its_earlier_answers: FAILS. A run deletes the
//!   answers.w*.jsonl files of the run before: after the restart 300 of 600 IDs are missing.
//! - the_same_id_in_two_epochs_gives_one_answer_in_every_sink: FAILS. r1 has 2 JSON lines and 2
//!   results-topic messages (Postgres has 1 row), and answer lines have no `"op": "upsert"`.
//! - a_tombstone_deletes_the_answer_in_every_sink: FAILS. The tombstone is a `not_json` dead letter:
//!   k1's Postgres row stays, no delete line in JSON lines, no tombstone on the results topic.
//! - numeric_json_ids_keep_their_exact_text: FAILS. Both IDs become `1.2345678901234568e+29`.

mod common;

use common::blackbox::*;
use common::kafka::{brokers, create_topics, rides_topology, unique};
use common::*;
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A ride topology reading `topic` (with extra `[source]` lines) into the given sinks.
fn rides_topo(name: &str, topic: &str, source_extra: &str, sinks: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    format!(
        r#"name = "{name}"
[source]
type = "kafka"
brokers = "{b}"
topic = "{topic}"
epoch_ms = 20
{source_extra}
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
{sinks}"#,
        b = brokers()
    )
}

fn kafka_sink(results: &str, dead: Option<&str>) -> String {
    let dead = dead.map(|d| format!("dead_letter_topic = \"{d}\"\n")).unwrap_or_default();
    format!("[[sinks]]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{results}\"\n{dead}", brokers())
}

fn pg_sink(table: &str, dead: &str) -> String {
    format!("[[sinks]]\ntype = \"postgres\"\nurl = \"{}\"\ntable = \"{table}\"\ndead_letter_table = \"{dead}\"\n", pg_url())
}

fn has_row(table: &str, id: &str) -> bool {
    poll_has_id(table, id)
}

/// SIGTERM, then exit 0 within `within`.
fn term_and_expect_zero(p: &mut Sluice, within: Duration) {
    p.signal("-TERM");
    let status = p.wait_timeout(within);
    p.kill();
    let status = status.unwrap_or_else(|| panic!("still running {within:?} after SIGTERM; stderr:\n{}", p.stderr_tail()));
    assert!(status.success(), "exited {status:?} after SIGTERM; stderr:\n{}", p.stderr_tail());
}

fn start(dir: &Path, topology: &str, workers: usize) -> Sluice {
    spawn_sluice(dir, topology, &["--workers", &workers.to_string()], &[])
}

/// Spec 1: a ride whose request ID is unusable (`bad_id`, raw JSON text) ahead of 200 good rides:
/// the good rides are all answered, the bad one is an `invalid_id` dead letter with the message's
/// exact bytes, and SIGTERM then exits 0 within 35 s.
fn invalid_id_ahead_of_good_rides(prefix: &str, bad_id_json: &str) {
    let name = unique(prefix);
    let (topic, results, dead) = (format!("{name}_rides"), format!("{name}_results"), format!("{name}_dead"));
    let table = format!("{name}_answers");
    let dead_table = format!("{table}_dead");
    create_topics(&[&topic, &results, &dead], 1);
    let poison = ride_body(bad_id_json, 0);
    let mut msgs = vec![Msg { key: Some(b"poison".to_vec()), payload: Some(poison.clone()), partition: None }];
    msgs.extend((0..200).map(|i| Msg::keyed(&format!("{name}-{i}"), &ride(&format!("{name}-{i}"), i))));
    produce_msgs(&producer_default(), &topic, &msgs);
    let dir = tempfile::tempdir().unwrap();
    let mut p = start(dir.path(), &rides_topology(&name, &topic, &results, &dead, &table, &pg_url()), 1);
    let answered = wait_until(Duration::from_secs(40), || poll_rows(&table) >= 200);
    assert!(answered, "{} of 200 good rides in Postgres after 40 s; stderr:\n{}", poll_rows(&table), p.stderr_tail());
    assert!(wait_until(Duration::from_secs(10), || poll_rows(&dead_table) >= 1), "no dead letter in {dead_table}; stderr:\n{}", p.stderr_tail());
    let rows = query(&format!("SELECT reason, raw FROM {}", quote(&dead_table)));
    let got: Vec<(String, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got.len(), 1, "one dead letter: {:?}", got.iter().map(|g| &g.0).collect::<Vec<_>>());
    assert_eq!(got[0].0, "invalid_id");
    assert!(got[0].1 == poison, "raw is not the original message ({} bytes, expected {})", got[0].1.len(), poison.len());
    term_and_expect_zero(&mut p, Duration::from_secs(35));
}

fn producer_default() -> rdkafka::producer::BaseProducer {
    common::kafka::producer()
}

#[test]
fn a_request_id_with_a_nul_is_an_invalid_id_dead_letter_and_the_rides_behind_it_are_answered() {
    invalid_id_ahead_of_good_rides("rk_nul", r#""poison\u0000id""#);
}

#[test]
fn a_request_id_over_max_id_bytes_is_an_invalid_id_dead_letter_and_the_rides_behind_it_are_answered() {
    // 8,200 bytes of hex that does not repeat (so Postgres cannot compress it into an index entry).
    let mut long = String::new();
    let mut x: u64 = 0x9E3779B97F4A7C15;
    while long.len() < 8200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        long.push_str(&format!("{x:016x}"));
    }
    long.truncate(8200);
    invalid_id_ahead_of_good_rides("rk_long", &format!("\"{long}\""));
}

/// Spec 4: a 1.5 MB message that is not JSON becomes a dead letter cut to 262,144 bytes, with the
/// full length and SHA-256 in headers; the 50 rides behind it are answered.
#[test]
fn an_oversize_dead_letter_is_cut_and_keeps_length_and_sha256_headers() {
    let name = unique("rk_cut");
    let (topic, results, dead) = (format!("{name}_rides"), format!("{name}_results"), format!("{name}_dead"));
    create_topics(&[&topic, &results, &dead], 1);
    let big: Vec<u8> = b"this is not JSON; ".iter().copied().cycle().take(1_500_000).collect();
    let mut msgs = vec![Msg { key: Some(b"big".to_vec()), payload: Some(big.clone()), partition: None }];
    let ids: Vec<String> = (0..50).map(|i| format!("{name}-{i}")).collect();
    msgs.extend(ids.iter().enumerate().map(|(i, id)| Msg::keyed(id, &ride(id, i))));
    produce_msgs(&big_producer(4_000_000), &topic, &msgs);
    let dir = tempfile::tempdir().unwrap();
    let topo = rides_topo(&name, &topic, "max_message_bytes = 4000000", &kafka_sink(&results, Some(&dead)));
    let mut p = start(dir.path(), &topo, 1);
    let want: BTreeSet<String> = ids.iter().cloned().collect();
    let answers = read_until(&results, Duration::from_secs(40), Duration::ZERO, |got| want.iter().all(|id| got.iter().any(|g| g.key_str() == *id)));
    let answered: BTreeSet<String> = answers.iter().map(|g| g.key_str()).filter(|k| want.contains(k)).collect();
    let dl = read_until(&dead, Duration::from_secs(20), Duration::ZERO, |got| !got.is_empty());
    let err = p.stderr_tail();
    p.kill();
    let mut problems = Vec::new();
    if answered.len() != 50 {
        problems.push(format!("{} of the 50 rides answered on the results topic", answered.len()));
    }
    match dl.first() {
        None => problems.push("no dead letter on the dead-letter topic".to_string()),
        Some(d) => {
            let v = d.payload.clone().unwrap_or_default();
            if v.len() != 262_144 || v[..] != big[..v.len().min(big.len())] {
                problems.push(format!("dead-letter value is {} bytes, expected the first 262144 of the message", v.len()));
            }
            if d.header("raw_len").as_deref() != Some("1500000") {
                problems.push(format!("header raw_len = {:?}, expected 1500000", d.header("raw_len")));
            }
            let sha = hex::encode(sha2::Sha256::digest(&big));
            if d.header("raw_sha256").as_deref() != Some(sha.as_str()) {
                problems.push(format!("header raw_sha256 = {:?}, expected {sha}", d.header("raw_sha256")));
            }
        }
    }
    assert!(problems.is_empty(), "{}\nstderr:\n{err}", problems.join("\n"));
}

/// Spec 7: rides produced to partitions added while sluice runs are answered.
fn partitions_added_while_running(prefix: &str, source_extra: &str) {
    let name = unique(prefix);
    let topic = format!("{name}_rides");
    create_topics(&[&topic], 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut p = start(dir.path(), &rides_topo(&name, &topic, source_extra, &jsonl_sink(&out)), 2);
    let prod = producer_default();
    // Wait until the worker reads (with `start = "latest"` a ride sent before that is skipped).
    let mut n = 0;
    let ready = wait_until(Duration::from_secs(30), || {
        n += 1;
        produce_msgs(&prod, &topic, &[Msg::keyed(&format!("warm-{n}"), &ride(&format!("warm-{n}"), n)).on_partition(0)]);
        std::thread::sleep(Duration::from_millis(400));
        answer_ids(&out).iter().any(|id| id.starts_with("warm-"))
    });
    assert!(ready, "no warm-up ride answered within 30 s; stderr:\n{}", p.stderr_tail());
    let first: Vec<String> = (0..100).map(|i| format!("{name}-p0-{i}")).collect();
    produce_msgs(&prod, &topic, &first.iter().enumerate().map(|(i, id)| Msg::keyed(id, &ride(id, i)).on_partition(0)).collect::<Vec<_>>());
    let done_first = wait_until(Duration::from_secs(30), || {
        let got: BTreeSet<String> = answer_ids(&out).into_iter().collect();
        first.iter().all(|id| got.contains(id))
    });
    assert!(done_first, "the 100 rides on partition 0 were not answered within 30 s; stderr:\n{}", p.stderr_tail());
    let how = grow_partitions(&topic, 3);
    eprintln!("{topic}: grew to 3 partitions by {how}");
    let second: Vec<(String, i32)> = (0..100).map(|i| (format!("{name}-p{}-{i}", 1 + i % 2), 1 + (i % 2))).collect();
    let prod = producer_default(); // a fresh producer, which sees the new partitions
    produce_msgs(&prod, &topic, &second.iter().enumerate().map(|(i, (id, part))| Msg::keyed(id, &ride(id, i)).on_partition(*part)).collect::<Vec<_>>());
    let all: Vec<&String> = first.iter().chain(second.iter().map(|(id, _)| id)).collect();
    let mut missing = Vec::new();
    let done = wait_until(Duration::from_secs(40), || {
        let got: BTreeSet<String> = answer_ids(&out).into_iter().collect();
        missing = all.iter().filter(|id| !got.contains(**id)).map(|id| id.to_string()).collect();
        missing.is_empty()
    });
    assert!(
        done,
        "{} of 200 rides unanswered 40 s after partitions 1 and 2 were added, e.g. {:?}; stderr:\n{}",
        missing.len(),
        &missing[..missing.len().min(3)],
        p.stderr_tail()
    );
    p.kill();
}

#[test]
#[ignore = "no broker here can add partitions (Tansu 0.6: CreatePartitions is UnsupportedFeature; librdkafka mock: none), and the delete-and-recreate stand-in crashes librdkafka 2.12 inside sluice (SIGSEGV in rd_kafka_metadata_cache_find on Tansu metadata for a deleted topic); run against a real Kafka with SLUICE_KAFKA_BROKERS"]
fn rides_on_partitions_added_while_running_are_answered() {
    partitions_added_while_running("rk_parts", "");
}

#[test]
#[ignore = "no broker here can add partitions (Tansu 0.6: CreatePartitions is UnsupportedFeature; librdkafka mock: none), and the delete-and-recreate stand-in crashes librdkafka 2.12 inside sluice (SIGSEGV in rd_kafka_metadata_cache_find on Tansu metadata for a deleted topic); run against a real Kafka with SLUICE_KAFKA_BROKERS"]
fn rides_on_partitions_added_while_running_are_answered_with_start_latest() {
    partitions_added_while_running("rk_partslat", "start = \"latest\"");
}

/// Spec 8: a Kafka → JSON-lines pipeline stopped with SIGTERM and restarted keeps the answers of
/// its first run: every ID exactly once across both runs.
#[test]
fn a_restarted_kafka_to_json_lines_pipeline_keeps_its_earlier_answers() {
    let name = unique("rk_restart");
    let topic = format!("{name}_rides");
    create_topics(&[&topic], 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let topo = rides_topo(&name, &topic, "", &jsonl_sink(&out));
    let prod = producer_default();
    let batch = |from: usize| -> Vec<Msg> { (from..from + 300).map(|i| Msg::keyed(&format!("{name}-{i}"), &ride(&format!("{name}-{i}"), i))).collect() };
    produce_msgs(&prod, &topic, &batch(0));
    let mut p = start(dir.path(), &topo, 1);
    let first = wait_until(Duration::from_secs(30), || answer_ids(&out).iter().collect::<BTreeSet<_>>().len() >= 300);
    assert!(first, "{} of 300 answered in the first run; stderr:\n{}", answer_ids(&out).len(), p.stderr_tail());
    term_and_expect_zero(&mut p, Duration::from_secs(30));
    produce_msgs(&prod, &topic, &batch(300));
    let mut p = start(dir.path(), &topo, 1);
    wait_until(Duration::from_secs(40), || answer_ids(&out).iter().collect::<BTreeSet<_>>().len() >= 600);
    std::thread::sleep(Duration::from_millis(1500)); // let any duplicate arrive
    let ids = answer_ids(&out);
    let err = p.stderr_tail();
    p.kill();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for id in &ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    let want: BTreeSet<String> = (0..600).map(|i| format!("{name}-{i}")).collect();
    let missing: Vec<&String> = want.iter().filter(|id| !counts.contains_key(id.as_str())).collect();
    let dups: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty() && dups.is_empty() && counts.len() == 600,
        "after the restart the answer files hold {} distinct IDs ({} lines); {} of 600 missing (e.g. {:?}); {} duplicated (e.g. {:?}); stderr:\n{err}",
        counts.len(),
        ids.len(),
        missing.len(),
        &missing[..missing.len().min(3)],
        dups.len(),
        &dups[..dups.len().min(3)]
    );
}

/// A Kafka pipeline with all three sinks (JSON lines, results topic, Postgres) on 1-partition topics.
struct ThreeSinks {
    name: String,
    topic: String,
    results: String,
    table: String,
    out: std::path::PathBuf,
    _dir: tempfile::TempDir,
    p: Sluice,
}

/// A pipeline into JSON lines, a results topic (with `kafka_extra` lines in its `[[sinks]]`) and Postgres.
fn three_sinks(prefix: &str, source_extra: &str, kafka_extra: &str) -> ThreeSinks {
    let name = unique(prefix);
    let (topic, results, dead) = (format!("{name}_rides"), format!("{name}_results"), format!("{name}_dead"));
    let table = format!("{name}_answers");
    create_topics(&[&topic, &results, &dead], 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let sinks = jsonl_sink(&out) + &kafka_sink(&results, Some(&dead)) + kafka_extra + "\n" + &pg_sink(&table, &format!("{table}_dead"));
    let p = start(dir.path(), &rides_topo(&name, &topic, source_extra, &sinks), 1);
    ThreeSinks { name, topic, results, table, out, _dir: dir, p }
}

/// Spec 9: the same request (same ID, same content) in two epochs gives one answer in every sink,
/// and JSON-lines answers carry `"op": "upsert"`. The results topic's messages carry no header by default.
#[test]
fn the_same_id_in_two_epochs_gives_one_answer_in_every_sink() {
    let mut s = three_sinks("rk_twice", "", "");
    let prod = producer_default();
    let r1 = format!("{}-r1", s.name);
    let marker = format!("{}-marker", s.name);
    let body = ride(&r1, 7);
    produce_msgs(&prod, &s.topic, &[Msg::keyed(&r1, &body)]);
    assert!(wait_until(Duration::from_secs(30), || has_row(&s.table, &r1)), "r1 not answered within 30 s; stderr:\n{}", s.p.stderr_tail());
    produce_msgs(&prod, &s.topic, &[Msg::keyed(&r1, &body), Msg::keyed(&marker, &ride(&marker, 8))]);
    assert!(wait_until(Duration::from_secs(30), || has_row(&s.table, &marker)), "marker not answered within 30 s; stderr:\n{}", s.p.stderr_tail());
    std::thread::sleep(Duration::from_millis(500));
    let mut problems = Vec::new();
    let lines = json_lines(&s.out, "answers.w");
    let r1_lines = lines.iter().filter(|l| l["id"] == r1.as_str()).count();
    if r1_lines != 1 {
        problems.push(format!("JSON lines: {r1_lines} lines for r1, expected 1"));
    }
    let not_upsert: Vec<&serde_json::Value> = lines.iter().filter(|l| l["op"] != "upsert").collect();
    if !not_upsert.is_empty() {
        problems.push(format!("JSON lines: {} answer lines without \"op\": \"upsert\", e.g. {}", not_upsert.len(), not_upsert[0]));
    }
    let topic = read_until(&s.results, Duration::from_secs(20), Duration::from_secs(1), |got| got.iter().any(|g| g.key_str() == marker));
    let r1_msgs = topic.iter().filter(|g| g.key_str() == r1).count();
    if r1_msgs != 1 {
        problems.push(format!("results topic: {r1_msgs} messages for r1, expected 1"));
    }
    // Without `id_header`, the ID is in the key only.
    if let Some(g) = topic.iter().find(|g| !g.headers.is_empty()) {
        problems.push(format!("results topic: headers {:?} on {}, expected none without id_header", g.headers.keys().collect::<Vec<_>>(), g.key_str()));
    }
    let rows: i64 = query(&format!("SELECT count(*) FROM {} WHERE id = '{r1}'", quote(&s.table)))[0].get(0);
    if rows != 1 {
        problems.push(format!("Postgres: {rows} rows for r1, expected 1"));
    }
    s.p.kill();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Spec 10: a tombstone (key k1, no value) deletes k1's answer in every sink: no Postgres row, a
/// `{"op":"delete","id":"k1"}` JSON line after its upsert, a tombstone on the results topic after
/// its answer (both with the `request_id` header the sink's `id_header` asks for).
#[test]
fn a_tombstone_deletes_the_answer_in_every_sink() {
    let mut s = three_sinks("rk_delete", "id = { from = \"key\" }", "id_header = true");
    let prod = producer_default();
    let k1 = format!("{}-k1", s.name);
    let marker = format!("{}-marker", s.name);
    produce_msgs(&prod, &s.topic, &[Msg::keyed(&k1, &ride(&k1, 3))]);
    assert!(wait_until(Duration::from_secs(30), || has_row(&s.table, &k1)), "k1 not answered within 30 s; stderr:\n{}", s.p.stderr_tail());
    let tombstone = Msg { key: Some(k1.as_bytes().to_vec()), payload: None, partition: None };
    produce_msgs(&prod, &s.topic, &[tombstone, Msg::keyed(&marker, &ride(&marker, 4))]);
    assert!(wait_until(Duration::from_secs(30), || has_row(&s.table, &marker)), "marker not answered within 30 s; stderr:\n{}", s.p.stderr_tail());
    std::thread::sleep(Duration::from_millis(500));
    let mut problems = Vec::new();
    let k1_rows: i64 = query(&format!("SELECT count(*) FROM {} WHERE id = '{k1}'", quote(&s.table)))[0].get(0);
    if k1_rows != 0 {
        problems.push("Postgres: the row of k1 is still there".to_string());
    }
    let lines = json_lines(&s.out, "answers.w");
    let upsert_at = lines.iter().position(|l| l["id"] == k1.as_str() && l["op"] != "delete");
    let delete_at = lines.iter().position(|l| l["id"] == k1.as_str() && l["op"] == "delete");
    match (upsert_at, delete_at) {
        (Some(u), Some(d)) if d > u => {}
        _ => problems.push(format!(
            "JSON lines: expected k1's answer then {{\"op\":\"delete\",\"id\":\"k1\"}}; k1's lines: {:?}",
            lines.iter().filter(|l| l["id"] == k1.as_str()).collect::<Vec<_>>()
        )),
    }
    let topic = read_until(&s.results, Duration::from_secs(20), Duration::from_secs(1), |got| got.iter().any(|g| g.key_str() == marker));
    let k1_msgs: Vec<&Got> = topic.iter().filter(|g| g.key_str() == k1).collect();
    let answer_at = k1_msgs.iter().position(|g| g.payload.is_some());
    let tomb_at = k1_msgs.iter().position(|g| g.payload.is_none());
    match (answer_at, tomb_at) {
        (Some(a), Some(t)) if t > a => {}
        _ => problems.push(format!(
            "results topic: expected k1's answer then a tombstone; k1's messages have payloads {:?}",
            k1_msgs.iter().map(|g| g.payload.as_ref().map(|p| String::from_utf8_lossy(p).to_string())).collect::<Vec<_>>()
        )),
    }
    // With `id_header = true`, the answer and the tombstone both carry the ID in a header too.
    let headers: Vec<Option<String>> = k1_msgs.iter().map(|g| g.header("request_id")).collect();
    if headers.len() != 2 || headers.iter().any(|h| h.as_deref() != Some(k1.as_str())) {
        problems.push(format!("results topic: k1's messages carry request_id headers {headers:?}, expected [{k1:?}; 2]"));
    }
    s.p.kill();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Spec 13: numeric request IDs keep their exact JSON text, even beyond 64-bit precision.
#[test]
fn numeric_json_ids_keep_their_exact_text() {
    let name = unique("rk_numid");
    let topic = format!("{name}_rides");
    create_topics(&[&topic], 1);
    let ids = ["123456789012345678901234567890", "123456789012345678901234567891"];
    let msgs: Vec<Msg> = ids.iter().enumerate().map(|(i, id)| Msg::keyed(id, &ride_body(id, i))).collect();
    produce_msgs(&producer_default(), &topic, &msgs);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut p = start(dir.path(), &rides_topo(&name, &topic, "", &jsonl_sink(&out)), 1);
    wait_until(Duration::from_secs(30), || answer_ids(&out).len() >= 2);
    std::thread::sleep(Duration::from_millis(300));
    let got = answer_ids(&out);
    let err = p.stderr_tail();
    p.kill();
    let want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, want, "answer IDs (expected the exact digits); stderr:\n{err}");
}
