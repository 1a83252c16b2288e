//! The committed vectors, read by an independent Python implementation of FORMAT.md
//! (`docs/vectors/verify.py`, on pyca/cryptography). Runs when `ENVELOPE_TEST_PYTHON` names a
//! Python interpreter with `cryptography` installed (`.ci/run` sets it up); skipped otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn python_reader_agrees_with_every_vector() {
    let Some(python) = std::env::var_os("ENVELOPE_TEST_PYTHON") else {
        // Past the harness's output capture, so `cargo test` shows it.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED python_reader_agrees_with_every_vector: set ENVELOPE_TEST_PYTHON to a Python with `cryptography` (bash .ci/run does)"
        );
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(&python)
        .arg(root.join("docs/vectors/verify.py"))
        .arg(root.join("docs/vectors/v1"))
        .output()
        .expect("ENVELOPE_TEST_PYTHON is set but cannot be run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
