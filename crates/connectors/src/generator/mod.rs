//! The generator source: built-in rides as JSON requests, for the embedded default of the ride
//! pipeline (no broker needed), on the engine's source harness. Worker `i` of `n` makes rides
//! `i, i + n, i + 2n, ...`, so the same seed gives the same rides and IDs on any number of workers.

use crate::rides::RideGenerator;
use serde::Deserialize;
use sluice_core::connector::{ConfigError, SourceConnector};
use sluice_core::record::{now_ms, SourcePos};
use sluice_core::source::{Body, Checkpoint, IdFrom, Keying, Poll, RawRecord, Source, SourceError, SourceFactory};
use sluice_core::topology::RuntimeConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `[source] type = "generator"`: the built-in ride generator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Rides to generate; omit for an endless stream.
    #[serde(default)]
    pub count: Option<u64>,
    /// Rides per second across the process; omit for as fast as possible.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Seed of the deterministic generator.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_seed() -> u64 {
    1
}

impl GeneratorConfig {
    /// Refuses settings that cannot work: `(field, message, hint)`.
    fn check_fields(&self) -> Result<(), (&'static str, String, &'static str)> {
        if self.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
            return Err(("source.rate", "must be above 0".into(), "omit it for full speed, or give rides per second, e.g. 5000"));
        }
        Ok(())
    }
}

impl SourceFactory for GeneratorConfig {
    fn kind(&self) -> &'static str {
        "generator"
    }
    fn build(&self, worker: usize, peers: usize, _resume: &[Checkpoint]) -> Result<Box<dyn Source>, SourceError> {
        Ok(Box::new(GeneratorSource {
            config: self.clone(),
            index: worker as u64,
            peers: peers as u64,
            rides: RideGenerator::new(self.seed),
            seq: 0,
            made: 0,
            started: Instant::now(),
            name: "generator".into(),
        }))
    }
    fn resumable(&self) -> bool {
        false
    }
    fn keying(&self) -> Keying {
        Keying::Stream
    }
    fn id_from(&self) -> IdFrom {
        IdFrom::Field { name: "request_id".into() }
    }
    fn describe(&self) -> String {
        format!("{} generated rides (seed {})", self.count.map(|c| c.to_string()).unwrap_or_else(|| "endless".into()), self.seed)
    }
}

struct GeneratorSource {
    config: GeneratorConfig,
    index: u64,
    peers: u64,
    rides: RideGenerator,
    /// The next global sequence number the shared generator is at.
    seq: u64,
    /// Rides this worker has made.
    made: u64,
    started: Instant,
    name: Arc<str>,
}

impl Source for GeneratorSource {
    fn poll(&mut self, _epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError> {
        let mut budget = budget as u64;
        if let Some(rate) = self.config.rate {
            let allowed = (self.started.elapsed().as_secs_f64() * rate / self.peers as f64) as u64;
            budget = budget.min(allowed.saturating_sub(self.made));
            if budget == 0 {
                return Ok(Poll::Idle(Duration::from_millis(1)));
            }
        }
        let now = now_ms();
        for _ in 0..budget {
            let global = self.index + self.made * self.peers;
            if self.config.count.is_some_and(|c| global >= c) {
                return Ok(Poll::Done);
            }
            // Advance the shared sequence to this worker's next ride.
            let mut ride = None;
            while self.seq <= global {
                ride = self.rides.next();
                self.seq += 1;
            }
            let ride = ride.expect("the generator is endless");
            let id = format!("ride-{}-{global}", self.config.seed);
            let bytes = ride.request_json(&id).to_string().into_bytes();
            out.push(RawRecord { bytes, body: Body::Json, pos: SourcePos::seq(self.name.clone(), global), id: None, ingest_ms: now });
            self.made += 1;
        }
        if self.config.count.is_some_and(|c| self.index + self.made * self.peers >= c) {
            return Ok(Poll::Done);
        }
        Ok(Poll::More)
    }

    fn total_hint(&self) -> Option<u64> {
        self.config.count.map(|c| c.saturating_sub(self.index).div_ceil(self.peers))
    }
}

impl SourceConnector for GeneratorConfig {
    const TYPE: &'static str = "generator";
    const ABOUT: &'static str = "the built-in ride generator (no server needed)";
    fn check(&self) -> Result<(), ConfigError> {
        self.check_fields().map_err(ConfigError::from)
    }
    fn bounded(&self) -> bool {
        self.count.is_some()
    }
    fn factory(&self, _pipeline: &str, _runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError> {
        Ok(Arc::new(self.clone()))
    }
}
