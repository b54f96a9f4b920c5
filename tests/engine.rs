//! The engine in-process: several jobs at once on one set of workers, sharing one inference
//! service, each ending on its own; a job that fails at start leaves the engine running; an
//! ended job leaves nothing behind in the engine.

use sluice::engine::{Engine, EngineSettings, JobOptions, JobStatus};
use sluice::topology::Topology;
use std::time::Duration;

fn rides_job(name: &str, count: u64, out: &std::path::Path) -> Topology {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = format!(
        "name = \"{name}\"\n[source]\ntype = \"generator\"\ncount = {count}\nseed = 3\n[task]\ntype = \"tabular\"\nmodel = \"{root}/models/rides/model.onnx\"\n[batching]\nmax_batch = 512\nmax_delay_ms = 2\n[runtime]\nepoch_records = 4096\nprogress = false\n[[sinks]]\ntype = \"jsonl\"\ndir = {out:?}\n"
    );
    sluice::registry::parse("test", &text).unwrap()
}

fn lines(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("answers.w"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap().lines().count())
        .sum()
}

#[test]
fn jobs_share_one_engine_and_one_model_service_and_end_on_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(EngineSettings {
        workers: 2,
        process: 0,
        hosts: Vec::new(),
        metrics_listen: None,
        metrics_recorder: false,
        signals_grace: None,
        worker_nice: 0,
    })
    .unwrap();
    let counts = [50_000u64, 120_000, 7];
    let jobs: Vec<_> = counts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            engine.submit(&format!("job{i}"), &rides_job(&format!("engine_job{i}"), n, &dir.path().join(format!("out{i}"))), JobOptions::default()).unwrap()
        })
        .collect();
    assert_eq!(engine.model_services(), 1, "three jobs on one model share one inference service");
    for (job, &n) in jobs.iter().zip(&counts) {
        let summary = job.wait().unwrap();
        assert_eq!(summary.answered, n, "job {}", job.id());
        assert_eq!(job.snapshot().status, JobStatus::Succeeded);
    }
    for (i, &n) in counts.iter().enumerate() {
        assert_eq!(lines(&dir.path().join(format!("out{i}"))) as u64, n);
    }
    // A job whose sink cannot be opened fails at submit; the engine takes the next one.
    let mut bad = rides_job("engine_bad", 10, &dir.path().join("out0"));
    bad.name = "engine_other_pipeline".into();
    let e = engine.submit("bad", &bad, JobOptions::default()).err().expect("a folder another pipeline owns is refused");
    assert!(e.to_string().contains("engine_job0"), "{e}");
    let again = engine.submit("again", &rides_job("engine_again", 1000, &dir.path().join("again")), JobOptions::default()).unwrap();
    assert_eq!(again.wait().unwrap().answered, 1000);
    // Ended jobs leave nothing behind: no setup in the log, no entry in the job list.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(engine.pending_installs(), 0);
    assert!(engine.jobs().is_empty(), "ended jobs are still listed");
    engine.shutdown().unwrap();
}
