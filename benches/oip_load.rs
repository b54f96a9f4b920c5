//! The load generator for online inference (benches/online_load.sh): the same requests, client
//! and clock for sluice and its peers. It sends Open Inference Protocol JSON requests (one ride
//! per request, 1,024 distinct rides in turn) over HTTP/1.1 keep-alive connections, either
//! closed-loop (each connection sends its next request when the last is answered: the server's
//! saturation throughput) or open-loop at a fixed rate (each request has a scheduled send time
//! and its latency counts from then, so a server that falls behind is charged for the queue it
//! builds). Prints one JSON line: requests, answers, errors by status, rate and latency quantiles.
//!
//! usage: oip_load --url HOST:PORT [--path /v2/models/rides/infer] [--connections 64]
//!                 [--seconds 10] [--warmup 2] [--rate REQ_PER_S] [--label NAME]
//!                 [--bodies FILE]   (one request body per line, sent in turn, in place of rides)

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    url: String,
    path: String,
    connections: usize,
    seconds: f64,
    warmup: f64,
    rate: Option<f64>,
    label: String,
    bodies: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        url: String::new(),
        path: "/v2/models/rides/infer".into(),
        connections: 64,
        seconds: 10.0,
        warmup: 2.0,
        rate: None,
        label: String::new(),
        bodies: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--url" => a.url = v(),
            "--path" => a.path = v(),
            "--connections" => a.connections = v().parse().expect("--connections N"),
            "--seconds" => a.seconds = v().parse().expect("--seconds S"),
            "--warmup" => a.warmup = v().parse().expect("--warmup S"),
            "--rate" => a.rate = Some(v().parse().expect("--rate R")),
            "--label" => a.label = v(),
            "--bodies" => a.bodies = Some(v()),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!a.url.is_empty(), "--url HOST:PORT is required");
    a
}

/// One ride as an OIP request, as the test suite's rides are made.
fn body(i: usize) -> Vec<u8> {
    format!(
        r#"{{"id":"r{i}","inputs":[{{"name":"PULocationID","shape":[1],"datatype":"INT64","data":[{}]}},{{"name":"DOLocationID","shape":[1],"datatype":"INT64","data":[{}]}},{{"name":"trip_distance","shape":[1],"datatype":"FP64","data":[{}]}}]}}"#,
        1 + i % 263,
        1 + (i * 7) % 263,
        0.5 + (i % 97) as f64 * 0.25
    )
    .into_bytes()
}

/// A keep-alive connection that sends a request and reads its whole reply; its status.
struct Conn {
    url: String,
    reader: Option<BufReader<TcpStream>>,
}

impl Conn {
    fn request(&mut self, path: &str, body: &[u8]) -> Result<u16, String> {
        if self.reader.is_none() {
            let s = TcpStream::connect(&self.url).map_err(|e| e.to_string())?;
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(Duration::from_secs(60))).ok();
            self.reader = Some(BufReader::new(s));
        }
        let r = self.reader.as_mut().expect("connected");
        let head = format!("POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", self.url, body.len());
        let mut msg = head.into_bytes();
        msg.extend_from_slice(body);
        let result = (|| -> std::io::Result<(u16, bool)> {
            r.get_mut().write_all(&msg)?;
            let mut line = String::new();
            r.read_line(&mut line)?;
            let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
            let (mut length, mut chunked, mut close) = (0usize, false, false);
            loop {
                line.clear();
                r.read_line(&mut line)?;
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap_or((l, ""));
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
                    "connection" => close = v.to_ascii_lowercase().contains("close"),
                    _ => {}
                }
            }
            if chunked {
                loop {
                    line.clear();
                    r.read_line(&mut line)?;
                    let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
                    let mut skip = vec![0u8; size + 2];
                    r.read_exact(&mut skip)?;
                    if size == 0 {
                        break;
                    }
                }
            } else {
                let mut skip = vec![0u8; length];
                r.read_exact(&mut skip)?;
            }
            Ok((status, close))
        })();
        match result {
            Ok((s, close)) => {
                if close {
                    self.reader = None;
                }
                Ok(s)
            }
            Err(e) => {
                self.reader = None;
                Err(e.to_string())
            }
        }
    }
}

fn main() {
    let a = args();
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(match &a.bodies {
        Some(f) => std::fs::read_to_string(f).expect("--bodies FILE").lines().filter(|l| !l.is_empty()).map(|l| l.as_bytes().to_vec()).collect(),
        None => (0..1024).map(body).collect(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let measuring_from = Instant::now() + Duration::from_secs_f64(a.warmup);
    let until = measuring_from + Duration::from_secs_f64(a.seconds);
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let started = Instant::now();
    let threads: Vec<_> = (0..a.connections)
        .map(|_| {
            let (bodies, stop, next, latencies, statuses) = (bodies.clone(), stop.clone(), next.clone(), latencies.clone(), statuses.clone());
            let (url, path, rate) = (a.url.clone(), a.path.clone(), a.rate);
            std::thread::spawn(move || {
                let mut conn = Conn { url, reader: None };
                let mut mine: Vec<u32> = Vec::new();
                let mut codes: BTreeMap<String, u64> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    // Open loop: request i is due at i / rate; its latency counts from then.
                    let due = match rate {
                        Some(r) => {
                            let due = started + Duration::from_secs_f64(i as f64 / r);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                            due
                        }
                        None => Instant::now(),
                    };
                    if due >= until {
                        break;
                    }
                    let status = conn.request(&path, &bodies[i as usize % bodies.len()]);
                    let done = Instant::now();
                    if due >= measuring_from && done <= until {
                        mine.push((done - due).as_micros().min(u32::MAX as u128) as u32);
                        *codes.entry(status.map(|s| s.to_string()).unwrap_or_else(|e| format!("error: {e}"))).or_default() += 1;
                    }
                    if done >= until {
                        break;
                    }
                }
                latencies.lock().unwrap().extend(mine);
                let mut all = statuses.lock().unwrap();
                for (k, v) in codes {
                    *all.entry(k).or_default() += v;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort_unstable();
    let q = |p: f64| if lat.is_empty() { 0.0 } else { lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0 };
    let statuses = statuses.lock().unwrap().clone();
    let ok = statuses.get("200").copied().unwrap_or(0);
    let line = serde_json::json!({
        "label": a.label,
        "connections": a.connections,
        "rate": a.rate,
        "seconds": a.seconds,
        "requests": lat.len(),
        "ok": ok,
        "statuses": statuses,
        "ok_per_s": ok as f64 / a.seconds,
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "max_ms": q(1.0),
    });
    println!("{line}");
}
