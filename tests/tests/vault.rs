//! Vault/OpenBao Transit beyond the contract: derived keys, key versions and
//! `min_decryption_version`, bad tokens and mounts, a keyring end to end, and an outage through
//! a proxy. Runs against the OpenBao server of `ENVELOPE_TEST_OPENBAO_URL`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use envelope_core::kms::vault::{VaultConfig, VaultKms};
use envelope_core::{KeyMaterial, KmsErrorKind, KmsProvider, SecretString};
use envelope_tests::contract::ctx;
use envelope_tests::proxy::{Proxy, host_port};
use envelope_tests::servers::{TRANSIT_MOUNT, VaultAdmin, openbao_url, vault_kms};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn derived_keys_bind_the_context_too() {
    let Some(url) = openbao_url("derived_keys_bind_the_context_too") else {
        return;
    };
    let admin = VaultAdmin::new(&url).await;
    let kms = vault_kms(&url);
    let cmk = admin.new_key(true).await;
    let g = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    let back = kms.decrypt(&cmk, &g.wrapped, &ctx("a")).await.unwrap();
    assert_eq!(back.expose(), g.plaintext.expose());
    let e = kms.decrypt(&cmk, &g.wrapped, &ctx("b")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{e}");
    // A key wrapped under one transit key does not open under another.
    let other = admin.new_key(false).await;
    let e = kms
        .decrypt(&other, &g.wrapped, &ctx("a"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_key_versions_open_until_min_decryption_version_passes_them() {
    let Some(url) = openbao_url("old_key_versions_open_until_min_decryption_version_passes_them")
    else {
        return;
    };
    let admin = VaultAdmin::new(&url).await;
    let kms = vault_kms(&url);
    let cmk = admin.new_key(false).await;
    let v1 = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    assert!(v1.wrapped.starts_with(b"vault:v1:"));
    kms.rotate_key(&cmk).await.unwrap();
    let v2 = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    assert!(v2.wrapped.starts_with(b"vault:v2:"));
    assert_eq!(
        kms.decrypt(&cmk, &v1.wrapped, &ctx("a"))
            .await
            .unwrap()
            .expose(),
        v1.plaintext.expose()
    );
    // Moving the v1 key onto the newest version (what `keys rewrap` onto the same key does).
    let moved = kms
        .re_encrypt(&v1.wrapped, &cmk, &ctx("a"), &cmk, &ctx("a"))
        .await
        .unwrap();
    assert!(moved.starts_with(b"vault:v2:"));
    let name = cmk.rsplit_once('/').unwrap().1;
    let (status, body) = admin
        .call(
            reqwest::Method::POST,
            &format!("{TRANSIT_MOUNT}/keys/{name}/config"),
            Some(serde_json::json!({"min_decryption_version": 2})),
        )
        .await;
    assert!(status < 300, "{status} {body}");
    let e = kms.decrypt(&cmk, &v1.wrapped, &ctx("a")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::KeyVersionDisallowed, "{e}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("min_decryption_version"), "{e}");
    assert_eq!(
        kms.decrypt(&cmk, &moved, &ctx("a")).await.unwrap().expose(),
        v1.plaintext.expose()
    );
    assert_eq!(
        kms.read_key(&cmk).await.unwrap()["min_decryption_version"],
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_mounts_are_typed_errors() {
    let Some(url) = openbao_url("bad_tokens_and_mounts_are_typed_errors") else {
        return;
    };
    let admin = VaultAdmin::new(&url).await;
    let cmk = admin.new_key(false).await;
    let bad = VaultKms::new(VaultConfig::new(&url, SecretString::new("not-a-token"))).unwrap();
    let e = bad.generate_data_key(&cmk, &ctx("a")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::Auth, "{e}");
    assert!(!e.is_retryable());
    assert!(e.to_string().contains("permission denied"), "{e}");
    let kms = vault_kms(&url);
    let e = kms
        .generate_data_key("no-such-mount/k", &ctx("a"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::KeyNotFound, "{e}");
    let e = kms
        .decrypt(&cmk, b"vault:v1:AAAA", &ctx("a"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{e}");
    // Encrypt round trip of given material, and nothing secret in any error.
    let m = KeyMaterial::generate().unwrap();
    let w = kms.encrypt(&cmk, &m, &ctx("x")).await.unwrap();
    let e = kms.decrypt(&cmk, &w, &ctx("y")).await.unwrap_err();
    assert!(!e.to_string().contains(&openbao_token_or_root()), "{e}");
}

fn openbao_token_or_root() -> String {
    envelope_tests::servers::openbao_token()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyring_on_vault_makes_one_kms_call_per_key() {
    let Some(url) = openbao_url("a_keyring_on_vault_makes_one_kms_call_per_key") else {
        return;
    };
    let cmk = VaultAdmin::new(&url).await.new_key(false).await;
    envelope_tests::scenarios::one_kms_call_per_key(vault_kms(&url), &cmk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_record_naming_another_transit_key_is_refused_by_the_keyring() {
    let Some(url) =
        openbao_url("a_key_record_naming_another_transit_key_is_refused_by_the_keyring")
    else {
        return;
    };
    let admin = VaultAdmin::new(&url).await;
    let a = admin.new_key(false).await;
    let b = admin.new_key(false).await;
    envelope_tests::scenarios::a_record_naming_an_untrusted_cmk_is_refused(vault_kms(&url), &a, &b)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_vault_loses_nothing() {
    let Some(url) = openbao_url("an_outage_of_vault_loses_nothing") else {
        return;
    };
    let admin = VaultAdmin::new(&url).await;
    let cmk = admin.new_key(false).await;
    let proxy = Proxy::start(&host_port(&url));
    let kms = Arc::new(vault_kms(&proxy.url()));
    envelope_tests::scenarios::kms_outage(kms, &cmk, &proxy).await;
}
