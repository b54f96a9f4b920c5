//! The decode stage every source shares: raw records become requests or dead letters. It
//! validates the request ID (UTF-8, no NUL byte, at most `runtime.max_id_bytes`; a numeric JSON
//! ID keeps its exact text), refuses text with a NUL byte, renames pass-through fields that
//! clash with sluice's own columns, and runs the task's decoding with its panics contained.

use crate::json::{JsonFields, TextValue};
use crate::record::{content_hash, Column, DeadLetter, DeadReason, Envelope, PassField};
use crate::source::{Body, IdFrom, RawRecord};
use crate::tasks::Task;
use std::sync::Arc;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::Stream;

/// Names sluice writes beside a task's own output columns (`source` is the JSON-lines
/// position); a pass-through field with one of these names (or a task output's name) is renamed
/// by [`passthrough_names`].
pub const RESERVED_COLUMNS: [&str; 7] = ["id", "model", "model_version", "updated_at", "op", "source", "pipeline"];

/// How records are decoded.
#[derive(Clone, Debug)]
pub struct DecodeSettings {
    pub id_from: IdFrom,
    /// A longer request ID is a dead letter (`invalid_id`).
    pub max_id_bytes: usize,
    /// A record that fails to decode retracts its ID's answer (a table's row: a fresh read gives
    /// it none), besides its dead letter. Streams keep an earlier answer of the ID.
    pub retract_failures: bool,
}

/// Checks a request ID; `Ok(None)` for an empty one (the position-derived ID is used).
pub fn check_id(bytes: &[u8], max: usize) -> Result<Option<String>, String> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() > max {
        return Err(format!("the request ID is {} bytes; the limit (runtime.max_id_bytes) is {max}", bytes.len()));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| format!("the request ID is not UTF-8 (at byte {})", e.valid_up_to()))?;
    if let Some(at) = text.bytes().position(|b| b == 0) {
        return Err(format!("the request ID holds a NUL byte at byte {at}"));
    }
    Ok(Some(text.to_string()))
}

fn is_reserved(name: &str, outputs: &[Column]) -> bool {
    RESERVED_COLUMNS.contains(&name) || outputs.iter().any(|c| c.name == name)
}

/// The longest column name Postgres keeps.
const MAX_NAME_BYTES: usize = 63;

/// `name` cut to `max` bytes at a character boundary.
fn cut_name(name: &str, max: usize) -> &str {
    let mut at = name.len().min(max);
    while !name.is_char_boundary(at) {
        at -= 1;
    }
    &name[..at]
}

/// The names pass-through fields are written under, in their order. A name sluice writes itself
/// (one of [`RESERVED_COLUMNS`] or a task output's name) becomes `input_<name>`; when that is
/// taken too (by another pass-through field or a reserved name), `input_<name>_2`, `_3`, …, each
/// cut to 63 bytes. Every other name is kept, so a reserved field never overwrites a pass-through
/// one and no two pass-through fields share a name (a `model` beside an `input_model` is written
/// as `input_model_2`).
pub fn passthrough_names(names: &[&str], outputs: &[Column]) -> Vec<String> {
    if !names.iter().any(|n| is_reserved(n, outputs)) {
        return names.iter().map(|n| n.to_string()).collect();
    }
    let mut taken: std::collections::HashSet<String> = names.iter().filter(|n| !is_reserved(n, outputs)).map(|n| n.to_string()).collect();
    names
        .iter()
        .map(|n| {
            if !is_reserved(n, outputs) {
                return n.to_string();
            }
            let base = format!("input_{n}");
            let mut name = cut_name(&base, MAX_NAME_BYTES).to_string();
            let mut k = 1;
            while taken.contains(&name) || is_reserved(&name, outputs) {
                k += 1;
                let suffix = format!("_{k}");
                name = format!("{}{suffix}", cut_name(&base, MAX_NAME_BYTES - suffix.len()));
            }
            taken.insert(name.clone());
            name
        })
        .collect()
}

/// Decodes one raw record. A dead letter is as common an outcome as a request here, so it is
/// returned by value (boxing it would cost an allocation per bad record for no gain).
#[allow(clippy::result_large_err)]
pub fn decode_record<T: Task>(task: &T, s: &DecodeSettings, rec: RawRecord) -> Result<Envelope<T::Request>, DeadLetter> {
    let RawRecord { bytes, body, pos, id, ingest_ms } = rec;
    let replaces = matches!(body, Body::Typed(_, _, true));
    let dead = |reason, detail: String, bytes: Vec<u8>| DeadLetter::new(pos.clone(), reason, detail, bytes, ingest_ms);
    let mut given = match id.as_deref().map(|b| check_id(b, s.max_id_bytes)) {
        Some(Err(e)) => return Err(dead(DeadReason::InvalidId, e, bytes)),
        Some(Ok(id)) => id,
        None => None,
    };
    let (payload, passthrough) = match body {
        Body::Refused(reason, detail) => return Err(dead(reason, detail, bytes)),
        Body::Delete => {
            let Some(id) = given else {
                return Err(dead(DeadReason::MissingField, "an empty message (a tombstone) without a request ID: nothing to delete".into(), bytes));
            };
            return Ok(Envelope { id, payload: None, passthrough: Vec::new(), pos, ingest_ms, raw: bytes, content: 0, seq: 0, replaces: false });
        }
        Body::Fields(ref fields) | Body::Typed(ref fields, _, _) => {
            if let Some((name, _)) = fields.iter().find(|(_, v)| v.contains('\0')) {
                return Err(dead(DeadReason::InvalidText, format!("field `{name}` holds a NUL byte, which no text column can store"), bytes));
            }
            let named: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (&**k, v.as_str())).collect();
            let kinds = match &body {
                Body::Typed(_, kinds, _) => Some(kinds),
                _ => None,
            };
            let kind_of = |name: &str| kinds.and_then(|k| fields.iter().position(|(n, _)| &**n == name).and_then(|i| k.get(i).copied())).unwrap_or_default();
            match crate::guard::contain(|| task.decode_fields(&named)) {
                Ok(Ok((payload, passthrough))) => (payload, passthrough.into_iter().map(|(k, v)| (kind_of(&k), k, v)).collect::<Vec<_>>()),
                Ok(Err((reason, detail))) => return Err(dead(reason, detail, bytes)),
                Err(panic) => return Err(dead(DeadReason::TaskFailed, format!("the task panicked decoding the record: {panic}"), bytes)),
            }
        }
        Body::Json => {
            let text = match std::str::from_utf8(&bytes) {
                Ok(t) => t,
                Err(e) => return Err(dead(DeadReason::InvalidUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to()), bytes)),
            };
            let obj = match JsonFields::parse(text) {
                Ok(o) => o,
                Err(e) => return Err(dead(DeadReason::NotJson, format!("not a JSON object: {e}"), bytes)),
            };
            if given.is_none() {
                if let IdFrom::Field { name } = &s.id_from {
                    let found = match obj.text(name) {
                        Some(TextValue::String(v)) => check_id(v.as_bytes(), s.max_id_bytes),
                        Some(TextValue::Number(n)) => check_id(n.as_bytes(), s.max_id_bytes),
                        _ => Ok(None),
                    };
                    match found {
                        Ok(id) => given = id,
                        Err(e) => return Err(dead(DeadReason::InvalidId, e, bytes)),
                    }
                }
            }
            match crate::guard::contain(|| task.decode_json(&obj)) {
                Ok(Ok(payload)) => (payload, Vec::new()),
                Ok(Err((reason, detail))) => return Err(dead(reason, detail, bytes)),
                Err(panic) => return Err(dead(DeadReason::TaskFailed, format!("the task panicked decoding the message: {panic}"), bytes)),
            }
        }
    };
    let names = passthrough_names(&passthrough.iter().map(|(_, k, _)| k.as_str()).collect::<Vec<_>>(), task.output_columns());
    let passthrough = passthrough.into_iter().zip(names).map(|((kind, _, v), name)| PassField { name, value: v, kind }).collect();
    let id = given.unwrap_or_else(|| pos.derived_id());
    let content = content_hash(&bytes);
    Ok(Envelope { id, payload: Some(payload), passthrough, pos, ingest_ms, raw: bytes, content, seq: 0, replaces })
}

/// The decode operator: requests out of the first stream, dead letters out of the second. Each
/// activation runs inside `span` (the job's `<pipeline>.decode`).
#[allow(clippy::type_complexity)]
pub fn decode<'s, T: Task>(
    records: Stream<'s, u64, Vec<RawRecord>>,
    task: Arc<T>,
    settings: DecodeSettings,
    span: tracing::Span,
) -> (Stream<'s, u64, Vec<Envelope<T::Request>>>, Stream<'s, u64, Vec<DeadLetter>>) {
    let mut builder = OperatorBuilder::new("Decode".to_owned(), records.scope());
    let mut input = builder.new_input(records, Pipeline);
    let (ok_out, ok_stream) = builder.new_output::<Vec<Envelope<T::Request>>>();
    let (dead_out, dead_stream) = builder.new_output::<Vec<DeadLetter>>();
    let mut ok_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<Envelope<T::Request>>>>::from(ok_out);
    let mut dead_out = OutputBuilder::<_, CapacityContainerBuilder<Vec<DeadLetter>>>::from(dead_out);
    builder.build(move |_| {
        move |_frontiers| {
            let _entered = span.enter();
            let mut ok = ok_out.activate();
            let mut dead = dead_out.activate();
            input.for_each(|cap, data| {
                let Some(&time) = cap.least() else { return };
                let ok_cap = cap.delayed(&time, 0);
                let mut ok_session = ok.session(&ok_cap);
                let mut refused = Vec::new();
                for rec in data.drain(..) {
                    // The ID of a row that replaces an answer, for a retraction should it fail.
                    let given = if settings.retract_failures && matches!(rec.body, Body::Typed(_, _, true)) { rec.id.clone() } else { None };
                    match decode_record(task.as_ref(), &settings, rec) {
                        Ok(env) => ok_session.give(env),
                        Err(d) => {
                            if let Some(Ok(Some(id))) = given.map(|b| check_id(&b, settings.max_id_bytes)) {
                                let (pos, ingest_ms) = (d.pos.clone(), d.ingest_ms);
                                ok_session.give(Envelope {
                                    id,
                                    payload: None,
                                    passthrough: Vec::new(),
                                    pos,
                                    ingest_ms,
                                    raw: Vec::new(),
                                    content: 0,
                                    seq: 0,
                                    replaces: false,
                                });
                            }
                            refused.push(d)
                        }
                    }
                }
                drop(ok_session);
                if !refused.is_empty() {
                    let dcap = cap.delayed(&time, 1);
                    dead.session(&dcap).give_iterator(refused.into_iter());
                }
            });
        }
    });
    (ok_stream, dead_stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_nul_too_long_or_not_utf8_are_refused_and_empty_ones_derived() {
        assert_eq!(check_id(b"ride-1", 512), Ok(Some("ride-1".into())));
        assert_eq!(check_id(b"", 512), Ok(None));
        assert!(check_id(b"poison\0id", 512).unwrap_err().contains("NUL"));
        assert!(check_id(&[b'x'; 8200], 512).unwrap_err().contains("8200 bytes"));
        assert!(check_id(b"\xff\xfe", 512).unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn passthrough_names_that_clash_with_sluices_own_get_a_prefix() {
        let outputs = [Column { name: "answer", kind: crate::record::ColumnKind::Text }];
        let names = passthrough_names(&["model", "answer", "updated_at", "city"], &outputs);
        assert_eq!(names, vec!["input_model", "input_answer", "input_updated_at", "city"]);
    }

    #[test]
    fn a_reserved_name_never_collides_with_a_passthrough_column() {
        let outputs = [Column { name: "answer", kind: crate::record::ColumnKind::Text }];
        // `source` is what JSON lines write the position under: the column is kept beside it.
        assert_eq!(passthrough_names(&["source", "city"], &outputs), vec!["input_source", "city"]);
        // `model` would become `input_model`, which the file already has: a numeric suffix.
        assert_eq!(passthrough_names(&["model", "input_model"], &outputs), vec!["input_model_2", "input_model"]);
        assert_eq!(passthrough_names(&["input_model", "model", "input_model_2"], &outputs), vec!["input_model", "input_model_3", "input_model_2"]);
        // Two renamed fields never meet either, and a long name is cut to 63 bytes with its suffix.
        assert_eq!(passthrough_names(&["answer", "input_answer", "op"], &outputs), vec!["input_answer_2", "input_answer", "input_op"]);
        let long = "m".repeat(63);
        let got = passthrough_names(&["model", &long, "id"], &[Column { name: "m", kind: crate::record::ColumnKind::Text }]);
        assert_eq!(got, vec!["input_model".to_string(), long.clone(), "input_id".to_string()]);
        let output: &'static str = Box::leak(long.clone().into_boxed_str());
        let cut = format!("input_{}", &long[..57]);
        let got = passthrough_names(&[&long, &cut], &[Column { name: output, kind: crate::record::ColumnKind::Text }]);
        assert_eq!(got, vec![format!("input_{}_2", &long[..55]), cut.clone()]);
        assert_eq!(got[0].len(), 63);
        let mut all = got.clone();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 2, "no two names alike: {got:?}");
    }
}
