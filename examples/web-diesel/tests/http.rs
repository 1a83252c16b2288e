//! The diesel example end to end over HTTP: on SQLite always; on PostgreSQL and MariaDB when
//! `ENVELOPE_TEST_POSTGRES_URL` / `ENVELOPE_TEST_MYSQL_URL` are set (and the features
//! `postgres` / `mysql` are on, as in `cargo test --workspace`), each in a schema or database of
//! its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use web_diesel::{App, Config};

struct Running {
    base: String,
    client: reqwest::Client,
    app: App,
    _server: tokio::task::JoinHandle<()>,
}

fn config(dir: &tempfile::TempDir, database_url: String) -> Config {
    Config {
        port: 0,
        database_url,
        kms: None,
        master_key_file: dir.path().join("master.key"),
        keys_table: "envelope_keys".to_owned(),
    }
}

async fn start(config: Config) -> Running {
    let app = App::start(config).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router();
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Running {
        base,
        client: reqwest::Client::new(),
        app,
        _server: server,
    }
}

impl Running {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }
}

/// Create, read, find by e-mail in any case, delete; then a second app on the same database
/// (a cold keyring) reads what the first wrote.
async fn register(config: Config) {
    let r = start(config.clone()).await;
    let ada = json!({"name": "Ada", "email": "Ada@Example.com", "national_id": "AB 12 34 56 C",
                     "born": "1815-12-10", "notes": "allergic to penicillin"});
    let (s, v) = r.call("POST", "/patients", Some(ada)).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (s, _) = r
        .call(
            "POST",
            "/patients",
            Some(json!({"name": "Bob", "email": "bob@example.org"})),
        )
        .await;
    assert_eq!(s, 201);

    let (s, v) = r.call("GET", &format!("/patients/{id}"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["email"], "Ada@Example.com");
    assert_eq!(v["national_id"], "AB 12 34 56 C");
    assert_eq!(v["born"], "1815-12-10");
    assert_eq!(v["notes"], "allergic to penicillin");

    let (s, v) = r.call("GET", "/patients?email=ada@EXAMPLE.COM", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["id"], id.as_str());

    let (s, v) = r
        .call("POST", "/patients", Some(json!({"name": "", "email": "x"})))
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = r.call("GET", "/patients/no-such-id", None).await;
    assert_eq!(s, 404);
    for (method, path, status) in [("GET", "/nowhere", 404), ("PUT", "/patients", 405)] {
        let (s, v) = r.call(method, path, None).await;
        assert_eq!(s, status, "{method} {path}: {v}");
        assert!(v["error"].is_string(), "{method} {path}: {v}");
    }

    // A second app: its keyring is cold, and loads the key through DieselKeyStore.
    let again = start(config).await;
    let (s, v) = again.call("GET", &format!("/patients/{id}"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["notes"], "allergic to penicillin");
    assert!(again.app.keyring().metrics().kms_decrypt >= 1);

    let (s, _) = r.call("DELETE", &format!("/patients/{id}"), None).await;
    assert_eq!(s, 204);
    let (s, _) = r.call("GET", &format!("/patients/{id}"), None).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    register(config(&dir, db.to_str().unwrap().to_owned())).await;

    // At rest: no plaintext in the file.
    let bytes = std::fs::read(&db).unwrap();
    for needle in [
        "penicillin",
        "Ada@Example.com",
        "AB 12 34 56 C",
        "bob@example.org",
    ] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} is stored in the clear"
        );
    }
    assert!(
        bytes.windows(3).any(|w| w == b"Bob"),
        "names stay plaintext"
    );
}

fn tag() -> String {
    envelope_core::KeyId::random().unwrap().to_hex()[..10].to_owned()
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    use diesel::{Connection, RunQueryDsl};
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        envelope_tests::skipped("set ENVELOPE_TEST_POSTGRES_URL to run web-diesel on PostgreSQL");
        return;
    };
    let schema = format!("web_diesel_{}", tag());
    let mut admin = diesel::PgConnection::establish(&url).unwrap();
    diesel::sql_query(format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let dir = tempfile::tempdir().unwrap();
    envelope_core::LocalKms::create(dir.path().join("master.key")).unwrap();
    register(config(
        &dir,
        format!("{url}{sep}options=-csearch_path%3D{schema}"),
    ))
    .await;
    diesel::sql_query(format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .unwrap();
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql() {
    use diesel::{Connection, RunQueryDsl};
    let Ok(url) = std::env::var("ENVELOPE_TEST_MYSQL_URL") else {
        envelope_tests::skipped("set ENVELOPE_TEST_MYSQL_URL to run web-diesel on MariaDB");
        return;
    };
    let name = format!("web_diesel_{}", tag());
    let mut admin = diesel::MysqlConnection::establish(&url).unwrap();
    diesel::sql_query(format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .unwrap();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let dir = tempfile::tempdir().unwrap();
    envelope_core::LocalKms::create(dir.path().join("master.key")).unwrap();
    register(config(&dir, format!("{base}/{name}"))).await;
    diesel::sql_query(format!("DROP DATABASE {name}"))
        .execute(&mut admin)
        .unwrap();
}
