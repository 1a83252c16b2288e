//! What an application's `metrics` recorder receives from a keyring: KMS calls by provider,
//! action and outcome with their latency, key-cache hits and misses, rotations and key-store
//! calls. The recorder is process-global, so this binary holds this one test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use envelope_core::{KeyMaterial, Keyring, Label, LocalKms, MemoryKeyStore, metric_names};
use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

type Seen = HashMap<(String, Vec<(String, String)>), DebugValue>;

fn seen(snapshotter: &metrics_util::debugging::Snapshotter) -> Seen {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value): (CompositeKey, _, _, DebugValue)| {
            let mut labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.key().name().to_owned(), labels), value)
        })
        .collect()
}

fn counter(seen: &Seen, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    want.sort();
    match seen.get(&(name.to_owned(), want)) {
        Some(DebugValue::Counter(n)) => *n,
        None => 0,
        Some(other) => panic!("{name} is not a counter: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recorder_sees_kms_cache_and_store_calls() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let kms = std::sync::Arc::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
    let store = std::sync::Arc::new(MemoryKeyStore::new());
    let writer = Keyring::builder(kms.clone(), store.clone())
        .build()
        .unwrap();
    let label = Label::new("users.ssn").unwrap();
    let blob = writer.encrypt(&label, b"078-05-1120").await.unwrap();
    assert_eq!(writer.decrypt(&label, &blob).await.unwrap(), b"078-05-1120");
    // A second process, cold: one key load through the KMS, then hits.
    let reader = Keyring::builder(kms, store).build().unwrap();
    for _ in 0..3 {
        assert_eq!(reader.decrypt(&label, &blob).await.unwrap(), b"078-05-1120");
    }

    let seen = seen(&snapshotter);
    let kms_calls = |action, outcome| {
        counter(
            &seen,
            metric_names::KMS_CALLS,
            &[
                ("provider", "local"),
                ("action", action),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(kms_calls("generate_data_key", "ok"), 1, "{seen:?}");
    assert_eq!(kms_calls("decrypt", "ok"), 1, "{seen:?}");
    assert_eq!(kms_calls("decrypt", "error"), 0, "{seen:?}");
    let lookups = |result| {
        counter(
            &seen,
            metric_names::KEY_CACHE_LOOKUPS,
            &[("result", result)],
        )
    };
    assert_eq!(lookups("miss"), 1, "{seen:?}");
    assert!(lookups("hit") >= 3, "{seen:?}");
    assert_eq!(counter(&seen, metric_names::ROTATIONS, &[]), 1, "{seen:?}");
    let store_calls = |operation| {
        counter(
            &seen,
            metric_names::KEY_STORE_CALLS,
            &[("operation", operation), ("outcome", "ok")],
        )
    };
    assert_eq!(store_calls("insert"), 1, "{seen:?}");
    assert!(store_calls("get") >= 1, "{seen:?}");
    let latency = seen
        .get(&(
            metric_names::KMS_CALL_SECONDS.to_owned(),
            vec![
                ("action".to_owned(), "decrypt".to_owned()),
                ("provider".to_owned(), "local".to_owned()),
            ],
        ))
        .unwrap_or_else(|| panic!("no KMS latency in {seen:?}"));
    assert!(
        matches!(latency, DebugValue::Histogram(v) if v.len() == 1),
        "{latency:?}"
    );
    // The keyring's own counters agree with what the recorder saw.
    assert_eq!(reader.metrics().kms_decrypt, 1);
    assert_eq!(writer.metrics().kms_generate_data_key, 1);
}
