//! A keyring's counters, kept twice: in atomics, for [`Keyring::metrics`](crate::Keyring::metrics),
//! and through the `metrics` facade, for the exporter the application runs
//! ([`metric_names`](crate::metric_names) lists what it receives).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::StoreError;
use crate::keys::{KeyId, KeyRecord};
use crate::store::{KeyFilter, KeyStore};

/// The names envelope reports through the [`metrics`](https://docs.rs/metrics) facade, and their
/// labels (Prometheus conventions).
///
/// Install the application's recorder (a Prometheus exporter, StatsD, OpenTelemetry) before
/// building the keyring: the cache counters, on the hot path, are registered once, when the
/// keyring is built. With no recorder installed the facade costs next to nothing. Labels never
/// carry a key, a value or a KMS body.
pub mod names {
    /// Counter, labels `provider`, `action` (`generate_data_key`, `decrypt`) and `outcome`
    /// (`ok`, `error`): every KMS call a keyring makes.
    pub const KMS_CALLS: &str = "envelope_kms_calls_total";
    /// Histogram in seconds, labels `provider` and `action`: how long each KMS call took,
    /// retries included.
    pub const KMS_CALL_SECONDS: &str = "envelope_kms_call_seconds";
    /// Counter, label `result` (`hit`, `miss`): key lookups answered from memory, or that had
    /// to load the key.
    pub const KEY_CACHE_LOOKUPS: &str = "envelope_key_cache_lookups_total";
    /// Counter: new active data keys (first use, age, use count, or on request).
    pub const ROTATIONS: &str = "envelope_rotations_total";
    /// Counter: background refreshes that failed (the current key stays in use until its hard
    /// limit).
    pub const ROTATION_FAILURES: &str = "envelope_rotation_failures_total";
    /// Counter: synchronous callers (`Encode`/`Decode`, `ToSql`/`FromSql`) that waited for the
    /// KMS or the key store through the bridge.
    pub const BRIDGE_WAITS: &str = "envelope_bridge_waits_total";
    /// Counter: bridge waits that ran out of `Policy::kms_timeout`.
    pub const BRIDGE_TIMEOUTS: &str = "envelope_bridge_timeouts_total";
    /// Counter, labels `operation` (`get`, `insert`, `list`, `retire`, ...) and `outcome`
    /// (`ok`, `error`): every key-table call a keyring makes.
    pub const KEY_STORE_CALLS: &str = "envelope_key_store_calls_total";
    /// Histogram in seconds, label `operation`: how long each key-table call took.
    pub const KEY_STORE_CALL_SECONDS: &str = "envelope_key_store_call_seconds";
}

/// The KMS operations a keyring performs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KmsAction {
    GenerateDataKey,
    Decrypt,
}

impl KmsAction {
    pub(crate) fn name(self) -> &'static str {
        match self {
            KmsAction::GenerateDataKey => "generate_data_key",
            KmsAction::Decrypt => "decrypt",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Metrics {
    kms_generate_data_key: AtomicU64,
    kms_decrypt: AtomicU64,
    kms_errors: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    rotations: AtomicU64,
    rotation_failures: AtomicU64,
    bridge_waits: AtomicU64,
    bridge_timeouts: AtomicU64,
    /// Registered once: a hit is the hot path, and a handle's increment costs no lookup.
    hit: ::metrics::Counter,
    miss: ::metrics::Counter,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn outcome(ok: bool) -> &'static str {
    if ok { "ok" } else { "error" }
}

impl Metrics {
    /// Register the hot-path counters with the recorder installed now.
    pub(crate) fn new() -> Metrics {
        Metrics {
            kms_generate_data_key: AtomicU64::new(0),
            kms_decrypt: AtomicU64::new(0),
            kms_errors: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            rotations: AtomicU64::new(0),
            rotation_failures: AtomicU64::new(0),
            bridge_waits: AtomicU64::new(0),
            bridge_timeouts: AtomicU64::new(0),
            hit: ::metrics::counter!(names::KEY_CACHE_LOOKUPS, "result" => "hit"),
            miss: ::metrics::counter!(names::KEY_CACHE_LOOKUPS, "result" => "miss"),
        }
    }

    pub(crate) fn kms_call(&self, action: KmsAction, provider: &str, ok: bool, took: Duration) {
        bump(match action {
            KmsAction::GenerateDataKey => &self.kms_generate_data_key,
            KmsAction::Decrypt => &self.kms_decrypt,
        });
        if !ok {
            bump(&self.kms_errors);
        }
        ::metrics::counter!(
            names::KMS_CALLS,
            "provider" => provider.to_owned(),
            "action" => action.name(),
            "outcome" => outcome(ok),
        )
        .increment(1);
        ::metrics::histogram!(
            names::KMS_CALL_SECONDS,
            "provider" => provider.to_owned(),
            "action" => action.name(),
        )
        .record(took.as_secs_f64());
    }

    pub(crate) fn cache_hit(&self) {
        bump(&self.cache_hits);
        self.hit.increment(1);
    }

    pub(crate) fn cache_miss(&self) {
        bump(&self.cache_misses);
        self.miss.increment(1);
    }

    pub(crate) fn rotation(&self) {
        bump(&self.rotations);
        ::metrics::counter!(names::ROTATIONS).increment(1);
    }

    pub(crate) fn rotation_failure(&self) {
        bump(&self.rotation_failures);
        ::metrics::counter!(names::ROTATION_FAILURES).increment(1);
    }

    pub(crate) fn bridge_wait(&self) {
        bump(&self.bridge_waits);
        ::metrics::counter!(names::BRIDGE_WAITS).increment(1);
    }

    pub(crate) fn bridge_timeout(&self) {
        bump(&self.bridge_timeouts);
        ::metrics::counter!(names::BRIDGE_TIMEOUTS).increment(1);
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let generate = get(&self.kms_generate_data_key);
        let decrypt = get(&self.kms_decrypt);
        MetricsSnapshot {
            kms_calls: generate + decrypt,
            kms_generate_data_key: generate,
            kms_decrypt: decrypt,
            kms_errors: get(&self.kms_errors),
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            rotations: get(&self.rotations),
            rotation_failures: get(&self.rotation_failures),
            bridge_waits: get(&self.bridge_waits),
            bridge_timeouts: get(&self.bridge_timeouts),
        }
    }
}

/// A point-in-time copy of a keyring's counters (the same events the `metrics` facade
/// receives, counted for this keyring alone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// All KMS calls made (the sum of the two below).
    pub kms_calls: u64,
    /// GenerateDataKey calls (one per new data or index key).
    pub kms_generate_data_key: u64,
    /// Decrypt calls (one per key loaded into the cache).
    pub kms_decrypt: u64,
    /// KMS calls that failed.
    pub kms_errors: u64,
    /// Key lookups answered from memory.
    pub cache_hits: u64,
    /// Key lookups that had to load a key.
    pub cache_misses: u64,
    /// New active data keys made (first use, age, use count, or on request).
    pub rotations: u64,
    /// Background refreshes that failed (the current key stays in use until its hard limit).
    pub rotation_failures: u64,
    /// Synchronous callers that waited for the KMS or key store through the bridge.
    pub bridge_waits: u64,
    /// Synchronous waits that timed out.
    pub bridge_timeouts: u64,
}

/// The keyring's view of its key store: every call in a `envelope.key_store` span (the
/// operation and, where there is one, the key id; never a wrapped key) and counted and timed
/// through the facade.
pub(crate) struct TracedStore(pub(crate) std::sync::Arc<dyn KeyStore>);

impl TracedStore {
    async fn call<T>(
        &self,
        operation: &'static str,
        key_id: Option<&KeyId>,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let span = match key_id {
            Some(id) => {
                tracing::debug_span!(target: "envelope::key_store", "envelope.key_store", operation, key_id = %id)
            }
            None => {
                tracing::debug_span!(target: "envelope::key_store", "envelope.key_store", operation)
            }
        };
        let started = std::time::Instant::now();
        let result = tracing::Instrument::instrument(call, span).await;
        let took = started.elapsed();
        ::metrics::counter!(
            names::KEY_STORE_CALLS,
            "operation" => operation,
            "outcome" => outcome(result.is_ok()),
        )
        .increment(1);
        ::metrics::histogram!(names::KEY_STORE_CALL_SECONDS, "operation" => operation)
            .record(took.as_secs_f64());
        if let Err(e) = &result {
            tracing::debug!(target: "envelope::key_store", operation, ?took, error = %e, "key store call failed");
        }
        result
    }
}

#[async_trait]
impl KeyStore for TracedStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.call("insert", Some(&record.id), self.0.insert(record))
            .await
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.call("get", Some(id), self.0.get(id)).await
    }
    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        self.call("list", None, self.0.list(filter)).await
    }
    async fn retire(&self, id: &KeyId, at: SystemTime) -> Result<(), StoreError> {
        self.call("retire", Some(id), self.0.retire(id, at)).await
    }
    async fn rewrap(
        &self,
        id: &KeyId,
        expected_wrapped: &[u8],
        provider: &str,
        cmk_id: &str,
        wrapped: &[u8],
    ) -> Result<(), StoreError> {
        self.call(
            "rewrap",
            Some(id),
            self.0
                .rewrap(id, expected_wrapped, provider, cmk_id, wrapped),
        )
        .await
    }
    async fn delete(&self, id: &KeyId) -> Result<bool, StoreError> {
        self.call("delete", Some(id), self.0.delete(id)).await
    }
}
