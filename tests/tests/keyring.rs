//! Keyring behaviour a user would notice: KMS calls scale with keys, not rows; KMS outages keep
//! reads going and fail writes clearly; the registry finds the right keyring.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use envelope_core::{
    BlindIndexSpec, Error, KeyFilter, KeyKind, KeyStore, Label, Normalizer, Policy, Scope, current,
    format,
};
use envelope_tests::Fixture;

fn label() -> Label {
    Label::new("users.ssn").unwrap()
}

#[test]
fn sixty_four_cold_readers_make_one_kms_call_per_key() {
    let fx = Fixture::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let k = 5;
    // k data keys, 20 values under each.
    let mut values = Vec::new();
    rt.block_on(async {
        for key in 0..k {
            if key > 0 {
                fx.keyring.rotate(&Scope::default()).await.unwrap();
            }
            for i in 0..20 {
                let pt = format!("value {key}/{i}");
                let blob = fx.keyring.encrypt(&label(), pt.as_bytes()).await.unwrap();
                values.push((blob, pt));
            }
        }
    });
    let distinct: std::collections::HashSet<_> = values
        .iter()
        .map(|(b, _)| format::peek_key_id(b).unwrap())
        .collect();
    assert_eq!(distinct.len(), k);

    fx.faults.delay_ms.store(25, Ordering::SeqCst);
    let reader = fx.cold_keyring(Policy::default());
    let before = fx.calls.decrypts();
    let values = std::sync::Arc::new(values);
    rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for task in 0..64usize {
            let reader = reader.clone();
            let values = values.clone();
            set.spawn(async move {
                // Each task reads every value, starting at a different place; half use the
                // async API, half the blocking one that column codecs use.
                for j in 0..values.len() {
                    let (blob, pt) = &values[(task * 7 + j) % values.len()];
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
    assert_eq!(fx.calls.decrypts() - before, k as u64, "KMS Decrypt calls");
    assert_eq!(reader.metrics().kms_decrypt, k as u64);
}

#[test]
fn writes_make_at_most_one_generate_per_max_uses() {
    let fx = Fixture::with_policy(Policy {
        dek_max_uses: 100,
        ..Policy::default()
    });
    for i in 0..1000 {
        fx.keyring
            .blocking()
            .encrypt(&label(), format!("{i}").as_bytes())
            .unwrap();
    }
    // ceil(1000 / 100) = 10 keys in use; the last one's successor may already be prepared.
    let g = fx.calls.generates();
    assert!((10..=11).contains(&g), "{g} GenerateDataKey calls");
    assert_eq!(fx.keyring.metrics().rotations, 10);
}

#[test]
fn kms_outage_keeps_the_current_key_until_its_hard_limit() {
    let fx = Fixture::with_policy(Policy {
        dek_max_uses: 10,
        refresh_retry: Duration::from_millis(50),
        kms_timeout: Duration::from_secs(2),
        ..Policy::default()
    });
    let mut sealed = Vec::new();
    for i in 0..5 {
        sealed.push(fx.keyring.blocking().encrypt(&label(), &[i]).unwrap());
    }
    fx.faults.fail.store(true, Ordering::SeqCst);
    // Uses 6..10: past the 80 % mark a refresh is tried in the background and fails, but the
    // current key still takes writes.
    for i in 5..10 {
        sealed.push(fx.keyring.blocking().encrypt(&label(), &[i]).unwrap());
    }
    // The 11th write finds the key used up and no way to make another.
    let err = fx.keyring.blocking().encrypt(&label(), b"x").unwrap_err();
    match &err {
        Error::Unavailable(envelope_core::Unavailable::WriteKey {
            scope,
            cause: source,
        }) => {
            assert_eq!(scope, "default");
            assert!(matches!(**source, Error::Kms(_)), "{source}");
        }
        other => panic!("expected Unavailable::WriteKey, got {other}"),
    }
    assert!(
        err.to_string()
            .contains("writes resume when the KMS answers"),
        "{err}"
    );
    // Reads of cached keys go on.
    for (i, blob) in sealed.iter().enumerate() {
        assert_eq!(
            fx.keyring.blocking().decrypt(&label(), blob).unwrap(),
            [i as u8]
        );
    }
    // The KMS comes back: after the retry back-off, writes resume on a new key. The keyring
    // times the back-off on its coarse clock (20 ms resolution), so both the failure's time and
    // "now" may each read up to one tick late: wait the back-off plus two ticks and a margin.
    fx.faults.fail.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(50 + 2 * 20 + 100));
    let blob = fx.keyring.blocking().encrypt(&label(), b"back").unwrap();
    assert_ne!(
        format::peek_key_id(&blob).unwrap(),
        format::peek_key_id(&sealed[0]).unwrap()
    );
    assert!(fx.keyring.metrics().rotation_failures >= 1);
}

#[test]
fn writers_fail_fast_while_the_kms_is_down() {
    let fx = Fixture::with_policy(Policy {
        refresh_retry: Duration::from_secs(60),
        ..Policy::default()
    });
    fx.faults.fail.store(true, Ordering::SeqCst);
    assert!(fx.keyring.blocking().encrypt(&label(), b"a").is_err());
    let calls = fx.calls.generates();
    for _ in 0..50 {
        assert!(matches!(
            fx.keyring.blocking().encrypt(&label(), b"a"),
            Err(Error::Unavailable(
                envelope_core::Unavailable::WriteKey { .. }
            ))
        ));
    }
    // One failed call is remembered for refresh_retry: no KMS call per failed write.
    assert_eq!(fx.calls.generates(), calls);
}

#[test]
fn scopes_get_their_own_keys_and_can_be_shredded() {
    let fx = Fixture::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let a = Scope::new("tenant-a").unwrap();
    let b = Scope::new("tenant-b").unwrap();
    let blob_a = fx
        .keyring
        .blocking()
        .encrypt_scoped(&a, &label(), b"a")
        .unwrap();
    let blob_b = fx
        .keyring
        .blocking()
        .encrypt_scoped(&b, &label(), b"b")
        .unwrap();
    let ka = format::peek_key_id(&blob_a).unwrap();
    assert_ne!(ka, format::peek_key_id(&blob_b).unwrap());
    let rows = rt
        .block_on(fx.store.list(&KeyFilter {
            scope: Some("tenant-a".into()),
            ..KeyFilter::all()
        }))
        .unwrap();
    assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![ka]);
    // Crypto-shredding: delete tenant A's key rows; a fresh process can no longer read A.
    rt.block_on(fx.store.delete(&ka)).unwrap();
    let fresh = fx.cold_keyring(Policy::default());
    assert!(matches!(
        fresh.blocking().decrypt(&label(), &blob_a),
        Err(Error::UnknownKey { key_id }) if key_id == ka
    ));
    assert_eq!(fresh.blocking().decrypt(&label(), &blob_b).unwrap(), b"b");
}

#[test]
fn blind_index_key_is_shared_through_the_key_table() {
    let fx = Fixture::new();
    let spec = BlindIndexSpec::new(
        Label::new("customers.email").unwrap(),
        Normalizer::CaseFolded,
    );
    let a = fx
        .keyring
        .blocking()
        .blind_index(&spec, b"Alice@Example.com")
        .unwrap();
    // Another instance finds the same index key and computes the same index.
    let other = fx.cold_keyring(Policy::default());
    let b = other
        .blocking()
        .blind_index(&spec, b"alice@example.com")
        .unwrap();
    assert_eq!(a, b);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let rows = rt
        .block_on(fx.store.list(&KeyFilter {
            kind: Some(KeyKind::Index),
            ..KeyFilter::all()
        }))
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].scope, "customers.email");
    // An index key cannot open values, and a data key cannot make indexes.
    let blob = fx.keyring.blocking().encrypt(&label(), b"v").unwrap();
    let mut forged = blob.clone();
    forged[2..18].copy_from_slice(rows[0].id.as_bytes());
    assert!(matches!(
        other.blocking().decrypt(&label(), &forged),
        Err(Error::KeyKindMismatch { .. })
    ));
}

#[test]
fn concurrent_first_index_use_agrees_on_one_key() {
    let fx = Fixture::new();
    let spec = BlindIndexSpec::new(Label::new("customers.phone").unwrap(), Normalizer::Trimmed);
    let keyrings: Vec<_> = (0..8).map(|_| fx.cold_keyring(Policy::default())).collect();
    let indexes: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = keyrings
            .iter()
            .map(|k| s.spawn(|| k.blocking().blind_index(&spec, b"+1 555 0100").unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(indexes.windows(2).all(|w| w[0] == w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_resolves_task_then_thread_then_default() {
    let a = Fixture::new();
    let b = Fixture::new();
    assert!(
        matches!(
            current(),
            Err(Error::Misuse(envelope_core::Misuse::NoKeyring))
        ) || current().is_ok()
    );
    a.keyring.install_default();
    let blob = current().unwrap().encrypt(&label(), b"x").await.unwrap();
    assert_eq!(a.keyring.decrypt(&label(), &blob).await.unwrap(), b"x");

    let inside = b
        .keyring
        .install_for(async { current().unwrap().encrypt(&label(), b"y").await.unwrap() })
        .await;
    assert!(a.keyring.decrypt(&label(), &inside).await.is_err());
    assert_eq!(b.keyring.decrypt(&label(), &inside).await.unwrap(), b"y");

    let kb = b.keyring.clone();
    let from_thread = tokio::task::spawn_blocking(move || {
        let _g = kb.enter();
        current()
            .unwrap()
            .blocking()
            .encrypt(&label(), b"z")
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        b.keyring.decrypt(&label(), &from_thread).await.unwrap(),
        b"z"
    );
    envelope_core::Keyring::uninstall_default();
}

#[test]
fn debug_output_never_shows_secrets() {
    let fx = Fixture::new();
    let blob = fx
        .keyring
        .blocking()
        .encrypt(&label(), b"078-05-1120")
        .unwrap();
    let dbg = format!("{:?} {:?}", fx.keyring, fx.kms.name());
    assert!(!dbg.contains("078-05-1120"));
    let err = fx
        .keyring
        .blocking()
        .decrypt(&Label::new("other.col").unwrap(), &blob)
        .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("078-05-1120"), "{text}");
}
