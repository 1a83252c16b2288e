//! [`DieselKeyStore`]: the key table over sync diesel and an r2d2 pool.

use std::time::{Duration, SystemTime};

use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::query_dsl::RunQueryDsl;
use diesel::query_dsl::load_dsl::{ExecuteDsl, LoadQuery};
use diesel::r2d2::{
    ConnectionManager, CustomizeConnection, Pool, PooledConnection, R2D2Connection,
};
use diesel::result::QueryResult;
use envelope_core::__private::IoRuntime;
use envelope_core::{KeyFilter, KeyId, KeyRecord, KeyStore, StoreError, async_trait};

use super::{
    DEFAULT_TABLE, KeyRowSql, KeyTableBackend, Queries, Rewrap, Statement, backend, records,
    run_ddl_in_turn,
};

/// A sync diesel connection the key table can live on: `PgConnection`, `MysqlConnection` or
/// `SqliteConnection` (with diesel's `postgres`, `mysql` or `sqlite` feature). Implemented for
/// every such connection; not to be implemented by hand.
pub trait KeyTableConnection: R2D2Connection + 'static {
    #[doc(hidden)]
    fn load_rows(&mut self, statement: Statement) -> QueryResult<Vec<KeyRowSql>>;
    #[doc(hidden)]
    fn execute_statement(&mut self, statement: Statement) -> QueryResult<usize>;
}

impl<C> KeyTableConnection for C
where
    C: R2D2Connection + 'static,
    C::Backend: KeyTableBackend,
    BoxedSqlQuery<'static, C::Backend, SqlQuery>:
        LoadQuery<'static, C, KeyRowSql> + ExecuteDsl<C, C::Backend>,
{
    fn load_rows(&mut self, statement: Statement) -> QueryResult<Vec<KeyRowSql>> {
        <C::Backend as KeyTableBackend>::query(statement).load(self)
    }

    fn execute_statement(&mut self, statement: Statement) -> QueryResult<usize> {
        <C::Backend as KeyTableBackend>::query(statement).execute(self)
    }
}

/// A [`KeyStore`] over sync diesel: `DieselKeyStore<PgConnection>`,
/// `DieselKeyStore<MysqlConnection>` or `DieselKeyStore<SqliteConnection>`.
///
/// ```no_run
/// # use std::sync::Arc;
/// use diesel::pg::PgConnection;
/// use envelope_core::{Keyring, LocalKms};
/// use envelope_diesel::DieselKeyStore;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = DieselKeyStore::<PgConnection>::connect("postgres://app@db/app")?;
/// store.create_table()?; // or run the migrations this crate ships
/// let kms = LocalKms::open("master.key")?;
/// let keyring = Keyring::builder(kms, store).build()?;
/// keyring.install_default();
/// # Ok(()) }
/// ```
///
/// Its queries run on threads of its own (the blocking pool of a small runtime the store owns),
/// over a pool of its own, apart from the application's: a key-table read happens inside
/// `FromSql` when a row under a key that is not cached is read, so it may neither borrow the
/// connection that is reading the row nor wait on the runtime that is waiting for it. A cold read
/// works the same on a plain thread, in `spawn_blocking`, and on any tokio runtime.
///
/// An in-memory SQLite database (`:memory:`, private to each connection) cannot hold the key
/// table: use a file.
pub struct DieselKeyStore<C: KeyTableConnection> {
    pool: Pool<ConnectionManager<C>>,
    runtime: IoRuntime,
    queries: Queries,
}

impl<C: KeyTableConnection> std::fmt::Debug for DieselKeyStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DieselKeyStore")
            .field("connection", &std::any::type_name::<C>())
            .field("table", &self.queries.table)
            .finish_non_exhaustive()
    }
}

/// Runs the dialect's key-store session statements (MySQL's strict mode, SQLite's busy
/// timeout) on every new
/// connection of the store's pool.
#[derive(Debug)]
struct OnConnect;

impl<C: KeyTableConnection> CustomizeConnection<C, diesel::r2d2::Error> for OnConnect
where
    C::Backend: KeyTableBackend,
{
    fn on_acquire(&self, conn: &mut C) -> Result<(), diesel::r2d2::Error> {
        for sql in <C::Backend as KeyTableBackend>::DIALECT.key_store_session() {
            conn.batch_execute(&sql)
                .map_err(diesel::r2d2::Error::QueryError)?;
        }
        Ok(())
    }
}

/// How long a key-table query waits for one of the store's connections.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(10);

impl<C: KeyTableConnection> DieselKeyStore<C>
where
    C::Backend: KeyTableBackend,
{
    /// A store for the database at `url` (what `C::establish` takes: `postgres://…`,
    /// `mysql://…`, a SQLite file path), with a pool of its own of at most two connections,
    /// opened on first use. Uses the table `envelope_keys`.
    ///
    /// # Errors
    /// [`envelope_core::SystemError::Thread`] when the store's runtime thread cannot start.
    pub fn connect(url: &str) -> Result<Self, envelope_core::Error> {
        let pool = Pool::builder()
            .max_size(2)
            .min_idle(Some(0))
            .connection_timeout(CHECKOUT_TIMEOUT)
            .connection_customizer(Box::new(OnConnect))
            .build_unchecked(ConnectionManager::new(url));
        Self::from_pool(pool)
    }

    /// A store over `pool`. Give it a pool of its own (one or two connections): a cold key
    /// read runs while the application's connection is inside `FromSql`, so a store that shares
    /// the application's pool can wait for a connection that only its own read would free. On
    /// SQLite, set a busy timeout on the pool's connections ([`connect`](Self::connect) does).
    ///
    /// # Errors
    /// [`envelope_core::SystemError::Thread`] when the store's runtime thread cannot start.
    pub fn from_pool(pool: Pool<ConnectionManager<C>>) -> Result<Self, envelope_core::Error> {
        Ok(DieselKeyStore {
            pool,
            runtime: IoRuntime::start("envelope-keystore")?,
            queries: Queries::new::<C::Backend>(DEFAULT_TABLE)?,
        })
    }

    /// Use another table name (letters, digits and `_`, not starting with a digit).
    ///
    /// # Errors
    /// [`Misuse::InvalidName`](envelope_core::Misuse::InvalidName) for anything else.
    pub fn with_table(mut self, table: &str) -> Result<Self, envelope_core::Error> {
        self.queries = Queries::new::<C::Backend>(table)?;
        Ok(self)
    }

    /// Create the key table and its index if they do not exist, on the calling thread. Safe
    /// when several processes do it at the same moment: they take turns.
    ///
    /// # Errors
    /// The pool's or the database's error.
    pub fn create_table(&self) -> Result<(), StoreError> {
        let mut conn = checkout(&self.pool)?;
        run_ddl_in_turn(&mut *conn, &self.queries.ddl())
    }

    /// Run `work` with a connection of the pool on the store's blocking threads.
    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut C, &Queries) -> Result<T, StoreError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let queries = self.queries.clone();
        self.runtime
            .handle()
            .spawn_blocking(move || work(&mut *checkout(&pool)?, &queries))
            .await
            .map_err(|e| {
                StoreError::backend(std::io::Error::other(format!(
                    "the key store's query did not finish: {e}"
                )))
            })?
            .map_err(|e| self.queries.missing_table(e))
    }
}

fn checkout<C: KeyTableConnection>(
    pool: &Pool<ConnectionManager<C>>,
) -> Result<PooledConnection<ConnectionManager<C>>, StoreError> {
    pool.get().map_err(StoreError::backend)
}

fn get_one<C: KeyTableConnection>(
    conn: &mut C,
    q: &Queries,
    id: &KeyId,
) -> Result<Option<KeyRecord>, StoreError> {
    let rows = conn.load_rows(q.get(id)).map_err(backend)?;
    Ok(records(rows)?.into_iter().next())
}

#[async_trait]
impl<C: KeyTableConnection> KeyStore for DieselKeyStore<C>
where
    C::Backend: KeyTableBackend,
{
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.blocking(move |conn, q| {
            conn.execute_statement(q.insert(&record)).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = *id;
        self.blocking(move |conn, q| get_one(conn, q, &id)).await
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let filter = filter.clone();
        self.blocking(move |conn, q| records(conn.load_rows(q.list(&filter)).map_err(backend)?))
            .await
    }

    async fn retire(&self, id: &KeyId, at: SystemTime) -> Result<(), StoreError> {
        let id = *id;
        self.blocking(move |conn, q| {
            let n = conn.execute_statement(q.retire(&id, at)).map_err(backend)?;
            if n == 0 && get_one(conn, q, &id)?.is_none() {
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
        let r = Rewrap::new(id, expected_wrapped, provider, cmk_id, wrapped);
        self.blocking(move |conn, q| {
            if conn.execute_statement(q.rewrap(&r)).map_err(backend)? == 1 {
                return Ok(());
            }
            r.unmatched(get_one(conn, q, &r.id)?)
        })
        .await
    }

    async fn delete(&self, id: &KeyId) -> Result<bool, StoreError> {
        let id = *id;
        self.blocking(
            move |conn, q| Ok(conn.execute_statement(q.delete(&id)).map_err(backend)? > 0),
        )
        .await
    }
}
