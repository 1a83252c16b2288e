// A benchmark: a failed setup should panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]
//! 100,000 rows with one 64-byte column, inserted (multi-row VALUES, batches of 1,000, one
//! connection) and read back (`query_as` into a tuple, as `#[derive(FromRow)]` code does) on
//! PostgreSQL, three ways, interleaved for several rounds in one run:
//!
//! - plaintext: the 64 bytes in a `BYTEA` column (the target's baseline);
//! - sealed bytes: the same rows already sealed (111 bytes each) written and read as plain
//!   `BYTEA`, no cryptography timed: what the format's size alone costs;
//! - hand-rolled AES-GCM: the application seals each value with aws-lc-rs itself (same output
//!   size, same AAD length, a cached key, no keyring) before binding, and opens each after
//!   reading: the cost of the cipher alone, a floor for any per-value AES-GCM scheme;
//! - encrypted: `Encrypted<Vec<u8>, C>`, sealed on bind and opened on decode.
//!
//! Prints per-row times and the median per-round ratios against plaintext.
//!
//! `ENVELOPE_TEST_POSTGRES_URL="postgres://postgres@localhost/test?host=/var/run/postgresql"
//! cargo bench -p envelope-sqlx --bench rows` (`-- --quick` for fewer rows and rounds).

use std::sync::Arc;
use std::time::Instant;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use envelope_core::{KeyMaterial, Keyring, LocalKms};
use envelope_sqlx::{Encrypted, SqlxKeyStore, column};
use envelope_tests::rows_bench::{self, BATCH, Samples};
use rand::Rng as _;
use sqlx::{PgPool, QueryBuilder};

column!(Payload = "bench.payload");

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Plain,
    SealedBytes,
    HandRolled,
    Encrypted,
}

impl Side {
    const ALL: [Side; 4] = [
        Side::Plain,
        Side::SealedBytes,
        Side::HandRolled,
        Side::Encrypted,
    ];

    fn name(self) -> &'static str {
        match self {
            Side::Plain => "plaintext BYTEA",
            Side::SealedBytes => "sealed bytes, no crypto",
            Side::HandRolled => "hand-rolled AES-GCM",
            Side::Encrypted => "Encrypted<Vec<u8>, C>",
        }
    }
}

/// What an application would write without envelope: AES-256-GCM with a cached key, laid out
/// like a v1 value (a 30-byte header holding the nonce, a length byte, ciphertext, tag) so the
/// rows are the same size and the AAD the same length.
struct HandRolled(LessSafeKey);

const AAD_LEN: usize = 30 + "bench.payload".len();

impl HandRolled {
    fn seal(&self, pt: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(31 + pt.len() + 16);
        out.extend_from_slice(&[1, 1]);
        out.extend_from_slice(&[0; 16]);
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        out.extend_from_slice(&nonce);
        out.push(pt.len() as u8);
        out.extend_from_slice(pt);
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([0u8; AAD_LEN]),
                &mut out[31..],
            )
            .unwrap();
        out.extend_from_slice(tag.as_ref());
        out
    }

    fn open(&self, stored: &[u8]) -> Vec<u8> {
        let (ct, tag) = stored[31..].split_at(stored.len() - 31 - 16);
        let mut out = vec![0u8; ct.len()];
        self.0
            .open_separate_gather(
                Nonce::try_assume_unique_for_key(&stored[18..30]).unwrap(),
                Aad::from([0u8; AAD_LEN]),
                ct,
                tag,
                &mut out,
            )
            .unwrap();
        out
    }
}

async fn insert_hand_rolled(pool: &PgPool, table: &str, rows: &[Vec<u8>], key: &HandRolled) {
    for (b, chunk) in rows.chunks(BATCH).enumerate() {
        let mut q = QueryBuilder::new(format!("INSERT INTO {table} (id, v) "));
        q.push_values(chunk.iter().enumerate(), |mut r, (i, v)| {
            r.push_bind((b * BATCH + i) as i64).push_bind(key.seal(v));
        });
        q.build().execute(pool).await.unwrap();
    }
}

async fn select_hand_rolled(pool: &PgPool, table: &str, key: &HandRolled) -> usize {
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT id, v FROM {table}")))
            .fetch_all(pool)
            .await
            .unwrap();
    let opened: Vec<(i64, Vec<u8>)> = rows.into_iter().map(|(i, v)| (i, key.open(&v))).collect();
    assert!(opened.iter().all(|(_, v)| v.len() == 64));
    opened.len()
}

async fn insert_bytes(pool: &PgPool, table: &str, rows: &[Vec<u8>]) {
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

async fn select_bytes(pool: &PgPool, table: &str) -> usize {
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT id, v FROM {table}")))
            .fetch_all(pool)
            .await
            .unwrap();
    rows.len()
}

async fn select_encrypted(pool: &PgPool, table: &str) -> usize {
    let rows: Vec<(i64, Encrypted<Vec<u8>, Payload>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT id, v FROM {table}")))
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(rows.iter().all(|(_, v)| v.len() == 64));
    rows.len()
}

fn main() {
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        println!("SKIPPED: set ENVELOPE_TEST_POSTGRES_URL to run the PostgreSQL row benchmark");
        return;
    };
    let (n, rounds) = rows_bench::size();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        let tag = &envelope_core::KeyId::random().unwrap().to_hex()[..10];
        let tables = Side::ALL.map(|s| format!("bench_{}_{tag}", s as u8));
        let keys = format!("bench_keys_{tag}");
        for t in &tables {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE {t} (id BIGINT PRIMARY KEY, v BYTEA NOT NULL)"
            )))
            .execute(&pool)
            .await
            .unwrap();
        }
        let store = Arc::new(SqlxKeyStore::same_database_as(&pool).unwrap().with_table(&keys).unwrap());
        store.create_table().await.unwrap();
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        let keyring = Keyring::builder(kms, store).build().unwrap();
        keyring.warm().await.unwrap();
        let values = rows_bench::values(n);
        let sealed: Vec<Vec<u8>> = keyring
            .install_for(async {
                values
                    .iter()
                    .map(|v| envelope_core::column::seal::<Vec<u8>, Payload>(v).unwrap())
                    .collect()
            })
            .await;

        let material = KeyMaterial::generate().unwrap();
        let hand = HandRolled(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, material.expose()).unwrap(),
        ));

        let mut samples: [Samples; 4] = Default::default();
        for round in 0..rounds {
            for t in &tables {
                sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {t}")))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            for side in rows_bench::order(Side::ALL.len(), round).into_iter().map(|i| Side::ALL[i]) {
                let table = &tables[side as usize];
                let start = Instant::now();
                match side {
                    Side::Plain => insert_bytes(&pool, table, &values).await,
                    Side::SealedBytes => insert_bytes(&pool, table, &sealed).await,
                    Side::HandRolled => insert_hand_rolled(&pool, table, &values, &hand).await,
                    Side::Encrypted => {
                        keyring.install_for(insert_encrypted(&pool, table, &values)).await
                    }
                }
                let inserted = start.elapsed().as_secs_f64();
                let start = Instant::now();
                let read = match side {
                    Side::Encrypted => keyring.install_for(select_encrypted(&pool, table)).await,
                    Side::HandRolled => select_hand_rolled(&pool, table, &hand).await,
                    Side::Plain | Side::SealedBytes => select_bytes(&pool, table).await,
                };
                let selected = start.elapsed().as_secs_f64();
                assert_eq!(read, n);
                samples[side as usize].push(inserted, selected);
            }
        }

        let sides: Vec<(&str, &Samples)> =
            Side::ALL.iter().map(|&side| (side.name(), &samples[side as usize])).collect();
        rows_bench::report(
            &format!(
                "PostgreSQL, {n} rows of 64 bytes, insert (batches of {BATCH}) + select, one connection, {rounds} rounds"
            ),
            n,
            &sides,
        );
        let m = keyring.metrics();
        println!("KMS calls: {} (cache hits {})", m.kms_calls, m.cache_hits);
        for t in tables.iter().chain([&keys]) {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {t}")))
                .execute(&pool)
                .await
                .unwrap();
        }
    });
}
