//! `sluice loadgen`: publishes generated rides at a target rate (or as fast as it can), matches
//! every answer on the results topic to its request by ID, and reports throughput, end-to-end
//! latency percentiles, and lost and duplicate answers. The measuring is shared; each broker
//! (Kafka, Pub/Sub) supplies a [`Publish`] side and an [`Answers`] side, through its
//! [`crate::client::RequestBroker`].

use crate::error::ConnectorError;
use crate::rides::RideGenerator;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The publishing side of a load test.
pub trait Publish {
    /// Hands one request to the client (it may batch); `id` is also its request ID.
    fn send(&mut self, id: &str, body: &[u8]) -> Result<(), ConnectorError>;
    /// Waits until everything sent is accepted by the broker.
    fn flush(&mut self) -> Result<(), ConnectorError>;
}

/// The listening side of a load test: the results as they arrive, from the moment it exists.
pub trait Answers: Send + 'static {
    /// Waits up to `wait` for results; calls `on_id` with each one's request ID (`None` when it
    /// carries none).
    fn poll(&mut self, wait: Duration, on_id: &mut dyn FnMut(Option<&[u8]>));
}

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Every request ID is `<run_id>-<n>` ([`new_run_id`]).
    pub run_id: String,
    pub count: u64,
    /// Rides per second; 0 sends as fast as possible.
    pub rate: f64,
    pub seed: u64,
    /// How long to wait for stragglers after the last send (or, preloaded, after the last answer).
    pub drain: Duration,
    /// Publish every ride first, print `preloaded`, and only then expect answers: measures how fast
    /// a worker started afterwards drains a backlog, from its first answer to its last.
    pub preload: bool,
}

/// What came back.
#[derive(Clone, Debug)]
pub struct LoadReport {
    pub sent: u64,
    pub answered: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Answers whose ID matched no request of this run.
    pub foreign: u64,
    pub send_seconds: f64,
    /// First send to last answer; preloaded, first answer to last answer.
    pub seconds: f64,
    /// Preloaded: from the end of publishing (when the worker may start) to the last answer, so
    /// including the worker's start-up.
    pub seconds_with_startup: f64,
    /// Answers per second between the 10th and the 90th percentile of arrival times: the rate
    /// once started and before the tail, without start-up or drain effects.
    pub steady_rate: f64,
    pub preloaded: bool,
    pub throughput: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// CPU seconds (user and system) this process used from the end of publishing to the end of
    /// the run: what listening for the answers cost, on the cores the pipeline also runs on.
    pub listen_cpu_seconds: Option<f64>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.preloaded {
            return write!(
                f,
                "preloaded {} in {:.2} s; answered {}: steady {:.0} answers/s (10th to 90th percentile of arrivals), {:.0}/s from first to last answer ({:.2} s), {:.0}/s counting the worker's start-up ({:.2} s from the end of publishing); lost {}, duplicates {}, foreign {}\nlatency: not measured (the backlog was published before the worker started)",
                self.sent,
                self.send_seconds,
                self.answered,
                self.steady_rate,
                self.throughput,
                self.seconds,
                self.answered as f64 / self.seconds_with_startup.max(1e-9),
                self.seconds_with_startup,
                self.lost,
                self.duplicates,
                self.foreign
            )
            .and_then(|()| self.write_listen_cpu(f));
        }
        write!(
            f,
            "sent {} in {:.2} s; answered {} in {:.2} s = {:.0} answers/s (steady {:.0}/s, 10th to 90th percentile of arrivals); lost {}, duplicates {}, foreign {}\nlatency ms: p50 {:.1}, p95 {:.1}, p99 {:.1}, max {:.1}",
            self.sent,
            self.send_seconds,
            self.answered,
            self.seconds,
            self.throughput,
            self.steady_rate,
            self.lost,
            self.duplicates,
            self.foreign,
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms
        )?;
        self.write_listen_cpu(f)
    }
}

impl LoadReport {
    fn write_listen_cpu(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.listen_cpu_seconds {
            Some(s) => write!(f, "\nloadgen CPU while listening: {s:.2} s"),
            None => Ok(()),
        }
    }
}

/// Linux reports a process's CPU times in /proc in units of USER_HZ (`getconf CLK_TCK`), which is
/// fixed at 100 on x86 and ARM, the machines this benchmark runs on.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user and system) this process has used, from `/proc/self/stat`; `None` off Linux.
pub fn process_cpu_seconds() -> Option<f64> {
    cpu_seconds_of_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// utime + stime from a `/proc/PID/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so the fields are counted from its closing parenthesis.
fn cpu_seconds_of_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state is field 3, utime field 14 and stime field 15.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Answers per second between the 10% and 90% marks of the sorted arrival times (nanoseconds).
/// The sequence number in a request ID `<prefix><n>`, or `None` for an ID of another run.
fn sequence_of(id: Option<&[u8]>, prefix: &[u8]) -> Option<usize> {
    let digits = id?.strip_prefix(prefix)?;
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0usize, |n, d| n * 10 + (d - b'0') as usize))
}

fn steady_rate(arrivals: &[u64]) -> f64 {
    let n = arrivals.len();
    if n < 10 {
        return f64::NAN;
    }
    let (a, b) = (n / 10, n * 9 / 10);
    (b - a) as f64 / ((arrivals[b] - arrivals[a]) as f64 / 1e9).max(1e-9)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A run ID no earlier run shares.
pub fn new_run_id() -> String {
    format!("lg{:x}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0))
}

/// Runs one load test: `answers` must already be listening. Errors are the publisher's, or
/// internal (a ride that cannot be written as JSON, a listener that panicked).
pub fn run(spec: &LoadSpec, publish: &mut dyn Publish, mut answers: Box<dyn Answers>) -> Result<LoadReport, ConnectorError> {
    let run_id = &spec.run_id;
    let n = spec.count as usize;
    let sent_ns: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let seen: Arc<Vec<AtomicU8>> = Arc::new((0..n).map(|_| AtomicU8::new(0)).collect());
    let answers_seen = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let start = Instant::now();
    let answered = Arc::new(AtomicU64::new(0));
    let duplicates = Arc::new(AtomicU64::new(0));
    let foreign = Arc::new(AtomicU64::new(0));
    let last_arrival = Arc::new(AtomicU64::new(0));
    let send_done = Arc::new(AtomicU64::new(0));
    let listener = {
        let (sent_ns, seen, answers_seen, answered, duplicates, foreign, last_arrival, send_done) = (
            sent_ns.clone(),
            seen.clone(),
            answers_seen.clone(),
            answered.clone(),
            duplicates.clone(),
            foreign.clone(),
            last_arrival.clone(),
            send_done.clone(),
        );
        let prefix = format!("{run_id}-");
        let drain = spec.drain;
        std::thread::spawn(move || {
            let mut local = Vec::new();
            loop {
                if answered.load(Ordering::Relaxed) as usize >= n {
                    break;
                }
                let done = send_done.load(Ordering::Relaxed);
                if done > 0 {
                    let quiet_since = last_arrival.load(Ordering::Relaxed).max(done);
                    if start.elapsed().as_nanos() as u64 > quiet_since + drain.as_nanos() as u64 {
                        break;
                    }
                }
                answers.poll(Duration::from_millis(10), &mut |id| {
                    let now = start.elapsed().as_nanos() as u64;
                    // Read this run's sequence number from the ID's bytes, with no allocation per
                    // answer (the listener shares the cores with the pipeline it measures).
                    match sequence_of(id, prefix.as_bytes()) {
                        Some(i) if i < n => {
                            if seen[i].fetch_add(1, Ordering::Relaxed) == 0 {
                                answered.fetch_add(1, Ordering::Relaxed);
                                local.push(((now.saturating_sub(sent_ns[i].load(Ordering::Relaxed))) as f64 / 1e6, now));
                                last_arrival.store(now, Ordering::Relaxed);
                            } else {
                                duplicates.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {
                            foreign.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            answers_seen.lock().expect("answers lock").extend(local);
        })
    };
    // Send at the target rate, in 1 ms slices.
    let mut rides = RideGenerator::new(spec.seed);
    let mut buf = Vec::with_capacity(160);
    for i in 0..n {
        if spec.rate > 0.0 {
            let due = Duration::from_secs_f64(i as f64 / spec.rate);
            let elapsed = start.elapsed();
            if due > elapsed + Duration::from_micros(500) {
                std::thread::sleep(due - elapsed);
            }
        }
        let id = format!("{run_id}-{i}");
        let ride = rides.next().expect("the generator is endless");
        buf.clear();
        serde_json::to_writer(&mut buf, &ride.request_json(&id)).map_err(|e| ConnectorError::internal(e.to_string()))?;
        sent_ns[i].store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        publish.send(&id, &buf)?;
    }
    publish.flush()?;
    let send_seconds = start.elapsed().as_secs_f64();
    if spec.preload {
        use std::io::Write as _;
        println!("preloaded {n} rides");
        let _ = std::io::stdout().flush();
    }
    send_done.store(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    let cpu_at_send_done = process_cpu_seconds();
    listener.join().map_err(|_| ConnectorError::internal("the listener panicked"))?;
    let cpu_at_end = process_cpu_seconds();
    let answers: Vec<(f64, u64)> = std::mem::take(&mut *answers_seen.lock().expect("answers lock"));
    let mut lat: Vec<f64> = answers.iter().map(|(l, _)| *l).collect();
    let mut arrivals: Vec<u64> = answers.iter().map(|(_, t)| *t).collect();
    arrivals.sort_unstable();
    let steady = steady_rate(&arrivals);
    lat.sort_by(|a, b| a.total_cmp(b));
    let answered = answered.load(Ordering::Relaxed);
    let last = last_arrival.load(Ordering::Relaxed) as f64 / 1e9;
    let first = arrivals.first().copied().unwrap_or(0) as f64 / 1e9;
    let seconds = if spec.preload { last - first } else { last };
    Ok(LoadReport {
        sent: spec.count,
        answered,
        lost: spec.count - answered,
        duplicates: duplicates.load(Ordering::Relaxed),
        foreign: foreign.load(Ordering::Relaxed),
        send_seconds,
        seconds,
        seconds_with_startup: last - send_done.load(Ordering::Relaxed) as f64 / 1e9,
        steady_rate: steady,
        preloaded: spec.preload,
        throughput: answered as f64 / seconds.max(1e-9),
        p50_ms: percentile(&lat, 50.0),
        p95_ms: percentile(&lat, 95.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        listen_cpu_seconds: if spec.preload { cpu_at_send_done.zip(cpu_at_end).map(|(a, b)| b - a) } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_come_only_from_this_runs_ids() {
        assert_eq!(sequence_of(Some(b"lg1f-42"), b"lg1f-"), Some(42));
        assert_eq!(sequence_of(Some(b"lg1f-0"), b"lg1f-"), Some(0));
        assert_eq!(sequence_of(Some(b"lg2a-42"), b"lg1f-"), None, "another run's ID");
        assert_eq!(sequence_of(Some(b"lg1f-"), b"lg1f-"), None);
        assert_eq!(sequence_of(Some(b"lg1f-4x"), b"lg1f-"), None);
        assert_eq!(sequence_of(Some(b"lg1f-+4"), b"lg1f-"), None);
        assert_eq!(sequence_of(Some(b"lg1f-9999999999999999999"), b"lg1f-"), None, "too long to be a count");
        assert_eq!(sequence_of(None, b"lg1f-"), None, "no key");
    }

    #[test]
    fn cpu_times_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis, utime 250 and stime 50 ticks.
        let stat = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1000 100000 200";
        assert_eq!(cpu_seconds_of_stat(stat), Some(3.0));
        assert_eq!(cpu_seconds_of_stat("4242 (x) S 1"), None, "a truncated line has no CPU times");
        let own = process_cpu_seconds().expect("this test runs on Linux");
        assert!(own >= 0.0);
    }

    #[test]
    fn steady_rate_skips_the_head_and_the_tail() {
        // 100 answers: a slow start (10 over 1 s), 80 in the next second, then a slow tail.
        let mut t: Vec<u64> = (0..10).map(|i| i * 100_000_000).collect();
        t.extend((0..80).map(|i| 1_000_000_000 + i * 12_500_000));
        t.extend((0..10).map(|i| 2_000_000_000 + i * 100_000_000));
        assert!((steady_rate(&t) - 80.0).abs() < 1e-9, "{}", steady_rate(&t));
        assert!(steady_rate(&t[..5]).is_nan(), "too few answers to say");
    }
}
