//! Hashing for keys that are hashes already: a pass-through hasher and the map type built on it.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for keys that are already uniform 64-bit hashes: it passes them through, so a map
/// keyed by one costs no second hash per lookup.
#[derive(Default, Clone, Copy)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map keyed by a hash.
pub type ByHash<V> = HashMap<u64, V, BuildHasherDefault<PassThrough>>;
