//! Finding and loading the ONNX Runtime shared library, once per process.
//!
//! sluice links ONNX Runtime at run time (`ort`'s `load-dynamic`). The library comes from the
//! `onnxruntime` PyPI wheel, which `scripts/setup.sh` installs into `~/.cache/sluice/venv`.

use crate::inference::InferenceError;
use std::path::PathBuf;
use std::sync::OnceLock;

static ENV: OnceLock<Result<ort::environment::Environment, InferenceError>> = OnceLock::new();

/// Where the library is looked for, in order: `ORT_DYLIB_PATH`, then the set-up script's venv.
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    let cache = std::env::var("SLUICE_CACHE").map(PathBuf::from).ok().or_else(|| std::env::var("HOME").ok().map(|h| PathBuf::from(h).join(".cache/sluice")));
    if let Some(cache) = cache {
        if let Ok(entries) = glob::glob(&format!("{}/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*", cache.display())) {
            let mut found: Vec<PathBuf> = entries.flatten().collect();
            found.sort();
            out.extend(found.into_iter().rev());
        }
    }
    out
}

/// The process's ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<&'static ort::environment::Environment, InferenceError> {
    ENV.get_or_init(|| {
        let candidates = candidates();
        let path = candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            InferenceError::Library(format!(
                "ONNX Runtime library not found (looked at: {}).\n  hint: run `scripts/setup.sh`, which installs the `onnxruntime` wheel into ~/.cache/sluice/venv, or set ORT_DYLIB_PATH to libonnxruntime.so",
                if candidates.is_empty() { "nothing; HOME is unset".to_string() } else { candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ") }
            ))
        })?;
        let builder = ort::init_from(&path).map_err(|e| InferenceError::Library(format!("cannot load ONNX Runtime from {}: {e}", path.display())))?;
        builder.with_name("sluice").build().map_err(|e| InferenceError::Library(format!("cannot start ONNX Runtime: {e}")))
    })
    .as_ref()
    .map_err(|e| e.clone())
}
