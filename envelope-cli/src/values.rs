//! Plaintext encodings (docs/FORMAT.md, "Plaintext encoding of field types") between the SQL
//! values the CLI reads and writes and the bytes that are sealed: exactly what the column types
//! of envelope-sqlx and envelope-diesel seal and open, so that either side reads the other's
//! values.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use envelope_core::column::Plaintext;
use zeroize::Zeroizing;

use crate::config::ValueType;
use crate::db::Raw;
use crate::sql::Dialect;

/// Why a value cannot be taken as a value of its declared type. Names no value.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Invalid {
    /// The plaintext codec refused it (core's error names no value either).
    #[error(transparent)]
    Codec(#[from] envelope_core::Error),
    /// It does not fit the type: out of range, not UTF-8, the wrong length, not JSON.
    #[error("{0}")]
    Shape(String),
}

/// The plaintext bytes of a source-column value (in its canonical read shape, see
/// `plan::source_sql`) for field type `ty`.
///
/// # Errors
/// The value is not a `ty` value (out of range, not UTF-8, not a date ...).
pub(crate) fn encode_source(ty: ValueType, raw: &Raw) -> Result<Zeroizing<Vec<u8>>, Invalid> {
    let wrong = |what: &str| {
        Err(Invalid::Shape(format!(
            "the source value is {what}, not a {} value",
            ty.name()
        )))
    };
    let text = |raw: &Raw| match raw {
        Raw::Text(s) => Some(s.clone()),
        Raw::Bytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    };
    let int = |raw: &Raw| match raw {
        Raw::Int(i) => Some(*i),
        Raw::Text(s) => s.parse().ok(),
        _ => None,
    };
    let bytes = match ty {
        ValueType::Bytes => match raw {
            Raw::Bytes(b) => b.clone(),
            Raw::Text(s) => s.clone().into_bytes(),
            _ => return wrong("not bytes"),
        },
        ValueType::String => match text(raw) {
            Some(s) => s.into_bytes(),
            None => return wrong("not text"),
        },
        ValueType::I16 => integer::<i16>(ty, int(raw))?,
        ValueType::I32 => integer::<i32>(ty, int(raw))?,
        ValueType::I64 => integer::<i64>(ty, int(raw))?,
        ValueType::U16 => integer::<u16>(ty, int(raw))?,
        ValueType::U32 => integer::<u32>(ty, int(raw))?,
        // Read as text: a MySQL BIGINT UNSIGNED can exceed i64.
        ValueType::U64 => match raw {
            Raw::Int(i) => integer::<u64>(ty, Some(*i))?,
            _ => match text(raw).map(|s| s.trim().parse::<u64>()) {
                Some(Ok(v)) => v.to_be_bytes().to_vec(),
                Some(Err(_)) => return wrong("not an integer in the u64 range"),
                None => return wrong("not an integer"),
            },
        },
        ValueType::Bool => match int(raw) {
            Some(0) => vec![0],
            Some(1) => vec![1],
            _ => return wrong("neither 0 nor 1"),
        },
        ValueType::Uuid => match raw {
            Raw::Bytes(b) if b.len() == 16 => b.clone(),
            _ => match text(raw).and_then(|s| uuid::Uuid::parse_str(&s).ok()) {
                Some(u) => u.as_bytes().to_vec(),
                None => return wrong("not a UUID"),
            },
        },
        ValueType::Date => {
            match text(raw).and_then(|s| NaiveDate::parse_from_str(&s, "%Y-%m-%d").ok()) {
                Some(d) => plaintext(&d)?,
                None => return wrong("not a YYYY-MM-DD date"),
            }
        }
        ValueType::Timestamp => match text(raw).and_then(|s| parse_timestamp(&s)) {
            Some(t) => plaintext(&t)?,
            None => return wrong("not a timestamp"),
        },
        ValueType::Datetime => match text(raw).and_then(|s| parse_datetime(&s)) {
            Some(t) => plaintext(&t)?,
            None => return wrong("not a date and time without a time zone"),
        },
        ValueType::Json => match text(raw) {
            Some(s) => compact_json(&s)
                .ok_or_else(|| Invalid::Shape("the source value is not valid JSON".into()))?,
            None => return wrong("not text"),
        },
    };
    Ok(Zeroizing::new(bytes))
}

/// An integer source value as a `T` (its range checked, never truncated or wrapped), encoded
/// as the column types encode `T`.
fn integer<T: TryFrom<i64> + Plaintext>(
    ty: ValueType,
    value: Option<i64>,
) -> Result<Vec<u8>, Invalid> {
    match value.map(T::try_from) {
        Some(Ok(v)) => plaintext(&v),
        Some(Err(_)) => Err(Invalid::Shape(format!(
            "the source value is out of the {0} range, not a {0} value",
            ty.name()
        ))),
        None => Err(Invalid::Shape(format!(
            "the source value is not an integer, not a {} value",
            ty.name()
        ))),
    }
}

fn opened<T: Plaintext>(bytes: &[u8]) -> Result<T, Invalid> {
    T::from_plaintext(bytes.to_vec()).map_err(Invalid::Codec)
}

fn plaintext<T: Plaintext>(value: &T) -> Result<Vec<u8>, Invalid> {
    value
        .to_plaintext()
        .map(|b| b.into_owned())
        .map_err(Invalid::Codec)
}

/// A timestamp as the databases render it: RFC 3339 with any offset, or a date and time with
/// no offset (taken as UTC), with `T` or a space between them.
fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    // PostgreSQL's reads end in the era (`AD`/`BC`): a BC instant is refused, never shifted.
    let s = s.strip_suffix("AD").unwrap_or(s);
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    let naive = s.strip_suffix('Z').unwrap_or(s);
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(naive, f).ok())
        .map(|n| n.and_utc())
}

/// A date and time with no offset, as the databases render it: `T` or a space between them.
/// An offset or `Z` is refused (that is a `timestamp`), and so is PostgreSQL's `BC`.
fn parse_datetime(s: &str) -> Option<NaiveDateTime> {
    let s = s.strip_suffix("AD").unwrap_or(s);
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
}

/// Valid JSON with the whitespace between tokens removed; keys, their order and number
/// spellings stay as they are (no round trip through floating point).
pub(crate) fn compact_json(s: &str) -> Option<Vec<u8>> {
    serde_json::from_str::<serde::de::IgnoredAny>(s).ok()?;
    let mut out = Vec::with_capacity(s.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in s.as_bytes() {
        if in_string {
            out.push(b);
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
    Some(out)
}

/// Check that opened (or legacy in-place) bytes are a `ty` value, as the column types would
/// read them.
///
/// # Errors
/// Why they are not.
pub(crate) fn check_plaintext(ty: ValueType, bytes: &[u8]) -> Result<(), Invalid> {
    fn check<T: Plaintext>(bytes: &[u8]) -> Result<(), Invalid> {
        T::from_plaintext(bytes.to_vec())
            .map(drop)
            .map_err(Invalid::Codec)
    }
    match ty {
        ValueType::Bytes => Ok(()),
        ValueType::String => check::<String>(bytes),
        ValueType::I16 => check::<i16>(bytes),
        ValueType::I32 => check::<i32>(bytes),
        ValueType::I64 => check::<i64>(bytes),
        ValueType::U16 => check::<u16>(bytes),
        ValueType::U32 => check::<u32>(bytes),
        ValueType::U64 => check::<u64>(bytes),
        ValueType::Bool => check::<bool>(bytes),
        ValueType::Uuid => check::<uuid::Uuid>(bytes),
        ValueType::Date => check::<NaiveDate>(bytes),
        ValueType::Timestamp => check::<DateTime<Utc>>(bytes),
        ValueType::Datetime => check::<NaiveDateTime>(bytes),
        ValueType::Json => serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
            .map(drop)
            .map_err(|e| Invalid::Shape(format!("not valid JSON ({:?} error)", e.classify()))),
    }
}

/// The SQL value that writes opened plaintext back into a source column (the inverse of
/// [`encode_source`]).
///
/// # Errors
/// The bytes are not a `ty` value.
pub(crate) fn decode_to_source(
    ty: ValueType,
    dialect: Dialect,
    bytes: &[u8],
) -> Result<Raw, Invalid> {
    check_plaintext(ty, bytes)?;
    let utf8 = || String::from_utf8(bytes.to_vec()).map_err(|_| Invalid::Shape("not UTF-8".into()));
    let be = |n: usize| -> Result<i64, Invalid> {
        let mut v: i64 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
            -1
        } else {
            0
        };
        if bytes.len() != n {
            return Err(Invalid::Shape(format!("{} bytes", bytes.len())));
        }
        for &b in bytes {
            v = (v << 8) | i64::from(b);
        }
        Ok(v)
    };
    Ok(match ty {
        ValueType::Bytes => Raw::Bytes(bytes.to_vec()),
        ValueType::String | ValueType::Date | ValueType::Json => Raw::Text(utf8()?),
        ValueType::I16 => Raw::Int(be(2)?),
        ValueType::I32 => Raw::Int(be(4)?),
        ValueType::I64 => Raw::Int(be(8)?),
        ValueType::U16 => Raw::Int(i64::from(opened::<u16>(bytes)?)),
        ValueType::U32 => Raw::Int(i64::from(opened::<u32>(bytes)?)),
        ValueType::U64 => Raw::Text(opened::<u64>(bytes)?.to_string()),
        ValueType::Datetime => {
            let t = opened::<NaiveDateTime>(bytes)?;
            Raw::Text(match dialect {
                // PostgreSQL's timestamp and MySQL's DATETIME take a space, not `T`.
                Dialect::MySql | Dialect::Postgres => t.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
                Dialect::Sqlite => utf8()?,
            })
        }
        ValueType::Bool => Raw::Int(i64::from(bytes == [1])),
        ValueType::Uuid => Raw::Text(
            uuid::Uuid::from_slice(bytes)
                .map_err(|_| Invalid::Shape("not 16 bytes".into()))?
                .hyphenated()
                .to_string(),
        ),
        ValueType::Timestamp => {
            let t = DateTime::<Utc>::from_plaintext(bytes.to_vec()).map_err(Invalid::Codec)?;
            Raw::Text(match dialect {
                // DATETIME takes neither `T` nor an offset.
                Dialect::MySql => t.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
                _ => utf8()?,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_values_encode_as_the_column_types_do() {
        let enc = |ty, raw: Raw| encode_source(ty, &raw).map(|z| z.to_vec());
        assert_eq!(
            enc(ValueType::I64, Raw::Int(-2)).unwrap(),
            (-2i64).to_be_bytes()
        );
        assert_eq!(
            enc(ValueType::I16, Raw::Int(300)).unwrap(),
            300i16.to_be_bytes()
        );
        assert!(
            enc(ValueType::I16, Raw::Int(70_000))
                .unwrap_err()
                .to_string()
                .contains("range")
        );
        assert_eq!(enc(ValueType::Bool, Raw::Int(1)).unwrap(), [1]);
        assert!(enc(ValueType::Bool, Raw::Int(2)).is_err());
        let u = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        assert_eq!(
            enc(ValueType::Uuid, Raw::Text(u.into())).unwrap(),
            uuid::Uuid::parse_str(u).unwrap().as_bytes()
        );
        assert_eq!(
            enc(ValueType::Date, Raw::Text("2024-02-29".into())).unwrap(),
            b"2024-02-29"
        );
        for s in [
            "2024-02-29T10:11:12.500000Z",
            "2024-02-29 10:11:12.5",
            "2024-02-29T12:11:12.5+02:00",
        ] {
            assert_eq!(
                enc(ValueType::Timestamp, Raw::Text(s.into())).unwrap(),
                b"2024-02-29T10:11:12.500Z",
                "{s}"
            );
        }
        assert_eq!(
            enc(
                ValueType::Json,
                Raw::Text("{\"b\": [1, 2.50],\n \"a\": \"x y\"}".into())
            )
            .unwrap(),
            b"{\"b\":[1,2.50],\"a\":\"x y\"}"
        );
        assert!(enc(ValueType::Json, Raw::Text("{oops".into())).is_err());
        // PostgreSQL renders BC dates and instants with an era: refused, never a wrong year.
        assert!(enc(ValueType::Date, Raw::Text("0044-03-15 BC".into())).is_err());
        assert!(
            enc(
                ValueType::Timestamp,
                Raw::Text("0044-03-15T00:00:00.000000ZBC".into())
            )
            .is_err()
        );
        assert_eq!(
            enc(
                ValueType::Timestamp,
                Raw::Text("2024-02-29T10:11:12.500000ZAD".into())
            )
            .unwrap(),
            b"2024-02-29T10:11:12.500Z"
        );
        assert_eq!(
            enc(
                ValueType::Json,
                Raw::Text("123456789012345678901234567890".into())
            )
            .unwrap(),
            b"123456789012345678901234567890"
        );
    }

    #[test]
    fn opened_values_decode_back_to_the_source_shape() {
        for (ty, raw) in [
            (ValueType::I64, Raw::Int(i64::MIN)),
            (ValueType::I32, Raw::Int(-1)),
            (ValueType::I16, Raw::Int(i64::from(i16::MAX))),
            (ValueType::Bool, Raw::Int(0)),
            (ValueType::String, Raw::Text("Zoë".into())),
            (ValueType::Bytes, Raw::Bytes(vec![0, 255])),
            (
                ValueType::Uuid,
                Raw::Text("67e55044-10b1-426f-9247-bb680e5fe0c8".into()),
            ),
            (ValueType::Date, Raw::Text("1999-12-31".into())),
            (ValueType::U16, Raw::Int(i64::from(u16::MAX))),
            (ValueType::U32, Raw::Int(i64::from(u32::MAX))),
            (ValueType::U64, Raw::Text(u64::MAX.to_string())),
        ] {
            let pt = encode_source(ty, &raw).unwrap();
            assert_eq!(
                decode_to_source(ty, Dialect::Postgres, &pt).unwrap(),
                raw,
                "{ty:?}"
            );
        }
        let pt = encode_source(
            ValueType::Timestamp,
            &Raw::Text("2024-01-02T03:04:05Z".into()),
        )
        .unwrap();
        assert_eq!(
            decode_to_source(ValueType::Timestamp, Dialect::MySql, &pt).unwrap(),
            Raw::Text("2024-01-02 03:04:05.000000".into())
        );
        assert!(decode_to_source(ValueType::I64, Dialect::Sqlite, &[1, 2]).is_err());
        let pt = encode_source(
            ValueType::Datetime,
            &Raw::Text("2024-01-02 03:04:05.250000AD".into()),
        )
        .unwrap();
        assert_eq!(&*pt, b"2024-01-02T03:04:05.250");
        assert_eq!(
            decode_to_source(ValueType::Datetime, Dialect::Postgres, &pt).unwrap(),
            Raw::Text("2024-01-02 03:04:05.250000".into())
        );
        assert_eq!(
            decode_to_source(ValueType::Datetime, Dialect::Sqlite, &pt).unwrap(),
            Raw::Text("2024-01-02T03:04:05.250".into())
        );
    }

    #[test]
    fn unsigned_and_datetime_sources_are_checked() {
        let enc = |ty, raw: Raw| encode_source(ty, &raw).map(|z| z.to_vec());
        assert_eq!(enc(ValueType::U16, Raw::Int(65_535)).unwrap(), [0xff, 0xff]);
        assert!(
            enc(ValueType::U16, Raw::Int(-1))
                .unwrap_err()
                .to_string()
                .contains("range")
        );
        assert!(
            enc(ValueType::U32, Raw::Int(1 << 32))
                .unwrap_err()
                .to_string()
                .contains("range")
        );
        assert_eq!(
            enc(ValueType::U64, Raw::Text("18446744073709551615".into())).unwrap(),
            [0xff; 8]
        );
        assert!(enc(ValueType::U64, Raw::Text("-1".into())).is_err());
        assert!(enc(ValueType::U64, Raw::Int(-1)).is_err());
        for bad in [
            "2024-01-02T03:04:05Z",
            "2024-01-02T03:04:05+02:00",
            "0044-03-15 00:00:00BC",
        ] {
            assert!(
                enc(ValueType::Datetime, Raw::Text(bad.into())).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            enc(ValueType::Datetime, Raw::Text("2024-01-02T03:04:05".into())).unwrap(),
            b"2024-01-02T03:04:05"
        );
    }
}
