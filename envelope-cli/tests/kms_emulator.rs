//! `envelope kms-emulator` as a developer starts it: loopback unless `--allow-remote` (with a
//! warning), and a start-up line that says whether its keys outlive it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_envelope");

/// An emulator process this test started; dropping it kills that pid.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Child::kill signals this child's pid only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Running {
    let mut child = Command::new(BIN)
        .arg("kms-emulator")
        .args(["--secret-id", "AKIDemulatorTest"])
        .args(args)
        .env("ENVELOPE_EMULATOR_SECRET_KEY", "emulatorTestSecretKey")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = mpsc::channel();
    let out = BufReader::new(child.stdout.take().unwrap());
    let err = BufReader::new(child.stderr.take().unwrap());
    for stream in [
        Box::new(out) as Box<dyn BufRead + Send>,
        Box::new(err) as Box<dyn BufRead + Send>,
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in stream.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    Running { child, lines }
}

impl Running {
    /// Every line (stdout and stderr) printed within `wait`, or until it exits.
    fn lines_within(&mut self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => return seen,
            }
        }
    }
}

#[test]
fn kms_emulator_refuses_an_address_other_machines_reach() {
    let mut e = start(&["--listen", "0.0.0.0:0"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = e.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still serving on 0.0.0.0 without --allow-remote: {:?}",
            e.lines_within(Duration::from_millis(100))
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = e.lines_within(Duration::from_secs(2)).join("\n");
    if let Some(mut err) = e.child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("--allow-remote"), "{text}");
}

#[test]
fn kms_emulator_with_allow_remote_serves_and_warns() {
    let mut e = start(&["--listen", "0.0.0.0:0", "--allow-remote"]);
    let text = e.lines_within(Duration::from_secs(3)).join("\n");
    assert!(
        text.contains("kms-emulator listening on http://0.0.0.0:"),
        "{text}"
    );
    assert!(text.contains("warning:"), "{text}");
    assert!(e.child.try_wait().unwrap().is_none(), "{text}");
}

#[test]
fn kms_emulator_says_whether_its_keys_survive_a_restart() {
    let mut e = start(&["--listen", "127.0.0.1:0"]);
    let text = e.lines_within(Duration::from_secs(3)).join("\n");
    assert!(text.contains("state file: none"), "{text}");
    assert!(text.contains("lost when the emulator stops"), "{text}");
    assert!(!text.contains("warning:"), "{text}");
    drop(e);

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("emulator.json");
    let mut e = start(&[
        "--listen",
        "127.0.0.1:0",
        "--state",
        state.to_str().unwrap(),
    ]);
    let text = e.lines_within(Duration::from_secs(3)).join("\n");
    assert!(
        text.contains(&format!("state file: {}", state.display())),
        "{text}"
    );
    assert!(text.contains("0 key(s) loaded"), "{text}");
}
