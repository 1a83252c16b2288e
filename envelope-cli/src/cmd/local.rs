//! The commands that need no configuration: `keygen`, `inspect` and `kms-emulator`.

use std::io::Write as _;
use std::path::Path;

use envelope_core::{LocalKms, format};
use envelope_kms_emulator::{Emulator, EmulatorConfig, Faults, InstanceRole};

use crate::cli::EmulatorArgs;
use crate::error::Failure;

/// `envelope kms-emulator`: serve until killed.
pub(crate) fn kms_emulator(args: EmulatorArgs) -> Result<(), Failure> {
    let EmulatorArgs {
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
    } = args;
    if !(0.0..=1.0).contains(&fail_rate) {
        return Err(Failure::Usage(format!(
            "--fail-rate must be between 0 and 1, got {fail_rate}"
        )));
    }
    if secret_id.is_empty() || secret_key.is_empty() {
        return Err(Failure::Usage(
            "--secret-id and --secret-key must not be empty".into(),
        ));
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
    })
    .map_err(|e| Failure::Usage(e.to_string()))?;
    // Whoever started it may stop reading after the first line: a closed stdout must
    // not stop the emulator, so nothing here may panic on a write.
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

/// `envelope keygen`: a new local master key file.
pub(crate) fn keygen(out: &Path) -> Result<(), Failure> {
    let kms = LocalKms::create(out).map_err(|e| Failure::Usage(e.to_string()))?;
    println!("created {} (CMK id {})", out.display(), kms.cmk_id());
    println!(
        "keep it out of version control and database backups; without it, data under its keys cannot be read"
    );
    Ok(())
}

/// `envelope inspect`: a stored value's header, without decrypting it.
pub(crate) fn inspect(value: &str) -> Result<(), Failure> {
    let bytes = decode_value(value)?;
    let envelope = format::parse(&bytes).map_err(|e| Failure::Usage(e.to_string()))?;
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

/// The bytes of a value as psql shows it (hex, with or without `\\x`) or in its text form.
fn decode_value(value: &str) -> Result<Vec<u8>, Failure> {
    let value = value.trim();
    if value.starts_with(format::TEXT_PREFIX) {
        return format::from_text(value).map_err(|e| Failure::Usage(e.to_string()));
    }
    let hex_digits = value.strip_prefix("\\x").unwrap_or(value);
    hex::decode(hex_digits).map_err(|_| {
        Failure::Usage(
            "VALUE must be hex (as psql shows bytea, with or without \\x) or a text-form value starting with ev1:".to_owned(),
        )
    })
}
