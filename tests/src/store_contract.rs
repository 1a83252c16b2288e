//! The key-store contract: what every [`KeyStore`] must do (memory, sqlx on three databases,
//! diesel). See the trait's docs.

use std::time::{Duration, SystemTime};

use envelope_core::{KeyFilter, KeyId, KeyKind, KeyRecord, KeyStore, StoreError};

fn record(kind: KeyKind, scope: &str, secs: u64) -> KeyRecord {
    KeyRecord {
        id: KeyId::random().unwrap(),
        kind,
        scope: scope.into(),
        provider: "local".into(),
        cmk_id: "local:1".into(),
        wrapped: vec![1, 2, 3, 0, 255],
        kms_context: r#"{"envelope.key_id":"x"}"#.into(),
        // Millisecond precision: what every backend keeps.
        created_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + secs * 1000),
        retired_at: None,
    }
}

/// Run the whole contract against `store`, which must start empty of the scopes used here.
pub async fn run(store: &dyn KeyStore) {
    let tag = KeyId::random().unwrap().to_hex();
    let scope = format!("default-{tag}");
    let label = format!("users.email-{tag}");

    let a = record(KeyKind::Data, &scope, 2);
    let b = record(KeyKind::Data, &scope, 1);
    store.insert(&a).await.unwrap();
    store.insert(&b).await.unwrap();
    assert!(
        matches!(store.insert(&a).await, Err(StoreError::Conflict(_))),
        "duplicate id"
    );
    assert_eq!(
        store.get(&a.id).await.unwrap().as_ref(),
        Some(&a),
        "round trip of every field"
    );
    assert!(
        store
            .get(&KeyId::random().unwrap())
            .await
            .unwrap()
            .is_none()
    );

    let by_scope = KeyFilter {
        scope: Some(scope.clone()),
        ..KeyFilter::default()
    };
    let listed = store.list(&by_scope).await.unwrap();
    assert_eq!(
        listed.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![b.id, a.id],
        "ordered by created_at"
    );

    // One live index key per label.
    let i1 = record(KeyKind::Index, &label, 3);
    let i2 = record(KeyKind::Index, &label, 4);
    store.insert(&i1).await.unwrap();
    assert!(
        matches!(store.insert(&i2).await, Err(StoreError::Conflict(_))),
        "second live index key"
    );

    // Retire: idempotent, keeps the first time; retired rows drop out of the default listing.
    let t1 = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
    store.retire(&a.id, t1).await.unwrap();
    store
        .retire(&a.id, t1 + Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        store.get(&a.id).await.unwrap().unwrap().retired_at,
        Some(t1)
    );
    assert_eq!(store.list(&by_scope).await.unwrap().len(), 1);
    let all_in_scope = KeyFilter {
        include_retired: true,
        ..by_scope.clone()
    };
    assert_eq!(store.list(&all_in_scope).await.unwrap().len(), 2);
    let index_keys = KeyFilter {
        kind: Some(KeyKind::Index),
        scope: Some(label.clone()),
        ..KeyFilter::default()
    };
    assert_eq!(store.list(&index_keys).await.unwrap(), vec![i1.clone()]);
    // A retired index key makes room for a new one.
    store.retire(&i1.id, t1).await.unwrap();
    store.insert(&i2).await.unwrap();

    // Rewrap is a compare-and-set on the wrapped bytes.
    assert!(matches!(
        store.rewrap(&b.id, &[9], "local", "local:2", &[4]).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .rewrap(&b.id, &b.wrapped, "local", "local:2", &[4, 5])
        .await
        .unwrap();
    let b2 = store.get(&b.id).await.unwrap().unwrap();
    assert_eq!(
        (b2.cmk_id.as_str(), b2.wrapped.as_slice()),
        ("local:2", &[4u8, 5][..])
    );

    assert!(store.delete(&b.id).await.unwrap());
    assert!(!store.delete(&b.id).await.unwrap());
    assert!(store.get(&b.id).await.unwrap().is_none());
    assert!(matches!(
        store.retire(&b.id, t1).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.rewrap(&b.id, &[4, 5], "local", "x", &[1]).await,
        Err(StoreError::NotFound(_))
    ));
}

/// MySQL/MariaDB: nothing a store writes is cut short, whatever the server's `sql_mode`. A
/// `cmk_id` longer than its `VARCHAR(255)` column must fail the insert: on a non-strict session it
/// would be stored cut to 255 characters, and the key could then never be unwrapped. Call it
/// with a store whose connections were opened while the server's global `sql_mode` was not
/// strict.
pub async fn refuses_a_value_too_long_for_its_column(store: &dyn KeyStore) {
    let mut r = record(KeyKind::Data, "strict", 1);
    r.cmk_id = "c".repeat(300);
    let outcome = store.insert(&r).await;
    let stored = store.get(&r.id).await.ok().flatten();
    assert!(
        outcome.is_err(),
        "a 300-character cmk_id was accepted (stored as {} characters)",
        stored.map_or(0, |s| s.cmk_id.len())
    );
}
