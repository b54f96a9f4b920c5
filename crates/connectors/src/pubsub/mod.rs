//! Google Pub/Sub: the subscription source, the results sink and the backend's request client,
//! on Google's official `google-cloud-pubsub` crate. This module owns what they share: where
//! to connect (an `endpoint`, the emulator through `PUBSUB_EMULATOR_HOST`, or Google's
//! default), which credentials to use (anonymous on the emulator, a service-account file, or
//! Application Default Credentials), the process's Pub/Sub runtime, and error classification.

pub mod admin;
pub mod client;
pub mod sink;
pub mod source;

use crate::error::ConnectorError;
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{Publisher, Subscriber};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The attribute that carries the request ID on requests (by default) and on every answer.
pub const ID_ATTRIBUTE: &str = "request_id";

/// Messages acknowledged once their epoch was durable.
pub const ACKED_METRIC: &str = "sluice_pubsub_acked_total";
/// Confirmed acknowledgements (exactly-once subscriptions) that failed; those messages are
/// redelivered and their request IDs absorb the duplicates.
pub const ACK_FAILURES_METRIC: &str = "sluice_pubsub_ack_failures_total";

/// Where and as whom to connect; shared by the source, the sink and the client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    /// The service's address, e.g. `http://127.0.0.1:8085` for the emulator. Omitted: the
    /// emulator named by `PUBSUB_EMULATOR_HOST` (`host:port`), else Google's own endpoint.
    /// `${VAR}` is read from the environment.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// A service-account key file. Omitted: anonymous on the emulator, else Application
    /// Default Credentials. The key's content never appears in logs or errors.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

/// A resolved connection: the endpoint to use (`None`: Google's default) and whether it is an
/// emulator (anonymous credentials, plain HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub endpoint: Option<String>,
    pub emulator: bool,
    pub credentials_file: Option<PathBuf>,
}

impl Connection {
    /// An emulator at `host:port` or `http://host:port`.
    pub fn emulator(address: &str) -> Self {
        Connection { endpoint: Some(http_endpoint(address)), credentials_file: None }
    }

    /// Where to connect, from the settings and the environment (`PUBSUB_EMULATOR_HOST`).
    pub fn resolve(&self) -> Resolved {
        let endpoint = match &self.endpoint {
            Some(e) => Some(http_endpoint(&sluice_core::topology::expand_env(e))),
            None => std::env::var("PUBSUB_EMULATOR_HOST").ok().filter(|h| !h.trim().is_empty()).map(|h| http_endpoint(h.trim())),
        };
        let emulator = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        Resolved { endpoint, emulator, credentials_file: self.credentials_file.clone() }
    }
}

/// `host:port` becomes `http://host:port` (the emulator speaks plain HTTP/2); a URL is kept.
fn http_endpoint(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

impl Resolved {
    /// The credentials to present. Errors name the file, never its content; every one is a
    /// configuration error (the file, or the machine's default credentials, must be fixed).
    pub fn credentials(&self) -> Result<google_cloud_auth::credentials::Credentials, ConnectorError> {
        if let Some(path) = &self.credentials_file {
            let text =
                std::fs::read_to_string(path).map_err(|e| ConnectorError::config(format!("cannot read the credentials file {}: {e}", path.display())))?;
            let key: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ConnectorError::config(format!(
                    "the credentials file {} is not a JSON service-account key (line {}, column {})",
                    path.display(),
                    e.line(),
                    e.column()
                ))
            })?;
            return google_cloud_auth::credentials::service_account::Builder::new(key)
                .build()
                .map_err(|_| ConnectorError::config(format!("the credentials file {} is not a usable service-account key", path.display())));
        }
        if self.emulator {
            return Ok(google_cloud_auth::credentials::anonymous::Builder::new().build());
        }
        google_cloud_auth::credentials::Builder::default().build().map_err(|e| {
            ConnectorError::config(format!(
                "no Application Default Credentials ({e}); set credentials_file, run `gcloud auth application-default login`, \
                 or point PUBSUB_EMULATOR_HOST at an emulator"
            ))
        })
    }

    /// A publisher for `topic` that sends a batch at `messages` messages, `bytes` bytes or after
    /// `delay`, whichever comes first. Building a client makes no call yet, so a failure (a bad
    /// endpoint, unusable credentials) is a configuration error.
    pub fn publisher(&self, topic: &str, messages: u32, bytes: u32, delay: std::time::Duration) -> Result<Publisher, ConnectorError> {
        let creds = self.credentials()?;
        let _enter = runtime().enter();
        runtime()
            .block_on(async {
                let mut b = Publisher::builder(topic.to_string())
                    .with_credentials(creds)
                    .set_message_count_threshold(messages)
                    .set_byte_threshold(bytes)
                    .set_delay_threshold(delay);
                if let Some(e) = &self.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build().await
            })
            .map_err(|e| self.build_error(e))
    }

    /// A subscriber client; its errors are those of [`Self::publisher`].
    pub fn subscriber(&self) -> Result<Subscriber, ConnectorError> {
        let creds = self.credentials()?;
        runtime()
            .block_on(async {
                let mut b = Subscriber::builder().with_credentials(creds);
                if let Some(e) = &self.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build().await
            })
            .map_err(|e| self.build_error(e))
    }

    /// A client that could not be built: no call was made yet, so the endpoint or the
    /// credentials are at fault.
    pub(crate) fn build_error(&self, e: impl std::fmt::Display) -> ConnectorError {
        ConnectorError::config(format!("cannot connect to Pub/Sub at {}: {e}", self.describe()))
    }

    /// For people: the endpoint, never credentials.
    pub fn describe(&self) -> String {
        self.endpoint.clone().unwrap_or_else(|| "pubsub.googleapis.com".into())
    }
}

/// The runtime every Pub/Sub client of this process runs on: the subscribers' pulls and lease
/// extensions and the publishers' batching keep going while the timely workers compute.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pubsub")
            .enable_all()
            .build()
            .expect("cannot start the Pub/Sub runtime threads")
    })
}

/// What an RPC failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Try again later: the service is unavailable, overloaded or timed out.
    Transient,
    /// The request itself is refused (a message too large, a bad attribute).
    Record,
    /// Nothing will work as configured: missing topic or subscription, no permission.
    Config,
}

/// Classifies a Pub/Sub client error.
pub fn classify(e: &google_cloud_pubsub::Error) -> Failure {
    if e.is_authentication() {
        return Failure::Config;
    }
    match e.status().map(|s| s.code) {
        Some(Code::InvalidArgument) => Failure::Record,
        Some(Code::NotFound | Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition) => Failure::Config,
        _ => Failure::Transient,
    }
}

impl Failure {
    /// This failure as a connector error: a transient one stays transient; a missing resource
    /// or a refused permission is the configuration's fault; a refused request the input's.
    pub fn error(self, message: String) -> ConnectorError {
        match self {
            Failure::Transient => ConnectorError::unreachable(message),
            Failure::Config => ConnectorError::config(message),
            Failure::Record => ConnectorError::input(message),
        }
    }
}

/// The project of a `projects/P/topics/T` or `projects/P/subscriptions/S` name.
pub fn project_of(name: &str) -> Option<&str> {
    let mut parts = name.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("projects"), Some(p), Some("topics" | "subscriptions"), Some(n), None) if !p.is_empty() && !n.is_empty() => Some(p),
        _ => None,
    }
}

/// Checks a full resource name: `kind` is `topics` or `subscriptions`. A bad name is a
/// configuration error.
pub fn check_name(name: &str, kind: &str) -> Result<(), ConnectorError> {
    let ok = project_of(name).is_some() && name.split('/').nth(2) == Some(kind);
    if ok {
        Ok(())
    } else {
        Err(ConnectorError::config(format!("`{name}` is not a full name like projects/my-project/{kind}/my-{}", kind.trim_end_matches('s'))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_full_resource_names() {
        assert_eq!(project_of("projects/p1/topics/rides"), Some("p1"));
        assert!(check_name("projects/p1/subscriptions/s", "subscriptions").is_ok());
        let e = check_name("projects/p1/topics/rides", "subscriptions").unwrap_err();
        assert!(e.message.contains("projects/my-project/subscriptions/my-subscription"), "{e}");
        assert_eq!(e.http_status(), 400, "a bad name is the user's to fix");
        assert!(check_name("rides", "topics").is_err());
        assert!(check_name("projects//topics/rides", "topics").is_err());
        assert!(check_name("projects/p/topics/rides/extra", "topics").is_err());
    }

    #[test]
    fn the_endpoint_comes_from_the_setting_then_the_emulator_variable() {
        let c = Connection { endpoint: Some("127.0.0.1:8085".into()), credentials_file: None };
        assert_eq!(c.resolve(), Resolved { endpoint: Some("http://127.0.0.1:8085".into()), emulator: true, credentials_file: None });
        let google = Connection { endpoint: Some("https://pubsub.googleapis.com".into()), credentials_file: None }.resolve();
        assert!(!google.emulator, "an https endpoint is not an emulator");
        assert_eq!(Connection::emulator("http://h:1").endpoint.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn a_bad_credentials_file_is_named_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.json");
        std::fs::write(&path, "{\"private_key\": \"SECRET-KEY-MATERIAL\", ").unwrap();
        let r = Resolved { endpoint: None, emulator: false, credentials_file: Some(path.clone()) };
        let e = r.credentials().expect_err("a broken key is refused").message;
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(!e.contains("SECRET"), "the key's content must not leak: {e}");
        std::fs::write(&path, "{\"type\": \"service_account\", \"private_key\": \"SECRET-KEY-MATERIAL\"}").unwrap();
        if let Err(e) = r.credentials() {
            assert!(!e.message.contains("SECRET"), "the key's content must not leak: {e}");
        }
    }
}
