//! Ride-pipeline helpers shared by the Kafka tests: fresh topics and tables, generated rides, the
//! model's own predictions, and the exactly-once check.
#![allow(dead_code)]

use super::kafka::*;
use super::*;
use sluice::json::JsonFields;
use sluice::rides::RideGenerator;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

pub struct Setup {
    pub name: String,
    pub topic: String,
    pub results: String,
    pub dead: String,
    pub table: String,
    pub dir: tempfile::TempDir,
}

pub fn setup(prefix: &str) -> Setup {
    let name = unique(prefix);
    let s = Setup {
        topic: format!("{name}_rides"),
        results: format!("{name}_results"),
        dead: format!("{name}_dead"),
        table: format!("{name}_answers"),
        name,
        dir: tempfile::tempdir().unwrap(),
    };
    create_topics(&[&s.topic, &s.results, &s.dead], 4);
    s
}

impl Setup {
    pub fn topology(&self) -> String {
        rides_topology(&self.name, &self.topic, &self.results, &self.dead, &self.table, &pg_url())
    }
}

/// Rides with IDs `{prefix}-{i}` and their expected predictions are checked against the model below.
pub fn rides(prefix: &str, n: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    RideGenerator::new(seed)
        .take(n)
        .enumerate()
        .map(|(i, r)| {
            let id = format!("{prefix}-{i}");
            let body = serde_json::to_vec(&r.request_json(&id)).unwrap();
            (id, body)
        })
        .collect()
}

/// What the model predicts for each ride, computed directly (not through the pipeline).
pub fn expected(messages: &[(String, Vec<u8>)]) -> HashMap<String, f64> {
    use sluice::inference::Model;
    use sluice::tasks::Task;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/rides/model.onnx");
    let mut model = sluice::tasks::tabular::TabularModel::load(&path, None, &Default::default()).unwrap();
    let task = sluice::tasks::tabular::Tabular::new(&model, String::new());
    let reqs: Vec<_> = messages.iter().map(|(_, b)| task.decode_json(&JsonFields::parse(std::str::from_utf8(b).unwrap()).unwrap()).unwrap()).collect();
    let mut out = HashMap::new();
    for (chunk, msgs) in reqs.chunks(512).zip(messages.chunks(512)) {
        let preds = model.run(&chunk.iter().collect::<Vec<_>>()).unwrap();
        for (p, (id, _)) in preds.into_iter().zip(msgs) {
            out.insert(id.clone(), p);
        }
    }
    out
}

pub fn wait_for_rows(table: &str, n: i64, timeout: Duration) -> i64 {
    let started = Instant::now();
    loop {
        let c = count_rows(table);
        if c >= n || started.elapsed() > timeout {
            return c;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every ID is in Postgres exactly once with the model's prediction, and on the results topic at least once.
pub fn check_exactly_once(s: &Setup, messages: &[(String, Vec<u8>)]) {
    let want = expected(messages);
    let rows = query(&format!("SELECT id, prediction FROM {}", sluice::sql::quote_ident(&s.table)));
    assert_eq!(rows.len(), messages.len(), "one row per request");
    for r in &rows {
        let id: String = r.get(0);
        let p: f64 = r.get(1);
        let w = want.get(&id).unwrap_or_else(|| panic!("unexpected id {id}"));
        assert!((p - w).abs() < 1e-9, "{id}: stored {p}, model says {w}");
    }
    let on_topic: HashSet<String> = read_topic(&s.results, messages.len(), Duration::from_secs(30)).into_iter().map(|(k, _, _)| k).collect();
    let missing: Vec<&String> = want.keys().filter(|id| !on_topic.contains(*id)).take(5).collect();
    assert!(missing.is_empty(), "answers missing from the results topic, e.g. {missing:?}");
}
