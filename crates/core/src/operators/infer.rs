//! The inference operator: pre-processes each request on the worker, submits its units to the
//! process's inference service and returns at once. When the service wakes it with results, it
//! post-processes them into answers. It holds a capability for every epoch with requests still at
//! the model, so downstream progress (and source acknowledgement) waits for them.

use crate::inference::{InferenceError, InferenceHandle, Model, ReplyTo, Unit};
use crate::record::{Answer, DeadLetter, DeadReason, Deleted, Envelope};
use crate::tasks::Task;
use std::collections::{BTreeMap, VecDeque};
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
    outs: Outs<<T::Model as Model>::Out>,
    remaining: usize,
    error: Option<InferenceError>,
    /// The model version that ran the request's last unit.
    model: Option<Arc<str>>,
}

/// A request's model outputs as they arrive. Most requests are one unit, held without a `Vec`.
enum Outs<O> {
    One(Option<O>),
    Many(Vec<Option<O>>),
}

impl<O> Outs<O> {
    fn new(units: usize) -> Self {
        if units == 1 {
            Outs::One(None)
        } else {
            Outs::Many((0..units).map(|_| None).collect())
        }
    }

    fn set(&mut self, index: usize, out: O) {
        match self {
            Outs::One(slot) => *slot = Some(out),
            Outs::Many(slots) => slots[index] = Some(out),
        }
    }

    /// Calls `f` with every output in unit order, once all have arrived.
    fn finish<R>(self, f: impl FnOnce(&[O]) -> R) -> R {
        match self {
            Outs::One(slot) => f(std::slice::from_ref(&slot.expect("every unit completed"))),
            Outs::Many(slots) => f(&slots.into_iter().map(|o| o.expect("every unit completed")).collect::<Vec<_>>()),
        }
    }
}

/// Runs `task` on every request. Outputs: answers, dead letters for requests the task refused,
/// and the retractions of refused rows that replaced an answer. Each activation runs inside
/// `span` (the job's `<pipeline>.infer`).
#[allow(clippy::type_complexity)]
pub fn infer<'s, T: Task>(
    requests: Stream<'s, u64, Vec<Envelope<T::Request>>>,
    task: Arc<T>,
    service: InferenceHandle<T::Model>,
    retract_failures: bool,
    forget: crate::operators::key_by_id::Forget,
    span: tracing::Span,
) -> (Stream<'s, u64, Vec<Answer>>, Stream<'s, u64, Vec<DeadLetter>>, Stream<'s, u64, Vec<Deleted>>) {
    let scope = requests.scope();
    let mut builder = OperatorBuilder::new("Infer".to_owned(), scope);
    let mut input = builder.new_input(requests, Pipeline);
    let (ans_out, ans_stream) = builder.new_output::<Vec<Answer>>();
    let (dead_out, dead_stream) = builder.new_output::<Vec<DeadLetter>>();
    let (ret_out, ret_stream) = builder.new_output::<Vec<Deleted>>();
    let mut ret_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Deleted>>>::from(ret_out);
    let mut ans_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Answer>>>::from(ans_out);
    let mut dead_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<DeadLetter>>>::from(dead_out);
    let address = builder.operator_info().address.to_vec();
    let activator = scope.worker().sync_activator_for(address);
    let (reply, completions) = ReplyTo::new(Some(activator));

    builder.build(move |_initial| {
        // Tickets are handed out in order, so requests still at the model live in a deque indexed
        // by `ticket - first_ticket`; answered slots are trimmed from the front.
        let mut first_ticket: u64 = 0;
        let mut pending: VecDeque<Option<Pending<T>>> = VecDeque::new();
        // Per epoch: capabilities for the answers, the dead letters and the retractions, and the
        // number of requests still at the model.
        let mut held: BTreeMap<u64, (Capability<u64>, Capability<u64>, Capability<u64>, usize)> = BTreeMap::new();
        let model_label: Arc<str> = Arc::from(task.model_label());
        move |_frontiers| {
            let _entered = span.enter();
            let mut ans = ans_out.activate();
            let mut dead = dead_out.activate();
            let mut ret = ret_out.activate();
            input.for_each(|cap, data| {
                let Some(&time) = cap.least() else { return };
                let mut refused = Vec::new();
                let mut retracted = Vec::new();
                let mut units = Vec::with_capacity(data.len());
                let mut admitted = 0;
                for env in data.drain(..) {
                    let Some(payload) = env.payload.as_ref() else { continue };
                    let prepared = match crate::guard::contain(|| task.prepare(payload)) {
                        Ok(result) => result,
                        Err(panic) => Err((DeadReason::TaskFailed, format!("the task panicked preparing the request: {panic}"))),
                    };
                    match prepared {
                        Ok((prepared, request_units)) => {
                            let ticket = first_ticket + pending.len() as u64;
                            let request_units = request_units.into_iter();
                            let n = request_units.len();
                            units.extend(request_units.enumerate().map(|(index, unit)| Unit { ticket, index, unit }));
                            pending.push_back(Some(Pending { time, env, prepared, outs: Outs::new(n), remaining: n, error: None, model: None }));
                            admitted += 1;
                        }
                        Err((reason, detail)) => {
                            forget.failed(&env.id);
                            if retract_failures && env.replaces {
                                retracted.push(Deleted { id: env.id, pos: env.pos.clone(), ingest_ms: env.ingest_ms, seq: env.seq });
                            }
                            refused.push(DeadLetter::new(env.pos, reason, detail, env.raw, env.ingest_ms))
                        }
                    }
                }
                if admitted > 0 {
                    let entry = held.entry(time).or_insert_with(|| (cap.delayed(&time, 0), cap.delayed(&time, 1), cap.delayed(&time, 2), 0));
                    entry.3 += admitted;
                    service.submit(units, &reply);
                }
                if !refused.is_empty() {
                    dead.session(&cap.delayed(&time, 1)).give_iterator(refused.into_iter());
                }
                if !retracted.is_empty() {
                    ret.session(&cap.delayed(&time, 2)).give_iterator(retracted.into_iter());
                }
            });
            // Results the service has delivered since the last activation.
            let mut finished: Vec<u64> = Vec::new();
            while let Ok(delivery) = completions.try_recv() {
                for c in delivery.completions {
                    let Some(Some(p)) = c.ticket.checked_sub(first_ticket).and_then(|i| pending.get_mut(i as usize)) else {
                        continue;
                    };
                    match c.result {
                        Ok(out) => p.outs.set(c.index, out),
                        Err(e) => p.error = Some(e),
                    }
                    p.remaining -= 1;
                    if p.remaining == 0 {
                        p.model = Some(delivery.model.clone());
                        finished.push(c.ticket);
                    }
                }
            }
            // Answers and dead letters of this activation, by epoch: one session per epoch and
            // output, since a session per record costs a container and a push each.
            let mut answers: BTreeMap<u64, Vec<Answer>> = BTreeMap::new();
            let mut failed: BTreeMap<u64, Vec<DeadLetter>> = BTreeMap::new();
            let mut retracted: BTreeMap<u64, Vec<Deleted>> = BTreeMap::new();
            // Sized at once: grown push by push, a large activation's answers were copied and
            // their fresh pages faulted in several times over (3.5% of a drain's profile).
            let n_finished = finished.len();
            for ticket in finished {
                let p = pending[(ticket - first_ticket) as usize].take().expect("finished ticket is pending");
                let env = p.env;
                let finished = match (p.error, env.payload.as_ref()) {
                    (Some(error), _) => Err((DeadReason::InferenceFailed, error.to_string())),
                    (None, None) => Err((DeadReason::TaskFailed, "a request without a payload reached the model".to_string())),
                    (None, Some(payload)) => {
                        let (outs, prepared) = (p.outs, p.prepared);
                        crate::guard::contain(|| outs.finish(|outs| task.finish(payload, prepared, outs)))
                            .map_err(|panic| (DeadReason::TaskFailed, format!("the task panicked finishing the answer: {panic}")))
                    }
                };
                match finished {
                    Err((reason, detail)) => {
                        forget.failed(&env.id);
                        // A failed change retracts the ID's old answer (a table's row).
                        if retract_failures && env.replaces {
                            retracted.entry(p.time).or_default().push(Deleted { id: env.id, pos: env.pos.clone(), ingest_ms: env.ingest_ms, seq: env.seq });
                        }
                        failed.entry(p.time).or_default().push(DeadLetter::new(env.pos, reason, detail, env.raw, env.ingest_ms))
                    }
                    Ok(values) => answers.entry(p.time).or_insert_with(|| Vec::with_capacity(n_finished)).push(Answer {
                        id: env.id,
                        values,
                        passthrough: env.passthrough,
                        model: p.model.unwrap_or_else(|| model_label.clone()),
                        pos: env.pos,
                        ingest_ms: env.ingest_ms,
                        raw: env.raw,
                        seq: env.seq,
                        replaces: env.replaces,
                    }),
                }
            }
            for (time, list) in retracted {
                let entry = held.get(&time).expect("an epoch with pending requests holds capabilities");
                ret.session(&entry.2).give_iterator(list.into_iter());
            }
            for (time, list) in answers {
                let entry = held.get_mut(&time).expect("an epoch with pending requests holds capabilities");
                entry.3 -= list.len();
                ans.session(&entry.0).give_iterator(list.into_iter());
            }
            for (time, list) in failed {
                let entry = held.get_mut(&time).expect("an epoch with pending requests holds capabilities");
                entry.3 -= list.len();
                dead.session(&entry.1).give_iterator(list.into_iter());
            }
            held.retain(|_, entry| entry.3 > 0);
            while let Some(None) = pending.front() {
                pending.pop_front();
                first_ticket += 1;
            }
        }
    });
    (ans_stream, dead_stream, ret_stream)
}

#[cfg(test)]
mod tests {
    use super::Outs;

    #[test]
    fn outputs_reach_finish_in_unit_order_whatever_order_they_arrive_in() {
        let mut one = Outs::new(1);
        assert!(matches!(one, Outs::One(None)), "a one-unit request holds no Vec");
        one.set(0, 7);
        assert_eq!(one.finish(|outs| outs.to_vec()), vec![7]);

        let mut many = Outs::new(3);
        for (index, out) in [(2, 'c'), (0, 'a'), (1, 'b')] {
            many.set(index, out);
        }
        assert_eq!(many.finish(|outs| outs.iter().collect::<String>()), "abc");
    }

    #[test]
    #[should_panic(expected = "every unit completed")]
    fn finishing_before_every_output_arrived_is_a_bug() {
        let mut many = Outs::new(2);
        many.set(1, 1);
        many.finish(|outs| outs.len());
    }
}
