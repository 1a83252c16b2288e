//! `envelope encrypt` and `decrypt` on the unsigned and `datetime` field types, from native
//! source columns (SMALLINT UNSIGNED, numeric, DATETIME(6), PostgreSQL `timestamp`, ...), on
//! SQLite always and on PostgreSQL and MariaDB/MySQL when their URLs are set: the values open
//! with the libraries' decoding (`Plaintext`) and come back to the sources unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::NaiveDateTime;
use common::{Kind, Target, lit};
use envelope_core::Label;
use envelope_core::column::Plaintext;

/// A row's sealed columns: id, u16, u32, u64, datetime.
type Sealed = (i64, Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>);
/// A row's source columns as text.
type AsText = (i64, String, String, String, String);

/// Rows: id, u16, u32, u64 (as text: beyond i64 where the database allows), datetime.
fn rows(kind: Kind) -> Vec<(i64, u16, u32, String, &'static str)> {
    // SQLite integers stop at i64::MAX.
    let big = if kind == Kind::Sqlite {
        i64::MAX.to_string()
    } else {
        u64::MAX.to_string()
    };
    vec![
        (1, 0, 0, "0".into(), "1970-01-01T00:00:00"),
        (2, u16::MAX, u32::MAX, big, "2024-02-29T10:11:12.250"),
        (3, 7, 8, "9".into(), "1999-12-31T23:59:59.000001"),
    ]
}

async fn run(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("ft");
    let pick = |p: &'static str, m: &'static str, s: &'static str| match kind {
        Kind::Postgres => p,
        Kind::MySql => m,
        Kind::Sqlite => s,
    };
    let blob = t.blob();
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, \
         src_u16 {}, c_u16 {blob}, src_u32 {}, c_u32 {blob}, \
         src_u64 {}, c_u64 {blob}, src_dt {}, c_dt {blob})",
        pick("integer", "SMALLINT UNSIGNED", "INTEGER"),
        pick("bigint", "INT UNSIGNED", "INTEGER"),
        pick("numeric(20)", "BIGINT UNSIGNED", "INTEGER"),
        pick("timestamp", "DATETIME(6)", "TEXT"),
    ))
    .await;
    for (id, a, b, c, dt) in rows(kind) {
        // MySQL's DATETIME and PostgreSQL's timestamp take a space; SQLite keeps the text.
        let dt = if kind == Kind::Sqlite {
            dt.to_owned()
        } else {
            dt.replace('T', " ")
        };
        t.exec(&format!(
            "INSERT INTO {table} (id, src_u16, src_u32, src_u64, src_dt) VALUES ({id}, {a}, {b}, {c}, {})",
            lit(&dt)
        ))
        .await;
    }
    let mut config = format!("[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n");
    for (name, ty) in [
        ("u16", "u16"),
        ("u32", "u32"),
        ("u64", "u64"),
        ("dt", "datetime"),
    ] {
        config.push_str(&format!(
            "[[table.column]]\nname = \"c_{name}\"\nlabel = \"ft.{name}\"\ntype = \"{ty}\"\nsource = \"src_{name}\"\n"
        ));
    }
    t.write_config(&config);
    t.expect(&["init"], 0);
    t.expect(&["encrypt"], 0);

    // What the application's column types read: the libraries' own decoding.
    let keyring = t.keyring().await;
    let label = |name: &str| Label::new(format!("ft.{name}")).unwrap();
    let sealed: Vec<Sealed> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, c_u16, c_u32, c_u64, c_dt FROM {table} ORDER BY id"
    )))
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert_eq!(sealed.len(), 3);
    for ((id, a, b, c, dt), (want_id, wa, wb, wc, wdt)) in sealed.into_iter().zip(rows(kind)) {
        assert_eq!(id, want_id);
        let a = keyring.decrypt(&label("u16"), &a).await.unwrap();
        let b = keyring.decrypt(&label("u32"), &b).await.unwrap();
        let c = keyring.decrypt(&label("u64"), &c).await.unwrap();
        let dt = keyring.decrypt(&label("dt"), &dt).await.unwrap();
        assert_eq!(u16::from_plaintext(a).unwrap(), wa, "{kind:?} row {id}");
        assert_eq!(u32::from_plaintext(b).unwrap(), wb, "{kind:?} row {id}");
        assert_eq!(
            u64::from_plaintext(c).unwrap().to_string(),
            wc,
            "{kind:?} row {id}"
        );
        assert_eq!(
            NaiveDateTime::from_plaintext(dt).unwrap(),
            NaiveDateTime::parse_from_str(wdt, "%Y-%m-%dT%H:%M:%S%.f").unwrap(),
            "{kind:?} row {id}"
        );
    }

    // And back out: the sources, emptied, get the same values again.
    t.exec(&format!(
        "UPDATE {table} SET src_u16 = NULL, src_u32 = NULL, src_u64 = NULL, src_dt = NULL"
    ))
    .await;
    t.expect(&["decrypt", "--yes"], 0);
    let text = |col: &str| match kind {
        Kind::Postgres => format!("CAST({col} AS TEXT)"),
        Kind::MySql => format!("CAST({col} AS CHAR)"),
        Kind::Sqlite => format!("CAST({col} AS TEXT)"),
    };
    let dt_text = match kind {
        Kind::Postgres => "to_char(src_dt, 'YYYY-MM-DD\"T\"HH24:MI:SS.US')".to_owned(),
        Kind::MySql => "DATE_FORMAT(src_dt, '%Y-%m-%dT%H:%i:%s.%f')".to_owned(),
        Kind::Sqlite => "src_dt".to_owned(),
    };
    let back: Vec<AsText> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, {}, {}, {}, {dt_text} FROM {table} ORDER BY id",
        text("src_u16"),
        text("src_u32"),
        text("src_u64"),
    )))
    .fetch_all(&t.pool)
    .await
    .unwrap();
    for ((id, a, b, c, dt), (_, wa, wb, wc, wdt)) in back.into_iter().zip(rows(kind)) {
        assert_eq!(
            (a, b, c),
            (wa.to_string(), wb.to_string(), wc.clone()),
            "{kind:?} row {id}"
        );
        let dt = NaiveDateTime::parse_from_str(&dt, "%Y-%m-%dT%H:%M:%S%.f").unwrap();
        assert_eq!(
            dt,
            NaiveDateTime::parse_from_str(wdt, "%Y-%m-%dT%H:%M:%S%.f").unwrap(),
            "{kind:?} row {id}"
        );
    }
    t.exec(&format!("DROP TABLE {table}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    run(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    run(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql() {
    run(Kind::MySql).await;
}
