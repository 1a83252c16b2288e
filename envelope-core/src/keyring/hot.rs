//! The hot path: sealing under the active key and opening with a cached key, with no I/O.

use super::*;

impl Inner {
    /// Seal under the scope's active data key if it may take one more write (counting the
    /// write); `None` when there is no usable key. Runs under the read lock: no reference counts
    /// change on this path, which every write takes.
    #[inline]
    pub(super) fn seal_active(
        self: &Arc<Self>,
        scope: &Scope,
        label: &Label,
        plaintext: &[u8],
    ) -> Option<Result<Vec<u8>>> {
        self.with_active(|active| {
            let key = active.get(scope, &self.default_scope)?;
            let now = self.clock.now_ms();
            if now >= key.hard_deadline_ms {
                return None;
            }
            let uses = key.uses.fetch_add(1, Ordering::Relaxed);
            if uses >= self.policy.dek_max_uses {
                return None;
            }
            if now >= key.soft_deadline_ms || uses >= self.soft_uses {
                self.schedule_refresh(scope, key);
            }
            Some(
                key.key
                    .data()
                    .and_then(|c| self.seal_with(c, label, plaintext)),
            )
        })
    }

    /// Seal under `cipher` with a fresh nonce, unless this is a forked child of the process the
    /// keyring was built in: the child shares the parent's data keys and use counts, so writes
    /// there would stretch the per-key bound across processes.
    #[inline]
    pub(super) fn seal_with(
        &self,
        cipher: &DataCipher,
        label: &Label,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        if nonce::fill(&mut nonce)? != self.pid {
            return Err(Error::Misuse(crate::error::Misuse::ForkedProcess {
                built_in: self.pid,
            }));
        }
        cipher.seal_with_nonce(label, &nonce, plaintext)
    }

    /// Run `f` on this thread's snapshot of the active keys, reloading it if it is stale.
    #[inline]
    pub(super) fn with_active<R>(&self, f: impl FnOnce(&ActiveSet) -> R) -> R {
        let generation = self.generation.load(Ordering::Acquire);
        SNAPSHOT.with(|cell| {
            let fresh = matches!(
                &*cell.borrow(),
                Some(s) if s.keyring == self.id && s.generation == generation
            );
            if !fresh {
                *cell.borrow_mut() = Some(Snapshot {
                    keyring: self.id,
                    generation,
                    set: self.active.load_full(),
                });
            }
            match &*cell.borrow() {
                Some(s) => f(&s.set),
                None => f(&self.active.load()),
            }
        })
    }

    pub(super) fn active_key(&self, scope: &Scope) -> Option<Arc<ActiveKey>> {
        self.active.load().get(scope, &self.default_scope).cloned()
    }

    /// Whether `active` may still take writes (without counting one).
    pub(super) fn is_usable(&self, active: &ActiveKey) -> bool {
        active.uses.load(Ordering::Relaxed) < self.policy.dek_max_uses
            && self.clock.now_ms() < active.hard_deadline_ms
    }

    pub(super) fn is_due(&self, active: &ActiveKey) -> bool {
        active.uses.load(Ordering::Relaxed) >= self.soft_uses
            || self.clock.now_ms() >= active.soft_deadline_ms
    }

    pub(super) fn millis_since_epoch(&self) -> u64 {
        u64::try_from(self.clock.now().duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Open under an active key without touching reference counts, if the value's key is one.
    #[inline]
    pub(super) fn open_hot(
        &self,
        envelope: &format::Envelope<'_>,
        label: &Label,
        scope: Option<&Scope>,
    ) -> Option<Result<Vec<u8>>> {
        self.with_active(|active| {
            let key = active.by_id.get(&envelope.key_id())?;
            self.metrics.cache_hit();
            Some(key.data_in(scope).and_then(|c| c.open(envelope, label)))
        })
    }

    /// The opened key for `id` if it is in memory: an active key, or one in the shared cache.
    pub(super) fn cached(&self, id: &KeyId) -> Option<Arc<OpenedKey>> {
        if let Some(key) = self.active.load().by_id.get(id) {
            return Some(key.clone());
        }
        self.cache.get(id)
    }
}

pub(super) fn write_unavailable(scope: &Scope, e: Error) -> Error {
    match e {
        e @ (Error::Unavailable(crate::error::Unavailable::WriteKey { .. })
        | Error::Misuse(crate::error::Misuse::PlaintextTooLarge { .. })
        | Error::Unavailable(crate::error::Unavailable::ShutDown)
        | Error::Misuse(crate::error::Misuse::BridgeReentrant)) => e,
        e => Error::Unavailable(crate::error::Unavailable::WriteKey {
            scope: scope.to_string(),
            cause: Box::new(e),
        }),
    }
}

pub(super) fn exhausted(scope: &Scope) -> Error {
    Error::Unavailable(crate::error::Unavailable::KeysUsedUp {
        scope: scope.to_string(),
    })
}
