//! `envelope`: the operator's command.
//!
//! This release has `keygen` (create a local master key file), `inspect` (read a stored value's
//! header without decrypting it) and `kms-emulator` (a local Tencent-compatible KMS). Migrations
//! (`encrypt`, `rotate`, `keys rewrap`, `verify`) follow in later releases.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use envelope_cli::emulator::{Emulator, EmulatorConfig, Faults};
use envelope_core::{LocalKms, SecretString, format};

#[derive(Parser)]
#[command(
    name = "envelope",
    version,
    about = "KMS envelope encryption for database columns"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// No derived `Debug` here or on `Command`: the arguments hold the emulator's SecretKey and
// session token (see the hand-written impls below).
#[derive(Subcommand)]
enum Command {
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
    /// tests. Point a Tencent provider at it with ENVELOPE_TENCENT_ENDPOINT=http://ADDR.
    KmsEmulator {
        /// Address to listen on (port 0 picks a free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:9190")]
        listen: std::net::SocketAddr,
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
        /// Keep keys in this file (mode 0600) so a restart keeps old blobs readable.
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
    },
}

/// Parse a credential straight into a [`SecretString`], so no plain `String` copy outlives parsing.
fn secret(value: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::new(value))
}

impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cli")
            .field("command", &self.command)
            .finish()
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Keygen { out } => f.debug_struct("Keygen").field("out", out).finish(),
            Command::Inspect { value } => f.debug_struct("Inspect").field("value", value).finish(),
            Command::KmsEmulator {
                listen,
                secret_id,
                secret_key: _,
                session_token,
                state,
                fail_rate,
                latency_ms,
                max_qps,
            } => f
                .debug_struct("KmsEmulator")
                .field("listen", listen)
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
                .finish(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("envelope: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<(), String> {
    match command {
        Command::KmsEmulator {
            listen,
            secret_id,
            secret_key,
            session_token,
            state,
            fail_rate,
            latency_ms,
            max_qps,
        } => {
            if !(0.0..=1.0).contains(&fail_rate) {
                return Err(format!(
                    "--fail-rate must be between 0 and 1, got {fail_rate}"
                ));
            }
            if secret_id.is_empty() || secret_key.is_empty() {
                return Err("--secret-id and --secret-key must not be empty".into());
            }
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
            })?;
            println!("kms-emulator listening on {}", emulator.endpoint());
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
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
    }
}
