//! Tencent Cloud KMS end to end on the emulator: the protocol's edges, retries, fault injection,
//! and the keyring's KMS call counts as the server sees them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envelope_core::__private::tc3 as sign;
use envelope_core::kms::tencent::{TencentConfig, TencentKms};
use envelope_core::{
    EncryptionContext, Error, KeyStore, Keyring, KmsErrorKind, KmsProvider, Label, MemoryKeyStore,
    Policy, Scope, SecretString, format,
};
use envelope_kms_emulator::{Emulator, EmulatorConfig, Faults};
use envelope_tests::{EMULATOR_SECRET_ID, EMULATOR_SECRET_KEY, TencentTarget};
use serde_json::Value;

fn ctx() -> EncryptionContext {
    EncryptionContext::new().with("envelope.key_id", "k")
}

fn label() -> Label {
    Label::new("users.ssn").unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ----- the protocol, request by request ------------------------------------------------------

struct Raw {
    host: String,
    url: String,
    client: reqwest::Client,
}

impl Raw {
    fn new(e: &Emulator) -> Raw {
        Raw {
            host: e.addr().to_string(),
            url: e.endpoint(),
            client: reqwest::Client::new(),
        }
    }

    /// Send a request signed with the given pieces; returns `Response`.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        secret_id: &str,
        secret_key: &str,
        timestamp: i64,
        scope_service: &str,
        signed: &[&str],
        action: &str,
        body: &str,
        sent_body: Option<&str>,
    ) -> Value {
        let mut headers: Vec<(&str, String)> = vec![
            ("content-type", "application/json".into()),
            ("host", self.host.clone()),
            ("x-tc-action", action.to_owned()),
        ];
        headers.retain(|(n, _)| signed.contains(n));
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let input = sign::CanonicalInput {
            method: "POST",
            uri: "/",
            query: "",
            headers: &pairs,
            payload: body.as_bytes(),
        };
        let auth = sign::authorization(
            secret_id,
            secret_key.as_bytes(),
            timestamp,
            scope_service,
            &input,
        );
        let r = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Authorization", auth)
            .header("X-TC-Action", action)
            .header("X-TC-Version", "2019-01-18")
            .header("X-TC-Region", "ap-guangzhou")
            .header("X-TC-Timestamp", timestamp.to_string())
            .body(sent_body.unwrap_or(body).to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "API errors travel as HTTP 200");
        serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap()["Response"].clone()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn code(v: &Value) -> &str {
    v["Error"]["Code"].as_str().unwrap_or("")
}

#[test]
fn signature_checks_match_the_real_service() {
    let e = Emulator::start(EmulatorConfig::local(
        EMULATOR_SECRET_ID,
        EMULATOR_SECRET_KEY,
    ))
    .unwrap();
    let raw = Raw::new(&e);
    let body = r#"{"NumberOfBytes": 16}"#;
    let (id, key) = (EMULATOR_SECRET_ID, EMULATOR_SECRET_KEY);
    rt().block_on(async {
        let two = ["content-type", "host"];
        let three = ["content-type", "host", "x-tc-action"];
        // What the SDK signs (two headers) and what the current docs sign (three) both pass.
        let ok = raw
            .send(id, key, now(), "kms", &two, "GenerateRandom", body, None)
            .await;
        assert_eq!(code(&ok), "", "{ok}");
        assert!(ok["RequestId"].is_string());
        let ok = raw
            .send(id, key, now(), "kms", &three, "GenerateRandom", body, None)
            .await;
        assert_eq!(code(&ok), "", "{ok}");

        let r = raw
            .send(
                id,
                "wrong-key",
                now(),
                "kms",
                &two,
                "GenerateRandom",
                body,
                None,
            )
            .await;
        assert_eq!(code(&r), "AuthFailure.SignatureFailure");
        let r = raw
            .send(
                "AKIDnobody",
                key,
                now(),
                "kms",
                &two,
                "GenerateRandom",
                body,
                None,
            )
            .await;
        assert_eq!(code(&r), "AuthFailure.SecretIdNotFound");
        let r = raw
            .send(
                id,
                key,
                now() - 301,
                "kms",
                &two,
                "GenerateRandom",
                body,
                None,
            )
            .await;
        assert_eq!(code(&r), "AuthFailure.SignatureExpire");
        let r = raw
            .send(
                id,
                key,
                now() + 400,
                "kms",
                &two,
                "GenerateRandom",
                body,
                None,
            )
            .await;
        assert_eq!(code(&r), "AuthFailure.SignatureExpire");
        let r = raw
            .send(id, key, now(), "cvm", &two, "GenerateRandom", body, None)
            .await;
        assert_eq!(
            code(&r),
            "AuthFailure.SignatureFailure",
            "service in the scope"
        );
        let r = raw
            .send(
                id,
                key,
                now(),
                "kms",
                &["host"],
                "GenerateRandom",
                body,
                None,
            )
            .await;
        assert_eq!(
            code(&r),
            "AuthFailure.InvalidAuthorization",
            "content-type must be signed"
        );
        let r = raw
            .send(
                id,
                key,
                now(),
                "kms",
                &["content-type"],
                "GenerateRandom",
                body,
                None,
            )
            .await;
        assert_eq!(
            code(&r),
            "AuthFailure.InvalidAuthorization",
            "host must be signed"
        );
        let r = raw
            .send(
                id,
                key,
                now(),
                "kms",
                &two,
                "GenerateRandom",
                body,
                Some(r#"{"NumberOfBytes": 17}"#),
            )
            .await;
        assert_eq!(
            code(&r),
            "AuthFailure.SignatureFailure",
            "body changed after signing"
        );
        let r = raw
            .send(id, key, now(), "kms", &two, "StealKeys", "{}", None)
            .await;
        assert_eq!(code(&r), "InvalidAction");

        // A malformed Authorization header and a missing one.
        for auth in [Some("TC3-HMAC-SHA256 nonsense"), None] {
            let mut req = raw
                .client
                .post(&raw.url)
                .header("Content-Type", "application/json")
                .header("X-TC-Action", "GenerateRandom")
                .header("X-TC-Version", "2019-01-18")
                .header("X-TC-Region", "ap-guangzhou")
                .header("X-TC-Timestamp", now().to_string())
                .body(body);
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            let v: Value =
                serde_json::from_str(&req.send().await.unwrap().text().await.unwrap()).unwrap();
            assert_eq!(code(&v["Response"]), "AuthFailure.InvalidAuthorization");
        }
    });
}

#[test]
fn scope_date_is_the_utc_date_of_the_timestamp() {
    // Sign with the right key but a credential scope dated the day before: refused.
    let e = Emulator::start(EmulatorConfig::local(
        EMULATOR_SECRET_ID,
        EMULATOR_SECRET_KEY,
    ))
    .unwrap();
    let host = e.addr().to_string();
    let ts = now();
    let body = r#"{"NumberOfBytes": 8}"#;
    let headers = [
        ("content-type", "application/json"),
        ("host", host.as_str()),
    ];
    let input = sign::CanonicalInput {
        method: "POST",
        uri: "/",
        query: "",
        headers: &headers,
        payload: body.as_bytes(),
    };
    let yesterday = sign::utc_date(ts - 86_400);
    let sig = sign::signature_with_scope_date(
        EMULATOR_SECRET_KEY.as_bytes(),
        &yesterday,
        ts,
        "kms",
        &input,
    );
    let auth = format!(
        "TC3-HMAC-SHA256 Credential={EMULATOR_SECRET_ID}/{yesterday}/kms/tc3_request, SignedHeaders=content-type;host, Signature={sig}"
    );
    let v: Value = rt().block_on(async {
        reqwest::Client::new()
            .post(e.endpoint())
            .header("Content-Type", "application/json")
            .header("Authorization", auth)
            .header("X-TC-Action", "GenerateRandom")
            .header("X-TC-Version", "2019-01-18")
            .header("X-TC-Region", "ap-guangzhou")
            .header("X-TC-Timestamp", ts.to_string())
            .body(body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap()
    });
    assert_eq!(code(&v["Response"]), "AuthFailure.SignatureFailure");
}

#[test]
fn session_token_is_required_when_configured() {
    let mut config = EmulatorConfig::local(EMULATOR_SECRET_ID, EMULATOR_SECRET_KEY);
    config.session_token = Some(SecretString::new("sts-token"));
    let e = Emulator::start(config).unwrap();
    let client = |token: Option<&str>| {
        let mut c = TencentConfig::new(
            EMULATOR_SECRET_ID,
            SecretString::new(EMULATOR_SECRET_KEY),
            "ap-guangzhou",
        )
        .with_endpoint(e.endpoint());
        c.session_token = token.map(SecretString::new);
        TencentKms::new(c).unwrap()
    };
    rt().block_on(async {
        let err = client(None).create_key("t", "").await.unwrap_err();
        assert!(
            err.to_string().contains("AuthFailure.TokenFailure"),
            "{err}"
        );
        client(Some("sts-token")).create_key("t", "").await.unwrap();
    });
}

#[test]
fn auth_failures_are_not_retried() {
    let t = TencentTarget::with_config(|mut c| {
        c.secret_key = SecretString::new("not-the-key");
        c.limits.max_attempts = 5;
        c
    });
    let err = rt()
        .block_on(t.kms.generate_data_key("any", &ctx()))
        .unwrap_err();
    assert_eq!(err.kind(), KmsErrorKind::Auth);
    assert_eq!(err.code(), Some("AuthFailure.SignatureFailure"));
    assert!(err.request_id().is_some());
    assert_eq!(t.emulator.requests(), 1, "one request, no retries");
}

#[test]
fn throttling_is_retried_until_it_clears() {
    let t = TencentTarget::with_config(|mut c| {
        c.limits.max_attempts = 8;
        c.limits.backoff = Duration::from_millis(100);
        c
    });
    let rt = rt();
    let cmk = rt
        .block_on(t.kms.create_key("throttle", ""))
        .unwrap()
        .key_id;
    t.emulator.set_faults(Faults {
        max_qps: 3,
        ..Faults::default()
    });
    rt.block_on(async {
        for _ in 0..10 {
            t.kms.generate_data_key(&cmk, &ctx()).await.unwrap();
        }
    });
    assert!(
        t.emulator.errors("GenerateDataKey") > 0,
        "the limit was hit"
    );
    // Without retries the limit surfaces as a typed, retryable error.
    let once = TencentTarget::with_config(|mut c| {
        c.limits.max_attempts = 1;
        c
    });
    let cmk = rt
        .block_on(once.kms.create_key("throttle", ""))
        .unwrap()
        .key_id;
    once.emulator.set_faults(Faults {
        max_qps: 1,
        ..Faults::default()
    });
    let errors: Vec<_> = rt.block_on(async {
        let mut errs = Vec::new();
        for _ in 0..5 {
            if let Err(e) = once.kms.generate_data_key(&cmk, &ctx()).await {
                errs.push(e);
            }
        }
        errs
    });
    assert!(!errors.is_empty());
    assert!(
        errors
            .iter()
            .all(|e| e.kind() == KmsErrorKind::Throttled && e.is_retryable())
    );
    assert_eq!(errors[0].code(), Some("RequestLimitExceeded"));
}

fn tencent_keyring(
    t: &TencentTarget,
    cmk: &str,
    store: Arc<MemoryKeyStore>,
    policy: Policy,
) -> Keyring {
    Keyring::builder(t.kms.clone(), store)
        .cmk(cmk)
        .policy(policy)
        .build()
        .unwrap()
}

#[test]
fn thirty_percent_failures_under_32_writers_lose_nothing() {
    let t = TencentTarget::with_config(|mut c| {
        // 0.3^10: a call fails for good about once in 170,000.
        c.limits.max_attempts = 10;
        c.limits.backoff = Duration::from_millis(5);
        // Ten attempts must still fit inside the keyring's kms_timeout (the emulator answers in
        // microseconds).
        c.limits.request_timeout = Duration::from_millis(500);
        c
    });
    let rt = rt();
    let cmk = rt.block_on(t.kms.create_key("faulty", "")).unwrap().key_id;
    t.emulator.set_faults(Faults {
        fail_rate: 0.3,
        ..Faults::default()
    });
    let store = Arc::new(MemoryKeyStore::new());
    let policy = Policy {
        dek_max_uses: 25,
        refresh_retry: Duration::from_millis(20),
        ..Policy::default()
    };
    let writer = tencent_keyring(&t, &cmk, store.clone(), policy.clone());
    let written: Vec<(Vec<u8>, String)> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for task in 0..32 {
            let k = writer.clone();
            set.spawn(async move {
                let mut out = Vec::new();
                for i in 0..20 {
                    let pt = format!("task {task} value {i}");
                    let blob = if i % 2 == 0 {
                        k.encrypt(&label(), pt.as_bytes()).await.unwrap()
                    } else {
                        let k2 = k.clone();
                        let p2 = pt.clone();
                        tokio::task::spawn_blocking(move || {
                            k2.blocking().encrypt(&label(), p2.as_bytes())
                        })
                        .await
                        .unwrap()
                        .unwrap()
                    };
                    out.push((blob, pt));
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(r) = set.join_next().await {
            all.extend(r.unwrap());
        }
        all
    });
    assert_eq!(written.len(), 640);
    assert!(
        t.emulator.errors("GenerateDataKey") > 0,
        "faults were injected"
    );
    // A second instance with a cold cache reads every value back, through the same faults.
    let reader = tencent_keyring(&t, &cmk, store, policy);
    rt.block_on(async {
        for (blob, pt) in &written {
            assert_eq!(reader.decrypt(&label(), blob).await.unwrap(), pt.as_bytes());
        }
    });
}

#[test]
fn keyring_on_the_emulator_makes_one_decrypt_per_key_for_64_cold_readers() {
    let t = TencentTarget::new();
    let rt = rt();
    let cmk = rt.block_on(t.kms.create_key("e2e", "")).unwrap().key_id;
    let store = Arc::new(MemoryKeyStore::new());
    let writer = tencent_keyring(&t, &cmk, store.clone(), Policy::default());
    let k = 4;
    let mut values = Vec::new();
    rt.block_on(async {
        for key in 0..k {
            if key > 0 {
                writer.rotate(&Scope::default()).await.unwrap();
            }
            for i in 0..16 {
                let pt = format!("{key}-{i}");
                values.push((writer.encrypt(&label(), pt.as_bytes()).await.unwrap(), pt));
            }
        }
    });
    let ids: std::collections::HashSet<_> = values
        .iter()
        .map(|(b, _)| format::peek_key_id(b).unwrap())
        .collect();
    assert_eq!(ids.len(), k);
    assert_eq!(t.emulator.calls("GenerateDataKey"), k as u64);

    t.emulator.reset_counters();
    t.emulator.set_faults(Faults {
        latency_ms: 30,
        ..Faults::default()
    });
    let reader = tencent_keyring(&t, &cmk, store, Policy::default());
    let values = Arc::new(values);
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for task in 0..64usize {
            let reader = reader.clone();
            let values = values.clone();
            set.spawn(async move {
                for j in 0..values.len() {
                    let (blob, pt) = &values[(task * 5 + j) % values.len()];
                    let got = if task % 2 == 0 {
                        reader.decrypt(&label(), blob).await.unwrap()
                    } else {
                        reader.blocking().decrypt(&label(), blob).unwrap()
                    };
                    assert_eq!(got, pt.as_bytes());
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    });
    assert_eq!(
        t.emulator.calls("Decrypt"),
        k as u64,
        "Decrypt calls seen by the KMS"
    );
}

#[test]
fn disabled_cmk_stops_new_keys_but_cached_reads_go_on() {
    let t = TencentTarget::new();
    let rt = rt();
    let cmk = rt
        .block_on(t.kms.create_key("disable-me", ""))
        .unwrap()
        .key_id;
    let store = Arc::new(MemoryKeyStore::new());
    let k = tencent_keyring(
        &t,
        &cmk,
        store.clone(),
        Policy {
            dek_max_uses: 10,
            ..Policy::default()
        },
    );
    let mut blobs: Vec<_> = (0..3)
        .map(|i| k.blocking().encrypt(&label(), &[i]).unwrap())
        .collect();
    rt.block_on(t.kms.disable_key(&cmk)).unwrap();
    // The current key takes writes up to its limit (its successor cannot be prepared)...
    blobs.extend((3..10).map(|i| k.blocking().encrypt(&label(), &[i]).unwrap()));
    // ...then no new one can be made: a clear error.
    let err = k.blocking().encrypt(&label(), b"x").unwrap_err();
    assert!(
        err.report().to_string().contains("master key is disabled"),
        "{err}"
    );
    // Cached keys still open.
    for (i, b) in blobs.iter().enumerate() {
        assert_eq!(k.blocking().decrypt(&label(), b).unwrap(), [i as u8]);
    }
    // A cold reader cannot unwrap under a disabled CMK.
    let cold = tencent_keyring(&t, &cmk, store, Policy::default());
    let err = cold.blocking().decrypt(&label(), &blobs[0]).unwrap_err();
    assert!(err.to_string().contains("disabled"), "{err}");
}

#[test]
fn state_file_keeps_old_blobs_readable_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("kms-state.json");
    let start = || {
        let mut c = EmulatorConfig::local(EMULATOR_SECRET_ID, EMULATOR_SECRET_KEY);
        c.state_file = Some(state.clone());
        Emulator::start(c).unwrap()
    };
    let client = |e: &Emulator| {
        TencentKms::new(
            TencentConfig::new(
                EMULATOR_SECRET_ID,
                SecretString::new(EMULATOR_SECRET_KEY),
                "ap-guangzhou",
            )
            .with_endpoint(e.endpoint()),
        )
        .unwrap()
    };
    let rt = rt();
    let e1 = start();
    let kms = client(&e1);
    let (cmk, g) = rt.block_on(async {
        let cmk = kms.create_key("persist", "").await.unwrap().key_id;
        (
            cmk.clone(),
            kms.generate_data_key(&cmk, &ctx()).await.unwrap(),
        )
    });
    drop(e1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let e2 = start();
    let kms = client(&e2);
    let back = rt.block_on(kms.decrypt(&cmk, &g.wrapped, &ctx())).unwrap();
    assert_eq!(back.expose(), g.plaintext.expose());
    assert_eq!(
        rt.block_on(kms.describe_key(&cmk)).unwrap().key_state,
        "Enabled"
    );
}

// ----- which CMK unwrapped the key; transport rules -------------------------------------------

fn client_for(endpoint: &str, adjust: impl FnOnce(&mut TencentConfig)) -> Arc<TencentKms> {
    let mut c = TencentConfig::new(
        EMULATOR_SECRET_ID,
        SecretString::new(EMULATOR_SECRET_KEY),
        "ap-guangzhou",
    )
    .with_endpoint(endpoint);
    adjust(&mut c);
    Arc::new(TencentKms::new(c).unwrap())
}

#[test]
fn a_key_record_naming_cmk_a_but_holding_a_key_under_cmk_b_is_refused() {
    let t = TencentTarget::new();
    let rt = rt();
    let (cmk_a, cmk_b) = rt.block_on(async {
        let a = t.kms.create_key("record-cmk", "").await.unwrap().key_id;
        let b = t.kms.create_key("other-cmk", "").await.unwrap().key_id;
        (a, b)
    });
    let store = Arc::new(MemoryKeyStore::new());
    let writer = tencent_keyring(&t, &cmk_a, store.clone(), Policy::default());
    let blob = writer.blocking().encrypt(&label(), b"078-05-1120").unwrap();
    let id = format::peek_key_id(&blob).unwrap();

    // The attacker edits the key table: the record still names CMK A, but its wrapped key is
    // now the same data key wrapped under CMK B (rewrapped with credentials that may use both;
    // a key from GenerateDataKey under B, whose plaintext the attacker then knows, works alike).
    rt.block_on(async {
        let mut record = store.get(&id).await.unwrap().unwrap();
        assert_eq!(record.cmk_id, cmk_a);
        let context = EncryptionContext::from_json(&record.kms_context).unwrap();
        record.wrapped = t
            .kms
            .re_encrypt(&record.wrapped, &cmk_a, &context, &cmk_b, &context)
            .await
            .unwrap();
        store.delete(&id).await.unwrap();
        store.insert(&record).await.unwrap();
    });

    // A reader with a cold cache refuses the record, naming both CMKs.
    let cold = tencent_keyring(&t, &cmk_a, store.clone(), Policy::default());
    let err = cold.blocking().decrypt(&label(), &blob).unwrap_err();
    match &err {
        Error::Kms(e) => {
            assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{err}");
            assert!(!e.is_retryable());
        }
        other => panic!("expected a KMS error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&cmk_a) && msg.contains(&cmk_b), "{msg}");
    assert!(!msg.contains("078-05-1120"), "{msg}");

    // Listing CMK B as trusted opens it.
    let trusting = client_for(&t.emulator.endpoint(), |c| {
        c.also_accept_cmks = vec![cmk_b.clone()];
    });
    let k = Keyring::builder(trusting, store)
        .cmk(&cmk_a)
        .build()
        .unwrap();
    assert_eq!(
        k.blocking().decrypt(&label(), &blob).unwrap(),
        b"078-05-1120"
    );
}

#[test]
fn a_key_record_naming_cmk_b_and_holding_a_key_under_cmk_b_is_refused() {
    // Security review N1: the attacker who can write `wrapped` can write `cmk_id` too, so the
    // response check alone (KeyId == the row's CMK) passes. The keyring must trust only CMKs
    // configured outside the key table.
    let t = TencentTarget::new();
    let rt = rt();
    let (cmk_a, cmk_b) = rt.block_on(async {
        let a = t.kms.create_key("record-cmk", "").await.unwrap().key_id;
        let b = t.kms.create_key("other-cmk", "").await.unwrap().key_id;
        (a, b)
    });
    let store = Arc::new(MemoryKeyStore::new());
    let writer = tencent_keyring(&t, &cmk_a, store.clone(), Policy::default());
    let blob = writer.blocking().encrypt(&label(), b"078-05-1120").unwrap();
    let id = format::peek_key_id(&blob).unwrap();

    rt.block_on(async {
        let mut record = store.get(&id).await.unwrap().unwrap();
        assert_eq!(record.cmk_id, cmk_a);
        let context = EncryptionContext::from_json(&record.kms_context).unwrap();
        record.wrapped = t
            .kms
            .re_encrypt(&record.wrapped, &cmk_a, &context, &cmk_b, &context)
            .await
            .unwrap();
        record.cmk_id = cmk_b.clone();
        store.delete(&id).await.unwrap();
        store.insert(&record).await.unwrap();
    });

    // A reader with a cold cache refuses the record, names CMK B, and never asks the KMS.
    let decrypts = t.emulator.calls("Decrypt");
    let cold = tencent_keyring(&t, &cmk_a, store.clone(), Policy::default());
    let err = cold.blocking().decrypt(&label(), &blob).unwrap_err();
    match &err {
        Error::Kms(e) => {
            assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{err}");
            assert!(!e.is_retryable());
        }
        other => panic!("expected a KMS error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&cmk_b), "{msg}");
    assert!(!msg.contains("078-05-1120"), "{msg}");
    assert_eq!(t.emulator.calls("Decrypt"), decrypts);

    // Trusting CMK B (keys rewrapped onto it) opens it.
    let trusting = Keyring::builder(t.kms.clone(), store)
        .cmk(&cmk_a)
        .trust_cmk(&cmk_b)
        .build()
        .unwrap();
    assert_eq!(
        trusting.blocking().decrypt(&label(), &blob).unwrap(),
        b"078-05-1120"
    );
}

#[test]
fn rewrap_refuses_a_key_that_is_not_under_the_named_source_cmk() {
    let t = TencentTarget::new();
    let rt = rt();
    rt.block_on(async {
        let a = t.kms.create_key("src-a", "").await.unwrap().key_id;
        let b = t.kms.create_key("src-b", "").await.unwrap().key_id;
        let c = t.kms.create_key("dst-c", "").await.unwrap().key_id;
        let under_b = t.kms.generate_data_key(&b, &ctx()).await.unwrap();
        // Rewrapping "A's" key to C would launder B's key into a record that passes every check.
        let err = t
            .kms
            .re_encrypt(&under_b.wrapped, &a, &ctx(), &c, &ctx())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::InvalidCiphertext);
        assert!(err.to_string().contains(&a) && err.to_string().contains(&b));
        // Named correctly, it moves.
        let moved = t
            .kms
            .re_encrypt(&under_b.wrapped, &b, &ctx(), &c, &ctx())
            .await
            .unwrap();
        let back = t.kms.decrypt(&c, &moved, &ctx()).await.unwrap();
        assert_eq!(back.expose(), under_b.plaintext.expose());
    });
}

#[test]
fn a_cmk_given_by_alias_needs_its_key_id_listed() {
    let t = TencentTarget::new();
    let rt = rt();
    let meta = rt.block_on(t.kms.create_key("by-alias", "")).unwrap();
    // Tencent answers with the KeyId, never the alias: the alias alone cannot be confirmed.
    let err = rt
        .block_on(t.kms.generate_data_key("alias/by-alias", &ctx()))
        .unwrap_err();
    assert_eq!(err.kind(), KmsErrorKind::InvalidCiphertext);
    assert!(err.to_string().contains(&meta.key_id), "{err}");
    let listed = client_for(&t.emulator.endpoint(), |c| {
        c.also_accept_cmks = vec![meta.key_id.clone()];
    });
    rt.block_on(async {
        let g = listed
            .generate_data_key("alias/by-alias", &ctx())
            .await
            .unwrap();
        let back = listed
            .decrypt("alias/by-alias", &g.wrapped, &ctx())
            .await
            .unwrap();
        assert_eq!(back.expose(), g.plaintext.expose());
    });
}

#[test]
fn keys_made_through_an_alias_stay_readable_only_while_the_alias_is_trusted() {
    let t = TencentTarget::new();
    let rt = rt();
    let meta = rt.block_on(t.kms.create_key("app-alias", "")).unwrap();
    let listed = client_for(&t.emulator.endpoint(), |c| {
        c.also_accept_cmks = vec![meta.key_id.clone()];
    });
    let store = Arc::new(MemoryKeyStore::new());
    let by_alias = Keyring::builder(listed.clone(), store.clone())
        .cmk("alias/app-alias")
        .build()
        .unwrap();
    let blob = by_alias.blocking().encrypt(&label(), b"v").unwrap();
    let id = format::peek_key_id(&blob).unwrap();
    // The record names the CMK as the keyring was given it.
    let record = rt.block_on(store.get(&id)).unwrap().unwrap();
    assert_eq!(record.cmk_id, "alias/app-alias");
    let cold = Keyring::builder(listed.clone(), store.clone())
        .cmk("alias/app-alias")
        .build()
        .unwrap();
    assert_eq!(cold.blocking().decrypt(&label(), &blob).unwrap(), b"v");

    // Reconfigured with the KeyId, the keyring must go on trusting the alias its keys name.
    let decrypts = t.emulator.calls("Decrypt");
    let by_id = Keyring::builder(listed.clone(), store.clone())
        .cmk(&meta.key_id)
        .build()
        .unwrap();
    let err = by_id.blocking().decrypt(&label(), &blob).unwrap_err();
    assert!(err.to_string().contains("alias/app-alias"), "{err}");
    assert_eq!(t.emulator.calls("Decrypt"), decrypts);
    let by_id = Keyring::builder(listed, store)
        .cmk(&meta.key_id)
        .trust_cmk("alias/app-alias")
        .build()
        .unwrap();
    assert_eq!(by_id.blocking().decrypt(&label(), &blob).unwrap(), b"v");
}

#[test]
fn plain_http_to_a_host_that_is_not_loopback_is_refused_unless_opted_in() {
    let config = || {
        TencentConfig::new(
            EMULATOR_SECRET_ID,
            SecretString::new(EMULATOR_SECRET_KEY),
            "ap-guangzhou",
        )
        .with_endpoint("http://10.0.0.1:1")
    };
    // Constructing never connects.
    let err = TencentKms::new(config()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("http://10.0.0.1:1")
            && msg.contains("not a loopback address")
            && msg.contains("danger_allow_insecure_http"),
        "{msg}"
    );
    let mut opted_in = config();
    opted_in.danger_allow_insecure_http = true;
    TencentKms::new(opted_in).unwrap();
}

/// A server on 127.0.0.1 that answers every request with `status` and `Location: target`.
fn redirector(status: &'static str, target: String) -> std::net::SocketAddr {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            let _ = reader.read_exact(&mut body);
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    addr
}

#[test]
fn redirects_are_not_followed() {
    let t = TencentTarget::new();
    let rt = rt();
    let cmk = rt
        .block_on(t.kms.create_key("redirect", ""))
        .unwrap()
        .key_id;
    t.emulator.reset_counters();
    for status in [
        "302 Found",
        "307 Temporary Redirect",
        "308 Permanent Redirect",
    ] {
        let addr = redirector(status, format!("{}/", t.emulator.endpoint()));
        let kms = client_for(&format!("http://{addr}"), |_| {});
        let err = rt
            .block_on(kms.generate_data_key(&cmk, &ctx()))
            .unwrap_err();
        assert_eq!(err.kind(), KmsErrorKind::InvalidResponse, "{status}: {err}");
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("redirect"), "{status}: {err}");
        assert_eq!(
            t.emulator.requests(),
            0,
            "{status}: nothing reached the emulator"
        );
    }
}

#[cfg(unix)]
#[test]
fn state_file_is_0600_even_over_a_stale_or_planted_temporary_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let rt = rt();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let run = |state: &std::path::Path| {
        let mut c = EmulatorConfig::local(EMULATOR_SECRET_ID, EMULATOR_SECRET_KEY);
        c.state_file = Some(state.to_owned());
        let e = Emulator::start(c).unwrap();
        let kms = client_for(&e.endpoint(), |_| {});
        rt.block_on(kms.create_key("persist", "")).unwrap();
    };

    // A world-readable temporary file left at the old fixed name by an earlier run.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("kms-state.json");
    let stale = dir.path().join("kms-state.tmp");
    std::fs::write(&stale, "stale").unwrap();
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();
    run(&state);
    assert_eq!(mode(&state), 0o600);
    assert!(std::fs::read_to_string(&state).unwrap().contains("persist"));

    // A symlink planted at that name must not redirect the master keys into another file.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("kms-state.json");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "victim").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("kms-state.tmp")).unwrap();
    run(&state);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
    assert!(
        std::fs::symlink_metadata(&state)
            .unwrap()
            .file_type()
            .is_file()
    );
    assert_eq!(mode(&state), 0o600);
    // No temporary file of ours is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp") && n != "kms-state.tmp")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// ----- a KMS that accepts connections and never answers ---------------------------------------

#[test]
fn a_kms_that_never_answers_costs_one_attempt_then_writes_fail_fast_with_its_typed_error() {
    // A listener that accepts every connection, counts it, and never sends a byte.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(conn); // keep it open, say nothing
        }
    });
    let kms = client_for(&format!("http://{addr}"), |c| {
        c.limits.request_timeout = Duration::from_millis(600);
        c.limits.max_attempts = 1;
    });
    let keyring = Keyring::builder(kms, MemoryKeyStore::new())
        .cmk("cmk-never-answers")
        .policy(Policy {
            kms_timeout: Duration::from_secs(3),
            ..Policy::default()
        })
        .build()
        .unwrap();
    for write in 0..3 {
        let err = keyring.blocking().encrypt(&label(), b"v").unwrap_err();
        // The provider's own timeout surfaces (its budget fits inside kms_timeout), not the
        // keyring's cut-off.
        let Error::Unavailable(envelope_core::Unavailable::WriteKey { cause: source, .. }) = &err
        else {
            panic!("write {write}: {err}");
        };
        assert!(
            matches!(&**source, Error::Kms(k) if k.kind() == KmsErrorKind::Timeout),
            "write {write}: {err}"
        );
    }
    // Writes 2 and 3 failed at once with the recorded error: no new connection.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

// ----- instance role credentials -----------------------------------------------------------------

/// An emulator that also serves a CVM instance's role credentials living `ttl`.
fn role_emulator(ttl: Duration) -> Emulator {
    let mut config = EmulatorConfig::local(EMULATOR_SECRET_ID, EMULATOR_SECRET_KEY);
    config.instance_role = Some(envelope_kms_emulator::InstanceRole {
        name: "envelope-app".into(),
        ttl,
    });
    Emulator::start(config).unwrap()
}

fn role_client(emulator: &Emulator, role: InstanceRole) -> TencentKms {
    TencentKms::new(
        TencentConfig::with_instance_role("ap-guangzhou", role).with_endpoint(emulator.endpoint()),
    )
    .unwrap()
}

/// Read one set of temporary credentials from the metadata path, as a CVM process would.
async fn temp_credentials(emulator: &Emulator) -> Value {
    let url = format!(
        "{}{}envelope-app",
        emulator.endpoint(),
        envelope_kms_emulator::ROLE_PATH
    );
    serde_json::from_str(&reqwest::get(url).await.unwrap().text().await.unwrap()).unwrap()
}

use envelope_core::kms::tencent::InstanceRole;

#[test]
fn instance_role_credentials_are_read_and_refreshed_before_they_expire() {
    rt().block_on(async {
        let emulator = role_emulator(Duration::from_secs(3));
        let early = temp_credentials(&emulator).await;
        let kms = role_client(
            &emulator,
            InstanceRole {
                metadata_endpoint: emulator.endpoint(),
                refresh_before: Duration::from_secs(1),
                ..InstanceRole::default()
            },
        );
        // The budget counts the two metadata requests: still inside the default kms_timeout.
        assert!(kms.call_budget().unwrap() < Policy::default().kms_timeout);
        let cmk = kms.create_key("role", "role").await.unwrap().key_id;
        // One request for the role's name, one for its credentials (plus the one above).
        assert_eq!(emulator.calls("metadata"), 3);
        let g = kms.generate_data_key(&cmk, &ctx()).await.unwrap();
        assert_eq!(emulator.calls("metadata"), 3, "cached while fresh");
        // Within `refresh_before` of their expiry they are replaced before the next call.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let back = kms.decrypt(&cmk, &g.wrapped, &ctx()).await.unwrap();
        assert_eq!(back.expose(), g.plaintext.expose());
        assert_eq!(emulator.calls("metadata"), 5);

        // The emulator enforces expiry and the token, so the refresh is what kept it working.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let stale = |token: &str| {
            let mut c = TencentConfig::new(
                early["TmpSecretId"].as_str().unwrap(),
                SecretString::new(early["TmpSecretKey"].as_str().unwrap()),
                "ap-guangzhou",
            )
            .with_endpoint(emulator.endpoint());
            c.session_token = Some(SecretString::new(token));
            TencentKms::new(c).unwrap()
        };
        let e = stale(early["Token"].as_str().unwrap())
            .describe_key(&cmk)
            .await
            .unwrap_err();
        let Error::Kms(e) = e else { panic!("{e}") };
        assert_eq!(e.kind(), KmsErrorKind::Auth, "{e}");
        assert_eq!(e.code(), Some("AuthFailure.TokenFailure"), "{e}");
        let fresh = temp_credentials(&emulator).await;
        let mut c = TencentConfig::new(
            fresh["TmpSecretId"].as_str().unwrap(),
            SecretString::new(fresh["TmpSecretKey"].as_str().unwrap()),
            "ap-guangzhou",
        )
        .with_endpoint(emulator.endpoint());
        c.session_token = Some(SecretString::new("not-the-token"));
        let e = TencentKms::new(c)
            .unwrap()
            .describe_key(&cmk)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("AuthFailure.TokenFailure"), "{e}");
    });
}

#[test]
fn a_missing_role_or_metadata_service_is_a_clear_error() {
    rt().block_on(async {
        let emulator = role_emulator(Duration::from_secs(3600));
        let kms = role_client(
            &emulator,
            InstanceRole {
                metadata_endpoint: emulator.endpoint(),
                role: Some("not-this-instance's-role".into()),
                ..InstanceRole::default()
            },
        );
        let e = kms.generate_data_key("k", &ctx()).await.unwrap_err();
        assert_eq!(e.kind(), KmsErrorKind::Auth, "{e}");
        assert!(e.to_string().contains("no CAM role"), "{e}");
        // Nothing listens there: a retryable network error naming the metadata service.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let kms = role_client(
            &emulator,
            InstanceRole {
                metadata_endpoint: dead.clone(),
                ..InstanceRole::default()
            },
        );
        let e = kms.generate_data_key("k", &ctx()).await.unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("metadata service"), "{e}");
    });
}

#[test]
fn an_outage_of_the_tencent_kms_loses_nothing() {
    rt().block_on(async {
        let t = TencentTarget::new();
        let cmk = t.kms.create_key("outage", "").await.unwrap().key_id;
        let proxy = envelope_tests::proxy::Proxy::start(&t.emulator.addr().to_string());
        let mut c = TencentConfig::new(
            EMULATOR_SECRET_ID,
            SecretString::new(EMULATOR_SECRET_KEY),
            "ap-guangzhou",
        )
        .with_endpoint(proxy.url());
        c.limits.request_timeout = Duration::from_millis(1500);
        c.limits.max_attempts = 2;
        c.limits.backoff = Duration::from_millis(50);
        let kms = Arc::new(TencentKms::new(c).unwrap());
        envelope_tests::scenarios::kms_outage(kms, &cmk, &proxy).await;
    });
}
