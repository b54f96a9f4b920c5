//! `sluice serve` as a user meets it: a real server process, real HTTP (a small HTTP/1.1
//! client over a socket, below), the real models, and the Postgres the scripts started. Uploads
//! get the answers `sluice run` gives; a 1M-ride job counts up and is fetched whole; cancel,
//! kill -9 and restart, a job whose sink fails beside one that goes on, and every bad request
//! the API refuses.

mod common;

use common::blackbox::{json_lines, spawn_sluice};
use common::repo;
use common::serve::{Reply, Server};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn rides_csv(n: usize) -> String {
    let mut s = String::from("id,PULocationID,DOLocationID,trip_distance\n");
    for i in 0..n {
        s.push_str(&format!("r{i},{},{},{}\n", 1 + i % 263, 1 + (i * 7) % 263, 0.5 + (i % 97) as f64 * 0.25));
    }
    s
}

fn config(extra: &str) -> String {
    format!("workers = 2\nshutdown_grace_ms = 20000\n{extra}\n[templates]\nqa = \"topologies/qa_csv.toml\"\nrides = \"topologies/rides_generator.toml\"\n")
}

fn job_id(r: &Reply) -> String {
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["job_id"].as_str().unwrap().to_string()
}

#[test]
fn an_uploaded_csv_gets_the_answers_sluice_run_gives_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let csv = std::fs::read(repo().join("samples/questions.csv")).unwrap();
    let server = Server::start(dir.path(), &config(""), &[]);
    let id = job_id(&server.upload("qa", "questions.csv", &csv, &[]));
    let (job, _) = server.wait_final(&id, Duration::from_secs(300));
    assert_eq!(job["status"], "succeeded", "{job}");
    let served: Vec<Value> = server.lines(&id, "answers", 1000);
    let dead: Vec<Value> = server.lines(&id, "dead_letters", 1000);

    // The same file through `sluice run`.
    std::fs::copy(repo().join("samples/questions.csv"), dir.path().join("q.csv")).unwrap();
    let out = dir.path().join("run-out");
    let topology = std::fs::read_to_string(repo().join("topologies/qa_csv.toml"))
        .unwrap()
        .replace("path = \"samples/questions.csv\"", &format!("path = {:?}", dir.path().join("q.csv")))
        .replace("models/", &format!("{}/models/", repo().display()))
        .replace("listen = \"127.0.0.1:9464\"", "")
        + &format!("\n[[sinks]]\ntype = \"jsonl\"\ndir = {out:?}\n");
    let mut run = spawn_sluice(dir.path(), &topology, &[], &[]);
    let status = run.wait_timeout(Duration::from_secs(300)).expect("sluice run ended");
    assert!(status.success(), "{}", run.stderr_tail());
    let ran = json_lines(&out, "answers");
    let key = |v: &Value| (v["id"].as_str().unwrap().to_string(), v["answer"].as_str().unwrap().to_string(), v["start_char"].as_i64(), v["end_char"].as_i64());
    let served_set: HashSet<_> = served.iter().map(key).collect();
    let ran_set: HashSet<_> = ran.iter().map(key).collect();
    assert_eq!(served.len(), ran.len(), "as many answers served as run");
    assert!(!served.is_empty());
    assert_eq!(served_set, ran_set, "the same answers, spans and IDs");
    let scores: HashMap<String, f64> = ran.iter().map(|v| (v["id"].as_str().unwrap().to_string(), v["score"].as_f64().unwrap())).collect();
    for v in &served {
        let (a, b) = (v["score"].as_f64().unwrap(), scores[v["id"].as_str().unwrap()]);
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "score of {}: {a} vs {b}", v["id"]);
    }
    assert_eq!(job["counts"]["answered"].as_u64().unwrap(), served.len() as u64);
    assert_eq!(job["counts"]["dead_letters"].as_u64().unwrap(), dead.len() as u64);
    assert_eq!(job["template"], "qa");
    assert_eq!(job["bytes_total"].as_u64().unwrap(), csv.len() as u64);
}

#[test]
fn a_million_ride_job_counts_up_ends_succeeded_and_its_answers_are_fetched_whole() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(""), &[]);
    let r = server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "generator", "count": 1_000_000, "seed": 7}}));
    let id = job_id(&r);
    let (job, seen) = server.wait_final(&id, Duration::from_secs(600));
    assert_eq!(job["status"], "succeeded", "{job}");
    for w in seen.windows(2) {
        assert!(w[1].1 >= w[0].1, "progress went backwards: {:?} then {:?}", w[0], w[1]);
    }
    assert_eq!(job["counts"]["answered"].as_u64(), Some(1_000_000), "{job}");
    assert_eq!(job["counts"]["total"].as_u64(), Some(1_000_000), "{job}");
    assert_eq!(job["counts"]["dead_letters"].as_u64(), Some(0), "{job}");
    let answers = server.ride_ids(&id, 300_000);
    assert_eq!(answers.len(), 1_000_000);
    let ids: HashSet<&String> = answers.iter().collect();
    assert_eq!(ids.len(), 1_000_000, "every ride answered once");
    // Per-job and per-route series on the same port.
    let metrics = server.get("/metrics").text();
    let series = format!("sluice_job_answered{{job=\"{id}\",pipeline=\"rides_generator\",status=\"succeeded\"}} 1000000");
    assert!(metrics.contains(&series), "no `{series}` in /metrics:\n{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("sluice_http_requests_total{") && l.contains("route=\"/v1/jobs/{id}\"") && l.contains("status=\"200\"")),
        "no per-route series in /metrics"
    );
    assert!(metrics.contains("sluice_sink_answers_total"), "the engine's own series are there too");
}

#[test]
fn a_canceled_job_stops_within_five_seconds_and_reads_no_more() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(""), &[]);
    let id = job_id(&server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "generator", "count": 500_000_000u64}})));
    let start = Instant::now();
    while server.job(&id)["counts"]["answered"].as_u64().unwrap() == 0 {
        assert!(start.elapsed() < Duration::from_secs(120), "no answers yet: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    let r = server.call("POST", &format!("/v1/jobs/{id}/cancel"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let (job, _) = server.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "canceled", "{job}");
    assert!(asked.elapsed() < Duration::from_secs(5), "canceled after {:?}", asked.elapsed());
    let read = job["counts"]["read"].as_u64().unwrap();
    assert!(read < 500_000_000, "{job}");
    std::thread::sleep(Duration::from_secs(1));
    let later = server.job(&id);
    assert_eq!(later["counts"]["read"].as_u64().unwrap(), read, "the source went on reading after the cancel");
    assert_eq!(later["counts"]["answered"], job["counts"]["answered"]);
    // What was durable stays.
    assert_eq!(server.raw_lines(&id, "answers", 1_000_000).len() as u64, job["counts"]["answered"].as_u64().unwrap());
}

/// A cancel is not held back by a sink that cannot write: with every sink write failing (a
/// transient error, retried with backoff), the job still ends `canceled` within 5 s, with
/// nothing answered and the reason, while the server keeps serving.
#[test]
fn a_job_whose_sink_keeps_failing_is_still_canceled_within_five_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(""), &[("SLUICE_FAULT", "sink-fail")]);
    let id = job_id(&server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "generator", "count": 1_000_000}})));
    let start = Instant::now();
    while server.job(&id)["counts"]["read"].as_u64().unwrap() == 0 {
        assert!(start.elapsed() < Duration::from_secs(120), "nothing read: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    let asked = Instant::now();
    assert_eq!(server.call("POST", &format!("/v1/jobs/{id}/cancel"), &[], b"").status, 200);
    let (job, _) = server.wait_final(&id, Duration::from_secs(30));
    assert!(asked.elapsed() < Duration::from_secs(5), "canceled after {:?}", asked.elapsed());
    assert_eq!(job["status"], "canceled", "{job}");
    assert_eq!(job["counts"]["answered"].as_u64(), Some(0), "{job}");
    assert!(job["error"].as_str().unwrap_or_default().contains("canceled while the sink retried"), "{job}");
    assert_eq!(server.get("/v2/health/ready").status, 200);
}

#[test]
fn a_job_whose_postgres_sink_fails_ends_failed_alone_while_other_jobs_finish() {
    let Ok(url) = std::env::var("SLUICE_PG_URL") else {
        panic!("SLUICE_PG_URL is not set: run the tests through scripts/test.sh, which starts Postgres");
    };
    let dir = tempfile::tempdir().unwrap();
    let table = format!("serve_fail_{}", std::process::id());
    let template = std::fs::read_to_string(repo().join("topologies/rides_generator.toml")).unwrap()
        + &format!("\n[[sinks]]\ntype = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"\ndead_letter_table = \"{table}_dead\"\n");
    std::fs::write(dir.path().join("rides_pg.toml"), template).unwrap();
    // A Kafka ride stream on the same engine, for the process's life.
    let stream = common::rides::setup("serve_stream");
    std::fs::write(dir.path().join("stream.toml"), stream.topology()).unwrap();
    let cfg = config(&format!("pipelines = [{:?}]", dir.path().join("stream.toml"))) + &format!("rides_pg = {:?}\n", dir.path().join("rides_pg.toml"));
    let server = Server::start(dir.path(), &cfg, &[]);
    let producer = common::kafka::producer();
    let rides = common::rides::rides(&stream.name, 20_000, 11);
    common::kafka::produce(&producer, &stream.topic, &rides[..10_000]);
    // A table it cannot create (a system schema): the job fails at start, with Postgres's reason.
    let mut bad = std::fs::read_to_string(dir.path().join("rides_pg.toml")).unwrap();
    bad = bad.replace("[[sinks]]\ntype = \"postgres\"", "[[sinks]]\ntype = \"postgres\"\nschema = \"pg_catalog\"");
    let r = server.post_json("/v1/jobs", &serde_json::json!({"topology": bad.replace("count = 100000", "count = 1000")}));
    let at_start = job_id(&r);
    // One whose table a DBA replaces while it runs, beside one that writes only its own answers.
    let doomed = job_id(&server.post_json("/v1/jobs", &serde_json::json!({"template": "rides_pg", "source": {"type": "generator", "count": 50_000_000u64}})));
    let fine = job_id(&server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "generator", "count": 300_000}})));
    let (first, _) = server.wait_final(&at_start, Duration::from_secs(120));
    assert_eq!(first["status"], "failed", "{first}");
    assert!(first["error"].as_str().unwrap().contains("permission denied"), "{first}");
    let start = Instant::now();
    while server.job(&doomed)["counts"]["answered"].as_u64().unwrap() == 0 {
        assert!(start.elapsed() < Duration::from_secs(120), "no answers yet: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    // A DBA replaces the table with another of the same name (a plain DROP is not a failure: the
    // sink creates a missing table again when it reconnects).
    common::blackbox::try_query(&format!("DO $$ BEGIN DROP TABLE \"{table}\"; CREATE TABLE \"{table}\" (note text); END $$"))
        .expect("a DBA replaces the table");
    common::kafka::produce(&producer, &stream.topic, &rides[10_000..]);
    let (failed, _) = server.wait_final(&doomed, Duration::from_secs(120));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["error"].as_str().unwrap().contains("postgres"), "{failed}");
    let (ok, _) = server.wait_final(&fine, Duration::from_secs(300));
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(ok["counts"]["answered"].as_u64(), Some(300_000));
    assert_eq!(server.ride_ids(&fine, 1_000_000).len(), 300_000);
    // The stream answered every ride once, into Postgres and its results topic.
    assert_eq!(common::rides::wait_for_rows(&stream.table, 20_000, Duration::from_secs(120)), 20_000, "{}", server.stderr());
    common::rides::check_exactly_once(&stream, &rides);
    let pipelines = server.get("/v1/pipelines").json();
    assert_eq!(pipelines["pipelines"][0]["name"], stream.name.as_str(), "{pipelines}");
    assert_eq!(pipelines["pipelines"][0]["status"], "running", "{pipelines}");
    assert!(pipelines["pipelines"][0]["answered"].as_u64().unwrap() >= 20_000, "{pipelines}");
    // The engine goes on: ready, and a new job runs to the end.
    assert_eq!(server.get("/v2/health/ready").status, 200);
    let after = job_id(&server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "generator", "count": 1000}})));
    assert_eq!(server.wait_final(&after, Duration::from_secs(60)).0["status"], "succeeded");
    let _ = common::blackbox::try_query(&format!("DROP TABLE IF EXISTS \"{table}_dead\""));
    let _ = common::blackbox::try_query(&format!("DROP TABLE IF EXISTS \"{table}\""));
}

#[test]
fn kill_9_in_the_middle_of_an_upload_job_then_a_restart_answers_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let rows = 600_000;
    let csv = rides_csv(rows);
    let mut server = Server::start(dir.path(), &config(""), &[]);
    let id = job_id(&server.upload("rides", "rides.csv", csv.as_bytes(), &[]));
    let start = Instant::now();
    loop {
        let j = server.job(&id);
        let done = j["counts"]["answered"].as_u64().unwrap();
        assert!(j["status"] != "succeeded", "the job ended before the kill; make it longer: {j}");
        if done >= 20_000 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress: {j}\n{}", server.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill9();
    let before: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("state/jobs").join(&id).join("job.json")).unwrap()).unwrap();
    assert_eq!(before["status"], "running", "{before}");
    let server = Server::start(dir.path(), &config(""), &[]);
    let (job, _) = server.wait_final(&id, Duration::from_secs(300));
    assert_eq!(job["status"], "succeeded", "{job}\n{}", server.stderr());
    assert_eq!(job["attempts"].as_u64(), Some(2), "{job}");
    let answers = server.ride_ids(&id, 250_000);
    let ids: HashSet<&String> = answers.iter().collect();
    assert_eq!(ids.len(), rows, "every row answered");
    assert_eq!(answers.len(), rows, "and none twice");
    assert_eq!(job["counts"]["answered"].as_u64(), Some(rows as u64), "{job}");
    assert!(server.stderr().contains("from the checkpoints stored with the answers"), "the restart resumed the job from its checkpoints:\n{}", server.stderr());
}

/// Job records in a Postgres table (the serve config's `state_store`): none in the state
/// folder; kill -9 mid-job leaves the row `running`, and a restart reads it back, resumes the
/// job and ends it `succeeded` with every row answered once; retention by age then removes the
/// row, the answers and the upload.
#[test]
fn with_a_postgres_state_store_a_job_survives_kill_9_and_ages_out_of_the_table() {
    let Ok(url) = std::env::var("SLUICE_PG_URL") else {
        panic!("SLUICE_PG_URL is not set: run the tests through scripts/test.sh, which starts Postgres");
    };
    let dir = tempfile::tempdir().unwrap();
    let table = format!("serve_jobs_{}", std::process::id());
    let rows = 1_000_000;
    let csv = rides_csv(rows);
    let store = format!("[state_store]\npostgres = \"{url}\"\ntable = \"{table}\"\n");
    let mut server = Server::start(dir.path(), &config(&store), &[]);
    let id = job_id(&server.upload("rides", "rides.csv", csv.as_bytes(), &[]));
    let row = |id: &str| {
        common::blackbox::try_query(&format!("SELECT status, record::text FROM \"{table}\" WHERE id = '{id}'"))
            .expect("the job table")
            .first()
            .map(|r| (r.get::<_, String>(0), serde_json::from_str::<Value>(&r.get::<_, String>(1)).unwrap()))
    };
    // Progress reaches the table (written every second) while the job runs; then kill -9.
    let start = Instant::now();
    while row(&id).map_or(0, |(_, r)| r["answered"].as_u64().unwrap()) < 20_000 {
        assert!(server.job(&id)["status"] != "succeeded", "the job ended before the kill; make it longer");
        assert!(start.elapsed() < Duration::from_secs(120), "no progress in the table: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    server.kill9();
    let (status, record) = row(&id).expect("the job's row");
    assert_eq!(status, "running", "{record}");
    assert!(record["answered"].as_u64().unwrap() > 0, "progress is in the table: {record}");
    assert!(!dir.path().join("state/jobs").join(&id).join("job.json").exists(), "the record went to Postgres, not to a file");
    let mut server = Server::start(dir.path(), &config(&store), &[]);
    assert!(server.stderr().contains(&format!("job records in the Postgres table public.{table}")), "{}", server.stderr());
    let (job, _) = server.wait_final(&id, Duration::from_secs(300));
    assert_eq!(job["status"], "succeeded", "{job}\n{}", server.stderr());
    assert_eq!(job["attempts"].as_u64(), Some(2), "{job}");
    let answers = server.ride_ids(&id, 250_000);
    assert_eq!(answers.iter().collect::<HashSet<_>>().len(), rows, "every row answered");
    assert_eq!(answers.len(), rows, "and none twice");
    let (status, record) = row(&id).expect("the job's row");
    assert_eq!((status.as_str(), record["answered"].as_u64()), ("succeeded", Some(rows as u64)), "{record}");
    let upload = PathBuf::from(record["upload"].as_str().unwrap());
    assert!(upload.exists(), "the upload is kept while the job is");
    // A server that keeps finished jobs for a second: the job goes, its row, answers and upload.
    assert_eq!(server.terminate(Duration::from_secs(30)).and_then(|s| s.code()), Some(0), "{}", server.stderr());
    let server = Server::start(dir.path(), &config(&(store.clone() + "[limits]\nkeep_finished_s = 1\n")), &[]);
    let start = Instant::now();
    while server.get(&format!("/v1/jobs/{id}")).status != 404 {
        assert!(start.elapsed() < Duration::from_secs(20), "the job outlived keep_finished_s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(row(&id).is_none(), "its row is gone");
    assert!(!upload.exists() && !dir.path().join("state/jobs").join(&id).exists(), "its upload and answers are gone");
    let _ = common::blackbox::try_query(&format!("DROP TABLE IF EXISTS \"{table}\""));
}

/// A 2 GB upload against the default 1 GB limit, sent as curl sends a large file (its length
/// declared, `Expect: 100-continue`): 413 before the body is sent, nothing stored.
#[test]
fn a_two_gigabyte_upload_over_the_one_gigabyte_limit_is_refused_before_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(""), &[]);
    let len: u64 = 2 << 30;
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/jobs/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).expect("an answer without the body"), 1, "the server closed without an answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(std::fs::read_dir(dir.path().join("state/uploads")).unwrap().count(), 0, "nothing stored");
    // A body that does not declare its length is cut off as it streams (the 3 MB over 1 MB case
    // of `bad_requests_get_clear_errors_and_leave_nothing_behind`).
}

#[test]
fn bad_requests_get_clear_errors_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokens"), "# team tokens\nsecret-1\n").unwrap();
    let cfg = config(&format!("tokens_file = {:?}\n[limits]\nmax_upload_bytes = 1048576\n", dir.path().join("tokens")));
    let mut server = Server::start(dir.path(), &cfg, &[]);
    // Health needs no token; the API does.
    assert_eq!(server.get("/v2/health/live").status, 200);
    let r = server.get("/v1/jobs");
    assert_eq!((r.status, r.error_code()), (401, "unauthorized".into()), "{}", r.text());
    let r = server.call("GET", "/v1/jobs", &[("Authorization", "Bearer wrong")], b"");
    assert_eq!(r.status, 401);
    server.token = Some("secret-1".into());
    assert_eq!(server.get("/v1/jobs").status, 200);

    // Over the size limit: 413, and nothing kept.
    let big = rides_csv(200_000);
    assert!(big.len() > 3 << 20);
    let r = server.upload("rides", "big.csv", big.as_bytes(), &[]);
    assert_eq!((r.status, r.error_code()), (413, "upload_too_large".into()), "{}", r.text());
    let uploads = dir.path().join("state/uploads");
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0, "the refused upload was kept");

    // A broken multipart body.
    let r = server.call(
        "POST",
        "/v1/jobs/upload",
        &[("Content-Type", "multipart/form-data; boundary=xyz")],
        b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\n\r\nid,q",
    );
    assert_eq!((r.status, r.error_code()), (400, "invalid_multipart".into()), "{}", r.text());

    // A CSV without the `context` column.
    let r = server.upload("qa", "q.csv", b"id,question\n1,Who?\n", &[]);
    assert_eq!((r.status, r.error_code()), (400, "missing_columns".into()), "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("context"), "{}", r.text());

    // An unknown model.
    let r = server.upload("nope", "q.csv", b"id,question,context\n1,a,b\n", &[]);
    assert_eq!((r.status, r.error_code()), (404, "model_not_found".into()), "{}", r.text());
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 0, "refused uploads are not kept");

    // An unknown job.
    let r = server.get("/v1/jobs/j0000000000000000000");
    assert_eq!((r.status, r.error_code()), (404, "job_not_found".into()));
    assert_eq!(server.get("/v1/jobs/j0000000000000000000/answers").status, 404);

    // A stream is not a job.
    let r = server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "generator"}}));
    assert_eq!((r.status, r.error_code()), (400, "invalid_job".into()), "{}", r.text());
    // A topology with a bad field names it.
    let r = server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "csv", "path": ""}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("source.path"), "{}", r.text());

    // A source that cannot be found is refused at once, not queued to fail.
    let r = server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "csv", "path": "no/such/rides-*.csv"}}));
    assert_eq!((r.status, r.error_code()), (400, "invalid_job".into()), "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("no/such/rides-*.csv"), "{}", r.text());
    // The same Idempotency-Key twice: one job.
    let csv = rides_csv(100);
    let a = job_id(&server.upload("rides", "r.csv", csv.as_bytes(), &[("Idempotency-Key", "k-1")]));
    let b = job_id(&server.upload("rides", "r.csv", csv.as_bytes(), &[("Idempotency-Key", "k-1")]));
    assert_eq!(a, b);
    let listed = server.get("/v1/jobs").json();
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(std::fs::read_dir(&uploads).unwrap().count(), 1, "the repeat's upload was kept");
    assert_eq!(server.wait_final(&a, Duration::from_secs(60)).0["counts"]["answered"].as_u64(), Some(100));
    // Status filters and cursors.
    assert_eq!(server.get("/v1/jobs?status=failed").json()["jobs"].as_array().unwrap().len(), 0);
    assert_eq!(server.get("/v1/jobs?status=succeeded").json()["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(server.get("/v1/jobs?status=nonsense").status, 400);
    assert_eq!(server.get(&format!("/v1/jobs?cursor={a}")).json()["jobs"].as_array().unwrap().len(), 0);

    // SIGTERM: the server stops cleanly.
    let status = server.terminate(Duration::from_secs(30)).expect("stopped within 30 s");
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
}

/// The page at `/`, as a person sees it: headless Chromium renders it (its script fetches the
/// API), and the rendered page lists the job with a full progress bar, the models and the
/// pipelines. Also the OpenAPI document describes every route.
#[test]
fn the_page_lists_jobs_with_progress_bars_models_and_pipelines_in_a_browser() {
    let Some(chromium) = ["chromium", "chromium-browser"].into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
    else {
        panic!("no chromium: scripts/setup.sh --test installs Debian's `chromium` for this test");
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(""), &[]);
    let id = job_id(&server.post_json("/v1/jobs", &serde_json::json!({"template": "rides", "source": {"type": "generator", "count": 20_000}})));
    assert_eq!(server.wait_final(&id, Duration::from_secs(120)).0["status"], "succeeded");
    let shot = dir.path().join("page.png");
    let url = format!("http://{}/", server.addr);
    let browse = |extra: &[&str]| {
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(chromium);
        cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--virtual-time-budget=5000", "--window-size=1280,900"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url);
        let out = cmd.output().expect("run chromium");
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let dom = browse(&["--dump-dom"]);
    assert!(dom.contains(&format!("data-job=\"{id}\"")), "the rendered page has no row for job {id}:\n{dom}");
    let row = &dom[dom.find(&format!("data-job=\"{id}\"")).unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains("succeeded") && row.contains("20,000") && row.contains("<progress") && row.contains("100%"), "the job's row: {row}");
    for model in ["qa", "rides"] {
        assert!(dom.contains(&format!("<td>{model}</td>")), "the page lists the model {model}");
    }
    assert!(dom.contains("none configured"), "the page has the pipelines table");
    assert!(!dom.contains("loading…"), "the page's script ran");
    browse(&[&format!("--screenshot={}", shot.display())]);
    assert!(std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0) > 10_000, "a screenshot of the page");

    let doc = server.get("/v1/openapi.json").json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for path in [
        "/v1/jobs",
        "/v1/jobs/upload",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/cancel",
        "/v1/jobs/{id}/answers",
        "/v1/jobs/{id}/dead_letters",
        "/v1/templates",
        "/v1/pipelines",
    ] {
        assert!(doc["paths"][path].is_object(), "the OpenAPI document lacks {path}");
    }
    assert!(doc["components"]["schemas"]["JobView"]["properties"]["counts"].is_object(), "JobView is described");
}
