//! Helpers shared by the integration tests: topology files in temp folders, runs, and reading outputs.
#![allow(dead_code)]

use sluice::runtime::{self, RunOptions, Summary};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Postgres the scripts start (scripts/pg.sh); override with SLUICE_PG_URL.
pub fn pg_url() -> String {
    std::env::var("SLUICE_PG_URL").unwrap_or_else(|_| "postgres://sluice:sluice@127.0.0.1:5432/sluice".into())
}

/// A QA topology over `input`, with `sinks` as TOML text (empty for the embedded default).
pub fn qa_topology(name: &str, input: &Path, sinks: &str, extra: &str) -> String {
    let r = repo();
    format!(
        r#"name = "{name}"
[source]
type = "csv"
path = "{input}"
[task]
type = "extractive_qa"
model = "{model}"
tokenizer = "{tok}"
[batching]
max_batch = 8
max_delay_ms = 2
[runtime]
epoch_records = 32
progress = false
{extra}
{sinks}
"#,
        input = input.display(),
        model = r.join("models/minilm-squad/model.onnx").display(),
        tok = r.join("models/minilm-squad/tokenizer.json").display(),
    )
}

pub fn jsonl_sink(dir: &Path) -> String {
    format!("[[sinks]]\ntype = \"jsonl\"\ndir = \"{}\"\n", dir.display())
}

pub fn run(text: &str, workers: usize) -> Summary {
    let topology = sluice::registry::parse("test.toml", text).unwrap_or_else(|e| panic!("{e}"));
    runtime::run(&topology, &RunOptions { workers: Some(workers), ..Default::default() }).unwrap_or_else(|e| panic!("run failed: {e}"))
}

/// Every JSON line of the files in `dir` whose names start with `prefix`.
pub fn read_lines(dir: &Path, prefix: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            out.push(serde_json::from_str(line).unwrap());
        }
    }
    out
}

/// Answers by ID.
pub fn answers_by_id(dir: &Path) -> BTreeMap<String, serde_json::Value> {
    read_lines(dir, "answers.w").into_iter().map(|v| (v["id"].as_str().unwrap().to_string(), v)).collect()
}

pub mod blackbox;
pub mod kafka;
pub mod rides;
pub mod serve;

/// Runs `f` with a client of the test Postgres.
fn with_client<T>(f: impl AsyncFnOnce(tokio_postgres::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("Postgres at {} is not reachable (run scripts/pg.sh): {e}", pg_url()));
        tokio::spawn(conn);
        f(client).await
    })
}

/// Runs a query against the test Postgres.
pub fn query(sql: &str) -> Vec<tokio_postgres::Row> {
    with_client(async |client| client.query(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")))
}

/// Executes statements against the test Postgres.
pub fn exec(sql: &str) {
    with_client(async |client| client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}")))
}

/// The number of rows of `table`, or 0 while it does not exist yet.
pub fn count_rows(table: &str) -> i64 {
    let exists: i64 = query(&format!("SELECT count(*) FROM pg_tables WHERE tablename = '{table}'"))[0].get(0);
    if exists == 0 {
        return 0;
    }
    query(&format!("SELECT count(*) FROM {}", sluice::sql::quote_ident(table)))[0].get(0)
}

/// The Python of the test venv (scripts/setup.sh --test), or `SLUICE_PYTHON`.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var("SLUICE_CACHE").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/sluice"));
    let p = cache.join("venv/bin/python");
    assert!(p.exists(), "no Python venv at {} (run scripts/setup.sh --test)", p.display());
    p
}
