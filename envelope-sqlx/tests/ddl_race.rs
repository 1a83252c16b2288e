//! Several processes creating the key table at the same moment (replicas of a new deployment
//! starting together on a fresh database) all succeed, on SQLite always and on PostgreSQL and
//! MariaDB/MySQL when their URL variables are set.
//!
//! The test starts copies of this test binary as child processes, by their pid, each running
//! only [`ddl_race_child`] with the database URL, table name and start instant in its
//! environment; each waits for that instant, then creates the table through
//! `key_store_for_url`, as an application does at start-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CHILD_ENV: &str = "ENVELOPE_DDL_RACE_CHILD";
const PROCESSES: usize = 6;

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// The child's part. Without the variable (an ordinary test run) there is nothing to do.
#[test]
fn ddl_race_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, '|');
    let (start, table, url) = (
        parts.next().unwrap().parse::<u128>().unwrap(),
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
    );
    while now_ms() < start {
        std::thread::sleep(Duration::from_millis(1));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(envelope_sqlx::key_store_for_url(&url, &table)) {
        eprintln!("child {}: {e}", std::process::id());
        std::process::exit(3);
    }
}

fn race(url: &str) {
    let table = format!(
        "keys_{}",
        &envelope_core::KeyId::random().unwrap().to_hex()[..12]
    );
    // Far enough ahead for every child to have started and connected its pool lazily.
    let start = now_ms() + 1500;
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "ddl_race_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, format!("{start}|{table}|{url}"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut failures = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            failures.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {PROCESSES} processes failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn processes_starting_together_on_sqlite_all_create_the_key_table() {
    let dir = tempfile::tempdir().unwrap();
    race(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("keys.db").display()
    ));
}

#[test]
fn processes_starting_together_on_postgres_all_create_the_key_table() {
    match std::env::var("ENVELOPE_TEST_POSTGRES_URL") {
        Ok(url) => race(&url),
        Err(_) => {
            envelope_tests::skipped("ENVELOPE_TEST_POSTGRES_URL is not set: DDL race on PostgreSQL")
        }
    }
}

#[test]
fn processes_starting_together_on_mysql_all_create_the_key_table() {
    match std::env::var("ENVELOPE_TEST_MYSQL_URL") {
        Ok(url) => race(&url),
        Err(_) => {
            envelope_tests::skipped("ENVELOPE_TEST_MYSQL_URL is not set: DDL race on MySQL/MariaDB")
        }
    }
}
