//! The generator source: built-in rides as requests, for the embedded default of the ride
//! pipeline (no broker needed). Worker `i` of `n` makes rides `i, i + n, i + 2n, ...`, so the
//! same seed gives the same rides and IDs on any number of workers.

use crate::connectors::kafka::source::{SourceOffset, SourceStreams};
use crate::progress::Progress;
use crate::record::{now_ms, DeadLetter, Envelope, SourcePos};
use crate::rides::RideGenerator;
use crate::tasks::Task;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::{ProbeHandle, Scope};

/// Settings of the generator source.
#[derive(Clone, Debug)]
pub struct GeneratorSettings {
    pub count: Option<u64>,
    pub rate: Option<f64>,
    pub seed: u64,
    pub epoch_records: usize,
    pub max_epochs_in_flight: u64,
}

/// Builds this worker's generator source.
pub fn generator_source<'s, T: Task>(
    scope: Scope<'s, u64>,
    settings: GeneratorSettings,
    task: Arc<T>,
    durable: ProbeHandle<u64>,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> SourceStreams<'s, T::Request> {
    let (index, peers) = (scope.index() as u64, scope.peers() as u64);
    let mut builder = OperatorBuilder::new("RideGenerator".to_owned(), scope);
    let (ok_out, ok_stream) = builder.new_output::<Vec<Envelope<T::Request>>>();
    let (dead_out, dead_stream) = builder.new_output::<Vec<DeadLetter>>();
    let (_off_out, off_stream) = builder.new_output::<Vec<SourceOffset>>();
    let mut ok_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Envelope<T::Request>>>>::from(ok_out);
    let mut dead_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<DeadLetter>>>::from(dead_out);
    let activator = scope.activator_for(builder.operator_info().address);
    if let Some(c) = settings.count {
        progress.total.fetch_add(c.saturating_sub(index).div_ceil(peers), Ordering::Relaxed);
    }

    builder.build(move |caps| {
        let mut caps = Some(caps);
        let mut rides = RideGenerator::new(settings.seed);
        let mut seq: u64 = 0; // the next global sequence number this worker may emit
        let mut made: u64 = 0;
        let mut epoch = 0u64;
        let started = Instant::now();
        let per_worker_rate = settings.rate.map(|r| r / peers as f64);
        move |_frontiers| {
            let Some(cs) = caps.as_mut() else { return };
            let finished = settings.count.is_some_and(|c| index + made * peers >= c);
            if stop.load(Ordering::Relaxed) || finished {
                caps = None;
                return;
            }
            let oldest = durable.with_frontier(|f| f.first().copied()).unwrap_or(epoch);
            if epoch.saturating_sub(oldest) >= settings.max_epochs_in_flight {
                activator.activate_after(Duration::from_millis(1));
                return;
            }
            let mut budget = settings.epoch_records as u64;
            if let Some(rate) = per_worker_rate {
                let allowed = (started.elapsed().as_secs_f64() * rate) as u64;
                budget = budget.min(allowed.saturating_sub(made));
                if budget == 0 {
                    activator.activate_after(Duration::from_millis(1));
                    return;
                }
            }
            let mut ok = ok_out.activate();
            let mut dead = dead_out.activate();
            let mut ok_session = ok.session(&cs[0]);
            let mut dead_session = dead.session(&cs[1]);
            let now = now_ms();
            let mut emitted = 0u64;
            while emitted < budget {
                let global = index + made * peers;
                if settings.count.is_some_and(|c| global >= c) {
                    break;
                }
                // Advance the shared sequence to this worker's next ride.
                let mut ride = None;
                while seq <= global {
                    ride = rides.next();
                    seq += 1;
                }
                let ride = ride.expect("the generator is endless");
                let id = format!("ride-{}-{global}", settings.seed);
                let json = ride.request_json(&id).to_string();
                let obj = crate::json::JsonFields::parse(&json).expect("a ride is a JSON object");
                match task.decode_json(&obj) {
                    Ok(payload) => {
                        ok_session.give(Envelope { id, payload, passthrough: Vec::new(), pos: SourcePos::Generated { seq: global }, ingest_ms: now })
                    }
                    Err((reason, detail)) => dead_session.give(DeadLetter {
                        pos: SourcePos::Generated { seq: global },
                        reason,
                        detail,
                        raw: json.clone().into_bytes(),
                        ingest_ms: now,
                    }),
                }
                made += 1;
                emitted += 1;
            }
            drop(ok_session);
            drop(dead_session);
            progress.read.fetch_add(emitted, Ordering::Relaxed);
            metrics::counter!(crate::metrics::SOURCE_RECORDS, "connector" => "generator").increment(emitted);
            epoch += 1;
            for c in cs.iter_mut() {
                c.downgrade(&epoch);
            }
            activator.activate();
        }
    });
    (ok_stream, dead_stream, off_stream)
}
