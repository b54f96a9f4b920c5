//! The QA pipeline against the real Postgres that scripts/pg.sh starts: table creation, idempotent
//! reruns, dead letters, and a hostile table name that must stay a name.

mod common;

use common::*;

fn pg_sink(table: &str, dead: &str) -> String {
    // TOML basic strings: escape backslashes and quotes of the hostile name.
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    format!("[[sinks]]\ntype = \"postgres\"\nurl = \"{}\"\ntable = \"{}\"\ndead_letter_table = \"{}\"\n", pg_url(), esc(table), esc(dead))
}

#[test]
fn creates_tables_and_a_rerun_leaves_exactly_the_same_rows() {
    exec("DROP TABLE IF EXISTS it_rerun_answers; DROP TABLE IF EXISTS it_rerun_dead;");
    let text = qa_topology("it_rerun", &repo().join("samples/questions.csv"), &pg_sink("it_rerun_answers", "it_rerun_dead"), "");
    let first = run(&text, 1);
    assert_eq!((first.answered, first.dead_letters), (22, 3));
    let cols: Vec<String> = query("SELECT column_name::text FROM information_schema.columns WHERE table_name = 'it_rerun_answers' ORDER BY ordinal_position")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for c in ["id", "answer", "start_char", "end_char", "score", "model", "updated_at", "topic"] {
        assert!(cols.contains(&c.to_string()), "column {c} missing from {cols:?}");
    }
    let pk: Vec<String> = query("SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'it_rerun_answers'::regclass AND i.indisprimary").iter().map(|r| r.get(0)).collect();
    assert_eq!(pk, vec!["id".to_string()]);

    let snapshot = || -> Vec<String> {
        query("SELECT id || '|' || answer || '|' || start_char || '|' || end_char || '|' || score || '|' || model || '|' || coalesce(topic, '') || '|' || updated_at FROM it_rerun_answers ORDER BY id").iter().map(|r| r.get(0)).collect()
    };
    let before = snapshot();
    assert_eq!(before.len(), 22);
    let second = run(&text, 2);
    assert_eq!(second.answered, 22);
    let after = snapshot();
    assert_eq!(before, after, "a rerun (even on 2 workers) leaves every row, updated_at included, unchanged");
    let dead: i64 = query("SELECT count(*) FROM it_rerun_dead").first().unwrap().get(0);
    assert_eq!(dead, 3, "dead letters are upserted by position, not duplicated");
}

#[test]
fn dead_letters_keep_reason_position_and_original_bytes() {
    exec("DROP TABLE IF EXISTS it_dead_answers; DROP TABLE IF EXISTS it_dead_letters;");
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.csv");
    let mut bytes = b"id,question,context\n".to_vec();
    bytes.extend_from_slice(b"ok1,Who wrote it?,Ada wrote it in 1843.\n");
    bytes.extend_from_slice(b"u1,Bad \xff bytes?,Some context.\n");
    bytes.extend_from_slice(b"e1,   ,Context without question.\n");
    bytes.extend_from_slice(b"x1,too,many,fields\n");
    bytes.extend_from_slice(b"q1,\"quoted\"oops,ctx\n");
    bytes.extend_from_slice(format!("big,Huge?,{}\n", "z".repeat(200)).as_bytes());
    bytes.extend_from_slice(b"ok2,When?,It was 1843.\n");
    std::fs::write(&input, &bytes).unwrap();
    let text = qa_topology("it_dead", &input, &pg_sink("it_dead_answers", "it_dead_letters"), "")
        .replace("type = \"csv\"\n", "type = \"csv\"\nmax_field_bytes = 100\n");
    let s = run(&text, 1);
    assert_eq!((s.answered, s.dead_letters), (2, 5));
    let rows = query("SELECT source, position, reason, detail, raw FROM it_dead_letters ORDER BY position");
    let got: Vec<(String, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        got,
        vec![
            ("bad.csv".into(), "row 2".into(), "invalid_utf8".into()),
            ("bad.csv".into(), "row 3".into(), "empty_field".into()),
            ("bad.csv".into(), "row 4".into(), "extra_column".into()),
            ("bad.csv".into(), "row 5".into(), "broken_quoting".into()),
            ("bad.csv".into(), "row 6".into(), "oversize_field".into()),
        ]
    );
    let raw: Vec<u8> = rows[0].get(4);
    assert_eq!(raw, b"u1,Bad \xff bytes?,Some context.".to_vec());
    let ids: Vec<String> = query("SELECT id FROM it_dead_answers ORDER BY id").iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec!["ok1", "ok2"], "the worker kept going past the bad rows");
}

#[test]
fn a_hostile_table_name_is_quoted_not_executed() {
    let hostile = r#"qa"; DROP TABLE it_victim; --"#;
    exec(&format!(
        "CREATE TABLE IF NOT EXISTS it_victim (x int); DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS it_hostile_dead;",
        sluice::sql::quote_ident(hostile)
    ));
    let text = qa_topology("it_hostile", &repo().join("samples/questions.csv"), &pg_sink(hostile, "it_hostile_dead"), "");
    let s = run(&text, 1);
    assert_eq!(s.answered, 22);
    let victim: i64 = query("SELECT count(*) FROM pg_tables WHERE tablename = 'it_victim'").first().unwrap().get(0);
    assert_eq!(victim, 1, "the victim table survives");
    let n: i64 = query(&format!("SELECT count(*) FROM {}", sluice::sql::quote_ident(hostile))).first().unwrap().get(0);
    assert_eq!(n, 22, "answers landed in the table with the hostile name itself");
}

/// New IDs go in with a plain insert; a batch that meets an existing ID is redone as an upsert
/// in a new transaction. Either way each ID has one row with its latest value, and the batch's
/// offsets are stored with it.
#[test]
fn a_batch_meeting_existing_ids_is_written_whole_as_an_upsert() {
    use sluice::connectors::postgres::sink::{PostgresTarget, PostgresWriter};
    use sluice::record::{Answer, Change, Column, ColumnKind, SourcePos, Value};
    use sluice::sink::{EpochBatch, SinkWriter};
    use sluice::source::Checkpoint;
    static COLUMNS: [Column; 1] = [Column { name: "duration", kind: ColumnKind::Float }];
    exec("DROP TABLE IF EXISTS it_upsert_answers; DROP TABLE IF EXISTS it_upsert_dead;");
    let target = PostgresTarget::new(&pg_url(), "public", "it_upsert_answers", "it_upsert_dead", "it_upsert");
    let mut writer = PostgresWriter::new(target, &COLUMNS).unwrap();
    writer.connect_now().unwrap(); // creates the tables, sluice_checkpoints included
    exec("DELETE FROM sluice_checkpoints WHERE pipeline = 'it_upsert';");
    let batch = |ids: &[(&str, f64)], next_offset: i64| EpochBatch {
        epoch: next_offset as u64,
        changes: ids
            .iter()
            .map(|(id, d)| {
                Change::Upsert(Answer {
                    id: id.to_string(),
                    values: vec![Value::Float(*d)],
                    passthrough: Vec::new(),
                    model: "rides@test".into(),
                    pos: SourcePos::seq("generator".into(), 0),
                    ingest_ms: 0,
                    raw: Vec::new(),
                    seq: 0,
                    replaces: false,
                })
            })
            .collect(),
        dead: Vec::new(),
        checkpoints: vec![Checkpoint { scope: "it-upsert".into(), shard: "0".into(), position: next_offset.to_string() }],
    };
    let rows = || -> Vec<(String, f64)> { query("SELECT id, duration FROM it_upsert_answers ORDER BY id").iter().map(|r| (r.get(0), r.get(1))).collect() };
    let offset = || -> i64 {
        query("SELECT position FROM sluice_checkpoints WHERE pipeline = 'it_upsert' AND target = 'public.it_upsert_answers'")
            .first()
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap()
    };
    writer.write(&batch(&[("a", 1.0), ("b", 2.0)], 2)).unwrap();
    assert_eq!(rows(), vec![("a".into(), 1.0), ("b".into(), 2.0)]);
    assert_eq!(offset(), 2);
    // "z" sorts last, so the plain insert writes "c" before it meets "b" and is rolled back.
    writer.write(&batch(&[("c", 3.0), ("b", 20.0), ("z", 26.0)], 5)).unwrap();
    assert_eq!(rows(), vec![("a".into(), 1.0), ("b".into(), 20.0), ("c".into(), 3.0), ("z".into(), 26.0)]);
    assert_eq!(offset(), 5);
    let before: Vec<String> = query("SELECT id || updated_at::text FROM it_upsert_answers ORDER BY id").iter().map(|r| r.get(0)).collect();
    writer.write(&batch(&[("a", 1.0), ("c", 3.0)], 7)).unwrap();
    let after: Vec<String> = query("SELECT id || updated_at::text FROM it_upsert_answers ORDER BY id").iter().map(|r| r.get(0)).collect();
    assert_eq!(before, after, "an unchanged answer leaves its row untouched");
    assert_eq!(offset(), 7);
}

/// A delete removes the row in the same transaction, and a record Postgres refuses (a NUL byte
/// in a text value: class 22) is reported as the record's fault, not retried for ever.
#[test]
fn a_delete_removes_the_row_and_a_record_postgres_refuses_is_a_record_error() {
    use sluice::connectors::postgres::sink::{PostgresTarget, PostgresWriter};
    use sluice::record::{Answer, Change, Column, ColumnKind, Deleted, SourcePos, Value};
    use sluice::sink::{EpochBatch, SinkError, SinkWriter};
    static COLUMNS: [Column; 1] = [Column { name: "label", kind: ColumnKind::Text }];
    exec("DROP TABLE IF EXISTS it_delete_answers; DROP TABLE IF EXISTS it_delete_dead;");
    let target = PostgresTarget::new(&pg_url(), "public", "it_delete_answers", "it_delete_dead", "it_delete");
    let mut writer = PostgresWriter::new(target, &COLUMNS).unwrap();
    let upsert = |id: &str, label: &str, seq: u64| {
        Change::Upsert(Answer {
            id: id.into(),
            values: vec![Value::Text(label.into())],
            passthrough: Vec::new(),
            model: "m@test".into(),
            pos: SourcePos::seq("g".into(), seq),
            ingest_ms: 0,
            raw: Vec::new(),
            seq,
            replaces: false,
        })
    };
    let delete = |id: &str, seq: u64| Change::Delete(Deleted { id: id.into(), pos: SourcePos::seq("g".into(), seq), ingest_ms: 0, seq });
    let write = |w: &mut PostgresWriter, changes: Vec<Change>| w.write(&EpochBatch { epoch: 1, changes, dead: Vec::new(), checkpoints: Vec::new() });
    write(&mut writer, vec![upsert("a", "x", 1), upsert("b", "y", 2), upsert("c", "z", 3)]).unwrap();
    // In one batch: b is deleted, c is deleted then written again, a is written then deleted.
    write(&mut writer, vec![delete("b", 4), delete("c", 5), upsert("c", "z2", 6), upsert("a", "x2", 7), delete("a", 8)]).unwrap();
    let ids: Vec<(String, String)> = query("SELECT id, label FROM it_delete_answers ORDER BY id").iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(ids, vec![("c".to_string(), "z2".to_string())], "the last change of each ID wins");
    match write(&mut writer, vec![upsert("d", "bad\0label", 9)]) {
        Err(SinkError::Record(why)) => assert!(why.contains("0x00") || why.contains("invalid byte sequence"), "{why}"),
        other => panic!("a NUL byte must be the record's fault, got {other:?}"),
    }
}
