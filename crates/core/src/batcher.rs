//! Dynamic batch forming, as Triton does it: wait for the first unit, then take up to `max_batch`
//! units or whatever arrived within `max_delay`; when a backlog is waiting, look further ahead and
//! group units of similar cost (sequence length) so each batch pads as little as possible.

use crossbeam_channel::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// How batches are formed.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    /// Most units per model run.
    pub max_batch: usize,
    /// Longest wait for a batch to fill once its first unit has arrived.
    pub max_delay: Duration,
    /// How many batches' worth of already-waiting units to sort by cost before cutting batches.
    pub lookahead: usize,
}

/// Blocks for the first item, then fills a batch as `policy` says, counting `weight(item)` units
/// per item (a worker submits a whole chunk of requests as one item). `None` once the channel is
/// closed and empty: the service shuts down.
pub fn collect<U>(rx: &Receiver<U>, policy: &BatchPolicy, weight: impl Fn(&U) -> usize) -> Option<Vec<U>> {
    let first = rx.recv().ok()?;
    Some(collect_after::<U, ()>(first, rx, policy, weight, None))
}

/// Fills a batch that starts with `first`, as `policy` says; stops waiting for it to fill as
/// soon as `interrupt` holds something (an interactive request waits).
pub fn collect_after<U, I>(first: U, rx: &Receiver<U>, policy: &BatchPolicy, weight: impl Fn(&U) -> usize, interrupt: Option<&Receiver<I>>) -> Vec<U> {
    let mut units = weight(&first);
    let mut items = vec![first];
    let deadline = Instant::now() + policy.max_delay;
    while units < policy.max_batch {
        let mut select = crossbeam_channel::Select::new();
        let bulk = select.recv(rx);
        if let Some(i) = interrupt {
            select.recv(i);
        }
        match select.ready_deadline(deadline) {
            Ok(ready) if ready == bulk => match rx.try_recv() {
                Ok(u) => {
                    units += weight(&u);
                    items.push(u);
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => break,
            },
            // The interrupt lane holds something, or the deadline passed.
            Ok(_) | Err(_) => break,
        }
    }
    // A backlog is already waiting: take a few batches of it so they can be grouped by length.
    let limit = policy.max_batch * policy.lookahead.max(1);
    while units < limit {
        match rx.try_recv() {
            Ok(u) => {
                units += weight(&u);
                items.push(u);
            }
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
        }
    }
    items
}

/// Sorts units by cost (stable, so equal costs keep arrival order) and cuts them into batches of
/// at most `max_batch`, so each batch holds units of similar length.
pub fn group_by_cost<U>(mut units: Vec<U>, cost: impl Fn(&U) -> usize, max_batch: usize) -> Vec<Vec<U>> {
    units.sort_by_key(|u| cost(u));
    let mut batches = Vec::with_capacity(units.len().div_ceil(max_batch.max(1)));
    let mut current = Vec::with_capacity(max_batch);
    for unit in units {
        current.push(unit);
        if current.len() == max_batch.max(1) {
            batches.push(std::mem::replace(&mut current, Vec::with_capacity(max_batch)));
        }
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_to_max_batch_without_waiting_when_units_are_ready() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        drop(tx);
        let policy = BatchPolicy { max_batch: 3, max_delay: Duration::from_secs(60), lookahead: 1 };
        let started = Instant::now();
        assert_eq!(collect(&rx, &policy, |_| 1), Some(vec![0, 1, 2]));
        assert_eq!(collect(&rx, &policy, |_| 1), Some(vec![3, 4]));
        assert_eq!(collect(&rx, &policy, |_| 1), None);
        assert!(started.elapsed() < Duration::from_secs(30), "a full batch never waits for max_delay");
    }

    #[test]
    fn returns_a_partial_batch_after_max_delay() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(7).unwrap();
        let policy = BatchPolicy { max_batch: 8, max_delay: Duration::from_millis(20), lookahead: 1 };
        assert_eq!(collect(&rx, &policy, |_| 1), Some(vec![7]));
        drop(tx);
        assert_eq!(collect(&rx, &policy, |_| 1), None);
    }

    #[test]
    fn lookahead_takes_the_waiting_backlog() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..10 {
            tx.send(i).unwrap();
        }
        let policy = BatchPolicy { max_batch: 2, max_delay: Duration::from_millis(1), lookahead: 4 };
        assert_eq!(collect(&rx, &policy, |_| 1).unwrap().len(), 8);
    }

    #[test]
    fn weighs_items_by_their_units() {
        let (tx, rx) = crossbeam_channel::unbounded();
        for chunk in [vec![1, 2, 3], vec![4, 5, 6], vec![7]] {
            tx.send(chunk).unwrap();
        }
        drop(tx);
        let policy = BatchPolicy { max_batch: 5, max_delay: Duration::from_secs(60), lookahead: 1 };
        // Two chunks reach 6 units, past max_batch: the third waits for the next batch.
        assert_eq!(collect(&rx, &policy, |c: &Vec<i32>| c.len()).unwrap().len(), 2);
        assert_eq!(collect(&rx, &policy, |c: &Vec<i32>| c.len()), Some(vec![vec![7]]));
    }

    #[test]
    fn groups_similar_lengths_together() {
        let lens = vec![100, 12, 98, 15, 300, 11];
        let batches = group_by_cost(lens, |l| *l, 2);
        assert_eq!(batches, vec![vec![11, 12], vec![15, 98], vec![100, 300]]);
    }
}
