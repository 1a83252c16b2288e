//! The operator's guarantees on live tables, on SQLite, PostgreSQL and MariaDB/MySQL:
//!
//! - `encrypt` killed with SIGKILL at several points, then run again, finishes with every row
//!   present, every value reading back through the column types to its original, and none
//!   encrypted twice;
//! - while `encrypt` and `rotate` run, the application keeps writing: afterwards every row
//!   reads as its last write (zero lost updates), and the summary counts the retried rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Kind, Target};
use envelope_core::Label;
use envelope_sqlx::{Encrypted, column};
use rand::RngExt as _;

column!(Email = "live.email");
column!(Ssn = "live.ssn");

/// A row of the crash test's table, read through the column types.
type CrashRow = (i64, Encrypted<String, Email>, Encrypted<i64, Ssn>);

fn email(i: i64) -> String {
    format!("user{i}@example.com")
}

fn int(t: &Target, expr: &str) -> String {
    match t.kind {
        Kind::Postgres => format!("CAST({expr} AS BIGINT)"),
        Kind::MySql => format!("CAST({expr} AS SIGNED)"),
        Kind::Sqlite => expr.to_owned(),
    }
}

async fn fill(t: &Target, table: &str, rows: i64) {
    let blob = t.blob();
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, ssn BIGINT, ssn_enc {blob})"
    ))
    .await;
    let mut i = 1;
    while i <= rows {
        let end = (i + 999).min(rows);
        let values: Vec<String> = (i..=end)
            .map(|n| {
                format!(
                    "({n}, {}, {})",
                    t.bytes_literal(email(n).as_bytes()),
                    100_000 + n
                )
            })
            .collect();
        t.exec(&format!(
            "INSERT INTO {table} (id, email, ssn) VALUES {}",
            values.join(", ")
        ))
        .await;
        i = end + 1;
    }
}

fn config(table: &str) -> String {
    format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n\
         [[table.column]]\nname = \"email\"\nlabel = \"live.email\"\ntype = \"string\"\n\n\
         [[table.column]]\nname = \"ssn_enc\"\nlabel = \"live.ssn\"\ntype = \"i64\"\nsource = \"ssn\"\n"
    )
}

async fn rows_seen(t: &Target) -> i64 {
    let sql = format!(
        "SELECT {} FROM {}",
        int(t, "COALESCE(SUM(rows_seen), 0)"),
        t.table("jobs")
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&t.pool)
        .await
        .unwrap_or(0)
}

async fn crash_and_resume(kind: Kind, rows: i64) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("crash");
    fill(&t, &table, rows).await;
    t.write_config(&config(&table));
    t.expect(&["init"], 0);

    // Kill at increasing fractions of the work (both columns: 2 * rows), each a little past a
    // checkpoint by a random delay, so kills land between, inside and around batches.
    let mut rng = rand::rng();
    let mut kills = 0;
    for fraction in [0.1, 0.3, 0.5, 0.7] {
        let target = (2.0 * rows as f64 * fraction) as i64;
        if rows_seen(&t).await >= target {
            continue;
        }
        let mut child = t.spawn(&[
            "encrypt",
            "--batch-size",
            "500",
            "--lease",
            "1s",
            "--workers",
            "2",
        ]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while rows_seen(&t).await < target && Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
        if child.try_wait().unwrap().is_none() {
            // SIGKILL, to this child's pid only.
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    assert!(
        kills >= 2,
        "the job finished before it could be killed: make it bigger"
    );

    let out = t.expect(&["encrypt", "--json", "--lease", "1s"], 0);
    let s = Target::summary(&out);
    assert!(
        s["columns"][0]["failed"] == 0 && s["columns"][1]["failed"] == 0,
        "{s}"
    );

    let v = Target::summary(&t.expect(&["verify", "--json"], 0));
    for c in v["columns"].as_array().unwrap() {
        let opened: i64 = c["per_key"]
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_i64().unwrap())
            .sum();
        assert_eq!(
            (opened, c["plaintext"].as_i64(), c["missing"].as_i64()),
            (rows, Some(0), Some(0)),
            "{c}"
        );
    }

    // Every row reads back through the column types to its original value: a value encrypted
    // twice would open to an envelope, not to the original.
    let keyring = t.keyring().await;
    keyring
        .install_for(async {
            let sql = format!("SELECT id, email, ssn_enc FROM {table} ORDER BY id");
            let got: Vec<CrashRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_all(&t.pool)
                .await
                .unwrap();
            assert_eq!(got.len() as i64, rows);
            for (n, (id, e, ssn)) in got.into_iter().enumerate() {
                assert_eq!(id, n as i64 + 1);
                assert_eq!(*e, email(id), "row {id}");
                assert_eq!(*ssn, 100_000 + id, "row {id}");
            }
        })
        .await;
}

/// Writes of the application while a job runs: plaintext (an old version of the app, through
/// the migration window) and envelope values (the new version). Returns the last value
/// written to each row.
async fn write_while(
    t: &Target,
    table: &str,
    rows: i64,
    plaintext: bool,
    mut child: std::process::Child,
) -> (HashMap<i64, String>, String) {
    let keyring = t.keyring().await;
    let label = Label::new("live.email").unwrap();
    keyring.open_migration_window(&label);
    let mut last = HashMap::new();
    let mut rng = rand::rng();
    let mut n = 0;
    keyring
        .install_for(async {
            while child.try_wait().unwrap().is_none() {
                let id = rng.random_range(1..=rows);
                n += 1;
                let value = format!("write{n}-{id}");
                let sql = format!(
                    "UPDATE {table} SET email = {} WHERE id = {}",
                    t.p(1),
                    t.p(2)
                );
                let q = sqlx::query(sqlx::AssertSqlSafe(sql));
                let q = if plaintext && rng.random_bool(0.5) {
                    q.bind(value.clone().into_bytes())
                } else {
                    q.bind(Encrypted::<String, Email>::new(value.clone()))
                };
                q.bind(id).execute(&t.pool).await.unwrap();
                last.insert(id, value);
            }
        })
        .await;
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not vacuous: the application wrote while the job ran. On SQLite every write waits for the
    // job's write lock, so a loaded machine sees few of them (9 in one CI run at 20 ms pauses).
    assert!(n >= 5, "the writer hardly ran ({n} writes)");
    (last, stdout)
}

async fn no_lost_updates(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let rows = 1500;
    let table = t.table("live");
    fill(&t, &table, rows).await;
    t.write_config(&config(&table));
    t.expect(&["init"], 0);
    // A pause between each batch's read and its writes makes the races certain.
    let args = [
        "--batch-size",
        "50",
        "--debug-pause-after-read",
        "40ms",
        "--json",
        "--column",
        "email",
    ];
    let encrypt = t.spawn(&[&["encrypt"][..], &args].concat());
    let (mut last, out) = write_while(&t, &table, rows, true, encrypt).await;
    let retried_encrypt = Target::summary(&out)["columns"][0]["retried"]
        .as_i64()
        .unwrap();
    let rotate = t.spawn(&[&["rotate"][..], &args].concat());
    let (last_rotate, out) = write_while(&t, &table, rows, false, rotate).await;
    let retried_rotate = Target::summary(&out)["columns"][0]["retried"]
        .as_i64()
        .unwrap();
    last.extend(last_rotate);

    let keyring = t.keyring().await;
    keyring.open_migration_window(&Label::new("live.email").unwrap());
    keyring
        .install_for(async {
            let sql = format!("SELECT id, email FROM {table} ORDER BY id");
            let got: Vec<(i64, Encrypted<String, Email>)> =
                sqlx::query_as(sqlx::AssertSqlSafe(sql))
                    .fetch_all(&t.pool)
                    .await
                    .unwrap();
            assert_eq!(got.len() as i64, rows);
            for (id, e) in got {
                let want = last.get(&id).cloned().unwrap_or_else(|| email(id));
                assert_eq!(*e, want, "row {id} lost an update on {kind:?}");
            }
        })
        .await;
    // Plaintext written behind the pass is picked up by the next run.
    t.expect(&["encrypt", "--column", "email"], 0);
    t.expect(&["verify", "--column", "email"], 0);
    eprintln!(
        "{kind:?}: retried {retried_encrypt} rows during encrypt, {retried_rotate} during rotate"
    );
    if kind != Kind::Sqlite {
        // SQLite's batches hold the write lock from their first read, so only the servers race.
        assert!(
            retried_encrypt + retried_rotate > 0,
            "no race happened: the test proves nothing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_crash_and_resume() {
    crash_and_resume(Kind::Sqlite, 200_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_and_resume() {
    crash_and_resume(Kind::Postgres, 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_crash_and_resume() {
    crash_and_resume(Kind::MySql, 30_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_no_lost_updates() {
    no_lost_updates(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_no_lost_updates() {
    no_lost_updates(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_no_lost_updates() {
    no_lost_updates(Kind::MySql).await;
}

/// `--shard i/N`: two processes share one job through the job table, each taking its ranges.
async fn shards_share_one_job(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("shard");
    fill(&t, &table, 3000).await;
    t.write_config(&config(&table));
    t.expect(&["init"], 0);
    let first = [
        "encrypt",
        "--column",
        "email",
        "--range-size",
        "500",
        "--workers",
        "2",
        "--json",
    ];
    let s = Target::summary(&t.expect(&[&first[..], &["--shard", "0/2"]].concat(), 0));
    assert_eq!(
        s["columns"][0]["written"], 1500,
        "ranges 0, 2 and 4 of 6: {s}"
    );
    let v = Target::summary(&t.expect(&["verify", "--column", "email", "--json"], 1));
    assert_eq!(v["columns"][0]["plaintext"], 1500, "{v}");
    let s = Target::summary(&t.expect(&[&first[..], &["--shard", "1/2"]].concat(), 0));
    assert_eq!(s["columns"][0]["written"], 1500, "ranges 1, 3 and 5: {s}");
    t.expect(&["verify", "--column", "email"], 0);
    let status = t.expect(&["status", "--json"], 0);
    let job = status
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "job")
        .unwrap();
    assert_eq!(
        (job["job"]["ranges"].as_i64(), job["job"]["done"].as_i64()),
        (Some(6), Some(6)),
        "{job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_shards_share_one_job() {
    shards_share_one_job(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_shards_share_one_job() {
    shards_share_one_job(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_shards_share_one_job() {
    shards_share_one_job(Kind::MySql).await;
}

/// SIGTERM finishes the current batch, checkpoints and exits 130; the next run resumes and
/// finishes; `--limit` stops early with the rest left for the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_and_exits_130() {
    let Some(t) = Target::new(Kind::Sqlite).await else {
        return;
    };
    let table = t.table("sig");
    fill(&t, &table, 2000).await;
    t.write_config(&config(&table));
    t.expect(&["init"], 0);
    let s = Target::summary(&t.expect(
        &[
            "encrypt",
            "--column",
            "email",
            "--limit",
            "300",
            "--batch-size",
            "100",
            "--json",
        ],
        0,
    ));
    assert_eq!(s["columns"][0]["seen"], 300, "{s}");
    let mut child = t.spawn(&[
        "encrypt",
        "--column",
        "email",
        "--batch-size",
        "50",
        "--debug-pause-after-read",
        "50ms",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows_seen(&t).await < 500 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let done_before = rows_seen(&t).await;
    assert!(done_before < 2000, "it stopped early");
    // The interrupted range was handed back: the rerun starts at once and finishes.
    let started = Instant::now();
    t.expect(&["encrypt", "--column", "email"], 0);
    assert!(started.elapsed() < Duration::from_secs(30));
    t.expect(&["verify", "--column", "email"], 0);
}

/// Text primary keys are split at sampled boundaries: two shards share the job, and every row
/// is encrypted exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_keys_split_into_ranges() {
    for kind in [Kind::Sqlite, Kind::Postgres, Kind::MySql] {
        let Some(t) = Target::new(kind).await else {
            continue;
        };
        let table = t.table("tk");
        t.exec(&format!(
            "CREATE TABLE {table} (code VARCHAR(40) PRIMARY KEY, v {})",
            t.blob()
        ))
        .await;
        let values: Vec<String> = (0..900)
            .map(|i| {
                format!(
                    "('k-{:04}-{i}', {})",
                    (i * 7919) % 900,
                    t.bytes_literal(format!("v{i}").as_bytes())
                )
            })
            .collect();
        t.exec(&format!(
            "INSERT INTO {table} (code, v) VALUES {}",
            values.join(", ")
        ))
        .await;
        t.write_config(&format!(
            "[[table]]\nname = \"{table}\"\nprimary_key = \"code\"\n[[table.column]]\nname = \"v\"\nlabel = \"tk.v\"\ntype = \"string\"\n"
        ));
        t.expect(&["init"], 0);
        let run = |shard: &str| {
            let out = t.expect(
                &[
                    "encrypt",
                    "--range-size",
                    "100",
                    "--workers",
                    "2",
                    "--shard",
                    shard,
                    "--json",
                ],
                0,
            );
            Target::summary(&out)["columns"][0]["written"]
                .as_i64()
                .unwrap()
        };
        let (a, b) = (run("0/2"), run("1/2"));
        assert!(
            a > 0 && b > 0,
            "both shards had work: {a} + {b} on {kind:?}"
        );
        assert_eq!(a + b, 900, "{kind:?}");
        let status = t.expect(&["status", "--json"], 0);
        assert!(status.contains("\"ranges\":9"), "{status}");
        t.expect(&["verify"], 0);
    }
}

/// A PostgreSQL `uuid` primary key: keyset batches, sampled ranges and compare-and-set go
/// through `CAST(.. AS uuid)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_uuid_keys() {
    let Some(t) = Target::new(Kind::Postgres).await else {
        return;
    };
    let table = t.table("uk");
    t.exec(&format!(
        "CREATE TABLE {table} (id uuid PRIMARY KEY, v BYTEA)"
    ))
    .await;
    t.exec(&format!(
        "INSERT INTO {table} SELECT md5(i::text)::uuid, convert_to('v' || i, 'UTF8') FROM generate_series(1, 700) AS i"
    ))
    .await;
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n[[table.column]]\nname = \"v\"\nlabel = \"uk.v\"\ntype = \"string\"\n"
    ));
    t.expect(&["init"], 0);
    let s = Target::summary(&t.expect(
        &[
            "encrypt",
            "--range-size",
            "100",
            "--workers",
            "3",
            "--batch-size",
            "30",
            "--json",
        ],
        0,
    ));
    assert_eq!(s["columns"][0]["written"], 700, "{s}");
    t.expect(&["verify"], 0);
    t.expect(&["rotate"], 0);
    t.expect(&["verify"], 0);
}

/// A worker whose batch outlives its lease loses the range: another process takes it over when
/// the lease expires, the slow batch is rolled back (its checkpoint is refused), and the job
/// finishes once, with every row readable.
async fn a_lost_lease_rolls_back_and_moves_on(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("lease");
    fill(&t, &table, 400).await;
    t.write_config(&config(&table));
    t.expect(&["init"], 0);
    let slow = t.spawn(&[
        "encrypt",
        "--column",
        "email",
        "--lease",
        "1s",
        "--debug-pause-after-read",
        "3s",
        "--json",
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fast = Target::summary(&t.expect(
        &["encrypt", "--column", "email", "--lease", "30s", "--json"],
        0,
    ));
    let out = slow.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("taken over by another worker"));
    let slow = Target::summary(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        slow["columns"][0]["written"], 0,
        "the slow batch must not land: {slow}"
    );
    assert_eq!(fast["columns"][0]["written"], 400, "{fast}");
    t.expect(&["verify", "--column", "email"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_lost_lease_rolls_back_and_moves_on() {
    a_lost_lease_rolls_back_and_moves_on(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_a_lost_lease_rolls_back_and_moves_on() {
    a_lost_lease_rolls_back_and_moves_on(Kind::MySql).await;
}
