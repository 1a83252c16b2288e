//! Shared by the CLI's database tests: a database to run `envelope` against (SQLite always;
//! PostgreSQL and MariaDB/MySQL when `ENVELOPE_TEST_POSTGRES_URL` / `ENVELOPE_TEST_MYSQL_URL`
//! are set), with its own master key, key table, job table and tables.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envelope_core::{Keyring, LocalKms};
use sqlx::AnyPool;

/// Which database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    MySql,
    Sqlite,
}

/// A database, a directory for the config and the master key, and unique table names.
pub struct Target {
    pub kind: Kind,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub suffix: String,
    pub pool: AnyPool,
}

impl Target {
    /// The database of `kind`, or `None` (announced as skipped) when its variable is unset.
    /// A set variable with an unreachable server fails the test.
    pub async fn new(kind: Kind) -> Option<Target> {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = match kind {
            Kind::Sqlite => format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display()),
            Kind::Postgres | Kind::MySql => {
                let var = if kind == Kind::Postgres {
                    "ENVELOPE_TEST_POSTGRES_URL"
                } else {
                    "ENVELOPE_TEST_MYSQL_URL"
                };
                match std::env::var(var) {
                    Ok(url) if !url.is_empty() => url,
                    _ => {
                        envelope_tests::skipped(&format!(
                            "{var} is not set: the CLI's {kind:?} tests did not run"
                        ));
                        return None;
                    }
                }
            }
        };
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{kind:?} at {url} is set but unreachable: {e}"));
        let suffix = envelope_core::KeyId::random().unwrap().to_hex()[..10].to_owned();
        let out = Command::new(env!("CARGO_BIN_EXE_envelope"))
            .args(["keygen", "--out"])
            .arg(dir.path().join("master.key"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Target {
            kind,
            url,
            dir,
            suffix,
            pool,
        })
    }

    /// A unique table name with this prefix.
    pub fn table(&self, prefix: &str) -> String {
        format!("{prefix}_{}", self.suffix)
    }

    pub fn key_table(&self) -> String {
        self.table("keys")
    }

    /// Write `envelope.toml` with these `[[table]]` entries.
    pub fn write_config(&self, tables: &str) -> PathBuf {
        let path = self.dir.path().join("envelope.toml");
        let text = format!(
            "database_url = {url:?}\nkms = \"local://{key}\"\nkey_table = \"{keys}\"\njob_table = \"{jobs}\"\n\n{tables}",
            url = self.url,
            key = self.dir.path().join("master.key").display(),
            keys = self.key_table(),
            jobs = self.table("jobs"),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_envelope"));
        c.arg("--config")
            .arg(self.dir.path().join("envelope.toml"))
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("ENVELOPE_DATABASE_URL")
            .env_remove("ENVELOPE_KMS")
            .env_remove("ENVELOPE_ALSO_READ")
            .stdin(Stdio::null());
        c
    }

    /// Run `envelope ARGS` to the end.
    pub fn envelope(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Run `envelope ARGS` with extra environment variables; require exit code `code`.
    pub fn expect_with_env(&self, args: &[&str], env: &[(&str, &str)], code: i32) -> String {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "envelope {args:?}\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Start `envelope ARGS` (stdout and stderr piped).
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Run and require exit code `code`; returns stdout.
    pub fn expect(&self, args: &[&str], code: i32) -> String {
        let out = self.envelope(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "envelope {args:?} on {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            self.kind
        );
        stdout
    }

    /// The JSON summary a `--json` run printed.
    pub fn summary(stdout: &str) -> serde_json::Value {
        stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "summary")
            .unwrap_or_else(|| panic!("no summary in {stdout}"))["summary"]
            .clone()
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The application's keyring: the same master key file and key table as the CLI.
    pub async fn keyring(&self) -> Keyring {
        let kms = Arc::new(LocalKms::open(self.dir.path().join("master.key")).unwrap());
        let url = self.url.clone();
        let table = self.key_table();
        let store = envelope_sqlx::key_store_for_url(&url, &table)
            .await
            .unwrap();
        tokio::task::spawn_blocking(move || Keyring::builder(kms, store).build().unwrap())
            .await
            .unwrap()
    }

    /// Rows examined so far by jobs whose name starts with `job_prefix` (`""`: every job).
    pub async fn rows_seen(&self, job_prefix: &str) -> i64 {
        let sum = match self.kind {
            Kind::Postgres => "CAST(COALESCE(SUM(rows_seen), 0) AS BIGINT)",
            Kind::MySql => "CAST(COALESCE(SUM(rows_seen), 0) AS SIGNED)",
            Kind::Sqlite => "COALESCE(SUM(rows_seen), 0)",
        };
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {sum} FROM {} WHERE job LIKE '{job_prefix}%'",
            self.table("jobs")
        )))
        .fetch_one(&self.pool)
        .await
        .unwrap_or(0)
    }

    /// Create `table (id BIGINT PRIMARY KEY, email <binary>)` holding `rows` plaintext
    /// e-mails `user{i}@example.com`.
    pub async fn plaintext_emails(&self, table: &str, rows: i64) {
        self.exec(&format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {})",
            self.blob()
        ))
        .await;
        let values: Vec<String> = (1..=rows)
            .map(|i| {
                format!(
                    "({i}, {})",
                    self.bytes_literal(format!("user{i}@example.com").as_bytes())
                )
            })
            .collect();
        for chunk in values.chunks(500) {
            self.exec(&format!("INSERT INTO {table} VALUES {}", chunk.join(", ")))
                .await;
        }
    }

    /// A hex literal of bytes in this dialect.
    pub fn bytes_literal(&self, b: &[u8]) -> String {
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        match self.kind {
            Kind::Postgres => format!("'\\x{hex}'::bytea"),
            _ => format!("X'{hex}'"),
        }
    }

    /// The binary column type.
    pub fn blob(&self) -> &'static str {
        match self.kind {
            Kind::Postgres => "BYTEA",
            Kind::MySql => "BLOB",
            Kind::Sqlite => "BLOB",
        }
    }

    /// A text column type.
    pub fn text(&self) -> &'static str {
        match self.kind {
            Kind::MySql => "TEXT",
            _ => "TEXT",
        }
    }

    /// Placeholder `n`.
    pub fn p(&self, n: usize) -> String {
        match self.kind {
            Kind::Postgres => format!("${n}"),
            _ => "?".into(),
        }
    }
}

/// What a reader loop saw while something changed under it (a blind-index rotation).
#[derive(Debug, Default)]
pub struct Lookups {
    made: AtomicU64,
    missed: AtomicU64,
}

impl Lookups {
    /// Count one lookup; `what` describes a miss.
    pub fn record(&self, hit: bool, what: impl FnOnce() -> String) {
        self.made.fetch_add(1, Ordering::Relaxed);
        if !hit {
            self.missed.fetch_add(1, Ordering::Relaxed);
            eprintln!("miss: {}", what());
        }
    }

    /// Enough lookups were made to mean something, and none missed.
    pub fn assert_none_missed(&self, at_least: u64) {
        let made = self.made.load(Ordering::Relaxed);
        assert!(
            made >= at_least,
            "only {made} lookups: too few to mean anything"
        );
        assert_eq!(
            self.missed.load(Ordering::Relaxed),
            0,
            "lookups missed ({made} made)"
        );
    }
}

/// A string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One `#[tokio::test]` per database for each `async fn NAME(kind: Kind)`: modules `sqlite`,
/// `postgres` and `mysql` (the last two skip loudly when their URL variable is unset).
#[allow(unused_macros)]
macro_rules! per_database {
    ($($test:ident),*) => {
        mod sqlite { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(Kind::Sqlite).await })* }
        mod postgres { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(Kind::Postgres).await })* }
        mod mysql { use super::*; $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $test() { super::$test(Kind::MySql).await })* }
    };
}
