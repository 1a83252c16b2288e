//! DDL that several processes run at the same moment (the replicas of a new deployment), made to
//! take turns: the key table's `create_table` and an application's own `CREATE TABLE IF NOT
//! EXISTS` go through [`run_ddl_in_turn`].

use envelope_core::StoreError;
use envelope_core::dialect::{self, Dialect};
use sqlx::{Database, Executor, Pool};

mod sealed {
    pub trait Sealed {}
}

/// A sqlx database [`run_ddl_in_turn`] works on: `Postgres`, `MySql`, `Sqlite` (with the crate
/// features of the same names) and `Any` (feature `any`), which looks at the connection's
/// backend. Sealed.
pub trait DdlTurns: Database + sealed::Sealed {
    /// The dialect of this connection's database, which says how processes take turns there.
    #[doc(hidden)]
    fn dialect(conn: &Self::Connection) -> Result<&'static dyn Dialect, StoreError>;
}

#[cfg(feature = "postgres")]
impl sealed::Sealed for sqlx::Postgres {}
#[cfg(feature = "postgres")]
impl DdlTurns for sqlx::Postgres {
    fn dialect(_: &sqlx::PgConnection) -> Result<&'static dyn Dialect, StoreError> {
        Ok(&dialect::Postgres)
    }
}

#[cfg(feature = "mysql")]
impl sealed::Sealed for sqlx::MySql {}
#[cfg(feature = "mysql")]
impl DdlTurns for sqlx::MySql {
    fn dialect(_: &sqlx::MySqlConnection) -> Result<&'static dyn Dialect, StoreError> {
        Ok(&dialect::MySql)
    }
}

#[cfg(feature = "sqlite")]
impl sealed::Sealed for sqlx::Sqlite {}
#[cfg(feature = "sqlite")]
impl DdlTurns for sqlx::Sqlite {
    fn dialect(_: &sqlx::SqliteConnection) -> Result<&'static dyn Dialect, StoreError> {
        Ok(&dialect::Sqlite)
    }
}

#[cfg(feature = "any")]
impl sealed::Sealed for sqlx::Any {}
#[cfg(feature = "any")]
impl DdlTurns for sqlx::Any {
    fn dialect(conn: &sqlx::AnyConnection) -> Result<&'static dyn Dialect, StoreError> {
        // The names are sqlx's `Database::NAME` of each driver.
        match conn.backend_name() {
            "PostgreSQL" => Ok(&dialect::Postgres),
            "MySQL" => Ok(&dialect::MySql),
            "SQLite" => Ok(&dialect::Sqlite),
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
    let dialect = DB::dialect(&conn)?;
    let result = run_in_turn::<DB, S>(&mut conn, dialect, statements).await;
    if result.is_err() {
        conn.close_on_drop();
    }
    result
}

/// `statements` taking their turn as `dialect` says, on `conn`.
async fn run_in_turn<DB, S>(
    conn: &mut DB::Connection,
    dialect: &dyn Dialect,
    statements: &[S],
) -> Result<(), StoreError>
where
    DB: Database,
    S: AsRef<str> + Sync,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    let statements: Vec<String> = statements.iter().map(|s| s.as_ref().to_owned()).collect();
    let mut turn = dialect.ddl_in_turn(&statements);
    while let Some(sql) = turn.next_statement() {
        let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut *conn)
            .await
            .map(|_| ())
            .map_err(backend);
        turn.record(done);
    }
    turn.finish()
}

/// A driver error as a store error: a unique-constraint violation is a lost race
/// ([`StoreError::Conflict`]), anything else the backend's failure.
pub(crate) fn backend(e: sqlx::Error) -> StoreError {
    if let Some(db) = e.as_database_error()
        && db.is_unique_violation()
    {
        return StoreError::Conflict(format!("unique constraint: {}", db.message()));
    }
    StoreError::backend(e)
}
