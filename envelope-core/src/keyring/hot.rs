//! The hot path: sealing under the active key and opening with a cached key, with no I/O; and
//! [`ActiveKeys`], the active-key state it reads.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::Inner;
use super::cache::{ActiveKey, ActiveSet, OpenedKey};
use crate::cipher::DataCipher;
use crate::error::{Error, Misuse, Result, Unavailable};
use crate::format::{self, NONCE_LEN};
use crate::keys::{KeyId, Label, Scope};
use crate::nonce;

static NEXT_KEYRING_ID: AtomicU64 = AtomicU64::new(0);

/// One thread's view of one keyring's active keys.
struct Snapshot {
    keyring: u64,
    generation: u64,
    set: Arc<ActiveSet>,
}

thread_local! {
    // The last active-key set this thread used. It keeps those keys alive until the thread next
    // uses a keyring (or exits): after a rotation that is the previous key, which the cache
    // keeps for its TTL anyway.
    static SNAPSHOT: RefCell<Option<Snapshot>> = const { RefCell::new(None) };
}

/// The data key each scope writes under, read on every write and on most reads.
pub(super) struct ActiveKeys {
    /// The active keys, read lock-free; replaced copy-on-write when a key rotates (rare).
    set: ArcSwap<ActiveSet>,
    /// Bumped after every change of `set`; threads keep a snapshot of `set` and reload it only
    /// when this moves, so the write and read paths touch no shared cache line.
    generation: AtomicU64,
    /// A process-unique id, so a thread's snapshot can never be mistaken for another keyring's.
    id: u64,
    /// The process the keyring was built in: a forked child must not write under keys it shares
    /// with its parent.
    pid: u32,
    /// `policy.dek_max_uses` at `refresh_at_percent`, computed once.
    soft_uses: u64,
}

impl ActiveKeys {
    /// No active key yet; `soft_uses` is the use count from which a successor is prepared.
    pub(super) fn new(soft_uses: u64) -> Self {
        ActiveKeys {
            set: ArcSwap::from_pointee(ActiveSet::default()),
            generation: AtomicU64::new(0),
            id: NEXT_KEYRING_ID.fetch_add(1, Ordering::Relaxed),
            pid: std::process::id(),
            soft_uses,
        }
    }

    /// Run `f` on this thread's snapshot of the active keys, reloading it if it is stale.
    #[inline]
    pub(super) fn with<R>(&self, f: impl FnOnce(&ActiveSet) -> R) -> R {
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
                    set: self.set.load_full(),
                });
            }
            match &*cell.borrow() {
                Some(s) => f(&s.set),
                None => f(&self.set.load()),
            }
        })
    }

    /// The current set, bypassing this thread's snapshot.
    pub(super) fn load(&self) -> arc_swap::Guard<Arc<ActiveSet>> {
        self.set.load()
    }

    /// Replace the set copy-on-write with what `f` makes of it (`f` may run more than once when
    /// another scope changes the set at the same moment). When `f` last said it changed
    /// something, every thread's snapshot goes stale; returns whether it did.
    pub(super) fn update(&self, mut f: impl FnMut(&ActiveSet) -> (ActiveSet, bool)) -> bool {
        let mut changed = false;
        self.set.rcu(|current| {
            let (next, c) = f(current);
            changed = c;
            next
        });
        if changed {
            self.generation.fetch_add(1, Ordering::Release);
        }
        changed
    }

    /// The process the keyring was built in.
    fn built_in(&self) -> u32 {
        self.pid
    }

    /// The use count from which a successor is prepared.
    pub(super) fn soft_uses(&self) -> u64 {
        self.soft_uses
    }
}

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
        self.active.with(|active| {
            let key = active.get(scope, &self.default_scope)?;
            let now = self.clock.now_ms();
            if now >= key.hard_deadline_ms {
                return None;
            }
            let uses = key.uses.fetch_add(1, Ordering::Relaxed);
            if uses >= self.policy.dek_max_uses {
                return None;
            }
            if now >= key.soft_deadline_ms || uses >= self.active.soft_uses() {
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
        let built_in = self.active.built_in();
        if nonce::fill(&mut nonce)? != built_in {
            return Err(Error::Misuse(Misuse::ForkedProcess { built_in }));
        }
        cipher.seal_with_nonce(label, &nonce, plaintext)
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
        active.uses.load(Ordering::Relaxed) >= self.active.soft_uses()
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
        self.active.with(|active| {
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
        e @ (Error::Unavailable(Unavailable::WriteKey { .. })
        | Error::Misuse(Misuse::PlaintextTooLarge { .. })
        | Error::Unavailable(Unavailable::ShutDown)
        | Error::Misuse(Misuse::BridgeReentrant)) => e,
        e => Error::Unavailable(Unavailable::WriteKey {
            scope: scope.to_string(),
            cause: Box::new(e),
        }),
    }
}

pub(super) fn exhausted(scope: &Scope) -> Error {
    Error::Unavailable(Unavailable::KeysUsedUp {
        scope: scope.to_string(),
    })
}
