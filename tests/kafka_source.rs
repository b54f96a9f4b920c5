//! The Kafka source read directly, without a pipeline, against Tansu as scripts/kafka.sh starts
//! it: what its batched reads (`kafka::fetch`) hand the harness, message by message, for two
//! workers that each own one partition.

mod common;

use common::kafka::{brokers, create_topics, producer, unique};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use sluice_connectors::kafka::source::KafkaSourceConfig;
use sluice_core::connector::SourceConnector;
use sluice_core::record::DeadReason;
use sluice_core::source::{Body, Poll, RawRecord, Source};
use sluice_core::topology::RuntimeConfig;
use std::time::{Duration, Instant};

/// What one message is produced with.
struct Sent {
    partition: i32,
    key: String,
    header: Option<String>,
    payload: Option<Vec<u8>>,
}

/// Polls `source` until it has handed out `expected` records or 30 s pass.
fn read_all(source: &mut dyn Source, expected: usize) -> Vec<RawRecord> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut batch = Vec::new();
    while out.len() < expected && started.elapsed() < Duration::from_secs(30) {
        // The harness hands the source an empty batch with a budget of records.
        let polled = source.poll(1, 100, &mut batch).expect("the source polls without error");
        assert!(batch.len() <= 100, "{} records for a budget of 100", batch.len());
        out.append(&mut batch);
        match polled {
            Poll::Idle(d) => std::thread::sleep(d),
            Poll::More => {}
            Poll::Done => panic!("a Kafka source never ends"),
        }
    }
    // Nothing more than was sent arrives.
    std::thread::sleep(Duration::from_millis(300));
    let _ = source.poll(1, 100, &mut batch);
    out.append(&mut batch);
    out
}

#[test]
fn each_worker_reads_exactly_its_partitions_messages_in_order_with_ids_tombstones_and_oversize() {
    let topic = unique("ks_fetch");
    create_topics(&[&topic], 2);
    // Partition 0: 700 messages with the ID in a header (more than one batch of the source's
    // budget). Partition 1: 300 messages, one a tombstone, one over `max_message_bytes`, one
    // without the header.
    let mut sent = Vec::new();
    for i in 0..700 {
        sent.push(Sent { partition: 0, key: format!("k0-{i}"), header: Some(format!("h0-{i}")), payload: Some(format!("{{\"n\":{i}}}").into_bytes()) });
    }
    for i in 0..300 {
        let payload = match i {
            100 => None,
            200 => Some(vec![b'x'; 5000]),
            _ => Some(format!("{{\"m\":{i}}}").into_bytes()),
        };
        sent.push(Sent { partition: 1, key: format!("k1-{i}"), header: (i != 250).then(|| format!("h1-{i}")), payload });
    }
    let p = producer();
    for s in &sent {
        let mut rec = BaseRecord::to(&topic).partition(s.partition).key(s.key.as_bytes());
        if let Some(h) = &s.header {
            rec = rec.headers(OwnedHeaders::new().insert(Header { key: "request_id", value: Some(h.as_bytes()) }));
        }
        if let Some(v) = &s.payload {
            rec = rec.payload(v.as_slice());
        }
        p.send(rec).map_err(|(e, _)| e).expect("queued");
    }
    p.flush(Duration::from_secs(30)).expect("every message delivered");

    let config: KafkaSourceConfig = serde_json::from_value(serde_json::json!({
        "brokers": brokers(),
        "topic": topic,
        "id": {"from": "header", "name": "request_id"},
        "max_message_bytes": 4096,
    }))
    .unwrap();
    let runtime: RuntimeConfig = serde_json::from_str("{}").unwrap();
    let factory = config.factory("ks_fetch", &runtime).unwrap();
    for worker in 0..2 {
        let mut source = factory.build(worker, 2, &[]).expect("the source connects");
        let mine: Vec<&Sent> = sent.iter().filter(|s| s.partition == worker as i32).collect();
        let got = read_all(source.as_mut(), mine.len());
        assert_eq!(got.len(), mine.len(), "worker {worker}: {} records for {} messages on its partition", got.len(), mine.len());
        for (offset, (r, s)) in got.iter().zip(&mine).enumerate() {
            let at = format!("worker {worker}, offset {offset}");
            assert_eq!((r.pos.shard, r.pos.offset, &*r.pos.source), (s.partition, offset as u64, topic.as_str()), "{at}: position");
            assert_eq!(r.id.as_deref(), s.header.as_deref().map(str::as_bytes), "{at}: the ID is the header's");
            match (&s.payload, &r.body) {
                (None, Body::Delete) => assert!(r.bytes.is_empty(), "{at}: a tombstone has no bytes"),
                (Some(v), Body::Refused(DeadReason::OversizeMessage, why)) if v.len() > 4096 => {
                    assert_eq!(&r.bytes, v, "{at}: an oversize message keeps its bytes");
                    assert!(why.contains("5000 bytes"), "{at}: {why}");
                }
                (Some(v), Body::Json) if v.len() <= 4096 => assert_eq!(&r.bytes, v, "{at}: payload"),
                (v, b) => panic!("{at}: sent {:?} bytes, read as {b:?}", v.as_ref().map(Vec::len)),
            }
        }
        // The checkpoint is the next offset to read, for this worker's partition only.
        let checkpoints = source.checkpoint(1);
        let positions: Vec<(String, String)> = checkpoints.iter().map(|c| (c.shard.clone(), c.position.clone())).collect();
        assert_eq!(positions, vec![(worker.to_string(), mine.len().to_string())], "worker {worker}: checkpoints");
    }
}
