//! Online inference against a real `sluice serve`: the Open Inference Protocol's reference
//! client (Python `tritonclient[http]`, installed by scripts/setup.sh --test) with binary tensors
//! on and off gets the answers `sluice run` gives; `/v1/answer` answers a Kafka payload with the
//! results topic's object; 256 concurrent clients each get their own answer while a 2M-ride job
//! runs on the same model; a full queue refuses with 429 and `Retry-After`, losing nothing; a
//! client that disconnects cancels its queued work; and a model repository's new version is
//! swapped in under load while a broken one is refused.

mod common;

use common::blackbox::{json_lines, spawn_sluice};
use common::repo;
use common::serve::{Reply, Server};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(extra: &str) -> String {
    format!("workers = 2\nshutdown_grace_ms = 20000\nmodel_poll_ms = 100\n[templates]\nqa = \"topologies/qa_csv.toml\"\nrides = \"topologies/rides_generator.toml\"\n{extra}\n")
}

/// The test venv's Python, with tritonclient[http] (scripts/setup.sh --test installs it).
fn python() -> PathBuf {
    let cache = std::env::var("SLUICE_CACHE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice"));
    let py = cache.join("venv/bin/python");
    let ok = Command::new(&py).args(["-c", "import tritonclient.http"]).status().is_ok_and(|s| s.success());
    assert!(ok, "{} cannot import tritonclient.http: run `bash scripts/setup.sh --test` (scripts/test.sh does)", py.display());
    py
}

fn rides_csv(rows: impl IntoIterator<Item = usize>) -> String {
    let mut s = String::from("id,PULocationID,DOLocationID,trip_distance\n");
    for i in rows {
        s.push_str(&format!("r{i},{},{},{}\n", 1 + i % 263, 1 + (i * 7) % 263, 0.5 + (i % 97) as f64 * 0.25));
    }
    s
}

/// One OIP JSON request for rides `rows` (named inputs, one value per row).
fn rides_request(id: &str, rows: &[usize]) -> Value {
    let pu: Vec<i64> = rows.iter().map(|i| 1 + (*i % 263) as i64).collect();
    let dol: Vec<i64> = rows.iter().map(|i| 1 + ((*i * 7) % 263) as i64).collect();
    let dist: Vec<f64> = rows.iter().map(|i| 0.5 + (*i % 97) as f64 * 0.25).collect();
    let n = rows.len();
    json!({"id": id, "inputs": [
        {"name": "PULocationID", "shape": [n], "datatype": "INT64", "data": pu},
        {"name": "DOLocationID", "shape": [n], "datatype": "INT64", "data": dol},
        {"name": "trip_distance", "shape": [n], "datatype": "FP64", "data": dist},
    ]})
}

fn predictions(r: &Reply) -> Vec<f64> {
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    v["outputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// `sluice run` over a CSV with the template's task: its answers by ID.
fn run_answers(dir: &Path, template: &str, csv: &Path) -> HashMap<String, Value> {
    let out = dir.join(format!("run-{template}"));
    let text = std::fs::read_to_string(repo().join(template)).unwrap();
    let task = &text[text.find("[task]").unwrap()..];
    let topology =
        format!("name = \"ref\"\n[source]\ntype = \"csv\"\npath = {csv:?}\nmax_field_bytes = 100000\n{}\n[[sinks]]\ntype = \"jsonl\"\ndir = {out:?}\n", task)
            .replace("models/", &format!("{}/models/", repo().display()))
            .replace("listen = \"127.0.0.1:9464\"", "");
    let mut run = spawn_sluice(dir, &topology, &[], &[]);
    let status = run.wait_timeout(Duration::from_secs(300)).expect("sluice run ended");
    assert!(status.success(), "{}", run.stderr_tail());
    json_lines(&out, "answers").into_iter().map(|v| (v["id"].as_str().unwrap().to_string(), v)).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1.0)
}

#[test]
fn tritonclient_with_binary_data_on_and_off_gets_the_answers_sluice_run_gives() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let rides = dir.path().join("rides.csv");
    std::fs::write(&rides, rides_csv(0..300)).unwrap();
    let qa = repo().join("samples/questions.csv");
    let server = Server::start(dir.path(), &config(""), &[]);
    for (model, csv, template) in [("rides", &rides, "topologies/rides_generator.toml"), ("qa", &qa, "topologies/qa_csv.toml")] {
        let out =
            Command::new(&py).arg(repo().join("tests/online/triton_client.py")).args([&server.addr, model, csv.to_str().unwrap(), "16"]).output().unwrap();
        assert!(out.status.success(), "tritonclient on {model}: {}\n{}", String::from_utf8_lossy(&out.stderr), server.stderr());
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let meta = &lines[0]["metadata"];
        assert_eq!(meta["name"], model, "{meta}");
        assert!(meta["inputs"].as_array().unwrap().len() >= 2, "{meta}");
        let expected = run_answers(dir.path(), template, csv);
        assert!(!expected.is_empty());
        for mode in ["binary", "json"] {
            let got: Vec<&Value> = lines[1..].iter().filter(|l| l["mode"] == mode).collect();
            assert_eq!(got.len(), expected.len(), "{model} {mode}: one answer per row");
            for g in got {
                let want = &expected[g["id"].as_str().unwrap()];
                let version = want["model"].as_str().unwrap().split_once('@').unwrap().1;
                assert_eq!(g["model_version"], version, "{model} {mode}: the version `sluice run` names");
                if model == "rides" {
                    assert!(close(g["prediction"].as_f64().unwrap(), want["prediction"].as_f64().unwrap()), "{model} {mode}: {g} vs {want}");
                } else {
                    assert_eq!(
                        (&g["answer"], &g["start_char"], &g["end_char"]),
                        (&want["answer"], &want["start_char"], &want["end_char"]),
                        "{model} {mode}: {g} vs {want}"
                    );
                    assert!(close(g["score"].as_f64().unwrap(), want["score"].as_f64().unwrap()), "{model} {mode}: {g} vs {want}");
                }
            }
        }
    }
    // The protocol's errors: unknown model 404, bad tensors 400, as {"error": "..."}.
    let r = server.post_json("/v2/models/nope/infer", &rides_request("x", &[1]));
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().contains("nope"));
    let mut bad = rides_request("x", &[1, 2]);
    bad["inputs"][1]["shape"] = json!([1]);
    bad["inputs"][1]["data"] = json!([5]);
    let r = server.post_json("/v2/models/rides/infer", &bad);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("DOLocationID"), "{}", r.text());
    let v2 = server.get("/v2").json();
    assert!(v2["extensions"].as_array().unwrap().contains(&json!("binary_tensor_data")), "{v2}");
}

#[test]
fn v1_answer_takes_a_kafka_payload_and_gives_the_results_topic_object() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(""), &[]);
    let payload = json!({"id": "ride-7", "PULocationID": 8, "DOLocationID": 57, "trip_distance": 2.25});
    let r = server.post_json("/v1/answer?model=rides", &payload);
    assert_eq!(r.status, 200, "{}", r.text());
    let a = r.json();
    let keys: HashSet<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, HashSet::from(["id", "prediction", "model", "model_version", "ingest_ms"]), "{a}");
    assert_eq!((a["id"].as_str(), a["model"].as_str()), (Some("ride-7"), Some("rides")));
    // The same row over the protocol gives the same prediction and version. Row 7 of
    // rides_request is PU 8, DO 50: build the row by hand instead.
    let oip = json!({"inputs": [
        {"name": "PULocationID", "shape": [1], "datatype": "INT64", "data": [8]},
        {"name": "DOLocationID", "shape": [1], "datatype": "INT64", "data": [57]},
        {"name": "trip_distance", "shape": [1], "datatype": "FP64", "data": [2.25]},
    ]});
    let r = server.post_json("/v2/models/rides/infer", &oip);
    assert!(close(predictions(&r)[0], a["prediction"].as_f64().unwrap()));
    assert_eq!(r.json()["model_version"], a["model_version"]);
    // A payload a stream would dead-letter is refused with the same reason.
    let r = server.post_json("/v1/answer?model=rides", &json!({"id": "bad", "PULocationID": 8, "trip_distance": 1.0}));
    assert_eq!((r.status, r.error_code()), (400, "missing_field".to_string()), "{}", r.text());
    // `request_id`, as a Kafka request carries it, is the ID too.
    let r = server.post_json("/v1/answer?model=rides", &json!({"request_id": "rq-1", "PULocationID": 8, "DOLocationID": 57, "trip_distance": 2.25}));
    assert_eq!(r.json()["id"], "rq-1", "{}", r.text());
    // Two models: a request must name one.
    let r = server.post_json("/v1/answer", &payload);
    assert_eq!((r.status, r.error_code()), (400, "no_model".to_string()));
}

#[test]
fn concurrent_clients_each_get_their_own_answer_while_a_two_million_ride_job_runs_on_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::start(dir.path(), &config(""), &[]));
    // What each row's answer is, asked alone, before any load.
    let rows: Vec<usize> = (0..1024).collect();
    let expected = predictions(&server.post_json("/v2/models/rides/infer", &rides_request("all", &rows)));
    let job = server.post_json("/v1/jobs", &json!({"template": "rides", "source": {"type": "generator", "count": 2_000_000, "seed": 3}}));
    assert_eq!(job.status, 202, "{}", job.text());
    let job_id = job.json()["job_id"].as_str().unwrap().to_string();
    // Wait until the job is answering, so the clients meet it on the model.
    let started = Instant::now();
    while server.get(&format!("/v1/jobs/{job_id}")).json()["counts"]["answered"].as_u64().unwrap() == 0 {
        assert!(started.elapsed() < Duration::from_secs(60), "the job never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    let clients: Vec<_> = (0..256)
        .map(|c| {
            let server = server.clone();
            std::thread::spawn(move || {
                (0..4)
                    .map(|k| {
                        let row = (c * 4 + k) % 1024;
                        let r = server.post_json("/v2/models/rides/infer", &rides_request(&format!("c{c}-{k}"), &[row]));
                        assert_eq!(r.json()["id"], format!("c{c}-{k}"), "the request's id echoed");
                        (row, predictions(&r)[0])
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut answered = 0;
    for c in clients {
        for (row, got) in c.join().unwrap() {
            assert!(close(got, expected[row]), "row {row}: {got} vs {}", expected[row]);
            answered += 1;
        }
    }
    assert_eq!(answered, 1024);
    let j = server.get(&format!("/v1/jobs/{job_id}")).json();
    assert_eq!(j["status"], "running", "the online requests were answered while the job ran: {j}");
    let stats = server.get("/v2/models/rides/stats").json();
    assert!(stats["stats"]["online_units"].as_u64().unwrap() >= 2048, "{stats}");
    assert!(stats["stats"]["units"].as_u64().unwrap() > stats["stats"]["online_units"].as_u64().unwrap(), "the job's rows ran on the same service: {stats}");
}

/// A model's service statistics once no online request is in flight (each one answered,
/// refused, or its units dropped).
fn idle_stats(server: &Server, model: &str) -> Value {
    let started = Instant::now();
    loop {
        let s = server.get(&format!("/v2/models/{model}/stats")).json()["stats"].clone();
        if s["in_flight"] == 0 {
            return s;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "requests still in flight: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A QA context long enough for `windows` windows of 384 tokens.
fn long_context(windows: usize) -> String {
    "The river carries silt from the mountains to the delta, where farmers grow rice in the wet season. ".repeat(windows * 14)
}

fn qa_request(id: &str, context: &str) -> Value {
    json!({"id": id, "inputs": [
        {"name": "question", "shape": [1], "datatype": "BYTES", "data": ["Where do farmers grow rice?"]},
        {"name": "context", "shape": [1], "datatype": "BYTES", "data": [context]},
    ]})
}

#[test]
fn past_the_queue_bound_requests_get_429_with_retry_after_and_none_is_lost_or_answered_twice() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "[models.qa]\nmax_queue = 4\n[models.rides]\n";
    let server = Arc::new(Server::start(dir.path(), &config(extra), &[]));
    let context = Arc::new(long_context(3));
    let want = server.post_json("/v2/models/qa/infer", &qa_request("first", &context));
    assert_eq!(want.status, 200, "{}", want.text());
    let answer = want.json()["outputs"][0]["data"][0].clone();
    let windows = server.get("/v2/models/qa/stats").json()["stats"]["online_units"].as_u64().unwrap();
    assert!(windows >= 3, "a long context is several windows: {windows}");
    let clients: Vec<_> = (0..48)
        .map(|i| {
            let (server, context) = (server.clone(), context.clone());
            std::thread::spawn(move || (i, server.post_json("/v2/models/qa/infer", &qa_request(&format!("q{i}"), &context))))
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for c in clients {
        let (i, r) = c.join().unwrap();
        match r.status {
            200 => {
                let v = r.json();
                assert_eq!(v["id"], format!("q{i}"), "each answer to its own request");
                assert_eq!(v["outputs"][0]["data"][0], answer);
                ok += 1;
            }
            429 => {
                assert_eq!(r.headers.get("retry-after").map(String::as_str), Some("1"), "{:?}", r.headers);
                assert!(r.json()["error"].as_str().unwrap().contains("queue is full"), "{}", r.text());
                refused += 1;
            }
            other => panic!("request {i}: {other} {}", r.text()),
        }
    }
    assert_eq!(ok + refused, 48);
    assert!(refused > 0 && ok >= 4, "{ok} answered, {refused} refused");
    let stats = server.get("/v2/models/qa/stats").json()["stats"].clone();
    assert_eq!(stats["online_units"].as_u64().unwrap(), windows * (ok as u64 + 1), "only admitted requests ran, each once: {stats}");
    assert_eq!(stats["online_submitted"], stats["online_units"], "{stats}");
    assert_eq!(stats["in_flight"], 0);
}

#[test]
fn a_client_that_disconnects_cancels_its_queued_work() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &config(""), &[]);
    let context = long_context(6);
    // Twelve clients queue long requests, then hang up before most have run.
    let mut sockets = Vec::new();
    for i in 0..12 {
        let body = qa_request(&format!("gone{i}"), &context).to_string();
        let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
        write!(s, "POST /v2/models/qa/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        sockets.push(s);
    }
    std::thread::sleep(Duration::from_millis(400));
    for s in &sockets {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    drop(sockets);
    // Once the model is idle again every unit was either run or dropped unrun.
    let stats = idle_stats(&server, "qa");
    let (submitted, ran, canceled) =
        (stats["online_submitted"].as_u64().unwrap(), stats["online_units"].as_u64().unwrap(), stats["canceled_units"].as_u64().unwrap());
    assert_eq!(submitted % 12, 0, "every request has the same windows: {stats}");
    assert_eq!(ran + canceled, submitted, "each unit run or dropped: {stats}");
    assert!(canceled >= submitted / 2, "the hung-up requests' queued units were not run: {stats}");
    // The server still answers.
    assert_eq!(server.post_json("/v2/models/qa/infer", &qa_request("after", &long_context(1))).status, 200);
}

#[test]
fn a_new_version_is_swapped_in_under_load_and_a_broken_one_is_refused_while_the_old_serves() {
    let dir = tempfile::tempdir().unwrap();
    let repo_dir = dir.path().join("rides-repo");
    std::fs::create_dir_all(repo_dir.join("1")).unwrap();
    std::fs::copy(repo().join("models/rides/model.onnx"), repo_dir.join("1/model.onnx")).unwrap();
    let extra = format!("[models.rides]\nrepository = {repo_dir:?}\n[models.qa]\n");
    let server = Arc::new(Server::start(dir.path(), &config(&extra), &[]));
    assert_eq!(server.get("/v2/models/rides/versions/1/ready").status, 200);
    let stop = Arc::new(AtomicBool::new(false));
    // Eight clients, about 1,000 requests a second together, each noting the version per answer.
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (server, stop) = (server.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen: Vec<String> = Vec::new();
                let mut failed = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = server.post_json("/v2/models/rides/infer", &rides_request(&format!("c{c}"), &[c]));
                    if r.status == 200 {
                        seen.push(r.json()["model_version"].as_str().unwrap().to_string());
                    } else {
                        failed.push(format!("{} {}", r.status, r.text()));
                    }
                    std::thread::sleep(Duration::from_millis(8));
                }
                (seen, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    // Version 2 appears whole (written beside, then renamed in).
    std::fs::create_dir_all(repo_dir.join("tmp2")).unwrap();
    std::fs::copy(repo().join("models/rides/model.onnx"), repo_dir.join("tmp2/model.onnx")).unwrap();
    std::fs::rename(repo_dir.join("tmp2"), repo_dir.join("2")).unwrap();
    let started = Instant::now();
    while server.get("/v2/repository/index").json()[1]["version"] != "2" {
        assert!(started.elapsed() < Duration::from_secs(30), "version 2 not loaded: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // A broken version 3 is refused; 2 keeps serving.
    std::fs::create_dir_all(repo_dir.join("tmp3")).unwrap();
    std::fs::write(repo_dir.join("tmp3/model.onnx"), b"not an onnx model").unwrap();
    std::fs::rename(repo_dir.join("tmp3"), repo_dir.join("3")).unwrap();
    let started = Instant::now();
    let index = loop {
        let index = server.get("/v2/repository/index").json();
        if index[1]["reason"].is_string() {
            break index;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "version 3 neither loaded nor refused: {index}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!((&index[1]["name"], &index[1]["version"], &index[1]["state"]), (&json!("rides"), &json!("2"), &json!("READY")), "{index}");
    assert!(index[1]["reason"].as_str().unwrap().starts_with("version 3 refused"), "{index}");
    std::thread::sleep(Duration::from_millis(500));
    // Loading it by name is refused the same way, with the reason.
    let r = server.call("POST", "/v2/repository/models/rides/load", &[("Content-Type", "application/json")], br#"{"parameters": {"version": "3"}}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (seen, failed) = c.join().unwrap();
        assert!(failed.is_empty(), "no request failed: {failed:?}");
        let switch = seen.iter().position(|v| v == "2").expect("each client saw version 2");
        assert!(switch > 0, "each client saw version 1 first");
        assert!(seen[..switch].iter().all(|v| v == "1") && seen[switch..].iter().all(|v| v == "2"), "one switch from 1 to 2: {seen:?}");
        total += seen.len();
    }
    assert!(total > 500, "{total} requests");
    assert_eq!(server.get("/v2/models/rides/versions/2/ready").status, 200);
    assert_eq!(server.get("/v2/models/rides/versions/1/ready").status, 404);
    // Unload: 404 until loaded again; load goes back to the newest good version.
    assert_eq!(server.call("POST", "/v2/repository/models/rides/unload", &[], b"").status, 200);
    assert_eq!(server.post_json("/v2/models/rides/infer", &rides_request("x", &[1])).status, 404);
    let r = server.call("POST", "/v2/repository/models/rides/load", &[("Content-Type", "application/json")], br#"{"parameters": {"version": "2"}}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.post_json("/v2/models/rides/infer", &rides_request("x", &[1])).json()["model_version"], "2");
}

#[test]
fn http_clients_and_a_kafka_stream_on_the_same_model_each_get_their_own_answers() {
    use common::kafka;
    let dir = tempfile::tempdir().unwrap();
    let (topic, results, dead) = (kafka::unique("online_in"), kafka::unique("online_out"), kafka::unique("online_dead"));
    kafka::create_topics(&[&topic, &results, &dead], 2);
    // The rides template's task and batching, so the stream shares the HTTP model's service.
    let pipeline = format!(
        "name = \"rides_stream\"\n[source]\ntype = \"kafka\"\nbrokers = \"{b}\"\ntopic = \"{topic}\"\nepoch_ms = 20\n[task]\ntype = \"tabular\"\nmodel = \"models/rides/model.onnx\"\n[batching]\nmax_batch = 512\nmax_delay_ms = 2\n[runtime]\nprogress = false\n[[sinks]]\ntype = \"kafka\"\nbrokers = \"{b}\"\ntopic = \"{results}\"\ndead_letter_topic = \"{dead}\"\n",
        b = kafka::brokers()
    );
    let pipeline_path = dir.path().join("stream.toml");
    std::fs::write(&pipeline_path, pipeline).unwrap();
    let server = Arc::new(Server::start(dir.path(), &format!("pipelines = [{pipeline_path:?}]\n{}", config("")), &[]));
    let rows: Vec<usize> = (0..1024).collect();
    let expected = Arc::new(predictions(&server.post_json("/v2/models/rides/infer", &rides_request("all", &rows))));
    let n = 20_000usize;
    let producer = std::thread::spawn(move || {
        let p = kafka::producer();
        let messages: Vec<(String, Vec<u8>)> = (0..n)
            .map(|i| {
                let r = i % 1024;
                let payload = json!({"request_id": format!("k{i}"), "PULocationID": 1 + r % 263, "DOLocationID": 1 + (r * 7) % 263, "trip_distance": 0.5 + (r % 97) as f64 * 0.25});
                (format!("k{i}"), payload.to_string().into_bytes())
            })
            .collect();
        kafka::produce(&p, &topic, &messages);
    });
    let clients: Vec<_> = (0..256)
        .map(|c| {
            let (server, expected) = (server.clone(), expected.clone());
            std::thread::spawn(move || {
                for k in 0..4 {
                    let row = (c * 4 + k + 512) % 1024;
                    let r = server.post_json("/v2/models/rides/infer", &rides_request(&format!("c{c}-{k}"), &[row]));
                    assert_eq!(r.json()["id"], format!("c{c}-{k}"));
                    let got = predictions(&r)[0];
                    assert!(close(got, expected[row]), "client {c} row {row}: {got} vs {}", expected[row]);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    producer.join().unwrap();
    let got = kafka::read_topic(&results, n, Duration::from_secs(120));
    let mut by_id: HashMap<String, f64> = HashMap::new();
    for (_, payload, _) in &got {
        let v: Value = serde_json::from_slice(payload).unwrap();
        by_id.insert(v["id"].as_str().unwrap().to_string(), v["prediction"].as_f64().unwrap());
    }
    assert_eq!(by_id.len(), n, "every streamed ride answered once on the results topic");
    for (id, p) in &by_id {
        let row = id[1..].parse::<usize>().unwrap_or_else(|_| panic!("result id {id:?}")) % 1024;
        assert!(close(*p, expected[row]), "{id}: {p} vs {}", expected[row]);
    }
    let stats = server.get("/v2/models/rides/stats").json()["stats"].clone();
    assert!(stats["online_units"].as_u64().unwrap() >= 1024 + 1024, "{stats}");
    assert!(
        stats["units"].as_u64().unwrap() >= stats["online_units"].as_u64().unwrap() + n as u64,
        "the stream's rides ran on the HTTP model's service: {stats}"
    );
}

/// The ride model with its prediction doubled (one `Mul` after its output): a second version
/// whose answers differ from the first's.
fn doubled_model(to: &Path) {
    let script = r#"
import sys
import numpy as np
import onnx
from onnx import helper, numpy_helper
m = onnx.load(sys.argv[1])
name = m.graph.output[0].name
for n in m.graph.node:
    for i, o in enumerate(n.output):
        if o == name:
            n.output[i] = name + "_v1"
m.graph.initializer.append(numpy_helper.from_array(np.array([2.0], dtype=np.float32), "v2_scale"))
m.graph.node.append(helper.make_node("Mul", [name + "_v1", "v2_scale"], [name]))
onnx.save(m, sys.argv[2])
"#;
    let out = Command::new(python()).args(["-c", script, repo().join("models/rides/model.onnx").to_str().unwrap(), to.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "cannot make the doubled model: {}", String::from_utf8_lossy(&out.stderr));
}

/// Each ID's latest answer in a JSON-lines output folder (an upsert replaces, a delete removes).
fn live_answers(dir: &Path) -> HashMap<String, Value> {
    let mut live = HashMap::new();
    for v in json_lines(dir, "answers") {
        let id = v["id"].as_str().unwrap().to_string();
        if v["op"] == "delete" {
            live.remove(&id);
        } else {
            live.insert(id, v);
        }
    }
    live
}

fn put_version(repo_dir: &Path, version: u32, model: &Path) {
    let tmp = repo_dir.join(format!("tmp{version}"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(model, tmp.join("model.onnx")).unwrap();
    std::fs::rename(&tmp, repo_dir.join(version.to_string())).unwrap();
}

#[test]
fn with_recompute_every_live_row_of_a_watched_folder_is_answered_again_by_the_new_version_and_a_restart_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (repo_dir, data, out) = (dir.path().join("repo"), dir.path().join("data"), dir.path().join("out"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.csv"), rides_csv(0..120)).unwrap();
    std::fs::write(data.join("b.csv"), rides_csv(1000..1080)).unwrap();
    std::fs::create_dir_all(repo_dir.join("1")).unwrap();
    std::fs::copy(repo().join("models/rides/model.onnx"), repo_dir.join("1/model.onnx")).unwrap();
    let doubled = dir.path().join("doubled.onnx");
    doubled_model(&doubled);
    // The rides template's task and batching over a watched folder, recomputed on a model change.
    let pipeline = format!(
        "name = \"rides_folder\"\n[source]\ntype = \"files\"\npath = {data:?}\nwatch = true\npoll_ms = 100\nsettle_ms = 100\n[task]\ntype = \"tabular\"\nmodel = \"models/rides/model.onnx\"\n[batching]\nmax_batch = 512\nmax_delay_ms = 2\n[runtime]\nprogress = false\non_model_change = \"recompute\"\n[[sinks]]\ntype = \"jsonl\"\ndir = {out:?}\n"
    );
    let pipeline_path = dir.path().join("folder.toml");
    std::fs::write(&pipeline_path, pipeline).unwrap();
    let serve = format!("pipelines = [{pipeline_path:?}]\n{}", config(&format!("[models.rides]\nrepository = {repo_dir:?}\n[models.qa]\n")));
    let wait_all = |label: &str, what: &str| {
        let started = Instant::now();
        loop {
            let live = live_answers(&out);
            if live.len() == 200 && live.values().all(|v| v["model"] == label) {
                return live;
            }
            let by: HashSet<String> = live.values().map(|v| v["model"].as_str().unwrap_or_default().to_string()).collect();
            assert!(started.elapsed() < Duration::from_secs(60), "{what}: {} live answers by {by:?}", live.len());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut server = Server::start(dir.path(), &serve, &[]);
    let v1 = wait_all("rides@1", "version 1's answers");
    // Version 2 (predictions doubled) appears: every live row is answered again by it.
    put_version(&repo_dir, 2, &doubled);
    let v2 = wait_all("rides@2", "every row recomputed by version 2");
    for (id, a) in &v2 {
        let (p1, p2) = (v1[id]["prediction"].as_f64().unwrap(), a["prediction"].as_f64().unwrap());
        assert!(close(p2, 2.0 * p1), "{id}: {p2} is not version 2's answer (2 x {p1})");
    }
    // The same as a fresh `sluice run` with version 2.
    let fresh_out = dir.path().join("fresh");
    let topology = format!(
        "name = \"fresh\"\n[source]\ntype = \"files\"\npath = {data:?}\nwatch = false\n[task]\ntype = \"tabular\"\nmodel = {:?}\n[[sinks]]\ntype = \"jsonl\"\ndir = {fresh_out:?}\n",
        repo_dir.join("2/model.onnx")
    );
    let mut run = spawn_sluice(dir.path(), &topology, &[], &[]);
    assert!(run.wait_timeout(Duration::from_secs(120)).expect("sluice run ended").success(), "{}", run.stderr_tail());
    let fresh = live_answers(&fresh_out);
    assert_eq!(fresh.len(), 200);
    for (id, a) in &fresh {
        assert!(close(v2[id]["prediction"].as_f64().unwrap(), a["prediction"].as_f64().unwrap()), "{id}: recomputed {} vs fresh {}", v2[id], a);
    }
    // A change while the server is down: version 3 (the first model again) is there at the
    // restart, and the restart answers every row with it.
    server.kill9();
    put_version(&repo_dir, 3, &repo().join("models/rides/model.onnx"));
    let _server = Server::start(dir.path(), &serve, &[]);
    let v3 = wait_all("rides@3", "every row recomputed by version 3 after the restart");
    for (id, a) in &v3 {
        assert!(close(a["prediction"].as_f64().unwrap(), v1[id]["prediction"].as_f64().unwrap()), "{id}");
    }
}

#[test]
fn recompute_on_a_source_that_cannot_answer_its_rows_again_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let topology = format!(
        "name = \"gen\"\n[source]\ntype = \"generator\"\ncount = 10\n[task]\ntype = \"tabular\"\nmodel = \"{}/models/rides/model.onnx\"\n[runtime]\non_model_change = \"recompute\"\n[[sinks]]\ntype = \"jsonl\"\ndir = {:?}\n",
        repo().display(),
        dir.path().join("out")
    );
    let mut run = spawn_sluice(dir.path(), &topology, &[], &[]);
    let status = run.wait_timeout(Duration::from_secs(60)).expect("sluice run ended");
    assert!(!status.success());
    let err = run.stderr();
    assert!(err.contains("on_model_change = \"recompute\" needs a source that can answer every live row again"), "{err}");
    assert!(err.contains("watch = true"), "{err}");
}

#[test]
fn a_request_past_its_timeout_gets_504_and_its_work_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::start(dir.path(), &config(""), &[]));
    let context = Arc::new(long_context(6));
    // Keep the QA model busy, then ask with a timeout of 50 microseconds.
    let busy: Vec<_> = (0..4)
        .map(|i| {
            let (server, context) = (server.clone(), context.clone());
            std::thread::spawn(move || server.post_json("/v2/models/qa/infer", &qa_request(&format!("busy{i}"), &context)).status)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut late = qa_request("late", &context);
    late["parameters"] = json!({"timeout": 50});
    let r = server.post_json("/v2/models/qa/infer", &late);
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("timeout"), "{}", r.text());
    for b in busy {
        assert_eq!(b.join().unwrap(), 200);
    }
    let stats = idle_stats(&server, "qa");
    let per_request = stats["online_submitted"].as_u64().unwrap() / 5;
    assert_eq!(stats["online_units"].as_u64().unwrap(), 4 * per_request, "the late request's units never ran: {stats}");
    assert_eq!(stats["canceled_units"].as_u64().unwrap() + stats["expired_units"].as_u64().unwrap(), per_request, "{stats}");
}

#[test]
fn a_rewritten_model_file_is_a_new_version_named_by_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("rides/model.onnx");
    std::fs::create_dir_all(model.parent().unwrap()).unwrap();
    std::fs::copy(repo().join("models/rides/model.onnx"), &model).unwrap();
    let template = std::fs::read_to_string(repo().join("topologies/rides_generator.toml")).unwrap().replace("models/rides/model.onnx", model.to_str().unwrap());
    let template_path = dir.path().join("rides.toml");
    std::fs::write(&template_path, template).unwrap();
    let serve = format!("workers = 2\nmodel_poll_ms = 100\n[templates]\nrides = {template_path:?}\n");
    let server = Server::start(dir.path(), &serve, &[]);
    let first = server.post_json("/v2/models/rides/infer", &rides_request("a", &[5])).json();
    // The file is replaced (written beside, renamed over) by the doubled model.
    let doubled = dir.path().join("doubled.onnx");
    doubled_model(&doubled);
    std::fs::rename(&doubled, &model).unwrap();
    let started = Instant::now();
    let second = loop {
        let r = server.post_json("/v2/models/rides/infer", &rides_request("b", &[5])).json();
        if r["model_version"] != first["model_version"] {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the rewritten file was not loaded: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(50));
    };
    let (p1, p2) = (first["outputs"][0]["data"][0].as_f64().unwrap(), second["outputs"][0]["data"][0].as_f64().unwrap());
    assert!(close(p2, 2.0 * p1), "{p2} vs 2 x {p1}");
    assert_eq!(second["model_version"].as_str().unwrap().len(), 12, "a digest's first 12 hex digits: {second}");
    // A job on the template now runs on the new version too: its answers name it.
    let job = server.post_json("/v1/jobs", &json!({"template": "rides", "source": {"type": "generator", "count": 100, "seed": 1}}));
    let id = job.json()["job_id"].as_str().unwrap().to_string();
    let started = Instant::now();
    while server.get(&format!("/v1/jobs/{id}")).json()["status"] != "succeeded" {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(50));
    }
    let answers = server.get(&format!("/v1/jobs/{id}/answers?limit=1000")).text();
    let want = format!("rides@{}", second["model_version"].as_str().unwrap());
    assert_eq!(answers.lines().count(), 100);
    for line in answers.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["model"], want.as_str(), "{line}");
    }
    // SIGTERM with models served and watched: the server stops cleanly (their services stop
    // once nothing holds them).
    let mut server = server;
    assert_eq!(server.terminate(Duration::from_secs(30)).and_then(|s| s.code()), Some(0), "{}", server.stderr());
}
