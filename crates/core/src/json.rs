//! Zero-copy JSON objects for decoding messages: the top-level fields are split out once, their
//! names and raw values borrowed from the message bytes, and a value is parsed only when a task
//! asks for it with the type it needs. No `serde_json::Value` tree is built per message.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The top-level fields of one JSON object, in message order, borrowed from the message.
#[derive(Debug)]
pub struct JsonFields<'a> {
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// What a field's raw value turned out to be when read as text.
#[derive(Debug, PartialEq)]
pub enum TextValue {
    /// A JSON string, unescaped.
    String(String),
    /// A JSON number, exactly as written in the message.
    Number(String),
    /// Anything else (object, array, boolean, null).
    Other,
}

impl<'a> JsonFields<'a> {
    /// Splits `text` into its top-level fields. The error says why it is not a JSON object.
    pub fn parse(text: &'a str) -> Result<Self, String> {
        serde_json::from_str::<JsonFields<'a>>(text).map_err(|e| e.to_string())
    }

    /// The raw value of field `name`; with a repeated name the last one wins, as in serde_json.
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.fields.iter().rev().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// Every field, in message order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.fields.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    /// Field `name` as an integer; `Err` carries the raw text when it is present but not an integer.
    /// The raw text is a valid JSON value, so Rust's own integer parser reads exactly the JSON
    /// integers (no sign `+`, no whitespace, no quotes can reach it).
    pub fn i64(&self, name: &str) -> Option<Result<i64, &'a str>> {
        self.get(name).map(|raw| raw.get().parse::<i64>().map_err(|_| raw.get()))
    }

    /// Field `name` as a number (integers included), correctly rounded. A JSON string, `true` or
    /// `null` is refused; `inf` and `NaN` are not JSON values, so they cannot reach the parser.
    pub fn f64(&self, name: &str) -> Option<Result<f64, &'a str>> {
        self.get(name).map(|raw| {
            let s = raw.get();
            match s.as_bytes().first() {
                Some(b'-' | b'0'..=b'9') => s.parse::<f64>().map_err(|_| s),
                _ => Err(s),
            }
        })
    }

    /// Field `name` read as text: a string or a number.
    pub fn text(&self, name: &str) -> Option<TextValue> {
        self.get(name).map(text_value)
    }
}

/// A raw value read as text.
pub fn text_value(raw: &RawValue) -> TextValue {
    let s = raw.get();
    match s.as_bytes().first() {
        // A string without escapes is its bytes between the quotes.
        Some(b'"') if !s.contains('\\') => TextValue::String(s[1..s.len() - 1].to_string()),
        Some(b'"') => serde_json::from_str::<String>(s).map(TextValue::String).unwrap_or(TextValue::Other),
        // A number keeps its exact text: no round trip through f64, so distinct IDs stay distinct.
        Some(b'-' | b'0'..=b'9') => TextValue::Number(s.to_string()),
        _ => TextValue::Other,
    }
}

/// A field name: borrowed unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> Deserialize<'de> for JsonFields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = JsonFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JsonFields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    fields.push((k.0, v));
                }
                Ok(JsonFields { fields })
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_borrowed_and_parsed_on_demand() {
        let f = JsonFields::parse(r#"{"a": 1, "b": 2.5, "c": "x\"y", "d\u0041": [1, {"e": 2}], "a": 7}"#).unwrap();
        assert_eq!(f.i64("a"), Some(Ok(7)), "the last of a repeated name wins");
        assert_eq!(f.f64("b"), Some(Ok(2.5)));
        assert_eq!(f.f64("a"), Some(Ok(7.0)), "an integer is a number");
        assert_eq!(f.i64("b"), Some(Err("2.5")));
        assert_eq!(f.i64("c"), Some(Err(r#""x\"y""#)));
        assert_eq!(f.text("c"), Some(TextValue::String("x\"y".into())));
        let g = JsonFields::parse(r#"{"s": "plain", "e": "tab\tend", "n": -1.5e3, "t": true, "z": null, "q": "12"}"#).unwrap();
        assert_eq!(g.text("s"), Some(TextValue::String("plain".into())));
        assert_eq!(g.text("e"), Some(TextValue::String("tab\tend".into())), "escapes are decoded");
        assert_eq!(g.f64("n"), Some(Ok(-1500.0)));
        assert_eq!(g.i64("n"), Some(Err("-1.5e3")));
        for name in ["t", "z", "q", "s"] {
            assert!(matches!(g.f64(name), Some(Err(_))), "{name} is not a number");
            assert!(matches!(g.i64(name), Some(Err(_))), "{name} is not an integer");
        }
        assert_eq!(f.text("b"), Some(TextValue::Number("2.5".into())));
        assert_eq!(f.text("dA"), Some(TextValue::Other), "an escaped name is unescaped");
        assert_eq!(f.get("missing").map(|r| r.get()), None);
        assert_eq!(f.iter().count(), 5);
    }

    #[test]
    fn what_is_not_an_object_is_refused() {
        for bad in ["", "{", "[1, 2]", "42", "\"text\"", "{\"a\": }", "{\"a\": 1} trailing"] {
            assert!(JsonFields::parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(JsonFields::parse("{}").unwrap().iter().next().is_none());
    }
}
