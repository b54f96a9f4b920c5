//! `tabular`: each named model input is fed from the record field of the same name, with its dtype
//! taken from the model's metadata, so a pipeline exported with skl2onnx (one-hot encoding inside
//! the graph) needs no feature code. The first output (or the configured one) is the prediction.

use super::registry::TaskKind;
use super::{Refusal, Task};
use crate::engine::{Installed, JobStart, OnlineStart, Started};
use crate::inference::{InferenceError, Model};
use crate::json::{JsonFields, TextValue};
use crate::online::{Loader, OnlineModel};
use crate::record::{Column, ColumnKind, DeadReason, Value};
use crate::runtime::RunError;
use crate::topology::Topology;
use ort::value::{TensorElementType, ValueType};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// One feature value, typed as the model input wants it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Feature {
    Int(i64),
    /// An `f64`, kept as its bits so requests can be ordered and hashed.
    Float(u64),
    Text(String),
}

/// A row of features in the model's input order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TabularRequest {
    pub features: Vec<Feature>,
}

/// The element kind an input takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    I64,
    I32,
    F32,
    F64,
    Str,
}

/// A model input: its name, element kind and rank (1 for `[N]`, 2 for `[N, 1]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputSpec {
    pub name: String,
    pub kind: InputKind,
    pub rank: usize,
}

const COLUMNS: &[Column] = &[Column { name: "prediction", kind: ColumnKind::Float }];

/// Reads the model's inputs and picks its prediction output; `path` is the model's file.
fn describe(session: &ort::session::Session, path: &Path, output: Option<&str>) -> Result<(Vec<InputSpec>, String), InferenceError> {
    let refuse = |reason: String| InferenceError::Load { path: path.to_path_buf(), reason };
    let mut specs = Vec::new();
    for input in session.inputs() {
        let (kind, rank) = match input.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                let kind = match ty {
                    TensorElementType::Int64 => InputKind::I64,
                    TensorElementType::Int32 => InputKind::I32,
                    TensorElementType::Float32 => InputKind::F32,
                    TensorElementType::Float64 => InputKind::F64,
                    TensorElementType::String => InputKind::Str,
                    other => {
                        return Err(refuse(format!(
                            "input `{}` has element type {other:?}; tabular supports int64, int32, float, double and string",
                            input.name()
                        )))
                    }
                };
                let rank = shape.len();
                if !(1..=2).contains(&rank) || (rank == 2 && shape[1] > 1) {
                    return Err(refuse(format!("input `{}` has shape {shape:?}; tabular feeds one value per row ([N] or [N, 1])", input.name())));
                }
                (kind, rank)
            }
            other => return Err(refuse(format!("input `{}` is {other:?}, not a tensor", input.name()))),
        };
        specs.push(InputSpec { name: input.name().to_string(), kind, rank });
    }
    let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let out = match output {
        Some(o) if names.contains(&o) => o.to_string(),
        Some(o) => return Err(refuse(format!("model has no output `{o}` (it has {names:?})"))),
        None => names.first().ok_or_else(|| refuse("model has no outputs".into()))?.to_string(),
    };
    Ok((specs, out))
}

/// The tabular task.
pub struct Tabular {
    specs: Vec<InputSpec>,
    label: String,
}

impl Tabular {
    /// The task for `model`, whose inputs it takes: no second session just to read them.
    pub fn new(model: &TabularModel, label: String) -> Self {
        Tabular { specs: model.specs.clone(), label }
    }

    /// The model inputs, in order.
    pub fn specs(&self) -> &[InputSpec] {
        &self.specs
    }

    fn feature_from_json(spec: &InputSpec, obj: &JsonFields<'_>) -> Result<Feature, Refusal> {
        let missing = || (DeadReason::MissingField, format!("no field `{}`", spec.name));
        let wrong = |want: &str, got: &str| (DeadReason::WrongType, format!("field `{}` must be {want}, got {got}", spec.name));
        match spec.kind {
            InputKind::I64 => obj.i64(&spec.name).ok_or_else(missing)?.map(Feature::Int).map_err(|got| wrong("an integer", got)),
            InputKind::I32 => {
                let v = obj.i64(&spec.name).ok_or_else(missing)?.map_err(|got| wrong("an integer", got))?;
                Self::int32(spec, v)
            }
            InputKind::F32 | InputKind::F64 => {
                obj.f64(&spec.name).ok_or_else(missing)?.map(|x| Feature::Float(x.to_bits())).map_err(|got| wrong("a number", got))
            }
            InputKind::Str => match obj.text(&spec.name).ok_or_else(missing)? {
                TextValue::String(s) => Ok(Feature::Text(s)),
                TextValue::Number(n) if n.parse::<i64>().is_ok() => Ok(Feature::Text(n)),
                _ => Err(wrong("a string", obj.get(&spec.name).map(|r| r.get()).unwrap_or_default())),
            },
        }
    }

    fn feature_from_text(spec: &InputSpec, s: &str) -> Result<Feature, Refusal> {
        let wrong = |want: &str| (DeadReason::WrongType, format!("field `{}` must be {want}, got `{s}`", spec.name));
        let t = s.trim();
        match spec.kind {
            InputKind::I64 => t.parse::<i64>().map(Feature::Int).map_err(|_| wrong("an integer")),
            InputKind::I32 => Self::int32(spec, t.parse::<i64>().map_err(|_| wrong("an integer"))?),
            InputKind::F32 | InputKind::F64 => t.parse::<f64>().map(|x| Feature::Float(x.to_bits())).map_err(|_| wrong("a number")),
            InputKind::Str => Ok(Feature::Text(s.to_string())),
        }
    }

    /// An `int32` input's value: one out of its range is refused (`wrong_type`, naming the
    /// field), never wrapped into another number.
    fn int32(spec: &InputSpec, v: i64) -> Result<Feature, Refusal> {
        match i32::try_from(v) {
            Ok(_) => Ok(Feature::Int(v)),
            Err(_) => Err((
                DeadReason::WrongType,
                format!("field `{}` must be a 32-bit integer (the model's input is int32, {} to {}), got {v}", spec.name, i32::MIN, i32::MAX),
            )),
        }
    }

    /// Decodes a JSON object: one field per model input.
    pub fn decode_object(&self, obj: &JsonFields<'_>) -> Result<TabularRequest, Refusal> {
        let features = self.specs.iter().map(|spec| Self::feature_from_json(spec, obj)).collect::<Result<Vec<_>, _>>()?;
        Ok(TabularRequest { features })
    }
}

impl Task for Tabular {
    type Request = TabularRequest;
    type Model = TabularModel;
    type Prepared = ();
    type Units = [TabularRequest; 1];

    fn output_columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn model_label(&self) -> &str {
        &self.label
    }

    fn decode_fields(&self, fields: &[(&str, &str)]) -> Result<(TabularRequest, Vec<(String, String)>), Refusal> {
        let mut features = Vec::with_capacity(self.specs.len());
        for spec in &self.specs {
            let v = fields
                .iter()
                .find(|(k, _)| *k == spec.name)
                .map(|(_, v)| *v)
                .ok_or_else(|| (DeadReason::MissingColumn, format!("no `{}` column", spec.name)))?;
            features.push(Self::feature_from_text(spec, v)?);
        }
        let passthrough =
            fields.iter().filter(|(k, _)| *k != "id" && !self.specs.iter().any(|s| s.name == *k)).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Ok((TabularRequest { features }, passthrough))
    }

    fn decode_json(&self, obj: &JsonFields<'_>) -> Result<TabularRequest, Refusal> {
        self.decode_object(obj)
    }

    fn prepare(&self, request: &TabularRequest) -> Result<((), [TabularRequest; 1]), Refusal> {
        Ok(((), [request.clone()]))
    }

    fn finish(&self, _request: &TabularRequest, _prepared: (), outs: &[f64]) -> Vec<Value> {
        vec![Value::Float(outs.first().copied().unwrap_or(f64::NAN))]
    }

    fn online_inputs(&self) -> Vec<crate::online::InputInfo> {
        let datatype = |k: InputKind| match k {
            InputKind::I64 => "INT64",
            InputKind::I32 => "INT32",
            InputKind::F32 => "FP32",
            InputKind::F64 => "FP64",
            InputKind::Str => "BYTES",
        };
        self.specs.iter().map(|s| crate::online::InputInfo { name: s.name.clone(), datatype: datatype(s.kind) }).collect()
    }

    fn probe_fields(&self) -> Vec<(String, String)> {
        self.specs.iter().map(|s| (s.name.clone(), "1".to_string())).collect()
    }

    fn accepts(&self, model: &TabularModel) -> Result<(), String> {
        if model.specs != self.specs {
            let show = |specs: &[InputSpec]| specs.iter().map(|s| format!("{} {:?}", s.name, s.kind)).collect::<Vec<_>>().join(", ");
            return Err(format!("its inputs ({}) are not the serving version's ({})", show(&model.specs), show(&self.specs)));
        }
        Ok(())
    }
}

/// The ONNX model behind the tabular task.
pub struct TabularModel {
    session: ort::session::Session,
    specs: Vec<InputSpec>,
    output: String,
    provider: crate::topology::Provider,
}

impl TabularModel {
    /// Opens the model on the configured provider (`crate::execution`) and reads its inputs.
    pub fn load(path: &Path, output: Option<&str>, exec: &crate::topology::ExecutionConfig) -> Result<Self, InferenceError> {
        // Tabular models are tiny (microseconds per batch): a thread pool that spin-waits between
        // runs costs more CPU than it saves, so one thread without spinning unless configured.
        let tuning = crate::execution::Tuning { default_intra_threads: 1, spinning: false };
        let opened = crate::execution::open(path, exec, tuning)?;
        let (specs, output) = describe(&opened.session, path, output)?;
        Ok(TabularModel { session: opened.session, specs, output, provider: opened.provider })
    }

    /// Where the model runs.
    pub fn provider(&self) -> crate::topology::Provider {
        self.provider
    }
}

/// The `tabular` task as the topology configures it (see [`super::registry`]).
pub struct TabularKind<'a> {
    pub model: &'a Path,
    pub output: &'a Option<String>,
    pub model_name: &'a Option<String>,
}

impl TaskKind for TabularKind<'_> {
    fn kind(&self) -> &'static str {
        "tabular"
    }

    /// None: the inputs are the model's, and a row without one is a dead letter.
    fn required_columns(&self) -> Vec<String> {
        Vec::new()
    }

    fn check(&self, topology: &Topology) -> Result<Vec<String>, InferenceError> {
        let loaded = TabularModel::load(self.model, self.output.as_deref(), &topology.execution)?;
        let task = Tabular::new(&loaded, String::new());
        let inputs: Vec<String> = task.specs().iter().map(|s| format!("{} ({:?})", s.name, s.kind)).collect();
        Ok(vec![format!("model {}: ok on {}; inputs {}", self.model.display(), loaded.provider().name(), inputs.join(", "))])
    }

    fn start(&self, job: JobStart<'_>) -> Result<Installed, RunError> {
        let topology = job.topology();
        job.install(|| self.service(topology))
    }

    fn online(&self, start: OnlineStart<'_>) -> Result<Arc<dyn OnlineModel>, RunError> {
        let topology = start.topology();
        start.serve(|| self.service(topology), self.loader(topology))
    }
}

impl TabularKind<'_> {
    /// Opens one model per model thread from a model file, as this topology runs it.
    fn loader(&self, topology: &Topology) -> Loader<TabularModel> {
        let (output, exec) = (self.output.clone(), topology.execution.clone());
        Arc::new(move |path: &Path| crate::runtime::open_models(&exec, || TabularModel::load(path, output.as_deref(), &exec), TabularModel::provider))
    }

    /// Starts the model service: the task, its models, and the threads that run them.
    fn service(&self, topology: &Topology) -> Result<Started<Tabular>, RunError> {
        let label = super::model_label(&crate::runtime::model_name_or_folder(self.model_name, self.model), self.model)?;
        let models = self.loader(topology)(self.model)?;
        let task = Arc::new(Tabular::new(&models[0], label));
        let (handle, joins) = crate::inference::start(models, crate::runtime::policy(topology), Arc::from(task.model_label()))?;
        Ok((task, handle, joins))
    }
}

impl Model for TabularModel {
    type Unit = TabularRequest;
    type Out = f64;

    fn cost(_unit: &TabularRequest) -> usize {
        1
    }

    fn batch_invariant(&self) -> bool {
        true
    }

    fn run(&mut self, units: &[&TabularRequest]) -> Result<Vec<f64>, InferenceError> {
        use ort::value::{DynValue, Tensor};
        let n = units.len();
        let mut inputs: Vec<(String, DynValue)> = Vec::with_capacity(self.specs.len());
        for (i, spec) in self.specs.iter().enumerate() {
            let shape: Vec<i64> = if spec.rank == 2 { vec![n as i64, 1] } else { vec![n as i64] };
            let err = |e: ort::Error| InferenceError::Input(format!("cannot build input `{}`: {e}", spec.name));
            let value: DynValue = match spec.kind {
                InputKind::I64 => Tensor::from_array((shape, units.iter().map(|u| as_i64(&u.features[i])).collect::<Vec<i64>>())).map_err(err)?.into_dyn(),
                InputKind::I32 => {
                    Tensor::from_array((shape, units.iter().map(|u| as_i64(&u.features[i]) as i32).collect::<Vec<i32>>())).map_err(err)?.into_dyn()
                }
                InputKind::F32 => {
                    Tensor::from_array((shape, units.iter().map(|u| as_f64(&u.features[i]) as f32).collect::<Vec<f32>>())).map_err(err)?.into_dyn()
                }
                InputKind::F64 => Tensor::from_array((shape, units.iter().map(|u| as_f64(&u.features[i])).collect::<Vec<f64>>())).map_err(err)?.into_dyn(),
                InputKind::Str => Tensor::from_string_array((shape, units.iter().map(|u| as_text(&u.features[i])).collect::<Vec<String>>().as_slice()))
                    .map_err(err)?
                    .into_dyn(),
            };
            inputs.push((spec.name.clone(), value));
        }
        let outputs = self.session.run(inputs).map_err(|e| InferenceError::Run(format!("model run failed: {e}")))?;
        let out = &outputs[self.output.as_str()];
        if let Ok((_, v)) = out.try_extract_tensor::<f32>() {
            return Ok(v.iter().take(n).map(|x| *x as f64).collect());
        }
        if let Ok((_, v)) = out.try_extract_tensor::<f64>() {
            return Ok(v.iter().take(n).copied().collect());
        }
        if let Ok((_, v)) = out.try_extract_tensor::<i64>() {
            return Ok(v.iter().take(n).map(|x| *x as f64).collect());
        }
        Err(InferenceError::Run(format!("output `{}` is not a float, double or int64 tensor", self.output)))
    }
}

fn as_i64(f: &Feature) -> i64 {
    match f {
        Feature::Int(i) => *i,
        Feature::Float(b) => f64::from_bits(*b) as i64,
        Feature::Text(s) => s.parse().unwrap_or(0),
    }
}

fn as_f64(f: &Feature) -> f64 {
    match f {
        Feature::Int(i) => *i as f64,
        Feature::Float(b) => f64::from_bits(*b),
        Feature::Text(s) => s.parse().unwrap_or(f64::NAN),
    }
}

fn as_text(f: &Feature) -> String {
    match f {
        Feature::Int(i) => i.to_string(),
        Feature::Float(b) => f64::from_bits(*b).to_string(),
        Feature::Text(s) => s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Tabular {
        let spec = |name: &str, kind| InputSpec { name: name.into(), kind, rank: 2 };
        Tabular { specs: vec![spec("zone", InputKind::I32), spec("count", InputKind::I64)], label: "t".into() }
    }

    #[test]
    fn an_int32_input_out_of_range_is_a_wrong_type_dead_letter_naming_the_field() {
        let t = task();
        // In range, at both ends: fed as it is.
        let ok = t.decode_fields(&[("zone", "2147483647"), ("count", "5")]).unwrap().0;
        assert_eq!(ok.features, vec![Feature::Int(2_147_483_647), Feature::Int(5)]);
        let ok = t.decode_fields(&[("zone", "-2147483648"), ("count", "5")]).unwrap().0;
        assert_eq!(ok.features[0], Feature::Int(-2_147_483_648));
        // One past either end wrapped silently before (2147483648 became -2147483648).
        for (text, v) in [("2147483648", 2_147_483_648i64), ("-2147483649", -2_147_483_649), ("4294967298", 4_294_967_298)] {
            let (reason, detail) = t.decode_fields(&[("zone", text), ("count", "5")]).unwrap_err();
            assert_eq!(reason, DeadReason::WrongType, "{text}");
            assert_eq!(detail, format!("field `zone` must be a 32-bit integer (the model's input is int32, -2147483648 to 2147483647), got {v}"));
            let json = format!(r#"{{"zone": {text}, "count": 5}}"#);
            let obj = JsonFields::parse(&json).unwrap();
            let (reason, detail) = t.decode_object(&obj).unwrap_err();
            assert_eq!(reason, DeadReason::WrongType, "{json}");
            assert!(detail.starts_with("field `zone` must be a 32-bit integer"), "{detail}");
        }
        // An int64 input takes the same values.
        let big = t.decode_fields(&[("zone", "1"), ("count", "4294967298")]).unwrap().0;
        assert_eq!(big.features[1], Feature::Int(4_294_967_298));
    }
}
