//! Counters a keyring keeps: KMS calls, cache outcomes, rotations, bridge waits.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) kms_generate_data_key: AtomicU64,
    pub(crate) kms_decrypt: AtomicU64,
    pub(crate) kms_encrypt: AtomicU64,
    pub(crate) kms_re_encrypt: AtomicU64,
    pub(crate) kms_errors: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) rotations: AtomicU64,
    pub(crate) rotation_failures: AtomicU64,
    pub(crate) bridge_waits: AtomicU64,
    pub(crate) bridge_timeouts: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let generate = get(&self.kms_generate_data_key);
        let decrypt = get(&self.kms_decrypt);
        let encrypt = get(&self.kms_encrypt);
        let re_encrypt = get(&self.kms_re_encrypt);
        MetricsSnapshot {
            kms_calls: generate + decrypt + encrypt + re_encrypt,
            kms_generate_data_key: generate,
            kms_decrypt: decrypt,
            kms_encrypt: encrypt,
            kms_re_encrypt: re_encrypt,
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

/// A point-in-time copy of a keyring's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// All KMS calls made (the sum of the four below).
    pub kms_calls: u64,
    /// GenerateDataKey calls (one per new data or index key).
    pub kms_generate_data_key: u64,
    /// Decrypt calls (one per key loaded into the cache).
    pub kms_decrypt: u64,
    /// Encrypt calls.
    pub kms_encrypt: u64,
    /// ReEncrypt calls.
    pub kms_re_encrypt: u64,
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
