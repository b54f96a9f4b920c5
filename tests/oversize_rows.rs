//! A CSV row is one record however long it is (black-box, the `sluice` binary): a row whose third
//! field is 12 MiB of `A` with no quotes, and a 3 MiB one whose tail past that field holds commas,
//! are one `oversize_field` dead letter each (the bytes cut to `runtime.max_dead_letter_bytes`,
//! with the whole row's `raw_len` and `raw_sha256`), and the rows around them are answered
//! exactly, in the one-shot `type = "csv"` source and in the watched `type = "files"` source.
//! Before, the streaming reader framed such a row in 1 MiB pieces: 11 `oversize_field` dead
//! letters and a `missing_column` one for the 12 MiB row, and the 3 MiB row's tail answered as a
//! request whose ID was a run of `A`.

mod common;

use base64::Engine;
use common::blackbox::*;
use common::kafka::unique;
use common::*;
use sha2::Digest;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// The input: three good rows around the two oversize ones; returns the oversize rows.
fn write_input(path: &Path) -> Vec<Vec<u8>> {
    let huge = [&b"x-huge,What?,"[..], &vec![b'A'; 12 << 20]].concat();
    let big = [&b"x-big,What?,"[..], &vec![b'A'; 3 << 20], b",Who wrote it?,It was written by Ada."].concat();
    let mut text = b"id,question,context\na1,Who wrote it?,Ada wrote it in 1843.\n".to_vec();
    text.extend_from_slice(&huge);
    text.extend_from_slice(b"\na2,Where was it written?,It was written in London.\n");
    text.extend_from_slice(&big);
    text.extend_from_slice(b"\na3,When was it written?,It was written in 1843.\n");
    std::fs::write(path, text).unwrap();
    vec![huge, big]
}

/// Exactly the three good rows answered, and one dead letter per oversize row.
fn check(out: &Path, rows: &[Vec<u8>], source: &str) {
    let answers = json_lines(out, "answers.w");
    let ids: Vec<&str> = answers.iter().map(|a| a["id"].as_str().unwrap_or_default()).collect();
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), BTreeSet::from(["a1", "a2", "a3"]), "the answers' IDs: {:?}", &ids);
    assert_eq!(answers.len(), 3, "one answer per good row");
    let dead = json_lines(out, "dead_letters.w");
    let got: Vec<(String, String, String, u64, String, usize)> = dead
        .iter()
        .map(|d| {
            let raw = base64::engine::general_purpose::STANDARD.decode(d["raw_base64"].as_str().unwrap_or_default()).unwrap_or_default();
            let kept_is_prefix = rows.iter().any(|r| r.starts_with(&raw));
            (
                d["source"].as_str().unwrap_or_default().to_string(),
                d["position"].as_str().unwrap_or_default().to_string(),
                d["reason"].as_str().unwrap_or_default().to_string(),
                d["raw_len"].as_u64().unwrap_or(0),
                d["raw_sha256"].as_str().unwrap_or_default().to_string(),
                if kept_is_prefix { raw.len() } else { usize::MAX },
            )
        })
        .collect();
    let want: Vec<(String, String, String, u64, String, usize)> = rows
        .iter()
        .zip(["row 2", "row 4"])
        .map(|(r, pos)| (source.to_string(), pos.to_string(), "oversize_field".to_string(), r.len() as u64, hex::encode(sha2::Sha256::digest(r)), 262_144))
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(got_sorted, want, "one oversize_field dead letter per long row, its first 262,144 bytes kept, with the whole row's length and SHA-256");
}

#[test]
fn an_oversize_csv_row_is_one_dead_letter_in_the_csv_source() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("long.csv");
    let rows = write_input(&input);
    let out = dir.path().join("out");
    let mut p = spawn_sluice(dir.path(), &qa_topology(&unique("ov_csv"), &input, &jsonl_sink(&out), ""), &["--workers", "1"], &[]);
    let status = p.wait_timeout(Duration::from_secs(120));
    p.kill();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr:\n{}", p.stderr_tail());
    check(&out, &rows, "long.csv");
}

#[test]
fn an_oversize_csv_row_is_one_dead_letter_in_the_watched_files_source() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("in");
    std::fs::create_dir_all(&folder).unwrap();
    let rows = write_input(&folder.join("long.csv"));
    let out = dir.path().join("out");
    let text = qa_topology(&unique("ov_files"), &folder, &jsonl_sink(&out), "")
        .replace("type = \"csv\"\n", "type = \"files\"\nwatch = true\npoll_ms = 100\nsettle_ms = 100\n");
    let mut p = spawn_sluice(dir.path(), &text, &["--workers", "1"], &[]);
    // Watching never ends by itself: wait for the file's five rows to be accounted for.
    let done = wait_until(Duration::from_secs(120), || answer_ids(&out).len() + lines_in(&out, "dead_letters.w").len() >= 5 || p.exited().is_some());
    assert!(done && p.exited().is_none(), "the file's rows were not all written; stderr:\n{}", p.stderr_tail());
    // Anything more (a piece of a row framed as a row) would come with the same read: a file
    // is read in one go, and its checkpoint is written with its last rows.
    assert!(wait_until(Duration::from_secs(30), || std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint.w"))));
    p.signal("-TERM");
    let status = p.wait_timeout(Duration::from_secs(30));
    p.kill();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "stderr:\n{}", p.stderr_tail());
    check(&out, &rows, "long.csv");
}
