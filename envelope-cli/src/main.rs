//! `envelope`: the operator's command. Migrations over live tables (`init`, `encrypt`,
//! `decrypt`, `rotate`, `verify`, `status`, driven by `envelope.toml`), plus `keygen` (a local
//! master key file), `inspect` (a stored value's header) and `kms-emulator` (a local
//! Tencent-compatible KMS). docs/MIGRATING.md is the operator's playbook.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use envelope_cli::commands::{self, Failure, RotateSelection, RunOptions};
use envelope_cli::config::{self, Overrides};
use envelope_cli::engine::{Op, Settings};
use envelope_cli::keys;
use envelope_cli::report::Output;
use envelope_core::{KeyId, LocalKms, SecretString, format};
use envelope_kms_emulator::{Emulator, EmulatorConfig, Faults, InstanceRole};

const EXIT_CODES: &str = "\
Exit codes:
  0    done
  1    values that fail to open, plaintext left where encryption is declared (verify), or
       values left untouched because they fail (encrypt, decrypt, rotate)
  2    bad usage or configuration (nothing was written)
  3    the database or the KMS cannot be reached
  130  interrupted by SIGINT or SIGTERM (the current batch was committed; rerun to resume)

The configuration is envelope.toml (or --config PATH, or ENVELOPE_CONFIG); docs/MIGRATING.md is
the playbook for a live application.";

#[derive(Parser)]
#[command(
    name = "envelope",
    version,
    about = "KMS envelope encryption for database columns",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

// `Debug` by hand: the database URL can carry a password.
#[derive(Args)]
struct Global {
    /// The configuration file [default: envelope.toml]
    #[arg(long, global = true, env = "ENVELOPE_CONFIG")]
    config: Option<PathBuf>,
    /// The database URL (beats the file and DATABASE_URL). A password in it shows in the
    /// process list and the shell's history: prefer DATABASE_URL, or a password file or
    /// service the driver reads (~/.pgpass, ~/.my.cnf).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// The key URI: local://PATH or tencent://REGION/CMK_ID (beats the file and ENVELOPE_KMS).
    #[arg(long, global = true)]
    kms: Option<String>,
    /// Print JSON lines (progress events and a summary) instead of text.
    #[arg(long, global = true)]
    json: bool,
}

/// Flags of the commands that scan tables.
#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Only this table.
    #[arg(long)]
    table: Option<String>,
    /// Only this column (its `name` in the config).
    #[arg(long)]
    column: Option<String>,
    /// Rows per batch (one transaction each).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Adapt the batch size so that a batch's transaction takes about this long (e.g. 0.5s).
    #[arg(long, value_parser = duration)]
    chunk_time: Option<Duration>,
    /// At most this many rows per second, over all workers.
    #[arg(long)]
    max_rate: Option<f64>,
    /// Parallel workers, each on its own primary-key range.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    workers: u32,
    /// Take only ranges r with r mod N = i, so that N processes share one job: i/N.
    #[arg(long, value_parser = shard)]
    shard: Option<(u32, u32)>,
    /// A range whose worker has not checkpointed for this long is taken over by another.
    #[arg(long, default_value = "15s", value_parser = duration)]
    lease: Duration,
    /// Examine at most this many rows per column, then stop (the rest stays for the next run).
    #[arg(long)]
    limit: Option<u64>,
    /// Count what would change and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Keep retrying a failing database or KMS this long before giving up with exit code 3.
    #[arg(long, default_value = "5m", value_parser = duration)]
    patience: Duration,
    /// Integer primary keys are split into ranges of about this many keys.
    #[arg(long, default_value_t = 100_000, hide = true)]
    range_size: i64,
    /// Testing aid: sleep this long between a batch's read and its writes.
    #[arg(long, hide = true, value_parser = duration)]
    debug_pause_after_read: Option<Duration>,
    /// Benchmark baseline only: run the same job with the cryptography switched off, writing
    /// every value back as it was read. Only in a binary built with the `bench-baseline`
    /// feature.
    #[cfg(feature = "bench-baseline")]
    #[arg(long, hide = true)]
    debug_no_crypto: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    envelope_cli::parse_duration(s)
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
enum KeysCommand {
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
        /// The new key URI: local://PATH or tencent://REGION/CMK_ID.
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
        #[arg(long = "key", group = "which")]
        keys: Vec<String>,
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
        #[arg(long = "key", group = "which")]
        keys: Vec<String>,
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

fn key_ids(keys: &[String]) -> Result<Vec<KeyId>, Failure> {
    keys.iter()
        .map(|k| {
            k.parse::<KeyId>().map_err(|_| {
                Failure::Usage(format!(
                    "--key {k:?} is not a key id (32 hex digits, as `envelope keys list` shows)"
                ))
            })
        })
        .collect()
}

// No derived `Debug` here or on `Command`: the arguments hold the emulator's SecretKey and
// session token (see the hand-written impls below).
#[derive(Subcommand)]
enum Command {
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
        #[arg(long = "key", conflicts_with = "index")]
        keys: Vec<String>,
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
    KmsEmulator {
        /// Address to listen on (port 0 picks a free port; the address is printed). A loopback
        /// address unless --allow-remote.
        #[arg(long, default_value = "127.0.0.1:9190")]
        listen: std::net::SocketAddr,
        /// Allow a --listen address other machines can reach (for example 0.0.0.0 in a
        /// container). Anyone who reaches it and holds the credentials can decrypt every blob.
        #[arg(long)]
        allow_remote: bool,
        /// The SecretId clients must sign with.
        #[arg(long, env = "ENVELOPE_EMULATOR_SECRET_ID")]
        secret_id: String,
        /// The SecretKey clients must sign with (prefer the environment variable: command lines
        /// are visible to other users).
        #[arg(
            long,
            env = "ENVELOPE_EMULATOR_SECRET_KEY",
            hide_env_values = true,
            value_parser = secret
        )]
        secret_key: SecretString,
        /// Require this X-TC-Token on every request.
        #[arg(
            long,
            env = "ENVELOPE_EMULATOR_SESSION_TOKEN",
            hide_env_values = true,
            value_parser = secret
        )]
        session_token: Option<SecretString>,
        /// Keep keys in this file (mode 0600) so a restart keeps old blobs readable. Without
        /// it every CMK, and every data key wrapped under one, is lost when the emulator stops.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Answer this fraction of KMS calls (0 to 1) with InternalError.
        #[arg(long, default_value_t = 0.0)]
        fail_rate: f64,
        /// Delay every KMS call by this many milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Answer calls beyond this many per second with RequestLimitExceeded (0: no limit).
        #[arg(long, default_value_t = 0)]
        max_qps: u32,
        /// Also act as a CVM instance with this CAM role: GET
        /// /latest/meta-data/cam/security-credentials/ROLE hands out temporary credentials that
        /// the emulator accepts until they expire.
        #[arg(long)]
        instance_role: Option<String>,
        /// How long each set of instance-role credentials lives.
        #[arg(long, default_value = "1h", value_parser = duration)]
        role_ttl: Duration,
    },
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

impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cli")
            .field("global", &self.global)
            .field("command", &self.command)
            .finish()
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Init => f.write_str("Init"),
            Command::Status => f.write_str("Status"),
            Command::Encrypt { run } => f.debug_struct("Encrypt").field("run", run).finish(),
            Command::Decrypt { run, yes } => f
                .debug_struct("Decrypt")
                .field("run", run)
                .field("yes", yes)
                .finish(),
            Command::Rotate {
                run,
                keys,
                older_than,
                retired,
                index,
                key_refresh,
            } => f
                .debug_struct("Rotate")
                .field("run", run)
                .field("keys", keys)
                .field("older_than", older_than)
                .field("retired", retired)
                .field("index", index)
                .field("key_refresh", key_refresh)
                .finish(),
            Command::Keys { command } => f.debug_struct("Keys").field("command", command).finish(),
            Command::Verify { run } => f.debug_struct("Verify").field("run", run).finish(),
            Command::Keygen { out } => f.debug_struct("Keygen").field("out", out).finish(),
            Command::Inspect { value } => f.debug_struct("Inspect").field("value", value).finish(),
            Command::KmsEmulator {
                listen,
                allow_remote,
                secret_id,
                secret_key: _,
                session_token,
                state,
                fail_rate,
                latency_ms,
                max_qps,
                instance_role,
                role_ttl,
            } => f
                .debug_struct("KmsEmulator")
                .field("listen", listen)
                .field("allow_remote", allow_remote)
                .field("secret_id", secret_id)
                .field("secret_key", &"<redacted>")
                .field(
                    "session_token",
                    &session_token.as_ref().map(|_| "<redacted>"),
                )
                .field("state", state)
                .field("fail_rate", fail_rate)
                .field("latency_ms", latency_ms)
                .field("max_qps", max_qps)
                .field("instance_role", instance_role)
                .field("role_ttl", role_ttl)
                .finish(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::KmsEmulator { .. } | Command::Keygen { .. } | Command::Inspect { .. } => {
            run_local(cli.command).map_err(Failure::Usage)
        }
        command => run_database(cli.global, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("envelope: {failure}");
            ExitCode::from(failure.code())
        }
    }
}

/// The commands that work on the configured database.
fn run_database(global: Global, command: Command) -> Result<(), Failure> {
    let path = config::config_path(global.config.as_deref());
    let config = config::load(
        &path,
        Overrides {
            database_url: global.database_url,
            kms: global.kms,
        },
    )
    .map_err(|e| Failure::Usage(e.to_string()))?;
    let output = if global.json {
        Output::Json
    } else {
        Output::Human
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Unavailable(format!("starting the runtime: {e}")))?;
    runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        spawn_signal_handler(stop.clone(), output);
        let options = |run: RunArgs| {
            #[cfg(feature = "bench-baseline")]
            let no_crypto = run.debug_no_crypto;
            #[cfg(not(feature = "bench-baseline"))]
            let no_crypto = false;
            RunOptions {
            table: run.table,
            column: run.column,
            settings: Settings {
                batch: run.batch_size as usize,
                chunk_time: run.chunk_time,
                max_rate: run.max_rate.filter(|r| *r > 0.0),
                workers: run.workers as usize,
                shard: run.shard,
                lease: run.lease,
                limit: run.limit,
                dry_run: run.dry_run,
                patience: run.patience,
                range_rows: run.range_size.max(1),
                pause_after_read: run.debug_pause_after_read,
                no_crypto,
            },
            output,
        }
        };
        match command {
            Command::Init => commands::init(&config, &output).await,
            Command::Status => commands::status(&config, &output).await,
            Command::Encrypt { run } => commands::migrate(&config, Op::Encrypt, None, options(run), stop).await,
            Command::Verify { run } => commands::migrate(&config, Op::Verify, None, options(run), stop).await,
            Command::Decrypt { run, yes } => {
                if !yes && !run.dry_run {
                    return Err(Failure::Usage(
                        "decrypt writes plaintext back into the database: pass --yes to confirm (or --dry-run to count)".into(),
                    ));
                }
                commands::migrate(&config, Op::Decrypt, None, options(run), stop).await
            }
            Command::Rotate { run, index: Some(index), key_refresh, .. } => {
                keys::rotate_index(&config, &index, key_refresh, options(run), stop).await
            }
            Command::Rotate { run, keys, older_than, retired, .. } => {
                let keys = key_ids(&keys)?;
                let selection = RotateSelection { keys, older_than, retired };
                commands::migrate(&config, Op::Rotate(Arc::default()), Some(selection), options(run), stop).await
            }
            Command::Keys { command } => match command {
                KeysCommand::List { scope, count } => {
                    keys::list(&config, scope.as_deref(), count, &output).await
                }
                KeysCommand::Rewrap { to, patience } => {
                    keys::rewrap(&config, &to, patience, &output, stop).await
                }
                KeysCommand::Retire { keys, scope, label, older_than } => {
                    let selection = keys::Selection { keys: key_ids(&keys)?, scope, label, older_than };
                    keys::retire(&config, &selection, &output).await
                }
                KeysCommand::Shred { keys, scope, label, yes, force, key_refresh } => {
                    let selection = keys::Selection { keys: key_ids(&keys)?, scope, label, older_than: None };
                    let safety = keys::ShredSafety { yes, force, key_refresh };
                    keys::shred(&config, &selection, safety, &output).await
                }
            },
            Command::KmsEmulator { .. } | Command::Keygen { .. } | Command::Inspect { .. } => Ok(()),
        }
    })
}

/// SIGINT / SIGTERM: finish the current batch, checkpoint, exit 130. A second signal exits at
/// once (the uncommitted batch rolls back; the checkpoint still holds).
fn spawn_signal_handler(stop: Arc<AtomicBool>, output: Output) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
                if stop.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
                if output == Output::Human {
                    eprintln!(
                        "envelope: stopping after the current batch (signal again to stop at once)"
                    );
                }
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::SeqCst);
            }
        }
    });
}

/// The commands that need no configuration.
fn run_local(command: Command) -> Result<(), String> {
    match command {
        Command::KmsEmulator {
            listen,
            allow_remote,
            secret_id,
            secret_key,
            session_token,
            state,
            fail_rate,
            latency_ms,
            max_qps,
            instance_role,
            role_ttl,
        } => {
            if !(0.0..=1.0).contains(&fail_rate) {
                return Err(format!(
                    "--fail-rate must be between 0 and 1, got {fail_rate}"
                ));
            }
            if secret_id.is_empty() || secret_key.is_empty() {
                return Err("--secret-id and --secret-key must not be empty".into());
            }
            let serves_role = instance_role.is_some();
            let emulator = Emulator::start(EmulatorConfig {
                listen,
                secret_id,
                secret_key,
                session_token,
                state_file: state,
                faults: Faults {
                    fail_rate,
                    latency_ms,
                    max_qps,
                },
                instance_role: instance_role.map(|name| InstanceRole {
                    name,
                    ttl: role_ttl,
                }),
                allow_remote,
            })?;
            // Whoever started it may stop reading after the first line: a closed stdout must
            // not stop the emulator, so nothing here may panic on a write.
            use std::io::Write as _;
            let mut out = std::io::stdout();
            let _ = writeln!(out, "kms-emulator listening on {}", emulator.endpoint());
            let _ = out.flush();
            if !listen.ip().is_loopback() {
                eprintln!(
                    "warning: kms-emulator listens on {}, which other machines can reach \
                     (--allow-remote): it is not a KMS; anyone who reaches it with the \
                     credentials can decrypt every blob{}",
                    emulator.addr(),
                    if serves_role {
                        ", and the instance-role path hands credentials to anyone who asks"
                    } else {
                        ""
                    }
                );
            }
            let _ = match emulator.state_file() {
                Some(path) => writeln!(
                    out,
                    "kms-emulator state file: {} ({} key(s) loaded)",
                    path.display(),
                    emulator.key_count()
                ),
                None => writeln!(
                    out,
                    "kms-emulator state file: none (keys are kept in memory only: every CMK, and \
                     every data key wrapped under one, is lost when the emulator stops; \
                     use --state FILE to keep them)"
                ),
            };
            let _ = out.flush();
            emulator.wait();
            Ok(())
        }
        Command::Keygen { out } => {
            let kms = LocalKms::create(&out).map_err(|e| e.to_string())?;
            println!("created {} (CMK id {})", out.display(), kms.cmk_id());
            println!(
                "keep it out of version control and database backups; without it, data under its keys cannot be read"
            );
            Ok(())
        }
        Command::Inspect { value } => {
            let bytes = decode_value(&value)?;
            let envelope = format::parse(&bytes).map_err(|e| e.to_string())?;
            println!("format version: {}", envelope.version());
            println!("algorithm:      {} (AES-256-GCM)", envelope.algorithm());
            println!("key id:         {}", envelope.key_id());
            println!(
                "stored bytes:   {} (plaintext {} bytes)",
                bytes.len(),
                envelope.ciphertext_len()
            );
            Ok(())
        }
        _ => Err("not a local command".into()),
    }
}

fn decode_value(value: &str) -> Result<Vec<u8>, String> {
    let value = value.trim();
    if value.starts_with(format::TEXT_PREFIX) {
        return format::from_text(value).map_err(|e| e.to_string());
    }
    let hex_digits = value.strip_prefix("\\x").unwrap_or(value);
    hex::decode(hex_digits).map_err(|_| {
        "VALUE must be hex (as psql shows bytea, with or without \\x) or a text-form value starting with ev1:".to_owned()
    })
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
}
