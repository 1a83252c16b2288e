//! # envelope-sqlx
//!
//! Encryption at rest as a type change for sqlx, on PostgreSQL, MySQL/MariaDB and SQLite:
//!
//! ```
//! use envelope_core::{Keyring, LocalKms, KeyMaterial};
//! use envelope_sqlx::{BlindIndex, Encrypted, SqlxKeyStore, blind_index, column};
//!
//! column!(pub CustomerEmail = "customers.email");
//! column!(pub CustomerPhone = "customers.phone");
//! blind_index!(pub CustomerEmailIndex = "customers.email", CaseFolded);
//!
//! #[derive(sqlx::FromRow)]
//! struct Customer {
//!     name: String,
//!     email: Encrypted<String, CustomerEmail>,         // BYTEA / BLOB
//!     phone: Option<Encrypted<String, CustomerPhone>>, // NULL stays NULL
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
//! let pool = sqlx::SqlitePool::connect(&url).await?;
//! let store = SqlxKeyStore::same_database_as(&pool)?; // its own connections to the same database
//! store.create_table().await?;
//! let kms = LocalKms::from_key(KeyMaterial::generate()?);
//! let keyring = Keyring::builder(kms, store).build()?;
//! keyring.install_default();
//!
//! sqlx::query("CREATE TABLE customers (name TEXT, email BLOB, email_bidx BLOB, phone BLOB)")
//!     .execute(&pool).await?;
//! sqlx::query("INSERT INTO customers (name, email, email_bidx, phone) VALUES (?, ?, ?, ?)")
//!     .bind("Alice")
//!     .bind(Encrypted::<String, CustomerEmail>::new("alice@example.com".into()))
//!     .bind(BlindIndex::<CustomerEmailIndex>::of("alice@example.com")?)
//!     .bind(None::<Encrypted<String, CustomerPhone>>)
//!     .execute(&pool).await?;
//!
//! let probe = BlindIndex::<CustomerEmailIndex>::of("Alice@Example.COM")?;
//! let found: Customer = sqlx::query_as("SELECT name, email, phone FROM customers WHERE email_bidx = ?")
//!     .bind(&probe)
//!     .fetch_one(&pool).await?;
//! assert_eq!(*found.email, "alice@example.com");
//! assert!(found.phone.is_none());
//! # Keyring::uninstall_default();
//! # Ok(()) }
//! ```
//!
//! Values are sealed in `Encode` and opened in `Decode` with the keyring that
//! [`envelope_core::current`] resolves: install one with `keyring.install_default()` at start-up
//! (or scope one per task with `keyring.install_for(..)`). A cached key costs no I/O; a missing one is
//! loaded once through the keyring's bridge, which is safe on multi-thread and current-thread
//! runtimes. A read that fails returns `sqlx::Error::ColumnDecode` and a write bound with
//! `try_bind` returns the encode error; [`envelope_error`] finds the [`envelope_core::Error`]
//! in either.
//!
//! The column types are [`envelope_core::column`](mod@envelope_core::column)'s, re-exported
//! here with their sqlx impls turned on (envelope-core's feature `sqlx`). envelope-diesel
//! re-exports the same types, so `envelope_sqlx::Encrypted` and `envelope_diesel::Encrypted`
//! are one type.
//!
//! The wrapped keys live in the key table: [`SqlxKeyStore`] implements
//! [`envelope_core::KeyStore`] for all three databases.
//!
//! ## The key table
//!
//! Create it in one of two ways:
//!
//! - in the application's own migrations: `sqlx migrate add envelope_keys` and paste the
//!   database's script into the new file: `envelope-sqlx/key-table/postgres.sql`, `mysql.sql`
//!   or `sqlite.sql` in this crate's source, the same text as [`ddl::POSTGRES`],
//!   [`ddl::MYSQL`] and [`ddl::SQLITE`]. The crate ships no numbered migration of its own, so
//!   it never collides with the application's numbering or its `_sqlx_migrations` table;
//! - at start-up: [`SqlxKeyStore::create_table`](SqlxKeyStore) (`CREATE TABLE IF NOT EXISTS`,
//!   safe when several processes run it at once), or `envelope init` from the CLI.
//!
//! A store whose table does not exist says so (`StoreError::MissingTable`), with these ways out.
//!
//! An application that creates its own tables at start-up (`CREATE TABLE IF NOT EXISTS`) can
//! run that DDL through [`run_ddl_in_turn`], so that replicas started at once on a fresh
//! database take turns as the key table's `create_table` does. On PostgreSQL, concurrent
//! `CREATE TABLE IF NOT EXISTS` otherwise fails now and then with a unique violation on
//! `pg_type_typname_nsp_index`.
//!
//! ## MySQL and MariaDB: strict mode
//!
//! A sealed value is 47 to 50 bytes longer than its plaintext (the text form about 4/3 of that).
//! On a server whose `sql_mode` is not strict (common on older and managed servers), a value
//! too long for its `VARBINARY(n)` or `VARCHAR(n)` is cut to fit with only a warning, and a
//! sealed value cut short can never be opened: the write looks fine and the value is lost. Add
//! `STRICT_ALL_TABLES` to every session that writes envelope values, with
//! [`mysql_strict_session`] in the pool's `after_connect`; the write then fails with the
//! database's "data too long" error instead:
//!
//! ```no_run
//! # #[cfg(feature = "mysql")]
//! # async fn pool() -> Result<sqlx::MySqlPool, sqlx::Error> {
//! let pool = sqlx::mysql::MySqlPoolOptions::new()
//!     .after_connect(|conn, _| Box::pin(envelope_sqlx::mysql_strict_session(conn)))
//!     .connect("mysql://app@db/app")
//!     .await?;
//! # Ok(pool) }
//! ```
//!
//! The `envelope` CLI does this for its own sessions, and [`SqlxKeyStore`] for its own
//! connections.
//!
//! ## Queries checked at compile time
//!
//! `query!` and `query_as!` need sqlx's type override on each encrypted column
//! (`email AS "email: Encrypted<String, CustomerEmail>"`, backticks on MySQL) and `as _` on an
//! encrypted bind parameter on PostgreSQL: see [`Encrypted`].
//!
//! Field types: `String`, `Vec<u8>`, `i16`, `i32`, `i64`, `u16`, `u32`, `u64`, `f32`, `f64`,
//! `bool`, and with the features below `uuid::Uuid`, `chrono::NaiveDate`,
//! `chrono::NaiveDateTime`, `chrono::DateTime<Utc>` and any serde type as `AsJson<T>`. Any
//! other type: implement [`Plaintext`] for it (a newtype around a foreign type), as its docs
//! show.
//!
//! ## Versions
//!
//! For sqlx 0.9 (an application still on sqlx 0.8 gets "multiple versions of `sqlx_core`"
//! trait errors: upgrade sqlx first) and tokio 1.45.1 or later; the README lists the other
//! minimums.
//!
//! ## Cargo features
//!
//! Nothing is on by default except what is named below: enable the databases and field types
//! the application uses.
//!
//! | feature | what it adds |
//! |---|---|
//! | `postgres`, `mysql`, `sqlite` | the key store and column types on that database |
//! | `any` | [`run_ddl_in_turn`] on a `sqlx::AnyPool` |
//! | `uuid` | `uuid::Uuid` fields |
//! | `chrono` | `chrono::NaiveDate`, `chrono::NaiveDateTime` and `chrono::DateTime<Utc>` fields |
//! | `json` | `AsJson<T>` fields: any serde type, stored as JSON inside the envelope |
#![forbid(unsafe_code)]
// With no database feature the store's machinery has no database to serve.
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code, unused_imports, unused_macros)
)]

mod store;
mod turns;

pub use envelope_core;
#[cfg(feature = "json")]
pub use envelope_core::column::AsJson;
pub use envelope_core::column::{
    BlindIndex, Column, Encrypted, EncryptedText, IndexColumn, Plaintext,
};
pub use envelope_core::{blind_index, column};
pub use store::{DEFAULT_TABLE, KeyTableDatabase, SqlxKeyStore, ddl, key_store_for_url};
pub use turns::{DdlTurns, run_ddl_in_turn};

/// The statement [`mysql_strict_session`] runs: adds `STRICT_ALL_TABLES` to the session's
/// `sql_mode`, keeping the rest of the server's.
pub use envelope_core::dialect::MYSQL_STRICT_SESSION;

/// Make a MySQL/MariaDB session strict, so that a value too long for its column fails instead
/// of being cut short (a sealed value cut short can never be opened): for the pool's
/// `after_connect` (see the crate docs).
///
/// # Errors
/// The database's error.
#[cfg(feature = "mysql")]
pub async fn mysql_strict_session(conn: &mut sqlx::MySqlConnection) -> Result<(), sqlx::Error> {
    sqlx::query(MYSQL_STRICT_SESSION)
        .execute(conn)
        .await
        .map(drop)
}

/// The [`envelope_core::Error`] behind a failed query, bind or decode, if that is what failed.
///
/// It walks `e`'s source chain, so it takes a `sqlx::Error` (`envelope_error(&err)`) as well as
/// the boxed error that [`Query::try_bind`](sqlx::query::Query::try_bind) returns
/// (`envelope_error(&*err)`).
///
/// A read error always carries it (`sqlx::Error::ColumnDecode`). A write error carries it only
/// when the value was bound with `try_bind` or added with
/// [`Arguments::add`](sqlx::Arguments::add): sqlx 0.9's `bind` keeps the encode error as text,
/// so after `.bind(..)` the failure surfaces at `execute` with its message but without its type.
/// Bind with `try_bind` where the program branches on the kind of error:
///
/// ```
/// # use envelope_sqlx::{Encrypted, column, envelope_error};
/// # column!(CustomerEmail = "customers.email");
/// # async fn demo(pool: &sqlx::SqlitePool, email: String) -> Result<(), Box<dyn std::error::Error>> {
/// let mut insert = sqlx::query("INSERT INTO customers (email) VALUES (?)");
/// if let Err(e) = insert.try_bind(Encrypted::<String, CustomerEmail>::new(email)) {
///     match envelope_error(&*e) {
///         Some(envelope_core::Error::Unavailable(_)) => { /* retry later: the KMS is down */ }
///         _ => {}
///     }
///     return Err(e);
/// }
/// insert.execute(pool).await?;
/// # Ok(()) }
/// ```
pub fn envelope_error<'e>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e envelope_core::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<envelope_core::Error>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}
