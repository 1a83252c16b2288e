//! [`AsyncDieselKeyStore`]: the key table over diesel-async.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::result::QueryResult;
use diesel_async::methods::{ExecuteDsl, LoadQuery};
use diesel_async::{AsyncConnection, RunQueryDsl};
use envelope_core::__private::IoRuntime;
use envelope_core::{KeyFilter, KeyId, KeyRecord, KeyStore, StoreError, async_trait};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    DEFAULT_TABLE, KeyRowSql, KeyTableBackend, Queries, Rewrap, Statement, backend,
    breaks_connection, records,
};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A diesel-async connection the key table can live on: `AsyncPgConnection`,
/// `AsyncMysqlConnection`, or `SyncConnectionWrapper<SqliteConnection>` (with diesel-async's
/// `postgres`, `mysql` or `sqlite` feature). Implemented for every such connection; not to be
/// implemented by hand.
pub trait AsyncKeyTableConnection: AsyncConnection + 'static {
    #[doc(hidden)]
    fn load_rows(&mut self, statement: Statement) -> BoxFuture<'_, QueryResult<Vec<KeyRowSql>>>;
    #[doc(hidden)]
    fn execute_statement(&mut self, statement: Statement) -> BoxFuture<'_, QueryResult<usize>>;
}

impl<C> AsyncKeyTableConnection for C
where
    C: AsyncConnection + 'static,
    C::Backend: KeyTableBackend,
    BoxedSqlQuery<'static, C::Backend, SqlQuery>:
        LoadQuery<'static, C, KeyRowSql> + ExecuteDsl<C> + Send,
{
    fn load_rows(&mut self, statement: Statement) -> BoxFuture<'_, QueryResult<Vec<KeyRowSql>>> {
        Box::pin(<C::Backend as KeyTableBackend>::query(statement).load(self))
    }

    fn execute_statement(&mut self, statement: Statement) -> BoxFuture<'_, QueryResult<usize>> {
        Box::pin(<C::Backend as KeyTableBackend>::query(statement).execute(self))
    }
}

/// How long a key-table query waits for one of the store's connections.
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(10);
/// The store's connections, at most.
const CONNECTIONS: usize = 2;

/// A [`KeyStore`] over diesel-async: `AsyncDieselKeyStore<AsyncPgConnection>`,
/// `AsyncDieselKeyStore<AsyncMysqlConnection>` or
/// `AsyncDieselKeyStore<SyncConnectionWrapper<SqliteConnection>>`.
///
/// It opens at most two connections of its own, on a small runtime it owns, apart from the
/// application's pool: with diesel-async, `FromSql` runs inside the application's task, and a
/// cold key read there must not need a connection of a pool the task may be holding, nor a
/// runtime thread the task is blocking. A connection that fails is dropped and opened anew on
/// the next query.
pub struct AsyncDieselKeyStore<C: AsyncKeyTableConnection> {
    connections: Arc<Connections<C>>,
    runtime: IoRuntime,
    queries: Queries,
}

impl<C: AsyncKeyTableConnection> std::fmt::Debug for AsyncDieselKeyStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncDieselKeyStore")
            .field("connection", &std::any::type_name::<C>())
            .field("table", &self.queries.table)
            .finish_non_exhaustive()
    }
}

/// The store's connections: idle ones, and a permit per connection in use.
struct Connections<C> {
    url: String,
    idle: Mutex<Vec<C>>,
    permits: Arc<Semaphore>,
}

/// A connection taken from [`Connections`]; back to the idle list on drop unless it failed.
struct Lease<C: AsyncKeyTableConnection> {
    conn: Option<C>,
    from: Arc<Connections<C>>,
    _permit: OwnedSemaphorePermit,
}

impl<C: AsyncKeyTableConnection> Lease<C>
where
    C::Backend: KeyTableBackend,
{
    async fn take(from: &Arc<Connections<C>>) -> Result<Lease<C>, StoreError> {
        let permit = tokio::time::timeout(CHECKOUT_TIMEOUT, from.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                StoreError::backend(std::io::Error::other(format!(
                    "no key-store connection came free within {CHECKOUT_TIMEOUT:?}"
                )))
            })?
            .map_err(StoreError::backend)?;
        let idle = from.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let mut conn = C::establish(&from.url).await.map_err(StoreError::backend)?;
                for sql in <C::Backend as KeyTableBackend>::DIALECT.key_store_session() {
                    conn.batch_execute(&sql).await.map_err(backend)?;
                }
                conn
            }
        };
        Ok(Lease {
            conn: Some(conn),
            from: from.clone(),
            _permit: permit,
        })
    }

    fn conn(&mut self) -> Result<&mut C, StoreError> {
        self.conn.as_mut().ok_or_else(|| {
            StoreError::backend(std::io::Error::other("the key-store connection failed"))
        })
    }

    /// `result`, as a store error; a failure that may have broken the connection drops it.
    fn check<T>(&mut self, result: QueryResult<T>) -> Result<T, StoreError> {
        result.map_err(|e| {
            if breaks_connection(&e) {
                self.conn = None;
            }
            backend(e)
        })
    }

    async fn fetch(&mut self, statement: Statement) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = self.conn()?.load_rows(statement).await;
        records(self.check(rows)?)
    }

    async fn run(&mut self, statement: Statement) -> Result<usize, StoreError> {
        let n = self.conn()?.execute_statement(statement).await;
        self.check(n)
    }
}

impl<C: AsyncKeyTableConnection> Drop for Lease<C> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.from
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
    }
}

impl<C: AsyncKeyTableConnection> AsyncDieselKeyStore<C>
where
    C::Backend: KeyTableBackend,
{
    /// A store for the database at `url` (what `C::establish` takes), using the table
    /// `envelope_keys`. No connection is made until the first query.
    ///
    /// # Errors
    /// [`envelope_core::SystemError::Thread`] when the store's runtime thread cannot start.
    pub fn connect(url: &str) -> Result<Self, envelope_core::Error> {
        Ok(AsyncDieselKeyStore {
            connections: Arc::new(Connections {
                url: url.to_owned(),
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(CONNECTIONS)),
            }),
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

    /// Create the key table and its index if they do not exist. Safe when several processes
    /// do it at the same moment: they take turns.
    ///
    /// # Errors
    /// The database's error.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let statements = self.queries.ddl();
        self.on_runtime(move |mut lease, q| async move {
            let mut turn = q.dialect.ddl_in_turn(&statements);
            while let Some(sql) = turn.next_statement() {
                let done = match lease.conn() {
                    Ok(conn) => {
                        let done = conn.batch_execute(sql).await;
                        lease.check(done)
                    }
                    // Dropped after a failure: the first error is the one reported.
                    Err(e) => Err(e),
                };
                turn.record(done);
            }
            turn.finish()
        })
        .await
    }

    /// Run `work` with a connection on the store's runtime.
    async fn on_runtime<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Lease<C>, Queries) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let connections = self.connections.clone();
        let queries = self.queries.clone();
        self.runtime
            .run(async move { work(Lease::take(&connections).await?, queries).await })
            .await
            .map_err(|e| StoreError::backend(std::io::Error::other(e.to_string())))?
            .map_err(|e| self.queries.missing_table(e))
    }
}

#[async_trait]
impl<C: AsyncKeyTableConnection> KeyStore for AsyncDieselKeyStore<C>
where
    C::Backend: KeyTableBackend,
{
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let record = record.clone();
        self.on_runtime(move |mut c, q| async move { c.run(q.insert(&record)).await.map(|_| ()) })
            .await
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = *id;
        self.on_runtime(
            move |mut c, q| async move { Ok(c.fetch(q.get(&id)).await?.into_iter().next()) },
        )
        .await
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let filter = filter.clone();
        self.on_runtime(move |mut c, q| async move { c.fetch(q.list(&filter)).await })
            .await
    }

    async fn retire(&self, id: &KeyId, at: SystemTime) -> Result<(), StoreError> {
        let id = *id;
        self.on_runtime(move |mut c, q| async move {
            if c.run(q.retire(&id, at)).await? == 0 && c.fetch(q.get(&id)).await?.is_empty() {
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
        self.on_runtime(move |mut c, q| async move {
            if c.run(q.rewrap(&r)).await? == 1 {
                return Ok(());
            }
            r.unmatched(c.fetch(q.get(&r.id)).await?.into_iter().next())
        })
        .await
    }

    async fn delete(&self, id: &KeyId) -> Result<bool, StoreError> {
        let id = *id;
        self.on_runtime(move |mut c, q| async move { Ok(c.run(q.delete(&id)).await? > 0) })
            .await
    }
}
