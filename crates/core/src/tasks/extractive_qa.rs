//! `extractive_qa`: tokenize question and context with HF tokenizers, split long contexts into
//! strided windows, run a start/end-logit model, and choose the best span across the windows the
//! way the transformers question-answering pipeline does.

use super::registry::TaskKind;
use super::{Refusal, Task};
use crate::engine::{Installed, JobStart, OnlineStart, Started};
use crate::inference::{InferenceError, Model};
use crate::online::{Loader, OnlineModel};
use crate::record::{Column, ColumnKind, DeadReason, Value};
use crate::runtime::RunError;
use crate::topology::{BatchInvariance, Padding, Provider, Topology};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tokenizers::{Encoding, PostProcessor, Tokenizer, TruncationDirection};

/// A question about a context.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QaRequest {
    pub question: String,
    pub context: String,
}

/// One window of token ids, the unit the model runs on.
pub struct Window {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
}

/// Start and end logits of one window, one per real (unpadded) token.
pub struct WindowLogits {
    pub start: Vec<f32>,
    pub end: Vec<f32>,
}

/// The chosen span: character offsets into the context (Unicode scalar values, as Python counts).
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub answer: String,
    pub start: usize,
    pub end: usize,
    pub score: f64,
}

/// Settings of the task.
#[derive(Clone, Debug)]
pub struct QaSettings {
    pub max_seq_len: usize,
    pub doc_stride: usize,
    pub max_answer_len: usize,
}

/// The extractive QA task.
pub struct ExtractiveQa {
    tokenizer: Tokenizer,
    settings: QaSettings,
    cls_id: Option<u32>,
    label: String,
    /// Special tokens the post-processor adds around a question/context pair.
    added_tokens: usize,
}

const COLUMNS: &[Column] = &[
    Column { name: "answer", kind: ColumnKind::Text },
    Column { name: "start_char", kind: ColumnKind::Int },
    Column { name: "end_char", kind: ColumnKind::Int },
    Column { name: "score", kind: ColumnKind::Float },
];

impl ExtractiveQa {
    /// Loads the tokenizer and sets its truncation to strided windows.
    pub fn new(tokenizer_path: &Path, settings: QaSettings, label: String) -> Result<Self, InferenceError> {
        let refuse = |reason: String| InferenceError::Load { path: tokenizer_path.to_path_buf(), reason };
        let mut tokenizer = Tokenizer::from_file(tokenizer_path).map_err(|e| refuse(format!("cannot load tokenizer {}: {e}", tokenizer_path.display())))?;
        // Windows are cut by `windows`; the tokenizer itself must neither truncate nor pad.
        tokenizer.with_truncation(None).map_err(|e| refuse(format!("cannot clear truncation: {e}")))?;
        tokenizer.with_padding(None);
        let added_tokens = tokenizer.get_post_processor().map(|p| p.added_tokens(true)).unwrap_or(0);
        let cls_id = ["[CLS]", "<s>", "<cls>"].iter().find_map(|t| tokenizer.token_to_id(t));
        Ok(ExtractiveQa { tokenizer, settings, cls_id, label, added_tokens })
    }

    /// Tokenizes into windows: the question with the first `max_seq_len` tokens' worth of context,
    /// then further windows that each overlap the previous one by `doc_stride` context tokens, in
    /// the order transformers uses. The windows are cut here rather than by the tokenizer's own
    /// overflow, which in tokenizers 0.23.2 drops the last tokens of a long context.
    pub fn windows(&self, request: &QaRequest) -> Result<Vec<Encoding>, Refusal> {
        let fail = |e: tokenizers::Error| (DeadReason::QuestionTooLong, format!("cannot tokenize: {e}"));
        let question = self.tokenizer.encode_char_offsets(request.question.as_str(), false).map_err(fail)?;
        let mut context = self.tokenizer.encode_char_offsets(request.context.as_str(), false).map_err(fail)?;
        let budget = self.settings.max_seq_len.saturating_sub(self.added_tokens + question.len());
        if budget <= self.settings.doc_stride {
            return Err((
                DeadReason::QuestionTooLong,
                format!(
                    "the question takes {} of the {} tokens per window, leaving {budget} for context, not more than doc_stride {}",
                    question.len(),
                    self.settings.max_seq_len,
                    self.settings.doc_stride
                ),
            ));
        }
        context.truncate(budget, self.settings.doc_stride, TruncationDirection::Right);
        let rest = std::mem::take(context.get_overflowing_mut());
        std::iter::once(context).chain(rest).map(|piece| self.tokenizer.post_process(question.clone(), Some(piece), true).map_err(fail)).collect()
    }

    /// Picks the best span across windows, as the transformers pipeline does (top_k = 1,
    /// handle_impossible_answer = false, align_to_words = true).
    pub fn best_span(&self, context: &str, windows: &[Encoding], logits: &[WindowLogits]) -> Option<Span> {
        let mut best: Option<(f64, &Encoding, usize, usize)> = None;
        for (enc, lg) in windows.iter().zip(logits) {
            if let Some((s, e, score)) = select_span(enc, lg, self.cls_id, self.settings.max_answer_len) {
                if best.as_ref().is_none_or(|b| score > b.0) {
                    best = Some((score, enc, s, e));
                }
            }
        }
        let (score, enc, s, e) = best?;
        let (start, end) = span_chars(enc, s, e);
        let answer: String = context.chars().skip(start).take(end.saturating_sub(start)).collect();
        Some(Span { answer, start, end, score })
    }
}

/// The transformers pipeline's `select_starts_ends` + `decode_spans` for one window: mask
/// non-context tokens (keeping CLS), softmax each of start and end, zero the first token, and take
/// the highest `p(start) * p(end)` with `start <= end < start + max_answer_len`.
pub fn select_span(enc: &Encoding, lg: &WindowLogits, cls_id: Option<u32>, max_answer_len: usize) -> Option<(usize, usize, f64)> {
    let n = lg.start.len().min(enc.len());
    if n == 0 {
        return None;
    }
    let seq = enc.get_sequence_ids();
    let ids = enc.get_ids();
    let desired: Vec<bool> = (0..n).map(|i| seq[i] == Some(1) || Some(ids[i]) == cls_id).collect();
    let probs = |logits: &[f32]| -> Vec<f32> {
        let masked: Vec<f32> = (0..n).map(|i| if desired[i] { logits[i] } else { -10000.0 }).collect();
        let max = masked.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f32> = masked.iter().map(|x| (x - max).exp()).collect();
        let sum: f32 = pairwise_sum(&exps);
        exps.iter().map(|x| x / sum).collect()
    };
    let mut p_start = probs(&lg.start);
    let mut p_end = probs(&lg.end);
    p_start[0] = 0.0;
    p_end[0] = 0.0;
    let mut best = (0usize, 0usize, f32::NEG_INFINITY);
    for (s, ps) in p_start.iter().enumerate() {
        let last = (s + max_answer_len).min(n);
        for (e, pe) in p_end.iter().enumerate().take(last).skip(s) {
            let score = ps * pe;
            if score > best.2 {
                best = (s, e, score);
            }
        }
    }
    let (s, e, score) = best;
    if desired[s] && desired[e] {
        Some((s, e, score as f64))
    } else {
        None
    }
}

/// numpy's pairwise summation for float32, so sums match the Python reference bit for bit where possible.
fn pairwise_sum(x: &[f32]) -> f32 {
    if x.len() < 8 {
        let mut s = 0.0f32;
        for v in x {
            s += v;
        }
        return s;
    }
    if x.len() <= 128 {
        let mut r = [0.0f32; 8];
        r.copy_from_slice(&x[..8]);
        let mut i = 8;
        while i + 8 <= x.len() {
            for j in 0..8 {
                r[j] += x[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < x.len() {
            res += x[i];
            i += 1;
        }
        return res;
    }
    let mut half = x.len() / 2;
    half -= half % 8;
    pairwise_sum(&x[..half]) + pairwise_sum(&x[half..])
}

/// Character offsets of tokens `s..=e`, widened to whole words as the pipeline's `align_to_words` does.
fn span_chars(enc: &Encoding, s: usize, e: usize) -> (usize, usize) {
    let offsets = enc.get_offsets();
    let word_span = |t: usize| enc.token_to_word(t).and_then(|(seq, w)| enc.word_to_chars(w, seq));
    match (word_span(s), word_span(e)) {
        (Some(ws), Some(we)) => (ws.0, we.1),
        _ => (offsets[s].0, offsets[e].1),
    }
}

impl Task for ExtractiveQa {
    type Request = QaRequest;
    type Model = QaModel;
    type Prepared = Vec<Encoding>;
    type Units = Vec<Window>;

    fn output_columns(&self) -> &'static [Column] {
        COLUMNS
    }

    fn model_label(&self) -> &str {
        &self.label
    }

    fn decode_fields(&self, fields: &[(&str, &str)]) -> Result<(QaRequest, Vec<(String, String)>), Refusal> {
        let get = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let question = get("question").ok_or((DeadReason::MissingColumn, "no `question` column".to_string()))?;
        let context = get("context").ok_or((DeadReason::MissingColumn, "no `context` column".to_string()))?;
        if question.trim().is_empty() {
            return Err((DeadReason::EmptyField, "`question` is empty".into()));
        }
        if context.trim().is_empty() {
            return Err((DeadReason::EmptyField, "`context` is empty".into()));
        }
        let passthrough = fields
            .iter()
            .filter(|(k, _)| !matches!(*k, "question" | "context" | "id"))
            // Names that clash with sluice's own are renamed by the decode stage, for every task.
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok((QaRequest { question: question.to_string(), context: context.to_string() }, passthrough))
    }

    fn prepare(&self, request: &QaRequest) -> Result<(Vec<Encoding>, Vec<Window>), Refusal> {
        let windows = self.windows(request)?;
        let units = windows
            .iter()
            .map(|w| Window { ids: w.get_ids().iter().map(|&i| i as i64).collect(), type_ids: w.get_type_ids().iter().map(|&i| i as i64).collect() })
            .collect();
        Ok((windows, units))
    }

    fn finish(&self, request: &QaRequest, windows: Vec<Encoding>, outs: &[WindowLogits]) -> Vec<Value> {
        match self.best_span(&request.context, &windows, outs) {
            Some(span) => vec![Value::Text(span.answer), Value::Int(span.start as i64), Value::Int(span.end as i64), Value::Float(span.score)],
            None => vec![Value::Text(String::new()), Value::Int(0), Value::Int(0), Value::Float(0.0)],
        }
    }

    fn online_inputs(&self) -> Vec<crate::online::InputInfo> {
        ["question", "context"].iter().map(|n| crate::online::InputInfo { name: n.to_string(), datatype: "BYTES" }).collect()
    }

    fn probe_fields(&self) -> Vec<(String, String)> {
        vec![("question".into(), "What is checked?".into()), ("context".into(), "A new model version is checked before it serves.".into())]
    }

    /// Every QA model is loaded against the task's inputs and outputs (ids, mask, type ids;
    /// start and end logits), so one that loads fits.
    fn accepts(&self, _model: &QaModel) -> Result<(), String> {
        Ok(())
    }
}

/// How a batch's tensors are shaped: how far rows are padded, and whether the row count is.
#[derive(Clone, Copy, Debug)]
pub struct QaShapes {
    pub padding: Padding,
    /// The step of `Padding::Bucket`, in tokens.
    pub pad_multiple: usize,
    /// Pad the row count up to a power of two.
    pub pad_rows: bool,
    pub max_seq_len: usize,
}

impl QaShapes {
    /// Tokens per row of a batch whose longest unit has `longest` tokens. A bucket never pads past
    /// `max_seq_len` (no window is longer), so a model sees at most `max_seq_len / pad_multiple`
    /// widths.
    pub fn width(&self, longest: usize) -> usize {
        match self.padding {
            Padding::Longest => longest,
            Padding::Max => self.max_seq_len.max(longest),
            Padding::Bucket => {
                let step = self.pad_multiple.max(1);
                (longest.div_ceil(step) * step).min(self.max_seq_len.max(longest))
            }
        }
    }

    /// Rows of the tensors for a batch of `units` units.
    pub fn rows(&self, units: usize) -> usize {
        if self.pad_rows {
            units.next_power_of_two()
        } else {
            units
        }
    }
}

/// The ONNX start/end-logit model.
pub struct QaModel {
    session: ort::session::Session,
    has_type_ids: bool,
    shapes: QaShapes,
    pad_id: i64,
    invariant: bool,
    provider: Provider,
}

impl QaModel {
    /// Opens the model on the configured provider (`crate::execution`) and checks its inputs
    /// and outputs.
    /// `shapes` gives the tensor shapes for the provider the session ended up on (the CPU's when a
    /// CUDA run fell back).
    pub fn load(path: &Path, shapes: impl Fn(Provider) -> QaShapes, invariant: bool, exec: &crate::topology::ExecutionConfig) -> Result<Self, InferenceError> {
        let refuse = |reason: String| InferenceError::Load { path: path.to_path_buf(), reason };
        // QA models are heavy: ONNX Runtime's default pool (one thread per core, spinning).
        let tuning = crate::execution::Tuning { default_intra_threads: 0, spinning: true };
        let opened = crate::execution::open(path, exec, tuning)?;
        let (session, provider) = (opened.session, opened.provider);
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for need in ["input_ids", "attention_mask"] {
            if !inputs.contains(&need) {
                return Err(refuse(format!("model {} has no `{need}` input (it has {inputs:?}); export a QA model with Hugging Face Optimum", path.display())));
            }
        }
        for need in ["start_logits", "end_logits"] {
            if !outputs.contains(&need) {
                return Err(refuse(format!(
                    "model {} has no `{need}` output (it has {outputs:?}); export a QA model with Hugging Face Optimum",
                    path.display()
                )));
            }
        }
        let has_type_ids = inputs.contains(&"token_type_ids");
        Ok(QaModel { session, has_type_ids, shapes: shapes(provider), pad_id: 0, invariant, provider })
    }

    /// Where the model runs.
    pub fn provider(&self) -> Provider {
        self.provider
    }
}

/// The `extractive_qa` task as the topology configures it (see [`super::registry`]).
pub struct QaKind<'a> {
    pub model: &'a Path,
    pub tokenizer: &'a Path,
    pub settings: QaSettings,
    pub model_name: &'a Option<String>,
}

impl TaskKind for QaKind<'_> {
    fn kind(&self) -> &'static str {
        "extractive_qa"
    }

    fn required_columns(&self) -> Vec<String> {
        vec!["question".into(), "context".into()]
    }

    fn check(&self, topology: &Topology) -> Result<Vec<String>, InferenceError> {
        let shapes = |provider| crate::runtime::qa_shapes(topology, provider, self.settings.max_seq_len);
        let loaded = QaModel::load(self.model, shapes, true, &topology.execution)?;
        let model = format!("model {}: ok on {}", self.model.display(), loaded.provider().name());
        ExtractiveQa::new(self.tokenizer, self.settings.clone(), String::new())?;
        Ok(vec![model, format!("tokenizer {}: ok", self.tokenizer.display())])
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

impl QaKind<'_> {
    /// Opens one model per model thread from a model file, as this topology runs it.
    fn loader(&self, topology: &Topology) -> Loader<QaModel> {
        let invariant = match topology.batching.batch_invariant {
            BatchInvariance::Auto => !super::uses_dynamic_quantization(self.model),
            BatchInvariance::Yes => true,
            BatchInvariance::No => false,
        };
        if !invariant {
            tracing::info!("{} uses dynamic quantization: running one window per model call so answers do not depend on batch-mates", self.model.display());
        }
        let (topology, max_seq_len) = (topology.clone(), self.settings.max_seq_len);
        Arc::new(move |path: &Path| {
            let exec = &topology.execution;
            let shapes = |provider| crate::runtime::qa_shapes(&topology, provider, max_seq_len);
            crate::runtime::open_models(exec, || QaModel::load(path, shapes, invariant, exec), QaModel::provider)
        })
    }

    /// Starts the model service: the task (with its tokenizer), its models, and their threads.
    fn service(&self, topology: &Topology) -> Result<Started<ExtractiveQa>, RunError> {
        let label = super::model_label(&crate::runtime::model_name_or_folder(self.model_name, self.model), self.model)?;
        let task = Arc::new(ExtractiveQa::new(self.tokenizer, self.settings.clone(), label)?);
        let models = self.loader(topology)(self.model)?;
        let (handle, joins) = crate::inference::start(models, crate::runtime::policy(topology), Arc::from(task.model_label()))?;
        Ok((task, handle, joins))
    }
}

impl Model for QaModel {
    type Unit = Window;
    type Out = WindowLogits;

    fn cost(unit: &Window) -> usize {
        unit.ids.len()
    }

    fn batch_invariant(&self) -> bool {
        self.invariant
    }

    fn run(&mut self, units: &[&Window]) -> Result<Vec<WindowLogits>, InferenceError> {
        use ort::value::Tensor;
        let longest = units.iter().map(|u| u.ids.len()).max().unwrap_or(0);
        let width = self.shapes.width(longest);
        let b = self.shapes.rows(units.len());
        let mut ids = vec![self.pad_id; b * width];
        let mut mask = vec![0i64; b * width];
        let mut types = vec![0i64; b * width];
        for (r, u) in units.iter().enumerate() {
            let row = r * width;
            ids[row..row + u.ids.len()].copy_from_slice(&u.ids);
            mask[row..row + u.ids.len()].fill(1);
            types[row..row + u.type_ids.len()].copy_from_slice(&u.type_ids);
        }
        // Padding rows attend to one token, so no row is wholly masked; their outputs are dropped.
        for r in units.len()..b {
            mask[r * width] = 1;
        }
        let shape = vec![b as i64, width as i64];
        let t = |v: Vec<i64>| Tensor::from_array((shape.clone(), v)).map_err(|e| InferenceError::Input(format!("cannot build input tensor: {e}")));
        let outputs = if self.has_type_ids {
            self.session.run(ort::inputs!["input_ids" => t(ids)?, "attention_mask" => t(mask)?, "token_type_ids" => t(types)?])
        } else {
            self.session.run(ort::inputs!["input_ids" => t(ids)?, "attention_mask" => t(mask)?])
        }
        .map_err(|e| InferenceError::Run(format!("model run failed: {e}")))?;
        let (_, start) = outputs["start_logits"].try_extract_tensor::<f32>().map_err(|e| InferenceError::Run(format!("bad start_logits: {e}")))?;
        let (_, end) = outputs["end_logits"].try_extract_tensor::<f32>().map_err(|e| InferenceError::Run(format!("bad end_logits: {e}")))?;
        Ok(units
            .iter()
            .enumerate()
            .map(|(r, u)| WindowLogits { start: start[r * width..r * width + u.ids.len()].to_vec(), end: end[r * width..r * width + u.ids.len()].to_vec() })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(max_seq_len: usize, doc_stride: usize, max_answer_len: usize) -> ExtractiveQa {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/minilm-squad/tokenizer.json");
        ExtractiveQa::new(&path, QaSettings { max_seq_len, doc_stride, max_answer_len }, "t@0".into()).unwrap()
    }

    fn request(words: usize) -> QaRequest {
        let context: Vec<String> = (0..words).map(|i| format!("w{i}")).collect();
        QaRequest { question: "Which word comes last?".into(), context: context.join(" ") }
    }

    fn context_ids(w: &Encoding) -> Vec<u32> {
        let seq = w.get_sequence_ids();
        w.get_ids().iter().zip(seq).filter(|(_, s)| *s == Some(1)).map(|(i, _)| *i).collect()
    }

    #[test]
    fn windows_cover_the_whole_context_with_the_configured_overlap() {
        let t = task(64, 16, 30);
        let req = request(120);
        let windows = t.windows(&req).unwrap();
        assert!(windows.len() > 3, "a long context needs several windows");
        let full = t.tokenizer.encode_char_offsets(req.context.as_str(), false).unwrap();
        let all: Vec<u32> = full.get_ids().to_vec();
        let mut covered = Vec::new();
        for (i, w) in windows.iter().enumerate() {
            assert!(w.len() <= 64, "window {i} has {} tokens", w.len());
            let ids = context_ids(w);
            if i > 0 {
                assert_eq!(&covered[covered.len() - 16..], &ids[..16], "window {i} overlaps the previous one by doc_stride tokens");
                covered.extend_from_slice(&ids[16..]);
            } else {
                covered.extend_from_slice(&ids);
            }
        }
        assert_eq!(covered, all, "every context token is in some window, the last one included");
    }

    #[test]
    fn a_question_that_leaves_no_room_is_refused() {
        let t = task(32, 16, 30);
        let req = QaRequest { question: "why ".repeat(30), context: "short".into() };
        assert_eq!(t.windows(&req).unwrap_err().0, DeadReason::QuestionTooLong);
    }

    fn logits_with_peaks(n: usize, start: usize, end: usize) -> WindowLogits {
        let mut s = vec![0.0f32; n];
        let mut e = vec![0.0f32; n];
        s[start] = 8.0;
        e[end] = 8.0;
        WindowLogits { start: s, end: e }
    }

    #[test]
    fn span_selection_picks_the_peak_and_maps_to_characters() {
        let t = task(384, 128, 30);
        let req = QaRequest { question: "Who wrote it?".into(), context: "It was written by Ada Lovelace in 1843.".into() };
        let windows = t.windows(&req).unwrap();
        let w = &windows[0];
        let pos = |tok: &str| w.get_tokens().iter().position(|t| t == tok).unwrap();
        let (s, e) = (pos("ada"), pos("##lace"));
        let span = t.best_span(&req.context, &windows, &[logits_with_peaks(w.len(), s, e)]).unwrap();
        assert_eq!(span.answer, "Ada Lovelace");
        assert_eq!((span.start, span.end), (18, 30));
        assert!(span.score > 0.5 && span.score <= 1.0);
    }

    #[test]
    fn span_selection_never_answers_from_the_question_and_respects_max_answer_len() {
        let t = task(384, 128, 3);
        let req = QaRequest { question: "Who wrote it?".into(), context: "It was written by Ada Lovelace in 1843.".into() };
        let windows = t.windows(&req).unwrap();
        let w = &windows[0];
        // The strongest start is a question token: it is masked out.
        let q = w.get_tokens().iter().position(|t| t == "wrote").unwrap();
        let (s, e, _) = select_span(w, &logits_with_peaks(w.len(), q, q), t.cls_id, 3).unwrap();
        assert_eq!(w.get_sequence_ids()[s], Some(1));
        assert_eq!(w.get_sequence_ids()[e], Some(1));
        // Start and end peaks further apart than max_answer_len cannot both be used.
        let first = w.get_tokens().iter().position(|t| t == "it").unwrap();
        let last = w.get_tokens().iter().position(|t| t == "1843").unwrap();
        let (s, e, _) = select_span(w, &logits_with_peaks(w.len(), first, last), t.cls_id, 3).unwrap();
        assert!(e - s < 3, "span {s}..{e} is longer than max_answer_len");
    }

    #[test]
    fn the_window_with_the_best_span_wins() {
        let t = task(64, 16, 30);
        let req = request(120);
        let windows = t.windows(&req).unwrap();
        let flat: Vec<WindowLogits> = windows.iter().map(|w| WindowLogits { start: vec![0.0; w.len()], end: vec![0.0; w.len()] }).collect();
        let mut peaked = flat;
        let last = windows.len() - 1;
        let n = windows[last].len();
        peaked[last] = logits_with_peaks(n, n - 2, n - 2);
        let best = t.best_span(&req.context, &windows, &peaked).unwrap();
        assert_eq!(best.answer, "w119", "the peak in the last window wins");
    }

    #[test]
    fn bucket_padding_rounds_up_to_the_step_and_never_past_the_window() {
        let shapes = QaShapes { padding: Padding::Bucket, pad_multiple: 64, pad_rows: true, max_seq_len: 384 };
        let widths: Vec<usize> = [1, 63, 64, 65, 163, 320, 321, 384].iter().map(|l| shapes.width(*l)).collect();
        assert_eq!(widths, vec![64, 64, 64, 128, 192, 320, 384, 384]);
        let distinct: std::collections::BTreeSet<usize> = (1..=384).map(|l| shapes.width(l)).collect();
        assert_eq!(distinct.len(), 6, "384 / 64 widths in all");
        let odd = QaShapes { max_seq_len: 200, ..shapes };
        assert_eq!(odd.width(199), 200, "capped at max_seq_len, not rounded past it");
        let rows: Vec<usize> = [1, 2, 3, 5, 128, 129, 256].iter().map(|n| shapes.rows(*n)).collect();
        assert_eq!(rows, vec![1, 2, 4, 8, 128, 256, 256]);
        let cpu = QaShapes { padding: Padding::Longest, pad_rows: false, ..shapes };
        assert_eq!((cpu.width(163), cpu.rows(5)), (163, 5));
        assert_eq!(QaShapes { padding: Padding::Max, ..cpu }.width(163), 384);
    }
}
