//! The `envelope` command's key and inspection subcommands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use envelope_core::{Keyring, Label, LocalKms, MemoryKeyStore, format};

fn envelope(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_envelope"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn keygen_creates_a_private_key_file_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    let p = path.to_str().unwrap();
    let out = envelope(&["keygen", "--out", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kms = LocalKms::open(&path).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(kms.cmk_id()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let before = std::fs::read(&path).unwrap();
    let again = envelope(&["keygen", "--out", p]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn inspect_reads_headers_without_keys() {
    let kms = LocalKms::from_key(envelope_core::KeyMaterial::generate().unwrap());
    let k = Keyring::builder(kms, MemoryKeyStore::new())
        .build()
        .unwrap();
    let label = Label::new("users.ssn").unwrap();
    let blob = k.blocking().encrypt(&label, b"078-05-1120").unwrap();
    let id = format::peek_key_id(&blob).unwrap().to_string();
    for value in [
        hex(&blob),
        format!("\\x{}", hex(&blob)),
        format::to_text(&blob),
    ] {
        let out = envelope(&["inspect", &value]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(&id), "{stdout}");
        assert!(stdout.contains("plaintext 11 bytes"), "{stdout}");
        assert!(!stdout.contains("078-05-1120"));
    }
    let out = envelope(&["inspect", "68656c6c6f"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an envelope value"));
    let out = envelope(&["inspect", "zz"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("VALUE must be hex"));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An AWS endpoint taken from the shared config file (`endpoint_url` in the profile) is held to
/// the same rule as one given in the configuration: plain http only to a loopback host. It used
/// to skip the check, and the CLI sent its requests (and took data keys) over plain http to
/// whatever host the file named.
#[test]
fn an_aws_endpoint_from_the_shared_config_file_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let aws_config = dir.path().join("aws-config");
    std::fs::write(
        &aws_config,
        "[default]\nendpoint_url = http://198.51.100.7:4566\n",
    )
    .unwrap();
    let config = dir.path().join("envelope.toml");
    std::fs::write(
        &config,
        format!(
            "database_url = \"sqlite://{}?mode=rwc\"\nkms = \"aws://us-east-1/alias/app\"\n",
            dir.path().join("app.db").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_envelope"))
        .arg("--config")
        .arg(&config)
        .arg("init")
        .env("AWS_CONFIG_FILE", &aws_config)
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
        .env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_KMS")
        .env_remove("AWS_PROFILE")
        .env_remove("ENVELOPE_KMS")
        .env_remove("DATABASE_URL")
        .env_remove("ENVELOPE_DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("198.51.100.7") && stderr.contains("plain http"),
        "{stderr}"
    );
}
