//! What the README promises about the process, checked on the built binary (`sluice run`,
//! black-box): the Prometheus endpoint on `[metrics] listen` serves `sluice_` counters equal to
//! the run's own counts, and the exit status is 0 for a run that ends normally (and after
//! SIGTERM), 101 when a thread panics, and 3 when the sinks cannot drain within
//! `runtime.shutdown_grace_ms` after SIGTERM.

mod common;

use common::blackbox::*;
use common::kafka::unique;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The body of `GET /metrics` on `port`, or None while nothing answers there.
fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The sum of the samples of `name` whose labels hold every one of `labels` (`key="value"`).
fn metric(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
        if series_name == name && labels.iter().all(|l| series_labels.contains(l)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

fn rides_csv(good: usize) -> String {
    let mut s = String::from("id,PULocationID,DOLocationID,trip_distance\n");
    for i in 0..good {
        s.push_str(&format!("r{i},{},{},{:.2}\n", 1 + i * 7 % 260, 1 + i * 13 % 260, 0.5 + i as f64 * 0.1));
    }
    s
}

fn rides_topology(name: &str, source: &str, out: &Path, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n{source}\n[task]\ntype = \"tabular\"\nmodel = \"{}/models/rides/model.onnx\"\n[runtime]\nprogress = false\n{extra}\n[[sinks]]\ntype = \"jsonl\"\ndir = \"{}\"\n",
        env!("CARGO_MANIFEST_DIR"),
        out.display()
    )
}

#[test]
fn the_metrics_endpoint_serves_sluice_counters_equal_to_the_runs_counts() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    // 40 good rides, one with a distance that is not a number, one row short of a column.
    let mut csv = rides_csv(40);
    csv.push_str("bad-type,3,4,far\nbad-short,3,4\n");
    std::fs::write(input.join("rides.csv"), csv).unwrap();
    let out = dir.path().join("out");
    let port = free_port();
    let source = format!("[source]\ntype = \"files\"\npath = \"{}\"\nwatch = true\npoll_ms = 100\nsettle_ms = 100\n", input.display());
    let text = rides_topology(&unique("pc_metrics"), &source, &out, &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let mut p = spawn_sluice(dir.path(), &text, &["--workers", "1"], &[]);
    // The counters settle once every row is durable; wait for that, however long it takes.
    let mut body = String::new();
    let settled = wait_until(Duration::from_secs(90), || {
        body = scrape(port).unwrap_or_default();
        metric(&body, "sluice_sink_answers_total", &[]) == Some(40.0) && metric(&body, "sluice_dead_letters_total", &[]) == Some(2.0)
    });
    assert!(settled, "the counters did not reach 40 answers and 2 dead letters; /metrics:\n{body}\nstderr:\n{}", p.stderr_tail());
    // What the files say the run did.
    let answers = json_lines(&out, "answers.w");
    let dead = json_lines(&out, "dead_letters.w");
    assert_eq!(answers.len(), 40, "answer lines");
    let reason = |r: &str| dead.iter().filter(|d| d["reason"] == r).count() as f64;
    assert_eq!((reason("wrong_type"), reason("missing_column"), dead.len()), (1.0, 1.0, 2), "dead letters: {dead:?}");
    // And /metrics says the same.
    assert_eq!(metric(&body, "sluice_source_records_total", &["connector=\"files\""]), Some(42.0), "records in; /metrics:\n{body}");
    assert_eq!(metric(&body, "sluice_sink_answers_total", &[]), Some(answers.len() as f64));
    assert_eq!(metric(&body, "sluice_dead_letters_total", &["reason=\"wrong_type\""]), Some(reason("wrong_type")));
    assert_eq!(metric(&body, "sluice_dead_letters_total", &["reason=\"missing_column\""]), Some(reason("missing_column")));
    assert_eq!(metric(&body, "sluice_file_rows_seen_total", &[]), Some(42.0), "file rows seen; /metrics:\n{body}");
    assert_eq!(metric(&body, "sluice_sink_rejected_total", &[]).unwrap_or(0.0), 0.0);
    p.signal("-TERM");
    let status = p.wait_timeout(Duration::from_secs(30));
    p.kill();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "a watching run stopped with SIGTERM exits 0; stderr:\n{}", p.stderr_tail());
}

/// A 20-ride CSV run, with `extra` topology lines, environment and metrics on `port`.
fn csv_run(dir: &Path, extra: &str, env: &[(&str, &str)], port: u16) -> Sluice {
    let input = dir.join("rides.csv");
    std::fs::write(&input, rides_csv(20)).unwrap();
    let source = format!("[source]\ntype = \"csv\"\npath = \"{}\"\n", input.display());
    let text = rides_topology(&unique("pc_exit"), &source, &dir.join("out"), &format!("{extra}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    spawn_sluice(dir, &text, &["--workers", "1"], env)
}

#[test]
fn a_run_that_ends_normally_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = csv_run(dir.path(), "", &[], free_port());
    let status = p.wait_timeout(Duration::from_secs(60));
    p.kill();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr:\n{}", p.stderr_tail());
    assert_eq!(json_lines(&dir.path().join("out"), "answers.w").len(), 20);
}

#[test]
fn a_panic_exits_101() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = csv_run(dir.path(), "", &[("SLUICE_FAULT", "model-panic")], free_port());
    let status = p.wait_timeout(Duration::from_secs(60));
    p.kill();
    assert_eq!(status.and_then(|s| s.code()), Some(101), "a panicking model thread; stderr:\n{}", p.stderr_tail());
    assert!(p.stderr().contains("panicked"), "{}", p.stderr_tail());
}

#[test]
fn sinks_that_cannot_drain_within_the_grace_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut p = csv_run(dir.path(), "shutdown_grace_ms = 1000", &[("SLUICE_FAULT", "sink-fail")], port);
    // SIGTERM once the sink has failed and been retried (its retries are counted).
    let failing = wait_until(Duration::from_secs(60), || {
        scrape(port).and_then(|b| metric(&b, "sluice_sink_retries_total", &[])).unwrap_or(0.0) > 0.0 || p.exited().is_some()
    });
    assert!(p.exited().is_none(), "with its sink failing the run cannot end by itself; stderr:\n{}", p.stderr_tail());
    assert!(failing, "no sink retry within 60 s; stderr:\n{}", p.stderr_tail());
    p.signal("-TERM");
    let status = p.wait_timeout(Duration::from_secs(30));
    p.kill();
    assert_eq!(status.and_then(|s| s.code()), Some(3), "stderr:\n{}", p.stderr_tail());
    assert!(json_lines(&dir.path().join("out"), "answers.w").is_empty(), "nothing was written");
}
