//! The serve config (`sluice serve --config serve.toml`): the listen address, bearer tokens, the
//! state folder, the templates jobs are made from, the pipelines that run for the process's
//! life, and the limits; and its embedded default (the bundled QA and ride models, a local
//! state folder, no server needed).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `sluice serve` runs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Where the HTTP server listens.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The state folder: uploads, each job's answers, and the job records unless
    /// `state_store` keeps them in Postgres.
    #[serde(default = "default_state")]
    pub state: PathBuf,
    /// Where job records and progress live: omit for files in the state folder, or a Postgres
    /// table, so that the records outlive the machine and can be queried.
    #[serde(default)]
    pub state_store: Option<StateStore>,
    /// Timely worker threads.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// A file with one bearer token per line. Tokens also come from `SLUICE_TOKENS`
    /// (comma-separated). With any token set, every route but health needs one.
    #[serde(default)]
    pub tokens_file: Option<PathBuf>,
    #[serde(default)]
    pub limits: Limits,
    /// The templates a job names (`template`, or `model` in an upload form): a topology file
    /// whose task, batching, execution and sinks the job uses, with its own source.
    #[serde(default = "default_templates")]
    pub templates: BTreeMap<String, PathBuf>,
    /// Topology files run for the process's life (a Kafka ride stream, for example).
    #[serde(default)]
    pub pipelines: Vec<PathBuf>,
    /// Models served online (`/v2/models/{name}/infer`, `/v1/answer`). Omitted: one per
    /// template, named as it, on the template's model file, reloaded when that file changes.
    #[serde(default)]
    pub models: Option<BTreeMap<String, ModelConfig>>,
    /// How often, in milliseconds, watched model files and repositories are checked for a new
    /// version.
    #[serde(default = "default_model_poll_ms")]
    pub model_poll_ms: u64,
    /// The nice value (0 to 19) of the threads that run jobs and pipelines: online requests
    /// come first for the CPU, and bulk work takes what they leave. 0: the same priority.
    #[serde(default = "default_bulk_nice")]
    pub bulk_nice: i32,
    /// How long SIGTERM gives the jobs to drain.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
}

/// A model served online.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The template whose task, batching and execution the model runs with, so that its
    /// requests share one inference service with the jobs and pipelines on it. Default: the
    /// template named as the model.
    #[serde(default)]
    pub template: Option<String>,
    /// A model repository: one folder per version (`1/`, `2/`, …), each holding the model file
    /// under the template's file name. The highest version serves unless one is loaded by name.
    #[serde(default)]
    pub repository: Option<PathBuf>,
    /// Load a new version when one appears (a new version folder, the model file rewritten).
    #[serde(default = "default_true")]
    pub watch: bool,
    /// Online requests in flight at most; past it, 429 with `Retry-After`.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

impl ModelConfig {
    /// A template's model as served by default: its file, watched.
    pub fn of_template(template: &str) -> ModelConfig {
        ModelConfig { template: Some(template.to_string()), repository: None, watch: true, max_queue: default_max_queue() }
    }
}

fn default_bulk_nice() -> i32 {
    10
}
fn default_true() -> bool {
    true
}
fn default_max_queue() -> usize {
    512
}
fn default_model_poll_ms() -> u64 {
    1000
}

/// Job records in a Postgres table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateStore {
    /// The connection string (`${VAR}` expanded), e.g. postgres://user:password@host:5432/db.
    pub postgres: String,
    /// The schema of the table.
    #[serde(default = "default_store_schema")]
    pub schema: String,
    /// The table, created when missing: one row per job (`id`, `status`, `record` as JSONB).
    #[serde(default = "default_store_table")]
    pub table: String,
}

fn default_store_schema() -> String {
    "public".into()
}
fn default_store_table() -> String {
    "sluice_jobs".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The largest upload, in bytes (413 past it).
    #[serde(default = "default_max_upload")]
    pub max_upload_bytes: u64,
    /// Jobs waiting to run at most (429 past it).
    #[serde(default = "default_max_queued")]
    pub max_queued_jobs: usize,
    /// Jobs running at once; the others wait, in the order they came.
    #[serde(default = "default_max_running")]
    pub max_running_jobs: usize,
    /// Finished jobs kept (the oldest go first, with their uploads and answers).
    #[serde(default = "default_keep_finished")]
    pub keep_finished_jobs: usize,
    /// How long a finished job is kept, in seconds, before it goes with its upload and answers.
    #[serde(default = "default_keep_finished_s")]
    pub keep_finished_s: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_upload_bytes: default_max_upload(),
            max_queued_jobs: default_max_queued(),
            max_running_jobs: default_max_running(),
            keep_finished_jobs: default_keep_finished(),
            keep_finished_s: default_keep_finished_s(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_state() -> PathBuf {
    PathBuf::from("sluice-state")
}
fn default_workers() -> usize {
    2
}
fn default_grace() -> u64 {
    30_000
}
fn default_max_upload() -> u64 {
    1 << 30
}
fn default_max_queued() -> usize {
    1000
}
fn default_max_running() -> usize {
    2
}
fn default_keep_finished() -> usize {
    1000
}
fn default_keep_finished_s() -> u64 {
    7 * 24 * 3600
}
fn default_templates() -> BTreeMap<String, PathBuf> {
    BTreeMap::from([("qa".to_string(), PathBuf::from("topologies/qa_csv.toml")), ("rides".to_string(), PathBuf::from("topologies/rides_generator.toml"))])
}

impl Default for ServeConfig {
    /// The embedded default: the bundled QA and ride models, state in `sluice-state/`.
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl ServeConfig {
    /// Reads and checks a serve config; errors name the file, the field and the fix.
    pub fn load(path: &Path) -> anyhow::Result<ServeConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: cannot read the serve config: {e}", path.display()))?;
        let config: ServeConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        config.check(&path.display().to_string())?;
        Ok(config)
    }

    pub fn check(&self, file: &str) -> anyhow::Result<()> {
        let bad = |field: &str, message: String, hint: &str| anyhow::anyhow!("{file}: field `{field}`: {message}\n  hint: {hint}");
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad("listen", format!("`{}` is not an address", self.listen), "use host:port, e.g. 127.0.0.1:8080"));
        }
        if self.workers == 0 {
            return Err(bad("workers", "must be at least 1".into(), "use the machine's cores, e.g. 2"));
        }
        if !(0..=19).contains(&self.bulk_nice) {
            return Err(bad(
                "bulk_nice",
                format!("{} is not a nice value from 0 to 19", self.bulk_nice),
                "e.g. 10 (bulk work yields to online requests), or 0",
            ));
        }
        if self.limits.max_running_jobs == 0 {
            return Err(bad("limits.max_running_jobs", "must be at least 1".into(), "e.g. 2"));
        }
        if let Some(s) = &self.state_store {
            if s.postgres.trim().is_empty() {
                return Err(bad("state_store.postgres", "is empty".into(), "use postgres://user:password@host:5432/database"));
            }
            for (field, name) in [("state_store.schema", &s.schema), ("state_store.table", &s.table)] {
                if let Err(why) = sluice::sql::check_identifier(name) {
                    return Err(bad(field, why.to_string(), "use 1 to 63 bytes with no NUL or control characters, e.g. sluice_jobs"));
                }
            }
        }
        for (name, t) in &self.templates {
            if !t.is_file() {
                return Err(bad(&format!("templates.{name}"), format!("no file at `{}`", t.display()), "name a topology file, e.g. topologies/qa_csv.toml"));
            }
        }
        for (name, m) in self.models.iter().flatten() {
            let template = m.template.as_deref().unwrap_or(name);
            if !self.templates.contains_key(template) {
                let known: Vec<&str> = self.templates.keys().map(String::as_str).collect();
                return Err(bad(
                    &format!("models.{name}.template"),
                    format!("no template `{template}`"),
                    &format!("name one of the templates: {}", known.join(", ")),
                ));
            }
            if let Some(r) = &m.repository {
                if !r.is_dir() {
                    return Err(bad(
                        &format!("models.{name}.repository"),
                        format!("no folder at `{}`", r.display()),
                        "name a folder with one subfolder per version: 1/, 2/, …",
                    ));
                }
            }
            if m.max_queue == 0 {
                return Err(bad(&format!("models.{name}.max_queue"), "must be at least 1".into(), "e.g. 512"));
            }
        }
        for p in &self.pipelines {
            if !p.is_file() {
                return Err(bad("pipelines", format!("no file at `{}`", p.display()), "name topology files, e.g. [\"topologies/rides_kafka.toml\"]"));
            }
        }
        Ok(())
    }

    /// The models served online: the `models` table, or one per template.
    pub fn served_models(&self) -> BTreeMap<String, ModelConfig> {
        match &self.models {
            Some(m) => m.clone(),
            None => self.templates.keys().map(|t| (t.clone(), ModelConfig::of_template(t))).collect(),
        }
    }

    /// The bearer tokens: `tokens_file`'s lines and `SLUICE_TOKENS`.
    pub fn tokens(&self) -> anyhow::Result<Vec<String>> {
        let mut tokens: Vec<String> =
            std::env::var("SLUICE_TOKENS").unwrap_or_default().split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect();
        if let Some(f) = &self.tokens_file {
            let text = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("cannot read tokens_file {}: {e}", f.display()))?;
            tokens.extend(text.lines().map(str::trim).filter(|t| !t.is_empty() && !t.starts_with('#')).map(String::from));
        }
        Ok(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_serves_the_bundled_models_locally() {
        let c = ServeConfig::default();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.state, PathBuf::from("sluice-state"));
        assert_eq!(c.templates.keys().cloned().collect::<Vec<_>>(), vec!["qa".to_string(), "rides".to_string()]);
        assert_eq!(c.limits.max_upload_bytes, 1 << 30);
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_name() {
        let e = toml::from_str::<ServeConfig>("listne = \"x\"").unwrap_err().to_string();
        assert!(e.contains("listne"), "{e}");
    }
}
