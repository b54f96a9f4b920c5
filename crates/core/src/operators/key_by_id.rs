//! Keys requests by ID: records are exchanged by ID, so every ID lives on exactly one worker,
//! and each worker keeps, per ID, only a hash of the ID and of the record's content (never the
//! payload). A record whose content equals what its ID last had is dropped: the answer already
//! in every sink stands, and it costs no inference. A changed record goes on to the model and
//! replaces its answer; a delete (a tombstone) goes straight to the sinks. Every change gets a
//! sequence number, so the sinks apply an epoch's changes to an ID in the order they were made.
//!
//! Tables (files) are exchanged by ID, wait for each epoch to complete and keep, per ID, the
//! record latest in its source; their state covers every ID. A source that supplies only
//! changes (the live file source, which diffs against its own durable manifests) supplies each
//! ID on the worker that answers it, so it stays there, in the order supplied, with no state
//! here. Streams stay on the worker that
//! read them (their checkpoints must commit in the same transaction as their answers, on that
//! worker), key records as they arrive (no added latency) and remember only a window of recent
//! IDs (`runtime.dedupe_window`), so state stays bounded. A stream's repeated ID is recognized
//! when it comes through the same worker: for Kafka, when it is produced with the same key.

use crate::hash::ByHash;
use crate::record::{Deleted, Envelope};
use crate::source::Keying;
use std::collections::{BTreeMap, HashMap};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, ParallelizationContract, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

/// IDs whose last change failed after it was keyed (the model or a sink refused it; it is a
/// dead letter): the key stage forgets what it knew of them, so the same record sent again is
/// a change, not a duplicate. Shared by a worker's key, infer and sink stages (the sinks write on
/// their own threads).
#[derive(Clone, Default)]
pub struct Forget(std::sync::Arc<std::sync::Mutex<Vec<u64>>>);

impl Forget {
    /// `id`'s last change failed.
    pub fn failed(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(id_hash(id));
    }

    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The 64-bit hash an ID is known by in the state and routed by (XXH3: the same in every
/// process of a cluster, and a fraction of SipHash's cost on short IDs).
pub fn id_hash(id: &str) -> u64 {
    twox_hash::XxHash3_64::oneshot(id.as_bytes())
}

/// Per-ID content hashes. Unbounded for tables; for streams two generations of at most
/// `window / 2` IDs each, the older dropped whole when the newer fills, so lookups and memory
/// stay constant (about 40 bytes an ID).
pub struct Seen {
    current: ByHash<u64>,
    previous: ByHash<u64>,
    window: Option<usize>,
}

impl Seen {
    pub fn new(window: Option<usize>) -> Self {
        Seen { current: ByHash::default(), previous: ByHash::default(), window }
    }

    /// Records `content` for `id`; true when it differs from what the ID had (or the ID is new).
    pub fn changed(&mut self, id: u64, content: u64) -> bool {
        let before = self.current.get(&id).or_else(|| self.previous.get(&id)).copied();
        if before == Some(content) {
            return false;
        }
        self.insert(id, content);
        true
    }

    fn insert(&mut self, id: u64, content: u64) {
        if let Some(window) = self.window {
            if self.current.len() >= (window / 2).max(1) && !self.current.contains_key(&id) {
                self.previous = std::mem::take(&mut self.current);
            }
        }
        self.current.insert(id, content);
    }

    pub fn forget(&mut self, id: u64) {
        self.current.remove(&id);
        self.previous.remove(&id);
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

enum Decision<P> {
    Run(Envelope<P>),
    Delete(Deleted),
    Unchanged,
}

/// What becomes of one record, decided in place: a record to run keeps its place in the batch
/// (with its sequence number set), a delete or an unchanged record leaves it.
enum Verdict {
    Run,
    Delete,
    Unchanged,
}

/// Judges `env` against the state of its ID and gives a change its sequence number.
/// `stateless`: the source supplies only changes, so every record is one.
fn judge<P>(env: &mut Envelope<P>, seen: &mut Seen, seq: &mut u64, stateless: bool) -> Verdict {
    let key = id_hash(&env.id);
    if env.payload.is_none() {
        if !stateless {
            seen.forget(key);
        }
        *seq += 1;
        env.seq = *seq;
        return Verdict::Delete;
    }
    if !stateless && !seen.changed(key, env.content) {
        return Verdict::Unchanged;
    }
    *seq += 1;
    env.seq = *seq;
    Verdict::Run
}

/// What becomes of one record, given the state of its ID.
fn decide<P>(mut env: Envelope<P>, seen: &mut Seen, seq: &mut u64, stateless: bool) -> Decision<P> {
    match judge(&mut env, seen, seq, stateless) {
        Verdict::Run => Decision::Run(env),
        Verdict::Delete => Decision::Delete(Deleted { id: env.id, pos: env.pos, ingest_ms: env.ingest_ms, seq: env.seq }),
        Verdict::Unchanged => Decision::Unchanged,
    }
}

/// Keys `requests` by ID. Outputs: requests to run (with a payload), and deletes. Each
/// activation runs inside `span` (the job's `<pipeline>.key_by_id`).
#[allow(clippy::type_complexity)]
pub fn key_by_id<'s, P>(
    requests: Stream<'s, u64, Vec<Envelope<P>>>,
    keying: Keying,
    window: usize,
    forget: Forget,
    span: tracing::Span,
) -> (Stream<'s, u64, Vec<Envelope<P>>>, Stream<'s, u64, Vec<Deleted>>)
where
    P: timely::ExchangeData,
{
    // Tables go to the worker that owns their ID; streams, and sources that supply each ID's
    // changes from the worker that answers it (the live file source), stay where they were read
    // (their checkpoints commit with their answers), with no exchange at all.
    match keying {
        Keying::Table => keyed(requests, Exchange::new(|env: &Envelope<P>| id_hash(&env.id)), keying, window, forget, span),
        Keying::Stream | Keying::Changes => keyed(requests, Pipeline, keying, window, forget, span),
    }
}

#[allow(clippy::type_complexity)]
fn keyed<'s, P, C>(
    requests: Stream<'s, u64, Vec<Envelope<P>>>,
    pact: C,
    keying: Keying,
    window: usize,
    forget: Forget,
    span: tracing::Span,
) -> (Stream<'s, u64, Vec<Envelope<P>>>, Stream<'s, u64, Vec<Deleted>>)
where
    P: timely::ExchangeData,
    C: ParallelizationContract<u64, Vec<Envelope<P>>>,
{
    let scope = requests.scope();
    let mut builder = OperatorBuilder::new("KeyById".to_owned(), scope);
    let mut input = builder.new_input(requests, pact);
    let (req_out, req_stream) = builder.new_output::<Vec<Envelope<P>>>();
    let (del_out, del_stream) = builder.new_output::<Vec<Deleted>>();
    let mut req_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Envelope<P>>>>::from(req_out);
    let mut del_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Deleted>>>::from(del_out);
    builder.build(move |_| {
        let mut seen = Seen::new(match keying {
            Keying::Table | Keying::Changes => None,
            Keying::Stream => Some(window),
        });
        let stateless = keying == Keying::Changes;
        let mut seq: u64 = 0;
        // Tables: per open epoch, the latest record of each ID, and capabilities for both outputs.
        let mut waiting: BTreeMap<u64, (Capability<u64>, Capability<u64>, HashMap<String, Envelope<P>>)> = BTreeMap::new();
        let unchanged = metrics::counter!(crate::metrics::UNCHANGED);
        move |frontiers| {
            let _entered = span.enter();
            let mut reqs = req_out.activate();
            let mut dels = del_out.activate();
            for key in forget.take() {
                seen.forget(key);
            }
            input.for_each(|cap, data| {
                let Some(&time) = cap.least() else { return };
                match keying {
                    // In the order supplied: a change source's delete and re-add of an ID (a
                    // file renamed) apply in that order.
                    Keying::Stream | Keying::Changes => {
                        // Decided in place: the batch goes on as it is, without the records
                        // that leave it, instead of each record being moved into a new one.
                        let mut deletes = Vec::new();
                        data.retain_mut(|env| match judge(env, &mut seen, &mut seq, stateless) {
                            Verdict::Run => true,
                            Verdict::Delete => {
                                deletes.push(Deleted { id: std::mem::take(&mut env.id), pos: env.pos.clone(), ingest_ms: env.ingest_ms, seq: env.seq });
                                false
                            }
                            Verdict::Unchanged => {
                                unchanged.increment(1);
                                false
                            }
                        });
                        if !data.is_empty() {
                            reqs.session(&cap.delayed(&time, 0)).give_container(data);
                        }
                        if !deletes.is_empty() {
                            dels.session(&cap.delayed(&time, 1)).give_iterator(deletes.into_iter());
                        }
                    }
                    Keying::Table => {
                        let entry = waiting.entry(time).or_insert_with(|| (cap.delayed(&time, 0), cap.delayed(&time, 1), HashMap::new()));
                        for env in data.drain(..) {
                            match entry.2.get(&env.id) {
                                Some(held) if held.pos > env.pos => {}
                                _ => {
                                    entry.2.insert(env.id.clone(), env);
                                }
                            }
                        }
                    }
                }
            });
            // Tables: an epoch is complete once the input frontier has passed it.
            while let Some((&t, _)) = waiting.first_key_value() {
                if frontiers.iter().any(|f| f.frontier().less_equal(&t)) {
                    break;
                }
                let (rcap, dcap, latest) = waiting.remove(&t).expect("first key exists");
                let mut latest: Vec<Envelope<P>> = latest.into_values().collect();
                latest.sort_by(|a, b| a.pos.cmp(&b.pos));
                let (mut rs, mut ds) = (reqs.session(&rcap), dels.session(&dcap));
                for env in latest {
                    match decide(env, &mut seen, &mut seq, stateless) {
                        Decision::Run(env) => rs.give(env),
                        Decision::Delete(d) => ds.give(d),
                        Decision::Unchanged => unchanged.increment(1),
                    }
                }
            }
        }
    });
    (req_stream, del_stream)
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn an_unchanged_record_is_not_a_change_and_a_changed_one_is() {
        let mut s = Seen::new(None);
        assert!(s.changed(1, 10), "a new ID");
        assert!(!s.changed(1, 10), "the same content again");
        assert!(s.changed(1, 11), "new content");
        s.forget(1);
        assert!(s.changed(1, 11), "after a delete the ID is new again");
    }

    #[test]
    fn a_stream_window_keeps_recent_ids_and_bounds_the_rest() {
        let mut s = Seen::new(Some(4));
        for id in 0..100u64 {
            assert!(s.changed(id, id));
        }
        assert!(s.len() <= 4, "at most the window: {}", s.len());
        assert!(!s.changed(99, 99), "the most recent ID is remembered");
        assert!(s.changed(0, 0), "an old ID fell out of the window and counts as new");
    }
}
