//! Per-file manifests of the live file source: for each row of a file, its ID and a hash of its
//! content (never the payload); the diff of a file's new version against them; and their compact
//! durable form, a checkpoint position stored with the answers.
//!
//! Row identity: the `id` column's value when the file has one; otherwise
//! `<file>#<content hash, 16 hex digits>`, with `~<k>` appended for the k-th exact duplicate
//! (k ≥ 2) in the file. A derived ID survives rows being inserted or removed around it; editing
//! the row gives it a new ID (the old answer is deleted and the new one written).

use base64::Engine;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The 64-bit hash a row's ID is known by: XXH3, a stable algorithm, since manifests outlive
/// the binary that wrote them.
pub fn id_key(id: &str) -> u64 {
    twox_hash::XxHash3_64::oneshot(id.as_bytes())
}

/// The content hash of a row's bytes, seeded with its file's header hash (XXH3).
pub fn row_hash(header: u64, bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot_with_seed(header, bytes)
}

/// A hasher for keys that are already uniform 64-bit hashes: it passes them through.
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

/// The derived ID of the `k`-th (1-based) row of `file` with this content hash.
pub fn derived_id(file: &str, content: u64, k: u32) -> String {
    let mut s = String::with_capacity(file.len() + 20);
    write_derived(&mut s, file, content, k);
    s
}

fn write_derived(out: &mut String, file: &str, content: u64, k: u32) {
    use std::fmt::Write;
    if k <= 1 {
        let _ = write!(out, "{file}#{content:016x}");
    } else {
        let _ = write!(out, "{file}#{content:016x}~{k}");
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowId {
    /// A derived ID: the duplicate counter.
    Derived(u32),
    /// An `id` cell: where it lies in the manifest's arena.
    Named { at: u32, len: u32 },
}

#[derive(Clone, Copy, Debug)]
struct Row {
    content: u64,
    id: RowId,
    /// The diff that last saw the row (a diff updates the manifest in place; a row it did not
    /// see is gone). It fits in the padding: a row is 24 bytes either way.
    seen: u32,
}

/// What sluice knows of one file: the version it last read, and per row, the ID and content hash.
/// About 30 bytes a row, plus the bytes of `id` cells.
#[derive(Clone, Debug, Default)]
pub struct Manifest {
    /// The file's tag when it was read.
    pub version: String,
    rows: ByHash<Row>,
    arena: String,
    /// The last diff's mark.
    generation: u32,
}

impl Manifest {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn id_of(&self, file: &str, row: &Row) -> String {
        match row.id {
            RowId::Derived(k) => derived_id(file, row.content, k),
            RowId::Named { at, len } => self.arena[at as usize..(at + len) as usize].to_string(),
        }
    }

    /// Every row's ID (for a file that went away).
    pub fn ids(&self, file: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.rows.values().map(|r| self.id_of(file, r)).collect();
        ids.sort();
        ids
    }

    /// The durable form: a checkpoint position.
    pub fn encode(&self) -> String {
        let mut b = Vec::with_capacity(16 + self.version.len() + self.rows.len() * 13 + self.arena.len());
        b.extend_from_slice(b"SLM1");
        b.extend_from_slice(&(self.version.len() as u32).to_le_bytes());
        b.extend_from_slice(self.version.as_bytes());
        b.extend_from_slice(&(self.rows.len() as u64).to_le_bytes());
        for row in self.rows.values() {
            b.extend_from_slice(&row.content.to_le_bytes());
            match row.id {
                RowId::Derived(k) => {
                    b.push(0);
                    b.extend_from_slice(&k.to_le_bytes());
                }
                RowId::Named { at, len } => {
                    b.push(1);
                    b.extend_from_slice(&len.to_le_bytes());
                    b.extend_from_slice(&self.arena.as_bytes()[at as usize..(at + len) as usize]);
                }
            }
        }
        base64::engine::general_purpose::STANDARD.encode(b)
    }

    /// Reads a manifest of `file` back from [`Manifest::encode`]'s form.
    pub fn decode(file: &str, position: &str) -> Result<Manifest, String> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(position).map_err(|e| format!("not base64: {e}"))?;
        let mut r = Cursor { b: &bytes, at: 0 };
        if r.take(4)? != b"SLM1" {
            return Err("not a sluice file manifest".into());
        }
        let vlen = r.u32()? as usize;
        let version = String::from_utf8(r.take(vlen)?.to_vec()).map_err(|_| "bad version")?;
        let n = r.u64()? as usize;
        let mut m = Manifest { version, rows: ByHash::with_capacity_and_hasher(n.min(1 << 26), Default::default()), arena: String::new(), generation: 0 };
        for _ in 0..n {
            let content = r.u64()?;
            match r.take(1)?[0] {
                0 => {
                    let k = r.u32()?;
                    m.rows.insert(id_key(&derived_id(file, content, k)), Row { content, id: RowId::Derived(k), seen: 0 });
                }
                1 => {
                    let len = r.u32()?;
                    let id = std::str::from_utf8(r.take(len as usize)?).map_err(|_| "bad id")?;
                    let at = m.arena.len() as u32;
                    m.arena.push_str(id);
                    m.rows.insert(id_key(id), Row { content, id: RowId::Named { at, len }, seen: 0 });
                }
                _ => return Err("bad row kind".into()),
            }
        }
        Ok(m)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self.b.get(self.at..self.at + n).ok_or("truncated manifest")?;
        self.at += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

/// A file's new version being read against its manifest, which it updates in place: one hash
/// lookup a row, and no second copy of the file's state.
pub struct Diff {
    file: String,
    m: Manifest,
    /// The tag of the version being read; the manifest takes it when the read finishes.
    version: String,
    /// This diff's mark.
    generation: u32,
    /// Derived rows seen so far per content hash (for the duplicate counter).
    dups: ByHash<u32>,
    /// Where a derived ID is written before it is hashed.
    scratch: String,
    /// The read turned out unusable: every row goes.
    forget: bool,
}

impl Diff {
    pub fn new(file: &str, mut m: Manifest, version: String) -> Self {
        m.generation = m.generation.wrapping_add(1);
        let generation = m.generation;
        Diff { file: file.to_string(), m, version, generation, dups: ByHash::default(), scratch: String::new(), forget: false }
    }

    /// A row of the new version, with its `id` cell if the file has one: its ID when it is new
    /// or changed (so it must go to the model), `None` when it is unchanged. An unchanged row
    /// costs no allocation.
    pub fn row(&mut self, named: Option<&str>, content: u64) -> Option<String> {
        let key = match named {
            Some(id) => id_key(id),
            None => {
                let k = self.dups.entry(content).or_insert(0);
                *k += 1;
                let k = *k;
                self.scratch.clear();
                write_derived(&mut self.scratch, &self.file, content, k);
                id_key(&self.scratch)
            }
        };
        let generation = self.generation;
        match self.m.rows.get_mut(&key) {
            Some(row) if row.content == content => {
                row.seen = generation;
                return None;
            }
            Some(row) => {
                row.content = content;
                row.seen = generation;
            }
            None => {
                let id = match named {
                    Some(id) => {
                        let at = self.m.arena.len() as u32;
                        self.m.arena.push_str(id);
                        RowId::Named { at, len: id.len() as u32 }
                    }
                    None => RowId::Derived(self.dups[&content]),
                };
                self.m.rows.insert(key, Row { content, id, seen: generation });
            }
        }
        Some(match named {
            Some(id) => id.to_string(),
            None => self.scratch.clone(),
        })
    }

    /// The manifest as far as this read got (a read abandoned half-way): the rows it supplied
    /// carry their new content, and the file keeps its old version, so it is read again.
    pub fn into_old(self) -> Manifest {
        self.m
    }

    /// Forgets the rows read so far (a file that turned out unreadable): every row is gone.
    pub fn forget_read(&mut self) {
        self.forget = true;
    }

    /// The new manifest, and the IDs of rows the new version no longer has.
    pub fn finish(self) -> (Manifest, Vec<String>) {
        let Diff { file, mut m, version, generation, forget, .. } = self;
        let mut gone: Vec<String> = m.rows.values().filter(|r| forget || r.seen != generation).map(|r| m.id_of(&file, r)).collect();
        gone.sort();
        if forget {
            m.rows.clear();
            m.arena.clear();
        } else if !gone.is_empty() {
            m.rows.retain(|_, r| r.seen == generation);
            // The `id` cells of rows gone stay in the arena until they are half of it.
            let live: usize = m.rows.values().map(|r| if let RowId::Named { len, .. } = r.id { len as usize } else { 0 }).sum();
            if m.arena.len() > 2 * live + 64 {
                let mut arena = String::with_capacity(live);
                for r in m.rows.values_mut() {
                    if let RowId::Named { at, len } = r.id {
                        let new_at = arena.len() as u32;
                        arena.push_str(&m.arena[at as usize..(at + len) as usize]);
                        r.id = RowId::Named { at: new_at, len };
                    }
                }
                m.arena = arena;
            }
        }
        m.version = version;
        (m, gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `rows` against `old`: the new manifest, each row's changed ID (or `None`), and the
    /// IDs gone.
    fn read(old: Manifest, rows: &[(Option<&str>, u64)]) -> (Manifest, Vec<Option<String>>, Vec<String>) {
        let mut d = Diff::new("f.csv", old, "v".into());
        let seen: Vec<Option<String>> = rows.iter().map(|(id, c)| d.row(*id, *c)).collect();
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
        assert_eq!(d.row(Some("a"), 10), Some("a".into()));
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
        let back = Manifest::decode("f.csv", &m.encode()).unwrap();
        assert_eq!(back.version, "v");
        assert_eq!(back.ids("f.csv"), m.ids("f.csv"));
        let (_, seen, gone) = read(back, &[(Some("x,1"), 5), (None, 6), (None, 6), (Some("ünï"), 7)]);
        assert!(seen.iter().all(Option::is_none), "nothing changed: {seen:?}");
        assert!(gone.is_empty());
        assert!(Manifest::decode("f.csv", "bm90IGEgbWFuaWZlc3Q=").is_err());
    }
}
