//! The connector contract: how a topology's `[source]` and `[[sinks]]` tables become the
//! factories the engine runs. A connector is a config type that knows its `type` name, checks
//! its own fields (field, message, hint) and builds its factory; a [`Registry`] lists them.
//! The engine sees only [`SourceSpec`] and [`SinkSpec`] objects, so this crate names none.

use crate::sink::SinkFactory;
use crate::source::{SourceError, SourceFactory};
use crate::topology::RuntimeConfig;
use serde::de::DeserializeOwned;
use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A refused setting: which field, what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field, from the source table (`source.path`) or within a sink (`table`); empty for
    /// the table as a whole.
    pub field: String,
    pub message: String,
    pub hint: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>, hint: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into(), hint: hint.into() }
    }
}

impl<F: Into<String>, H: Into<String>> From<(F, String, H)> for ConfigError {
    fn from((field, message, hint): (F, String, H)) -> Self {
        ConfigError { field: field.into(), message, hint: hint.into() }
    }
}

/// A source connector: its settings, as deserialized from the `[source]` table (the `type` key
/// removed), and what the engine needs from them.
pub trait SourceConnector: DeserializeOwned + fmt::Debug + Clone + Send + Sync + 'static {
    /// The `type` that selects it in a topology.
    const TYPE: &'static str;
    /// One line for people, listed with the registry's types.
    const ABOUT: &'static str;
    /// Refuses settings that cannot work.
    fn check(&self) -> Result<(), ConfigError> {
        Ok(())
    }
    /// Whether the input ends by itself (a file, a folder read once, a counted generator); a
    /// stream (a topic, a subscription, a watched folder) does not.
    fn bounded(&self) -> bool;
    /// The factory that builds each worker's source; `pipeline` names defaults such as a
    /// consumer group, and `runtime` bounds what a source may hold unacknowledged. An input that
    /// cannot be found (no file matches) is a configuration error.
    fn factory(&self, pipeline: &str, runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError>;
}

/// A sink connector: its settings, as deserialized from a `[[sinks]]` table.
pub trait SinkConnector: DeserializeOwned + fmt::Debug + Clone + Send + Sync + 'static {
    const TYPE: &'static str;
    const ABOUT: &'static str;
    /// Refuses settings that cannot work; the field is within the sink.
    fn check(&self) -> Result<(), ConfigError> {
        Ok(())
    }
    fn factory(&self) -> Arc<dyn SinkFactory>;
}

/// A topology's source, whatever its connector.
pub trait SourceSpec: fmt::Debug + Send + Sync {
    fn kind(&self) -> &'static str;
    fn check(&self) -> Result<(), ConfigError>;
    fn bounded(&self) -> bool;
    fn factory(&self, pipeline: &str, runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError>;
    /// The connector's own settings, for code that knows its type (tests, tools).
    fn as_any(&self) -> &dyn Any;
}

impl<C: SourceConnector> SourceSpec for C {
    fn kind(&self) -> &'static str {
        C::TYPE
    }
    fn check(&self) -> Result<(), ConfigError> {
        SourceConnector::check(self)
    }
    fn bounded(&self) -> bool {
        SourceConnector::bounded(self)
    }
    fn factory(&self, pipeline: &str, runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError> {
        SourceConnector::factory(self, pipeline, runtime)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A topology's sink, whatever its connector.
pub trait SinkSpec: fmt::Debug + Send + Sync {
    fn kind(&self) -> &'static str;
    fn check(&self) -> Result<(), ConfigError>;
    fn factory(&self) -> Arc<dyn SinkFactory>;
    fn as_any(&self) -> &dyn Any;
}

impl<C: SinkConnector> SinkSpec for C {
    fn kind(&self) -> &'static str {
        C::TYPE
    }
    fn check(&self) -> Result<(), ConfigError> {
        SinkConnector::check(self)
    }
    fn factory(&self) -> Arc<dyn SinkFactory> {
        SinkConnector::factory(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

type Parse<T> = fn(toml::Table) -> Result<Arc<T>, toml::de::Error>;
type DefaultSink = fn(&str) -> Arc<dyn SinkSpec>;

/// The connectors a topology may name, by `type`, and the sink used when it names none.
pub struct Registry {
    sources: BTreeMap<&'static str, (Parse<dyn SourceSpec>, &'static str)>,
    sinks: BTreeMap<&'static str, (Parse<dyn SinkSpec>, &'static str)>,
    default_sink: Option<DefaultSink>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("sources", &self.sources.keys()).field("sinks", &self.sinks.keys()).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Registry { sources: BTreeMap::new(), sinks: BTreeMap::new(), default_sink: None }
    }

    /// Lists a source connector.
    pub fn source<C: SourceConnector>(mut self) -> Self {
        fn parse<C: SourceConnector>(table: toml::Table) -> Result<Arc<dyn SourceSpec>, toml::de::Error> {
            Ok(Arc::new(C::deserialize(toml::Value::Table(table))?))
        }
        self.sources.insert(C::TYPE, (parse::<C>, C::ABOUT));
        self
    }

    /// Lists a sink connector.
    pub fn sink<C: SinkConnector>(mut self) -> Self {
        fn parse<C: SinkConnector>(table: toml::Table) -> Result<Arc<dyn SinkSpec>, toml::de::Error> {
            Ok(Arc::new(C::deserialize(toml::Value::Table(table))?))
        }
        self.sinks.insert(C::TYPE, (parse::<C>, C::ABOUT));
        self
    }

    /// The sink of a topology that names none, given the pipeline's name.
    pub fn default_sink(mut self, make: DefaultSink) -> Self {
        self.default_sink = Some(make);
        self
    }

    /// Source types, with a line about each.
    pub fn source_types(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.sources.iter().map(|(k, (_, about))| (*k, *about))
    }

    /// Sink types, with a line about each.
    pub fn sink_types(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.sinks.iter().map(|(k, (_, about))| (*k, *about))
    }

    /// A source from its table. The error is the message and the field it names, if any.
    pub fn parse_source(&self, table: toml::Table) -> Result<Arc<dyn SourceSpec>, String> {
        let (kind, rest) = split_type(table, self.sources.keys())?;
        let (parse, _) = self.sources.get(kind.as_str()).ok_or_else(|| unknown(&kind, self.sources.keys()))?;
        parse(rest).map_err(|e| e.message().to_string())
    }

    /// A sink from its table.
    pub fn parse_sink(&self, table: toml::Table) -> Result<Arc<dyn SinkSpec>, String> {
        let (kind, rest) = split_type(table, self.sinks.keys())?;
        let (parse, _) = self.sinks.get(kind.as_str()).ok_or_else(|| unknown(&kind, self.sinks.keys()))?;
        parse(rest).map_err(|e| e.message().to_string())
    }

    /// The sinks of a topology that names none.
    pub fn default_sinks(&self, pipeline: &str) -> Vec<Arc<dyn SinkSpec>> {
        self.default_sink.map(|make| vec![make(pipeline)]).unwrap_or_default()
    }
}

fn split_type<'a>(mut table: toml::Table, known: impl Iterator<Item = &'a &'static str>) -> Result<(String, toml::Table), String> {
    match table.remove("type") {
        Some(toml::Value::String(kind)) => Ok((kind, table)),
        Some(other) => Err(format!("invalid type: {}, expected a string for key `type`", other.type_str())),
        None => Err(format!("missing field `type`, expected one of {}", list(known))),
    }
}

fn unknown<'a>(kind: &str, known: impl Iterator<Item = &'a &'static str>) -> String {
    format!("unknown variant `{kind}`, expected one of {}", list(known))
}

fn list<'a>(known: impl Iterator<Item = &'a &'static str>) -> String {
    known.map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
}
