//! JSON-lines recovery after kill -9 (black-box, Tansu): a Kafka → JSON-lines pipeline killed
//! with SIGKILL while rides arrive, then restarted, holds every ride's answer exactly once, with
//! the model's prediction. The README's promise: the sink writes and syncs the answers, then
//! atomically replaces `checkpoint.w<N>.json` (the sources' positions and the files' lengths); a
//! restart cuts the files back to those lengths and resumes the topic there.

mod common;

use common::blackbox::*;
use common::kafka::{create_topics, produce, producer, unique};
use common::rides::{expected, rides};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn topology(name: &str, topic: &str, out: &Path) -> String {
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
type = "jsonl"
dir = "{out}"
"#,
        b = common::kafka::brokers(),
        out = out.display()
    )
}

/// Per worker file: (the answers' length the checkpoint names, the file's length, the sum of the
/// next offsets it names).
fn checkpoints(out: &Path) -> BTreeMap<String, (u64, u64, u64)> {
    let mut got = BTreeMap::new();
    for entry in std::fs::read_dir(out).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(worker) = name.strip_prefix("checkpoint.w").and_then(|r| r.strip_suffix(".json")) else { continue };
        let cp: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
        let named = cp["answers_len"].as_u64().unwrap();
        let len = std::fs::metadata(out.join(format!("answers.w{worker}.jsonl"))).map(|m| m.len()).unwrap_or(0);
        let offsets: u64 = cp["checkpoints"].as_array().unwrap().iter().map(|c| c[0]["position"].as_str().unwrap().parse::<u64>().unwrap()).sum();
        got.insert(worker.to_string(), (named, len, offsets));
    }
    got
}

/// The complete lines in the first `len` bytes of `path`.
fn lines_within(path: &Path, len: u64) -> u64 {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes[..(len as usize).min(bytes.len())].iter().filter(|b| **b == b'\n').count() as u64
}

#[test]
fn a_kafka_to_json_lines_run_killed_with_sigkill_and_restarted_answers_every_id_exactly_once() {
    let name = unique("jr_kill");
    let topic = format!("{name}_rides");
    create_topics(&[&topic], 4);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let topo = topology(&name, &topic, &out);
    let n = 20_000;
    let messages = rides(&name, n, 31);
    let p = producer();
    let mut worker = spawn_sluice(dir.path(), &topo, &["--workers", "2"], &[]);
    let mut published = 0usize;
    let mut killed = false;
    for (i, chunk) in messages.chunks(2_000).enumerate() {
        if i == 4 && !killed {
            assert!(wait_until(Duration::from_secs(60), || !answer_ids(&out).is_empty()), "the first run answered nothing; stderr:\n{}", worker.stderr_tail());
            // A fresh slice, and SIGKILL as soon as the broker has it: rides read but not yet
            // durable (an epoch takes 20 ms to close) die with the process.
            produce(&p, &topic, chunk);
            published += chunk.len();
            worker.signal("-9");
            let status = worker.wait_timeout(Duration::from_secs(10)).expect("the process ends on SIGKILL");
            assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "killed by SIGKILL: {status:?}");
            killed = true;
            // Whatever the kill interrupted, the lines each checkpoint covers are exactly the
            // rides of the offsets it names; lines past it (written, not yet named) are cut by
            // the restart.
            let cps = checkpoints(&out);
            let covered: u64 = cps.iter().map(|(w, (named, _, _))| lines_within(&out.join(format!("answers.w{w}.jsonl")), *named)).sum();
            let offsets: u64 = cps.values().map(|c| c.2).sum();
            assert_eq!(covered, offsets, "at the kill the checkpoints cover {covered} answer lines but name offsets of {offsets} rides: {cps:?}");
            assert!(offsets <= published as u64);
            eprintln!("at the kill: {} answer lines for {published} rides, {covered} covered by checkpoints {cps:?}", answer_ids(&out).len());
            worker = spawn_sluice(dir.path(), &topo, &["--workers", "2"], &[]);
        } else {
            produce(&p, &topic, chunk);
            published += chunk.len();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(killed && published == n);
    let all = wait_until(Duration::from_secs(120), || answer_ids(&out).len() >= n);
    assert!(all, "{} of {n} answer lines after the restart; stderr:\n{}", answer_ids(&out).len(), worker.stderr_tail());
    worker.signal("-TERM");
    let status = worker.wait_timeout(Duration::from_secs(30));
    worker.kill();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "SIGTERM exits 0; stderr:\n{}", worker.stderr_tail());

    // Exactly once: one line per ride (the restart cut off whatever its checkpoint did not
    // cover, and read the topic again from there), each with the model's prediction.
    let lines = json_lines(&out, "answers.w");
    let want = expected(&messages);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for l in &lines {
        let id = l["id"].as_str().unwrap().to_string();
        let p = l["prediction"].as_f64().unwrap();
        match want.get(&id) {
            // Within the last bits an f32 output moves by with its batch's shape (tests/pubsub.rs).
            Some(w) if (p - w).abs() <= 1e-5 * w.abs().max(1.0) => {}
            other => wrong.push(format!("{id}: {p} (model: {other:?})")),
        }
        *counts.entry(id).or_default() += 1;
    }
    let dups: Vec<(&String, &usize)> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
    assert!(wrong.is_empty(), "answers that are not the model's: {:?}", &wrong[..wrong.len().min(5)]);
    assert_eq!(lines.len(), n, "one answer line per ride; duplicated e.g. {dups:?}");
    assert_eq!(counts.len(), n, "every ride answered");
    assert!(json_lines(&out, "dead_letters.w").is_empty(), "no dead letters");
    // The checkpoints name exactly what is on disk and every ride's next offset.
    let cps = checkpoints(&out);
    assert_eq!(cps.len(), 2, "one checkpoint file per worker: {cps:?}");
    for (w, (named, len, _)) in &cps {
        assert_eq!(named, len, "worker {w}: the checkpoint names {named} bytes of answers, the file holds {len}");
    }
    assert_eq!(cps.values().map(|c| c.2).sum::<u64>(), n as u64, "the stored offsets cover every ride: {cps:?}");
}
