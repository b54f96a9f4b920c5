//! The engine core knows no connector: nothing under `src/` (the CLI binary's `main.rs` aside,
//! which wires the Kafka request client and load generator to commands) names a Kafka,
//! Postgres or file connector or their client libraries, except through the registry.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn the_core_names_no_connector_except_through_the_registry() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "found the core's files");
    let forbidden = [
        "connectors::kafka",
        "connectors::postgres",
        "connectors::files",
        "connectors::generator",
        "connectors::pubsub",
        "rdkafka",
        "tokio_postgres",
        "google_cloud_pubsub",
    ];
    let mut found = Vec::new();
    for f in files.iter().filter(|f| !f.ends_with("main.rs")) {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for word in forbidden {
                if line.contains(word) {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "the core names a connector:\n{}", found.join("\n"));
}
