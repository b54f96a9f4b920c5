//! The committed ride-duration model against sklearn: ONNX Runtime through sluice's tabular task
//! must reproduce the `predict` values that scripts/train_rides.py stored in models/rides/parity.jsonl.

use sluice::inference::Model;
use sluice::json::JsonFields;
use sluice::tasks::tabular::{Tabular, TabularModel};
use sluice::tasks::Task;
use sluice::topology::ExecutionConfig;
use std::path::PathBuf;

#[test]
fn onnx_predictions_equal_sklearn_predict_within_1e4() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join("models/rides/model.onnx");
    let mut model = TabularModel::load(&model_path, None, &ExecutionConfig::default()).unwrap();
    let task = Tabular::new(&model, "rides@test".into());
    let names: Vec<&str> = task.specs().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["PULocationID", "DOLocationID", "trip_distance"], "inputs come from the model's metadata");
    let text = std::fs::read_to_string(root.join("models/rides/parity.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1000);
    let requests: Vec<_> = text.lines().map(|l| task.decode_json(&JsonFields::parse(l).unwrap()).unwrap()).collect();
    for chunk in requests.chunks(257).zip(rows.chunks(257)) {
        let refs: Vec<_> = chunk.0.iter().collect();
        let got = model.run(&refs).unwrap();
        for (g, row) in got.iter().zip(chunk.1) {
            let want = row["expected_duration"].as_f64().unwrap();
            assert!((g - want).abs() <= 1e-4, "{row}: onnx {g} vs sklearn {want}");
        }
    }
}

#[test]
fn wrong_types_and_missing_fields_are_refused_by_dtype() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = TabularModel::load(&root.join("models/rides/model.onnx"), None, &ExecutionConfig::default()).unwrap();
    let task = Tabular::new(&model, "rides@test".into());
    let obj = |s: &'static str| JsonFields::parse(s).unwrap();
    let reason = |s: &'static str| task.decode_json(&obj(s)).unwrap_err().0.as_str();
    assert_eq!(reason(r#"{"PULocationID": 1, "DOLocationID": 2}"#), "missing_field");
    assert_eq!(reason(r#"{"PULocationID": "abc", "DOLocationID": 2, "trip_distance": 1.0}"#), "wrong_type");
    assert_eq!(reason(r#"{"PULocationID": 1, "DOLocationID": 2, "trip_distance": "3.2"}"#), "wrong_type");
    assert!(task.decode_json(&obj(r#"{"PULocationID": 1, "DOLocationID": 2, "trip_distance": 3}"#)).is_ok(), "an integer is a number");
}
