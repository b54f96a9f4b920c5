//! The server's jobs: their records in the state store (`jobs/<id>/job.json` in the state
//! folder, or a Postgres table; rewritten on every change and every second of progress), the queue that runs at most
//! `max_running_jobs` at once on the engine, and the restart that puts every job that was
//! enqueued or running back in the queue. Each job writes its answers and dead letters as JSON
//! lines to `jobs/<id>/out/` besides its template's sinks; a resumable source (an uploaded
//! file, read through the files connector) resumes from the checkpoints stored there.

use crate::serve::config::ServeConfig;
use crate::serve::store::{FileStore, PgStore, RecordStore};
use serde::{Deserialize, Serialize};
use sluice::engine::{Engine, Job, JobOptions, JobStatus};
use sluice::source::SourceError;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// What the state folder keeps of a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub status: JobStatus,
    /// The template it was made from, if any.
    pub template: Option<String>,
    pub pipeline: String,
    /// The whole topology, as TOML: what a restart runs again.
    pub topology: String,
    /// Where its records come from, for people.
    pub source: String,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub read: u64,
    pub answered: u64,
    pub dead_letters: u64,
    /// Records the source will read, once known.
    pub total: Option<u64>,
    /// The uploaded file's size.
    pub bytes_total: Option<u64>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    /// The uploaded file it reads, removed with the job.
    pub upload: Option<PathBuf>,
    /// Times the job was started (more than one after a restart of the server).
    #[serde(default)]
    pub attempts: u32,
}

/// Why a job cannot be accepted or found.
#[derive(Debug)]
pub enum JobsError {
    /// The request's fault: the message and a hint.
    Invalid(String, String),
    NotFound(String),
    /// The queue is full.
    Full(usize),
    /// A system the job needs cannot be reached for now.
    Unavailable(String),
    Internal(String),
}

pub struct Jobs {
    pub config: ServeConfig,
    engine: Engine,
    dir: PathBuf,
    store: Box<dyn RecordStore>,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    records: BTreeMap<String, JobRecord>,
    queue: VecDeque<String>,
    running: HashMap<String, Job>,
    /// Idempotency keys and the job each made.
    keys: HashMap<String, String>,
    /// Jobs whose cancel came while they were running.
    canceling: std::collections::HashSet<String>,
    /// The last time each running job's record was written.
    saved: HashMap<String, std::time::Instant>,
    /// What each running job's earlier attempts left durable (answers, dead letters): a
    /// resumed job counts on from there.
    base: HashMap<String, (u64, u64)>,
    stopping: bool,
}

impl Jobs {
    /// Opens the state folder and puts back in the queue every job a previous server left
    /// enqueued or running.
    pub fn open(config: ServeConfig, engine: Engine) -> anyhow::Result<Arc<Jobs>> {
        let dir = config.state.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("cannot create the state folder {}: {e}", dir.display()))?;
        std::fs::create_dir_all(config.state.join("uploads")).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", config.state.display()))?;
        let store: Box<dyn RecordStore> = match &config.state_store {
            Some(s) => Box::new(PgStore::open(s)?),
            None => Box::new(FileStore { dir: dir.clone() }),
        };
        tracing::info!("job records in the {}", store.describe());
        let mut state = State::default();
        for record in store.load()? {
            if let Some(k) = &record.idempotency_key {
                state.keys.insert(k.clone(), record.id.clone());
            }
            state.records.insert(record.id.clone(), record);
        }
        // Ids sort by creation time: the queue keeps the order jobs came in.
        let resumed: Vec<String> = state.records.values().filter(|r| !r.status.is_final()).map(|r| r.id.clone()).collect();
        for id in &resumed {
            if let Some(r) = state.records.get_mut(id) {
                r.status = JobStatus::Enqueued;
            }
            state.queue.push_back(id.clone());
        }
        if !resumed.is_empty() {
            tracing::info!(jobs = resumed.len(), "resuming the jobs a previous server left unfinished");
        }
        let jobs = Arc::new(Jobs { config, engine, dir, store, state: Mutex::new(state), wake: Condvar::new() });
        for id in &resumed {
            jobs.save(&lock(&jobs.state).records[id]);
        }
        let runner = jobs.clone();
        std::thread::Builder::new().name("sluice-jobs".into()).spawn(move || runner.run_queue())?;
        Ok(jobs)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A job's folder.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Where a job's own answers go.
    pub fn out_dir(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("out")
    }

    /// Accepts a job: checks its topology, records it, and queues it. With an idempotency key
    /// already seen, the job that key made.
    pub fn submit(
        &self,
        mut topology_text: String,
        template: Option<String>,
        key: Option<String>,
        upload: Option<(PathBuf, u64)>,
    ) -> Result<JobRecord, JobsError> {
        let mut state = lock(&self.state);
        if let Some(k) = &key {
            if let Some(id) = state.keys.get(k) {
                return Ok(state.records[id].clone());
            }
        }
        if state.queue.len() >= self.config.limits.max_queued_jobs {
            return Err(JobsError::Full(self.config.limits.max_queued_jobs));
        }
        let topology =
            sluice::registry::parse("job topology", &topology_text).map_err(|e| JobsError::Invalid(format!("{}: {}", e.field, e.message), e.hint.clone()))?;
        if !topology.source.bounded() {
            return Err(JobsError::Invalid(
                "`source`: a job needs a finite source".into(),
                "use a csv, parquet or files source (watch = false) or a generator with a count; streams run as `pipelines` of the serve config".into(),
            ));
        }
        // A source that cannot be opened (no file matches, a bad bucket URL) is refused now,
        // not queued to fail; one whose system is unreachable for now, too, with 503.
        let source = match topology.source.factory(&topology.name, &topology.runtime) {
            Ok(f) => f.describe(),
            Err(SourceError::Config(m)) => {
                return Err(JobsError::Invalid(
                    format!("`source`: {m}"),
                    "check the source's path, bucket or names; the server reads them from its own machine".into(),
                ))
            }
            Err(SourceError::Transient(m)) => return Err(JobsError::Unavailable(format!("`source`: {m}"))),
        };
        // The topology as the job will run it, so that a restart runs the same.
        topology_text = normalize(&topology_text).map_err(|e| JobsError::Invalid(e, "send the topology as TOML".into()))?;
        let id = new_id();
        let record = JobRecord {
            id: id.clone(),
            status: JobStatus::Enqueued,
            template,
            pipeline: topology.name.clone(),
            topology: topology_text,
            source,
            created_ms: sluice::record::now_ms(),
            started_ms: None,
            finished_ms: None,
            read: 0,
            answered: 0,
            dead_letters: 0,
            total: None,
            bytes_total: upload.as_ref().map(|u| u.1),
            error: None,
            idempotency_key: key.clone(),
            upload: upload.map(|u| u.0),
            attempts: 0,
        };
        std::fs::create_dir_all(self.job_dir(&id)).map_err(|e| JobsError::Internal(format!("cannot create the job's folder: {e}")))?;
        self.save(&record);
        if let Some(k) = key {
            state.keys.insert(k, id.clone());
        }
        state.records.insert(id.clone(), record.clone());
        state.queue.push_back(id);
        self.wake.notify_all();
        Ok(record)
    }

    /// The job an idempotency key made, if any.
    pub fn by_key(&self, key: &str) -> Option<JobRecord> {
        let id = lock(&self.state).keys.get(key).cloned()?;
        self.get(&id)
    }

    /// A job's record, with its live counts.
    pub fn get(&self, id: &str) -> Option<JobRecord> {
        let mut state = lock(&self.state);
        let live = state.running.get(id).map(|j| j.snapshot());
        let base = state.base.get(id).copied().unwrap_or_default();
        let r = state.records.get_mut(id)?;
        if let Some(s) = live {
            apply(r, &s, base);
        }
        Some(r.clone())
    }

    /// Every record, oldest first, with live counts.
    pub fn list(&self) -> Vec<JobRecord> {
        let ids: Vec<String> = lock(&self.state).records.keys().cloned().collect();
        ids.iter().filter_map(|id| self.get(id)).collect()
    }

    /// Cancels a job: an enqueued one at once, a running one once it has drained.
    pub fn cancel(&self, id: &str) -> Result<JobRecord, JobsError> {
        let mut state = lock(&self.state);
        if !state.records.contains_key(id) {
            return Err(JobsError::NotFound(id.to_string()));
        }
        if let Some(job) = state.running.get(id) {
            job.cancel();
            state.canceling.insert(id.to_string());
        } else if state.records[id].status == JobStatus::Enqueued {
            state.queue.retain(|q| q != id);
            let r = state.records.get_mut(id).expect("checked above");
            r.status = JobStatus::Canceled;
            r.finished_ms = Some(sluice::record::now_ms());
            let r = r.clone();
            self.save(&r);
        }
        drop(state);
        self.wake.notify_all();
        Ok(self.get(id).expect("checked above"))
    }

    /// Stops taking jobs; running ones drain (and stay `running` in their records, so the next
    /// server resumes them).
    pub fn stop(&self) {
        lock(&self.state).stopping = true;
        self.engine.stop();
        self.wake.notify_all();
    }

    /// Waits until no job runs (after [`Jobs::stop`]).
    pub fn wait_stopped(&self) {
        while !lock(&self.state).running.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn save(&self, record: &JobRecord) {
        if let Err(e) = self.store.save(record) {
            tracing::error!(job = %record.id, "cannot write the job's record to the {}: {e}", self.store.describe());
        }
    }

    /// The queue's loop: starts jobs while there is room, follows the running ones, and writes
    /// their records.
    fn run_queue(self: Arc<Self>) {
        let mut state = lock(&self.state);
        loop {
            // Follow the running jobs.
            let ids: Vec<String> = state.running.keys().cloned().collect();
            let mut compact = Vec::new();
            for id in ids {
                let snap = state.running[&id].snapshot();
                let due = state.saved.get(&id).is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                // The engine's stop flag is set by the signal itself, before any job can drain
                // because of it.
                let stopping = state.stopping || self.engine.stopping();
                let canceled = state.canceling.contains(&id);
                let base = state.base.get(&id).copied().unwrap_or_default();
                let Some(r) = state.records.get_mut(&id) else { continue };
                apply(r, &snap, base);
                if snap.status.is_final() {
                    // A job stopped by the server's own stop is not done: the next server resumes it.
                    if snap.status == JobStatus::Succeeded && r.attempts > 1 && !stopping {
                        compact.push(id.clone());
                        continue;
                    }
                    if stopping && !canceled && snap.status != JobStatus::Failed {
                        r.status = JobStatus::Running;
                    } else {
                        r.status = snap.status;
                        r.finished_ms = Some(sluice::record::now_ms());
                        r.error = snap.error.clone();
                    }
                    let r = r.clone();
                    self.save(&r);
                    state.running.remove(&id);
                    state.saved.remove(&id);
                    state.base.remove(&id);
                    state.canceling.remove(&id);
                    tracing::info!(job = %id, status = r.status.as_str(), answered = r.answered, "job ended");
                } else if due {
                    let r = r.clone();
                    self.save(&r);
                    state.saved.insert(id.clone(), std::time::Instant::now());
                }
            }
            // A job that ran more than once may hold an ID's answer twice (a file read again from
            // its last stored position): keep each ID's last line, then call it done.
            for id in compact {
                drop(state);
                let counts = compact_answers(&self.out_dir(&id));
                state = lock(&self.state);
                let Some(r) = state.records.get_mut(&id) else { continue };
                match counts {
                    Ok((answers, dead)) => {
                        r.answered = answers;
                        r.dead_letters = dead;
                        r.read = answers + dead;
                        r.status = JobStatus::Succeeded;
                    }
                    Err(e) => {
                        r.status = JobStatus::Failed;
                        r.error = Some(format!("cannot compact the job's answers: {e}"));
                    }
                }
                r.finished_ms = Some(sluice::record::now_ms());
                let r = r.clone();
                self.save(&r);
                state.running.remove(&id);
                state.saved.remove(&id);
                state.base.remove(&id);
                tracing::info!(job = %id, status = r.status.as_str(), answered = r.answered, "job ended");
            }
            // Start what there is room for.
            while !state.stopping && state.running.len() < self.config.limits.max_running_jobs {
                let Some(id) = state.queue.pop_front() else { break };
                let Some(r) = state.records.get(&id).cloned() else { continue };
                // Loading a model takes a while: the records stay readable meanwhile.
                drop(state);
                let started = self.start(&r);
                state = lock(&self.state);
                match started {
                    Ok((job, base)) => {
                        state.base.insert(id.clone(), base);
                        let rec = state.records.get_mut(&id).expect("queued jobs have records");
                        if rec.status == JobStatus::Canceled {
                            // Canceled while its model loaded.
                            job.cancel();
                            state.canceling.insert(id.clone());
                            state.running.insert(id, job);
                            continue;
                        }
                        rec.status = JobStatus::Running;
                        rec.started_ms = Some(sluice::record::now_ms());
                        rec.attempts += 1;
                        let rec = rec.clone();
                        self.save(&rec);
                        state.running.insert(id, job);
                    }
                    Err(e) => {
                        tracing::warn!(job = %id, "job failed at start: {e}");
                        let rec = state.records.get_mut(&id).expect("queued jobs have records");
                        rec.status = JobStatus::Failed;
                        rec.error = Some(e);
                        rec.finished_ms = Some(sluice::record::now_ms());
                        let rec = rec.clone();
                        self.save(&rec);
                    }
                }
            }
            self.retire(&mut state);
            if state.stopping && state.running.is_empty() {
                return;
            }
            state = self.wake.wait_timeout(state, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Runs a job's topology on the engine, with its own answers folder as a sink. Also what
    /// that folder holds once the sinks are open (a resumed job's earlier answers and dead
    /// letters; none for a source that reads everything again, whose files start afresh).
    fn start(self: &Arc<Self>, r: &JobRecord) -> Result<(Job, (u64, u64)), String> {
        let mut topology = sluice::registry::parse("job topology", &r.topology).map_err(|e| e.to_string())?;
        let out = self.out_dir(&r.id);
        // The job's own answers folder, beside its topology's sinks or in place of the default.
        if topology.default_sinks {
            topology.sinks.clear();
        }
        topology.sinks.push(sluice::registry::jsonl(out.clone()));
        let base = Arc::new(Mutex::new((0, 0)));
        let (b, dir) = (base.clone(), out.clone());
        let opened: Arc<dyn Fn() + Send + Sync> = Arc::new(move || *lock(&b) = (count_lines(&dir, "answers"), count_lines(&dir, "dead_letters")));
        // The queue hears of the end at once, so the record says so without a polling delay.
        let me = Arc::downgrade(self);
        let ended: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Some(jobs) = me.upgrade() {
                jobs.wake.notify_all();
            }
        });
        let job =
            self.engine.submit(&r.id, &topology, JobOptions { progress_bar: false, opened: Some(opened), ended: Some(ended) }).map_err(|e| e.to_string())?;
        let base = *lock(&base);
        Ok((job, base))
    }

    /// Removes the oldest finished jobs past `keep_finished_jobs`, and those finished more than
    /// `keep_finished_s` ago, with their records, folders and uploads.
    fn retire(&self, state: &mut State) {
        let finished: Vec<&JobRecord> = state.records.values().filter(|r| r.status.is_final()).collect();
        let excess = finished.len().saturating_sub(self.config.limits.keep_finished_jobs);
        let cutoff = sluice::record::now_ms().saturating_sub(self.config.limits.keep_finished_s.saturating_mul(1000));
        let expired: Vec<String> =
            finished.iter().enumerate().filter(|(i, r)| *i < excess || r.finished_ms.is_some_and(|f| f < cutoff)).map(|(_, r)| r.id.clone()).collect();
        for id in expired {
            if let Err(e) = self.store.remove(&id) {
                tracing::warn!(job = %id, "cannot remove the job's record from the {}: {e}", self.store.describe());
                continue;
            }
            if let Some(r) = state.records.remove(&id) {
                if let Some(k) = &r.idempotency_key {
                    state.keys.remove(k);
                }
                if let Some(u) = &r.upload {
                    let _ = std::fs::remove_file(u);
                }
                let _ = std::fs::remove_dir_all(self.job_dir(&id));
            }
        }
    }
}

/// Copies a snapshot's counts, on top of what earlier attempts left, into a record.
fn apply(r: &mut JobRecord, s: &sluice::engine::JobSnapshot, base: (u64, u64)) {
    r.read = base.0 + base.1 + s.read;
    r.answered = base.0 + s.answered;
    r.dead_letters = base.1 + s.dead_letters;
    if s.total > 0 {
        r.total = Some(s.total);
    }
    // The status is the queue's to change: a job is done once its record is (see `run_queue`).
}

/// Rewrites a finished job's answer files keeping only each ID's last line (dropped entirely
/// when that is a delete), in their order; dead letters are kept as they are. Returns the
/// answers and dead letters it holds then.
fn compact_answers(dir: &Path) -> std::io::Result<(u64, u64)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("answers.w") && n.to_string_lossy().ends_with(".jsonl")))
        .collect();
    files.sort();
    #[derive(serde::Deserialize)]
    struct Line<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
        #[serde(default)]
        op: Option<std::borrow::Cow<'a, str>>,
    }
    // Each ID's last line: (file, line number).
    let mut last: HashMap<String, (usize, usize)> = HashMap::new();
    let mut contents = Vec::with_capacity(files.len());
    for (f, path) in files.iter().enumerate() {
        let bytes = std::fs::read(path)?;
        for (n, line) in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            if let Ok(l) = serde_json::from_slice::<Line>(line) {
                last.insert(l.id.into_owned(), (f, n));
            }
        }
        contents.push(bytes);
    }
    let mut kept = 0u64;
    for (f, path) in files.iter().enumerate() {
        let tmp = path.with_extension("jsonl.compact");
        let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for (n, line) in contents[f].split(|&b| b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            let keep = match serde_json::from_slice::<Line>(line) {
                Ok(l) => last.get(l.id.as_ref()) == Some(&(f, n)) && l.op.as_deref() != Some("delete"),
                Err(_) => false,
            };
            if keep {
                std::io::Write::write_all(&mut out, line)?;
                std::io::Write::write_all(&mut out, b"\n")?;
                kept += 1;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
    }
    Ok((kept, count_lines(dir, "dead_letters")))
}

/// The lines of a job's `<kind>.w*.jsonl` files.
fn count_lines(dir: &Path, kind: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&format!("{kind}.w")) && name.ends_with(".jsonl") {
            if let Ok(bytes) = std::fs::read(e.path()) {
                n += memchr::memchr_iter(b'\n', &bytes).count() as u64;
            }
        }
    }
    n
}

/// The topology's TOML as stored: parsed and written again.
fn normalize(text: &str) -> Result<String, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.message().to_string())?;
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// A template's topology with another source (and the job's pipeline name).
pub fn from_template(template_path: &Path, source: toml::Table) -> Result<String, String> {
    let text = std::fs::read_to_string(template_path).map_err(|e| format!("cannot read the template {}: {e}", template_path.display()))?;
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| format!("{}: {}", template_path.display(), e.message()))?;
    table.insert("source".into(), toml::Value::Table(source));
    // A job's progress goes to its record, not to a metrics port of its own.
    table.remove("metrics");
    toml::to_string(&table).map_err(|e| e.to_string())
}

/// A new job ID: the creation time in ms and a counter, in hex, so IDs sort by age.
fn new_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let salt = twox_hash::XxHash3_64::oneshot(&std::process::id().to_le_bytes()) as u16;
    format!("j{:011x}{:04x}{:04x}", sluice::record::now_ms(), salt, n & 0xffff)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sources_that_end_make_jobs() {
        let bounded = |text: &str| sluice::registry::registry().parse_source(text.parse().unwrap()).unwrap().bounded();
        assert!(bounded("type = \"csv\"\npath = \"a.csv\""));
        assert!(bounded("type = \"files\"\npath = \"a\""));
        assert!(!bounded("type = \"files\"\npath = \"a\"\nwatch = true"));
        assert!(bounded("type = \"generator\"\ncount = 5"));
        assert!(!bounded("type = \"generator\""));
        assert!(!bounded("type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\""));
        assert!(!bounded("type = \"pubsub\"\nsubscription = \"projects/p/subscriptions/s\""));
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = new_id();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_id();
        assert!(a < b, "{a} {b}");
        assert_eq!(a.len(), b.len());
    }
}
