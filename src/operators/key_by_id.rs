//! Keys requests by their ID as a differential collection and keeps one request per ID: the one
//! latest in its source. Records are exchanged by ID, so every ID lives on exactly one worker and
//! the result does not depend on the number of workers.

use crate::record::Envelope;
use differential_dataflow::AsCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::Stream;

/// Keeps, for each request ID, the record with the greatest source position.
pub fn key_by_id<'s, P>(requests: Stream<'s, u64, Vec<Envelope<P>>>) -> Stream<'s, u64, Vec<Envelope<P>>>
where
    P: timely::ExchangeData + differential_dataflow::ExchangeData + std::hash::Hash,
{
    let updates = requests.unary(Pipeline, "KeyById", |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                let Some(&time) = cap.least() else { return };
                output.session(&cap).give_iterator(data.drain(..).map(|env| ((env.id.clone(), env), time, 1isize)));
            });
        }
    });
    let latest = updates.as_collection().reduce_named("LatestPerId", |_id, versions, output| {
        if let Some((env, _)) = versions.iter().filter(|(_, diff)| *diff > 0).max_by(|a, b| a.0.pos.cmp(&b.0.pos)) {
            output.push(((*env).clone(), 1isize));
        }
    });
    latest.inner.unary(Pipeline, "NewVersions", |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                for ((_id, env), time, diff) in data.drain(..) {
                    if diff > 0 {
                        output.session(&cap.delayed(&time, 0)).give(env);
                    }
                }
            });
        }
    })
}
