//! The bare Pub/Sub client's ceiling on this machine and emulator: publish N ride-sized messages,
//! then pull and acknowledge them all over a streaming pull, with the same official client and
//! flow-control settings sluice uses, and no model or sink. `benches/pubsub_load.sh` runs it
//! beside sluice's own Pub/Sub pipeline, so the two figures come from one run.
//!
//! `PUBSUB_EMULATOR_HOST=127.0.0.1:8085 cargo bench --bench pubsub_ceiling -- [count]`

use google_cloud_pubsub::model::Message;
use sluice::connectors::pubsub::admin::Admin;
use sluice::connectors::pubsub::{runtime, Connection};
use sluice::rides::RideGenerator;
use std::time::{Duration, Instant};

fn main() {
    let count: usize = std::env::args().skip(1).find(|a| !a.starts_with('-')).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let host = std::env::var("PUBSUB_EMULATOR_HOST").unwrap_or_else(|_| "127.0.0.1:8085".into());
    let conn = Connection::emulator(&host).resolve();
    let admin = Admin::connect(&conn).expect("a Pub/Sub emulator (scripts/pubsub.sh start)");
    let tag = format!("{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis());
    let topic = format!("projects/sluice-local/topics/bare-{tag}");
    let sub = format!("projects/sluice-local/subscriptions/bare-{tag}");
    admin.ensure_topic(&topic).unwrap();
    admin.ensure_subscription(&sub, &topic, "", 60, false).unwrap();
    // The sink's default batching: 1,000 messages, 4 MiB or 5 ms.
    let publisher = conn.publisher(&topic, 1000, 4 << 20, Duration::from_millis(5)).unwrap();
    let subscriber = conn.subscriber().unwrap();
    let _enter = runtime().enter();
    let mut rides = RideGenerator::new(42);
    let started = Instant::now();
    let futures: Vec<_> = (0..count)
        .map(|i| {
            let id = format!("bare-{i}");
            let body = serde_json::to_vec(&rides.next().unwrap().request_json(&id)).unwrap();
            publisher.publish(Message::new().set_data(body).set_attributes([("request_id", id)]))
        })
        .collect();
    runtime().block_on(async {
        for f in futures {
            f.await.unwrap();
        }
    });
    let published = started.elapsed().as_secs_f64();
    let received = runtime().block_on(async {
        let mut stream = subscriber.subscribe(sub.clone()).set_max_outstanding_messages(65536i64).build();
        let started = Instant::now();
        let mut n = 0usize;
        while n < count {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(Ok((_m, h)))) => {
                    h.ack();
                    n += 1;
                }
                Ok(Some(Err(e))) => eprintln!("pull: {e}"),
                _ => break,
            }
        }
        (n, started.elapsed().as_secs_f64())
    });
    let (n, pull_s) = received;
    println!("bare publish: {count} messages in {published:.2} s = {:.0}/s", count as f64 / published);
    println!("bare pull+ack: {n} messages in {pull_s:.2} s = {:.0}/s", n as f64 / pull_s);
    let _ = admin.delete_subscription(&sub);
    let _ = admin.delete_topic(&topic);
    if n < count {
        std::process::exit(1);
    }
}
