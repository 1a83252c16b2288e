//! The server ends the tool's sessions in the middle of `envelope encrypt`: what a restart, an
//! administrator's shutdown or a failover does to a client (PostgreSQL: SQLSTATE 57P01
//! "terminating connection due to administrator command"; MariaDB: the connection killed).
//! The run retries for `--patience` and finishes every row; it used to stop at once with exit 3
//! on PostgreSQL.
//!
//! The sessions are ended with `pg_terminate_backend` and `KILL CONNECTION`, on the tool's own
//! sessions only (those that appeared after the test's own), never the whole server: other
//! processes share it. This file is its own test binary so that no other test of the suite
//! opens sessions while it runs.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod common;

use std::time::{Duration, Instant};

use common::{Kind, Target};
use sqlx::Row;

/// The ids of the server's sessions now.
async fn sessions(t: &Target) -> Vec<i64> {
    let sql = match t.kind {
        Kind::Postgres => {
            "SELECT CAST(pid AS BIGINT) FROM pg_stat_activity WHERE datname = current_database()"
        }
        _ => "SELECT CAST(ID AS SIGNED) FROM information_schema.PROCESSLIST WHERE DB = DATABASE()",
    };
    sqlx::query(sql)
        .fetch_all(&t.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<i64, _>(0))
        .collect()
}

/// End every session that is not in `keep`; returns how many.
async fn end_sessions(t: &Target, keep: &[i64]) -> usize {
    let mut ended = 0;
    for id in sessions(t).await {
        if keep.contains(&id) {
            continue;
        }
        let sql = match t.kind {
            Kind::Postgres => format!("SELECT pg_terminate_backend({id})"),
            _ => format!("KILL CONNECTION {id}"),
        };
        if sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&t.pool)
            .await
            .is_ok()
        {
            ended += 1;
        }
    }
    ended
}

async fn sessions_ended_mid_run(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("restart");
    let rows = 600;
    t.plaintext_emails(&table, rows).await;
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n[[table.column]]\nname = \"email\"\nlabel = \"restart.email\"\ntype = \"string\"\n"
    ));
    t.expect(&["init"], 0);
    // The test's own pool opens all its sessions now, so that every later one is the tool's.
    let held: Vec<_> = futures_join(&t).await;
    drop(held);
    let keep = sessions(&t).await;

    let child = t.spawn(&[
        "encrypt",
        "--json",
        "--batch-size",
        "50",
        "--debug-pause-after-read",
        "150ms",
        "--patience",
        "60s",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rounds = 0;
    let mut ended = 0;
    for at in [50, 250] {
        while t.rows_seen("").await < at && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ended += end_sessions(&t, &keep).await;
        rounds += 1;
    }
    assert_eq!(rounds, 2);
    assert!(ended >= 2, "{kind:?}: no session of the tool was ended");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{kind:?}: {stderr}");
    assert!(stderr.contains("retrying"), "{kind:?}: {stderr}");
    let summary = Target::summary(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        summary["columns"][0]["written"], rows,
        "{kind:?}: {summary}"
    );
    t.expect(&["verify"], 0);
}

/// Open as many sessions as the test pool holds, at once.
async fn futures_join(t: &Target) -> Vec<sqlx::pool::PoolConnection<sqlx::Any>> {
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(t.pool.acquire().await.unwrap());
    }
    held
}

/// One test for both servers, one after the other: it ends sessions that are not its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_ended_by_the_server_mid_run_are_retried() {
    sessions_ended_mid_run(Kind::Postgres).await;
    sessions_ended_mid_run(Kind::MySql).await;
}
