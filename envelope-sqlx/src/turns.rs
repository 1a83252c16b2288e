//! DDL that several processes run at the same moment (the replicas of a new deployment), made to
//! take turns: the key table's `create_table` and an application's own `CREATE TABLE IF NOT
//! EXISTS` go through [`run_ddl_in_turn`].

use envelope_core::StoreError;
use envelope_core::key_table::DdlGuard;
use sqlx::{Database, Executor, Pool};

use crate::store::backend;

mod sealed {
    pub trait Sealed {}
}

/// A sqlx database [`run_ddl_in_turn`] works on: `Postgres`, `MySql`, `Sqlite` (with the crate
/// features of the same names) and `Any` (feature `any`), which looks at the connection's
/// backend. Sealed.
pub trait DdlTurns: Database + sealed::Sealed {
    /// How processes take turns on this connection's database.
    #[doc(hidden)]
    fn guard(conn: &Self::Connection) -> Result<DdlGuard, StoreError>;
}

#[cfg(feature = "postgres")]
impl sealed::Sealed for sqlx::Postgres {}
#[cfg(feature = "postgres")]
impl DdlTurns for sqlx::Postgres {
    fn guard(_: &sqlx::PgConnection) -> Result<DdlGuard, StoreError> {
        Ok(DdlGuard::POSTGRES)
    }
}

#[cfg(feature = "mysql")]
impl sealed::Sealed for sqlx::MySql {}
#[cfg(feature = "mysql")]
impl DdlTurns for sqlx::MySql {
    fn guard(_: &sqlx::MySqlConnection) -> Result<DdlGuard, StoreError> {
        Ok(DdlGuard::MYSQL)
    }
}

#[cfg(feature = "sqlite")]
impl sealed::Sealed for sqlx::Sqlite {}
#[cfg(feature = "sqlite")]
impl DdlTurns for sqlx::Sqlite {
    fn guard(_: &sqlx::SqliteConnection) -> Result<DdlGuard, StoreError> {
        Ok(DdlGuard::SQLITE)
    }
}

#[cfg(feature = "any")]
impl sealed::Sealed for sqlx::Any {}
#[cfg(feature = "any")]
impl DdlTurns for sqlx::Any {
    fn guard(conn: &sqlx::AnyConnection) -> Result<DdlGuard, StoreError> {
        // The names are sqlx's `Database::NAME` of each driver.
        match conn.backend_name() {
            "PostgreSQL" => Ok(DdlGuard::POSTGRES),
            "MySQL" => Ok(DdlGuard::MYSQL),
            "SQLite" => Ok(DdlGuard::SQLITE),
            other => Err(StoreError::backend(UnknownBackend(other.to_owned()))),
        }
    }
}

/// An `Any` connection to a database [`run_ddl_in_turn`] does not know how to serialize.
#[cfg(feature = "any")]
#[derive(Debug)]
struct UnknownBackend(String);

#[cfg(feature = "any")]
impl std::fmt::Display for UnknownBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot take turns at DDL on {}: PostgreSQL, MySQL/MariaDB and SQLite only",
            self.0
        )
    }
}

#[cfg(feature = "any")]
impl std::error::Error for UnknownBackend {}

/// Run `statements` (an application's own `CREATE TABLE IF NOT EXISTS …`, `CREATE INDEX IF
/// NOT EXISTS …`, or any other DDL) on one connection of `pool`, taking turns with every other
/// process doing the same, so that the replicas of a new deployment can all start at once on a
/// fresh database. It is what [`SqlxKeyStore::create_table`](crate::SqlxKeyStore) does for the
/// key table, and shares its lock:
///
/// - PostgreSQL: the statements run in one transaction that first takes a transaction-scoped
///   advisory lock (`pg_advisory_xact_lock`). Without it, concurrent `CREATE TABLE IF NOT
///   EXISTS` fails with a unique violation on `pg_type_typname_nsp_index`. A failed statement
///   rolls them all back;
/// - MySQL/MariaDB: the named lock `envelope-keys-ddl` (`GET_LOCK`, waited for up to 60 s),
///   held by the connection around the statements. DDL commits implicitly there, so the
///   statements before a failed one stay;
/// - SQLite: nothing; SQLite serializes writers itself;
/// - `Any`: whichever of these the connection's database is.
///
/// The statements must be idempotent (`IF NOT EXISTS`): every process runs them, one after
/// the other. Each string is sent as it is (no bind parameters), so several statements may be
/// one string where the database allows it (PostgreSQL, SQLite); on MySQL/MariaDB give one
/// statement per string. The lock is per database (PostgreSQL) or per server (MySQL/MariaDB),
/// shared with every envelope process: keep the DDL short.
///
/// ```no_run
/// # async fn start() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::PgPool::connect("postgres://app@db/app").await?;
/// envelope_sqlx::run_ddl_in_turn(
///     &pool,
///     &[
///         "CREATE TABLE IF NOT EXISTS customers (id TEXT PRIMARY KEY, email BYTEA NOT NULL)",
///         "CREATE INDEX IF NOT EXISTS customers_email ON customers (email)",
///     ],
/// )
/// .await?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// The database's error for the first statement that failed (or for taking the lock), as
/// [`StoreError::Backend`]; a connection that failed is closed rather than returned to the pool,
/// so it never goes back holding the lock or an open transaction.
pub async fn run_ddl_in_turn<DB, S>(pool: &Pool<DB>, statements: &[S]) -> Result<(), StoreError>
where
    DB: DdlTurns,
    S: AsRef<str> + Sync,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let mut conn = pool.acquire().await.map_err(backend)?;
    let guard = DB::guard(&conn)?;
    let result = run_guarded::<DB, S>(&mut conn, guard, statements).await;
    if result.is_err() {
        conn.close_on_drop();
    }
    result
}

/// `statements` between `guard`'s statements, on `conn`.
async fn run_guarded<DB, S>(
    conn: &mut DB::Connection,
    guard: DdlGuard,
    statements: &[S],
) -> Result<(), StoreError>
where
    DB: Database,
    S: AsRef<str> + Sync,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    async fn run<DB>(conn: &mut DB::Connection, sql: &str) -> Result<(), StoreError>
    where
        DB: Database,
        for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut *conn)
            .await
            .map(|_| ())
            .map_err(backend)
    }
    let mut result = Ok(());
    for sql in guard
        .before
        .iter()
        .copied()
        .chain(statements.iter().map(AsRef::as_ref))
    {
        result = run::<DB>(conn, sql).await;
        if result.is_err() {
            break;
        }
    }
    let finish = if result.is_ok() {
        guard.after
    } else {
        guard.on_error
    };
    for sql in finish {
        let done = run::<DB>(conn, sql).await;
        // The first error is the one worth reporting.
        if result.is_ok() {
            result = done;
        }
    }
    result
}
