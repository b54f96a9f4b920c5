//! Timely's own cluster mode: two `sluice run` processes with a hostfile split one pipeline
//! between them, and together answer every generated ride exactly once.

mod common;

use common::blackbox::spawn_sluice;
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn two_processes_answer_every_ride_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = 24000 + (std::process::id() % 1000) as u16 * 2;
    let hosts = dir.path().join("hosts.txt");
    std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", base, base + 1)).unwrap();
    let out = dir.path().join("out");
    let text = format!(
        "name = \"cluster\"\n[source]\ntype = \"generator\"\ncount = 20000\nseed = 5\n[task]\ntype = \"tabular\"\nmodel = \"{}\"\n[batching]\nmax_batch = 512\n[runtime]\nworkers = 1\nepoch_records = 1000\nprogress = false\n[[sinks]]\ntype = \"jsonl\"\ndir = \"{}\"\n",
        common::repo().join("models/rides/model.onnx").display(),
        out.display()
    );
    let h = hosts.to_str().unwrap();
    let mut p1 = spawn_sluice(dir.path(), &text, &["--process", "1", "--hostfile", h], &[]);
    let mut p0 = spawn_sluice(dir.path(), &text, &["--process", "0", "--hostfile", h], &[]);
    // Bounded: a process that fails at start leaves the other waiting for it for good (timely's
    // cluster connects forever), so the test fails with both stderrs instead of hanging.
    let limit = Duration::from_secs(300);
    let s0 = p0.wait_timeout(limit);
    let s1 = p1.wait_timeout(if s0.is_some_and(|s| s.success()) { limit } else { Duration::from_secs(5) });
    let logs = format!("process 0: {s0:?}\n{}\nprocess 1: {s1:?}\n{}", p0.stderr_tail(), p1.stderr_tail());
    p0.kill();
    p1.kill();
    assert!(s0.is_some_and(|s| s.success()) && s1.is_some_and(|s| s.success()), "{logs}");
    let answers = common::read_lines(&out, "answers.w");
    let ids: HashSet<String> = answers.iter().map(|a| a["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(answers.len(), 20000);
    assert_eq!(ids.len(), 20000, "no ride answered twice");
    for w in ["answers.w0.jsonl", "answers.w1.jsonl"] {
        assert!(std::fs::metadata(out.join(w)).unwrap().len() > 0, "process {w} did part of the work");
    }
}
