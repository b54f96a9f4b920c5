//! The built-in ride generator: synthetic NYC-taxi-like rides drawn exactly as
//! `scripts/ride_generator.py` draws them (same integer hash, same draws in the same order), so
//! a seed gives the same rides in Rust and in Python.

/// One generated ride, with the duration the generator's formula gives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Ride {
    pub pu: i64,
    pub do_: i64,
    pub trip_distance: f64,
    pub duration: f64,
}

impl Ride {
    /// The ride as the JSON request a backend publishes.
    pub fn request_json(&self, id: &str) -> serde_json::Value {
        serde_json::json!({"request_id": id, "PULocationID": self.pu, "DOLocationID": self.do_, "trip_distance": self.trip_distance})
    }
}

fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
    x ^ (x >> 31)
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

struct Zone {
    x: f64,
    y: f64,
    pu_delay: f64,
    do_delay: f64,
}

/// A deterministic stream of rides for a seed.
pub struct RideGenerator {
    state: u64,
    zones: Vec<Zone>,
}

impl RideGenerator {
    pub fn new(seed: u64) -> Self {
        let zones = (0..=265u64)
            .map(|z| {
                let cp = unit(mix64(z + 2000));
                let cd = unit(mix64(z + 3000));
                Zone { x: 8.0 * unit(mix64(z)), y: 8.0 * unit(mix64(z + 1000)), pu_delay: 10.0 * (cp * cp), do_delay: 6.0 * (cd * cd) }
            })
            .collect();
        RideGenerator { state: seed, zones }
    }

    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E3779B97F4A7C15);
        unit(mix64(self.state))
    }
}

impl Iterator for RideGenerator {
    type Item = Ride;

    fn next(&mut self) -> Option<Ride> {
        let u = self.next_f64();
        let pu = ((265.0 * (u * u)).floor() as i64 * 97) % 265 + 1;
        let v = self.next_f64();
        let do_ = ((265.0 * (v * v)).floor() as i64 * 131) % 265 + 1;
        let s1 = ((self.next_f64() + self.next_f64()) + self.next_f64()) + self.next_f64() - 2.0;
        let s2 = ((self.next_f64() + self.next_f64()) + self.next_f64()) + self.next_f64() - 2.0;
        let (a, b) = (&self.zones[pu as usize], &self.zones[do_ as usize]);
        let (dx, dy) = (a.x - b.x, a.y - b.y);
        let d0 = (dx * dx + dy * dy).sqrt();
        let raw = ((1.25 * d0 + 0.3) * (1.0 + 0.15 * s1)).max(0.1);
        let trip_distance = (raw * 100.0 + 0.5).floor() / 100.0;
        let dur = (((2.0 + 3.0 * trip_distance) + a.pu_delay) + b.do_delay + 1.5 * s2).max(1.0);
        let duration = (dur * 100.0 + 0.5).floor() / 100.0;
        Some(Ride { pu, do_, trip_distance, duration })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_python_generator_test_vectors() {
        assert_eq!(mix64(7u64.wrapping_add(0x9E3779B97F4A7C15)), 0x63cbe1e459320dd7);
        let g = RideGenerator::new(7);
        assert_eq!(g.zones[1].x, 2.7053328101759178);
        let rides: Vec<(i64, i64, f64, f64)> = g.take(3).map(|r| (r.pu, r.do_, r.trip_distance, r.duration)).collect();
        assert_eq!(rides, vec![(171, 1, 5.84, 25.99), (195, 165, 4.45, 16.97), (246, 129, 3.33, 14.93)]);
    }
}
