//! Pub/Sub administration that sluice itself needs: checking at start-up that a topic or a
//! subscription exists (so a typo stops the run with the fix, not a silent idle worker),
//! reading a subscription's delivery type, and the request client's own reply subscription.

use super::{classify, runtime, Resolved};
use crate::error::ConnectorError;
use google_cloud_pubsub::client::{SubscriptionAdmin, TopicAdmin};

/// What sluice reads of a subscription.
#[derive(Debug, Clone)]
pub struct SubscriptionInfo {
    pub topic: String,
    pub exactly_once: bool,
    pub ack_deadline_seconds: i32,
}

/// Admin clients for one connection.
pub struct Admin {
    topics: TopicAdmin,
    subscriptions: SubscriptionAdmin,
}

fn describe(e: &google_cloud_pubsub::Error) -> String {
    match e.status() {
        Some(s) => format!("{:?}: {}", s.code, s.message),
        None => e.to_string(),
    }
}

/// A failed call as a connector error: `what` failed, classed by [`classify`].
fn failed(e: &google_cloud_pubsub::Error, what: String) -> ConnectorError {
    classify(e).error(format!("{what}: {}", describe(e)))
}

impl Admin {
    /// Connects (on the Pub/Sub runtime). Its errors are those of building a client
    /// ([`Resolved::publisher`]): the configuration's.
    pub fn connect(conn: &Resolved) -> Result<Self, ConnectorError> {
        let creds = conn.credentials()?;
        runtime().block_on(async {
            let mut t = TopicAdmin::builder().with_credentials(creds.clone());
            let mut s = SubscriptionAdmin::builder().with_credentials(creds);
            if let Some(e) = &conn.endpoint {
                t = t.with_endpoint(e.clone());
                s = s.with_endpoint(e.clone());
            }
            let topics = t.build().await.map_err(|e| conn.build_error(e))?;
            let subscriptions = s.build().await.map_err(|e| conn.build_error(e))?;
            Ok(Admin { topics, subscriptions })
        })
    }

    /// Whether `topic` exists: `Ok(false)` when it does not, `Err` when the service cannot say
    /// (classed by [`classify`]: transient, or the configuration's fault, such as a refused
    /// permission).
    pub fn topic_exists(&self, topic: &str) -> Result<bool, ConnectorError> {
        match runtime().block_on(self.topics.get_topic().set_topic(topic).send()) {
            Ok(_) => Ok(true),
            Err(e) if e.status().is_some_and(|s| s.code == google_cloud_gax::error::rpc::Code::NotFound) => Ok(false),
            Err(e) => Err(failed(&e, format!("cannot look up topic {topic}"))),
        }
    }

    /// The subscription's settings; `Ok(None)` when it does not exist. Errors as for
    /// [`Self::topic_exists`].
    pub fn subscription(&self, name: &str) -> Result<Option<SubscriptionInfo>, ConnectorError> {
        match runtime().block_on(self.subscriptions.get_subscription().set_subscription(name).send()) {
            Ok(s) => Ok(Some(SubscriptionInfo { topic: s.topic, exactly_once: s.enable_exactly_once_delivery, ack_deadline_seconds: s.ack_deadline_seconds })),
            Err(e) if e.status().is_some_and(|s| s.code == google_cloud_gax::error::rpc::Code::NotFound) => Ok(None),
            Err(e) => Err(failed(&e, format!("cannot look up subscription {name}"))),
        }
    }

    /// Creates `topic` unless it exists.
    pub fn ensure_topic(&self, topic: &str) -> Result<(), ConnectorError> {
        match runtime().block_on(self.topics.create_topic().set_name(topic).send()) {
            Ok(_) => Ok(()),
            Err(e) if e.status().is_some_and(|s| s.code == google_cloud_gax::error::rpc::Code::AlreadyExists) => Ok(()),
            Err(e) => Err(failed(&e, format!("cannot create topic {topic}"))),
        }
    }

    /// Creates subscription `name` on `topic` unless it exists. `filter` is a Pub/Sub filter
    /// expression (empty: every message); a filter the service refuses is the input's fault.
    pub fn ensure_subscription(&self, name: &str, topic: &str, filter: &str, ack_deadline_seconds: i32, exactly_once: bool) -> Result<(), ConnectorError> {
        let create = self
            .subscriptions
            .create_subscription()
            .set_name(name)
            .set_topic(topic)
            .set_filter(filter)
            .set_ack_deadline_seconds(ack_deadline_seconds)
            .set_enable_exactly_once_delivery(exactly_once);
        match runtime().block_on(create.send()) {
            Ok(_) => Ok(()),
            Err(e) if e.status().is_some_and(|s| s.code == google_cloud_gax::error::rpc::Code::AlreadyExists) => Ok(()),
            Err(e) => Err(failed(&e, format!("cannot create subscription {name}"))),
        }
    }

    /// Deletes a subscription; a missing one is not an error.
    pub fn delete_subscription(&self, name: &str) -> Result<(), ConnectorError> {
        match runtime().block_on(self.subscriptions.delete_subscription().set_subscription(name).send()) {
            Ok(()) => Ok(()),
            Err(e) if e.status().is_some_and(|s| s.code == google_cloud_gax::error::rpc::Code::NotFound) => Ok(()),
            Err(e) => Err(failed(&e, format!("cannot delete subscription {name}"))),
        }
    }

    /// Deletes a topic; a missing one is not an error.
    pub fn delete_topic(&self, topic: &str) -> Result<(), ConnectorError> {
        match runtime().block_on(self.topics.delete_topic().set_topic(topic).send()) {
            Ok(()) => Ok(()),
            Err(e) if e.status().is_some_and(|s| s.code == google_cloud_gax::error::rpc::Code::NotFound) => Ok(()),
            Err(e) => Err(failed(&e, format!("cannot delete topic {topic}"))),
        }
    }
}
