//! The backend's side on Pub/Sub: publish a request with a fresh ID (as the `request_id`
//! attribute) and wait, with a timeout, for the answer carrying that ID on the client's own
//! subscription to the results topic, never another request's. The client creates its reply
//! subscription at start (filtered to its own IDs where the service supports filters) and
//! deletes it when dropped. The load generator's Pub/Sub side is built on the same parts, and
//! [`PubsubBroker`] offers all of it as a [`RequestBroker`].

use super::admin::Admin;
use super::{classify, project_of, runtime, Connection, Resolved, ID_ATTRIBUTE};
use crate::client::{ClientError, RequestBroker};
use crate::error::ConnectorError;
use crate::loadgen::{Answers, Publish};
use google_cloud_pubsub::client::Publisher;
use google_cloud_pubsub::error::PublishError;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::ShutdownToken;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A message as it arrived, and when.
type Arrival = (Message, Instant);

/// A subscription of this client's own on the results topic, pulled on the Pub/Sub runtime;
/// every answer is acknowledged on arrival and handed over. Deleted when dropped.
pub struct ReplySubscription {
    admin: Admin,
    name: String,
    rx: crossbeam_channel::Receiver<Arrival>,
    shutdown: ShutdownToken,
}

/// A name no other client shares: `<time>-<pid>-<n>`, usable in resource names and IDs.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("c{:x}-{:x}-{}", nanos, std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl ReplySubscription {
    /// Subscribes to `results_topic` from now on. With `id_prefix`, only answers whose request
    /// ID starts with it are delivered (where the service supports filters; else all are).
    /// A topic that is not a full name is a configuration error.
    pub fn open(conn: &Resolved, results_topic: &str, id_prefix: Option<&str>) -> Result<Self, ClientError> {
        let project =
            project_of(results_topic).ok_or_else(|| ClientError::PubSub(ConnectorError::config(format!("`{results_topic}` is not projects/P/topics/T"))))?;
        let name = format!("projects/{project}/subscriptions/sluice-reply-{}", unique_prefix());
        let admin = Admin::connect(conn).map_err(ClientError::PubSub)?;
        let filter = id_prefix.map(|p| format!("hasPrefix(attributes.{ID_ATTRIBUTE}, \"{p}\")")).unwrap_or_default();
        if let Err(e) = admin.ensure_subscription(&name, results_topic, &filter, 60, false) {
            if filter.is_empty() {
                return Err(ClientError::PubSub(e));
            }
            tracing::debug!("reply subscription with a filter refused ({e}); subscribing to every answer");
            admin.ensure_subscription(&name, results_topic, "", 60, false).map_err(ClientError::PubSub)?;
        }
        let subscriber = conn.subscriber().map_err(ClientError::PubSub)?;
        let _enter = runtime().enter();
        let mut stream = subscriber.subscribe(name.clone()).set_max_outstanding_messages(100_000i64).build();
        let shutdown = stream.shutdown_token();
        let (tx, rx) = crossbeam_channel::unbounded();
        runtime().spawn(async move {
            while let Some(next) = stream.next().await {
                match next {
                    Ok((m, h)) => {
                        h.ack();
                        if tx.send((m, Instant::now())).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!("reply subscription: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(ReplySubscription { admin, name, rx, shutdown })
    }

    /// The next message, waiting up to `wait`.
    pub fn recv(&self, wait: Duration) -> Option<Message> {
        self.rx.recv_timeout(wait).ok().map(|(m, _)| m)
    }

    /// The subscription's full name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ReplySubscription {
    fn drop(&mut self) {
        let token = self.shutdown.clone();
        let _ = runtime().block_on(async { tokio::time::timeout(Duration::from_secs(5), token.shutdown()).await });
        if let Err(e) = self.admin.delete_subscription(&self.name) {
            tracing::warn!("{e}");
        }
    }
}

type Waiters = Arc<Mutex<HashMap<String, crossbeam_channel::Sender<(serde_json::Value, Instant)>>>>;

/// Publishes requests and matches answers to them by request ID.
pub struct RequestClient {
    publisher: Publisher,
    /// Publishes not yet confirmed.
    sending: Mutex<Vec<google_cloud_pubsub::publisher::PublishFuture>>,
    waiters: Waiters,
    prefix: String,
    counter: AtomicU64,
    /// Answers that arrived for no waiting request (a duplicate, or another client's where the
    /// service ignores filters).
    pub unmatched: Arc<AtomicU64>,
    reply: Option<ReplySubscription>,
    router: Option<std::thread::JoinHandle<()>>,
}

/// A publisher for `topic`: requests go out within a millisecond, batched under load.
fn publisher(conn: &Resolved, topic: &str) -> Result<Publisher, ClientError> {
    conn.publisher(topic, 1000, 4 << 20, Duration::from_millis(1)).map_err(ClientError::PubSub)
}

/// The request message: the JSON body, and the ID as an attribute.
fn request_message(id: &str, body: Vec<u8>) -> Message {
    Message::new().set_data(body).set_attributes([(ID_ATTRIBUTE.to_string(), id.to_string())])
}

impl RequestClient {
    /// Connects: a publisher for `requests_topic` and a reply subscription on `results_topic`.
    pub fn connect(connection: &Connection, requests_topic: &str, results_topic: &str) -> Result<Self, ClientError> {
        let conn = connection.resolve();
        let prefix = format!("req-{}-", unique_prefix());
        let reply = ReplySubscription::open(&conn, results_topic, Some(&prefix))?;
        let publisher = publisher(&conn, requests_topic)?;
        let waiters: Waiters = Arc::new(Mutex::new(HashMap::new()));
        let unmatched = Arc::new(AtomicU64::new(0));
        let (w, u, rx) = (waiters.clone(), unmatched.clone(), reply.rx.clone());
        let router = std::thread::Builder::new()
            .name("sluice-pubsub-client".into())
            .spawn(move || {
                for (m, arrived) in rx.iter() {
                    let id = m.attributes.get(ID_ATTRIBUTE).map(String::as_str).unwrap_or_default();
                    let waiter = w.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
                    match waiter {
                        Some(tx) => {
                            let body = serde_json::from_slice(&m.data).unwrap_or(serde_json::Value::Null);
                            let _ = tx.send((body, arrived));
                        }
                        None => {
                            u.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .map_err(|e| ClientError::PubSub(ConnectorError::internal(e.to_string())))?;
        Ok(RequestClient {
            publisher,
            sending: Mutex::new(Vec::new()),
            waiters,
            prefix,
            counter: AtomicU64::new(0),
            unmatched,
            reply: Some(reply),
            router: Some(router),
        })
    }

    /// A request ID no other request of this or any other client has.
    pub fn fresh_id(&self) -> String {
        format!("{}{}", self.prefix, self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Publishes `payload` (a JSON object) under `id` without waiting (see [`Self::flush`]); the
    /// answer comes through the returned receiver.
    pub fn publish(
        &self,
        id: &str,
        mut payload: serde_json::Map<String, serde_json::Value>,
    ) -> Result<crossbeam_channel::Receiver<(serde_json::Value, Instant)>, ClientError> {
        payload.insert(ID_ATTRIBUTE.into(), id.into());
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), tx);
        let body = serde_json::to_vec(&payload).map_err(|e| ClientError::PubSub(ConnectorError::internal(e.to_string())))?;
        let _enter = runtime().enter();
        let sending = self.publisher.publish(request_message(id, body));
        self.sending.lock().unwrap_or_else(|p| p.into_inner()).push(sending);
        Ok(rx)
    }

    /// Waits until Pub/Sub has every request published so far.
    pub fn flush(&self) -> Result<(), ClientError> {
        let sending = std::mem::take(&mut *self.sending.lock().unwrap_or_else(|p| p.into_inner()));
        runtime().block_on(async {
            for f in sending {
                f.await.map_err(|e| ClientError::PubSub(publish_error(&e)))?;
            }
            Ok(())
        })
    }

    /// Publishes a request with a fresh ID and waits up to `timeout` for its own answer.
    pub fn request(&self, payload: serde_json::Map<String, serde_json::Value>, timeout: Duration) -> Result<(String, serde_json::Value), ClientError> {
        let id = self.fresh_id();
        let rx = self.publish(&id, payload)?;
        if let Err(e) = self.flush() {
            self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            return Err(e);
        }
        match rx.recv_timeout(timeout) {
            Ok((answer, _)) => Ok((id, answer)),
            Err(_) => {
                self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                Err(ClientError::Timeout { id, timeout })
            }
        }
    }
}

impl Drop for RequestClient {
    fn drop(&mut self) {
        // The router ends when the reply subscription's pull (and its channel) closes.
        drop(self.reply.take());
        if let Some(r) = self.router.take() {
            let _ = r.join();
        }
    }
}

/// The load generator's publishing side on Pub/Sub.
pub struct PubsubPublish {
    publisher: Publisher,
    pending: Vec<google_cloud_pubsub::publisher::PublishFuture>,
}

impl PubsubPublish {
    /// A publisher for `topic`; errors are shown as the request client's (`pubsub: ...`).
    pub fn new(connection: &Connection, topic: &str) -> Result<Self, ConnectorError> {
        Ok(PubsubPublish { publisher: publisher(&connection.resolve(), topic)?, pending: Vec::new() })
    }
}

/// A publish Pub/Sub did not confirm: a failed call classed by [`classify`], anything else
/// (a paused ordering key, a publisher shutting down) transient, as in the sink.
fn publish_error(e: &PublishError) -> ConnectorError {
    let message = format!("publish: {e}");
    match e {
        PublishError::Rpc(inner) => classify(inner).error(message),
        _ => ConnectorError::unreachable(message),
    }
}

impl Publish for PubsubPublish {
    fn send(&mut self, id: &str, body: &[u8]) -> Result<(), ConnectorError> {
        let _enter = runtime().enter();
        self.pending.push(self.publisher.publish(request_message(id, body.to_vec())));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        let pending = std::mem::take(&mut self.pending);
        runtime().block_on(async {
            for f in pending {
                f.await.map_err(|e| publish_error(&e))?;
            }
            Ok(())
        })
    }
}

/// The load generator's listening side on Pub/Sub: a reply subscription of its own.
pub struct PubsubAnswers(ReplySubscription);

impl PubsubAnswers {
    /// Listens on `results_topic` for answers whose ID starts with `id_prefix`; errors are
    /// shown as the request client's (`pubsub: ...`).
    pub fn open(connection: &Connection, results_topic: &str, id_prefix: &str) -> Result<Self, ConnectorError> {
        Ok(PubsubAnswers(ReplySubscription::open(&connection.resolve(), results_topic, Some(id_prefix))?))
    }
}

impl Answers for PubsubAnswers {
    fn poll(&mut self, wait: Duration, on_id: &mut dyn FnMut(Option<&[u8]>)) {
        if let Ok((m, _)) = self.0.rx.recv_timeout(wait) {
            on_id(m.attributes.get(ID_ATTRIBUTE).map(|v| v.as_bytes()));
            for (m, _) in self.0.rx.try_iter() {
                on_id(m.attributes.get(ID_ATTRIBUTE).map(|v| v.as_bytes()));
            }
        }
    }
}

/// Pub/Sub as a [`RequestBroker`]: requests carry their ID as an attribute; answers come on a
/// reply subscription of the client's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubsubBroker {
    /// Where and as whom to connect.
    pub connection: Connection,
}

impl RequestBroker for PubsubBroker {
    fn default_topics(&self) -> (&'static str, &'static str) {
        ("projects/sluice-local/topics/rides", "projects/sluice-local/topics/ride-durations")
    }

    fn request(
        &self,
        requests_topic: &str,
        results_topic: &str,
        payload: serde_json::Map<String, serde_json::Value>,
        timeout: Duration,
    ) -> Result<(String, serde_json::Value), ClientError> {
        RequestClient::connect(&self.connection, requests_topic, results_topic)?.request(payload, timeout)
    }

    fn answers(&self, results_topic: &str, id_prefix: &str) -> Result<Box<dyn Answers>, ConnectorError> {
        Ok(Box::new(PubsubAnswers::open(&self.connection, results_topic, id_prefix)?))
    }

    fn publisher(&self, requests_topic: &str) -> Result<Box<dyn Publish>, ConnectorError> {
        Ok(Box::new(PubsubPublish::new(&self.connection, requests_topic)?))
    }
}
