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
//! runtimes. Errors arrive as `sqlx::Error::Encode` / `ColumnDecode` whose source downcasts to
//! [`envelope_core::Error`].
//!
//! The wrapped keys live in the key table: [`SqlxKeyStore`] implements
//! [`envelope_core::KeyStore`] for all three databases; call
//! [`SqlxKeyStore::create_table`](SqlxKeyStore) or apply the files in `migrations/`.
//!
//! Field types: `String`, `Vec<u8>`, `i16`, `i32`, `i64`, `bool`, and with the features below
//! `uuid::Uuid`, `chrono::NaiveDate`, `chrono::DateTime<Utc>` and any serde type as `AsJson<T>`.
//!
//! ## Cargo features
//!
//! Nothing is on by default except what is named below: enable the databases and field types
//! the application uses.
//!
//! | feature | what it adds |
//! |---|---|
//! | `postgres`, `mysql`, `sqlite` | the key store and column types on that database |
//! | `uuid` | `uuid::Uuid` fields |
//! | `chrono` | `chrono::NaiveDate` and `chrono::DateTime<Utc>` fields |
//! | `json` | `AsJson<T>` fields: any serde type, stored as JSON inside the envelope |
#![forbid(unsafe_code)]
// With no database feature the store's machinery has no database to serve.
#![cfg_attr(
    not(any(feature = "postgres", feature = "mysql", feature = "sqlite")),
    allow(dead_code, unused_imports, unused_macros)
)]

mod store;
mod types;

pub use envelope_core;
#[cfg(feature = "json")]
pub use envelope_core::column::AsJson;
pub use envelope_core::column::{Column, IndexColumn, Plaintext};
pub use envelope_core::{blind_index, column};
pub use store::{CreateTable, DEFAULT_TABLE, SqlxKeyStore, ddl, key_store_for_url};
pub use types::{BlindIndex, Encrypted, EncryptedText};

/// The [`envelope_core::Error`] inside a sqlx error, if that is what failed.
pub fn envelope_error(e: &sqlx::Error) -> Option<&envelope_core::Error> {
    match e {
        sqlx::Error::Encode(source) | sqlx::Error::Decode(source) => source.downcast_ref(),
        sqlx::Error::ColumnDecode { source, .. } => source.downcast_ref(),
        _ => None,
    }
}
