//! The Postgres sink: one row per request ID in the answer table, written with UNNEST in one
//! transaction per epoch together with that epoch's deletes, dead letters and source
//! checkpoints. New IDs go in with a plain insert; a batch meeting an existing ID is redone as
//! an upsert, which rewrites a row only when its content changes, so rerunning the same input
//! leaves exactly the same rows. Checkpoints are keyed by the pipeline's identity (its name and
//! its answer table), dead letters by pipeline, source and position, so pipelines sharing a
//! database never overwrite each other's. Each answer row records its owner (`pipeline`, and its
//! `source`): a delete removes only its own pipeline's rows, and an answer to an ID another
//! pipeline's row holds is refused by name (a dead letter), so two pipelines on one table never
//! overwrite or delete each other's answers. Errors are classified: data exceptions (class 22),
//! integrity constraint violations (class 23: NOT NULL, foreign key, a unique index other than
//! the ID's, CHECK, exclusion), program limits (class 54) and an exception a trigger raises
//! (`P0001`) are the record's fault and get it isolated; syntax and permission errors (classes
//! 42, 28) stop the run; the rest is retried. Connecting is bounded by `connect_timeout_ms` and
//! every statement by `statement_timeout_ms`, so an unreachable or stuck server is an error,
//! never a hang. TLS follows libpq (`tls.rs`): `sslmode` in the URL (`prefer` by default, so
//! TLS whenever the server offers it), `tls_root_cert` and `tls_verify`; a server refusing TLS
//! that is required, or a certificate failing verification, stops the run as a configuration
//! error.

use super::tls::{self, PgConnect, TlsVerify};
use crate::sql::{qualified, quote_ident};
use serde::Deserialize;
use sluice_core::connector::{ConfigError, SinkConnector};
use sluice_core::record::{Answer, Change, Column, ColumnKind, DeadLetter, Value};
use sluice_core::sink::{EpochBatch, SinkContext, SinkError, SinkFactory, SinkWriter};
use sluice_core::source::Checkpoint;
pub use sluice_core::topology::expand_env;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

/// The table holding each pipeline's source checkpoints, written in the same transaction as its answers.
pub const CHECKPOINTS_TABLE: &str = "sluice_checkpoints";
/// Where sluice before checkpoints stored Kafka offsets; read once when a pipeline has no checkpoints yet.
pub const LEGACY_OFFSETS_TABLE: &str = "sluice_offsets";

/// `[[sinks]] type = "postgres"`: one upserted row per request ID, written in one transaction per epoch.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection string, e.g. `postgres://user:pass@127.0.0.1:5432/db`. `${VAR}` is read from the environment.
    /// Its `sslmode` is libpq's: `disable`, `prefer` (the default: TLS when the server offers it),
    /// `require` (TLS, certificate not checked), `verify-ca` and `verify-full` (the same as
    /// `tls_verify` = "ca" and "full"); `sslrootcert=` is the same as `tls_root_cert`.
    pub url: String,
    /// A PEM file of the CA certificates the server's certificate must chain to (for a
    /// self-signed server certificate, that certificate). When set, the certificate is verified
    /// (`tls_verify` defaults to "full") and TLS is required. A file that cannot be read or holds
    /// no certificate stops the run at start-up.
    #[serde(default)]
    pub tls_root_cert: Option<PathBuf>,
    /// How the server's certificate is checked: "none" (encrypt, accept any certificate),
    /// "ca" (it must chain to `tls_root_cert`, else to the system's roots; names unchecked) or
    /// "full" (the chain and that it names the host of the URL). Default: "full" with
    /// `tls_root_cert`, else "none". "ca" and "full" make TLS required; a certificate that fails
    /// them stops the run with the reason.
    #[serde(default)]
    pub tls_verify: Option<TlsVerify>,
    /// Answer table; created if missing. Any name is allowed; it is always quoted.
    pub table: String,
    /// Dead-letter table; created if missing.
    #[serde(default = "default_dead_letter_table")]
    pub dead_letter_table: String,
    /// Schema holding both tables.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// How long connecting (TCP, TLS and the start-up handshake together) may take before it is
    /// an error, in milliseconds; default 10,000. At start-up an unreachable server then stops
    /// the run with the cause; later, a reconnect that times out is retried with backoff.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Postgres's `statement_timeout` for the sink's session, in milliseconds; default 60,000,
    /// 0 for none. A write that runs longer (a lock held by someone else) is cancelled by the
    /// server and retried as a transient error.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    10_000
}
fn default_statement_timeout_ms() -> u64 {
    60_000
}

fn default_dead_letter_table() -> String {
    "dead_letters".to_string()
}
fn default_schema() -> String {
    "public".to_string()
}

impl PostgresConfig {
    fn target(&self, pipeline: &str) -> PostgresTarget {
        PostgresTarget {
            url: self.url.clone(),
            schema: self.schema.clone(),
            table: self.table.clone(),
            dead_letter_table: self.dead_letter_table.clone(),
            pipeline: pipeline.to_string(),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms.max(1)),
            statement_timeout_ms: self.statement_timeout_ms,
            tls_root_cert: self.tls_root_cert.clone(),
            tls_verify: self.tls_verify,
        }
    }
}

impl SinkFactory for PostgresConfig {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn describe(&self) -> String {
        format!("postgres table {}.{} (dead letters in {}.{})", self.schema, self.table, self.schema, self.dead_letter_table)
    }

    fn open(&self, ctx: &SinkContext) -> Result<Option<Vec<Checkpoint>>, SinkError> {
        let mut pg = PostgresWriter::new(self.target(&ctx.pipeline), ctx.columns)?;
        let hint = "\n  hint: start Postgres (scripts/pg.sh starts a local one) and check sinks.url";
        pg.connect_now().map_err(|e| match e {
            // A refused TLS handshake carries its own hint.
            SinkError::Config(m) if m.contains("\n  hint: ") => SinkError::Config(m),
            e => SinkError::Config(format!("{e}{hint}")),
        })?;
        pg.load_checkpoints().map(Some).map_err(|e| SinkError::Config(format!("cannot read stored checkpoints: {e}")))
    }

    fn writer(&self, ctx: &SinkContext, _worker: usize) -> Result<Box<dyn SinkWriter>, SinkError> {
        Ok(Box::new(PostgresWriter::new(self.target(&ctx.pipeline), ctx.columns)?))
    }
}

/// Where the sink writes.
#[derive(Clone, Debug)]
pub struct PostgresTarget {
    pub url: String,
    pub schema: String,
    pub table: String,
    pub dead_letter_table: String,
    /// The pipeline's name: with the answer table, the key of its checkpoints; with source and
    /// position, the key of its dead letters.
    pub pipeline: String,
    /// The bound on connecting (socket, TLS and start-up handshake together).
    pub connect_timeout: Duration,
    /// The session's `statement_timeout` in milliseconds (0: none).
    pub statement_timeout_ms: u64,
    /// `tls_root_cert`: the PEM roots the server's certificate is verified against.
    pub tls_root_cert: Option<PathBuf>,
    /// `tls_verify`: how the server's certificate is checked (None: as the URL and root say).
    pub tls_verify: Option<TlsVerify>,
}

impl PostgresTarget {
    /// A target with the default timeouts (10 s to connect, 60 s a statement).
    pub fn new(url: &str, schema: &str, table: &str, dead_letter_table: &str, pipeline: &str) -> Self {
        PostgresTarget {
            url: url.to_string(),
            schema: schema.to_string(),
            table: table.to_string(),
            dead_letter_table: dead_letter_table.to_string(),
            pipeline: pipeline.to_string(),
            connect_timeout: Duration::from_millis(default_connect_timeout_ms()),
            statement_timeout_ms: default_statement_timeout_ms(),
            tls_root_cert: None,
            tls_verify: None,
        }
    }
}

/// Writes answers and dead letters to Postgres. Owns a small runtime for the async client.
pub struct PostgresWriter {
    rt: tokio::runtime::Runtime,
    target: PostgresTarget,
    /// The connection string as read, and the TLS client it asks for.
    connect: PgConnect,
    columns: &'static [Column],
    client: Option<Client>,
    /// Passthrough columns known to exist in the answer table, with their types there.
    known: HashMap<String, ColumnKind>,
    /// Writes left that go straight to the upsert, after a plain insert met an existing ID.
    upsert_writes: u32,
}

/// How many writes use the upsert directly after a plain insert met an existing ID (a rerun of
/// the same input meets one on every write; this keeps it from paying for two statements each).
const UPSERT_AFTER_CONFLICT: u32 = 64;

/// Classifies a Postgres error by what helps: isolating the record, stopping, or retrying.
pub fn classify(e: tokio_postgres::Error) -> SinkError {
    let text = match e.as_db_error() {
        Some(db) => format!("{e}: {}", db.message()),
        None => e.to_string(),
    };
    match e.code().map(|c| c.code()) {
        // Class 22 (data exception: a NUL byte, a value out of range), 23 (integrity constraint
        // violation: NOT NULL 23502, foreign key 23503, a unique index other than the ID's 23505,
        // CHECK 23514, exclusion 23P01), 54 (program limit: an index row too large) and P0001 (an
        // exception a trigger raised) are the record's fault: isolate it. (The ID's own unique
        // violation never gets here: the plain insert that meets it is redone as an upsert.)
        Some(code) if code.starts_with("22") || code.starts_with("23") || code.starts_with("54") || code == "P0001" => SinkError::Record(text),
        // Class 42 (syntax or access rule) and 28 (authorization) cannot succeed on retry.
        Some(code) if code.starts_with("42") || code.starts_with("28") => SinkError::Config(text),
        _ => SinkError::Transient(text),
    }
}

/// `body` as a dollar-quoted string constant whose tag occurs nowhere in it (`$sluice$`, else
/// `$sluice1$`, ...), so no name inside it can end the constant early.
pub fn dollar_quoted(body: &str) -> String {
    let mut n = 0u32;
    loop {
        let tag = if n == 0 { "$sluice$".to_string() } else { format!("$sluice{n}$") };
        // The constant ends at the first tag after the opening one: it must be the closing one.
        let text = format!("{body}{tag}");
        if text.find(&tag) == Some(body.len()) {
            return format!("{tag}{text}");
        }
        n += 1;
    }
}

fn sql_type(kind: ColumnKind) -> &'static str {
    match kind {
        ColumnKind::Text => "TEXT",
        ColumnKind::Int => "BIGINT",
        ColumnKind::Float => "DOUBLE PRECISION",
        ColumnKind::Bool => "BOOLEAN",
        ColumnKind::Timestamp => "TIMESTAMPTZ",
    }
}

/// The kind of a column Postgres reports (`information_schema.columns.data_type`).
fn kind_of_sql(data_type: &str) -> ColumnKind {
    match data_type {
        "bigint" | "integer" | "smallint" => ColumnKind::Int,
        "double precision" | "real" | "numeric" => ColumnKind::Float,
        "boolean" => ColumnKind::Bool,
        t if t.starts_with("timestamp") || t == "date" => ColumnKind::Timestamp,
        _ => ColumnKind::Text,
    }
}

/// Whether a value the source typed `value` fits a column of type `column`: the same type, any
/// value in a text column, an integer in a float column.
fn fits(value: ColumnKind, column: ColumnKind) -> bool {
    value == column || column == ColumnKind::Text || (value == ColumnKind::Int && column == ColumnKind::Float)
}

impl PostgresWriter {
    /// Prepares a writer; it connects (and creates its tables) on the first write, and reconnects after errors.
    pub fn new(target: PostgresTarget, columns: &'static [Column]) -> Result<Self, SinkError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| SinkError::Config(format!("cannot start a runtime: {e}")))?;
        let connect = tls::prepare(&expand_env(&target.url), target.tls_root_cert.as_deref(), target.tls_verify)?;
        Ok(PostgresWriter { rt, target, connect, columns, client: None, known: HashMap::new(), upsert_writes: 0 })
    }

    /// Connects now and creates the tables, so configuration errors show at start-up.
    pub fn connect_now(&mut self) -> Result<(), SinkError> {
        self.client()?;
        Ok(())
    }

    fn table(&self) -> String {
        qualified(&self.target.schema, &self.target.table)
    }

    /// The answer table as `schema.table`: with the pipeline's name, the key of its checkpoints.
    fn target_key(&self) -> String {
        format!("{}.{}", self.target.schema, self.target.table)
    }

    fn checkpoints_table(&self) -> String {
        qualified(&self.target.schema, CHECKPOINTS_TABLE)
    }

    /// The checkpoints stored with this pipeline's answers (its name and its answer table). A
    /// pipeline with none yet falls back to the offsets an older sluice stored for its name.
    pub fn load_checkpoints(&mut self) -> Result<Vec<Checkpoint>, SinkError> {
        self.client()?;
        let client = self.client.as_ref().expect("connected");
        let sql = format!("SELECT scope, shard, position FROM {} WHERE pipeline = $1 AND target = $2", self.checkpoints_table());
        let target = self.target_key();
        let rows = self.rt.block_on(client.query(sql.as_str(), &[&self.target.pipeline, &target])).map_err(classify)?;
        let mut out: Vec<Checkpoint> = rows.iter().map(|r| Checkpoint { scope: r.get(0), shard: r.get(1), position: r.get(2) }).collect();
        if out.is_empty() {
            let legacy = qualified(&self.target.schema, LEGACY_OFFSETS_TABLE);
            let exists = format!("SELECT to_regclass('{}') IS NOT NULL", legacy.replace('\'', "''"));
            let found: bool = self.rt.block_on(client.query_one(exists.as_str(), &[])).map_err(classify)?.get(0);
            if found {
                let sql = format!("SELECT topic, partition, next_offset FROM {legacy} WHERE pipeline = $1");
                let rows = self.rt.block_on(client.query(sql.as_str(), &[&self.target.pipeline])).map_err(classify)?;
                out = rows
                    .iter()
                    .map(|r| Checkpoint { scope: r.get(0), shard: r.get::<_, i32>(1).to_string(), position: r.get::<_, i64>(2).to_string() })
                    .collect();
            }
        }
        Ok(out)
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
            let mut config = self.connect.config.clone();
            let limit = self.target.connect_timeout;
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(limit);
            }
            // tokio-postgres bounds only the socket's connect: a server (or a proxy) that accepts
            // the connection and never answers the start-up would hang it, so bound the whole of it.
            let tls = self.connect.tls.clone();
            let (client, connection) = match self.rt.block_on(async { tokio::time::timeout(limit, config.connect(tls)).await }) {
                Ok(Ok(c)) => c,
                // TLS refused or a certificate failing verification: retrying cannot help.
                Ok(Err(e)) => match self.connect.refusal(&e) {
                    Some(why) => return Err(SinkError::Config(why)),
                    None => return Err(SinkError::Transient(format!("cannot connect to Postgres: {}", tls::with_causes(&e)))),
                },
                Err(_) => {
                    return Err(SinkError::Transient(format!(
                        "cannot connect to Postgres: no answer within {} ms (sinks.connect_timeout_ms)",
                        limit.as_millis()
                    )))
                }
            };
            self.rt.spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!("postgres connection closed: {e}");
                }
            });
            // Bounds every statement of this session (sinks.statement_timeout_ms).
            let timeout_ms = self.target.statement_timeout_ms;
            self.rt.block_on(client.batch_execute(&format!("SET statement_timeout = {timeout_ms}"))).map_err(classify)?;
            // Request IDs are opaque keys: byte order ("C") makes every index comparison a memcmp.
            let mut cols = String::from("id TEXT COLLATE \"C\" PRIMARY KEY");
            for c in self.columns {
                cols.push_str(&format!(", {} {}", quote_ident(c.name), sql_type(c.kind)));
            }
            cols.push_str(", model TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), pipeline TEXT, source TEXT");
            let dead = self.dead_table();
            let dead_literal = dead.replace('\'', "''");
            let upgrade = dollar_quoted(&format!(
                "DECLARE pk text; BEGIN \
                   IF NOT EXISTS (SELECT 1 FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey) \
                                  WHERE c.conrelid = '{dead_literal}'::regclass AND c.contype = 'p' AND a.attname = 'pipeline') THEN \
                     SELECT conname INTO pk FROM pg_constraint WHERE conrelid = '{dead_literal}'::regclass AND contype = 'p'; \
                     EXECUTE format('ALTER TABLE {dead_escaped} DROP CONSTRAINT %I, ADD PRIMARY KEY (pipeline, source, position)', pk); \
                   END IF; END",
                dead_escaped = dead.replace('\'', "''").replace('%', "%%"),
            ));
            // An answer table made by an older sluice lacks the owner columns. ALTER TABLE takes
            // the table's strongest lock even when it changes nothing, and would wait behind any
            // open transaction on the table (a DBA's, a reader's): only when they are missing.
            let table_literal = self.table().replace('\'', "''");
            let owners = dollar_quoted(&format!(
                "BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{table_literal}'::regclass AND attname = 'source' AND NOT attisdropped) \
                   OR NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{table_literal}'::regclass AND attname = 'pipeline' AND NOT attisdropped) THEN \
                   ALTER TABLE {table} ADD COLUMN IF NOT EXISTS pipeline TEXT, ADD COLUMN IF NOT EXISTS source TEXT; \
                 END IF; END",
                table = self.table()
            ));
            let dead_columns = dollar_quoted(&format!(
                "BEGIN IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = '{dead_literal}'::regclass AND attname = 'raw_sha256' AND NOT attisdropped) THEN \
                   ALTER TABLE {dead} ADD COLUMN IF NOT EXISTS raw_len BIGINT, ADD COLUMN IF NOT EXISTS raw_sha256 TEXT; \
                 END IF; END"
            ));
            // A dead-letter table made by an older sluice is keyed by source and position only,
            // and lacks the length and hash of cut raw bytes: bring it up to date.
            let ddl = format!(
                "SELECT pg_advisory_xact_lock(7364912); \
                 CREATE TABLE IF NOT EXISTS {table} ({cols}); \
                 DO {owners}; \
                 CREATE TABLE IF NOT EXISTS {dead} (source TEXT NOT NULL, position TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, raw BYTEA NOT NULL, pipeline TEXT NOT NULL, raw_len BIGINT, raw_sha256 TEXT, first_seen TIMESTAMPTZ NOT NULL DEFAULT now(), last_seen TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, source, position)); \
                 DO {dead_columns}; \
                 DO {upgrade}; \
                 CREATE TABLE IF NOT EXISTS {checkpoints} (pipeline TEXT NOT NULL, target TEXT NOT NULL, scope TEXT NOT NULL, shard TEXT NOT NULL, position TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (pipeline, target, scope, shard));",
                table = self.table(),
                checkpoints = self.checkpoints_table()
            );
            self.rt.block_on(client.batch_execute(&format!("BEGIN; {ddl} COMMIT;"))).map_err(classify)?;
            // The owner columns of a table an older sluice made may be a pass-through column of
            // another type that happens to share the name.
            let clash = self
                .rt
                .block_on(client.query(
                    "SELECT column_name::text, data_type::text FROM information_schema.columns \
                     WHERE table_schema = $1 AND table_name = $2 AND column_name IN ('pipeline', 'source') AND data_type <> 'text'",
                    &[&self.target.schema, &self.target.table],
                ))
                .map_err(classify)?;
            if let Some(r) = clash.first() {
                return Err(SinkError::Config(format!(
                    "table {} has a column `{}` of type {}, where sluice records each answer's owner as text\n  hint: rename that column (ALTER TABLE … RENAME COLUMN), or write to another sinks.table",
                    self.table(),
                    r.get::<_, String>(0),
                    r.get::<_, String>(1)
                )));
            }
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected"))
    }

    /// Makes sure every pass-through column exists, adding a missing one with the type its first
    /// value has (a later file that adds a column adds it to the table), and learns the types of
    /// those that exist. A value whose type does not fit its column is a type conflict: the
    /// records with one are refused by name before anything is written, and become dead letters,
    /// each naming its file, the column and both types, while the rest is written.
    fn ensure_passthrough(&mut self, answers: &[&Answer]) -> Result<(), SinkError> {
        let mut wanted: BTreeMap<&str, ColumnKind> = BTreeMap::new();
        for f in answers.iter().flat_map(|a| &a.passthrough) {
            wanted.entry(f.name.as_str()).or_insert(f.kind);
        }
        let missing: Vec<(&str, ColumnKind)> = wanted.iter().filter(|(n, _)| !self.known.contains_key(**n)).map(|(n, k)| (*n, *k)).collect();
        if !missing.is_empty() {
            self.client()?;
            let client = self.client.as_ref().expect("connected");
            let table = self.table();
            let mut sql = String::from("BEGIN; SELECT pg_advisory_xact_lock(7364912);");
            for (name, kind) in &missing {
                sql.push_str(&format!(" ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {};", quote_ident(name), sql_type(*kind)));
            }
            sql.push_str(" COMMIT;");
            self.rt.block_on(client.batch_execute(&sql)).map_err(classify)?;
            // A column that existed keeps its type: read what the table holds.
            let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
            let rows = self
                .rt
                .block_on(client.query(
                    "SELECT column_name::text, data_type::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 AND column_name = ANY($3)",
                    &[&self.target.schema, &self.target.table, &names],
                ))
                .map_err(classify)?;
            for r in rows {
                self.known.insert(r.get(0), kind_of_sql(r.get::<_, &str>(1)));
            }
        }
        let mut refused = Vec::new();
        for a in answers {
            let conflict = a.passthrough.iter().find_map(|f| {
                let column = self.known.get(&f.name).copied().unwrap_or_default();
                (!fits(f.kind, column)).then(|| {
                    format!("type conflict: column `{}` is {} in {} but {} in table {}", f.name, f.kind.name(), a.pos.source(), column.name(), self.table())
                })
            });
            if let Some(why) = conflict {
                refused.push((a.seq, why));
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(SinkError::Refused(refused))
        }
    }

    fn write_inner(&mut self, batch: &EpochBatch) -> Result<(), SinkError> {
        // The last change per ID wins; an upsert may touch each row only once.
        let mut latest: HashMap<&str, &Change> = HashMap::with_capacity(batch.changes.len());
        for c in &batch.changes {
            latest.insert(c.id(), c);
        }
        let mut answers: Vec<&Answer> = Vec::with_capacity(latest.len());
        let mut deleted: Vec<&str> = Vec::new();
        for c in latest.into_values() {
            match c {
                Change::Upsert(a) => answers.push(a),
                Change::Delete(d) => deleted.push(d.id.as_str()),
            }
        }
        answers.sort_by(|a, b| a.id.cmp(&b.id));
        deleted.sort_unstable();
        // A delete removes only this pipeline's answers (or an older sluice's, which have no owner).
        let delete_sql = format!("DELETE FROM {} WHERE id = ANY($1::text[]) AND (pipeline = $2 OR pipeline IS NULL)", self.table());
        // IDs of this batch whose rows another pipeline owns (asked on the upsert path only: a
        // plain insert that meets an existing row fails and is redone as the upsert).
        let foreign_sql = format!("SELECT id, pipeline FROM {} WHERE id = ANY($1::text[]) AND pipeline <> $2 FOR UPDATE", self.table());
        let mut dead_latest: HashMap<(String, String), &DeadLetter> = HashMap::new();
        for d in &batch.dead {
            dead_latest.insert((d.pos.source(), d.pos.position()), d);
        }
        let passthrough: BTreeSet<String> = answers.iter().flat_map(|a| a.passthrough.iter().map(|f| f.name.clone())).collect();
        self.client()?;
        self.ensure_passthrough(&answers)?;

        // New IDs are inserted with a plain INSERT, which costs Postgres about half of what the
        // upsert's speculative insertion does (docs/benchmarks.md). Offsets commit in the same
        // transaction as the answers, so a replayed epoch holds no answer already stored, and
        // existing IDs are rare: a client that sends an ID again, or a rerun of a file. Then the
        // insert fails on the primary key, nothing of it is kept, and the transaction is redone
        // with the upsert. Each statement is built only when it is used.
        let dead_sql = format!(
            "INSERT INTO {t} AS cur (source, position, reason, detail, raw, pipeline, raw_len, raw_sha256) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[], $7::int8[], $8::text[]) \
             ON CONFLICT (pipeline, source, position) DO UPDATE SET reason = EXCLUDED.reason, detail = EXCLUDED.detail, raw = EXCLUDED.raw, raw_len = EXCLUDED.raw_len, raw_sha256 = EXCLUDED.raw_sha256, last_seen = now() \
             WHERE (cur.reason, cur.detail, cur.raw) IS DISTINCT FROM (EXCLUDED.reason, EXCLUDED.detail, EXCLUDED.raw)",
            t = self.dead_table()
        );

        // Column arrays for the answer upsert.
        let ids: Vec<&str> = answers.iter().map(|a| a.id.as_str()).collect();
        // Every answer of a process carries its task's one model label.
        let model: &str = answers.first().map(|a| &*a.model).unwrap_or_default();
        if let Some(other) = answers.iter().find(|a| &*a.model != model) {
            return Err(SinkError::Config(format!("one batch holds answers of two models ({model} and {})", other.model)));
        }
        let mut value_cols: Vec<Box<dyn ToSql + Sync + '_>> = Vec::new();
        for (i, c) in self.columns.iter().enumerate() {
            match c.kind {
                // Task outputs are text, integers or floats; the other kinds are pass-through only.
                ColumnKind::Text | ColumnKind::Bool | ColumnKind::Timestamp => value_cols.push(Box::new(
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
        value_cols.push(Box::new(answers.iter().map(|a| &*a.pos.source).collect::<Vec<&str>>()));
        for name in &passthrough {
            value_cols.push(Box::new(
                answers.iter().map(|a| a.passthrough.iter().find(|f| &f.name == name).map(|f| f.value.clone())).collect::<Vec<Option<String>>>(),
            ));
        }
        let mut dead: Vec<(&(String, String), &&DeadLetter)> = dead_latest.iter().collect();
        dead.sort_by(|a, b| a.0.cmp(b.0));
        let d_source: Vec<&str> = dead.iter().map(|(k, _)| k.0.as_str()).collect();
        let d_pos: Vec<&str> = dead.iter().map(|(k, _)| k.1.as_str()).collect();
        let d_reason: Vec<&str> = dead.iter().map(|(_, d)| d.reason.as_str()).collect();
        let d_detail: Vec<&str> = dead.iter().map(|(_, d)| d.detail.as_str()).collect();
        let d_raw: Vec<&[u8]> = dead.iter().map(|(_, d)| d.raw.as_slice()).collect();
        let d_pipeline: Vec<&str> = dead.iter().map(|_| self.target.pipeline.as_str()).collect();
        let d_len: Vec<i64> = dead.iter().map(|(_, d)| d.raw_len as i64).collect();
        let d_sha: Vec<&str> = dead.iter().map(|(_, d)| d.raw_sha256.as_str()).collect();

        let checkpoints_sql = format!(
            "INSERT INTO {} AS cur (pipeline, target, scope, shard, position) SELECT $1, $2, * FROM UNNEST($3::text[], $4::text[], $5::text[]) \
             ON CONFLICT (pipeline, target, scope, shard) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
            self.checkpoints_table()
        );
        let mut latest_checkpoints: std::collections::BTreeMap<(&str, &str), &str> = std::collections::BTreeMap::new();
        for c in &batch.checkpoints {
            latest_checkpoints.insert((c.scope.as_str(), c.shard.as_str()), c.position.as_str());
        }
        let c_scope: Vec<&str> = latest_checkpoints.keys().map(|k| k.0).collect();
        let c_shard: Vec<&str> = latest_checkpoints.keys().map(|k| k.1).collect();
        let c_position: Vec<&str> = latest_checkpoints.values().copied().collect();
        let pipeline = self.target.pipeline.clone();
        let target = self.target_key();
        let mut upsert = self.upsert_writes > 0;
        self.upsert_writes = self.upsert_writes.saturating_sub(1);
        loop {
            let answer_sql = if answers.is_empty() { None } else { Some(self.answer_insert(&passthrough, upsert)) };
            let client = self.client.as_mut().expect("connected");
            let result = self.rt.block_on(async {
                let tx = client.transaction().await?;
                if upsert && !ids.is_empty() {
                    let foreign = tx.query(foreign_sql.as_str(), &[&ids, &pipeline]).await?;
                    if !foreign.is_empty() {
                        // Dropping the transaction rolls it back.
                        return Ok(foreign.iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))).collect());
                    }
                }
                if let Some(sql) = &answer_sql {
                    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&ids];
                    params.extend(value_cols.iter().map(|b| b.as_ref() as &(dyn ToSql + Sync)));
                    params.push(&model);
                    params.push(&pipeline);
                    tx.execute(sql.as_str(), &params).await?;
                }
                if !deleted.is_empty() {
                    tx.execute(delete_sql.as_str(), &[&deleted, &pipeline]).await?;
                }
                if !dead.is_empty() {
                    tx.execute(dead_sql.as_str(), &[&d_source, &d_pos, &d_reason, &d_detail, &d_raw, &d_pipeline, &d_len, &d_sha]).await?;
                }
                if !c_scope.is_empty() {
                    tx.execute(checkpoints_sql.as_str(), &[&pipeline, &target, &c_scope, &c_shard, &c_position]).await?;
                }
                tx.commit().await.map(|_| Vec::new())
            });
            match result {
                Ok(foreign) if !foreign.is_empty() => {
                    let owners: HashMap<&str, &str> = foreign.iter().map(|(id, p)| (id.as_str(), p.as_str())).collect();
                    let table = self.table();
                    let refused = answers
                        .iter()
                        .filter_map(|a| {
                            owners.get(a.id.as_str()).map(|owner| {
                                (a.seq, format!("id `{}` is answered in table {table} by pipeline `{owner}`; one table holds one answer per id", a.id))
                            })
                        })
                        .collect();
                    return Err(SinkError::Refused(refused));
                }
                Ok(_) => return Ok(()),
                Err(e) if !upsert && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    // The failed transaction was rolled back when it was dropped.
                    upsert = true;
                    self.upsert_writes = UPSERT_AFTER_CONFLICT;
                }
                Err(e) => return Err(classify(e)),
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
                    ColumnKind::Bool | ColumnKind::Timestamp => "text",
                }
            ));
        }
        // The file, topic or subscription that supplied the answer.
        n += 1;
        names.push(quote_ident("source"));
        casts.push(format!("${n}::text[]"));
        let first_passthrough = names.len();
        for p in passthrough {
            n += 1;
            names.push(quote_ident(p));
            casts.push(format!("${n}::text[]"));
        }
        // The model label is one value for the whole batch, not an array of copies.
        let aliases: Vec<String> = (0..names.len()).map(|i| format!("c{i}")).collect();
        // Pass-through values travel as text and take their column's type here; an empty value
        // (a CSV's empty field, a Parquet null) is NULL in a typed column.
        let kinds: Vec<ColumnKind> = passthrough.iter().map(|p| self.known.get(p).copied().unwrap_or_default()).collect();
        let selected: Vec<String> = aliases
            .iter()
            .enumerate()
            .map(|(i, a)| match i.checked_sub(first_passthrough).map(|p| kinds[p]) {
                Some(kind) if kind != ColumnKind::Text => format!("NULLIF(btrim({a}), '')::{}", sql_type(kind)),
                _ => a.clone(),
            })
            .collect();
        // The model label and the owning pipeline are one value each for the whole batch.
        names.push(quote_ident("model"));
        names.push(quote_ident("pipeline"));
        let model_param = format!("${}::text, ${}::text", n + 1, n + 2);
        let t = self.table();
        let updated: Vec<&String> = names.iter().skip(1).collect();
        let set: Vec<String> = updated.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        let old: Vec<String> = updated.iter().map(|c| format!("cur.{c}")).collect();
        let new: Vec<String> = updated.iter().map(|c| format!("EXCLUDED.{c}")).collect();
        let insert = format!(
            "INSERT INTO {t} AS cur ({cols}, updated_at) SELECT {selected}, {model_param}, now() FROM UNNEST({casts}) AS u({aliases_list})",
            cols = names.join(", "),
            selected = selected.join(", "),
            aliases_list = aliases.join(", "),
            casts = casts.join(", "),
        );
        if !upsert {
            return insert;
        }
        format!(
            "{insert} ON CONFLICT (id) DO UPDATE SET {set}, updated_at = now() \
             WHERE (cur.pipeline IS NULL OR cur.pipeline = EXCLUDED.pipeline) AND ({old}) IS DISTINCT FROM ({new})",
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

    fn stores_checkpoints(&self) -> bool {
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

impl SinkConnector for PostgresConfig {
    const TYPE: &'static str = "postgres";
    const ABOUT: &'static str = "PostgreSQL: one upserted row per request ID, written in one transaction per epoch";
    fn check(&self) -> Result<(), ConfigError> {
        if self.url.is_empty() {
            return Err(ConfigError::new("url", "is empty", "use postgres://user:password@host:5432/database"));
        }
        for (field, name) in [("table", &self.table), ("dead_letter_table", &self.dead_letter_table), ("schema", &self.schema)] {
            if let Err(why) = crate::sql::check_identifier(name) {
                return Err(ConfigError::new(field, why.message, "use 1 to 63 bytes with no NUL or control characters, e.g. qa_answers"));
            }
        }
        tls::check(&sluice_core::topology::expand_env(&self.url), self.tls_root_cert.as_deref(), self.tls_verify).map_err(ConfigError::from)
    }
    fn factory(&self) -> std::sync::Arc<dyn SinkFactory> {
        std::sync::Arc::new(self.clone())
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

    #[test]
    fn a_dollar_quote_tag_never_occurs_in_its_body() {
        assert_eq!(dollar_quoted("x"), "$sluice$x$sluice$");
        assert_eq!(dollar_quoted("a$sluice$b"), "$sluice1$a$sluice$b$sluice1$");
        assert_eq!(dollar_quoted("a$sluice$b$sluice1$"), "$sluice2$a$sluice$b$sluice1$$sluice2$");
        // A body ending in part of the tag would end the constant one character early.
        assert_eq!(dollar_quoted("a$sluice"), "$sluice1$a$sluice$sluice1$");
    }
}
