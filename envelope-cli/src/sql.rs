//! The SQL dialects the CLI speaks: envelope-core's shared dialect layer (URLs, quoting,
//! placeholders, sessions, transactions, locks), plus the migration's own SQL: NULL-safe and
//! byte-exact comparison, and the few expressions that differ between PostgreSQL, MySQL/MariaDB
//! and SQLite.

use std::time::Duration;

use envelope_core::dialect::{self as shared, Kind};

/// How long a CLI session on SQLite waits for another writer (the application) before failing.
const WAIT_FOR_WRITERS: Duration = Duration::from_secs(10);

/// Which rows a locking read passes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Skip {
    /// None: wait for rows another transaction holds.
    None,
    /// Rows another transaction holds (a job's ranges leased by another worker).
    Locked,
}

/// Which SQL dialect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
    /// SQLite.
    Sqlite,
}

impl Dialect {
    /// The dialect every crate shares (envelope-core's): URLs, quoting, placeholders,
    /// sessions, transactions and locks. What is here besides is the migration's own SQL.
    fn shared(self) -> &'static dyn shared::Dialect {
        match self {
            Dialect::Postgres => Kind::Postgres.dialect(),
            Dialect::MySql => Kind::MySql.dialect(),
            Dialect::Sqlite => Kind::Sqlite.dialect(),
        }
    }

    /// The dialect of a database URL, by scheme.
    pub(crate) fn of_url(url: &str) -> Option<Dialect> {
        shared::for_url(url).map(|d| match d.kind() {
            Kind::Postgres => Dialect::Postgres,
            Kind::MySql => Dialect::MySql,
            Kind::Sqlite => Dialect::Sqlite,
        })
    }

    /// The URL sqlx's drivers take (`mariadb:` becomes `mysql:`).
    pub(crate) fn driver_url(self, url: &str) -> String {
        self.shared().driver_url(url).into_owned()
    }

    /// What every session of the CLI runs first: UTC (so timestamps read and write unshifted),
    /// MySQL/MariaDB strict (a value too long for its column is an error, never silently cut: a
    /// sealed value cut short can never be opened), and a SQLite writer that waits up to 10 s
    /// for another instead of failing at once.
    pub(crate) fn session_setup(self) -> Vec<String> {
        let d = self.shared();
        d.utc_session()
            .iter()
            .chain(d.strict_session())
            .map(|s| (*s).to_owned())
            .chain(d.wait_for_writers(WAIT_FOR_WRITERS))
            .collect()
    }

    /// How a transaction that writes begins (`BEGIN IMMEDIATE` on SQLite).
    pub(crate) fn begin_write(self) -> &'static str {
        self.shared().begin_write()
    }

    /// The clause that locks the rows a `SELECT` reads until the transaction ends (nothing on
    /// SQLite, whose write transaction already holds the whole file).
    pub(crate) fn lock_rows(self, skip: Skip) -> &'static str {
        match skip {
            Skip::None => self.shared().lock_rows(),
            Skip::Locked => self.shared().lock_rows_skip_locked(),
        }
    }

    /// Whether two names are one column or table here (ASCII case-insensitively on MySQL/MariaDB
    /// and SQLite; exactly on PostgreSQL, where the CLI quotes every name).
    pub(crate) fn names_fold_case(self) -> bool {
        self.shared().names_fold_case()
    }

    /// A quoted identifier (`schema.name` quotes each part).
    pub(crate) fn quote(self, ident: &str) -> String {
        self.shared().quote(ident)
    }

    /// The `n`th (1-based) bind parameter.
    pub(crate) fn param(self, n: usize) -> String {
        self.shared().placeholder(n)
    }

    /// Whether the binary value in `column` starts like an envelope (format version 1, and at
    /// least the 47 bytes of a header and tag), as a SQL condition.
    pub(crate) fn has_envelope_header(self, column: &str) -> String {
        match self {
            Dialect::Postgres => {
                format!("get_byte({column}, 0) = 1 AND octet_length({column}) >= 47")
            }
            Dialect::MySql => format!("ASCII({column}) = 1 AND LENGTH({column}) >= 47"),
            Dialect::Sqlite => {
                format!("substr({column}, 1, 1) = x'01' AND length({column}) >= 47")
            }
        }
    }

    /// `a` equals `b`, NULLs included, byte for byte.
    pub(crate) fn same(self, a: &str, b: &str) -> String {
        match self {
            Dialect::Postgres => format!("{a} IS NOT DISTINCT FROM {b}"),
            // `<=>` is NULL-safe; BINARY makes it exact (no case folding, no pad-space).
            Dialect::MySql => format!("BINARY {a} <=> BINARY {b}"),
            Dialect::Sqlite => format!("{a} IS {b}"),
        }
    }

    /// `a` equals `b` as [`Dialect::same`] does, for a value of `shape`. Text is compared as
    /// the bytes the application wrote, whatever the column's collation or character set:
    /// PostgreSQL in the `C` collation (a nondeterministic, case-insensitive collation would
    /// match a value changed in case only), MySQL/MariaDB in utf8mb4 (a latin1 or GBK column's
    /// stored bytes are not the UTF-8 bytes of the parameter), SQLite in `BINARY` (a `NOCASE`
    /// column).
    pub(crate) fn same_as(self, shape: Shape, a: &str, b: &str) -> String {
        if shape != Shape::Text {
            return self.same(a, b);
        }
        match self {
            Dialect::Postgres => format!("{a} COLLATE \"C\" IS NOT DISTINCT FROM {b}"),
            Dialect::MySql => format!("BINARY CONVERT({a} USING utf8mb4) <=> BINARY {b}"),
            Dialect::Sqlite => format!("{a} COLLATE BINARY IS {b}"),
        }
    }

    /// The SQL expression of a binary column's key id (bytes 2..18), as hex.
    pub(crate) fn key_id_hex(self, column: &str) -> String {
        match self {
            Dialect::Postgres => format!("encode(substring({column} from 3 for 16), 'hex')"),
            Dialect::MySql => format!("LOWER(HEX(SUBSTRING({column}, 3, 16)))"),
            Dialect::Sqlite => format!("lower(hex(substr({column}, 3, 16)))"),
        }
    }

    /// An aggregate as a 64-bit integer, 0 when it is NULL (PostgreSQL's `SUM(bigint)` is
    /// numeric and MySQL's is decimal, which the `Any` driver does not read).
    pub(crate) fn int(self, expr: &str) -> String {
        self.int_or_null(&format!("COALESCE({expr}, 0)"))
    }

    /// An expression as a 64-bit integer, NULL staying NULL.
    pub(crate) fn int_or_null(self, expr: &str) -> String {
        match self {
            Dialect::Postgres => format!("CAST({expr} AS BIGINT)"),
            Dialect::MySql => format!("CAST({expr} AS SIGNED)"),
            Dialect::Sqlite => expr.to_owned(),
        }
    }

    /// A string's length in bytes.
    pub(crate) fn octet_length(self, expr: &str) -> String {
        match self {
            Dialect::Postgres => format!("octet_length({expr})"),
            Dialect::MySql => format!("LENGTH({expr})"),
            Dialect::Sqlite => format!("length(CAST({expr} AS BLOB))"),
        }
    }

    /// The name the dialect gets in messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Dialect::Postgres => "PostgreSQL",
            Dialect::MySql => "MySQL/MariaDB",
            Dialect::Sqlite => "SQLite",
        }
    }
}

/// The shape of a value as the CLI reads and binds it: a NULL binds with its shape's type,
/// and text is compared as text (see [`Dialect::same_as`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Integer.
    Int,
    /// Text.
    Text,
    /// Bytes.
    Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_sql() {
        assert_eq!(
            Dialect::Postgres.quote("app.customers"),
            "\"app\".\"customers\""
        );
        assert_eq!(Dialect::MySql.quote("customers"), "`customers`");
        assert_eq!(Dialect::Postgres.param(3), "$3");
        assert_eq!(Dialect::Sqlite.param(3), "?");
        assert_eq!(Dialect::MySql.same("a", "?"), "BINARY a <=> BINARY ?");
        assert_eq!(Dialect::of_url("mariadb://root@h/db"), Some(Dialect::MySql));
        assert_eq!(Dialect::of_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("oracle://x"), None);
        assert_eq!(
            Dialect::MySql.driver_url("mariadb://root@h/db"),
            "mysql://root@h/db"
        );
        assert_eq!(Dialect::Sqlite.begin_write(), "BEGIN IMMEDIATE");
        assert_eq!(
            Dialect::Postgres.lock_rows(Skip::Locked),
            " FOR UPDATE SKIP LOCKED"
        );
        assert_eq!(Dialect::Sqlite.lock_rows(Skip::None), "");
    }
}
