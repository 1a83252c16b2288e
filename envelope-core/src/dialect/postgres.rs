//! PostgreSQL.

use super::{DdlGuard, Dialect, Kind, sealed};

/// PostgreSQL: names as written (quoted), `$n` parameters, transactional DDL.
#[derive(Clone, Copy, Debug, Default)]
pub struct Postgres;

/// The key table's DDL.
pub(crate) const DDL: &str = include_str!("../../sql/postgres.sql");

impl sealed::Sealed for Postgres {}

impl Dialect for Postgres {
    fn kind(&self) -> Kind {
        Kind::Postgres
    }

    fn name(&self) -> &'static str {
        "PostgreSQL"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["postgres", "postgresql"]
    }

    fn names_fold_case(&self) -> bool {
        false
    }

    fn numbered_placeholders(&self) -> bool {
        true
    }

    fn key_table_ddl(&self) -> &'static str {
        DDL
    }

    /// A transaction-scoped advisory lock with an arbitrary, fixed key shared by every
    /// envelope process (`envelope-keys-ddl`).
    fn ddl_guard(&self) -> DdlGuard {
        DdlGuard {
            before: &["BEGIN", "SELECT pg_advisory_xact_lock(6573006219848410995)"],
            after: &["COMMIT"],
            on_error: &["ROLLBACK"],
        }
    }

    fn utc_session(&self) -> &'static [&'static str] {
        &["SET TIME ZONE 'UTC'", "SET DateStyle = 'ISO, YMD'"]
    }

    /// `relation "…" does not exist`.
    fn is_missing_table(&self, message: &str, table: &str) -> bool {
        message.contains(&format!("\"{table}\" does not exist"))
    }
}
