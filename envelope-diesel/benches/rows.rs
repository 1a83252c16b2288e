// A benchmark: a failed setup should panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// `diesel::table!` generates undocumented public items.
#![allow(missing_docs)]
//! 100,000 rows with one 64-byte column, inserted (multi-row `VALUES`, batches of 1,000) and read
//! back (`load` into a `Queryable` struct) with sync diesel on PostgreSQL, three ways,
//! interleaved for several rounds in one run: plaintext `BYTEA` (the target's baseline), the same
//! rows already sealed written as plain `BYTEA` (what the format's size alone costs), and
//! `Encrypted<Vec<u8>, C>`. Prints per-row times and the median per-round ratios.
//!
//! `ENVELOPE_TEST_POSTGRES_URL="postgres://postgres@localhost/test?host=/var/run/postgresql"
//! cargo bench -p envelope-diesel --bench rows` (`-- --quick` for fewer rows and rounds).

use std::time::Instant;

use diesel::prelude::*;
use envelope_core::{KeyMaterial, Keyring, LocalKms, MemoryKeyStore};
use envelope_diesel::{Encrypted, column};
use envelope_tests::rows_bench::{self, BATCH, Samples};

column!(Payload = "bench.payload");

diesel::table! {
    plain (id) {
        id -> BigInt,
        v -> Binary,
    }
}

diesel::table! {
    sealed (id) {
        id -> BigInt,
        v -> Binary,
    }
}

diesel::table! {
    encrypted (id) {
        id -> BigInt,
        v -> Binary,
    }
}

#[derive(Insertable, Queryable)]
#[diesel(table_name = plain)]
struct PlainRow {
    id: i64,
    v: Vec<u8>,
}

#[derive(Insertable, Queryable)]
#[diesel(table_name = sealed)]
struct SealedRow {
    id: i64,
    v: Vec<u8>,
}

#[derive(Insertable, Queryable)]
#[diesel(table_name = encrypted)]
struct EncryptedRow {
    id: i64,
    v: Encrypted<Vec<u8>, Payload>,
}

fn main() {
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        println!("SKIPPED: set ENVELOPE_TEST_POSTGRES_URL to run the diesel row benchmark");
        return;
    };
    let (n, rounds) = rows_bench::size();
    let mut conn = PgConnection::establish(&url).unwrap();
    let schema = format!(
        "bench_diesel_{}",
        &envelope_core::KeyId::random().unwrap().to_hex()[..10]
    );
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!("SET search_path TO {schema}"),
        "CREATE TABLE plain (id BIGINT PRIMARY KEY, v BYTEA NOT NULL)".into(),
        "CREATE TABLE sealed (id BIGINT PRIMARY KEY, v BYTEA NOT NULL)".into(),
        "CREATE TABLE encrypted (id BIGINT PRIMARY KEY, v BYTEA NOT NULL)".into(),
    ] {
        diesel::sql_query(sql).execute(&mut conn).unwrap();
    }

    let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
    let keyring = Keyring::builder(kms, MemoryKeyStore::new())
        .build()
        .unwrap();
    let _guard = keyring.enter();
    let values = rows_bench::values(n);
    let sealed_values: Vec<Vec<u8>> = values
        .iter()
        .map(|v| envelope_core::column::seal::<Vec<u8>, Payload>(v).unwrap())
        .collect();

    let mut samples: [Samples; 3] = Default::default();
    for round in 0..rounds {
        diesel::sql_query("TRUNCATE plain, sealed, encrypted")
            .execute(&mut conn)
            .unwrap();
        for side in rows_bench::order(3, round) {
            let start = Instant::now();
            for (b, chunk) in values.chunks(BATCH).enumerate() {
                let id = |i: usize| (b * BATCH + i) as i64;
                match side {
                    0 => {
                        let rows: Vec<PlainRow> = chunk
                            .iter()
                            .enumerate()
                            .map(|(i, v)| PlainRow {
                                id: id(i),
                                v: v.clone(),
                            })
                            .collect();
                        diesel::insert_into(plain::table)
                            .values(&rows)
                            .execute(&mut conn)
                    }
                    1 => {
                        let rows: Vec<SealedRow> = sealed_values[b * BATCH..][..chunk.len()]
                            .iter()
                            .enumerate()
                            .map(|(i, v)| SealedRow {
                                id: id(i),
                                v: v.clone(),
                            })
                            .collect();
                        diesel::insert_into(sealed::table)
                            .values(&rows)
                            .execute(&mut conn)
                    }
                    _ => {
                        let rows: Vec<EncryptedRow> = chunk
                            .iter()
                            .enumerate()
                            .map(|(i, v)| EncryptedRow {
                                id: id(i),
                                v: Encrypted::new(v.clone()),
                            })
                            .collect();
                        diesel::insert_into(encrypted::table)
                            .values(&rows)
                            .execute(&mut conn)
                    }
                }
                .unwrap();
            }
            let inserted = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let read = match side {
                0 => plain::table.load::<PlainRow>(&mut conn).unwrap().len(),
                1 => sealed::table.load::<SealedRow>(&mut conn).unwrap().len(),
                _ => {
                    let rows = encrypted::table.load::<EncryptedRow>(&mut conn).unwrap();
                    assert!(rows.iter().all(|r| r.v.len() == 64));
                    rows.len()
                }
            };
            let selected = start.elapsed().as_secs_f64();
            assert_eq!(read, n);
            samples[side].push(inserted, selected);
        }
    }

    let names = [
        "plaintext BYTEA",
        "sealed bytes, no crypto",
        "Encrypted<Vec<u8>, C>",
    ];
    let sides: Vec<(&str, &Samples)> = names.into_iter().zip(&samples).collect();
    rows_bench::report(
        &format!(
            "PostgreSQL (sync diesel), {n} rows of 64 bytes, insert (batches of {BATCH}) + select, {rounds} rounds"
        ),
        n,
        &sides,
    );
    let m = keyring.metrics();
    println!("KMS calls: {} (cache hits {})", m.kms_calls, m.cache_hits);
    diesel::sql_query(format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut conn)
        .unwrap();
}
