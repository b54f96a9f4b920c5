//! The crate graph is the architecture: the engine core (`crates/core`) depends on no connector
//! crate and no client library of an external system, and names none in its code; the
//! connectors (`crates/connectors`) depend on the core but not on the server or the CLI; only
//! this package, through its registry, knows them all.

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

fn dependencies(krate: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates").join(krate).join("Cargo.toml");
    let manifest: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
    let mut names = Vec::new();
    for section in ["dependencies", "build-dependencies"] {
        if let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) {
            names.extend(deps.keys().cloned());
        }
    }
    assert!(!names.is_empty(), "read the dependencies of {}", path.display());
    names
}

const CLIENTS: [&str; 10] =
    ["rdkafka", "tokio-postgres", "google-cloud-pubsub", "google-cloud-auth", "google-cloud-gax", "object_store", "parquet", "arrow", "rustls", "tokio-rustls"];

#[test]
fn the_core_crate_depends_on_no_connector_and_no_client_library() {
    let deps = dependencies("core");
    assert!(deps.iter().any(|d| d == "timely"), "{deps:?}");
    let bad: Vec<&String> = deps.iter().filter(|d| d.as_str() == "sluice-connectors" || CLIENTS.contains(&d.as_str())).collect();
    assert!(bad.is_empty(), "the core crate depends on {bad:?}");
}

#[test]
fn the_connectors_crate_depends_on_the_core_but_not_on_the_server() {
    let deps = dependencies("connectors");
    assert!(deps.iter().any(|d| d == "sluice-core"), "{deps:?}");
    let bad: Vec<&String> = deps.iter().filter(|d| ["sluice", "axum", "utoipa", "clap"].contains(&d.as_str())).collect();
    assert!(bad.is_empty(), "the connectors crate depends on {bad:?}");
}

#[test]
fn the_core_names_no_connector_in_its_code() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/core/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "found the core's files");
    let forbidden = [
        "sluice_connectors",
        "connectors::",
        "rdkafka",
        "tokio_postgres",
        "google_cloud_pubsub",
        "object_store",
        "KafkaSource",
        "PostgresConfig",
        "JsonlConfig",
    ];
    let mut found = Vec::new();
    for f in &files {
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
