//! The ride pipeline against a real Kafka-protocol broker (Tansu, started by scripts/kafka.sh)
//! and the real Postgres (scripts/pg.sh): every backend request gets its own answer, bad
//! messages become dead letters, and kill -9, SIGTERM and a Postgres restart lose and duplicate nothing.

mod common;

use common::kafka::*;
use common::rides::*;
use common::*;
use sluice::connectors::kafka::client::RequestClient;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn a_thousand_concurrent_requests_each_get_their_own_answer() {
    let s = setup("itreq");
    let _worker = start_worker(s.dir.path(), &s.topology(), 2);
    let client = Arc::new(RequestClient::connect(&brokers(), &s.topic, &s.results).unwrap());
    let parity = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rides/parity.jsonl")).unwrap();
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
    client.flush();
    let mut mismatches = 0;
    for (id, expected, rx) in pending {
        let (answer, _) = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no answer for {id}"));
        if answer["id"] != id.as_str() || (answer["prediction"].as_f64().unwrap() - expected).abs() > 1e-4 {
            mismatches += 1;
        }
        assert_eq!(answer["model"], "rides");
        assert_eq!(answer["model_version"].as_str().unwrap().len(), 12);
    }
    assert_eq!(mismatches, 0);
}

#[test]
fn loadgen_matches_every_answer_to_its_request_and_paces_its_rate() {
    let s = setup("itlg");
    let _worker = start_worker(s.dir.path(), &s.topology(), 2);
    use sluice::connectors::kafka::client::{consumer_at_end, KafkaAnswers, KafkaPublish};
    use sluice::connectors::loadgen::{new_run_id, run, LoadReport, LoadSpec};
    let load = |count: u64, rate: f64, preload: bool| -> LoadReport {
        let spec = LoadSpec { run_id: new_run_id(), count, rate, seed: 9, drain: Duration::from_secs(20), preload };
        let answers = Box::new(KafkaAnswers(consumer_at_end(&brokers(), &s.results).unwrap()));
        let mut publish = KafkaPublish::new(&brokers(), &s.topic, 5).unwrap();
        let report = run(&spec, &mut publish, answers).unwrap();
        // Run IDs are made of milliseconds: the next run's must differ.
        std::thread::sleep(Duration::from_millis(2));
        report
    };
    // As fast as it can: every answer comes back once and is matched to its own request.
    let fast = load(3000, 0.0, false);
    assert_eq!((fast.sent, fast.answered, fast.lost, fast.duplicates, fast.foreign), (3000, 3000, 0, 0, 0), "{fast}");
    assert!(fast.p50_ms > 0.0 && fast.p50_ms <= fast.p95_ms && fast.p95_ms <= fast.p99_ms && fast.p99_ms <= fast.max_ms, "{fast}");
    assert!(fast.throughput.is_finite() && fast.steady_rate.is_finite() && fast.steady_rate > 0.0, "{fast}");
    // At a target rate: 1,000 rides at 2,000/s take at least half a second to send.
    let paced = load(1000, 2000.0, false);
    assert_eq!((paced.answered, paced.lost, paced.duplicates), (1000, 0, 0), "{paced}");
    assert!(paced.send_seconds >= 0.45, "sent 1,000 at 2,000/s in {:.3} s", paced.send_seconds);
    // Preloaded (here the worker already runs): the report counts from the first answer. (Later
    // runs may see a few of an earlier run's answers as foreign: Tansu reports the end of the
    // results topic about one batch short, so a new listener starts slightly before the end.)
    let pre = load(2000, 0.0, true);
    assert_eq!((pre.answered, pre.lost, pre.duplicates), (2000, 0, 0), "{pre}");
    assert!(pre.preloaded && pre.steady_rate > 0.0, "{pre}");
}

#[test]
fn bad_messages_become_dead_letters_and_the_worker_keeps_going() {
    let s = setup("itbad");
    let sample = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/rides_sample.jsonl")).unwrap();
    let mut messages: Vec<(String, Vec<u8>)> = sample.lines().enumerate().map(|(i, l)| (format!("m{i}"), l.as_bytes().to_vec())).collect();
    messages.push(("big".into(), vec![b'x'; 70_000]));
    messages.push(("tail".into(), br#"{"request_id": "tail", "PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.5}"#.to_vec()));
    produce(&producer(), &s.topic, &messages);
    let _worker = start_worker(s.dir.path(), &s.topology(), 1);
    assert_eq!(wait_for_rows(&s.table, 201, Duration::from_secs(60)), 201, "200 good rides and the one after the bad messages");
    let dead_table = format!("{}_dead", s.table);
    let started = Instant::now();
    while count_rows(&dead_table) < 6 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut reasons: Vec<String> =
        query(&format!("SELECT reason FROM {} ORDER BY reason", sluice::sql::quote_ident(&dead_table))).iter().map(|r| r.get(0)).collect();
    reasons.sort();
    assert_eq!(reasons, vec!["missing_field", "missing_field", "not_json", "oversize_message", "wrong_type", "wrong_type"]);
    let raw: Vec<u8> = query(&format!("SELECT raw FROM {} WHERE reason = 'not_json'", sluice::sql::quote_ident(&dead_table)))[0].get(0);
    assert_eq!(raw, b"this is not json {".to_vec(), "original bytes kept");
    let on_topic = read_topic(&s.dead, 6, Duration::from_secs(30));
    assert_eq!(on_topic.len(), 6, "dead letters are on the dead-letter topic too");
    assert!(on_topic.iter().all(|(_, _, h)| h.contains_key("reason")));
    // The worker committed past the bad messages: the stored offsets cover every message.
    let stored: i64 = query(&format!("SELECT coalesce(sum(position::bigint), 0)::bigint FROM sluice_checkpoints WHERE pipeline = '{}'", s.name))[0].get(0);
    assert_eq!(stored, messages.len() as i64);
}

#[test]
fn kill_dash_nine_mid_stream_loses_and_duplicates_nothing() {
    let s = setup("itkill");
    let n = 30_000;
    let messages = rides(&s.name, n, 11);
    let p = producer();
    let mut worker = start_worker(s.dir.path(), &s.topology(), 2);
    // Publish in slices while the worker runs, and kill it part-way, right after a slice is
    // acknowledged by the broker; the rest of the rides come after the restart.
    let mut killed = false;
    let mut published = 0usize;
    for (i, chunk) in messages.chunks(2_000).enumerate() {
        if i == 6 && !killed {
            assert!(wait_for_rows(&s.table, 1, Duration::from_secs(30)) > 0, "the worker made progress before the kill");
            produce(&p, &s.topic, chunk);
            published += chunk.len();
            worker.signal("-9");
            worker.wait();
            killed = true;
            // Whatever the kill interrupted, the answers in Postgres are exactly those of the
            // offsets stored with them (one transaction), which is where the restart resumes.
            let at_kill = count_rows(&s.table);
            let stored: i64 =
                query(&format!("SELECT coalesce(sum(position::bigint), 0)::bigint FROM sluice_checkpoints WHERE pipeline = '{}'", s.name))[0].get(0);
            assert_eq!(at_kill, stored, "at the kill, {at_kill} answers but stored offsets covering {stored} rides ({published} published)");
            assert!(at_kill > 0 && at_kill <= published as i64, "{at_kill} answers for {published} rides published");
            worker = start_worker(s.dir.path(), &s.topology(), 2);
        } else {
            produce(&p, &s.topic, chunk);
            published += chunk.len();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(killed);
    assert_eq!(wait_for_rows(&s.table, n as i64, Duration::from_secs(120)), n as i64);
    check_exactly_once(&s, &messages);
}

#[test]
fn sigterm_drains_commits_and_exits_zero() {
    let s = setup("itterm");
    let messages = rides(&s.name, 5_000, 12);
    produce(&producer(), &s.topic, &messages);
    let mut worker = start_worker(s.dir.path(), &s.topology(), 1);
    assert!(wait_for_rows(&s.table, 1, Duration::from_secs(30)) > 0);
    worker.signal("-TERM");
    let status = worker.wait();
    assert!(status.success(), "exit status {status:?}");
    // Everything before the stored offsets has its answer, and nothing after it does.
    let stored: i64 = query(&format!("SELECT coalesce(sum(position::bigint), 0)::bigint FROM sluice_checkpoints WHERE pipeline = '{}'", s.name))[0].get(0);
    assert_eq!(count_rows(&s.table), stored, "answers and offsets were committed together");
    // A restart picks up exactly where it stopped.
    let _again = start_worker(s.dir.path(), &s.topology(), 1);
    assert_eq!(wait_for_rows(&s.table, 5_000, Duration::from_secs(60)), 5_000);
    check_exactly_once(&s, &messages);
}
