//! The showcase app (examples/web-sqlx) finds customers by e-mail over HTTP at every moment of
//! `envelope rotate --index`: a reader loops over lookups while the rotation runs (zero
//! misses), a writer creates customers meanwhile, and afterwards every customer is found under
//! the new index key alone.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Kind, Lookups, Target};
use envelope_core::{KeyKind, Policy};
use tokio::sync::Mutex;
use web_sqlx::{App, Config, KmsChoice};

async fn get_by_email(client: &reqwest::Client, base: &str, email: &str) -> Vec<String> {
    let url = format!("{base}/customers?email={}", email.replace('@', "%40"));
    let resp = client.get(url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let found: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    found
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn create(client: &reqwest::Client, base: &str, email: &str) -> String {
    let body = serde_json::json!({"name": "Customer", "email": email});
    let resp = client
        .post(format!("{base}/customers"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let v: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

async fn lookups_never_miss_during_an_index_rotation(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = t.table("customers");
    let app = App::start(Config {
        port: 0,
        database_url: t.url.clone(),
        kms: KmsChoice::LocalFile(t.dir.path().join("master.key")),
        customers_table: table.clone(),
        keys_table: t.key_table(),
        policy: Policy {
            key_refresh: Duration::from_secs(1),
            ..Policy::default()
        },
        also_read: Vec::new(),
    })
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let client = reqwest::Client::new();

    let customers = Arc::new(Mutex::new(Vec::new()));
    for i in 0..300 {
        let email = format!("Customer{i}@Example.com");
        let id = create(&client, &base, &email).await;
        customers.lock().await.push((id, email));
    }
    t.write_config(&format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n\
         [[table.column]]\nname = \"email\"\nlabel = \"customers.email\"\ntype = \"string\"\n\
         blind_index = {{ column = \"email_bidx\", normalizer = \"case-folded\" }}\n"
    ));
    t.expect(&["init"], 0);
    let index_keys = async || {
        let store = envelope_sqlx::key_store_for_url(&t.url, &t.key_table())
            .await
            .unwrap();
        store
            .list(&envelope_core::KeyFilter::all())
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.kind == KeyKind::Index)
            .map(|k| k.id)
            .collect::<Vec<_>>()
    };
    let before = index_keys().await;
    assert_eq!(before.len(), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(Lookups::default());
    let reader = {
        let (client, base, customers, stop, lookups) = (
            client.clone(),
            base.clone(),
            customers.clone(),
            stop.clone(),
            lookups.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let (id, email) = {
                    let all = customers.lock().await;
                    all[(i * 7919) % all.len()].clone()
                };
                // Another case and spaces: the index is case-folded.
                let found =
                    get_by_email(&client, &base, &format!(" {} ", email.to_uppercase())).await;
                lookups.record(found == [id.clone()], || {
                    format!("{email} found {found:?}, not [{id}]")
                });
            }
        })
    };
    let writer = {
        let (client, base, customers, stop) = (
            client.clone(),
            base.clone(),
            customers.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let email = format!("new{n}@example.com");
                let id = create(&client, &base, &email).await;
                customers.lock().await.push((id, email));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    let out = t.expect(
        &[
            "rotate",
            "--index",
            &format!("{table}.email"),
            "--key-refresh",
            "1s",
            "--batch-size",
            "50",
        ],
        0,
    );
    assert!(
        out.contains("rotation of customers.email finished"),
        "{out}"
    );
    // Past the app's next key-table read, so it probes the new key alone.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    writer.await.unwrap();
    lookups.assert_none_missed(30);

    let after = index_keys().await;
    assert_eq!(after.len(), 1);
    assert_ne!(after, before);
    for (id, email) in customers.lock().await.iter() {
        assert_eq!(
            get_by_email(&client, &base, email).await,
            std::slice::from_ref(id),
            "{email}"
        );
    }
    server.abort();
}

per_database!(lookups_never_miss_during_an_index_rotation);
