//! Tasks: each turns request payloads into model units and model outputs back into answers.
//! A new task is one module implementing [`Task`] and [`registry::TaskKind`], and one line in
//! the [`registry`], which is what the engine, the CLI and the server ask about tasks.

pub mod extractive_qa;
pub mod registry;
pub mod tabular;

use crate::inference::{InferenceError, Model};
use crate::json::{text_value, JsonFields, TextValue};
use crate::record::{Column, DeadReason, Value};

/// A refusal from a task: the dead-letter reason and a detail for people.
pub type Refusal = (DeadReason, String);

/// A decoded request and its passthrough fields.
pub type Decoded<R> = (R, Vec<(String, String)>);

/// A task: decoding, pre-processing on the worker thread, and post-processing of model outputs.
pub trait Task: Send + Sync + 'static {
    /// The decoded request payload.
    type Request: timely::ExchangeData + differential_dataflow::ExchangeData + std::hash::Hash;
    /// The model this task runs.
    type Model: Model;
    /// State kept on the worker between submission and answer (e.g. token offsets).
    type Prepared: Send + 'static;
    /// The model units one request becomes: a `Vec` for a task that splits a request (QA's
    /// windows), an array of one for a task that does not, which then costs no allocation.
    type Units: IntoIterator<Item = <Self::Model as Model>::Unit, IntoIter: ExactSizeIterator>;

    /// Output columns, in the order of `Answer::values`.
    fn output_columns(&self) -> &'static [Column];
    /// `name@version` written with every answer.
    fn model_label(&self) -> &str;
    /// Decodes a flat record of named text fields (a CSV row) into a request and its passthrough fields.
    fn decode_fields(&self, fields: &[(&str, &str)]) -> Result<Decoded<Self::Request>, Refusal>;
    /// Decodes a JSON object (a Kafka message) into a request. By default its string and number
    /// fields are read as text fields, as from a CSV row.
    fn decode_json(&self, obj: &JsonFields<'_>) -> Result<Self::Request, Refusal> {
        let texts: Vec<(&str, String)> = obj
            .iter()
            .filter_map(|(k, v)| match text_value(v) {
                TextValue::String(s) | TextValue::Number(s) => Some((k, s)),
                TextValue::Other => None,
            })
            .collect();
        let fields: Vec<(&str, &str)> = texts.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.decode_fields(&fields).map(|(request, _)| request)
    }

    /// Pre-processes a request into model units, on the worker thread.
    fn prepare(&self, request: &Self::Request) -> Result<(Self::Prepared, Self::Units), Refusal>;
    /// Turns the model's outputs for one request, one per unit in order, into answer values.
    fn finish(&self, request: &Self::Request, prepared: Self::Prepared, outs: &[<Self::Model as Model>::Out]) -> Vec<Value>;

    /// The inputs an online request gives, one value per row each, as the Open Inference
    /// Protocol names them.
    fn online_inputs(&self) -> Vec<crate::online::InputInfo>;
    /// The fields of a request that a new model version must answer before it is swapped in.
    fn probe_fields(&self) -> Vec<(String, String)>;
    /// Whether a newly loaded model fits this task as it was started (the same inputs and
    /// outputs), so that requests decoded for the old version run on it.
    fn accepts(&self, model: &Self::Model) -> Result<(), String>;
}

/// `name@version`, the version being the first 12 hex digits of the model file's SHA-256.
pub fn model_label(name: &str, model_path: &std::path::Path) -> Result<String, InferenceError> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(model_path)
        .map_err(|e| InferenceError::Load { path: model_path.to_path_buf(), reason: format!("cannot read model {}: {e}", model_path.display()) })?;
    let digest = Sha256::digest(&bytes);
    Ok(format!("{name}@{}", &hex::encode(digest)[..12]))
}

/// Whether an ONNX file uses dynamic activation quantization, whose scale spans the whole batch
/// tensor, so a unit's output would depend on its batch-mates and on padding.
pub fn uses_dynamic_quantization(model_path: &std::path::Path) -> bool {
    let needle = b"DynamicQuantize";
    std::fs::read(model_path).map(|b| b.windows(needle.len()).any(|w| w == needle)).unwrap_or(false)
}
