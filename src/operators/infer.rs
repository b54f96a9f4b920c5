//! The inference operator: pre-processes each request on the worker, submits its units to the
//! process's inference service and returns at once. When the service wakes it with results, it
//! post-processes them into answers. It holds a capability for every epoch with requests still at
//! the model, so downstream progress (and source acknowledgement) waits for them.

use crate::inference::{InferenceHandle, Model, ReplyTo};
use crate::record::{Answer, DeadLetter, DeadReason, Envelope};
use crate::tasks::Task;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

struct Pending<T: Task> {
    time: u64,
    env: Envelope<T::Request>,
    prepared: T::Prepared,
    outs: Vec<Option<<T::Model as Model>::Out>>,
    remaining: usize,
    error: Option<String>,
}

/// Runs `task` on every request. Outputs: answers, and dead letters for requests the task refused.
#[allow(clippy::type_complexity)]
pub fn infer<'s, T: Task>(
    requests: Stream<'s, u64, Vec<Envelope<T::Request>>>,
    task: Arc<T>,
    service: InferenceHandle<T::Model>,
) -> (Stream<'s, u64, Vec<Answer>>, Stream<'s, u64, Vec<DeadLetter>>) {
    let scope = requests.scope();
    let mut builder = OperatorBuilder::new("Infer".to_owned(), scope);
    let mut input = builder.new_input(requests, Pipeline);
    let (ans_out, ans_stream) = builder.new_output::<Vec<Answer>>();
    let (dead_out, dead_stream) = builder.new_output::<Vec<DeadLetter>>();
    let mut ans_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Answer>>>::from(ans_out);
    let mut dead_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<DeadLetter>>>::from(dead_out);
    let address = builder.operator_info().address.to_vec();
    let activator = scope.worker().sync_activator_for(address);
    let (reply, completions) = ReplyTo::new(Some(activator));

    builder.build(move |_initial| {
        let mut next_ticket: u64 = 0;
        let mut pending: HashMap<u64, Pending<T>> = HashMap::new();
        // Per epoch: capabilities for both outputs and the number of requests still at the model.
        let mut held: BTreeMap<u64, (Capability<u64>, Capability<u64>, usize)> = BTreeMap::new();
        move |_frontiers| {
            let mut ans = ans_out.activate();
            let mut dead = dead_out.activate();
            input.for_each(|cap, data| {
                let Some(&time) = cap.least() else { return };
                let mut refused = Vec::new();
                for env in data.drain(..) {
                    match task.prepare(&env.payload) {
                        Ok((prepared, units)) => {
                            let ticket = next_ticket;
                            next_ticket += 1;
                            let n = units.len();
                            let entry = held.entry(time).or_insert_with(|| (cap.delayed(&time, 0), cap.delayed(&time, 1), 0));
                            entry.2 += 1;
                            pending.insert(ticket, Pending { time, env, prepared, outs: (0..n).map(|_| None).collect(), remaining: n, error: None });
                            service.submit(ticket, units, &reply);
                        }
                        Err((reason, detail)) => refused.push(DeadLetter {
                            raw: serde_json::to_vec(&env.payload).unwrap_or_default(),
                            pos: env.pos,
                            reason,
                            detail,
                            ingest_ms: env.ingest_ms,
                        }),
                    }
                }
                if !refused.is_empty() {
                    dead.session(&cap.delayed(&time, 1)).give_iterator(refused.into_iter());
                }
            });
            // Results the service has delivered since the last activation.
            let mut finished: Vec<u64> = Vec::new();
            while let Ok(c) = completions.try_recv() {
                let Some(p) = pending.get_mut(&c.ticket) else {
                    continue;
                };
                match c.result {
                    Ok(out) => p.outs[c.index] = Some(out),
                    Err(e) => p.error = Some(e),
                }
                p.remaining -= 1;
                if p.remaining == 0 {
                    finished.push(c.ticket);
                }
            }
            for ticket in finished {
                let p = pending.remove(&ticket).expect("finished ticket is pending");
                let entry = held.get_mut(&p.time).expect("an epoch with pending requests holds capabilities");
                if let Some(error) = p.error {
                    dead.session(&entry.1).give(DeadLetter {
                        raw: serde_json::to_vec(&p.env.payload).unwrap_or_default(),
                        pos: p.env.pos,
                        reason: DeadReason::InferenceFailed,
                        detail: error,
                        ingest_ms: p.env.ingest_ms,
                    });
                } else {
                    let outs = p.outs.into_iter().map(|o| o.expect("every unit completed")).collect();
                    let values = task.finish(&p.env.payload, p.prepared, outs);
                    ans.session(&entry.0).give(Answer {
                        id: p.env.id,
                        values,
                        passthrough: p.env.passthrough,
                        model: task.model_label().to_string(),
                        pos: p.env.pos,
                        ingest_ms: p.env.ingest_ms,
                    });
                }
                entry.2 -= 1;
                if entry.2 == 0 {
                    held.remove(&p.time);
                }
            }
        }
    });
    (ans_stream, dead_stream)
}
