//! Loading keys from the key table through the KMS (single-flight), checking their context,
//! and the maintenance task that follows the key table.

use super::*;

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
        call: impl std::future::Future<Output = std::result::Result<T, KmsError>>,
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
        if let Some((at, ids)) = &*self.presence.lock().unwrap_or_else(|p| p.into_inner())
            && *at > stamp
            && !ids.contains(&id)
        {
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
        let transient = match e {
            Error::Unavailable(crate::error::Unavailable::Timeout { .. }) => true,
            Error::Kms(k) => k.is_retryable(),
            Error::Store(StoreError::Backend(_)) => true,
            _ => false,
        };
        if !transient {
            return;
        }
        let mut failures = self.load_failures.lock().unwrap_or_else(|p| p.into_inner());
        // Ids come from stored values: bound the map, however many distinct ids fail.
        if failures.len() < MAX_REMEMBERED_LOAD_FAILURES {
            failures.insert(id, (self.clock.now(), e.clone()));
        }
    }

    pub(super) fn recent_load_failure(&self, id: &KeyId) -> Option<Error> {
        let failures = self.load_failures.lock().unwrap_or_else(|p| p.into_inner());
        let (at, e) = failures.get(id)?;
        (self.clock.now().duration_since(*at) < self.policy.refresh_retry).then(|| e.clone())
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
        if matches!(
            e,
            Error::Unavailable(crate::error::Unavailable::Timeout { .. })
        ) {
            self.metrics.bridge_timeout();
        }
        e
    }

    /// Read the key table and bring this keyring in line with it: a data key an operator
    /// retired takes no more writes (the next write makes a new key), a deleted key leaves every
    /// cache, and each blind-index label's keys are read again.
    pub(super) async fn refresh_key_states(self: Arc<Self>) -> Result<()> {
        let started = Instant::now();
        let records = self.store.list(&KeyFilter::all()).await?;
        let rows: HashMap<KeyId, &KeyRecord, KeyIdHash> =
            records.iter().map(|r| (r.id, r)).collect();
        let ids: KeyIdSet = rows.keys().copied().collect();
        *self.presence.lock().unwrap_or_else(|p| p.into_inner()) = Some((started, Arc::new(ids)));
        // Only a key known to exist before the read started can be missing from it.
        let deleted = |key: &OpenedKey| key.stamp < started && !rows.contains_key(&key.id());
        let retired = |key: &OpenedKey| rows.get(&key.id()).is_some_and(|r| r.retired_at.is_some());

        for (scope, active) in self.active.load().iter(&self.default_scope) {
            let gone = deleted(&active.key);
            if gone || retired(&active.key) {
                self.deactivate(&scope, &active.key, gone);
            }
        }
        self.pending_keys()
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

        let mut sets = self.index_sets.write().unwrap_or_else(|p| p.into_inner());
        let labels: Vec<Label> = sets.keys().cloned().collect();
        for label in labels {
            match IndexSet::of(&records, &label) {
                Some(set) => {
                    sets.insert(label, Arc::new(set));
                }
                // No live key: the next use makes one (or finds the one another process made).
                None => {
                    sets.remove(&label);
                }
            }
        }
        Ok(())
    }

    /// Start a key-table refresh in the background if one is due.
    pub(super) fn schedule_key_refresh(self: &Arc<Self>) {
        let now = self.millis_since_epoch();
        if now < self.next_key_refresh_ms.load(Ordering::Relaxed)
            || self.key_refresh_running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let inner = self.clone();
        self.bridge.handle().spawn(async move {
            let timeout = inner.policy.kms_timeout;
            let result = tokio::time::timeout(timeout, inner.clone().refresh_key_states()).await;
            if let Err(e) = result.unwrap_or_else(|_| {
                Err(Error::Unavailable(crate::error::Unavailable::Timeout {
                    waited: timeout,
                    what: "reading the key table".into(),
                }))
            }) {
                tracing::warn!(target: "envelope::keyring", error = %e, "could not read the key table for retired and deleted keys; trying again at the next interval");
            }
            inner.next_key_refresh_ms.store(
                now.saturating_add(crate::clock::ms(inner.policy.key_refresh)),
                Ordering::Relaxed,
            );
            inner.key_refresh_running.store(false, Ordering::Release);
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
        self.load_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (at, _)| now.duration_since(*at) < self.policy.refresh_retry);
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

pub(super) async fn maintenance(inner: Weak<Inner>) {
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
