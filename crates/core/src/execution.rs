//! One place that opens every ONNX Runtime session, for every task, from the topology's
//! `[execution]`: the provider (CPU or CUDA), device, threads and device memory; finding the CUDA
//! and cuDNN libraries without `LD_LIBRARY_PATH`; and refusing a CUDA run that cannot use a GPU,
//! naming what is missing and how to install it. It never falls back to the CPU silently.

use crate::inference::InferenceError;
use crate::topology::{ExecutionConfig, Fallback, Provider};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What a task wants of its sessions where the topology leaves it open.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Intra-op threads when `execution.intra_threads` is 0; 0 keeps ONNX Runtime's default
    /// (one per core).
    pub default_intra_threads: usize,
    /// Whether idle intra-op threads spin between runs: worth it for heavy models, a waste of a
    /// core for models that run in microseconds.
    pub spinning: bool,
}

/// An opened session and the provider it runs on.
pub struct Opened {
    pub session: ort::session::Session,
    pub provider: Provider,
}

/// Every session opened in this process: the model file and its provider.
static OPENED: Mutex<Vec<(PathBuf, Provider)>> = Mutex::new(Vec::new());

/// How many sessions this process has opened on `model`, on any provider.
pub fn sessions_opened(model: &Path) -> usize {
    OPENED.lock().map(|o| o.iter().filter(|(p, _)| p == model).count()).unwrap_or(0)
}

/// Opens a session on `model` as `exec` says. With `provider = "cuda"` and no usable GPU this
/// is an [`InferenceError::Library`] naming what is missing, unless `fallback = "cpu"` allows
/// the CPU: then it warns and counts `sluice_execution_fallbacks_total`.
pub fn open(model: &Path, exec: &ExecutionConfig, tuning: Tuning) -> Result<Opened, InferenceError> {
    let opened = match exec.provider {
        Provider::Cpu => open_on(model, exec, tuning, Provider::Cpu)?,
        Provider::Cuda => match open_on(model, exec, tuning, Provider::Cuda) {
            Ok(opened) => opened,
            Err(InferenceError::Library(why)) if exec.fallback == Fallback::Cpu => {
                tracing::warn!("running {} on the CPU, as `execution.fallback = \"cpu\"` allows, because CUDA cannot be used: {why}", model.display());
                metrics::counter!(crate::metrics::EXECUTION_FALLBACKS).increment(1);
                open_on(model, exec, tuning, Provider::Cpu)?
            }
            Err(e) => return Err(e),
        },
    };
    metrics::gauge!(crate::metrics::MODEL_SESSIONS, "provider" => opened.provider.name()).increment(1.0);
    if let Ok(mut o) = OPENED.lock() {
        o.push((model.to_path_buf(), opened.provider));
    }
    Ok(opened)
}

fn open_on(model: &Path, exec: &ExecutionConfig, tuning: Tuning, provider: Provider) -> Result<Opened, InferenceError> {
    let refuse = |reason: String| InferenceError::Load { path: model.to_path_buf(), reason };
    let (env, library) = crate::ortlib::environment_for(provider == Provider::Cuda)?;
    let mut builder = ort::session::Session::builder(env).map_err(|e| refuse(format!("cannot create an ONNX Runtime session: {e}")))?;
    let threads = if exec.intra_threads > 0 { exec.intra_threads } else { tuning.default_intra_threads };
    if threads > 0 {
        builder = builder.with_intra_threads(threads).map_err(|e| refuse(format!("cannot set intra_threads: {e}")))?;
    }
    if !tuning.spinning {
        builder = builder.with_intra_op_spinning(false).map_err(|e| refuse(format!("cannot turn off spinning: {e}")))?;
    }
    if provider == Provider::Cuda {
        prepare_cuda(library)?;
        let mut cuda = ort::ep::CUDA::default().with_device_id(exec.device_id as i32);
        if let Some(mb) = exec.gpu_mem_limit_mb {
            cuda = cuda.with_memory_limit((mb as usize).saturating_mul(1 << 20));
        }
        builder = builder.with_execution_providers([cuda.build().error_on_failure()]).map_err(|e| {
            InferenceError::Library(format!(
                "ONNX Runtime's CUDA provider refused device {}: {e}\n  hint: check that `nvidia-smi` lists GPU {} and that no other process holds all its memory; or set `execution.fallback = \"cpu\"` to run on the CPU instead",
                exec.device_id, exec.device_id
            ))
        })?;
    }
    let session = builder.commit_from_file(model).map_err(|e| refuse(format!("cannot load model {}: {e}", model.display())))?;
    Ok(Opened { session, provider })
}

/// The CUDA 13 libraries ONNX Runtime 1.31's CUDA provider links (`readelf -d
/// libonnxruntime_providers_cuda.so`), dependencies first.
pub const CUDA_LIBRARIES: &[&str] = &["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10"];
/// cuDNN 9, which the provider opens when it creates its streams, then the sub-libraries cuDNN
/// opens itself, and cuFFT (only for FFT operators): the first is required, the rest preloaded
/// when present.
pub const CUDNN_LIBRARIES: &[&str] = &[
    "libcudnn.so.9",
    "libcudnn_graph.so.9",
    "libcudnn_ops.so.9",
    "libcudnn_heuristic.so.9",
    "libcudnn_adv.so.9",
    "libcudnn_cnn.so.9",
    "libcudnn_engines_precompiled.so.9",
    "libcudnn_engines_runtime_compiled.so.9",
    "libcufft.so.12",
];
/// The driver's user-space library.
pub const DRIVER_LIBRARY: &str = "libcuda.so.1";
/// The CUDA provider library that a GPU build of ONNX Runtime has beside `libonnxruntime.so`.
pub const CUDA_PROVIDER_LIBRARY: &str = "libonnxruntime_providers_cuda.so";

/// Folders that may hold the CUDA and cuDNN libraries, in order: `SLUICE_CUDA_LIBS` (a
/// `:`-separated list), the NVIDIA wheels beside the ONNX Runtime that was loaded, the GPU venv's,
/// and those of the system's Python installs (where a PyTorch install puts them).
pub fn library_folders(ort_library: &Path) -> Vec<PathBuf> {
    let mut folders: Vec<PathBuf> =
        std::env::var("SLUICE_CUDA_LIBS").map(|v| v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect()).unwrap_or_default();
    let mut sites: Vec<PathBuf> = Vec::new();
    // .../site-packages/onnxruntime/capi/libonnxruntime.so.X
    if let Some(site) = ort_library.parent().and_then(Path::parent).and_then(Path::parent) {
        sites.push(site.to_path_buf());
    }
    sites.extend(crate::ortlib::venv_site_packages("venv-gpu"));
    for pattern in [
        "/usr/local/lib/python3*/dist-packages",
        "/usr/local/lib/python3*/site-packages",
        "/usr/lib/python3/dist-packages",
        "/opt/conda/lib/python3*/site-packages",
    ] {
        sites.extend(glob::glob(pattern).map(|g| g.flatten().collect::<Vec<_>>()).unwrap_or_default());
    }
    for site in sites {
        for pattern in ["nvidia/*/lib", "nvidia/*/*/lib"] {
            let mut found: Vec<PathBuf> = glob::glob(&format!("{}/{pattern}", site.display())).map(|g| g.flatten().collect()).unwrap_or_default();
            found.sort();
            folders.extend(found);
        }
    }
    let mut seen = std::collections::HashSet::new();
    folders.retain(|f| f.is_dir() && seen.insert(f.clone()));
    folders
}

/// Where `name` is: the first of `folders` holding it, else `None` (the loader's own search
/// may still find it).
pub fn locate(name: &str, folders: &[PathBuf]) -> Option<PathBuf> {
    folders.iter().map(|f| f.join(name)).find(|p| p.is_file())
}

/// Checks what a CUDA session needs and loads the CUDA and cuDNN libraries from where they were
/// found, so that the provider's own loading finds them already in the process (the way
/// `onnxruntime`'s Python package preloads them). Everything missing is named in one error.
fn prepare_cuda(ort_library: &Path) -> Result<(), InferenceError> {
    static PREPARED: Mutex<bool> = Mutex::new(false);
    let mut prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
    if *prepared {
        return Ok(());
    }
    let mut missing: Vec<String> = Vec::new();
    let provider = ort_library.parent().map(|d| d.join(CUDA_PROVIDER_LIBRARY));
    if !provider.as_ref().is_some_and(|p| p.is_file()) {
        missing.push(format!(
            "the GPU build of ONNX Runtime: {} has no {CUDA_PROVIDER_LIBRARY} beside it (it is the CPU build)\n    install: `scripts/setup.sh --gpu` (the onnxruntime-gpu wheel, into ~/.cache/sluice/venv-gpu), or set ORT_DYLIB_PATH to a GPU build's libonnxruntime.so",
            ort_library.display()
        ));
    }
    if let Err(e) = load(Path::new(DRIVER_LIBRARY)) {
        missing.push(format!(
            "the NVIDIA driver: {DRIVER_LIBRARY} cannot be loaded ({e})\n    install: the NVIDIA driver for this GPU (`nvidia-smi` must list it); in a container, run it with the NVIDIA container toolkit (`--gpus all`)"
        ));
    }
    let folders = library_folders(ort_library);
    let mut unfound: Vec<&str> = Vec::new();
    for (i, name) in CUDA_LIBRARIES.iter().chain(CUDNN_LIBRARIES).enumerate() {
        let required = i <= CUDA_LIBRARIES.len();
        let result = match locate(name, &folders) {
            Some(path) => load(&path),
            None => load(Path::new(name)),
        };
        match result {
            Ok(()) => {}
            Err(_) if required => unfound.push(name),
            Err(e) => tracing::debug!("cuDNN sub-library {name} not preloaded ({e}); cuDNN opens it itself if it needs it"),
        }
    }
    if !unfound.is_empty() {
        missing.push(format!(
            "CUDA 13 and cuDNN 9 libraries: {} not found (looked in: {}, then the loader's path)\n    install: `scripts/setup.sh --gpu` (the nvidia-* CUDA 13 and cuDNN 9 wheels, into ~/.cache/sluice/venv-gpu), or add their folder to SLUICE_CUDA_LIBS",
            unfound.join(", "),
            if folders.is_empty() { "no NVIDIA wheel folders".to_string() } else { folders.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ") }
        ));
    }
    if !missing.is_empty() {
        return Err(InferenceError::Library(format!(
            "`execution.provider = \"cuda\"` cannot run on this machine; missing:\n  - {}\n  or set `execution.fallback = \"cpu\"` to run on the CPU instead (with a warning and the sluice_execution_fallbacks_total metric)",
            missing.join("\n  - ")
        )));
    }
    *prepared = true;
    Ok(())
}

/// Loads a shared library into the process for good (it is never unloaded).
fn load(path: &Path) -> Result<(), String> {
    ort::util::preload_dylib(path).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libraries_are_found_in_nvidia_wheel_folders_beside_onnx_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("lib/python3.12/site-packages");
        let capi = site.join("onnxruntime/capi");
        let cu13 = site.join("nvidia/cu13/lib");
        let cudnn = site.join("nvidia/cudnn/lib");
        for d in [&capi, &cu13, &cudnn] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(cu13.join("libcublas.so.13"), b"").unwrap();
        std::fs::write(cudnn.join("libcudnn.so.9"), b"").unwrap();
        let folders = library_folders(&capi.join("libonnxruntime.so.1.31.1"));
        assert!(folders.contains(&cu13) && folders.contains(&cudnn), "{folders:?}");
        assert_eq!(locate("libcublas.so.13", &folders), Some(cu13.join("libcublas.so.13")));
        assert_eq!(locate("libcudnn.so.9", &folders), Some(cudnn.join("libcudnn.so.9")));
        assert_eq!(locate("libcufft.so.12", &folders), None);
    }
}
