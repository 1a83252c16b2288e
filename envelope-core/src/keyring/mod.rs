//! The keyring: the one object an application builds at start-up.
//!
//! It holds the KMS provider, the key store, the policy and the metrics; a shared cache from key
//! id to opened key (the initialized cipher, never raw bytes) with single-flight loading; and one
//! active data key per scope for writes, rotated by age and by use count and refreshed in the
//! background before it expires, so a write never waits for the KMS in steady state.
//!
//! Here: [`Keyring`] itself (accessors and the async API) and `Inner`, which composes the
//! shared services with one part per job. The rest, one job a file, each owning its state:
//! `policy` (the limits and their checks), `builder` (configuration and start-up), `cache` (what
//! the key cache holds), `hot` (sealing and opening with no I/O; `ActiveKeys`), `rotation`
//! (making keys, moving each scope to a successor; `Rotations`), `loading` (single-flight key
//! loads, the context and master-key checks; `Loader`), `index` (index-key sets; `IndexKeys`),
//! `maintenance` (the once-a-second task that follows the key table; `Maintenance`),
//! `registry` (how column types find their keyring), `blocking` (the synchronous view), `clock`
//! (the clock unit tests move), `trust` (which master keys a row may name), `tests`.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::blind::BlindIndexSpec;
use crate::bridge::{Bridge, RuntimeGuard};
use crate::error::{Error, Result};
use crate::format;
use crate::keys::{KeyId, KeyIdHash, Label, Scope};
use crate::kms::KmsProvider;
use crate::store::KeyStore;
use crate::telemetry::{Metrics, MetricsSnapshot};

mod blocking;
mod builder;
mod cache;
mod clock;
mod hot;
mod index;
mod loading;
mod maintenance;
mod policy;
mod registry;
mod rotation;
#[cfg(test)]
mod tests;
mod trust;

pub use blocking::Blocking;
pub use builder::KeyringBuilder;
pub use policy::{MAX_USES_CEILING, Policy};
pub use registry::{KeyringGuard, current};

use cache::{IndexSet, OpenedKey};
use clock::Clock;
use hot::{ActiveKeys, exhausted, write_unavailable};
use index::IndexKeys;
use loading::Loader;
use maintenance::Maintenance;
use rotation::{Rotation, Rotations};
use trust::TrustedCmks;

/// The keyring's state: the services and settings every part uses, then one part per job, each
/// owning its own state (`hot`, `rotation`, `loading`, `index`, `maintenance`).
struct Inner {
    kms: Arc<dyn KmsProvider>,
    /// Providers that only unwrap: keys whose record names one of them (by
    /// [`KmsProvider::name`]), while the keys move from one KMS to another.
    readers: Vec<Arc<dyn KmsProvider>>,
    store: Arc<dyn KeyStore>,
    cmk: String,
    /// The master keys a key row may name: `cmk`, the readers' CMKs, and the ones trusted
    /// explicitly. Never the row's own word.
    trusted: TrustedCmks,
    policy: Policy,
    default_scope: Scope,
    /// The scope `decrypt` requires of a value's key, for a keyring built with
    /// [`KeyringBuilder::default_scope`] (`None`: any scope).
    read_scope: Option<Scope>,
    cache: moka::sync::Cache<KeyId, Arc<OpenedKey>, KeyIdHash>,
    /// Labels whose columns may still hold legacy plaintext (`envelope encrypt` is running).
    migration_windows: RwLock<HashSet<Label>>,
    metrics: Metrics,
    bridge: Bridge,
    epoch: Instant,
    clock: Clock,
    /// Each scope's write key (`hot`).
    active: ActiveKeys,
    /// Rotation locks, prepared successors and recent failures per scope (`rotation`).
    rotations: Rotations,
    /// Recent load failures and the key table's last known ids (`loading`).
    loads: Loader,
    /// Blind-index key sets (`index`).
    index: IndexKeys,
    /// When the key table is next read (`maintenance`).
    maintenance: Maintenance,
}

/// Retires its keyring's active data keys when it drops ([`Keyring::retire_on_drop`]).
#[derive(Debug)]
pub struct RetireOnDrop {
    keyring: Keyring,
}

impl Drop for RetireOnDrop {
    fn drop(&mut self) {
        match self.keyring.blocking().retire_active_keys() {
            Ok(retired) => {
                tracing::debug!(target: "envelope::keyring", retired, "retired the active data keys")
            }
            Err(e) => tracing::warn!(
                target: "envelope::keyring",
                error = %e,
                "retiring the active data keys failed; `envelope keys retire --older-than` closes them later"
            ),
        }
    }
}

/// The handle an application builds once and shares (it is cheap to clone).
///
/// See the crate docs for a complete example.
///
/// # One data key per process
///
/// A keyring makes its own data key per scope at its first write and keeps writing under it
/// until it rotates ([`Policy`]). Keyrings never share an active key, so every process (and
/// every keyring built in one) adds a key that readers unwrap once: build one keyring per
/// process and clone it, and call [`Keyring::retire_active_keys`] on a clean shutdown (or hold
/// [`Keyring::retire_on_drop`]'s guard for a short-lived job) so that the key table does not
/// collect keys nobody writes under.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<Inner>,
    // Dropped with the last handle: shuts the runtime down. Background tasks hold only `Inner`.
    _runtime: Arc<RuntimeGuard>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("kms", &self.inner.kms.name())
            .field("cmk", &self.inner.cmk)
            .field("default_scope", &self.inner.default_scope)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Start building a keyring that makes new keys with `kms` and keeps their wrapped forms
    /// in `store`. New keys are made under the provider's own master key
    /// ([`KmsProvider::default_cmk`]: the local KMS's key) unless [`KeyringBuilder::cmk`]
    /// names another (a cloud KMS's CMK, a [`crate::kms::Connected`]'s `cmk`). Either may be
    /// shared: an `Arc` of a provider or a store is one too.
    pub fn builder(kms: impl KmsProvider, store: impl KeyStore) -> KeyringBuilder {
        KeyringBuilder {
            kms: Arc::new(kms),
            readers: Vec::new(),
            cmk: None,
            trusted: Vec::new(),
            store: Arc::new(store),
            policy: Policy::default(),
            default_scope: Scope::default(),
            scoped: false,
            clock: Clock::default(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The name of the KMS provider new keys are made with ([`KmsProvider::name`]).
    pub fn provider_name(&self) -> &str {
        self.inner.kms.name()
    }

    /// The CMK new keys are made under.
    pub fn cmk(&self) -> &str {
        &self.inner.cmk
    }

    /// The default scope.
    pub fn default_scope(&self) -> &Scope {
        &self.inner.default_scope
    }

    /// The key store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.inner.store
    }

    /// The KMS provider new keys are made with.
    pub fn kms(&self) -> &Arc<dyn KmsProvider> {
        &self.inner.kms
    }

    /// The provider named `name` ([`KmsProvider::name`]): the one new keys are made with, or
    /// one given to [`KeyringBuilder::also_read`] or [`KeyringBuilder::also_read_with`].
    pub fn provider_named(&self, name: &str) -> Option<&Arc<dyn KmsProvider>> {
        self.inner.provider_named(name)
    }

    /// Let the column `label` read legacy plaintext: a stored value that is not an envelope at
    /// all is returned as it is, instead of failing. For the time `envelope encrypt` rewrites an
    /// existing plaintext column; close the window when it is done. Envelope values are still
    /// authenticated while the window is open.
    pub fn open_migration_window(&self, label: &Label) {
        self.inner
            .migration_windows
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(label.clone());
    }

    /// Fail closed again on non-envelope values in `label`'s column.
    pub fn close_migration_window(&self, label: &Label) {
        self.inner
            .migration_windows
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(label);
    }

    /// Whether `label`'s column may hold legacy plaintext.
    pub fn migration_window_open(&self, label: &Label) -> bool {
        self.inner
            .migration_windows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(label)
    }

    /// A copy of the counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot()
    }

    // ----- async API -------------------------------------------------------------------------

    /// Seal `plaintext` for the column `label`, under the default scope's active data key.
    ///
    /// # Errors
    /// [`Unavailable::WriteKey`](crate::Unavailable::WriteKey) when no data key can be made; [`Misuse::PlaintextTooLarge`](crate::Misuse::PlaintextTooLarge).
    pub async fn encrypt(&self, label: &Label, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.encrypt_scoped(&self.inner.default_scope, label, plaintext)
            .await
    }

    /// Seal under `scope`'s active data key.
    ///
    /// # Errors
    /// As [`Keyring::encrypt`].
    pub async fn encrypt_scoped(
        &self,
        scope: &Scope,
        label: &Label,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        // Each turn either seals or sees a new key come into service; concurrent writers may use
        // a new key up before this one gets to it (only with a tiny dek_max_uses), so the loop is
        // bounded by time, not by turns.
        let deadline = Instant::now() + self.inner.policy.kms_timeout;
        while Instant::now() < deadline {
            if let Some(sealed) = self.inner.seal_active(scope, label, plaintext) {
                return sealed;
            }
            if self.inner.promote_pending(scope).is_some() {
                continue;
            }
            self.make_key_if_unusable(scope)
                .await
                .map_err(|e| self.inner.note_write_failure(scope, e))
                .map_err(|e| write_unavailable(scope, e))?;
        }
        Err(exhausted(scope))
    }

    /// Open a value sealed for the column `label`.
    ///
    /// # Errors
    /// [`Error::Format`] for malformed input, [`Error::Decrypt`] for a tampered, swapped or
    /// foreign value, [`Error::UnknownKey`], or a KMS / key-store error while loading its key.
    /// On a scoped keyring ([`KeyringBuilder::default_scope`]) the value's key must belong to
    /// that scope, or the read fails with [`Error::ScopeMismatch`].
    pub async fn decrypt(&self, label: &Label, blob: &[u8]) -> Result<Vec<u8>> {
        self.decrypt_in(self.inner.read_scope.as_ref(), label, blob)
            .await
    }

    /// Open a value that must have been sealed under one of `scope`'s keys: a value copied from
    /// another tenant's row of the same column fails with [`Error::ScopeMismatch`].
    ///
    /// # Errors
    /// As [`Keyring::decrypt`].
    pub async fn decrypt_scoped(
        &self,
        scope: &Scope,
        label: &Label,
        blob: &[u8],
    ) -> Result<Vec<u8>> {
        self.decrypt_in(Some(scope), label, blob).await
    }

    async fn decrypt_in(
        &self,
        scope: Option<&Scope>,
        label: &Label,
        blob: &[u8],
    ) -> Result<Vec<u8>> {
        let envelope = format::parse(blob)?;
        if let Some(opened) = self.inner.open_hot(&envelope, label, scope) {
            return opened;
        }
        let key = self.key_async(envelope.key_id()).await?;
        key.data_in(scope)?.open(&envelope, label)
    }

    /// Make sure the default scope has an active data key (one KMS call if it has none), so the
    /// first write does not wait for the KMS.
    ///
    /// # Errors
    /// A KMS or key-store error.
    pub async fn warm(&self) -> Result<()> {
        self.warm_scope(&self.inner.default_scope.clone()).await
    }

    /// [`Keyring::warm`] for a given scope.
    ///
    /// # Errors
    /// A KMS or key-store error.
    pub async fn warm_scope(&self, scope: &Scope) -> Result<()> {
        self.make_key_if_unusable(scope).await.map(|_| ())
    }

    /// Make a data key for `scope` on the keyring's runtime if it has none that may take writes.
    async fn make_key_if_unusable(&self, scope: &Scope) -> Result<Option<KeyId>> {
        let inner = self.inner.clone();
        let s = scope.clone();
        self.inner
            .bridge
            .run("making a data key", async move {
                inner.rotate(s, Rotation::IfUnusable).await
            })
            .await
    }

    /// Load keys into the cache ahead of reads (for example the ids of a page of rows, from
    /// [`crate::format::peek_key_id`]). One KMS call per key not yet cached.
    ///
    /// # Errors
    /// The first load that failed.
    pub async fn prefetch(&self, ids: impl IntoIterator<Item = KeyId>) -> Result<()> {
        for id in ids {
            self.key_async(id).await?;
        }
        Ok(())
    }

    /// Replace `scope`'s active data key now, whatever its age; returns the new key's id. The old
    /// key is retired in the key table but stays readable.
    ///
    /// # Errors
    /// A KMS or key-store error; the old key then stays active.
    pub async fn rotate(&self, scope: &Scope) -> Result<KeyId> {
        let inner = self.inner.clone();
        let s = scope.clone();
        self.inner.rotate_and_report(s, inner).await
    }

    /// The blind index of `value` under `spec` (see [`BlindIndexSpec`]). The index key for the
    /// spec's label is created on first use and shared through the key table.
    ///
    /// # Errors
    /// A KMS or key-store error while loading or creating the index key; a non-UTF-8 value with a
    /// text normalizer.
    pub async fn blind_index(&self, spec: &BlindIndexSpec, value: &[u8]) -> Result<Vec<u8>> {
        let set = self.index_set_async(spec.label()).await?;
        let key = self.key_async(set.write).await?;
        key.index()?.compute(spec, value)
    }

    /// The blind index of `value` under every index key the label has, the one new rows get
    /// first: look a row up with `WHERE index_column IN (...)` over all of them, and it is found
    /// whichever key its index was made with. A label has more than one key only while
    /// `envelope rotate --index` recomputes its column; otherwise this is one probe.
    ///
    /// # Errors
    /// As [`Keyring::blind_index`].
    pub async fn blind_index_probes(
        &self,
        spec: &BlindIndexSpec,
        value: &[u8],
    ) -> Result<Vec<Vec<u8>>> {
        let set = self.index_set_async(spec.label()).await?;
        let mut probes = Vec::with_capacity(set.probes.len());
        for &id in &set.probes {
            match self.key_async(id).await {
                Ok(key) => probes.push(key.index()?.compute(spec, value)?),
                // An older key deleted since the last key-table read (the rotation finished):
                // no row's index uses it any more.
                Err(Error::UnknownKey { .. }) if id != set.write => {}
                Err(e) => return Err(e),
            }
        }
        Ok(probes)
    }

    async fn index_set_async(&self, label: &Label) -> Result<Arc<IndexSet>> {
        if let Some(set) = self.inner.index.cached(label) {
            return Ok(set);
        }
        let inner = self.inner.clone();
        let label = label.clone();
        self.inner
            .bridge
            .run("resolving an index key", async move {
                inner.resolve_index_set(label).await
            })
            .await
    }

    /// Retire this keyring's active data keys in the key table and stop writing under them
    /// (a later write makes a new key): for a process that is done writing, such as a service
    /// shutting down, so that `envelope keys list` shows only keys that may still take writes.
    /// Their values stay readable (and are selected by `envelope rotate --retired`). Returns
    /// how many keys were retired.
    ///
    /// # Errors
    /// A key-store error; keys retired before it stay retired.
    pub async fn retire_active_keys(&self) -> Result<usize> {
        let inner = self.inner.clone();
        self.inner
            .bridge
            .run("retiring the active data keys", inner.retire_active())
            .await
    }

    /// A guard that retires this keyring's active data keys when it drops
    /// ([`Keyring::retire_active_keys`], through [`Blocking`]): for a short-lived job, so that
    /// each run does not leave a key behind that nobody writes under. Bind it for the job's
    /// length: `let _retire = keyring.retire_on_drop();`. A failure is logged (`warn`, target
    /// `envelope::keyring`); `envelope keys retire --older-than` closes what it left.
    #[must_use = "the keys are retired when the guard drops: bind it, `let _retire = keyring.retire_on_drop();`"]
    pub fn retire_on_drop(&self) -> RetireOnDrop {
        RetireOnDrop {
            keyring: self.clone(),
        }
    }

    /// Read the key table now for keys retired or deleted elsewhere (see
    /// [`Policy::key_refresh`], which does this in the background): stop writing under retired
    /// data keys, drop deleted keys from every cache, and pick up blind-index key changes.
    ///
    /// # Errors
    /// A key-store error.
    pub async fn refresh_keys(&self) -> Result<()> {
        let inner = self.inner.clone();
        self.inner
            .bridge
            .run("reading the key table", async move {
                inner.refresh_key_states().await
            })
            .await
    }

    /// The same operations for synchronous callers: diesel `ToSql`/`FromSql`, sqlx
    /// `Encode`/`Decode`, a plain thread. See [`Blocking`].
    pub fn blocking(&self) -> Blocking<'_> {
        Blocking { keyring: self }
    }

    async fn key_async(&self, id: KeyId) -> Result<Arc<OpenedKey>> {
        if let Some(key) = self.inner.cached(&id) {
            self.inner.metrics.cache_hit();
            return Ok(key);
        }
        // Load through the same single-flight path as synchronous callers, on the keyring's
        // blocking pool, so async and sync misses for one key coalesce into one KMS call.
        let inner = self.inner.clone();
        self.inner
            .bridge
            .run_blocking(move || inner.key_blocking(id))
            .await
    }

    #[cfg(test)]
    fn tick(&self) {
        self.inner.tick();
    }
}
