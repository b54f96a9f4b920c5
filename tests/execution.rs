//! The `[execution]` section on a machine without a GPU (this one, and CI's): `provider = "cuda"`
//! is refused before any input is read, naming what is missing and how to install it;
//! `fallback = "cpu"` runs on the CPU, saying so, with the CPU's answers; every session comes from
//! one factory, and the tabular task opens one per model run in flight and none just to read its
//! inputs; GPU-style shapes (bucketed widths, power-of-two rows) run on the CPU too.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

/// Whether this machine has an NVIDIA driver, in which case the "no GPU" tests do not apply.
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

#[test]
fn cuda_without_a_gpu_is_refused_naming_what_is_missing_and_how_to_install_it() {
    if has_nvidia_driver() {
        eprintln!("this machine has an NVIDIA driver: the refusal cannot be checked here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let topology = dir.path().join("cuda.toml");
    std::fs::write(&topology, qa_topology("cuda", &repo().join("samples/questions.csv"), &jsonl_sink(&out), "[execution]\nprovider = \"cuda\"\n")).unwrap();
    let run = sluice_run(&topology);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "a CUDA run without a GPU must not start; stderr: {stderr}");
    for needed in [
        "`execution.provider = \"cuda\"` cannot run on this machine",
        "the NVIDIA driver: libcuda.so.1",
        "scripts/setup.sh --gpu",
        "execution.fallback = \"cpu\"",
    ] {
        assert!(stderr.contains(needed), "the refusal names `{needed}`; stderr: {stderr}");
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
    if has_nvidia_driver() {
        eprintln!("this machine has an NVIDIA driver: a CUDA run would not fall back here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = repo().join("samples/questions.csv");
    let mut got = Vec::new();
    for (name, extra) in [("cpu", ""), ("fallback", "[execution]\nprovider = \"cuda\"\nfallback = \"cpu\"\n")] {
        let out = dir.path().join(name);
        let topology = dir.path().join(format!("{name}.toml"));
        std::fs::write(&topology, qa_topology(name, &input, &jsonl_sink(&out), extra)).unwrap();
        let run = sluice_run(&topology);
        let stderr = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(run.status.success(), "{name}: {stderr}");
        let warned = stderr.contains("on the CPU, as `execution.fallback = \"cpu\"` allows, because CUDA cannot be used");
        assert_eq!(warned, name == "fallback", "{name} warns only when it falls back: {stderr}");
        got.push(answers(&out));
    }
    assert!(got[0].len() >= 10, "the sample has answers: {:?}", got[0]);
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
    assert_eq!(got.len() as u64, summary.answered);
    assert!(got.len() >= 10, "{got:?}");
}
