//! The crate's error type and its focused sub-enums.
//!
//! Every error is `Send + Sync + 'static` and `Clone`, so it survives the trip through the
//! boxed errors of diesel and sqlx (downcast with `downcast_ref::<envelope_core::Error>()`) and
//! can be shared between the waiters of one cache load. Messages name only what is safe to
//! name: key ids, scopes, labels, format versions, providers, KMS error codes and request ids.
//! They never carry plaintext, key material, wrapped keys or KMS response bodies.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::keys::{KeyId, KeyKind};

/// Everything that can go wrong in envelope-core.
///
/// The variants fall into four groups, so that a caller can act on the group without knowing
/// every case. [`Error::category`] says which group an error is in, and [`Error::is_retryable`]
/// whether sending the same call again later may succeed:
///
/// - **the value** ([`Category::Value`]): [`Error::Format`], [`Error::Decrypt`],
///   [`Error::UnknownKey`], [`Error::KeyKindMismatch`], [`Error::ScopeMismatch`],
///   [`Error::PlaintextType`], [`Error::PlaintextEncode`], and two [`Error::Misuse`] cases that
///   depend on the value rather than the code: [`Misuse::PlaintextTooLarge`] and
///   [`Misuse::BlindIndex`] (a text normalizer given bytes that are not UTF-8; the same variant
///   reports an out-of-range [`crate::BlindIndexSpec::with_len`], which is found before any
///   value is read): this value cannot be written or read; others can;
/// - **the services** ([`Category::Service`]): [`Error::Kms`], [`Error::Store`],
///   [`Error::Unavailable`]: the KMS or the key table failed or did not answer in time. Retrying
///   later may succeed for a retryable [`KmsError`], a [`StoreError::Backend`], an
///   [`Unavailable::Timeout`] and [`Unavailable::KeysUsedUp`]; not for a keyring that was
///   [shut down](Unavailable::ShutDown). [`Unavailable::WriteKey`] takes the group and the
///   retryability of its cause;
/// - **the deployment** ([`Category::Deployment`]): [`Error::Config`],
///   [`Error::MasterKeyMissing`]: a setting, a credential or a master key is missing or wrong;
///   fix it and restart;
/// - **the program** ([`Category::Program`]): [`Error::Misuse`] (but for the two value cases
///   above): the API was used in a way it cannot serve; fix the code. [`Error::System`]: the
///   operating system or the crypto library failed.
///
/// Only service errors are ever retryable.
///
/// A message never repeats its cause: the cause is [`std::error::Error::source`]. Print the
/// whole chain with [`Error::report`].
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not a well-formed envelope value; rejected before any cryptography.
    #[error(transparent)]
    Format(#[from] FormatError),

    /// Authentication failed: the value was tampered with, copied from another column (context
    /// mismatch), or sealed under a different key with the same id. Deliberately opaque.
    #[error(
        "cannot decrypt a value sealed under key {key_id}: it was altered, belongs to another column, or was sealed under a different key"
    )]
    Decrypt {
        /// The key id read from the value's header (not secret), so that an operator can find
        /// the rows it sealed (`envelope inspect`, or the key-id expression in docs/FORMAT.md).
        key_id: KeyId,
    },

    /// The value names a key id that the key table does not hold.
    #[error(
        "value is sealed under key {key_id}, which is not in the key table (deleted, shredded, or a value from another database)"
    )]
    UnknownKey {
        /// The key id read from the value's header.
        key_id: KeyId,
    },

    /// A key was used for the wrong job (a blind-index key for a value, or the reverse).
    #[error("key {key_id} is a {found} key, but a {expected} key was needed")]
    KeyKindMismatch {
        /// The key's id.
        key_id: KeyId,
        /// The kind the operation needs.
        expected: KeyKind,
        /// The kind the key table holds.
        found: KeyKind,
    },

    /// The value's key belongs to another scope than the read requires (a scoped column or a
    /// scoped keyring): for example a value copied from another tenant's row.
    #[error(
        "value is sealed under key {key_id} of scope '{found}', but this read accepts only scope '{expected}' (a value copied from another tenant's row?)"
    )]
    ScopeMismatch {
        /// The key id read from the value's header.
        key_id: KeyId,
        /// The scope the read requires.
        expected: Box<str>,
        /// The scope the key table gives the key.
        found: Box<str>,
    },

    /// A value opened, but its bytes are not a value of the field's type (the column's Rust type
    /// changed, or the value was written for another type).
    #[error("value opened but is not a valid {expected}: {detail}")]
    PlaintextType {
        /// The field's type.
        expected: &'static str,
        /// What did not fit.
        detail: String,
    },

    /// A field's value could not be encoded as plaintext (an `AsJson` value whose `Serialize`
    /// failed). The write fails; nothing was sealed or stored.
    #[error("cannot encode the value as {ty}: {detail}; nothing was written")]
    PlaintextEncode {
        /// The field's type.
        ty: &'static str,
        /// What failed, without the data.
        detail: String,
    },

    /// The KMS refused or failed a call.
    #[error(transparent)]
    Kms(#[from] KmsError),

    /// The key store (the key table) failed.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The keyring cannot serve the call now: a wait ran out, no data key can take writes, or
    /// the keyring was shut down.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),

    /// The key table holds keys of this provider, but the provider holds none of the master keys
    /// they were made under: a master key file that went missing and was replaced, or the wrong
    /// one. Writing under the new master key would leave every existing row unreadable.
    #[error(transparent)]
    MasterKeyMissing(Box<MasterKeyMissing>),

    /// A setting, credential or file the deployment provides is missing or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// The program used the API in a way it cannot serve.
    #[error(transparent)]
    Misuse(#[from] Misuse),

    /// The operating system or the crypto library failed where it should not.
    #[error(transparent)]
    System(#[from] SystemError),
}

/// Why the keyring cannot serve a call now ([`Error::Unavailable`]). Retrying later may succeed.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// A caller waited for the KMS or the key store longer than the keyring allows.
    #[error(
        "timed out after {waited:?} waiting for the KMS or key store ({what}); check the KMS endpoint and network, or raise Policy::kms_timeout"
    )]
    Timeout {
        /// How long the caller waited.
        waited: Duration,
        /// What was being done.
        what: Cow<'static, str>,
    },

    /// No data key can take writes in this scope: there is no active key, or it reached its
    /// hard limit (age or use count), and a new one could not be made. Reads of cached keys go
    /// on; writes resume when the cause is gone.
    #[error("{}", write_key_message(scope, cause))]
    WriteKey {
        /// The scope being written.
        scope: String,
        /// Why the new key could not be made.
        #[source]
        cause: Box<Error>,
    },

    /// Concurrent writers used up every new data key of the scope before this write could use
    /// one, for longer than [`crate::Policy::kms_timeout`].
    #[error(
        "new data keys of scope '{scope}' were used up by concurrent writers for longer than Policy::kms_timeout before this write could use one; raise Policy::dek_max_uses"
    )]
    KeysUsedUp {
        /// The scope being written.
        scope: String,
    },

    /// The keyring was dropped (its runtime is shut down) while a call was in flight.
    #[error("the keyring has been shut down; build a new one")]
    ShutDown,
}

/// How the program used the API in a way it cannot serve ([`Error::Misuse`]). Fix the code.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Misuse {
    /// A column type needed a keyring and none was installed.
    #[error(
        "no keyring is installed: call Keyring::install_default() at start-up, or wrap the work in keyring.install_for(..) / keyring.enter()"
    )]
    NoKeyring,

    /// A blocking call was made from the keyring's own KMS thread, which would deadlock.
    #[error(
        "a blocking keyring call was made on the keyring's own KMS thread; use the async API there"
    )]
    BridgeReentrant,

    /// This process is a fork of the one the keyring was built in.
    #[error(
        "this keyring was built in process {built_in} and this is a forked child of it: it will not write under data keys it shares with its parent, and its KMS thread did not survive the fork; build the keyring in each worker after forking"
    )]
    ForkedProcess {
        /// The process the keyring was built in.
        built_in: u32,
    },

    /// A context label or scope is not valid.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// "context label" or "scope".
        what: &'static str,
        /// The rejected value (labels and scopes are names, never secrets).
        value: String,
        /// What rule it breaks.
        reason: &'static str,
    },

    /// The plaintext is larger than the format can carry.
    #[error("plaintext of {len} bytes is larger than the format's limit of {max} bytes")]
    PlaintextTooLarge {
        /// The plaintext's length.
        len: usize,
        /// The format's limit.
        max: usize,
    },

    /// A [`crate::Policy`] field is out of range.
    #[error("Policy::{field} {problem}")]
    Policy {
        /// The field.
        field: &'static str,
        /// What is wrong with its value.
        problem: Cow<'static, str>,
    },

    /// A [`crate::KeyringBuilder`] cannot start a keyring with what it was given.
    #[error("{0}")]
    Builder(Cow<'static, str>),

    /// A [`crate::BlindIndexSpec`] asks for what an index cannot do.
    #[error("{0}")]
    BlindIndex(&'static str),

    /// Key material of the wrong length.
    #[error("key material must be {expected} bytes, got {len}")]
    KeyLength {
        /// The length a key has.
        expected: usize,
        /// The length given.
        len: usize,
    },
}

impl Misuse {
    /// A short, stable name for the case.
    pub fn name(&self) -> &'static str {
        match self {
            Misuse::NoKeyring => "NoKeyring",
            Misuse::BridgeReentrant => "BridgeReentrant",
            Misuse::ForkedProcess { .. } => "ForkedProcess",
            Misuse::InvalidName { .. } => "InvalidName",
            Misuse::PlaintextTooLarge { .. } => "PlaintextTooLarge",
            Misuse::Policy { .. } => "Policy",
            Misuse::Builder(_) => "Builder",
            Misuse::BlindIndex(_) => "BlindIndex",
            Misuse::KeyLength { .. } => "KeyLength",
        }
    }

    /// [`Category::Value`] for the cases that depend on the value ([`Misuse::PlaintextTooLarge`],
    /// [`Misuse::BlindIndex`]), [`Category::Program`] for the rest.
    fn category(&self) -> Category {
        match self {
            // The plaintext is too large: this value cannot be sealed, others can.
            Misuse::PlaintextTooLarge { .. } => Category::Value,
            // Mostly a text normalizer given bytes that are not UTF-8, which is the value's
            // problem. `BlindIndexSpec::with_len` also reports here, but at start-up, before
            // any value is read, where the distinction makes no difference to a caller.
            Misuse::BlindIndex(_) => Category::Value,
            Misuse::NoKeyring
            | Misuse::BridgeReentrant
            | Misuse::ForkedProcess { .. }
            | Misuse::InvalidName { .. }
            | Misuse::Policy { .. }
            | Misuse::Builder(_)
            | Misuse::KeyLength { .. } => Category::Program,
        }
    }
}

/// A setting, credential or file of the deployment that is missing or invalid
/// ([`Error::Config`]): which one, and what is wrong with it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    setting: Cow<'static, str>,
    problem: Cow<'static, str>,
    #[source]
    source: Option<Arc<std::io::Error>>,
}

impl ConfigError {
    /// `setting` (an environment variable, a key URI, a file, a provider option) is wrong in
    /// the way `problem` says.
    pub fn new(
        setting: impl Into<Cow<'static, str>>,
        problem: impl Into<Cow<'static, str>>,
    ) -> Self {
        ConfigError {
            setting: setting.into(),
            problem: problem.into(),
            source: None,
        }
    }

    /// The same, caused by an I/O error (a file that cannot be read).
    pub fn with_io(mut self, source: std::io::Error) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The setting: an environment variable, a key URI, a file path, a provider option.
    pub fn setting(&self) -> &str {
        &self.setting
    }

    /// What is wrong with it, and what to do.
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

/// The operating system or the crypto library failed where it should not ([`Error::System`]).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SystemError {
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),

    /// A thread or runtime the keyring needs could not start.
    #[error("cannot start the {what}")]
    Thread {
        /// Which thread or runtime.
        what: Cow<'static, str>,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The fork handler that reseeds the nonce generator could not be registered.
    #[error("cannot register the fork handler of the nonce generator: {0}")]
    ForkHandler(String),

    /// The HTTP client of a KMS provider could not be built (its TLS roots, say).
    #[error("cannot build the KMS provider's HTTP client: {detail}")]
    HttpClient {
        /// Why.
        detail: String,
    },

    /// A local file (the local KMS master key) could not be written.
    #[error("{path}: cannot {action}")]
    File {
        /// The file.
        path: String,
        /// What was being done.
        action: &'static str,
        /// Why.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// An invariant of envelope itself failed: a bug, never a property of the data.
    #[error("an internal invariant failed: {0} (a bug in envelope; please report it)")]
    Internal(&'static str),

    /// The AES-GCM implementation failed where it cannot fail on valid input: a broken build or
    /// a failed self-test of the crypto library, never a property of the data.
    #[error(
        "the AES-256-GCM implementation failed: {0} (a broken build of aws-lc-rs; rebuild, and report it if it persists)"
    )]
    Crypto(&'static str),
}

impl SystemError {
    /// Always [`Category::Program`]; matched per case so that a new one is decided on.
    fn category(&self) -> Category {
        match self {
            SystemError::Random(_)
            | SystemError::Thread { .. }
            | SystemError::ForkHandler(_)
            | SystemError::HttpClient { .. }
            | SystemError::File { .. }
            | SystemError::Internal(_)
            | SystemError::Crypto(_) => Category::Program,
        }
    }
}

/// Whose problem an [`Error`] is: the four groups of [`Error`]'s documentation.
///
/// Each error belongs to exactly one group ([`Error::category`]); the mapping lives here, beside
/// the error, so that callers act on the group instead of matching variants themselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Category {
    /// This value cannot be written or read; other values can. Report the value and go on.
    Value,
    /// The KMS or the key table failed or did not answer in time. See [`Error::is_retryable`]
    /// for whether retrying later may succeed.
    Service,
    /// A setting, a credential or a master key is missing or wrong; fix it and restart.
    Deployment,
    /// The API was used in a way it cannot serve, or the operating system or the crypto library
    /// failed; fix the code (or the build).
    Program,
}

impl Category {
    /// A short, stable, lower-case name: `value`, `service`, `deployment` or `program`.
    pub fn name(self) -> &'static str {
        match self {
            Category::Value => "value",
            Category::Service => "service",
            Category::Deployment => "deployment",
            Category::Program => "program",
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Error {
    /// Which of the four groups this error belongs to (see [`Error`]).
    pub fn category(&self) -> Category {
        match self {
            Error::Format(_)
            | Error::Decrypt { .. }
            | Error::UnknownKey { .. }
            | Error::KeyKindMismatch { .. }
            | Error::ScopeMismatch { .. }
            | Error::PlaintextType { .. }
            | Error::PlaintextEncode { .. } => Category::Value,
            Error::Kms(_) | Error::Store(_) => Category::Service,
            Error::Unavailable(u) => match u {
                // The write key could not be made: whose problem that is, is its cause's.
                Unavailable::WriteKey { cause, .. } => cause.category(),
                Unavailable::Timeout { .. }
                | Unavailable::KeysUsedUp { .. }
                | Unavailable::ShutDown => Category::Service,
            },
            Error::Config(_) | Error::MasterKeyMissing(_) => Category::Deployment,
            Error::Misuse(m) => m.category(),
            Error::System(s) => s.category(),
        }
    }

    /// Whether the same call may succeed if made again later, with nothing fixed in between: a
    /// [retryable](KmsError::is_retryable) KMS failure, a failure of the key store's database, a
    /// wait that ran out, or new data keys used up by concurrent writers. Never true outside
    /// [`Category::Service`], nor for a keyring that was shut down.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kms(k) => k.is_retryable(),
            Error::Store(s) => s.is_retryable(),
            Error::Unavailable(u) => match u {
                Unavailable::Timeout { .. } | Unavailable::KeysUsedUp { .. } => true,
                Unavailable::WriteKey { cause, .. } => cause.is_retryable(),
                Unavailable::ShutDown => false,
            },
            Error::Format(_)
            | Error::Decrypt { .. }
            | Error::UnknownKey { .. }
            | Error::KeyKindMismatch { .. }
            | Error::ScopeMismatch { .. }
            | Error::PlaintextType { .. }
            | Error::PlaintextEncode { .. }
            | Error::MasterKeyMissing(_)
            | Error::Config(_)
            | Error::Misuse(_)
            | Error::System(_) => false,
        }
    }

    /// A short, stable name for the error's variant, as used by the test vectors' `expect` field
    /// and by the `envelope` command's JSON output (scripts match on it). A format error and a
    /// misuse are named by their own case (`Truncated`, `PlaintextTooLarge`), the rest by the
    /// variant.
    pub fn name(&self) -> &'static str {
        match self {
            Error::Format(f) => f.name(),
            Error::Decrypt { .. } => "Decrypt",
            Error::UnknownKey { .. } => "UnknownKey",
            Error::KeyKindMismatch { .. } => "KeyKindMismatch",
            Error::ScopeMismatch { .. } => "ScopeMismatch",
            Error::PlaintextType { .. } => "PlaintextType",
            Error::PlaintextEncode { .. } => "PlaintextEncode",
            Error::Kms(_) => "Kms",
            Error::Store(_) => "Store",
            Error::Unavailable(_) => "Unavailable",
            Error::MasterKeyMissing(_) => "MasterKeyMissing",
            Error::Config(_) => "Config",
            Error::Misuse(m) => m.name(),
            Error::System(_) => "System",
        }
    }

    /// The message and every cause after it, `: `-separated: `{}` of this prints the whole
    /// chain, where `{}` of the error prints only its own message.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }

    /// A problem with the file at `path` (the local KMS master key), as a [`ConfigError`].
    pub(crate) fn io(path: &std::path::Path, problem: impl Into<Cow<'static, str>>) -> Self {
        Error::config(path.display().to_string(), problem)
    }

    /// [`Error::io`] caused by an I/O error.
    pub(crate) fn file_io(
        path: &std::path::Path,
        problem: &'static str,
        e: std::io::Error,
    ) -> Self {
        Error::Config(ConfigError::new(path.display().to_string(), problem).with_io(e))
    }

    /// A [`ConfigError`] as an [`Error`].
    pub(crate) fn config(
        setting: impl Into<Cow<'static, str>>,
        problem: impl Into<Cow<'static, str>>,
    ) -> Self {
        Error::Config(ConfigError::new(setting, problem))
    }
}

/// The whole chain of an error: see [`Error::report`].
#[derive(Clone, Copy)]
pub struct Report<'a>(&'a Error);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = std::error::Error::source(self.0);
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The details of [`Error::MasterKeyMissing`].
#[derive(Clone, Debug, thiserror::Error)]
#[error(
    "the key table holds {keys} keys made under {provider} master key(s) {}, but this process holds only {held} (from {origin}); restore the master key those keys were made with (a new master key cannot read them) and point the application at it",
    wanted.join(", ")
)]
#[non_exhaustive]
pub struct MasterKeyMissing {
    /// The provider's name.
    pub provider: String,
    /// How many rows of the key table need a missing master key.
    pub keys: usize,
    /// The master key ids the key table names.
    pub wanted: Vec<String>,
    /// The master key this keyring holds.
    pub held: String,
    /// Where the provider got its master key (a file path, an environment variable).
    pub origin: String,
}

/// Why bytes were rejected as an envelope value, before any cryptography ran.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The bytes do not start like an envelope value (for example legacy plaintext).
    #[error(
        "not an envelope value (legacy plaintext? enable the column's migration window while `envelope encrypt` runs)"
    )]
    NotEnvelope,

    /// The bytes are PostgreSQL's hex text of an envelope value (`\x01...`): the value was
    /// bound as `bytea` into a `TEXT`/`VARCHAR` column, which the server accepted by casting
    /// it to text. The column must be `BYTEA` for `Encrypted` (or use `EncryptedText`).
    #[error(
        "the value is PostgreSQL's hex text of an envelope value (\\x01...): the column is TEXT or VARCHAR, but Encrypted needs BYTEA; convert it with `ALTER TABLE .. ALTER COLUMN .. TYPE bytea USING decode(substr(col, 3), 'hex')`, or declare the field EncryptedText for a text column"
    )]
    HexText,

    /// The value was written by a newer format version.
    #[error(
        "value uses envelope format version {0}, which this build does not support; upgrade envelope"
    )]
    UnsupportedVersion(u8),

    /// The value names an algorithm this build does not know.
    #[error("value uses algorithm id {0}, which this build does not support; upgrade envelope")]
    UnknownAlgorithm(u8),

    /// The value ends before its header, length or tag is complete.
    #[error("envelope value is truncated: {len} bytes, at least {needed} needed")]
    Truncated {
        /// The value's length.
        len: usize,
        /// The least length the header promises.
        needed: usize,
    },

    /// The value continues past the end its length field declares.
    #[error("envelope value has {extra} trailing bytes after its tag")]
    TrailingBytes {
        /// How many bytes follow the tag.
        extra: usize,
    },

    /// The ciphertext length field is not a minimal LEB128 number within the format's limit.
    #[error("envelope value has a malformed length field")]
    MalformedLength,

    /// A text-form value carries the prefix but its body is not canonical padded base64.
    #[error("text-form envelope value is not valid base64 after its prefix")]
    MalformedText,
}

impl FormatError {
    /// A short, stable name for the variant, as used by the test vectors.
    pub fn name(&self) -> &'static str {
        match self {
            FormatError::NotEnvelope => "NotEnvelope",
            FormatError::HexText => "HexText",
            FormatError::UnsupportedVersion(_) => "UnsupportedVersion",
            FormatError::UnknownAlgorithm(_) => "UnknownAlgorithm",
            FormatError::Truncated { .. } => "Truncated",
            FormatError::TrailingBytes { .. } => "TrailingBytes",
            FormatError::MalformedLength => "MalformedLength",
            FormatError::MalformedText => "MalformedText",
        }
    }
}

/// What kind of failure a KMS reported; drives retries and what the user is told to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KmsErrorKind {
    /// The KMS could not be reached, or the connection failed mid-call.
    Network,
    /// The call did not finish in time.
    Timeout,
    /// The KMS is rate limiting this account or caller.
    Throttled,
    /// Credentials, signature or permission were refused.
    Auth,
    /// The master key exists but is disabled.
    KeyDisabled,
    /// The master key does not exist (or this provider does not hold it).
    KeyNotFound,
    /// The master key is scheduled for deletion.
    KeyPendingDeletion,
    /// The master key version that wrapped this key may no longer decrypt (Vault/OpenBao's
    /// `min_decryption_version` was raised past it).
    KeyVersionDisallowed,
    /// The wrapped key cannot be decrypted: wrong master key, wrong encryption context, or corrupt.
    InvalidCiphertext,
    /// The request was malformed or had a bad parameter.
    InvalidRequest,
    /// The KMS failed internally or is temporarily unavailable.
    Unavailable,
    /// The KMS answered with something this client cannot use.
    InvalidResponse,
    /// Anything else the provider reported.
    Other,
}

impl KmsErrorKind {
    /// Whether a call that failed this way may succeed if sent again.
    pub fn is_retryable(self) -> bool {
        match self {
            KmsErrorKind::Network
            | KmsErrorKind::Timeout
            | KmsErrorKind::Throttled
            | KmsErrorKind::Unavailable => true,
            KmsErrorKind::Auth
            | KmsErrorKind::KeyDisabled
            | KmsErrorKind::KeyNotFound
            | KmsErrorKind::KeyPendingDeletion
            | KmsErrorKind::KeyVersionDisallowed
            | KmsErrorKind::InvalidCiphertext
            | KmsErrorKind::InvalidRequest
            | KmsErrorKind::InvalidResponse
            | KmsErrorKind::Other => false,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            KmsErrorKind::Network => "network error (check the endpoint and connectivity)",
            KmsErrorKind::Timeout => "timed out",
            KmsErrorKind::Throttled => "throttled (request rate above the account's limit)",
            KmsErrorKind::Auth => "authentication refused (check the credentials and clock)",
            KmsErrorKind::KeyDisabled => "master key is disabled (enable it in the KMS)",
            KmsErrorKind::KeyNotFound => "master key not found (check the CMK id and region)",
            KmsErrorKind::KeyPendingDeletion => {
                "master key is pending deletion (cancel the deletion in the KMS)"
            }
            KmsErrorKind::KeyVersionDisallowed => {
                "the master key version that wrapped this key may no longer decrypt (lower the key's min_decryption_version, then run `envelope keys rewrap` before raising it again)"
            }
            KmsErrorKind::InvalidCiphertext => {
                "wrapped key cannot be decrypted (wrong master key, wrong encryption context, or corrupt)"
            }
            KmsErrorKind::InvalidRequest => "request rejected as invalid",
            KmsErrorKind::Unavailable => "service unavailable",
            KmsErrorKind::InvalidResponse => "unusable response",
            KmsErrorKind::Other => "error",
        }
    }
}

/// A failed KMS call: which provider, what kind of failure, and the provider's own code and
/// request id when it sent them.
#[derive(Clone, Debug)]
pub struct KmsError {
    provider: Cow<'static, str>,
    kind: KmsErrorKind,
    // Boxed so that `Result<_, Error>` stays small on the hot paths that never fail.
    details: Box<KmsErrorDetails>,
}

#[derive(Clone, Debug, Default)]
struct KmsErrorDetails {
    code: Option<String>,
    request_id: Option<String>,
    message: Option<String>,
    /// The provider's own error, as `source()`: shared, so that the error stays `Clone`.
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

impl KmsError {
    /// A new error of `kind` from `provider`.
    pub fn new(provider: impl Into<Cow<'static, str>>, kind: KmsErrorKind) -> Self {
        KmsError {
            provider: provider.into(),
            kind,
            details: Box::default(),
        }
    }

    /// Attach the provider's error code (for example `ResourceUnavailable.CmkDisabled`).
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.details.code = Some(code.into());
        self
    }

    /// Attach the provider's request id.
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.details.request_id = Some(request_id.into());
        self
    }

    /// Attach a human-readable detail. It must not contain key material or a response body.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.details.message = Some(message.into());
        self
    }

    /// Attach the provider's own error (an SDK's or an HTTP client's) as this error's
    /// [`source`](std::error::Error::source), as rustls's `Error::Other` carries a provider's
    /// error: a caller can downcast it, and [`Error::report`] prints it after this message.
    ///
    /// Its `Display` is printed as it is, so it must name no key material and no response
    /// body: attach a transport or SDK error, never one built from what the KMS sent back.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.details.source = Some(Arc::new(source));
        self
    }

    /// The provider's name.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The kind of failure.
    pub fn kind(&self) -> KmsErrorKind {
        self.kind
    }

    /// The provider's error code, if it sent one.
    pub fn code(&self) -> Option<&str> {
        self.details.code.as_deref()
    }

    /// The provider's request id, if it sent one.
    pub fn request_id(&self) -> Option<&str> {
        self.details.request_id.as_deref()
    }

    /// Whether the call may succeed if sent again.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

impl fmt::Display for KmsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kms {}: {}", self.provider, self.kind.describe())?;
        if let Some(code) = &self.details.code {
            write!(f, " [code {code}]")?;
        }
        if let Some(id) = &self.details.request_id {
            write!(f, " [request id {id}]")?;
        }
        if let Some(message) = &self.details.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for KmsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.details
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A failure of the key store (the key table).
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An insert collided with an existing row (same id, or a second live index key for a label).
    #[error("key store conflict: {0}")]
    Conflict(String),

    /// The key table holds a row that does not make sense (for example its KMS context names
    /// another key id): it was edited or copied by hand.
    #[error("key table row for key {key_id} is inconsistent: {reason}")]
    Corrupt {
        /// The row's key id.
        key_id: KeyId,
        /// What is wrong with it.
        reason: String,
    },

    /// The row to update does not exist.
    #[error("key {0} is not in the key table")]
    NotFound(KeyId),

    /// The key table itself does not exist in the store's database.
    #[error(
        "the key table `{table}` does not exist: create it with the key store's create_table(), the migrations shipped in envelope-sqlx or envelope-diesel, or `envelope init`"
    )]
    MissingTable {
        /// The table the store was configured with.
        table: String,
    },

    /// The backing database failed; the database's error is the source.
    #[error("the key store's database failed")]
    Backend(#[source] Arc<dyn std::error::Error + Send + Sync + 'static>),
}

impl StoreError {
    /// Wrap a backend error.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Arc::new(e))
    }

    /// Whether the same call may succeed if made again later: only when the database failed
    /// ([`StoreError::Backend`]). A conflict, a corrupt or missing row and a missing table stay
    /// until someone acts.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Backend(_) => true,
            StoreError::Conflict(_)
            | StoreError::Corrupt { .. }
            | StoreError::NotFound(_)
            | StoreError::MissingTable { .. } => false,
        }
    }
}

/// The message of [`Unavailable::WriteKey`]: what follows from its cause, without repeating the
/// cause (that is its `source()`).
fn write_key_message(scope: &str, cause: &Error) -> String {
    match cause {
        Error::Kms(_) | Error::Unavailable(Unavailable::Timeout { .. }) => format!(
            "no usable data key for writes in scope '{scope}': a new one could not be made; reads of cached keys go on, writes resume when the KMS answers"
        ),
        _ => {
            format!("no usable data key for writes in scope '{scope}': a new one could not be made")
        }
    }
}

/// Shorthand for `Result<T, envelope_core::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync_static<T: Send + Sync + 'static>() {}

    #[test]
    fn errors_travel_through_boxed_errors() {
        assert_send_sync_static::<Error>();
        // Hot paths return Result<_, Error>; keep it small.
        assert!(
            std::mem::size_of::<Error>() <= 64,
            "{}",
            std::mem::size_of::<Error>()
        );
        let key_id = KeyId::from_bytes([0xab; KeyId::LEN]);
        let decrypt = Error::Decrypt { key_id };
        // The key id is not secret and lets an operator find the row.
        assert!(decrypt.to_string().contains(&key_id.to_hex()), "{decrypt}");
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(decrypt);
        assert!(matches!(
            boxed.downcast_ref::<Error>(),
            Some(Error::Decrypt { .. })
        ));
    }

    #[test]
    fn kms_error_display_names_code_and_request_id() {
        let e = KmsError::new("tencent", KmsErrorKind::KeyDisabled)
            .with_code("ResourceUnavailable.CmkDisabled")
            .with_request_id("abc-123");
        let s = e.to_string();
        assert!(s.contains("tencent"), "{s}");
        assert!(s.contains("ResourceUnavailable.CmkDisabled"), "{s}");
        assert!(s.contains("abc-123"), "{s}");
        assert!(!e.is_retryable());
        assert!(KmsError::new("x", KmsErrorKind::Throttled).is_retryable());
    }

    #[test]
    fn kms_error_carries_the_providers_error_as_its_source() {
        let sdk = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let e = Error::Kms(
            KmsError::new("aws", KmsErrorKind::Network)
                .with_request_id("r-1")
                .with_source(sdk),
        );
        // The message stays the KMS error's own; the provider's error is the cause.
        assert!(!e.to_string().contains("connection reset"), "{e}");
        let cause = std::error::Error::source(&e).expect("a source");
        let io = cause
            .downcast_ref::<std::io::Error>()
            .expect("the provider's error, downcastable");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
        let report = e.report().to_string();
        assert!(
            report.starts_with("kms aws: network error") && report.ends_with(": connection reset"),
            "{report}"
        );
        // Clones share the source, and the kind still decides retries.
        let copy = e.clone();
        assert!(std::error::Error::source(&copy).is_some());
        assert!(copy.is_retryable());
        // Without one there is no source.
        let bare = KmsError::new("aws", KmsErrorKind::Network);
        assert!(std::error::Error::source(&bare).is_none());
    }

    fn io() -> Arc<std::io::Error> {
        Arc::new(std::io::Error::other("io"))
    }

    fn kms(kind: KmsErrorKind) -> Error {
        Error::Kms(KmsError::new("test", kind))
    }

    fn misuse(m: Misuse) -> Error {
        Error::Misuse(m)
    }

    fn system(s: SystemError) -> Error {
        Error::System(s)
    }

    fn write_key(cause: Error) -> Error {
        Error::Unavailable(Unavailable::WriteKey {
            scope: "s".into(),
            cause: Box::new(cause),
        })
    }

    /// Every variant and sub-variant, with its category and whether it is retryable.
    fn every_error() -> Vec<(Error, Category, bool)> {
        use Category::{Deployment, Program, Service, Value};
        let key_id = KeyId::from_bytes([7; KeyId::LEN]);
        let mut all = vec![
            (Error::Decrypt { key_id }, Value, false),
            (Error::UnknownKey { key_id }, Value, false),
            (
                Error::KeyKindMismatch {
                    key_id,
                    expected: KeyKind::Data,
                    found: KeyKind::Index,
                },
                Value,
                false,
            ),
            (
                Error::ScopeMismatch {
                    key_id,
                    expected: "a".into(),
                    found: "b".into(),
                },
                Value,
                false,
            ),
            (
                Error::PlaintextType {
                    expected: "u64",
                    detail: "d".into(),
                },
                Value,
                false,
            ),
            (
                Error::PlaintextEncode {
                    ty: "AsJson<T>",
                    detail: "d".into(),
                },
                Value,
                false,
            ),
            (
                Error::Store(StoreError::Conflict("c".into())),
                Service,
                false,
            ),
            (
                Error::Store(StoreError::Corrupt {
                    key_id,
                    reason: "r".into(),
                }),
                Service,
                false,
            ),
            (Error::Store(StoreError::NotFound(key_id)), Service, false),
            (
                Error::Store(StoreError::MissingTable { table: "t".into() }),
                Service,
                false,
            ),
            (Error::Store(StoreError::Backend(io())), Service, true),
            (
                Error::Unavailable(Unavailable::Timeout {
                    waited: Duration::from_secs(1),
                    what: "w".into(),
                }),
                Service,
                true,
            ),
            (
                Error::Unavailable(Unavailable::KeysUsedUp { scope: "s".into() }),
                Service,
                true,
            ),
            (Error::Unavailable(Unavailable::ShutDown), Service, false),
            (write_key(kms(KmsErrorKind::Network)), Service, true),
            (write_key(kms(KmsErrorKind::KeyDisabled)), Service, false),
            (
                write_key(Error::Store(StoreError::Backend(io()))),
                Service,
                true,
            ),
            (
                write_key(Error::config("CMK", "missing")),
                Deployment,
                false,
            ),
            (
                write_key(system(SystemError::Random("r".into()))),
                Program,
                false,
            ),
            (
                Error::MasterKeyMissing(Box::new(MasterKeyMissing {
                    provider: "local".into(),
                    keys: 1,
                    wanted: vec!["a".into()],
                    held: "b".into(),
                    origin: "o".into(),
                })),
                Deployment,
                false,
            ),
            (Error::config("setting", "problem"), Deployment, false),
            (
                Error::Config(ConfigError::new("f", "p").with_io(std::io::Error::other("io"))),
                Deployment,
                false,
            ),
            (
                misuse(Misuse::PlaintextTooLarge { len: 2, max: 1 }),
                Value,
                false,
            ),
            (misuse(Misuse::BlindIndex("not UTF-8")), Value, false),
            (misuse(Misuse::NoKeyring), Program, false),
            (misuse(Misuse::BridgeReentrant), Program, false),
            (
                misuse(Misuse::ForkedProcess { built_in: 1 }),
                Program,
                false,
            ),
            (
                misuse(Misuse::InvalidName {
                    what: "scope",
                    value: "".into(),
                    reason: "r",
                }),
                Program,
                false,
            ),
            (
                misuse(Misuse::Policy {
                    field: "f",
                    problem: "p".into(),
                }),
                Program,
                false,
            ),
            (misuse(Misuse::Builder("b".into())), Program, false),
            (
                misuse(Misuse::KeyLength {
                    expected: 32,
                    len: 1,
                }),
                Program,
                false,
            ),
            (system(SystemError::Random("r".into())), Program, false),
            (
                system(SystemError::Thread {
                    what: "w".into(),
                    source: io(),
                }),
                Program,
                false,
            ),
            (system(SystemError::ForkHandler("f".into())), Program, false),
            (
                system(SystemError::HttpClient { detail: "d".into() }),
                Program,
                false,
            ),
            (
                system(SystemError::File {
                    path: "p".into(),
                    action: "write",
                    source: io(),
                }),
                Program,
                false,
            ),
            (system(SystemError::Internal("i")), Program, false),
            (system(SystemError::Crypto("c")), Program, false),
        ];
        for f in [
            FormatError::NotEnvelope,
            FormatError::HexText,
            FormatError::UnsupportedVersion(9),
            FormatError::UnknownAlgorithm(9),
            FormatError::Truncated { len: 1, needed: 2 },
            FormatError::TrailingBytes { extra: 1 },
            FormatError::MalformedLength,
            FormatError::MalformedText,
        ] {
            all.push((Error::Format(f), Value, false));
        }
        for (kind, retryable) in [
            (KmsErrorKind::Network, true),
            (KmsErrorKind::Timeout, true),
            (KmsErrorKind::Throttled, true),
            (KmsErrorKind::Unavailable, true),
            (KmsErrorKind::Auth, false),
            (KmsErrorKind::KeyDisabled, false),
            (KmsErrorKind::KeyNotFound, false),
            (KmsErrorKind::KeyPendingDeletion, false),
            (KmsErrorKind::KeyVersionDisallowed, false),
            (KmsErrorKind::InvalidCiphertext, false),
            (KmsErrorKind::InvalidRequest, false),
            (KmsErrorKind::InvalidResponse, false),
            (KmsErrorKind::Other, false),
        ] {
            all.push((kms(kind), Service, retryable));
        }
        all
    }

    #[test]
    fn every_error_has_its_category_and_retryability() {
        for (e, category, retryable) in every_error() {
            let name = e.name();
            assert_eq!(e.category(), category, "{name}: {}", e.report());
            assert_eq!(e.is_retryable(), retryable, "{name}: {}", e.report());
        }
    }

    #[test]
    fn only_service_errors_are_retryable() {
        for (e, _, _) in every_error() {
            if e.is_retryable() {
                assert_eq!(e.category(), Category::Service, "{}", e.report());
            }
        }
    }

    #[test]
    fn category_names_are_stable() {
        let names: Vec<String> = [
            Category::Value,
            Category::Service,
            Category::Deployment,
            Category::Program,
        ]
        .iter()
        .map(|c| c.to_string())
        .collect();
        assert_eq!(names, ["value", "service", "deployment", "program"]);
    }

    #[test]
    fn a_misuse_is_named_by_its_case_so_scripts_can_tell_them_apart() {
        let names: Vec<&str> = every_error()
            .iter()
            .filter(|(e, _, _)| matches!(e, Error::Misuse(_)))
            .map(|(e, _, _)| e.name())
            .collect();
        assert!(names.contains(&"PlaintextTooLarge"), "{names:?}");
        assert!(names.contains(&"BlindIndex"), "{names:?}");
        assert!(!names.contains(&"Misuse"), "{names:?}");
    }
}
