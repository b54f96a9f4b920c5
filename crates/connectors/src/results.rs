//! The result message every topic sink sends (Kafka, Pub/Sub): one JSON object per answer with
//! the request ID, the task's outputs, the model's name and version, and the ingest time.

use sluice_core::record::{Answer, Column, Value};
use std::sync::Arc;

/// Writes the JSON payload of result messages: the request ID, the outputs (a non-finite number
/// is `null`), the model's name and version, and the ingest time. Written directly, without a
/// `serde_json::Value` per answer; the parts every answer shares (the columns' keys, the model's
/// name and version) are escaped once, not per answer.
pub struct ResultJson {
    /// `,"<column>":` for each output column.
    keys: Vec<Vec<u8>>,
    /// The last model label seen and its `,"model":…,"model_version":…` fragment.
    model: Option<(Arc<str>, Vec<u8>)>,
}

impl ResultJson {
    pub fn new(columns: &[Column]) -> Self {
        let keys = columns
            .iter()
            .map(|c| {
                let mut k = vec![b','];
                write_json_str(&mut k, c.name);
                k.push(b':');
                k
            })
            .collect();
        ResultJson { keys, model: None }
    }

    /// Appends the result message for `a` to `buf`.
    pub fn write(&mut self, buf: &mut Vec<u8>, a: &Answer) {
        buf.extend_from_slice(b"{\"id\":");
        write_json_str(buf, &a.id);
        for (key, v) in self.keys.iter().zip(&a.values) {
            buf.extend_from_slice(key);
            let written = match v {
                Value::Text(s) => serde_json::to_writer(&mut *buf, s),
                Value::Int(i) => serde_json::to_writer(&mut *buf, i),
                Value::Float(x) => serde_json::to_writer(&mut *buf, x),
            };
            written.expect("writing to a Vec cannot fail");
        }
        buf.extend_from_slice(self.model_fragment(&a.model));
        buf.extend_from_slice(b",\"ingest_ms\":");
        serde_json::to_writer(&mut *buf, &a.ingest_ms).expect("writing to a Vec cannot fail");
        buf.push(b'}');
    }

    /// `,"model":"<name>","model_version":"<version>"` for a `name@version` label, built once per
    /// label (a sink sees one model, so this is almost always the cached one).
    fn model_fragment(&mut self, label: &Arc<str>) -> &[u8] {
        let cached = matches!(&self.model, Some((l, _)) if Arc::ptr_eq(l, label) || **l == **label);
        if !cached {
            let (name, version) = label.split_once('@').unwrap_or((label, ""));
            let mut f = b",\"model\":".to_vec();
            write_json_str(&mut f, name);
            f.extend_from_slice(b",\"model_version\":");
            write_json_str(&mut f, version);
            self.model = Some((label.clone(), f));
        }
        &self.model.as_ref().expect("set above").1
    }
}

/// `s` as a JSON string. Request IDs are almost always plain text, which is copied as it is; the
/// rest goes through serde_json's escaping.
fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        serde_json::to_writer(&mut *buf, s).expect("writing to a Vec cannot fail");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::record::{ColumnKind, SourcePos};

    #[test]
    fn result_json_carries_id_outputs_and_model() {
        let columns = [Column { name: "prediction", kind: ColumnKind::Float }, Column { name: "label", kind: ColumnKind::Text }];
        let answer = |x: f64| Answer {
            id: "ride \"7\"".into(),
            values: vec![Value::Float(x), Value::Text("fast\nride".into())],
            passthrough: Vec::new(),
            model: "rides@0123456789ab".into(),
            pos: SourcePos::seq("generator".into(), 7),
            ingest_ms: 42,
            raw: Vec::new(),
            seq: 0,
            replaces: false,
        };
        let mut json = ResultJson::new(&columns);
        let mut buf = Vec::new();
        json.write(&mut buf, &answer(12.5));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "ride \"7\"", "prediction": 12.5, "label": "fast\nride", "model": "rides", "model_version": "0123456789ab", "ingest_ms": 42})
        );
        buf.clear();
        json.write(&mut buf, &answer(f64::NAN));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert!(v["prediction"].is_null(), "a non-finite prediction is null: {v}");
        // Another model's answers carry that model's name and version, and control characters
        // and quotes in an ID are escaped.
        let mut other = answer(1.0);
        other.model = "other\"m@v2".into();
        other.id = "tab\there".into();
        buf.clear();
        json.write(&mut buf, &other);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!((v["model"].as_str(), v["model_version"].as_str(), v["id"].as_str()), (Some("other\"m"), Some("v2"), Some("tab\there")));
        buf.clear();
        json.write(&mut buf, &answer(2.0));
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["model"], "rides", "the fragment follows the label back");
    }
}
