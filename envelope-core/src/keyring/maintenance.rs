//! The maintenance task: once a second, expire cached keys, reseed nonces, swap in successors of
//! keys past their age, and follow the key table; [`Maintenance`], when it last read the table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::Inner;
use super::cache::OpenedKey;
use super::loading::KeyIdSet;
use crate::coarse_clock;
use crate::error::{Error, Result, Unavailable};
use crate::keys::{KeyId, KeyIdHash, KeyRecord};
use crate::nonce;
use crate::store::KeyFilter;

/// When the key table is next read for changes an operator made, and whether a read runs.
pub(super) struct Maintenance {
    /// Set while a key-table refresh runs.
    key_refresh_running: AtomicBool,
    /// Milliseconds since the keyring's epoch at which the next key-table refresh is due.
    next_key_refresh_ms: AtomicU64,
}

impl Maintenance {
    /// The first key-table refresh is due `first_ms` after the keyring's epoch.
    pub(super) fn new(first_ms: u64) -> Self {
        Maintenance {
            key_refresh_running: AtomicBool::new(false),
            next_key_refresh_ms: AtomicU64::new(first_ms),
        }
    }

    /// Claim the key-table refresh if it is due at `now_ms` and none runs.
    fn claim(&self, now_ms: u64) -> bool {
        now_ms >= self.next_key_refresh_ms.load(Ordering::Relaxed)
            && !self.key_refresh_running.swap(true, Ordering::AcqRel)
    }

    /// The claimed refresh is over; the next is due at `next_ms`.
    fn finish(&self, next_ms: u64) {
        self.next_key_refresh_ms.store(next_ms, Ordering::Relaxed);
        self.key_refresh_running.store(false, Ordering::Release);
    }
}

impl Inner {
    /// Read the key table and bring this keyring in line with it: a data key an operator
    /// retired takes no more writes (the next write makes a new key), a deleted key leaves every
    /// cache, and each blind-index label's keys are read again.
    pub(super) async fn refresh_key_states(self: Arc<Self>) -> Result<()> {
        let started = Instant::now();
        let records = self.store.list(&KeyFilter::all()).await?;
        let rows: HashMap<KeyId, &KeyRecord, KeyIdHash> =
            records.iter().map(|r| (r.id, r)).collect();
        let ids: KeyIdSet = rows.keys().copied().collect();
        self.loads.set_presence(started, ids);
        // Only a key known to exist before the read started can be missing from it.
        let deleted = |key: &OpenedKey| key.stamp < started && !rows.contains_key(&key.id());
        let retired = |key: &OpenedKey| rows.get(&key.id()).is_some_and(|r| r.retired_at.is_some());

        for (scope, active) in self.active.load().iter(&self.default_scope) {
            let gone = deleted(&active.key);
            if gone || retired(&active.key) {
                self.deactivate(&scope, &active.key, gone);
            }
        }
        self.rotations
            .pending_keys()
            .retain(|_, key| !deleted(key) && !retired(key));
        let stale: Vec<KeyId> = self
            .cache
            .iter()
            .filter(|(_, key)| deleted(key))
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            self.cache.invalidate(id);
            tracing::info!(target: "envelope::keyring", key_id = %id, "key deleted from the key table; dropped from the cache");
        }

        self.index.reread(&records);
        Ok(())
    }

    /// Start a key-table refresh in the background if one is due.
    pub(super) fn schedule_key_refresh(self: &Arc<Self>) {
        let now = self.millis_since_epoch();
        if !self.maintenance.claim(now) {
            return;
        }
        let inner = self.clone();
        self.bridge.handle().spawn(async move {
            let timeout = inner.policy.kms_timeout;
            let result = tokio::time::timeout(timeout, inner.clone().refresh_key_states()).await;
            if let Err(e) = result.unwrap_or_else(|_| {
                Err(Error::Unavailable(Unavailable::Timeout {
                    waited: timeout,
                    what: "reading the key table".into(),
                }))
            }) {
                tracing::warn!(target: "envelope::keyring", error = %e, "could not read the key table for retired and deleted keys; trying again at the next interval");
            }
            inner
                .maintenance
                .finish(now.saturating_add(coarse_clock::ms(inner.policy.key_refresh)));
        });
    }

    /// Once a second: expire cache entries for real (moka expires lazily), have every thread
    /// reseed its nonce generator (see `nonce`), forget old load failures, swap in prepared
    /// successors of keys past their age, and start refreshes that are due. (Writes check the
    /// age limit themselves: this tick only keeps idle scopes current.)
    pub(super) fn tick(self: &Arc<Self>) {
        self.cache.run_pending_tasks();
        nonce::request_reseed();
        let now = self.clock.now();
        self.loads.forget_failures(now, self.policy.refresh_retry);
        self.schedule_key_refresh();
        let now_ms = self.clock.now_ms();
        let active = self.active.load().iter(&self.default_scope);
        for (scope, key) in active {
            if now_ms >= key.hard_deadline_ms && self.promote_pending(&scope).is_some() {
                continue;
            }
            if now_ms >= key.soft_deadline_ms {
                self.schedule_refresh(&scope, &key);
            }
        }
    }
}

/// The maintenance task: [`Inner::tick`] once a second until the keyring is dropped.
pub(super) async fn run(inner: Weak<Inner>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.tick();
    }
}
