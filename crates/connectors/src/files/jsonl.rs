//! The JSON-lines sink, the embedded default: each worker appends its changes to
//! `answers.w<worker>.jsonl` (an `"op": "upsert"` line with the answer, or an `"op": "delete"`
//! line with the ID; the last line of an ID is its state) and its dead letters to
//! `dead_letters.w<worker>.jsonl`, synced per write. For a source that resumes (Kafka), each
//! write then atomically replaces `checkpoint.w<worker>.json`, which holds the sources'
//! checkpoints and the length of both files: a restart cuts the files back to those lengths
//! and resumes the source from there, so answers are neither lost nor written twice. A long
//! checkpoint (a file source's manifest) lives in a side file named by its content, written
//! before the checkpoint file that names it. For a source that reads everything again (one-shot
//! CSV), a run starts the files afresh. A folder holds one pipeline's answers: the first to
//! write there records its name in `sluice-pipeline`, and another pipeline is refused at start-up.

use base64::Engine;
use serde::{Deserialize, Serialize};
use sluice_core::connector::SinkConnector;
use sluice_core::record::{Answer, Change, Column, DeadLetter};
use sluice_core::sink::{EpochBatch, SinkContext, SinkError, SinkFactory, SinkWriter};
use sluice_core::source::Checkpoint;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `[[sinks]] type = "jsonl"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// Output folder; created if missing.
    pub dir: PathBuf,
}

/// What `checkpoint.w<worker>.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CheckpointFile {
    answers_len: u64,
    dead_len: u64,
    /// Per scope and shard: the position and when it was written (ms), so that the newest wins
    /// when several workers' files name the same shard (after the worker count changed).
    checkpoints: Vec<(Checkpoint, u64)>,
}

fn answers_file(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("answers.w{worker}.jsonl"))
}
fn dead_file(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("dead_letters.w{worker}.jsonl"))
}
fn checkpoint_file(dir: &Path, worker: usize) -> PathBuf {
    dir.join(format!("checkpoint.w{worker}.json"))
}

/// A position longer than this is kept in a file of its own (a file source's manifest), so
/// that the checkpoint file rewritten every epoch stays small; the checkpoint file holds
/// `@side:<name>` instead.
const SIDE_FILE_OVER: usize = 4096;
const SIDE_REF: &str = "@side:";

/// The side file of a long position: named by its content, so an unchanged one is not rewritten.
fn side_name(worker: usize, position: &str) -> String {
    format!("checkpoint.w{worker}.{:032x}.pos", twox_hash::XxHash3_128::oneshot(position.as_bytes()))
}

/// A stored position, with a side-file reference replaced by the file's contents.
fn resolve(dir: &Path, position: String) -> Result<String, SinkError> {
    match position.strip_prefix(SIDE_REF) {
        None => Ok(position),
        Some(name) => std::fs::read_to_string(dir.join(name)).map_err(|e| {
            SinkError::Config(format!(
                "cannot read {} that a checkpoint names ({e}); move the folder's checkpoint files away to start afresh",
                dir.join(name).display()
            ))
        }),
    }
}

fn read_checkpoint(path: &Path) -> Result<Option<CheckpointFile>, SinkError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SinkError::Config(format!("{} is not a sluice checkpoint file ({e}); move it away to start afresh", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SinkError::Transient(format!("cannot read {}: {e}", path.display()))),
    }
}

/// The file naming the pipeline whose answers a folder holds.
pub const OWNER_FILE: &str = "sluice-pipeline";

/// Makes `pipeline` the owner of `dir`'s answers, or refuses when another pipeline owns them:
/// its files would be replaced, its deletes would apply to the other's answers, and a one-shot
/// run would start them afresh. A folder from before owners were recorded is claimed.
fn claim(dir: &Path, pipeline: &str) -> Result<(), SinkError> {
    let path = dir.join(OWNER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(owner) if owner.trim_end() == pipeline => Ok(()),
        Ok(owner) => Err(SinkError::Config(format!(
            "{} holds the answers of pipeline `{}`, so pipeline `{pipeline}` cannot write there\n  hint: give this pipeline its own sinks.dir, or delete {} if pipeline `{}` and its answers are gone",
            dir.display(),
            owner.trim_end(),
            path.display(),
            owner.trim_end()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A temporary file of this writer's own: the processes of a cluster (and its workers)
            // claim the folder at the same time, and with one shared name one's rename could
            // publish the file the other had just truncated, or find it gone.
            let unique = format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
            let tmp = dir.join(format!("{OWNER_FILE}.{unique}.tmp"));
            std::fs::write(&tmp, format!("{pipeline}\n"))
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| SinkError::Config(format!("cannot write {}: {e}", path.display())))
        }
        Err(e) => Err(SinkError::Config(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Cuts `path` back to `len` bytes (a missing file is fine).
fn cut_to(path: &Path, len: u64) -> Result<(), SinkError> {
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => {
            if f.metadata().map(|m| m.len() > len).unwrap_or(false) {
                tracing::info!("{}: cutting back to {len} bytes, the length its checkpoint covers", path.display());
                f.set_len(len).and_then(|_| f.sync_all()).map_err(|e| SinkError::Transient(format!("cannot cut {}: {e}", path.display())))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SinkError::Transient(format!("cannot open {}: {e}", path.display()))),
    }
}

impl SinkFactory for JsonlConfig {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    fn describe(&self) -> String {
        format!("{}/", self.dir.display())
    }

    fn open(&self, ctx: &SinkContext) -> Result<Option<Vec<Checkpoint>>, SinkError> {
        let dir = &self.dir;
        std::fs::create_dir_all(dir).map_err(|e| SinkError::Config(format!("cannot create {}: {e}", dir.display())))?;
        claim(dir, &ctx.pipeline)?;
        if !ctx.resumable {
            // The source reads everything again: this process's workers start their files afresh.
            for w in ctx.workers.clone() {
                for f in [answers_file(dir, w), dead_file(dir, w), checkpoint_file(dir, w)] {
                    let _ = std::fs::remove_file(f);
                }
            }
            return Ok(None);
        }
        for w in ctx.workers.clone() {
            let cp = read_checkpoint(&checkpoint_file(dir, w))?.unwrap_or_default();
            cut_to(&answers_file(dir, w), cp.answers_len)?;
            cut_to(&dead_file(dir, w), cp.dead_len)?;
        }
        // Every worker's file (another process's too): per shard, the newest position.
        let mut newest: BTreeMap<(String, String), (String, u64)> = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| SinkError::Transient(format!("cannot list {}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !(name.starts_with("checkpoint.w") && name.ends_with(".json")) {
                continue;
            }
            for (c, at) in read_checkpoint(&entry.path())?.unwrap_or_default().checkpoints {
                let key = (c.scope, c.shard);
                if newest.get(&key).is_none_or(|(_, t)| *t <= at) {
                    newest.insert(key, (c.position, at));
                }
            }
        }
        newest
            .into_iter()
            .map(|((scope, shard), (position, _))| Ok(Checkpoint { scope, shard, position: resolve(dir, position)? }))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn writer(&self, ctx: &SinkContext, worker: usize) -> Result<Box<dyn SinkWriter>, SinkError> {
        Ok(Box::new(JsonlWriter::open(&self.dir, worker, ctx.columns, ctx.resumable)?))
    }
}

/// Writes JSON lines into a folder.
pub struct JsonlWriter {
    dir: PathBuf,
    worker: usize,
    answers: File,
    dead: File,
    columns: &'static [Column],
    resumable: bool,
    checkpoints: BTreeMap<(String, String), (String, u64)>,
    /// Tests: the step after the checkpoint file is renamed into place fails once.
    #[cfg(test)]
    fail_after_rename: bool,
}

impl JsonlWriter {
    /// Opens (appending) this worker's files in `dir`.
    pub fn open(dir: &Path, worker: usize, columns: &'static [Column], resumable: bool) -> Result<Self, SinkError> {
        std::fs::create_dir_all(dir).map_err(|e| SinkError::Config(format!("cannot create {}: {e}", dir.display())))?;
        let open = |path: PathBuf| {
            OpenOptions::new().create(true).append(true).open(&path).map_err(|e| SinkError::Config(format!("cannot open {}: {e}", path.display())))
        };
        let mut checkpoints = BTreeMap::new();
        if resumable {
            for (c, at) in read_checkpoint(&checkpoint_file(dir, worker))?.unwrap_or_default().checkpoints {
                checkpoints.insert((c.scope, c.shard), (c.position, at));
            }
        }
        Ok(JsonlWriter {
            dir: dir.to_path_buf(),
            worker,
            answers: open(answers_file(dir, worker))?,
            dead: open(dead_file(dir, worker))?,
            columns,
            resumable,
            checkpoints,
            #[cfg(test)]
            fail_after_rename: false,
        })
    }

    /// Replaces the checkpoint file atomically: write a temporary file, sync it, rename it. An
    /// error before the rename leaves the old checkpoint in place (`Replaced::No`); once the
    /// rename is done the new one names this batch's lines (`Replaced::Yes`), so they must stay.
    fn store_checkpoint(&mut self, batch: &EpochBatch) -> Result<(), (Replaced, std::io::Error)> {
        let mut checkpoints = self.checkpoints.clone();
        self.write_checkpoint(batch, &mut checkpoints).map_err(|e| (Replaced::No, e))?;
        // In place: the checkpoint on disk names this batch.
        self.checkpoints = checkpoints;
        self.after_rename().map_err(|e| (Replaced::Yes, e))
    }

    /// Writes and renames the checkpoint file with `checkpoints` updated by the batch's.
    fn write_checkpoint(&mut self, batch: &EpochBatch, checkpoints: &mut BTreeMap<(String, String), (String, u64)>) -> std::io::Result<()> {
        let now = sluice_core::record::now_ms();
        for c in &batch.checkpoints {
            let position = if c.position.len() > SIDE_FILE_OVER {
                let name = side_name(self.worker, &c.position);
                let path = self.dir.join(&name);
                if !path.exists() {
                    let tmp = path.with_extension("pos.tmp");
                    let mut f = File::create(&tmp)?;
                    f.write_all(c.position.as_bytes())?;
                    f.sync_all()?;
                    std::fs::rename(&tmp, &path)?;
                }
                format!("{SIDE_REF}{name}")
            } else {
                c.position.clone()
            };
            checkpoints.insert((c.scope.clone(), c.shard.clone()), (position, now));
        }
        let file = CheckpointFile {
            answers_len: self.answers.metadata()?.len(),
            dead_len: self.dead.metadata()?.len(),
            checkpoints: checkpoints
                .iter()
                .map(|((scope, shard), (position, at))| (Checkpoint { scope: scope.clone(), shard: shard.clone(), position: position.clone() }, *at))
                .collect(),
        };
        let path = checkpoint_file(&self.dir, self.worker);
        let tmp = path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&file).expect("a checkpoint serializes"))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// What follows the rename: syncing the folder (so the rename survives a crash) and removing
    /// side files no checkpoint names any more.
    fn after_rename(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_after_rename) {
            return Err(std::io::Error::other("injected: syncing the folder failed"));
        }
        File::open(&self.dir)?.sync_all()?;
        // Side files no checkpoint names any more.
        let named: std::collections::HashSet<&str> = self.checkpoints.values().filter_map(|(p, _)| p.strip_prefix(SIDE_REF)).collect();
        let mine = format!("checkpoint.w{}.", self.worker);
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with(&mine) && name.ends_with(".pos") && !named.contains(name.as_str()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

/// The JSON object written for an answer.
pub fn answer_json(a: &Answer, columns: &[Column]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("op".into(), "upsert".into());
    m.insert("id".into(), a.id.clone().into());
    for (c, v) in columns.iter().zip(&a.values) {
        m.insert(c.name.into(), v.to_json());
    }
    for f in &a.passthrough {
        m.insert(f.name.clone(), f.kind.json(&f.value));
    }
    m.insert("model".into(), a.model.to_string().into());
    m.insert("source".into(), a.pos.to_string().into());
    serde_json::Value::Object(m)
}

/// The JSON object written for a change.
pub fn change_json(c: &Change, columns: &[Column]) -> serde_json::Value {
    match c {
        Change::Upsert(a) => answer_json(a, columns),
        Change::Delete(d) => serde_json::json!({"op": "delete", "id": d.id, "source": d.pos.to_string()}),
    }
}

/// The JSON object written for a dead letter; `raw_base64` holds the original bytes exactly
/// (cut to `runtime.max_dead_letter_bytes`; `raw_len` and `raw_sha256` describe them whole).
pub fn dead_letter_json(d: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "source": d.pos.source(),
        "position": d.pos.position(),
        "reason": d.reason.as_str(),
        "detail": d.detail,
        "raw_base64": base64::engine::general_purpose::STANDARD.encode(&d.raw),
        "raw_len": d.raw_len,
        "raw_sha256": d.raw_sha256,
    })
}

impl SinkWriter for JsonlWriter {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    fn stores_checkpoints(&self) -> bool {
        self.resumable
    }

    fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        // A write that fails half-way is undone, so its retry does not write lines twice; but
        // only while the checkpoint on disk is the old one: once the new one is renamed into
        // place it names the batch's lines, and cutting them would leave it naming bytes that
        // are not on disk (a restart would then skip the batch's input and lose its answers).
        let len = |f: &File| f.metadata().map(|m| m.len()).map_err(|e| SinkError::Transient(e.to_string()));
        let (answers_len, dead_len) = (len(&self.answers)?, len(&self.dead)?);
        let undo = |w: &mut Self| {
            let _ = w.answers.set_len(answers_len);
            let _ = w.dead.set_len(dead_len);
        };
        if let Err(e) = self.write_lines(batch) {
            undo(self);
            return Err(e);
        }
        if !self.resumable {
            return Ok(());
        }
        match self.store_checkpoint(batch) {
            Ok(()) => Ok(()),
            Err((Replaced::No, e)) => {
                undo(self);
                Err(SinkError::Transient(format!("cannot store the checkpoint in {}: {e}", self.dir.display())))
            }
            // The batch is written, synced and named by the checkpoint in place: it is done. If
            // the rename is lost in a crash, the old checkpoint comes back with the old lengths,
            // and the restart cuts the files to them and reads the batch's input again.
            Err((Replaced::Yes, e)) => {
                tracing::warn!("{}: the checkpoint is in place, but what follows its rename failed: {e}", self.dir.display());
                Ok(())
            }
        }
    }
}

/// Whether a failed checkpoint store had already renamed the new checkpoint file into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replaced {
    No,
    Yes,
}

impl JsonlWriter {
    fn write_lines(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        let mut buf = Vec::new();
        for c in &batch.changes {
            serde_json::to_writer(&mut buf, &change_json(c, self.columns)).map_err(|e| SinkError::Config(e.to_string()))?;
            buf.push(b'\n');
        }
        self.answers.write_all(&buf).and_then(|_| self.answers.sync_data()).map_err(|e| SinkError::Transient(e.to_string()))?;
        buf.clear();
        for d in &batch.dead {
            serde_json::to_writer(&mut buf, &dead_letter_json(d)).map_err(|e| SinkError::Config(e.to_string()))?;
            buf.push(b'\n');
        }
        self.dead.write_all(&buf).and_then(|_| self.dead.sync_data()).map_err(|e| SinkError::Transient(e.to_string()))
    }
}

impl SinkConnector for JsonlConfig {
    const TYPE: &'static str = "jsonl";
    const ABOUT: &'static str = "JSON lines: `answers.w<worker>.jsonl` and `dead_letters.w<worker>.jsonl` in `dir`";
    fn factory(&self) -> std::sync::Arc<dyn SinkFactory> {
        std::sync::Arc::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::record::{SourcePos, Value};

    const COLUMNS: &[Column] = &[Column { name: "prediction", kind: sluice_core::record::ColumnKind::Float }];

    #[test]
    fn writers_claiming_a_new_folder_at_once_for_one_pipeline_all_succeed() {
        // The processes of a cluster (and their workers) claim the folder at the same moment: with
        // a temporary file shared by name, one's rename published what another had just
        // truncated (an empty owner: "holds the answers of pipeline ``") or found it gone, the
        // process stopped, and its cluster peer waited for it for good.
        for round in 0..40 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(8));
            let claims: Vec<_> = (0..8)
                .map(|_| {
                    let (dir, start) = (dir.path().to_path_buf(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        claim(&dir, "rides").map_err(|e| e.to_string())
                    })
                })
                .collect();
            for c in claims {
                assert_eq!(c.join().unwrap(), Ok(()), "round {round}");
            }
            assert_eq!(std::fs::read_to_string(dir.path().join(OWNER_FILE)).unwrap(), "rides\n");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert_eq!(left.len(), 1, "no temporary file is left: {left:?}");
        }
    }

    fn batch(epoch: u64, ids: std::ops::Range<u64>) -> EpochBatch {
        let changes = ids
            .clone()
            .map(|i| {
                Change::Upsert(Answer {
                    id: format!("r{i}"),
                    values: vec![Value::Float(i as f64)],
                    passthrough: Vec::new(),
                    model: "rides@0123456789ab".into(),
                    pos: SourcePos::offset("rides".into(), 0, i),
                    ingest_ms: 0,
                    raw: Vec::new(),
                    seq: i,
                    replaces: false,
                })
            })
            .collect();
        let checkpoints = vec![Checkpoint { scope: "rides".into(), shard: "0".into(), position: ids.end.to_string() }];
        EpochBatch { epoch, changes, dead: Vec::new(), checkpoints }
    }

    /// What the checkpoint file names, and how long the answers file is.
    fn on_disk(dir: &Path) -> (u64, u64, String) {
        let cp = read_checkpoint(&checkpoint_file(dir, 0)).unwrap().expect("a checkpoint file");
        let len = std::fs::metadata(answers_file(dir, 0)).unwrap().len();
        (cp.answers_len, len, cp.checkpoints[0].0.position.clone())
    }

    #[test]
    fn a_checkpoint_never_names_answer_bytes_that_are_not_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = JsonlWriter::open(dir.path(), 0, COLUMNS, true).unwrap();
        w.write(&batch(1, 0..10)).unwrap();
        let (named, len, position) = on_disk(dir.path());
        assert_eq!((named, position.as_str()), (len, "10"));
        // The checkpoint file is renamed into place, then the step after it fails: the batch's
        // lines must stay, since the checkpoint on disk already counts them.
        w.fail_after_rename = true;
        let second = w.write(&batch(2, 10..25));
        let (named, len, position) = on_disk(dir.path());
        assert_eq!(named, len, "the checkpoint names {named} bytes of answers, the file holds {len} (write: {second:?})");
        assert_eq!(position, "25");
        assert!(second.is_ok(), "the batch is durable once its checkpoint is in place: {second:?}");
        let lines = std::fs::read_to_string(answers_file(dir.path(), 0)).unwrap();
        assert_eq!(lines.lines().count(), 25, "each answer once");
        // A restart cuts nothing and resumes after the second batch.
        let resumed = JsonlConfig { dir: dir.path().to_path_buf() };
        let ctx = SinkContext { pipeline: "p".into(), columns: COLUMNS, resumable: true, workers: 0..1 };
        let cps = resumed.open(&ctx).unwrap().unwrap();
        assert_eq!(cps, vec![Checkpoint { scope: "rides".into(), shard: "0".into(), position: "25".into() }]);
        assert_eq!(std::fs::read_to_string(answers_file(dir.path(), 0)).unwrap().lines().count(), 25);
    }
}
