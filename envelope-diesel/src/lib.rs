//! # envelope-diesel
//!
//! diesel column types that seal values with [`envelope_core`] on write and open them on read,
//! on PostgreSQL, MySQL/MariaDB and SQLite.
//!
//! **Status:** the column types and the diesel key store are on the roadmap and are not in this
//! release yet. Until then, seal and open values explicitly with [`envelope_core::Keyring`],
//! which this crate re-exports.

pub use envelope_core;
