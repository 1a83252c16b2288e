//! SQLite.

use std::time::Duration;

use super::{DdlGuard, Dialect, Kind, sealed};

/// SQLite: names compared without case, `?` parameters, one writer at a time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sqlite;

/// The key table's DDL.
pub(crate) const DDL: &str = include_str!("../../sql/sqlite.sql");

impl sealed::Sealed for Sqlite {}

impl Dialect for Sqlite {
    fn kind(&self) -> Kind {
        Kind::Sqlite
    }

    fn name(&self) -> &'static str {
        "SQLite"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["sqlite"]
    }

    fn names_fold_case(&self) -> bool {
        true
    }

    fn key_table_ddl(&self) -> &'static str {
        DDL
    }

    /// Nothing: SQLite serializes writers itself.
    fn ddl_guard(&self) -> DdlGuard {
        DdlGuard {
            before: &[],
            after: &[],
            on_error: &[],
        }
    }

    fn begin_write(&self) -> &'static str {
        "BEGIN IMMEDIATE"
    }

    fn lock_rows(&self) -> &'static str {
        ""
    }

    fn lock_rows_skip_locked(&self) -> &'static str {
        ""
    }

    fn wait_for_writers(&self, timeout: Duration) -> Option<String> {
        Some(format!("PRAGMA busy_timeout = {}", timeout.as_millis()))
    }

    /// `no such table: …` (perhaps `main.…`).
    fn is_missing_table(&self, message: &str, table: &str) -> bool {
        message.contains(&format!("no such table: {table}"))
            || message.contains(&format!("no such table: main.{table}"))
    }
}
