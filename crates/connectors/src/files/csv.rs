//! The CSV source, on the engine's source harness: it reads this worker's share of the input
//! files once, streaming (memory does not grow with file size), frames and validates every
//! record, parses the good ones with arrow-csv, and supplies them as named fields with their
//! original bytes. A header's empty column names become `column_<n>`; names are cut to 63 bytes
//! (Postgres's limit) and made unique with a `_<k>` suffix.

use super::scan::{RawRecord as Framed, Scanner};
use super::InputFile;
use crate::error::ConnectorError;
use arrow::array::{Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use serde::Deserialize;
use sluice_core::connector::{ConfigError, SourceConnector};
use sluice_core::record::{now_ms, ColumnKind, DeadReason, SourcePos};
use sluice_core::source::{Body, Checkpoint, Keying, Poll, RawRecord, Source, SourceError, SourceFactory};
use sluice_core::topology::RuntimeConfig;
use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

/// `[source] type = "csv"`: one file, a glob, or a directory of `*.csv`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// File, glob or directory. Row IDs derived without an `id` column use the file's path
    /// relative to this root (`2024/q.csv:17`).
    pub path: String,
    /// A field longer than this many bytes is a dead letter (`oversize_field`).
    #[serde(default = "default_max_field_bytes")]
    pub max_field_bytes: usize,
}

fn default_max_field_bytes() -> usize {
    100_000
}

impl CsvConfig {
    /// Refuses settings that cannot work: `(field, message, hint)`.
    fn check_fields(&self) -> Result<(), (&'static str, String, &'static str)> {
        if self.path.is_empty() {
            return Err(("source.path", "is empty".into(), "give a CSV file, a glob like `data/*.csv`, or a directory"));
        }
        if self.max_field_bytes == 0 {
            return Err(("source.max_field_bytes", "must be at least 1".into(), "set it to the largest field you accept, e.g. 100000"));
        }
        Ok(())
    }
}

/// Builds each worker's CSV source over the files the path names (listed once, at start).
pub struct CsvFactory {
    pub config: CsvConfig,
    pub files: Vec<InputFile>,
}

impl SourceFactory for CsvFactory {
    fn kind(&self) -> &'static str {
        "csv"
    }
    fn build(&self, worker: usize, peers: usize, _resume: &[Checkpoint]) -> Result<Box<dyn Source>, SourceError> {
        let files: VecDeque<InputFile> = self.files.iter().enumerate().filter(|(i, _)| i % peers == worker).map(|(_, f)| f.clone()).collect();
        Ok(Box::new(CsvSource { files, open: None, max_field: self.config.max_field_bytes }))
    }
    fn resumable(&self) -> bool {
        false
    }
    fn keying(&self) -> Keying {
        Keying::Table
    }
    fn describe(&self) -> String {
        format!("{} CSV file(s) at {}", self.files.len(), self.config.path)
    }
}

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 1 << 20;

/// A file being read: a window of its bytes, from the first record not yet supplied.
struct OpenFile {
    name: Arc<str>,
    reader: std::fs::File,
    buf: Vec<u8>,
    /// Where the next record starts in `buf`.
    at: usize,
    eof: bool,
    row: u64,
    /// Column names; `None` until the header is read, empty when the header was unusable.
    header: Option<Vec<Arc<str>>>,
    id_col: Option<usize>,
}

impl OpenFile {
    fn open(file: &InputFile) -> std::io::Result<Self> {
        Ok(OpenFile {
            name: file.name.as_str().into(),
            reader: std::fs::File::open(&file.path)?,
            buf: Vec::with_capacity(READ_CHUNK),
            at: 0,
            eof: false,
            row: 0,
            header: None,
            id_col: None,
        })
    }

    /// Reads the next chunk; drops what was already supplied first. A row longer than a chunk
    /// doubles what is read, so that framing it again after each read costs linear time.
    fn fill(&mut self) -> std::io::Result<()> {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + READ_CHUNK.max(len), 0);
        let n = self.reader.read(&mut self.buf[len..])?;
        self.buf.truncate(len + n);
        if n == 0 {
            self.eof = true;
        }
        Ok(())
    }
}

/// Column names as they are written: an empty one is `column_<n>` (1-based), NUL bytes are
/// dropped, a name is cut to 63 bytes, and a repeated name gets `_2`, `_3`, ….
pub fn normalize_header(names: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for (i, raw) in names.iter().enumerate() {
        let mut name: String = raw.trim().chars().filter(|c| *c != '\0').collect();
        if name.is_empty() {
            name = format!("column_{}", i + 1);
        }
        let cut = |s: &mut String, max: usize| {
            if s.len() > max {
                let mut at = max;
                while !s.is_char_boundary(at) {
                    at -= 1;
                }
                s.truncate(at);
            }
        };
        cut(&mut name, 63);
        let base = name.clone();
        let mut k = 1;
        while out.contains(&name) {
            k += 1;
            name = base.clone();
            cut(&mut name, 63 - format!("_{k}").len());
            name.push_str(&format!("_{k}"));
        }
        out.push(name);
    }
    out
}

struct CsvSource {
    files: VecDeque<InputFile>,
    open: Option<OpenFile>,
    max_field: usize,
}

/// Records framed from a buffer by [`frame`].
pub struct Framing<'a> {
    /// `(row number, record)`; the header is row 0.
    pub records: Vec<(u64, Framed<'a>)>,
    /// Where the next record starts in the buffer.
    pub next: usize,
    /// The row number of the last record framed.
    pub row: u64,
    /// The buffer ends inside a record: read more before framing again.
    pub need_more: bool,
}

/// Frames at most `limit` records lying wholly in `data` from `at` (only the header while
/// `header_known` is false). A record cut by the end of the buffer waits for more bytes unless
/// the file is at its end, so a row longer than any field may be (an oversize one) is still one
/// record, held whole until it is refused: memory follows the longest row. Only a quote still
/// open at the end of the buffer stops waiting once its record is longer than `max_field` × 8
/// (at least a read chunk), and is refused as broken quoting.
pub fn frame(data: &[u8], at: usize, row: u64, header_known: bool, eof: bool, max_field: usize, limit: usize) -> Framing<'_> {
    let mut records = Vec::new();
    let end = frame_each(data, at, row, header_known, eof, max_field, limit, |row, rec| {
        records.push((row, rec));
        true
    });
    Framing { records, next: end.next, row: end.row, need_more: end.need_more }
}

/// Where [`frame_each`] stopped.
pub struct FrameEnd {
    /// Where the next record starts in the buffer.
    pub next: usize,
    /// The row number of the last record taken.
    pub row: u64,
    /// The buffer ends inside a record: read more before framing again.
    pub need_more: bool,
    /// Records taken.
    pub taken: usize,
}

/// What [`frame_rows`] hands the records it frames to.
pub trait Framer<'a> {
    /// Called at each record boundary `at` before framing there (`row`: the last row number
    /// taken): `Some((bytes, rows))` when the next `bytes` bytes are `rows` whole records the
    /// framer already knows, which are then passed over without being framed.
    fn skip(&mut self, _data: &'a [u8], _at: usize, _row: u64) -> Option<(usize, usize)> {
        None
    }
    /// One framed record, which lay in `data[from..to]` (`to`: where the next record starts);
    /// false leaves it (and the rest) for the next call.
    fn take(&mut self, row: u64, rec: Framed<'a>, from: usize, to: usize) -> bool;
}

/// A closure taking each record.
struct Each<F>(F);

impl<'a, F: FnMut(u64, Framed<'a>) -> bool> Framer<'a> for Each<F> {
    fn take(&mut self, row: u64, rec: Framed<'a>, _from: usize, _to: usize) -> bool {
        (self.0)(row, rec)
    }
}

/// Frames records as [`frame`] does, handing each to `take` instead of collecting them; `take`
/// returns false to leave a record (and the rest) for the next call.
#[allow(clippy::too_many_arguments)]
pub fn frame_each<'a>(
    data: &'a [u8],
    at: usize,
    row: u64,
    header_known: bool,
    eof: bool,
    max_field: usize,
    limit: usize,
    take: impl FnMut(u64, Framed<'a>) -> bool,
) -> FrameEnd {
    frame_rows(data, at, row, header_known, eof, max_field, limit, &mut Each(take))
}

/// Frames records as [`frame_each`] does, letting `framer` pass over runs of records it knows
/// (each counts as taken).
#[allow(clippy::too_many_arguments)]
pub fn frame_rows<'a>(
    data: &'a [u8],
    at: usize,
    mut row: u64,
    header_known: bool,
    eof: bool,
    max_field: usize,
    limit: usize,
    framer: &mut impl Framer<'a>,
) -> FrameEnd {
    let max_record = max_field.saturating_mul(8).max(READ_CHUNK);
    let mut scanner = Scanner::new(data, max_field);
    if at > 0 || header_known {
        scanner.set_position(at);
    }
    let (mut need_more, mut taken) = (false, 0);
    while taken < limit {
        let before = scanner.position();
        if header_known {
            if let Some((bytes, rows)) = framer.skip(data, before, row) {
                scanner.set_position(before + bytes);
                row += rows as u64;
                taken += rows;
                continue;
            }
        }
        let Some(rec) = scanner.next() else { break };
        // A row the end of the buffer cuts waits for the rest of it, however long it is: a row
        // is one record, and an oversize one is one dead letter, never pieces of one framed as
        // rows of their own. Only a quote that does not close within the buffer stops waiting
        // at `max_record`, since its row could run to the end of the file; it is refused and
        // framing resumes after the line it opened on.
        let unclosed = matches!(&rec.error, Some((DeadReason::BrokenQuoting, d)) if d.contains("never closes"));
        let wait = if unclosed { data.len() - before < max_record } else { rec.offset + rec.bytes.len() == data.len() };
        if wait && !eof {
            scanner.set_position(before);
            need_more = true;
            break;
        }
        let number = if header_known { row + 1 } else { row };
        if !framer.take(number, rec, before, scanner.position()) {
            scanner.set_position(before);
            break;
        }
        taken += 1;
        row = number;
        if !header_known {
            break;
        }
    }
    FrameEnd { next: scanner.position(), row, need_more, taken }
}

/// A file's column names from its header record, or none when the header is unusable; then the
/// refusal is in `out` and the file's records are refused with it.
pub fn header_names(rec: &Framed, file: &Arc<str>, now: u64, out: &mut Vec<RawRecord>) -> Vec<String> {
    let refuse = |reason: DeadReason, detail: String, out: &mut Vec<RawRecord>| {
        out.push(RawRecord {
            bytes: rec.bytes.to_vec(),
            body: Body::Refused(reason, format!("bad header: {detail}; the file's records are refused with it")),
            pos: SourcePos::row(file.clone(), 0),
            id: None,
            ingest_ms: now,
        });
        Vec::new()
    };
    match &rec.error {
        Some((reason, detail)) => refuse(*reason, detail.clone(), out),
        None => match parse_rows(&[rec.bytes], rec.fields) {
            Ok(mut rows) => normalize_header(&rows.remove(0)),
            Err(e) => refuse(DeadReason::BrokenQuoting, e.message, out),
        },
    }
}

/// The column names of a CSV file as its sources read them: the first record, framed and
/// unquoted as RFC 4180 says (a BOM skipped, quoted commas kept), names made usable and unique.
/// Reads at most `max_bytes` of the file; a header longer than that is refused.
pub fn read_header(path: &std::path::Path, max_bytes: usize) -> Result<Vec<String>, ConnectorError> {
    let file = std::fs::File::open(path).map_err(|e| ConnectorError::input(format!("cannot read {}: {e}", path.display())))?;
    let mut head = Vec::new();
    file.take(max_bytes as u64).read_to_end(&mut head).map_err(|e| ConnectorError::input(format!("cannot read {}: {e}", path.display())))?;
    let Some(rec) = Scanner::new(&head, max_bytes).next() else {
        return Err(ConnectorError::input("the file is empty"));
    };
    if rec.offset + rec.bytes.len() >= head.len() && head.len() == max_bytes {
        return Err(ConnectorError::input(format!("the header line is longer than {max_bytes} bytes")));
    }
    let mut refused = Vec::new();
    let names = header_names(&rec, &Arc::from(path.display().to_string()), 0, &mut refused);
    match refused.first().map(|r| &r.body) {
        Some(Body::Refused(_, detail)) => Err(ConnectorError::input(detail.clone())),
        _ => Ok(names),
    }
}

impl Source for CsvSource {
    fn poll(&mut self, _epoch: u64, budget: usize, out: &mut Vec<RawRecord>) -> Result<Poll, SourceError> {
        let now = now_ms();
        while out.len() < budget {
            if self.open.is_none() {
                let Some(file) = self.files.pop_front() else { return Ok(Poll::Done) };
                match OpenFile::open(&file) {
                    Ok(f) => self.open = Some(f),
                    Err(e) => {
                        out.push(RawRecord {
                            bytes: Vec::new(),
                            body: Body::Refused(DeadReason::BrokenQuoting, format!("cannot read {}: {e}", file.path.display())),
                            pos: SourcePos::row(file.name.as_str().into(), 0),
                            id: None,
                            ingest_ms: now,
                        });
                        continue;
                    }
                }
            }
            let f = self.open.as_mut().expect("a file is open");
            // Frame the records wholly inside the buffer.
            let framing = frame(&f.buf, f.at, f.row, f.header.is_some(), f.eof, self.max_field, budget - out.len());
            let (mut framed, need_more) = (framing.records, framing.need_more);
            f.at = framing.next;
            f.row = framing.row;
            if framed.is_empty() {
                if f.eof && !need_more {
                    self.open = None;
                    continue;
                }
                if let Err(e) = f.fill() {
                    let name = f.name.clone();
                    self.open = None;
                    out.push(RawRecord {
                        bytes: Vec::new(),
                        body: Body::Refused(DeadReason::BrokenQuoting, format!("reading {name} failed: {e}")),
                        pos: SourcePos::row(name, 0),
                        id: None,
                        ingest_ms: now,
                    });
                }
                continue;
            }
            if f.header.is_none() {
                let (_, rec) = framed.remove(0);
                let header = header_names(&rec, &f.name, now, out);
                f.id_col = header.iter().position(|h| h == "id");
                f.header = Some(header.into_iter().map(Arc::from).collect());
                continue;
            }
            supply(f, framed, now, out);
        }
        Ok(Poll::More)
    }
}

/// Turns framed records of `f` into raw records: refused ones with their reason, good ones
/// parsed into named fields.
fn supply(f: &OpenFile, framed: Vec<(u64, Framed)>, now: u64, out: &mut Vec<RawRecord>) {
    let header = f.header.as_ref().expect("the header is read");
    let columns = header.len();
    let names = || header.iter().map(|h| &**h).collect::<Vec<&str>>().join(", ");
    let refused = |row: u64, bytes: &[u8], reason: DeadReason, detail: String| RawRecord {
        bytes: bytes.to_vec(),
        body: Body::Refused(reason, detail),
        pos: SourcePos::row(f.name.clone(), row),
        id: None,
        ingest_ms: now,
    };
    let mut slots: Vec<Option<RawRecord>> = Vec::with_capacity(framed.len());
    let mut good: Vec<(usize, u64, &[u8])> = Vec::new();
    for (row, rec) in &framed {
        let slot = if columns == 0 {
            Some(refused(*row, rec.bytes, DeadReason::MissingColumn, "the file has no usable header".into()))
        } else if let Some((reason, detail)) = &rec.error {
            Some(refused(*row, rec.bytes, *reason, detail.clone()))
        } else if rec.fields < columns {
            Some(refused(*row, rec.bytes, DeadReason::MissingColumn, format!("expected {columns} fields ({}), found {}", names(), rec.fields)))
        } else if rec.fields > columns {
            Some(refused(*row, rec.bytes, DeadReason::ExtraColumn, format!("expected {columns} fields ({}), found {}", names(), rec.fields)))
        } else {
            good.push((slots.len(), *row, rec.bytes));
            None
        };
        slots.push(slot);
    }
    let bytes: Vec<&[u8]> = good.iter().map(|(_, _, b)| *b).collect();
    let parsed: Vec<Result<Vec<String>, ConnectorError>> = match parse_rows(&bytes, columns) {
        Ok(rows) => rows.into_iter().map(Ok).collect(),
        // Isolate whichever record arrow refused; the others still parse.
        Err(_) => bytes.iter().map(|b| parse_rows(&[b], columns).map(|mut v| v.remove(0))).collect(),
    };
    for ((slot, row, raw), values) in good.into_iter().zip(parsed) {
        slots[slot] = Some(match values {
            Err(e) => refused(row, raw, DeadReason::BrokenQuoting, e.message),
            Ok(values) => {
                let id = f.id_col.map(|i| values[i].trim().as_bytes().to_vec()).filter(|id| !id.is_empty());
                let fields: Vec<(Arc<str>, String)> = header.iter().cloned().zip(values).collect();
                RawRecord { bytes: raw.to_vec(), body: Body::Fields(fields), pos: SourcePos::row(f.name.clone(), row), id, ingest_ms: now }
            }
        });
    }
    out.extend(slots.into_iter().flatten());
}

/// The kind of each of `columns` columns, by arrow's CSV schema inference over `sample` (the
/// header and the rows after it, up to `INFER_ROWS` of them, cut at the last whole line): integer,
/// float, boolean, timestamp (or date) or text. Anything arrow cannot infer is text.
pub fn infer_kinds(sample: &[u8], columns: usize) -> Arc<[ColumnKind]> {
    let text = Arc::from(vec![ColumnKind::Text; columns]);
    let Some(end) = sample.iter().rposition(|b| *b == b'\n') else { return text };
    let format = arrow::csv::reader::Format::default().with_header(true);
    match format.infer_schema(std::io::Cursor::new(&sample[..end + 1]), Some(INFER_ROWS)) {
        Ok((schema, _)) if schema.fields().len() == columns => schema.fields().iter().map(|f| kind_of(f.data_type())).collect(),
        _ => text,
    }
}

/// Rows a CSV file's column kinds are inferred from.
pub const INFER_ROWS: usize = 1000;

/// The column kind of an arrow data type.
pub fn kind_of(t: &DataType) -> ColumnKind {
    match t {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => ColumnKind::Int,
        DataType::Float16 | DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) | DataType::Decimal256(..) => ColumnKind::Float,
        DataType::Boolean => ColumnKind::Bool,
        DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 => ColumnKind::Timestamp,
        _ => ColumnKind::Text,
    }
}

/// Parses well-framed CSV records into rows of text with arrow-csv. `None` values are empty fields.
/// A record arrow refuses is the input's fault; rows that do not come out as asked are internal.
pub fn parse_rows(records: &[&[u8]], columns: usize) -> Result<Vec<Vec<String>>, ConnectorError> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let fields: Vec<Field> = (0..columns).map(|i| Field::new(format!("c{i}"), DataType::Utf8, true)).collect();
    let schema = Arc::new(Schema::new(fields));
    let mut decoder = arrow::csv::ReaderBuilder::new(schema).with_header(false).with_batch_size(records.len()).build_decoder();
    let mut buf = Vec::with_capacity(records.iter().map(|r| r.len() + 1).sum());
    for r in records {
        buf.extend_from_slice(r);
        buf.push(b'\n');
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        let n = decoder.decode(rest).map_err(|e| ConnectorError::input(e.to_string()))?;
        if n == 0 {
            break;
        }
        rest = &rest[n..];
    }
    let batch = decoder.flush().map_err(|e| ConnectorError::input(e.to_string()))?.ok_or_else(|| ConnectorError::internal("no rows decoded"))?;
    if batch.num_rows() != records.len() {
        return Err(ConnectorError::internal(format!("decoded {} rows from {} records", batch.num_rows(), records.len())));
    }
    let cols: Vec<&StringArray> = (0..columns)
        .map(|i| batch.column(i).as_any().downcast_ref::<StringArray>().ok_or_else(|| ConnectorError::internal("column is not text")))
        .collect::<Result<_, _>>()?;
    Ok((0..batch.num_rows()).map(|r| cols.iter().map(|c| if c.is_null(r) { String::new() } else { c.value(r).to_string() }).collect()).collect())
}

impl SourceConnector for CsvConfig {
    const TYPE: &'static str = "csv";
    const ABOUT: &'static str = "CSV files: one file, a glob, or a directory of `*.csv`";
    fn check(&self) -> Result<(), ConfigError> {
        self.check_fields().map_err(ConfigError::from)
    }
    fn bounded(&self) -> bool {
        true
    }
    fn factory(&self, _pipeline: &str, _runtime: &RuntimeConfig) -> Result<Arc<dyn SourceFactory>, SourceError> {
        Ok(Arc::new(CsvFactory { config: self.clone(), files: super::expand(&self.path)? }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrow_parses_quoted_fields_and_empty_values() {
        let rows = parse_rows(&[b"1,\"a, \"\"b\"\"\",", b"2,plain,x"], 3).unwrap();
        assert_eq!(rows, vec![vec!["1".to_string(), "a, \"b\"".into(), "".into()], vec!["2".into(), "plain".into(), "x".into()]]);
    }

    #[test]
    fn a_files_header_is_read_as_the_source_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.csv");
        std::fs::write(&path, "\u{feff}id,\"question, asked\",context\r\n1,\"a, b\",c\n").unwrap();
        assert_eq!(read_header(&path, 1 << 20).unwrap(), vec!["id", "question, asked", "context"]);
        std::fs::write(&path, "").unwrap();
        assert!(read_header(&path, 1 << 20).unwrap_err().to_string().contains("empty"));
        std::fs::write(&path, "id,\"broken\n").unwrap();
        assert!(read_header(&path, 1 << 20).is_err(), "broken quoting in the header");
        std::fs::write(&path, format!("id,{}\n1,2\n", "x".repeat(100))).unwrap();
        assert!(read_header(&path, 50).unwrap_err().to_string().contains("longer than 50"));
    }

    #[test]
    fn header_names_are_made_usable_and_unique() {
        let names: Vec<String> = ["id", "question", "context", "", " city ", "city", &"x".repeat(80)].iter().map(|s| s.to_string()).collect();
        let got = normalize_header(&names);
        assert_eq!(&got[..6], &["id", "question", "context", "column_4", "city", "city_2"]);
        assert_eq!(got[6].len(), 63);
    }

    /// Reads every record of `text` through the source, with a tiny chunk size in effect by
    /// using a budget of 1 record per poll.
    fn read_all(text: &[u8]) -> Vec<RawRecord> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.csv");
        std::fs::write(&path, text).unwrap();
        let factory = CsvFactory {
            config: CsvConfig { path: path.display().to_string(), max_field_bytes: 1000 },
            files: vec![InputFile { path, name: "sub/q.csv".into() }],
        };
        let mut source = factory.build(0, 1, &[]).unwrap();
        let mut all = Vec::new();
        for _ in 0..100 {
            let mut out = Vec::new();
            let polled = source.poll(0, 1, &mut out).unwrap();
            all.extend(out);
            if polled == Poll::Done {
                break;
            }
        }
        all
    }

    #[test]
    fn records_stream_with_their_rows_ids_and_bytes() {
        let got = read_all(b"id,question,context,\n1,q1,c1,\n,q2,\"two\nlines\",\nbad\n");
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].id.as_deref(), Some(&b"1"[..]));
        match &got[0].body {
            Body::Fields(f) => assert_eq!(f.iter().map(|(k, _)| &**k).collect::<Vec<_>>(), vec!["id", "question", "context", "column_4"]),
            other => panic!("{other:?}"),
        }
        assert_eq!(got[1].id, None, "an empty id cell: the ID is derived");
        assert_eq!(got[1].pos.derived_id(), "sub/q.csv:2");
        assert_eq!(got[1].bytes, b",q2,\"two\nlines\",");
        assert!(matches!(got[2].body, Body::Refused(DeadReason::MissingColumn, _)));
    }

    /// The rows of the oversize tests: a good row, a 12 MiB third field of `A` with no quotes,
    /// a good row, a 3 MiB row whose tail past the long field holds commas, a good row.
    pub(crate) fn oversize_rows() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let huge = [&b"x-huge,What?,"[..], &vec![b'A'; 12 << 20]].concat();
        let big = [&b"x-big,What?,"[..], &vec![b'A'; 3 << 20], b",Who wrote it?,It was written by Ada."].concat();
        let mut text = b"id,question,context\na1,Who?,Ada wrote it.\n".to_vec();
        for (row, next) in [(&huge, "a2,When?,In 1843.\n"), (&big, "a3,Where?,In London.\n")] {
            text.extend_from_slice(row);
            text.push(b'\n');
            text.extend_from_slice(next.as_bytes());
        }
        (text, huge, big)
    }

    #[test]
    fn an_oversize_row_is_one_dead_letter_and_framing_resumes_at_the_next_row() {
        let (text, huge, big) = oversize_rows();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.csv");
        std::fs::write(&path, &text).unwrap();
        let config = CsvConfig { path: path.display().to_string(), max_field_bytes: default_max_field_bytes() };
        let factory = CsvFactory { config, files: vec![InputFile { path, name: "q.csv".into() }] };
        let mut source = factory.build(0, 1, &[]).unwrap();
        let mut got = Vec::new();
        for _ in 0..1000 {
            if source.poll(0, 64, &mut got).unwrap() == Poll::Done {
                break;
            }
        }
        type Row = (u64, Option<Vec<u8>>, usize, Option<DeadReason>);
        let rows: Vec<Row> = got
            .iter()
            .map(|r| {
                let reason = match &r.body {
                    Body::Refused(reason, _) => Some(*reason),
                    _ => None,
                };
                (r.pos.offset, r.id.clone(), r.bytes.len(), reason)
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (1, Some(b"a1".to_vec()), 21, None),
                (2, None, huge.len(), Some(DeadReason::OversizeField)),
                (3, Some(b"a2".to_vec()), 17, None),
                (4, None, big.len(), Some(DeadReason::OversizeField)),
                (5, Some(b"a3".to_vec()), 20, None),
            ]
        );
        assert!(got[1].bytes == huge && got[3].bytes == big, "each dead letter holds its whole row");
    }

    #[test]
    fn quoted_newline_survives_arrow() {
        let rows = parse_rows(&[b"\"two\nlines\",z"], 2).unwrap();
        assert_eq!(rows[0][0], "two\nlines");
    }

    #[test]
    fn column_kinds_are_inferred_from_the_first_rows() {
        let sample = b"id,n,x,flag,at,name\n1,3,1.5,true,2024-03-01T08:15:00,a\n2,-4,2,false,2024-03-02T09:00:00,b\n3,7,3.25,true,2024-03-03T10:30:00,";
        // The last line is cut off (no newline): inference stops at the last whole line.
        let kinds = infer_kinds(sample, 6);
        assert_eq!(&*kinds, &[ColumnKind::Int, ColumnKind::Int, ColumnKind::Float, ColumnKind::Bool, ColumnKind::Timestamp, ColumnKind::Text]);
        assert_eq!(&*infer_kinds(b"a,b\n1,x\n", 3), &[ColumnKind::Text; 3], "a column count that does not match the header's is all text");
        assert_eq!(&*infer_kinds(b"a,b", 2), &[ColumnKind::Text; 2], "no whole line: text");
        assert_eq!(ColumnKind::Int.json(" 42 "), serde_json::json!(42));
        assert_eq!(ColumnKind::Float.json("n/a"), serde_json::json!("n/a"), "a value that does not read as its kind stays text");
        assert_eq!(ColumnKind::Bool.json("TRUE"), serde_json::json!(true));
    }
}
