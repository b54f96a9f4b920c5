//! Server restarts under a running worker, in a test binary of their own so no other test's
//! connections are cut, and one at a time: a Postgres restart and a broker restart mid-stream
//! each lose and duplicate nothing, with the worker recovering on its own.

mod common;

use common::kafka::*;
use common::rides::*;
use std::sync::Mutex;
use std::time::Duration;

/// One restart at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The persistent broker scripts/test.sh starts for this test (Tansu over a local S3 store, so
/// topics and offsets survive its restart); the in-memory one on 19092 would lose its topics.
const PERSISTENT_BROKER_PORT: &str = "19093";

fn kafka_script(cmd: &str) {
    let status = std::process::Command::new("bash")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh"))
        .arg(cmd)
        .env("SLUICE_KAFKA_PORT", PERSISTENT_BROKER_PORT)
        .env("SLUICE_KAFKA_PERSIST", "1")
        .status()
        .unwrap();
    assert!(status.success(), "scripts/kafka.sh {cmd} failed");
}

#[test]
fn a_postgres_restart_mid_stream_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("SLUICE_KAFKA_BROKERS", "127.0.0.1:19092");
    let s = setup("itpgrestart");
    let n = 20_000;
    let messages = rides(&s.name, n, 13);
    let p = producer();
    let _worker = start_worker(s.dir.path(), &s.topology(), 1);
    for (i, chunk) in messages.chunks(1_000).enumerate() {
        produce(&p, &s.topic, chunk);
        if i == 5 {
            assert!(wait_for_rows(&s.table, 1, Duration::from_secs(30)) > 0);
            let restart =
                std::process::Command::new("bash").arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh")).arg("restart").status().unwrap();
            assert!(restart.success(), "scripts/pg.sh restart failed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(wait_for_rows(&s.table, n as i64, Duration::from_secs(120)), n as i64, "the worker reconnected on its own");
    check_exactly_once(&s, &messages);
}

#[test]
fn a_broker_restart_mid_stream_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    kafka_script("start");
    std::env::set_var("SLUICE_KAFKA_BROKERS", format!("127.0.0.1:{PERSISTENT_BROKER_PORT}"));
    let s = setup("itbrokerrestart");
    let n = 10_000;
    let messages = rides(&s.name, n, 14);
    let p = producer();
    // Tansu over S3 (moto) abandons a fetch whose storage reads overrun the request's max wait,
    // and a listing on moto takes 10-40 ms: sluice's 5 ms fetch.wait.max.ms would read nothing.
    let topology = s.topology().replacen("epoch_ms = 20\n", "epoch_ms = 20\nclient = { \"fetch.wait.max.ms\" = \"500\" }\n", 1);
    assert_ne!(topology, s.topology(), "the topology sets epoch_ms = 20");
    let _worker = start_worker(s.dir.path(), &topology, 1);
    for (i, chunk) in messages.chunks(1_000).enumerate() {
        produce(&p, &s.topic, chunk);
        if i == 3 {
            assert!(wait_for_rows(&s.table, 1, Duration::from_secs(60)) > 0);
            kafka_script("restart");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(wait_for_rows(&s.table, n as i64, Duration::from_secs(180)), n as i64, "the worker reconnected on its own");
    check_exactly_once(&s, &messages);
}
