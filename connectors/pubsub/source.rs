//! The Pub/Sub source, on the engine's source harness. Every timely worker (in every process)
//! opens its own streaming pull on the same subscription, and Pub/Sub spreads the messages
//! over them, as it intends. A message is acknowledged only once the epoch that carried it is
//! durable in every sink; until then the client library keeps extending its lease, also while
//! the harness pauses reading. The subscriber's flow control (outstanding messages and bytes)
//! stays within the harness's in-flight bounds, so a slow sink stops the pulling instead of
//! letting leases lapse. On a subscription with exactly-once delivery the acknowledgement is
//! the confirmed one, and its failures are counted. On shutdown, what is durable is acked and
//! the rest is nacked, to be redelivered.

use super::admin::Admin;
use super::{check_name, runtime, Connection, Failure, ID_ATTRIBUTE};
use crate::record::{now_ms, DeadReason, SourcePos};
use crate::source::{Body, Checkpoint, IdFrom, Keying, Poll, RawRecord, Source, SourceError, SourceFactory};
use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{ShutdownBehavior, ShutdownToken};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// `[source] type = "pubsub"`: a pull subscription shared by every worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PubsubSourceConfig {
    /// The subscription, `projects/<project>/subscriptions/<name>`.
    pub subscription: String,
    /// The service's address, e.g. `http://127.0.0.1:8085`; omitted: `PUBSUB_EMULATOR_HOST`,
    /// else Google's own endpoint. `${VAR}` is read from the environment.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// A service-account key file; omitted: anonymous on an emulator, else Application Default
    /// Credentials. Its content never appears in logs or errors.
    #[serde(default)]
    pub credentials_file: Option<std::path::PathBuf>,
    /// Where the request ID comes from: `{ from = "header", name = "request_id" }` (an
    /// attribute; the default), `{ from = "field", name = "..." }` (a JSON field) or
    /// `{ from = "position" }`. A message without one is keyed by its Pub/Sub message ID.
    #[serde(default = "default_id")]
    pub id: IdFrom,
    /// A larger message is a dead letter (`oversize_message`).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Close an epoch after this many milliseconds.
    #[serde(default = "default_epoch_ms")]
    pub epoch_ms: u64,
    /// Outstanding (received, not yet acknowledged) messages per worker before the pull pauses;
    /// at most `runtime.max_records_in_flight`. What a worker holds is leased to it alone, so a
    /// smaller figure shares a backlog more evenly between workers and processes.
    #[serde(default = "default_max_outstanding_messages")]
    pub max_outstanding_messages: usize,
    /// Outstanding (received, not yet acknowledged) bytes per worker before the pull pauses.
    #[serde(default = "default_max_outstanding_bytes")]
    pub max_outstanding_bytes: u64,
    /// How far each lease extension reaches, in seconds (10 to 600).
    #[serde(default = "default_lease_extension_s")]
    pub lease_extension_s: u64,
    /// A message not acknowledged within this many seconds is given up to redelivery.
    #[serde(default = "default_max_lease_s")]
    pub max_lease_s: u64,
    /// Stop after this long with no new message (benchmarks, tests); omit to run forever.
    #[serde(default)]
    pub idle_exit_ms: Option<u64>,
}

fn default_id() -> IdFrom {
    IdFrom::Header { name: ID_ATTRIBUTE.into() }
}
fn default_max_message_bytes() -> usize {
    65_536
}
fn default_epoch_ms() -> u64 {
    50
}
fn default_max_outstanding_messages() -> usize {
    10_000
}
fn default_max_outstanding_bytes() -> u64 {
    64 << 20
}
fn default_lease_extension_s() -> u64 {
    60
}
fn default_max_lease_s() -> u64 {
    3_600
}

impl PubsubSourceConfig {
    /// Where and as whom to connect.
    pub fn connection(&self) -> Connection {
        Connection { endpoint: self.endpoint.clone(), credentials_file: self.credentials_file.clone() }
    }

    /// Refuses settings that cannot work: `(field, message, hint)`.
    pub fn check(&self) -> Result<(), (&'static str, String, &'static str)> {
        if let Err(e) = check_name(&self.subscription, "subscriptions") {
            return Err(("source.subscription", e, "name the subscription in full, e.g. projects/sluice-local/subscriptions/rides-sluice"));
        }
        if matches!(self.id, IdFrom::Key) {
            return Err((
                "source.id",
                "Pub/Sub messages have no key".into(),
                "use { from = \"header\", name = \"request_id\" } (an attribute) or { from = \"field\", name = \"...\" }",
            ));
        }
        if self.max_message_bytes == 0 {
            return Err(("source.max_message_bytes", "must be at least 1".into(), "use e.g. 65536"));
        }
        if self.epoch_ms == 0 {
            return Err(("source.epoch_ms", "must be at least 1".into(), "use e.g. 50"));
        }
        if !(10..=600).contains(&self.lease_extension_s) {
            return Err(("source.lease_extension_s", format!("is {}; Pub/Sub accepts 10 to 600", self.lease_extension_s), "use e.g. 60"));
        }
        if self.max_lease_s < self.lease_extension_s {
            return Err(("source.max_lease_s", "is shorter than one lease extension".into(), "use e.g. 3600"));
        }
        if self.max_outstanding_messages == 0 {
            return Err(("source.max_outstanding_messages", "must be at least 1".into(), "use e.g. 10000"));
        }
        if self.max_outstanding_bytes == 0 {
            return Err(("source.max_outstanding_bytes", "must be at least 1".into(), "use e.g. 67108864"));
        }
        Ok(())
    }
}

/// Builds each worker's Pub/Sub source; the client is shared by the process's workers.
pub struct PubsubFactory {
    pub config: PubsubSourceConfig,
    /// The harness's bound on a worker's records in flight: the pull's outstanding-message bound.
    pub max_records_in_flight: usize,
    /// Set once a connection succeeded; a failed one is tried again at the next build.
    client: Mutex<Option<Subscriber>>,
}

impl PubsubFactory {
    pub fn new(config: PubsubSourceConfig, max_records_in_flight: usize) -> Self {
        PubsubFactory { config, max_records_in_flight, client: Mutex::new(None) }
    }

    /// The subscriber client, shared by the process's workers. The subscription is looked up
    /// first, so that a missing one stops the run with the fix.
    fn client(&self) -> Result<Subscriber, SourceError> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = client.as_ref() {
            return Ok(c.clone());
        }
        let c = self.connect()?;
        *client = Some(c.clone());
        Ok(c)
    }

    fn connect(&self) -> Result<Subscriber, SourceError> {
        let conn = self.config.connection().resolve();
        let admin = Admin::connect(&conn).map_err(SourceError::Config)?;
        let info = match admin.subscription(&self.config.subscription) {
            Ok(Some(info)) => info,
            Ok(None) => {
                return Err(SourceError::Config(format!(
                    "subscription {} does not exist at {}; create it (scripts/pubsub.sh start creates the project's own, or \
                     `gcloud pubsub subscriptions create`)",
                    self.config.subscription,
                    conn.describe()
                )))
            }
            Err((Failure::Config, e)) => return Err(SourceError::Config(e)),
            Err((_, e)) => return Err(SourceError::Transient(e)),
        };
        tracing::info!(subscription = %self.config.subscription, topic = %info.topic, exactly_once = info.exactly_once, "pubsub source");
        conn.subscriber().map_err(SourceError::Config)
    }
}

impl SourceFactory for PubsubFactory {
    fn kind(&self) -> &'static str {
        "pubsub"
    }
    fn build(&self, worker: usize, _peers: usize, _resume: &[Checkpoint]) -> Result<Box<dyn Source>, SourceError> {
        let subscriber = self.client()?;
        let outstanding = self.config.max_outstanding_messages.min(self.max_records_in_flight);
        Ok(Box::new(PubsubSource::open(&self.config, subscriber, outstanding, worker)))
    }
    fn resumable(&self) -> bool {
        // Unacknowledged messages are redelivered: a rerun continues where the last one stopped.
        true
    }
    fn keying(&self) -> Keying {
        Keying::Stream
    }
    fn epoch_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(self.config.epoch_ms.max(1)))
    }
    fn idle_exit(&self) -> Option<Duration> {
        self.config.idle_exit_ms.map(Duration::from_millis)
    }
    fn id_from(&self) -> IdFrom {
        self.config.id.clone()
    }
    fn describe(&self) -> String {
        format!("pubsub subscription {}", self.config.subscription)
    }
}

/// What the pulling task hands to the worker.
type Delivery = (Message, Handler);

/// One worker's streaming pull.
pub struct PubsubSource {
    subscription: Arc<str>,
    id_from: IdFrom,
    max_message_bytes: usize,
    rx: mpsc::Receiver<Delivery>,
    /// The pull's last error, for the harness (a missing subscription stops the run).
    error: Arc<Mutex<Option<(Failure, String)>>>,
    /// Handles of the messages read, by the epoch that carried them, until that epoch is durable.
    pending: BTreeMap<u64, Vec<Handler>>,
    shutdown: ShutdownToken,
    ended: Arc<AtomicBool>,
    /// Confirmed acknowledgements on their way (exactly-once subscriptions): a shutdown waits
    /// for them, since stopping the pull fails those still unanswered.
    confirming: Vec<tokio::task::JoinHandle<()>>,
}

impl PubsubSource {
    fn open(c: &PubsubSourceConfig, subscriber: Subscriber, max_outstanding: usize, worker: usize) -> Self {
        let _enter = runtime().enter();
        let mut stream = subscriber
            .subscribe(c.subscription.clone())
            .set_max_outstanding_messages(max_outstanding as i64)
            .set_max_outstanding_bytes(c.max_outstanding_bytes as i64)
            .set_max_lease_extension(Duration::from_secs(c.lease_extension_s))
            .set_max_lease(Duration::from_secs(c.max_lease_s))
            // At shutdown, send the acknowledgements given and nack the rest at once, so that
            // what is not durable is redelivered without waiting for its lease to lapse.
            .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
            .build();
        let shutdown = stream.shutdown_token();
        // Flow control holds what is outstanding to `max_outstanding`; the channel holds
        // a poll's worth more, so the pull never waits on a worker that is reading.
        let (tx, rx) = mpsc::channel::<Delivery>(4096);
        let error = Arc::new(Mutex::new(None));
        let ended = Arc::new(AtomicBool::new(false));
        let (err_slot, ended_flag) = (error.clone(), ended.clone());
        runtime().spawn(async move {
            loop {
                match stream.next().await {
                    Some(Ok(delivery)) => {
                        if tx.send(delivery).await.is_err() {
                            break; // the worker is gone; what was not handed over is nacked
                        }
                    }
                    Some(Err(e)) => {
                        let failure = super::classify(&e);
                        tracing::warn!("pubsub pull (worker {worker}): {e}");
                        *err_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((failure, e.to_string()));
                        if failure == Failure::Config {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => break,
                }
            }
            ended_flag.store(true, Ordering::Relaxed);
        });
        PubsubSource {
            subscription: c.subscription.as_str().into(),
            id_from: c.id.clone(),
            max_message_bytes: c.max_message_bytes,
            rx,
            error,
            pending: BTreeMap::new(),
            shutdown,
            ended,
            confirming: Vec::new(),
        }
    }

    /// The record for one message: its ID hint, its body, and its position (the message ID).
    fn record(&self, m: &Message, now: u64) -> RawRecord {
        let id = match &self.id_from {
            IdFrom::Header { name } => m.attributes.get(name).map(|v| v.as_bytes().to_vec()),
            IdFrom::Key | IdFrom::Field { .. } | IdFrom::Position => None,
        };
        let bytes = m.data.to_vec();
        let body = if bytes.len() > self.max_message_bytes {
            Body::Refused(DeadReason::OversizeMessage, format!("message is {} bytes; the limit is {}", bytes.len(), self.max_message_bytes))
        } else {
            Body::Json
        };
        RawRecord { bytes, body, pos: message_position(self.subscription.clone(), &m.message_id), id, ingest_ms: now }
    }
}

/// A message's position: its subscription and its message ID. Pub/Sub's message IDs are
/// decimal numbers; one that is not (no service is known to send such) is hashed.
pub fn message_position(subscription: Arc<str>, message_id: &str) -> SourcePos {
    let number = message_id.parse::<u64>().unwrap_or_else(|_| crate::record::content_hash(message_id.as_bytes()));
    SourcePos::message(subscription, number)
}

impl Source for PubsubSource {
    fn poll(&mut self, epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError> {
        let now = now_ms();
        while out.len() < budget {
            match self.rx.try_recv() {
                Ok((m, h)) => {
                    out.push(self.record(&m, now));
                    self.pending.entry(epoch).or_default().push(h);
                }
                Err(_) => break,
            }
        }
        if let Some((failure, e)) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if failure == Failure::Config {
                return Err(SourceError::Config(format!("cannot pull from {}: {e}", self.subscription)));
            }
        }
        if !out.is_empty() && out.len() >= budget {
            return Ok(Poll::More);
        }
        if self.ended.load(Ordering::Relaxed) && self.rx.is_empty() {
            return Err(SourceError::Transient(format!("the pull from {} ended", self.subscription)));
        }
        Ok(Poll::Idle(Duration::from_millis(2)))
    }

    fn durable(&mut self, before: u64) {
        let keep = self.pending.split_off(&before);
        let done = std::mem::replace(&mut self.pending, keep);
        let mut acked = 0u64;
        self.confirming.retain(|t| !t.is_finished());
        for h in done.into_values().flatten() {
            acked += 1;
            match h {
                Handler::ExactlyOnce(h) => {
                    self.confirming.push(runtime().spawn(async move {
                        if let Err(e) = h.confirmed_ack().await {
                            tracing::warn!("pubsub: a confirmed acknowledgement failed (the message will be redelivered; its ID absorbs the duplicate): {e}");
                            metrics::counter!(super::ACK_FAILURES_METRIC).increment(1);
                        }
                    }));
                }
                h => h.ack(),
            }
        }
        if acked > 0 {
            metrics::counter!(super::ACKED_METRIC).increment(acked);
        }
    }
}

impl Drop for PubsubSource {
    /// Nacks what is not durable (the harness acknowledged everything durable before), stops
    /// the pull, and waits (a little) for the acknowledgements already given to reach Pub/Sub.
    fn drop(&mut self) {
        let nacked: usize = self.pending.values().map(Vec::len).sum();
        self.pending.clear();
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        if nacked > 0 {
            tracing::info!("pubsub: {nacked} messages not durable are left to redelivery");
        }
        let token = self.shutdown.clone();
        let confirming = std::mem::take(&mut self.confirming);
        let _ = runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                // The confirmations of what is durable first: stopping the pull fails those
                // still unanswered (they would be redelivered, and absorbed by their IDs).
                for t in confirming {
                    let _ = t.await;
                }
                token.shutdown().await
            })
            .await
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<crate::topology::Topology, crate::topology::TopologyError> {
        let text = format!(
            "name = \"p\"\n[source]\ntype = \"pubsub\"\nsubscription = \"projects/p/subscriptions/rides\"\n{extra}\n[task]\ntype = \"tabular\"\nmodel = \"Cargo.toml\"\n"
        );
        crate::topology::Topology::parse("p.toml", &text)
    }

    #[test]
    fn the_source_parses_with_defaults_and_refuses_what_cannot_work() {
        let t = config("").unwrap();
        let crate::connectors::registry::SourceConfig::Pubsub(c) = t.source else { panic!("pubsub source") };
        assert_eq!(c.id, IdFrom::Header { name: "request_id".into() });
        assert_eq!((c.epoch_ms, c.lease_extension_s), (50, 60));
        let e = config("endpoint = \"127.0.0.1:8085\"\nlease_extension_s = 5").unwrap_err().to_string();
        assert!(e.contains("source.lease_extension_s") && e.contains("10 to 600"), "{e}");
        let e = config("id = { from = \"key\" }").unwrap_err().to_string();
        assert!(e.contains("source.id") && e.contains("no key"), "{e}");
        let e = crate::topology::Topology::parse(
            "p.toml",
            "name = \"p\"\n[source]\ntype = \"pubsub\"\nsubscription = \"rides\"\n[task]\ntype = \"tabular\"\nmodel = \"Cargo.toml\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("source.subscription") && e.contains("projects/"), "{e}");
        assert!(config("unknown_field = 1").is_err(), "unknown fields are errors");
    }

    #[test]
    fn a_message_is_positioned_by_its_id() {
        let p = message_position("projects/p/subscriptions/s".into(), "1043");
        assert_eq!((p.offset, p.derived_id(), p.position()), (1043, "1043".to_string(), "message 1043".to_string()));
        let odd = message_position("s".into(), "not-a-number");
        assert_eq!(odd.offset, crate::record::content_hash(b"not-a-number"));
    }
}
