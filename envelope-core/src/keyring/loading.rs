//! Loading keys from the key table through the KMS (single-flight), checking their context,
//! and the master-key check at start-up; [`Loader`], what loads remember.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Inner;
use super::cache::OpenedKey;
use super::policy::MAX_REMEMBERED_LOAD_FAILURES;
use crate::bridge::Bridge;
use crate::error::{Error, KmsError, MasterKeyMissing, Result, StoreError, Unavailable};
use crate::keys::{KeyId, KeyIdHash, KeyKind, KeyRecord, Scope};
use crate::kms::{EncryptionContext, KmsProvider};
use crate::store::KeyFilter;
use crate::telemetry::KmsAction;

/// Context keys the keyring binds every wrapped key to.
const CTX_KEY_ID: &str = "envelope.key_id";
const CTX_KIND: &str = "envelope.kind";
const CTX_SCOPE: &str = "envelope.scope";

pub(super) type KeyIdSet = HashSet<KeyId, KeyIdHash>;

/// What key loads remember between calls: recent failures, and which keys the key table last
/// held.
#[derive(Default)]
pub(super) struct Loader {
    /// Recent failures to load a key (KMS or key store unavailable, or too slow): readers of that
    /// key fail at once with the same error for `refresh_retry` instead of each waiting again.
    failures: Mutex<HashMap<KeyId, (Instant, Error), KeyIdHash>>,
    /// The ids the last key-table read found, and when that read started: a load that began
    /// before it and finishes after it must not bring back a key the read found deleted.
    presence: Mutex<Option<(Instant, Arc<KeyIdSet>)>>,
}

impl Loader {
    /// Record that a key-table read started at `started` found exactly `ids`.
    pub(super) fn set_presence(&self, started: Instant, ids: KeyIdSet) {
        *self.presence.lock().unwrap_or_else(|p| p.into_inner()) = Some((started, Arc::new(ids)));
    }

    /// Whether a key-table read that started after `stamp` did not find `id`: the key was
    /// deleted meanwhile.
    fn deleted_since(&self, stamp: Instant, id: &KeyId) -> bool {
        matches!(
            &*self.presence.lock().unwrap_or_else(|p| p.into_inner()),
            Some((at, ids)) if *at > stamp && !ids.contains(id)
        )
    }

    fn note_failure(&self, id: KeyId, at: Instant, e: &Error) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Ids come from stored values: bound the map, however many distinct ids fail.
        if failures.len() < MAX_REMEMBERED_LOAD_FAILURES {
            failures.insert(id, (at, e.clone()));
        }
    }

    /// `id`'s last failure, if it happened less than `retry` before `now`.
    fn recent_failure(&self, id: &KeyId, now: Instant, retry: Duration) -> Option<Error> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let (at, e) = failures.get(id)?;
        (now.duration_since(*at) < retry).then(|| e.clone())
    }

    /// Forget the failures older than `retry` before `now`.
    pub(super) fn forget_failures(&self, now: Instant, retry: Duration) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (at, _)| now.duration_since(*at) < retry);
    }
}

impl Inner {
    pub(super) fn provider_named(&self, name: &str) -> Option<&Arc<dyn KmsProvider>> {
        std::iter::once(&self.kms)
            .chain(&self.readers)
            .find(|k| k.name() == name)
    }

    /// One KMS call, counted, timed and traced (span `envelope.kms` with the provider and the
    /// action; never a body or key material).
    pub(super) async fn kms_call<T>(
        &self,
        action: KmsAction,
        provider: &str,
        call: impl Future<Output = std::result::Result<T, KmsError>>,
    ) -> Result<T> {
        let span = tracing::debug_span!(target: "envelope::kms", "envelope.kms", provider, action = action.name());
        let started = Instant::now();
        let result = tracing::Instrument::instrument(call, span).await;
        let elapsed = started.elapsed();
        self.metrics
            .kms_call(action, provider, result.is_ok(), elapsed);
        match &result {
            Ok(_) => {
                tracing::debug!(target: "envelope::kms", provider, action = action.name(), ?elapsed, "kms call")
            }
            Err(e) => {
                tracing::warn!(target: "envelope::kms", provider, action = action.name(), ?elapsed, error = %e, "kms call failed");
            }
        }
        Ok(result?)
    }

    /// Load a key from the store and unwrap it with the KMS.
    pub(super) async fn load(self: Arc<Self>, id: KeyId) -> Result<Arc<OpenedKey>> {
        let stamp = Instant::now();
        let record = self
            .store
            .get(&id)
            .await?
            .ok_or(Error::UnknownKey { key_id: id })?;
        let (context, scope) = checked_context(&record)?;
        let Some(kms) = self.provider_named(&record.provider) else {
            let mut given: Vec<&str> = std::iter::once(&self.kms)
                .chain(&self.readers)
                .map(|k| k.name())
                .collect();
            given.sort_unstable();
            return Err(Error::config(
                "the keyring's KMS providers",
                format!(
                    "key {id} was wrapped by the '{}' KMS provider, but this keyring has only {}: give it that provider too (KeyringBuilder::also_read, or also_read_with for a local KMS; the CLI's also_read setting) while keys move between KMSs",
                    record.provider,
                    given.join(", ")
                ),
            ));
        };
        // Before the KMS call: the row's own CMK id is no evidence (N1 of the 2026-12-05 review).
        self.trusted.check(kms.as_ref(), &record)?;
        let material = self
            .kms_call(
                KmsAction::Decrypt,
                kms.name(),
                kms.decrypt(&record.cmk_id, &record.wrapped, &context),
            )
            .await?;
        // A key-table refresh that started after this load's read and did not find the row:
        // the key was deleted meanwhile, and must not come back into the cache.
        if self.loads.deleted_since(stamp, &id) {
            return Err(Error::UnknownKey { key_id: id });
        }
        tracing::debug!(target: "envelope::keyring", key_id = %id, kind = %record.kind, "loaded key");
        Ok(Arc::new(OpenedKey::new(
            record.kind,
            id,
            scope,
            &material,
            stamp,
        )?))
    }

    /// The opened key for `id`, from the cache or loaded once for all concurrent callers.
    pub(super) fn key_blocking(self: &Arc<Self>, id: KeyId) -> Result<Arc<OpenedKey>> {
        if let Some(key) = self.cached(&id) {
            self.metrics.cache_hit();
            return Ok(key);
        }
        self.metrics.cache_miss();
        if let Some(e) = self.recent_load_failure(&id) {
            return Err(e);
        }
        // The whole single-flight call sits inside the blocking section: moka's waiters block
        // their thread too, and on a multi-thread runtime they must not hold a worker hostage.
        Bridge::blocking_section(|| {
            self.cache.try_get_with(id, || {
                self.metrics.bridge_wait();
                let inner = self.clone();
                self.bridge
                    .wait("loading a key", async move { inner.load(id).await })
                    .map_err(|e| self.note_timeout(e))
                    .inspect_err(|e| self.note_load_failure(id, e))
            })
        })
        .map_err(|shared: Arc<Error>| (*shared).clone())
    }

    /// Remember a failed load whose cause is the KMS or the key store being unavailable or too
    /// slow, so the next readers of that key fail at once (for `refresh_retry`) instead of each
    /// waiting out `kms_timeout` again. Answers about the data itself (an unknown key, a corrupt
    /// row) are not remembered: they cost no wait.
    pub(super) fn note_load_failure(&self, id: KeyId, e: &Error) {
        // Error::is_retryable: on this path a retryable KMS error, a failed key-store database
        // or a timeout (a load never fails with the write-side WriteKey or KeysUsedUp).
        if e.is_retryable() {
            self.loads.note_failure(id, self.clock.now(), e);
        }
    }

    pub(super) fn recent_load_failure(&self, id: &KeyId) -> Option<Error> {
        self.loads
            .recent_failure(id, self.clock.now(), self.policy.refresh_retry)
    }

    /// Refuse to start on a key table whose keys all need master keys this provider lacks.
    pub(super) fn check_master_keys(self: &Arc<Self>) -> Result<()> {
        if self.kms.holds_cmk(&self.cmk).is_none() {
            return Ok(());
        }
        let store = self.store.clone();
        let records = Bridge::blocking_section(|| {
            self.bridge.wait("reading the key table", async move {
                Ok(store.list(&KeyFilter::all()).await?)
            })
        })?;
        let provider = self.kms.name();
        let ours: Vec<&KeyRecord> = records.iter().filter(|r| r.provider == provider).collect();
        if ours.is_empty()
            || ours
                .iter()
                .any(|r| self.kms.holds_cmk(&r.cmk_id) == Some(true))
        {
            return Ok(());
        }
        let mut wanted: Vec<String> = ours.iter().map(|r| r.cmk_id.clone()).collect();
        wanted.sort_unstable();
        wanted.dedup();
        Err(Error::MasterKeyMissing(Box::new(MasterKeyMissing {
            provider: provider.to_owned(),
            keys: ours.len(),
            wanted,
            held: self.cmk.clone(),
            origin: self
                .kms
                .master_key_origin()
                .unwrap_or_else(|| "the provider's configuration".to_owned()),
        })))
    }

    pub(super) fn note_timeout(&self, e: Error) -> Error {
        if matches!(e, Error::Unavailable(Unavailable::Timeout { .. })) {
            self.metrics.bridge_timeout();
        }
        e
    }
}

pub(super) fn kms_context(id: &KeyId, kind: KeyKind, scope: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with(CTX_KEY_ID, id.to_hex())
        .with(CTX_KIND, kind.as_str())
        .with(CTX_SCOPE, scope)
}

/// The stored context must name the row's own id, kind and scope: a wrapped key copied onto
/// another row is refused here rather than opened under the wrong id, and a row whose scope was
/// edited (so that shredding by scope would miss it) does not open. The context itself is bound
/// into the wrapped key by the KMS, so it cannot be edited to match.
pub(super) fn checked_context(record: &KeyRecord) -> Result<(EncryptionContext, Scope)> {
    let corrupt = |reason: String| {
        Error::Store(StoreError::Corrupt {
            key_id: record.id,
            reason,
        })
    };
    let context = EncryptionContext::from_json(&record.kms_context)
        .map_err(|e| corrupt(format!("kms_context is not a JSON object of strings: {e}")))?;
    if context.get(CTX_KEY_ID) != Some(record.id.to_hex().as_str()) {
        return Err(corrupt("kms_context names a different key id".into()));
    }
    if context.get(CTX_KIND) != Some(record.kind.as_str()) {
        return Err(corrupt("kms_context names a different key kind".into()));
    }
    if context.get(CTX_SCOPE) != Some(record.scope.as_str()) {
        return Err(corrupt(
            "kms_context names a different scope than the row's scope column (was the row edited?)"
                .into(),
        ));
    }
    let scope = Scope::new(record.scope.clone())
        .map_err(|_| corrupt("the scope column is not a valid scope name".into()))?;
    Ok((context, scope))
}
