//! Keyring scenarios every provider must pass on its real server, whatever protocol it speaks.
//!
//! [`one_kms_call_per_key`]: 200 writes make one data key, a cold reader unwraps it once.
//!
//! [`kms_outage`]: the server cut and stalled by a [`Proxy`]:
//! - while the KMS is down, a keyring keeps reading every value under a cached key and keeps
//!   writing under its current key until the key's hard limit;
//! - a cold keyring's read fails with a typed, retryable error inside `kms_timeout`, both when
//!   connections are refused and when the server hangs;
//! - past the hard limit writes fail with `Unavailable::WriteKey`, nothing is written;
//! - once the KMS answers again, writes resume and the cold keyring reads everything.
//!
//! [`a_record_naming_an_untrusted_cmk_is_refused`]: a key row edited to name another master key
//! (and to hold a key wrapped under it) is refused by a cold keyring, without a KMS call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use envelope_core::{
    EncryptionContext, Error, KeyStore, Keyring, KmsErrorKind, KmsProvider, Label, MemoryKeyStore,
    Policy, format,
};

use crate::Instrumented;
use crate::proxy::{Mode, Proxy};

/// 200 writes under one data key (one GenerateDataKey), and a cold keyring that reads all 200
/// with one Decrypt.
pub async fn one_kms_call_per_key<K: KmsProvider>(kms: K, cmk: &str) {
    let kms = Arc::new(Instrumented::new(kms));
    let store = Arc::new(MemoryKeyStore::new());
    let writer = keyring(kms.clone(), cmk, store.clone(), Policy::default()).await;
    let mut sealed = Vec::new();
    for i in 0..200u32 {
        sealed.push(
            writer
                .encrypt(&label(), &i.to_be_bytes())
                .await
                .expect("write"),
        );
    }
    assert_eq!(kms.calls.generates(), 1);
    let reader = keyring(kms.clone(), cmk, store, Policy::default()).await;
    for (i, blob) in sealed.iter().enumerate() {
        let i = u32::try_from(i).expect("small");
        assert_eq!(
            reader.decrypt(&label(), blob).await.expect("read"),
            i.to_be_bytes()
        );
    }
    assert_eq!(kms.calls.decrypts(), 1);
}

/// Security review N1: whoever can write the key table can write a row's `cmk_id` as well as
/// its wrapped key. Here the row of a key made under `cmk_a` is rewritten to hold the same key
/// wrapped under `cmk_b` (another master key the credentials may use) and to name `cmk_b`. A
/// cold keyring configured with `cmk_a` must refuse it with a typed error that names `cmk_b`,
/// before any KMS call: the master key a row names is not evidence that it may be trusted.
pub async fn a_record_naming_an_untrusted_cmk_is_refused<K: KmsProvider>(
    kms: K,
    cmk_a: &str,
    cmk_b: &str,
) {
    const SECRET: &[u8] = b"078-05-1120";
    let kms = Arc::new(Instrumented::new(kms));
    let store = Arc::new(MemoryKeyStore::new());
    let writer = keyring(kms.clone(), cmk_a, store.clone(), Policy::default()).await;
    let blob = writer.encrypt(&label(), SECRET).await.expect("write");
    let id = format::peek_key_id(&blob).expect("key id");

    let mut record = store.get(&id).await.expect("get").expect("the row");
    assert_eq!(record.cmk_id, cmk_a);
    let context = EncryptionContext::from_json(&record.kms_context).expect("context");
    record.wrapped = kms
        .re_encrypt(&record.wrapped, cmk_a, &context, cmk_b, &context)
        .await
        .expect("rewrap under B");
    record.cmk_id = cmk_b.to_owned();
    store.delete(&id).await.expect("delete");
    store.insert(&record).await.expect("insert");

    let decrypts = kms.calls.decrypts();
    let cold = keyring(kms.clone(), cmk_a, store.clone(), Policy::default()).await;
    let err = cold
        .decrypt(&label(), &blob)
        .await
        .expect_err("a key under an untrusted master key must not open");
    match &err {
        Error::Kms(e) => {
            assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{err}");
            assert!(!e.is_retryable(), "{err}");
        }
        other => panic!("expected a KMS error, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(cmk_b) && msg.contains(&id.to_hex()), "{msg}");
    assert!(!msg.contains("078-05-1120"), "{msg}");
    assert_eq!(
        kms.calls.decrypts(),
        decrypts,
        "the refusal must not depend on (or wait for) the KMS"
    );

    // Keys under B that are legitimately this application's (rewrapped from A to B by
    // `envelope keys rewrap`, say) open once B is trusted: the check is the configuration's.
    let (kms_b, cmk_a, cmk_b) = (kms.clone(), cmk_a.to_owned(), cmk_b.to_owned());
    let trusting = tokio::task::spawn_blocking(move || {
        Keyring::builder(kms_b, store)
            .cmk(cmk_a)
            .trust_cmk(cmk_b)
            .build()
            .expect("keyring")
    })
    .await
    .expect("keyring thread");
    assert_eq!(
        trusting.decrypt(&label(), &blob).await.expect("trusted"),
        SECRET
    );
}

fn label() -> Label {
    Label::new("outage.note").expect("label")
}

async fn keyring(
    kms: Arc<dyn KmsProvider>,
    cmk: &str,
    store: Arc<MemoryKeyStore>,
    policy: Policy,
) -> Keyring {
    let cmk = cmk.to_owned();
    tokio::task::spawn_blocking(move || {
        Keyring::builder(kms, store)
            .cmk(cmk)
            .policy(policy)
            .build()
            .expect("keyring")
    })
    .await
    .expect("keyring thread")
}

fn policy() -> Policy {
    Policy {
        dek_max_uses: 20,
        refresh_retry: Duration::from_millis(300),
        kms_timeout: Duration::from_secs(5),
        ..Policy::default()
    }
}

fn assert_transient(what: &str, e: &Error, started: Instant) {
    let ok = match e {
        Error::Kms(k) => k.is_retryable(),
        Error::Unavailable(envelope_core::Unavailable::Timeout { .. }) => true,
        _ => false,
    };
    assert!(ok, "{what}: expected a retryable KMS error, got {e:?}");
    let bound = policy().kms_timeout + Duration::from_secs(1);
    assert!(
        started.elapsed() <= bound,
        "{what}: took {:?}, more than kms_timeout",
        started.elapsed()
    );
    // The message says what to do, not just that something failed.
    assert!(!e.to_string().is_empty());
}

/// Run the outage scenario against `kms` (which must reach its server through `proxy`) with
/// master key `cmk`.
pub async fn kms_outage(kms: Arc<dyn KmsProvider>, cmk: &str, proxy: &Proxy) {
    let store = Arc::new(MemoryKeyStore::new());
    let warm = keyring(kms.clone(), cmk, store.clone(), policy()).await;
    let mut sealed = Vec::new();
    for i in 0..10u8 {
        sealed.push(warm.encrypt(&label(), &[i]).await.expect("write"));
    }

    // Down: connections refused.
    proxy.set(Mode::Refuse);
    for i in 10..15u8 {
        sealed.push(
            warm.encrypt(&label(), &[i])
                .await
                .expect("the current key still takes writes"),
        );
    }
    for (i, blob) in sealed.iter().enumerate() {
        assert_eq!(
            warm.decrypt(&label(), blob).await.expect("cached read"),
            [i as u8]
        );
    }
    let cold = keyring(kms.clone(), cmk, store.clone(), policy()).await;
    let started = Instant::now();
    let e = cold.decrypt(&label(), &sealed[0]).await.unwrap_err();
    assert_transient("cold read, refused", &e, started);

    // Uses 16..20 go through; the 21st finds the key used up and no KMS to make another.
    for i in 15..20u8 {
        sealed.push(warm.encrypt(&label(), &[i]).await.expect("write"));
    }
    let started = Instant::now();
    match warm.encrypt(&label(), b"x").await {
        Err(Error::Unavailable(envelope_core::Unavailable::WriteKey { .. })) => {}
        other => panic!("expected Unavailable::WriteKey, got {other:?}"),
    }
    assert!(started.elapsed() <= policy().kms_timeout + Duration::from_secs(1));

    // Hanging: connections accepted, never answered.
    proxy.set(Mode::Stall);
    let fresh = keyring(kms.clone(), cmk, store.clone(), policy()).await;
    let started = Instant::now();
    let e = fresh.decrypt(&label(), &sealed[1]).await.unwrap_err();
    assert_transient("cold read, stalled", &e, started);

    // Back: after the retry back-off writes resume on a new key; the cold keyrings read all.
    proxy.set(Mode::Pass);
    let deadline = Instant::now() + Duration::from_secs(15);
    let blob = loop {
        match warm.encrypt(&label(), b"back").await {
            Ok(blob) => break blob,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("writes did not resume after the outage: {e}"),
        }
    };
    assert_eq!(warm.decrypt(&label(), &blob).await.expect("read"), b"back");
    let reader = keyring(kms, cmk, store, policy()).await;
    for (i, blob) in sealed.iter().enumerate() {
        assert_eq!(
            reader.decrypt(&label(), blob).await.expect("read after"),
            [i as u8]
        );
    }
    assert_eq!(sealed.len(), 20, "no write was lost or doubled");
}
