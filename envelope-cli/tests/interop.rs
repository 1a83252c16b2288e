//! One format, three writers: rows sealed by `envelope encrypt`, by envelope-sqlx and by
//! envelope-diesel (sync diesel) in one table, every field type, then all of them read back by
//! both crates, each through its own key store over the one key table (`SqlxKeyStore`,
//! `DieselKeyStore`), and found by one blind-index probe. SQLite always; PostgreSQL and
//! MariaDB/MySQL when their URLs are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// `diesel::table!` and `QueryableByName` generate undocumented items.
#![allow(missing_docs)]

mod common;

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use common::{Kind, Target, lit};
use diesel::prelude::*;
use envelope_core::{KeyFilter, KeyKind, KeyStore, Keyring, LocalKms};
use envelope_diesel::DieselKeyStore;
use envelope_sqlx::AsJson;
use uuid::Uuid;

envelope_core::column!(CString = "ix.string");
envelope_core::column!(CBytes = "ix.bytes");
envelope_core::column!(CI16 = "ix.i16");
envelope_core::column!(CI32 = "ix.i32");
envelope_core::column!(CI64 = "ix.i64");
envelope_core::column!(CBool = "ix.bool");
envelope_core::column!(CUuid = "ix.uuid");
envelope_core::column!(CDate = "ix.date");
envelope_core::column!(CTs = "ix.ts");
envelope_core::column!(CJson = "ix.json");
envelope_core::column!(CStringText = "ix.string_text");
envelope_core::blind_index!(StringIndex = "ix.string", CaseFolded);

/// The table's fixed name: one interop test per database.
const TABLE: &str = "envelope_interop";
const ROWS: usize = 5;

/// The values of row `i` (0-based within a writer's rows).
#[derive(Clone, Debug, PartialEq)]
struct Values {
    string: String,
    bytes: Vec<u8>,
    i16: i16,
    i32: i32,
    i64: i64,
    bool: bool,
    uuid: Uuid,
    date: NaiveDate,
    ts: DateTime<Utc>,
    json: serde_json::Value,
}

fn values(i: usize) -> Values {
    let strings = [
        "Alice@Example.com",
        "Zoë 😀",
        "",
        "  padded  ",
        "bob@example.org",
    ];
    let dates = [
        "2024-02-29",
        "1970-01-01",
        "9999-12-31",
        "1000-01-01",
        "2000-06-15",
    ];
    let times = [
        "2024-02-29T10:11:12.123456Z",
        "1970-01-01T00:00:00Z",
        "2038-01-19T03:14:08Z",
        "1999-12-31T23:59:59.500Z",
        "2020-05-05T05:05:05.000001Z",
    ];
    let json = [
        r#"{"b": [1, 2], "a": "x"}"#,
        "[]",
        r#""text""#,
        "123",
        r#"{"k": {"nested": true}}"#,
    ];
    Values {
        string: strings[i].to_owned(),
        bytes: [
            vec![0, 1, 2],
            vec![],
            vec![255; 40],
            b"\x01bin".to_vec(),
            vec![7],
        ][i]
            .clone(),
        i16: [-1, 0, i16::MAX, i16::MIN, 5][i],
        i32: [-1, 0, i32::MAX, i32::MIN, 7][i],
        i64: [-1, 0, i64::MAX, i64::MIN, 9][i],
        bool: i.is_multiple_of(2),
        uuid: Uuid::from_u128((i as u128 + 1) * 0x1234_5678_9abc_def0),
        date: NaiveDate::parse_from_str(dates[i], "%Y-%m-%d").unwrap(),
        ts: DateTime::parse_from_rfc3339(times[i])
            .unwrap()
            .with_timezone(&Utc),
        json: serde_json::from_str(json[i]).unwrap(),
    }
}

/// Which writer wrote rows `base + 1 ..= base + ROWS`.
const CLI: i64 = 0;
const SQLX: i64 = 100;
const DIESEL: i64 = 200;

fn expected(id: i64) -> Values {
    values(usize::try_from(id % 100 - 1).unwrap())
}

diesel::table! {
    envelope_interop (id) {
        id -> BigInt,
        c_string -> Nullable<Binary>,
        c_bytes -> Nullable<Binary>,
        c_i16 -> Nullable<Binary>,
        c_i32 -> Nullable<Binary>,
        c_i64 -> Nullable<Binary>,
        c_bool -> Nullable<Binary>,
        c_uuid -> Nullable<Binary>,
        c_date -> Nullable<Binary>,
        c_ts -> Nullable<Binary>,
        c_json -> Nullable<Binary>,
        string_text -> Nullable<Text>,
        string_bidx -> Nullable<Binary>,
    }
}

mod diesel_side {
    use super::*;
    use envelope_diesel::{BlindIndex, Encrypted, EncryptedText};

    /// The row as a diesel application declares it.
    #[derive(Queryable, Selectable, Insertable)]
    #[diesel(table_name = envelope_interop)]
    struct Row {
        id: i64,
        c_string: Option<Encrypted<String, CString>>,
        c_bytes: Option<Encrypted<Vec<u8>, CBytes>>,
        c_i16: Option<Encrypted<i16, CI16>>,
        c_i32: Option<Encrypted<i32, CI32>>,
        c_i64: Option<Encrypted<i64, CI64>>,
        c_bool: Option<Encrypted<bool, CBool>>,
        c_uuid: Option<Encrypted<Uuid, CUuid>>,
        c_date: Option<Encrypted<NaiveDate, CDate>>,
        c_ts: Option<Encrypted<DateTime<Utc>, CTs>>,
        c_json: Option<Encrypted<AsJson<serde_json::Value>, CJson>>,
        string_text: Option<EncryptedText<String, CStringText>>,
        string_bidx: Option<BlindIndex<StringIndex>>,
    }

    impl Row {
        fn new(id: i64, v: Values) -> Row {
            Row {
                id,
                string_bidx: Some(BlindIndex::of(&v.string).unwrap()),
                string_text: Some(EncryptedText::new(v.string.clone())),
                c_string: Some(Encrypted::new(v.string)),
                c_bytes: Some(Encrypted::new(v.bytes)),
                c_i16: Some(Encrypted::new(v.i16)),
                c_i32: Some(Encrypted::new(v.i32)),
                c_i64: Some(Encrypted::new(v.i64)),
                c_bool: Some(Encrypted::new(v.bool)),
                c_uuid: Some(Encrypted::new(v.uuid)),
                c_date: Some(Encrypted::new(v.date)),
                c_ts: Some(Encrypted::new(v.ts)),
                c_json: Some(Encrypted::new(AsJson(v.json))),
            }
        }

        /// The values, and the text form's string.
        fn values(self) -> (i64, Values, String) {
            let text = self.string_text.unwrap().into_inner();
            (
                self.id,
                Values {
                    string: self.c_string.unwrap().into_inner(),
                    bytes: self.c_bytes.unwrap().into_inner(),
                    i16: self.c_i16.unwrap().into_inner(),
                    i32: self.c_i32.unwrap().into_inner(),
                    i64: self.c_i64.unwrap().into_inner(),
                    bool: self.c_bool.unwrap().into_inner(),
                    uuid: self.c_uuid.unwrap().into_inner(),
                    date: self.c_date.unwrap().into_inner(),
                    ts: self.c_ts.unwrap().into_inner(),
                    json: self.c_json.unwrap().into_inner().0,
                },
                text,
            )
        }
    }

    /// Run `body` with a sync diesel connection of the right type for `t`.
    macro_rules! with_connection {
        ($t:expr, |$conn:ident| $body:expr) => {{
            let url = diesel_url($t);
            match $t.kind {
                Kind::Sqlite => {
                    let $conn = &mut SqliteConnection::establish(&url).unwrap();
                    $body
                }
                Kind::Postgres => {
                    let $conn = &mut PgConnection::establish(&url).unwrap();
                    $body
                }
                Kind::MySql => {
                    let $conn = &mut MysqlConnection::establish(&url).unwrap();
                    $body
                }
            }
        }};
    }

    /// What diesel's connections and `DieselKeyStore` take for the target's database.
    pub(crate) fn diesel_url(t: &Target) -> String {
        match t.kind {
            Kind::Sqlite => t
                .url
                .trim_start_matches("sqlite://")
                .split('?')
                .next()
                .unwrap()
                .to_owned(),
            _ => t.url.clone(),
        }
    }

    /// A keyring whose key store is `DieselKeyStore` over the CLI's key table.
    pub(crate) fn keyring(t: &Target) -> Keyring {
        let kms = Arc::new(LocalKms::open(t.dir.path().join("master.key")).unwrap());
        let store = match t.kind {
            Kind::Sqlite => store::<SqliteConnection>(t),
            Kind::Postgres => store::<PgConnection>(t),
            Kind::MySql => store::<MysqlConnection>(t),
        };
        Keyring::builder(kms, store).build().unwrap()
    }

    fn store<C: envelope_diesel::store::KeyTableConnection>(t: &Target) -> Arc<dyn KeyStore>
    where
        C::Backend: envelope_diesel::store::KeyTableBackend,
    {
        Arc::new(
            DieselKeyStore::<C>::connect(&diesel_url(t))
                .unwrap()
                .with_table(&t.key_table())
                .unwrap(),
        )
    }

    pub(crate) fn write(t: &Target) {
        let keyring = keyring(t);
        let _guard = keyring.enter();
        let rows: Vec<Row> = (0..ROWS)
            .map(|i| Row::new(DIESEL + i as i64 + 1, values(i)))
            .collect();
        with_connection!(t, |conn| diesel::insert_into(envelope_interop::table)
            .values(&rows)
            .execute(conn)
            .unwrap());
    }

    /// Every row, and the ids one probe for `string` finds.
    pub(crate) fn read(t: &Target, probe_for: &str) -> (Vec<(i64, Values, String)>, Vec<i64>) {
        let keyring = keyring(t);
        let _guard = keyring.enter();
        let probe = BlindIndex::<StringIndex>::of(probe_for).unwrap();
        with_connection!(t, |conn| {
            let rows: Vec<Row> = envelope_interop::table
                .order(envelope_interop::id)
                .select(Row::as_select())
                .load(conn)
                .unwrap();
            let found: Vec<i64> = envelope_interop::table
                .filter(envelope_interop::string_bidx.eq(&probe))
                .order(envelope_interop::id)
                .select(envelope_interop::id)
                .load(conn)
                .unwrap();
            (rows.into_iter().map(Row::values).collect(), found)
        })
    }
}

mod sqlx_side {
    use super::*;
    use envelope_sqlx::{BlindIndex, Encrypted, EncryptedText};

    /// The row as an sqlx application declares it.
    #[derive(sqlx::FromRow)]
    struct Row {
        id: i64,
        c_string: Encrypted<String, CString>,
        c_bytes: Encrypted<Vec<u8>, CBytes>,
        c_i16: Encrypted<i16, CI16>,
        c_i32: Encrypted<i32, CI32>,
        c_i64: Encrypted<i64, CI64>,
        c_bool: Encrypted<bool, CBool>,
        c_uuid: Encrypted<Uuid, CUuid>,
        c_date: Encrypted<NaiveDate, CDate>,
        c_ts: Encrypted<DateTime<Utc>, CTs>,
        c_json: Encrypted<AsJson<serde_json::Value>, CJson>,
        string_text: EncryptedText<String, CStringText>,
    }

    const COLUMNS: &str = "id, c_string, c_bytes, c_i16, c_i32, c_i64, c_bool, c_uuid, c_date, c_ts, c_json, string_text";

    pub(crate) async fn write(t: &Target) {
        let keyring = t.keyring().await;
        keyring
            .install_for(async {
                for i in 0..ROWS {
                    let v = values(i);
                    let placeholders: Vec<String> = (1..=13).map(|n| t.p(n)).collect();
                    let sql = format!(
                        "INSERT INTO {TABLE} ({COLUMNS}, string_bidx) VALUES ({})",
                        placeholders.join(", ")
                    );
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(SQLX + i as i64 + 1)
                        .bind(Encrypted::<_, CString>::new(v.string.clone()))
                        .bind(Encrypted::<_, CBytes>::new(v.bytes))
                        .bind(Encrypted::<_, CI16>::new(v.i16))
                        .bind(Encrypted::<_, CI32>::new(v.i32))
                        .bind(Encrypted::<_, CI64>::new(v.i64))
                        .bind(Encrypted::<_, CBool>::new(v.bool))
                        .bind(Encrypted::<_, CUuid>::new(v.uuid))
                        .bind(Encrypted::<_, CDate>::new(v.date))
                        .bind(Encrypted::<_, CTs>::new(v.ts))
                        .bind(Encrypted::<_, CJson>::new(AsJson(v.json)))
                        .bind(EncryptedText::<_, CStringText>::new(v.string.clone()))
                        .bind(BlindIndex::<StringIndex>::of(&v.string).unwrap())
                        .execute(&t.pool)
                        .await
                        .unwrap();
                }
            })
            .await;
    }

    pub(crate) async fn read(
        t: &Target,
        probe_for: &str,
    ) -> (Vec<(i64, Values, String)>, Vec<i64>) {
        let keyring = t.keyring().await;
        keyring
            .install_for(async {
                let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM {TABLE} ORDER BY id"
                )))
                .fetch_all(&t.pool)
                .await
                .unwrap();
                let probe = BlindIndex::<StringIndex>::of(probe_for).unwrap();
                let found: Vec<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT id FROM {TABLE} WHERE string_bidx = {} ORDER BY id",
                    t.p(1)
                )))
                .bind(probe)
                .fetch_all(&t.pool)
                .await
                .unwrap();
                let rows = rows
                    .into_iter()
                    .map(|r| {
                        (
                            r.id,
                            Values {
                                string: r.c_string.into_inner(),
                                bytes: r.c_bytes.into_inner(),
                                i16: r.c_i16.into_inner(),
                                i32: r.c_i32.into_inner(),
                                i64: r.c_i64.into_inner(),
                                bool: r.c_bool.into_inner(),
                                uuid: r.c_uuid.into_inner(),
                                date: r.c_date.into_inner(),
                                ts: r.c_ts.into_inner(),
                                json: r.c_json.into_inner().0,
                            },
                            r.string_text.into_inner(),
                        )
                    })
                    .collect();
                (rows, found.into_iter().map(|(id,)| id).collect())
            })
            .await
    }
}

/// The table: a native-typed source per field for the CLI, the sealed columns, the text form
/// and the blind index.
async fn create(t: &Target) {
    let pick = |p: &str, m: &str, s: &str| -> String {
        match t.kind {
            Kind::Postgres => p.into(),
            Kind::MySql => m.into(),
            Kind::Sqlite => s.into(),
        }
    };
    let blob = t.blob();
    let sources = [
        ("string", pick("text", "VARCHAR(400)", "TEXT")),
        ("bytes", pick("bytea", "VARBINARY(100)", "BLOB")),
        ("i16", pick("smallint", "SMALLINT", "INTEGER")),
        ("i32", pick("integer", "INT", "INTEGER")),
        ("i64", pick("bigint", "BIGINT", "INTEGER")),
        ("bool", pick("boolean", "BOOLEAN", "INTEGER")),
        ("uuid", pick("uuid", "CHAR(36)", "TEXT")),
        ("date", pick("date", "DATE", "TEXT")),
        ("ts", pick("timestamptz", "DATETIME(6)", "TEXT")),
        ("json", pick("jsonb", "JSON", "TEXT")),
    ];
    let mut columns = vec!["id BIGINT PRIMARY KEY".to_owned()];
    for (name, ty) in &sources {
        columns.push(format!("src_{name} {ty}"));
        columns.push(format!("c_{name} {blob}"));
    }
    columns.push(format!("src_text {}", pick("text", "VARCHAR(400)", "TEXT")));
    columns.push(format!("string_text {}", t.text()));
    columns.push(format!("string_bidx {blob}"));
    t.exec(&format!("DROP TABLE IF EXISTS {TABLE}")).await;
    t.exec(&format!("CREATE TABLE {TABLE} ({})", columns.join(", ")))
        .await;
}

/// The CLI's rows: plaintext in the sources, then `envelope encrypt`.
async fn cli_write(t: &Target) {
    let my = t.kind == Kind::MySql;
    for i in 0..ROWS {
        let v = values(i);
        let bool_lit = if t.kind == Kind::Postgres {
            v.bool.to_string()
        } else {
            i32::from(v.bool).to_string()
        };
        let ts = if my {
            v.ts.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
        } else {
            v.ts.to_rfc3339()
        };
        t.exec(&format!(
            "INSERT INTO {TABLE} (id, src_string, src_bytes, src_i16, src_i32, src_i64, src_bool, \
             src_uuid, src_date, src_ts, src_json, src_text) VALUES ({}, {}, {}, {}, {}, {}, {bool_lit}, {}, {}, {}, {}, {})",
            CLI + i as i64 + 1,
            lit(&v.string),
            t.bytes_literal(&v.bytes),
            v.i16,
            v.i32,
            v.i64,
            lit(&v.uuid.to_string()),
            lit(&v.date.to_string()),
            lit(&ts),
            lit(&v.json.to_string()),
            lit(&v.string),
        ))
        .await;
    }
    let mut config = format!("[[table]]\nname = \"{TABLE}\"\nprimary_key = \"id\"\n");
    for (name, ty) in [
        ("string", "string"),
        ("bytes", "bytes"),
        ("i16", "i16"),
        ("i32", "i32"),
        ("i64", "i64"),
        ("bool", "bool"),
        ("uuid", "uuid"),
        ("date", "date"),
        ("ts", "timestamp"),
        ("json", "json"),
    ] {
        config.push_str(&format!(
            "[[table.column]]\nname = \"c_{name}\"\nlabel = \"ix.{name}\"\ntype = \"{ty}\"\nsource = \"src_{name}\"\n"
        ));
        if name == "string" {
            config.push_str(
                "blind_index = { column = \"string_bidx\", normalizer = \"case-folded\" }\n",
            );
        }
    }
    config.push_str(
        "[[table.column]]\nname = \"string_text\"\nlabel = \"ix.string_text\"\ntype = \"string\"\nform = \"text\"\nsource = \"src_text\"\n",
    );
    t.write_config(&config);
    t.expect(&["init"], 0);
    t.expect(&["encrypt", "--batch-size", "2"], 0);
}

fn check(reader: &str, rows: &[(i64, Values, String)], found: &[i64]) {
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let want: Vec<i64> = [CLI, SQLX, DIESEL]
        .iter()
        .flat_map(|base| (1..=ROWS as i64).map(move |i| base + i))
        .collect();
    assert_eq!(ids, want, "{reader} reads every writer's rows");
    for (id, values, text) in rows {
        let e = expected(*id);
        assert_eq!(text, &e.string, "{reader}: text form of row {id}");
        assert_eq!(values, &e, "{reader}: row {id}");
    }
    // Row 1 of each writer holds "Alice@Example.com": one probe finds all three.
    assert_eq!(
        found,
        [CLI + 1, SQLX + 1, DIESEL + 1],
        "{reader}: blind index"
    );
}

async fn one_format_three_writers(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    create(&t).await;
    cli_write(&t).await;
    sqlx_side::write(&t).await;
    let t = Arc::new(t);
    let d = t.clone();
    tokio::task::spawn_blocking(move || diesel_side::write(&d))
        .await
        .unwrap();

    // Three data keys (the CLI's, sqlx's, diesel's) and one index key, in one table.
    let store = envelope_sqlx::key_store_for_url(&t.url, &t.key_table())
        .await
        .unwrap();
    let keys = store.list(&KeyFilter::all()).await.unwrap();
    let data = keys.iter().filter(|k| k.kind == KeyKind::Data).count();
    let index = keys.iter().filter(|k| k.kind == KeyKind::Index).count();
    assert!(data >= 3, "each writer made its own data key: {keys:?}");
    assert_eq!(index, 1, "one index key, shared: {keys:?}");

    let (rows, found) = sqlx_side::read(&t, "alice@EXAMPLE.com").await;
    check("sqlx", &rows, &found);
    let d = t.clone();
    let (rows, found) =
        tokio::task::spawn_blocking(move || diesel_side::read(&d, "ALICE@example.com"))
            .await
            .unwrap();
    check("diesel", &rows, &found);

    t.exec(&format!("DROP TABLE {TABLE}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    one_format_three_writers(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    one_format_three_writers(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql() {
    one_format_three_writers(Kind::MySql).await;
}
