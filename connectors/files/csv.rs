//! The CSV source: a timely operator that reads this worker's share of the input files, frames
//! and validates every record, parses the good ones with arrow-csv, and emits requests and dead
//! letters in epochs of `epoch_records`, pausing while too many epochs are not yet durable.

use super::scan::{RawRecord, Scanner};
use super::InputFile;
use crate::progress::Progress;
use crate::record::{now_ms, DeadLetter, DeadReason, Envelope, SourcePos};
use crate::tasks::Task;
use arrow::array::{Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::{ProbeHandle, Scope};

/// Settings of the CSV source.
#[derive(Clone, Debug)]
pub struct CsvSettings {
    pub max_field_bytes: usize,
    pub epoch_records: usize,
    pub max_epochs_in_flight: u64,
}

/// Parses well-framed CSV records into rows of text with arrow-csv. `None` values are empty fields.
pub fn parse_rows(records: &[&[u8]], columns: usize) -> Result<Vec<Vec<String>>, String> {
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
        let n = decoder.decode(rest).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        rest = &rest[n..];
    }
    let batch = decoder.flush().map_err(|e| e.to_string())?.ok_or("no rows decoded")?;
    if batch.num_rows() != records.len() {
        return Err(format!("decoded {} rows from {} records", batch.num_rows(), records.len()));
    }
    let cols: Vec<&StringArray> =
        (0..columns).map(|i| batch.column(i).as_any().downcast_ref::<StringArray>().ok_or("column is not text")).collect::<Result<_, _>>()?;
    Ok((0..batch.num_rows()).map(|r| cols.iter().map(|c| if c.is_null(r) { String::new() } else { c.value(r).to_string() }).collect()).collect())
}

struct OpenFile {
    file: InputFile,
    data: Vec<u8>,
    pos: usize,
    row: u64,
    header: Vec<String>,
}

/// The outcome of reading one record.
enum Item<R> {
    Ok(Envelope<R>),
    Dead(DeadLetter),
}

/// Reads, validates and decodes up to `limit` records from `open`.
fn read_chunk<T: Task>(task: &T, open: &mut OpenFile, limit: usize, max_field: usize) -> Vec<Item<T::Request>> {
    let mut scanner = Scanner::new(&open.data, max_field);
    scanner.set_position(open.pos);
    let mut raw: Vec<(u64, RawRecord)> = Vec::with_capacity(limit);
    for rec in scanner.by_ref().take(limit) {
        open.row += 1;
        raw.push((open.row, rec));
    }
    open.pos = scanner.position();
    let now = now_ms();
    let pos = |row: u64, rec: &RawRecord| SourcePos::File { file: open.file.name.clone(), row, byte_offset: rec.offset as u64 };
    let dead = |row, rec: &RawRecord, reason, detail| Item::Dead(DeadLetter { pos: pos(row, rec), reason, detail, raw: rec.bytes.to_vec(), ingest_ms: now });
    let columns = open.header.len();
    let mut out = Vec::with_capacity(raw.len());
    let mut good: Vec<&(u64, RawRecord)> = Vec::new();
    for item in &raw {
        let (row, rec) = item;
        if let Some((reason, detail)) = &rec.error {
            out.push((*row, dead(*row, rec, *reason, detail.clone())));
        } else if rec.fields < columns {
            out.push((
                *row,
                dead(*row, rec, DeadReason::MissingColumn, format!("expected {columns} fields ({}), found {}", open.header.join(", "), rec.fields)),
            ));
        } else if rec.fields > columns {
            out.push((*row, dead(*row, rec, DeadReason::ExtraColumn, format!("expected {columns} fields ({}), found {}", open.header.join(", "), rec.fields))));
        } else {
            good.push(item);
        }
    }
    let bytes: Vec<&[u8]> = good.iter().map(|(_, r)| r.bytes).collect();
    let parsed: Vec<Result<Vec<String>, String>> = match parse_rows(&bytes, columns) {
        Ok(rows) => rows.into_iter().map(Ok).collect(),
        // Isolate whichever record arrow refused; the others still parse.
        Err(_) => bytes.iter().map(|b| parse_rows(&[b], columns).map(|mut v| v.remove(0))).collect(),
    };
    let id_col = open.header.iter().position(|h| h == "id");
    for ((row, rec), values) in good.into_iter().zip(parsed) {
        let values = match values {
            Ok(v) => v,
            Err(e) => {
                out.push((*row, dead(*row, rec, DeadReason::BrokenQuoting, e)));
                continue;
            }
        };
        let fields: Vec<(&str, &str)> = open.header.iter().map(|h| h.as_str()).zip(values.iter().map(|v| v.as_str())).collect();
        match task.decode_fields(&fields) {
            Ok((payload, passthrough)) => {
                let id = match id_col.map(|i| values[i].trim()) {
                    Some(id) if !id.is_empty() => id.to_string(),
                    _ => format!("{}:{}", open.file.name, row),
                };
                out.push((*row, Item::Ok(Envelope { id, payload, passthrough, pos: pos(*row, rec), ingest_ms: now })));
            }
            Err((reason, detail)) => out.push((*row, dead(*row, rec, reason, detail))),
        }
    }
    out.sort_by_key(|(row, _)| *row);
    out.into_iter().map(|(_, item)| item).collect()
}

/// Opens a file and reads its header. A file whose header is unusable becomes one dead letter
/// holding the whole file.
fn open_file(file: &InputFile, max_field: usize) -> Result<OpenFile, DeadLetter> {
    let refuse = |detail: String, raw: Vec<u8>| DeadLetter {
        pos: SourcePos::File { file: file.name.clone(), row: 0, byte_offset: 0 },
        reason: DeadReason::BrokenQuoting,
        detail,
        raw,
        ingest_ms: now_ms(),
    };
    let data = std::fs::read(&file.path).map_err(|e| refuse(format!("cannot read {}: {e}", file.path.display()), Vec::new()))?;
    let mut scanner = Scanner::new(&data, max_field);
    let header = match scanner.next() {
        None => Vec::new(),
        Some(rec) => {
            if let Some((reason, detail)) = rec.error {
                let mut d = refuse(format!("bad header: {detail}"), data.clone());
                d.reason = reason;
                return Err(d);
            }
            parse_rows(&[rec.bytes], rec.fields)
                .map_err(|e| refuse(format!("bad header: {e}"), data.clone()))?
                .remove(0)
                .into_iter()
                .map(|h| h.trim().to_string())
                .collect()
        }
    };
    let pos = scanner.position();
    Ok(OpenFile { file: file.clone(), data, pos, row: 0, header })
}

/// Counts the data records of a file (for the progress bar).
pub fn count_records(file: &InputFile, max_field: usize) -> u64 {
    std::fs::read(&file.path).map(|d| Scanner::new(&d, max_field).count().saturating_sub(1) as u64).unwrap_or(0)
}

/// Builds the source operator for this worker's `files`. Outputs: requests, dead letters, and an
/// offsets stream that stays empty.
pub fn csv_source<'s, T: Task>(
    scope: Scope<'s, u64>,
    files: Vec<InputFile>,
    task: Arc<T>,
    settings: CsvSettings,
    durable: ProbeHandle<u64>,
    progress: Arc<Progress>,
) -> crate::connectors::kafka::source::SourceStreams<'s, T::Request> {
    let mut builder = OperatorBuilder::new("CsvSource".to_owned(), scope);
    let (ok_out, ok_stream) = builder.new_output::<Vec<Envelope<T::Request>>>();
    let (dead_out, dead_stream) = builder.new_output::<Vec<DeadLetter>>();
    // Files carry no offsets: rerunning a file is made safe by the upsert by ID.
    let (_offsets_out, offsets_stream) = builder.new_output::<Vec<crate::connectors::kafka::source::SourceOffset>>();
    let mut ok_out = OutputBuilder::<_, timely::container::CapacityContainerBuilder<Vec<Envelope<T::Request>>>>::from(ok_out);
    let mut dead_out = OutputBuilder::<_, timely::container::CapacityContainerBuilder<Vec<DeadLetter>>>::from(dead_out);
    let activator = scope.activator_for(builder.operator_info().address);

    builder.build(move |caps| {
        let mut caps = Some(caps);
        let mut epoch: u64 = 0;
        let mut pending: std::collections::VecDeque<InputFile> = files.into_iter().collect();
        let mut open: Option<OpenFile> = None;
        let mut counted = false;
        move |_frontiers| {
            let Some(cs) = caps.as_mut() else { return };
            if !counted {
                counted = true;
                let total: u64 = pending.iter().map(|f| count_records(f, settings.max_field_bytes)).sum();
                progress.total.fetch_add(total, Ordering::Relaxed);
            }
            // Backpressure: pause while too many epochs are not yet durable at the sinks.
            let oldest = durable.with_frontier(|f| f.first().copied()).unwrap_or(epoch);
            let in_flight = epoch.saturating_sub(oldest);
            metrics::gauge!(crate::metrics::EPOCHS_IN_FLIGHT).set(in_flight as f64);
            if in_flight >= settings.max_epochs_in_flight {
                // Files wait for throughput, not latency: poll the sinks' progress gently.
                activator.activate_after(Duration::from_millis(5));
                return;
            }
            let mut ok = ok_out.activate();
            let mut dead = dead_out.activate();
            let mut ok_session = ok.session(&cs[0]);
            let mut dead_session = dead.session(&cs[1]);
            let mut budget = settings.epoch_records;
            let mut read = 0u64;
            while budget > 0 {
                if open.is_none() {
                    let Some(file) = pending.pop_front() else {
                        break;
                    };
                    match open_file(&file, settings.max_field_bytes) {
                        Ok(f) => open = Some(f),
                        Err(d) => {
                            dead_session.give(d);
                            continue;
                        }
                    }
                }
                let f = open.as_mut().expect("a file is open");
                let items = read_chunk(task.as_ref(), f, budget, settings.max_field_bytes);
                if items.is_empty() {
                    open = None;
                    continue;
                }
                budget = budget.saturating_sub(items.len());
                read += items.len() as u64;
                for item in items {
                    match item {
                        Item::Ok(env) => ok_session.give(env),
                        Item::Dead(d) => dead_session.give(d),
                    }
                }
            }
            drop(ok_session);
            drop(dead_session);
            progress.read.fetch_add(read, Ordering::Relaxed);
            metrics::counter!(crate::metrics::SOURCE_RECORDS, "connector" => "csv").increment(read);
            if open.is_none() && pending.is_empty() {
                caps = None;
            } else {
                epoch += 1;
                for c in cs.iter_mut() {
                    c.downgrade(&epoch);
                }
                activator.activate();
            }
        }
    });
    (ok_stream, dead_stream, offsets_stream)
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
    fn quoted_newline_survives_arrow() {
        let rows = parse_rows(&[b"\"two\nlines\",z"], 2).unwrap();
        assert_eq!(rows[0][0], "two\nlines");
    }
}
