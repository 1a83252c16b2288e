//! The diesel key stores on real databases: the store contract, concurrent table creation, and
//! cold reads inside `FromSql` (a key not cached is loaded from the key table through the store)
//! on a plain thread, in `spawn_blocking`, and inside a current-thread runtime.
//!
//! Sync diesel: SQLite always; PostgreSQL and MariaDB/MySQL when `ENVELOPE_TEST_POSTGRES_URL` /
//! `ENVELOPE_TEST_MYSQL_URL` are set (`bash .ci/run` sets both). diesel-async: the same three.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// `diesel::table!` generates undocumented public items.
#![allow(missing_docs)]

use std::sync::Arc;

use diesel::prelude::*;
use diesel_async::AsyncConnection as _;
use envelope_core::{KeyFilter, KeyStore, Keyring, Policy};
use envelope_diesel::{AsyncDieselKeyStore, DieselKeyStore, Encrypted, column};
use envelope_tests::Fixture;

column!(Secret = "secrets.value");

struct Row {
    id: i64,
    value: Encrypted<String, Secret>,
}

fn tag() -> String {
    envelope_core::KeyId::random().unwrap().to_hex()[..12].to_owned()
}

/// A database for one test, and how to drop what the test made.
struct Db {
    url: String,
    /// The table name the store uses, unique to the test.
    table: String,
    _dir: Option<tempfile::TempDir>,
}

fn sqlite() -> Option<Db> {
    let dir = tempfile::tempdir().unwrap();
    Some(Db {
        url: dir.path().join("keys.db").to_str().unwrap().to_owned(),
        table: format!("keys_{}", tag()),
        _dir: Some(dir),
    })
}

fn from_env(var: &str) -> Option<Db> {
    let Ok(url) = std::env::var(var) else {
        envelope_tests::skipped(&format!(
            "set {var} to run the diesel key-store tests on it"
        ));
        return None;
    };
    Some(Db {
        url,
        table: format!("keys_{}", tag()),
        _dir: None,
    })
}

fn postgres() -> Option<Db> {
    from_env("ENVELOPE_TEST_POSTGRES_URL")
}

fn mysql() -> Option<Db> {
    from_env("ENVELOPE_TEST_MYSQL_URL")
}

macro_rules! sync_suite {
    ($module:ident, $conn:ty, $db:ident, $blob:literal) => {
        mod $module {
            use super::*;

            fn store(db: &Db) -> DieselKeyStore<$conn> {
                let store = DieselKeyStore::<$conn>::connect(&db.url)
                    .unwrap()
                    .with_table(&db.table)
                    .unwrap();
                store.create_table().unwrap();
                store
            }

            /// Drop a test's tables (SQLite's file goes with its directory).
            fn cleanup(db: &Db, tables: &[&str]) {
                if db._dir.is_some() {
                    return;
                }
                let mut conn = <$conn>::establish(&db.url).unwrap();
                for t in tables {
                    diesel::sql_query(format!("DROP TABLE IF EXISTS {t}"))
                        .execute(&mut conn)
                        .unwrap();
                }
            }

            #[tokio::test]
            async fn key_store_contract() {
                let Some(db) = $db() else { return };
                let store = store(&db);
                envelope_tests::store_contract::run(&store).await;
                cleanup(&db, &[&db.table]);
            }

            /// A store whose table was never created says so, and so does a write through it,
            /// instead of blaming the KMS or a key limit.
            #[test]
            fn a_missing_key_table_says_so() {
                let Some(db) = $db() else { return };
                let store = Arc::new(
                    DieselKeyStore::<$conn>::connect(&db.url)
                        .unwrap()
                        .with_table(&db.table)
                        .unwrap(),
                );
                let err = futures_block(store.list(&KeyFilter::all())).unwrap_err();
                assert!(
                    matches!(&err, envelope_core::StoreError::MissingTable { table } if *table == db.table),
                    "{err}"
                );
                let fx = Fixture::new();
                // Found at build time (the first key-table read) or at the first write.
                let text = match Keyring::builder(fx.kms.clone(), store).cmk(fx.cmk.clone()).build() {
                    Err(e) => e.report().to_string(),
                    Ok(keyring) => keyring
                        .blocking().encrypt(&envelope_core::Label::new("t.c").unwrap(), b"x")
                        .unwrap_err()
                        .report()
                        .to_string(),
                };
                assert!(text.contains("does not exist"), "{text}");
                assert!(text.contains("create_table()"), "{text}");
                assert!(!text.contains("limit") && !text.contains("KMS answers"), "{text}");
            }

            #[test]
            fn creating_the_table_at_once_from_many_threads_is_safe() {
                let Some(db) = $db() else { return };
                let store = Arc::new(
                    DieselKeyStore::<$conn>::connect(&db.url)
                        .unwrap()
                        .with_table(&db.table)
                        .unwrap(),
                );
                let threads: Vec<_> = (0..4)
                    .map(|_| {
                        let store = store.clone();
                        std::thread::spawn(move || store.create_table())
                    })
                    .collect();
                for t in threads {
                    t.join().unwrap().unwrap();
                }
                store.create_table().unwrap();
                cleanup(&db, &[&db.table]);
            }

            #[test]
            fn a_cold_keyring_reads_rows_through_the_store_everywhere() {
                let Some(db) = $db() else { return };
                let store = Arc::new(store(&db));
                let data = format!("secrets_{}", tag());
                let mut conn = <$conn>::establish(&db.url).unwrap();
                diesel::sql_query(format!(
                    "CREATE TABLE {data} (id BIGINT PRIMARY KEY, value {} NOT NULL)",
                    $blob
                ))
                .execute(&mut conn)
                .unwrap();

                // Three keys: three keyrings (each makes its own data key) write through the
                // same store.
                let fx = Fixture::new();
                let keyring = |policy| {
                    Keyring::builder(fx.kms.clone(), store.clone()).cmk(fx.cmk.clone())
                        .policy(policy)
                        .build()
                        .unwrap()
                };
                for k in 0..3_i64 {
                    let writer = keyring(Policy::default());
                    let _guard = writer.enter();
                    let rows: Vec<Row> = (0..4)
                        .map(|i| Row {
                            id: k * 10 + i,
                            value: Encrypted::new(format!("secret {k}/{i}")),
                        })
                        .collect();
                    insert(&mut conn, &data, &rows);
                }
                let keys = futures_block(store.list(&KeyFilter::all())).unwrap();
                assert_eq!(keys.len(), 3, "one data key per writer");

                let check = |rows: Vec<(i64, String)>| {
                    assert_eq!(rows.len(), 12);
                    for (id, value) in rows {
                        assert_eq!(value, format!("secret {}/{}", id / 10, id % 10));
                    }
                };
                let url = db.url.clone();

                // A plain thread.
                let before = fx.calls.decrypts();
                let cold = keyring(Policy::default());
                let (u, d) = (url.clone(), data.clone());
                let rows = std::thread::spawn(move || {
                    let _guard = cold.enter();
                    read(&mut <$conn>::establish(&u).unwrap(), &d)
                })
                .join()
                .unwrap();
                check(rows);
                assert_eq!(fx.calls.decrypts() - before, 3, "each key unwrapped once");

                // spawn_blocking on a multi-thread runtime.
                let before = fx.calls.decrypts();
                let cold = keyring(Policy::default());
                let (u, d) = (url.clone(), data.clone());
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                let rows = rt.block_on(async move {
                    tokio::task::spawn_blocking(move || {
                        let _guard = cold.enter();
                        read(&mut <$conn>::establish(&u).unwrap(), &d)
                    })
                    .await
                    .unwrap()
                });
                check(rows);
                assert_eq!(fx.calls.decrypts() - before, 3);

                // Sync diesel called straight from a current-thread runtime's only thread: it
                // blocks that thread, and the store's I/O must not need it.
                let before = fx.calls.decrypts();
                let cold = keyring(Policy::default());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let rows = rt.block_on(
                    cold.install_for(async { read(&mut <$conn>::establish(&url).unwrap(), &data) }),
                );
                check(rows);
                assert_eq!(fx.calls.decrypts() - before, 3);

                drop(conn);
                cleanup(&db, &[&db.table, &data]);
            }

            fn insert(conn: &mut $conn, table: &str, rows: &[Row]) {
                for r in rows {
                    // The data table's name is unique per test: write through `sql_query`.
                    diesel::sql_query(
                        format!("INSERT INTO {table} (id, value) VALUES ({}, ", r.id)
                            + placeholder::<$conn>()
                            + ")",
                    )
                    .bind::<diesel::sql_types::Binary, _>(&r.value)
                    .execute(conn)
                    .unwrap();
                }
            }

            fn read(conn: &mut $conn, table: &str) -> Vec<(i64, String)> {
                diesel::sql_query(format!("SELECT id, value FROM {table} ORDER BY id"))
                    .load::<ReadRow>(conn)
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.id, r.value.into_inner()))
                    .collect()
            }
        }
    };
}

#[derive(QueryableByName)]
struct ReadRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    value: Encrypted<String, Secret>,
}

fn placeholder<C: 'static>() -> &'static str {
    if std::any::TypeId::of::<C>() == std::any::TypeId::of::<PgConnection>() {
        "$1"
    } else {
        "?"
    }
}

/// Run a future to completion on a runtime of its own, from sync test code.
fn futures_block<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fut)
}

sync_suite!(sync_sqlite, SqliteConnection, sqlite, "BLOB");
sync_suite!(sync_postgres, PgConnection, postgres, "BYTEA");
sync_suite!(sync_mysql, MysqlConnection, mysql, "BLOB");

macro_rules! async_suite {
    ($module:ident, $conn:ty, $sync:ty, $db:ident, $blob:literal, $p:literal) => {
        mod $module {
            use super::*;
            use diesel_async::RunQueryDsl as Async;

            /// diesel-async runs `FromSql` in the calling task: on a current-thread runtime a
            /// cold read blocks its only thread, and the store's I/O must not need that thread.
            #[tokio::test(flavor = "current_thread")]
            async fn a_cold_keyring_reads_through_the_store_on_a_current_thread_runtime() {
                let Some(db) = $db() else { return };
                let store = Arc::new(
                    AsyncDieselKeyStore::<$conn>::connect(&db.url)
                        .unwrap()
                        .with_table(&db.table)
                        .unwrap(),
                );
                store.create_table().await.unwrap();
                let data = format!("secrets_{}", tag());
                let mut conn = <$conn>::establish(&db.url).await.unwrap();
                Async::execute(
                    diesel::sql_query(format!(
                        "CREATE TABLE {data} (id BIGINT PRIMARY KEY, value {} NOT NULL)",
                        $blob
                    )),
                    &mut conn,
                )
                .await
                .unwrap();
                let fx = Fixture::new();
                let keyring = || {
                    Keyring::builder(fx.kms.clone(), store.clone())
                        .cmk(fx.cmk.clone())
                        .build()
                        .unwrap()
                };
                for k in 0..3_i64 {
                    let writer = keyring();
                    writer
                        .install_for(async {
                            for i in 0..4 {
                                let insert = diesel::sql_query(format!(
                                    "INSERT INTO {data} (id, value) VALUES ({}, {})",
                                    k * 10 + i,
                                    $p
                                ))
                                .bind::<diesel::sql_types::Binary, _>(
                                    Encrypted::<String, Secret>::new(format!("secret {k}/{i}")),
                                );
                                Async::execute(insert, &mut conn).await.unwrap();
                            }
                        })
                        .await;
                }
                let before = fx.calls.decrypts();
                let rows: Vec<ReadRow> = keyring()
                    .install_for(Async::load(
                        diesel::sql_query(format!("SELECT id, value FROM {data} ORDER BY id")),
                        &mut conn,
                    ))
                    .await
                    .unwrap();
                assert_eq!(rows.len(), 12);
                for r in rows {
                    assert_eq!(*r.value, format!("secret {}/{}", r.id / 10, r.id % 10));
                }
                assert_eq!(fx.calls.decrypts() - before, 3, "each key unwrapped once");
                if db._dir.is_none() {
                    for t in [&data, &db.table] {
                        Async::execute(diesel::sql_query(format!("DROP TABLE {t}")), &mut conn)
                            .await
                            .unwrap();
                    }
                }
            }

            #[tokio::test(flavor = "current_thread")]
            async fn key_store_contract() {
                let Some(db) = $db() else { return };
                let store = AsyncDieselKeyStore::<$conn>::connect(&db.url)
                    .unwrap()
                    .with_table(&db.table)
                    .unwrap();
                store.create_table().await.unwrap();
                store.create_table().await.unwrap();
                envelope_tests::store_contract::run(&store).await;
                // The sync store reads what the async one wrote: one table.
                let sync = DieselKeyStore::<$sync>::connect(&db.url)
                    .unwrap()
                    .with_table(&db.table)
                    .unwrap();
                assert_eq!(
                    sync.list(&KeyFilter::all()).await.unwrap(),
                    store.list(&KeyFilter::all()).await.unwrap()
                );
                if db._dir.is_none() {
                    let mut conn = <$conn>::establish(&db.url).await.unwrap();
                    let drop = diesel::sql_query(format!("DROP TABLE {}", db.table));
                    Async::execute(drop, &mut conn).await.unwrap();
                }
            }
        }
    };
}

async_suite!(
    async_sqlite,
    diesel_async::sync_connection_wrapper::SyncConnectionWrapper<SqliteConnection>,
    SqliteConnection,
    sqlite,
    "BLOB",
    "?"
);
async_suite!(
    async_postgres,
    diesel_async::AsyncPgConnection,
    PgConnection,
    postgres,
    "BYTEA",
    "$1"
);
async_suite!(
    async_mysql,
    diesel_async::AsyncMysqlConnection,
    MysqlConnection,
    mysql,
    "BLOB",
    "?"
);

/// The shipped diesel migrations are the shared DDL, byte for byte, and they run: a store reads
/// and writes the table they made, and running them again does nothing.
mod migrations {
    use super::*;
    use diesel_migrations::MigrationHarness;
    use envelope_diesel::store::{ddl, migrations};

    #[test]
    fn the_files_are_the_shared_ddl() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations");
        for (db, ddl) in [
            ("postgres", ddl::POSTGRES),
            ("mysql", ddl::MYSQL),
            ("sqlite", ddl::SQLITE),
        ] {
            let up = std::fs::read_to_string(format!(
                "{dir}/{db}/2026-12-01-000000_envelope_keys/up.sql"
            ))
            .unwrap();
            assert_eq!(up, ddl, "{db}");
        }
    }

    fn run_twice<C: MigrationHarness<C::Backend> + Connection>(
        conn: &mut C,
        set: impl Fn() -> diesel_migrations::EmbeddedMigrations,
    ) {
        assert_eq!(conn.run_pending_migrations(set()).unwrap().len(), 1);
        assert!(conn.run_pending_migrations(set()).unwrap().is_empty());
    }

    async fn use_it<S: KeyStore>(store: S) {
        envelope_tests::store_contract::run(&store).await;
    }

    #[tokio::test]
    async fn sqlite() {
        let db = super::sqlite().unwrap();
        run_twice(&mut SqliteConnection::establish(&db.url).unwrap(), || {
            migrations::SQLITE
        });
        use_it(DieselKeyStore::<SqliteConnection>::connect(&db.url).unwrap()).await;
    }

    #[tokio::test]
    async fn postgres() {
        let Some(db) = super::postgres() else { return };
        // A schema of its own, so the default table name cannot meet another test's.
        let schema = format!("envelope_migrations_{}", tag());
        let mut conn = PgConnection::establish(&db.url).unwrap();
        diesel::sql_query(format!("CREATE SCHEMA {schema}"))
            .execute(&mut conn)
            .unwrap();
        let url = format!(
            "{}{}options=-csearch_path%3D{schema}",
            db.url,
            if db.url.contains('?') { '&' } else { '?' }
        );
        run_twice(&mut PgConnection::establish(&url).unwrap(), || {
            migrations::POSTGRES
        });
        use_it(DieselKeyStore::<PgConnection>::connect(&url).unwrap()).await;
        diesel::sql_query(format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut conn)
            .unwrap();
    }

    #[tokio::test]
    async fn mysql() {
        let Some(db) = super::mysql() else { return };
        let name = format!("envelope_migrations_{}", tag());
        let mut conn = MysqlConnection::establish(&db.url).unwrap();
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap();
        let base = db.url.rsplit_once('/').map_or(db.url.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        run_twice(&mut MysqlConnection::establish(&url).unwrap(), || {
            migrations::MYSQL
        });
        use_it(DieselKeyStore::<MysqlConnection>::connect(&url).unwrap()).await;
        diesel::sql_query(format!("DROP DATABASE {name}"))
            .execute(&mut conn)
            .unwrap();
    }
}

/// A key table that cannot be reached: a cold read fails within the keyring's timeout with a
/// typed error that says so, never a panic, a hang or wrong data. (Port 1 on loopback refuses.)
#[test]
fn an_unreachable_key_table_fails_the_read_in_time_with_a_clear_error() {
    let db = sqlite().unwrap();
    let good = Arc::new(DieselKeyStore::<SqliteConnection>::connect(&db.url).unwrap());
    good.create_table().unwrap();
    let fx = Fixture::new();
    let writer = Keyring::builder(fx.kms.clone(), good)
        .cmk(fx.cmk.clone())
        .build()
        .unwrap();
    let mut conn = SqliteConnection::establish(&db.url).unwrap();
    diesel::sql_query("CREATE TABLE s (id BIGINT PRIMARY KEY, value BLOB NOT NULL)")
        .execute(&mut conn)
        .unwrap();
    {
        let _guard = writer.enter();
        diesel::sql_query("INSERT INTO s (id, value) VALUES (1, ?)")
            .bind::<diesel::sql_types::Binary, _>(Encrypted::<String, Secret>::new("x".into()))
            .execute(&mut conn)
            .unwrap();
    }

    let unreachable =
        DieselKeyStore::<PgConnection>::connect("postgres://nobody@127.0.0.1:1/none").unwrap();
    let policy = Policy {
        kms_timeout: std::time::Duration::from_secs(2),
        ..Policy::default()
    };
    let cold = Keyring::builder(fx.kms.clone(), unreachable)
        .cmk(fx.cmk.clone())
        .policy(policy)
        .build()
        .unwrap();
    let _guard = cold.enter();
    let start = std::time::Instant::now();
    let err = diesel::sql_query("SELECT id, value FROM s")
        .load::<ReadRow>(&mut conn)
        .map(|_| ())
        .unwrap_err();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    let cause = envelope_diesel::envelope_error(&err).expect("an envelope error");
    assert!(
        matches!(
            cause,
            envelope_core::Error::Unavailable(envelope_core::Unavailable::Timeout { .. })
                | envelope_core::Error::Store(_)
        ),
        "{cause:?}"
    );
    // The message names the wait and what to check.
    let report = envelope_diesel::report(&err).to_string();
    assert!(report.contains("key store"), "{report}");
}

/// The key store's own MySQL sessions are strict even when the server's are not (its
/// connections open while the global `sql_mode` is non-strict): a value too long for its column
/// fails the insert instead of being stored cut short.
#[test]
fn mysql_key_store_sessions_are_strict() {
    let Some(db) = mysql() else { return };
    let mut admin = MysqlConnection::establish(&db.url).unwrap();
    #[derive(diesel::QueryableByName)]
    struct Mode {
        #[diesel(sql_type = diesel::sql_types::Text)]
        mode: String,
    }
    let old = diesel::sql_query("SELECT CAST(@@GLOBAL.sql_mode AS CHAR) AS mode")
        .get_result::<Mode>(&mut admin)
        .unwrap()
        .mode;
    diesel::sql_query("SET GLOBAL sql_mode = 'NO_ENGINE_SUBSTITUTION'")
        .execute(&mut admin)
        .unwrap();
    let store = DieselKeyStore::<MysqlConnection>::connect(&db.url)
        .unwrap()
        .with_table(&db.table)
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.create_table().unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(
                envelope_tests::store_contract::refuses_a_value_too_long_for_its_column(&store),
            );
    }));
    diesel::sql_query(format!("SET GLOBAL sql_mode = '{}'", old.replace('\'', "")))
        .execute(&mut admin)
        .unwrap();
    diesel::sql_query(format!("DROP TABLE IF EXISTS {}", db.table))
        .execute(&mut admin)
        .unwrap();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
