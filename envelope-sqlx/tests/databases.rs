//! Encrypted columns on real databases: SQLite always; PostgreSQL and MariaDB/MySQL when
//! `ENVELOPE_TEST_POSTGRES_URL` / `ENVELOPE_TEST_MYSQL_URL` are set (`bash .ci/run` sets both).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use envelope_core::{Error, KeyMaterial, KeyStore, Keyring, Label, LocalKms, Policy, format};
use envelope_sqlx::{
    AsJson, BlindIndex, Encrypted, EncryptedText, SqlxKeyStore, blind_index, column, envelope_error,
};

column!(Name = "people.name");
column!(Photo = "people.photo");
column!(Age = "people.age");
column!(Small = "people.small");
column!(Big = "people.big");
column!(Flag = "people.flag");
column!(Ident = "people.ident");
column!(Born = "people.born");
column!(Seen = "people.seen");
column!(Notes = "people.notes");
column!(Email = "people.email");
column!(Phone = "people.phone");
column!(Count = "people.count");
column!(Price = "people.price");
column!(Met = "people.met");
blind_index!(EmailIndex = "people.email", CaseFolded);

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct NoteBody {
    text: String,
    tags: Vec<String>,
}

#[derive(sqlx::FromRow, Debug)]
struct Person {
    id: i64,
    name: Encrypted<String, Name>,
    photo: Option<Encrypted<Vec<u8>, Photo>>,
    age: Option<Encrypted<i32, Age>>,
    small: Option<Encrypted<i16, Small>>,
    big: Option<Encrypted<i64, Big>>,
    flag: Option<Encrypted<bool, Flag>>,
    ident: Option<Encrypted<uuid::Uuid, Ident>>,
    born: Option<Encrypted<chrono::NaiveDate, Born>>,
    seen: Option<Encrypted<chrono::DateTime<chrono::Utc>, Seen>>,
    notes: Option<Encrypted<AsJson<NoteBody>, Notes>>,
    email: Option<Encrypted<String, Email>>,
    email_bidx: Option<BlindIndex<EmailIndex>>,
    phone: Option<EncryptedText<String, Phone>>,
    count: Option<Encrypted<u64, Count>>,
    price: Option<Encrypted<f64, Price>>,
    met: Option<Encrypted<chrono::NaiveDateTime, Met>>,
}

fn keyring<S: KeyStore>(kms: &Arc<LocalKms>, store: Arc<S>) -> Keyring {
    Keyring::builder(kms.clone(), store)
        .cmk(kms.cmk_id())
        .build()
        .unwrap()
}

fn table_name() -> String {
    format!(
        "people_{}",
        &envelope_core::KeyId::random().unwrap().to_hex()[..12]
    )
}

macro_rules! suite {
    ($module:ident, $db:ty, $open:path, $blob:literal, $big_blob:literal, $text:literal, $id:literal, $ph:expr) => {
        mod $module {
            use super::*;

            type Db = $db;

            /// Placeholders: `?` in the source SQL, rewritten for the database.
            fn sql(s: &str) -> String {
                $ph(s)
            }

            struct Setup {
                pool: sqlx::Pool<Db>,
                store: Arc<SqlxKeyStore<Db>>,
                keyring: Keyring,
                kms: Arc<LocalKms>,
                table: String,
                key_table: String,
                _dir: Option<tempfile::TempDir>,
            }

            impl Setup {
                async fn new() -> Option<Setup> {
                    let (pool, dir) = $open().await?;
                    let key_table = format!("keys_{}", &envelope_core::KeyId::random().unwrap().to_hex()[..12]);
                    let store = Arc::new(SqlxKeyStore::same_database_as(&pool).unwrap().with_table(&key_table).unwrap());
                    store.create_table().await.unwrap();
                    let kms = Arc::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
                    let keyring = keyring(&kms, store.clone());
                    let table = table_name();
                    let ddl = format!(
                        "CREATE TABLE {table} (id {id}, name {blob} NOT NULL, photo {big}, age {blob}, \
                         small {blob}, big {blob}, flag {blob}, ident {blob}, born {blob}, seen {blob}, \
                         notes {blob}, email {blob}, email_bidx {blob}, phone {text}, count {blob}, price {blob}, met {blob})",
                        id = $id, blob = $blob, big = $big_blob, text = $text
                    );
                    sqlx::query(sqlx::AssertSqlSafe(ddl)).execute(&pool).await.unwrap();
                    Some(Setup { pool, store, keyring, kms, table, key_table, _dir: dir })
                }

                async fn insert(&self, p: &Person) -> i64 {
                    let q = sql(&format!(
                        "INSERT INTO {} (id, name, photo, age, small, big, flag, ident, born, seen, notes, email, email_bidx, phone, count, price, met) \
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        self.table
                    ));
                    sqlx::query(sqlx::AssertSqlSafe(q))
                        .bind(p.id)
                        .bind(&p.name)
                        .bind(&p.photo)
                        .bind(&p.age)
                        .bind(&p.small)
                        .bind(&p.big)
                        .bind(&p.flag)
                        .bind(&p.ident)
                        .bind(&p.born)
                        .bind(&p.seen)
                        .bind(&p.notes)
                        .bind(&p.email)
                        .bind(&p.email_bidx)
                        .bind(&p.phone)
                        .bind(&p.count)
                        .bind(&p.price)
                        .bind(&p.met)
                        .execute(&self.pool)
                        .await
                        .unwrap();
                    p.id
                }

                async fn get(&self, id: i64) -> Result<Person, sqlx::Error> {
                    let q = sql(&format!("SELECT * FROM {} WHERE id = ?", self.table));
                    sqlx::query_as::<_, Person>(sqlx::AssertSqlSafe(q))
                        .bind(id)
                        .fetch_one(&self.pool)
                        .await
                }

                async fn raw(&self, id: i64, column: &str) -> Option<Vec<u8>> {
                    let q = sql(&format!("SELECT {column} FROM {} WHERE id = ?", self.table));
                    sqlx::query_scalar::<_, Option<Vec<u8>>>(sqlx::AssertSqlSafe(q))
                        .bind(id)
                        .fetch_one(&self.pool)
                        .await
                        .unwrap()
                }

                async fn drop_tables(self) {
                    for t in [&self.table, &self.key_table] {
                        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {t}"))).execute(&self.pool).await;
                    }
                }
            }

            fn full(id: i64) -> Person {
                Person {
                    id,
                    name: Encrypted::new("Zoë Ångström 王小明".to_owned()),
                    photo: Some(Encrypted::new(vec![0, 1, 2, 255])),
                    age: Some(Encrypted::new(-42)),
                    small: Some(Encrypted::new(i16::MIN)),
                    big: Some(Encrypted::new(i64::MAX)),
                    flag: Some(Encrypted::new(true)),
                    ident: Some(Encrypted::new(uuid::Uuid::new_v4())),
                    born: Some(Encrypted::new(chrono::NaiveDate::from_ymd_opt(1990, 2, 28).unwrap())),
                    seen: Some(Encrypted::new(chrono::DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap())),
                    notes: Some(Encrypted::new(AsJson(NoteBody { text: "allergic to penicillin".into(), tags: vec!["health".into()] }))),
                    email: Some(Encrypted::new("Alice@Example.com".to_owned())),
                    email_bidx: Some(BlindIndex::of("Alice@Example.com").unwrap()),
                    phone: Some(EncryptedText::new("+1 555 0100".to_owned())),
                    count: Some(Encrypted::new(u64::MAX)),
                    price: Some(Encrypted::new(-19.99)),
                    met: Some(Encrypted::new(chrono::DateTime::from_timestamp(1_700_000_000, 250_000_000).unwrap().naive_utc())),
                }
            }

            fn empty(id: i64) -> Person {
                Person {
                    id,
                    name: Encrypted::new(String::new()),
                    photo: None, age: None, small: None, big: None, flag: None, ident: None,
                    born: None, seen: None, notes: None, email: None, email_bidx: None, phone: None,
                    count: None, price: None, met: None,
                }
            }

            fn same(a: &Person, b: &Person) {
                assert_eq!(a.id, b.id);
                assert_eq!(*a.name, *b.name);
                assert_eq!(a.photo, b.photo);
                assert_eq!(a.age, b.age);
                assert_eq!(a.small, b.small);
                assert_eq!(a.big, b.big);
                assert_eq!(a.flag, b.flag);
                assert_eq!(a.ident, b.ident);
                assert_eq!(a.born, b.born);
                assert_eq!(a.seen, b.seen);
                assert_eq!(a.notes.as_ref().map(|n| n.0.clone()), b.notes.as_ref().map(|n| n.0.clone()));
                assert_eq!(a.email, b.email);
                assert_eq!(a.email_bidx, b.email_bidx);
                assert_eq!(a.phone, b.phone);
                assert_eq!(a.count, b.count);
                assert_eq!(a.price, b.price);
                assert_eq!(a.met, b.met);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_type_round_trips_and_nulls_stay_null() {
                let Some(s) = Setup::new().await else { return };
                s.keyring.clone().install_for(async {
                    let p = full(1);
                    s.insert(&p).await;
                    same(&s.get(1).await.unwrap(), &p);
                    let e = empty(2);
                    s.insert(&e).await;
                    let back = s.get(2).await.unwrap();
                    same(&back, &e);
                    assert_eq!(*back.name, "", "the empty string is encrypted, not NULL");
                    assert!(s.raw(2, "name").await.unwrap().len() >= 47);
                    assert!(s.raw(2, "photo").await.is_none(), "NULL stays NULL");
                }).await;
                s.drop_tables().await;
            }

            #[tokio::test(flavor = "current_thread")]
            async fn stored_bytes_hold_no_plaintext_and_name_their_key() {
                let Some(s) = Setup::new().await else { return };
                s.keyring.clone().install_for(async {
                    s.insert(&full(1)).await;
                    let name = s.raw(1, "name").await.unwrap();
                    assert_eq!(name[0], format::VERSION_1);
                    let hay = String::from_utf8_lossy(&name);
                    assert!(!hay.contains("Zoë") && !hay.contains("王小明"));
                    let notes = s.raw(1, "notes").await.unwrap();
                    assert!(!String::from_utf8_lossy(&notes).contains("penicillin"));
                    let q = sql(&format!("SELECT phone FROM {} WHERE id = ?", s.table));
                    let phone: String = sqlx::query_scalar(sqlx::AssertSqlSafe(q)).bind(1i64).fetch_one(&s.pool).await.unwrap();
                    assert!(phone.starts_with("ev1:") && !phone.contains("555"));
                    // The key id in the value is a row of the key table.
                    let id = format::peek_key_id(&name).unwrap();
                    assert!(s.store.get(&id).await.unwrap().is_some());
                }).await;
                s.drop_tables().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_value_copied_into_another_column_fails_to_open() {
                let Some(s) = Setup::new().await else { return };
                s.keyring.clone().install_for(async {
                    s.insert(&full(1)).await;
                    let q = sql(&format!("UPDATE {} SET email = name WHERE id = ?", s.table));
                    sqlx::query(sqlx::AssertSqlSafe(q)).bind(1i64).execute(&s.pool).await.unwrap();
                    let err = s.get(1).await.unwrap_err();
                    assert!(matches!(envelope_error(&err), Some(Error::Decrypt { .. })), "{err}");
                    // And legacy plaintext fails closed.
                    let q = sql(&format!("UPDATE {} SET email = ? WHERE id = ?", s.table));
                    sqlx::query(sqlx::AssertSqlSafe(q)).bind(b"alice@example.com".to_vec()).bind(1i64)
                        .execute(&s.pool).await.unwrap();
                    let err = s.get(1).await.unwrap_err();
                    assert!(matches!(envelope_error(&err), Some(Error::Format(envelope_core::FormatError::NotEnvelope))), "{err}");
                    // Inside the migration window it reads as legacy plaintext.
                    let label = Label::new("people.email").unwrap();
                    s.keyring.open_migration_window(&label);
                    assert_eq!(s.get(1).await.unwrap().email.unwrap().into_inner(), "alice@example.com");
                    s.keyring.close_migration_window(&label);
                    assert!(s.get(1).await.is_err());
                }).await;
                s.drop_tables().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn json_fails_the_write_when_it_cannot_encode_and_never_leaks_on_read() {
                let Some(s) = Setup::new().await else { return };
                s.keyring.clone().install_for(async {
                    // A map with non-string keys has no JSON form: the insert fails, no row.
                    let mut bad = std::collections::HashMap::new();
                    bad.insert((1, 2), "x".to_owned());
                    let q = sql(&format!("INSERT INTO {} (id, name, notes) VALUES (?, ?, ?)", s.table));
                    let err = sqlx::query(sqlx::AssertSqlSafe(q))
                        .bind(1i64)
                        .bind(Encrypted::<String, Name>::new("n".into()))
                        .bind(Encrypted::<AsJson<std::collections::HashMap<(i32, i32), String>>, Notes>::new(AsJson(bad)))
                        .execute(&s.pool).await.unwrap_err();
                    assert!(err.to_string().contains("JSON"), "{err}");
                    let q = sql(&format!("SELECT COUNT(*) FROM {} WHERE id = ?", s.table));
                    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(q)).bind(1i64).fetch_one(&s.pool).await.unwrap();
                    assert_eq!(rows, 0);
                    // A stored value read as the wrong type: the error says where, never what.
                    let mut p = empty(2);
                    p.notes = Some(Encrypted::new(AsJson(NoteBody { text: "078-05-1120".into(), tags: vec![] })));
                    s.insert(&p).await;
                    #[derive(Debug, serde::Serialize, serde::Deserialize)]
                    struct Other { text: i64 }
                    let q = sql(&format!("SELECT notes FROM {} WHERE id = ?", s.table));
                    let err = sqlx::query_scalar::<_, Encrypted<AsJson<Other>, Notes>>(sqlx::AssertSqlSafe(q))
                        .bind(2i64).fetch_one(&s.pool).await.unwrap_err();
                    for shown in [err.to_string(), format!("{err:?}")] {
                        assert!(!shown.contains("078-05-1120"), "{shown}");
                        assert!(shown.contains("line 1 column"), "{shown}");
                    }
                }).await;
                s.drop_tables().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn blind_index_finds_rows_by_value() {
                let Some(s) = Setup::new().await else { return };
                s.keyring.clone().install_for(async {
                    for (i, email) in ["alice@example.com", "bob@example.com", "carol@example.com"].iter().enumerate() {
                        let mut p = empty(i as i64 + 1);
                        p.email = Some(Encrypted::new((*email).to_owned()));
                        p.email_bidx = Some(BlindIndex::of(email).unwrap());
                        s.insert(&p).await;
                    }
                    let probe = BlindIndex::<EmailIndex>::of("  BOB@example.COM ").unwrap();
                    let q = sql(&format!("SELECT * FROM {} WHERE email_bidx = ?", s.table));
                    let found: Vec<Person> = sqlx::query_as(sqlx::AssertSqlSafe(q)).bind(&probe).fetch_all(&s.pool).await.unwrap();
                    assert_eq!(found.len(), 1);
                    assert_eq!(found[0].id, 2);
                    assert_eq!(found[0].email.as_deref().map(String::as_str), Some("bob@example.com"));
                }).await;
                s.drop_tables().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn large_values_round_trip() {
                let Some(s) = Setup::new().await else { return };
                s.keyring.clone().install_for(async {
                    let mut p = empty(1);
                    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
                    p.photo = Some(Encrypted::new(big.clone()));
                    s.insert(&p).await;
                    assert_eq!(s.get(1).await.unwrap().photo.unwrap().into_inner(), big);
                }).await;
                s.drop_tables().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_writers_and_a_cold_reader() {
                let Some(s) = Setup::new().await else { return };
                let s = Arc::new(s);
                let mut set = tokio::task::JoinSet::new();
                for w in 0..8i64 {
                    let s = s.clone();
                    let k = s.keyring.clone();
                    set.spawn(k.install_for(async move {
                        for i in 0..25 {
                            let mut p = empty(w * 1000 + i);
                            p.name = Encrypted::new(format!("writer {w} row {i}"));
                            p.age = Some(Encrypted::new(i as i32));
                            s.insert(&p).await;
                        }
                    }));
                }
                while let Some(r) = set.join_next().await {
                    r.unwrap();
                }
                // Another instance: same key table, its own keyring and cache.
                let reader = keyring(&s.kms, s.store.clone());
                reader.install_for(async {
                    let q = format!("SELECT * FROM {} ORDER BY id", s.table);
                    let all: Vec<Person> = sqlx::query_as(sqlx::AssertSqlSafe(q)).fetch_all(&s.pool).await.unwrap();
                    assert_eq!(all.len(), 200);
                    for p in &all {
                        assert_eq!(*p.name, format!("writer {} row {}", p.id / 1000, p.id % 1000));
                        assert_eq!(p.age.as_deref(), Some(&((p.id % 1000) as i32)));
                    }
                }).await;
                // One active key for all the writers: one unwrap for the reader.
                assert_eq!(reader.metrics().kms_decrypt, 1);
                let s = Arc::try_unwrap(s).ok().unwrap();
                s.drop_tables().await;
            }

            #[tokio::test(flavor = "current_thread")]
            async fn cold_decode_on_a_current_thread_runtime_with_the_kms_elsewhere() {
                let Some(s) = Setup::new().await else { return };
                // Tencent KMS on the emulator, which runs on a thread of its own.
                let t = envelope_tests::TencentTarget::new();
                let cmk = t.kms.create_key(&format!("sqlx-{}", stringify!($module)), "").await.unwrap().key_id;
                let writer = Keyring::builder(t.kms.clone(), s.store.clone()).cmk(cmk.clone()).build().unwrap();
                let expected = writer.install_for(async { full(7) }).await;
                writer.install_for(async { s.insert(&expected).await; }).await;
                let reader = Keyring::builder(t.kms.clone(), s.store.clone()).cmk(cmk)
                    .policy(Policy::default())
                    .build()
                    .unwrap();
                t.emulator.reset_counters();
                let p = reader.install_for(async { s.get(7).await.unwrap() }).await;
                same(&p, &expected);
                assert_eq!(t.emulator.calls("Decrypt"), 1, "the row's data key, unwrapped once");
                s.drop_tables().await;
            }

            #[tokio::test]
            async fn key_store_contract() {
                let Some(s) = Setup::new().await else { return };
                envelope_tests::store_contract::run(s.store.as_ref()).await;
                s.drop_tables().await;
            }
        }
    };
}

fn dollar_placeholders(s: &str) -> String {
    let mut out = String::new();
    let mut n = 0;
    for c in s.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

fn same_placeholders(s: &str) -> String {
    s.to_owned()
}

async fn open_sqlite() -> Option<(sqlx::Pool<sqlx::Sqlite>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    Some((pool, Some(dir)))
}

async fn open_url<DB: sqlx::Database>(
    var: &str,
) -> Option<(sqlx::Pool<DB>, Option<tempfile::TempDir>)> {
    let Ok(url) = std::env::var(var) else {
        envelope_tests::skipped(&format!("set {var} to run the {} tests", DB::NAME));
        return None;
    };
    let pool = sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{var} is set but the database is unreachable: {e}"));
    Some((pool, None))
}

async fn open_postgres() -> Option<(sqlx::Pool<sqlx::Postgres>, Option<tempfile::TempDir>)> {
    open_url("ENVELOPE_TEST_POSTGRES_URL").await
}

async fn open_mysql() -> Option<(sqlx::Pool<sqlx::MySql>, Option<tempfile::TempDir>)> {
    open_url("ENVELOPE_TEST_MYSQL_URL").await
}

suite!(
    sqlite,
    sqlx::Sqlite,
    open_sqlite,
    "BLOB",
    "BLOB",
    "TEXT",
    "INTEGER PRIMARY KEY",
    same_placeholders
);
suite!(
    postgres,
    sqlx::Postgres,
    open_postgres,
    "BYTEA",
    "BYTEA",
    "TEXT",
    "BIGINT PRIMARY KEY",
    dollar_placeholders
);
suite!(
    mysql,
    sqlx::MySql,
    open_mysql,
    "BLOB",
    "LONGBLOB",
    "TEXT",
    "BIGINT PRIMARY KEY",
    same_placeholders
);

#[tokio::test]
async fn key_store_for_url_picks_the_database_by_scheme() {
    let err = envelope_sqlx::key_store_for_url("oracle://db/x", "envelope_keys")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Config(_)), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("k.db").display());
    let store = envelope_sqlx::key_store_for_url(&url, "my_keys")
        .await
        .unwrap();
    envelope_tests::store_contract::run(store.as_ref()).await;
    assert!(
        envelope_sqlx::key_store_for_url(&url, "bad name")
            .await
            .is_err()
    );
}

/// A key table that was never created is named as such, on every database, by the store and by
/// a write through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_table_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut urls = vec![format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("k.db").display()
    )];
    for var in ["ENVELOPE_TEST_POSTGRES_URL", "ENVELOPE_TEST_MYSQL_URL"] {
        match std::env::var(var) {
            Ok(url) => urls.push(url),
            Err(_) => envelope_tests::skipped(&format!("{var} is not set: missing-table check")),
        }
    }
    for url in urls {
        let table = table_name();
        let store: Arc<dyn KeyStore> = match url.split(':').next().unwrap() {
            "sqlite" => Arc::new(
                SqlxKeyStore::<sqlx::Sqlite>::connect_lazy(&url)
                    .unwrap()
                    .with_table(&table)
                    .unwrap(),
            ),
            "postgres" => Arc::new(
                SqlxKeyStore::<sqlx::Postgres>::connect_lazy(&url)
                    .unwrap()
                    .with_table(&table)
                    .unwrap(),
            ),
            _ => Arc::new(
                SqlxKeyStore::<sqlx::MySql>::connect_lazy(&url)
                    .unwrap()
                    .with_table(&table)
                    .unwrap(),
            ),
        };
        let err = store
            .list(&envelope_core::KeyFilter::all())
            .await
            .unwrap_err();
        assert!(
            matches!(err, envelope_core::StoreError::MissingTable { .. }),
            "{url}: {err}"
        );
        let kms = Arc::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
        // The keyring may find out at build time (its first key-table read) or at the first
        // write; either way it must say what is wrong.
        let text = match Keyring::builder(kms.clone(), store)
            .cmk(kms.cmk_id())
            .build()
        {
            Err(e) => e.to_string(),
            Ok(keyring) => keyring
                .encrypt(&Label::new("t.c").unwrap(), b"x")
                .await
                .unwrap_err()
                .to_string(),
        };
        assert!(
            text.contains(&format!("`{table}` does not exist")),
            "{url}: {text}"
        );
        assert!(!text.contains("limit"), "{url}: {text}");
    }
}

/// A write error keeps its type when the value is bound with `try_bind`, and `envelope_error`
/// finds it behind the boxed error as well as behind a `sqlx::Error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_bind_keeps_the_typed_write_error() {
    let mut insert = sqlx::query::<sqlx::Sqlite>("INSERT INTO t (v) VALUES (?)");
    // No keyring is installed in this task.
    let err = insert
        .try_bind(Encrypted::<String, Name>::new("x".into()))
        .unwrap_err();
    assert!(
        matches!(
            envelope_error(&*err),
            Some(Error::Misuse(envelope_core::Misuse::NoKeyring))
        ),
        "{err}"
    );
    // The same failure through `bind` reaches `execute` as text only: what the docs say.
    let (pool, _dir) = open_sqlite().await.unwrap();
    sqlx::query("CREATE TABLE t (v BLOB)")
        .execute(&pool)
        .await
        .unwrap();
    let err = sqlx::query("INSERT INTO t (v) VALUES (?)")
        .bind(Encrypted::<String, Name>::new("x".into()))
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("keyring"), "{err}");
    assert!(envelope_error(&err).is_none(), "{err}");
}

/// `Encrypted` bound into a PostgreSQL `TEXT` column: the server stores the bytea's hex text.
/// sqlx's own type check refuses the read (BYTEA against TEXT); where it does not run
/// (`try_get_unchecked`, and diesel, which trusts its schema), the read names the wrong column
/// type instead of calling it "not an envelope value".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_text_column_is_named_on_read() {
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        envelope_tests::skipped("set ENVELOPE_TEST_POSTGRES_URL to run the TEXT-column check");
        return;
    };
    let typed = sqlx::PgPool::connect(&url).await.unwrap();
    let kms = Arc::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
    let store = Arc::new(envelope_core::MemoryKeyStore::new());
    let table = table_name();
    keyring(&kms, store)
        .install_for(async {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT)"
            )))
            .execute(&typed)
            .await
            .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} (id, name) VALUES ($1, $2)"
            )))
            .bind(1i64)
            .bind(Encrypted::<String, Name>::new("Alice".into()))
            .execute(&typed)
            .await
            .unwrap();
            let select = format!("SELECT name FROM {table} WHERE id = 1");
            let err = sqlx::query_scalar::<_, Encrypted<String, Name>>(sqlx::AssertSqlSafe(
                select.clone(),
            ))
            .fetch_one(&typed)
            .await
            .unwrap_err();
            assert!(err.to_string().contains("TEXT"), "{err}");
            let row = sqlx::query(sqlx::AssertSqlSafe(select))
                .fetch_one(&typed)
                .await
                .unwrap();
            let err =
                sqlx::Row::try_get_unchecked::<Encrypted<String, Name>, _>(&row, 0).unwrap_err();
            assert!(
                matches!(
                    envelope_error(&err),
                    Some(Error::Format(envelope_core::FormatError::HexText))
                ),
                "{err}"
            );
            assert!(err.to_string().contains("BYTEA"), "{err}");
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
                .execute(&typed)
                .await
                .unwrap();
        })
        .await;
}

/// On a non-strict session a sealed value too long for its `VARBINARY(n)` is cut short with a
/// warning (and can never be opened); after [`envelope_sqlx::mysql_strict_session`] the same
/// write fails instead.
#[tokio::test]
async fn mysql_strict_session_makes_a_too_long_value_fail() {
    use sqlx::Connection as _;
    let Ok(url) = std::env::var("ENVELOPE_TEST_MYSQL_URL") else {
        envelope_tests::skipped("set ENVELOPE_TEST_MYSQL_URL to run the strict-mode test");
        return;
    };
    let mut conn = sqlx::MySqlConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("ENVELOPE_TEST_MYSQL_URL is set but unreachable: {e}"));
    let table = format!(
        "strict_{}",
        &envelope_core::KeyId::random().unwrap().to_hex()[..10]
    );
    let sql = |s: String| sqlx::query(sqlx::AssertSqlSafe(s));
    sql(format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, v VARBINARY(40))"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    sql("SET SESSION sql_mode = 'NO_ENGINE_SUBSTITUTION'".into())
        .execute(&mut conn)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kms = Arc::new(LocalKms::create(dir.path().join("k")).unwrap());
    let keyring = keyring(&kms, Arc::new(envelope_core::MemoryKeyStore::new()));
    let value = Encrypted::<String, Name>::new("a value that does not fit once sealed".into());
    let insert = format!("INSERT INTO {table} (id, v) VALUES (?, ?)");
    keyring
        .install_for(async {
            // Non-strict: stored, cut to 40 bytes.
            sql(insert.clone())
                .bind(1)
                .bind(&value)
                .execute(&mut conn)
                .await
                .unwrap();
            let stored: Vec<u8> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT v FROM {table} WHERE id = 1"
            )))
            .fetch_one(&mut conn)
            .await
            .unwrap();
            assert_eq!(stored.len(), 40);
            envelope_sqlx::mysql_strict_session(&mut conn)
                .await
                .unwrap();
            let e = sql(insert.clone())
                .bind(2)
                .bind(&value)
                .execute(&mut conn)
                .await
                .unwrap_err();
            assert!(
                e.as_database_error()
                    .and_then(|d| d.code())
                    .is_some_and(|c| c == "22001"),
                "{e}"
            );
        })
        .await;
    sql(format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .unwrap();
}

/// The key store's own MySQL sessions are strict even when the server's are not: with the
/// global `sql_mode` non-strict while its connections open, a value too long for its column
/// fails the insert instead of being stored cut short.
#[tokio::test]
async fn mysql_key_store_sessions_are_strict() {
    use sqlx::Connection as _;
    let Ok(url) = std::env::var("ENVELOPE_TEST_MYSQL_URL") else {
        envelope_tests::skipped("set ENVELOPE_TEST_MYSQL_URL to run the strict-mode test");
        return;
    };
    let mut admin = sqlx::MySqlConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("ENVELOPE_TEST_MYSQL_URL is set but unreachable: {e}"));
    let old: String = sqlx::query_scalar("SELECT CAST(@@GLOBAL.sql_mode AS CHAR)")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    sqlx::query("SET GLOBAL sql_mode = 'NO_ENGINE_SUBSTITUTION'")
        .execute(&mut admin)
        .await
        .unwrap();
    let table = format!(
        "keys_strict_{}",
        &envelope_core::KeyId::random().unwrap().to_hex()[..10]
    );
    let store = SqlxKeyStore::<sqlx::MySql>::connect_lazy(&url)
        .unwrap()
        .with_table(&table)
        .unwrap();
    let outcome = async move {
        store.create_table().await.unwrap();
        envelope_tests::store_contract::refuses_a_value_too_long_for_its_column(&store).await;
    };
    // The server's mode is put back whatever happened.
    let result = tokio::spawn(outcome).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET GLOBAL sql_mode = '{}'",
        old.replace('\'', "")
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}")))
        .execute(&mut admin)
        .await
        .unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}
