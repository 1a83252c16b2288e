// A benchmark: a failed setup should panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(missing_docs)]
//! What a cold start costs a sync diesel application: the first read of rows under k keys that
//! the keyring has not cached. Each key is read from the key table through `DieselKeyStore` and
//! unwrapped by the KMS (the local provider here, so what is left is the store and the bridge)
//! inside `FromSql`. k rows, one per key, are loaded in one query by a fresh keyring, then again
//! by the same keyring (warm); the same cold read with the keys in a `MemoryKeyStore` separates
//! the key table's cost from the rest. Rounds interleave the three; medians are printed.
//!
//! `ENVELOPE_TEST_POSTGRES_URL="postgres://postgres@localhost/test?host=/var/run/postgresql"
//! cargo bench -p envelope-diesel --bench cold_start` (SQLite in a temporary file always).

use std::sync::Arc;
use std::time::Instant;

use diesel::prelude::*;
use envelope_core::{KeyFilter, KeyMaterial, KeyStore, Keyring, LocalKms, MemoryKeyStore};
use envelope_diesel::{DieselKeyStore, Encrypted, column};

column!(Payload = "bench.cold");

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = diesel::sql_types::Binary)]
    v: Encrypted<Vec<u8>, Payload>,
}

const KEYS: [usize; 3] = [1, 10, 100];
const ROUNDS: usize = 7;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

macro_rules! bench {
    ($name:ident, $conn:ty) => {
fn $name(name: &str, url: &str, blob: &str, placeholder: &str) {
    let kms = Arc::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
    let cmk = kms.cmk_id().to_owned();
    println!("\n{name}: first read of k rows under k keys not cached (median of {ROUNDS} rounds)");
    println!(
        "{:>5} {:>14} {:>14} {:>12} {:>16} {:>12}",
        "k", "cold, diesel", "cold, memory", "warm", "per key, table", "cold / warm"
    );
    for k in KEYS {
        let tag = &envelope_core::KeyId::random().unwrap().to_hex()[..10];
        let (keys, data) = (format!("keys_{tag}"), format!("cold_{tag}"));
        let store = Arc::new(
            DieselKeyStore::<$conn>::connect(url)
                .unwrap()
                .with_table(&keys)
                .unwrap(),
        );
        store.create_table().unwrap();
        let mut conn = <$conn>::establish(url).unwrap();
        diesel::sql_query(format!(
            "CREATE TABLE {data} (id BIGINT PRIMARY KEY, v {blob} NOT NULL)"
        ))
        .execute(&mut conn)
        .unwrap();
        // One keyring per row: each makes a data key of its own.
        for i in 0..k {
            let writer = Keyring::builder(kms.clone(), store.clone()).cmk(cmk.clone())
                .build()
                .unwrap();
            let _guard = writer.enter();
            diesel::sql_query(format!(
                "INSERT INTO {data} (id, v) VALUES ({i}, {placeholder})"
            ))
            .bind::<diesel::sql_types::Binary, _>(Encrypted::<Vec<u8>, Payload>::new(vec![7; 64]))
            .execute(&mut conn)
            .unwrap();
        }
        let memory = Arc::new(MemoryKeyStore::new());
        for r in block(store.list(&KeyFilter::all())).unwrap() {
            block(memory.insert(&r)).unwrap();
        }
        let read = |keyring: &Keyring, conn: &mut $conn| {
            let _guard = keyring.enter();
            let start = Instant::now();
            let rows: Vec<Row> = diesel::sql_query(format!("SELECT v FROM {data}"))
                .load(conn)
                .unwrap();
            assert_eq!(rows.len(), k);
            assert!(rows.iter().all(|r| r.v.len() == 64));
            start.elapsed().as_secs_f64()
        };
        let (mut cold, mut cold_memory, mut warm) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let through_table = Keyring::builder(kms.clone(), store.clone()).cmk(cmk.clone())
                .build()
                .unwrap();
            let in_memory = Keyring::builder(kms.clone(), memory.clone()).cmk(cmk.clone())
                .build()
                .unwrap();
            if round % 2 == 0 {
                cold.push(read(&through_table, &mut conn));
                cold_memory.push(read(&in_memory, &mut conn));
            } else {
                cold_memory.push(read(&in_memory, &mut conn));
                cold.push(read(&through_table, &mut conn));
            }
            warm.push(read(&through_table, &mut conn));
        }
        let (c, m, w) = (median(cold), median(cold_memory), median(warm));
        println!(
            "{k:>5} {:>11.3} ms {:>11.3} ms {:>9.3} ms {:>13.1} µs {:>11.1}×",
            c * 1e3,
            m * 1e3,
            w * 1e3,
            (c - m) / k as f64 * 1e6,
            c / w
        );
        for t in [&data, &keys] {
            diesel::sql_query(format!("DROP TABLE {t}"))
                .execute(&mut conn)
                .unwrap();
        }
    }
}
    };
}

bench!(bench_sqlite, SqliteConnection);
bench!(bench_postgres, PgConnection);

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    bench_sqlite("SQLite", path.to_str().unwrap(), "BLOB", "?");
    match std::env::var("ENVELOPE_TEST_POSTGRES_URL") {
        Ok(url) => bench_postgres("PostgreSQL", &url, "BYTEA", "$1"),
        Err(_) => println!("SKIPPED: set ENVELOPE_TEST_POSTGRES_URL to run it on PostgreSQL"),
    }
}
