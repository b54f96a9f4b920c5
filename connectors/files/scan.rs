//! CSV framing and validation: splits a file into records, keeping each record's exact bytes, and
//! says what is wrong with a bad one (broken quoting, oversize field, invalid UTF-8) so that it
//! becomes a dead letter while the rest of the file goes on.

use crate::record::DeadReason;

/// One record as it stands in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// The exact bytes, line terminator excluded.
    pub bytes: &'a [u8],
    /// Byte offset of the record in the file.
    pub offset: usize,
    /// Number of fields (for a well-framed record).
    pub fields: usize,
    /// Why the record is bad, if it is.
    pub error: Option<(DeadReason, String)>,
}

/// Splits CSV bytes into records (RFC 4180 quoting; `\n`, `\r\n` or `\r` line ends; blank lines skipped).
pub struct Scanner<'a> {
    data: &'a [u8],
    pos: usize,
    max_field: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(data: &'a [u8], max_field: usize) -> Self {
        let bom = if data.starts_with(&[0xEF, 0xBB, 0xBF]) { 3 } else { 0 };
        Scanner { data, pos: bom, max_field }
    }

    /// Where the next record starts.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Resumes scanning at `pos` (a value from [`Scanner::position`]).
    pub fn set_position(&mut self, pos: usize) {
        self.pos = pos.min(self.data.len());
    }

    fn line_end_from(&self, from: usize) -> usize {
        self.data[from..].iter().position(|&b| b == b'\n' || b == b'\r').map_or(self.data.len(), |p| from + p)
    }

    fn skip_terminator(&mut self, at: usize) {
        let mut p = at;
        if p < self.data.len() && self.data[p] == b'\r' {
            p += 1;
        }
        if p < self.data.len() && self.data[p] == b'\n' {
            p += 1;
        }
        self.pos = p;
    }

    /// A bad record running to the end of the line where it started; scanning resumes on the next line.
    fn resync(&mut self, start: usize, reason: DeadReason, detail: String) -> RawRecord<'a> {
        let end = self.line_end_from(start);
        self.skip_terminator(end);
        RawRecord { bytes: &self.data[start..end], offset: start, fields: 0, error: Some((reason, detail)) }
    }
}

impl<'a> Iterator for Scanner<'a> {
    type Item = RawRecord<'a>;

    fn next(&mut self) -> Option<RawRecord<'a>> {
        let d = self.data;
        // Skip blank lines.
        while self.pos < d.len() && (d[self.pos] == b'\n' || d[self.pos] == b'\r') {
            self.pos += 1;
        }
        if self.pos >= d.len() {
            return None;
        }
        let start = self.pos;
        let mut i = start;
        let mut fields = 0usize;
        let mut oversize: Option<usize> = None;
        loop {
            // At the start of a field.
            fields += 1;
            let field_start = i;
            if i < d.len() && d[i] == b'"' {
                i += 1;
                loop {
                    match d[i..].iter().position(|&b| b == b'"') {
                        None => {
                            return Some(self.resync(start, DeadReason::BrokenQuoting, format!("field {fields} opens a quote that never closes")));
                        }
                        Some(p) => {
                            i += p + 1;
                            if i < d.len() && d[i] == b'"' {
                                i += 1; // an escaped quote
                                continue;
                            }
                            break;
                        }
                    }
                }
                if i < d.len() && !matches!(d[i], b',' | b'\n' | b'\r') {
                    return Some(self.resync(start, DeadReason::BrokenQuoting, format!("field {fields} has text after its closing quote")));
                }
            } else {
                while i < d.len() && !matches!(d[i], b',' | b'\n' | b'\r') {
                    i += 1;
                }
            }
            if i - field_start > self.max_field && oversize.is_none() {
                oversize = Some(fields);
            }
            if i < d.len() && d[i] == b',' {
                i += 1;
                continue;
            }
            break;
        }
        let end = i;
        self.skip_terminator(end);
        let bytes = &d[start..end];
        let error = if let Some(f) = oversize {
            Some((DeadReason::OversizeField, format!("field {f} is longer than {} bytes", self.max_field)))
        } else if let Err(e) = std::str::from_utf8(bytes) {
            Some((DeadReason::InvalidUtf8, format!("invalid UTF-8 at byte {} of the record", e.valid_up_to())))
        } else {
            None
        };
        Some(RawRecord { bytes, offset: start, fields, error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(s: &[u8]) -> Vec<(String, usize, Option<DeadReason>)> {
        Scanner::new(s, 20).map(|r| (String::from_utf8_lossy(r.bytes).to_string(), r.fields, r.error.map(|e| e.0))).collect()
    }

    #[test]
    fn plain_and_quoted_fields() {
        let got = scan(b"a,b,c\n\"x, y\",\"say \"\"hi\"\"\",z\r\n1,,3");
        assert_eq!(got, vec![("a,b,c".into(), 3, None), ("\"x, y\",\"say \"\"hi\"\"\",z".into(), 3, None), ("1,,3".into(), 3, None),]);
    }

    #[test]
    fn quoted_newlines_stay_in_one_record() {
        let got = scan(b"q,c\n\"two\nlines\",c2\nlast,row\n");
        assert_eq!(got[1], ("\"two\nlines\",c2".into(), 2, None));
        assert_eq!(got[2].0, "last,row");
    }

    #[test]
    fn text_after_closing_quote_is_broken_quoting_and_scanning_goes_on() {
        let got = scan(b"\"ab\"cd,e\nok,1\n");
        assert_eq!(got[0].2, Some(DeadReason::BrokenQuoting));
        assert_eq!(got[0].0, "\"ab\"cd,e");
        assert_eq!(got[1], ("ok,1".into(), 2, None));
    }

    #[test]
    fn unterminated_quote_loses_only_its_own_line() {
        let got = scan(b"a,\"never closed\nnext,row\n");
        assert_eq!(got[0].2, Some(DeadReason::BrokenQuoting));
        assert_eq!(got[0].0, "a,\"never closed");
        assert_eq!(got[1], ("next,row".into(), 2, None));
    }

    #[test]
    fn oversize_and_invalid_utf8_are_flagged() {
        let got = scan(b"short,xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\nbad,\xff\xfe\nfine,1\n");
        assert_eq!(got[0].2, Some(DeadReason::OversizeField));
        assert_eq!(got[1].2, Some(DeadReason::InvalidUtf8));
        assert_eq!(got[2].2, None);
    }

    #[test]
    fn blank_lines_and_bom_are_skipped() {
        let got = scan(b"\xEF\xBB\xBFh1,h2\n\n\r\nv1,v2");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "h1,h2");
    }

    #[test]
    fn trailing_empty_field_counts() {
        let got = scan(b"a,b,\n");
        assert_eq!(got[0].1, 3);
    }
}
