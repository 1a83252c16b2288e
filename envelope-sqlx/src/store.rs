//! The key table on PostgreSQL, MySQL/MariaDB and SQLite, through sqlx: one generic store whose
//! SQL decisions are the database's [`Dialect`]'s.

use std::marker::PhantomData;
use std::time::SystemTime;

use envelope_core::__private::IoRuntime;
use envelope_core::dialect::{self, Dialect, Kind};
use envelope_core::key_table::{self, COLUMNS, KeyRow, millis};
use envelope_core::{KeyFilter, KeyId, KeyRecord, KeyStore, StoreError, async_trait};
use sqlx::pool::PoolOptions;
use sqlx::{Database, Decode, Encode, Executor, IntoArguments, Pool, QueryBuilder, Row, Type};

use crate::turns::{DdlTurns, backend, run_ddl_in_turn};

/// The DDL for the default table name, one script per database (the same as
/// [`envelope_core::dialect::ddl`]), also shipped as files to copy into an application's own
/// migrations: `envelope-sqlx/key-table/{postgres,mysql,sqlite}.sql`.
pub mod ddl {
    pub use envelope_core::dialect::ddl::{MYSQL, POSTGRES, SQLITE};
}

/// The default key table name.
pub use envelope_core::key_table::DEFAULT_TABLE;

/// A sqlx database the key table can live on: `Postgres`, `MySql` and `Sqlite` (with the crate
/// features of the same names). Sealed.
pub trait KeyTableDatabase: DdlTurns + Sync {
    /// This database's SQL.
    const DIALECT: &'static dyn Dialect;
    /// The rows a statement changed (sqlx has no trait for it).
    #[doc(hidden)]
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

#[cfg(feature = "postgres")]
impl KeyTableDatabase for sqlx::Postgres {
    const DIALECT: &'static dyn Dialect = &dialect::Postgres;
    fn rows_affected(done: &sqlx::postgres::PgQueryResult) -> u64 {
        done.rows_affected()
    }
}

#[cfg(feature = "mysql")]
impl KeyTableDatabase for sqlx::MySql {
    const DIALECT: &'static dyn Dialect = &dialect::MySql;
    fn rows_affected(done: &sqlx::mysql::MySqlQueryResult) -> u64 {
        done.rows_affected()
    }
}

#[cfg(feature = "sqlite")]
impl KeyTableDatabase for sqlx::Sqlite {
    const DIALECT: &'static dyn Dialect = &dialect::Sqlite;
    fn rows_affected(done: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        done.rows_affected()
    }
}

/// A [`KeyStore`] over a sqlx database: `SqlxKeyStore<Postgres>`, `SqlxKeyStore<MySql>` or
/// `SqlxKeyStore<Sqlite>`.
///
/// It keeps its own small pool (two connections, to the database of the pool it is given) on a
/// runtime thread of its own. A key-table query runs when a cache miss happens
/// inside a synchronous `Decode` or `Encode`; if the connection belonged to the application's
/// current-thread runtime, that runtime's only thread would be the one waiting for it.
///
/// Because it has connections of its own, an in-memory SQLite database (`sqlite::memory:`,
/// private to each connection) cannot hold the key table: use a file.
pub struct SqlxKeyStore<DB: Database> {
    pool: Pool<DB>,
    runtime: IoRuntime,
    table: String,
    db: PhantomData<DB>,
}

impl<DB: Database> std::fmt::Debug for SqlxKeyStore<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlxKeyStore")
            .field("database", &DB::NAME)
            .field("table", &self.table)
            .finish()
    }
}

impl<DB> SqlxKeyStore<DB>
where
    DB: KeyTableDatabase,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    &'static str: sqlx::ColumnIndex<DB::Row>,
    DB::Arguments: IntoArguments<DB>,
{
    /// A store for the same database as `pool`, using the table `envelope_keys`. It takes
    /// only the pool's connect options: its queries go through connections of its own (see
    /// the type's docs), made on first use.
    ///
    /// # Errors
    /// [`envelope_core::SystemError::Thread`] when the store's runtime thread cannot start.
    pub fn same_database_as(pool: &Pool<DB>) -> Result<Self, envelope_core::Error> {
        Self::with_options((*pool.connect_options()).clone())
    }

    /// A store for the database at `url` (`postgres://...`, `mysql://...`, `sqlite://...`). No
    /// connection is made until the first query.
    ///
    /// # Errors
    /// [`envelope_core::ConfigError`] for a URL this database cannot use.
    pub fn connect_lazy(url: &str) -> Result<Self, envelope_core::Error> {
        use std::str::FromStr;
        let url = DB::DIALECT.driver_url(url);
        let options = <<DB::Connection as sqlx::Connection>::Options as FromStr>::from_str(&url)
            .map_err(|e| {
                envelope_core::ConfigError::new(format!("the {} URL", DB::NAME), e.to_string())
            })?;
        Self::with_options(options)
    }

    fn with_options(
        options: <DB::Connection as sqlx::Connection>::Options,
    ) -> Result<Self, envelope_core::Error> {
        let runtime = IoRuntime::start("envelope-keystore")?;
        let own = {
            let _entered = runtime.handle().enter();
            PoolOptions::<DB>::new()
                .max_connections(2)
                .min_connections(0)
                // MySQL/MariaDB: strict, so that nothing the store writes is cut short. (SQLite's
                // busy timeout is in sqlx's connect options: 5 s, or the application's.)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        for sql in DB::DIALECT.strict_session() {
                            sqlx::query(sqlx::AssertSqlSafe(*sql))
                                .execute(&mut *conn)
                                .await?;
                        }
                        Ok(())
                    })
                })
                .connect_lazy_with(options)
        };
        Ok(SqlxKeyStore {
            pool: own,
            runtime,
            table: DEFAULT_TABLE.to_owned(),
            db: PhantomData,
        })
    }

    /// Use another table name (letters, digits and `_`, not starting with a digit).
    ///
    /// # Errors
    /// [`Misuse::InvalidName`](envelope_core::Misuse::InvalidName) for anything else.
    pub fn with_table(mut self, table: &str) -> Result<Self, envelope_core::Error> {
        key_table::check_table_name(table)?;
        self.table = table.to_owned();
        Ok(self)
    }

    /// Create the key table and its index if they do not exist. Safe when several
    /// processes do it at the same moment: they take turns.
    ///
    /// # Errors
    /// The database's error.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let statements = DB::DIALECT.key_table_statements(&self.table);
        self.on_runtime(move |pool, _| async move { run_ddl_in_turn(&pool, &statements).await })
            .await
    }

    /// Run `work` with the store's pool on the store's runtime.
    async fn on_runtime<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Pool<DB>, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let fut = work(self.pool.clone(), self.table.clone());
        self.runtime
            .run(fut)
            .await
            .map_err(shut_down)?
            .map_err(|e| DB::DIALECT.missing_table(e, &self.table))
    }

    async fn fetch_one_id(
        pool: &Pool<DB>,
        table: &str,
        id: &KeyId,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!("SELECT {COLUMNS} FROM {table} WHERE id = "));
        q.push_bind(id.as_bytes().to_vec());
        let row = q.build().fetch_optional(pool).await.map_err(backend)?;
        row.as_ref().map(record).transpose()
    }
}

/// The store's runtime gone (the store is being dropped, or its query panicked): the key store
/// is unavailable, which is not a conflict (the index-key code reads a conflict as "another
/// process won the race").
fn shut_down(e: envelope_core::Error) -> StoreError {
    StoreError::backend(e)
}

fn record<R: Row>(row: &R) -> Result<KeyRecord, StoreError>
where
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database>,
    &'static str: sqlx::ColumnIndex<R>,
{
    KeyRow {
        id: row.try_get("id").map_err(backend)?,
        kind: row.try_get("kind").map_err(backend)?,
        scope: row.try_get("scope").map_err(backend)?,
        provider: row.try_get("provider").map_err(backend)?,
        cmk_id: row.try_get("cmk_id").map_err(backend)?,
        wrapped: row.try_get("wrapped").map_err(backend)?,
        kms_context: row.try_get("kms_context").map_err(backend)?,
        created_at: row.try_get("created_at").map_err(backend)?,
        retired_at: row.try_get("retired_at").map_err(backend)?,
    }
    .into_record()
}

/// A key store for the database at `url`, chosen by its scheme (`sqlite:`, `postgres:` /
/// `postgresql:`, `mysql:` / `mariadb:`), with its table created if needed. For applications
/// that pick the database at run time (for example through `sqlx::Any`).
///
/// # Errors
/// [`envelope_core::ConfigError`] for another scheme or a bad URL; a store error if the table
/// cannot be created.
pub async fn key_store_for_url(
    url: &str,
    table: &str,
) -> Result<std::sync::Arc<dyn KeyStore>, envelope_core::Error> {
    let Some(d) = dialect::for_url(url) else {
        return Err(envelope_core::ConfigError::new(
            "the key store URL",
            format!(
                "starts with sqlite:, postgres: or mysql:, not {:?}:",
                dialect::scheme(url)
            ),
        )
        .into());
    };
    match d.kind() {
        #[cfg(feature = "sqlite")]
        Kind::Sqlite => {
            let store = SqlxKeyStore::<sqlx::Sqlite>::connect_lazy(url)?.with_table(table)?;
            store.create_table().await?;
            Ok(std::sync::Arc::new(store))
        }
        #[cfg(feature = "postgres")]
        Kind::Postgres => {
            let store = SqlxKeyStore::<sqlx::Postgres>::connect_lazy(url)?.with_table(table)?;
            store.create_table().await?;
            Ok(std::sync::Arc::new(store))
        }
        #[cfg(feature = "mysql")]
        Kind::MySql => {
            let store = SqlxKeyStore::<sqlx::MySql>::connect_lazy(url)?.with_table(table)?;
            store.create_table().await?;
            Ok(std::sync::Arc::new(store))
        }
        #[allow(unreachable_patterns)]
        _ => {
            let _ = table;
            Err(not_built(d, dialect::scheme(url)))
        }
    }
}

/// A known database whose cargo feature this build lacks.
#[cfg_attr(
    all(feature = "postgres", feature = "mysql", feature = "sqlite"),
    allow(dead_code)
)]
fn not_built(d: &dyn Dialect, scheme: &str) -> envelope_core::Error {
    let feature = match d.kind() {
        Kind::Postgres => "postgres",
        Kind::MySql => "mysql",
        Kind::Sqlite => "sqlite",
    };
    envelope_core::ConfigError::new(
        format!("the {scheme}: key store URL"),
        format!("this build of envelope-sqlx has no {scheme} support: enable its `{feature}` cargo feature"),
    )
    .into()
}

#[async_trait]
impl<DB> KeyStore for SqlxKeyStore<DB>
where
    DB: KeyTableDatabase,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> String: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    &'static str: sqlx::ColumnIndex<DB::Row>,
    DB::Arguments: IntoArguments<DB>,
{
    async fn insert(&self, r: &KeyRecord) -> Result<(), StoreError> {
        let r = r.clone();
        self.on_runtime(move |pool, table| async move {
            let mut q =
                QueryBuilder::<DB>::new(format!("INSERT INTO {table} ({COLUMNS}) VALUES ("));
            let mut s = q.separated(", ");
            s.push_bind(r.id.as_bytes().to_vec())
                .push_bind(r.kind.as_str())
                .push_bind(r.scope.clone())
                .push_bind(r.provider.clone())
                .push_bind(r.cmk_id.clone())
                .push_bind(r.wrapped.clone())
                .push_bind(r.kms_context.clone())
                .push_bind(millis(r.created_at))
                .push_bind(r.retired_at.map(millis));
            q.push(")");
            q.build().execute(&pool).await.map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = *id;
        self.on_runtime(
            move |pool, table| async move { Self::fetch_one_id(&pool, &table, &id).await },
        )
        .await
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let filter = filter.clone();
        self.on_runtime(move |pool, table| async move {
            let mut q =
                QueryBuilder::<DB>::new(format!("SELECT {COLUMNS} FROM {table} WHERE 1 = 1"));
            if let Some(kind) = filter.kind {
                q.push(" AND kind = ").push_bind(kind.as_str());
            }
            if let Some(scope) = &filter.scope {
                q.push(" AND scope = ").push_bind(scope.clone());
            }
            if let Some(cmk) = &filter.cmk_id {
                q.push(" AND cmk_id = ").push_bind(cmk.clone());
            }
            if !filter.include_retired {
                q.push(" AND retired_at IS NULL");
            }
            q.push(" ORDER BY created_at, id");
            let rows = q.build().fetch_all(&pool).await.map_err(backend)?;
            rows.iter().map(record).collect()
        })
        .await
    }

    async fn retire(&self, id: &KeyId, at: SystemTime) -> Result<(), StoreError> {
        let id = *id;
        self.on_runtime(move |pool, table| async move {
            let mut q = QueryBuilder::<DB>::new(format!(
                "UPDATE {table} SET retired_at = COALESCE(retired_at, "
            ));
            q.push_bind(millis(at))
                .push(") WHERE id = ")
                .push_bind(id.as_bytes().to_vec());
            let done = q.build().execute(&pool).await.map_err(backend)?;
            if DB::rows_affected(&done) == 0
                && Self::fetch_one_id(&pool, &table, &id).await?.is_none()
            {
                return Err(StoreError::NotFound(id));
            }
            Ok(())
        })
        .await
    }

    async fn rewrap(
        &self,
        id: &KeyId,
        expected_wrapped: &[u8],
        provider: &str,
        cmk_id: &str,
        wrapped: &[u8],
    ) -> Result<(), StoreError> {
        let (id, expected, provider, cmk_id, wrapped) = (
            *id,
            expected_wrapped.to_vec(),
            provider.to_owned(),
            cmk_id.to_owned(),
            wrapped.to_vec(),
        );
        self.on_runtime(move |pool, table| async move {
            let mut q = QueryBuilder::<DB>::new(format!("UPDATE {table} SET provider = "));
            q.push_bind(provider)
                .push(", cmk_id = ")
                .push_bind(cmk_id.clone())
                .push(", wrapped = ")
                .push_bind(wrapped.clone())
                .push(" WHERE id = ")
                .push_bind(id.as_bytes().to_vec())
                .push(" AND wrapped = ")
                .push_bind(expected);
            let done = q.build().execute(&pool).await.map_err(backend)?;
            if DB::rows_affected(&done) == 1 {
                return Ok(());
            }
            match Self::fetch_one_id(&pool, &table, &id).await? {
                None => Err(StoreError::NotFound(id)),
                // MySQL counts a row whose values did not change as unaffected.
                Some(r) if r.wrapped == wrapped && r.cmk_id == cmk_id => Ok(()),
                Some(_) => Err(StoreError::Conflict(format!(
                    "key {id} was rewrapped concurrently"
                ))),
            }
        })
        .await
    }

    async fn delete(&self, id: &KeyId) -> Result<bool, StoreError> {
        let id = *id;
        self.on_runtime(move |pool, table| async move {
            let mut q = QueryBuilder::<DB>::new(format!("DELETE FROM {table} WHERE id = "));
            q.push_bind(id.as_bytes().to_vec());
            let done = q.build().execute(&pool).await.map_err(backend)?;
            Ok(DB::rows_affected(&done) > 0)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    /// The files to copy into `migrations/` are the key table envelope-core defines, byte for byte.
    #[test]
    fn shipped_migrations_are_the_shared_ddl() {
        assert_eq!(
            include_str!("../key-table/postgres.sql"),
            super::ddl::POSTGRES
        );
        assert_eq!(include_str!("../key-table/mysql.sql"), super::ddl::MYSQL);
        assert_eq!(include_str!("../key-table/sqlite.sql"), super::ddl::SQLITE);
    }
}
