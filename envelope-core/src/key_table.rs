//! The key table's SQL, shared by every database [`KeyStore`](crate::KeyStore): its DDL on
//! PostgreSQL, MySQL/MariaDB and SQLite, the statements that let several processes create it at
//! once, and the row as the databases hold it ([`KeyRow`]).
//!
//! envelope-sqlx and envelope-diesel both build on this module, so either crate reads the keys
//! the other wrote. The layout is specified in `docs/FORMAT.md`, section 7.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, StoreError};
use crate::keys::{KeyId, KeyKind, KeyRecord};

/// The default key table name.
pub const DEFAULT_TABLE: &str = "envelope_keys";

/// Adds `STRICT_ALL_TABLES` to a MySQL/MariaDB session's `sql_mode`, keeping the rest of the
/// server's: a value too long for its column then fails instead of being cut short with a
/// warning (a sealed value cut short can never be opened). The key stores run it on each of
/// their MySQL connections; applications run it on theirs (envelope-sqlx's
/// `mysql_strict_session`, envelope-diesel's `MYSQL_STRICT_SESSION`).
pub const MYSQL_STRICT_SESSION: &str =
    "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@session.sql_mode, ''), 'STRICT_ALL_TABLES')";

/// The key table's columns, in the order every store selects and inserts them.
pub const COLUMNS: &str =
    "id, kind, scope, provider, cmk_id, wrapped, kms_context, created_at, retired_at";

/// The DDL for the default table name, one script per database. Idempotent (`IF NOT EXISTS`).
/// [`statements`] splits a script and renames its table.
pub mod ddl {
    /// PostgreSQL.
    pub const POSTGRES: &str = include_str!("../sql/postgres.sql");
    /// MySQL 8 and MariaDB 10.5+.
    pub const MYSQL: &str = include_str!("../sql/mysql.sql");
    /// SQLite.
    pub const SQLITE: &str = include_str!("../sql/sqlite.sql");
}

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

/// The statements of a [`ddl`] script, comments dropped, for the table `table` (checked with
/// [`check_table_name`]); its index is renamed with it.
pub fn statements(ddl: &str, table: &str) -> Vec<String> {
    ddl.lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .split(';')
        .map(|s| s.trim().replace(DEFAULT_TABLE, table))
        .filter(|s| !s.is_empty())
        .collect()
}

/// Statements run on one connection around the key table's DDL, so that several processes
/// creating it at the same moment (replicas of a new deployment) take turns.
///
/// PostgreSQL needs it: concurrent `CREATE TABLE IF NOT EXISTS` can fail there with a unique
/// violation on `pg_type_typname_nsp_index`. Its DDL is transactional, so a transaction-scoped
/// advisory lock serializes it. MySQL/MariaDB commit DDL implicitly: a named lock held by the
/// connection does it there. SQLite serializes writers itself (wait on a busy database).
#[derive(Clone, Copy, Debug)]
pub struct DdlGuard {
    /// Run first.
    pub before: &'static [&'static str],
    /// Run after the DDL succeeded.
    pub after: &'static [&'static str],
    /// Run after a statement failed (the first error is the one to report).
    pub on_error: &'static [&'static str],
}

impl DdlGuard {
    /// PostgreSQL: a transaction-scoped advisory lock with an arbitrary, fixed key shared by
    /// every envelope process (`envelope-keys-ddl`).
    pub const POSTGRES: DdlGuard = DdlGuard {
        before: &["BEGIN", "SELECT pg_advisory_xact_lock(6573006219848410995)"],
        after: &["COMMIT"],
        on_error: &["ROLLBACK"],
    };
    /// MySQL/MariaDB: a named lock held by the connection, waited for up to 60 s.
    pub const MYSQL: DdlGuard = DdlGuard {
        before: &["SELECT GET_LOCK('envelope-keys-ddl', 60)"],
        after: &["SELECT RELEASE_LOCK('envelope-keys-ddl')"],
        on_error: &["SELECT RELEASE_LOCK('envelope-keys-ddl')"],
    };
    /// SQLite: nothing (it serializes writers).
    pub const SQLITE: DdlGuard = DdlGuard {
        before: &[],
        after: &[],
        on_error: &[],
    };
}

/// `e`, or [`StoreError::MissingTable`] when it is a database's "no such table" about `table`
/// (PostgreSQL `relation "…" does not exist`, MySQL/MariaDB `Table '…' doesn't exist`, SQLite
/// `no such table: …`). Stores pass their backend errors through it.
pub fn missing_table(e: StoreError, table: &str) -> StoreError {
    if let StoreError::Backend(source) = &e {
        let text = source.to_string();
        let names_it = text.contains(table);
        let missing = text.contains("does not exist")
            || text.contains("doesn't exist")
            || text.contains("no such table");
        if names_it && missing {
            return StoreError::MissingTable {
                table: table.to_owned(),
            };
        }
    }
    e
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
    fn statements_rename_the_table_and_its_index() {
        for ddl in [ddl::POSTGRES, ddl::MYSQL, ddl::SQLITE] {
            let out = statements(ddl, "tenant_keys");
            assert!(!out.is_empty());
            assert!(
                out.iter()
                    .all(|s| !s.contains(DEFAULT_TABLE) && !s.contains("--"))
            );
            assert!(out[0].starts_with("CREATE TABLE IF NOT EXISTS tenant_keys"));
            assert!(out.iter().any(|s| s.contains("tenant_keys_live_index")));
        }
    }

    #[test]
    fn no_such_table_is_recognised_on_every_database() {
        for text in [
            r#"error returned from database: relation "keys_1" does not exist"#,
            "Table 'test.keys_1' doesn't exist",
            "no such table: keys_1",
        ] {
            let e = missing_table(StoreError::backend(std::io::Error::other(text)), "keys_1");
            assert!(matches!(e, StoreError::MissingTable { .. }), "{text}");
            assert!(e.to_string().contains("create_table()"), "{e}");
        }
        let other = missing_table(
            StoreError::backend(std::io::Error::other("no such table: other")),
            "keys_1",
        );
        assert!(matches!(other, StoreError::Backend(_)));
    }

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
