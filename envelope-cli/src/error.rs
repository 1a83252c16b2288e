//! How a command fails, and the one place that decides each failure's exit code (rage's
//! `error.rs`): the causes stay typed, with their sources, until `main` prints them.

use std::fmt;

use envelope_core::{Category, StoreError};

use crate::config::ConfigError;
use crate::db::DbError;
use crate::engine::Stop;

/// The exit codes, as `envelope --help` lists them.
pub(crate) mod code {
    /// Values that fail, plaintext left, or values or keys left untouched.
    pub(crate) const FINDINGS: u8 = 1;
    /// Bad usage or configuration: nothing was written.
    pub(crate) const USAGE: u8 = 2;
    /// The database or the KMS cannot be reached.
    pub(crate) const UNAVAILABLE: u8 = 3;
    /// SIGINT or SIGTERM: the current batch was committed.
    pub(crate) const INTERRUPTED: u8 = 130;
}

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The command line asks for something that cannot be done, or the configuration does not
    /// fit the database; nothing was written.
    Usage(String),
    /// `envelope.toml` (or an override) is wrong.
    Config(ConfigError),
    /// The database cannot be connected to.
    Connect(DbError),
    /// A statement failed: the database is unreachable, or it refused the command's SQL.
    Db(DbError),
    /// envelope-core failed while `doing` something: the error's [`Category`] decides.
    Core {
        /// What the command was doing.
        doing: String,
        /// Core's error, with its chain.
        error: envelope_core::Error,
    },
    /// The key table failed while `doing` something.
    Store {
        /// What the command was doing.
        doing: String,
        /// The store's error.
        error: StoreError,
    },
    /// The database or the KMS kept failing for longer than `--patience`.
    Unavailable(String),
    /// Values that fail, plaintext left, or values or keys left untouched.
    Findings(String),
    /// SIGINT or SIGTERM.
    Interrupted,
}

impl Failure {
    /// envelope-core's `error`, met while `doing` something.
    pub(crate) fn core(doing: impl Into<String>, error: envelope_core::Error) -> Failure {
        Failure::Core {
            doing: doing.into(),
            error,
        }
    }

    /// The key table's `error`, met while `doing` something.
    pub(crate) fn store(doing: impl Into<String>, error: StoreError) -> Failure {
        Failure::Store {
            doing: doing.into(),
            error,
        }
    }

    /// The process exit code: decided here, and nowhere else.
    pub(crate) fn code(&self) -> u8 {
        match self {
            Failure::Usage(_) | Failure::Config(_) => code::USAGE,
            Failure::Connect(e) => match e.source {
                sqlx::Error::Configuration(_) => code::USAGE,
                _ => code::UNAVAILABLE,
            },
            Failure::Db(e) if e.is_unreachable() => code::UNAVAILABLE,
            Failure::Db(_) => code::USAGE,
            Failure::Core { error, .. } => core_code(error),
            Failure::Store { error, .. } => match error {
                StoreError::Backend(_) => code::UNAVAILABLE,
                StoreError::MissingTable { .. } => code::USAGE,
                _ => code::FINDINGS,
            },
            Failure::Unavailable(_) => code::UNAVAILABLE,
            Failure::Findings(_) => code::FINDINGS,
            Failure::Interrupted => code::INTERRUPTED,
        }
    }
}

/// A core error ends the command with 2 when the deployment or the program must change (a
/// setting, a master key, the API's use), and with 3 otherwise: the services failed, or a
/// value met outside a migration's row (which only a damaged key table produces).
fn core_code(error: &envelope_core::Error) -> u8 {
    match error.category() {
        Category::Deployment => code::USAGE,
        Category::Program if matches!(error, envelope_core::Error::Misuse(_)) => code::USAGE,
        _ => code::UNAVAILABLE,
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Unavailable(m) | Failure::Findings(m) => f.write_str(m),
            Failure::Config(e) => write!(f, "{e}"),
            Failure::Connect(e) if self.code() == code::USAGE => write!(f, "{e}"),
            Failure::Connect(e) => write!(
                f,
                "{e} (check database_url, and that the server is running)"
            ),
            Failure::Db(e) if e.is_unreachable() => write!(
                f,
                "{e} (is the database running, and is database_url right?)"
            ),
            Failure::Db(e) => write!(f, "{e}"),
            Failure::Core { doing, error } => write!(f, "{doing}: {}", error.report()),
            Failure::Store { doing, error } => write!(f, "{doing}: {error}"),
            Failure::Interrupted => f.write_str(
                "interrupted: the last batch was committed and checkpointed; run the same command again to resume",
            ),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Failure::Config(e) => Some(e),
            Failure::Connect(e) | Failure::Db(e) => Some(&e.source),
            Failure::Core { error, .. } => Some(error),
            Failure::Store { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Self {
        Failure::Db(e)
    }
}

impl From<Stop> for Failure {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Interrupted => Failure::Interrupted,
            Stop::Unavailable(m) => Failure::Unavailable(m),
            Stop::Failed(m) => Failure::Findings(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use envelope_core::{ConfigError as CoreConfig, Error, KmsError, KmsErrorKind};

    use super::*;

    #[test]
    fn each_failure_has_its_documented_exit_code() {
        let core = |e| Failure::core("doing", e).code();
        assert_eq!(core(Error::Config(CoreConfig::new("kms", "bad"))), 2);
        assert_eq!(
            core(Error::Kms(KmsError::new(
                "tencent",
                KmsErrorKind::Throttled
            ))),
            3
        );
        let store = |e| Failure::store("doing", e).code();
        assert_eq!(store(StoreError::Conflict("raced".into())), 1);
        assert_eq!(
            store(StoreError::MissingTable {
                table: "envelope_keys".into()
            }),
            2
        );
        assert_eq!(Failure::Usage(String::new()).code(), 2);
        assert_eq!(Failure::Unavailable(String::new()).code(), 3);
        assert_eq!(Failure::Findings(String::new()).code(), 1);
        assert_eq!(Failure::Interrupted.code(), 130);
        let db = |source| DbError {
            context: "reading".into(),
            source,
        };
        assert_eq!(Failure::Db(db(sqlx::Error::PoolTimedOut)).code(), 3);
        assert_eq!(Failure::Db(db(sqlx::Error::RowNotFound)).code(), 2);
        assert_eq!(
            Failure::Connect(db(sqlx::Error::Configuration("bad url".into()))).code(),
            2
        );
        assert_eq!(Failure::Connect(db(sqlx::Error::PoolTimedOut)).code(), 3);
    }
}
