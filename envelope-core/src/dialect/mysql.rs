//! MySQL and MariaDB.

use std::borrow::Cow;

use super::{DdlGuard, Dialect, Kind, sealed};

/// MySQL 8 and MariaDB 10.5+: backquoted names compared without case, `?` parameters, DDL
/// that commits implicitly.
#[derive(Clone, Copy, Debug, Default)]
pub struct MySql;

/// The key table's DDL.
pub(crate) const DDL: &str = include_str!("../../sql/mysql.sql");

/// Adds `STRICT_ALL_TABLES` to a MySQL/MariaDB session's `sql_mode`, keeping the rest of the
/// server's: a value too long for its column then fails instead of being cut short with a
/// warning (a sealed value cut short can never be opened). The key stores run it on each of
/// their MySQL connections; applications run it on theirs (envelope-sqlx's
/// `mysql_strict_session`, envelope-diesel's `MYSQL_STRICT_SESSION`).
pub const STRICT_SESSION: &str =
    "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@session.sql_mode, ''), 'STRICT_ALL_TABLES')";

impl sealed::Sealed for MySql {}

impl Dialect for MySql {
    fn kind(&self) -> Kind {
        Kind::MySql
    }

    fn name(&self) -> &'static str {
        "MySQL/MariaDB"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["mysql", "mariadb"]
    }

    fn driver_url<'u>(&self, url: &'u str) -> Cow<'u, str> {
        match url.strip_prefix("mariadb:") {
            Some(rest) => Cow::Owned(format!("mysql:{rest}")),
            None => Cow::Borrowed(url),
        }
    }

    fn quote_char(&self) -> char {
        '`'
    }

    fn names_fold_case(&self) -> bool {
        true
    }

    fn key_table_ddl(&self) -> &'static str {
        DDL
    }

    /// A named lock held by the connection, waited for up to 60 s.
    fn ddl_guard(&self) -> DdlGuard {
        DdlGuard {
            before: &["SELECT GET_LOCK('envelope-keys-ddl', 60)"],
            after: &["SELECT RELEASE_LOCK('envelope-keys-ddl')"],
            on_error: &["SELECT RELEASE_LOCK('envelope-keys-ddl')"],
        }
    }

    fn strict_session(&self) -> &'static [&'static str] {
        &[STRICT_SESSION]
    }

    fn utc_session(&self) -> &'static [&'static str] {
        &["SET time_zone = '+00:00'"]
    }

    /// `Table 'schema.…' doesn't exist`.
    fn is_missing_table(&self, message: &str, table: &str) -> bool {
        message.contains("doesn't exist")
            && (message.contains(&format!(".{table}'")) || message.contains(&format!("'{table}'")))
    }
}
