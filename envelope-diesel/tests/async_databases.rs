//! Encrypted diesel columns through diesel-async on real PostgreSQL and MariaDB/MySQL, when
//! `ENVELOPE_TEST_POSTGRES_URL` / `ENVELOPE_TEST_MYSQL_URL` are set (`bash .ci/run` sets both).
//!
//! diesel-async runs `ToSql` and `FromSql` inside the calling task, on a runtime worker: the
//! keyring comes from `Keyring::scope`, and a cache miss inside `FromSql` must neither panic nor
//! deadlock on a current-thread runtime. Both runtime flavors are exercised.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// `diesel::table!` generates undocumented public items.
#![allow(missing_docs)]

use diesel::{ExpressionMethods, QueryDsl, SelectableHelper};
use diesel_async::{AsyncConnection, AsyncMysqlConnection, AsyncPgConnection, RunQueryDsl};
use envelope_core::{Error, Keyring};
use envelope_diesel::BlindIndex;
use envelope_tests::Fixture;

mod common;
use common::*;

fn tag() -> String {
    envelope_core::KeyId::random().unwrap().to_hex()[..12].to_owned()
}

/// A PostgreSQL connection whose work all rolls back: its own schema inside a test transaction.
async fn open_postgres() -> Option<AsyncPgConnection> {
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        envelope_tests::skipped(
            "set ENVELOPE_TEST_POSTGRES_URL to run the diesel-async PostgreSQL tests",
        );
        return None;
    };
    let mut conn = AsyncPgConnection::establish(&url)
        .await
        .unwrap_or_else(|e| panic!("ENVELOPE_TEST_POSTGRES_URL is set but unreachable: {e}"));
    conn.begin_test_transaction().await.unwrap();
    let schema = format!("envelope_diesel_async_{}", tag());
    diesel::sql_query(format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::sql_query(format!("SET search_path TO {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::sql_query(
        "CREATE TABLE people (id BIGINT PRIMARY KEY, name BYTEA NOT NULL, photo BYTEA, \
         age BYTEA, small BYTEA, big BYTEA, flag BYTEA, ident BYTEA, born BYTEA, seen BYTEA, \
         notes BYTEA, email BYTEA, email_bidx BYTEA, phone TEXT)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    Some(conn)
}

/// Drops a test's MySQL database when the test ends, passed or failed.
struct DropDatabase {
    url: String,
    db: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let (url, db) = (self.url.clone(), self.db.clone());
        // A runtime cannot start inside the test's runtime: use a thread of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = AsyncMysqlConnection::establish(&url).await.unwrap();
                diesel::sql_query(format!("DROP DATABASE IF EXISTS {db}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
            });
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("could not drop the test database {}", self.db);
        }
    }
}

/// A MySQL connection to a database of its own (MySQL DDL does not roll back), and the guard
/// that drops it.
async fn open_mysql() -> Option<(AsyncMysqlConnection, DropDatabase)> {
    let Ok(url) = std::env::var("ENVELOPE_TEST_MYSQL_URL") else {
        envelope_tests::skipped("set ENVELOPE_TEST_MYSQL_URL to run the diesel-async MySQL tests");
        return None;
    };
    let mut admin = AsyncMysqlConnection::establish(&url)
        .await
        .unwrap_or_else(|e| panic!("ENVELOPE_TEST_MYSQL_URL is set but unreachable: {e}"));
    let db = format!("envelope_diesel_{}", tag());
    diesel::sql_query(format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let guard = DropDatabase {
        url: url.clone(),
        db: db.clone(),
    };
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    let mut conn = AsyncMysqlConnection::establish(&format!("{base}/{db}"))
        .await
        .unwrap();
    diesel::sql_query(
        "CREATE TABLE people (id BIGINT PRIMARY KEY, name BLOB NOT NULL, photo LONGBLOB, \
         age BLOB, small BLOB, big BLOB, flag BLOB, ident BLOB, born BLOB, seen BLOB, \
         notes BLOB, email BLOB, email_bidx VARBINARY(32), phone TEXT)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    Some((conn, guard))
}

/// The shared checks, on any async connection.
macro_rules! checks {
    ($conn:expr) => {{
        let conn = $conn;
        let fx = Fixture::new();
        // Writes, reads and the blind-index filter, with the keyring scoped to this task.
        fx.keyring
            .install_for(async {
                // Inside the scope: building a row computes its blind index.
                let rows = vec![
                    full(1, "Ada@Example.com"),
                    full(2, "bob@example.com"),
                    empty(3),
                ];
                diesel::insert_into(people::table)
                    .values(&rows)
                    .execute(&mut *conn)
                    .await
                    .unwrap();
                let back: Vec<Person> = people::table
                    .order(people::id)
                    .select(Person::as_select())
                    .load(&mut *conn)
                    .await
                    .unwrap();
                assert_eq!(back, rows);
                let probe = BlindIndex::<EmailIndex>::of("ada@example.COM").unwrap();
                let found: Vec<Person> = people::table
                    .filter(people::email_bidx.eq(&probe))
                    .select(Person::as_select())
                    .load(&mut *conn)
                    .await
                    .unwrap();
                assert_eq!(found.len(), 1);
                assert_eq!(found[0].id, 1);
            })
            .await;

        // At rest: an envelope, no plaintext.
        let raw: Raw = diesel::sql_query("SELECT email AS v FROM people WHERE id = 2")
            .get_result(&mut *conn)
            .await
            .unwrap();
        let stored = raw.v.unwrap();
        envelope_core::format::parse(&stored).unwrap();
        assert!(!stored.windows(3).any(|w| w == b"bob"));

        // A second instance with an empty cache: one KMS call for the data key, however many
        // rows, and no deadlock whatever the runtime flavor.
        let cold = Keyring::builder(fx.kms.clone(), fx.store.clone())
            .cmk(fx.cmk.clone())
            .build()
            .unwrap();
        let before = fx.calls.decrypts();
        let all: Vec<Person> = cold
            .install_for(async {
                people::table
                    .select(Person::as_select())
                    .load(&mut *conn)
                    .await
                    .unwrap()
            })
            .await;
        assert_eq!(all.len(), 3);
        assert_eq!(fx.calls.decrypts() - before, 1);

        // A value copied into another column fails to open, with a typed error.
        diesel::sql_query("UPDATE people SET name = email WHERE id = 1")
            .execute(&mut *conn)
            .await
            .unwrap();
        let err = fx
            .keyring
            .install_for(async {
                people::table
                    .find(1i64)
                    .select(Person::as_select())
                    .first(&mut *conn)
                    .await
                    .unwrap_err()
            })
            .await;
        assert!(
            matches!(the_envelope_error(&err), Error::Decrypt { .. }),
            "{err}"
        );
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_multi_thread() {
    let Some(mut conn) = open_postgres().await else {
        return;
    };
    checks!(&mut conn);
}

#[tokio::test(flavor = "current_thread")]
async fn postgres_current_thread() {
    let Some(mut conn) = open_postgres().await else {
        return;
    };
    checks!(&mut conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_multi_thread() {
    let Some((mut conn, _db)) = open_mysql().await else {
        return;
    };
    checks!(&mut conn);
}

#[tokio::test(flavor = "current_thread")]
async fn mysql_current_thread() {
    let Some((mut conn, _db)) = open_mysql().await else {
        return;
    };
    checks!(&mut conn);
}
