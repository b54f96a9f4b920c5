//! End-to-end QA throughput, side by side in one run on the same model and the same windows:
//!   1. raw ONNX Runtime, every window padded to max_seq_len (the naive baseline);
//!   2. raw ONNX Runtime on exactly the batches the pipeline forms (each window at its own length);
//!   3. the whole sluice pipeline: CSV → tokenize → inference service → Postgres (JSON lines when
//!      no Postgres is reachable; the output says which).
//!
//! Run: `cargo bench --bench qa_throughput` (SLUICE_BENCH_N questions, default 642, all held-out;
//! SLUICE_BENCH_ROUNDS, default 3; SLUICE_BENCH_MODEL for another model; SLUICE_PG_URL).
//! On a GPU: SLUICE_BENCH_PROVIDER=cuda (bucketed padding and power-of-two rows, as the pipeline
//! does there), SLUICE_BENCH_MAX_BATCH (default 8 on the CPU, 256 on CUDA), SLUICE_BENCH_WORKERS
//! (timely workers, i.e. tokenizing threads; default 1), SLUICE_BENCH_SINK=jsonl to skip Postgres,
//! SLUICE_BENCH_REPEAT (the questions k times over, under new IDs), SLUICE_REPO (the repository
//! when the binary runs elsewhere, e.g. benches/gpu/run.sh on the GPU machine).
//! After the last round it prints the pipeline's batch-size and model-latency histograms.

use sluice::connectors::files::scan::Scanner;
use sluice::inference::Model;
use sluice::runtime::{self, RunOptions};
use sluice::tasks::extractive_qa::QaShapes;
use sluice::tasks::extractive_qa::{ExtractiveQa, QaModel, QaRequest, QaSettings, Window};
use sluice::tasks::Task;
use sluice::topology::{ExecutionConfig, Padding, Provider};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The repository: SLUICE_REPO (a binary carried to another machine), else where it was built.
fn repo() -> PathBuf {
    std::env::var("SLUICE_REPO").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The first `n` questions, `repeat` times over (each copy under new IDs, so a GPU gets enough
/// windows to time): the CSV text the pipeline reads and the requests raw ORT gets.
fn read_questions(path: &Path, n: usize, repeat: usize) -> (String, Vec<(String, QaRequest)>) {
    let data = std::fs::read(path).unwrap();
    let records: Vec<&[u8]> = Scanner::new(&data, usize::MAX).map(|r| r.bytes).collect();
    let rows: Vec<&[u8]> = records[1..].iter().take(n).copied().collect();
    let parsed = sluice::connectors::files::csv::parse_rows(&rows, 3).unwrap();
    let mut csv = records[0].to_vec();
    let mut out = Vec::new();
    for copy in 0..repeat.max(1) {
        for (r, p) in rows.iter().zip(&parsed) {
            let id = if copy == 0 { p[0].clone() } else { format!("{}~{copy}", p[0]) };
            csv.push(b'\n');
            if copy > 0 {
                // The ID is the row's first field: put the copy's ID in front of the rest.
                let rest = &r[r.iter().position(|b| *b == b',').unwrap()..];
                csv.extend_from_slice(id.as_bytes());
                csv.extend_from_slice(rest);
            } else {
                csv.extend_from_slice(r);
            }
            out.push((id, QaRequest { question: p[1].clone(), context: p[2].clone() }));
        }
    }
    csv.push(b'\n');
    (String::from_utf8(csv).unwrap(), out)
}

fn raw_ort(model: &Path, exec: &ExecutionConfig, padding: Padding, windows: &[Window], invariant: bool, max_batch: usize) -> f64 {
    let gpu = exec.provider == Provider::Cuda;
    let shapes = QaShapes { padding, pad_multiple: 64, pad_rows: gpu, max_seq_len: 384 };
    let mut m = QaModel::load(model, |_| shapes, invariant, exec).unwrap();
    let size = if invariant { max_batch } else { 1 };
    let mut sorted: Vec<&Window> = windows.iter().collect();
    if invariant {
        sorted.sort_by_key(|w| w.ids.len());
    }
    let started = Instant::now();
    for chunk in sorted.chunks(size) {
        m.run(chunk).unwrap();
    }
    windows.len() as f64 / started.elapsed().as_secs_f64()
}

fn pg_reachable(url: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { tokio_postgres::connect(url, tokio_postgres::NoTls).await.is_ok() })
}

fn main() {
    let n: usize = std::env::var("SLUICE_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(642);
    let model = std::env::var("SLUICE_BENCH_MODEL").map(PathBuf::from).unwrap_or_else(|_| repo().join("models/minilm-squad/model.onnx"));
    let tokenizer = repo().join("models/minilm-squad/tokenizer.json");
    let repeat: usize = std::env::var("SLUICE_BENCH_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let (csv, questions) = read_questions(&repo().join("tests/data/squad_dev.csv"), n, repeat);
    let task = ExtractiveQa::new(&tokenizer, QaSettings { max_seq_len: 384, doc_stride: 128, max_answer_len: 30 }, "bench".into()).unwrap();
    let windows: Vec<Window> = questions.iter().flat_map(|(_, q)| task.prepare(q).unwrap().1).collect();
    let real_tokens: usize = windows.iter().map(|w| w.ids.len()).sum();
    let invariant = !sluice::tasks::uses_dynamic_quantization(&model);
    let exec = ExecutionConfig {
        provider: if std::env::var("SLUICE_BENCH_PROVIDER").as_deref() == Ok("cuda") { Provider::Cuda } else { Provider::Cpu },
        ..ExecutionConfig::default()
    };
    let gpu = exec.provider == Provider::Cuda;
    let max_batch: usize = std::env::var("SLUICE_BENCH_MAX_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(if gpu { 256 } else { 8 });
    let workers: usize = std::env::var("SLUICE_BENCH_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let padding = if gpu { Padding::Bucket } else { Padding::Longest };
    println!(
        "model {} on {} ({}), max_batch {max_batch}, {workers} worker(s), {} questions, {} windows, {:.0} real tokens per window of 384",
        model.display(),
        exec.provider.name(),
        if invariant { "batch-invariant" } else { "dynamic int8: one window per run" },
        questions.len(),
        windows.len(),
        real_tokens as f64 / windows.len() as f64
    );

    // Warm up ORT once so no variant pays the first-run cost. The machine is shared and noisy, so
    // the variants run interleaved, `rounds` times each, and the median of each is reported.
    // On a GPU, warm up on every window, so every bucketed shape has been seen once.
    raw_ort(&model, &exec, padding, if gpu { &windows } else { &windows[..windows.len().min(8)] }, invariant, max_batch);
    let rounds: usize = std::env::var("SLUICE_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let (mut fixed_runs, mut same_runs, mut pipeline_runs) = (Vec::new(), Vec::new(), Vec::new());

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bench.csv");
    std::fs::write(&input, csv).unwrap();
    let pg = std::env::var("SLUICE_PG_URL").unwrap_or_else(|_| "postgres://sluice:sluice@127.0.0.1:5432/sluice".into());
    let (sink, sink_name) = if std::env::var("SLUICE_BENCH_SINK").as_deref() != Ok("jsonl") && pg_reachable(&pg) {
        (format!("[[sinks]]\ntype = \"postgres\"\nurl = \"{pg}\"\ntable = \"bench_qa_answers\"\ndead_letter_table = \"bench_dead_letters\"\n"), "Postgres")
    } else {
        (format!("[[sinks]]\ntype = \"jsonl\"\ndir = \"{}\"\n", dir.path().join("out").display()), "JSON lines (no Postgres reachable)")
    };
    let metrics_at = "127.0.0.1:19464";
    let topology = |metrics: bool| {
        let text = format!(
            "name = \"bench\"\n[source]\ntype = \"csv\"\npath = \"{}\"\n[task]\ntype = \"extractive_qa\"\nmodel = \"{}\"\ntokenizer = \"{}\"\n[batching]\nmax_batch = {max_batch}\nmax_delay_ms = 2\n[execution]\nprovider = \"{}\"\n[runtime]\nworkers = {workers}\nepoch_records = {}\nprogress = false\n{sink}{}",
            input.display(),
            model.display(),
            tokenizer.display(),
            exec.provider.name(),
            if gpu { 512 } else { 64 },
            if metrics { format!("[metrics]\nlisten = \"{metrics_at}\"\n") } else { String::new() }
        );
        sluice::registry::parse("bench.toml", &text).unwrap()
    };
    let mut per_question = 0.0;
    for round in 0..rounds {
        fixed_runs.push(raw_ort(&model, &exec, Padding::Max, &windows, invariant, max_batch));
        same_runs.push(raw_ort(&model, &exec, padding, &windows, invariant, max_batch));
        // The metrics exporter installs once per process: the last round serves the histograms.
        let summary = runtime::run(&topology(round + 1 == rounds), &RunOptions::default()).unwrap();
        assert_eq!(summary.answered as usize, questions.len());
        pipeline_runs.push(windows.len() as f64 / summary.elapsed.as_secs_f64());
        per_question = summary.answered as f64 / summary.elapsed.as_secs_f64();
        println!(
            "round {}: raw ORT padded {:.1}, raw ORT same batches {:.1}, pipeline {:.1} windows/s",
            round + 1,
            fixed_runs[round],
            same_runs[round],
            pipeline_runs[round]
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (fixed, same, pipeline) = (median(&mut fixed_runs), median(&mut same_runs), median(&mut pipeline_runs));

    println!();
    println!("| variant | windows/s | pipeline ÷ variant |");
    println!("|---|---|---|");
    println!("| raw ORT, padded to 384 | {fixed:.1} | {:.2}× |", pipeline / fixed);
    println!("| raw ORT, {} | {same:.1} | {:.2}× |", if gpu { "bucketed to multiples of 64, sorted" } else { "the pipeline's batches" }, pipeline / same);
    println!("| sluice CSV → {sink_name} | {pipeline:.1} | 1.00× |");
    println!();
    println!("medians of {rounds} interleaved rounds; questions/s through the pipeline (last round): {per_question:.1}");
    println!();
    match scrape(metrics_at) {
        Ok(text) => {
            println!("pipeline histograms (last round), from its /metrics:");
            for line in text.lines().filter(|l| l.starts_with("sluice_inference_batch_size") || l.starts_with("sluice_inference_latency_seconds")) {
                println!("  {line}");
            }
        }
        Err(e) => println!("no histograms: cannot read {metrics_at}/metrics ({e})"),
    }
}

/// The text of a Prometheus endpoint, read with a bare HTTP/1.0 request.
fn scrape(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    Ok(body)
}
