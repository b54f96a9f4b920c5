//! The CSV → extractive QA pipeline end to end with the embedded JSON-lines sink: dead letters,
//! passthrough columns, derived IDs, and identical results on 1 and 2 workers.

mod common;

use base64::Engine;
use common::*;
use sluice::connectors::files::scan::Scanner;
use std::collections::BTreeMap;

#[test]
fn sample_answers_every_good_row_and_dead_letters_every_bad_one() {
    let out = tempfile::tempdir().unwrap();
    let text = qa_topology("sample", &repo().join("samples/questions.csv"), &jsonl_sink(out.path()), "");
    let summary = run(&text, 1);
    assert_eq!(summary.answered, 22);
    assert_eq!(summary.dead_letters, 3);
    let answers = answers_by_id(out.path());
    assert_eq!(answers.len(), 22);
    let own = &answers["own-1"];
    assert_eq!(own["topic"], "sluice", "passthrough column kept");
    let context = "sluice is a streaming inference engine. For every bad input it writes a dead-letter record with the reason and the original bytes, and the worker keeps going.";
    let (s, e) = (own["start_char"].as_u64().unwrap() as usize, own["end_char"].as_u64().unwrap() as usize);
    assert_eq!(own["answer"].as_str().unwrap(), context.chars().skip(s).take(e - s).collect::<String>(), "offsets point at the answer text");
    assert!(own["model"].as_str().unwrap().starts_with("minilm-squad@"));

    let dead: BTreeMap<String, serde_json::Value> =
        read_lines(out.path(), "dead_letters.w").into_iter().map(|d| (d["position"].as_str().unwrap().to_string(), d)).collect();
    let reasons: Vec<&str> = dead.values().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons, vec!["empty_field", "missing_column", "broken_quoting"]);
    let raw = base64::engine::general_purpose::STANDARD.decode(dead["row 24"]["raw_base64"].as_str().unwrap()).unwrap();
    assert_eq!(raw, b"bad-short,Only two fields here", "original bytes kept exactly");
    assert_eq!(dead["row 23"]["source"], "questions.csv");
}

#[test]
fn rows_without_id_get_deterministic_ids_from_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("noid.csv");
    std::fs::write(&input, "question,context\nWho wrote it?,\"It was written by Ada, in 1843.\"\nWhen?,It happened in 1843.\n").unwrap();
    let out = dir.path().join("out");
    let text = qa_topology("noid", &input, &jsonl_sink(&out), "");
    run(&text, 1);
    let first = answers_by_id(&out);
    assert_eq!(first.keys().cloned().collect::<Vec<_>>(), vec!["noid.csv:1".to_string(), "noid.csv:2".to_string()]);
    run(&text, 1);
    assert_eq!(answers_by_id(&out).keys().collect::<Vec<_>>(), first.keys().collect::<Vec<_>>(), "a rerun derives the same IDs");
}

#[test]
fn duplicate_ids_keep_the_last_row() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dup.csv");
    std::fs::write(&input, "id,question,context\nq1,Who?,Ada wrote it.\nq1,When?,It was 1843.\n").unwrap();
    let out = dir.path().join("out");
    run(&qa_topology("dup", &input, &jsonl_sink(&out), ""), 2);
    let answers = answers_by_id(&out);
    assert_eq!(answers.len(), 1);
    assert_eq!(answers["q1"]["source"], "dup.csv row 2");
}

#[test]
fn one_and_two_workers_give_identical_answers() {
    let dir = tempfile::tempdir().unwrap();
    // Two input files, so both workers read, and answers are exchanged by ID.
    let all = std::fs::read_to_string(repo().join("tests/data/squad_fidelity.csv")).unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let records: Vec<&str> = Scanner::new(all.as_bytes(), usize::MAX).map(|r| std::str::from_utf8(r.bytes).unwrap()).collect();
    let header = records[0];
    let half = 30;
    std::fs::write(input.join("a.csv"), format!("{header}\n{}\n", records[1..1 + half].join("\n"))).unwrap();
    std::fs::write(input.join("b.csv"), format!("{header}\n{}\n", records[1 + half..1 + 2 * half].join("\n"))).unwrap();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    let s1 = run(&qa_topology("w1", &input, &jsonl_sink(&one), ""), 1);
    let s2 = run(&qa_topology("w2", &input, &jsonl_sink(&two), ""), 2);
    assert_eq!(s1.answered, 2 * half as u64);
    assert_eq!(s2.answered, s1.answered);
    let (a1, a2) = (answers_by_id(&one), answers_by_id(&two));
    assert_eq!(a1.len(), 2 * half);
    for (id, v) in &a1 {
        let w = &a2[id];
        for k in ["answer", "start_char", "end_char", "score", "model", "source"] {
            assert_eq!(v[k], w[k], "{id}: {k} differs between 1 and 2 workers");
        }
    }
}
