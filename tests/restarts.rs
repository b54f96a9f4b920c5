//! Server restarts under a running worker, in a test binary of their own so no other test's
//! connections are cut: a Postgres restart mid-stream loses and duplicates nothing.

mod common;

use common::kafka::*;
use common::rides::*;
use std::time::Duration;

#[test]
fn a_postgres_restart_mid_stream_loses_and_duplicates_nothing() {
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
