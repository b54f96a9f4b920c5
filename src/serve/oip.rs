//! Online inference over HTTP: the Open Inference Protocol (KServe v2, as Triton and MLServer
//! speak it) with its binary tensor extension, its model repository extension and per-model
//! statistics; and `POST /v1/answer`, which takes the JSON a Kafka or Pub/Sub request carries and
//! answers with the object the sinks write. Requests run in the interactive lane of the model's
//! shared inference service; a full queue is 429 with `Retry-After`, a request past its timeout
//! 504, and a caller that disconnects cancels its queued work. OIP errors are `{"error": "..."}`.

use crate::serve::http::App;
use crate::serve::models::Served;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice::json::TextValue;
use sluice::online::{OnlineError, OnlineReply, OnlineRequest, Row};
use sluice::record::{ColumnKind, Value as Cell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The header that gives the JSON part's length when binary tensors follow it.
const HEADER_LENGTH: &str = "inference-header-content-length";
/// A request's `priority` when it gives none (Triton's levels: 1 runs first).
const DEFAULT_PRIORITY: u32 = 10;
/// The longest an online request waits for its answer when it sets no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The routes that need a token when tokens are configured.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v2/models/{name}", get(metadata))
        .route("/v2/models/{name}/versions/{version}", get(metadata))
        .route("/v2/models/{name}/ready", get(ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer))
        .route("/v2/models/{name}/stats", get(stats))
        .route("/v2/repository/index", get(index).post(index))
        .route("/v2/repository/models/{name}/load", post(load))
        .route("/v2/repository/models/{name}/unload", post(unload))
        .route("/v1/answer", post(answer))
}

/// The server's metadata (`GET /v2`), open like health.
pub async fn server_metadata() -> Json<Value> {
    Json(json!({"name": "sluice", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data", "model_repository", "statistics"]}))
}

/// An error as the protocol gives it.
fn oip_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

/// The model, if it is known and loaded; 404 otherwise (as Triton answers for a model that is
/// not loaded), and 404 for a version that is not the one serving.
fn served<'a>(app: &'a App, name: &str, version: Option<&str>) -> Result<&'a Arc<Served>, Box<Response>> {
    let Some(m) = app.models.get(name) else {
        return Err(Box::new(oip_error(StatusCode::NOT_FOUND, format!("unknown model `{name}`; GET /v2/repository/index lists the models"))));
    };
    if !m.ready() {
        return Err(Box::new(oip_error(StatusCode::NOT_FOUND, format!("model `{name}` is not loaded; POST /v2/repository/models/{name}/load loads it"))));
    }
    if let Some(v) = version {
        let serving = m.version();
        if v != serving {
            return Err(Box::new(oip_error(StatusCode::NOT_FOUND, format!("model `{name}` version `{v}` is not serving (version `{serving}` is)"))));
        }
    }
    Ok(m)
}

fn datatype(kind: ColumnKind) -> &'static str {
    match kind {
        ColumnKind::Int => "INT64",
        ColumnKind::Float => "FP64",
        ColumnKind::Bool => "BOOL",
        ColumnKind::Text | ColumnKind::Timestamp => "BYTES",
    }
}

fn metadata_of(m: &Served) -> Value {
    let info = m.model.info();
    json!({
        "name": m.name,
        "versions": m.versions(),
        "platform": "onnxruntime_onnx",
        "parameters": {"task": info.kind, "template": m.template, "model": &*info.label},
        "inputs": info.inputs.iter().map(|i| json!({"name": i.name, "datatype": i.datatype, "shape": [-1]})).collect::<Vec<_>>(),
        "outputs": info.outputs.iter().map(|c| json!({"name": c.name, "datatype": datatype(c.kind), "shape": [-1]})).collect::<Vec<_>>(),
    })
}

/// A model route's path: its `name`, and the `version` when the route names one.
type ModelPath = Path<HashMap<String, String>>;

fn name_version(p: &HashMap<String, String>) -> (&str, Option<&str>) {
    (p.get("name").map(String::as_str).unwrap_or_default(), p.get("version").map(String::as_str))
}

async fn metadata(State(app): State<Arc<App>>, Path(p): ModelPath) -> Response {
    let (name, version) = name_version(&p);
    match served(&app, name, version) {
        Ok(m) => Json(metadata_of(m)).into_response(),
        Err(r) => *r,
    }
}

async fn ready(State(app): State<Arc<App>>, Path(p): ModelPath) -> Response {
    let (name, version) = name_version(&p);
    match served(&app, name, version) {
        Ok(_) => StatusCode::OK.into_response(),
        Err(r) => *r,
    }
}

/// The model's service statistics: model runs, units run (online among them), online units
/// dropped unrun (canceled, expired), and online requests in flight now.
async fn stats(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.models.get(&name) {
        Some(m) => Json(json!({"name": name, "version": m.version(), "stats": m.model.stats()})).into_response(),
        None => oip_error(StatusCode::NOT_FOUND, format!("unknown model `{name}`")),
    }
}

async fn index(State(app): State<Arc<App>>) -> Json<Value> {
    Json(Value::Array(app.models.values().map(|m| serde_json::to_value(m.view()).unwrap_or_default()).collect()))
}

#[derive(Deserialize, Default)]
struct LoadRequest {
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Loads a version (`{"parameters": {"version": "2"}}`, or the newest), checked before it
/// serves; a version that fails is refused (400, with why) and the serving one stays.
async fn load(State(app): State<Arc<App>>, Path(name): Path<String>, body: Bytes) -> Response {
    let Some(m) = app.models.get(&name).cloned() else {
        return oip_error(StatusCode::NOT_FOUND, format!("unknown model `{name}`"));
    };
    let req: LoadRequest = if body.is_empty() {
        LoadRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return oip_error(StatusCode::BAD_REQUEST, format!("the body is not a load request: {e}")),
        }
    };
    let version = req.parameters.get("version").map(|v| v.as_str().map(String::from).unwrap_or_else(|| v.to_string()));
    match tokio::task::spawn_blocking(move || m.load(version.as_deref()).map(|v| (v, m))).await {
        Ok(Ok((v, m))) => Json(json!({"name": name, "version": v, "state": m.view().state})).into_response(),
        Ok(Err(why)) => oip_error(StatusCode::BAD_REQUEST, format!("failed to load `{name}`: {why}")),
        Err(e) => oip_error(StatusCode::INTERNAL_SERVER_ERROR, format!("the load stopped: {e}")),
    }
}

async fn unload(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    match app.models.get(&name) {
        Some(m) => {
            m.unload();
            Json(json!({"name": name, "state": "UNAVAILABLE"})).into_response()
        }
        None => oip_error(StatusCode::NOT_FOUND, format!("unknown model `{name}`")),
    }
}

/// A tensor of an inference request.
#[derive(Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

async fn infer(State(app): State<Arc<App>>, Path(p): ModelPath, headers: HeaderMap, body: Bytes) -> Response {
    let (name, version) = name_version(&p);
    infer_on(app.clone(), name.to_string(), version.map(String::from), headers, body).await
}

async fn infer_on(app: Arc<App>, name: String, version: Option<String>, headers: HeaderMap, body: Bytes) -> Response {
    let m = match served(&app, &name, version.as_deref()) {
        Ok(m) => m.clone(),
        Err(r) => return *r,
    };
    let bad = |m: String| oip_error(StatusCode::BAD_REQUEST, m);
    let json_len = match headers.get(HEADER_LENGTH).map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok())) {
        None => body.len(),
        Some(Some(n)) if n <= body.len() => n,
        Some(_) => return bad(format!("`Inference-Header-Content-Length` must be a length of at most the body's {} bytes", body.len())),
    };
    let req: InferRequest = match serde_json::from_slice(&body[..json_len]) {
        Ok(r) => r,
        Err(e) => return bad(format!("the request is not an inference request: {e}")),
    };
    let info = m.model.info();
    let rows = match tensor_rows(&req.inputs, &body[json_len..], &info.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>()) {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let n = rows.len();
    let (priority, timeout) = match schedule(&req.parameters) {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    // Which outputs, and which of them in binary.
    let all_binary = req.parameters.get("binary_data_output").and_then(Value::as_bool).unwrap_or(false);
    let wanted: Vec<(usize, bool)> = match &req.outputs {
        None => (0..info.outputs.len()).map(|i| (i, all_binary)).collect(),
        Some(outs) => {
            let mut w = Vec::new();
            for o in outs {
                let Some(i) = info.outputs.iter().position(|c| c.name == o.name) else {
                    let names: Vec<&str> = info.outputs.iter().map(|c| c.name).collect();
                    return bad(format!("model `{name}` has no output `{}` (it has {})", o.name, names.join(", ")));
                };
                w.push((i, o.parameters.get("binary_data").and_then(Value::as_bool).unwrap_or(all_binary)));
            }
            w
        }
    };
    let reply = match run(&m, OnlineRequest { rows, priority, timeout }).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let mut values: Vec<Vec<Cell>> = Vec::with_capacity(n);
    for (i, row) in reply.rows.into_iter().enumerate() {
        match row {
            Ok(v) => values.push(v),
            Err((reason, detail)) => return bad(format!("row {i}: {}: {detail}", reason.as_str())),
        }
    }
    let mut outputs = Vec::new();
    let mut binary: Vec<u8> = Vec::new();
    for (col, as_binary) in wanted {
        let c = &info.outputs[col];
        let cells = values.iter().map(|v| &v[col]);
        let mut out = json!({"name": c.name, "datatype": datatype(c.kind), "shape": [n]});
        if as_binary {
            let before = binary.len();
            for cell in cells {
                match (c.kind, cell) {
                    (_, Cell::Text(s)) => {
                        binary.extend_from_slice(&(s.len() as u32).to_le_bytes());
                        binary.extend_from_slice(s.as_bytes());
                    }
                    (ColumnKind::Int, Cell::Int(i)) => binary.extend_from_slice(&i.to_le_bytes()),
                    (_, Cell::Int(i)) => binary.extend_from_slice(&(*i as f64).to_le_bytes()),
                    (_, Cell::Float(x)) => binary.extend_from_slice(&x.to_le_bytes()),
                }
            }
            out["parameters"] = json!({"binary_data_size": binary.len() - before});
        } else {
            out["data"] = Value::Array(cells.map(Cell::to_json).collect());
        }
        outputs.push(out);
    }
    let version = reply.model.split_once('@').map_or("", |(_, v)| v).to_string();
    let mut response = json!({"model_name": name, "model_version": version, "outputs": outputs});
    if let Some(id) = req.id {
        response["id"] = Value::String(id);
    }
    let header_json = serde_json::to_vec(&response).expect("a Value serializes");
    if binary.is_empty() {
        return ([(header::CONTENT_TYPE, "application/json")], header_json).into_response();
    }
    let json_len = header_json.len();
    let mut body = header_json;
    body.extend_from_slice(&binary);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(HEADER_LENGTH, json_len)
        .body(Body::from(body))
        .expect("a response with plain headers builds")
}

/// The request's `priority` (1 runs first; 0 or none is the default level) and `timeout`
/// (microseconds, as Triton takes it).
fn schedule(parameters: &Map<String, Value>) -> Result<(u32, Option<Duration>), String> {
    let priority = match parameters.get("priority") {
        None => DEFAULT_PRIORITY,
        Some(v) => match v.as_u64() {
            Some(0) => DEFAULT_PRIORITY,
            Some(p) => p.min(u32::MAX as u64) as u32,
            None => return Err(format!("parameter `priority` must be a whole number, got {v}")),
        },
    };
    let timeout = match parameters.get("timeout") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(us) if us > 0 => Some(Duration::from_micros(us)),
            _ => return Err(format!("parameter `timeout` must be a positive number of microseconds, got {v}")),
        },
    };
    Ok((priority, timeout))
}

/// Runs an online request and waits for its answer. The ticket lives in this future: when the
/// caller disconnects the server drops the future, and the ticket cancels what has not run.
async fn run(m: &Served, request: OnlineRequest) -> Result<OnlineReply, Box<Response>> {
    let timeout = request.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ticket = m.model.infer(request, Box::new(move |r| drop(tx.send(r)))).map_err(|e| Box::new(online_error(e)))?;
    let outcome = tokio::time::timeout(timeout, rx).await;
    drop(ticket);
    match outcome {
        Ok(Ok(Ok(reply))) => Ok(reply),
        Ok(Ok(Err(e))) => Err(Box::new(online_error(e))),
        Ok(Err(_)) => Err(Box::new(oip_error(StatusCode::SERVICE_UNAVAILABLE, "the model's inference service stopped"))),
        Err(_) => Err(Box::new(oip_error(StatusCode::GATEWAY_TIMEOUT, format!("no answer within the request's timeout of {} ms", timeout.as_millis())))),
    }
}

fn online_error(e: OnlineError) -> Response {
    match e {
        OnlineError::Overloaded(_) => {
            let mut r = oip_error(StatusCode::TOO_MANY_REQUESTS, format!("{e}; retry after a second"));
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            r
        }
        OnlineError::Expired => oip_error(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        OnlineError::Canceled => oip_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        OnlineError::Stopped(_) => oip_error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Element count of a shape (every dimension known).
fn elements(shape: &[i64]) -> Result<usize, String> {
    shape.iter().try_fold(1usize, |acc, d| if *d < 0 { Err(format!("shape {shape:?} has an unknown dimension")) } else { Ok(acc * *d as usize) })
}

/// A tensor's elements as text (numbers as written, `BYTES` as UTF-8), from its JSON `data` or
/// from the binary part of the body, whose next `binary_data_size` bytes it takes.
fn tensor_texts(t: &InputTensor, binary: &[u8], offset: &mut usize) -> Result<Vec<String>, String> {
    let count = elements(&t.shape).map_err(|e| format!("input `{}`: {e}", t.name))?;
    let texts = if let Some(size) = t.parameters.get("binary_data_size") {
        let size = size.as_u64().ok_or_else(|| format!("input `{}`: `binary_data_size` must be a number", t.name))? as usize;
        let bytes = binary
            .get(*offset..*offset + size)
            .ok_or_else(|| format!("input `{}`: the body holds fewer binary bytes than its `binary_data_size` {size}", t.name))?;
        *offset += size;
        binary_texts(&t.name, &t.datatype, bytes)?
    } else {
        let data = t.data.as_ref().ok_or_else(|| format!("input `{}` has neither `data` nor `binary_data_size`", t.name))?;
        let mut flat = Vec::with_capacity(count);
        flatten(data, &mut flat);
        flat.into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(if *b { "1".into() } else { "0".into() }),
                other => Err(format!("input `{}`: element {other} is not a number, string or bool", t.name)),
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    if texts.len() != count {
        return Err(format!("input `{}` has shape {:?} ({count} elements) but holds {}", t.name, t.shape, texts.len()));
    }
    Ok(texts)
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Binary tensor data as text, little-endian as the extension says; `BYTES` elements are each
/// a 4-byte length and that many bytes.
fn binary_texts(name: &str, datatype: &str, bytes: &[u8]) -> Result<Vec<String>, String> {
    fn fixed<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> String) -> Result<Vec<String>, String> {
        if !bytes.len().is_multiple_of(N) {
            return Err(format!("{} bytes is not a whole number of {N}-byte elements", bytes.len()));
        }
        Ok(bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks of N"))).collect())
    }
    let texts = match datatype {
        "BOOL" => fixed::<1>(bytes, |b| if b[0] != 0 { "1" } else { "0" }.to_string()),
        "INT8" => fixed::<1>(bytes, |b| i8::from_le_bytes(b).to_string()),
        "UINT8" => fixed::<1>(bytes, |b| b[0].to_string()),
        "INT16" => fixed::<2>(bytes, |b| i16::from_le_bytes(b).to_string()),
        "UINT16" => fixed::<2>(bytes, |b| u16::from_le_bytes(b).to_string()),
        "INT32" => fixed::<4>(bytes, |b| i32::from_le_bytes(b).to_string()),
        "UINT32" => fixed::<4>(bytes, |b| u32::from_le_bytes(b).to_string()),
        "INT64" => fixed::<8>(bytes, |b| i64::from_le_bytes(b).to_string()),
        "UINT64" => fixed::<8>(bytes, |b| u64::from_le_bytes(b).to_string()),
        "FP32" => fixed::<4>(bytes, |b| f32::from_le_bytes(b).to_string()),
        "FP64" => fixed::<8>(bytes, |b| f64::from_le_bytes(b).to_string()),
        "BYTES" => {
            let mut out = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                let len = rest.get(..4).map(|l| u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize).ok_or("a BYTES element's length is cut off")?;
                let s = rest.get(4..4 + len).ok_or("a BYTES element is cut off")?;
                out.push(String::from_utf8(s.to_vec()).map_err(|_| "a BYTES element is not UTF-8 text".to_string())?);
                rest = &rest[4 + len..];
            }
            Ok(out)
        }
        other => return Err(format!("input `{name}`: datatype {other} is not supported (BOOL, INT8 to UINT64, FP32, FP64, BYTES)")),
    };
    texts.map_err(|e| format!("input `{name}`: {e}"))
}

/// The request's rows. An input named as one of the model's gives one value per row (shape
/// `[N]` or `[N, 1]`); a `[N, F]` tensor under any other name gives a row of the model's `F`
/// inputs in order (a tabular feature matrix); a `BYTES` tensor under any other name gives one
/// JSON object per row, as a Kafka request carries it.
fn tensor_rows(inputs: &[InputTensor], binary: &[u8], model_inputs: &[&str]) -> Result<Vec<Row>, String> {
    if inputs.is_empty() {
        return Err("the request has no inputs".into());
    }
    let mut offset = 0usize;
    let mut n: Option<usize> = None;
    let mut fields: Vec<Vec<(String, String)>> = Vec::new();
    let mut json_rows: Option<Vec<String>> = None;
    let mut rows_of = |count: usize, name: &str| -> Result<usize, String> {
        match n {
            None => {
                n = Some(count);
                Ok(count)
            }
            Some(m) if m == count => Ok(count),
            Some(m) => Err(format!("input `{name}` has {count} rows but another input has {m}")),
        }
    };
    for t in inputs {
        let texts = tensor_texts(t, binary, &mut offset)?;
        let batch = t.shape.first().copied().unwrap_or(1).max(0) as usize;
        if model_inputs.contains(&t.name.as_str()) {
            if texts.len() != batch {
                return Err(format!("input `{}` must hold one value per row (shape [N] or [N, 1]), got shape {:?}", t.name, t.shape));
            }
            let rows = rows_of(batch, &t.name)?;
            fields.resize_with(rows, Vec::new);
            for (row, text) in fields.iter_mut().zip(texts) {
                row.push((t.name.clone(), text));
            }
        } else if t.datatype != "BYTES" && t.shape.len() == 2 && t.shape[1] as usize == model_inputs.len() {
            let rows = rows_of(batch, &t.name)?;
            fields.resize_with(rows, Vec::new);
            let width = model_inputs.len();
            for (r, row) in fields.iter_mut().enumerate() {
                for (c, name) in model_inputs.iter().enumerate() {
                    row.push((name.to_string(), texts[r * width + c].clone()));
                }
            }
        } else if t.datatype == "BYTES" && texts.len() == batch {
            rows_of(batch, &t.name)?;
            if json_rows.replace(texts).is_some() {
                return Err("only one input may carry JSON rows".into());
            }
        } else {
            return Err(format!(
                "input `{}` (shape {:?}) is not one of the model's inputs ({}), a [N, {}] feature matrix, or a BYTES tensor of JSON rows",
                t.name,
                t.shape,
                model_inputs.join(", "),
                model_inputs.len()
            ));
        }
    }
    match json_rows {
        Some(_) if !fields.is_empty() => Err("JSON rows cannot be mixed with named inputs".into()),
        Some(rows) => Ok(rows.into_iter().map(Row::Json).collect()),
        None => Ok(fields.into_iter().map(Row::Fields).collect()),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct AnswerQuery {
    /// The model (optional when the server serves one).
    model: Option<String>,
    /// 1 runs first; default 10.
    priority: Option<u32>,
    /// 504 past it; queued work is dropped.
    timeout_ms: Option<u64>,
}

/// `POST /v1/answer`: the JSON a Kafka or Pub/Sub request carries (with an optional `id` or
/// `request_id`),
/// answered with the object the results topic carries: the ID, the task's outputs, the model
/// and its version, and the ingest time. Job-API errors (`{"error": {code, message, hint}}`).
#[utoipa::path(post, path = "/v1/answer", params(AnswerQuery),
    request_body(description = "the JSON object a Kafka or Pub/Sub request carries, e.g. {\"request_id\": \"r1\", \"PULocationID\": 8, \"DOLocationID\": 57, \"trip_distance\": 2.25}", content_type = "application/json"),
    responses((status = 200, description = "the answer object the results topic carries: id, outputs, model, model_version, ingest_ms"),
        (status = 400, description = "a payload a stream would dead-letter, with its reason as the code"), (status = 404, description = "no such model, or not loaded"),
        (status = 429, description = "the model's queue is full; Retry-After"), (status = 504, description = "past the timeout")),
    security(("bearer" = [])))]
pub async fn answer(State(app): State<Arc<App>>, Query(q): Query<AnswerQuery>, body: Bytes) -> Response {
    use crate::serve::http::ApiError;
    let name = match (&q.model, app.models.len()) {
        (Some(n), _) => n.clone(),
        (None, 1) => app.models.keys().next().expect("one model").clone(),
        (None, _) => {
            let names: Vec<&str> = app.models.keys().map(String::as_str).collect();
            return ApiError::new(StatusCode::BAD_REQUEST, "no_model", "name the model", format!("add ?model=<name>, one of {}", names.join(", ")))
                .into_response();
        }
    };
    let m = match app.models.get(&name) {
        Some(m) if m.ready() => m.clone(),
        Some(_) => {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_loaded",
                format!("model `{name}` is not loaded"),
                "load it with POST /v2/repository/models/{name}/load",
            )
            .into_response()
        }
        None => {
            return ApiError::new(StatusCode::NOT_FOUND, "unknown_model", format!("no model `{name}`"), "GET /v2/repository/index lists the models")
                .into_response()
        }
    };
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t.to_string(),
        Err(_) => return ApiError::new(StatusCode::BAD_REQUEST, "not_json", "the body is not UTF-8 JSON", "send the request's JSON object").into_response(),
    };
    // `id`, or `request_id` as a Kafka or Pub/Sub request carries it by default.
    let id = match sluice::json::JsonFields::parse(&text) {
        Ok(obj) => match obj.get("id").or_else(|| obj.get("request_id")).filter(|raw| raw.get() != "null").map(sluice::json::text_value) {
            Some(TextValue::String(s)) | Some(TextValue::Number(s)) => s,
            None => next_id(),
            Some(TextValue::Other) => {
                return ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", "`id` must be a string or a number", "").into_response();
            }
        },
        Err(e) => {
            return ApiError::new(StatusCode::BAD_REQUEST, "not_json", format!("the body is not a JSON object: {e}"), "send the request's JSON object")
                .into_response()
        }
    };
    let ingest_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let request = OnlineRequest {
        rows: vec![Row::Json(text.clone())],
        priority: q.priority.filter(|p| *p > 0).unwrap_or(DEFAULT_PRIORITY),
        timeout: q.timeout_ms.map(Duration::from_millis),
    };
    let reply = match run(&m, request).await {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let model = reply.model.clone();
    let values = match reply.rows.into_iter().next() {
        Some(Ok(v)) => v,
        Some(Err((reason, detail))) => {
            return ApiError::new(StatusCode::BAD_REQUEST, reason.as_str(), detail, "the dead-letter reason a stream would give this request").into_response()
        }
        None => return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no answer row", "").into_response(),
    };
    let answer = sluice::record::Answer {
        id,
        values,
        passthrough: Vec::new(),
        model,
        pos: sluice::record::SourcePos::row(Arc::from("http"), 0),
        ingest_ms,
        raw: Vec::new(),
        seq: 0,
        replaces: false,
    };
    let mut buf = Vec::new();
    sluice::connectors::results::ResultJson::new(m.model.info().outputs).write(&mut buf, &answer);
    ([(header::CONTENT_TYPE, "application/json")], buf).into_response()
}

/// An ID for a request that gave none: unique within this server's life.
fn next_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("http-{started:x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: Vec<i64>, datatype: &str, data: Value) -> InputTensor {
        InputTensor { name: name.into(), shape, datatype: datatype.into(), parameters: Map::new(), data: Some(data) }
    }

    #[test]
    fn named_inputs_give_one_field_per_row() {
        let inputs = vec![tensor("question", vec![2], "BYTES", json!(["q1", "q2"])), tensor("context", vec![2, 1], "BYTES", json!([["c1"], ["c2"]]))];
        let rows = tensor_rows(&inputs, &[], &["question", "context"]).unwrap();
        let got: Vec<Vec<(String, String)>> = rows.into_iter().map(|r| if let Row::Fields(f) = r { f } else { panic!("fields") }).collect();
        assert_eq!(got[1], vec![("question".into(), "q2".into()), ("context".into(), "c2".into())]);
    }

    #[test]
    fn a_feature_matrix_in_binary_gives_the_models_inputs_in_order() {
        let mut bytes = Vec::new();
        for x in [1.5f32, 2.0, 3.0, 4.25] {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        let mut t = tensor("INPUT", vec![2, 2], "FP32", Value::Null);
        t.data = None;
        t.parameters.insert("binary_data_size".into(), json!(bytes.len()));
        let rows = tensor_rows(&[t], &bytes, &["a", "b"]).unwrap();
        let Row::Fields(second) = &rows[1] else { panic!("fields") };
        assert_eq!(second, &vec![("a".to_string(), "3".to_string()), ("b".to_string(), "4.25".to_string())]);
    }

    #[test]
    fn binary_bytes_elements_are_length_prefixed_and_a_short_body_is_refused() {
        let mut bytes = Vec::new();
        for s in ["{\"x\": 1}", "héllo"] {
            bytes.extend_from_slice(&(s.len() as u32).to_le_bytes());
            bytes.extend_from_slice(s.as_bytes());
        }
        assert_eq!(binary_texts("j", "BYTES", &bytes).unwrap(), vec!["{\"x\": 1}".to_string(), "héllo".to_string()]);
        assert!(binary_texts("j", "BYTES", &bytes[..bytes.len() - 1]).unwrap_err().contains("cut off"));
        assert!(binary_texts("j", "FP64", &[0; 7]).unwrap_err().contains("not a whole number"));
    }

    #[test]
    fn mismatched_row_counts_and_unknown_inputs_are_refused_with_their_names() {
        let inputs = vec![tensor("question", vec![2], "BYTES", json!(["q1", "q2"])), tensor("context", vec![1], "BYTES", json!(["c1"]))];
        assert!(tensor_rows(&inputs, &[], &["question", "context"]).unwrap_err().contains("input `context` has 1 rows"));
        let inputs = vec![tensor("bogus", vec![1, 3], "FP32", json!([1, 2, 3]))];
        assert!(tensor_rows(&inputs, &[], &["question", "context"]).unwrap_err().contains("input `bogus`"));
    }

    #[test]
    fn priority_zero_is_the_default_level_and_timeout_is_in_microseconds() {
        let p: Map<String, Value> = serde_json::from_value(json!({"priority": 0, "timeout": 2500})).unwrap();
        assert_eq!(schedule(&p).unwrap(), (DEFAULT_PRIORITY, Some(Duration::from_micros(2500))));
        let p: Map<String, Value> = serde_json::from_value(json!({"priority": "high"})).unwrap();
        assert!(schedule(&p).is_err());
    }
}
