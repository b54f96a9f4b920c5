//! The live file source (`[source] type = "files"`), on the engine's source harness: it lists a
//! local folder or an S3/GCS bucket, reads each new or changed CSV file once it has settled, and
//! supplies only what changed against the file's manifest (row IDs and content hashes): new and
//! changed rows go to the model, rows that went away (or every row of a removed file) become
//! deletes, and unchanged rows cost no inference. Each file's new manifest is a checkpoint, so
//! it becomes durable in the same transaction as the answers it describes; a restart diffs each
//! file against it, so nothing answered is recomputed and a file changed while sluice was down
//! is diffed correctly. With `watch = true` it keeps polling; without, it reads once and ends.

use super::csv::{frame, frame_rows, header_names, infer_kinds, kind_of, normalize_header, parse_rows, Framer};
use super::manifest::{id_key, row_hash, Diff, Manifest, Route, Seen, BLOCK_ROWS};
use super::scan::RawRecord as Framed;
use super::store::{FileReader, Listed, Store, StoreSettings};
use crate::error::ConnectorError;
use serde::Deserialize;
use sluice_core::connector::{ConfigError, SourceConnector};
use sluice_core::hash::ByHash;
use sluice_core::record::{now_ms, ColumnKind, DeadReason, SourcePos};
use sluice_core::source::{Body, Checkpoint, Keying, Poll, RawRecord, Source, SourceError, SourceFactory};
use sluice_core::topology::RuntimeConfig;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the files are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Csv,
    /// Parquet, through arrow's reader: a local file is read by row group, an object fetched
    /// whole. Values reach the task as text, formatted by arrow.
    Parquet,
}

/// `[source] type = "files"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// A local folder or file, `s3://bucket/prefix` or `gs://bucket/prefix`.
    pub path: String,
    #[serde(default)]
    pub format: Format,
    /// Keep running and follow new, changed and removed files.
    #[serde(default)]
    pub watch: bool,
    /// How often the location is listed when watching.
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// A file is read once its tag has stayed the same across two listings at least this far
    /// apart (a file still being written is left alone).
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// When watching, epochs close on this clock, so every worker (even one with no changed
    /// file) moves on together and a change is answered within about this long.
    #[serde(default = "default_epoch_ms")]
    pub epoch_ms: u64,
    /// Only names ending with this are read (default: `.csv`, or `.parquet` for Parquet).
    pub suffix: Option<String>,
    /// An S3-compatible endpoint (`http://127.0.0.1:19000`) or a GCS base URL (an emulator).
    pub endpoint: Option<String>,
    /// The S3 region (default: `AWS_REGION`, else us-east-1).
    pub region: Option<String>,
    /// A GCS service-account JSON file (default: Application Default Credentials). S3 keys come
    /// from the `AWS_*` environment variables.
    pub credentials_file: Option<String>,
    /// A field longer than this many bytes is a dead letter (`oversize_field`).
    #[serde(default = "default_max_field_bytes")]
    pub max_field_bytes: usize,
    /// Whether a location that had files and lists none means that every file was removed.
    /// By default it does not (a folder moved away, a mount gone, a bucket listing that came
    /// back empty): the answers are kept, with a warning and `sluice_files_root_empty` = 1,
    /// until it lists files again. Set it when emptying the location is how you retract.
    #[serde(default)]
    pub allow_empty_root: bool,
}

fn default_poll_ms() -> u64 {
    1000
}
fn default_settle_ms() -> u64 {
    1000
}
fn default_epoch_ms() -> u64 {
    100
}
fn default_max_field_bytes() -> usize {
    100_000
}

impl FilesConfig {
    /// Refuses settings that cannot work: `(field, message, hint)`.
    fn check_fields(&self) -> Result<(), (&'static str, String, &'static str)> {
        if self.path.is_empty() {
            return Err(("source.path", "is empty".into(), "give a folder, a file, s3://bucket/prefix or gs://bucket/prefix"));
        }
        if self.path.contains("://") && !self.path.starts_with("file://") && super::store::split_url(&self.path).is_none_or(|(s, _, _)| s != "s3" && s != "gs")
        {
            return Err((
                "source.path",
                format!("`{}` is not a location sluice reads", self.path),
                "use a local path, s3://bucket/prefix or gs://bucket/prefix",
            ));
        }
        if self.watch && self.epoch_ms == 0 {
            return Err(("source.epoch_ms", "must be at least 1".into(), "close an epoch every 100 ms: epoch_ms = 100"));
        }
        if self.watch && self.poll_ms == 0 {
            return Err(("source.poll_ms", "must be at least 1".into(), "list the location every second: poll_ms = 1000"));
        }
        if self.max_field_bytes == 0 {
            return Err(("source.max_field_bytes", "must be at least 1".into(), "set it to the largest field you accept, e.g. 100000"));
        }
        Ok(())
    }

    fn settings(&self) -> StoreSettings {
        StoreSettings {
            endpoint: self.endpoint.as_deref().map(sluice_core::topology::expand_env),
            region: self.region.clone(),
            credentials_file: self.credentials_file.clone(),
        }
    }

    fn suffix(&self) -> &str {
        self.suffix.as_deref().unwrap_or(match self.format {
            Format::Csv => ".csv",
            Format::Parquet => ".parquet",
        })
    }
}

/// Builds each worker's live file source. Every worker lists the location and owns the files
/// whose name hashes to it.
pub struct FilesFactory {
    pub config: FilesConfig,
    /// The checkpoint scope: `files:` and the location.
    scope: String,
}

impl FilesFactory {
    /// Checks that the location can be opened (a missing folder, a bad URL) before the run.
    pub fn new(config: FilesConfig) -> Result<Self, SourceError> {
        let store = Store::open(&config.path, &config.settings())?;
        Ok(FilesFactory { scope: format!("files:{}", store.describe()), config })
    }
}

/// The checkpoint scope of the changes to the base manifests stored under `scope`.
fn changes_scope(scope: &str) -> String {
    format!("{scope} (changes)")
}

impl SourceFactory for FilesFactory {
    fn kind(&self) -> &'static str {
        "files"
    }
    fn build(&self, worker: usize, peers: usize, resume: &[Checkpoint]) -> Result<Box<dyn Source>, SourceError> {
        Ok(Box::new(self.open(worker, peers, resume)?))
    }
    fn resumable(&self) -> bool {
        true
    }
    fn keying(&self) -> Keying {
        Keying::Changes
    }
    fn recomputes(&self) -> bool {
        self.config.watch
    }
    fn epoch_every(&self) -> Option<Duration> {
        self.config.watch.then(|| Duration::from_millis(self.config.epoch_ms))
    }
    fn closes_epoch_when_idle(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        format!("{}files at {}", if self.config.watch { "watched " } else { "" }, self.config.path)
    }
}

/// Which configuration of workers the stored manifests belong to: era `era` with `workers`
/// workers, after era `prev` with `prev_workers` (era 0 is the layout before eras, one manifest
/// per file). Every worker stores it with its first checkpoints; the highest era stored is the
/// current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Era {
    era: u64,
    workers: usize,
    prev: u64,
    prev_workers: usize,
}

impl Era {
    fn encode(&self) -> String {
        format!("{} {} {} {}", self.era, self.workers, self.prev, self.prev_workers)
    }

    fn decode(text: &str) -> Option<Era> {
        let v: Vec<u64> = text.split(' ').map(str::parse).collect::<Result<_, _>>().ok()?;
        match v[..] {
            [era, workers, prev, prev_workers] => Some(Era { era, workers: workers as usize, prev, prev_workers: prev_workers as usize }),
            _ => None,
        }
    }
}

/// The shard of a worker's own scope that says it has stored its manifests in this era.
const STORED_MARK: &str = "\u{1}stored";

impl FilesFactory {
    /// The scope of the era record.
    fn era_scope(&self) -> String {
        format!("{} (workers)", self.scope)
    }

    /// The scope of worker `worker`'s manifests in `era` (era 0: the one scope of old).
    fn worker_scope(&self, era: u64, worker: usize, workers: usize) -> String {
        if era == 0 {
            self.scope.clone()
        } else {
            format!("{} @{era}:{worker}/{workers}", self.scope)
        }
    }

    /// The manifests stored under `scope`, by file (a file that went away has an empty base).
    fn stored(&self, resume: &[Checkpoint], scope: &str) -> HashMap<String, Manifest> {
        let changes_of = changes_scope(scope);
        let changes: HashMap<&str, &str> =
            resume.iter().filter(|c| c.scope == changes_of && !c.position.is_empty()).map(|c| (c.shard.as_str(), c.position.as_str())).collect();
        let mut out = HashMap::new();
        for c in resume.iter().filter(|c| c.scope == scope && !c.position.is_empty() && c.shard != STORED_MARK) {
            match Manifest::decode(&c.position, changes.get(c.shard.as_str()).copied()) {
                Ok(m) => {
                    out.insert(c.shard.clone(), m);
                }
                Err(e) => tracing::warn!("files: the stored manifest of {} is unusable ({e}); the file is read again", c.shard),
            }
        }
        out
    }

    /// One worker's source, resuming from its stored manifests. Every worker keeps a manifest of
    /// every file (all its rows, so blocks and positions work as for one worker) and answers the
    /// rows that route to it. When the number of workers changed (or the manifests were stored
    /// before eras), each worker adopts, for its rows, the manifests of the workers that
    /// answered them, and stores its own with its first checkpoints.
    fn open(&self, worker: usize, peers: usize, resume: &[Checkpoint]) -> Result<FilesSource, SourceError> {
        let store = Store::open(&self.config.path, &self.config.settings())?;
        let route = Route::new(worker, peers);
        let era_scope = self.era_scope();
        let stored_era = resume.iter().filter(|c| c.scope == era_scope).filter_map(|c| Era::decode(&c.position)).max_by_key(|e| e.era);
        let era = match stored_era {
            Some(e) if e.workers == peers => e,
            Some(e) => Era { era: e.era + 1, workers: peers, prev: e.era, prev_workers: e.workers },
            None => Era { era: 1, workers: peers, prev: 0, prev_workers: 1 },
        };
        let own = self.worker_scope(era.era, worker, peers);
        let mut ready = Vec::new();
        let has_own = resume.iter().any(|c| c.scope == own && c.shard == STORED_MARK);
        let known: HashMap<String, Manifest> = if has_own {
            self.stored(resume, &own)
        } else {
            // Adopt the previous era's manifests: each row from the copy of the worker that
            // answered it then (era 0 kept one copy per file).
            let copies: Vec<HashMap<String, Manifest>> = if era.prev == 0 {
                vec![self.stored(resume, &self.scope)]
            } else {
                (0..era.prev_workers).map(|x| self.stored(resume, &self.worker_scope(era.prev, x, era.prev_workers))).collect()
            };
            let mut files: Vec<&String> = copies.iter().flat_map(|c| c.keys()).collect();
            files.sort();
            files.dedup();
            let prev_route = |x: usize| Route::new(x, era.prev_workers);
            let single = era.prev == 0;
            let mut adopted = HashMap::new();
            for file in files {
                let (held, of): (Vec<Manifest>, Vec<usize>) = copies.iter().enumerate().filter_map(|(x, c)| c.get(file).map(|m| (m.clone(), x))).unzip();
                let m = Manifest::adopt(&held, |i, key| single || prev_route(of[i]).mine(key));
                adopted.insert(file.clone(), m);
            }
            if !adopted.is_empty() {
                tracing::info!(worker, files = adopted.len(), era = era.era, "files: adopted the manifests of the previous workers ({})", era.prev_workers);
            }
            // Stored at the first checkpoint: the era, every adopted manifest in full, and the
            // mark that this worker's manifests of this era are complete.
            ready.push(Checkpoint { scope: era_scope.clone(), shard: "era".into(), position: era.encode() });
            ready.push(Checkpoint { scope: own.clone(), shard: STORED_MARK.into(), position: "1".into() });
            adopted
        };
        if !known.is_empty() {
            tracing::info!(worker, files = known.len(), rows = known.values().map(Manifest::len).sum::<usize>(), "files: resumed manifests");
        }
        let mut owners = Owners::default();
        let mut names: Vec<&String> = known.keys().collect();
        names.sort();
        for name in names {
            let m = &known[name];
            let no = owners.number(name);
            for key in m.named_keys(route) {
                owners.by_key.entry(key).or_insert(no);
            }
            if m.has_waiting() {
                owners.waiting.insert(name.clone());
            }
        }
        let answered_by = resume.iter().find(|c| c.scope == model_scope(&own) && c.shard == "model").map(|c| c.position.clone());
        let mut source = FilesSource {
            store,
            scope: own,
            suffix: self.config.suffix().to_string(),
            worker,
            route,
            watch: self.config.watch,
            format: self.config.format,
            poll: Duration::from_millis(self.config.poll_ms),
            settle: Duration::from_millis(self.config.settle_ms),
            max_field: self.config.max_field_bytes,
            allow_empty_root: self.config.allow_empty_root,
            known,
            settling: HashMap::new(),
            missing: HashMap::new(),
            last_listed: HashMap::new(),
            queue: VecDeque::new(),
            queued: HashSet::new(),
            current: None,
            ready,
            listed_at: None,
            empty_warned: None,
            metrics: FileMetrics::new(worker),
            passed_over: 0,
            owners,
            wake: false,
            answered_by,
            recompute: None,
        };
        if !has_own {
            // Every adopted manifest is stored in full in this worker's scope.
            let names: Vec<String> = source.known.keys().cloned().collect();
            for name in names {
                let m = source.known.get_mut(&name).expect("known");
                source.ready.extend(manifest_checkpoints(&source.scope, &name, m));
            }
        }
        Ok(source)
    }
}

/// The checkpoints that store `file`'s manifest `m` under `scope`: its base when written again,
/// and its changes since the base. An empty version clears both (a file that went away).
fn manifest_checkpoints(scope: &str, file: &str, m: &mut Manifest) -> Vec<Checkpoint> {
    let changes = changes_scope(scope);
    if m.version.is_empty() && m.is_empty() {
        return vec![
            Checkpoint { scope: scope.to_string(), shard: file.to_string(), position: String::new() },
            Checkpoint { scope: changes, shard: file.to_string(), position: String::new() },
        ];
    }
    let durable = m.durable();
    let mut out = Vec::with_capacity(2);
    if let Some(base) = durable.base {
        out.push(Checkpoint { scope: scope.to_string(), shard: file.to_string(), position: base });
    }
    out.push(Checkpoint { scope: changes, shard: file.to_string(), position: durable.changes });
    out
}

/// Which file answers each named `id` of this worker's. An `id` is answered from the first file
/// that supplied it; the same `id` in another file is a `duplicate_id` dead letter that waits
/// (its row is offered again whenever the answering file changes or goes), and a file that goes
/// away deletes only the answers it owns.
#[derive(Default)]
struct Owners {
    by_key: ByHash<u32>,
    numbers: HashMap<String, u32>,
    names: Vec<Arc<str>>,
    /// Files with rows waiting for an `id` answered from another file.
    waiting: HashSet<String>,
}

impl Owners {
    fn number(&mut self, file: &str) -> u32 {
        if let Some(&n) = self.numbers.get(file) {
            return n;
        }
        let n = self.names.len() as u32;
        self.names.push(file.into());
        self.numbers.insert(file.to_string(), n);
        n
    }

    /// `file` supplies the `id` with this key: `Err(the file that answers it)` when another does.
    fn claim(&mut self, key: u64, file: u32) -> Result<(), Arc<str>> {
        match self.by_key.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) if *o.get() != file => Err(self.names[*o.get() as usize].clone()),
            std::collections::hash_map::Entry::Occupied(_) => Ok(()),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(file);
                Ok(())
            }
        }
    }

    /// `file` no longer supplies `id`: whether its answer is deleted (the file answered it, or
    /// nothing did, as for a derived ID). An answer owned by another file stays.
    fn release(&mut self, id: &str, file: u32) -> bool {
        let key = id_key(id);
        match self.by_key.get(&key) {
            Some(&owner) if owner == file => {
                self.by_key.remove(&key);
                true
            }
            Some(_) => false,
            None => true,
        }
    }
}

struct FileMetrics {
    seen: metrics::Counter,
    changed: metrics::Counter,
    retracted: metrics::Counter,
}

impl FileMetrics {
    /// Every worker reads every row, so rows seen are counted by worker 0 alone (once per row).
    fn new(worker: usize) -> Self {
        FileMetrics {
            seen: if worker == 0 { metrics::counter!(sluice_core::metrics::FILE_ROWS_SEEN) } else { metrics::Counter::noop() },
            changed: metrics::counter!(sluice_core::metrics::FILE_ROWS_RECOMPUTED),
            retracted: metrics::counter!(sluice_core::metrics::FILE_ROWS_RETRACTED),
        }
    }
}

enum Work {
    Read(Listed),
    Remove(String),
}

/// A file's header: names, where the `id` column is, and a hash that every row's content
/// includes (a renamed column changes every row).
struct Header {
    names: Vec<Arc<str>>,
    /// Each column's kind, inferred from the file's first rows.
    kinds: Arc<[ColumnKind]>,
    id_col: Option<usize>,
    hash: u64,
}

/// A file being read and diffed.
struct Reading {
    name: Arc<str>,
    reader: FileReader,
    buf: Vec<u8>,
    at: usize,
    eof: bool,
    row: u64,
    header: Option<Header>,
    diff: Option<Diff>,
    /// After the last row: the new manifest, and the IDs still to delete.
    done: Option<(Manifest, VecDeque<String>)>,
    /// A Parquet file's batches (CSV files use `reader` and `buf`).
    parquet: Option<ParquetRows>,
    started: Instant,
    /// When the read last stored how far it got (or started).
    partial_at: Instant,
    rows: u64,
    changed: u64,
    gone: u64,
    /// Rows passed over in unchanged blocks.
    passed: u64,
    /// Every row is sent again (a new model version answers it).
    recomputing: bool,
}

/// A recompute under way: the model version answering now, and the files still to read again.
struct Recompute {
    model: String,
    files: HashSet<String>,
}

/// The version a file's manifest takes while it waits to be read again for a recompute: no
/// listing has this tag, so the next listing reads it.
const RECOMPUTE_TAG: &str = "\u{1}recompute";

struct FilesSource {
    /// The model version that answered this worker's rows, as stored with its checkpoints
    /// (`on_model_change = "recompute"`).
    answered_by: Option<String>,
    recompute: Option<Recompute>,
    store: Store,
    /// This worker's scope for its manifests in this era.
    scope: String,
    suffix: String,
    worker: usize,
    /// The rows this worker answers.
    route: Route,
    watch: bool,
    format: Format,
    poll: Duration,
    settle: Duration,
    max_field: usize,
    allow_empty_root: bool,
    /// The manifest of every file, as supplied so far.
    known: HashMap<String, Manifest>,
    /// Changed files waiting to settle: their tag and when it was first seen.
    settling: HashMap<String, (String, Instant)>,
    /// Known files missing from the listing, and since when: a file is removed once it has
    /// been missing from two listings `settle` apart, like a change settles.
    missing: HashMap<String, Instant>,
    /// Each file as last listed (to read a file again when its waiting rows may be answered).
    last_listed: HashMap<String, Listed>,
    queue: VecDeque<Work>,
    queued: HashSet<String>,
    current: Option<Reading>,
    /// Manifests of files finished since the last checkpoint.
    ready: Vec<Checkpoint>,
    listed_at: Option<Instant>,
    /// When an empty listing of a location that had files was last warned about.
    empty_warned: Option<Instant>,
    metrics: FileMetrics,
    /// Rows passed over in whole unchanged blocks, in all (no framing, no hashing of their own).
    passed_over: u64,
    owners: Owners,
    /// Answers were released: files with waiting rows are read again.
    wake: bool,
}

/// Rows framed per poll at most, so a large unchanged file does not hold the worker.
const ROWS_PER_POLL: usize = 100_000;
/// Rows framed (and diffed) in one slice.
const FRAME_ROWS: usize = 16_384;

impl FilesSource {
    /// Lists the location and queues what changed: removals first (so a renamed file's rows
    /// are released before its new name claims them), then new and changed files.
    fn list(&mut self) -> Result<(), SourceError> {
        // A failed listing is transient: polled again after a backoff.
        let listed = self.store.list(&self.suffix)?;
        if self.listed_at.is_none() && self.worker == 0 && listed.is_empty() {
            tracing::warn!("no `*{}` files at {}{}", self.suffix, self.store.describe(), if self.watch { " yet" } else { "" });
        }
        self.listed_at = Some(Instant::now());
        let worker = self.worker.to_string();
        if listed.is_empty() && !self.known.is_empty() && !self.allow_empty_root {
            // A folder moved away, a mount gone: not every file removed.
            metrics::gauge!(sluice_core::metrics::FILES_ROOT_EMPTY, "worker" => worker).set(1.0);
            if self.worker == 0 && self.empty_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!(
                    "files: {} lists no `*{}` files, but {} were there: their answers are kept until it lists files again (set source.allow_empty_root = true if emptying it should delete them)",
                    self.store.describe(),
                    self.suffix,
                    self.known.len()
                );
                self.empty_warned = Some(Instant::now());
            }
            self.missing.clear();
            return Ok(());
        }
        metrics::gauge!(sluice_core::metrics::FILES_ROOT_EMPTY, "worker" => worker).set(0.0);
        self.empty_warned = None;
        let present: HashSet<String> = listed.iter().map(|l| l.name.clone()).collect();
        let reading = self.current.as_ref().map(|r| r.name.clone());
        let mut gone: Vec<String> = Vec::new();
        for name in self.known.keys() {
            if present.contains(name) || self.queued.contains(name) || reading.as_deref() == Some(name.as_str()) {
                continue;
            }
            if !self.watch {
                gone.push(name.clone());
                continue;
            }
            match self.missing.get(name) {
                Some(since) if since.elapsed() >= self.settle => gone.push(name.clone()),
                Some(_) => {}
                None => {
                    self.missing.insert(name.clone(), Instant::now());
                }
            }
        }
        self.missing.retain(|k, _| !present.contains(k));
        gone.sort();
        for name in gone {
            self.missing.remove(&name);
            self.queued.insert(name.clone());
            self.queue.push_back(Work::Remove(name));
        }
        for l in listed {
            self.last_listed.insert(l.name.clone(), l.clone());
            if self.known.get(&l.name).is_some_and(|m| m.version == l.tag) {
                self.settling.remove(&l.name);
                continue;
            }
            if self.queued.contains(&l.name) || self.current.as_ref().is_some_and(|r| *r.name == *l.name) {
                continue;
            }
            let ready = if !self.watch {
                true
            } else {
                match self.settling.get(&l.name) {
                    Some((tag, since)) if *tag == l.tag => since.elapsed() >= self.settle,
                    _ => {
                        self.settling.insert(l.name.clone(), (l.tag.clone(), Instant::now()));
                        false
                    }
                }
            };
            if ready {
                self.settling.remove(&l.name);
                self.queued.insert(l.name.clone());
                self.queue.push_back(Work::Read(l));
            }
        }
        let last_listed = &self.last_listed;
        self.settling.retain(|k, _| last_listed.contains_key(k));
        self.last_listed.retain(|k, _| present.contains(k));
        metrics::gauge!(sluice_core::metrics::FILES, "state" => "current", "worker" => self.worker.to_string()).set(self.known.len() as f64);
        metrics::gauge!(sluice_core::metrics::FILES, "state" => "settling", "worker" => self.worker.to_string()).set(self.settling.len() as f64);
        Ok(())
    }

    /// Answers were released: files with waiting rows are read again, so a row waiting for an
    /// `id` that is free now is answered.
    fn wake_waiting(&mut self) {
        let mut names: Vec<String> = self.owners.waiting.iter().cloned().collect();
        names.sort();
        for name in names {
            if self.queued.contains(&name) || self.current.as_ref().is_some_and(|r| *r.name == *name) {
                continue;
            }
            if let Some(l) = self.last_listed.get(&name) {
                self.queued.insert(name);
                self.queue.push_back(Work::Read(l.clone()));
            }
        }
    }

    fn start(&mut self, work: Work) {
        match work {
            Work::Remove(name) => {
                self.queued.remove(&name);
                self.recomputed(&name);
                let old = self.known.remove(&name).unwrap_or_default();
                let no = self.owners.number(&name);
                self.owners.waiting.remove(&name);
                let ids: VecDeque<String> = old.answered(&name, self.route).into_iter().filter(|id| self.owners.release(id, no)).collect();
                tracing::info!("files: {name} went away: deleting the answers of its {} rows", ids.len());
                if !ids.is_empty() {
                    self.wake_waiting();
                }
                let name: Arc<str> = name.into();
                self.current = Some(Reading {
                    name,
                    reader: FileReader::Empty,
                    buf: Vec::new(),
                    at: 0,
                    eof: true,
                    row: 0,
                    header: None,
                    diff: None,
                    parquet: None,
                    gone: ids.len() as u64,
                    done: Some((Manifest::default(), ids)),
                    started: Instant::now(),
                    partial_at: Instant::now(),
                    rows: 0,
                    changed: 0,
                    passed: 0,
                    recomputing: false,
                });
            }
            Work::Read(l) => {
                self.queued.remove(&l.name);
                let name: Arc<str> = l.name.as_str().into();
                let opened = match self.format {
                    Format::Csv => self.store.reader(&l.name, l.size).map(|r| (r, None)),
                    Format::Parquet => ParquetRows::open(&self.store, &l).map(|p| (FileReader::Empty, Some(p))),
                };
                match opened {
                    Ok((reader, parquet)) => {
                        let old = self.known.remove(&l.name).unwrap_or_default();
                        let recomputing = self.recompute.as_ref().is_some_and(|r| r.files.contains(&l.name));
                        self.current = Some(Reading {
                            name: name.clone(),
                            reader,
                            buf: Vec::new(),
                            at: 0,
                            eof: false,
                            row: 0,
                            header: None,
                            diff: Some(Diff::new(&name, old, l.tag).routed(self.route).recomputing(recomputing)),
                            done: None,
                            parquet,
                            started: Instant::now(),
                            partial_at: Instant::now(),
                            rows: 0,
                            changed: 0,
                            gone: 0,
                            passed: 0,
                            recomputing,
                        });
                    }
                    // Gone between the listing and now, or unreadable: the next listing decides.
                    Err(e) => tracing::warn!("files: {e}; trying again at the next listing"),
                }
            }
        }
    }

    /// Advances the file being read: supplies its changes, at most `budget` records in all.
    fn advance(&mut self, now: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<(), SourceError> {
        let max_field = self.max_field;
        let r = self.current.as_mut().expect("a file is being read");
        if let Some((_, gone)) = &mut r.done {
            while out.len() < budget {
                let Some(id) = gone.pop_front() else { break };
                self.metrics.retracted.increment(1);
                out.push(RawRecord {
                    bytes: id.clone().into_bytes(),
                    body: Body::Delete,
                    pos: SourcePos::row(r.name.clone(), 0),
                    id: Some(id.into_bytes()),
                    ingest_ms: now,
                });
            }
            if gone.is_empty() {
                let (mut manifest, _) = r.done.take().expect("done");
                let r = self.current.take().expect("a file is being read");
                let shard = r.name.to_string();
                if manifest.has_waiting() {
                    self.owners.waiting.insert(shard.clone());
                } else {
                    self.owners.waiting.remove(&shard);
                }
                self.ready.extend(manifest_checkpoints(&self.scope, &shard, &mut manifest));
                self.passed_over += r.passed;
                tracing::info!(
                    worker = self.worker,
                    "files: {}: {} rows, {} new or changed, {} gone, in {} ms ({} rows passed over in unchanged blocks)",
                    r.name,
                    r.rows,
                    r.changed,
                    r.gone,
                    r.started.elapsed().as_millis(),
                    r.passed
                );
                // A file read before the recompute began is read again; one read for it is done.
                let pending = self.recompute.as_ref().is_some_and(|p| p.files.contains(&shard));
                if pending && !r.recomputing && !manifest.version.is_empty() {
                    manifest.version = RECOMPUTE_TAG.into();
                }
                if !manifest.version.is_empty() {
                    self.known.insert(r.name.to_string(), manifest);
                }
                if r.recomputing || !self.known.contains_key(&shard) {
                    self.recomputed(&shard);
                }
            }
            return Ok(());
        }
        if let Some(p) = &mut r.parquet {
            let diff = r.diff.as_mut().expect("a diff while reading");
            match p.supply(&r.name, diff, &mut self.owners, now, budget, ROWS_PER_POLL, out, &self.metrics) {
                Ok((rows, changed, more)) => {
                    r.rows += rows;
                    r.changed += changed;
                    if more {
                        return Ok(());
                    }
                }
                Err(e) => {
                    // An unreadable file gives no answers, as a fresh run would: its rows' old
                    // answers go, and the file is one dead letter.
                    out.push(refused(&r.name, 0, b"", DeadReason::BrokenQuoting, format!("not a readable Parquet file: {e}"), now));
                    diff.forget_read();
                }
            }
            let diff = r.diff.take().expect("a diff while reading");
            let (manifest, gone) = diff.finish();
            let gone = release(&mut self.owners, &r.name, gone, &mut self.wake);
            r.gone = gone.len() as u64;
            r.done = Some((manifest, gone));
            return Ok(());
        }
        let mut framed_rows = 0usize;
        while out.len() < budget && framed_rows < ROWS_PER_POLL {
            let limit = FRAME_ROWS.min(ROWS_PER_POLL - framed_rows);
            if let (Some(header), Some(diff)) = (&r.header, &mut r.diff) {
                // Diff a slice of rows as they are framed; the budget stops it at a row, which
                // is framed again next time.
                let mut slice = Slice::new(&r.name, header, diff, &mut self.owners, now, budget - out.len(), &r.buf, out);
                let end = frame_rows(&r.buf, r.at, r.row, true, r.eof, max_field, limit, &mut slice);
                let (rows, changed, passed) = slice.finish(&self.metrics);
                r.passed += passed;
                r.rows += rows;
                r.changed += changed;
                r.at = end.next;
                r.row = end.row;
                framed_rows += end.taken;
                if end.taken > 0 || out.len() >= budget {
                    continue;
                }
                if r.eof && !end.need_more {
                    let diff = r.diff.take().expect("a diff while reading");
                    let (manifest, gone) = diff.finish();
                    let gone = release(&mut self.owners, &r.name, gone, &mut self.wake);
                    r.gone = gone.len() as u64;
                    r.done = Some((manifest, gone));
                    return Ok(());
                }
            } else {
                let framing = frame(&r.buf, r.at, r.row, false, r.eof, max_field, 1);
                if let Some((_, rec)) = framing.records.into_iter().next() {
                    r.at = framing.next;
                    r.row = framing.row;
                    framed_rows += 1;
                    let names = header_names(&rec, &r.name, now, out);
                    let id_col = names.iter().position(|h| h == "id");
                    let kinds = infer_kinds(&r.buf[rec.offset..], names.len());
                    r.header = Some(Header { names: names.into_iter().map(Arc::from).collect(), kinds, id_col, hash: row_hash(0, rec.bytes) });
                    continue;
                }
                if r.eof && !framing.need_more {
                    // An empty file: no rows.
                    r.header = Some(Header { names: Vec::new(), kinds: Arc::from(Vec::new()), id_col: None, hash: 0 });
                    continue;
                }
            }
            if r.at > 0 {
                r.buf.drain(..r.at);
                r.at = 0;
            }
            match r.reader.read_into(&mut r.buf) {
                Ok(0) => r.eof = true,
                Ok(_) => {}
                Err(e) => {
                    // Changed or gone under the reader: give the file back its manifest and
                    // let the next listing decide. Rows already supplied are supplied again
                    // then (the same answers); nothing is deleted on a partial read.
                    let r = self.current.take().expect("a file is being read");
                    let old = r.diff.expect("a diff while reading").into_old();
                    tracing::warn!("files: {}: {e}; reading it again at the next listing", r.name);
                    self.known.insert(r.name.to_string(), old);
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The answers `file` gives up (its rows gone): those it owns are deleted and their `id`s
/// released; `wake` is set when waiting rows elsewhere may be answered now.
fn release(owners: &mut Owners, file: &str, gone: Vec<String>, wake: &mut bool) -> VecDeque<String> {
    let no = owners.number(file);
    let out: VecDeque<String> = gone.into_iter().filter(|id| owners.release(id, no)).collect();
    *wake |= !out.is_empty();
    out
}

/// A Parquet file being read: its columns and the batch in hand.
struct ParquetRows {
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    names: Vec<Arc<str>>,
    /// Each column's kind, from the file's schema.
    kinds: Arc<[ColumnKind]>,
    id_col: Option<usize>,
    /// Every row's content hash includes the schema's.
    schema_hash: u64,
    batch: Option<(arrow::array::RecordBatch, usize)>,
    row: u64,
}

impl ParquetRows {
    /// Opens a listed file: a file that cannot be opened is transient (as for
    /// [`Store::reader`]); one that is not Parquet is the input's fault.
    fn open(store: &Store, listed: &Listed) -> Result<ParquetRows, ConnectorError> {
        let name = listed.name.as_str();
        use parquet::arrow::arrow_reader::ParquetRecordBatchReader;
        let reader = match store.local_path(name) {
            Some(path) => {
                let file = std::fs::File::open(&path).map_err(|e| ConnectorError::unreachable(format!("cannot open {}: {e}", path.display())))?;
                ParquetRecordBatchReader::try_new(file, 4096)
            }
            None => ParquetRecordBatchReader::try_new(bytes::Bytes::from(store.read_all(name, listed.size)?), 4096),
        };
        let reader = reader.map_err(|e| ConnectorError::input(format!("{name} is not a readable Parquet file: {e}")))?;
        let schema = arrow::array::RecordBatchReader::schema(&reader);
        let raw: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let names = normalize_header(&raw);
        let id_col = names.iter().position(|h| h == "id");
        let schema_hash = id_key(&format!("{schema:?}"));
        let kinds = schema.fields().iter().map(|f| kind_of(f.data_type())).collect();
        Ok(ParquetRows { reader, names: names.into_iter().map(Arc::from).collect(), kinds, id_col, schema_hash, batch: None, row: 0 })
    }

    /// Diffs up to `max_rows` rows and supplies the changed ones, stopping when `out` holds
    /// `budget`. Returns rows seen, rows supplied, and whether rows remain. A batch that cannot
    /// be decoded or shown as text is the input's fault.
    #[allow(clippy::too_many_arguments)]
    fn supply(
        &mut self,
        file: &Arc<str>,
        diff: &mut Diff,
        owners: &mut Owners,
        now: u64,
        budget: usize,
        max_rows: usize,
        out: &mut Vec<RawRecord>,
        m: &FileMetrics,
    ) -> Result<(u64, u64, bool), ConnectorError> {
        let file_no = owners.number(file);
        use arrow::util::display::{ArrayFormatter, FormatOptions};
        let (mut rows, mut changed) = (0u64, 0u64);
        while out.len() < budget && (rows as usize) < max_rows {
            let (batch, at) = match &mut self.batch {
                Some((b, at)) if *at < b.num_rows() => (b, at),
                _ => match self.reader.next() {
                    None => {
                        m.seen.increment(rows);
                        m.changed.increment(changed);
                        return Ok((rows, changed, false));
                    }
                    Some(Err(e)) => return Err(ConnectorError::input(e.to_string())),
                    Some(Ok(b)) => {
                        self.batch = Some((b, 0));
                        continue;
                    }
                },
            };
            let options = FormatOptions::default().with_null("");
            let formatters: Vec<ArrayFormatter> = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<_, _>>()
                .map_err(|e| ConnectorError::input(e.to_string()))?;
            let columns = batch.columns();
            let mut values: Vec<String> = Vec::with_capacity(columns.len());
            while *at < batch.num_rows() && out.len() < budget && (rows as usize) < max_rows {
                let i = *at;
                *at += 1;
                self.row += 1;
                rows += 1;
                values.clear();
                // The row's text, each value marked null or not and ended by a separator.
                let mut text: Vec<u8> = Vec::new();
                for (c, f) in columns.iter().zip(&formatters) {
                    let v = f.value(i).to_string();
                    text.push(if c.is_null(i) { 0 } else { 1 });
                    text.extend_from_slice(v.as_bytes());
                    text.push(0x1f);
                    values.push(v);
                }
                let content = row_hash(self.schema_hash, &text);
                let named = self.id_col.filter(|&c| !columns[c].is_null(i)).map(|c| values[c].trim()).filter(|s| !s.is_empty());
                let mut seen = diff.row(named, content);
                let replaces = diff.last_replaces();
                let elsewhere = claim(owners, diff, file_no, named, &mut seen);
                let id = match seen {
                    Seen::Same | Seen::Foreign => continue,
                    Seen::Send(id) => id,
                    Seen::Duplicate(id) => {
                        let detail = duplicate_detail(&id, file, elsewhere.as_deref());
                        let json: serde_json::Map<String, serde_json::Value> =
                            self.names.iter().zip(&values).map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str()))).collect();
                        out.push(refused(file, self.row, &serde_json::to_vec(&json).unwrap_or_default(), DeadReason::DuplicateId, detail, now));
                        continue;
                    }
                };
                changed += 1;
                let fields: Vec<(Arc<str>, String)> = self.names.iter().cloned().zip(values.iter().cloned()).collect();
                // The row as JSON: what a dead letter keeps as its original bytes.
                let json: serde_json::Map<String, serde_json::Value> =
                    fields.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str()))).collect();
                let bytes = serde_json::to_vec(&json).unwrap_or_default();
                out.push(RawRecord {
                    bytes,
                    body: Body::Typed(fields, self.kinds.clone(), replaces),
                    pos: SourcePos::row(file.clone(), self.row),
                    id: Some(id.into_bytes()),
                    ingest_ms: now,
                });
            }
        }
        m.seen.increment(rows);
        m.changed.increment(changed);
        Ok((rows, changed, true))
    }
}

/// Claims a named row's `id` for file `no` when the diff sends it: when another file answers
/// it, the row waits and `seen` becomes a duplicate; returns that file.
fn claim(owners: &mut Owners, diff: &mut Diff, no: u32, named: Option<&str>, seen: &mut Seen) -> Option<Arc<str>> {
    let (Some(_), Seen::Send(id)) = (named, &*seen) else { return None };
    let other = owners.claim(id_key(id), no).err()?;
    diff.wait_last();
    if let Seen::Send(id) = std::mem::replace(seen, Seen::Same) {
        *seen = Seen::Duplicate(id);
    }
    Some(other)
}

/// The dead letter's detail for a row of `file` whose `id` an earlier row of the file has, or
/// that another file (`elsewhere`) answers.
fn duplicate_detail(id: &str, file: &str, elsewhere: Option<&str>) -> String {
    match elsewhere {
        Some(other) => format!("the id `{id}` of this row of {file} is already answered from {other}; this row is answered if {other} no longer has it"),
        None => format!("the id `{id}` is already used by an earlier row of {file}; the first row with it is the one answered"),
    }
}

fn refused(file: &Arc<str>, row: u64, bytes: &[u8], reason: DeadReason, detail: String, now: u64) -> RawRecord {
    RawRecord { bytes: bytes.to_vec(), body: Body::Refused(reason, detail), pos: SourcePos::row(file.clone(), row), id: None, ingest_ms: now }
}

/// The `n`-th field of a well-framed CSV record, unquoted.
pub fn nth_field(rec: &[u8], n: usize) -> Option<std::borrow::Cow<'_, str>> {
    let mut i = 0;
    let mut field = 0;
    loop {
        let quoted = rec.get(i) == Some(&b'"');
        let start = i;
        if quoted {
            i += 1;
            while i < rec.len() {
                if rec[i] == b'"' {
                    if rec.get(i + 1) == Some(&b'"') {
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                i += 1;
            }
        } else {
            while i < rec.len() && rec[i] != b',' {
                i += 1;
            }
        }
        if field == n {
            let raw = std::str::from_utf8(&rec[start..i]).ok()?;
            return Some(if quoted { raw[1..raw.len().saturating_sub(1).max(1)].replace("\"\"", "\"").into() } else { raw.into() });
        }
        if i >= rec.len() {
            return None;
        }
        i += 1; // the comma
        field += 1;
    }
}

/// One slice of a CSV file's rows being diffed against its manifest: refused rows go out at
/// once, new and changed good rows are parsed together at the end, and unchanged rows cost a
/// hash and a comparison, or nothing when a whole block of them is as it was. The rows it frames
/// are grouped into the new version's blocks.
struct Slice<'h, 'b, 'o> {
    file: &'h Arc<str>,
    header: &'h Header,
    diff: &'h mut Diff,
    /// Which file answers each `id`, and this file's number there.
    owners: &'h mut Owners,
    file_no: u32,
    now: u64,
    /// The buffer being framed.
    data: &'b [u8],
    out: &'o mut Vec<RawRecord>,
    /// Records `out` may still take.
    room: usize,
    rows: u64,
    changed: u64,
    passed: u64,
    /// Good new and changed rows: row, bytes, ID, whether it replaces an answer.
    good: Vec<(u64, &'b [u8], String, bool)>,
    /// The block being gathered: where it starts, its first row's place, its rows, where it ends.
    open: Option<(usize, u32, usize, usize)>,
}

impl<'h, 'b, 'o> Slice<'h, 'b, 'o> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        file: &'h Arc<str>,
        header: &'h Header,
        diff: &'h mut Diff,
        owners: &'h mut Owners,
        now: u64,
        room: usize,
        data: &'b [u8],
        out: &'o mut Vec<RawRecord>,
    ) -> Self {
        let file_no = owners.number(file);
        Slice { file, header, diff, owners, file_no, now, data, out, room, rows: 0, changed: 0, passed: 0, good: Vec::new(), open: None }
    }

    /// Ends the block being gathered. A block must end with a line end: a last row cut by the
    /// end of the file could go on in a later version.
    fn close(&mut self) {
        if let Some((from, first, rows, to)) = self.open.take() {
            if matches!(self.data.get(to.wrapping_sub(1)), Some(b'\n' | b'\r')) {
                self.diff.block(first, rows, &self.data[from..to], self.header.hash);
            }
        }
    }

    /// Parses the new and changed good rows and supplies them: rows seen, rows supplied, rows
    /// passed over in blocks.
    fn finish(mut self, m: &FileMetrics) -> (u64, u64, u64) {
        self.close();
        let Slice { file, header, now, rows, changed, passed, good, out, .. } = self;
        m.seen.increment(rows);
        m.changed.increment(changed);
        if good.is_empty() {
            return (rows, changed, passed);
        }
        let columns = header.names.len();
        let bytes: Vec<&[u8]> = good.iter().map(|(_, b, _, _)| *b).collect();
        let parsed: Vec<Result<Vec<String>, ConnectorError>> = match parse_rows(&bytes, columns) {
            Ok(rows) => rows.into_iter().map(Ok).collect(),
            Err(_) => bytes.iter().map(|b| parse_rows(&[b], columns).map(|mut v| v.remove(0))).collect(),
        };
        for ((row, raw, id, replaces), values) in good.into_iter().zip(parsed) {
            out.push(match values {
                Err(e) => RawRecord { id: Some(id.into_bytes()), ..refused(file, row, raw, DeadReason::BrokenQuoting, e.message, now) },
                Ok(values) => {
                    let fields: Vec<(Arc<str>, String)> = header.names.iter().cloned().zip(values).collect();
                    RawRecord {
                        bytes: raw.to_vec(),
                        body: Body::Typed(fields, header.kinds.clone(), replaces),
                        pos: SourcePos::row(file.clone(), row),
                        id: Some(id.into_bytes()),
                        ingest_ms: now,
                    }
                }
            });
        }
        (rows, changed, passed)
    }
}

impl<'b> Framer<'b> for Slice<'_, 'b, '_> {
    fn skip(&mut self, data: &'b [u8], at: usize, _row: u64) -> Option<(usize, usize)> {
        let (bytes, rows) = self.diff.skip(&data[at..], self.header.hash)?;
        self.close();
        self.rows += rows as u64;
        self.passed += rows as u64;
        Some((bytes, rows))
    }

    /// Diffs one framed row; false when `out` is full (the row is left for the next slice).
    fn take(&mut self, row: u64, rec: Framed<'b>, from: usize, to: usize) -> bool {
        if self.room == 0 {
            return false;
        }
        let columns = self.header.names.len();
        let content = row_hash(self.header.hash, rec.bytes);
        // A record the scanner refused (broken quoting, an oversize field) may have been judged
        // on bytes past its end (where a quote closes, or does not), which no block covers.
        let judged_past_end = rec.error.is_some();
        let bad = if columns == 0 {
            Some((DeadReason::MissingColumn, "the file has no usable header".to_string()))
        } else if let Some((reason, detail)) = rec.error {
            Some((reason, detail))
        } else if rec.fields != columns {
            let names = self.header.names.iter().map(|h| &**h).collect::<Vec<&str>>().join(", ");
            let reason = if rec.fields < columns { DeadReason::MissingColumn } else { DeadReason::ExtraColumn };
            Some((reason, format!("expected {columns} fields ({names}), found {}", rec.fields)))
        } else {
            None
        };
        // A bad row gets a derived ID, so a named row that turns bad loses its old answer.
        let cell = match (&bad, self.header.id_col) {
            (None, Some(i)) => nth_field(rec.bytes, i),
            _ => None,
        };
        let named = cell.as_deref().map(str::trim).filter(|s| !s.is_empty());
        self.rows += 1;
        let place = self.diff.next_place();
        let mut seen = self.diff.row(named, content);
        let replaces = self.diff.last_replaces();
        // An `id` answered from another file: this row waits (a dead letter now; offered again
        // whenever that file changes or goes).
        let elsewhere = claim(self.owners, self.diff, self.file_no, named, &mut seen);
        if matches!(seen, Seen::Duplicate(_)) || judged_past_end {
            // A duplicate has no place in the manifest; a refused record's framing may change
            // with bytes after it: no block holds either.
            self.close();
        } else {
            match &mut self.open {
                Some((_, _, rows, end)) => {
                    *rows += 1;
                    *end = to;
                }
                None => self.open = Some((from, place, 1, to)),
            }
            if self.open.is_some_and(|(_, _, rows, _)| rows >= BLOCK_ROWS) {
                self.close();
            }
        }
        let id = match seen {
            Seen::Same | Seen::Foreign => return true,
            Seen::Send(id) => id,
            Seen::Duplicate(id) => {
                self.room -= 1;
                let detail = duplicate_detail(&id, self.file, elsewhere.as_deref());
                self.out.push(refused(self.file, row, rec.bytes, DeadReason::DuplicateId, detail, self.now));
                return true;
            }
        };
        self.changed += 1;
        self.room -= 1;
        match bad {
            Some((reason, detail)) => self.out.push(RawRecord { id: Some(id.into_bytes()), ..refused(self.file, row, rec.bytes, reason, detail, self.now) }),
            None => self.good.push((row, rec.bytes, id, replaces)),
        }
        true
    }
}

impl FilesSource {
    /// `file` was read again for the recompute (or went away).
    fn recomputed(&mut self, file: &str) {
        if let Some(r) = self.recompute.as_mut() {
            r.files.remove(file);
        }
        self.finish_recompute();
    }

    /// Once no file is left to read again, the model version is stored with the next
    /// checkpoints, so a restart knows every row has its answer.
    fn finish_recompute(&mut self) {
        if self.recompute.as_ref().is_some_and(|r| r.files.is_empty()) {
            let r = self.recompute.take().expect("a recompute");
            tracing::info!(worker = self.worker, model = %r.model, "files: every live row is answered by the new model version");
            self.ready.push(Checkpoint { scope: model_scope(&self.scope), shard: "model".into(), position: r.model.clone() });
            self.answered_by = Some(r.model);
        }
    }
}

/// The scope of the model version that answered a worker's rows.
fn model_scope(scope: &str) -> String {
    format!("{scope} (model)")
}

impl Source for FilesSource {
    fn poll(&mut self, _epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError> {
        let now = now_ms();
        while out.len() < budget {
            if self.current.is_some() {
                let before = out.len();
                let rows_before = self.current.as_ref().map(|r| r.rows);
                self.advance(now, budget, out)?;
                if std::mem::take(&mut self.wake) {
                    self.wake_waiting();
                }
                // A large file hands the worker back between slices of rows.
                if out.len() == before && self.current.is_some() && self.current.as_ref().map(|r| r.rows) != rows_before {
                    return Ok(Poll::More);
                }
                continue;
            }
            if let Some(work) = self.queue.pop_front() {
                self.start(work);
                continue;
            }
            // A file waiting to settle is listed again as soon as its settle time allows.
            let every = if self.settling.is_empty() { self.poll } else { self.poll.min(self.settle) };
            let due = self.listed_at.is_none_or(|t| self.watch && t.elapsed() >= every);
            if due {
                self.list()?;
                if !self.queue.is_empty() {
                    continue;
                }
            }
            if !self.watch {
                return Ok(Poll::Done);
            }
            // Idle: the harness closes the epoch, so what was supplied is answered now.
            let wait = self.poll.saturating_sub(self.listed_at.map(|t| t.elapsed()).unwrap_or_default());
            let wait = if self.settling.is_empty() { wait } else { wait.min(self.settle) };
            return Ok(Poll::Idle(wait.max(Duration::from_millis(1))));
        }
        Ok(Poll::More)
    }

    fn checkpoint(&mut self, _epoch: u64) -> Vec<Checkpoint> {
        // A long file stores how far its read got now and then, so a crash or a restart does
        // not answer it again from the top.
        if self.current.as_ref().is_some_and(|r| r.diff.is_some() && r.partial_at.elapsed() >= PARTIAL_EVERY) {
            self.store_partial();
        }
        std::mem::take(&mut self.ready)
    }

    fn stop(&mut self) {
        self.store_partial();
    }

    fn wants_checkpoint(&self) -> bool {
        !self.ready.is_empty()
    }

    /// A new model version (or the first one this worker's rows were not answered by, after a
    /// restart): every known file is read again with every row sent, and the version is stored
    /// once all are.
    fn answer_with(&mut self, model: &str) {
        if self.recompute.as_ref().map_or(self.answered_by.as_deref() == Some(model), |r| r.model == model) {
            return;
        }
        let mut files: HashSet<String> = self.known.keys().cloned().collect();
        files.extend(self.current.as_ref().map(|r| r.name.to_string()));
        files.extend(self.queued.iter().cloned());
        if self.answered_by.is_some() || !files.is_empty() {
            tracing::info!(worker = self.worker, model, files = files.len(), "files: a new model version: answering every live row again");
        }
        for (name, m) in self.known.iter_mut() {
            if files.contains(name) {
                m.version = RECOMPUTE_TAG.into();
            }
        }
        self.recompute = Some(Recompute { model: model.to_string(), files });
        // List at the next poll: the files whose tag was cleared are read again.
        self.listed_at = None;
        self.finish_recompute();
    }
}

/// How often a file being read stores how far it got.
const PARTIAL_EVERY: Duration = Duration::from_secs(30);

impl FilesSource {
    /// Stores the manifest of the file being read as far as it got (nothing is gone before the
    /// read ends; the file keeps its old version, so it is read again after a restart).
    fn store_partial(&mut self) {
        let Some(r) = self.current.as_mut() else { return };
        let Some(diff) = r.diff.as_mut() else { return };
        r.partial_at = Instant::now();
        let durable = diff.durable_so_far();
        let (scope, shard) = (self.scope.clone(), r.name.to_string());
        if let Some(base) = durable.base {
            self.ready.push(Checkpoint { scope: scope.clone(), shard: shard.clone(), position: base });
        }
        self.ready.push(Checkpoint { scope: changes_scope(&scope), shard, position: durable.changes });
    }
}

impl SourceConnector for FilesConfig {
    const TYPE: &'static str = "files";
    const ABOUT: &'static str = "files in a folder or a bucket (S3, GCS), read once or watched; only changed rows are recomputed";
    fn check(&self) -> Result<(), ConfigError> {
        self.check_fields().map_err(ConfigError::from)
    }
    fn bounded(&self) -> bool {
        !self.watch
    }
    fn factory(&self, _pipeline: &str, _runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError> {
        Ok(Arc::new(FilesFactory::new(self.clone())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_field_is_found_quoted_or_not() {
        assert_eq!(nth_field(b"a,b,c", 1).as_deref(), Some("b"));
        assert_eq!(nth_field(b"\"x,\"\"y\"\"\",z", 0).as_deref(), Some("x,\"y\""));
        assert_eq!(nth_field(b"\"x,\"\"y\"\"\",z", 1).as_deref(), Some("z"));
        assert_eq!(nth_field(b"a,,c", 1).as_deref(), Some(""));
        assert_eq!(nth_field(b"a,b", 2), None);
    }

    fn drain(source: &mut Box<dyn Source>) -> (Vec<RawRecord>, Vec<Checkpoint>) {
        let mut all = Vec::new();
        for _ in 0..1000 {
            let mut out = Vec::new();
            let p = source.poll(0, 7, &mut out).unwrap();
            all.extend(out);
            if p == Poll::Done {
                break;
            }
        }
        (all, source.checkpoint(0))
    }

    fn ids(records: &[RawRecord], delete: bool) -> Vec<String> {
        let mut v: Vec<String> =
            records.iter().filter(|r| matches!(r.body, Body::Delete) == delete).map(|r| String::from_utf8(r.id.clone().unwrap()).unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_rerun_supplies_only_what_changed_since_the_stored_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let rows: String = (0..50).map(|i| format!("r{i},question {i},context {i}\n")).collect();
        std::fs::write(dir.path().join("a.csv"), format!("id,question,context\n{rows}")).unwrap();
        std::fs::write(dir.path().join("b.csv"), "question,context\nq1,c1\nq2,c2\nq1,c1\n").unwrap();
        let config = config(dir.path(), false);
        let factory = FilesFactory::new(config).unwrap();
        let (first, cps) = drain(&mut factory.build(0, 1, &[]).unwrap());
        assert_eq!(first.len(), 53, "every row of both files");
        assert_eq!(cps.iter().filter(|c| c.shard.ends_with(".csv")).count(), 4, "a base manifest and its changes per file");
        assert_eq!(cps.len(), 6, "and the era of the workers and this worker's mark that its manifests are stored");
        assert_eq!(ids(&first, false).iter().filter(|i| i.starts_with("b.csv#")).count(), 3);
        // Edit one row, insert one at the top, remove one; add a row to b at the top.
        let mut edited: Vec<String> = (0..50).map(|i| format!("r{i},question {i},context {i}")).collect();
        edited[7] = "r7,question 7,a new context".into();
        edited.remove(30);
        edited.insert(0, "new,question,context".into());
        std::fs::write(dir.path().join("a.csv"), format!("id,question,context\n{}\n", edited.join("\n"))).unwrap();
        std::fs::write(dir.path().join("b.csv"), "question,context\nq0,c0\nq1,c1\nq2,c2\nq1,c1\n").unwrap();
        let (second, cps2) = drain(&mut factory.build(0, 1, &cps).unwrap());
        let upserts = ids(&second, false);
        assert_eq!(upserts.len(), 3, "r7, new, and b's new row: {upserts:?}");
        assert!(upserts.contains(&"r7".to_string()) && upserts.contains(&"new".to_string()));
        assert_eq!(ids(&second, true), vec!["r30".to_string()]);
        // Remove b: its three rows are deleted; nothing else runs.
        std::fs::remove_file(dir.path().join("b.csv")).unwrap();
        let mut stored = cps.clone();
        stored.extend(cps2);
        let latest: HashMap<(String, String), Checkpoint> = stored.into_iter().map(|c| ((c.scope.clone(), c.shard.clone()), c)).collect();
        let (third, cps3) = drain(&mut factory.build(0, 1, &latest.into_values().collect::<Vec<_>>()).unwrap());
        assert!(ids(&third, false).is_empty());
        assert_eq!(ids(&third, true).len(), 4, "b's four rows: {:?}", ids(&third, true));
        let b: Vec<&str> = cps3.iter().filter(|c| c.shard == "b.csv").map(|c| c.position.as_str()).collect();
        assert_eq!(b, vec!["", ""], "b's base and changes are cleared");
    }

    fn config(dir: &std::path::Path, watch: bool) -> FilesConfig {
        FilesConfig {
            path: dir.display().to_string(),
            format: Format::Csv,
            watch,
            poll_ms: 1,
            settle_ms: 0,
            epoch_ms: 100,
            suffix: None,
            endpoint: None,
            region: None,
            credentials_file: None,
            max_field_bytes: 1000,
            allow_empty_root: false,
        }
    }

    /// What the sinks hold after `records`: each answered ID's original bytes.
    fn apply(answers: &mut std::collections::BTreeMap<String, Vec<u8>>, records: &[RawRecord]) {
        for r in records {
            let Some(id) = &r.id else { continue };
            let id = String::from_utf8(id.clone()).unwrap();
            match r.body {
                Body::Delete => assert!(answers.remove(&id).is_some(), "a delete of {id}, which has no answer"),
                _ => {
                    answers.insert(id, r.bytes.clone());
                }
            }
        }
    }

    /// Polls a watching source until it has read every file it lists as it is now.
    fn catch_up(src: &mut FilesSource, budget: usize) -> Vec<RawRecord> {
        let mut all = Vec::new();
        for _ in 0..100_000 {
            let mut out = Vec::new();
            let p = src.poll(0, budget, &mut out).unwrap();
            all.extend(out);
            src.checkpoint(0);
            if matches!(p, Poll::Idle(_)) && src.current.is_none() && src.queue.is_empty() && src.settling.is_empty() {
                let listed = src.store.list(&src.suffix).unwrap();
                if listed.len() == src.known.len() && listed.iter().all(|l| src.known.get(&l.name).is_some_and(|m| m.version == l.tag)) {
                    return all;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the source never caught up with its folder");
    }

    #[test]
    fn random_edits_of_csv_bytes_leave_exactly_the_answers_of_a_fresh_read() {
        use std::collections::{BTreeMap, BTreeSet};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, header: &str, lines: &[(String, &str)]| {
            let mut text = format!("{header}\n");
            for (line, end) in lines {
                text.push_str(line);
                text.push_str(end);
            }
            let tmp = dir.path().join(".tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.path().join(name)).unwrap();
        };
        let mut g = lcg(7);
        // `named.csv` has an `id` column; `plain.csv` has none and many exact duplicates.
        let mut named: Vec<(String, &str)> = (0..400).map(|i| (format!("r{i},{},{}", i % 7, i * 3), "\n")).collect();
        let mut plain: Vec<(String, &str)> = (0..300).map(|i| (format!("{},{}", i % 11, i % 5), "\n")).collect();
        let mut next = 1000;
        let mut live = FilesFactory::new(config(dir.path(), true)).unwrap().open(0, 1, &[]).unwrap();
        let mut answers = BTreeMap::new();
        let mut before: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for round in 0..25 {
            write("named.csv", "id,x,y", &named);
            write("plain.csv", "x,y", &plain);
            let supplied = catch_up(&mut live, 1 + g(64));
            apply(&mut answers, &supplied);
            let now = fresh_answers(dir.path());
            let differ: Vec<&String> = answers.keys().chain(now.keys()).filter(|k| answers.get(*k) != now.get(*k)).collect();
            assert!(differ.is_empty(), "round {round}: the answers differ from a fresh read's at {differ:?}");
            // Exactly the rows that differ were supplied.
            let upserts: BTreeSet<String> = supplied
                .iter()
                .filter(|r| r.id.is_some() && !matches!(r.body, Body::Delete))
                .map(|r| String::from_utf8(r.id.clone().unwrap()).unwrap())
                .collect();
            let deletes: BTreeSet<String> =
                supplied.iter().filter(|r| matches!(r.body, Body::Delete)).map(|r| String::from_utf8(r.id.clone().unwrap()).unwrap()).collect();
            let want_upserts: BTreeSet<String> = now.iter().filter(|(k, v)| before.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect();
            let want_deletes: BTreeSet<String> = before.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
            assert_eq!(upserts, want_upserts, "round {round}: rows supplied");
            assert_eq!(deletes, want_deletes, "round {round}: rows deleted");
            before = now;
            // The next versions: edits, deletes, inserts, exact duplicates, blank lines, CRLF
            // line ends, quoted line breaks, bad rows, a moved run of rows, a last line without
            // its line end.
            for lines in [&mut named, &mut plain] {
                let is_named = lines[0].0.starts_with('r');
                let mut fresh_line = |g: &mut dyn FnMut(usize) -> usize| -> String {
                    next += 1;
                    if is_named {
                        format!("r{next},{},{}", g(5), g(100))
                    } else {
                        format!("{},{}", g(11), g(5))
                    }
                };
                for _ in 0..g(4) {
                    let i = g(lines.len());
                    lines[i].0 = if is_named {
                        let id = lines[i].0.split(',').next().unwrap().to_string();
                        format!("{id},{},{}", g(5), 100 + g(100))
                    } else {
                        format!("{},{}", g(11), g(5))
                    };
                }
                for _ in 0..g(3) {
                    if lines.len() > 20 {
                        lines.remove(g(lines.len()));
                    }
                }
                for _ in 0..g(3) {
                    let line = fresh_line(&mut g);
                    lines.insert(g(lines.len() + 1), (line, "\n"));
                }
                match g(12) {
                    0 => {
                        let dup = lines[g(lines.len())].clone();
                        lines.insert(g(lines.len() + 1), dup);
                    }
                    1 => lines.insert(g(lines.len() + 1), (String::new(), "\n")),
                    2 => {
                        let i = g(lines.len());
                        lines[i].1 = "\r\n";
                    }
                    3 => {
                        let id = if is_named { format!("q{next},") } else { String::new() };
                        next += 1;
                        lines.insert(g(lines.len() + 1), (format!("{id}\"two\nlines\",1"), "\n"));
                    }
                    4 => lines.insert(g(lines.len() + 1), ("bad".into(), "\n")),
                    5 if lines.len() > 60 => {
                        let at = g(lines.len() - 40);
                        let run: Vec<(String, &str)> = lines.drain(at..at + 30).collect();
                        let to = g(lines.len() + 1);
                        for (k, l) in run.into_iter().enumerate() {
                            lines.insert(to + k, l);
                        }
                    }
                    6 => {
                        let last = lines.len() - 1;
                        lines[last].1 = if lines[last].1.is_empty() { "\n" } else { "" };
                    }
                    // A quote that opens and never closes, or one that closes a quote
                    // opened rows above: the framing of the rows around it changes.
                    9 => lines.insert(g(lines.len() + 1), (if is_named { "q,\"open".to_string() } else { "\"open,1".to_string() }, "\n")),
                    10 => {
                        let i = g(lines.len());
                        lines[i].0.push('"');
                    }
                    // The last line goes on (when it has no line end, its old bytes are a
                    // prefix of the new ones).
                    7 | 8 => {
                        let last = lines.len() - 1;
                        lines[last].0.push('7');
                    }
                    _ => {}
                }
                // Only the last line may lack its line end.
                let last = lines.len() - 1;
                for l in lines[..last].iter_mut().filter(|l| l.1.is_empty()) {
                    l.1 = "\n";
                }
            }
        }
        // About 17,000 rows are read again over the rounds; small budgets and edits cut blocks short.
        assert!(live.passed_over > 5_000, "unchanged blocks are passed over: {} rows", live.passed_over);
    }

    /// The answers of a fresh one-shot read of `dir`.
    fn fresh_answers(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut src = FilesFactory::new(config(dir, false)).unwrap().open(0, 1, &[]).unwrap();
        let mut answers = std::collections::BTreeMap::new();
        loop {
            let mut out = Vec::new();
            let p = src.poll(0, 1000, &mut out).unwrap();
            apply(&mut answers, &out);
            if p == Poll::Done {
                return answers;
            }
        }
    }

    #[test]
    fn after_a_row_moves_to_the_top_the_rest_of_the_file_is_still_passed_over_in_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let put = |rows: &[String]| {
            std::fs::write(dir.path().join(".tmp"), format!("id,v\n{}\n", rows.join("\n"))).unwrap();
            std::fs::rename(dir.path().join(".tmp"), dir.path().join("m.csv")).unwrap();
        };
        let mut rows: Vec<String> = (0..800).map(|i| format!("r{i},{i}")).collect();
        let mut live = FilesFactory::new(config(dir.path(), true)).unwrap().open(0, 1, &[]).unwrap();
        put(&rows);
        assert_eq!(catch_up(&mut live, 1000).len(), 800);
        let last = rows.pop().unwrap();
        rows.insert(0, last);
        put(&rows);
        let before = live.passed_over;
        assert!(catch_up(&mut live, 1000).is_empty(), "a moved row is unchanged");
        assert!(live.passed_over - before > 700, "{} of 800 rows passed over", live.passed_over - before);
    }

    #[test]
    fn a_quote_closed_below_a_block_reframes_the_rows_it_swallows() {
        // Row 1 opens a quote that never closes: it is refused and the rows below it stand. When
        // a quote is added further down, a fresh read sees one long record instead: a block
        // holding row 1 would hide that, since its bytes did not change.
        let dir = tempfile::tempdir().unwrap();
        let put = |text: &str| {
            std::fs::write(dir.path().join(".tmp"), text).unwrap();
            std::fs::rename(dir.path().join(".tmp"), dir.path().join("q.csv")).unwrap();
        };
        let rows: Vec<String> = (2..60).map(|i| format!("{i},b{i}")).collect();
        let v1 = format!("id,v\n1,\"a\n{}\n", rows.join("\n"));
        let v2 = v1.replace("\n40,b40\n", "\n40,b40\"\n");
        let mut live = FilesFactory::new(config(dir.path(), true)).unwrap().open(0, 1, &[]).unwrap();
        let mut answers = std::collections::BTreeMap::new();
        for (round, text) in [v1, v2].into_iter().enumerate() {
            put(&text);
            apply(&mut answers, &catch_up(&mut live, 1000));
            let now = fresh_answers(dir.path());
            let differ: Vec<&String> = answers.keys().chain(now.keys()).filter(|k| answers.get(*k) != now.get(*k)).collect();
            assert!(differ.is_empty(), "round {round}: the answers differ from a fresh read's at {differ:?}");
        }
        assert!(!answers.contains_key("20"), "row 20 is inside the quoted field now");
    }

    /// A small deterministic generator: `g(n)` is in `0..n`.
    fn lcg(seed: u64) -> impl FnMut(usize) -> usize {
        let mut x = seed;
        move |n| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as usize) % n.max(1)
        }
    }

    #[test]
    fn every_worker_reads_every_file_and_answers_only_its_own_rows() {
        let dir = tempfile::tempdir().unwrap();
        let rows: String = (0..200).map(|i| format!("r{i},{i}\n")).collect();
        std::fs::write(dir.path().join("a.csv"), format!("id,v\n{rows}")).unwrap();
        std::fs::write(dir.path().join("b.csv"), "v\n1\n2\n3\n1\n").unwrap();
        let factory = FilesFactory::new(config(dir.path(), false)).unwrap();
        let (w0, _) = drain(&mut factory.build(0, 2, &[]).unwrap());
        let (w1, _) = drain(&mut factory.build(1, 2, &[]).unwrap());
        let (a, b) = (ids(&w0, false), ids(&w1, false));
        assert!(a.len() > 60 && b.len() > 60, "both workers answer rows: {} and {}", a.len(), b.len());
        assert!(a.iter().all(|id| !b.contains(id)), "no row is answered twice");
        let mut all: Vec<String> = a.into_iter().chain(b).collect();
        all.sort();
        assert_eq!(all.len(), 204, "every row of both files once");
    }
}
