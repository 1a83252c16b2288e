//! The field types the CLI migrates, one row of facts per type: its name in `envelope.toml`,
//! its plaintext width, whether its plaintext is text, the shape its source column is read in,
//! and how two plaintexts compare. The codec is `values.rs`; the SQL that reads and writes a
//! source column of each type on each database is `plan::source_sql`. A new type is a row here,
//! an arm in each of those, and tests (docs/ARCHITECTURE.md, "Adding a field type").

use serde::Deserialize;

use crate::sql::Shape;

/// The field types the CLI knows, with their plaintext encodings of docs/FORMAT.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ValueType {
    /// UTF-8 text.
    String,
    /// Raw bytes.
    Bytes,
    /// 2-byte big-endian integer.
    I16,
    /// 4-byte big-endian integer.
    I32,
    /// 8-byte big-endian integer.
    I64,
    /// 2-byte big-endian unsigned integer.
    U16,
    /// 4-byte big-endian unsigned integer.
    U32,
    /// 8-byte big-endian unsigned integer.
    U64,
    /// One byte, 0 or 1.
    Bool,
    /// The 16 bytes of a UUID.
    Uuid,
    /// `YYYY-MM-DD`.
    Date,
    /// RFC 3339 in UTC.
    Timestamp,
    /// A date and time without a time zone, `YYYY-MM-DDTHH:MM:SS[.fraction]`.
    Datetime,
    /// Compact JSON.
    Json,
}

/// The facts of one field type.
struct Facts {
    /// The name in the config file.
    name: &'static str,
    /// The plaintext length of a fixed-size type (the largest, for timestamps).
    width: Option<usize>,
    /// Whether the plaintext is UTF-8 text (so an in-place text-form column can hold it as
    /// legacy plaintext).
    textual: bool,
    /// The shape a source column of this type is read in.
    source: Shape,
    /// Whether plaintexts compare as JSON values rather than bytes (a JSONB source renders its
    /// own key order and spacing).
    json: bool,
}

impl ValueType {
    /// The table: one row per type.
    const fn facts(self) -> Facts {
        const fn row(
            name: &'static str,
            width: Option<usize>,
            textual: bool,
            source: Shape,
        ) -> Facts {
            Facts {
                name,
                width,
                textual,
                source,
                json: false,
            }
        }
        match self {
            ValueType::String => row("string", None, true, Shape::Text),
            ValueType::Bytes => row("bytes", None, false, Shape::Bytes),
            ValueType::I16 => row("i16", Some(2), false, Shape::Int),
            ValueType::I32 => row("i32", Some(4), false, Shape::Int),
            ValueType::I64 => row("i64", Some(8), false, Shape::Int),
            ValueType::U16 => row("u16", Some(2), false, Shape::Int),
            ValueType::U32 => row("u32", Some(4), false, Shape::Int),
            // Read as text: a u64 does not fit the i64 that integers are read in.
            ValueType::U64 => row("u64", Some(8), false, Shape::Text),
            ValueType::Bool => row("bool", Some(1), false, Shape::Int),
            ValueType::Uuid => row("uuid", Some(16), false, Shape::Text),
            ValueType::Date => row("date", Some(10), true, Shape::Text),
            ValueType::Timestamp => row("timestamp", Some(30), true, Shape::Text),
            ValueType::Datetime => row("datetime", Some(29), true, Shape::Text),
            ValueType::Json => Facts {
                json: true,
                ..row("json", None, true, Shape::Text)
            },
        }
    }

    /// The name used in the config file.
    pub(crate) fn name(self) -> &'static str {
        self.facts().name
    }

    /// Whether the plaintext encoding is UTF-8 text (so an in-place text-form column can hold
    /// it as legacy plaintext).
    pub(crate) fn is_textual(self) -> bool {
        self.facts().textual
    }

    /// The plaintext length of a fixed-size type (the largest, for timestamps).
    pub(crate) fn fixed_len(self) -> Option<usize> {
        self.facts().width
    }

    /// The shape a source column of this type is read in.
    pub(crate) fn source_shape(self) -> Shape {
        self.facts().source
    }

    /// Whether two plaintexts of this type hold the same value.
    pub(crate) fn same_plaintext(self, a: &[u8], b: &[u8]) -> bool {
        if self.facts().json {
            let parse = |x: &[u8]| serde_json::from_slice::<serde_json::Value>(x).ok();
            return a == b || (parse(a).is_some() && parse(a) == parse(b));
        }
        a == b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_named_as_the_config_file_spells_it() {
        for (ty, name) in [
            (ValueType::String, "string"),
            (ValueType::U64, "u64"),
            (ValueType::Datetime, "datetime"),
            (ValueType::Json, "json"),
        ] {
            assert_eq!(ty.name(), name);
            let parsed: ValueType = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(parsed, ty);
        }
    }

    #[test]
    fn json_plaintexts_compare_as_values_and_everything_else_as_bytes() {
        assert!(ValueType::Json.same_plaintext(br#"{"a":1,"b":2}"#, br#"{"b": 2, "a": 1}"#));
        assert!(!ValueType::Json.same_plaintext(br#"{"a":1}"#, br#"{"a":2}"#));
        assert!(!ValueType::String.same_plaintext(br#"{"a":1}"#, br#"{ "a":1}"#));
        assert!(!ValueType::String.same_plaintext(b"A", b"a"));
    }
}
