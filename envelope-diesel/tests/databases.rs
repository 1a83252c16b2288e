//! Encrypted diesel columns on real databases, with sync diesel: SQLite always; PostgreSQL when
//! `ENVELOPE_TEST_POSTGRES_URL` is set, MariaDB/MySQL when `ENVELOPE_TEST_MYSQL_URL` is
//! (`bash .ci/run` sets both; sync diesel's MySQL connection links libmysqlclient, which `.ci/run`
//! installs). diesel-async runs in `tests/async_databases.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// `diesel::table!` generates undocumented public items.
#![allow(missing_docs)]

use diesel::prelude::*;
use envelope_core::{Error, FormatError, Keyring, Label, format};
use envelope_diesel::{AsJson, BlindIndex, Encrypted};
use envelope_tests::Fixture;

mod common;
use common::*;

macro_rules! suite {
    ($module:ident, $conn:ty, $open:path, $create:literal, $blob:literal, $text:literal, $id:literal) => {
        mod $module {
            use super::*;

            const DDL: &str = concat!(
                $create,
                " people (id ",
                $id,
                " PRIMARY KEY, name ",
                $blob,
                " NOT NULL, photo ",
                $blob,
                ", age ",
                $blob,
                ", small ",
                $blob,
                ", big ",
                $blob,
                ", flag ",
                $blob,
                ", ident ",
                $blob,
                ", born ",
                $blob,
                ", seen ",
                $blob,
                ", notes ",
                $blob,
                ", email ",
                $blob,
                ", email_bidx ",
                $blob,
                ", phone ",
                $text,
                ")"
            );

            fn setup() -> Option<($conn, Fixture)> {
                let mut conn = $open()?;
                diesel::sql_query(DDL).execute(&mut conn).unwrap();
                Some((conn, Fixture::new()))
            }

            fn insert(conn: &mut $conn, rows: &[Person]) {
                diesel::insert_into(people::table)
                    .values(rows)
                    .execute(conn)
                    .unwrap();
            }

            fn load(conn: &mut $conn, id: i64) -> QueryResult<Person> {
                people::table
                    .find(id)
                    .select(Person::as_select())
                    .first(conn)
            }

            #[test]
            fn every_type_round_trips_and_null_stays_null() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                let _guard = fx.keyring.enter();
                let rows = vec![full(1, "ada@example.com"), empty(2)];
                insert(&mut conn, &rows);
                assert_eq!(load(&mut conn, 1).unwrap(), rows[0]);
                assert_eq!(load(&mut conn, 2).unwrap(), rows[1]);
                let raw: Raw = diesel::sql_query("SELECT photo AS v FROM people WHERE id = 2")
                    .get_result(&mut conn)
                    .unwrap();
                assert!(raw.v.is_none(), "NULL must be stored as NULL");
                // Updates go through the same ToSql.
                diesel::update(people::table.find(2))
                    .set(people::age.eq(Some(Encrypted::<i32, Age>::new(41))))
                    .execute(&mut conn)
                    .unwrap();
                assert_eq!(load(&mut conn, 2).unwrap().age.map(|a| *a), Some(41));
                assert_eq!(fx.calls.generates(), 2, "one data key and one index key");
            }

            #[test]
            fn stored_bytes_hold_no_plaintext() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                let _guard = fx.keyring.enter();
                insert(&mut conn, &[full(1, "secret.person@example.com")]);
                let raw: Raw = diesel::sql_query("SELECT email AS v FROM people WHERE id = 1")
                    .get_result(&mut conn)
                    .unwrap();
                let stored = raw.v.unwrap();
                assert!(!stored.windows(6).any(|w| w == b"secret"));
                format::parse(&stored).unwrap();
                assert_eq!(
                    stored.len(),
                    format::sealed_len("secret.person@example.com".len())
                );
                let text: RawText = diesel::sql_query("SELECT phone AS v FROM people WHERE id = 1")
                    .get_result(&mut conn)
                    .unwrap();
                let text = text.v.unwrap();
                assert!(text.starts_with("ev1:"), "{text}");
                assert!(!text.contains("7946"));
            }

            #[test]
            fn large_values_round_trip() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                let _guard = fx.keyring.enter();
                let mut p = empty(1);
                let photo: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
                p.photo = Some(Encrypted::new(photo.clone()));
                insert(&mut conn, &[p]);
                assert_eq!(*load(&mut conn, 1).unwrap().photo.unwrap(), photo);
            }

            #[test]
            fn blind_index_finds_the_row_by_any_spelling() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                let _guard = fx.keyring.enter();
                insert(
                    &mut conn,
                    &[full(1, "Ada@Example.com"), full(2, "bob@example.com")],
                );
                let probe = BlindIndex::<EmailIndex>::of("  ada@EXAMPLE.com ").unwrap();
                let found: Vec<Person> = people::table
                    .filter(people::email_bidx.eq(&probe))
                    .select(Person::as_select())
                    .load(&mut conn)
                    .unwrap();
                assert_eq!(found.len(), 1);
                assert_eq!(found[0].id, 1);
                assert_eq!(
                    found[0].email.as_deref().map(String::as_str),
                    Some("Ada@Example.com")
                );
            }

            #[test]
            fn probes_find_rows_indexed_under_the_old_and_the_new_index_key() {
                use envelope_core::{KeyFilter, KeyKind, KeyStore};
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                let _guard = fx.keyring.enter();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                insert(&mut conn, &[full(1, "ada@example.com")]);
                // A rotation starts: the index key is retired, the next row gets a new one.
                let index_keys = KeyFilter {
                    kind: Some(KeyKind::Index),
                    ..KeyFilter::default()
                };
                let old = rt.block_on(fx.store.list(&index_keys)).unwrap()[0].id;
                rt.block_on(fx.store.retire(&old, std::time::SystemTime::now()))
                    .unwrap();
                rt.block_on(fx.keyring.refresh_keys()).unwrap();
                insert(&mut conn, &[full(2, "bob@example.com")]);
                for (id, email) in [(1, "ADA@example.com"), (2, "Bob@example.com")] {
                    let probes = BlindIndex::<EmailIndex>::probes(email).unwrap();
                    assert_eq!(probes.len(), 2);
                    let found: Vec<i64> = people::table
                        .filter(people::email_bidx.eq_any(&probes))
                        .select(people::id)
                        .load(&mut conn)
                        .unwrap();
                    assert_eq!(found, [id], "{email}");
                }
                // The write key alone finds only the row indexed under it.
                let only_new = BlindIndex::<EmailIndex>::of("ada@example.com").unwrap();
                let found: Vec<i64> = people::table
                    .filter(people::email_bidx.eq(&only_new))
                    .select(people::id)
                    .load(&mut conn)
                    .unwrap();
                assert!(found.is_empty());
            }

            #[test]
            fn a_value_copied_into_another_column_fails_to_open() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                let _guard = fx.keyring.enter();
                insert(&mut conn, &[full(1, "ada@example.com")]);
                diesel::sql_query("UPDATE people SET name = email WHERE id = 1")
                    .execute(&mut conn)
                    .unwrap();
                let err = load(&mut conn, 1).unwrap_err();
                assert!(
                    matches!(the_envelope_error(&err), Error::Decrypt { .. }),
                    "{err}"
                );
                // diesel's message names the field only; the report adds why.
                let cause = the_envelope_error(&err).to_string();
                assert!(!err.to_string().contains(&cause), "{err}");
                let report = envelope_diesel::report(&err).to_string();
                assert_eq!(report, format!("{err}: {cause}"));
                assert!(report.contains("'name'"), "{report}");
            }

            #[test]
            fn legacy_plaintext_fails_closed_unless_the_window_is_open() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                let _guard = fx.keyring.enter();
                insert(&mut conn, &[empty(1)]);
                diesel::update(people::table.find(1))
                    .set(people::email.eq(Some(b"legacy@example.com".to_vec())))
                    .execute(&mut conn)
                    .unwrap();
                let err = load(&mut conn, 1).unwrap_err();
                assert!(
                    matches!(
                        the_envelope_error(&err),
                        Error::Format(FormatError::NotEnvelope)
                    ),
                    "{err}"
                );
                let label = Label::new("people.email").unwrap();
                fx.keyring.open_migration_window(&label);
                let p = load(&mut conn, 1).unwrap();
                assert_eq!(
                    p.email.as_deref().map(String::as_str),
                    Some("legacy@example.com")
                );
                fx.keyring.close_migration_window(&label);
                assert!(load(&mut conn, 1).is_err());
                // Whatever the parser rejects is legacy plaintext inside the window, also a
                // value whose first byte happens to look like a (future) format version.
                diesel::update(people::table.find(1))
                    .set(people::email.eq(Some(b"\tTAB-led legacy".to_vec())))
                    .execute(&mut conn)
                    .unwrap();
                fx.keyring.open_migration_window(&label);
                assert_eq!(
                    load(&mut conn, 1)
                        .unwrap()
                        .email
                        .as_deref()
                        .map(String::as_str),
                    Some("\tTAB-led legacy")
                );
                // But a value that parses as an envelope must open, window or not.
                insert(&mut conn, &[full(2, "ada@example.com")]);
                diesel::sql_query("UPDATE people SET email = name WHERE id = 2")
                    .execute(&mut conn)
                    .unwrap();
                let err = load(&mut conn, 2).unwrap_err();
                assert!(
                    matches!(the_envelope_error(&err), Error::Decrypt { .. }),
                    "{err}"
                );
                fx.keyring.close_migration_window(&label);
            }

            #[test]
            fn json_fails_the_write_when_it_cannot_encode_and_never_leaks_on_read() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                let _guard = fx.keyring.enter();
                insert(&mut conn, &[empty(1)]);
                // A map with non-string keys has no JSON form: the update fails, nothing written.
                let mut bad = std::collections::HashMap::new();
                bad.insert((1, 2), "x".to_owned());
                let bad: Encrypted<AsJson<std::collections::HashMap<(i32, i32), String>>, Notes> =
                    Encrypted::new(AsJson(bad));
                let err = diesel::update(people::table.find(1))
                    .set(people::notes.eq(Some(bad)))
                    .execute(&mut conn)
                    .unwrap_err();
                assert!(
                    matches!(the_envelope_error(&err), Error::PlaintextEncode { .. }),
                    "{err}"
                );
                assert!(load(&mut conn, 1).unwrap().notes.is_none());
                // A stored value read as the wrong type: the error says where, never what.
                let mut p = empty(2);
                p.notes = Some(Encrypted::new(AsJson(NoteBody {
                    text: "078-05-1120".into(),
                    tags: vec![],
                })));
                insert(&mut conn, &[p]);
                #[derive(Debug, serde::Serialize, serde::Deserialize)]
                struct Other {
                    text: i64,
                }
                let err = people::table
                    .find(2)
                    .select(people::notes)
                    .first::<Option<Encrypted<AsJson<Other>, Notes>>>(&mut conn)
                    .unwrap_err();
                let cause = the_envelope_error(&err).to_string();
                assert!(cause.contains("line 1 column"), "{cause}");
                for shown in [err.to_string(), format!("{err:?}"), cause] {
                    assert!(!shown.contains("078-05-1120"), "{shown}");
                }
            }

            #[test]
            fn no_keyring_is_a_clear_error_not_a_panic() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                {
                    let _guard = fx.keyring.enter();
                    insert(&mut conn, &[empty(1)]);
                }
                // No guard, no default: reads and writes say what is missing.
                let err = load(&mut conn, 1).unwrap_err();
                assert!(
                    matches!(
                        the_envelope_error(&err),
                        Error::Misuse(envelope_core::Misuse::NoKeyring)
                    ),
                    "{err}"
                );
                let err = diesel::insert_into(people::table)
                    .values(&empty(2))
                    .execute(&mut conn)
                    .unwrap_err();
                assert!(
                    matches!(
                        the_envelope_error(&err),
                        Error::Misuse(envelope_core::Misuse::NoKeyring)
                    ),
                    "{err}"
                );
            }

            #[test]
            fn a_cold_keyring_loads_each_key_once() {
                let Some((mut conn, fx)) = setup() else {
                    return;
                };
                {
                    let _guard = fx.keyring.enter();
                    let rows: Vec<Person> = (0..50)
                        .map(|i| full(i, &format!("p{i}@example.com")))
                        .collect();
                    insert(&mut conn, &rows);
                }
                // A second application instance: same KMS and key table, empty cache.
                let cold = Keyring::builder(fx.kms.clone(), fx.store.clone())
                    .cmk(fx.cmk.clone())
                    .build()
                    .unwrap();
                let before = fx.calls.decrypts();
                let _guard = cold.enter();
                let all: Vec<Person> = people::table
                    .select(Person::as_select())
                    .load(&mut conn)
                    .unwrap();
                assert_eq!(all.len(), 50);
                assert_eq!(fx.calls.decrypts() - before, 1, "one data key, loaded once");
                assert_eq!(cold.metrics().cache_misses, 1);
            }

            #[test]
            fn debug_output_never_shows_values() {
                let Some((_conn, fx)) = setup() else { return };
                let _guard = fx.keyring.enter();
                let dbg = format!("{:?}", full(1, "ada@example.com"));
                assert!(!dbg.contains("Ada"), "{dbg}");
                assert!(!dbg.contains("ada@"), "{dbg}");
                assert!(dbg.contains("Encrypted<people.name>(<redacted>)"), "{dbg}");
                let query = diesel::insert_into(people::table).values(full(2, "x@example.com"));
                let shown =
                    diesel::debug_query::<<$conn as Connection>::Backend, _>(&query).to_string();
                assert!(!shown.contains("Ada"), "{shown}");
            }
        }
    };
}

fn open_sqlite() -> Option<SqliteConnection> {
    Some(SqliteConnection::establish(":memory:").unwrap())
}

fn open_postgres() -> Option<PgConnection> {
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        envelope_tests::skipped(
            "set ENVELOPE_TEST_POSTGRES_URL to run the diesel PostgreSQL tests",
        );
        return None;
    };
    let mut conn = PgConnection::establish(&url)
        .unwrap_or_else(|e| panic!("ENVELOPE_TEST_POSTGRES_URL is set but unreachable: {e}"));
    // Everything below rolls back when the connection closes: nothing is left in the database.
    conn.begin_test_transaction().unwrap();
    // A schema of its own per test: the table is always `people`, tests run in parallel.
    let schema = format!(
        "envelope_diesel_{}",
        &envelope_core::KeyId::random().unwrap().to_hex()[..12]
    );
    diesel::sql_query(format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .unwrap();
    diesel::sql_query(format!("SET search_path TO {schema}"))
        .execute(&mut conn)
        .unwrap();
    Some(conn)
}

fn open_mysql() -> Option<MysqlConnection> {
    let Ok(url) = std::env::var("ENVELOPE_TEST_MYSQL_URL") else {
        envelope_tests::skipped("set ENVELOPE_TEST_MYSQL_URL to run the sync diesel MySQL tests");
        return None;
    };
    Some(
        MysqlConnection::establish(&url)
            .unwrap_or_else(|e| panic!("ENVELOPE_TEST_MYSQL_URL is set but unreachable: {e}")),
    )
}

suite!(
    sqlite,
    SqliteConnection,
    open_sqlite,
    "CREATE TABLE",
    "BLOB",
    "TEXT",
    "INTEGER"
);
suite!(
    postgres,
    PgConnection,
    open_postgres,
    "CREATE TABLE",
    "BYTEA",
    "TEXT",
    "BIGINT"
);
// A temporary table: private to the test's one connection, gone when it closes (MySQL DDL does
// not roll back with a transaction).
suite!(
    mysql,
    MysqlConnection,
    open_mysql,
    "CREATE TEMPORARY TABLE",
    "LONGBLOB",
    "TEXT",
    "BIGINT"
);

diesel::table! {
    /// A schema that says `Binary` where the database has `TEXT`: what a `schema.rs` written by
    /// hand, or left over from before the column was meant to be encrypted, can say.
    mistyped (id) {
        id -> BigInt,
        name -> Binary,
    }
}

/// `Encrypted` written into a PostgreSQL `TEXT` column: the server casts the bytea to its hex
/// text, and diesel (which trusts the schema) reads that text back. The error names the column
/// type and the fix instead of calling the value "not an envelope value".
#[test]
fn a_text_column_behind_a_binary_schema_is_named_on_read() {
    let Some(mut conn) = open_postgres() else {
        return;
    };
    diesel::sql_query("CREATE TABLE mistyped (id BIGINT PRIMARY KEY, name TEXT)")
        .execute(&mut conn)
        .unwrap();
    let fx = Fixture::new();
    let _guard = fx.keyring.enter();
    diesel::insert_into(mistyped::table)
        .values((
            mistyped::id.eq(1i64),
            mistyped::name.eq(Encrypted::<String, Name>::new("Ada".into())),
        ))
        .execute(&mut conn)
        .unwrap();
    let err = mistyped::table
        .select(mistyped::name)
        .first::<Encrypted<String, Name>>(&mut conn)
        .unwrap_err();
    assert!(
        matches!(
            envelope_diesel::envelope_error(&err),
            Some(Error::Format(FormatError::HexText))
        ),
        "{err}"
    );
    let shown = envelope_diesel::report(&err).to_string();
    assert!(shown.contains("BYTEA"), "{shown}");
    assert!(!shown.contains("Ada"), "{shown}");
}
