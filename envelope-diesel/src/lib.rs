//! # envelope-diesel
//!
//! Encryption at rest as a type change for diesel, on PostgreSQL, MySQL/MariaDB and SQLite:
//!
//! ```
//! use diesel::prelude::*;
//! use envelope_core::{Keyring, KeyMaterial, LocalKms, MemoryKeyStore};
//! use envelope_diesel::{BlindIndex, Encrypted, blind_index, column};
//!
//! column!(pub CustomerEmail = "customers.email");
//! column!(pub CustomerPhone = "customers.phone");
//! blind_index!(pub CustomerEmailIndex = "customers.email", CaseFolded);
//!
//! diesel::table! {
//!     customers (id) {
//!         id -> Integer,
//!         name -> Text,
//!         email -> Binary,
//!         email_bidx -> Binary,
//!         phone -> Nullable<Binary>,
//!     }
//! }
//!
//! #[derive(Queryable, Selectable)]
//! #[diesel(table_name = customers)]
//! struct Customer {
//!     name: String,
//!     email: Encrypted<String, CustomerEmail>,          // BYTEA / BLOB
//!     phone: Option<Encrypted<String, CustomerPhone>>,  // NULL stays NULL
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kms = LocalKms::from_key(KeyMaterial::generate()?);
//! let keyring = Keyring::builder(kms, MemoryKeyStore::new()).build()?;
//! let _guard = keyring.enter(); // this thread's keyring; or keyring.install_default()
//!
//! let mut conn = SqliteConnection::establish(":memory:")?;
//! diesel::sql_query(
//!     "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, \
//!      email BLOB NOT NULL, email_bidx BLOB NOT NULL, phone BLOB)",
//! )
//! .execute(&mut conn)?;
//! diesel::insert_into(customers::table)
//!     .values((
//!         customers::name.eq("Alice"),
//!         customers::email.eq(Encrypted::<String, CustomerEmail>::new("alice@example.com".into())),
//!         customers::email_bidx.eq(BlindIndex::<CustomerEmailIndex>::of("alice@example.com")?),
//!         customers::phone.eq(None::<Encrypted<String, CustomerPhone>>),
//!     ))
//!     .execute(&mut conn)?;
//!
//! let probe = BlindIndex::<CustomerEmailIndex>::of("Alice@Example.COM")?;
//! let found: Customer = customers::table
//!     .filter(customers::email_bidx.eq(&probe))
//!     .select(Customer::as_select())
//!     .first(&mut conn)?;
//! assert_eq!(found.name, "Alice");
//! assert_eq!(*found.email, "alice@example.com");
//! assert!(found.phone.is_none());
//! # Ok(()) }
//! ```
//!
//! Values are sealed in `ToSql` and opened in `FromSql` with the keyring that
//! [`envelope_core::current`] resolves. Sync diesel runs on a plain thread or in
//! `spawn_blocking`, where task-locals are invisible: install a process default
//! (`keyring.install_default()`) or enter one on the thread (`keyring.enter()`). A cached key
//! costs no I/O; a missing one is loaded once through the keyring's bridge. Errors arrive as
//! `diesel::result::Error::SerializationError` / `DeserializationError` whose source is an
//! [`envelope_core::Error`] (see [`envelope_error`]).
//!
//! The column types are [`envelope_core::column`](mod@envelope_core::column)'s, re-exported
//! here with their diesel impls turned on (envelope-core's feature `diesel`, and with this
//! crate's `postgres`, `mysql` and `sqlite` their per-backend `ToSql`). envelope-sqlx
//! re-exports the same types, so `envelope_diesel::Encrypted` and `envelope_sqlx::Encrypted`
//! are one type.
//!
//! Field types: `String`, `Vec<u8>`, `i16`, `i32`, `i64`, `u16`, `u32`, `u64`, `f32`, `f64`,
//! `bool`, and with the features below `uuid::Uuid`, `chrono::NaiveDate`,
//! `chrono::NaiveDateTime`, `chrono::DateTime<Utc>` and any serde type as `AsJson<T>`. Any
//! other type: implement [`Plaintext`] for it (a newtype around a foreign type), as its docs
//! show.
//! MySQL's `BLOB` holds at most 64 KiB: use `MEDIUMBLOB` for larger values.
//!
//! On MySQL/MariaDB, make the sessions that write envelope values strict: on a server whose
//! `sql_mode` is not strict, a value too long for its `VARBINARY(n)` is cut to fit with only a
//! warning, and a sealed value cut short can never be opened. Run [`MYSQL_STRICT_SESSION`] on
//! each connection (with r2d2, in a `CustomizeConnection::on_acquire`:
//! `conn.batch_execute(envelope_diesel::MYSQL_STRICT_SESSION)`); the write then fails with
//! "data too long" instead. The key stores do this for their own connections.
//!
//! With diesel-async, `ToSql` and `FromSql` run inside the calling task: scope the keyring with
//! `keyring.install_for(async { .. })` (or install a default). A cache miss there is safe on
//! multi-thread and current-thread runtimes.
//!
//! ## The key table
//!
//! Values carry only a key id; the wrapped keys live in the key table. A diesel application
//! keeps it with [`DieselKeyStore`] (sync diesel, feature `r2d2`, on by default) or
//! `AsyncDieselKeyStore` (diesel-async, feature `async`), on the same database as the data or
//! another one:
//!
//! ```no_run
//! use diesel::sqlite::SqliteConnection;
//! use envelope_core::{Keyring, LocalKms};
//! use envelope_diesel::DieselKeyStore;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = DieselKeyStore::<SqliteConnection>::connect("app.db")?;
//! store.create_table()?;
//! let kms = LocalKms::open_or_create_for_development("envelope-master.key")?;
//! Keyring::builder(kms, store).build()?.install_default();
//! # Ok(()) }
//! ```
//!
//! An application that creates its own tables at start-up (`CREATE TABLE IF NOT EXISTS`) can
//! run that DDL through [`run_ddl_in_turn`], so that replicas started at once on a fresh
//! database take turns as the key table's `create_table` does. On PostgreSQL, concurrent
//! `CREATE TABLE IF NOT EXISTS` otherwise fails now and then with a unique violation on
//! `pg_type_typname_nsp_index`.
//!
//! The table is the one envelope-sqlx and the `envelope` CLI use: the CLI's `encrypt` output,
//! sqlx's and diesel's values all read in each other. Its DDL ships as diesel migrations in
//! `migrations/<database>/` ([`store`] has the details).
//!
//! ## Errors
//!
//! A failed seal or open arrives as `diesel::result::Error::SerializationError` /
//! `DeserializationError` whose source is an [`envelope_core::Error`]. diesel's own `Display`
//! of a read error names only the field; log [`report`]`(&e)`, which adds the cause, and match
//! on [`envelope_error`]`(&e)` to act on it:
//!
//! ```
//! # fn handle(e: diesel::result::Error) {
//! eprintln!("reading customers failed: {}", envelope_diesel::report(&e));
//! // reading customers failed: Error deserializing field 'email': <why>
//! # }
//! ```
//!
//! ## Versions
//!
//! For diesel 2.3 (and diesel-async 0.9 with the feature `async`); the README lists the other
//! minimums.
//!
//! ## Cargo features
//!
//! | feature | what it adds |
//! |---|---|
//! | `postgres`, `mysql`, `sqlite` | the column types and key stores on that backend (none by default) |
//! | `r2d2` (default) | `DieselKeyStore`: the key table over sync diesel |
//! | `async` | `AsyncDieselKeyStore`: the key table over diesel-async |
//! | `migrations` | the key table's diesel migrations, embedded |
//! | `uuid` | `uuid::Uuid` fields |
//! | `chrono` | `chrono::NaiveDate`, `chrono::NaiveDateTime` and `chrono::DateTime<Utc>` fields |
//! | `json` | `AsJson<T>` fields: any serde type, stored as JSON inside the envelope |
#![forbid(unsafe_code)]
// The key store's machinery needs a backend and a connection kind (`r2d2` or `async`) to serve.
#![cfg_attr(
    not(all(
        any(feature = "postgres", feature = "mysql", feature = "sqlite"),
        any(feature = "r2d2", feature = "async")
    )),
    allow(dead_code, unused_imports, unused_macros)
)]

mod error;
pub mod store;

pub use envelope_core;
#[cfg(feature = "json")]
pub use envelope_core::column::AsJson;
pub use envelope_core::column::{
    BlindIndex, Column, Encrypted, EncryptedText, IndexColumn, Plaintext,
};
pub use envelope_core::dialect::MYSQL_STRICT_SESSION;
pub use envelope_core::{blind_index, column};
pub use error::{Report, envelope_error, report};
#[cfg(feature = "async")]
pub use store::AsyncDieselKeyStore;
#[cfg(feature = "r2d2")]
pub use store::DieselKeyStore;
pub use store::run_ddl_in_turn;
