//! The provider contract: the behaviour every KMS provider must show, run against each one's
//! real local server (the local provider needs none).
//!
//! Each check is an async function over a [`ContractTarget`]; `contract_suite!` instantiates all
//! of them as tests for one target, as rustls runs one API suite per crypto provider.

use std::sync::Arc;

use envelope_core::{EncryptionContext, KeyMaterial, KmsErrorKind, KmsProvider, async_trait};

/// A provider under test plus the administrative operations the contract needs.
#[async_trait]
pub trait ContractTarget: Send + Sync {
    /// The provider.
    fn provider(&self) -> Arc<dyn KmsProvider>;
    /// A fresh, enabled master key.
    async fn new_cmk(&self) -> String;
    /// A well-formed name of a master key that does not exist.
    fn unknown_cmk(&self) -> String {
        "00000000-0000-4000-8000-000000000000".to_owned()
    }
    /// Disable a master key; `false` when the provider has no such state.
    async fn disable(&self, cmk: &str) -> bool;
    /// Enable a master key again.
    async fn enable(&self, cmk: &str);
    /// Schedule a master key's deletion; `false` when the provider has no such state.
    async fn schedule_deletion(&self, cmk: &str) -> bool;
}

/// The context the keyring binds a data key of the default scope to.
pub fn ctx(key_id: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with("envelope.key_id", key_id)
        .with("envelope.kind", "data")
        .with("envelope.scope", "default")
}

/// Generate, then unwrap: the same 32 bytes come back.
pub async fn round_trip(t: &dyn ContractTarget) {
    let kms = t.provider();
    let cmk = t.new_cmk().await;
    let g = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    assert!(!g.wrapped.is_empty());
    let back = kms.decrypt(&cmk, &g.wrapped, &ctx("a")).await.unwrap();
    assert_eq!(back.expose(), g.plaintext.expose());
    // Two keys differ.
    let g2 = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    assert_ne!(g2.plaintext.expose(), g.plaintext.expose());
    // Encrypt of given material round-trips too.
    let material = KeyMaterial::generate().unwrap();
    let wrapped = kms.encrypt(&cmk, &material, &ctx("b")).await.unwrap();
    let back = kms.decrypt(&cmk, &wrapped, &ctx("b")).await.unwrap();
    assert_eq!(back.expose(), material.expose());
}

/// Unwrapping under another context fails as a ciphertext error, never with a key.
pub async fn context_mismatch(t: &dyn ContractTarget) {
    let kms = t.provider();
    let cmk = t.new_cmk().await;
    let g = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    let e = kms.decrypt(&cmk, &g.wrapped, &ctx("b")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{e}");
    assert!(!e.is_retryable());
    let e = kms
        .decrypt(&cmk, &g.wrapped, &EncryptionContext::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{e}");
}

/// Garbage and tampered wrapped keys are ciphertext errors.
pub async fn corrupt_wrapped_key(t: &dyn ContractTarget) {
    let kms = t.provider();
    let cmk = t.new_cmk().await;
    let g = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    let mut bad = g.wrapped.clone();
    let last = bad.len() - 2;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    let e = kms.decrypt(&cmk, &bad, &ctx("a")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{e}");
    let e = kms
        .decrypt(&cmk, b"not a wrapped key", &ctx("a"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::InvalidCiphertext, "{e}");
}

/// A master key that does not exist.
pub async fn unknown_cmk(t: &dyn ContractTarget) {
    let kms = t.provider();
    let e = kms
        .generate_data_key(&t.unknown_cmk(), &ctx("a"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::KeyNotFound, "{e}");
    assert!(!e.is_retryable());
}

/// ReEncrypt moves a wrapped key to another master key and context.
pub async fn re_encrypt(t: &dyn ContractTarget) {
    let kms = t.provider();
    let a = t.new_cmk().await;
    let b = t.new_cmk().await;
    let g = kms.generate_data_key(&a, &ctx("x")).await.unwrap();
    let moved = kms
        .re_encrypt(&g.wrapped, &a, &ctx("x"), &b, &ctx("y"))
        .await
        .unwrap();
    let back = kms.decrypt(&b, &moved, &ctx("y")).await.unwrap();
    assert_eq!(back.expose(), g.plaintext.expose());
    assert!(kms.decrypt(&b, &moved, &ctx("x")).await.is_err());
}

/// A disabled key neither generates nor unwraps, and works again once enabled.
pub async fn disabled_key(t: &dyn ContractTarget) {
    let kms = t.provider();
    let cmk = t.new_cmk().await;
    let g = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    if !t.disable(&cmk).await {
        eprintln!("not applicable: disabled_key: this provider has no disabled state");
        return;
    }
    let e = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::KeyDisabled, "{e}");
    let e = kms.decrypt(&cmk, &g.wrapped, &ctx("a")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::KeyDisabled, "{e}");
    assert!(!e.is_retryable());
    t.enable(&cmk).await;
    let back = kms.decrypt(&cmk, &g.wrapped, &ctx("a")).await.unwrap();
    assert_eq!(back.expose(), g.plaintext.expose());
}

/// A key pending deletion neither generates nor unwraps.
pub async fn deleted_key(t: &dyn ContractTarget) {
    let kms = t.provider();
    let cmk = t.new_cmk().await;
    let g = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap();
    if !t.schedule_deletion(&cmk).await {
        eprintln!("not applicable: deleted_key: this provider has no pending-deletion state");
        return;
    }
    let e = kms.generate_data_key(&cmk, &ctx("a")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::KeyPendingDeletion, "{e}");
    let e = kms.decrypt(&cmk, &g.wrapped, &ctx("a")).await.unwrap_err();
    assert_eq!(e.kind(), KmsErrorKind::KeyPendingDeletion, "{e}");
}

/// Instantiate every contract check as a test for the target built by `$make` (an expression
/// that evaluates to a `ContractTarget`, built inside the test). With `optional:`, `$make` is a
/// future of an `Option` of a target, `None` when the target's server is not configured (the
/// test is then skipped with a message).
#[macro_export]
macro_rules! contract_suite {
    (optional: $make:expr) => {
        $crate::contract_suite!(@optional $make; round_trip, context_mismatch, corrupt_wrapped_key,
            unknown_cmk, re_encrypt, disabled_key, deleted_key);
    };
    (@optional $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(target) = $make(stringify!($name)).await else {
                    return;
                };
                $crate::contract::$name(&target).await;
            }
        )*
    };
    ($make:expr) => {
        $crate::contract_suite!(@tests $make; round_trip, context_mismatch, corrupt_wrapped_key,
            unknown_cmk, re_encrypt, disabled_key, deleted_key);
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let target = $make;
                $crate::contract::$name(&target).await;
            }
        )*
    };
}
