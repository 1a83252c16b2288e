//! `envelope encrypt` of a column on PostgreSQL against a plain batched rewrite of the same
//! column by the same code path with the cryptography switched off (the hidden
//! `--debug-no-crypto`): rows/s and the ratio, and the CLI's peak memory (VmHWM) at each size.
//!
//! ```sh
//! ENVELOPE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!     cargo bench -p envelope-cli --bench migrate              # 100k and 1M rows
//! ENVELOPE_BENCH_ROWS=100000 cargo bench -p envelope-cli --bench migrate
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One measured run: rows, whether the cryptography was on, rows/s, peak RSS in KiB.
type Run = (i64, bool, f64, u64);

fn main() {
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        eprintln!("SKIPPED: set ENVELOPE_TEST_POSTGRES_URL to run the migration benchmark");
        return;
    };
    let sizes: Vec<i64> = std::env::var("ENVELOPE_BENCH_ROWS")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("ENVELOPE_BENCH_ROWS: comma-separated row counts")
        })
        .collect();
    let rounds: usize = std::env::var("ENVELOPE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    sqlx::any::install_default_drivers();
    let pool = rt
        .block_on(sqlx::AnyPool::connect(&url))
        .expect("PostgreSQL");
    let exec = |sql: String| {
        rt.block_on(sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool))
            .unwrap();
    };

    println!("| rows | side | seconds | rows/s | peak RSS (MiB) |");
    println!("|---:|---|---:|---:|---:|");
    let mut results: Vec<Run> = Vec::new();
    for &n in &sizes {
        for round in 0..rounds {
            // Alternate which side goes first, so neither always gets the warm cache.
            let sides: &[bool] = if round % 2 == 0 {
                &[false, true]
            } else {
                &[true, false]
            };
            for &crypto in sides {
                let dir = tempfile::tempdir().unwrap();
                let tag = format!("{}_{}", n, if crypto { "env" } else { "plain" });
                let table = format!("bench_migrate_{tag}");
                exec(format!("DROP TABLE IF EXISTS {table}"));
                exec(format!("DROP TABLE IF EXISTS bench_keys_{tag}"));
                exec(format!("DROP TABLE IF EXISTS bench_jobs_{tag}"));
                exec(format!(
                    "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email BYTEA)"
                ));
                exec(format!(
                    "INSERT INTO {table} SELECT i, convert_to('user' || i || '@example.com', 'UTF8') FROM generate_series(1, {n}) AS i"
                ));
                exec(format!("VACUUM ANALYZE {table}"));
                let key = dir.path().join("master.key");
                let config = dir.path().join("envelope.toml");
                std::fs::write(
                    &config,
                    format!(
                        "database_url = {url:?}\nkms = \"local://{}\"\nkey_table = \"bench_keys_{tag}\"\njob_table = \"bench_jobs_{tag}\"\n\
                         [[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n[[table.column]]\nname = \"email\"\nlabel = \"bench.email\"\ntype = \"string\"\n",
                        key.display()
                    ),
                )
                .unwrap();
                let bin = env!("CARGO_BIN_EXE_envelope");
                assert!(
                    Command::new(bin)
                        .args(["keygen", "--out"])
                        .arg(&key)
                        .output()
                        .unwrap()
                        .status
                        .success()
                );
                let init = Command::new(bin)
                    .arg("--config")
                    .arg(&config)
                    .arg("init")
                    .output()
                    .unwrap();
                assert!(
                    init.status.success(),
                    "{}",
                    String::from_utf8_lossy(&init.stderr)
                );

                let mut args = vec!["--config", config.to_str().unwrap(), "encrypt", "--json"];
                if !crypto {
                    args.push("--debug-no-crypto");
                }
                let started = Instant::now();
                let mut child = Command::new(bin)
                    .args(&args)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let mut peak_kib = 0u64;
                let status = loop {
                    if let Some(status) = child.try_wait().unwrap() {
                        break status;
                    }
                    peak_kib = peak_kib.max(vm_hwm_kib(child.id()).unwrap_or(0));
                    std::thread::sleep(Duration::from_millis(20));
                };
                let seconds = started.elapsed().as_secs_f64();
                assert!(status.success(), "encrypt failed");
                let rate = n as f64 / seconds;
                println!(
                    "| {n} | {} | {seconds:.2} | {rate:.0} | {:.1} |",
                    if crypto {
                        "envelope encrypt"
                    } else {
                        "plain rewrite (crypto off)"
                    },
                    peak_kib as f64 / 1024.0
                );
                results.push((n, crypto, rate, peak_kib));
                exec(format!("DROP TABLE {table}"));
                exec(format!("DROP TABLE bench_keys_{tag}"));
                exec(format!("DROP TABLE bench_jobs_{tag}"));
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!();
    for &n in &sizes {
        let pick = |crypto: bool, f: &dyn Fn(&Run) -> f64| {
            median(
                results
                    .iter()
                    .filter(|r| r.0 == n && r.1 == crypto)
                    .map(f)
                    .collect(),
            )
        };
        let (env, plain) = (pick(true, &|r| r.2), pick(false, &|r| r.2));
        println!(
            "{n} rows: envelope encrypt {env:.0} rows/s, plain {plain:.0} rows/s, ratio {:.2}x (target >= 0.8x)",
            env / plain
        );
    }
    if sizes.len() >= 2 {
        let peak = |n: i64| {
            results
                .iter()
                .filter(|r| r.0 == n && r.1)
                .map(|r| r.3)
                .max()
                .unwrap_or(0) as f64
        };
        let (small, large) = (sizes[0], sizes[sizes.len() - 1]);
        println!(
            "peak memory of envelope encrypt: {:.1} MiB at {small} rows, {:.1} MiB at {large} rows, ratio {:.2}x (target: within 20 %)",
            peak(small) / 1024.0,
            peak(large) / 1024.0,
            peak(large) / peak(small).max(1.0)
        );
    }
}

/// The process's peak resident set (VmHWM), in KiB, on Linux.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
