//! Where job records live: files in the state folder (`jobs/<id>/job.json`, each rewritten
//! atomically), or a Postgres table when the serve config names one (one row per job, the
//! record as JSONB, upserted on every change). Uploads and answers stay in the state folder.

use crate::serve::config::StateStore;
use crate::serve::jobs::JobRecord;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

/// A place for job records.
pub trait RecordStore: Send + Sync {
    /// Every record kept, in no particular order.
    fn load(&self) -> anyhow::Result<Vec<JobRecord>>;
    /// Writes a record, replacing the job's earlier one.
    fn save(&self, record: &JobRecord) -> Result<(), String>;
    /// Forgets a job.
    fn remove(&self, id: &str) -> Result<(), String>;
    /// Where, for people.
    fn describe(&self) -> String;
}

/// Records as `jobs/<id>/job.json` files.
pub struct FileStore {
    pub dir: PathBuf,
}

impl RecordStore for FileStore {
    fn load(&self) -> anyhow::Result<Vec<JobRecord>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path().join("job.json");
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            match serde_json::from_str(&text) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
            }
        }
        Ok(out)
    }

    fn save(&self, record: &JobRecord) -> Result<(), String> {
        let dir = self.dir.join(&record.id);
        std::fs::create_dir_all(&dir)
            .and_then(|_| {
                let tmp = dir.join("job.json.tmp");
                std::fs::write(&tmp, serde_json::to_vec_pretty(record).unwrap_or_default())?;
                std::fs::rename(&tmp, dir.join("job.json"))
            })
            .map_err(|e| e.to_string())
    }

    fn remove(&self, _id: &str) -> Result<(), String> {
        // The record goes with the job's folder.
        Ok(())
    }

    fn describe(&self) -> String {
        format!("files in {}", self.dir.display())
    }
}

enum Op {
    Load,
    Save { id: String, status: &'static str, json: String },
    Remove(String),
}

/// An operation and where its result goes.
type Request = (Op, mpsc::Sender<Result<Vec<String>, String>>);

/// Records in a Postgres table, written by one thread that owns the connection (callers may be
/// on any thread, async or not) and reconnects when it is lost.
pub struct PgStore {
    ops: Mutex<mpsc::Sender<Request>>,
    describe: String,
}

/// Attempts of one write before it is reported failed (a restarting server, a lost connection).
const ATTEMPTS: u32 = 5;

type PgConnect = sluice::connectors::postgres::tls::PgConnect;

impl PgStore {
    /// Connects, creates the table when missing, and starts the writer thread. An unreachable
    /// server or a table that cannot be created is an error here, at start-up.
    pub fn open(config: &StateStore) -> anyhow::Result<PgStore> {
        let url = sluice::topology::expand_env(&config.postgres);
        let connect = sluice::connectors::postgres::tls::prepare(&url, None, None).map_err(|e| anyhow::anyhow!("state_store.postgres: {e}"))?;
        let table = sluice::sql::qualified(&config.schema, &config.table);
        let describe = format!("Postgres table {}.{}", config.schema, config.table);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = rt.block_on(connect_to(&connect, &table)).map_err(|e| anyhow::anyhow!("state_store: {e}"))?;
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new().name("sluice-state-store".into()).spawn(move || {
            let mut client = Some(client);
            for (op, reply) in rx {
                let _ = reply.send(rt.block_on(with_retry(&connect, &table, &mut client, &op)));
            }
        })?;
        Ok(PgStore { ops: Mutex::new(tx), describe })
    }

    fn send(&self, op: Op) -> Result<Vec<String>, String> {
        let (tx, rx) = mpsc::channel();
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).send((op, tx)).map_err(|_| "the state store's writer stopped".to_string())?;
        rx.recv().map_err(|_| "the state store's writer stopped".to_string())?
    }
}

async fn connect_to(connect: &PgConnect, table: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) =
        connect.config.connect(connect.tls.clone()).await.map_err(|e| {
            connect.refusal(&e).unwrap_or_else(|| format!("cannot connect to Postgres: {}", sluice::connectors::postgres::tls::with_causes(&e)))
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("state store connection ended: {e}");
        }
    });
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, status TEXT NOT NULL, record JSONB NOT NULL, \
             updated_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        ))
        .await
        .map_err(|e| format!("cannot create the job table {table}: {}", sluice::connectors::postgres::tls::with_causes(&e)))?;
    Ok(client)
}

async fn run(client: &tokio_postgres::Client, table: &str, op: &Op) -> Result<Vec<String>, tokio_postgres::Error> {
    match op {
        Op::Load => {
            let rows = client.query(&format!("SELECT record::text FROM {table} ORDER BY id"), &[]).await?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        }
        Op::Save { id, status, json } => {
            client
                .execute(
                    &format!(
                        "INSERT INTO {table} (id, status, record, updated_at) VALUES ($1, $2, ($3::text)::jsonb, now()) \
                         ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, record = EXCLUDED.record, updated_at = now()"
                    ),
                    &[id as &(dyn tokio_postgres::types::ToSql + Sync), status, json],
                )
                .await?;
            Ok(Vec::new())
        }
        Op::Remove(id) => {
            client.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[id as &(dyn tokio_postgres::types::ToSql + Sync)]).await?;
            Ok(Vec::new())
        }
    }
}

/// Runs `op`, reconnecting and trying again while the connection is what failed; an error of
/// the database itself (a DBA's constraint, a dropped column) is reported at once.
async fn with_retry(connect: &PgConnect, table: &str, client: &mut Option<tokio_postgres::Client>, op: &Op) -> Result<Vec<String>, String> {
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match connect_to(connect, table).await {
                Ok(c) => *client = Some(c),
                Err(e) => {
                    last = e;
                    continue;
                }
            }
        }
        let Some(c) = client.as_ref() else { continue };
        match run(c, table, op).await {
            Ok(v) => return Ok(v),
            Err(e) if e.as_db_error().is_none() => {
                last = sluice::connectors::postgres::tls::with_causes(&e);
                *client = None;
            }
            Err(e) => return Err(sluice::connectors::postgres::tls::with_causes(&e)),
        }
    }
    Err(last)
}

impl RecordStore for PgStore {
    fn load(&self) -> anyhow::Result<Vec<JobRecord>> {
        let rows = self.send(Op::Load).map_err(|e| anyhow::anyhow!("cannot read the job records from the {}: {e}", self.describe))?;
        let mut out = Vec::with_capacity(rows.len());
        for text in rows {
            match serde_json::from_str(&text) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!("skipping a job record of the {}: {e}", self.describe),
            }
        }
        Ok(out)
    }

    fn save(&self, record: &JobRecord) -> Result<(), String> {
        let json = serde_json::to_string(record).map_err(|e| e.to_string())?;
        self.send(Op::Save { id: record.id.clone(), status: record.status.as_str(), json }).map(|_| ())
    }

    fn remove(&self, id: &str) -> Result<(), String> {
        self.send(Op::Remove(id.to_string())).map(|_| ())
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
