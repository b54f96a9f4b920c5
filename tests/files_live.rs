//! The live file source end to end, black-box against the real binary, the Postgres that
//! scripts/pg.sh starts, the Kafka-protocol broker of scripts/kafka.sh, the local S3 server
//! (moto) that scripts/test.sh starts on 127.0.0.1:19000, and fake-gcs-server (scripts/gcs.sh):
//! files are watched, only changed rows are recomputed, removed rows lose their answers in every
//! sink, and the answers always equal a fresh full run over the current files.

mod common;

use common::blackbox::{json_lines, spawn_sluice, wait_until, Sluice};
use common::kafka::unique;
use common::{pg_url, query};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn rides_csv(prefix: &str, ids: bool, rows: impl IntoIterator<Item = usize>) -> String {
    let mut s = String::from(if ids { "id,PULocationID,DOLocationID,trip_distance\n" } else { "PULocationID,DOLocationID,trip_distance\n" });
    for i in rows {
        let (pu, do_, d) = (1 + i % 263, 1 + (i * 7) % 263, 0.5 + (i % 97) as f64 * 0.25);
        if ids {
            s.push_str(&format!("{prefix}{i},{pu},{do_},{d}\n"));
        } else {
            s.push_str(&format!("{pu},{do_},{d}\n"));
        }
    }
    s
}

struct Live {
    name: String,
    table: String,
    dir: tempfile::TempDir,
}

impl Live {
    fn new(prefix: &str) -> Live {
        let name = unique(prefix);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("in")).unwrap();
        Live { table: format!("{name}_answers"), name, dir }
    }
    fn input(&self) -> PathBuf {
        self.dir.path().join("in")
    }
    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }
    /// A rides topology over `path` (watched), answering into JSON lines, Postgres and `extra` sinks.
    fn topology(&self, path: &str, watch: bool, source_extra: &str, sinks_extra: &str) -> String {
        format!(
            r#"name = "{name}"
[source]
type = "files"
path = "{path}"
watch = {watch}
poll_ms = 100
settle_ms = 300
{source_extra}
[task]
type = "tabular"
model = "{root}/models/rides/model.onnx"
[runtime]
workers = 2
progress = false
[[sinks]]
type = "jsonl"
dir = "{out}"
[[sinks]]
type = "postgres"
url = "{pg}"
table = "{table}"
{sinks_extra}
"#,
            name = self.name,
            root = env!("CARGO_MANIFEST_DIR"),
            out = self.out().display(),
            pg = pg_url(),
            table = self.table,
        )
    }
    fn watch(&self, sinks_extra: &str) -> Sluice {
        spawn_sluice(self.dir.path(), &self.topology(&self.input().display().to_string(), true, "", sinks_extra), &[], &[("RUST_LOG", "sluice=info")])
    }
    /// ID to (prediction, updated_at as text) in Postgres.
    fn rows(&self) -> BTreeMap<String, (f64, String)> {
        if common::count_rows(&self.table) == 0 {
            return BTreeMap::new();
        }
        query(&format!("SELECT id, prediction, updated_at::text FROM {}", sluice::sql::quote_ident(&self.table)))
            .iter()
            .map(|r| (r.get::<_, String>(0), (r.get::<_, f64>(1), r.get::<_, String>(2))))
            .collect()
    }
    fn wait_rows(&self, pred: impl Fn(&BTreeMap<String, (f64, String)>) -> bool, what: &str, w: &Sluice) {
        assert!(wait_until(Duration::from_secs(60), || pred(&self.rows())), "{what}: {} rows now\n{}", self.rows().len(), w.stderr_tail());
    }
}

/// The last JSON-lines op per ID: `Some(prediction)` for an upsert, `None` for a delete.
fn jsonl_state(dir: &Path) -> HashMap<String, Option<f64>> {
    let mut m = HashMap::new();
    for v in json_lines(dir, "answers.w") {
        let id = v["id"].as_str().unwrap().to_string();
        m.insert(id, if v["op"] == "delete" { None } else { v["prediction"].as_f64() });
    }
    m
}

fn stop(w: &mut Sluice) -> String {
    w.signal("-TERM");
    let status = w.wait_timeout(Duration::from_secs(30)).unwrap_or_else(|| panic!("sluice did not stop\n{}", w.stderr_tail()));
    assert_eq!(status.code(), Some(0), "{}", w.stderr_tail());
    w.stdout()
}

/// `answered N` from a run's summary line.
fn answered(stdout: &str) -> u64 {
    stdout.split("answered ").nth(1).and_then(|r| r.split(',').next()).and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("no summary in {stdout:?}"))
}

/// Writes `text` to `path` through a temporary file and a rename, as a careful producer does.
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn editing_one_row_of_10000_recomputes_that_row_alone_and_touches_no_other() {
    let s = Live::new("flone");
    let file = s.input().join("rides.csv");
    put(&file, &rides_csv("r", true, 0..10_000));
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 10_000, "the first pass answers every row", &w);
    std::thread::sleep(Duration::from_millis(300));
    let before = s.rows();
    let text = rides_csv("r", true, 0..10_000);
    let row = text.lines().find(|l| l.starts_with("r4321,")).unwrap().to_string();
    put(&file, &text.replace(&format!("\n{row}\n"), "\nr4321,7,8,12.5\n"));
    s.wait_rows(|r| r.get("r4321").map(|v| &v.1) != before.get("r4321").map(|v| &v.1), "the edited row's answer is rewritten", &w);
    std::thread::sleep(Duration::from_millis(500));
    let after = s.rows();
    assert_eq!(after.len(), 10_000);
    let touched: Vec<&String> = after.iter().filter(|(id, v)| before.get(*id) != Some(v)).map(|(id, _)| id).collect();
    assert_eq!(touched, vec!["r4321"], "only the edited row's answer (and its updated_at) changed");
    let out = stop(&mut w);
    assert_eq!(answered(&out), 10_001, "the model saw 10,000 rows, then one: {out}");
    assert!(w.stderr().contains("rides.csv: 10000 rows, 1 new or changed, 0 gone"), "{}", w.stderr_tail());
}

#[test]
fn a_change_is_answered_as_soon_as_it_is_read_not_at_the_next_epoch_tick() {
    // Epochs on an hour's clock: only a source that closes its epoch when it goes idle (and an
    // idle worker that moves a tick ahead, so it holds nobody back) answers within the minute.
    let s = Live::new("flidle");
    let topology = s.topology(&s.input().display().to_string(), true, "epoch_ms = 3600000", "");
    let mut w = spawn_sluice(s.dir.path(), &topology, &[], &[("RUST_LOG", "sluice=info")]);
    put(&s.input().join("a.csv"), &rides_csv("a", true, 0..20));
    s.wait_rows(|r| r.len() == 20, "a new file is answered within a minute", &w);
    let rows = rides_csv("a", true, 0..20);
    let row = rows.lines().find(|l| l.starts_with("a7,")).unwrap().to_string();
    put(&s.input().join("a.csv"), &rows.replace(&format!("\n{row}\n"), "\na7,3,4,41.5\n"));
    let before = s.rows()["a7"].clone();
    s.wait_rows(|r| r["a7"] != before, "an edit is answered within a minute", &w);
    stop(&mut w);
}

#[test]
fn removed_rows_and_a_removed_file_lose_their_answers_in_postgres_json_lines_and_kafka() {
    use common::blackbox::read_until;
    use common::kafka::{brokers, create_topics};
    let s = Live::new("fldel");
    let topic = format!("{}_results", s.name);
    create_topics(&[&topic], 1);
    put(&s.input().join("a.csv"), &rides_csv("a", true, 0..100));
    put(&s.input().join("b.csv"), &rides_csv("b", true, 0..50));
    let kafka = format!("[[sinks]]\ntype = \"kafka\"\nbrokers = \"{}\"\ntopic = \"{topic}\"\n", brokers());
    let mut w = s.watch(&kafka);
    s.wait_rows(|r| r.len() == 150, "both files answered", &w);
    // Remove rows a10..a19 from a, and the whole of b.
    put(&s.input().join("a.csv"), &rides_csv("a", true, (0..100).filter(|i| !(10..20).contains(i))));
    std::fs::remove_file(s.input().join("b.csv")).unwrap();
    s.wait_rows(|r| r.len() == 90, "the removed rows' answers are deleted", &w);
    let rows = s.rows();
    assert!(rows.keys().all(|id| id.starts_with('a')) && !rows.contains_key("a15"), "{:?}", rows.keys().take(5).collect::<Vec<_>>());
    stop(&mut w);
    let jsonl = jsonl_state(&s.out());
    assert_eq!(jsonl.values().filter(|v| v.is_some()).count(), 90, "JSON lines: the last op of 60 IDs is a delete");
    assert_eq!(jsonl.get("a15"), Some(&None));
    assert_eq!(jsonl.get("b3"), Some(&None));
    let got = read_until(&topic, Duration::from_secs(30), Duration::from_millis(500), |g| g.iter().filter(|m| m.payload.is_none()).count() >= 60);
    let mut last: HashMap<String, bool> = HashMap::new();
    for m in &got {
        last.insert(m.key_str(), m.payload.is_some());
    }
    assert_eq!(last.values().filter(|alive| !**alive).count(), 60, "Kafka: a tombstone for each removed row");
    assert_eq!(last.get("b0"), Some(&false));
}

#[test]
fn a_row_inserted_at_the_top_of_a_file_without_ids_recomputes_nothing_else() {
    let s = Live::new("fltop");
    let file = s.input().join("noids.csv");
    put(&file, &rides_csv("", false, 1..=500));
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 500, "every row answered under a derived ID", &w);
    let before = s.rows();
    assert!(before.keys().all(|id| id.starts_with("noids.csv#")), "{:?}", before.keys().next());
    let mut text = rides_csv("", false, 1..=500);
    text = text.replacen('\n', "\n5,6,7.5\n", 1);
    put(&file, &text);
    s.wait_rows(|r| r.len() == 501, "the inserted row is answered", &w);
    std::thread::sleep(Duration::from_millis(500));
    let after = s.rows();
    let changed = after.iter().filter(|(id, v)| before.get(*id) != Some(v)).count();
    assert_eq!(changed, 1, "only the new row is new or changed");
    let out = stop(&mut w);
    assert_eq!(answered(&out), 501, "{out}");
}

#[test]
fn changes_made_while_sluice_was_stopped_are_all_that_a_restart_recomputes() {
    let s = Live::new("flrestart");
    put(&s.input().join("a.csv"), &rides_csv("a", true, 0..2000));
    put(&s.input().join("b.csv"), &rides_csv("b", true, 0..1000));
    let once = s.topology(&s.input().display().to_string(), false, "", "");
    let mut first = spawn_sluice(s.dir.path(), &once, &[], &[]);
    let status = first.wait_timeout(Duration::from_secs(120)).expect("a one-shot run ends");
    assert!(status.success(), "{}", first.stderr_tail());
    assert_eq!(answered(&first.stdout()), 3000);
    assert_eq!(s.rows().len(), 3000);
    // While stopped: edit 5 rows of a, remove b, add c.
    let mut a = rides_csv("a", true, 0..2000);
    for i in [3, 300, 999, 1500, 1999] {
        let line = a.lines().find(|l| l.starts_with(&format!("a{i},"))).unwrap().to_string();
        a = a.replace(&line, &format!("a{i},1,2,33.5"));
    }
    put(&s.input().join("a.csv"), &a);
    std::fs::remove_file(s.input().join("b.csv")).unwrap();
    put(&s.input().join("c.csv"), &rides_csv("c", true, 0..10));
    let mut second = spawn_sluice(s.dir.path(), &once, &[], &[("RUST_LOG", "sluice=info")]);
    let status = second.wait_timeout(Duration::from_secs(120)).expect("a one-shot run ends");
    assert!(status.success(), "{}", second.stderr_tail());
    assert_eq!(answered(&second.stdout()), 15, "5 edited rows and c's 10: {}", second.stdout());
    let rows = s.rows();
    assert_eq!(rows.len(), 2010, "b's 1,000 answers are gone");
    assert!(rows.keys().all(|id| !id.starts_with('b')));
    // A third run with nothing changed computes nothing.
    let mut third = spawn_sluice(s.dir.path(), &once, &[], &[]);
    assert!(third.wait_timeout(Duration::from_secs(120)).expect("ends").success(), "{}", third.stderr_tail());
    assert_eq!(answered(&third.stdout()), 0, "{}", third.stdout());
}

#[test]
fn the_json_lines_default_keeps_its_manifests_and_resumes_without_recomputing() {
    let s = Live::new("fljsonl");
    put(&s.input().join("a.csv"), &rides_csv("a", true, 0..3000));
    let text = format!(
        r#"name = "{name}"
[source]
type = "files"
path = "{input}"
[task]
type = "tabular"
model = "{root}/models/rides/model.onnx"
[runtime]
workers = 2
progress = false
[[sinks]]
type = "jsonl"
dir = "{out}"
"#,
        name = s.name,
        input = s.input().display(),
        root = env!("CARGO_MANIFEST_DIR"),
        out = s.out().display()
    );
    let mut first = spawn_sluice(s.dir.path(), &text, &[], &[]);
    assert!(first.wait_timeout(Duration::from_secs(120)).expect("ends").success(), "{}", first.stderr_tail());
    assert_eq!(answered(&first.stdout()), 3000);
    let sides = std::fs::read_dir(s.out()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".pos")).count();
    assert_eq!(sides, 2, "each worker's manifest of a.csv is a side file of its checkpoint");
    put(&s.input().join("a.csv"), &rides_csv("a", true, 1..3000));
    let mut second = spawn_sluice(s.dir.path(), &text, &[], &[]);
    assert!(second.wait_timeout(Duration::from_secs(120)).expect("ends").success(), "{}", second.stderr_tail());
    assert_eq!(answered(&second.stdout()), 0, "{}", second.stdout());
    let state = jsonl_state(&s.out());
    assert_eq!(state.len(), 3000);
    assert_eq!(state.get("a0"), Some(&None), "the removed row's last op is a delete");
    assert_eq!(state.values().filter(|v| v.is_some()).count(), 2999);
}

#[test]
fn a_file_written_slowly_is_read_once_and_complete() {
    let s = Live::new("flslow");
    let mut w = s.watch("");
    std::thread::sleep(Duration::from_millis(500));
    // Appended in 10 pieces 150 ms apart, in place (no rename): the size keeps changing.
    let text = rides_csv("s", true, 0..1000);
    let lines: Vec<&str> = text.lines().collect();
    let path = s.input().join("slow.csv");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in lines.chunks(101) {
            for l in chunk {
                writeln!(f, "{l}").unwrap();
            }
            f.flush().unwrap();
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    s.wait_rows(|r| r.len() == 1000, "every row of the finished file", &w);
    std::thread::sleep(Duration::from_millis(800));
    let out = stop(&mut w);
    assert_eq!(answered(&out), 1000, "read once, complete: {out}");
    // Every worker reads every file (each answers the rows that route to it): one read each.
    let reads = w.stderr().matches("slow.csv: ").count();
    assert_eq!(reads, 2, "one read of the file per worker: {}", w.stderr_tail());
}

/// A full one-shot run over `path` into a fresh JSON-lines folder: ID to prediction.
fn fresh_full_run(s: &Live, path: &str, source_extra: &str) -> BTreeMap<String, f64> {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"name = "{name}_fresh"
[source]
type = "files"
path = "{path}"
{source_extra}
[task]
type = "tabular"
model = "{root}/models/rides/model.onnx"
[runtime]
progress = false
[[sinks]]
type = "jsonl"
dir = "{out}"
"#,
        name = s.name,
        root = env!("CARGO_MANIFEST_DIR"),
        out = dir.path().join("out").display()
    );
    let mut w = spawn_sluice(dir.path(), &text, &[], &[("RUST_LOG", "sluice=info")]);
    let status = w.wait_timeout(Duration::from_secs(120)).unwrap_or_else(|| panic!("a fresh full run ends\n{}", w.stderr_tail()));
    assert!(status.success(), "{}", w.stderr_tail());
    jsonl_state(&dir.path().join("out")).into_iter().filter_map(|(k, v)| v.map(|p| (k, p))).collect()
}

fn predictions(s: &Live) -> BTreeMap<String, f64> {
    s.rows().into_iter().map(|(k, v)| (k, v.0)).collect()
}

/// The same IDs with the same predictions, to the model's f32 precision: a row run in a batch of
/// another size can come out a last digit apart (and JSON and Postgres print floats differently).
fn same(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| ka == kb && (va - vb).abs() <= 1e-5 * va.abs().max(1.0))
}

#[test]
fn after_random_edits_the_table_equals_a_fresh_full_run() {
    let s = Live::new("flrandom");
    // A small deterministic generator: files, rows with and without IDs, edits, inserts, removals.
    let mut seed: u64 = 0x5eed;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut files: BTreeMap<String, (bool, Vec<usize>)> = BTreeMap::new();
    for f in 0..4 {
        files.insert(format!("f{f}.csv"), (f % 2 == 0, (0..200).map(|i| f * 1000 + i).collect()));
    }
    let write = |files: &BTreeMap<String, (bool, Vec<usize>)>, s: &Live| {
        for (name, (ids, rows)) in files {
            put(&s.input().join(name), &rides_csv("k", *ids, rows.iter().copied()));
        }
    };
    write(&files, &s);
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 800, "the first pass", &w);
    for round in 0..6 {
        let names: Vec<String> = files.keys().cloned().collect();
        let name = &names[next(names.len())];
        match next(4) {
            0 => {
                // Edit some rows (a new value for the row's features).
                let rows = &mut files.get_mut(name).unwrap().1;
                for _ in 0..5 {
                    let i = next(rows.len());
                    rows[i] += 50_000 + round;
                }
            }
            1 => {
                let rows = &mut files.get_mut(name).unwrap().1;
                let i = next(rows.len());
                rows.insert(i, 90_000 + round * 10);
                rows.insert(0, 91_000 + round * 10);
            }
            2 => {
                let rows = &mut files.get_mut(name).unwrap().1;
                for _ in 0..7 {
                    let i = next(rows.len());
                    rows.remove(i);
                }
            }
            _ => {
                if files.len() > 2 {
                    files.remove(name);
                    std::fs::remove_file(s.input().join(name)).unwrap();
                }
            }
        }
        if next(3) == 0 {
            files.insert(format!("new{round}.csv"), (round % 2 == 1, (0..30).map(|i| 70_000 + round * 100 + i).collect()));
        }
        write(&files, &s);
        std::thread::sleep(Duration::from_millis(150));
    }
    let want = fresh_full_run(&s, &s.input().display().to_string(), "");
    assert!(
        wait_until(Duration::from_secs(60), || same(&predictions(&s), &want)),
        "the table equals a fresh full run: {} rows vs {}\n{}",
        predictions(&s).len(),
        want.len(),
        w.stderr_tail()
    );
    stop(&mut w);
}

/// Writes rides as Parquet (typed columns: text IDs, integer locations, float distances),
/// through a temporary file and a rename.
fn put_parquet(path: &Path, rows: &[(usize, i64, i64, f64)]) {
    use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("PULocationID", DataType::Int64, false),
        Field::new("DOLocationID", DataType::Int64, false),
        Field::new("trip_distance", DataType::Float64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(rows.iter().map(|r| format!("p{}", r.0)).collect::<Vec<_>>())),
            Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
            Arc::new(Int64Array::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(rows.iter().map(|r| r.3).collect::<Vec<_>>())),
        ],
    )
    .unwrap();
    let tmp = path.with_extension("tmp");
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&tmp).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_parquet_file_is_followed_row_by_row_like_a_csv() {
    let s = Live::new("flparquet");
    let mut rows: Vec<(usize, i64, i64, f64)> =
        (0..1000).map(|i| (i, 1 + (i % 263) as i64, 1 + ((i * 7) % 263) as i64, 0.5 + (i % 97) as f64 * 0.25)).collect();
    let file = s.input().join("rides.parquet");
    put_parquet(&file, &rows);
    let text = s.topology(&s.input().display().to_string(), true, "format = \"parquet\"", "");
    let mut w = spawn_sluice(s.dir.path(), &text, &[], &[("RUST_LOG", "sluice=info")]);
    s.wait_rows(|r| r.len() == 1000, "every Parquet row answered", &w);
    rows[10].3 = 42.0;
    rows[500].1 = 100;
    rows[999].2 = 7;
    rows.remove(300);
    rows.remove(600);
    put_parquet(&file, &rows);
    s.wait_rows(|r| r.len() == 998, "the removed rows' answers are deleted", &w);
    let want = fresh_full_run(&s, &s.input().display().to_string(), "format = \"parquet\"");
    assert!(wait_until(Duration::from_secs(30), || same(&predictions(&s), &want)), "the table equals a fresh full run\n{}", w.stderr_tail());
    let out = stop(&mut w);
    assert_eq!(answered(&out), 1003, "1,000 rows, then the 3 edited: {out}");
}

/// The local S3 server scripts/test.sh starts (moto, for Tansu's persistent store).
fn s3_endpoint() -> String {
    std::env::var("SLUICE_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:19000".into())
}

fn s3_store(bucket: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(s3_endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap()
}

/// Creates a bucket on the test's S3 server with a plain `PUT /<bucket>`.
fn create_bucket(endpoint: &str, bucket: &str) {
    use std::io::{Read, Write};
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut c = std::net::TcpStream::connect(host).unwrap_or_else(|e| panic!("no S3 server at {endpoint} (scripts/test.sh starts one): {e}"));
    write!(c, "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200") || reply.contains("BucketAlreadyOwnedByYou"), "create bucket {bucket}: {reply}");
}

fn object_put(store: &dyn object_store::ObjectStore, name: &str, text: &str) {
    use object_store::ObjectStoreExt;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(store.put(&object_store::path::Path::from(name), text.to_string().into_bytes().into())).unwrap();
}

fn object_delete(store: &dyn object_store::ObjectStore, name: &str) {
    use object_store::ObjectStoreExt;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(store.delete(&object_store::path::Path::from(name))).unwrap();
}

/// Runs the same edits against a bucket and a local folder and compares both with fresh runs.
fn bucket_follows_edits(s: &Live, object_put: &dyn Fn(&str, &str), object_delete: &dyn Fn(&str), url: &str, source_extra: &str, env: &[(&str, &str)]) {
    object_put("in/a.csv", &rides_csv("a", true, 0..300));
    object_put("in/sub/b.csv", &rides_csv("", false, 0..100));
    object_put("in/notes.txt", "not a csv");
    let text = s.topology(url, true, source_extra, "");
    let mut w = spawn_sluice(s.dir.path(), &text, &[], env);
    s.wait_rows(|r| r.len() == 400, "both objects answered", &w);
    object_put("in/a.csv", &rides_csv("a", true, 10..300));
    object_delete("in/sub/b.csv");
    object_put("in/c.csv", &rides_csv("c", true, 0..5));
    s.wait_rows(|r| r.len() == 295, "the bucket's edits are followed", &w);
    let rows = predictions(s);
    assert!(rows.contains_key("c4") && !rows.contains_key("a3") && !rows.keys().any(|k| k.starts_with("sub/b.csv#")));
    // The same files in a local folder give the same answers.
    std::fs::create_dir_all(s.input().join("sub")).unwrap();
    put(&s.input().join("a.csv"), &rides_csv("a", true, 10..300));
    put(&s.input().join("c.csv"), &rides_csv("c", true, 0..5));
    let local = fresh_full_run(s, &s.input().display().to_string(), "");
    assert!(same(&rows, &local), "the bucket gives what the folder gives: {} rows vs {}", rows.len(), local.len());
    stop(&mut w);
}

#[test]
fn an_s3_bucket_is_followed_like_a_folder() {
    let s = Live::new("fls3");
    let bucket = s.name.replace('_', "-").to_lowercase();
    create_bucket(&s3_endpoint(), &bucket);
    let store = s3_store(&bucket);
    let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1"), ("RUST_LOG", "sluice=info")];
    bucket_follows_edits(
        &s,
        &|name, text| object_put(&store, name, text),
        &|name| object_delete(&store, name),
        &format!("s3://{bucket}/in"),
        &format!("endpoint = \"{}\"", s3_endpoint()),
        &env,
    );
}

/// fake-gcs-server, started by scripts/gcs.sh (scripts/test.sh runs it).
fn gcs_endpoint() -> String {
    std::env::var("SLUICE_GCS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4443".into())
}

/// One HTTP/1.1 request to fake-gcs-server; its whole reply.
fn gcs_http(method: &str, path: &str, content_type: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let host = gcs_endpoint().trim_start_matches("http://").to_string();
    let mut c = std::net::TcpStream::connect(&host).unwrap_or_else(|e| panic!("no fake-gcs-server at {host} (scripts/gcs.sh start): {e}"));
    write!(c, "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
        .unwrap();
    c.write_all(body).unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn a_gcs_bucket_is_followed_like_a_folder() {
    let s = Live::new("flgcs");
    let bucket: String = s.name.to_lowercase().chars().filter(char::is_ascii_alphanumeric).collect();
    // The test writes through the emulator's JSON API (its XML-API upload refuses object_store's
    // PUT); sluice only lists and reads, through object_store.
    let reply = gcs_http("POST", "/storage/v1/b?project=test", "application/json", format!("{{\"name\":\"{bucket}\"}}").as_bytes());
    assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
    let enc = |name: &str| name.replace('/', "%2F");
    let put = |name: &str, text: &str| {
        let reply = gcs_http("POST", &format!("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={}", enc(name)), "text/csv", text.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 200"), "upload {name}: {reply}");
    };
    let delete = |name: &str| {
        let reply = gcs_http("DELETE", &format!("/storage/v1/b/{bucket}/o/{}", enc(name)), "text/plain", b"");
        assert!(reply.starts_with("HTTP/1.1 204") || reply.starts_with("HTTP/1.1 200"), "delete {name}: {reply}");
    };
    // A service-account file that points at the emulator and turns OAuth off, as its docs say.
    let creds = s.dir.path().join("gcs.json");
    std::fs::write(
        &creds,
        format!(
            "{{\"gcs_base_url\": \"{}\", \"disable_oauth\": true, \"client_email\": \"\", \"private_key\": \"\", \"private_key_id\": \"\"}}",
            gcs_endpoint()
        ),
    )
    .unwrap();
    bucket_follows_edits(
        &s,
        &put,
        &delete,
        &format!("gs://{bucket}/in"),
        &format!("credentials_file = \"{}\"", creds.display()),
        &[("RUST_LOG", "sluice=info")],
    );
}

/// `column: data_type` of the answer table in Postgres.
fn column_types(table: &str) -> BTreeMap<String, String> {
    query(&format!(
        "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = '{table}'"
    ))
    .iter()
    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
    .collect()
}

#[test]
fn pass_through_columns_keep_their_types_a_new_column_is_added_and_a_type_conflict_is_a_dead_letter_naming_file_column_and_types() {
    let s = Live::new("fltyped");
    let head = "id,PULocationID,DOLocationID,trip_distance,vendor,passengers,fare,paid,pickup_at";
    let row = |i: usize, fare: &str| {
        format!(
            "t{i},{},{},{:.2},V{},{},{fare},{},2024-03-0{} 08:1{}:00",
            1 + i % 200,
            1 + i * 3 % 200,
            1.0 + i as f64 / 10.0,
            i % 3,
            1 + i % 4,
            i.is_multiple_of(2),
            1 + i % 9,
            i % 10
        )
    };
    let mut a = String::from(head) + "\n";
    for i in 0..20 {
        a.push_str(&(row(i, &format!("{}.5", 10 + i)) + "\n"));
    }
    put(&s.input().join("a.csv"), &a);
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 20, "a.csv answered", &w);
    let types = column_types(&s.table);
    for (column, want) in
        [("vendor", "text"), ("passengers", "bigint"), ("fare", "double precision"), ("paid", "boolean"), ("pickup_at", "timestamp with time zone")]
    {
        assert_eq!(types.get(column).map(String::as_str), Some(want), "column `{column}`: {types:?}");
    }
    let t = sluice::sql::quote_ident(&s.table);
    let r = &query(&format!("SELECT passengers, fare, paid, extract(hour FROM pickup_at AT TIME ZONE 'UTC')::int8 FROM {t} WHERE id = 't3'"))[0];
    assert_eq!((r.get::<_, i64>(0), r.get::<_, f64>(1), r.get::<_, bool>(2), r.get::<_, i64>(3)), (4, 13.5, false, 8));
    // The JSON lines carry the same types.
    let line = json_lines(&s.out(), "answers.w").into_iter().find(|v| v["id"] == "t3").unwrap();
    assert_eq!(
        (line["passengers"].as_i64(), line["fare"].as_f64(), line["paid"].as_bool(), line["vendor"].as_str()),
        (Some(4), Some(13.5), Some(false), Some("V0"))
    );

    // A later file with one more column: the column is added, with its type.
    let mut b = String::from(head) + ",tip\n";
    for i in 20..25 {
        b.push_str(&(row(i, "12.0") + &format!(",{}.25\n", i % 5)));
    }
    put(&s.input().join("b.csv"), &b);
    s.wait_rows(|r| r.len() == 25, "b.csv answered", &w);
    assert_eq!(column_types(&s.table).get("tip").map(String::as_str), Some("double precision"));
    let tips: Vec<Option<f64>> = query(&format!("SELECT tip FROM {t} WHERE id IN ('t1', 't21') ORDER BY id")).iter().map(|r| r.get(0)).collect();
    assert_eq!(tips, vec![None, Some(1.25)], "a.csv's rows have no tip; b.csv's have theirs");

    // A file whose `fare` is text: each of its rows is a dead letter naming the file, the column
    // and both types; the rest of the pipeline goes on.
    let mut c = String::from(head) + "\n";
    for (i, fare) in [(30, "n/a"), (31, "free"), (32, "unknown")] {
        c.push_str(&(row(i, fare) + "\n"));
    }
    put(&s.input().join("c.csv"), &c);
    let mut d = String::from(head) + "\n";
    d.push_str(&(row(40, "9.75") + "\n"));
    put(&s.input().join("d.csv"), &d);
    s.wait_rows(|r| r.contains_key("t40"), "d.csv answered after the conflicting c.csv", &w);
    // The Postgres sink refused them: its dead-letter table has them (sinks before it in the
    // topology, here the JSON lines, wrote them as text).
    let dead = || {
        query(&format!("SELECT position, reason, detail FROM dead_letters WHERE pipeline = '{}' AND reason = 'sink_rejected' ORDER BY position", s.name))
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(2)))
            .collect::<Vec<(String, String)>>()
    };
    assert!(wait_until(Duration::from_secs(30), || dead().len() == 3), "three dead letters for c.csv: {:?}\n{}", dead(), w.stderr_tail());
    for (position, detail) in dead() {
        assert!(
            detail.contains("type conflict: column `fare` is text in") && detail.contains("c.csv") && detail.contains("but float in table"),
            "{position}: {detail}"
        );
    }
    assert!(!s.rows().contains_key("t30"), "a conflicting row is not answered");
    stop(&mut w);
}

#[test]
fn a_duplicate_id_in_a_file_is_a_dead_letter_the_first_row_is_answered_and_it_is_not_recomputed_on_each_read() {
    let s = Live::new("fldup");
    let file = s.input().join("dup.csv");
    // d3 twice, with different trips; `twin` has the first d3's features, `twin2` the second's.
    let text = |extra: &str| {
        let mut t = String::from("id,PULocationID,DOLocationID,trip_distance\n");
        for i in 0..10 {
            t.push_str(&if i == 3 { "d3,3,21,1.25\n".to_string() } else { format!("d{i},{},{},{}\n", 10 + i, 20 + i, 1.5 + i as f64) });
        }
        t.push_str(extra);
        t.push_str("twin,3,21,1.25\ntwin2,200,90,40.5\nd3,200,90,40.5\n");
        t
    };
    put(&file, &text(""));
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 12, "d0..d9, twin and twin2 answered", &w);
    let rows = s.rows();
    assert_eq!(rows["d3"].0, rows["twin"].0, "the first row with the ID is the one answered");
    assert_ne!(rows["d3"].0, rows["twin2"].0, "not the second");
    let dead = || {
        query(&format!("SELECT detail FROM dead_letters WHERE pipeline = '{}' AND reason = 'duplicate_id'", s.name))
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<String>>()
    };
    assert!(wait_until(Duration::from_secs(30), || dead().len() == 1), "one duplicate_id dead letter: {:?}", dead());
    assert!(dead()[0].contains("`d3`") && dead()[0].contains("dup.csv"), "{:?}", dead());
    // A row is added: only it is computed, not d3 again.
    let before = s.rows();
    put(&file, &text("d7b,5,6,2.5\n"));
    s.wait_rows(|r| r.contains_key("d7b"), "the edit is answered", &w);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(s.rows()["d3"], before["d3"], "d3's answer is untouched");
    let out = stop(&mut w);
    assert_eq!(answered(&out), 13, "12 rows, then d7b: {out}");
}

/// A one-shot run of `s` over its input folder (2 workers) that must succeed: its stdout.
fn once(s: &Live, env: &[(&str, &str)]) -> String {
    let text = s.topology(&s.input().display().to_string(), false, "", "");
    let mut w = spawn_sluice(s.dir.path(), &text, &[], env);
    let status = w.wait_timeout(Duration::from_secs(180)).expect("a one-shot run ends");
    assert!(status.success(), "{}", w.stderr_tail());
    w.stdout()
}

/// The details of the pipeline's dead letters for `reason`.
fn dead_details(s: &Live, reason: &str) -> Vec<String> {
    common::blackbox::try_query(&format!("SELECT detail FROM dead_letters WHERE pipeline = '{}' AND reason = '{reason}'", s.name))
        .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect())
        .unwrap_or_default()
}

#[test]
fn renaming_a_file_between_two_one_shot_runs_keeps_every_answer() {
    // Before answers had owners: 1,000 answers, `mv b.csv a.csv`, 143 left, and a third run
    // computed nothing (b's deletes won over a's upserts, and a's manifest said "answered").
    let s = Live::new("flmv");
    put(&s.input().join("b.csv"), &rides_csv("k", true, 0..1000));
    assert_eq!(answered(&once(&s, &[])), 1000);
    assert_eq!(s.rows().len(), 1000);
    let want = predictions(&s);
    std::fs::rename(s.input().join("b.csv"), s.input().join("a.csv")).unwrap();
    once(&s, &[]);
    assert_eq!(predictions(&s), want, "every answer is there after the rename, the same");
    let third = once(&s, &[]);
    assert_eq!(answered(&third), 0, "nothing changed since: {third}");
    assert_eq!(predictions(&s), want);
    let jsonl: BTreeMap<String, f64> = jsonl_state(&s.out()).into_iter().filter_map(|(k, v)| v.map(|p| (k, p))).collect();
    assert!(same(&jsonl, &want), "JSON lines hold the same 1,000 answers");
}

#[test]
fn copy_then_delete_while_watching_keeps_every_answer_and_the_copy_takes_over() {
    // Before: `cp old.csv new.csv`, wait, `rm old.csv`: 1,000 answers, then 0, for good.
    let s = Live::new("flcp");
    put(&s.input().join("old.csv"), &rides_csv("k", true, 0..1000));
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 1000, "the first file answered", &w);
    let want = predictions(&s);
    std::fs::copy(s.input().join("old.csv"), s.input().join("new.tmp")).unwrap();
    std::fs::rename(s.input().join("new.tmp"), s.input().join("new.csv")).unwrap();
    // The copy's rows are answered from old.csv already: one duplicate_id dead letter each.
    assert!(wait_until(Duration::from_secs(60), || dead_details(&s, "duplicate_id").len() == 1000), "{}", w.stderr_tail());
    assert!(dead_details(&s, "duplicate_id").iter().all(|d| d.contains("new.csv") && d.contains("already answered from old.csv")));
    assert_eq!(predictions(&s), want, "the answers stand");
    std::fs::remove_file(s.input().join("old.csv")).unwrap();
    // The copy's rows take over: every answer again, the same predictions.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let p = predictions(&s);
            p.len() == 1000 && same(&p, &want)
        }),
        "{}",
        w.stderr_tail()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(same(&predictions(&s), &want), "and they stay");
    stop(&mut w);
    let fresh = fresh_full_run(&s, &s.input().display().to_string(), "");
    assert!(same(&fresh, &want), "a fresh full run gives the same answers");
}

#[test]
fn an_id_moved_between_two_files_in_one_listing_is_answered_from_its_new_file() {
    let s = Live::new("flmove");
    put(&s.input().join("f1.csv"), &rides_csv("m", true, 0..50));
    put(&s.input().join("f2.csv"), &rides_csv("n", true, 0..50));
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 100, "both files answered", &w);
    // m7 leaves f1 and joins f2 with other features, in one listing.
    std::fs::write(s.input().join("f1.tmp"), rides_csv("m", true, (0..50).filter(|i| *i != 7))).unwrap();
    std::fs::write(s.input().join("f2.tmp"), format!("{}m7,100,200,25.5\n", rides_csv("n", true, 0..50))).unwrap();
    std::fs::rename(s.input().join("f1.tmp"), s.input().join("f1.csv")).unwrap();
    std::fs::rename(s.input().join("f2.tmp"), s.input().join("f2.csv")).unwrap();
    let fresh = fresh_full_run(&s, &s.input().display().to_string(), "");
    assert_eq!(fresh.len(), 100);
    assert!(wait_until(Duration::from_secs(60), || same(&predictions(&s), &fresh)), "the table equals a fresh full run\n{}", w.stderr_tail());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(same(&predictions(&s), &fresh), "and stays so");
    stop(&mut w);
}

#[test]
fn two_files_sharing_ids_answer_each_once_and_the_second_takes_over_when_the_first_goes() {
    let s = Live::new("flshare");
    // a.csv: s0..s29; b.csv: s20..s39 with other features (s20..s29 in both).
    put(&s.input().join("a.csv"), &rides_csv("s", true, 0..30));
    let b: String = std::iter::once("id,PULocationID,DOLocationID,trip_distance\n".to_string())
        .chain((20..40).map(|i| format!("s{i},{},{},{}\n", 100 + i, 50 + i, 30.5 + i as f64)))
        .collect();
    put(&s.input().join("b.csv"), &b);
    let out = once(&s, &[]);
    assert_eq!(answered(&out), 40, "each of the 40 IDs once: {out}");
    let dups = dead_details(&s, "duplicate_id");
    assert_eq!(dups.len(), 10, "s20..s29 of b.csv are dead letters: {dups:?}");
    assert!(dups.iter().all(|d| d.contains("b.csv") && d.contains("already answered from a.csv")), "{dups:?}");
    let fresh = fresh_full_run(&s, &s.input().display().to_string(), "");
    assert!(same(&predictions(&s), &fresh), "equal to a fresh full run");
    // a.csv goes: s0..s19 go with it, and b.csv's s20..s29 are answered now.
    std::fs::remove_file(s.input().join("a.csv")).unwrap();
    once(&s, &[]);
    let fresh = fresh_full_run(&s, &s.input().display().to_string(), "");
    assert_eq!(fresh.len(), 20);
    let now = predictions(&s);
    assert!(same(&now, &fresh), "b.csv's 20 rows: {:?}", now.keys().collect::<Vec<_>>());
}

/// ID to (prediction, owning pipeline, source) in the table of `s`.
fn owners(s: &Live) -> BTreeMap<String, (f64, String, String)> {
    query(&format!("SELECT id, prediction, pipeline, source FROM {}", sluice::sql::quote_ident(&s.table)))
        .iter()
        .map(|r| (r.get::<_, String>(0), (r.get::<_, f64>(1), r.get::<_, String>(2), r.get::<_, String>(3))))
        .collect()
}

#[test]
fn two_pipelines_on_one_table_never_delete_or_overwrite_each_others_answers() {
    // Before answers recorded their pipeline: b's run overwrote a's answers to o5..o9 with its
    // own, and removing b's file then deleted them, though a's file still held them.
    let a = Live::new("flowna");
    let mut b = Live::new("flownb");
    b.table = a.table.clone();
    put(&a.input().join("a.csv"), &rides_csv("o", true, 0..10));
    // b.csv: o5..o14, with other features than a.csv's o5..o9.
    let b_rows: String = std::iter::once("id,PULocationID,DOLocationID,trip_distance\n".to_string())
        .chain((5..15).map(|i| format!("o{i},{},{},{}\n", 100 + i, 50 + i, 30.5 + i as f64)))
        .collect();
    put(&b.input().join("b.csv"), &b_rows);
    assert_eq!(answered(&once(&a, &[])), 10);
    let a_answers = predictions(&a);
    once(&b, &[]);
    let rows = owners(&a);
    assert_eq!(rows.len(), 15, "o0..o14: {rows:?}");
    for i in 0..15 {
        let (owner, source) = if i < 10 { (&a.name, "a.csv") } else { (&b.name, "b.csv") };
        let (p, pipeline, src) = &rows[&format!("o{i}")];
        assert_eq!((pipeline, src.as_str()), (owner, source), "o{i}'s owner");
        if i < 10 {
            assert_eq!(*p, a_answers[&format!("o{i}")], "o{i} keeps a's answer");
        }
    }
    // b's five IDs that a answers are b's dead letters, naming a.
    let refused = dead_details(&b, "sink_rejected");
    assert_eq!(refused.len(), 5, "{refused:?}");
    assert!(refused.iter().all(|d| d.contains(&format!("by pipeline `{}`", a.name))), "{refused:?}");
    // b's rows go (its file keeps only its header, as a folder listing empty is not taken for
    // "everything removed"): b's own five answers go with them, a's ten stay.
    put(&b.input().join("b.csv"), "id,PULocationID,DOLocationID,trip_distance\n");
    once(&b, &[]);
    let rows = owners(&a);
    let want: std::collections::BTreeSet<String> = (0..10).map(|i| format!("o{i}")).collect();
    assert_eq!(rows.keys().cloned().collect::<std::collections::BTreeSet<_>>(), want, "a's ten answers, and only them");
    assert!(rows.values().all(|(_, pipeline, _)| pipeline == &a.name));
    // The same JSON-lines folder for both is refused at start-up, naming the owner.
    let text = b.topology(&b.input().display().to_string(), false, "", "").replace(&b.out().display().to_string(), &a.out().display().to_string());
    let mut w = spawn_sluice(b.dir.path(), &text, &[], &[]);
    let status = w.wait_timeout(Duration::from_secs(60)).expect("refused at once");
    assert_eq!(status.code(), Some(1), "{}", w.stderr_tail());
    assert!(w.stderr_tail().contains(&format!("holds the answers of pipeline `{}`", a.name)), "{}", w.stderr_tail());
}

#[test]
fn a_folder_moved_away_for_3_s_deletes_nothing_and_recomputes_nothing() {
    let s = Live::new("flaway");
    put(&s.input().join("a.csv"), &rides_csv("w", true, 0..1000));
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 1000, "answered", &w);
    let before = s.rows();
    let away = s.dir.path().join("away");
    std::fs::rename(s.input(), &away).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    std::fs::rename(&away, s.input()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.rows(), before, "every answer as it was, updated_at included");
    // An emptied folder (the location lists, with no files) keeps its answers too.
    std::fs::rename(s.input().join("a.csv"), s.dir.path().join("a.csv")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.rows().len(), 1000, "an empty folder is not `every file removed`");
    std::fs::rename(s.dir.path().join("a.csv"), s.input().join("a.csv")).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.rows(), before);
    let out = stop(&mut w);
    assert_eq!(answered(&out), 1000, "nothing was recomputed: {out}");
    assert!(w.stderr().contains("lists no `*.csv` files"), "the empty folder is warned about: {}", w.stderr_tail());
}

#[test]
fn a_symlink_loop_and_a_dangling_link_do_not_stop_a_watch() {
    let s = Live::new("flloop");
    put(&s.input().join("a.csv"), &rides_csv("y", true, 0..10));
    std::os::unix::fs::symlink("..", s.input().join("up")).unwrap();
    std::os::unix::fs::symlink(s.input(), s.input().join("self")).unwrap();
    std::os::unix::fs::symlink(s.input().join("nowhere.csv"), s.input().join("dangling.csv")).unwrap();
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 10, "answered", &w);
    put(&s.input().join("b.csv"), &rides_csv("z", true, 0..10));
    s.wait_rows(|r| r.len() == 20, "a file added afterwards is answered", &w);
    let started = std::time::Instant::now();
    let out = stop(&mut w);
    assert!(started.elapsed() < Duration::from_secs(10), "SIGTERM ends the watch at once");
    assert_eq!(answered(&out), 20, "{out}");
}

#[test]
fn a_row_edited_into_a_wrong_type_loses_its_old_answer_and_gets_it_back_when_fixed() {
    // Before: its wrong_type dead letter was written and its old prediction stayed.
    let s = Live::new("flbad");
    let file = s.input().join("k.csv");
    let text = rides_csv("k", true, 0..20);
    put(&file, &text);
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 20, "answered", &w);
    let good = s.rows()["k7"].0;
    let line = text.lines().find(|l| l.starts_with("k7,")).unwrap().to_string();
    let mut bad_line: Vec<&str> = line.split(',').collect();
    bad_line[3] = "abc";
    put(&file, &text.replace(&format!("\n{line}\n"), &format!("\n{}\n", bad_line.join(","))));
    s.wait_rows(|r| r.len() == 19 && !r.contains_key("k7"), "the bad row's old answer is deleted", &w);
    assert!(wait_until(Duration::from_secs(30), || dead_details(&s, "wrong_type").len() == 1), "{:?}", dead_details(&s, "wrong_type"));
    assert_eq!(jsonl_state(&s.out()).get("k7"), Some(&None), "JSON lines: k7's last op is a delete");
    put(&file, &text);
    s.wait_rows(|r| r.len() == 20, "fixed, it is answered again", &w);
    assert!((s.rows()["k7"].0 - good).abs() < 1e-5 * good.abs().max(1.0), "the same prediction as before");
    stop(&mut w);
}

#[test]
fn a_row_edited_into_a_sink_refusal_loses_its_old_answer() {
    // A pass-through column `fare` is a float in the table; k3's fare edited into text is a
    // type conflict the Postgres sink refuses: its dead letter, and no stale answer.
    let s = Live::new("flrefuse");
    let file = s.input().join("f.csv");
    let text: String = std::iter::once("id,PULocationID,DOLocationID,trip_distance,fare\n".to_string())
        .chain((0..10).map(|i| format!("k{i},{},{},{},{}.5\n", 10 + i, 20 + i, 1.5 + i as f64, 7 + i)))
        .collect();
    put(&file, &text);
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 10, "answered", &w);
    put(&file, &text.replace("k3,13,23,4.5,10.5", "k3,13,23,4.5,ten"));
    s.wait_rows(|r| r.len() == 9 && !r.contains_key("k3"), "k3's old answer is deleted", &w);
    assert!(wait_until(Duration::from_secs(30), || dead_details(&s, "sink_rejected").len() == 1), "{:?}", dead_details(&s, "sink_rejected"));
    stop(&mut w);
}

/// A real ONNX model that fails on some rows: `prediction = table[PULocationID] + trip_distance`,
/// where `table` has 300 entries, so ONNX Runtime's Gather refuses a batch holding a
/// PULocationID of 300 or more ("indices element out of data bounds"). Built with the `onnx`
/// package of the test venv (scripts/setup.sh --test).
fn gather_model(dir: &Path) -> PathBuf {
    let path = dir.join("gather.onnx");
    let script = format!(
        r#"
import onnx
from onnx import helper, TensorProto, numpy_helper
import numpy as np
table = numpy_helper.from_array((np.arange(300, dtype=np.float32) * 0.5).reshape(300, 1), "table")
g = helper.make_graph(
    [helper.make_node("Gather", ["table", "PULocationID"], ["picked"], axis=0),
     helper.make_node("Reshape", ["picked", "shape"], ["flat"]),
     helper.make_node("Add", ["flat", "trip_distance"], ["prediction"])],
    "gather",
    [helper.make_tensor_value_info("PULocationID", TensorProto.INT64, ["N", 1]),
     helper.make_tensor_value_info("trip_distance", TensorProto.FLOAT, ["N", 1])],
    [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["N", 1])],
    [table, numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), "shape")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
onnx.checker.check_model(m)
onnx.save(m, "{out}")
"#,
        out = path.display()
    );
    let status = std::process::Command::new(common::python()).arg("-c").arg(script).status().expect("run the venv's python");
    assert!(status.success(), "building the Gather model failed");
    path
}

#[test]
fn a_row_edited_into_a_model_failure_loses_its_old_answer_and_gets_it_back_when_fixed() {
    let s = Live::new("flmodel");
    let model = gather_model(s.dir.path());
    let file = s.input().join("g.csv");
    let text: String = std::iter::once("id,PULocationID,trip_distance\n".to_string()).chain((0..10).map(|i| format!("g{i},{},{}.25\n", 10 * i, i))).collect();
    put(&file, &text);
    let topology = s
        .topology(&s.input().display().to_string(), true, "", "")
        .replace(&format!("{}/models/rides/model.onnx", env!("CARGO_MANIFEST_DIR")), &model.display().to_string());
    let mut w = spawn_sluice(s.dir.path(), &topology, &[], &[("RUST_LOG", "sluice=info")]);
    s.wait_rows(|r| r.len() == 10, "answered", &w);
    // g4: table[40] + 4.25 = 24.25, from ONNX Runtime itself.
    assert!((s.rows()["g4"].0 - 24.25).abs() < 1e-6, "{:?}", s.rows()["g4"]);
    put(&file, &text.replace("g4,40,4.25", "g4,400,4.25"));
    s.wait_rows(|r| r.len() == 9 && !r.contains_key("g4"), "g4's old answer is deleted", &w);
    let failed = || dead_details(&s, "inference_failed");
    assert!(wait_until(Duration::from_secs(30), || failed().len() == 1), "{:?}", failed());
    assert!(failed()[0].contains("out of"), "ONNX Runtime's reason: {:?}", failed());
    assert_eq!(jsonl_state(&s.out()).get("g4"), Some(&None), "JSON lines: g4's last op is a delete");
    put(&file, &text);
    s.wait_rows(|r| r.len() == 10, "fixed, it is answered again", &w);
    assert!((s.rows()["g4"].0 - 24.25).abs() < 1e-6);
    let out = stop(&mut w);
    assert_eq!(answered(&out), 11, "10 rows, then g4 again; the other nine were not recomputed: {out}");
}

/// Holds a row lock on `id` of `table` in an open transaction until the returned sender is
/// dropped or sent to.
fn hold_row_lock(table: &str, id: &str) -> std::sync::mpsc::Sender<()> {
    let (release, wait) = std::sync::mpsc::channel::<()>();
    let (locked_tx, locked) = std::sync::mpsc::channel::<()>();
    let sql = format!("BEGIN; SELECT 1 FROM {} WHERE id = '{id}' FOR UPDATE", sluice::sql::quote_ident(table));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client.batch_execute(&sql).await.unwrap();
            locked_tx.send(()).unwrap();
            let _ = tokio::task::spawn_blocking(move || wait.recv()).await;
            let _ = client.batch_execute("ROLLBACK").await;
        });
    });
    locked.recv_timeout(Duration::from_secs(30)).expect("the row lock is taken");
    release
}

#[test]
fn a_kill_between_two_workers_commits_of_one_file_loses_no_answer() {
    // A worker's sink is held by a row lock on one ID while the other worker commits its share
    // of the file's rows; the process is killed then. Before, the file's manifest was stored by
    // the worker that read the file, in its own transaction, covering the rows of both workers:
    // the restart found it current and never recomputed the held worker's rows. The file's name
    // is chosen so that, with the routing of before, the reader is not the held ID's worker.
    use std::hash::{Hash, Hasher};
    let held = "g0";
    let old_worker_of = |id: &str| {
        let mut h = std::hash::DefaultHasher::new();
        id.hash(&mut h);
        h.finish() % 2
    };
    let name = (0..100).map(|n| format!("g{n}.csv")).find(|f| twox_hash::XxHash3_64::oneshot(f.as_bytes()) % 2 != old_worker_of(held)).unwrap();
    let s = Live::new("flkill");
    let file = s.input().join(&name);
    put(&file, &rides_csv("g", true, 0..400));
    assert_eq!(answered(&once(&s, &[])), 400);
    let first = predictions(&s);
    // Every row edited: each gets another prediction.
    let edited: String = std::iter::once("id,PULocationID,DOLocationID,trip_distance\n".to_string())
        .chain((0..400).map(|i| format!("g{i},{},{},{}\n", 1 + (i * 3) % 263, 1 + (i * 5) % 263, 40.25 + (i % 13) as f64)))
        .collect();
    put(&file, &edited);
    let release = hold_row_lock(&s.table, held);
    let text = s.topology(&s.input().display().to_string(), false, "", "");
    let mut w = spawn_sluice(s.dir.path(), &text, &[], &[("RUST_LOG", "sluice=info")]);
    // Wait until the free worker has committed rows (some rows changed, the held one not), and
    // it stays so for a second. (It commits what its in-flight bound lets it read: the durability
    // that frees that bound waits for every worker, the held one too.)
    let changed = || predictions(&s).iter().filter(|(k, v)| first.get(*k) != Some(v)).count();
    assert!(wait_until(Duration::from_secs(120), || changed() > 0), "the free worker commits rows\n{}", w.stderr_tail());
    let mut last = changed();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = changed();
        if now == last {
            break;
        }
        last = now;
    }
    assert!(last < 400, "the held worker's rows wait for the lock: {last} changed");
    assert_eq!(predictions(&s)[held], first[held]);
    w.signal("-9");
    w.wait_timeout(Duration::from_secs(30)).expect("killed");
    drop(release);
    std::thread::sleep(Duration::from_millis(300));
    once(&s, &[]);
    let fresh = fresh_full_run(&s, &s.input().display().to_string(), "");
    let now = predictions(&s);
    // Answers agree to f32 precision (a batch of another size can move the last digit).
    let stale: Vec<&String> = now.keys().filter(|k| fresh.get(*k).is_none_or(|f| (f - now[*k]).abs() > 1e-5 * f.abs().max(1.0))).collect();
    assert!(stale.is_empty() && now.len() == 400, "{} stale answers after the restart, e.g. {:?}", stale.len(), stale.iter().take(5).collect::<Vec<_>>());
}

#[test]
fn after_random_file_operations_and_kills_the_table_equals_a_fresh_full_run() {
    // Edits, inserts, deletes, renames, a copy then a delete, a move into a subfolder, a
    // non-atomic replace, an id moved from one file to another; kill -9 at random points, on 2
    // workers. At the end the table and the JSON lines equal a fresh full run over what is there.
    let s = Live::new("flchaos");
    let mut g = {
        let mut x: u64 = 20261207;
        move |n: usize| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) as usize) % n.max(1)
        }
    };
    // Each file: its rows as (id, features).
    let mut files: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut next = 0usize;
    let row = |next: &mut usize, g: &mut dyn FnMut(usize) -> usize| {
        *next += 1;
        (format!("c{next}"), format!("{},{},{}.{}", 1 + g(263), 1 + g(263), 1 + g(30), g(100)))
    };
    let text = |rows: &[(String, String)]| -> String {
        let mut t = String::from("id,PULocationID,DOLocationID,trip_distance\n");
        for (id, f) in rows {
            t.push_str(&format!("{id},{f}\n"));
        }
        t
    };
    for name in ["a.csv", "b.csv", "sub/c.csv"] {
        let rows: Vec<(String, String)> = (0..60).map(|_| row(&mut next, &mut g)).collect();
        files.insert(name.to_string(), rows);
    }
    std::fs::create_dir_all(s.input().join("sub")).unwrap();
    for (name, rows) in &files {
        put(&s.input().join(name), &text(rows));
    }
    let mut w = s.watch("");
    s.wait_rows(|r| r.len() == 180, "the first pass", &w);
    let mut kills = 0;
    for round in 0..14 {
        let names: Vec<String> = files.keys().cloned().collect();
        let pick = names[g(names.len())].clone();
        match g(8) {
            0 => {
                // Edit a few rows in place.
                let rows = files.get_mut(&pick).unwrap();
                for _ in 0..1 + g(5) {
                    let i = g(rows.len());
                    rows[i].1 = row(&mut next, &mut g).1;
                }
                put(&s.input().join(&pick), &text(rows));
            }
            1 => {
                // Insert at the top and delete from the middle.
                let rows = files.get_mut(&pick).unwrap();
                let new = row(&mut next, &mut g);
                rows.insert(0, new);
                if rows.len() > 10 {
                    rows.remove(5 + g(rows.len() - 5));
                }
                put(&s.input().join(&pick), &text(rows));
            }
            2 => {
                // Rename.
                let to = format!("r{round}.csv");
                std::fs::rename(s.input().join(&pick), s.input().join(&to)).unwrap();
                let rows = files.remove(&pick).unwrap();
                files.insert(to, rows);
            }
            3 => {
                // Copy, let it be seen, then delete the original.
                let to = format!("copy{round}.csv");
                std::fs::copy(s.input().join(&pick), s.input().join("copy.tmp")).unwrap();
                std::fs::rename(s.input().join("copy.tmp"), s.input().join(&to)).unwrap();
                std::thread::sleep(Duration::from_millis(g(1200) as u64));
                std::fs::remove_file(s.input().join(&pick)).unwrap();
                let rows = files.remove(&pick).unwrap();
                files.insert(to, rows);
            }
            4 => {
                // Move into the subfolder (or out of it).
                let to = if pick.starts_with("sub/") { format!("m{round}.csv") } else { format!("sub/m{round}.csv") };
                std::fs::rename(s.input().join(&pick), s.input().join(&to)).unwrap();
                let rows = files.remove(&pick).unwrap();
                files.insert(to, rows);
            }
            5 => {
                // Replace in place, not atomically: truncate, half, a pause, the rest.
                use std::io::Write;
                let rows = files.get_mut(&pick).unwrap();
                let i = g(rows.len());
                rows[i].1 = row(&mut next, &mut g).1;
                let body = text(rows);
                let mut f = std::fs::File::create(s.input().join(&pick)).unwrap();
                f.write_all(&body.as_bytes()[..body.len() / 2]).unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(100));
                f.write_all(&body.as_bytes()[body.len() / 2..]).unwrap();
            }
            6 if names.len() > 1 => {
                // An id moves from one file to another, with new features.
                let other = names.iter().find(|n| **n != pick).unwrap().clone();
                let moved = {
                    let rows = files.get_mut(&pick).unwrap();
                    rows.remove(g(rows.len()))
                };
                let features = row(&mut next, &mut g).1;
                files.get_mut(&other).unwrap().push((moved.0, features));
                put(&s.input().join(&pick), &text(&files[&pick]));
                put(&s.input().join(&other), &text(&files[&other]));
            }
            _ => {
                // A new file.
                let rows: Vec<(String, String)> = (0..1 + g(30)).map(|_| row(&mut next, &mut g)).collect();
                let name = format!("n{round}.csv");
                put(&s.input().join(&name), &text(&rows));
                files.insert(name, rows);
            }
        }
        std::thread::sleep(Duration::from_millis(g(900) as u64));
        if g(3) == 0 {
            w.signal("-9");
            w.wait_timeout(Duration::from_secs(30)).expect("killed");
            kills += 1;
            w = s.watch("");
        }
    }
    assert!(kills >= 2, "the sequence kills the worker a few times: {kills}");
    if let Ok(keep) = std::env::var("KEEP_CHAOS") {
        let _ = std::process::Command::new("cp").args(["-a", &s.input().display().to_string(), &keep]).status();
    }
    let fresh = fresh_full_run(&s, &s.input().display().to_string(), "");
    let total: usize = files.values().map(Vec::len).sum();
    assert_eq!(fresh.len(), total, "a fresh run answers every row once");
    let close = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
        a.len() == b.len() && a.iter().zip(b).all(|((ka, va), (kb, vb))| ka == kb && (va - vb).abs() <= 1e-5 * va.abs().max(1.0))
    };
    assert!(
        wait_until(Duration::from_secs(120), || close(&predictions(&s), &fresh)),
        "the table equals a fresh full run: {} rows vs {}\n{}",
        predictions(&s).len(),
        fresh.len(),
        w.stderr_tail()
    );
    std::thread::sleep(Duration::from_millis(2000));
    assert!(close(&predictions(&s), &fresh), "and stays so");
    stop(&mut w);
    let jsonl: BTreeMap<String, f64> = jsonl_state(&s.out()).into_iter().filter_map(|(k, v)| v.map(|p| (k, p))).collect();
    assert!(close(&jsonl, &fresh), "the JSON lines' last op per id equal it too: {} vs {}", jsonl.len(), fresh.len());
}
