//! AWS KMS beyond the contract: the KeyId check on Decrypt and ReEncrypt, aliases, a keyring end
//! to end, and an outage through a proxy. Runs against the moto server of
//! `ENVELOPE_TEST_MOTO_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use envelope_core::{KeyStore, Keyring, KmsErrorKind, KmsProvider, Label, MemoryKeyStore, format};
use envelope_tests::contract::ctx;
use envelope_tests::proxy::{Proxy, host_port};
use envelope_tests::servers::{aws_kms, aws_new_key, moto_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_wrapped_under_another_cmk_is_refused() {
    let Some(url) = moto_url("a_key_wrapped_under_another_cmk_is_refused") else {
        return;
    };
    let kms = aws_kms(&url).await;
    let a = aws_new_key(&kms).await;
    let b = aws_new_key(&kms).await;
    let g = kms.generate_data_key(&a, &ctx("x")).await.unwrap();
    // A key record that claims CMK B for a key wrapped under A: refused, never a key.
    let e = kms.decrypt(&b, &g.wrapped, &ctx("x")).await.unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert!(
        matches!(
            e.kind(),
            KmsErrorKind::InvalidCiphertext | KmsErrorKind::Auth
        ),
        "{e}"
    );
    let e = kms
        .re_encrypt(&g.wrapped, &b, &ctx("x"), &a, &ctx("x"))
        .await
        .unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    // The ARN form of the right key opens it.
    let arn = format!("arn:aws:kms:us-east-1:123456789012:key/{a}");
    let back = kms.decrypt(&arn, &g.wrapped, &ctx("x")).await.unwrap();
    assert_eq!(back.expose(), g.plaintext.expose());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_record_naming_another_cmk_is_refused_by_the_keyring() {
    let Some(url) = moto_url("a_key_record_naming_another_cmk_is_refused_by_the_keyring") else {
        return;
    };
    let kms = aws_kms(&url).await;
    let a = aws_new_key(&kms).await;
    let b = aws_new_key(&kms).await;
    envelope_tests::scenarios::a_record_naming_an_untrusted_cmk_is_refused(kms, &a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_names_the_cmk() {
    let Some(url) = moto_url("an_alias_names_the_cmk") else {
        return;
    };
    let kms = aws_kms(&url).await;
    let a = aws_new_key(&kms).await;
    let alias = format!("alias/{}", envelope_tests::servers::unique("envelope"));
    kms.client()
        .create_alias()
        .alias_name(&alias)
        .target_key_id(&a)
        .send()
        .await
        .unwrap();
    let g = kms.generate_data_key(&alias, &ctx("x")).await.unwrap();
    let back = kms.decrypt(&alias, &g.wrapped, &ctx("x")).await.unwrap();
    assert_eq!(back.expose(), g.plaintext.expose());
    let back = kms.decrypt(&a, &g.wrapped, &ctx("x")).await.unwrap();
    assert_eq!(back.expose(), g.plaintext.expose());

    // A keyring records the alias as it was given it; one configured with the key id must
    // trust the alias to read those keys (ids are compared as written).
    let kms: Arc<dyn KmsProvider> = Arc::new(kms);
    let store = Arc::new(MemoryKeyStore::new());
    let build = |cmk: &str, trust: Option<&str>| {
        let (kms, store, cmk) = (kms.clone(), store.clone(), cmk.to_owned());
        let trust = trust.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            let mut b = Keyring::builder(kms, store).cmk(cmk);
            if let Some(t) = trust {
                b = b.trust_cmk(t);
            }
            b.build().unwrap()
        })
    };
    let by_alias = build(&alias, None).await.unwrap();
    let blob = by_alias.encrypt(&label(), b"v").await.unwrap();
    let id = format::peek_key_id(&blob).unwrap();
    assert_eq!(store.get(&id).await.unwrap().unwrap().cmk_id, alias);
    let by_id = build(&a, None).await.unwrap();
    let e = by_id.decrypt(&label(), &blob).await.unwrap_err();
    assert!(e.to_string().contains(&alias), "{e}");
    let by_id = build(&a, Some(&alias)).await.unwrap();
    assert_eq!(by_id.decrypt(&label(), &blob).await.unwrap(), b"v");
}

fn label() -> Label {
    Label::new("users.ssn").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyring_on_aws_makes_one_kms_call_per_key() {
    let Some(url) = moto_url("a_keyring_on_aws_makes_one_kms_call_per_key") else {
        return;
    };
    let kms = aws_kms(&url).await;
    let cmk = aws_new_key(&kms).await;
    envelope_tests::scenarios::one_kms_call_per_key(kms, &cmk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_aws_loses_nothing() {
    let Some(url) = moto_url("an_outage_of_aws_loses_nothing") else {
        return;
    };
    let cmk = aws_new_key(&aws_kms(&url).await).await;
    let proxy = Proxy::start(&host_port(&url));
    let kms = Arc::new(aws_kms(&proxy.url()).await);
    envelope_tests::scenarios::kms_outage(kms, &cmk, &proxy).await;
}
