//! Finding and loading the ONNX Runtime shared library, once per process.
//!
//! sluice links ONNX Runtime at run time (`ort`'s `load-dynamic`). The CPU library comes from the
//! `onnxruntime` PyPI wheel, which `scripts/setup.sh` installs into `~/.cache/sluice/venv`; the
//! GPU build from the `onnxruntime-gpu` wheel, which `scripts/setup.sh --gpu` installs into
//! `~/.cache/sluice/venv-gpu`.

use crate::inference::InferenceError;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static ENV: OnceLock<Result<(ort::environment::Environment, PathBuf), InferenceError>> = OnceLock::new();

/// sluice's cache folder: `SLUICE_CACHE`, else `~/.cache/sluice`.
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var("SLUICE_CACHE").map(PathBuf::from).ok().or_else(|| std::env::var("HOME").ok().map(|h| PathBuf::from(h).join(".cache/sluice")))
}

/// The site-packages folders of the set-up script's venv (`venv`, or `venv-gpu`).
pub fn venv_site_packages(venv: &str) -> Vec<PathBuf> {
    let Some(cache) = cache_dir() else { return Vec::new() };
    let mut found: Vec<PathBuf> =
        glob::glob(&format!("{}/{venv}/lib/python3*/site-packages", cache.display())).map(|g| g.flatten().collect()).unwrap_or_default();
    found.sort();
    found.reverse();
    found
}

/// Where the library is looked for, in order: `ORT_DYLIB_PATH`, then the set-up script's venvs,
/// the GPU build's first when `gpu` is wanted and the CPU build's first otherwise.
pub fn candidates(gpu: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    let venvs = if gpu { ["venv-gpu", "venv"] } else { ["venv", "venv-gpu"] };
    for venv in venvs {
        for site in venv_site_packages(venv) {
            let mut libs: Vec<PathBuf> =
                glob::glob(&format!("{}/onnxruntime/capi/libonnxruntime.so*", site.display())).map(|g| g.flatten().collect()).unwrap_or_default();
            libs.sort();
            out.extend(libs.into_iter().rev());
        }
    }
    out
}

/// The process's ONNX Runtime environment, loading the CPU library on first use.
pub fn environment() -> Result<&'static ort::environment::Environment, InferenceError> {
    environment_for(false).map(|(env, _)| env)
}

/// The process's ONNX Runtime environment and the library it was loaded from. The first call
/// decides which library: the GPU build first when `gpu` is wanted. A process loads one library.
pub fn environment_for(gpu: bool) -> Result<(&'static ort::environment::Environment, &'static Path), InferenceError> {
    let loaded = ENV.get_or_init(|| {
        let candidates = candidates(gpu);
        let path = candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            InferenceError::Library(format!(
                "ONNX Runtime library not found (looked at: {}).\n  hint: run `scripts/setup.sh`, which installs the `onnxruntime` wheel into ~/.cache/sluice/venv (`scripts/setup.sh --gpu` for the GPU build), or set ORT_DYLIB_PATH to libonnxruntime.so",
                if candidates.is_empty() { "nothing; HOME is unset".to_string() } else { candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ") }
            ))
        })?;
        let builder = ort::init_from(&path).map_err(|e| InferenceError::Library(format!("cannot load ONNX Runtime from {}: {e}", path.display())))?;
        let env = builder.with_name("sluice").build().map_err(|e| InferenceError::Library(format!("cannot start ONNX Runtime: {e}")))?;
        Ok((env, path))
    });
    match loaded {
        Ok((env, path)) => Ok((env, path.as_path())),
        Err(e) => Err(e.clone()),
    }
}
