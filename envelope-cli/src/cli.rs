//! The command line: clap's types and their value parsers, nothing else (sqlx-cli's `opt.rs`,
//! rage's `cli.rs`). What each command does lives in `cmd/`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use envelope_core::{KeyId, SecretString};

use crate::config;

pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0    done
  1    values that fail to open, plaintext left where encryption is declared (verify), or
       values left untouched because they fail (encrypt, decrypt, rotate)
  2    bad usage or configuration (nothing was written)
  3    the database or the KMS cannot be reached
  130  interrupted by SIGINT or SIGTERM (the current batch was committed; rerun to resume)

The configuration is envelope.toml (or --config PATH, or ENVELOPE_CONFIG); docs/MIGRATING.md is
the playbook for a live application.";

#[derive(Parser, Debug)]
#[command(
    name = "envelope",
    version,
    about = "KMS envelope encryption for database columns",
    after_help = EXIT_CODES
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: Global,
    #[command(subcommand)]
    pub(crate) command: Command,
}

// `Debug` by hand: the database URL can carry a password.
#[derive(Args)]
pub(crate) struct Global {
    /// The configuration file [default: envelope.toml]
    #[arg(long, global = true, env = "ENVELOPE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// The database URL (beats the file and DATABASE_URL). A password in it shows in the
    /// process list and the shell's history: prefer DATABASE_URL, or a password file or
    /// service the driver reads (~/.pgpass, ~/.my.cnf).
    #[arg(long, global = true)]
    pub(crate) database_url: Option<String>,
    /// The key URI: local://PATH, tencent://REGION/CMK_ID, aws://REGION/KEY_ID_OR_ARN or
    /// vault://HOST:PORT/MOUNT/KEY (beats the file and ENVELOPE_KMS).
    #[arg(long, global = true)]
    pub(crate) kms: Option<String>,
    /// Print JSON lines (progress events and a summary) instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

/// Flags of the commands that scan tables.
#[derive(Args, Debug, Clone)]
pub(crate) struct RunArgs {
    /// Only this table.
    #[arg(long)]
    pub(crate) table: Option<String>,
    /// Only this column (its `name` in the config).
    #[arg(long)]
    pub(crate) column: Option<String>,
    /// Rows per batch (one transaction each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub(crate) batch_size: u32,
    /// Adapt the batch size so that a batch's transaction takes about this long (e.g. 0.5s).
    #[arg(long, value_parser = duration)]
    pub(crate) chunk_time: Option<Duration>,
    /// At most this many rows per second, over all workers.
    #[arg(long)]
    pub(crate) max_rate: Option<f64>,
    /// Parallel workers, each on its own primary-key range.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) workers: u32,
    /// Take only ranges r with r mod N = i, so that N processes share one job: i/N.
    #[arg(long, value_parser = shard)]
    pub(crate) shard: Option<(u32, u32)>,
    /// A range whose worker has not checkpointed for this long is taken over by another.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub(crate) lease: Duration,
    /// Examine at most this many rows per column, then stop (the rest stays for the next run).
    #[arg(long)]
    pub(crate) limit: Option<u64>,
    /// Count what would change and write nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Keep retrying a failing database or KMS this long before giving up with exit code 3.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub(crate) patience: Duration,
    /// Integer primary keys are split into ranges of about this many keys.
    #[arg(long, default_value_t = 100_000, hide = true)]
    pub(crate) range_size: i64,
    /// Testing aid: sleep this long between a batch's read and its writes.
    #[arg(long, hide = true, value_parser = duration)]
    pub(crate) debug_pause_after_read: Option<Duration>,
    /// Benchmark baseline only: run the same job with the cryptography switched off, writing
    /// every value back as it was read. Only in a binary built with the `bench-baseline`
    /// feature.
    #[cfg(feature = "bench-baseline")]
    #[arg(long, hide = true)]
    pub(crate) debug_no_crypto: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

/// Parse a duration such as `500ms`, `0.5s`, `15s`, `10m`, `2h` or `30d`.
///
/// # Errors
/// A message naming the accepted units.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (for example 500ms, 0.5s, 10m, 2h, 30d)"))?;
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => return Err(format!("{s:?}: the unit is one of ms, s, m, h, d")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

fn shard(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("--shard takes i/N with 0 <= i < N, e.g. 0/3, not {s:?}");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (u32, u32) = (i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

#[derive(Subcommand, Debug)]
pub(crate) enum KeysCommand {
    /// Every key row: id, kind, scope, provider, CMK, created, retired.
    List {
        /// Only keys of this scope.
        #[arg(long)]
        scope: Option<String>,
        /// Also count the values of each configured column under each key.
        #[arg(long)]
        count: bool,
    },
    /// Rewrap every key under a new master key (no data row is read or written). Resumable.
    /// Every application must trust the new master key first (its kms or also_read, or
    /// KeyringBuilder::trust_cmk): a keyring unwraps keys only under master keys it was given.
    Rewrap {
        /// The new key URI: local://PATH, tencent://REGION/CMK_ID, aws://REGION/KEY_ID_OR_ARN
        /// or vault://HOST:PORT/MOUNT/KEY.
        #[arg(long)]
        to: String,
        /// Keep retrying a failing database or KMS this long before giving up with exit code 3.
        #[arg(long, default_value = "5m", value_parser = duration)]
        patience: Duration,
    },
    /// Stop new writes under keys (their values stay readable).
    #[command(group = clap::ArgGroup::new("which").required(true).multiple(true))]
    Retire {
        /// This key id (hex; repeatable).
        #[arg(long = "key", group = "which", value_parser = key_id)]
        keys: Vec<KeyId>,
        /// Every data key of this scope (a tenant).
        #[arg(long, group = "which")]
        scope: Option<String>,
        /// Every index key of this blind-index label.
        #[arg(long, group = "which")]
        label: Option<String>,
        /// Data keys created longer ago than this (e.g. 90d).
        #[arg(long, value_parser = duration, group = "which")]
        older_than: Option<Duration>,
    },
    /// Delete keys, making every value under them unreadable for good (crypto-shredding).
    /// Counts the values first; asks on a terminal, needs --yes elsewhere.
    #[command(group = clap::ArgGroup::new("which").required(true).multiple(true))]
    Shred {
        /// This key id (hex; repeatable).
        #[arg(long = "key", group = "which", value_parser = key_id)]
        keys: Vec<KeyId>,
        /// Every data key of this scope (a tenant).
        #[arg(long, group = "which")]
        scope: Option<String>,
        /// Every index key of this blind-index label.
        #[arg(long, group = "which")]
        label: Option<String>,
        /// Confirm without asking.
        #[arg(long)]
        yes: bool,
        /// Shred keys that are not retired, or were retired less than --key-refresh ago:
        /// only when every process that could write under them is gone.
        #[arg(long)]
        force: bool,
        /// The applications' Policy::key_refresh: how long after a retirement they may still
        /// write under the key.
        #[arg(long, default_value = "60s", value_parser = duration)]
        key_refresh: Duration,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create the key table and the job table (idempotent), and check that the KMS answers.
    Init,
    /// Encrypt every plaintext value of the configured columns (in place, or from `source`),
    /// with their blind indexes. Resumable; safe beside the application's writes.
    Encrypt {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Decrypt the configured columns back to plaintext (in place, or into `source`).
    Decrypt {
        #[command(flatten)]
        run: RunArgs,
        /// Confirm: this removes the encryption of the selected columns.
        #[arg(long)]
        yes: bool,
    },
    /// Re-encrypt values under a new data key; afterwards no value refers to the rotated keys.
    /// With no selector every key but the new one is rotated. With --index, rotate a blind
    /// index's key instead, without a moment where lookups miss.
    Rotate {
        #[command(flatten)]
        run: RunArgs,
        /// Rotate values under this key id (hex; repeatable).
        #[arg(long = "key", conflicts_with = "index", value_parser = key_id)]
        keys: Vec<KeyId>,
        /// Rotate values under keys created longer ago than this (e.g. 30d).
        #[arg(long, value_parser = duration, conflicts_with = "index")]
        older_than: Option<Duration>,
        /// Rotate values under retired keys.
        #[arg(long, conflicts_with = "index")]
        retired: bool,
        /// Rotate the blind-index key of this column (TABLE.COLUMN): make a new index key,
        /// recompute every row's index, delete the old key. Lookups must use
        /// `BlindIndex::probes` (every live index key) to find rows throughout.
        #[arg(long, value_name = "TABLE.COLUMN")]
        index: Option<String>,
        /// With --index: how long running applications take to notice key-table changes (their
        /// Policy::key_refresh); rows are recomputed only after this has passed.
        #[arg(long, default_value = "60s", value_parser = duration, requires = "index")]
        key_refresh: Duration,
    },
    /// The key table: list keys, rewrap them under a new master key, retire or shred them.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Scan and report per column: values that open (per key id), plaintext, failures by error
    /// name. Exit 1 when any value fails or plaintext remains.
    Verify {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Values per key id per column, and the progress of running, finished or interrupted jobs.
    Status,
    /// Create a local KMS master key file (mode 0600). Refuses to overwrite an existing file.
    Keygen {
        /// Where to write the key.
        #[arg(long, default_value = "envelope-master.key")]
        out: PathBuf,
    },
    /// Show a stored value's header (format version, algorithm, key id, length) without
    /// decrypting it. VALUE is hex (optionally `\x`-prefixed, as psql prints bytea) or the text
    /// form (`ev1:...`).
    Inspect {
        /// The stored value.
        value: String,
    },
    /// Serve a local Tencent-compatible KMS (API 3.0, TC3-HMAC-SHA256) for development and
    /// tests. Point a Tencent provider at it with ENVELOPE_TENCENT_ENDPOINT=http://ADDR. It is
    /// not a KMS: it listens on loopback only unless --allow-remote, and its /_emulator/
    /// endpoints answer loopback clients only.
    KmsEmulator(EmulatorArgs),
}

/// `envelope kms-emulator`'s flags. The derived `Debug` shows no secret: the key and the token
/// are [`SecretString`]s.
#[derive(Args, Debug)]
pub(crate) struct EmulatorArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed). A loopback
    /// address unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1:9190")]
    pub(crate) listen: SocketAddr,
    /// Allow a --listen address other machines can reach (for example 0.0.0.0 in a
    /// container). Anyone who reaches it and holds the credentials can decrypt every blob.
    #[arg(long)]
    pub(crate) allow_remote: bool,
    /// The SecretId clients must sign with.
    #[arg(long, env = "ENVELOPE_EMULATOR_SECRET_ID")]
    pub(crate) secret_id: String,
    /// The SecretKey clients must sign with (prefer the environment variable: command lines
    /// are visible to other users).
    #[arg(
        long,
        env = "ENVELOPE_EMULATOR_SECRET_KEY",
        hide_env_values = true,
        value_parser = secret
    )]
    pub(crate) secret_key: SecretString,
    /// Require this X-TC-Token on every request.
    #[arg(
        long,
        env = "ENVELOPE_EMULATOR_SESSION_TOKEN",
        hide_env_values = true,
        value_parser = secret
    )]
    pub(crate) session_token: Option<SecretString>,
    /// Keep keys in this file (mode 0600) so a restart keeps old blobs readable. Without
    /// it every CMK, and every data key wrapped under one, is lost when the emulator stops.
    #[arg(long)]
    pub(crate) state: Option<PathBuf>,
    /// Answer this fraction of KMS calls (0 to 1) with InternalError.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) fail_rate: f64,
    /// Delay every KMS call by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub(crate) latency_ms: u64,
    /// Answer calls beyond this many per second with RequestLimitExceeded (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_qps: u32,
    /// Also act as a CVM instance with this CAM role: GET
    /// /latest/meta-data/cam/security-credentials/ROLE hands out temporary credentials that
    /// the emulator accepts until they expire.
    #[arg(long)]
    pub(crate) instance_role: Option<String>,
    /// How long each set of instance-role credentials lives.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub(crate) role_ttl: Duration,
}

/// A key id as `envelope keys list` prints it.
fn key_id(s: &str) -> Result<KeyId, String> {
    s.parse::<KeyId>().map_err(|_| {
        format!("{s:?} is not a key id (32 hex digits, as `envelope keys list` shows)")
    })
}

/// Parse a credential straight into a [`SecretString`], so no plain `String` copy outlives parsing.
fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::new(value))
}

impl std::fmt::Debug for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Global")
            .field("config", &self.config)
            .field(
                "database_url",
                &self.database_url.as_deref().map(config::redact_url),
            )
            .field("kms", &self.kms)
            .field("json", &self.json)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_the_arguments_never_shows_the_secret_key_or_token() {
        let cli = Cli::try_parse_from([
            "envelope",
            "kms-emulator",
            "--secret-id",
            "AKIDvisible",
            "--secret-key",
            "emulator-secret-key-value",
            "--session-token",
            "emulator-session-token-value",
        ])
        .unwrap();
        let dbg = format!("{cli:?}");
        assert!(dbg.contains("AKIDvisible"), "{dbg}");
        assert!(
            !dbg.contains("emulator-secret-key-value")
                && !dbg.contains("emulator-session-token-value"),
            "{dbg}"
        );
        assert!(dbg.contains("<redacted>"), "{dbg}");
        let cli = Cli::try_parse_from([
            "envelope",
            "--database-url",
            "postgres://app:hunter2@db/app",
            "status",
        ])
        .unwrap();
        let dbg = format!("{cli:?}");
        assert!(
            !dbg.contains("hunter2") && dbg.contains("app:<redacted>@db"),
            "{dbg}"
        );
    }

    #[test]
    fn the_benchmark_baseline_is_not_in_the_operators_binary() {
        let parsed = Cli::try_parse_from(["envelope", "encrypt", "--debug-no-crypto"]);
        assert_eq!(parsed.is_ok(), cfg!(feature = "bench-baseline"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
