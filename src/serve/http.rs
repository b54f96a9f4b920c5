//! The HTTP front of `sluice serve` (axum): the job API under `/v1` (submit, upload, status,
//! list, cancel, answers and dead letters as NDJSON), health under the Open Inference
//! Protocol's `/v2/health/*` paths, and `/metrics`. Errors are `{"error": {"code", "message",
//! "hint"}}` with the status that fits; with tokens configured every route but health and
//! metrics needs `Authorization: Bearer <token>`. `/` is a page listing the jobs with progress
//! bars, the pipelines and the models, with an upload form; `/v1/openapi.json` describes the API.

use crate::serve::jobs::{from_template, JobRecord, Jobs, JobsError};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use sluice::engine::JobStatus;
use sluice::topology::Topology;
use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;

/// What every handler sees.
pub struct App {
    pub jobs: Arc<Jobs>,
    /// The templates, parsed at start.
    pub templates: BTreeMap<String, (PathBuf, Topology)>,
    pub tokens: Vec<String>,
    /// The serve config's pipelines, running for the process's life.
    pub pipelines: Vec<sluice::engine::Job>,
    /// The models answered online, by name.
    pub models: BTreeMap<String, Arc<crate::serve::models::Served>>,
}

/// An API error: its status, a stable code, a message and how to fix it.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    hint: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>, hint: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), hint: hint.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"code": self.code, "message": self.message, "hint": self.hint}}))).into_response()
    }
}

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> ApiError {
        match e {
            JobsError::Invalid(m, h) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_job", m, h),
            JobsError::NotFound(id) => ApiError::new(StatusCode::NOT_FOUND, "job_not_found", format!("no job `{id}`"), "list the jobs with GET /v1/jobs"),
            JobsError::Full(n) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", format!("{n} jobs are already waiting"), "try again once some have run")
            }
            JobsError::Unavailable(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "source_unavailable", m, "try again once the system is reachable"),
            JobsError::Internal(m) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m, "see the server's log"),
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/v1/templates", get(templates))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/pipelines", get(pipelines))
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/upload", post(upload).layer(DefaultBodyLimit::disable()))
        .route("/v1/jobs/{id}", get(status))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/answers", get(answers))
        .route("/v1/jobs/{id}/dead_letters", get(dead_letters))
        .merge(crate::serve::oip::routes())
        .layer(axum::middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/", get(|| async { axum::response::Html(include_str!("page.html")) }))
        .route("/v2/health/live", get(|| async { Json(json!({"live": true})) }))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(crate::serve::oip::server_metadata))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route", "the job API lives under /v1/jobs") })
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(app)
}

/// Per-route series: requests by route, method and status, and their latency.
async fn count_requests(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<axum::extract::MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("sluice_http_requests_total", "route" => route.clone(), "method" => method, "status" => status).increment(1);
    metrics::histogram!("sluice_http_request_seconds", "route" => route).record(started.elapsed().as_secs_f64());
    response
}

async fn auth(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if app.tokens.is_empty() {
        return next.run(request).await;
    }
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if app.tokens.iter().any(|k| k == t.trim()) => next.run(request).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not one of the server's",
            "use a token from the serve config's tokens_file or SLUICE_TOKENS",
        )
        .into_response(),
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "this route needs a bearer token", "send `Authorization: Bearer <token>`").into_response()
        }
    }
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    if app.jobs.engine().stopping() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"ready": false}))).into_response()
    } else {
        Json(json!({"ready": true})).into_response()
    }
}

/// The engine's metrics, the routes', and a series per job kept in the state folder.
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let Some(mut text) = sluice::metrics::render() else {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_metrics", "metrics are not installed", "").into_response();
    };
    let jobs = app.jobs.clone();
    let records = tokio::task::spawn_blocking(move || jobs.list()).await.unwrap_or_default();
    let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
    for s in [JobStatus::Enqueued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled] {
        by_status.insert(s.as_str(), 0);
    }
    for r in &records {
        *by_status.entry(r.status.as_str()).or_default() += 1;
    }
    text.push_str("# HELP sluice_jobs Jobs kept in the state folder, by status.\n# TYPE sluice_jobs gauge\n");
    for (s, n) in by_status {
        text.push_str(&format!("sluice_jobs{{status=\"{s}\"}} {n}\n"));
    }
    for (name, help) in
        [("read", "Records a job has read."), ("answered", "Answers a job has made durable."), ("dead_letters", "Dead letters a job has made durable.")]
    {
        text.push_str(&format!("# HELP sluice_job_{name} {help}\n# TYPE sluice_job_{name} gauge\n"));
        for r in &records {
            let v = match name {
                "read" => r.read,
                "answered" => r.answered,
                _ => r.dead_letters,
            };
            text.push_str(&format!("sluice_job_{name}{{job=\"{}\",pipeline=\"{}\",status=\"{}\"}} {v}\n", r.id, r.pipeline, r.status.as_str()));
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The templates (models) jobs can name.
#[utoipa::path(get, path = "/v1/templates", responses((status = 200, body = Templates)), security(("bearer" = [])))]
async fn templates(State(app): State<Arc<App>>) -> Json<Templates> {
    let templates = app
        .templates
        .iter()
        .map(|(name, (path, t))| TemplateView {
            name: name.clone(),
            topology: path.clone(),
            pipeline: t.name.clone(),
            task: t.task.kind().into(),
            columns: t.task.required_columns(),
        })
        .collect();
    Json(Templates { templates })
}

/// A pipeline of the serve config, running for the process's life.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct PipelineView {
    name: String,
    #[schema(value_type = String, example = "running")]
    status: JobStatus,
    read: u64,
    answered: u64,
    dead_letters: u64,
    error: Option<String>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Pipelines {
    pipelines: Vec<PipelineView>,
}

/// The pipelines that run for the process's life, with their counts.
#[utoipa::path(get, path = "/v1/pipelines", responses((status = 200, body = Pipelines)), security(("bearer" = [])))]
async fn pipelines(State(app): State<Arc<App>>) -> Json<Pipelines> {
    let pipelines = app
        .pipelines
        .iter()
        .map(|p| {
            let s = p.snapshot();
            PipelineView { name: p.id().to_string(), status: s.status, read: s.read, answered: s.answered, dead_letters: s.dead_letters, error: s.error }
        })
        .collect();
    Json(Pipelines { pipelines })
}

/// `POST /v1/jobs`: a whole topology (`{"topology": "<TOML>"}`, or the TOML itself), or a
/// template and a source (`{"template": "rides", "source": {"type": "generator", "count": 1000}}`).
#[utoipa::path(post, path = "/v1/jobs", request_body = SubmitRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key returns the same job")),
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody, description = "unknown template"), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
async fn submit(State(app): State<Arc<App>>, headers: HeaderMap, body: String) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let key = idempotency_key(&headers);
    let (text, template) = if body.trim_start().starts_with('{') {
        let req: SubmitRequest = serde_json::from_str(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not a job request: {e}"),
                "send {\"topology\": \"...\"} or {\"template\": ..., \"source\": {...}}",
            )
        })?;
        if let Some(t) = req.topology {
            (t, None)
        } else if let Some(name) = req.template {
            let (path, _) = template(&app, &name)?;
            let source = req.source.ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_job",
                    "a template job needs a `source`",
                    "e.g. \"source\": {\"type\": \"csv\", \"path\": \"data/q.csv\"}",
                )
            })?;
            let source: toml::Table = serde_json::from_value(source).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_job", format!("`source` is not a table: {e}"), "give the source's fields as a JSON object")
            })?;
            (
                from_template(path, source)
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "template", e, "check the serve config's templates"))?,
                Some(name),
            )
        } else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_job",
                "the body names neither `topology` nor `template`",
                "send {\"topology\": \"<TOML>\"} or {\"template\": \"rides\", \"source\": {...}}",
            ));
        }
    } else {
        (body, None)
    };
    let jobs = app.jobs.clone();
    let record = tokio::task::spawn_blocking(move || jobs.submit(text, template, key, None)).await.map_err(internal)??;
    Ok((StatusCode::ACCEPTED, Json(Accepted { job_id: record.id, status: record.status })))
}

/// Bytes of an upload's body beyond its file: the form's boundaries, headers and `model` field.
const FORM_OVERHEAD: u64 = 64 << 10;

/// `POST /v1/jobs/upload`: multipart form data with `file` (CSV or Parquet) and `model` (or
/// `template`). The file is streamed to the state folder as it arrives.
#[utoipa::path(post, path = "/v1/jobs/upload", request_body(content = UploadForm, content_type = "multipart/form-data"),
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key returns the same job")),
    responses((status = 202, body = Accepted), (status = 400, body = ErrorBody, description = "a broken form, or a file without the model's columns"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody, description = "unknown model"), (status = 413, body = ErrorBody), (status = 429, body = ErrorBody)),
    security(("bearer" = [])))]
async fn upload(State(app): State<Arc<App>>, headers: HeaderMap, mut form: Multipart) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let key = idempotency_key(&headers);
    // A repeat is answered before its body is stored again.
    if let Some(record) = key.as_deref().and_then(|k| app.jobs.by_key(k)) {
        return Ok((StatusCode::ACCEPTED, Json(Accepted { job_id: record.id, status: record.status })));
    }
    let limit = app.jobs.config.limits.max_upload_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload_too_large",
            format!("the upload is over the limit of {limit} bytes"),
            "split the file, or raise limits.max_upload_bytes in the serve config",
        )
    };
    // A body that says it is larger than the limit (with room for the form's own fields) is
    // refused before a byte of it is read; one that does not say is cut off as it streams.
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.saturating_add(FORM_OVERHEAD)) {
        return Err(too_large());
    }
    let mut name: Option<String> = None;
    let mut saved: Option<Upload> = None;
    let broken = |e: axum::extract::multipart::MultipartError| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_multipart",
            format!("the form data is broken: {}", e.body_text()),
            "send multipart/form-data with a `file` and a `model` field",
        )
    };
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                drop(saved);
                return Err(broken(e));
            }
        };
        match field.name().unwrap_or_default() {
            "model" | "template" => name = Some(field.text().await.map_err(broken)?.trim().to_string()),
            "file" => {
                let filename = field.file_name().unwrap_or_default().to_string();
                let parquet = filename.ends_with(".parquet") || field.content_type().is_some_and(|c| c.contains("parquet"));
                let ext = if parquet { "parquet" } else { "csv" };
                let path = app.jobs.config.state.join("uploads").join(format!("{}.{ext}", upload_name()));
                let file = std::fs::File::create(&path).map_err(|e| internal(format!("cannot store the upload: {e}")))?;
                let mut up = Upload { path, file: Some(std::io::BufWriter::with_capacity(1 << 20, file)), bytes: 0, parquet, keep: false };
                let mut field = field;
                loop {
                    match field.chunk().await {
                        Ok(Some(chunk)) => {
                            up.bytes += chunk.len() as u64;
                            if up.bytes > limit {
                                return Err(too_large());
                            }
                            if let Some(w) = up.file.as_mut() {
                                w.write_all(&chunk).map_err(|e| internal(format!("cannot store the upload: {e}")))?;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => return Err(broken(e)),
                    }
                }
                if let Some(w) = up.file.take() {
                    w.into_inner()
                        .map_err(|e| internal(format!("cannot store the upload: {e}")))?
                        .sync_all()
                        .map_err(|e| internal(format!("cannot store the upload: {e}")))?;
                }
                saved = Some(up);
            }
            _ => {}
        }
    }
    let mut up = saved
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "invalid_upload", "the form has no `file` field", "add the CSV or Parquet file as `file`"))?;
    let name = name.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_upload",
            "the form names no `model`",
            format!("add a `model` field, one of: {}", app.templates.keys().cloned().collect::<Vec<_>>().join(", ")),
        )
    })?;
    let (template_path, topology) = template(&app, &name)?;
    let required = required_columns(topology);
    let columns = if up.parquet { parquet_columns(&up.path) } else { csv_header(&up.path) }.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_upload",
            format!("cannot read the file's columns: {e}"),
            "upload a CSV with a header line, or a Parquet file",
        )
    })?;
    let missing: Vec<&str> = required.iter().map(String::as_str).filter(|c| !columns.iter().any(|h| h == c)).collect();
    if !missing.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_columns",
            format!("the file has no {} column{} (it has: {})", missing.join(", "), if missing.len() > 1 { "s" } else { "" }, columns.join(", ")),
            format!("the `{name}` model needs the columns {}", required.join(", ")),
        ));
    }
    let mut source = toml::Table::new();
    source.insert("type".into(), "files".into());
    let absolute = std::path::absolute(&up.path).unwrap_or(up.path.clone());
    source.insert("path".into(), absolute.display().to_string().into());
    source.insert("format".into(), (if up.parquet { "parquet" } else { "csv" }).into());
    source.insert("suffix".into(), (if up.parquet { ".parquet" } else { ".csv" }).into());
    let text = from_template(template_path, source).map_err(internal)?;
    let jobs = app.jobs.clone();
    let upload = (up.path.clone(), up.bytes);
    let record = tokio::task::spawn_blocking(move || jobs.submit(text, Some(name), key, Some(upload))).await.map_err(internal)??;
    // An idempotent repeat returns the first job, which keeps its own upload.
    up.keep = record.upload.as_ref() == Some(&up.path);
    Ok((StatusCode::ACCEPTED, Json(Accepted { job_id: record.id, status: record.status })))
}

/// An upload on its way to the state folder: removed unless a job takes it.
struct Upload {
    path: PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
    bytes: u64,
    parquet: bool,
    keep: bool,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.keep {
            self.file.take();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ListQuery {
    /// Statuses to list, comma-separated.
    status: Option<String>,
    /// The `next_cursor` of the last page.
    cursor: Option<String>,
    /// At most this many (default 100, at most 1000).
    limit: Option<usize>,
}

/// `GET /v1/jobs?status=running,enqueued&cursor=<id>&limit=100`: oldest first; `next_cursor`
/// continues after the last one listed.
#[utoipa::path(get, path = "/v1/jobs", params(ListQuery), responses((status = 200, body = JobList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn list(State(app): State<Arc<App>>, Query(q): Query<ListQuery>) -> Result<Json<JobList>, ApiError> {
    let wanted: Option<Vec<JobStatus>> = match &q.status {
        None => None,
        Some(s) => Some(
            s.split(',')
                .map(|one| {
                    serde_json::from_value(Value::String(one.trim().to_string())).map_err(|_| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_status",
                            format!("`{one}` is not a job status"),
                            "use enqueued, running, succeeded, failed or canceled",
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let jobs = app.jobs.clone();
    let all = tokio::task::spawn_blocking(move || jobs.list()).await.map_err(internal)?;
    let mut jobs: Vec<JobView> = Vec::new();
    let mut next_cursor = None;
    for r in all.iter().filter(|r| q.cursor.as_ref().is_none_or(|c| &r.id > c)).filter(|r| wanted.as_ref().is_none_or(|w| w.contains(&r.status))) {
        if jobs.len() == limit {
            next_cursor = jobs.last().map(|p| p.job_id.clone());
            break;
        }
        jobs.push(view(r));
    }
    Ok(Json(JobList { jobs, next_cursor }))
}

/// A job's status, counts, rate and error.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path)), responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn status(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<JobView>, ApiError> {
    let jobs = app.jobs.clone();
    let record = tokio::task::spawn_blocking(move || jobs.get(&id).ok_or(JobsError::NotFound(id))).await.map_err(internal)??;
    Ok(Json(view(&record)))
}

/// Stops a job: it reads no more, drains, and ends `canceled`; what was durable stays.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = String, Path)), responses((status = 200, body = JobView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Json<JobView>, ApiError> {
    let jobs = app.jobs.clone();
    let record = tokio::task::spawn_blocking(move || jobs.cancel(&id)).await.map_err(internal)??;
    Ok(Json(view(&record)))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct PageQuery {
    /// The `Sluice-Next-Cursor` header of the last page.
    cursor: Option<String>,
    /// At most this many lines.
    limit: Option<u64>,
}

/// The job's answers as NDJSON (one change per line), whatever its template's sinks.
#[utoipa::path(get, path = "/v1/jobs/{id}/answers", params(("id" = String, Path), PageQuery),
    responses((status = 200, content_type = "application/x-ndjson", description = "one answer per line; `Sluice-Next-Cursor` continues"), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn answers(State(app): State<Arc<App>>, Path(id): Path<String>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    lines(app, id, "answers", q).await
}

/// The job's dead letters as NDJSON, with their reasons and original bytes.
#[utoipa::path(get, path = "/v1/jobs/{id}/dead_letters", params(("id" = String, Path), PageQuery),
    responses((status = 200, content_type = "application/x-ndjson", description = "one dead letter per line; `Sluice-Next-Cursor` continues"), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn dead_letters(State(app): State<Arc<App>>, Path(id): Path<String>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    lines(app, id, "dead_letters", q).await
}

/// Streams a job's `<kind>.w<worker>.jsonl` files as one NDJSON body, from `cursor`
/// (`<file>:<offset>`) for at most `limit` lines; the `Sluice-Next-Cursor` header continues
/// after them (absent at the end).
async fn lines(app: Arc<App>, id: String, kind: &'static str, q: PageQuery) -> Result<Response, ApiError> {
    if app.jobs.get(&id).is_none() {
        return Err(JobsError::NotFound(id).into());
    }
    let dir = app.jobs.out_dir(&id);
    let (mut file, mut offset) = match &q.cursor {
        None => (0usize, 0u64),
        Some(c) => c.split_once(':').and_then(|(f, o)| Some((f.parse().ok()?, o.parse().ok()?))).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_cursor", format!("`{c}` is not a cursor"), "pass the Sluice-Next-Cursor header of the last page")
        })?,
    };
    // The files as they are now: a page ends where they end.
    let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    let w: u64 = name.strip_prefix(kind)?.strip_prefix(".w")?.strip_suffix(".jsonl")?.parse().ok()?;
                    Some((w, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let lens: Vec<u64> = files.iter().map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).collect();
    // Where this page ends: `limit` lines on, found by counting newlines.
    let mut ranges: Vec<(PathBuf, u64, u64)> = Vec::new();
    let mut left = q.limit.unwrap_or(u64::MAX);
    let mut next = None;
    while file < files.len() && left > 0 {
        let len = lens[file];
        let end = if left == u64::MAX { len } else { nth_line_end(&files[file].1, offset, len, &mut left).map_err(internal)? };
        if end > offset {
            ranges.push((files[file].1.clone(), offset, end));
        }
        if end < len {
            next = Some(format!("{file}:{end}"));
            break;
        }
        file += 1;
        offset = 0;
    }
    if next.is_none() && left == 0 && file < files.len() {
        next = Some(format!("{file}:{offset}"));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    std::thread::spawn(move || {
        for (path, from, to) in ranges {
            let sent = (|| -> std::io::Result<()> {
                let mut f = std::fs::File::open(&path)?;
                f.seek(std::io::SeekFrom::Start(from))?;
                let mut f = f.take(to - from);
                loop {
                    let mut buf = vec![0u8; 256 << 10];
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.truncate(n);
                    if tx.blocking_send(Ok(buf)).is_err() {
                        return Ok(());
                    }
                }
            })();
            if let Err(e) = sent {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(header::CONTENT_TYPE, "application/x-ndjson".parse().expect("a valid header"));
    if let Some(n) = next {
        response.headers_mut().insert("sluice-next-cursor", n.parse().map_err(internal)?);
    }
    Ok(response)
}

/// The offset just past the `left`-th line from `from` (or `len`), counting the lines it passes off `left`.
fn nth_line_end(path: &std::path::Path, from: u64, len: u64, left: &mut u64) -> Result<u64, String> {
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    f.seek(std::io::SeekFrom::Start(from)).map_err(|e| e.to_string())?;
    let mut pos = from;
    let mut buf = vec![0u8; 256 << 10];
    while pos < len && *left > 0 {
        let want = ((len - pos) as usize).min(buf.len());
        let n = f.read(&mut buf[..want]).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        for i in memchr::memchr_iter(b'\n', &buf[..n]) {
            *left -= 1;
            if *left == 0 {
                return Ok(pos + i as u64 + 1);
            }
        }
        pos += n as u64;
    }
    Ok(pos)
}

/// A job as the API shows it.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct JobView {
    job_id: String,
    /// `enqueued`, `running`, `succeeded`, `failed` or `canceled`.
    #[schema(value_type = String, example = "running")]
    status: JobStatus,
    /// The template (model) it was made from.
    template: Option<String>,
    pipeline: String,
    /// Where its records come from.
    source: String,
    counts: Counts,
    /// The uploaded file's size.
    bytes_total: Option<u64>,
    /// Records done (answered or dead letters) per second since it started.
    rate_per_s: f64,
    /// Seconds left at that rate, when the total is known.
    eta_s: Option<f64>,
    /// When it was accepted, started and ended (ms since the Unix epoch).
    created_ms: u64,
    started_ms: Option<u64>,
    finished_ms: Option<u64>,
    /// Times it was started: more than one after the server restarted.
    attempts: u32,
    /// Why it failed.
    error: Option<String>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Counts {
    read: u64,
    answered: u64,
    dead_letters: u64,
    /// Records the source will read, once known.
    total: Option<u64>,
}

/// A job just accepted.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Accepted {
    job_id: String,
    #[schema(value_type = String, example = "enqueued")]
    status: JobStatus,
}

/// A page of jobs, oldest first.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct JobList {
    jobs: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last.
    next_cursor: Option<String>,
}

/// Every error: `{"error": {"code", "message", "hint"}}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `job_not_found`, `upload_too_large`, `missing_columns`, ...
    code: String,
    message: String,
    /// How to fix it.
    hint: String,
}

/// `POST /v1/jobs`: a whole topology, or a template and a source.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct SubmitRequest {
    /// A topology file's TOML, with a finite source.
    topology: Option<String>,
    /// A template (see `GET /v1/templates`), with `source`.
    template: Option<String>,
    /// The source's fields, as in a topology's `[source]` table.
    #[schema(value_type = Option<Object>, example = json!({"type": "generator", "count": 1000000}))]
    source: Option<Value>,
}

/// The upload form.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The template (model) to run the file through.
    model: String,
    /// A CSV (with a header line) or a Parquet file.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

/// A template a job can name.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct TemplateView {
    name: String,
    #[schema(value_type = String)]
    topology: PathBuf,
    pipeline: String,
    /// `extractive_qa` or `tabular`.
    task: String,
    /// The columns an uploaded file must have.
    columns: Vec<String>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Templates {
    templates: Vec<TemplateView>,
}

fn view(r: &JobRecord) -> JobView {
    let now = sluice::record::now_ms();
    let done = r.answered + r.dead_letters;
    let secs = r.started_ms.map(|s| (r.finished_ms.unwrap_or(now).saturating_sub(s)) as f64 / 1000.0).unwrap_or(0.0);
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let eta = match (r.total, r.status) {
        (Some(t), JobStatus::Running) if rate > 0.0 => Some((t.saturating_sub(done)) as f64 / rate),
        _ => None,
    };
    JobView {
        job_id: r.id.clone(),
        status: r.status,
        template: r.template.clone(),
        pipeline: r.pipeline.clone(),
        source: r.source.clone(),
        counts: Counts { read: r.read, answered: r.answered, dead_letters: r.dead_letters, total: r.total },
        bytes_total: r.bytes_total,
        rate_per_s: rate,
        eta_s: eta,
        created_ms: r.created_ms,
        started_ms: r.started_ms,
        finished_ms: r.finished_ms,
        attempts: r.attempts,
        error: r.error.clone(),
    }
}

/// The OpenAPI document of the job API.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "sluice serve", description = "The job API of sluice: upload files, run jobs, follow them, fetch their answers; and online answers. The Open Inference Protocol routes under /v2 follow the KServe v2 specification."),
    paths(submit, upload, list, status, cancel, answers, dead_letters, templates, pipelines, openapi, crate::serve::oip::answer),
    components(schemas(JobView, Counts, Accepted, JobList, ErrorBody, ErrorDetail, SubmitRequest, UploadForm, TemplateView, Templates, PipelineView, Pipelines)),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

/// The job API's OpenAPI document.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "OpenAPI 3.1")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi as _;
    Json(ApiDoc::openapi())
}

fn template<'a>(app: &'a App, name: &str) -> Result<&'a (PathBuf, Topology), ApiError> {
    app.templates.get(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model or template `{name}`"),
            format!("use one of: {}", app.templates.keys().cloned().collect::<Vec<_>>().join(", ")),
        )
    })
}

/// The columns a template's task reads from a file (none for a task that checks each row).
fn required_columns(t: &Topology) -> Vec<String> {
    t.task.required_columns()
}

/// The header as the files source will read it (quoting, a BOM, duplicate or blank names).
fn csv_header(path: &std::path::Path) -> Result<Vec<String>, String> {
    sluice::connectors::files::csv::read_header(path, 1 << 20).map_err(|e| e.to_string())
}

fn parquet_columns(path: &std::path::Path) -> Result<Vec<String>, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(f).map_err(|e| e.to_string())?;
    Ok(reader.metadata().file_metadata().schema_descr().columns().iter().map(|c| c.name().to_string()).collect())
}

fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn upload_name() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("u{:011x}{:05x}", sluice::record::now_ms(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xfffff)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string(), "see the server's log")
}
