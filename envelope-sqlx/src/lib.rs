//! # envelope-sqlx
//!
//! Encryption at rest as a type change for sqlx, on PostgreSQL, MySQL/MariaDB and SQLite:
//!
//! ```ignore
//! use envelope_sqlx::{Encrypted, BlindIndex, column, blind_index};
//!
//! column!(pub CustomerEmail = "customers.email");
//! blind_index!(pub CustomerEmailIndex = "customers.email", CaseFolded);
//!
//! #[derive(sqlx::FromRow)]
//! struct Customer {
//!     id: i64,
//!     name: String,
//!     email: Encrypted<String, CustomerEmail>,          // BYTEA / BLOB
//!     email_bidx: BlindIndex<CustomerEmailIndex>,       // BYTEA / BLOB, for WHERE
//!     phone: Option<Encrypted<String, CustomerPhone>>,  // NULL stays NULL
//! }
//!
//! sqlx::query("INSERT INTO customers (name, email, email_bidx) VALUES ($1, $2, $3)")
//!     .bind(&name)
//!     .bind(Encrypted::<String, CustomerEmail>::new(email.clone()))
//!     .bind(BlindIndex::<CustomerEmailIndex>::of(&email)?)
//!     .execute(&pool).await?;
//! ```
//!
//! Values are sealed in `Encode` and opened in `Decode` with the keyring that
//! [`envelope_core::current`] resolves: install one with `keyring.install_default()` at start-up
//! (or scope one per task with `keyring.scope(..)`). A cached key costs no I/O; a missing one is
//! loaded once through the keyring's bridge, which is safe on multi-thread and current-thread
//! runtimes. Errors arrive as `sqlx::Error::Encode` / `ColumnDecode` whose source downcasts to
//! [`envelope_core::Error`].
//!
//! The wrapped keys live in the key table: [`SqlxKeyStore`] implements
//! [`envelope_core::KeyStore`] for all three databases; call
//! [`SqlxKeyStore::create_table`](SqlxKeyStore) or apply the files in `migrations/`.
//!
//! Field types: `String`, `Vec<u8>`, `i16`, `i32`, `i64`, `bool`, `uuid::Uuid`,
//! `chrono::NaiveDate`, `chrono::DateTime<Utc>`, and any serde type as
//! [`Json<T>`](envelope_core::column::Json).

mod store;
mod types;

pub use envelope_core;
pub use envelope_core::column::{Column, IndexColumn, Json, Plaintext};
pub use envelope_core::{blind_index, column};
pub use store::{DEFAULT_TABLE, SqlxKeyStore, ddl};
pub use types::{BlindIndex, Encrypted, EncryptedText};

/// The [`envelope_core::Error`] inside a sqlx error, if that is what failed.
pub fn envelope_error(e: &sqlx::Error) -> Option<&envelope_core::Error> {
    match e {
        sqlx::Error::Encode(source) | sqlx::Error::Decode(source) => source.downcast_ref(),
        sqlx::Error::ColumnDecode { source, .. } => source.downcast_ref(),
        _ => None,
    }
}
