//! # envelope-core
//!
//! KMS envelope encryption for database columns. A KMS generates data keys (DEKs) under a
//! customer master key (CMK); each DEK's plaintext stays in memory and seals values locally with
//! AES-256-GCM; its wrapped form lives in the key table. The KMS is called again only to unwrap a
//! key that is not cached, so KMS traffic grows with the number of keys, never with rows.
//!
//! Start with [`Keyring`]: build one at start-up from a [`KmsProvider`] (the embedded default is
//! [`LocalKms`]) and a [`KeyStore`] (the key table: envelope-sqlx and envelope-diesel provide
//! database stores; [`MemoryKeyStore`] serves tests), then seal and open values by column label.
//! The column types of envelope-sqlx and envelope-diesel do this for you on every read and write.
//!
//! ```
//! use envelope_core::{Keyring, KeyMaterial, Label, LocalKms, MemoryKeyStore};
//!
//! # fn main() -> Result<(), envelope_core::Error> {
//! let kms = LocalKms::from_key(KeyMaterial::generate()?);
//! let keyring = Keyring::builder(kms, MemoryKeyStore::new()).build()?;
//!
//! let ssn = Label::new("users.ssn")?;
//! let blob = keyring.blocking().encrypt(&ssn, b"078-05-1120")?;
//! assert_eq!(keyring.blocking().decrypt(&ssn, &blob)?, b"078-05-1120");
//!
//! // The label is bound into the value: it will not open as another column.
//! let email = Label::new("users.email")?;
//! assert!(keyring.blocking().decrypt(&email, &blob).is_err());
//! # Ok(()) }
//! ```
//!
//! ## What is guaranteed
//!
//! - Confidentiality and integrity of each value under AES-256-GCM with a random 96-bit nonce; a
//!   tampered, truncated, swapped (another column) or foreign value fails with a typed error,
//!   never with wrong plaintext. The format is specified in `docs/FORMAT.md`.
//! - Every data key is retired long before the random-nonce bound: by default after 2^28 values
//!   or 24 hours, whichever comes first ([`Policy`]).
//! - Plaintext keys live only in memory, in types that wipe themselves on drop; no `Debug` output
//!   shows a key, a credential or a plaintext; no log line carries a KMS body.
//! - Concurrent cache misses for one key make one KMS call; a KMS that fails or hangs costs one
//!   wait of [`Policy::kms_timeout`], after which callers fail at once for
//!   [`Policy::refresh_retry`].
//! - Nonces never repeat across `fork()`: the generator reseeds in the child, and a keyring
//!   built before the fork refuses to write there ([`Misuse::ForkedProcess`]): build the keyring
//!   in each worker after forking.
//! - A keyring refuses to start on a key table whose keys need master keys its provider does
//!   not hold ([`Error::MasterKeyMissing`]).
//!
//! ## What is not
//!
//! - Values reveal their length (plus 47 to 50 bytes) and which key sealed them.
//! - Values are bound to their column, not to their row: a value copied to another row of the
//!   same column opens there, unless the read names a scope ([`Keyring::decrypt_scoped`], a
//!   column's `SCOPE`, a scoped keyring) and the rows belong to different scopes.
//! - Blind indexes reveal which rows hold equal values ([`BlindIndexSpec`]).
//! - Plaintext handed back to the application, database driver buffers, and swapped memory are
//!   outside this crate's reach.
//!
//! ## Synchronous callers
//!
//! [`Keyring::blocking`] serves synchronous codecs. A cached key costs no I/O; a miss waits
//! for the keyring's own runtime thread with a timeout ([`Policy::kms_timeout`]), which is safe on
//! plain threads, multi-thread tokio workers, current-thread runtimes and `spawn_blocking`.
//! On a multi-thread worker the wait runs inside `tokio::task::block_in_place`, so the runtime
//! moves its other tasks away; whether that is allowed is found out by trying, which needs
//! unwinding. Built with `panic = "abort"`, the keyring never tries: a miss then holds the worker
//! thread while the key loads.
//!
//! ## Metrics and traces
//!
//! A keyring reports KMS calls (by provider, action and outcome, with their latency), key-cache
//! hits and misses, rotations, bridge waits and key-table calls through the `metrics` facade,
//! under the names in [`metric_names`]; install the application's recorder before building the
//! keyring. KMS calls run in `envelope.kms` spans and key-table calls in `envelope.key_store`
//! spans (`tracing`), which carry no body, value or key material. [`Keyring::metrics`] gives the
//! same counters for one keyring without any recorder.
#![forbid(unsafe_code)]

mod blind;
mod bridge;
mod cipher;
mod coarse_clock;
pub mod column;
pub mod dialect;
mod error;
pub mod format;
pub mod key_table;
mod keyring;
mod keys;
pub mod kms;
mod nonce;
mod secret;
mod store;
mod telemetry;

pub use blind::{BlindIndexSpec, Normalizer};
pub use error::{
    Category, ConfigError, Error, FormatError, KmsError, KmsErrorKind, MasterKeyMissing, Misuse,
    Report, Result, StoreError, SystemError, Unavailable,
};
pub use keyring::{
    Blocking, Keyring, KeyringBuilder, KeyringGuard, MAX_USES_CEILING, Policy, RetireOnDrop,
    current,
};
pub use keys::{KeyId, KeyKind, KeyMaterial, KeyRecord, Label, Scope};
pub use kms::local::LocalKms;
pub use kms::provider::{EncryptionContext, GeneratedDataKey, KmsProvider};
pub use secret::SecretString;
pub use store::{KeyFilter, KeyStore, MemoryKeyStore};
pub use telemetry::{MetricsSnapshot, names as metric_names};

/// For envelope-sqlx and envelope-diesel only: not part of the API, may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::bridge::IoRuntime;

    /// The TC3-HMAC-SHA256 signer, for envelope-kms-emulator's verifier and the signature tests.
    #[cfg(feature = "kms-tencent")]
    pub mod tc3 {
        pub use crate::kms::tencent::sign::*;
    }

    /// For `column!` and `blind_index!`: whether `label` is a valid label.
    pub const fn label_is_valid(label: &str) -> bool {
        crate::keys::name_problem(label).is_none()
    }
}

/// Re-exported so implementors of [`KmsProvider`] and [`KeyStore`] use the same macro version.
pub use async_trait::async_trait;
