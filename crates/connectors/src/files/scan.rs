//! CSV framing and validation: splits a file into records, keeping each record's exact bytes, and
//! says what is wrong with a bad one (broken quoting, oversize field, invalid UTF-8) so that it
//! becomes a dead letter while the rest of the file goes on.

use sluice_core::record::DeadReason;

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
    /// `data[valid.0..valid.1]` is known to be valid UTF-8: it is checked a block at a time, so
    /// a record inside it needs no check of its own.
    valid: (usize, usize),
}

/// How far past a record the UTF-8 check of a block reaches.
const UTF8_BLOCK: usize = 64 << 10;

impl<'a> Scanner<'a> {
    pub fn new(data: &'a [u8], max_field: usize) -> Self {
        let bom = if data.starts_with(&[0xEF, 0xBB, 0xBF]) { 3 } else { 0 };
        Scanner { data, pos: bom, max_field, valid: (0, 0) }
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

impl<'a> Scanner<'a> {
    /// Where the first invalid UTF-8 byte of `data[start..end]` is, relative to `start`.
    fn utf8_error(&mut self, start: usize, end: usize) -> Option<usize> {
        if start >= self.valid.0 && end <= self.valid.1 {
            return None;
        }
        let to = end.max(start + UTF8_BLOCK).min(self.data.len());
        let valid_up_to = match std::str::from_utf8(&self.data[start..to]) {
            Ok(_) => to - start,
            Err(e) => e.valid_up_to(),
        };
        self.valid = (start, start + valid_up_to);
        (valid_up_to < end - start).then_some(valid_up_to)
    }

    /// Frames a record that has a quote or a long line, field by field: where it ends, its
    /// field count and its first oversize field, or the record refused for broken quoting.
    fn frame_slowly(&mut self, start: usize) -> Result<(usize, usize, Option<usize>), RawRecord<'a>> {
        let d = self.data;
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
                    match memchr::memchr(b'"', &d[i..]) {
                        None => {
                            return Err(self.resync(start, DeadReason::BrokenQuoting, format!("field {fields} opens a quote that never closes")));
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
                    return Err(self.resync(start, DeadReason::BrokenQuoting, format!("field {fields} has text after its closing quote")));
                }
            } else {
                i += memchr::memchr3(b',', b'\n', b'\r', &d[i..]).unwrap_or(d.len() - i);
            }
            if i - field_start > self.max_field && oversize.is_none() {
                oversize = Some(fields);
            }
            if i < d.len() && d[i] == b',' {
                i += 1;
                continue;
            }
            return Ok((i, fields, oversize));
        }
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
        // Most records are a line with no quote, no longer than a field may be: their fields
        // are counted by their commas.
        let rest = &d[start..];
        let stop = memchr::memchr3(b'\n', b'\r', b'"', rest).unwrap_or(rest.len());
        let (end, fields, oversize) = if rest.get(stop) != Some(&b'"') && stop <= self.max_field {
            (start + stop, memchr::memchr_iter(b',', &rest[..stop]).count() + 1, None)
        } else {
            match self.frame_slowly(start) {
                Ok(framed) => framed,
                Err(refused) => return Some(refused),
            }
        };
        self.skip_terminator(end);
        let bytes = &d[start..end];
        let error = if let Some(f) = oversize {
            Some((DeadReason::OversizeField, format!("field {f} is longer than {} bytes", self.max_field)))
        } else {
            self.utf8_error(start, end).map(|at| (DeadReason::InvalidUtf8, format!("invalid UTF-8 at byte {at} of the record")))
        };
        Some(RawRecord { bytes, offset: start, fields, error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(s: &[u8]) -> Vec<(String, usize, Option<DeadReason>)> {
        scan_with(s, 20)
    }

    fn scan_with(s: &[u8], max_field: usize) -> Vec<(String, usize, Option<DeadReason>)> {
        Scanner::new(s, max_field).map(|r| (String::from_utf8_lossy(r.bytes).to_string(), r.fields, r.error.map(|e| e.0))).collect()
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

    #[test]
    fn utf8_is_checked_a_block_at_a_time_and_still_caught_per_record() {
        // Multi-byte characters across the 64 KiB block boundaries, and two bad records.
        let mut data = Vec::new();
        for i in 0..20_000 {
            if i == 7_000 || i == 19_999 {
                data.extend_from_slice(b"bad,\xc3(\n");
            } else {
                data.extend_from_slice("ü,é€\n".as_bytes());
            }
        }
        let got = scan_with(&data, 100);
        assert_eq!(got.len(), 20_000);
        let bad: Vec<usize> = got.iter().enumerate().filter(|(_, r)| r.2.is_some()).map(|(i, _)| i).collect();
        assert_eq!(bad, vec![7_000, 19_999]);
        assert!(got.iter().all(|r| r.1 == 2));
    }

    #[test]
    fn the_quick_path_and_the_field_by_field_path_agree() {
        // The same records with and without a quote somewhere in them.
        let plain = scan(b"a,bb,,ccc\n1,2\r\n,\n");
        let quoted = scan(b"\"a\",bb,,ccc\n\"1\",2\r\n\"\",\n");
        assert_eq!(plain.iter().map(|r| r.1).collect::<Vec<_>>(), vec![4, 2, 2]);
        assert_eq!(quoted.iter().map(|r| r.1).collect::<Vec<_>>(), vec![4, 2, 2]);
        // A long line is framed field by field, so only a long field is oversize.
        let long = format!("{},{}\n", "x".repeat(15), "y".repeat(15));
        assert_eq!(scan(long.as_bytes())[0].2, None, "a 31-byte line of two 15-byte fields is fine at 20");
    }
}
