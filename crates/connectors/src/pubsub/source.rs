//! The Pub/Sub source, on the engine's source harness. Every timely worker (in every process)
//! opens its own streaming pull on the same subscription, and Pub/Sub spreads the messages
//! over them, as it intends. A message is acknowledged only once the epoch that carried it is
//! durable in every sink; until then the client library keeps extending its lease, also while
//! the harness pauses reading. The subscriber's flow control (outstanding messages and bytes)
//! stays within the harness's in-flight bounds, so a slow sink stops the pulling instead of
//! letting leases lapse. On a subscription with exactly-once delivery the acknowledgement is
//! the confirmed one, and its failures are counted. On shutdown, what is durable is acked and
//! the rest is nacked, to be redelivered. A pull that the client library ends for good (an error
//! outside its retry set) is opened again with backoff (see `pull`).

use super::admin::Admin;
use super::{check_name, runtime, Connection, Failure, ID_ATTRIBUTE};
use google_cloud_pubsub::client::Subscriber;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior, ShutdownToken};
use serde::Deserialize;
use sluice_core::connector::{ConfigError, SourceConnector};
use sluice_core::record::{now_ms, DeadReason, SourcePos};
use sluice_core::source::{Body, Checkpoint, IdFrom, Keying, Poll, RawRecord, Source, SourceError, SourceFactory};
use sluice_core::topology::RuntimeConfig;
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
    fn check_fields(&self) -> Result<(), (&'static str, String, &'static str)> {
        if let Err(e) = check_name(&self.subscription, "subscriptions") {
            return Err(("source.subscription", e.message, "name the subscription in full, e.g. projects/sluice-local/subscriptions/rides-sluice"));
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
        let admin = Admin::connect(&conn)?;
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
            // Unreachable now: built again after a backoff; refused: the run stops.
            Err(e) => return Err(e.into()),
        };
        tracing::info!(subscription = %self.config.subscription, topic = %info.topic, exactly_once = info.exactly_once, "pubsub source");
        Ok(conn.subscriber()?)
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

/// What the pulling task hands to the worker: a message, its handle, and the generation of
/// the streaming pull that delivered it.
type Delivery = (Message, Handler, u64);

/// The first wait before a streaming pull that ended is opened again; it doubles up to
/// [`PULL_BACKOFF_MAX`], and starts over once a new pull delivers a message.
const PULL_BACKOFF_MIN: Duration = Duration::from_millis(100);
const PULL_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How each streaming pull of a worker is opened (again, after one ended).
#[derive(Clone)]
struct PullSettings {
    subscription: String,
    max_outstanding_messages: i64,
    max_outstanding_bytes: i64,
    lease_extension: Duration,
    max_lease: Duration,
}

impl PullSettings {
    fn open(&self, subscriber: &Subscriber) -> MessageStream {
        subscriber
            .subscribe(self.subscription.clone())
            .set_max_outstanding_messages(self.max_outstanding_messages)
            .set_max_outstanding_bytes(self.max_outstanding_bytes)
            .set_max_lease_extension(self.lease_extension)
            .set_max_lease(self.max_lease)
            // When a pull stops (our shutdown, or the library closing it after an error), its
            // lease loop sends the acknowledgements given and nacks every other message it
            // holds at once, so what is not durable is redelivered without waiting for its
            // lease to lapse.
            .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
            .build()
    }
}

/// What the worker and the pulling task share.
struct PullState {
    /// The pull's last error, for the harness (a missing subscription stops the run).
    error: Mutex<Option<(Failure, String)>>,
    /// Set once no pull will be opened again: the subscription is gone or refused, or the
    /// worker stopped.
    ended: AtomicBool,
    /// Set by the worker when it stops, before it shuts the current pull down: an end seen
    /// after this is ours, not a failure to recover from.
    stopping: AtomicBool,
    /// The current pull's generation (0 for the first, +1 per rebuild) and its shutdown token.
    /// Swapped under this lock, after which `stopping` is checked again, so that a stop never
    /// misses a pull opened while it ran.
    current: Mutex<(u64, Option<ShutdownToken>)>,
}

impl PullState {
    fn generation(&self) -> u64 {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// One worker's streaming pull, rebuilt when it ends.
pub struct PubsubSource {
    subscription: Arc<str>,
    id_from: IdFrom,
    max_message_bytes: usize,
    rx: mpsc::Receiver<Delivery>,
    state: Arc<PullState>,
    /// Handles of the messages read (with the generation of the pull that delivered them), by
    /// the epoch that carried them, until that epoch is durable.
    pending: BTreeMap<u64, Vec<(u64, Handler)>>,
    /// Confirmed acknowledgements on their way (exactly-once subscriptions): a shutdown waits
    /// for them, since stopping the pull fails those still unanswered.
    confirming: Vec<tokio::task::JoinHandle<()>>,
}

impl PubsubSource {
    fn open(c: &PubsubSourceConfig, subscriber: Subscriber, max_outstanding: usize, worker: usize) -> Self {
        let _enter = runtime().enter();
        let settings = PullSettings {
            subscription: c.subscription.clone(),
            max_outstanding_messages: max_outstanding as i64,
            max_outstanding_bytes: c.max_outstanding_bytes as i64,
            lease_extension: Duration::from_secs(c.lease_extension_s),
            max_lease: Duration::from_secs(c.max_lease_s),
        };
        // Flow control holds what is outstanding to `max_outstanding`; the channel holds
        // a poll's worth more, so the pull never waits on a worker that is reading.
        let (tx, rx) = mpsc::channel::<Delivery>(4096);
        let state =
            Arc::new(PullState { error: Mutex::new(None), ended: AtomicBool::new(false), stopping: AtomicBool::new(false), current: Mutex::new((0, None)) });
        let shared = state.clone();
        runtime().spawn(async move {
            pull(settings, subscriber, tx, &shared, worker).await;
            shared.ended.store(true, Ordering::Relaxed);
        });
        PubsubSource {
            subscription: c.subscription.as_str().into(),
            id_from: c.id.clone(),
            max_message_bytes: c.max_message_bytes,
            rx,
            state,
            pending: BTreeMap::new(),
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
    let number = message_id.parse::<u64>().unwrap_or_else(|_| sluice_core::record::content_hash(message_id.as_bytes()));
    SourcePos::message(subscription, number)
}

/// Runs a worker's streaming pulls until the worker stops or the subscription cannot be read.
///
/// `google-cloud-pubsub` resumes a pull by itself after the errors in its retry set (transport
/// errors, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL). After any
/// other (UNKNOWN, or CANCELLED from a proxy or load balancer) it closes the pull for good:
/// `next()` yields the error once and then only `None`, and the pull's lease loop ends, nacking
/// every message it still held (`NackImmediately`). So a pull that ends, other than at our own
/// stop or for a missing or refused subscription, is counted
/// ([`sluice_core::metrics::PUBSUB_PULL_RESTARTS`]), logged at `warn` with its status, and replaced
/// by a new one after a backoff of 100 ms doubling to 5 s (reset once a new pull delivers).
///
/// What the dead pull held and the worker had not acknowledged is nacked by the library as
/// that pull closes, durable or not, and is redelivered (to the new pull or another worker).
/// The worker keeps the records it already read from that pull: they are answered, and the
/// redelivered copies are absorbed by their request IDs (every sink upserts by ID). A message
/// whose epoch becomes durable after its pull died cannot be acknowledged: the library gives no
/// way to acknowledge an ack ID through another pull's handle, and the ID was nacked anyway;
/// see [`Source::durable`].
async fn pull(settings: PullSettings, subscriber: Subscriber, tx: mpsc::Sender<Delivery>, state: &PullState, worker: usize) {
    let mut backoff = PULL_BACKOFF_MIN;
    let mut generation = 0u64;
    loop {
        let mut stream = settings.open(&subscriber);
        let token = stream.shutdown_token();
        let stopped = {
            let mut current = state.current.lock().unwrap_or_else(|p| p.into_inner());
            *current = (generation, Some(token.clone()));
            state.stopping.load(Ordering::SeqCst)
        };
        if stopped {
            token.shutdown().await;
            return;
        }
        let status = loop {
            match stream.next().await {
                Some(Ok((m, h))) => {
                    backoff = PULL_BACKOFF_MIN;
                    if tx.send((m, h, generation)).await.is_err() {
                        return; // the worker is gone; dropping the pull nacks what it holds
                    }
                }
                Some(Err(e)) => {
                    let failure = super::classify(&e);
                    *state.error.lock().unwrap_or_else(|p| p.into_inner()) = Some((failure, e.to_string()));
                    if failure == Failure::Config {
                        tracing::warn!("pubsub pull (worker {worker}): {e}");
                        return;
                    }
                    break match e.status() {
                        Some(s) => format!("{:?}: {}", s.code, s.message),
                        None => e.to_string(),
                    };
                }
                None => break "the stream ended without an error".to_string(),
            }
        };
        if state.stopping.load(Ordering::SeqCst) {
            return; // our own stop ended it
        }
        metrics::counter!(sluice_core::metrics::PUBSUB_PULL_RESTARTS).increment(1);
        tracing::warn!(
            worker,
            generation,
            subscription = %settings.subscription,
            status = %status,
            "pubsub: the streaming pull ended; what it held and is not acknowledged is nacked for redelivery, and a new pull opens in {backoff:?}"
        );
        // Let the dead pull's lease loop send its last acknowledgements and its nacks first, so
        // that what it held can be redelivered to the new pull.
        drop(stream);
        let _ = tokio::time::timeout(Duration::from_secs(10), token.shutdown()).await;
        let until = tokio::time::Instant::now() + backoff;
        while tokio::time::Instant::now() < until {
            if state.stopping.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20).min(until - tokio::time::Instant::now())).await;
        }
        backoff = (backoff * 2).min(PULL_BACKOFF_MAX);
        generation += 1;
    }
}

impl Source for PubsubSource {
    fn poll(&mut self, epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError> {
        let now = now_ms();
        while out.len() < budget {
            match self.rx.try_recv() {
                Ok((m, h, generation)) => {
                    out.push(self.record(&m, now));
                    self.pending.entry(epoch).or_default().push((generation, h));
                }
                Err(_) => break,
            }
        }
        if let Some((failure, e)) = self.state.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if failure == Failure::Config {
                return Err(SourceError::Config(format!("cannot pull from {}: {e}", self.subscription)));
            }
        }
        if !out.is_empty() && out.len() >= budget {
            return Ok(Poll::More);
        }
        if self.state.ended.load(Ordering::Relaxed) && self.rx.is_empty() {
            return Err(SourceError::Transient(format!("the pull from {} ended", self.subscription)));
        }
        Ok(Poll::Idle(Duration::from_millis(2)))
    }

    /// Acknowledges the messages of the epochs before `before`. A message delivered by a pull
    /// that has since ended is not acknowledged: its handle's lease loop is gone, and the
    /// library nacked it as that pull closed, with no way to acknowledge its ack ID through the
    /// new pull. It is redelivered, answered again, and the sinks' upserts by request ID absorb
    /// the duplicate.
    fn durable(&mut self, before: u64) {
        let keep = self.pending.split_off(&before);
        let done = std::mem::replace(&mut self.pending, keep);
        let current = self.state.generation();
        let (mut acked, mut orphaned) = (0u64, 0u64);
        self.confirming.retain(|t| !t.is_finished());
        for (generation, h) in done.into_values().flatten() {
            if generation != current {
                orphaned += 1;
                drop(h);
                continue;
            }
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
        if orphaned > 0 {
            tracing::info!(
                "pubsub: {orphaned} durable messages came from a pull that has ended and cannot be acknowledged; they are redelivered and their request IDs absorb the duplicates"
            );
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
        // No new pull from here on; the current one is shut down below.
        self.state.stopping.store(true, Ordering::SeqCst);
        let token = self.state.current.lock().unwrap_or_else(|p| p.into_inner()).1.clone();
        let confirming = std::mem::take(&mut self.confirming);
        let _ = runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                // The confirmations of what is durable first: stopping the pull fails those
                // still unanswered (they would be redelivered, and absorbed by their IDs).
                for t in confirming {
                    let _ = t.await;
                }
                if let Some(token) = token {
                    token.shutdown().await
                }
            })
            .await
        });
    }
}

impl SourceConnector for PubsubSourceConfig {
    const TYPE: &'static str = "pubsub";
    const ABOUT: &'static str = "Google Pub/Sub: a pull subscription shared by every worker; acked once durable";
    fn check(&self) -> Result<(), ConfigError> {
        self.check_fields().map_err(ConfigError::from)
    }
    fn bounded(&self) -> bool {
        false
    }
    fn factory(&self, _pipeline: &str, runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError> {
        Ok(Arc::new(PubsubFactory::new(self.clone(), runtime.max_records_in_flight)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<sluice_core::topology::Topology, sluice_core::topology::TopologyError> {
        let text = format!(
            "name = \"p\"\n[source]\ntype = \"pubsub\"\nsubscription = \"projects/p/subscriptions/rides\"\n{extra}\n[task]\ntype = \"tabular\"\nmodel = \"Cargo.toml\"\n"
        );
        sluice_core::topology::Topology::parse("p.toml", &text, &registry())
    }

    fn registry() -> sluice_core::connector::Registry {
        sluice_core::connector::Registry::new().source::<PubsubSourceConfig>()
    }

    #[test]
    fn the_source_parses_with_defaults_and_refuses_what_cannot_work() {
        let t = config("").unwrap();
        let c = t.source.as_any().downcast_ref::<PubsubSourceConfig>().expect("a pubsub source");
        assert_eq!(c.id, IdFrom::Header { name: "request_id".into() });
        assert_eq!((c.epoch_ms, c.lease_extension_s), (50, 60));
        let e = config("endpoint = \"127.0.0.1:8085\"\nlease_extension_s = 5").unwrap_err().to_string();
        assert!(e.contains("source.lease_extension_s") && e.contains("10 to 600"), "{e}");
        let e = config("id = { from = \"key\" }").unwrap_err().to_string();
        assert!(e.contains("source.id") && e.contains("no key"), "{e}");
        let e = sluice_core::topology::Topology::parse(
            "p.toml",
            "name = \"p\"\n[source]\ntype = \"pubsub\"\nsubscription = \"rides\"\n[task]\ntype = \"tabular\"\nmodel = \"Cargo.toml\"\n",
            &registry(),
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
        assert_eq!(odd.offset, sluice_core::record::content_hash(b"not-a-number"));
    }
}
