//! The `[execution]` section on a machine without a GPU (this one, and CI's): `provider = "cuda"`
//! is refused before any input is read, naming what is missing and how to install it;
//! `fallback = "cpu"` runs on the CPU, saying so, with the CPU's answers; every session comes from
//! one factory, and the tabular task opens one per model run in flight and none just to read its
//! inputs; GPU-style shapes (bucketed widths, power-of-two rows) run on the CPU too.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

/// Whether this machine has an NVIDIA driver: then a CUDA run may be possible, and where it is,
/// the "no GPU" checks are skipped, saying so.
fn has_nvidia_driver() -> bool {
    Path::new("/proc/driver/nvidia/version").exists()
}

fn sluice_run(topology: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice")).args(["run", topology.to_str().unwrap(), "--no-progress"]).output().unwrap()
}

/// Answer, offsets and score by ID: what must not depend on where the model ran.
fn answers(dir: &Path) -> Vec<(String, String, i64, i64, String)> {
    answers_by_id(dir)
        .into_iter()
        .map(|(id, v)| {
            (
                id,
                v["answer"].as_str().unwrap().to_string(),
                v["start_char"].as_i64().unwrap(),
                v["end_char"].as_i64().unwrap(),
                format!("{:.5}", v["score"].as_f64().unwrap()),
            )
        })
        .collect()
}

/// The sample has exactly 22 good questions and 3 bad rows.
const SAMPLE_ANSWERS: usize = 22;
const SAMPLE_DEAD_LETTERS: usize = 3;

/// The dead letters a run wrote to `dir`.
fn dead_letters(dir: &Path) -> usize {
    read_lines(dir, "dead_letters.w").len()
}

#[test]
fn cuda_without_a_gpu_is_refused_naming_what_is_missing_and_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let topology = dir.path().join("cuda.toml");
    std::fs::write(&topology, qa_topology("cuda", &repo().join("samples/questions.csv"), &jsonl_sink(&out), "[execution]\nprovider = \"cuda\"\n")).unwrap();
    let run = sluice_run(&topology);
    let stderr = String::from_utf8_lossy(&run.stderr);
    if run.status.success() {
        // CUDA works here (driver, GPU build and libraries): there is no refusal to check, so
        // the run must have answered the sample on the GPU, and the machine must have a driver.
        assert!(has_nvidia_driver(), "a CUDA run succeeded on a machine without an NVIDIA driver; stderr: {stderr}");
        assert_eq!(answers_by_id(&out).len(), SAMPLE_ANSWERS, "the CUDA run answers every good question; stderr: {stderr}");
        assert_eq!(dead_letters(&out), SAMPLE_DEAD_LETTERS, "and dead-letters the 3 bad rows");
        eprintln!("SKIPPED the refusal check: a CUDA run is possible on this machine (it answered the sample on the GPU)");
        return;
    }
    for needed in ["`execution.provider = \"cuda\"` cannot run on this machine; missing:\n  - ", "execution.fallback = \"cpu\""] {
        assert!(stderr.contains(needed), "the refusal names `{needed}`; stderr: {stderr}");
    }
    if has_nvidia_driver() {
        // The driver is there, so something else is missing: the GPU build or the CUDA libraries,
        // each with its install command.
        assert!(stderr.contains("scripts/setup.sh --gpu"), "the refusal says how to install what is missing; stderr: {stderr}");
    } else {
        for needed in ["the NVIDIA driver: libcuda.so.1", "scripts/setup.sh --gpu"] {
            assert!(stderr.contains(needed), "the refusal names `{needed}`; stderr: {stderr}");
        }
    }
    // CI has the CPU wheel only: the refusal says that the library is the CPU build.
    if !std::env::var("ORT_DYLIB_PATH").is_ok_and(|p| Path::new(&p).with_file_name("libonnxruntime_providers_cuda.so").exists()) {
        let gpu_venv = sluice::ortlib::venv_site_packages("venv-gpu").iter().any(|s| s.join("onnxruntime/capi/libonnxruntime_providers_cuda.so").exists());
        if !gpu_venv {
            assert!(stderr.contains("the GPU build of ONNX Runtime"), "{stderr}");
        }
    }
    assert!(!out.exists() || answers_by_id(&out).is_empty(), "nothing was answered");
}

#[test]
fn fallback_cpu_runs_on_the_cpu_with_a_warning_and_the_cpu_answers() {
    let dir = tempfile::tempdir().unwrap();
    let input = repo().join("samples/questions.csv");
    let mut got = Vec::new();
    for (name, extra) in [("fallback", "[execution]\nprovider = \"cuda\"\nfallback = \"cpu\"\n"), ("cpu", "")] {
        let out = dir.path().join(name);
        let topology = dir.path().join(format!("{name}.toml"));
        std::fs::write(&topology, qa_topology(name, &input, &jsonl_sink(&out), extra)).unwrap();
        let run = sluice_run(&topology);
        let stderr = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(run.status.success(), "{name}: {stderr}");
        assert_eq!(answers_by_id(&out).len(), SAMPLE_ANSWERS, "{name}: every good question is answered; stderr: {stderr}");
        assert_eq!(dead_letters(&out), SAMPLE_DEAD_LETTERS, "{name}: the 3 bad rows are dead letters");
        let warned = stderr.contains("on the CPU, as `execution.fallback = \"cpu\"` allows, because CUDA cannot be used");
        if name == "fallback" && !warned {
            // No fallback happened, so CUDA ran the model: only possible with a driver.
            assert!(has_nvidia_driver(), "the fallback run neither warned nor could have used a GPU; stderr: {stderr}");
            eprintln!("SKIPPED the fallback comparison: a CUDA run is possible on this machine, so `fallback = \"cpu\"` does not fall back");
            return;
        }
        assert_eq!(warned, name == "fallback", "{name} warns only when it falls back: {stderr}");
        got.push(answers(&out));
    }
    assert_eq!(got[0], got[1], "the fallback run answers as the CPU run does");
}

#[test]
fn the_tabular_task_opens_one_session_per_run_in_flight_and_none_for_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    // Its own copy of the model, so that sessions opened by other tests do not count.
    let model = dir.path().join("rides/model.onnx");
    std::fs::create_dir_all(model.parent().unwrap()).unwrap();
    std::fs::copy(repo().join("models/rides/model.onnx"), &model).unwrap();
    let out = dir.path().join("out");
    let text = format!(
        "name = \"sessions\"\n[source]\ntype = \"generator\"\ncount = 2000\nseed = 7\n[task]\ntype = \"tabular\"\nmodel = \"{}\"\n[batching]\nmax_batch = 64\n[execution]\nruns_in_flight = 2\n[runtime]\nprogress = false\n{}",
        model.display(),
        jsonl_sink(&out)
    );
    let summary = run(&text, 1);
    assert_eq!(summary.answered, 2000);
    assert_eq!(sluice::execution::sessions_opened(&model), 2, "two runs in flight: two sessions, and no third to read the model's inputs");
}

#[test]
fn gpu_shapes_on_the_cpu_answer_every_question() {
    // Bucketed widths and power-of-two rows are what CUDA gets by default; here they run on the
    // CPU, with batching forced on the int8 model, and every question is answered.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let extra = "[execution]\nruns_in_flight = 2\n";
    let text = qa_topology("shapes", &repo().join("samples/questions.csv"), &jsonl_sink(&out), extra)
        .replace("max_delay_ms = 2\n", "max_delay_ms = 2\npadding = \"bucket\"\npad_multiple = 32\npad_rows = true\nbatch_invariant = \"yes\"\n");
    let summary = run(&text, 2);
    let got = answers_by_id(&out);
    assert_eq!(got.len(), SAMPLE_ANSWERS, "{got:?}");
    assert_eq!(summary.answered, SAMPLE_ANSWERS as u64);
    assert_eq!(summary.dead_letters, SAMPLE_DEAD_LETTERS as u64);
    assert_eq!(dead_letters(&out), SAMPLE_DEAD_LETTERS);
}
