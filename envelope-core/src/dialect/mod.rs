//! What differs between PostgreSQL, MySQL/MariaDB and SQLite, in one place: one [`Dialect`]
//! per database, one file each ([`Postgres`], [`MySql`], [`Sqlite`]), found from a database URL
//! with [`for_url`].
//!
//! A dialect knows how the database quotes and compares names, writes bind parameters, creates
//! the key table, lets processes take turns at DDL ([`DdlGuard`], [`DdlTurn`]), opens a
//! transaction that will write, locks rows, sets up a session, and says that a table is
//! missing. It builds SQL text only: it runs nothing and depends on no driver, so the key
//! stores of envelope-sqlx and envelope-diesel, the `envelope` CLI and the examples share it.
//!
//! This module is public for the authors of other [`KeyStore`](crate::KeyStore)s over these
//! databases (another driver, another ORM): the key table's DDL, its turn-taking and its
//! missing-table answer are the parts such a store must agree on with envelope's own. The trait
//! is sealed, so methods can be added in any release; code holds a dialect as
//! `&'static dyn Dialect`.
//!
//! ```
//! use envelope_core::dialect::{self, Kind};
//!
//! let d = dialect::for_url("mariadb://app@db/app").expect("a known scheme");
//! assert_eq!(d.kind(), Kind::MySql);
//! assert_eq!(d.driver_url("mariadb://app@db/app"), "mysql://app@db/app");
//! assert_eq!(d.quote("Orders"), "`Orders`");
//! assert_eq!(d.placeholder(2), "?");
//! assert_eq!(dialect::for_url("postgres://db/app").map(|d| d.placeholder(2)), Some("$2".into()));
//! ```

use std::borrow::Cow;
use std::time::Duration;

use crate::error::StoreError;

mod mysql;
mod postgres;
mod sqlite;

pub use mysql::{MySql, STRICT_SESSION as MYSQL_STRICT_SESSION};
pub use postgres::Postgres;
pub use sqlite::Sqlite;

/// The key table's DDL for the default table name, one script per database: the text that
/// [`Dialect::key_table_ddl`] returns, also shipped as files for applications' own migrations
/// (`docs/FORMAT.md`, section 7). Idempotent (`IF NOT EXISTS`).
pub mod ddl {
    /// PostgreSQL.
    pub const POSTGRES: &str = super::postgres::DDL;
    /// MySQL 8 and MariaDB 10.5+.
    pub const MYSQL: &str = super::mysql::DDL;
    /// SQLite.
    pub const SQLITE: &str = super::sqlite::DDL;
}

/// Which database a [`Dialect`] speaks, for the SQL a caller writes per database beyond what the
/// trait covers (column types of its own tables, catalog queries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    MySql,
    /// SQLite.
    Sqlite,
}

impl Kind {
    /// This database's dialect.
    pub fn dialect(self) -> &'static dyn Dialect {
        match self {
            Kind::Postgres => &Postgres,
            Kind::MySql => &MySql,
            Kind::Sqlite => &Sqlite,
        }
    }
}

mod sealed {
    pub trait Sealed {}
}

/// One database's SQL. Implemented by [`Postgres`], [`MySql`] and [`Sqlite`]; sealed.
pub trait Dialect: sealed::Sealed + Send + Sync + std::fmt::Debug + 'static {
    /// Which database.
    fn kind(&self) -> Kind;

    /// Its name in messages: `PostgreSQL`, `MySQL/MariaDB`, `SQLite`.
    fn name(&self) -> &'static str;

    /// The URL schemes that name it, without the colon (`postgres`, `postgresql`).
    fn schemes(&self) -> &'static [&'static str];

    /// `url` as the database drivers know it: MariaDB speaks the MySQL protocol, and the drivers
    /// know only the scheme `mysql:`, so `mariadb:` becomes `mysql:`. Any other URL is
    /// unchanged.
    fn driver_url<'u>(&self, url: &'u str) -> Cow<'u, str> {
        Cow::Borrowed(url)
    }

    /// `name` quoted as an identifier; `schema.name` quotes each part. A quote character inside
    /// a part is doubled.
    fn quote(&self, name: &str) -> String {
        let q = self.quote_char();
        name.split('.')
            .map(|part| {
                let doubled = part.replace(q, &format!("{q}{q}"));
                format!("{q}{doubled}{q}")
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The character [`quote`](Dialect::quote) wraps names in: `"`, or `` ` `` on MySQL.
    fn quote_char(&self) -> char {
        '"'
    }

    /// Whether the database takes a quoted name as written (PostgreSQL) or compares names ASCII
    /// case-insensitively (MySQL/MariaDB columns, SQLite).
    fn names_fold_case(&self) -> bool;

    /// `name` as the database compares it: as written, or ASCII lower case where names fold.
    fn fold<'n>(&self, name: &'n str) -> Cow<'n, str> {
        if self.names_fold_case() && name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        }
    }

    /// Whether `a` and `b` name the same column or table (see [`fold`](Dialect::fold)).
    fn same_name(&self, a: &str, b: &str) -> bool {
        if self.names_fold_case() {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    }

    /// Whether bind parameters are numbered (`$1`, PostgreSQL) rather than `?`.
    fn numbered_placeholders(&self) -> bool {
        false
    }

    /// The `n`th bind parameter (from 1): `$n` on PostgreSQL, `?` elsewhere.
    fn placeholder(&self, n: usize) -> String {
        if self.numbered_placeholders() {
            format!("${n}")
        } else {
            "?".to_owned()
        }
    }

    /// `count` bind parameters from the `first`, separated by `, ` (for `VALUES (…)` and
    /// `IN (…)`).
    fn placeholders(&self, first: usize, count: usize) -> String {
        (first..first + count)
            .map(|n| self.placeholder(n))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key table's DDL for the default name ([`DEFAULT_TABLE`](crate::key_table::DEFAULT_TABLE)),
    /// as shipped for applications' migrations. Idempotent (`IF NOT EXISTS`).
    fn key_table_ddl(&self) -> &'static str;

    /// The statements of the key table's DDL for the table `table` (a name
    /// [`check_table_name`](crate::key_table::check_table_name) accepts), comments dropped; its
    /// index is renamed with it.
    fn key_table_statements(&self, table: &str) -> Vec<String> {
        split_script(self.key_table_ddl(), crate::key_table::DEFAULT_TABLE, table)
    }

    /// The statements around DDL that let several processes run it at the same moment.
    fn ddl_guard(&self) -> DdlGuard;

    /// DDL statements taking their turn: see [`DdlTurn`].
    fn ddl_in_turn<'s>(&self, statements: &'s [String]) -> DdlTurn<'s> {
        DdlTurn::new(self.ddl_guard(), statements)
    }

    /// The statement that opens a transaction that will write. SQLite's `BEGIN IMMEDIATE` takes
    /// the write lock at once, so two such transactions wait for each other instead of one
    /// failing with "database is locked" when it first writes.
    fn begin_write(&self) -> &'static str {
        "BEGIN"
    }

    /// The suffix of a `SELECT` that locks the rows it reads until the transaction ends
    /// (` FOR UPDATE`); empty on SQLite, whose write transaction already excludes other writers.
    fn lock_rows(&self) -> &'static str {
        " FOR UPDATE"
    }

    /// As [`lock_rows`](Dialect::lock_rows), skipping rows another transaction holds
    /// (` FOR UPDATE SKIP LOCKED`; MySQL 8, MariaDB 10.6).
    fn lock_rows_skip_locked(&self) -> &'static str {
        " FOR UPDATE SKIP LOCKED"
    }

    /// Statements that make a session refuse to cut a value too long for its column (a sealed
    /// value cut short can never be opened): MySQL/MariaDB's strict mode. Empty elsewhere,
    /// where that is always an error.
    fn strict_session(&self) -> &'static [&'static str] {
        &[]
    }

    /// Statements that make a session read and write times in UTC, dates as ISO.
    fn utc_session(&self) -> &'static [&'static str] {
        &[]
    }

    /// The statement that makes a session wait up to `timeout` for another writer instead of
    /// failing at once (SQLite's `busy_timeout`); `None` where the database waits anyway.
    fn wait_for_writers(&self, timeout: Duration) -> Option<String> {
        let _ = timeout;
        None
    }

    /// The statements a key store runs on each connection of its own: strict, and on SQLite
    /// waiting up to [`KEY_STORE_BUSY_TIMEOUT`] for other writers.
    fn key_store_session(&self) -> Vec<String> {
        self.strict_session()
            .iter()
            .map(|s| (*s).to_owned())
            .chain(self.wait_for_writers(KEY_STORE_BUSY_TIMEOUT))
            .collect()
    }

    /// Whether `message` (a database error's text) says that the table `table` does not exist.
    fn is_missing_table(&self, message: &str, table: &str) -> bool;

    /// `e`, or [`StoreError::MissingTable`] when it is this database's "no such table" about
    /// `table`. Key stores pass their backend errors through it.
    fn missing_table(&self, e: StoreError, table: &str) -> StoreError {
        if let StoreError::Backend(source) = &e
            && self.is_missing_table(&source.to_string(), table)
        {
            return StoreError::MissingTable {
                table: table.to_owned(),
            };
        }
        e
    }
}

/// How long a key store's SQLite connection waits for another writer.
pub const KEY_STORE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Every dialect.
pub const ALL: [&dyn Dialect; 3] = [&Postgres, &MySql, &Sqlite];

/// The scheme of `url`: what comes before the first `:`.
pub fn scheme(url: &str) -> &str {
    url.split(':').next().unwrap_or("")
}

/// The dialect of a database URL, by its scheme: `postgres:`/`postgresql:`,
/// `mysql:`/`mariadb:`, `sqlite:`. `None` for any other.
pub fn for_url(url: &str) -> Option<&'static dyn Dialect> {
    let scheme = scheme(url);
    ALL.into_iter().find(|d| d.schemes().contains(&scheme))
}

/// Statements run on one connection around DDL, so that several processes running it at the
/// same moment (the replicas of a new deployment) take turns.
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

/// DDL taking its turn: the [`DdlGuard`]'s statements before, the DDL until one fails, then the
/// guard's statements after (or on error). The caller runs each statement it hands out and
/// records the outcome, so one loop serves sync and async connections alike:
///
/// ```
/// # use envelope_core::{StoreError, dialect::Dialect};
/// # fn run(sql: &str) -> Result<(), StoreError> { Ok(()) }
/// let statements = vec!["CREATE TABLE IF NOT EXISTS t (id INT)".to_owned()];
/// let mut turn = envelope_core::dialect::Postgres.ddl_in_turn(&statements);
/// while let Some(sql) = turn.next_statement() {
///     turn.record(run(sql));
/// }
/// turn.finish()?;
/// # Ok::<(), StoreError>(())
/// ```
#[derive(Debug)]
pub struct DdlTurn<'s> {
    guard: DdlGuard,
    statements: &'s [String],
    /// Statements handed out so far in the current phase.
    next: usize,
    phase: Phase,
    result: Result<(), StoreError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Before,
    Statements,
    Finish,
    Done,
}

impl<'s> DdlTurn<'s> {
    fn new(guard: DdlGuard, statements: &'s [String]) -> Self {
        DdlTurn {
            guard,
            statements,
            next: 0,
            phase: Phase::Before,
            result: Ok(()),
        }
    }

    /// The next statement to run, `None` when the turn is over.
    pub fn next_statement(&mut self) -> Option<&'s str> {
        loop {
            let sql = match self.phase {
                Phase::Before => self.guard.before.get(self.next).copied(),
                Phase::Statements => self.statements.get(self.next).map(String::as_str),
                Phase::Finish if self.result.is_ok() => self.guard.after.get(self.next).copied(),
                Phase::Finish => self.guard.on_error.get(self.next).copied(),
                Phase::Done => return None,
            };
            if sql.is_some() {
                self.next += 1;
                return sql;
            }
            self.next = 0;
            self.phase = match self.phase {
                Phase::Before => Phase::Statements,
                Phase::Statements => Phase::Finish,
                Phase::Finish | Phase::Done => Phase::Done,
            };
        }
    }

    /// The outcome of the statement last handed out. After a failure no more DDL is handed
    /// out, only the guard's statements on error; the first error is the one kept.
    pub fn record(&mut self, outcome: Result<(), StoreError>) {
        if let Err(e) = outcome
            && self.result.is_ok()
        {
            self.result = Err(e);
            if self.phase != Phase::Finish {
                self.phase = Phase::Finish;
                self.next = 0;
            }
        }
    }

    /// The first error, if any statement failed.
    ///
    /// # Errors
    /// That error.
    pub fn finish(self) -> Result<(), StoreError> {
        self.result
    }
}

/// The statements of a script (`;`-separated, `--` comment lines dropped), with `from` renamed
/// to `to`.
fn split_script(script: &str, from: &str, to: &str) -> Vec<String> {
    script
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .split(';')
        .map(|s| s.trim().replace(from, to))
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_table::DEFAULT_TABLE;

    fn backend(text: &str) -> StoreError {
        StoreError::backend(std::io::Error::other(text.to_owned()))
    }

    #[test]
    fn urls_find_their_dialect() {
        for (url, kind) in [
            ("postgres://u@h/db", Kind::Postgres),
            ("postgresql://u@h/db", Kind::Postgres),
            ("mysql://u@h/db", Kind::MySql),
            ("mariadb://u@h/db", Kind::MySql),
            ("sqlite://app.db?mode=rwc", Kind::Sqlite),
            ("sqlite::memory:", Kind::Sqlite),
        ] {
            assert_eq!(for_url(url).map(|d| d.kind()), Some(kind), "{url}");
            assert_eq!(kind.dialect().kind(), kind);
        }
        for url in ["oracle://h/db", "app.db", "", "MYSQL://h/db", "postgres"] {
            assert!(for_url(url).is_none() || url == "postgres", "{url}");
        }
        assert_eq!(scheme("postgres"), "postgres");
    }

    #[test]
    fn mariadb_urls_become_mysql_urls_for_the_drivers() {
        assert_eq!(MySql.driver_url("mariadb://u@h/db"), "mysql://u@h/db");
        assert_eq!(
            MySql.driver_url("mysql://u@h/mariadb"),
            "mysql://u@h/mariadb"
        );
        assert_eq!(
            Postgres.driver_url("postgres://h/mariadb:x"),
            "postgres://h/mariadb:x"
        );
        assert_eq!(Sqlite.driver_url("sqlite://a.db"), "sqlite://a.db");
    }

    #[test]
    fn placeholders_are_numbered_on_postgres_only() {
        assert_eq!(Postgres.placeholder(1), "$1");
        assert_eq!(Postgres.placeholders(3, 3), "$3, $4, $5");
        assert!(Postgres.numbered_placeholders());
        for d in [&MySql as &dyn Dialect, &Sqlite] {
            assert!(!d.numbered_placeholders());
            assert_eq!(d.placeholder(7), "?");
            assert_eq!(d.placeholders(1, 3), "?, ?, ?");
        }
        assert_eq!(Sqlite.placeholders(1, 0), "");
    }

    #[test]
    fn names_are_quoted_per_database() {
        assert_eq!(Postgres.quote("Orders"), r#""Orders""#);
        assert_eq!(Postgres.quote("app.orders"), r#""app"."orders""#);
        assert_eq!(Postgres.quote(r#"a"b"#), r#""a""b""#);
        assert_eq!(MySql.quote("app.orders"), "`app`.`orders`");
        assert_eq!(MySql.quote("a`b"), "`a``b`");
        assert_eq!(Sqlite.quote("orders"), r#""orders""#);
    }

    #[test]
    fn names_fold_except_on_postgres() {
        assert!(!Postgres.same_name("Email", "email"));
        assert!(Postgres.same_name("email", "email"));
        assert_eq!(Postgres.fold("Email"), "Email");
        for d in [&MySql as &dyn Dialect, &Sqlite] {
            assert!(d.same_name("Email", "eMAIL"));
            assert!(!d.same_name("email", "emails"));
            assert_eq!(d.fold("Email"), "email");
            // ASCII only: the databases do not fold other letters the same way.
            assert!(!d.same_name("É", "é"));
        }
    }

    #[test]
    fn key_table_statements_rename_the_table_and_its_index() {
        for d in ALL {
            let out = d.key_table_statements("tenant_keys");
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
    fn no_such_table_is_recognised_per_database() {
        for (d, text) in [
            (
                &Postgres as &dyn Dialect,
                r#"error returned from database: relation "keys_1" does not exist"#,
            ),
            (&MySql, "Table 'test.keys_1' doesn't exist"),
            (&Sqlite, "no such table: keys_1"),
        ] {
            let e = d.missing_table(backend(text), "keys_1");
            assert!(matches!(e, StoreError::MissingTable { .. }), "{text}");
            assert!(e.to_string().contains("create_table()"), "{e}");
            // Another table, or another error, stays what it was.
            let other = d.missing_table(backend(text), "keys_2");
            assert!(matches!(other, StoreError::Backend(_)), "{text}");
            let conflict = d.missing_table(StoreError::Conflict(text.into()), "keys_1");
            assert!(matches!(conflict, StoreError::Conflict(_)));
        }
        assert!(!Postgres.is_missing_table("no such table: keys_1", "keys_1"));
        assert!(!Sqlite.is_missing_table("Table 'test.keys_1' doesn't exist", "keys_1"));
        assert!(!MySql.is_missing_table(r#"relation "keys_1" does not exist"#, "keys_1"));
    }

    #[test]
    fn sessions_and_transactions_differ_per_database() {
        assert_eq!(Sqlite.begin_write(), "BEGIN IMMEDIATE");
        assert_eq!(Postgres.begin_write(), "BEGIN");
        assert_eq!(Sqlite.lock_rows(), "");
        assert_eq!(MySql.lock_rows(), " FOR UPDATE");
        assert_eq!(MySql.strict_session(), [MYSQL_STRICT_SESSION]);
        assert_eq!(
            Sqlite.key_store_session(),
            ["PRAGMA busy_timeout = 5000".to_owned()]
        );
        assert!(Postgres.key_store_session().is_empty());
        assert_eq!(MySql.key_store_session(), [MYSQL_STRICT_SESSION.to_owned()]);
        assert_eq!(MySql.utc_session(), ["SET time_zone = '+00:00'"]);
    }

    fn run_turn(d: &dyn Dialect, fail_at: Option<&str>) -> (Vec<String>, Result<(), StoreError>) {
        let statements = vec!["A".to_owned(), "B".to_owned(), "C".to_owned()];
        let mut turn = d.ddl_in_turn(&statements);
        let mut ran = Vec::new();
        while let Some(sql) = turn.next_statement() {
            ran.push(sql.to_owned());
            let failed = Some(sql) == fail_at || (fail_at == Some("*after") && sql == "COMMIT");
            turn.record(if failed { Err(backend(sql)) } else { Ok(()) });
        }
        (ran, turn.finish())
    }

    #[test]
    fn ddl_takes_turns_and_reports_the_first_error() {
        let (ran, result) = run_turn(&Postgres, None);
        assert_eq!(
            ran,
            [
                "BEGIN",
                "SELECT pg_advisory_xact_lock(6573006219848410995)",
                "A",
                "B",
                "C",
                "COMMIT"
            ]
        );
        assert!(result.is_ok());

        let (ran, result) = run_turn(&Postgres, Some("B"));
        assert_eq!(ran[2..], ["A", "B", "ROLLBACK"]);
        assert_eq!(result.unwrap_err().source_text(), "B");

        let (ran, result) = run_turn(&Postgres, Some("*after"));
        assert_eq!(ran.last().map(String::as_str), Some("COMMIT"));
        assert!(result.is_err());

        let (ran, _) = run_turn(&MySql, Some("A"));
        assert_eq!(
            ran,
            [
                "SELECT GET_LOCK('envelope-keys-ddl', 60)",
                "A",
                "SELECT RELEASE_LOCK('envelope-keys-ddl')"
            ]
        );
        let (ran, result) = run_turn(&Sqlite, None);
        assert_eq!(ran, ["A", "B", "C"]);
        assert!(result.is_ok());
    }

    trait SourceText {
        fn source_text(&self) -> String;
    }

    impl SourceText for StoreError {
        fn source_text(&self) -> String {
            std::error::Error::source(self)
                .map(ToString::to_string)
                .unwrap_or_default()
        }
    }
}
