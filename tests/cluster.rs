//! Timely's own cluster mode: two `sluice run` processes with a hostfile split one pipeline
//! between them, and together answer every generated ride exactly once.

mod common;

use std::collections::HashSet;
use std::process::Command;

#[test]
fn two_processes_answer_every_ride_once() {
    let dir = tempfile::tempdir().unwrap();
    let base = 24000 + (std::process::id() % 1000) as u16 * 2;
    let hosts = dir.path().join("hosts.txt");
    std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", base, base + 1)).unwrap();
    let out = dir.path().join("out");
    let topology = dir.path().join("cluster.toml");
    std::fs::write(
        &topology,
        format!(
            "name = \"cluster\"\n[source]\ntype = \"generator\"\ncount = 20000\nseed = 5\n[task]\ntype = \"tabular\"\nmodel = \"{}\"\n[batching]\nmax_batch = 512\n[runtime]\nworkers = 1\nepoch_records = 1000\nprogress = false\n[[sinks]]\ntype = \"jsonl\"\ndir = \"{}\"\n",
            common::repo().join("models/rides/model.onnx").display(),
            out.display()
        ),
    )
    .unwrap();
    let (t, h) = (topology.to_str().unwrap().to_string(), hosts.to_str().unwrap().to_string());
    let spawn = move |process: usize| {
        Command::new(env!("CARGO_BIN_EXE_sluice")).args(["run", &t, "--no-progress", "--process", &process.to_string(), "--hostfile", &h]).output()
    };
    let p1 = std::thread::spawn({
        let spawn = spawn.clone();
        move || spawn(1)
    });
    let r0 = spawn(0).unwrap();
    let r1 = p1.join().unwrap().unwrap();
    assert!(r0.status.success() && r1.status.success(), "{}\n{}", String::from_utf8_lossy(&r0.stderr), String::from_utf8_lossy(&r1.stderr));
    let answers = common::read_lines(&out, "answers.w");
    let ids: HashSet<String> = answers.iter().map(|a| a["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(answers.len(), 20000);
    assert_eq!(ids.len(), 20000, "no ride answered twice");
    for w in ["answers.w0.jsonl", "answers.w1.jsonl"] {
        assert!(std::fs::metadata(out.join(w)).unwrap().len() > 0, "process {w} did part of the work");
    }
}
