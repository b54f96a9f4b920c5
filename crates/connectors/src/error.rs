//! The connectors' one error type, [`ConnectorError`]: a message for people, and the two
//! things a caller decides on — whose fault it is ([`Domain`]) and whether trying again can
//! help ([`Retry`]) — with their HTTP status and their meaning for the core's source and sink
//! contracts.

use sluice_core::sink::SinkError;
use sluice_core::source::SourceError;

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Domain {
    /// The configuration or the input is wrong (a missing file, a bad name, a malformed
    /// setting or record): the user fixes it. HTTP 4xx.
    User,
    /// A system outside sluice (a broker, a database, a bucket, a file system) failed or
    /// refused. HTTP 502 or 503.
    External,
    /// sluice itself went wrong (a bug, or data of its own it cannot read). HTTP 500.
    Internal,
}

/// Whether the same operation can succeed later without anything being changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Retry {
    /// Try again after a backoff: the system may be reachable again by then.
    Transient,
    /// Trying again gives the same answer until something is changed.
    Permanent,
}

/// An error of a connector: what went wrong, whose fault it is, and whether to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConnectorError {
    pub domain: Domain,
    pub retry: Retry,
    /// For people; never holds credentials.
    pub message: String,
}

impl ConnectorError {
    /// An error of the given class.
    pub fn new(domain: Domain, retry: Retry, message: impl Into<String>) -> Self {
        ConnectorError { domain, retry, message: message.into() }
    }

    /// The configuration is wrong (a missing file, a bad name or setting): user, permanent.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(Domain::User, Retry::Permanent, message)
    }

    /// The input is wrong (a record or a file that cannot be read as what it claims to be):
    /// user, permanent.
    pub fn input(message: impl Into<String>) -> Self {
        Self::new(Domain::User, Retry::Permanent, message)
    }

    /// A system outside cannot be reached or failed for now (a broker down, a timeout, an I/O
    /// failure): external, transient.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self::new(Domain::External, Retry::Transient, message)
    }

    /// A system outside refused and will go on refusing (a fenced or failed producer): external,
    /// permanent.
    pub fn refused(message: impl Into<String>) -> Self {
        Self::new(Domain::External, Retry::Permanent, message)
    }

    /// sluice's own fault (a bug, or its own stored data unreadable): internal, permanent.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Domain::Internal, Retry::Permanent, message)
    }

    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        self.retry == Retry::Transient
    }

    /// The HTTP status that reports this error: 400 for the user's, 503 for an outside system
    /// unavailable for now, 502 for one that refused, 500 for sluice's own.
    pub fn http_status(&self) -> u16 {
        match (self.domain, self.retry) {
            (Domain::User, _) => 400,
            (Domain::External, Retry::Transient) => 503,
            (Domain::External, Retry::Permanent) => 502,
            (Domain::Internal, _) => 500,
        }
    }
}

/// A transient error is polled again after a backoff; any other stops the run.
impl From<ConnectorError> for SourceError {
    fn from(e: ConnectorError) -> Self {
        match e.retry {
            Retry::Transient => SourceError::Transient(e.message),
            Retry::Permanent => SourceError::Config(e.message),
        }
    }
}

/// A transient error is written again after a backoff; any other stops the run.
impl From<ConnectorError> for SinkError {
    fn from(e: ConnectorError) -> Self {
        match e.retry {
            Retry::Transient => SinkError::Transient(e.message),
            Retry::Permanent => SinkError::Config(e.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_class_has_its_status_and_its_contract_variant() {
        let cases = [
            (ConnectorError::config("c"), 400, false),
            (ConnectorError::input("i"), 400, false),
            (ConnectorError::unreachable("u"), 503, true),
            (ConnectorError::refused("r"), 502, false),
            (ConnectorError::internal("b"), 500, false),
        ];
        for (e, status, transient) in cases {
            assert_eq!(e.http_status(), status, "{e:?}");
            assert_eq!(e.is_transient(), transient, "{e:?}");
            let message = e.message.clone();
            match (SourceError::from(e.clone()), transient) {
                (SourceError::Transient(m), true) | (SourceError::Config(m), false) => assert_eq!(m, message),
                (other, _) => panic!("{e:?} became {other:?}"),
            }
            match (SinkError::from(e.clone()), transient) {
                (SinkError::Transient(m), true) | (SinkError::Config(m), false) => assert_eq!(m, message),
                (other, _) => panic!("{e:?} became {other:?}"),
            }
        }
    }

    #[test]
    fn the_message_is_the_display() {
        let e = ConnectorError::unreachable("metadata of rides: timed out");
        assert_eq!(e.to_string(), "metadata of rides: timed out");
        assert_eq!((e.domain, e.retry), (Domain::External, Retry::Transient));
    }
}
