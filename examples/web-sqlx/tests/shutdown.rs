//! The binary as an operator runs it: `--help`, and a SIGTERM that stops it cleanly and retires
//! the data key it made, so the key table does not collect keys of processes that are gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envelope_core::{KeyFilter, KeyKind, KeyStore};

const BIN: &str = env!("CARGO_BIN_EXE_web-sqlx");

#[test]
fn help_prints_the_settings() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for setting in [
        "PORT",
        "DATABASE_URL",
        "ENVELOPE_KMS",
        "ENVELOPE_MASTER_KEY_FILE",
    ] {
        assert!(
            text.contains(setting),
            "{setting} missing from --help:\n{text}"
        );
    }
    let out = Command::new(BIN).arg("--nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_retires_the_data_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .env("PORT", port.to_string())
        .env("DATABASE_URL", &db)
        .env("ENVELOPE_MASTER_KEY_FILE", dir.path().join("master.key"))
        .env_remove("ENVELOPE_KMS")
        .env_remove("ENVELOPE_LOCAL_MASTER_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert!(first.contains("listening"), "{first}");

    let client = reqwest::Client::new();
    let resp = client
        .post(format!("http://127.0.0.1:{port}/customers"))
        .header("content-type", "application/json")
        .body(r#"{"name":"Ann","email":"ann@example.com"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);

    // Only the process this test started, by its pid.
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("web-sqlx did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let mut errors = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut errors)
        .unwrap();
    assert!(status.success(), "{status}: {rest}{errors}");
    assert!(rest.contains("retired 1 data key(s)"), "{rest}{errors}");

    let store = envelope_sqlx::SqlxKeyStore::<sqlx::Sqlite>::connect_lazy(&db).unwrap();
    let keys = store.list(&KeyFilter::all()).await.unwrap();
    let data: Vec<_> = keys.iter().filter(|k| k.kind == KeyKind::Data).collect();
    assert_eq!(data.len(), 1, "{keys:?}");
    assert!(data[0].retired_at.is_some(), "{keys:?}");
}
