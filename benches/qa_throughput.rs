//! End-to-end QA throughput, side by side in one run on the same model and the same windows:
//!   1. raw ONNX Runtime, every window padded to max_seq_len (the naive baseline);
//!   2. raw ONNX Runtime on exactly the batches the pipeline forms (each window at its own length);
//!   3. the whole sluice pipeline: CSV → tokenize → inference service → Postgres (JSON lines when
//!      no Postgres is reachable; the output says which).
//!
//! Run: `cargo bench --bench qa_throughput` (SLUICE_BENCH_N questions, default 642, all held-out;
//! SLUICE_BENCH_ROUNDS, default 3; SLUICE_BENCH_MODEL for another model; SLUICE_PG_URL).

use sluice::connectors::files::scan::Scanner;
use sluice::inference::Model;
use sluice::runtime::{self, RunOptions};
use sluice::tasks::extractive_qa::{ExtractiveQa, QaModel, QaRequest, QaSettings, Window};
use sluice::tasks::Task;
use sluice::topology::{Padding, Topology};
use std::path::{Path, PathBuf};
use std::time::Instant;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_questions(path: &Path, n: usize) -> (String, Vec<(String, QaRequest)>) {
    let data = std::fs::read(path).unwrap();
    let records: Vec<&[u8]> = Scanner::new(&data, usize::MAX).map(|r| r.bytes).collect();
    let rows: Vec<&[u8]> = records[1..].iter().take(n).copied().collect();
    let parsed = sluice::connectors::files::csv::parse_rows(&rows, 3).unwrap();
    let mut csv = records[0].to_vec();
    for r in &rows {
        csv.push(b'\n');
        csv.extend_from_slice(r);
    }
    csv.push(b'\n');
    let csv = String::from_utf8(csv).unwrap();
    (csv, parsed.into_iter().map(|r| (r[0].clone(), QaRequest { question: r[1].clone(), context: r[2].clone() })).collect())
}

fn raw_ort(model: &Path, padding: Padding, windows: &[Window], invariant: bool, max_batch: usize) -> f64 {
    let mut m = QaModel::load(model, padding, 384, 0, invariant).unwrap();
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
    let (csv, questions) = read_questions(&repo().join("tests/data/squad_dev.csv"), n);
    let task = ExtractiveQa::new(&tokenizer, QaSettings { max_seq_len: 384, doc_stride: 128, max_answer_len: 30 }, "bench".into()).unwrap();
    let windows: Vec<Window> = questions.iter().flat_map(|(_, q)| task.prepare(q).unwrap().1).collect();
    let real_tokens: usize = windows.iter().map(|w| w.ids.len()).sum();
    let invariant = !sluice::tasks::uses_dynamic_quantization(&model);
    println!(
        "model {} ({}), {} questions, {} windows, {:.0} real tokens per window of 384",
        model.display(),
        if invariant { "batch-invariant" } else { "dynamic int8: one window per run" },
        questions.len(),
        windows.len(),
        real_tokens as f64 / windows.len() as f64
    );

    // Warm up ORT once so no variant pays the first-run cost. The machine is shared and noisy, so
    // the variants run interleaved, `rounds` times each, and the median of each is reported.
    raw_ort(&model, Padding::Longest, &windows[..windows.len().min(8)], invariant, 8);
    let rounds: usize = std::env::var("SLUICE_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let (mut fixed_runs, mut same_runs, mut pipeline_runs) = (Vec::new(), Vec::new(), Vec::new());

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bench.csv");
    std::fs::write(&input, csv).unwrap();
    let pg = std::env::var("SLUICE_PG_URL").unwrap_or_else(|_| "postgres://sluice:sluice@127.0.0.1:5432/sluice".into());
    let (sink, sink_name) = if pg_reachable(&pg) {
        (format!("[[sinks]]\ntype = \"postgres\"\nurl = \"{pg}\"\ntable = \"bench_qa_answers\"\ndead_letter_table = \"bench_dead_letters\"\n"), "Postgres")
    } else {
        (format!("[[sinks]]\ntype = \"jsonl\"\ndir = \"{}\"\n", dir.path().join("out").display()), "JSON lines (no Postgres reachable)")
    };
    let text = format!(
        "name = \"bench\"\n[source]\ntype = \"csv\"\npath = \"{}\"\n[task]\ntype = \"extractive_qa\"\nmodel = \"{}\"\ntokenizer = \"{}\"\n[batching]\nmax_batch = 8\nmax_delay_ms = 2\n[runtime]\nworkers = 1\nepoch_records = 64\nprogress = false\n{sink}",
        input.display(),
        model.display(),
        tokenizer.display()
    );
    let topology = Topology::parse("bench.toml", &text).unwrap();
    let mut per_question = 0.0;
    for round in 0..rounds {
        fixed_runs.push(raw_ort(&model, Padding::Max, &windows, invariant, 8));
        same_runs.push(raw_ort(&model, Padding::Longest, &windows, invariant, 8));
        let summary = runtime::run(&topology, &RunOptions::default()).unwrap();
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
    println!("| raw ORT, the pipeline's batches | {same:.1} | {:.2}× |", pipeline / same);
    println!("| sluice CSV → {sink_name} | {pipeline:.1} | 1.00× |");
    println!();
    println!("medians of {rounds} interleaved rounds; questions/s through the pipeline (last round): {per_question:.1}");
}
