//! Fidelity: sluice's answers equal the Python reference (scripts/reference_qa.py: onnxruntime,
//! HF tokenizers and the transformers QA pipeline's span selection) on 214 held-out SQuAD
//! questions plus the bundled sample: identical answer text and offsets, scores within 1e-4.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("SLUICE_CACHE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice"));
    let p = cache.join("venv/bin/python");
    assert!(p.exists(), "no Python venv at {} (run scripts/setup.sh --test)", p.display());
    p
}

fn reference(input: &Path, out: &Path, max_seq_len: usize, doc_stride: usize) -> BTreeMap<String, serde_json::Value> {
    let r = repo();
    let status = Command::new(python())
        .arg(r.join("scripts/reference_qa.py"))
        .args(["--model", r.join("models/minilm-squad/model.onnx").to_str().unwrap()])
        .args(["--tokenizer", r.join("models/minilm-squad/tokenizer.json").to_str().unwrap()])
        .args(["--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()])
        .args(["--max-seq-len", &max_seq_len.to_string(), "--doc-stride", &doc_stride.to_string()])
        .status()
        .expect("run the Python reference");
    assert!(status.success(), "reference_qa.py failed");
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect()
}

fn compare(input_dir: &Path, files: &[&str], max_seq_len: usize, doc_stride: usize, min_questions: usize) {
    let mut want = BTreeMap::new();
    for f in files {
        want.extend(reference(&input_dir.join(f), &input_dir.join(format!("{f}.ref.jsonl")), max_seq_len, doc_stride));
    }
    assert!(want.len() >= min_questions, "only {} reference answers", want.len());
    let out = input_dir.join(format!("sluice-{max_seq_len}"));
    let extra = "";
    let text = qa_topology("fidelity", input_dir.join("*.csv").as_path(), &jsonl_sink(&out), extra)
        .replace("tokenizer = ", &format!("max_seq_len = {max_seq_len}\ndoc_stride = {doc_stride}\ntokenizer = "));
    run(&text, 2);
    let got = answers_by_id(&out);
    let mut problems = Vec::new();
    for (id, w) in &want {
        let Some(g) = got.get(id) else {
            problems.push(format!("{id}: no answer from sluice"));
            continue;
        };
        if g["answer"] != w["answer"] || g["start_char"] != w["start"] || g["end_char"] != w["end"] {
            problems.push(format!(
                "{id}: sluice {:?} [{}, {}] vs reference {:?} [{}, {}]",
                g["answer"], g["start_char"], g["end_char"], w["answer"], w["start"], w["end"]
            ));
        }
        let (gs, ws) = (g["score"].as_f64().unwrap(), w["score"].as_f64().unwrap());
        if (gs - ws).abs() > 1e-4 {
            problems.push(format!("{id}: score {gs} vs reference {ws}"));
        }
    }
    assert!(problems.is_empty(), "{} of {} answers differ:\n{}", problems.len(), want.len(), problems.join("\n"));
}

fn inputs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("tests/data/squad_fidelity.csv"), dir.path().join("fidelity.csv")).unwrap();
    // The bundled sample without its three deliberately bad rows (they are dead letters, not answers).
    let sample = std::fs::read_to_string(repo().join("samples/questions.csv")).unwrap();
    let good: Vec<&str> = sample.lines().filter(|l| !l.starts_with("bad-")).collect();
    std::fs::write(dir.path().join("sample.csv"), good.join("\n") + "\n").unwrap();
    dir
}

#[test]
fn answers_equal_the_python_reference_at_384_tokens() {
    let dir = inputs();
    compare(dir.path(), &["fidelity.csv", "sample.csv"], 384, 128, 230);
}

#[test]
fn answers_equal_the_python_reference_across_many_short_windows() {
    // At 128 tokens most contexts span several windows, so span choice across windows is exercised.
    let dir = inputs();
    compare(dir.path(), &["fidelity.csv", "sample.csv"], 128, 64, 230);
}
