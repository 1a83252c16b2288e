//! Values written by `envelope encrypt` read back through envelope-diesel's column types (sync
//! diesel), on SQLite and on PostgreSQL when its URL is set: the CLI and both column-type crates
//! share one plaintext encoding (docs/FORMAT.md section 6).
#![allow(clippy::unwrap_used, clippy::expect_used)]
// `QueryableByName` generates undocumented items.
#![allow(missing_docs)]

mod common;

use common::{Kind, Target};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use envelope_diesel::{Encrypted, EncryptedText, column};

column!(Email = "dr.email");
column!(Ssn = "dr.ssn");
column!(Phone = "dr.phone");

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    email: Encrypted<String, Email>,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    ssn_enc: Encrypted<i64, Ssn>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    phone: EncryptedText<String, Phone>,
}

async fn readback(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("dr");
    let blob = t.blob();
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, ssn BIGINT, ssn_enc {blob}, phone TEXT)"
    ))
    .await;
    let rows: Vec<String> = (1..=500)
        .map(|i| {
            format!(
                "({i}, {}, {}, '+86 {i:08}')",
                t.bytes_literal(format!("u{i}@example.com").as_bytes()),
                7_000 + i
            )
        })
        .collect();
    t.exec(&format!(
        "INSERT INTO {table} (id, email, ssn, phone) VALUES {}",
        rows.join(", ")
    ))
    .await;
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\
         [[table.column]]\nname = \"email\"\nlabel = \"dr.email\"\ntype = \"string\"\n\
         [[table.column]]\nname = \"ssn_enc\"\nlabel = \"dr.ssn\"\ntype = \"i64\"\nsource = \"ssn\"\n\
         [[table.column]]\nname = \"phone\"\nlabel = \"dr.phone\"\ntype = \"string\"\nform = \"text\"\n"
    ));
    t.expect(&["init"], 0);
    t.expect(&["encrypt", "--batch-size", "64"], 0);
    let keyring = t.keyring().await;
    let url = t.url.clone();
    let sql = format!("SELECT id, email, ssn_enc, phone FROM {table} ORDER BY id");
    tokio::task::spawn_blocking(move || {
        let _guard = keyring.enter();
        let rows: Vec<Row> = match kind {
            Kind::Sqlite => {
                let path = url
                    .trim_start_matches("sqlite://")
                    .split('?')
                    .next()
                    .unwrap()
                    .to_owned();
                let mut conn = SqliteConnection::establish(&path).unwrap();
                diesel::sql_query(sql).load(&mut conn).unwrap()
            }
            _ => {
                let mut conn = PgConnection::establish(&url).unwrap();
                diesel::sql_query(sql).load(&mut conn).unwrap()
            }
        };
        assert_eq!(rows.len(), 500);
        for r in rows {
            assert_eq!(*r.email, format!("u{}@example.com", r.id));
            assert_eq!(*r.ssn_enc, 7_000 + r.id);
            assert_eq!(*r.phone, format!("+86 {:08}", r.id));
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_values_read_through_diesel() {
    readback(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_values_read_through_diesel() {
    readback(Kind::Postgres).await;
}
