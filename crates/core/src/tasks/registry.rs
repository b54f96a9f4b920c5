//! The task registry: the one place that knows every task. A topology's `[task]` table (a
//! [`TaskConfig`]) becomes its task's [`TaskKind`], which says its `type` name, the columns an
//! input file must have, what `sluice check` loads and reports, and how a job on it starts (its
//! model service and dataflow). Everything else asks [`TaskConfig`]'s methods here. A new task is
//! one module under `tasks/` (its [`Task`](super::Task) and its [`TaskKind`]), its variant of
//! [`TaskConfig`] (the topology file's fields), and one line in `kind_of` here.

use super::extractive_qa::{QaKind, QaSettings};
use super::tabular::TabularKind;
use crate::engine::{Installed, JobStart, OnlineStart};
use crate::inference::InferenceError;
use crate::online::OnlineModel;
use crate::runtime::RunError;
use crate::topology::{TaskConfig, Topology};
use std::sync::Arc;

/// What the engine, the CLI and the server need of a task, apart from running it.
pub trait TaskKind {
    /// The task's `type` in the topology file, e.g. `extractive_qa`.
    fn kind(&self) -> &'static str;

    /// The columns every input file must have; empty when the task checks each row itself (a
    /// row that lacks a field is a dead letter).
    fn required_columns(&self) -> Vec<String>;

    /// Loads the model (and whatever else the task needs, e.g. a tokenizer) as a run would, and
    /// says what was checked, one line each, for `sluice check`.
    fn check(&self, topology: &Topology) -> Result<Vec<String>, InferenceError>;

    /// Starts a job on this task: builds the task and starts its model service (through
    /// [`JobStart::install`], which shares a running one), and prepares the job's dataflow.
    fn start(&self, job: JobStart<'_>) -> Result<Installed, RunError>;

    /// Serves this task's model online: its model service (through [`OnlineStart::serve`],
    /// which shares the one the jobs on the same model and settings use) and a loader for new
    /// versions of its model file.
    fn online(&self, start: OnlineStart<'_>) -> Result<Arc<dyn OnlineModel>, RunError>;
}

/// The task a topology's `[task]` table configures: one line per task.
fn kind_of(config: &TaskConfig) -> Box<dyn TaskKind + '_> {
    match config {
        TaskConfig::ExtractiveQa { model, tokenizer, max_seq_len, doc_stride, max_answer_len, model_name } => Box::new(QaKind {
            model,
            tokenizer,
            settings: QaSettings { max_seq_len: *max_seq_len, doc_stride: *doc_stride, max_answer_len: *max_answer_len },
            model_name,
        }),
        TaskConfig::Tabular { model, output, model_name } => Box::new(TabularKind { model, output, model_name }),
    }
}

impl TaskConfig {
    /// The task's `type` in the topology file, e.g. `extractive_qa`.
    pub fn kind(&self) -> &'static str {
        kind_of(self).kind()
    }

    /// The columns every input file must have (`question` and `context` for extractive QA);
    /// empty for a task that checks each row itself (tabular: a row without a feature is a dead
    /// letter).
    pub fn required_columns(&self) -> Vec<String> {
        kind_of(self).required_columns()
    }

    /// Loads the model (and tokenizer) as `topology` would run it: the lines `sluice check`
    /// prints, e.g. `model {path}: ok on {provider}`.
    pub fn check(&self, topology: &Topology) -> Result<Vec<String>, InferenceError> {
        kind_of(self).check(topology)
    }

    /// Starts a job on this task (its model service, shared with other jobs on the same model
    /// and settings, and its dataflow). Called by [`Engine::submit`](crate::engine::Engine::submit).
    pub fn start(&self, job: JobStart<'_>) -> Result<Installed, RunError> {
        kind_of(self).start(job)
    }

    /// Serves this task's model online, sharing its model service with the jobs on it. Called
    /// by [`Engine::online`](crate::engine::Engine::online).
    pub fn online(&self, start: OnlineStart<'_>) -> Result<Arc<dyn OnlineModel>, RunError> {
        kind_of(self).online(start)
    }

    /// The model file the task runs.
    pub fn model(&self) -> &std::path::Path {
        match self {
            TaskConfig::ExtractiveQa { model, .. } | TaskConfig::Tabular { model, .. } => model,
        }
    }

    /// Runs the task on another model file (a version from a model repository).
    pub fn set_model(&mut self, path: std::path::PathBuf) {
        match self {
            TaskConfig::ExtractiveQa { model, .. } | TaskConfig::Tabular { model, .. } => *model = path,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::topology::TaskConfig;

    #[test]
    fn a_tasks_kind_is_its_type_in_the_topology_file() {
        for text in ["type = \"extractive_qa\"\nmodel = \"m.onnx\"\ntokenizer = \"t.json\"", "type = \"tabular\"\nmodel = \"m.onnx\""] {
            let config: TaskConfig = toml::from_str(text).unwrap();
            let kind = config.kind();
            assert!(text.starts_with(&format!("type = \"{kind}\"")), "{kind} for {text}");
        }
    }

    #[test]
    fn qa_files_need_a_question_and_a_context_and_tabular_rows_are_checked_one_by_one() {
        let qa: TaskConfig = toml::from_str("type = \"extractive_qa\"\nmodel = \"m.onnx\"\ntokenizer = \"t.json\"").unwrap();
        assert_eq!(qa.required_columns(), vec!["question".to_string(), "context".to_string()]);
        let tabular: TaskConfig = toml::from_str("type = \"tabular\"\nmodel = \"m.onnx\"").unwrap();
        assert!(tabular.required_columns().is_empty());
    }
}
