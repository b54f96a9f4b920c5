//! The models `sluice serve` answers online, and their versions: a model repository (a folder
//! per version) or a single watched file. It owns which version serves, loading a new one
//! (checked by the engine before it is swapped in), unloading, and the watcher that loads a new
//! version when one appears. A version that fails is refused with its reason and the old one
//! keeps serving.

use crate::serve::config::ModelConfig;
use sluice::engine::Engine;
use sluice::online::{OnlineModel, OnlineSettings};
use sluice::topology::Topology;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A model file's identity on disk: when it was written and its length.
type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// One served model.
pub struct Served {
    pub name: String,
    pub model: Arc<dyn OnlineModel>,
    /// The template it runs with.
    pub template: String,
    /// The name in its answers' labels (`name@version`): the served name for a repository, the
    /// task's model name for a single file (as `sluice run` labels it).
    label_name: String,
    repository: Option<PathBuf>,
    /// The model file: the template's, or its file name inside each version folder.
    file: PathBuf,
    /// The file the model's service started on (the repository's version then): the one a
    /// pipeline on the same model names, to share the service.
    pub started_on: PathBuf,
    watch: bool,
    state: Mutex<State>,
}

/// What serves now, and what was last refused.
struct State {
    ready: bool,
    version: String,
    path: PathBuf,
    stamp: Option<Stamp>,
    /// A version loaded by name: the watcher keeps it rather than the newest.
    pinned: Option<String>,
    /// The last version refused, its file's stamp (not tried again until it changes) and why.
    refused: Option<(String, Option<Stamp>, String)>,
}

/// A model's state for the repository index and metadata routes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelView {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub versions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Served {
    /// Starts serving `name` on `template`'s task: the repository's newest version or the
    /// template's model file. With a repository, the template is pointed at that version's
    /// file, so that jobs from it share the model's service (and follow its versions).
    pub fn start(engine: &Engine, name: &str, config: &ModelConfig, template: &str, topology: &mut Topology) -> anyhow::Result<Served> {
        let file = topology.task.model().to_path_buf();
        let file_name = file.file_name().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("model.onnx"));
        let settings = OnlineSettings { max_queue: config.max_queue };
        let newest = match &config.repository {
            None => None,
            Some(repo) => {
                let Some(v) = repo_versions(repo, &file_name).pop() else {
                    anyhow::bail!("models.{name}.repository: {} has no version folder (1/, 2/, …) holding {}", repo.display(), file_name.display());
                };
                // The service is keyed by its model file: start it on the version's, and point
                // the template there so its jobs share it.
                topology.task.set_model(repo.join(&v).join(&file_name));
                Some(v)
            }
        };
        let model = engine.online(topology, settings)?;
        let path = topology.task.model().to_path_buf();
        let label = model.info().label;
        let (label_name, version) = match newest {
            Some(v) => {
                model.load_version(&path, &format!("{name}@{v}")).map_err(|e| anyhow::anyhow!("models.{name}: version {v}: {e}"))?;
                (name.to_string(), v)
            }
            None => {
                let (n, v) = label.split_once('@').unwrap_or((&label, ""));
                (n.to_string(), v.to_string())
            }
        };
        Ok(Served {
            name: name.to_string(),
            model,
            template: template.to_string(),
            label_name,
            repository: config.repository.clone(),
            started_on: path.clone(),
            file,
            watch: config.watch,
            state: Mutex::new(State { ready: true, version, stamp: stamp(&path), path, pinned: None, refused: None }),
        })
    }

    /// The template's model file (for a repository, the name each version's file has).
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn file_name(&self) -> &Path {
        self.file.file_name().map(Path::new).unwrap_or(Path::new("model.onnx"))
    }

    fn version_path(&self, version: &str) -> PathBuf {
        match &self.repository {
            Some(repo) => repo.join(version).join(self.file_name()),
            None => self.file.clone(),
        }
    }

    /// The versions on disk, oldest first: the repository's numbered folders that hold the
    /// model file, or the one version of a single file.
    pub fn versions(&self) -> Vec<String> {
        match &self.repository {
            Some(repo) => repo_versions(repo, self.file_name()),
            None => vec![lock(&self.state).version.clone()],
        }
    }

    pub fn ready(&self) -> bool {
        lock(&self.state).ready
    }

    pub fn version(&self) -> String {
        lock(&self.state).version.clone()
    }

    pub fn view(&self) -> ModelView {
        let versions = self.versions();
        let s = lock(&self.state);
        ModelView {
            name: self.name.clone(),
            version: s.version.clone(),
            state: if s.ready { "READY" } else { "UNAVAILABLE" },
            versions,
            reason: s.refused.as_ref().map(|(v, _, why)| format!("version {v} refused: {why}")),
        }
    }

    /// Loads `version` (the newest when `None`, which also unpins) and makes the model ready.
    /// A version that fails to load or check is refused and the serving one stays.
    pub fn load(&self, version: Option<&str>) -> Result<String, String> {
        let version = match version {
            Some(v) => {
                if self.repository.is_some() && !self.versions().iter().any(|x| x == v) {
                    return Err(format!("model `{}` has no version `{v}` (it has {:?})", self.name, self.versions()));
                }
                if self.repository.is_none() && v != self.version() {
                    return Err(format!("model `{}` is a single file: its only version is `{}`", self.name, self.version()));
                }
                Some(v.to_string())
            }
            None => None,
        };
        lock(&self.state).pinned = version.clone();
        let version = match version {
            Some(v) => v,
            None if self.repository.is_some() => self.versions().pop().ok_or_else(|| format!("model `{}` has no version on disk", self.name))?,
            None => self.file_version()?,
        };
        self.swap_to(&version)?;
        lock(&self.state).ready = true;
        Ok(version)
    }

    /// Stops answering online requests (404 until loaded again); jobs on the model go on.
    pub fn unload(&self) {
        lock(&self.state).ready = false;
    }

    /// A single file's version: the first 12 hex digits of its SHA-256.
    fn file_version(&self) -> Result<String, String> {
        let label = sluice::tasks::model_label(&self.label_name, &self.file).map_err(|e| e.to_string())?;
        Ok(label.split_once('@').map_or("", |(_, v)| v).to_string())
    }

    fn swap_to(&self, version: &str) -> Result<(), String> {
        let path = self.version_path(version);
        let at = stamp(&path);
        match self.model.load_version(&path, &format!("{}@{version}", self.label_name)) {
            Ok(label) => {
                tracing::info!(model = %label, "serving version {version}");
                let mut s = lock(&self.state);
                (s.version, s.stamp, s.path, s.refused) = (version.to_string(), at, path, None);
                Ok(())
            }
            Err(why) => {
                tracing::warn!(model = %self.name, "version {version} refused, the old one keeps serving: {why}");
                lock(&self.state).refused = Some((version.to_string(), at, why.clone()));
                Err(why)
            }
        }
    }

    /// The watcher's check: a newer version folder, or the serving file rewritten, is loaded;
    /// one refused is not tried again until its file changes.
    fn poll(&self) {
        let (ready, pinned, version, current_stamp, refused) = {
            let s = lock(&self.state);
            (s.ready, s.pinned.clone(), s.version.clone(), s.stamp, s.refused.clone())
        };
        if !self.watch || !ready {
            return;
        }
        let want = match (&self.repository, pinned) {
            (Some(_), Some(p)) => p,
            (Some(_), None) => match self.versions().pop() {
                Some(v) => v,
                None => return,
            },
            (None, _) => version.clone(),
        };
        let path = self.version_path(&want);
        let on_disk = stamp(&path);
        if on_disk.is_none() || (want == version && on_disk == current_stamp) {
            return;
        }
        if let Some((v, at, _)) = &refused {
            if *v == want && *at == on_disk {
                return;
            }
        }
        // A rewritten single file is a new version, named by its digest.
        let want = if self.repository.is_none() {
            match self.file_version() {
                Ok(v) => v,
                Err(_) => return,
            }
        } else {
            want
        };
        // A file being written may not load yet: refused now, tried again when it changes.
        let _ = self.swap_to(&want);
    }
}

/// A repository's numbered folders that hold the model file, oldest first.
fn repo_versions(repo: &Path, file_name: &Path) -> Vec<String> {
    let mut found: Vec<u64> = std::fs::read_dir(repo)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .filter(|v| repo.join(v.to_string()).join(file_name).is_file())
        .collect();
    found.sort_unstable();
    found.into_iter().map(|v| v.to_string()).collect()
}

/// Checks every watched model every `every` while the server holds them: the watcher keeps no
/// model alive (a model's inference service stops once nothing holds it, at shutdown).
pub fn watch(models: Vec<Arc<Served>>, every: Duration) {
    if !models.iter().any(|m| m.watch) {
        return;
    }
    let models: Vec<std::sync::Weak<Served>> = models.iter().map(Arc::downgrade).collect();
    let _ = std::thread::Builder::new().name("sluice-model-watch".into()).spawn(move || loop {
        std::thread::sleep(every);
        let mut alive = 0;
        for m in models.iter().filter_map(std::sync::Weak::upgrade) {
            alive += 1;
            m.poll();
        }
        if alive == 0 {
            return;
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
