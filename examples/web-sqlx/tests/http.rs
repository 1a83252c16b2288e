//! The web app end to end over HTTP: on SQLite always, on PostgreSQL and MariaDB when
//! `ENVELOPE_TEST_POSTGRES_URL` / `ENVELOPE_TEST_MYSQL_URL` are set, and once on the Tencent
//! KMS emulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use envelope_core::KeyId;
use serde_json::{Value, json};
use web_sqlx::{App, Config, KmsChoice};

struct Running {
    base: String,
    client: reqwest::Client,
    app: App,
    _dir: tempfile::TempDir,
    _server: tokio::task::JoinHandle<()>,
}

async fn start(database_url: Option<String>, kms: Option<KmsChoice>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let tag = &KeyId::random().unwrap().to_hex()[..10];
    let config = Config {
        port: 0,
        database_url: database_url.unwrap_or_else(|| {
            format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display())
        }),
        kms: kms.unwrap_or_else(|| KmsChoice::LocalFile(dir.path().join("master.key"))),
        customers_table: format!("customers_{tag}"),
        keys_table: format!("keys_{tag}"),
        policy: envelope_core::Policy::default(),
        also_read: Vec::new(),
    };
    if let KmsChoice::LocalFile(path) = &config.kms
        && !config.database_url.starts_with("sqlite:")
    {
        // With a database server the app never creates a master key by itself (a missing key
        // file must not silently become a new key): make it first, as `envelope keygen` does.
        envelope_core::LocalKms::create(path).unwrap();
    }
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
        _dir: dir,
        _server: server,
    }
}

impl Running {
    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, value)
    }
}

async fn crud(r: &Running) {
    let alice = json!({"name": "Alice", "email": "Alice@Example.com", "phone": "+1 555 0100",
                       "national_id": "078-05-1120", "notes": {"vip": true, "langs": ["en", "zh"]}});
    let (s, v) = r.call("POST", "/customers", Some(&alice.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let (s, bob) = r
        .call(
            "POST",
            "/customers",
            Some(r#"{"name":"Bob","email":"bob@example.com"}"#),
        )
        .await;
    assert_eq!(s, 201);

    let (s, got) = r.call("GET", &format!("/customers/{id}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(got["email"], "Alice@Example.com");
    assert_eq!(got["national_id"], "078-05-1120");
    assert_eq!(got["notes"]["langs"][1], "zh");

    let (s, found) = r
        .call("GET", "/customers?email=%20alice@EXAMPLE.com", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(found.as_array().unwrap().len(), 1);
    assert_eq!(found[0]["id"], id.as_str());
    let (_, none) = r
        .call("GET", "/customers?email=carol@example.com", None)
        .await;
    assert_eq!(none, json!([]));

    let (s, updated) = r
        .call(
            "PUT",
            &format!("/customers/{id}"),
            Some(r#"{"name":"Alice B.","email":"alice.b@example.com"}"#),
        )
        .await;
    assert_eq!(s, 200, "{updated}");
    assert_eq!(updated["phone"], Value::Null);
    let (_, old) = r
        .call("GET", "/customers?email=alice@example.com", None)
        .await;
    assert_eq!(old, json!([]), "the old e-mail no longer matches");
    let (_, new) = r
        .call("GET", "/customers?email=ALICE.B@example.com", None)
        .await;
    assert_eq!(new[0]["name"], "Alice B.");

    let bob_id = bob["id"].as_str().unwrap();
    let (s, _) = r
        .call("DELETE", &format!("/customers/{bob_id}"), None)
        .await;
    assert_eq!(s, 204);
    let (s, e) = r.call("GET", &format!("/customers/{bob_id}"), None).await;
    assert_eq!((s, e["error"].is_string()), (404, true));
    let (s, _) = r
        .call("DELETE", &format!("/customers/{bob_id}"), None)
        .await;
    assert_eq!(s, 404);
    let (s, _) = r
        .call(
            "PUT",
            &format!("/customers/{bob_id}"),
            Some(r#"{"name":"B","email":"b@x.io"}"#),
        )
        .await;
    assert_eq!(s, 404);
}

async fn bad_input(r: &Running) {
    for (method, path, body) in [
        ("POST", "/customers", Some("{not json")),
        ("POST", "/customers", Some(r#"{"name":"x"}"#)),
        (
            "POST",
            "/customers",
            Some(r#"{"name":"x","email":"x@y.z","age":3}"#),
        ),
        ("POST", "/customers", Some(r#"{"name":"","email":"x@y.z"}"#)),
        (
            "POST",
            "/customers",
            Some(r#"{"name":"x","email":"no-at-sign"}"#),
        ),
        ("POST", "/customers", Some(r#"{"name":"x","email":17}"#)),
        ("GET", "/customers?email=", None),
        ("GET", "/customers?limit=0", None),
        ("GET", "/customers?limit=501", None),
        ("GET", "/customers?after=nope", None),
        ("GET", "/customers?email=a@b.c&limit=2", None),
        ("GET", "/customers?colour=red", None),
        (
            "PUT",
            "/customers/00000000-0000-0000-0000-000000000000",
            Some("[]"),
        ),
    ] {
        let (s, v) = r.call(method, path, body).await;
        assert!((400..500).contains(&s), "{method} {path} {body:?}: {s} {v}");
        assert!(v["error"].is_string(), "{method} {path}: {v}");
    }
    // A malformed id is the client's mistake (400), an unknown route or method has a JSON body.
    for (method, path, status) in [
        ("GET", "/customers/not-an-id", 400),
        ("PUT", "/customers/not-an-id", 400),
        ("DELETE", "/customers/not-an-id", 400),
        ("GET", "/nowhere", 404),
        ("PATCH", "/customers", 405),
        ("POST", "/metrics", 405),
    ] {
        let body = (method == "PUT").then_some(r#"{"name":"x","email":"x@y.z"}"#);
        let (s, v) = r.call(method, path, body).await;
        assert_eq!(s, status, "{method} {path}: {v}");
        assert!(v["error"].is_string(), "{method} {path}: {v}");
    }
    // Without a JSON content type.
    let resp = r
        .client
        .post(format!("{}/customers", r.base))
        .body(r#"{"name":"x","email":"x@y.z"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
}

/// `GET /customers` without `email` lists in id order, a page at a time.
async fn listing(r: &Running) {
    let mut made = Vec::new();
    for i in 0..5 {
        let body = json!({"name": format!("p{i}"), "email": format!("p{i}@example.com")});
        let (s, v) = r.call("POST", "/customers", Some(&body.to_string())).await;
        assert_eq!(s, 201);
        made.push(v["id"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(id) => format!("/customers?limit=2&after={id}"),
            None => "/customers?limit=2".to_owned(),
        };
        let (s, page) = r.call("GET", &path, None).await;
        assert_eq!(s, 200, "{page}");
        let page = page.as_array().unwrap().clone();
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        for c in &page {
            // The encrypted fields open in a list as in a single read.
            assert!(c["email"].as_str().unwrap().contains('@'), "{c}");
            seen.push(c["id"].as_str().unwrap().to_owned());
        }
        after = seen.last().cloned();
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in id order");
    for id in &made {
        assert!(seen.contains(id), "{id} missing from the list");
    }
    let (s, all) = r.call("GET", "/customers", None).await;
    assert_eq!(s, 200);
    assert_eq!(all.as_array().unwrap().len(), seen.len().min(50));
}

async fn kms_calls_do_not_grow_with_requests(r: &Running) {
    let before = r.call("GET", "/metrics.json", None).await.1;
    for i in 0..30 {
        let body =
            json!({"name": format!("n{i}"), "email": format!("u{i}@example.com"), "phone": "1"});
        let (s, v) = r.call("POST", "/customers", Some(&body.to_string())).await;
        assert_eq!(s, 201);
        let (s, _) = r
            .call(
                "GET",
                &format!("/customers/{}", v["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(s, 200);
    }
    let after = r.call("GET", "/metrics.json", None).await.1;
    assert_eq!(
        after["kms_calls"], before["kms_calls"],
        "{before} -> {after}"
    );
    assert!(after["cache_hits"].as_u64().unwrap() >= 60);
    assert_eq!(
        r.app.keyring().metrics().kms_calls,
        after["kms_calls"].as_u64().unwrap()
    );
    prometheus_text(r).await;
}

/// `/metrics` is Prometheus text with envelope's series; no value, key or body in it.
async fn prometheus_text(r: &Running) {
    let resp = r
        .client
        .get(format!("{}/metrics", r.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let kind = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("text/plain"), "{kind}");
    let text = resp.text().await.unwrap();
    for series in [
        "envelope_kms_calls_total{",
        "action=\"generate_data_key\"",
        "outcome=\"ok\"",
        "envelope_kms_call_seconds",
        "envelope_key_cache_lookups_total{result=\"hit\"}",
        "envelope_key_store_calls_total{",
        "envelope_rotations_total",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    assert!(!text.contains("example.com"), "{text}");
}

async fn full_suite(r: Running) {
    crud(&r).await;
    bad_input(&r).await;
    listing(&r).await;
    kms_calls_do_not_grow_with_requests(&r).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_the_local_kms() {
    full_suite(start(None, None).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    let Ok(url) = std::env::var("ENVELOPE_TEST_POSTGRES_URL") else {
        envelope_tests::skipped("web-sqlx postgres: set ENVELOPE_TEST_POSTGRES_URL");
        return;
    };
    full_suite(start(Some(url), None).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb() {
    let Ok(url) = std::env::var("ENVELOPE_TEST_MYSQL_URL") else {
        envelope_tests::skipped("web-sqlx mysql: set ENVELOPE_TEST_MYSQL_URL");
        return;
    };
    full_suite(start(Some(url), None).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_tencent_kms_on_the_emulator() {
    let t = envelope_tests::TencentTarget::new();
    let cmk = t.kms.create_key("web-sqlx", "").await.unwrap().key_id;
    let config = envelope_core::kms::tencent::TencentConfig::new(
        envelope_tests::EMULATOR_SECRET_ID,
        envelope_core::SecretString::new(envelope_tests::EMULATOR_SECRET_KEY),
        "ap-guangzhou",
    )
    .with_endpoint(t.emulator.endpoint());
    let r = start(None, Some(KmsChoice::Tencent(Box::new(config), cmk))).await;
    crud(&r).await;
    assert_eq!(r.app.keyring().provider_name(), "tencent");
    assert!(
        t.emulator.calls("GenerateDataKey") >= 2,
        "a data key and an index key"
    );
}
