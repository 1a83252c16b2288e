//! # envelope-sqlx
//!
//! sqlx column types that seal values with [`envelope_core`] on write and open them on read, on
//! PostgreSQL, MySQL/MariaDB and SQLite.
//!
//! **Status:** the column types (`Encrypted<T, C>`, `BlindIndex<C>`) and the sqlx key store are
//! the next step of the roadmap and are not in this release yet. Until then, seal and open values
//! explicitly with [`envelope_core::Keyring`], which this crate re-exports.

pub use envelope_core;
