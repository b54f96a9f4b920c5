//! `sluice serve`: one engine for the process's life, the pipelines of the serve config running
//! on it, the job queue, and the HTTP server in front of them.

pub mod config;
pub mod http;
pub mod jobs;
pub mod models;
pub mod oip;
pub mod store;

use config::ServeConfig;
use sluice::engine::{Engine, EngineSettings, JobOptions};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Serves until SIGTERM or SIGINT: then the jobs drain (those not finished stay `running` in
/// the state folder and the next server resumes them) and the process returns.
pub fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let tokens = config.tokens()?;
    let mut templates = BTreeMap::new();
    for (name, path) in &config.templates {
        let t = sluice::registry::load(path)?;
        templates.insert(name.clone(), (path.clone(), t));
    }
    let engine = Engine::start(EngineSettings {
        workers: config.workers,
        process: 0,
        hosts: Vec::new(),
        metrics_listen: None,
        metrics_recorder: true,
        signals_grace: Some(Duration::from_millis(config.shutdown_grace_ms)),
        worker_nice: config.bulk_nice,
    })?;
    // The models answered online. One with a repository points its template at the version it
    // serves, so the template's jobs share its service.
    let mut models = BTreeMap::new();
    for (name, m) in config.served_models() {
        let template = m.template.clone().unwrap_or_else(|| name.clone());
        let (_, topology) = templates.get_mut(&template).ok_or_else(|| anyhow::anyhow!("models.{name}.template: no template `{template}`"))?;
        let served = models::Served::start(&engine, &name, &m, &template, topology)?;
        tracing::info!(model = %name, version = %served.version(), "model served online");
        models.insert(name, Arc::new(served));
    }
    models::watch(models.values().cloned().collect(), Duration::from_millis(config.model_poll_ms.max(10)));
    // The pipelines that run for the process's life: their failure is theirs, logged.
    let mut pipelines = Vec::new();
    for path in &config.pipelines {
        let mut t = sluice::registry::load(path)?;
        // A pipeline on a served model's file runs on the version the model serves (and shares
        // its service when its task, batching and execution are the template's).
        if let Some(m) = models.values().find(|m| m.file() == t.task.model() && m.started_on != m.file()) {
            t.task.set_model(m.started_on.clone());
        }
        let job = engine.submit(&t.name, &t, JobOptions::default())?;
        tracing::info!(pipeline = %t.name, "pipeline running");
        pipelines.push(job);
    }
    let listen = config.listen.clone();
    let jobs = jobs::Jobs::open(config, engine)?;
    let app = Arc::new(http::App { jobs: jobs.clone(), templates, tokens, pipelines: pipelines.clone(), models });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("sluice-http").enable_all().build()?;
    let served = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        println!("sluice serve: listening on http://{}", listener.local_addr()?);
        use std::io::Write as _;
        std::io::stdout().flush()?;
        let stopping = jobs.clone();
        axum::serve(listener, http::router(app))
            .with_graceful_shutdown(async move {
                while !stopping.engine().stopping() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await?;
        anyhow::Ok(())
    });
    // The connections' tasks hold the app and with it the online models' handles on their
    // inference services, which stop (and the engine with them) only once no handle is left.
    drop(rt);
    jobs.stop();
    jobs.wait_stopped();
    for p in pipelines {
        if let Err(e) = p.wait() {
            tracing::error!(pipeline = p.id(), "pipeline failed: {e}");
        }
    }
    served
}
