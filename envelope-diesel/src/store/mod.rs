//! The key table through diesel, on PostgreSQL, MySQL/MariaDB and SQLite: [`DieselKeyStore`]
//! for sync diesel (feature `r2d2`) and `AsyncDieselKeyStore` for diesel-async (feature
//! `async`).
//!
//! The table is envelope's one key table (`docs/FORMAT.md`, section 7): the same DDL as
//! envelope-sqlx's `SqlxKeyStore` and the `envelope` CLI, so any of them reads the keys the others
//! wrote. Create it with the store's `create_table`, or with the diesel migrations this crate
//! ships (`migrations/<database>/`, and embedded with the feature `migrations`).
//!
//! Both stores keep connections of their own, apart from the application's pool: a key-table
//! read happens when a value under a key that is not cached is read, inside diesel's `FromSql`,
//! while the application's connection is busy with that very query. If the store borrowed from
//! the application's pool, a pool whose every connection is reading rows would wait for itself.

use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::result::DatabaseErrorKind;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use envelope_core::dialect::{self, Dialect};
use envelope_core::key_table::{self, COLUMNS, KeyRow, millis};
use envelope_core::{KeyFilter, KeyId, KeyRecord, StoreError};

#[cfg(feature = "async")]
mod nonblocking;
#[cfg(feature = "r2d2")]
mod sync;

#[cfg(feature = "async")]
pub use nonblocking::{AsyncDieselKeyStore, AsyncKeyTableConnection};
#[cfg(feature = "r2d2")]
pub use sync::{DieselKeyStore, KeyTableConnection};

pub use envelope_core::dialect::ddl;
pub use envelope_core::key_table::DEFAULT_TABLE;

/// The key table (named `envelope_keys`) as diesel migrations, one set per database, embedded
/// from this crate's `migrations/<database>/` (the same files work with the diesel CLI:
/// `diesel migration run --migration-dir …`). Run the set of your database beside your own:
///
/// ```no_run
/// use diesel::Connection;
/// use diesel_migrations::MigrationHarness;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let mut conn = diesel::pg::PgConnection::establish("postgres://app@db/app")?;
/// conn.run_pending_migrations(envelope_diesel::store::migrations::POSTGRES)?;
/// # Ok(()) }
/// ```
///
/// For another table name, use the store's `create_table` instead.
#[cfg(feature = "migrations")]
pub mod migrations {
    use diesel_migrations::{EmbeddedMigrations, embed_migrations};

    /// PostgreSQL.
    pub const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
    /// MySQL 8 and MariaDB 10.5+.
    pub const MYSQL: EmbeddedMigrations = embed_migrations!("migrations/mysql");
    /// SQLite.
    pub const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
}

mod private {
    pub trait Sealed {}
}

/// A diesel backend the key table is defined for: `Pg`, `Mysql` and `Sqlite` (with the crate
/// features `postgres`, `mysql`, `sqlite`). Sealed. Every SQL decision (the DDL, taking turns at
/// it, the statements run on each new connection, placeholders, a missing table) is its
/// [`DIALECT`](KeyTableBackend::DIALECT)'s.
pub trait KeyTableBackend: diesel::backend::Backend + private::Sealed {
    /// This database's SQL.
    const DIALECT: &'static dyn Dialect;
    #[doc(hidden)]
    fn query(statement: Statement) -> BoxedSqlQuery<'static, Self, SqlQuery>;
}

macro_rules! key_table_backend {
    ($db:ty, $dialect:expr) => {
        impl private::Sealed for $db {}

        impl KeyTableBackend for $db {
            const DIALECT: &'static dyn Dialect = &$dialect;

            fn query(statement: Statement) -> BoxedSqlQuery<'static, Self, SqlQuery> {
                let mut q = diesel::sql_query(statement.sql).into_boxed::<$db>();
                for bind in statement.binds {
                    q = match bind {
                        Bind::Bytes(v) => q.bind::<Binary, _>(v),
                        Bind::Text(v) => q.bind::<Text, _>(v),
                        Bind::Int(v) => q.bind::<BigInt, _>(v),
                        Bind::NullableInt(v) => q.bind::<Nullable<BigInt>, _>(v),
                    };
                }
                q
            }
        }
    };
}

#[cfg(feature = "postgres")]
key_table_backend!(diesel::pg::Pg, dialect::Postgres);
#[cfg(feature = "mysql")]
key_table_backend!(diesel::mysql::Mysql, dialect::MySql);
#[cfg(feature = "sqlite")]
key_table_backend!(diesel::sqlite::Sqlite, dialect::Sqlite);

/// Run `statements` (an application's own `CREATE TABLE IF NOT EXISTS …`, `CREATE INDEX IF
/// NOT EXISTS …`, or any other DDL) on `conn`, taking turns with every other process doing the
/// same, so that the replicas of a new deployment can all start at once on a fresh database. It
/// is what the stores' `create_table` does for the key table, and shares its lock:
///
/// - PostgreSQL: the statements run in one transaction that first takes a transaction-scoped
///   advisory lock (`pg_advisory_xact_lock`). Without it, concurrent `CREATE TABLE IF NOT
///   EXISTS` fails with a unique violation on `pg_type_typname_nsp_index`. A failed statement
///   rolls them all back;
/// - MySQL/MariaDB: the named lock `envelope-keys-ddl` (`GET_LOCK`, waited for up to 60 s),
///   held by the connection around the statements. DDL commits implicitly there, so the
///   statements before a failed one stay;
/// - SQLite: nothing; SQLite serializes writers itself.
///
/// The statements must be idempotent (`IF NOT EXISTS`): every process runs them, one after
/// the other. Each string goes to `batch_execute`, so it may hold several statements. The lock
/// is per database (PostgreSQL) or per server (MySQL/MariaDB), shared with every envelope
/// process: keep the DDL short. Do not call it inside a transaction of your own (PostgreSQL's
/// `BEGIN` would not nest).
///
/// ```no_run
/// use diesel::Connection;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let mut conn = diesel::pg::PgConnection::establish("postgres://app@db/app")?;
/// envelope_diesel::run_ddl_in_turn(
///     &mut conn,
///     &[
///         "CREATE TABLE IF NOT EXISTS patients (id TEXT PRIMARY KEY, email BYTEA NOT NULL)",
///         "CREATE INDEX IF NOT EXISTS patients_email ON patients (email)",
///     ],
/// )?;
/// # Ok(()) }
/// ```
///
/// # Errors
/// The database's error for the first statement that failed (or for taking the lock), as
/// [`StoreError::Backend`].
pub fn run_ddl_in_turn<C, S>(conn: &mut C, statements: &[S]) -> Result<(), StoreError>
where
    C: diesel::Connection,
    C::Backend: KeyTableBackend,
    S: AsRef<str>,
{
    let statements: Vec<String> = statements.iter().map(|s| s.as_ref().to_owned()).collect();
    let mut turn = <C::Backend as KeyTableBackend>::DIALECT.ddl_in_turn(&statements);
    while let Some(sql) = turn.next_statement() {
        turn.record(conn.batch_execute(sql).map_err(backend));
    }
    turn.finish()
}

/// A bind value of a key-table statement.
#[doc(hidden)]
#[derive(Debug)]
pub enum Bind {
    Bytes(Vec<u8>),
    Text(String),
    Int(i64),
    NullableInt(Option<i64>),
}

/// A key-table statement: SQL with its placeholders, and the values bound to them.
#[doc(hidden)]
#[derive(Debug)]
pub struct Statement {
    sql: String,
    binds: Vec<Bind>,
    dialect: &'static dyn Dialect,
}

impl Statement {
    fn new(dialect: &'static dyn Dialect, sql: impl Into<String>) -> Self {
        Statement {
            sql: sql.into(),
            binds: Vec::new(),
            dialect,
        }
    }

    fn push(mut self, sql: &str) -> Self {
        self.sql.push_str(sql);
        self
    }

    fn bind(mut self, value: Bind) -> Self {
        self.binds.push(value);
        self.sql
            .push_str(&self.dialect.placeholder(self.binds.len()));
        self
    }
}

/// A key-table row as diesel loads it.
#[doc(hidden)]
#[derive(diesel::QueryableByName)]
pub struct KeyRowSql {
    #[diesel(sql_type = Binary)]
    id: Vec<u8>,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = Text)]
    provider: String,
    #[diesel(sql_type = Text)]
    cmk_id: String,
    #[diesel(sql_type = Binary)]
    wrapped: Vec<u8>,
    #[diesel(sql_type = Text)]
    kms_context: String,
    #[diesel(sql_type = BigInt)]
    created_at: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    retired_at: Option<i64>,
}

impl KeyRowSql {
    fn into_record(self) -> Result<KeyRecord, StoreError> {
        KeyRow {
            id: self.id,
            kind: self.kind,
            scope: self.scope,
            provider: self.provider,
            cmk_id: self.cmk_id,
            wrapped: self.wrapped,
            kms_context: self.kms_context,
            created_at: self.created_at,
            retired_at: self.retired_at,
        }
        .into_record()
    }
}

fn records(rows: Vec<KeyRowSql>) -> Result<Vec<KeyRecord>, StoreError> {
    rows.into_iter().map(KeyRowSql::into_record).collect()
}

/// The statements of every [`envelope_core::KeyStore`] operation on one table.
#[derive(Clone, Debug)]
struct Queries {
    table: String,
    dialect: &'static dyn Dialect,
}

impl Queries {
    fn new<DB: KeyTableBackend>(table: &str) -> Result<Self, envelope_core::Error> {
        key_table::check_table_name(table)?;
        Ok(Queries {
            table: table.to_owned(),
            dialect: DB::DIALECT,
        })
    }

    fn start(&self, sql: String) -> Statement {
        Statement::new(self.dialect, sql)
    }

    fn insert(&self, r: &KeyRecord) -> Statement {
        let row = KeyRow::from(r);
        self.start(format!("INSERT INTO {} ({COLUMNS}) VALUES (", self.table))
            .bind(Bind::Bytes(row.id))
            .push(", ")
            .bind(Bind::Text(row.kind))
            .push(", ")
            .bind(Bind::Text(row.scope))
            .push(", ")
            .bind(Bind::Text(row.provider))
            .push(", ")
            .bind(Bind::Text(row.cmk_id))
            .push(", ")
            .bind(Bind::Bytes(row.wrapped))
            .push(", ")
            .bind(Bind::Text(row.kms_context))
            .push(", ")
            .bind(Bind::Int(row.created_at))
            .push(", ")
            .bind(Bind::NullableInt(row.retired_at))
            .push(")")
    }

    fn get(&self, id: &KeyId) -> Statement {
        self.start(format!("SELECT {COLUMNS} FROM {} WHERE id = ", self.table))
            .bind(Bind::Bytes(id.as_bytes().to_vec()))
    }

    fn list(&self, filter: &KeyFilter) -> Statement {
        let mut q = self.start(format!("SELECT {COLUMNS} FROM {} WHERE 1 = 1", self.table));
        if let Some(kind) = filter.kind {
            q = q
                .push(" AND kind = ")
                .bind(Bind::Text(kind.as_str().to_owned()));
        }
        if let Some(scope) = &filter.scope {
            q = q.push(" AND scope = ").bind(Bind::Text(scope.clone()));
        }
        if let Some(cmk) = &filter.cmk_id {
            q = q.push(" AND cmk_id = ").bind(Bind::Text(cmk.clone()));
        }
        if !filter.include_retired {
            q = q.push(" AND retired_at IS NULL");
        }
        q.push(" ORDER BY created_at, id")
    }

    fn retire(&self, id: &KeyId, at: std::time::SystemTime) -> Statement {
        self.start(format!(
            "UPDATE {} SET retired_at = COALESCE(retired_at, ",
            self.table
        ))
        .bind(Bind::Int(millis(at)))
        .push(") WHERE id = ")
        .bind(Bind::Bytes(id.as_bytes().to_vec()))
    }

    fn rewrap(&self, r: &Rewrap) -> Statement {
        self.start(format!("UPDATE {} SET provider = ", self.table))
            .bind(Bind::Text(r.provider.clone()))
            .push(", cmk_id = ")
            .bind(Bind::Text(r.cmk_id.clone()))
            .push(", wrapped = ")
            .bind(Bind::Bytes(r.wrapped.clone()))
            .push(" WHERE id = ")
            .bind(Bind::Bytes(r.id.as_bytes().to_vec()))
            .push(" AND wrapped = ")
            .bind(Bind::Bytes(r.expected.clone()))
    }

    fn delete(&self, id: &KeyId) -> Statement {
        self.start(format!("DELETE FROM {} WHERE id = ", self.table))
            .bind(Bind::Bytes(id.as_bytes().to_vec()))
    }

    /// The DDL statements for this table.
    fn ddl(&self) -> Vec<String> {
        self.dialect.key_table_statements(&self.table)
    }

    /// `e`, or [`StoreError::MissingTable`] when it says that this table does not exist.
    fn missing_table(&self, e: StoreError) -> StoreError {
        self.dialect.missing_table(e, &self.table)
    }
}

/// A rewrap's arguments, owned.
#[derive(Clone)]
struct Rewrap {
    id: KeyId,
    expected: Vec<u8>,
    provider: String,
    cmk_id: String,
    wrapped: Vec<u8>,
}

impl Rewrap {
    fn new(id: &KeyId, expected: &[u8], provider: &str, cmk_id: &str, wrapped: &[u8]) -> Self {
        Rewrap {
            id: *id,
            expected: expected.to_vec(),
            provider: provider.to_owned(),
            cmk_id: cmk_id.to_owned(),
            wrapped: wrapped.to_vec(),
        }
    }

    /// What a rewrap whose update matched no row means, given the row as it is now.
    fn unmatched(&self, now: Option<KeyRecord>) -> Result<(), StoreError> {
        match now {
            None => Err(StoreError::NotFound(self.id)),
            // MySQL counts a row whose values did not change as unaffected.
            Some(r) if r.wrapped == self.wrapped && r.cmk_id == self.cmk_id => Ok(()),
            Some(_) => Err(StoreError::Conflict(format!(
                "key {} was rewrapped concurrently",
                self.id
            ))),
        }
    }
}

/// A diesel error as a store error: a unique violation is a conflict (a duplicate id, or a
/// second live index key for a label).
fn backend(e: diesel::result::Error) -> StoreError {
    if let diesel::result::Error::DatabaseError(DatabaseErrorKind::UniqueViolation, info) = &e {
        return StoreError::Conflict(format!("unique constraint: {}", info.message()));
    }
    StoreError::backend(e)
}

/// Whether an error leaves the connection unusable, so the store should open a new one.
#[cfg_attr(not(feature = "async"), allow(dead_code))]
fn breaks_connection(e: &diesel::result::Error) -> bool {
    use diesel::result::Error as E;
    match e {
        E::DatabaseError(kind, _) => matches!(
            kind,
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::Unknown
        ),
        E::NotFound | E::DeserializationError(_) | E::SerializationError(_) => false,
        _ => true,
    }
}
