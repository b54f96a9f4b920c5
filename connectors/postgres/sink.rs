//! The Postgres sink: one row per request ID in the answer table, written with UNNEST in one
//! transaction per epoch together with that epoch's dead letters and source offsets. New IDs go
//! in with a plain insert; a batch meeting an existing ID is redone as an upsert, which rewrites
//! a row only when its content changes, so rerunning the same input leaves exactly the same rows.

use crate::connectors::{EpochBatch, SinkError, SinkWriter};
use crate::record::{Answer, Column, ColumnKind, DeadLetter, Value};
use crate::sql::{qualified, quote_ident};
use std::collections::{BTreeSet, HashMap};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

/// The table holding each pipeline's source offsets, written in the same transaction as its answers.
pub const OFFSETS_TABLE: &str = "sluice_offsets";

/// Where the sink writes.
#[derive(Clone, Debug)]
pub struct PostgresTarget {
    pub url: String,
    pub schema: String,
    pub table: String,
    pub dead_letter_table: String,
    /// Written into the dead-letter table's `pipeline` column.
    pub pipeline: String,
}

/// Expands `${VAR}` and `${VAR:-default}` from the environment.
pub fn expand_env(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start..].find('}') {
            Some(end) => {
                let spec = &rest[start + 2..start + end];
                let (var, default) = spec.split_once(":-").unwrap_or((spec, ""));
                out.push_str(&std::env::var(var).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_string()));
                rest = &rest[start + end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Writes answers and dead letters to Postgres. Owns a small runtime for the async client.
pub struct PostgresWriter {
    rt: tokio::runtime::Runtime,
    target: PostgresTarget,
    columns: &'static [Column],
    client: Option<Client>,
    /// Passthrough columns known to exist in the answer table.
    known: BTreeSet<String>,
    /// Writes left that go straight to the upsert, after a plain insert met an existing ID.
    upsert_writes: u32,
}

/// How many writes use the upsert directly after a plain insert met an existing ID (a rerun of
/// the same input meets one on every write; this keeps it from paying for two statements each).
const UPSERT_AFTER_CONFLICT: u32 = 64;

fn classify(e: tokio_postgres::Error) -> SinkError {
    match e.code() {
        // Class 42 (syntax or access rule) and 28 (authorization) cannot succeed on retry.
        Some(code) if code.code().starts_with("42") || code.code().starts_with("28") => {
            SinkError::Fatal(format!("{e}: {}", e.as_db_error().map(|d| d.message()).unwrap_or("")))
        }
        _ => SinkError::Transient(match e.as_db_error() {
            Some(db) => format!("{e}: {}", db.message()),
            None => e.to_string(),
        }),
    }
}

fn sql_type(kind: ColumnKind) -> &'static str {
    match kind {
        ColumnKind::Text => "TEXT",
        ColumnKind::Int => "BIGINT",
        ColumnKind::Float => "DOUBLE PRECISION",
    }
}

impl PostgresWriter {
    /// Prepares a writer; it connects (and creates its tables) on the first write, and reconnects after errors.
    pub fn new(target: PostgresTarget, columns: &'static [Column]) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("cannot start a runtime: {e}"))?;
        Ok(PostgresWriter { rt, target, columns, client: None, known: BTreeSet::new(), upsert_writes: 0 })
    }

    /// Connects now and creates the tables, so configuration errors show at start-up.
    pub fn connect_now(&mut self) -> Result<(), SinkError> {
        self.client()?;
        Ok(())
    }

    fn table(&self) -> String {
        qualified(&self.target.schema, &self.target.table)
    }

    fn offsets_table(&self) -> String {
        qualified(&self.target.schema, OFFSETS_TABLE)
    }

    /// The source offsets stored with this pipeline's answers, by partition.
    pub fn load_offsets(&mut self, topic: &str) -> Result<HashMap<i32, i64>, SinkError> {
        self.client()?;
        let sql = format!("SELECT partition, next_offset FROM {} WHERE pipeline = $1 AND topic = $2", self.offsets_table());
        let client = self.client.as_ref().expect("connected");
        let rows = self.rt.block_on(client.query(sql.as_str(), &[&self.target.pipeline, &topic])).map_err(classify)?;
        Ok(rows.iter().map(|r| (r.get::<_, i32>(0), r.get::<_, i64>(1))).collect())
    }

    fn dead_table(&self) -> String {
        qualified(&self.target.schema, &self.target.dead_letter_table)
    }

    fn client(&mut self) -> Result<&Client, SinkError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
            self.known.clear();
        }
        if self.client.is_none() {
            let url = expand_env(&self.target.url);
            let (client, connection) =
                self.rt.block_on(tokio_postgres::connect(&url, NoTls)).map_err(|e| SinkError::Transient(format!("cannot connect to Postgres: {e}")))?;
            self.rt.spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!("postgres connection closed: {e}");
                }
            });
            // Request IDs are opaque keys: byte order ("C") makes every index comparison a memcmp.
            let mut cols = String::from("id TEXT COLLATE \"C\" PRIMARY KEY");
            for c in self.columns {
                cols.push_str(&format!(", {} {}", quote_ident(c.name), sql_type(c.kind)));
            }
            cols.push_str(", model TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now()");
            let ddl = format!(
                "SELECT pg_advisory_xact_lock(7364912); \
                 CREATE TABLE IF NOT EXISTS {} ({cols}); \
                 CREATE TABLE IF NOT EXISTS {} (source TEXT NOT NULL, position TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, raw BYTEA NOT NULL, pipeline TEXT NOT NULL, first_seen TIMESTAMPTZ NOT NULL DEFAULT now(), last_seen TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (source, position)); \
                 CREATE TABLE IF NOT EXISTS {} (pipeline TEXT NOT NULL, topic TEXT NOT NULL, partition INT NOT NULL, next_offset BIGINT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, topic, partition));",
                self.table(),
                self.dead_table(),
                self.offsets_table()
            );
            self.rt.block_on(client.batch_execute(&format!("BEGIN; {ddl} COMMIT;"))).map_err(classify)?;
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected"))
    }

    fn ensure_passthrough(&mut self, names: &BTreeSet<String>) -> Result<(), SinkError> {
        let missing: Vec<String> = names.difference(&self.known).cloned().collect();
        if missing.is_empty() {
            return Ok(());
        }
        let table = self.table();
        let mut sql = String::from("BEGIN; SELECT pg_advisory_xact_lock(7364912);");
        for name in &missing {
            sql.push_str(&format!(" ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} TEXT;", quote_ident(name)));
        }
        sql.push_str(" COMMIT;");
        self.client()?;
        let client = self.client.as_ref().expect("connected");
        self.rt.block_on(client.batch_execute(&sql)).map_err(classify)?;
        self.known.extend(missing);
        Ok(())
    }

    fn write_inner(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        // Last answer per ID wins within an epoch; an upsert may touch each row only once.
        let mut latest: HashMap<&str, &Answer> = HashMap::new();
        for a in &batch.answers {
            latest.insert(a.id.as_str(), a);
        }
        let mut answers: Vec<&Answer> = latest.into_values().collect();
        answers.sort_by(|a, b| a.id.cmp(&b.id));
        let mut dead_latest: HashMap<(String, String), &DeadLetter> = HashMap::new();
        for d in &batch.dead {
            dead_latest.insert((d.pos.source(), d.pos.position()), d);
        }
        let passthrough: BTreeSet<String> = answers.iter().flat_map(|a| a.passthrough.iter().map(|(k, _)| k.clone())).collect();
        self.client()?;
        self.ensure_passthrough(&passthrough)?;

        // New IDs are inserted with a plain INSERT, which costs Postgres about half of what the
        // upsert's speculative insertion does (docs/benchmarks.md). Offsets commit in the same
        // transaction as the answers, so a replayed epoch holds no answer already stored, and
        // existing IDs are rare: a client that sends an ID again, or a rerun of a file. Then the
        // insert fails on the primary key, nothing of it is kept, and the transaction is redone
        // with the upsert. Each statement is built only when it is used.
        let dead_sql = format!(
            "INSERT INTO {t} AS cur (source, position, reason, detail, raw, pipeline) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[]) \
             ON CONFLICT (source, position) DO UPDATE SET reason = EXCLUDED.reason, detail = EXCLUDED.detail, raw = EXCLUDED.raw, pipeline = EXCLUDED.pipeline, last_seen = now() \
             WHERE (cur.reason, cur.detail, cur.raw, cur.pipeline) IS DISTINCT FROM (EXCLUDED.reason, EXCLUDED.detail, EXCLUDED.raw, EXCLUDED.pipeline)",
            t = self.dead_table()
        );

        // Column arrays for the answer upsert.
        let ids: Vec<&str> = answers.iter().map(|a| a.id.as_str()).collect();
        // Every answer of a process carries its task's one model label.
        let model: &str = answers.first().map(|a| &*a.model).unwrap_or_default();
        if let Some(other) = answers.iter().find(|a| &*a.model != model) {
            return Err(SinkError::Fatal(format!("one batch holds answers of two models ({model} and {})", other.model)));
        }
        let mut value_cols: Vec<Box<dyn ToSql + Sync>> = Vec::new();
        for (i, c) in self.columns.iter().enumerate() {
            match c.kind {
                ColumnKind::Text => value_cols.push(Box::new(
                    answers
                        .iter()
                        .map(|a| match a.values.get(i) {
                            Some(Value::Text(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .collect::<Vec<Option<String>>>(),
                )),
                ColumnKind::Int => value_cols.push(Box::new(
                    answers
                        .iter()
                        .map(|a| match a.values.get(i) {
                            Some(Value::Int(x)) => Some(*x),
                            _ => None,
                        })
                        .collect::<Vec<Option<i64>>>(),
                )),
                ColumnKind::Float => value_cols.push(Box::new(
                    answers
                        .iter()
                        .map(|a| match a.values.get(i) {
                            Some(Value::Float(x)) => Some(*x),
                            Some(Value::Int(x)) => Some(*x as f64),
                            _ => None,
                        })
                        .collect::<Vec<Option<f64>>>(),
                )),
            }
        }
        for name in &passthrough {
            value_cols
                .push(Box::new(answers.iter().map(|a| a.passthrough.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())).collect::<Vec<Option<String>>>()));
        }
        let mut dead: Vec<(&(String, String), &&DeadLetter)> = dead_latest.iter().collect();
        dead.sort_by(|a, b| a.0.cmp(b.0));
        let d_source: Vec<&str> = dead.iter().map(|(k, _)| k.0.as_str()).collect();
        let d_pos: Vec<&str> = dead.iter().map(|(k, _)| k.1.as_str()).collect();
        let d_reason: Vec<&str> = dead.iter().map(|(_, d)| d.reason.as_str()).collect();
        let d_detail: Vec<&str> = dead.iter().map(|(_, d)| d.detail.as_str()).collect();
        let d_raw: Vec<&[u8]> = dead.iter().map(|(_, d)| d.raw.as_slice()).collect();
        let d_pipeline: Vec<&str> = dead.iter().map(|_| self.target.pipeline.as_str()).collect();

        let offsets_sql = format!(
            "INSERT INTO {} AS cur (pipeline, topic, partition, next_offset) SELECT $1, * FROM UNNEST($2::text[], $3::int4[], $4::int8[]) \
             ON CONFLICT (pipeline, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
            self.offsets_table()
        );
        let mut latest_offsets: std::collections::BTreeMap<(&str, i32), i64> = std::collections::BTreeMap::new();
        for o in &batch.offsets {
            latest_offsets.insert((o.topic.as_str(), o.partition), o.next_offset);
        }
        let o_topic: Vec<&str> = latest_offsets.keys().map(|k| k.0).collect();
        let o_part: Vec<i32> = latest_offsets.keys().map(|k| k.1).collect();
        let o_next: Vec<i64> = latest_offsets.values().copied().collect();
        let pipeline = self.target.pipeline.clone();
        let mut upsert = self.upsert_writes > 0;
        self.upsert_writes = self.upsert_writes.saturating_sub(1);
        loop {
            let answer_sql = if answers.is_empty() { None } else { Some(self.answer_insert(&passthrough, upsert)) };
            let client = self.client.as_mut().expect("connected");
            let result = self.rt.block_on(async {
                let tx = client.transaction().await?;
                if let Some(sql) = &answer_sql {
                    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&ids];
                    params.extend(value_cols.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)));
                    params.push(&model);
                    tx.execute(sql.as_str(), &params).await?;
                }
                if !dead.is_empty() {
                    tx.execute(dead_sql.as_str(), &[&d_source, &d_pos, &d_reason, &d_detail, &d_raw, &d_pipeline]).await?;
                }
                if !o_topic.is_empty() {
                    tx.execute(offsets_sql.as_str(), &[&pipeline, &o_topic, &o_part, &o_next]).await?;
                }
                tx.commit().await
            });
            match result {
                Err(e) if !upsert && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    // The failed transaction was rolled back when it was dropped.
                    upsert = true;
                    self.upsert_writes = UPSERT_AFTER_CONFLICT;
                }
                other => return other.map_err(classify),
            }
        }
    }

    /// The statement that writes the answers: a plain insert, or with `upsert` an insert that
    /// updates an existing ID's row only when its content differs.
    fn answer_insert(&self, passthrough: &BTreeSet<String>, upsert: bool) -> String {
        let mut names: Vec<String> = vec![quote_ident("id")];
        let mut casts: Vec<String> = vec!["$1::text[]".into()];
        let mut n = 1;
        for c in self.columns {
            n += 1;
            names.push(quote_ident(c.name));
            casts.push(format!(
                "${n}::{}[]",
                match c.kind {
                    ColumnKind::Text => "text",
                    ColumnKind::Int => "int8",
                    ColumnKind::Float => "float8",
                }
            ));
        }
        for p in passthrough {
            n += 1;
            names.push(quote_ident(p));
            casts.push(format!("${n}::text[]"));
        }
        // The model label is one value for the whole batch, not an array of copies.
        let aliases: Vec<String> = (0..names.len()).map(|i| format!("c{i}")).collect();
        names.push(quote_ident("model"));
        let model_param = format!("${}::text", n + 1);
        let t = self.table();
        let updated: Vec<&String> = names.iter().skip(1).collect();
        let set: Vec<String> = updated.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        let old: Vec<String> = updated.iter().map(|c| format!("cur.{c}")).collect();
        let new: Vec<String> = updated.iter().map(|c| format!("EXCLUDED.{c}")).collect();
        let insert = format!(
            "INSERT INTO {t} AS cur ({cols}, updated_at) SELECT {aliases_list}, {model_param}, now() FROM UNNEST({casts}) AS u({aliases_list})",
            cols = names.join(", "),
            aliases_list = aliases.join(", "),
            casts = casts.join(", "),
        );
        if !upsert {
            return insert;
        }
        format!(
            "{insert} ON CONFLICT (id) DO UPDATE SET {set}, updated_at = now() WHERE ({old}) IS DISTINCT FROM ({new})",
            set = set.join(", "),
            old = old.join(", "),
            new = new.join(", "),
        )
    }
}

impl SinkWriter for PostgresWriter {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn stores_offsets(&self) -> bool {
        true
    }

    fn write(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        let result = self.write_inner(batch);
        if let Err(SinkError::Transient(_)) = &result {
            // Start over on a fresh connection next time.
            self.client = None;
            self.known.clear();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_vars_expand() {
        std::env::set_var("SLUICE_TEST_PGPASS", "pw");
        assert_eq!(expand_env("postgres://u:${SLUICE_TEST_PGPASS}@h/db"), "postgres://u:pw@h/db");
        assert_eq!(expand_env("no vars"), "no vars");
        assert_eq!(expand_env("h=${SLUICE_TEST_UNSET_VAR:-127.0.0.1}"), "h=127.0.0.1");
    }
}
