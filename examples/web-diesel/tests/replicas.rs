//! Three replicas of the binary started at the same moment on a fresh database, as a new
//! deployment starts them: all three create their tables, come up and serve, in each of
//! `ROUNDS` rounds (the collision depends on timing). On PostgreSQL
//! (`ENVELOPE_TEST_POSTGRES_URL` and the feature `postgres`, in a schema of its own) and MariaDB
//! (`ENVELOPE_TEST_MYSQL_URL` and the feature `mysql`, in a database of its own); skipped loudly
//! when the variable is unset or the feature off, failed when the server does not answer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(any(feature = "postgres", feature = "mysql"))]
use std::time::Duration;

#[cfg(any(feature = "postgres", feature = "mysql"))]
use envelope_tests::replicas::{self, Replica};

/// Start three replicas on `url` at once; each must come up, and a patient created through
/// one must be found by e-mail through the next.
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn three_replicas_come_up_and_serve(url: &str) -> Result<(), String> {
    const BIN: &str = env!("CARGO_BIN_EXE_web-diesel");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    // With a database server the app never makes a master key itself: `envelope keygen`.
    envelope_core::LocalKms::create(&key).unwrap();
    let key = key.to_str().unwrap();
    let env = [
        ("DATABASE_URL", Some(url)),
        ("ENVELOPE_MASTER_KEY_FILE", Some(key)),
        ("ENVELOPE_KMS", None),
    ];
    // Blocking waits, on a worker of the multi-thread runtime.
    let running: Vec<Replica> = tokio::task::block_in_place(|| {
        replicas::start_together(BIN, 3, &env, Duration::from_secs(60))
    })?;
    let client = reqwest::Client::new();
    for (i, replica) in running.iter().enumerate() {
        let email = format!("replica{i}@example.com");
        let resp = client
            .post(format!("{}/patients", replica.base()))
            .header("content-type", "application/json")
            .body(serde_json::json!({"name": "R", "email": email}).to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().as_u16() != 201 {
            return Err(format!(
                "replica {} answered {} to POST: {}",
                i + 1,
                resp.status(),
                resp.text().await.unwrap_or_default()
            ));
        }
        let next = &running[(i + 1) % running.len()];
        let text = client
            .get(format!(
                "{}/patients?email={}",
                next.base(),
                email.replace('@', "%40")
            ))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let found: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))?;
        if found.as_array().map(Vec::len) != Some(1) {
            return Err(format!("replica {} did not find {email}: {found}", i + 2));
        }
    }
    tokio::task::block_in_place(|| {
        for r in running {
            r.stop();
        }
    });
    Ok(())
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_start_together_on_postgres() {
    use diesel::{Connection, RunQueryDsl};
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        envelope_tests::skipped(
            "three_replicas_start_together_on_postgres: ENVELOPE_TEST_POSTGRES_URL is not set",
        );
        return;
    };
    let mut admin = diesel::PgConnection::establish(&url)
        .unwrap_or_else(|e| panic!("ENVELOPE_TEST_POSTGRES_URL={url} is set but unreachable: {e}"));
    for round in 1..=replicas::ROUNDS {
        let schema = replicas::database_name("web_diesel_replicas");
        diesel::sql_query(format!("CREATE SCHEMA {schema}"))
            .execute(&mut admin)
            .unwrap();
        let sep = if url.contains('?') { '&' } else { '?' };
        let app_url = format!("{url}{sep}options=-csearch_path%3D{schema}");
        let outcome = three_replicas_come_up_and_serve(&app_url).await;
        diesel::sql_query(format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut admin)
            .unwrap();
        if let Err(e) = outcome {
            panic!("round {round} of {}: {e}", replicas::ROUNDS);
        }
    }
}

#[cfg(not(feature = "postgres"))]
#[test]
fn three_replicas_start_together_on_postgres() {
    envelope_tests::skipped(
        "three_replicas_start_together_on_postgres: web-diesel built without `--features postgres`",
    );
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_start_together_on_mariadb() {
    use diesel::{Connection, RunQueryDsl};
    let Ok(url) = std::env::var("ENVELOPE_TEST_MYSQL_URL") else {
        envelope_tests::skipped(
            "three_replicas_start_together_on_mariadb: ENVELOPE_TEST_MYSQL_URL is not set",
        );
        return;
    };
    let mut admin = diesel::MysqlConnection::establish(&url)
        .unwrap_or_else(|e| panic!("ENVELOPE_TEST_MYSQL_URL={url} is set but unreachable: {e}"));
    for round in 1..=replicas::ROUNDS {
        let name = replicas::database_name("web_diesel_replicas");
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .unwrap();
        let outcome = three_replicas_come_up_and_serve(&replicas::with_database(&url, &name)).await;
        diesel::sql_query(format!("DROP DATABASE {name}"))
            .execute(&mut admin)
            .unwrap();
        if let Err(e) = outcome {
            panic!("round {round} of {}: {e}", replicas::ROUNDS);
        }
    }
}

#[cfg(not(feature = "mysql"))]
#[test]
fn three_replicas_start_together_on_mariadb() {
    envelope_tests::skipped(
        "three_replicas_start_together_on_mariadb: web-diesel built without `--features mysql`",
    );
}
