//! Making data keys and moving each scope's active key to a successor; [`Rotations`], the
//! per-scope state of that work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use super::Inner;
use super::cache::{ActiveKey, ActiveSet, OpenedKey};
use super::loading::kms_context;
use crate::coarse_clock;
use crate::error::{Error, Result, SystemError, Unavailable};
use crate::keys::{KeyId, KeyKind, KeyRecord, Scope};
use crate::telemetry::KmsAction;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Rotation {
    /// Make a key only if the scope has none that may take writes (first write, hard limit).
    IfUnusable,
    /// Make a key only if the current one is past its soft limit (background refresh).
    IfDue,
    /// Make a key now (operator request).
    Always,
}

/// Per scope: the lock that serializes its rotations, the successor prepared for it, and its
/// last failure to make a key.
#[derive(Default)]
pub(super) struct Rotations {
    locks: Mutex<HashMap<Scope, Arc<tokio::sync::Mutex<()>>>>,
    /// Successors prepared by background refreshes, swapped in at the current key's hard limit.
    pending: Mutex<HashMap<Scope, Arc<OpenedKey>>>,
    /// The last failed attempt to make a data key, per scope: writers that find no usable key
    /// fail fast with this error for `refresh_retry` instead of each waiting on a KMS that is
    /// down.
    failures: Mutex<HashMap<Scope, (Instant, Error)>>,
}

impl Rotations {
    fn lock(&self, scope: &Scope) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(scope.clone())
            .or_default()
            .clone()
    }

    pub(super) fn pending_keys(&self) -> MutexGuard<'_, HashMap<Scope, Arc<OpenedKey>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn has_pending(&self, scope: &Scope) -> bool {
        self.pending_keys().contains_key(scope)
    }

    fn failures(&self) -> MutexGuard<'_, HashMap<Scope, (Instant, Error)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scope's last failure, if it happened less than `retry` before `now`.
    fn recent_failure(&self, scope: &Scope, now: Instant, retry: Duration) -> Option<Error> {
        let failures = self.failures();
        let (at, e) = failures.get(scope)?;
        (now.duration_since(*at) < retry).then(|| e.clone())
    }
}

impl Inner {
    pub(super) fn schedule_refresh(self: &Arc<Self>, scope: &Scope, active: &Arc<ActiveKey>) {
        if active.refresh_not_before_ms.load(Ordering::Relaxed) > self.millis_since_epoch() {
            return;
        }
        if active.refresh_in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.clone();
        let scope = scope.clone();
        let active = active.clone();
        self.bridge.handle().spawn(async move {
            let timeout = inner.policy.kms_timeout;
            let result =
                tokio::time::timeout(timeout, inner.clone().rotate(scope.clone(), Rotation::IfDue))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::Unavailable(Unavailable::Timeout {
                            waited: timeout,
                            what: "refreshing a data key".into(),
                        }))
                    });
            // On success the successor is prepared (or the key was already replaced): the flag
            // stays set so later writes do not schedule again. On failure, back off and retry.
            if let Err(e) = result {
                inner.metrics.rotation_failure();
                tracing::warn!(
                    target: "envelope::keyring",
                    scope = %scope,
                    error = %e,
                    "background data key refresh failed; the current key stays in use until its hard limit"
                );
                let retry_at = inner.millis_since_epoch().saturating_add(
                    u64::try_from(inner.policy.refresh_retry.as_millis()).unwrap_or(u64::MAX),
                );
                active.refresh_not_before_ms.store(retry_at, Ordering::Relaxed);
                active.refresh_in_flight.store(false, Ordering::Release);
            }
        });
    }

    /// Bring a new data key into service for `scope` if `when` says so. Serialized per scope, so
    /// concurrent writers that all found the key unusable make one new key, not many.
    ///
    /// A background refresh ([`Rotation::IfDue`]) only prepares the successor: it is generated
    /// and stored ahead of time, and swapped in when the current key reaches its hard limit, so
    /// every key serves its full quota and the swap needs no KMS call.
    ///
    /// Everything, the wait for a concurrent rotation included, fits in `kms_timeout`, and a
    /// timeout is recorded like any other failure: later writers fail at once for
    /// `refresh_retry` instead of each waiting for a KMS that does not answer.
    pub(super) async fn rotate(
        self: Arc<Self>,
        scope: Scope,
        when: Rotation,
    ) -> Result<Option<KeyId>> {
        let timeout = self.policy.kms_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let lock = self.rotations.lock(&scope);
        let Ok(_serial) = tokio::time::timeout_at(deadline, lock.lock()).await else {
            return Err(Error::Unavailable(Unavailable::Timeout {
                waited: timeout,
                what: "waiting for another rotation of the same scope".into(),
            }));
        };
        let current = self.active_key(&scope);
        match (&current, when) {
            (Some(a), Rotation::IfUnusable) if self.is_usable(a) => return Ok(None),
            (Some(a), Rotation::IfDue) if !self.is_due(a) || self.rotations.has_pending(&scope) => {
                return Ok(None);
            }
            (None, Rotation::IfDue) => return Ok(None),
            _ => {}
        }
        if when == Rotation::IfUnusable
            && let Some(id) = self.promote_pending(&scope)
        {
            return Ok(Some(id));
        }
        if when != Rotation::Always
            && let Some(e) = self.recent_failure(&scope)
        {
            return Err(e);
        }
        let made =
            tokio::time::timeout_at(deadline, self.create_key(KeyKind::Data, scope.as_str()))
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Unavailable(Unavailable::Timeout {
                        waited: timeout,
                        what: "making a data key".into(),
                    }))
                });
        let (record, key) = match made {
            Ok(made) => {
                self.rotations.failures().remove(&scope);
                made
            }
            Err(e) => {
                self.rotations
                    .failures()
                    .insert(scope.clone(), (self.clock.now(), e.clone()));
                return Err(e);
            }
        };
        if when == Rotation::IfDue {
            tracing::info!(target: "envelope::keyring", scope = %scope, key_id = %record.id, "prepared the next data key");
            self.rotations.pending_keys().insert(scope, key);
        } else {
            self.activate(&scope, key);
        }
        Ok(Some(record.id))
    }

    /// Swap in the prepared successor, if there is one. No I/O on the caller's thread.
    pub(super) fn promote_pending(self: &Arc<Self>, scope: &Scope) -> Option<KeyId> {
        let next = self.rotations.pending_keys().remove(scope)?;
        let id = next.id();
        self.activate(scope, next);
        Some(id)
    }

    /// Make `key` the scope's active key and retire the previous one in the background.
    pub(super) fn activate(self: &Arc<Self>, scope: &Scope, key: Arc<OpenedKey>) {
        let id = key.id();
        let now = self.clock.now_ms();
        let fresh = Arc::new(ActiveKey {
            key,
            uses: AtomicU64::new(0),
            soft_deadline_ms: now.saturating_add(coarse_clock::ms(self.policy.soft_age())),
            hard_deadline_ms: now.saturating_add(coarse_clock::ms(self.policy.dek_max_age)),
            refresh_in_flight: AtomicBool::new(false),
            refresh_not_before_ms: AtomicU64::new(0),
        });
        let mut previous = None;
        // Copy-on-write; retried if another scope rotated at the same moment.
        self.active.update(|current| {
            let mut next = ActiveSet::clone(current);
            let slot = if *scope == self.default_scope {
                next.default.replace(fresh.clone())
            } else {
                next.scoped.insert(scope.clone(), fresh.clone())
            };
            previous = slot.map(|a| a.key.clone());
            if let Some(old) = &previous {
                next.by_id.remove(&old.id());
            }
            next.by_id.insert(id, fresh.key.clone());
            (next, true)
        });
        self.metrics.rotation();
        let previous = previous.map(|old| {
            // The outgoing key leaves the active set, and its cache entry (made when the key was)
            // may have expired long ago: cache it afresh, so the most recent values stay readable
            // for `cache_ttl` without a KMS call, through a KMS outage too.
            let old_id = old.id();
            self.cache.insert(old_id, old);
            old_id
        });
        tracing::info!(target: "envelope::keyring", scope = %scope, key_id = %id, ?previous, "new active data key");
        if let Some(old) = previous {
            // The old key stays readable; retiring it only records that writes under it ended.
            let store = self.store.clone();
            self.bridge.handle().spawn(async move {
                if let Err(e) = store.retire(&old, SystemTime::now()).await {
                    tracing::warn!(target: "envelope::keyring", key_id = %old, error = %e, "could not mark the previous data key retired");
                }
            });
        }
    }

    fn recent_failure(&self, scope: &Scope) -> Option<Error> {
        self.rotations
            .recent_failure(scope, self.clock.now(), self.policy.refresh_retry)
    }

    pub(super) async fn rotate_and_report(&self, scope: Scope, me: Arc<Self>) -> Result<KeyId> {
        let id = self
            .bridge
            .run("rotating a data key", async move {
                me.rotate(scope, Rotation::Always).await
            })
            .await?;
        // An unconditional rotation always makes a key or fails; a missing id is a bug here.
        id.ok_or_else(|| {
            Error::System(SystemError::Internal(
                "an unconditional rotation returned no key",
            ))
        })
    }

    /// Generate, persist and open a new key.
    pub(super) async fn create_key(
        self: &Arc<Self>,
        kind: KeyKind,
        scope: &str,
    ) -> Result<(KeyRecord, Arc<OpenedKey>)> {
        let id = KeyId::random()?;
        let context = kms_context(&id, kind, scope);
        let generated = self
            .kms_call(
                KmsAction::GenerateDataKey,
                self.kms.name(),
                self.kms.generate_data_key(&self.cmk, &context),
            )
            .await?;
        let record = KeyRecord {
            id,
            kind,
            scope: scope.to_owned(),
            provider: self.kms.name().to_owned(),
            cmk_id: self.cmk.clone(),
            wrapped: generated.wrapped,
            kms_context: context.canonical_json(),
            created_at: SystemTime::now(),
            retired_at: None,
        };
        let scope = Scope::new(scope.to_owned())?;
        // Persist before first use: a value must never exist under a key the table lacks.
        self.store.insert(&record).await?;
        let key = Arc::new(OpenedKey::new(
            kind,
            id,
            scope,
            &generated.plaintext,
            Instant::now(),
        )?);
        self.cache.insert(id, key.clone());
        Ok((record, key))
    }

    /// A write that found no usable key failed: if it timed out in the caller (the keyring
    /// runtime itself may be held up), record that as the scope's recent failure, as `rotate`
    /// does for failures it sees itself.
    pub(super) fn note_write_failure(&self, scope: &Scope, e: Error) -> Error {
        if matches!(e, Error::Unavailable(Unavailable::Timeout { .. }))
            && self.recent_failure(scope).is_none()
        {
            self.rotations
                .failures()
                .insert(scope.clone(), (self.clock.now(), e.clone()));
        }
        e
    }

    /// Take `key` out of service as `scope`'s write key, because an operator retired it
    /// (`deleted` false: it stays readable) or deleted it.
    pub(super) fn deactivate(self: &Arc<Self>, scope: &Scope, key: &Arc<OpenedKey>, deleted: bool) {
        let id = key.id();
        let removed = self.active.update(|current| {
            let mut next = ActiveSet::clone(current);
            let holds = |a: Option<&Arc<ActiveKey>>| a.is_some_and(|a| a.key.id() == id);
            let removed = if *scope == self.default_scope {
                holds(next.default.as_ref()) && next.default.take().is_some()
            } else {
                holds(next.scoped.get(scope)) && next.scoped.remove(scope).is_some()
            };
            if removed {
                next.by_id.remove(&id);
            }
            (next, removed)
        });
        if !removed {
            return;
        }
        if deleted {
            self.cache.invalidate(&id);
            tracing::warn!(target: "envelope::keyring", scope = %scope, key_id = %id, "the active data key was deleted from the key table; the next write makes a new one");
        } else {
            self.cache.insert(id, key.clone());
            tracing::info!(target: "envelope::keyring", scope = %scope, key_id = %id, "the active data key was retired in the key table; the next write makes a new one");
        }
    }
}

impl Inner {
    /// Retire the active data keys of every scope, and the successors prepared for them, in the
    /// key table, and stop writing under them. Returns how many were retired.
    pub(super) async fn retire_active(self: Arc<Self>) -> Result<usize> {
        let now = SystemTime::now();
        let mut retired = 0;
        for (scope, active) in self.active.load().iter(&self.default_scope) {
            self.store.retire(&active.key.id(), now).await?;
            self.deactivate(&scope, &active.key, false);
            retired += 1;
        }
        let pending: Vec<Arc<OpenedKey>> = self
            .rotations
            .pending_keys()
            .drain()
            .map(|(_, k)| k)
            .collect();
        for key in pending {
            self.store.retire(&key.id(), now).await?;
            retired += 1;
        }
        Ok(retired)
    }
}
