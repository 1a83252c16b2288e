//! `envelope`: the operator's command.
//!
//! This release has `keygen` (create a local master key file) and `inspect` (read a stored
//! value's header without decrypting it). Migrations (`encrypt`, `rotate`, `keys rewrap`,
//! `verify`) and the KMS emulator follow in later releases.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use envelope_core::{LocalKms, format};

#[derive(Parser, Debug)]
#[command(
    name = "envelope",
    version,
    about = "KMS envelope encryption for database columns"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
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
