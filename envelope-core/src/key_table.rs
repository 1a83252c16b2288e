//! The key table as every database [`KeyStore`](crate::KeyStore) holds it: its name, its columns
//! and its row ([`KeyRow`]). What differs per database (the DDL, taking turns to create it,
//! telling that it is missing) is in [`crate::dialect`].
//!
//! envelope-sqlx and envelope-diesel both build on this module, so either crate reads the keys
//! the other wrote. The layout is specified in `docs/FORMAT.md`, section 7.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, StoreError};
use crate::keys::{KeyId, KeyKind, KeyRecord};

/// The default key table name.
pub const DEFAULT_TABLE: &str = "envelope_keys";

/// The key table's columns, in the order every store selects and inserts them.
pub const COLUMNS: &str =
    "id, kind, scope, provider, cmk_id, wrapped, kms_context, created_at, retired_at";

/// Check a key table name: letters, digits and `_`, up to 63 bytes, not starting with a digit
/// (so it can be spliced into SQL unquoted on every database).
///
/// # Errors
/// [`Misuse::InvalidName`](crate::Misuse::InvalidName) for anything else.
pub fn check_table_name(table: &str) -> Result<(), Error> {
    let ok = !table.is_empty()
        && table.len() <= 63
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !table.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(Error::Misuse(crate::error::Misuse::InvalidName {
            what: "key table name",
            value: table.to_owned(),
            reason: "use letters, digits and `_`, up to 63, not starting with a digit",
        }))
    }
}

/// A time as the key table holds it: Unix milliseconds.
pub fn millis(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX)
}

/// A time read from the key table (Unix milliseconds; a negative value reads as the epoch).
pub fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// One row of the key table as the databases hold it: the id as bytes, the kind as text,
/// times as Unix milliseconds. [`KeyRecord`] converts to it, and back with checks
/// ([`KeyRow::into_record`]).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// `id`: 16 bytes.
    pub id: Vec<u8>,
    /// `kind`: `data` or `index`.
    pub kind: String,
    /// `scope`.
    pub scope: String,
    /// `provider`.
    pub provider: String,
    /// `cmk_id`.
    pub cmk_id: String,
    /// `wrapped`.
    pub wrapped: Vec<u8>,
    /// `kms_context`.
    pub kms_context: String,
    /// `created_at`, Unix milliseconds.
    pub created_at: i64,
    /// `retired_at`, Unix milliseconds.
    pub retired_at: Option<i64>,
}

impl std::fmt::Debug for KeyRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRow")
            .field("id", &hex::encode(&self.id))
            .field("kind", &self.kind)
            .field("scope", &self.scope)
            .field("cmk_id", &self.cmk_id)
            .field("wrapped", &format_args!("<{} bytes>", self.wrapped.len()))
            .finish_non_exhaustive()
    }
}

impl From<&KeyRecord> for KeyRow {
    fn from(r: &KeyRecord) -> Self {
        KeyRow {
            id: r.id.as_bytes().to_vec(),
            kind: r.kind.as_str().to_owned(),
            scope: r.scope.clone(),
            provider: r.provider.clone(),
            cmk_id: r.cmk_id.clone(),
            wrapped: r.wrapped.clone(),
            kms_context: r.kms_context.clone(),
            created_at: millis(r.created_at),
            retired_at: r.retired_at.map(millis),
        }
    }
}

impl KeyRow {
    /// The record this row holds.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the id is not 16 bytes or the kind is unknown (a row edited
    /// by hand).
    pub fn into_record(self) -> Result<KeyRecord, StoreError> {
        let corrupt = |id: &[u8], reason: String| StoreError::Corrupt {
            key_id: KeyId::try_from(id).unwrap_or(KeyId::from_bytes([0; KeyId::LEN])),
            reason,
        };
        let id = KeyId::try_from(self.id.as_slice()).map_err(|_| {
            corrupt(
                &self.id,
                format!("id has {} bytes, not {}", self.id.len(), KeyId::LEN),
            )
        })?;
        let kind = self
            .kind
            .parse::<KeyKind>()
            .map_err(|_| corrupt(&self.id, format!("kind is {:?}", self.kind)))?;
        Ok(KeyRecord {
            id,
            kind,
            scope: self.scope,
            provider: self.provider,
            cmk_id: self.cmk_id,
            wrapped: self.wrapped,
            kms_context: self.kms_context,
            created_at: from_millis(self.created_at),
            retired_at: self.retired_at.map(from_millis),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_checked() {
        for ok in ["envelope_keys", "k", "_x9"] {
            assert!(check_table_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "9keys", "keys;drop", "a-b", "ключи", &"x".repeat(64)] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_row_round_trips_and_a_bad_row_is_corrupt() {
        let record = KeyRecord {
            id: KeyId::from_bytes([7; 16]),
            kind: KeyKind::Index,
            scope: "users.email".into(),
            provider: "local".into(),
            cmk_id: "local:1".into(),
            wrapped: vec![1, 2, 3],
            kms_context: "{}".into(),
            created_at: from_millis(1_700_000_000_123),
            retired_at: Some(from_millis(1_700_000_000_456)),
        };
        let row = KeyRow::from(&record);
        assert_eq!(row.clone().into_record().ok(), Some(record));
        assert!(!format!("{row:?}").contains("[1, 2, 3]"));

        let short = KeyRow {
            id: vec![1; 15],
            ..row.clone()
        };
        assert!(matches!(
            short.into_record(),
            Err(StoreError::Corrupt { .. })
        ));
        let kind = KeyRow {
            kind: "weird".into(),
            ..row
        };
        assert!(matches!(
            kind.into_record(),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
