//! Per-file manifests of the live file source: for each row of a file, its ID and a hash of its
//! content (never the payload); the diff of a file's new version against them; and their compact
//! durable form, stored with the answers as two checkpoint positions: a base (every row, rewritten
//! now and then) and the changes since it (what the reads since the base changed), so a read that
//! changes 1% of a file stores about that much, not the whole manifest again.
//!
//! Row identity: the `id` column's value when the file has one; otherwise
//! `<file>#<content hash, 16 hex digits>`, with `~<k>` appended for the k-th exact duplicate
//! (k ≥ 2) in the file. A derived ID survives rows being inserted or removed around it; editing
//! the row gives it a new ID (the old answer is deleted and the new one written).

use crate::error::ConnectorError;
use base64::Engine;
use sluice_core::hash::ByHash;

/// The 64-bit hash a row's ID is known by: XXH3, a stable algorithm, since manifests outlive
/// the binary that wrote them.
pub fn id_key(id: &str) -> u64 {
    twox_hash::XxHash3_64::oneshot(id.as_bytes())
}

/// The content hash of a row's bytes, seeded with its file's header hash (XXH3).
pub fn row_hash(header: u64, bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot_with_seed(header, bytes)
}

/// The derived ID of the `k`-th (1-based) row of `file` with this content hash.
pub fn derived_id(file: &str, content: u64, k: u32) -> String {
    if k <= 1 {
        format!("{file}#{content:016x}")
    } else {
        format!("{file}#{content:016x}~{k}")
    }
}

/// The `b` of a row with a derived ID (its `a` is the duplicate counter).
const DERIVED: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Row {
    content: u64,
    /// A named row: where its `id` cell lies in the manifest's arena (`a` its start, `b` its
    /// length). A derived row: `a` is its duplicate counter and `b` is [`DERIVED`].
    a: u32,
    b: u32,
    /// The diff that last saw the row (a diff updates the manifest in place; a row it did not
    /// see is gone).
    seen: u32,
    /// Where that diff saw it: the row's place among the file's rows, which keeps the manifest
    /// in the file's order. Its top bit is [`CHANGED`].
    at: u32,
}

/// A run of [`BLOCK_ROWS`] rows that lay together in the file, known by the hash of their bytes:
/// a diff that finds the same bytes where the run's first row is expected passes over the whole
/// run without framing or hashing its rows. Blocks live only in memory (a restart rebuilds them
/// on its first read of the file).
#[derive(Clone, Copy, Debug)]
struct Block {
    /// The run's first row: its index in the manifest's rows (while it is in [`Diff::blocks`],
    /// its place in the new version).
    first: u32,
    rows: u32,
    /// The run's bytes in the file, from its first row's start to where the row after it starts.
    len: u32,
    /// [`row_hash`] of those bytes, seeded like the rows' (with the file's header hash).
    hash: u64,
}

/// Rows per [`Block`].
pub const BLOCK_ROWS: usize = 16;

/// The content of a row this file holds but does not answer: its `id` is answered from another
/// file that had it first (a `duplicate_id` dead letter). It never equals a real row's hash, so
/// every read offers the row again, and it is no answer of this file's to delete (a hash is
/// this value once in 2^64 rows).
pub const WAITING: u64 = 0x5741_4954_494e_4721;

/// Which rows of a file are this worker's: every worker reads every file and answers the rows
/// whose key ([`Manifest`]'s row key: the `id`'s hash, or for a derived ID the hash of its
/// content and duplicate counter) falls to it, so each ID lives on one worker, and that worker's
/// manifests and answers commit together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub worker: u64,
    pub peers: u64,
}

impl Route {
    /// Every row (one worker).
    pub const ALL: Route = Route { worker: 0, peers: 1 };

    pub fn new(worker: usize, peers: usize) -> Self {
        Route { worker: worker as u64, peers: peers.max(1) as u64 }
    }

    /// Whether the row with this key is this worker's.
    pub fn mine(&self, key: u64) -> bool {
        self.peers <= 1 || key % self.peers == self.worker
    }
}

/// The bit of [`Row::at`] saying that the row is new or changed since the durable base.
const CHANGED: u32 = 1 << 31;

impl Row {
    fn place(&self) -> u32 {
        self.at & !CHANGED
    }
}

/// The changes since the base may grow to this share of the base's rows (1/8) before the base is
/// written again: a long series of 1% edits then writes, per read, about 1/8 of a base every 12
/// reads plus the changes, on average about 15% of the full manifest instead of all of it.
const REBASE_SHARE: usize = 8;

/// What to store after a read: the base when it was written again, and the changes since it
/// (empty when there are none).
#[derive(Debug)]
pub struct Durable {
    pub base: Option<String>,
    pub changes: String,
}

/// What sluice knows of one file: the version it last read, and per row, in the file's order,
/// the ID and content hash. 24 bytes a row, plus the bytes of `id` cells.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    /// The file's tag when it was read.
    pub version: String,
    rows: Vec<Row>,
    arena: String,
    /// The last diff's mark.
    generation: u32,
    /// The stamp of the durable base that [`Manifest::removed`] and the rows marked
    /// [`CHANGED`] are changes to; 0 before the first base.
    base: u64,
    /// The rows removed since the base, as durable row records.
    removed: Vec<u8>,
    removed_rows: usize,
    /// Runs of rows known by the hash of their bytes, in the file's order.
    blocks: Vec<Block>,
}

/// The key a row is found by when it is not where the file's order puts it: the ID's hash for a
/// named row, a hash of the content and duplicate counter for a derived one.
fn key_of(named: Option<&str>, content: u64, k: u32) -> u64 {
    match named {
        Some(id) => id_key(id),
        None => {
            let mut b = [0u8; 12];
            b[..8].copy_from_slice(&content.to_le_bytes());
            b[8..].copy_from_slice(&k.to_le_bytes());
            twox_hash::XxHash3_64::oneshot_with_seed(u64::from(DERIVED), &b)
        }
    }
}

impl Manifest {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn named(&self, row: &Row) -> Option<&str> {
        (row.b != DERIVED).then(|| &self.arena[row.a as usize..(row.a + row.b) as usize])
    }

    fn id_of(&self, file: &str, row: &Row) -> String {
        match self.named(row) {
            Some(id) => id.to_string(),
            None => derived_id(file, row.content, row.a),
        }
    }

    fn key(&self, row: &Row) -> u64 {
        key_of(self.named(row), row.content, row.a)
    }

    /// Each row's key to its place in `rows`.
    fn index(&self) -> ByHash<u32> {
        let mut index = ByHash::with_capacity_and_hasher(self.rows.len(), Default::default());
        for (j, row) in self.rows.iter().enumerate() {
            index.insert(self.key(row), j as u32);
        }
        index
    }

    /// Whether row `j` is the row with this identity.
    fn is(&self, j: usize, named: Option<&str>, content: u64, k: u32) -> bool {
        let row = &self.rows[j];
        match named {
            Some(id) => row.b as usize == id.len() && self.named(row) == Some(id),
            None => row.b == DERIVED && row.a == k && row.content == content,
        }
    }

    /// Every row's ID (for a file that went away).
    pub fn ids(&self, file: &str) -> Vec<String> {
        self.answered(file, Route::ALL)
    }

    /// The IDs this file answers on this worker: its rows on `route`, less those waiting for an
    /// `id` answered from another file. These are the answers a removed file takes with it.
    pub fn answered(&self, file: &str, route: Route) -> Vec<String> {
        let mut ids: Vec<String> = self.rows.iter().filter(|r| r.content != WAITING && route.mine(self.key(r))).map(|r| self.id_of(file, r)).collect();
        ids.sort();
        ids
    }

    /// The `id`s of named rows on `route` that this file answers, by hash.
    pub fn named_keys(&self, route: Route) -> impl Iterator<Item = u64> + '_ {
        self.rows.iter().filter(move |r| r.b != DERIVED && r.content != WAITING).map(|r| self.key(r)).filter(move |k| route.mine(*k))
    }

    /// Whether any row waits for an `id` answered from another file.
    pub fn has_waiting(&self) -> bool {
        self.rows.iter().any(|r| r.content == WAITING)
    }

    /// A manifest made of the rows of `copies` that `keep(copy, key)` takes (other workers'
    /// manifests of one file, after the number of workers changed: each row from the copy of the
    /// worker that answered it). Its version is theirs when they agree, else none, so the file
    /// is read and diffed again. Blocks are not kept.
    pub fn adopt(copies: &[Manifest], keep: impl Fn(usize, u64) -> bool) -> Manifest {
        let mut m = Manifest::default();
        let agree = copies.windows(2).all(|w| w[0].version == w[1].version);
        m.version = if agree { copies.first().map(|c| c.version.clone()).unwrap_or_default() } else { String::new() };
        let mut taken: ByHash<()> = ByHash::default();
        for (i, c) in copies.iter().enumerate() {
            for row in &c.rows {
                let key = c.key(row);
                if !keep(i, key) || taken.insert(key, ()).is_some() {
                    continue;
                }
                let (a, b) = match c.named(row) {
                    Some(id) => {
                        let a = m.arena.len() as u32;
                        m.arena.push_str(id);
                        (a, row.b)
                    }
                    None => (row.a, DERIVED),
                };
                let at = m.rows.len() as u32 | CHANGED;
                m.rows.push(Row { content: row.content, a, b, seen: 0, at });
            }
        }
        m
    }

    fn push_record(&self, row: &Row, b: &mut Vec<u8>) {
        b.extend_from_slice(&row.content.to_le_bytes());
        match self.named(row) {
            None => {
                b.push(0);
                b.extend_from_slice(&row.a.to_le_bytes());
            }
            Some(id) => {
                b.push(1);
                b.extend_from_slice(&row.b.to_le_bytes());
                b.extend_from_slice(id.as_bytes());
            }
        }
    }

    /// Reads one row record, adding a named row's ID to the arena.
    fn read_record(&mut self, r: &mut Cursor) -> Result<Row, ConnectorError> {
        let content = r.u64()?;
        let (a, b) = match r.take(1)?[0] {
            0 => (r.u32()?, DERIVED),
            1 => {
                let len = r.u32()?;
                if len == DERIVED {
                    return Err(corrupt("bad id length"));
                }
                let id = std::str::from_utf8(r.take(len as usize)?).map_err(|_| corrupt("bad id"))?;
                let a = self.arena.len() as u32;
                self.arena.push_str(id);
                (a, len)
            }
            _ => return Err(corrupt("bad row kind")),
        };
        Ok(Row { content, a, b, seen: 0, at: 0 })
    }

    /// Every row, in the file's order: the durable base.
    fn encode_base(&self, stamp: u64) -> String {
        let mut b = Vec::with_capacity(24 + self.version.len() + self.rows.len() * 13 + self.arena.len());
        b.extend_from_slice(b"SLM2");
        b.extend_from_slice(&stamp.to_le_bytes());
        b.extend_from_slice(&(self.version.len() as u32).to_le_bytes());
        b.extend_from_slice(self.version.as_bytes());
        b.extend_from_slice(&(self.rows.len() as u64).to_le_bytes());
        for row in &self.rows {
            self.push_record(row, &mut b);
        }
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    /// What to store after a read: the changes since the base, or a new base when the changes
    /// have grown past [`REBASE_SHARE`] of it (or there is none yet).
    pub fn durable(&mut self) -> Durable {
        let changed = self.rows.iter().filter(|r| r.at & CHANGED != 0).count();
        if changed + self.removed_rows == 0 && self.base != 0 {
            return Durable { base: None, changes: String::new() };
        }
        if self.base == 0 || (changed + self.removed_rows) * REBASE_SHARE > self.rows.len() {
            let stamp = twox_hash::XxHash3_64::oneshot_with_seed(sluice_core::record::now_ms(), self.version.as_bytes()) | 1;
            for r in &mut self.rows {
                r.at &= !CHANGED;
            }
            self.removed = Vec::new();
            self.removed_rows = 0;
            self.base = stamp;
            return Durable { base: Some(self.encode_base(stamp)), changes: String::new() };
        }
        let mut b = Vec::with_capacity(32 + self.version.len() + self.removed.len() + changed * 24);
        b.extend_from_slice(b"SLC1");
        b.extend_from_slice(&self.base.to_le_bytes());
        b.extend_from_slice(&(self.version.len() as u32).to_le_bytes());
        b.extend_from_slice(self.version.as_bytes());
        b.extend_from_slice(&(self.removed_rows as u64).to_le_bytes());
        b.extend_from_slice(&self.removed);
        b.extend_from_slice(&(changed as u64).to_le_bytes());
        for row in self.rows.iter().filter(|r| r.at & CHANGED != 0) {
            self.push_record(row, &mut b);
        }
        Durable { base: None, changes: base64::engine::general_purpose::STANDARD.encode(b) }
    }

    /// Reads a manifest back from its durable base and the changes since it. No hashing for the
    /// base: its rows come back in the file's order, and a diff finds them by position. Changes
    /// made to another base (a base stored without its changes) are left out: the file then
    /// differs from the base's version, so it is read again and diffed against the base. A
    /// manifest sluice cannot read is sluice's own data gone wrong: internal.
    pub fn decode(base: &str, changes: Option<&str>) -> Result<Manifest, ConnectorError> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(base).map_err(|e| corrupt(format!("not base64: {e}")))?;
        let mut r = Cursor { b: &bytes, at: 0 };
        let stamp = match r.take(4)? {
            b"SLM2" => r.u64()?,
            // Stored before bases had stamps: no changes go with it.
            b"SLM1" => 0,
            _ => return Err(corrupt("not a sluice file manifest")),
        };
        let version = r.string()?;
        let n = r.u64()? as usize;
        let mut m = Manifest { version, rows: Vec::with_capacity(n.min(1 << 26)), ..Manifest::default() };
        for at in 0..n {
            let row = m.read_record(&mut r)?;
            m.rows.push(Row { at: at as u32, ..row });
        }
        m.base = stamp;
        match changes.filter(|c| !c.is_empty()) {
            Some(changes) if stamp != 0 => m.apply(changes)?,
            _ => {}
        }
        Ok(m)
    }

    /// Applies stored changes to a freshly read base.
    fn apply(&mut self, changes: &str) -> Result<(), ConnectorError> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(changes).map_err(|e| corrupt(format!("not base64: {e}")))?;
        let mut r = Cursor { b: &bytes, at: 0 };
        if r.take(4)? != b"SLC1" {
            return Err(corrupt("not a sluice manifest change set"));
        }
        if r.u64()? != self.base {
            tracing::debug!("files: stored manifest changes belong to another base; the base alone is used");
            return Ok(());
        }
        let version = r.string()?;
        let mut index = self.index();
        const GONE: u32 = u32::MAX;
        let start = r.at;
        let removed = r.u64()? as usize;
        for _ in 0..removed {
            let row = self.read_record(&mut r)?;
            if let Some(&j) = index.get(&self.key(&row)) {
                self.rows[j as usize].seen = GONE;
            }
        }
        self.removed = bytes[start + 8..r.at].to_vec();
        self.removed_rows = removed;
        let changed = r.u64()? as usize;
        for _ in 0..changed {
            let row = self.read_record(&mut r)?;
            let key = self.key(&row);
            match index.get(&key) {
                Some(&j) => {
                    let old = &mut self.rows[j as usize];
                    old.content = row.content;
                    old.seen = 0;
                    old.at |= CHANGED;
                }
                None => {
                    index.insert(key, self.rows.len() as u32);
                    self.rows.push(Row { at: self.rows.len() as u32 | CHANGED, ..row });
                }
            }
        }
        self.rows.retain(|r| r.seen != GONE);
        self.version = version;
        Ok(())
    }
}

/// A stored manifest that cannot be read: sluice's own data, so internal.
fn corrupt(message: impl Into<String>) -> ConnectorError {
    ConnectorError::internal(message)
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ConnectorError> {
        let s = self.b.get(self.at..self.at + n).ok_or_else(|| corrupt("truncated manifest"))?;
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, ConnectorError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ConnectorError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String, ConnectorError> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| corrupt("bad version"))
    }
}

/// How many rows past the expected one a diff looks before it asks the index (rows deleted
/// from a file shift the rest by a few).
const LOOKAHEAD: usize = 8;

/// A file's new version being read against its manifest, which it updates in place. Rows are
/// matched by position first: a row of the new version is compared with the manifest's row
/// after the last one matched (and a few beyond it), which is a sequential walk with no hash
/// lookup while the file keeps its order. A row found nowhere near its place (inserted, moved)
/// is looked up in an index by ID, built on the first such row.
pub struct Diff {
    file: String,
    m: Manifest,
    /// The tag of the version being read; the manifest takes it when the read finishes.
    version: String,
    /// This diff's mark.
    generation: u32,
    /// Derived rows seen so far per content hash (for the duplicate counter).
    dups: ByHash<u32>,
    /// Row keys to their place in the manifest, built when first needed.
    index: Option<ByHash<u32>>,
    /// The manifest row expected next.
    cursor: usize,
    /// The new version's rows so far.
    next_at: u32,
    /// The read turned out unusable: every row goes.
    forget: bool,
    /// The old manifest's next block that may start at the cursor.
    next_block: usize,
    /// The new version's blocks, by place.
    blocks: Vec<Block>,
    /// Which rows are this worker's to answer.
    route: Route,
    /// The manifest row of the last row diffed.
    last: usize,
    /// Whether the last row sent replaces an answer of its ID's (a changed row, not a new or a
    /// waiting one).
    last_replaces: bool,
    /// A new model version answers every row again: an unchanged row is sent too, replacing
    /// its answer, and no block is passed over.
    recompute: bool,
}

/// What a diff makes of one row of the new version.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// As it was: no work.
    Same,
    /// New or changed: its ID, and it goes to the model.
    Send(String),
    /// An `id` that an earlier row of this version already has: the row is refused, and the
    /// first row with the ID is the one answered, as in a fresh read.
    Duplicate(String),
    /// New, changed or a duplicate, but another worker's to answer: recorded, nothing to do here.
    Foreign,
}

impl Diff {
    pub fn new(file: &str, mut m: Manifest, version: String) -> Self {
        m.generation = m.generation.wrapping_add(1);
        let generation = m.generation;
        let blocks = Vec::with_capacity(m.blocks.len());
        Diff {
            file: file.to_string(),
            m,
            version,
            generation,
            dups: ByHash::default(),
            index: None,
            cursor: 0,
            next_at: 0,
            forget: false,
            next_block: 0,
            blocks,
            route: Route::ALL,
            last: 0,
            last_replaces: false,
            recompute: false,
        }
    }

    /// Sends every row, unchanged ones too (their answers are made again by a new model).
    pub fn recomputing(mut self, yes: bool) -> Self {
        self.recompute = yes;
        self
    }

    /// Answers only the rows of `route` (the others are recorded and come out as
    /// [`Seen::Foreign`]).
    pub fn routed(mut self, route: Route) -> Self {
        self.route = route;
        self
    }

    /// Whether the row with this identity is this worker's.
    fn mine(&self, named: Option<&str>, content: u64, k: u32) -> bool {
        self.route.peers <= 1 || self.route.mine(key_of(named, content, k))
    }

    /// Whether the last row sent replaces an answer of its ID's (it had one before this read).
    pub fn last_replaces(&self) -> bool {
        self.last_replaces
    }

    /// The last row diffed waits: its `id` is answered from another file. It is offered again
    /// on every read until it can be answered.
    pub fn wait_last(&mut self) {
        if let Some(row) = self.m.rows.get_mut(self.last) {
            row.content = WAITING;
            row.at |= CHANGED;
        }
    }

    /// A row of the new version, with its `id` cell if the file has one. An unchanged row costs
    /// no allocation.
    pub fn row(&mut self, named: Option<&str>, content: u64) -> Seen {
        let k = match named {
            Some(_) => 0,
            None => {
                let k = self.dups.entry(content).or_insert(0);
                *k += 1;
                *k
            }
        };
        let at = self.next_at & !CHANGED;
        self.next_at = self.next_at.wrapping_add(1);
        let generation = self.generation;
        let id = |file: &str| match named {
            Some(id) => id.to_string(),
            None => derived_id(file, content, k),
        };
        let Some(j) = self.find(named, content, k) else {
            let (a, b) = match named {
                Some(id) => {
                    let a = self.m.arena.len() as u32;
                    self.m.arena.push_str(id);
                    (a, id.len() as u32)
                }
                None => (k, DERIVED),
            };
            let j = self.m.rows.len();
            self.m.rows.push(Row { content, a, b, seen: generation, at: at | CHANGED });
            if let Some(index) = &mut self.index {
                index.insert(key_of(named, content, k), j as u32);
            }
            self.last = j;
            self.last_replaces = false;
            if !self.mine(named, content, k) {
                return Seen::Foreign;
            }
            return Seen::Send(id(&self.file));
        };
        let row = &mut self.m.rows[j];
        if row.seen == generation {
            // Only a named row can be found twice (a derived one's counter differs).
            if !self.mine(named, content, k) {
                return Seen::Foreign;
            }
            return Seen::Duplicate(id(&self.file));
        }
        self.last = j;
        row.seen = generation;
        row.at = at | (row.at & CHANGED);
        // A waiting row's content is WAITING, which no row's hash equals: it is offered again.
        if row.content == content {
            if !self.recompute {
                return Seen::Same;
            }
            // Recomputed: the same row, answered again, replacing its answer.
            self.last_replaces = true;
            if !self.mine(named, content, k) {
                return Seen::Foreign;
            }
            return Seen::Send(id(&self.file));
        }
        self.last_replaces = row.content != WAITING;
        row.content = content;
        row.at |= CHANGED;
        if !self.mine(named, content, k) {
            return Seen::Foreign;
        }
        Seen::Send(id(&self.file))
    }

    /// The place the next row of the new version takes.
    pub fn next_place(&self) -> u32 {
        self.next_at
    }

    /// Passes over a block of the old version where the cursor stands, if `data` (from a row
    /// boundary of the new version) starts with its bytes: its rows are seen, unchanged, with no
    /// framing or hashing of their own. Returns the block's bytes and rows.
    pub fn skip(&mut self, data: &[u8], seed: u64) -> Option<(usize, usize)> {
        if self.recompute {
            return None;
        }
        let blocks = &self.m.blocks;
        if self.next_block > 0 && blocks[self.next_block - 1].first as usize > self.cursor {
            // A moved row sent the cursor back (found through the index).
            self.next_block = blocks.partition_point(|b| (b.first as usize) < self.cursor);
        }
        while self.next_block < blocks.len() && (blocks[self.next_block].first as usize) < self.cursor {
            self.next_block += 1;
        }
        let b = *blocks.get(self.next_block)?;
        if b.first as usize != self.cursor || data.len() < b.len as usize || row_hash(seed, &data[..b.len as usize]) != b.hash {
            return None;
        }
        let (first, end) = (b.first as usize, (b.first + b.rows) as usize);
        let generation = self.generation;
        // A waiting row is offered on every read, so no block passes over it.
        if self.m.rows[first..end].iter().any(|r| r.seen == generation || r.content == WAITING) {
            return None;
        }
        // A derived row's duplicate counter must come out as it did: the k-th row with its
        // content in the file so far.
        for (i, r) in self.m.rows[first..end].iter().enumerate() {
            if r.b != DERIVED {
                continue;
            }
            let k = self.dups.entry(r.content).or_insert(0);
            *k += 1;
            if *k != r.a {
                for r in self.m.rows[first..=first + i].iter().filter(|r| r.b == DERIVED) {
                    *self.dups.get_mut(&r.content).expect("counted") -= 1;
                }
                return None;
            }
        }
        let place = self.next_at;
        for (i, r) in self.m.rows[first..end].iter_mut().enumerate() {
            r.seen = generation;
            r.at = (place + i as u32) | (r.at & CHANGED);
        }
        self.next_at += b.rows;
        self.cursor = end;
        self.next_block += 1;
        self.blocks.push(Block { first: place, ..b });
        Some((b.len as usize, b.rows as usize))
    }

    /// A block of the new version: `rows` rows from place `first`, lying in `bytes`.
    pub fn block(&mut self, first: u32, rows: usize, bytes: &[u8], seed: u64) {
        self.blocks.push(Block { first, rows: rows as u32, len: bytes.len() as u32, hash: row_hash(seed, bytes) });
    }

    /// Where the row with this identity is in the manifest.
    fn find(&mut self, named: Option<&str>, content: u64, k: u32) -> Option<usize> {
        let end = (self.cursor + LOOKAHEAD).min(self.m.rows.len());
        if let Some(j) = (self.cursor..end).find(|&j| self.m.is(j, named, content, k)) {
            self.cursor = j + 1;
            return Some(j);
        }
        let m = &self.m;
        let index = self.index.get_or_insert_with(|| m.index());
        let j = *index.get(&key_of(named, content, k))? as usize;
        // Another identity with the same 64-bit key is treated as a new row.
        if !self.m.is(j, named, content, k) {
            return None;
        }
        self.cursor = j + 1;
        Some(j)
    }

    /// What to store of the manifest as far as this read got (a read half-way through a long
    /// file, or stopped): the rows supplied so far carry their new content, rows not reached yet
    /// their old, and the manifest keeps the old version, so a restart reads the file again and
    /// sends only what this read had not supplied. Nothing is gone before the read ends.
    pub fn durable_so_far(&mut self) -> Durable {
        self.m.durable()
    }

    /// The manifest as far as this read got (a read abandoned half-way): the rows it supplied
    /// carry their new content, and the file keeps its old version, so it is read again.
    pub fn into_old(self) -> Manifest {
        let mut m = self.m;
        // Rows carry new content now: the old bytes no longer describe them.
        m.blocks = Vec::new();
        m
    }

    /// Forgets the rows read so far (a file that turned out unreadable): every row is gone.
    pub fn forget_read(&mut self) {
        self.forget = true;
    }

    /// The new manifest, in the new version's order, and the IDs of this worker's rows it no
    /// longer has and answered (a waiting row answered nothing).
    pub fn finish(self) -> (Manifest, Vec<String>) {
        let Diff { file, mut m, version, generation, forget, blocks, route, .. } = self;
        m.blocks = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        let mut removed = std::mem::take(&mut m.removed);
        let mut removed_rows = 0usize;
        // One pass: the rows gone, whether the rest are in the file's order, their `id` bytes.
        let (mut sorted, mut last, mut live) = (true, 0u32, 0usize);
        for r in &m.rows {
            if forget || r.seen != generation {
                if r.content != WAITING && route.mine(m.key(r)) {
                    gone.push(m.id_of(&file, r));
                }
                m.push_record(r, &mut removed);
                removed_rows += 1;
                continue;
            }
            sorted &= r.place() >= last;
            last = r.place();
            if r.b != DERIVED {
                live += r.b as usize;
            }
        }
        m.removed = removed;
        m.removed_rows += removed_rows;
        gone.sort();
        if forget {
            m.rows = Vec::new();
            m.arena = String::new();
        } else {
            if removed_rows > 0 {
                m.rows.retain(|r| r.seen == generation);
            }
            if !sorted {
                m.rows.sort_unstable_by_key(Row::place);
            }
            // The `id` cells of rows gone stay in the arena until they are half of it; then
            // the arena is rewritten in the file's order.
            m.blocks = place_blocks(&m.rows, blocks);
            if m.arena.len() > 2 * live + 64 {
                let mut arena = String::with_capacity(live);
                for r in m.rows.iter_mut().filter(|r| r.b != DERIVED) {
                    let a = arena.len() as u32;
                    arena.push_str(&m.arena[r.a as usize..(r.a + r.b) as usize]);
                    r.a = a;
                }
                m.arena = arena;
            }
        }
        m.version = version;
        (m, gone)
    }
}

/// The new version's blocks with their first row's index in the manifest (sorted by place) for
/// their place; a block whose rows are not all there, one after another, is dropped.
fn place_blocks(rows: &[Row], mut blocks: Vec<Block>) -> Vec<Block> {
    // A block passed over lands after the one being gathered before it: nearly in order.
    blocks.sort_by_key(|b| b.first);
    let mut kept = Vec::with_capacity(blocks.len());
    for b in blocks.into_iter().filter(|b| b.rows > 0) {
        // Usually each row's place is its index; otherwise it is found by bisection.
        let guess = b.first as usize;
        let first = if rows.get(guess).is_some_and(|r| r.place() == b.first) {
            guess
        } else {
            match rows.binary_search_by_key(&b.first, Row::place) {
                Ok(i) => i,
                Err(_) => continue,
            }
        };
        let last = first + b.rows as usize - 1;
        if rows.get(last).is_some_and(|r| r.place() == b.first + b.rows - 1) {
            kept.push(Block { first: first as u32, ..b });
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ID a row is sent with, if it is; a duplicate shows as `dup <id>`.
    fn sent(seen: Seen) -> Option<String> {
        match seen {
            Seen::Same => None,
            Seen::Send(id) => Some(id),
            Seen::Duplicate(id) => Some(format!("dup {id}")),
            Seen::Foreign => Some("foreign".into()),
        }
    }

    /// Reads `rows` against `old`: the new manifest, each row's changed ID (or `None`), and the
    /// IDs gone.
    fn read(old: Manifest, rows: &[(Option<&str>, u64)]) -> (Manifest, Vec<Option<String>>, Vec<String>) {
        let mut d = Diff::new("f.csv", old, "v".into());
        let seen: Vec<Option<String>> = rows.iter().map(|(id, c)| sent(d.row(*id, *c))).collect();
        let (m, gone) = d.finish();
        (m, seen, gone)
    }

    #[test]
    fn only_new_and_changed_rows_are_sent_and_missing_ones_are_gone() {
        let (m, seen, gone) = read(Manifest::default(), &[(Some("a"), 1), (Some("b"), 2), (Some("c"), 3)]);
        assert!(seen.iter().all(Option::is_some), "a new file: every row is new");
        assert!(gone.is_empty());
        let (_, seen, gone) = read(m, &[(Some("a"), 1), (Some("b"), 20), (Some("d"), 4)]);
        assert_eq!(seen, vec![None, Some("b".into()), Some("d".into())]);
        assert_eq!(gone, vec!["c".to_string()]);
    }

    #[test]
    fn derived_ids_survive_an_insert_above_and_count_duplicates() {
        let (m, seen, _) = read(Manifest::default(), &[(None, 10), (None, 11), (None, 10)]);
        assert_eq!(seen[0].as_deref(), Some("f.csv#000000000000000a"));
        assert_eq!(seen[2].as_deref(), Some("f.csv#000000000000000a~2"), "an exact duplicate gets a counter");
        let (_, seen, gone) = read(m, &[(None, 99), (None, 10), (None, 11), (None, 10)]);
        assert_eq!(seen.iter().flatten().count(), 1, "only the inserted row is new: {seen:?}");
        assert!(gone.is_empty());
    }

    #[test]
    fn a_read_abandoned_half_way_leaves_what_it_supplied_and_the_next_read_does_the_rest() {
        let (m, _, _) = read(Manifest::default(), &[(Some("a"), 1), (Some("b"), 2), (Some("c"), 3)]);
        let mut d = Diff::new("f.csv", m, "v2".into());
        assert_eq!(d.row(Some("a"), 10), Seen::Send("a".into()));
        let m = d.into_old();
        assert_eq!(m.version, "v", "the file keeps its old version, so it is read again");
        let (m, seen, gone) = read(m, &[(Some("a"), 10), (Some("b"), 20)]);
        assert_eq!(seen, vec![None, Some("b".into())], "a was supplied already");
        assert_eq!(gone, vec!["c".to_string()]);
        let mut d = Diff::new("f.csv", m, "v3".into());
        d.row(Some("z"), 9);
        d.forget_read();
        let (m, gone) = d.finish();
        assert_eq!(gone, vec!["a".to_string(), "b".into(), "z".into()], "an unreadable file: every row goes, the new one too");
        assert!(m.is_empty());
    }

    #[test]
    fn a_manifest_survives_its_durable_form() {
        let (m, _, _) = read(Manifest::default(), &[(Some("x,1"), 5), (None, 6), (None, 6), (Some("ünï"), 7)]);
        let mut m = m;
        let mut stored = Stored::default();
        stored.keep(&mut m);
        let back = stored.load();
        assert_eq!(back.version, "v");
        assert_eq!(back.ids("f.csv"), m.ids("f.csv"));
        let (_, seen, gone) = read(back, &[(Some("x,1"), 5), (None, 6), (None, 6), (Some("ünï"), 7)]);
        assert!(seen.iter().all(Option::is_none), "nothing changed: {seen:?}");
        assert!(gone.is_empty());
        assert!(Manifest::decode("bm90IGEgbWFuaWZlc3Q=", None).is_err());
    }

    /// What a sink holds for one file: the last base and the last changes.
    #[derive(Default)]
    struct Stored {
        base: String,
        changes: String,
        bases: usize,
    }

    impl Stored {
        fn keep(&mut self, m: &mut Manifest) {
            let d = m.durable();
            if let Some(base) = d.base {
                self.base = base;
                self.bases += 1;
            }
            self.changes = d.changes;
        }
        fn load(&self) -> Manifest {
            Manifest::decode(&self.base, Some(&self.changes)).unwrap()
        }
    }

    #[test]
    fn a_small_edit_stores_its_changes_not_the_whole_manifest() {
        let ids: Vec<String> = (0..1000).map(|i| format!("r{i}")).collect();
        let rows = |edit: u64| -> Vec<(Option<&str>, u64)> {
            ids.iter().enumerate().map(|(i, id)| (Some(id.as_str()), if i % 100 == 0 { edit } else { 0 })).collect()
        };
        let mut stored = Stored::default();
        let (mut m, _, _) = read(Manifest::default(), &rows(0));
        stored.keep(&mut m);
        assert_eq!((stored.bases, stored.changes.len()), (1, 0), "the first read stores a base");
        let base_len = stored.base.len();
        // Every 100th row edited, one of them removed, a row added.
        let mut next = rows(1);
        next.remove(500);
        next.push((Some("new"), 7));
        let (mut m, _, gone) = read(stored.load(), &next);
        assert_eq!(gone, vec!["r500".to_string()]);
        stored.keep(&mut m);
        assert_eq!(stored.bases, 1, "no new base for 12 of 1000 rows");
        assert!(stored.changes.len() * 20 < base_len, "changes {} bytes, base {base_len}", stored.changes.len());
        let back = stored.load();
        assert_eq!(back.ids("f.csv"), m.ids("f.csv"));
        let (_, seen, gone) = read(back, &next);
        assert!(seen.iter().all(Option::is_none) && gone.is_empty(), "the base and its changes are the manifest");
        // A base stored without its changes (changes of another base) is used alone: the file
        // differs from its version, and the diff against the base sends what changed since.
        let (_, seen, _) = read(Manifest::decode(&stored.base, Some("")).unwrap(), &next);
        assert_eq!(seen.iter().flatten().count(), 10, "9 edited rows and the new one");
    }

    /// A small deterministic generator for the random edit sequences below.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n.max(1)
        }
    }

    #[test]
    fn random_edits_inserts_deletes_and_moves_agree_with_a_full_comparison() {
        use std::collections::BTreeMap;
        for seed in 0..40u64 {
            let mut g = Lcg(seed);
            let mut file: Vec<(String, u64)> = (0..200).map(|i| (format!("r{i}"), i as u64)).collect();
            let mut m = Manifest::default();
            let mut before: BTreeMap<String, u64> = BTreeMap::new();
            let mut next_id = 200;
            let mut stored = Stored::default();
            for round in 0..12 {
                let rows: Vec<(Option<&str>, u64)> = file.iter().map(|(id, c)| (Some(id.as_str()), *c)).collect();
                let (after, seen, gone) = read(m, &rows);
                let now: BTreeMap<String, u64> = file.iter().cloned().collect();
                let want_sent: Vec<String> = file.iter().filter(|(id, c)| before.get(id) != Some(c)).map(|(id, _)| id.clone()).collect();
                let sent: Vec<String> = seen.into_iter().flatten().collect();
                assert_eq!(sent, want_sent, "seed {seed} round {round}: rows sent");
                let want_gone: Vec<String> = before.keys().filter(|k| !now.contains_key(*k)).cloned().collect();
                assert_eq!(gone, want_gone, "seed {seed} round {round}: rows gone");
                let order: Vec<String> = after.rows.iter().map(|r| after.id_of("f.csv", r)).collect();
                assert_eq!(order, file.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), "the manifest keeps the file's order");
                let mut after = after;
                stored.keep(&mut after);
                let back = stored.load();
                assert_eq!(back.ids("f.csv"), after.ids("f.csv"));
                assert_eq!(back.version, after.version);
                m = back;
                before = now;
                // The next version: a few edits, deletes, inserts and moves.
                for _ in 0..g.next(6) {
                    let i = g.next(file.len());
                    file[i].1 += 1000;
                }
                for _ in 0..g.next(4) {
                    if !file.is_empty() {
                        let i = g.next(file.len());
                        file.remove(i);
                    }
                }
                for _ in 0..g.next(4) {
                    let i = g.next(file.len() + 1);
                    file.insert(i, (format!("n{next_id}"), next_id as u64));
                    next_id += 1;
                }
                if g.next(3) == 0 && file.len() > 2 {
                    let i = g.next(file.len());
                    let row = file.remove(i);
                    file.insert(g.next(file.len() + 1), row);
                }
            }
        }
    }

    #[test]
    fn a_duplicate_id_in_one_file_is_refused_and_the_first_row_with_it_counts() {
        let rows = [(Some("a"), 1), (Some("b"), 2), (Some("a"), 3)];
        let (m, seen, _) = read(Manifest::default(), &rows);
        assert_eq!(seen, vec![Some("a".into()), Some("b".into()), Some("dup a".into())]);
        assert_eq!(m.len(), 2);
        let (m, seen, gone) = read(m, &rows);
        assert_eq!(seen, vec![None, None, Some("dup a".into())], "the first `a` is unchanged; it is not sent again");
        assert!(gone.is_empty());
        // The first `a` goes: the second one is the row now.
        let (m, seen, gone) = read(m, &[(Some("b"), 2), (Some("a"), 3)]);
        assert_eq!(seen, vec![None, Some("a".into())]);
        assert!(gone.is_empty());
        let (_, _, gone) = read(m, &[(Some("b"), 2)]);
        assert_eq!(gone, vec!["a".to_string()]);
    }

    #[test]
    fn random_edits_of_a_file_without_ids_agree_with_a_full_comparison() {
        use std::collections::BTreeSet;
        // Derived IDs: (content, k-th duplicate); contents from a small set, so duplicates abound.
        let ids = |file: &[u64]| -> Vec<String> {
            let mut k: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
            file.iter()
                .map(|c| {
                    let n = k.entry(*c).or_insert(0);
                    *n += 1;
                    derived_id("f.csv", *c, *n)
                })
                .collect()
        };
        for seed in 0..40u64 {
            let mut g = Lcg(seed);
            let mut file: Vec<u64> = (0..100).map(|_| g.next(30) as u64).collect();
            let mut m = Manifest::default();
            let mut before: BTreeSet<String> = BTreeSet::new();
            let mut stored = Stored::default();
            for round in 0..10 {
                let rows: Vec<(Option<&str>, u64)> = file.iter().map(|c| (None, *c)).collect();
                let (after, seen, gone) = read(m, &rows);
                let now = ids(&file);
                let want_sent: Vec<String> = now.iter().filter(|id| !before.contains(*id)).cloned().collect();
                assert_eq!(seen.into_iter().flatten().collect::<Vec<_>>(), want_sent, "seed {seed} round {round}");
                let now: BTreeSet<String> = now.into_iter().collect();
                assert_eq!(gone, before.difference(&now).cloned().collect::<Vec<_>>(), "seed {seed} round {round}");
                let mut after = after;
                stored.keep(&mut after);
                m = stored.load();
                assert_eq!(m.ids("f.csv"), after.ids("f.csv"));
                before = now;
                for _ in 0..g.next(5) {
                    let i = g.next(file.len());
                    file[i] = g.next(40) as u64;
                }
                for _ in 0..g.next(3) {
                    file.insert(g.next(file.len() + 1), g.next(40) as u64);
                }
                for _ in 0..g.next(3) {
                    file.remove(g.next(file.len()));
                }
            }
        }
    }
}
