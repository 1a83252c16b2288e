//! The key lifecycle against real databases: `keys list | rewrap | retire | shred` and
//! `rotate --index`, with running keyrings beside them.
//!
//! - rewrap local -> local: the data table byte-identical before and after, every key under the
//!   new master key, a running keyring reading throughout, a cold one reading with the new key
//!   only, a rerun with nothing left to do;
//! - retire, then write: a running keyring moves to a new key within its `key_refresh`;
//! - shred, then read: refused without `--yes`, values counted, then `UnknownKey` in a running
//!   keyring after the bound, in a fresh one, and in `verify`;
//! - `rotate --index` under a reader looping over lookups (zero misses) and a writer, killed
//!   with SIGKILL midway and run again;
//! - Tencent CMK A -> B on the emulator: killed with SIGKILL midway, rerun, then back to A with
//!   exactly one `ReEncrypt` per key and no other KMS call;
//! - across KMSs, local -> OpenBao and Tencent emulator -> moto, while an application with both
//!   providers keeps reading (warm, and cold keyrings made throughout): every key moves, no data
//!   row changes, the destination alone reads everything, `verify` passes with it.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Kind, Lookups, Target};
use envelope_core::{
    BlindIndexSpec, Error, KeyFilter, KeyId, KeyKind, KeyRecord, Keyring, KmsProvider, Label,
    LocalKms, Normalizer, Policy,
};
use sqlx::Row;

const LABEL: &str = "life.email";

fn config(table: &str) -> String {
    format!(
        "[[table]]\nname = \"{table}\"\nprimary_key = \"id\"\n\n\
         [[table.column]]\nname = \"email\"\nlabel = \"{LABEL}\"\ntype = \"string\"\n\
         blind_index = {{ column = \"email_bidx\", normalizer = \"case-folded\" }}\n"
    )
}

fn spec() -> BlindIndexSpec {
    BlindIndexSpec::new(Label::new(LABEL).unwrap(), Normalizer::CaseFolded)
}

fn email(i: i64) -> String {
    format!("User{i}@Example.com")
}

/// A table of `rows` plaintext e-mails, encrypted by the CLI (with their blind indexes).
async fn encrypted_table(t: &Target, rows: i64) -> String {
    let table = t.table("life");
    let blob = t.blob();
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, email_bidx {blob})"
    ))
    .await;
    let mut i = 1;
    while i <= rows {
        let end = (i + 499).min(rows);
        let values: Vec<String> = (i..=end)
            .map(|n| format!("({n}, {}, NULL)", t.bytes_literal(email(n).as_bytes())))
            .collect();
        t.exec(&format!("INSERT INTO {table} VALUES {}", values.join(", ")))
            .await;
        i = end + 1;
    }
    t.write_config(&config(&table));
    t.expect(&["init"], 0);
    t.expect(&["encrypt"], 0);
    table
}

type Snapshot = Vec<(i64, Option<Vec<u8>>, Option<Vec<u8>>)>;

async fn snapshot(t: &Target, table: &str) -> Snapshot {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id, email, email_bidx FROM {table} ORDER BY id"
    )))
    .fetch_all(&t.pool)
    .await
    .unwrap();
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn keys(t: &Target) -> Vec<KeyRecord> {
    let store = envelope_sqlx::key_store_for_url(&t.url, &t.key_table())
        .await
        .unwrap();
    store.list(&KeyFilter::all()).await.unwrap()
}

/// A keyring like an application's: the CLI's master key file and key table, reading the key
/// table every second.
async fn app_keyring(t: &Target, kms: LocalKms) -> Keyring {
    try_app_keyring(t, kms).await.unwrap()
}

async fn try_app_keyring(t: &Target, kms: LocalKms) -> Result<Keyring, Error> {
    let store = envelope_sqlx::key_store_for_url(&t.url, &t.key_table())
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let cmk = kms.cmk_id().to_owned();
        Keyring::builder(kms, store)
            .cmk(cmk)
            .policy(Policy {
                key_refresh: Duration::from_secs(1),
                ..Policy::default()
            })
            .build()
    })
    .await
    .unwrap()
}

fn master(t: &Target, name: &str) -> LocalKms {
    LocalKms::open(t.dir.path().join(name)).unwrap()
}

async fn open_all(k: &Keyring, snap: &Snapshot) -> Result<usize, Error> {
    let label = Label::new(LABEL).unwrap();
    for (id, value, _) in snap {
        let plain = k.decrypt(&label, value.as_ref().unwrap()).await?;
        assert_eq!(plain, email(*id).as_bytes());
    }
    Ok(snap.len())
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen within {within:?}");
}

async fn rewrap_local_to_local(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = encrypted_table(&t, 200).await;
    // A second data key (and the index key): several rows to rewrap.
    t.expect(&["rotate"], 0);
    let before = snapshot(&t, &table).await;
    let keys_before = keys(&t).await;
    assert!(keys_before.len() >= 3, "{keys_before:?}");

    let new_key = t.dir.path().join("new.key");
    t.expect(&["keygen", "--out", new_key.to_str().unwrap()], 0);
    // An application that holds both master keys, reading before, during and after.
    let running = app_keyring(
        &t,
        master(&t, "master.key").with_keys_of(master(&t, "new.key")),
    )
    .await;
    assert_eq!(open_all(&running, &before).await.unwrap(), 200);

    let to = format!("local://{}", new_key.display());
    let out = t.expect(&["keys", "rewrap", "--to", &to, "--json"], 0);
    let summary = Target::summary(&out);
    assert_eq!(summary["rewrapped"], keys_before.len(), "{out}");
    assert_eq!(summary["failed"].as_array().unwrap().len(), 0);

    // No data row changed; every key row is under the new master key, nothing else changed.
    assert_eq!(snapshot(&t, &table).await, before);
    let new_cmk = master(&t, "new.key").cmk_id().to_owned();
    let keys_after = keys(&t).await;
    assert_eq!(keys_after.len(), keys_before.len());
    for (a, b) in keys_before.iter().zip(&keys_after) {
        assert_eq!(
            (a.id, a.kind, &a.scope, a.created_at),
            (b.id, b.kind, &b.scope, b.created_at)
        );
        assert_eq!(b.cmk_id, new_cmk);
        assert_ne!(a.wrapped, b.wrapped);
    }
    assert_eq!(open_all(&running, &before).await.unwrap(), 200);
    // A cold keyring with the new master key alone reads everything.
    let cold = app_keyring(&t, master(&t, "new.key")).await;
    assert_eq!(open_all(&cold, &before).await.unwrap(), 200);
    // The old master key alone no longer can: a keyring with it refuses to start.
    let old_only = try_app_keyring(&t, master(&t, "master.key")).await;
    assert!(
        matches!(old_only, Err(Error::MasterKeyMissing(_))),
        "{old_only:?}"
    );

    // A rerun has nothing left to do.
    let again = Target::summary(&t.expect(&["keys", "rewrap", "--to", &to, "--json"], 0));
    assert_eq!(again["rewrapped"], 0);
    assert_eq!(again["already"], keys_before.len());

    // `keys list --count` shows every key, and the values under the data keys.
    let list = t.expect(&["--kms", &to, "keys", "list", "--count", "--json"], 0);
    let listed: Vec<serde_json::Value> = list
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "key")
        .map(|v| v["key"].clone())
        .collect();
    assert_eq!(listed.len(), keys_after.len(), "{list}");
    let counted: i64 = listed
        .iter()
        .filter_map(|k| k["values"][format!("{table}.email")].as_i64())
        .sum();
    assert_eq!(counted, 200, "{list}");
    assert!(listed.iter().all(|k| k["cmk_id"] == new_cmk.as_str()));
    // A destination KMS without credentials: refused before anything is written.
    let out = t.envelope(&["keys", "rewrap", "--to", "tencent://ap-guangzhou/x"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TENCENTCLOUD_SECRET_ID"), "{stderr}");
}

async fn retire_then_write(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    encrypted_table(&t, 10).await;
    let app = app_keyring(&t, master(&t, "master.key")).await;
    let label = Label::new(LABEL).unwrap();
    let first = app.encrypt(&label, b"before").await.unwrap();
    let old = envelope_core::format::peek_key_id(&first).unwrap();

    // Scopes and labels share the key table's `scope` column: `--scope` names data keys only,
    // so a scope spelled like the label leaves the label's index key alone; `--label` takes it.
    let live_index = async || {
        keys(&t)
            .await
            .into_iter()
            .filter(|k| k.kind == KeyKind::Index && k.retired_at.is_none())
            .count()
    };
    assert_eq!(live_index().await, 1);
    let out = t.expect(&["keys", "retire", "--scope", LABEL, "--json"], 0);
    assert_eq!(Target::summary(&out)["retired"], 0, "{out}");
    assert_eq!(live_index().await, 1);

    let out = t.expect(&["keys", "retire", "--key", &old.to_hex()], 0);
    assert!(out.contains("retired data key"), "{out}");
    let row = keys(&t).await.into_iter().find(|k| k.id == old).unwrap();
    assert!(row.retired_at.is_some());

    // Within the refresh bound the running keyring writes under a new key.
    let retired_at = Instant::now();
    eventually(
        "a write under a new key",
        Duration::from_secs(3),
        || async {
            let blob = app.encrypt(&label, b"after").await.unwrap();
            envelope_core::format::peek_key_id(&blob).unwrap() != old
        },
    )
    .await;
    assert!(retired_at.elapsed() < Duration::from_millis(2600));
    assert_eq!(app.decrypt(&label, &first).await.unwrap(), b"before");
    // Retiring by age and by scope: every live data key here is younger than a day.
    let out = t.expect(&["keys", "retire", "--older-than", "1d", "--json"], 0);
    assert_eq!(Target::summary(&out)["retired"], 0, "{out}");
    t.expect(&["keys", "retire", "--scope", "default"], 0);
    assert!(
        keys(&t)
            .await
            .iter()
            .filter(|k| k.kind == KeyKind::Data)
            .all(|k| k.retired_at.is_some())
    );
    // No selector, or an unknown key: usage errors.
    assert_eq!(t.envelope(&["keys", "retire"]).status.code(), Some(2));
    let unknown = KeyId::random().unwrap().to_hex();
    assert_eq!(
        t.envelope(&["keys", "retire", "--key", &unknown])
            .status
            .code(),
        Some(2)
    );
}

async fn shred_then_read(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let table = encrypted_table(&t, 50).await;
    let snap = snapshot(&t, &table).await;
    let app = app_keyring(&t, master(&t, "master.key")).await;
    assert_eq!(open_all(&app, &snap).await.unwrap(), 50);
    let key = envelope_core::format::peek_key_id(snap[0].1.as_ref().unwrap()).unwrap();

    // A key that is not retired still takes writes (the application's keyring keeps sealing
    // under its active key until its next key-table read): refused even with --yes.
    let out = t.envelope(&["keys", "shred", "--key", &key.to_hex(), "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not retired") && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(keys(&t).await.iter().any(|k| k.id == key));
    // Retired just now: running keyrings may not have noticed yet (--key-refresh).
    t.expect(&["keys", "retire", "--key", &key.to_hex()], 0);
    let out = t.envelope(&["keys", "shred", "--key", &key.to_hex(), "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("less than --key-refresh"), "{stderr}");
    assert!(keys(&t).await.iter().any(|k| k.id == key));

    // Not on a terminal and no --yes: refused, after counting; nothing deleted. The count says
    // which columns it covers.
    let out = t.envelope(&[
        "keys",
        "shred",
        "--key",
        &key.to_hex(),
        "--key-refresh",
        "0s",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("{table}.email: 50")), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "counted only in the configured columns ({table}.email)"
        )),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert!(keys(&t).await.iter().any(|k| k.id == key));

    let out = t.expect(
        &[
            "keys",
            "shred",
            "--key",
            &key.to_hex(),
            "--yes",
            "--json",
            "--key-refresh",
            "0s",
        ],
        0,
    );
    let s = Target::summary(&out);
    assert_eq!(
        (s["shredded"].as_i64(), s["values"].as_i64()),
        (Some(1), Some(50)),
        "{out}"
    );
    assert!(!keys(&t).await.iter().any(|k| k.id == key));

    // The running keyring had the key cached; within the bound it is gone from memory too.
    let label = Label::new(LABEL).unwrap();
    let blob = snap[0].1.clone().unwrap();
    let shredded = Instant::now();
    eventually("the shredded key to leave the cache", Duration::from_secs(3), || async {
        matches!(app.decrypt(&label, &blob).await, Err(Error::UnknownKey { key_id }) if key_id == key)
    })
    .await;
    assert!(shredded.elapsed() < Duration::from_millis(2600));
    let fresh = app_keyring(&t, master(&t, "master.key")).await;
    assert!(matches!(
        fresh.decrypt(&label, &blob).await,
        Err(Error::UnknownKey { .. })
    ));
    // verify reports them, and `keys list --count` names the missing key.
    let out = t.expect(&["verify", "--json"], 1);
    assert_eq!(
        Target::summary(&out)["columns"][0]["failures"]["UnknownKey"],
        50
    );
    let list = t.expect(&["keys", "list", "--count"], 0);
    assert!(
        list.contains(&key.to_hex()) && list.contains("not in the key table"),
        "{list}"
    );
    // The running keyring writes on under a new key.
    let after = app.encrypt(&label, b"new").await.unwrap();
    assert_eq!(app.decrypt(&label, &after).await.unwrap(), b"new");
}

/// Rows whose blind index a lookup through every key of the label finds.
async fn found_by_lookup(t: &Target, app: &Keyring, table: &str, rows: i64) -> Vec<i64> {
    let mut found = Vec::new();
    for n in 1..=rows {
        let probes = app
            .blind_index_probes(&spec(), email(n).as_bytes())
            .await
            .unwrap();
        let params: Vec<String> = (1..=probes.len()).map(|i| t.p(i)).collect();
        let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM {table} WHERE email_bidx IN ({})",
            params.join(", ")
        )));
        for p in probes {
            q = q.bind(p);
        }
        if q.fetch_all(&t.pool).await.unwrap().contains(&n) {
            found.push(n);
        }
    }
    found
}

/// `rotate --index --limit N` recomputes N rows and keeps the old index key: rows it did not
/// reach are still found through it. The next run finishes the pass and only then deletes it.
async fn rotate_index_with_a_limit_keeps_the_old_key(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let rows = 40;
    let table = encrypted_table(&t, rows).await;
    let index_keys = async || -> Vec<KeyId> {
        keys(&t)
            .await
            .iter()
            .filter(|k| k.kind == KeyKind::Index)
            .map(|k| k.id)
            .collect()
    };
    let old = index_keys().await;
    assert_eq!(old.len(), 1);
    let target = format!("{table}.email");
    let args = [
        "rotate",
        "--index",
        &target,
        "--key-refresh",
        "0s",
        "--limit",
        "5",
        "--batch-size",
        "5",
    ];
    let out = t.expect(&args, 0);
    assert!(out.contains("range(s)") && out.contains("left"), "{out}");
    assert!(
        index_keys().await.contains(&old[0]),
        "the old index key was deleted"
    );
    let app = app_keyring(&t, master(&t, "master.key")).await;
    assert_eq!(
        found_by_lookup(&t, &app, &table, rows).await.len(),
        rows as usize
    );

    let out = t.expect(&["rotate", "--index", &target, "--key-refresh", "0s"], 0);
    assert!(
        out.contains("rotation of") && out.contains("finished"),
        "{out}"
    );
    let now = index_keys().await;
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], old[0]);
    app.refresh_keys().await.unwrap();
    assert_eq!(
        found_by_lookup(&t, &app, &table, rows).await.len(),
        rows as usize
    );
}

async fn rotate_index_under_a_reader(kind: Kind) {
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let rows = 3000;
    let table = encrypted_table(&t, rows).await;
    let old_index: Vec<KeyId> = keys(&t)
        .await
        .iter()
        .filter(|k| k.kind == KeyKind::Index)
        .map(|k| k.id)
        .collect();
    assert_eq!(old_index.len(), 1);

    let app = app_keyring(&t, master(&t, "master.key")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(Lookups::default());
    let written = Arc::new(AtomicU64::new(0));
    let select = |n: usize| {
        let params: Vec<String> = (1..=n).map(|i| t.p(i)).collect();
        format!(
            "SELECT id FROM {table} WHERE email_bidx IN ({})",
            params.join(", ")
        )
    };
    let select = Arc::new((1..=4).map(select).collect::<Vec<_>>());
    // The reader: lookups by e-mail, through every live index key, of old and new rows.
    let reader = {
        let (app, pool, stop, lookups, written, select) = (
            app.clone(),
            t.pool.clone(),
            stop.clone(),
            lookups.clone(),
            written.clone(),
            select.clone(),
        );
        tokio::spawn(async move {
            let mut i: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let extra = written.load(Ordering::Relaxed) as i64;
                let n = 1 + (i * 7919) % (rows + extra);
                let probes = app
                    .blind_index_probes(&spec(), email(n).as_bytes())
                    .await
                    .unwrap();
                let mut q = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(
                    select[probes.len() - 1].clone(),
                ));
                for p in probes {
                    q = q.bind(p);
                }
                let found: Vec<i64> = q.fetch_all(&pool).await.unwrap();
                lookups.record(found.contains(&n), || format!("row {n}"));
            }
        })
    };
    // The writer: new rows, indexed the way an application does (the write key).
    let writer = {
        let (app, pool, stop, written, kind) = (
            app.clone(),
            t.pool.clone(),
            stop.clone(),
            written.clone(),
            t.kind,
        );
        let insert = format!(
            "INSERT INTO {table} (id, email, email_bidx) VALUES ({}, {}, {})",
            t.p(1),
            t.p(2),
            t.p(3)
        );
        tokio::spawn(async move {
            let label = Label::new(LABEL).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let n = rows + 1 + written.load(Ordering::Relaxed) as i64;
                let sealed = app.encrypt(&label, email(n).as_bytes()).await.unwrap();
                let index = app.blind_index(&spec(), email(n).as_bytes()).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                    .bind(n)
                    .bind(sealed)
                    .bind(index)
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("insert on {kind:?}: {e}"));
                written.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Killed with SIGKILL once the pass has written some rows, then run again to the end.
    let args = [
        "rotate",
        "--index",
        &format!("{table}.email"),
        "--key-refresh",
        "1s",
        "--batch-size",
        "100",
        "--debug-pause-after-read",
        "30ms",
    ];
    let mut child = t.spawn(&args);
    let deadline = Instant::now() + Duration::from_secs(120);
    while t.rows_seen("reindex:").await < rows / 3 && Instant::now() < deadline {
        assert!(
            child.try_wait().unwrap().is_none(),
            "rotate --index ended before it was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let mid = keys(&t).await;
    assert_eq!(
        mid.iter().filter(|k| k.kind == KeyKind::Index).count(),
        2,
        "a rotation in progress has the old key (retired) and the new one"
    );
    let out = t.expect(&args[..5], 0);
    assert!(out.contains("rotation of"), "{out}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    writer.await.unwrap();

    lookups.assert_none_missed(50);
    // One index key left, a new one; every row (old and new) indexed under it.
    let index_keys: Vec<KeyId> = keys(&t)
        .await
        .iter()
        .filter(|k| k.kind == KeyKind::Index)
        .map(|k| k.id)
        .collect();
    assert_eq!(index_keys.len(), 1);
    assert_ne!(index_keys, old_index);
    app.refresh_keys().await.unwrap();
    let snap = snapshot(&t, &table).await;
    assert!(snap.len() as i64 > rows);
    for (id, _, index) in &snap {
        let want = app
            .blind_index(&spec(), email(*id).as_bytes())
            .await
            .unwrap();
        assert_eq!(index.as_deref(), Some(&want[..]), "row {id}");
        assert_eq!(
            app.blind_index_probes(&spec(), email(*id).as_bytes())
                .await
                .unwrap()
                .len(),
            1
        );
    }
}

/// Tencent CMK A -> CMK B on the emulator (which checks every TC3 signature): killed with
/// SIGKILL midway and run again to the end, data table byte-identical, every key readable under
/// B by a cold keyring; then B -> A uninterrupted, with exactly one `ReEncrypt` per key and no
/// other KMS call.
async fn rewrap_tencent_cmk_a_to_b_on_the_emulator(kind: Kind) {
    use envelope_core::kms::tencent::{TencentConfig, TencentKms};
    use envelope_kms_emulator::{Emulator, EmulatorConfig, Faults};

    let Some(t) = Target::new(kind).await else {
        return;
    };
    let emulator = Emulator::start(EmulatorConfig::local("AKIDkeys", "keys-secret")).unwrap();
    let tencent = || {
        TencentKms::new(
            TencentConfig::new(
                "AKIDkeys",
                envelope_core::SecretString::new("keys-secret"),
                "ap-guangzhou",
            )
            .with_endpoint(emulator.endpoint()),
        )
        .unwrap()
    };
    let a = tencent().create_key("cmk-a", "A").await.unwrap().key_id;
    let b = tencent().create_key("cmk-b", "B").await.unwrap().key_id;
    let endpoint = emulator.endpoint();
    let env = [
        ("TENCENTCLOUD_SECRET_ID", "AKIDkeys"),
        ("TENCENTCLOUD_SECRET_KEY", "keys-secret"),
        ("ENVELOPE_TENCENT_ENDPOINT", endpoint.as_str()),
    ];
    let uri_a = format!("tencent://ap-guangzhou/{a}");
    let uri_b = format!("tencent://ap-guangzhou/{b}");

    // A table encrypted under CMK A, and 60 more data keys (as many processes would leave).
    let table = t.table("tc");
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, email_bidx {blob})",
        blob = t.blob()
    ))
    .await;
    for i in 1..=40 {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({i}, {}, NULL)",
            t.bytes_literal(email(i).as_bytes())
        ))
        .await;
    }
    t.write_config(&config(&table));
    t.expect_with_env(&["--kms", &uri_a, "init"], &env, 0);
    t.expect_with_env(&["--kms", &uri_a, "encrypt"], &env, 0);
    let store = envelope_sqlx::key_store_for_url(&t.url, &t.key_table())
        .await
        .unwrap();
    let keyring = {
        let (kms, a, store) = (Arc::new(tencent()), a.clone(), store.clone());
        tokio::task::spawn_blocking(move || Keyring::builder(kms, store).cmk(a).build().unwrap())
            .await
            .unwrap()
    };
    for _ in 0..60 {
        keyring
            .rotate(&envelope_core::Scope::default())
            .await
            .unwrap();
    }
    let before = snapshot(&t, &table).await;
    let total = keys(&t).await.len();
    assert!(total >= 62);

    // Slow KMS calls, so the kill lands midway.
    emulator.set_faults(Faults {
        latency_ms: 40,
        ..Faults::default()
    });
    let mut child = {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_envelope"));
        c.arg("--config")
            .arg(t.dir.path().join("envelope.toml"))
            .args(["--kms", &uri_a, "keys", "rewrap", "--to", &uri_b, "--json"])
            .envs(env)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null());
        c.spawn().unwrap()
    };
    let under = async |cmk: &str| keys(&t).await.iter().filter(|k| k.cmk_id == cmk).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while under(&b).await < total / 3 && Instant::now() < deadline {
        assert!(
            child.try_wait().unwrap().is_none(),
            "rewrap ended before it was killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let moved = under(&b).await;
    assert!(moved > 0 && moved < total, "{moved} of {total}");

    emulator.set_faults(Faults::default());
    let out = t.expect_with_env(
        &["--kms", &uri_a, "keys", "rewrap", "--to", &uri_b, "--json"],
        &env,
        0,
    );
    let s = Target::summary(&out);
    assert_eq!(
        s["rewrapped"].as_u64().unwrap() as usize,
        total - moved,
        "{out}"
    );
    assert_eq!(under(&b).await, total);
    assert_eq!(snapshot(&t, &table).await, before);
    // A cold keyring whose CMK for new keys is B reads every value and every index.
    let cold = {
        let (kms, b, store) = (Arc::new(tencent()), b.clone(), store.clone());
        tokio::task::spawn_blocking(move || Keyring::builder(kms, store).cmk(b).build().unwrap())
            .await
            .unwrap()
    };
    assert_eq!(open_all(&cold, &before).await.unwrap(), 40);
    assert_eq!(
        cold.blind_index(&spec(), email(1).as_bytes())
            .await
            .unwrap(),
        before[0].2.clone().unwrap()
    );

    // Back to A without interruption: one ReEncrypt per key, nothing else.
    emulator.reset_counters();
    let out = t.expect_with_env(
        &["--kms", &uri_b, "keys", "rewrap", "--to", &uri_a, "--json"],
        &env,
        0,
    );
    assert_eq!(
        Target::summary(&out)["rewrapped"].as_u64().unwrap() as usize,
        total,
        "{out}"
    );
    assert_eq!(emulator.calls("ReEncrypt") as usize, total);
    for other in ["GenerateDataKey", "Decrypt", "Encrypt"] {
        assert_eq!(emulator.calls(other), 0, "{other}");
    }
    assert_eq!(under(&a).await, total);
    assert_eq!(snapshot(&t, &table).await, before);
}

/// One end of a move between KMSs: the key URI the CLI takes, the environment it needs, and
/// the same provider for the application.
struct Side {
    uri: String,
    env: Vec<(&'static str, String)>,
    kms: Arc<dyn KmsProvider>,
    cmk: String,
}

async fn keyring_with(t: &Target, writer: &Side, reader: Option<&Side>) -> Result<Keyring, Error> {
    let store = envelope_sqlx::key_store_for_url(&t.url, &t.key_table())
        .await
        .unwrap();
    let (kms, cmk) = (writer.kms.clone(), writer.cmk.clone());
    let also = reader.map(|r| envelope_core::kms::Connected {
        kms: r.kms.clone(),
        cmk: r.cmk.clone(),
    });
    tokio::task::spawn_blocking(move || {
        let mut b = Keyring::builder(kms, store).cmk(cmk).policy(Policy {
            key_refresh: Duration::from_secs(1),
            ..Policy::default()
        });
        if let Some(also) = also {
            b = b.also_read(also);
        }
        b.build()
    })
    .await
    .unwrap()
}

/// Encrypt a table under `from`, then `keys rewrap --to` `to` while an application that holds
/// both providers keeps reading.
async fn rewrap_across_kmss(t: &Target, from: Side, to: Side) {
    const ROWS: i64 = 120;
    let table = t.table("mv");
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, email_bidx {blob})",
        blob = t.blob()
    ))
    .await;
    for i in 1..=ROWS {
        t.exec(&format!(
            "INSERT INTO {table} VALUES ({i}, {}, NULL)",
            t.bytes_literal(email(i).as_bytes())
        ))
        .await;
    }
    t.write_config(&config(&table));
    let env: Vec<(&str, &str)> = from
        .env
        .iter()
        .chain(&to.env)
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    for cmd in ["init", "encrypt", "rotate"] {
        t.expect_with_env(&["--kms", &from.uri, cmd], &env, 0);
    }
    let before = snapshot(t, &table).await;
    let total = keys(t).await.len();
    assert!(total >= 3, "data keys and the index key");
    assert!(keys(t).await.iter().all(|k| k.provider == from.kms.name()));

    let app = keyring_with(t, &from, Some(&to)).await.unwrap();
    assert_eq!(open_all(&app, &before).await.unwrap(), ROWS as usize);
    // Cold keyrings made over and over while the keys move: each unwraps with whichever
    // provider the key row names at that moment.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads) = (stop.clone(), reads.clone());
        let snap = before.clone();
        let (url, key_table) = (t.url.clone(), t.key_table());
        let (w, r) = (
            (from.kms.clone(), from.cmk.clone()),
            envelope_core::kms::Connected {
                kms: to.kms.clone(),
                cmk: to.cmk.clone(),
            },
        );
        tokio::spawn(async move {
            let label = Label::new(LABEL).unwrap();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let store = envelope_sqlx::key_store_for_url(&url, &key_table)
                    .await
                    .unwrap();
                let (kms, cmk, also) = (w.0.clone(), w.1.clone(), r.clone());
                let cold = tokio::task::spawn_blocking(move || {
                    Keyring::builder(kms, store)
                        .cmk(cmk)
                        .also_read(also)
                        .build()
                        .unwrap()
                })
                .await
                .unwrap();
                for _ in 0..3 {
                    let (id, value, _) = &snap[i % snap.len()];
                    i += 7;
                    let plain = cold.decrypt(&label, value.as_ref().unwrap()).await.unwrap();
                    assert_eq!(plain, email(*id).as_bytes());
                    reads.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    let out = t.expect_with_env(
        &[
            "--kms", &from.uri, "keys", "rewrap", "--to", &to.uri, "--json",
        ],
        &env,
        0,
    );
    let s = Target::summary(&out);
    assert_eq!(s["rewrapped"].as_u64().unwrap() as usize, total, "{out}");
    stop.store(true, Ordering::SeqCst);
    reader.await.unwrap();
    assert!(reads.load(Ordering::SeqCst) > 0);

    // Every key is under the destination; no data row changed.
    let after = keys(t).await;
    assert_eq!(after.len(), total);
    for k in &after {
        assert_eq!(
            (k.provider.as_str(), k.cmk_id.as_str()),
            (to.kms.name(), to.cmk.as_str())
        );
    }
    assert_eq!(snapshot(t, &table).await, before);
    assert_eq!(open_all(&app, &before).await.unwrap(), ROWS as usize);
    // The destination alone reads everything, in a cold keyring and in `verify`.
    let dest_only = keyring_with(t, &to, None).await.unwrap();
    assert_eq!(open_all(&dest_only, &before).await.unwrap(), ROWS as usize);
    t.expect_with_env(&["--kms", &to.uri, "verify"], &env, 0);
    // The source alone no longer can, and says what to do.
    let source_only = keyring_with(t, &from, None).await.unwrap();
    let e = open_all(&source_only, &before).await.unwrap_err();
    assert!(e.to_string().contains("also_read_with"), "{e}");
    // A rerun has nothing left to do.
    let again = Target::summary(&t.expect_with_env(
        &[
            "--kms", &from.uri, "keys", "rewrap", "--to", &to.uri, "--json",
        ],
        &env,
        0,
    ));
    assert_eq!(again["rewrapped"], 0);
}

async fn rewrap_local_to_openbao(kind: Kind) {
    use envelope_tests::servers::{VaultAdmin, openbao_token, openbao_url, vault_kms};
    let Some(url) = openbao_url("rewrap_local_to_openbao") else {
        return;
    };
    let Some(t) = Target::new(kind).await else {
        return;
    };
    // The target's own master key file (made with the target).
    let path = t.dir.path().join("master.key");
    let local = LocalKms::open(&path).unwrap();
    let from = Side {
        uri: format!("local://{}", path.display()),
        env: Vec::new(),
        cmk: local.cmk_id().to_owned(),
        kms: Arc::new(local),
    };
    let cmk = VaultAdmin::new(&url).await.new_key(false).await;
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    let to = Side {
        uri: format!("vault+http://{host}/{cmk}"),
        env: vec![("VAULT_TOKEN", openbao_token())],
        kms: Arc::new(vault_kms(&url)),
        cmk,
    };
    rewrap_across_kmss(&t, from, to).await;
}

async fn rewrap_tencent_to_moto(kind: Kind) {
    use envelope_core::kms::tencent::{TencentConfig, TencentKms};
    use envelope_kms_emulator::{Emulator, EmulatorConfig};
    use envelope_tests::servers::{aws_kms, aws_new_key, moto_url};
    let Some(moto) = moto_url("rewrap_tencent_to_moto") else {
        return;
    };
    let Some(t) = Target::new(kind).await else {
        return;
    };
    let emulator = Emulator::start(EmulatorConfig::local("AKIDmove", "move-secret")).unwrap();
    let tencent = TencentKms::new(
        TencentConfig::new(
            "AKIDmove",
            envelope_core::SecretString::new("move-secret"),
            "ap-guangzhou",
        )
        .with_endpoint(emulator.endpoint()),
    )
    .unwrap();
    let a = tencent.create_key("move-a", "A").await.unwrap().key_id;
    let from = Side {
        uri: format!("tencent://ap-guangzhou/{a}"),
        env: vec![
            ("TENCENTCLOUD_SECRET_ID", "AKIDmove".to_owned()),
            ("TENCENTCLOUD_SECRET_KEY", "move-secret".to_owned()),
            ("ENVELOPE_TENCENT_ENDPOINT", emulator.endpoint()),
        ],
        kms: Arc::new(tencent),
        cmk: a,
    };
    let aws = aws_kms(&moto).await;
    let key = aws_new_key(&aws).await;
    let to = Side {
        uri: format!("aws://us-east-1/{key}"),
        env: vec![
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ("AWS_ENDPOINT_URL_KMS", moto.clone()),
        ],
        kms: Arc::new(aws),
        cmk: key,
    };
    rewrap_across_kmss(&t, from, to).await;
}

per_database!(
    rewrap_local_to_local,
    retire_then_write,
    shred_then_read,
    rotate_index_under_a_reader,
    rotate_index_with_a_limit_keeps_the_old_key,
    rewrap_tencent_cmk_a_to_b_on_the_emulator,
    rewrap_local_to_openbao,
    rewrap_tencent_to_moto
);

/// moto does not check signatures by default, so the credential error path is shown here: a
/// CLI with no AWS credentials anywhere in the chain says so, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_without_credentials_says_so() {
    use envelope_tests::servers::{aws_kms, aws_new_key, moto_url};
    let Some(moto) = moto_url("aws_without_credentials_says_so") else {
        return;
    };
    let Some(t) = Target::new(Kind::Sqlite).await else {
        return;
    };
    let key = aws_new_key(&aws_kms(&moto).await).await;
    let table = t.table("nocreds");
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, email_bidx {blob})",
        blob = t.blob()
    ))
    .await;
    t.write_config(&config(&table));
    let none = t.dir.path().join("no-such-file");
    let none = none.to_str().unwrap();
    let env = [
        ("AWS_ENDPOINT_URL_KMS", moto.as_str()),
        ("AWS_ACCESS_KEY_ID", ""),
        ("AWS_SECRET_ACCESS_KEY", ""),
        ("AWS_SESSION_TOKEN", ""),
        ("AWS_PROFILE", "envelope-no-such-profile"),
        ("AWS_CONFIG_FILE", none),
        ("AWS_SHARED_CREDENTIALS_FILE", none),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", ""),
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", ""),
        ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", ""),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    let uri = format!("aws://us-east-1/{key}");
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_envelope"));
    c.arg("--config")
        .arg(t.dir.path().join("envelope.toml"))
        .args(["--kms", &uri, "init"])
        .envs(env)
        .stdin(std::process::Stdio::null());
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("credentials") && stderr.contains("aws"),
        "the error names the missing credentials: {stderr}"
    );
    assert!(keys(&t).await.is_empty(), "no key row was written");
}

/// `keys rewrap` moves a row only from a master key that `kms` or `also_read` names: a row
/// naming another CMK the credentials can use (another application's, or one an attacker put
/// in the key table with a key wrapped under it) is reported and left as it is. Rewrapping it
/// would launder that key under the destination, which every keyring trusts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_leaves_rows_under_an_unconfigured_cmk() {
    use envelope_core::kms::tencent::{TencentConfig, TencentKms};
    use envelope_kms_emulator::{Emulator, EmulatorConfig};

    let Some(t) = Target::new(Kind::Sqlite).await else {
        return;
    };
    let emulator = Emulator::start(EmulatorConfig::local("AKIDkeys", "keys-secret")).unwrap();
    let tencent = || {
        TencentKms::new(
            TencentConfig::new(
                "AKIDkeys",
                envelope_core::SecretString::new("keys-secret"),
                "ap-guangzhou",
            )
            .with_endpoint(emulator.endpoint()),
        )
        .unwrap()
    };
    let a = tencent().create_key("cmk-a", "A").await.unwrap().key_id;
    let b = tencent().create_key("cmk-b", "B").await.unwrap().key_id;
    let other = tencent().create_key("cmk-other", "C").await.unwrap().key_id;
    let endpoint = emulator.endpoint();
    let env = [
        ("TENCENTCLOUD_SECRET_ID", "AKIDkeys"),
        ("TENCENTCLOUD_SECRET_KEY", "keys-secret"),
        ("ENVELOPE_TENCENT_ENDPOINT", endpoint.as_str()),
    ];
    let uri_a = format!("tencent://ap-guangzhou/{a}");
    let uri_b = format!("tencent://ap-guangzhou/{b}");
    let table = t.table("untrusted");
    t.exec(&format!(
        "CREATE TABLE {table} (id BIGINT PRIMARY KEY, email {blob}, email_bidx {blob})",
        blob = t.blob()
    ))
    .await;
    t.write_config(&config(&table));
    t.expect_with_env(&["--kms", &uri_a, "init"], &env, 0);
    // A key row under a CMK the configuration does not name.
    let store = envelope_sqlx::key_store_for_url(&t.url, &t.key_table())
        .await
        .unwrap();
    let foreign = {
        let (kms, other, store) = (Arc::new(tencent()), other.clone(), store.clone());
        let keyring = tokio::task::spawn_blocking(move || {
            Keyring::builder(kms, store).cmk(other).build().unwrap()
        })
        .await
        .unwrap();
        keyring
            .rotate(&envelope_core::Scope::default())
            .await
            .unwrap()
    };
    let out = t.expect_with_env(
        &["--kms", &uri_a, "keys", "rewrap", "--to", &uri_b],
        &env,
        1,
    );
    let row = keys(&t)
        .await
        .into_iter()
        .find(|k| k.id == foreign)
        .unwrap();
    assert_eq!(
        row.cmk_id, other,
        "the row under an unconfigured CMK was moved: {out}"
    );
    assert!(
        keys(&t)
            .await
            .iter()
            .filter(|k| k.id != foreign)
            .all(|k| k.cmk_id == b),
        "{out}"
    );
}
