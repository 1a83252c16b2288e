// A benchmark: a failed setup should panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! 100,000 rows with one 64-byte column, inserted (multi-row VALUES, batches of 1,000) and read
//! back on PostgreSQL: once as plaintext BYTEA, once as `Encrypted<Vec<u8>, C>`, alternating for
//! several rounds in one run. Prints the median per-round ratio encrypted / plaintext.
//!
//! `ENVELOPE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench -p envelope-sqlx`
//! (`-- --quick` for fewer rows and rounds).

use std::sync::Arc;
use std::time::Instant;

use envelope_core::{KeyMaterial, Keyring, LocalKms};
use envelope_sqlx::{Encrypted, SqlxKeyStore, column};
use sqlx::{PgPool, QueryBuilder, Row};

column!(Payload = "bench.payload");

const BATCH: usize = 1_000;

async fn insert_plain(pool: &PgPool, table: &str, rows: &[Vec<u8>]) {
    for (b, chunk) in rows.chunks(BATCH).enumerate() {
        let mut q = QueryBuilder::new(format!("INSERT INTO {table} (id, v) "));
        q.push_values(chunk.iter().enumerate(), |mut r, (i, v)| {
            r.push_bind((b * BATCH + i) as i64).push_bind(v.clone());
        });
        q.build().execute(pool).await.unwrap();
    }
}

async fn insert_encrypted(pool: &PgPool, table: &str, rows: &[Vec<u8>]) {
    for (b, chunk) in rows.chunks(BATCH).enumerate() {
        let mut q = QueryBuilder::new(format!("INSERT INTO {table} (id, v) "));
        q.push_values(chunk.iter().enumerate(), |mut r, (i, v)| {
            r.push_bind((b * BATCH + i) as i64)
                .push_bind(Encrypted::<Vec<u8>, Payload>::new(v.clone()));
        });
        q.build().execute(pool).await.unwrap();
    }
}

async fn select_plain(pool: &PgPool, table: &str) -> usize {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT id, v FROM {table}")))
        .fetch_all(pool)
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<Vec<u8>, _>(1).len()).sum()
}

async fn select_encrypted(pool: &PgPool, table: &str) -> usize {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT id, v FROM {table}")))
        .fetch_all(pool)
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.get::<Encrypted<Vec<u8>, Payload>, _>(1).len())
        .sum()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        println!("SKIPPED: set ENVELOPE_TEST_POSTGRES_URL to run the PostgreSQL row benchmark");
        return;
    };
    let (n, rounds) = if quick { (20_000, 3) } else { (100_000, 5) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = PgPool::connect(&url).await.unwrap();
        let tag = &envelope_core::KeyId::random().unwrap().to_hex()[..10];
        let (plain, enc, keys) = (format!("bench_plain_{tag}"), format!("bench_enc_{tag}"), format!("bench_keys_{tag}"));
        for t in [&plain, &enc] {
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, v BYTEA NOT NULL)")))
                .execute(&pool)
                .await
                .unwrap();
        }
        let store = Arc::new(SqlxKeyStore::new(&pool).unwrap().with_table(&keys).unwrap());
        store.create_table().await.unwrap();
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        let cmk = kms.cmk_id().to_owned();
        let keyring = Keyring::builder(Arc::new(kms), cmk, store).build().unwrap();
        keyring.warm().await.unwrap();
        let values: Vec<Vec<u8>> = (0..n).map(|i| format!("{i:064}").into_bytes()).collect();

        let mut ratios = Vec::new();
        let (mut plain_t, mut enc_t) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for t in [&plain, &enc] {
                sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {t}"))).execute(&pool).await.unwrap();
            }
            // Alternate which side goes first, so neither always runs on a colder server.
            let mut p = 0.0;
            let mut e = 0.0;
            for side in [round % 2, 1 - round % 2] {
                let start = Instant::now();
                if side == 0 {
                    insert_plain(&pool, &plain, &values).await;
                    assert_eq!(select_plain(&pool, &plain).await, n * 64);
                    p = start.elapsed().as_secs_f64();
                } else {
                    keyring
                        .scope(async {
                            insert_encrypted(&pool, &enc, &values).await;
                            assert_eq!(select_encrypted(&pool, &enc).await, n * 64);
                        })
                        .await;
                    e = start.elapsed().as_secs_f64();
                }
            }
            ratios.push(e / p);
            plain_t.push(p);
            enc_t.push(e);
        }
        let p = median(&mut plain_t);
        let e = median(&mut enc_t);
        println!("PostgreSQL, {n} rows of 64 bytes, insert (batches of {BATCH}) + select, median of {rounds} rounds");
        println!("  plaintext BYTEA: {:>8.0} rows/s", n as f64 / p);
        println!("  Encrypted<..>:   {:>8.0} rows/s", n as f64 / e);
        println!("  ratio (median per round, encrypted / plaintext): {:.3}x", median(&mut ratios));
        let m = keyring.metrics();
        println!("  KMS calls: {} (cache hits {})", m.kms_calls, m.cache_hits);
        for t in [&plain, &enc, &keys] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {t}"))).execute(&pool).await.unwrap();
        }
    });
}
