//! `envelope init | encrypt | verify | rotate | decrypt | status` end to end on SQLite, and on
//! PostgreSQL and MariaDB/MySQL when their URLs are set: every field type, in place and from a
//! source column, binary and text forms, NULLs left NULL, blind indexes filled; every value read
//! back through envelope-sqlx's column types; bad configurations refused before any write.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;

use chrono::{DateTime, NaiveDate, Utc};
use common::{Kind, Target, lit};
use envelope_core::column::Plaintext;
use envelope_sqlx::{AsJson, BlindIndex, Encrypted, EncryptedText, blind_index, column};
use uuid::Uuid;

const ROWS: usize = 5;

/// The test values, one vector per type, `ROWS` each; row `ROWS + 1` is all NULL.
struct Values {
    string: Vec<String>,
    bytes: Vec<Vec<u8>>,
    i16: Vec<i16>,
    i32: Vec<i32>,
    i64: Vec<i64>,
    bool: Vec<bool>,
    uuid: Vec<Uuid>,
    date: Vec<NaiveDate>,
    timestamp: Vec<DateTime<Utc>>,
    json: Vec<serde_json::Value>,
}

fn values() -> Values {
    let ts = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
    Values {
        string: vec![
            "Alice@Example.com".into(),
            "Zoë 😀".into(),
            String::new(),
            "  padded  ".into(),
            "x".repeat(300),
        ],
        bytes: vec![
            vec![0, 1, 2],
            vec![],
            vec![255; 40],
            b"\x01\x02binary".to_vec(),
            vec![7],
        ],
        i16: vec![-1, 0, i16::MAX, i16::MIN, 5],
        i32: vec![-1, 0, i32::MAX, i32::MIN, 7],
        i64: vec![-1, 0, i64::MAX, i64::MIN, 9],
        bool: vec![true, false, true, false, true],
        uuid: (1..=ROWS as u128)
            .map(|i| Uuid::from_u128(i * 0x1234_5678_9abc_def0))
            .collect(),
        date: [
            "2024-02-29",
            "1970-01-01",
            "9999-12-31",
            "1000-01-01",
            "2000-06-15",
        ]
        .iter()
        .map(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap())
        .collect(),
        timestamp: [
            "2024-02-29T10:11:12.123456Z",
            "1970-01-01T00:00:00Z",
            "2038-01-19T03:14:08Z",
            "1999-12-31T23:59:59.500Z",
            "2020-05-05T05:05:05.000001Z",
        ]
        .iter()
        .map(|s| ts(s))
        .collect(),
        json: [
            r#"{"b": [1, 2], "a": "x"}"#,
            "[]",
            r#""text""#,
            "123",
            r#"{"k": {"nested": true}}"#,
        ]
        .iter()
        .map(|s| serde_json::from_str(s).unwrap())
        .collect(),
    }
}

fn enc<T: Plaintext>(v: &T) -> Vec<u8> {
    v.to_plaintext().unwrap().into_owned()
}

/// One configured column: its name, DDL type, config entry, and the SQL literals of its rows.
struct Col {
    name: &'static str,
    ddl: String,
    /// `(source name, source DDL)` for a column filled from a source.
    source: Option<(String, String)>,
    config: String,
    /// The literal inserted in the column itself (in place) or in the source, per row.
    literals: Vec<String>,
}

fn plan(t: &Target, v: &Values) -> Vec<Col> {
    let pg = t.kind == Kind::Postgres;
    let my = t.kind == Kind::MySql;
    let blob = t.blob();
    let text = t.text();
    let mut cols = Vec::new();
    let mut in_place = |name: &'static str,
                        ty: &str,
                        form: &str,
                        literals: Vec<String>,
                        extra: &str| {
        cols.push(Col {
            name,
            ddl: if form == "text" { text.into() } else { blob.into() },
            source: None,
            config: format!(
                "[[table.column]]\nname = \"{name}\"\nlabel = \"mig.{name}\"\ntype = \"{ty}\"\nform = \"{form}\"\n{extra}\n"
            ),
            literals,
        });
    };
    let b = |x: Vec<u8>| t.bytes_literal(&x);
    in_place(
        "ip_string",
        "string",
        "binary",
        v.string.iter().map(|s| b(enc(s))).collect(),
        "blind_index = { column = \"ip_string_bidx\", normalizer = \"case-folded\" }",
    );
    in_place(
        "ip_bytes",
        "bytes",
        "binary",
        v.bytes.iter().map(|x| b(enc(x))).collect(),
        "",
    );
    in_place(
        "ip_i16",
        "i16",
        "binary",
        v.i16.iter().map(|x| b(enc(x))).collect(),
        "",
    );
    in_place(
        "ip_i32",
        "i32",
        "binary",
        v.i32.iter().map(|x| b(enc(x))).collect(),
        "",
    );
    in_place(
        "ip_i64",
        "i64",
        "binary",
        v.i64.iter().map(|x| b(enc(x))).collect(),
        "",
    );
    in_place(
        "ip_bool",
        "bool",
        "binary",
        v.bool.iter().map(|x| b(enc(x))).collect(),
        "",
    );
    in_place(
        "ip_uuid",
        "uuid",
        "binary",
        v.uuid.iter().map(|x| b(enc(x))).collect(),
        "",
    );
    in_place(
        "ip_date",
        "date",
        "binary",
        v.date.iter().map(|x| b(enc(x))).collect(),
        "",
    );
    in_place(
        "ip_ts",
        "timestamp",
        "binary",
        v.timestamp.iter().map(|x| b(enc(x))).collect(),
        "",
    );
    in_place(
        "ip_json",
        "json",
        "binary",
        v.json.iter().map(|x| b(enc(&AsJson(x.clone())))).collect(),
        "",
    );
    let t_lit = |x: Vec<u8>| lit(&String::from_utf8(x).unwrap());
    in_place(
        "it_string",
        "string",
        "text",
        v.string.iter().map(|s| t_lit(enc(s))).collect(),
        "",
    );
    in_place(
        "it_date",
        "date",
        "text",
        v.date.iter().map(|x| t_lit(enc(x))).collect(),
        "",
    );
    in_place(
        "it_ts",
        "timestamp",
        "text",
        v.timestamp.iter().map(|x| t_lit(enc(x))).collect(),
        "",
    );
    in_place(
        "it_json",
        "json",
        "text",
        v.json
            .iter()
            .map(|x| t_lit(enc(&AsJson(x.clone()))))
            .collect(),
        "",
    );

    let mut from_source = |name: &'static str,
                           ty: &str,
                           form: &str,
                           source_ddl: &str,
                           literals: Vec<String>| {
        let source = format!("src_{name}");
        cols.push(Col {
            name,
            ddl: if form == "text" { text.into() } else { blob.into() },
            source: Some((source.clone(), source_ddl.to_owned())),
            config: format!(
                "[[table.column]]\nname = \"{name}\"\nlabel = \"mig.{name}\"\ntype = \"{ty}\"\nform = \"{form}\"\nsource = \"{source}\"\n"
            ),
            literals,
        });
    };
    let pick = |p: &str, m: &str, s: &str| -> String {
        if pg {
            p.into()
        } else if my {
            m.into()
        } else {
            s.into()
        }
    };
    from_source(
        "s_string",
        "string",
        "binary",
        &pick("text", "VARCHAR(400)", "TEXT"),
        v.string.iter().map(|s| lit(s)).collect(),
    );
    from_source(
        "s_bytes",
        "bytes",
        "binary",
        &pick("bytea", "VARBINARY(100)", "BLOB"),
        v.bytes.iter().map(|x| b(x.clone())).collect(),
    );
    from_source(
        "s_i16",
        "i16",
        "binary",
        &pick("smallint", "SMALLINT", "INTEGER"),
        v.i16.iter().map(|x| x.to_string()).collect(),
    );
    from_source(
        "s_i32",
        "i32",
        "binary",
        &pick("integer", "INT", "INTEGER"),
        v.i32.iter().map(|x| x.to_string()).collect(),
    );
    from_source(
        "s_i64",
        "i64",
        "binary",
        &pick("bigint", "BIGINT", "INTEGER"),
        v.i64.iter().map(|x| x.to_string()).collect(),
    );
    from_source(
        "s_bool",
        "bool",
        "binary",
        &pick("boolean", "BOOLEAN", "INTEGER"),
        v.bool
            .iter()
            .map(|x| {
                if pg {
                    x.to_string()
                } else {
                    i32::from(*x).to_string()
                }
            })
            .collect(),
    );
    from_source(
        "s_uuid",
        "uuid",
        "binary",
        &pick("uuid", "CHAR(36)", "TEXT"),
        v.uuid.iter().map(|x| lit(&x.to_string())).collect(),
    );
    from_source(
        "s_date",
        "date",
        "binary",
        &pick("date", "DATE", "TEXT"),
        v.date.iter().map(|x| lit(&x.to_string())).collect(),
    );
    from_source(
        "s_ts",
        "timestamp",
        "binary",
        &pick("timestamptz", "DATETIME(6)", "TEXT"),
        v.timestamp
            .iter()
            .map(|x| {
                if my {
                    lit(&x.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
                } else {
                    lit(&x.to_rfc3339())
                }
            })
            .collect(),
    );
    from_source(
        "s_json",
        "json",
        "binary",
        &pick("jsonb", "JSON", "TEXT"),
        v.json.iter().map(|x| lit(&x.to_string())).collect(),
    );
    from_source(
        "st_i64",
        "i64",
        "text",
        &pick("bigint", "BIGINT", "INTEGER"),
        v.i64.iter().map(|x| x.to_string()).collect(),
    );
    from_source(
        "st_uuid",
        "uuid",
        "text",
        &pick("uuid", "CHAR(36)", "TEXT"),
        v.uuid.iter().map(|x| lit(&x.to_string())).collect(),
    );
    cols
}

async fn create(t: &Target, table: &str, cols: &[Col]) {
    let mut ddl = vec![
        "id BIGINT PRIMARY KEY".to_owned(),
        format!("ip_string_bidx {}", t.blob()),
    ];
    for c in cols {
        ddl.push(format!("{} {}", c.name, c.ddl));
        if let Some((s, sd)) = &c.source {
            ddl.push(format!("{s} {sd}"));
        }
    }
    t.exec(&format!("CREATE TABLE {table} ({})", ddl.join(", ")))
        .await;
    for row in 0..=ROWS {
        let mut names = vec!["id".to_owned()];
        let mut vals = vec![(row + 1).to_string()];
        if row < ROWS {
            for c in cols {
                names.push(
                    c.source
                        .as_ref()
                        .map_or(c.name.to_owned(), |(s, _)| s.clone()),
                );
                vals.push(c.literals[row].clone());
            }
        }
        t.exec(&format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            vals.join(", ")
        ))
        .await;
    }
}

fn config(table: &str, cols: &[Col]) -> String {
    let mut s = format!("[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n");
    for c in cols {
        s.push_str(&c.config);
        s.push('\n');
    }
    s
}

column!(IpString = "mig.ip_string");
column!(IpBytes = "mig.ip_bytes");
column!(IpI16 = "mig.ip_i16");
column!(IpI32 = "mig.ip_i32");
column!(IpI64 = "mig.ip_i64");
column!(IpBool = "mig.ip_bool");
column!(IpUuid = "mig.ip_uuid");
column!(IpDate = "mig.ip_date");
column!(IpTs = "mig.ip_ts");
column!(IpJson = "mig.ip_json");
column!(ItString = "mig.it_string");
column!(ItDate = "mig.it_date");
column!(ItTs = "mig.it_ts");
column!(ItJson = "mig.it_json");
column!(SString = "mig.s_string");
column!(SBytes = "mig.s_bytes");
column!(SI16 = "mig.s_i16");
column!(SI32 = "mig.s_i32");
column!(SI64 = "mig.s_i64");
column!(SBool = "mig.s_bool");
column!(SUuid = "mig.s_uuid");
column!(SDate = "mig.s_date");
column!(STs = "mig.s_ts");
column!(SJson = "mig.s_json");
column!(StI64 = "mig.st_i64");
column!(StUuid = "mig.st_uuid");
blind_index!(IpStringIndex = "mig.ip_string", CaseFolded);

/// Read column `col` of every row through the column type `W` (`Option<Encrypted<T, C>>` or
/// `Option<EncryptedText<T, C>>`) and compare with `expected` (row `ROWS + 1` must be NULL).
async fn check<W, T>(t: &Target, table: &str, col: &str, expected: &[T], unwrap: impl Fn(W) -> T)
where
    W: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any> + Send + Unpin,
    T: PartialEq + std::fmt::Debug,
{
    let sql = format!("SELECT {col} FROM {table} ORDER BY id");
    let got: Vec<Option<W>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(&t.pool)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{col} on {:?}: {e} {:?}",
                t.kind,
                envelope_sqlx::envelope_error(&e)
            )
        });
    assert_eq!(got.len(), ROWS + 1, "{col}");
    let mut got = got.into_iter();
    for (row, want) in expected.iter().enumerate() {
        let value = got
            .next()
            .flatten()
            .unwrap_or_else(|| panic!("{col} row {row} is NULL on {:?}", t.kind));
        assert_eq!(&unwrap(value), want, "{col} row {row} on {:?}", t.kind);
    }
    assert!(
        got.next().flatten().is_none(),
        "{col}: the NULL row must stay NULL"
    );
}

async fn check_all(t: &Target, table: &str, v: &Values) {
    macro_rules! bin {
        ($col:literal, $ty:ty, $c:ty, $exp:expr) => {
            check::<Encrypted<$ty, $c>, $ty>(t, table, $col, $exp, |w| w.into_inner()).await
        };
    }
    macro_rules! txt {
        ($col:literal, $ty:ty, $c:ty, $exp:expr) => {
            check::<EncryptedText<$ty, $c>, $ty>(t, table, $col, $exp, |w| w.into_inner()).await
        };
    }
    let json: Vec<AsJson<serde_json::Value>> = v.json.iter().cloned().map(AsJson).collect();
    bin!("ip_string", String, IpString, &v.string);
    bin!("ip_bytes", Vec<u8>, IpBytes, &v.bytes);
    bin!("ip_i16", i16, IpI16, &v.i16);
    bin!("ip_i32", i32, IpI32, &v.i32);
    bin!("ip_i64", i64, IpI64, &v.i64);
    bin!("ip_bool", bool, IpBool, &v.bool);
    bin!("ip_uuid", Uuid, IpUuid, &v.uuid);
    bin!("ip_date", NaiveDate, IpDate, &v.date);
    bin!("ip_ts", DateTime<Utc>, IpTs, &v.timestamp);
    bin!("ip_json", AsJson<serde_json::Value>, IpJson, &json);
    txt!("it_string", String, ItString, &v.string);
    txt!("it_date", NaiveDate, ItDate, &v.date);
    txt!("it_ts", DateTime<Utc>, ItTs, &v.timestamp);
    txt!("it_json", AsJson<serde_json::Value>, ItJson, &json);
    bin!("s_string", String, SString, &v.string);
    bin!("s_bytes", Vec<u8>, SBytes, &v.bytes);
    bin!("s_i16", i16, SI16, &v.i16);
    bin!("s_i32", i32, SI32, &v.i32);
    bin!("s_i64", i64, SI64, &v.i64);
    bin!("s_bool", bool, SBool, &v.bool);
    bin!("s_uuid", Uuid, SUuid, &v.uuid);
    bin!("s_date", NaiveDate, SDate, &v.date);
    bin!("s_ts", DateTime<Utc>, STs, &v.timestamp);
    bin!("s_json", AsJson<serde_json::Value>, SJson, &json);
    txt!("st_i64", i64, StI64, &v.i64);
    txt!("st_uuid", Uuid, StUuid, &v.uuid);

    // The blind index is what the application computes for the same value.
    let sql = format!("SELECT ip_string_bidx FROM {table} ORDER BY id");
    let got: Vec<Option<BlindIndex<IpStringIndex>>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(&t.pool)
        .await
        .unwrap();
    for (row, s) in v.string.iter().enumerate() {
        let want = BlindIndex::<IpStringIndex>::of(s.to_lowercase().trim()).unwrap();
        assert_eq!(
            got[row].as_ref(),
            Some(&want),
            "blind index row {row} on {:?}",
            t.kind
        );
    }
    assert!(got[ROWS].is_none());
}

fn per_key(summary: &serde_json::Value) -> std::collections::BTreeSet<String> {
    summary["columns"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| {
            c["per_key"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn every_type_round_trips(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let v = values();
    let table = t.table("mig");
    let cols = plan(&t, &v);
    create(&t, &table, &cols).await;
    t.write_config(&config(&table, &cols));

    t.expect(&["init"], 0);
    t.expect(&["init"], 0); // idempotent
    let out = t.expect(&["verify", "--json"], 1);
    let s = Target::summary(&out);
    assert_eq!(s["columns"][0]["plaintext"], ROWS);

    // A dry run counts and writes nothing.
    let out = t.expect(&["encrypt", "--dry-run", "--json"], 0);
    let s = Target::summary(&out);
    for c in s["columns"].as_array().unwrap() {
        assert_eq!(c["written"], ROWS, "{c}");
    }
    t.expect(&["verify"], 1);

    let out = t.expect(&["encrypt", "--batch-size", "2", "--json"], 0);
    let s = Target::summary(&out);
    for c in s["columns"].as_array().unwrap() {
        assert_eq!(
            (c["seen"].as_i64(), c["written"].as_i64()),
            (Some(ROWS as i64 + 1), Some(ROWS as i64)),
            "{c}"
        );
    }
    let out = t.expect(&["verify", "--json"], 0);
    let s = Target::summary(&out);
    let keys_before = per_key(&s);
    assert_eq!(keys_before.len(), 1, "{out}");
    // Every envelope value agrees with its source (JSONB / MySQL JSON render their own way).
    for c in s["columns"].as_array().unwrap() {
        assert_eq!(c["differs_from_source"], 0, "{c}");
    }
    // A writer that updates only the source column shows up in verify.
    t.exec(&format!("UPDATE {table} SET src_s_i64 = 42 WHERE id = 1"))
        .await;
    let s = Target::summary(&t.expect(&["verify", "--json", "--column", "s_i64"], 0));
    assert_eq!(s["columns"][0]["differs_from_source"], 1, "{s}");
    t.exec(&format!(
        "UPDATE {table} SET src_s_i64 = {} WHERE id = 1",
        v.i64[0]
    ))
    .await;

    let keyring = t.keyring().await;
    keyring.install_for(check_all(&t, &table, &v)).await;

    // A second run over finished columns changes nothing.
    let s = Target::summary(&t.expect(&["encrypt", "--json"], 0));
    assert!(
        s["columns"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["written"] == 0),
        "{s}"
    );

    // Rotation: afterwards no value refers to the old key.
    t.expect(
        &[
            "rotate",
            "--json",
            "--chunk-time",
            "20ms",
            "--max-rate",
            "100000",
        ],
        0,
    );
    let keys_after = per_key(&Target::summary(&t.expect(&["verify", "--json"], 0)));
    assert_eq!(keys_after.len(), 1);
    assert!(keys_after.is_disjoint(&keys_before));
    let keyring = t.keyring().await;
    keyring.install_for(check_all(&t, &table, &v)).await;
    let status = t.expect(&["status", "--json"], 0);
    assert!(
        status.contains(keys_after.iter().next().unwrap()),
        "{status}"
    );
    assert!(status.contains("rotate:"), "{status}");

    // Decrypt needs --yes; then in-place columns hold their plaintext again, and the envelope
    // columns of sources are emptied.
    t.expect(&["decrypt"], 2);
    t.expect(&["decrypt", "--yes"], 0);
    let raw: Vec<Option<Vec<u8>>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT ip_i64 FROM {table} ORDER BY id"
    )))
    .fetch_all(&t.pool)
    .await
    .unwrap();
    for (row, x) in v.i64.iter().enumerate() {
        assert_eq!(raw[row].as_deref(), Some(&x.to_be_bytes()[..]));
    }
    let empty: Vec<Option<Vec<u8>>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT s_ts FROM {table} ORDER BY id"
    )))
    .fetch_all(&t.pool)
    .await
    .unwrap();
    assert!(empty.iter().all(Option::is_none));

    // The sources were written back faithfully: encrypting them again reads back the same.
    t.expect(&["encrypt"], 0);
    let keyring = t.keyring().await;
    keyring.install_for(check_all(&t, &table, &v)).await;
}

/// A value that parses as an envelope but does not open (here: another column's value) is
/// reported by name and never overwritten; bad schemas are refused before any write.
async fn failures_are_reported_and_never_overwritten(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("fail");
    let blob = t.blob();
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, a {blob}, b {blob}, c {})",
        t.text()
    ))
    .await;
    for i in 1..=20 {
        t.exec(&format!(
            "INSERT INTO {table} (id, a, b, c) VALUES ({i}, {}, {}, 'c{i}')",
            t.bytes_literal(format!("a{i}").as_bytes()),
            t.bytes_literal(format!("b{i}").as_bytes())
        ))
        .await;
    }
    let cfg = |cols: &str| format!("[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n{cols}");
    let col = |name: &str, extra: &str| {
        format!(
            "[[table.column]]\nname = \"{name}\"\nlabel = \"fail.{name}\"\ntype = \"string\"\n{extra}\n"
        )
    };
    t.write_config(&cfg(&format!("{}{}", col("a", ""), col("b", ""))));
    t.expect(&["init"], 0);
    t.expect(&["encrypt"], 0);
    // Swap a value into the other column: it parses, but its label does not match.
    t.exec(&format!(
        "UPDATE {table} SET b = (SELECT a FROM {table} WHERE id = 3) WHERE id = 5"
    ))
    .await;
    let before: Vec<u8> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT b FROM {table} WHERE id = 5"
    )))
    .fetch_one(&t.pool)
    .await
    .unwrap();
    let out = t.envelope(&["verify", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let s = Target::summary(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(s["columns"][1]["failures"]["Decrypt"], 1, "{s}");
    assert_eq!(s["columns"][1]["failing_rows"][0][0], "5", "{s}");
    let out = t.envelope(&["encrypt", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: Vec<u8> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT b FROM {table} WHERE id = 5"
    )))
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(before, after, "a failing value must never be overwritten");

    // Schema problems: exit 2, with every problem named, nothing written.
    t.write_config(&cfg(&format!("{}{}", col("missing", ""), col("c", ""))));
    let out = t.envelope(&["encrypt"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing: the column does not exist"), "{err}");
    if kind != Kind::Sqlite {
        assert!(err.contains("cannot hold binary envelope values"), "{err}");
    }
    let c: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT c FROM {table} WHERE id = 1"
    )))
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(c, "c1");
    if kind != Kind::Sqlite {
        // A VARCHAR too short for the text form of its longest value.
        let short = t.table("short");
        t.exec(&format!(
            "CREATE TABLE {short} (id BIGINT PRIMARY KEY, v VARCHAR(40))"
        ))
        .await;
        t.exec(&format!("INSERT INTO {short} (id, v) VALUES (1, 'hello')"))
            .await;
        t.write_config(&format!(
            "[[table]]\nname = \"{short}\"\nprimary_key = \"id\"\n\n[[table.column]]\nname = \"v\"\nlabel = \"short.v\"\ntype = \"string\"\nform = \"text\"\n"
        ));
        let out = t.envelope(&["encrypt"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("widen the column"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

per_database!(
    every_type_round_trips,
    failures_are_reported_and_never_overwritten
);

#[test]
fn usage_and_unreachable_databases_have_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_envelope"))
            .current_dir(dir.path())
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("ENVELOPE_CONFIG")
            .output()
            .unwrap()
    };
    // No configuration file.
    let out = run(&["encrypt"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("envelope.toml"));
    // A server that does not answer.
    let key = dir.path().join("m.key");
    assert!(
        run(&["keygen", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    std::fs::write(
        dir.path().join("envelope.toml"),
        format!(
            "database_url = \"postgres://nobody@127.0.0.1:1/none\"\nkms = \"local://{}\"\n[[table]]\nname = \"t\"\nprimary_key = \"id\"\n[[table.column]]\nname = \"c\"\nlabel = \"t.c\"\ntype = \"string\"\n",
            key.display()
        ),
    )
    .unwrap();
    let out = run(&["verify"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Help documents the exit codes.
    let help = String::from_utf8_lossy(&run(&["--help"]).stdout).into_owned();
    for code in ["130", "database or the KMS cannot be reached"] {
        assert!(help.contains(code), "{help}");
    }
}

/// `kms = "tencent://REGION/CMK_ID"` against our emulator (which checks every TC3 signature),
/// with a fifth of the KMS calls failing: the provider and the CLI retry, and the job finishes.
/// Credentials come from the environment only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tencent_key_uri_on_the_emulator() {
    use envelope_core::kms::tencent::{TencentConfig, TencentKms};
    use envelope_kms_emulator::{Emulator, EmulatorConfig};

    let Some(t) = Target::new(Kind::Sqlite).await else {
        return;
    };
    let mut config = EmulatorConfig::local("AKIDcli", "cli-secret-key");
    config.faults.fail_rate = 0.2;
    let emulator = Emulator::start(config).unwrap();
    let kms = TencentKms::new(
        TencentConfig::new(
            "AKIDcli",
            envelope_core::SecretString::new("cli-secret-key"),
            "ap-guangzhou",
        )
        .with_endpoint(emulator.endpoint()),
    )
    .unwrap();
    let mut cmk = None;
    for _ in 0..10 {
        if let Ok(meta) = kms.create_key("cli-test", "envelope CLI test").await {
            cmk = Some(meta.key_id);
            break;
        }
    }
    let cmk = cmk.expect("CreateKey on the emulator");

    let table = t.table("tc");
    t.exec(&format!(
        "CREATE TABLE {table} (id INTEGER PRIMARY KEY, secret BLOB)"
    ))
    .await;
    for i in 1..=50 {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({i}, {})",
            t.bytes_literal(format!("s{i}").as_bytes())
        ))
        .await;
    }
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n[[table.column]]\nname = \"secret\"\nlabel = \"tc.secret\"\ntype = \"string\"\n"
    ));
    let uri = format!("tencent://ap-guangzhou/{cmk}");
    let endpoint = emulator.endpoint();
    let env = [
        ("TENCENTCLOUD_SECRET_ID", "AKIDcli"),
        ("TENCENTCLOUD_SECRET_KEY", "cli-secret-key"),
        ("ENVELOPE_TENCENT_ENDPOINT", endpoint.as_str()),
    ];
    // Without credentials: a usage error, before anything is written.
    let out = t.envelope(&["--kms", &uri, "init"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TENCENTCLOUD_SECRET_ID"));
    t.expect_with_env(&["--kms", &uri, "init"], &env, 0);
    t.expect_with_env(&["--kms", &uri, "encrypt", "--batch-size", "7"], &env, 0);
    let v = Target::summary(&t.expect_with_env(&["--kms", &uri, "verify", "--json"], &env, 0));
    assert_eq!(
        v["columns"][0]["per_key"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap(),
        50
    );
    // A KMS that does not answer: exit 3 once the patience runs out.
    let dead = [
        ("TENCENTCLOUD_SECRET_ID", "AKIDcli"),
        ("TENCENTCLOUD_SECRET_KEY", "cli-secret-key"),
        ("ENVELOPE_TENCENT_ENDPOINT", "http://127.0.0.1:1"),
    ];
    t.expect_with_env(&["--kms", &uri, "rotate", "--patience", "1s"], &dead, 3);
    // The key table says which CMK wraps the data key.
    let cmk_in_table: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT cmk_id FROM {} LIMIT 1",
        t.key_table()
    )))
    .fetch_one(&t.pool)
    .await
    .unwrap();
    assert_eq!(cmk_in_table, cmk);
}

/// `rotate --key ID` moves only that key's values; `rotate --retired` only retired keys'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_selects_keys() {
    let Some(t) = Target::new(Kind::Sqlite).await else {
        return;
    };
    let table = t.table("rot");
    t.exec(&format!(
        "CREATE TABLE {table} (id INTEGER PRIMARY KEY, v BLOB)"
    ))
    .await;
    for i in 1..=30 {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({i}, {})",
            t.bytes_literal(format!("v{i}").as_bytes())
        ))
        .await;
    }
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n[[table.column]]\nname = \"v\"\nlabel = \"rot.v\"\ntype = \"string\"\n"
    ));
    let keys = || {
        let s = Target::summary(
            &t.envelope(&["verify", "--json"])
                .stdout
                .iter()
                .map(|&b| b as char)
                .collect::<String>(),
        );
        s["columns"][0]["per_key"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, n)| (k.clone(), n.as_i64().unwrap()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    t.expect(&["init"], 0);
    t.expect(&["encrypt", "--limit", "10"], 0);
    t.expect(&["rotate"], 0);
    let after_rotate = keys();
    assert_eq!(after_rotate.values().sum::<i64>(), 10, "{after_rotate:?}");
    let b = after_rotate.keys().next().unwrap().clone();
    t.expect(&["encrypt"], 0);
    let before = keys();
    assert_eq!(before.len(), 2, "{before:?}");
    let c = before.keys().find(|k| **k != b).unwrap().clone();
    assert_eq!(before[&c], 20);

    let s = Target::summary(&t.expect(&["rotate", "--key", &b, "--json"], 0));
    assert_eq!(s["columns"][0]["written"], 10, "{s}");
    let after = keys();
    assert!(!after.contains_key(&b), "{after:?}");
    assert_eq!(
        after.get(&c),
        Some(&20),
        "values under other keys stay: {after:?}"
    );
    assert_eq!(after.values().sum::<i64>(), 30);

    // No value is under a retired key any more: nothing to do.
    let s = Target::summary(&t.expect(&["rotate", "--retired", "--json"], 0));
    assert_eq!(s["columns"][0]["written"], 0, "{s}");
    // An id the key table does not hold is refused.
    t.expect(&["rotate", "--key", "00000000000000000000000000000000"], 2);
}
