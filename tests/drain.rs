//! A stop with a backlog of slow requests: the harness admits no more than the pipeline has
//! been measured to make durable within a quarter of the shutdown grace, so SIGTERM on a watched folder
//! with a long QA file drains in time (exit 0, no model errors), and the file's read stores how
//! far it got, so the restart answers only the rest. Black-box, against the real binary, the
//! bundled QA model and JSON lines.

mod common;

use common::blackbox::{json_lines, spawn_sluice, wait_until};
use common::kafka::unique;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

fn long_qa_csv(n: usize) -> String {
    let mut s = String::from("id,question,context\n");
    for i in 0..n {
        let filler: String = (0..24).map(|k| format!("Sentence {k} of note {i} tells of the engine and its cards. ")).collect();
        s.push_str(&format!("q{i},Who wrote note {i}?,\"{filler}Note {i} was written by Ada Lovelace in 1843, in London.\"\n"));
    }
    s
}

fn topology(name: &str, input: &std::path::Path, out: &std::path::Path) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    format!(
        r#"name = "{name}"
[source]
type = "files"
path = "{input}"
watch = true
poll_ms = 100
settle_ms = 200
[task]
type = "extractive_qa"
model = "{root}/models/minilm-squad/model.onnx"
tokenizer = "{root}/models/minilm-squad/tokenizer.json"
[batching]
max_batch = 16
max_delay_ms = 5
[runtime]
workers = 2
progress = false
shutdown_grace_ms = 8000
[[sinks]]
type = "jsonl"
dir = "{out}"
"#,
        input = input.display(),
        out = out.display()
    )
}

/// `answered N` from a run's summary line.
fn answered(stdout: &str) -> u64 {
    stdout.split("answered ").nth(1).and_then(|r| r.split(',').next()).and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("no summary in {stdout:?}"))
}

#[test]
fn sigterm_on_a_watched_qa_backlog_drains_within_the_grace_and_the_restart_answers_only_the_rest() {
    // Before: 65,536 records per worker were admitted whatever the model's pace, so SIGTERM
    // waited for the whole file, ran past the grace (exit 3, with model errors from a process
    // ending under its model threads), and the file's manifest, stored only at its end, made the
    // restart answer every row again.
    let dir = tempfile::tempdir().unwrap();
    let (input, out) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir_all(&input).unwrap();
    let rows = 3000;
    std::fs::write(input.join("notes.tmp"), long_qa_csv(rows)).unwrap();
    std::fs::rename(input.join("notes.tmp"), input.join("notes.csv")).unwrap();
    let text = topology(&unique("drain"), &input, &out);
    let mut w = spawn_sluice(dir.path(), &text, &[], &[("RUST_LOG", "sluice=info")]);
    let count = || json_lines(&out, "answers.w").len();
    assert!(wait_until(Duration::from_secs(120), || count() >= 50), "answers start\n{}", w.stderr_tail());
    let signalled = Instant::now();
    w.signal("-TERM");
    let status = w.wait_timeout(Duration::from_secs(30)).unwrap_or_else(|| panic!("no exit\n{}", w.stderr_tail()));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "a clean stop within the grace ({took:?})\n{}", w.stderr_tail());
    // Exit 0 is the promise: past the grace the watchdog ends the process with 3.
    eprintln!("drained in {took:?}");
    let first = answered(&w.stdout()) as usize;
    assert!(first < rows, "the stop came before the file was done: {first}");
    let err = w.stderr();
    assert!(!err.contains("model refused") && !err.contains("GetElementType"), "no model errors at shutdown\n{}", w.stderr_tail());
    assert!(!out.join("dead_letters.w0.jsonl").exists() || json_lines(&out, "dead_letters.w").is_empty(), "no dead letters");
    // The restart answers only what the first run had not made durable.
    let mut again = spawn_sluice(dir.path(), &text, &[], &[("RUST_LOG", "sluice=info")]);
    let ids = || -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for v in json_lines(&out, "answers.w") {
            *m.entry(v["id"].as_str().unwrap().to_string()).or_default() += 1;
        }
        m
    };
    assert!(wait_until(Duration::from_secs(600), || ids().len() == rows), "every row answered once the restart is done\n{}", again.stderr_tail());
    std::thread::sleep(Duration::from_millis(500));
    again.signal("-TERM");
    let status = again.wait_timeout(Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", again.stderr_tail());
    let second = answered(&again.stdout()) as usize;
    assert_eq!(first + second, rows, "nothing answered twice: {first} then {second}");
    assert!(ids().values().all(|&n| n == 1), "one answer line per ID");
}

#[test]
fn sigterm_half_way_through_a_1m_row_file_and_the_restart_answers_exactly_the_rest() {
    // A one-shot read of one 1,000,000-row rides file into Postgres, stopped once a tenth is
    // answered: the stop stores how far the file's read got, with the answers it covers, so the
    // restart answers the rest and nothing twice (before, a file's manifest came only at its end
    // and the restart answered every row again).
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let rows = 1_000_000usize;
    let mut csv = String::with_capacity(rows * 32);
    csv.push_str("id,PULocationID,DOLocationID,trip_distance\n");
    for i in 0..rows {
        csv.push_str(&format!("r{i},{},{},{}\n", 1 + i % 263, 1 + (i * 7) % 263, 0.5 + (i % 97) as f64 * 0.25));
    }
    std::fs::write(input.join("rides.csv"), csv).unwrap();
    let name = unique("drain1m");
    let table = format!("{name}_answers");
    let text = format!(
        r#"name = "{name}"
[source]
type = "files"
path = "{input}"
[task]
type = "tabular"
model = "{root}/models/rides/model.onnx"
[runtime]
workers = 2
progress = false
[[sinks]]
type = "postgres"
url = "{pg}"
table = "{table}"
"#,
        input = input.display(),
        root = env!("CARGO_MANIFEST_DIR"),
        pg = common::pg_url(),
    );
    let mut w = spawn_sluice(dir.path(), &text, &[], &[("RUST_LOG", "sluice=info")]);
    let count =
        || common::blackbox::try_query(&format!("SELECT count(*) FROM {}", common::blackbox::quote_pg(&table))).map(|r| r[0].get::<_, i64>(0)).unwrap_or(0);
    assert!(wait_until(Duration::from_secs(300), || count() >= 100_000), "a tenth answered\n{}", w.stderr_tail());
    w.signal("-TERM");
    let status = w.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|| panic!("no exit\n{}", w.stderr_tail()));
    assert_eq!(status.code(), Some(0), "{}", w.stderr_tail());
    let first = answered(&w.stdout()) as usize;
    assert!(first < rows, "the stop came before the file was done: {first}");
    assert_eq!(count() as usize, first, "the table holds what the first run says it answered");
    let mut again = spawn_sluice(dir.path(), &text, &[], &[("RUST_LOG", "sluice=info")]);
    let status = again.wait_timeout(Duration::from_secs(600)).unwrap_or_else(|| panic!("the restart ends\n{}", again.stderr_tail()));
    assert_eq!(status.code(), Some(0), "{}", again.stderr_tail());
    let second = answered(&again.stdout()) as usize;
    assert_eq!(first + second, rows, "the restart answers exactly the rest: {first} then {second}");
    assert_eq!(count() as usize, rows);
}
