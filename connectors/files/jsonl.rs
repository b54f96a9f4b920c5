//! The JSON-lines sink, the embedded default: each worker appends its answers to
//! `answers.w<worker>.jsonl` and its dead letters to `dead_letters.w<worker>.jsonl`, synced per epoch.

use crate::connectors::{EpochBatch, SinkError, SinkWriter};
use crate::record::{Answer, Column, DeadLetter};
use base64::Engine;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

/// Writes JSON lines into a folder.
pub struct JsonlWriter {
    answers: File,
    dead: File,
    columns: &'static [Column],
}

impl JsonlWriter {
    /// Opens (appending) this worker's files in `dir`.
    pub fn open(dir: &Path, worker: usize, columns: &'static [Column]) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let open = |name: String| {
            OpenOptions::new().create(true).append(true).open(dir.join(&name)).map_err(|e| format!("cannot open {}: {e}", dir.join(name).display()))
        };
        Ok(JsonlWriter { answers: open(format!("answers.w{worker}.jsonl"))?, dead: open(format!("dead_letters.w{worker}.jsonl"))?, columns })
    }
}

/// The JSON object written for an answer.
pub fn answer_json(a: &Answer, columns: &[Column]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("id".into(), a.id.clone().into());
    for (c, v) in columns.iter().zip(&a.values) {
        m.insert(c.name.into(), v.to_json());
    }
    for (k, v) in &a.passthrough {
        m.insert(k.clone(), v.clone().into());
    }
    m.insert("model".into(), a.model.to_string().into());
    m.insert("source".into(), a.pos.to_string().into());
    serde_json::Value::Object(m)
}

/// The JSON object written for a dead letter; `raw_base64` holds the original bytes exactly.
pub fn dead_letter_json(d: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "source": d.pos.source(),
        "position": d.pos.position(),
        "reason": d.reason.as_str(),
        "detail": d.detail,
        "raw_base64": base64::engine::general_purpose::STANDARD.encode(&d.raw),
    })
}

impl SinkWriter for JsonlWriter {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        let mut buf = Vec::new();
        for a in &batch.answers {
            serde_json::to_writer(&mut buf, &answer_json(a, self.columns)).map_err(|e| SinkError::Fatal(e.to_string()))?;
            buf.push(b'\n');
        }
        self.answers.write_all(&buf).and_then(|_| self.answers.sync_data()).map_err(|e| SinkError::Transient(e.to_string()))?;
        buf.clear();
        for d in &batch.dead {
            serde_json::to_writer(&mut buf, &dead_letter_json(d)).map_err(|e| SinkError::Fatal(e.to_string()))?;
            buf.push(b'\n');
        }
        self.dead.write_all(&buf).and_then(|_| self.dead.sync_data()).map_err(|e| SinkError::Transient(e.to_string()))
    }
}
