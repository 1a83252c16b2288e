//! The keyring: the one object an application builds at start-up.
//!
//! It holds the KMS provider, the key store, the policy and the metrics; a shared cache from key
//! id to opened key (the initialized cipher, never raw bytes) with single-flight loading; and one
//! active data key per scope for writes, rotated by age and by use count and refreshed in the
//! background before it expires, so a write never waits for the KMS in steady state.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant, SystemTime};

use crate::blind::{BlindIndexSpec, IndexKey};
use crate::bridge::{Bridge, RuntimeGuard};
use crate::cipher::DataCipher;
use crate::error::{Error, KmsError, MasterKeyMissing, Result, StoreError};
use crate::format::{self, NONCE_LEN};
use crate::keys::{KeyId, KeyIdHash, KeyKind, KeyMaterial, KeyRecord, Label, Scope};
use crate::kms::{EncryptionContext, KmsProvider};
use crate::metrics::{Metrics, MetricsSnapshot, bump};
use crate::nonce;
use crate::store::{KeyFilter, KeyStore};

/// The most values one data key may seal, whatever the policy says: 2^31, half the 2^32 bound
/// NIST SP 800-38D sets for random 96-bit nonces.
pub const MAX_USES_CEILING: u64 = 1 << 31;

/// The longest `dek_max_age` and `cache_ttl` a policy may set.
const MAX_AGE_LIMIT: Duration = Duration::from_secs(366 * 24 * 3600);
/// How many failed key loads a keyring remembers at once.
const MAX_REMEMBERED_LOAD_FAILURES: usize = 1024;
/// The longest `kms_timeout` and `refresh_retry` a policy may set.
const MAX_WAIT_LIMIT: Duration = Duration::from_secs(3600);

/// Context keys the keyring binds every wrapped key to.
const CTX_KEY_ID: &str = "envelope.key_id";
const CTX_KIND: &str = "envelope.kind";
const CTX_SCOPE: &str = "envelope.scope";

/// Limits and cache settings. The defaults suit most applications; change a field with
/// `Policy { dek_max_age: Duration::from_secs(3600), ..Policy::default() }`.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// A data key takes no new writes after this age (default 24 h).
    pub dek_max_age: Duration,
    /// A data key takes no new writes after this many values (default 2^28; at most
    /// [`MAX_USES_CEILING`]). At 2^28 random nonces the chance of any repeat is below 2^-40.
    pub dek_max_uses: u64,
    /// Percent of either limit at which a replacement is made in the background (default 80).
    pub refresh_at_percent: u8,
    /// How many opened keys the cache holds (default 10,000).
    pub cache_capacity: u64,
    /// How long an opened key stays cached after loading (default 1 h): the window in which a
    /// key deleted or disabled in the KMS can still be used by this process.
    pub cache_ttl: Duration,
    /// How long a call may wait for the KMS and key store (default 10 s, at most one hour). It
    /// bounds every call, synchronous or async, even when a provider blocks its thread.
    pub kms_timeout: Duration,
    /// After a failed attempt to make or load a key (the KMS or key store failed or did not
    /// answer within `kms_timeout`), callers that need the same key fail at once with the same
    /// error for this long before it is tried again (default 5 s).
    pub refresh_retry: Duration,
    /// How often the keyring reads the key table for changes an operator made (default 60 s, at
    /// most one hour): within this bound plus about a second, it stops writing under a data key
    /// retired with `envelope keys retire`, drops a key deleted with `envelope keys shred` from
    /// every cache (reads of its values then fail with [`Error::UnknownKey`]), and learns a blind
    /// index's new key during `envelope rotate --index`. [`Keyring::refresh_keys`] does it at once.
    pub key_refresh: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            dek_max_age: Duration::from_secs(24 * 3600),
            dek_max_uses: 1 << 28,
            refresh_at_percent: 80,
            cache_capacity: 10_000,
            cache_ttl: Duration::from_secs(3600),
            kms_timeout: Duration::from_secs(10),
            refresh_retry: Duration::from_secs(5),
            key_refresh: Duration::from_secs(60),
        }
    }
}

impl Policy {
    fn validate(&self) -> Result<()> {
        let bad = |m: &'static str| Err(Error::Config(m.into()));
        if self.dek_max_uses == 0 || self.dek_max_uses > MAX_USES_CEILING {
            return bad("Policy::dek_max_uses must be between 1 and 2^31");
        }
        if self.dek_max_age.is_zero() {
            return bad("Policy::dek_max_age must be positive");
        }
        if !(1..=99).contains(&self.refresh_at_percent) {
            return bad("Policy::refresh_at_percent must be between 1 and 99");
        }
        if self.cache_capacity == 0 {
            return bad("Policy::cache_capacity must be at least 1");
        }
        if self.kms_timeout.is_zero() || self.cache_ttl.is_zero() {
            return bad("Policy::kms_timeout and Policy::cache_ttl must be positive");
        }
        // Upper bounds keep every deadline computation (`now + limit`) far from overflow, and
        // anything longer is a mistake: a key, a cached key or a wait that outlives a deploy.
        if self.dek_max_age > MAX_AGE_LIMIT {
            return bad("Policy::dek_max_age must be at most 366 days");
        }
        if self.cache_ttl > MAX_AGE_LIMIT {
            return bad("Policy::cache_ttl must be at most 366 days");
        }
        if self.kms_timeout > MAX_WAIT_LIMIT {
            return bad("Policy::kms_timeout must be at most one hour");
        }
        if self.refresh_retry > MAX_WAIT_LIMIT {
            return bad("Policy::refresh_retry must be at most one hour");
        }
        if self.key_refresh.is_zero() || self.key_refresh > MAX_WAIT_LIMIT {
            return bad("Policy::key_refresh must be positive and at most one hour");
        }
        Ok(())
    }

    fn soft_uses(&self) -> u64 {
        self.dek_max_uses / 100 * u64::from(self.refresh_at_percent)
            + self.dek_max_uses % 100 * u64::from(self.refresh_at_percent) / 100
    }

    fn soft_age(&self) -> Duration {
        self.dek_max_age * u32::from(self.refresh_at_percent) / 100
    }
}

/// An opened key in the cache, and the scope the key table (and its KMS context) gives it.
/// Always behind an `Arc`, so the size difference between the variants (the AES key schedule is
/// large) costs nothing.
pub(crate) struct OpenedKey {
    scope: Scope,
    body: KeyBody,
    /// A moment at which the key's row was known to be in the key table: before the read that
    /// loaded it, or after the insert that made it. A key-table read that starts later and does
    /// not find the row means the row was deleted (shredded). The precise clock, not the
    /// keyring's coarse one: the order of two moments a millisecond apart matters here.
    stamp: Instant,
}

#[allow(clippy::large_enum_variant)]
enum KeyBody {
    Data(DataCipher),
    Index(IndexKey),
}

impl OpenedKey {
    fn new(
        kind: KeyKind,
        id: KeyId,
        scope: Scope,
        material: &KeyMaterial,
        stamp: Instant,
    ) -> Result<Self> {
        let body = match kind {
            KeyKind::Data => KeyBody::Data(DataCipher::new(id, material)?),
            KeyKind::Index => KeyBody::Index(IndexKey::new(id, material)),
        };
        Ok(OpenedKey { scope, body, stamp })
    }

    fn id(&self) -> KeyId {
        match &self.body {
            KeyBody::Data(c) => c.id(),
            KeyBody::Index(k) => k.id(),
        }
    }

    fn data(&self) -> Result<&DataCipher> {
        match &self.body {
            KeyBody::Data(c) => Ok(c),
            KeyBody::Index(k) => Err(Error::KeyKindMismatch {
                key_id: k.id(),
                expected: KeyKind::Data,
                found: KeyKind::Index,
            }),
        }
    }

    /// The data key, if it belongs to `scope` (any scope when `None`).
    #[inline]
    fn data_in(&self, scope: Option<&Scope>) -> Result<&DataCipher> {
        let cipher = self.data()?;
        match scope {
            Some(want) if *want != self.scope => Err(Error::ScopeMismatch {
                key_id: cipher.id(),
                expected: want.as_str().into(),
                found: self.scope.as_str().into(),
            }),
            _ => Ok(cipher),
        }
    }

    fn index(&self) -> Result<&IndexKey> {
        match &self.body {
            KeyBody::Index(k) => Ok(k),
            KeyBody::Data(c) => Err(Error::KeyKindMismatch {
                key_id: c.id(),
                expected: KeyKind::Index,
                found: KeyKind::Data,
            }),
        }
    }
}

/// The data key a scope writes under, with its use count and age limits.
struct ActiveKey {
    key: Arc<OpenedKey>,
    uses: AtomicU64,
    /// From here on a successor is prepared (`refresh_at_percent` of `dek_max_age`).
    soft_deadline_ms: u64,
    /// From here on the key takes no writes (`dek_max_age`). Checked on every write, so the age
    /// limit holds even when the maintenance tick is held up.
    hard_deadline_ms: u64,
    /// Set while a refresh runs and after it prepared a successor; cleared after a failure.
    refresh_in_flight: AtomicBool,
    /// Milliseconds since the keyring's epoch before which no refresh is tried (back-off).
    refresh_not_before_ms: AtomicU64,
}

/// A snapshot of the active keys.
#[derive(Default, Clone)]
struct ActiveSet {
    /// The default scope's key, apart so the common case hashes nothing.
    default: Option<Arc<ActiveKey>>,
    /// Every other scope's key.
    scoped: HashMap<Scope, Arc<ActiveKey>>,
    /// The same keys by id: reads of recent values (the hot set) find their key here without
    /// touching the shared cache. Holds nothing the maps above do not already keep alive.
    by_id: HashMap<KeyId, Arc<OpenedKey>, KeyIdHash>,
}

impl ActiveSet {
    fn get(&self, scope: &Scope, default_scope: &Scope) -> Option<&Arc<ActiveKey>> {
        if scope == default_scope {
            self.default.as_ref()
        } else {
            self.scoped.get(scope)
        }
    }

    fn iter(&self, default_scope: &Scope) -> Vec<(Scope, Arc<ActiveKey>)> {
        self.default
            .iter()
            .map(|a| (default_scope.clone(), a.clone()))
            .chain(self.scoped.iter().map(|(s, a)| (s.clone(), a.clone())))
            .collect()
    }
}

/// A blind-index label's keys, as the key table last showed them.
#[derive(Debug, PartialEq, Eq)]
struct IndexSet {
    /// The live (not retired) key: new indexes are made with it.
    write: KeyId,
    /// Every key of the label, `write` first, then the others newest first: a lookup probes
    /// them all, so rows indexed under an older key are found while `envelope rotate --index`
    /// recomputes them.
    probes: Vec<KeyId>,
}

impl IndexSet {
    /// The set of `label`'s index keys among `records`; `None` when none of them is live.
    fn of(records: &[KeyRecord], label: &Label) -> Option<IndexSet> {
        let mut keys: Vec<&KeyRecord> = records
            .iter()
            .filter(|r| r.kind == KeyKind::Index && r.scope == label.as_str())
            .collect();
        keys.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let write = keys.iter().find(|r| r.retired_at.is_none())?.id;
        let mut probes = vec![write];
        probes.extend(keys.iter().map(|r| r.id).filter(|id| *id != write));
        Some(IndexSet { write, probes })
    }
}

type KeyIdSet = std::collections::HashSet<KeyId, KeyIdHash>;

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
    static SNAPSHOT: std::cell::RefCell<Option<Snapshot>> = const { std::cell::RefCell::new(None) };
}

/// The keyring's clock: the coarse monotonic clock of `crate::clock` (one atomic load, read on
/// every write); in unit tests, plus an offset the test can advance.
#[derive(Clone, Default)]
struct Clock {
    #[cfg(test)]
    offset_ms: Arc<AtomicU64>,
}

impl Clock {
    #[inline]
    fn now(&self) -> Instant {
        #[cfg(test)]
        {
            crate::clock::now() + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
        }
        #[cfg(not(test))]
        {
            crate::clock::now()
        }
    }

    /// [`Clock::now`] in the form the write path compares: see `crate::clock::now_ms`.
    #[inline]
    fn now_ms(&self) -> u64 {
        #[cfg(test)]
        {
            crate::clock::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
        }
        #[cfg(not(test))]
        {
            crate::clock::now_ms()
        }
    }

    #[cfg(test)]
    fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

struct Inner {
    kms: Arc<dyn KmsProvider>,
    /// Providers that only unwrap: keys whose record names one of them (by
    /// [`KmsProvider::name`]), while the keys move from one KMS to another.
    readers: Vec<Arc<dyn KmsProvider>>,
    store: Arc<dyn KeyStore>,
    cmk: String,
    policy: Policy,
    /// `policy.dek_max_uses` at `refresh_at_percent`, computed once.
    soft_uses: u64,
    default_scope: Scope,
    cache: moka::sync::Cache<KeyId, Arc<OpenedKey>, KeyIdHash>,
    /// The active keys, read lock-free on every write and most reads; replaced copy-on-write
    /// when a key rotates (rare).
    active: ArcSwap<ActiveSet>,
    /// Bumped after every change of `active`; threads keep a snapshot of `active` and reload it
    /// only when this moves, so the write and read paths touch no shared cache line.
    generation: AtomicU64,
    /// A process-unique id, so a thread's snapshot can never be mistaken for another keyring's.
    id: u64,
    rotate_locks: Mutex<HashMap<Scope, Arc<tokio::sync::Mutex<()>>>>,
    /// One index-key lookup or creation at a time per label: concurrent first users of a blind
    /// index wait for the one KMS call instead of each making a key.
    index_locks: Mutex<HashMap<Label, Arc<tokio::sync::Mutex<()>>>>,
    /// Per blind-index label: the key new indexes are made with, and every key a lookup probes.
    index_sets: RwLock<HashMap<Label, Arc<IndexSet>>>,
    /// The ids the last key-table read found, and when that read started: a load that began
    /// before it and finishes after it must not bring back a key the read found deleted.
    presence: Mutex<Option<(Instant, Arc<KeyIdSet>)>>,
    /// Set while a key-table refresh runs.
    key_refresh_running: AtomicBool,
    /// Milliseconds since the keyring's epoch at which the next key-table refresh is due.
    next_key_refresh_ms: AtomicU64,
    /// Recent failures to load a key (KMS or key store unavailable, or too slow): readers of that
    /// key fail at once with the same error for `refresh_retry` instead of each waiting again.
    load_failures: Mutex<HashMap<KeyId, (Instant, Error), KeyIdHash>>,
    /// The scope `decrypt` requires of a value's key, for a keyring built with
    /// [`KeyringBuilder::default_scope`] (`None`: any scope).
    read_scope: Option<Scope>,
    /// The process the keyring was built in: a forked child must not write under keys it shares
    /// with its parent.
    pid: u32,
    /// The last failed attempt to make a data key, per scope: writers that find no usable key
    /// fail fast with this error for `refresh_retry` instead of each waiting on a KMS that is down.
    recent_failures: Mutex<HashMap<Scope, (Instant, Error)>>,
    /// Successors prepared by background refreshes, swapped in at the current key's hard limit.
    pending: Mutex<HashMap<Scope, Arc<OpenedKey>>>,
    /// Labels whose columns may still hold legacy plaintext (`envelope encrypt` is running).
    migration_windows: RwLock<std::collections::HashSet<Label>>,
    metrics: Metrics,
    bridge: Bridge,
    epoch: Instant,
    clock: Clock,
}

/// Builds a [`Keyring`].
pub struct KeyringBuilder {
    kms: Arc<dyn KmsProvider>,
    readers: Vec<Arc<dyn KmsProvider>>,
    cmk: Option<String>,
    store: Arc<dyn KeyStore>,
    policy: Policy,
    default_scope: Scope,
    scoped: bool,
    clock: Clock,
}

impl KeyringBuilder {
    /// Make new data keys under the master key `cmk` instead of the provider's own
    /// ([`KmsProvider::default_cmk`]). Required for a provider that holds many master keys and
    /// names none (an `AwsKms`, a `TencentKms` or a `VaultKms` built by hand).
    pub fn cmk(mut self, cmk: impl Into<String>) -> Self {
        self.cmk = Some(cmk.into());
        self
    }

    /// Replace the policy.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Make this a scoped keyring (for one tenant, say): [`Keyring::encrypt`] writes under
    /// `scope`'s data keys, and [`Keyring::decrypt`] and the column types open only values
    /// sealed under keys of `scope`; a value of another scope fails with
    /// [`Error::ScopeMismatch`]. Without this the keyring writes under the `default` scope and
    /// reads values of any scope.
    pub fn default_scope(mut self, scope: Scope) -> Self {
        self.default_scope = scope;
        self.scoped = true;
        self
    }

    /// Also unwrap keys made by `kms`: a key record names the provider that wrapped it, and
    /// the keyring unwraps each key with the provider of that name. New keys are always made
    /// with the provider given to [`Keyring::builder`].
    ///
    /// This is how an application keeps reading while `envelope keys rewrap` moves its keys
    /// from one KMS to another (Tencent to AWS, local to Vault): give it both providers for
    /// the time of the move. One provider per name: two Vault servers cannot be read side by
    /// side.
    pub fn also_read_with(mut self, kms: impl KmsProvider) -> Self {
        self.readers.push(Arc::new(kms));
        self
    }

    #[cfg(test)]
    fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Start the keyring: its runtime thread and its maintenance task. Makes no KMS call; call
    /// [`Keyring::warm`] to create the first data key up front.
    ///
    /// When the provider can tell which master keys it holds (the local KMS can), the key table
    /// is read once to check that it holds at least one of the master keys its keys were made
    /// under: a master key file that went missing and was replaced by a new key would otherwise
    /// start a healthy-looking service that cannot read a single existing row.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid policy or CMK id, a provider whose retry budget exceeds
    /// [`Policy::kms_timeout`], or when the runtime thread cannot start;
    /// [`Error::MasterKeyMissing`] when the key table's keys need master keys this provider does
    /// not hold; a key-store error while reading the key table for that check.
    pub fn build(self) -> Result<Keyring> {
        self.policy.validate()?;
        let cmk = match (self.cmk, self.kms.default_cmk()) {
            (Some(cmk), _) => cmk,
            (None, Some(own)) => own.to_owned(),
            (None, None) => {
                return Err(Error::Config(
                    format!(
                        "the '{}' KMS provider names no master key of its own: give the keyring one with KeyringBuilder::cmk",
                        self.kms.name()
                    )
                    .into(),
                ));
            }
        };
        if cmk.is_empty() {
            return Err(Error::Config("the CMK id must not be empty".into()));
        }
        let mut names = std::collections::HashSet::new();
        for kms in std::iter::once(&self.kms).chain(&self.readers) {
            if !names.insert(kms.name().to_owned()) {
                return Err(Error::Config(
                    format!(
                        "two KMS providers named '{}' were given to one keyring: a key record names its provider only by name, so only one of each can be read",
                        kms.name()
                    )
                    .into(),
                ));
            }
            if let Some(budget) = kms.call_budget()
                && budget > self.policy.kms_timeout
            {
                return Err(Error::Config(
                    format!(
                        "the '{}' KMS provider may spend up to {budget:?} on one call (all attempts and back-off), more than Policy::kms_timeout ({:?}): its own errors would never surface; lower its timeouts or attempts, or raise kms_timeout",
                        kms.name(),
                        self.policy.kms_timeout
                    )
                    .into(),
                ));
            }
        }
        let read_scope = self.scoped.then(|| self.default_scope.clone());
        let first_key_refresh = crate::clock::ms(self.policy.key_refresh);
        crate::clock::start();
        let (bridge, guard) = Bridge::start(self.policy.kms_timeout)?;
        let cache = moka::sync::Cache::builder()
            .name("envelope-keys")
            .max_capacity(self.policy.cache_capacity)
            .time_to_live(self.policy.cache_ttl)
            // TinyLFU may refuse to admit a brand-new key; a refused key would cost a KMS call on
            // every read. LRU always admits.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build_with_hasher(KeyIdHash::default());
        let inner = Arc::new(Inner {
            kms: self.kms,
            readers: self.readers,
            store: self.store,
            cmk,
            soft_uses: self.policy.soft_uses(),
            policy: self.policy,
            default_scope: self.default_scope,
            cache,
            active: ArcSwap::from_pointee(ActiveSet::default()),
            generation: AtomicU64::new(0),
            id: NEXT_KEYRING_ID.fetch_add(1, Ordering::Relaxed),
            rotate_locks: Mutex::default(),
            index_locks: Mutex::default(),
            index_sets: RwLock::default(),
            presence: Mutex::default(),
            key_refresh_running: AtomicBool::new(false),
            next_key_refresh_ms: AtomicU64::new(first_key_refresh),
            load_failures: Mutex::default(),
            read_scope,
            pid: std::process::id(),
            recent_failures: Mutex::default(),
            pending: Mutex::default(),
            migration_windows: RwLock::default(),
            metrics: Metrics::default(),
            bridge,
            epoch: Instant::now(),
            clock: self.clock,
        });
        inner
            .bridge
            .handle()
            .spawn(maintenance(Arc::downgrade(&inner)));
        let keyring = Keyring {
            inner,
            _runtime: Arc::new(guard),
        };
        keyring.inner.check_master_keys()?;
        Ok(keyring)
    }
}

/// The handle an application builds once and shares (it is cheap to clone).
///
/// See the crate docs for a complete example.
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
    /// ([`KmsProvider::default_cmk`]: the local KMS's key, a [`crate::kms::Connected`]
    /// provider's) unless [`KeyringBuilder::cmk`] names another. Either may be shared: an
    /// `Arc` of a provider or a store is one too.
    pub fn builder(kms: impl KmsProvider, store: impl KeyStore) -> KeyringBuilder {
        KeyringBuilder {
            kms: Arc::new(kms),
            readers: Vec::new(),
            cmk: None,
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
    /// one given to [`KeyringBuilder::also_read_with`].
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
    /// [`Error::WriteKeyUnavailable`] when no data key can be made; [`Error::PlaintextTooLarge`].
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
            let inner = self.inner.clone();
            let s = scope.clone();
            self.inner
                .bridge
                .run("making a data key", async move {
                    inner.rotate(s, Rotation::IfUnusable).await
                })
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
        let inner = self.inner.clone();
        let s = scope.clone();
        self.inner
            .bridge
            .run("making a data key", async move {
                inner.rotate(s, Rotation::IfUnusable).await
            })
            .await
            .map(|_| ())
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

    /// The blind index of `value` under `spec` (see [`crate::blind`]). The index key for the
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
        if let Some(set) = self.inner.cached_index_set(label) {
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
            .run("retiring the active data keys", async move {
                let now = SystemTime::now();
                let mut retired = 0;
                for (scope, active) in inner.active.load().iter(&inner.default_scope) {
                    inner.store.retire(&active.key.id(), now).await?;
                    inner.deactivate(&scope, &active.key, false);
                    retired += 1;
                }
                let pending: Vec<Arc<OpenedKey>> =
                    inner.pending_keys().drain().map(|(_, k)| k).collect();
                for key in pending {
                    inner.store.retire(&key.id(), now).await?;
                    retired += 1;
                }
                Ok(retired)
            })
            .await
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
            bump(&self.inner.metrics.cache_hits);
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

/// A [`Keyring`]'s operations for synchronous callers ([`Keyring::blocking`]): the column
/// types' codecs, sync diesel, plain threads. A cached key costs no I/O; a key that must be
/// made or loaded is waited for through the keyring's own runtime thread, bounded by
/// [`Policy::kms_timeout`], which is safe on plain threads, multi-thread tokio workers,
/// current-thread runtimes and `spawn_blocking`.
#[derive(Clone, Copy, Debug)]
pub struct Blocking<'a> {
    keyring: &'a Keyring,
}

impl Blocking<'_> {
    /// [`Keyring::encrypt`]. Never waits
    /// for the KMS in steady state; when a new data key is needed it waits through the bridge.
    ///
    /// # Errors
    /// As [`Keyring::encrypt`], plus [`Error::KmsTimeout`].
    pub fn encrypt(&self, label: &Label, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.encrypt_scoped(&self.keyring.inner.default_scope, label, plaintext)
    }

    /// [`Keyring::encrypt_scoped`].
    ///
    /// # Errors
    /// As [`Keyring::encrypt`].
    pub fn encrypt_scoped(
        &self,
        scope: &Scope,
        label: &Label,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        match self.keyring.inner.seal_active(scope, label, plaintext) {
            Some(sealed) => sealed,
            None => self.encrypt_scoped_slow(scope, label, plaintext),
        }
    }

    /// The write path when the scope has no usable key: swap in the prepared successor, or make
    /// a key through the bridge.
    #[cold]
    #[inline(never)]
    fn encrypt_scoped_slow(
        &self,
        scope: &Scope,
        label: &Label,
        plaintext: &[u8],
    ) -> Result<Vec<u8>> {
        // Bounded by time, not turns: see `encrypt_scoped`.
        let deadline = Instant::now() + self.keyring.inner.policy.kms_timeout;
        while Instant::now() < deadline {
            if self.keyring.inner.promote_pending(scope).is_some() {
                if let Some(sealed) = self.keyring.inner.seal_active(scope, label, plaintext) {
                    return sealed;
                }
                continue;
            }
            bump(&self.keyring.inner.metrics.bridge_waits);
            let inner = self.keyring.inner.clone();
            let s = scope.clone();
            Bridge::blocking_section(|| {
                self.keyring
                    .inner
                    .bridge
                    .wait("making a data key", async move {
                        inner.rotate(s, Rotation::IfUnusable).await
                    })
            })
            .map_err(|e| self.keyring.inner.note_timeout(e))
            .map_err(|e| self.keyring.inner.note_write_failure(scope, e))
            .map_err(|e| write_unavailable(scope, e))?;
            if let Some(sealed) = self.keyring.inner.seal_active(scope, label, plaintext) {
                return sealed;
            }
        }
        Err(exhausted(scope))
    }

    /// [`Keyring::decrypt`]. A cached key costs no I/O; a missing one is
    /// loaded once through the bridge, however many callers ask for it at the same time.
    ///
    /// # Errors
    /// As [`Keyring::decrypt`], plus [`Error::KmsTimeout`].
    pub fn decrypt(&self, label: &Label, blob: &[u8]) -> Result<Vec<u8>> {
        self.decrypt_in(self.keyring.inner.read_scope.as_ref(), label, blob)
    }

    /// [`Keyring::decrypt_scoped`].
    ///
    /// # Errors
    /// As [`Keyring::decrypt`].
    pub fn decrypt_scoped(&self, scope: &Scope, label: &Label, blob: &[u8]) -> Result<Vec<u8>> {
        self.decrypt_in(Some(scope), label, blob)
    }

    fn decrypt_in(&self, scope: Option<&Scope>, label: &Label, blob: &[u8]) -> Result<Vec<u8>> {
        let envelope = format::parse(blob)?;
        if let Some(opened) = self.keyring.inner.open_hot(&envelope, label, scope) {
            return opened;
        }
        let key = self.keyring.inner.key_blocking(envelope.key_id())?;
        key.data_in(scope)?.open(&envelope, label)
    }

    /// [`Keyring::blind_index`].
    ///
    /// # Errors
    /// As [`Keyring::blind_index`], plus [`Error::KmsTimeout`].
    pub fn blind_index(&self, spec: &BlindIndexSpec, value: &[u8]) -> Result<Vec<u8>> {
        let set = self.index_set(spec.label())?;
        let key = self.keyring.inner.key_blocking(set.write)?;
        key.index()?.compute(spec, value)
    }

    /// [`Keyring::blind_index_probes`].
    ///
    /// # Errors
    /// As [`Keyring::blind_index`].
    pub fn blind_index_probes(&self, spec: &BlindIndexSpec, value: &[u8]) -> Result<Vec<Vec<u8>>> {
        let set = self.index_set(spec.label())?;
        let mut probes = Vec::with_capacity(set.probes.len());
        for &id in &set.probes {
            match self.keyring.inner.key_blocking(id) {
                Ok(key) => probes.push(key.index()?.compute(spec, value)?),
                Err(Error::UnknownKey { .. }) if id != set.write => {}
                Err(e) => return Err(e),
            }
        }
        Ok(probes)
    }

    fn index_set(&self, label: &Label) -> Result<Arc<IndexSet>> {
        if let Some(set) = self.keyring.inner.cached_index_set(label) {
            return Ok(set);
        }
        bump(&self.keyring.inner.metrics.bridge_waits);
        let inner = self.keyring.inner.clone();
        let label = label.clone();
        Bridge::blocking_section(|| {
            self.keyring
                .inner
                .bridge
                .wait("resolving an index key", async move {
                    inner.resolve_index_set(label).await
                })
        })
        .map_err(|e| self.keyring.inner.note_timeout(e))
    }
}

fn write_unavailable(scope: &Scope, e: Error) -> Error {
    match e {
        e @ (Error::WriteKeyUnavailable { .. }
        | Error::PlaintextTooLarge { .. }
        | Error::KeyringShutDown
        | Error::BridgeReentrant) => e,
        e => Error::WriteKeyUnavailable {
            scope: scope.to_string(),
            source: Box::new(e),
        },
    }
}

fn exhausted(scope: &Scope) -> Error {
    Error::WriteKeyUnavailable {
        scope: scope.to_string(),
        source: Box::new(Error::Config(
            "new data keys were used up by concurrent writers for longer than Policy::kms_timeout before this write could use one; raise Policy::dek_max_uses".into(),
        )),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rotation {
    /// Make a key only if the scope has none that may take writes (first write, hard limit).
    IfUnusable,
    /// Make a key only if the current one is past its soft limit (background refresh).
    IfDue,
    /// Make a key now (operator request).
    Always,
}

impl Inner {
    /// Seal under the scope's active data key if it may take one more write (counting the
    /// write); `None` when there is no usable key. Runs under the read lock: no reference counts
    /// change on this path, which every write takes.
    #[inline]
    fn seal_active(
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
    fn seal_with(&self, cipher: &DataCipher, label: &Label, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        if nonce::fill(&mut nonce)? != self.pid {
            return Err(Error::ForkedProcess { built_in: self.pid });
        }
        cipher.seal_with_nonce(label, &nonce, plaintext)
    }

    /// Run `f` on this thread's snapshot of the active keys, reloading it if it is stale.
    #[inline]
    fn with_active<R>(&self, f: impl FnOnce(&ActiveSet) -> R) -> R {
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

    fn active_key(&self, scope: &Scope) -> Option<Arc<ActiveKey>> {
        self.active.load().get(scope, &self.default_scope).cloned()
    }

    /// Whether `active` may still take writes (without counting one).
    fn is_usable(&self, active: &ActiveKey) -> bool {
        active.uses.load(Ordering::Relaxed) < self.policy.dek_max_uses
            && self.clock.now_ms() < active.hard_deadline_ms
    }

    fn is_due(&self, active: &ActiveKey) -> bool {
        active.uses.load(Ordering::Relaxed) >= self.soft_uses
            || self.clock.now_ms() >= active.soft_deadline_ms
    }

    fn millis_since_epoch(&self) -> u64 {
        u64::try_from(self.clock.now().duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn schedule_refresh(self: &Arc<Self>, scope: &Scope, active: &Arc<ActiveKey>) {
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
                        Err(Error::KmsTimeout {
                            waited: timeout,
                            what: "refreshing a data key".into(),
                        })
                    });
            // On success the successor is prepared (or the key was already replaced): the flag
            // stays set so later writes do not schedule again. On failure, back off and retry.
            if let Err(e) = result {
                bump(&inner.metrics.rotation_failures);
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

    fn rotate_lock(&self, scope: &Scope) -> Arc<tokio::sync::Mutex<()>> {
        self.rotate_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(scope.clone())
            .or_default()
            .clone()
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
    async fn rotate(self: Arc<Self>, scope: Scope, when: Rotation) -> Result<Option<KeyId>> {
        let timeout = self.policy.kms_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let lock = self.rotate_lock(&scope);
        let Ok(_serial) = tokio::time::timeout_at(deadline, lock.lock()).await else {
            return Err(Error::KmsTimeout {
                waited: timeout,
                what: "waiting for another rotation of the same scope".into(),
            });
        };
        let current = self.active_key(&scope);
        match (&current, when) {
            (Some(a), Rotation::IfUnusable) if self.is_usable(a) => return Ok(None),
            (Some(a), Rotation::IfDue) if !self.is_due(a) || self.has_pending(&scope) => {
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
                    Err(Error::KmsTimeout {
                        waited: timeout,
                        what: "making a data key".into(),
                    })
                });
        let (record, key) = match made {
            Ok(made) => {
                self.failures().remove(&scope);
                made
            }
            Err(e) => {
                self.failures()
                    .insert(scope.clone(), (self.clock.now(), e.clone()));
                return Err(e);
            }
        };
        if when == Rotation::IfDue {
            tracing::info!(target: "envelope::keyring", scope = %scope, key_id = %record.id, "prepared the next data key");
            self.pending_keys().insert(scope, key);
        } else {
            self.activate(&scope, key);
        }
        Ok(Some(record.id))
    }

    fn pending_keys(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, Arc<OpenedKey>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_pending(&self, scope: &Scope) -> bool {
        self.pending_keys().contains_key(scope)
    }

    /// Swap in the prepared successor, if there is one. No I/O on the caller's thread.
    fn promote_pending(self: &Arc<Self>, scope: &Scope) -> Option<KeyId> {
        let next = self.pending_keys().remove(scope)?;
        let id = next.id();
        self.activate(scope, next);
        Some(id)
    }

    /// Make `key` the scope's active key and retire the previous one in the background.
    fn activate(self: &Arc<Self>, scope: &Scope, key: Arc<OpenedKey>) {
        let id = key.id();
        let now = self.clock.now_ms();
        let fresh = Arc::new(ActiveKey {
            key,
            uses: AtomicU64::new(0),
            soft_deadline_ms: now.saturating_add(crate::clock::ms(self.policy.soft_age())),
            hard_deadline_ms: now.saturating_add(crate::clock::ms(self.policy.dek_max_age)),
            refresh_in_flight: AtomicBool::new(false),
            refresh_not_before_ms: AtomicU64::new(0),
        });
        let mut previous = None;
        // Copy-on-write; `rcu` retries if another scope rotated at the same moment.
        self.active.rcu(|current| {
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
            next
        });
        self.generation.fetch_add(1, Ordering::Release);
        bump(&self.metrics.rotations);
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

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, (Instant, Error)>> {
        self.recent_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn recent_failure(&self, scope: &Scope) -> Option<Error> {
        let failures = self.failures();
        let (at, e) = failures.get(scope)?;
        (self.clock.now().duration_since(*at) < self.policy.refresh_retry).then(|| e.clone())
    }

    async fn rotate_and_report(&self, scope: Scope, me: Arc<Self>) -> Result<KeyId> {
        let id = self
            .bridge
            .run("rotating a data key", async move {
                me.rotate(scope, Rotation::Always).await
            })
            .await?;
        id.ok_or_else(|| Error::Config("rotation made no key".into()))
    }

    /// Generate, persist and open a new key.
    async fn create_key(
        self: &Arc<Self>,
        kind: KeyKind,
        scope: &str,
    ) -> Result<(KeyRecord, Arc<OpenedKey>)> {
        let id = KeyId::random()?;
        let context = kms_context(&id, kind, scope);
        let generated = self
            .kms_call(
                &self.metrics.kms_generate_data_key,
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

    fn provider_named(&self, name: &str) -> Option<&Arc<dyn KmsProvider>> {
        std::iter::once(&self.kms)
            .chain(&self.readers)
            .find(|k| k.name() == name)
    }

    async fn kms_call<T>(
        &self,
        counter: &AtomicU64,
        provider: &str,
        call: impl std::future::Future<Output = std::result::Result<T, KmsError>>,
    ) -> Result<T> {
        bump(counter);
        let started = Instant::now();
        let result = call.await;
        let elapsed = started.elapsed();
        match &result {
            Ok(_) => {
                tracing::debug!(target: "envelope::kms", provider, ?elapsed, "kms call")
            }
            Err(e) => {
                bump(&self.metrics.kms_errors);
                tracing::warn!(target: "envelope::kms", provider, ?elapsed, error = %e, "kms call failed");
            }
        }
        Ok(result?)
    }

    /// Load a key from the store and unwrap it with the KMS.
    async fn load(self: Arc<Self>, id: KeyId) -> Result<Arc<OpenedKey>> {
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
            return Err(Error::Config(
                format!(
                    "key {id} was wrapped by the '{}' KMS provider, but this keyring has only {}: give it that provider too (KeyringBuilder::also_read_with, or the CLI's also_read setting) while keys move between KMSs",
                    record.provider,
                    given.join(", ")
                )
                .into(),
            ));
        };
        let material = self
            .kms_call(
                &self.metrics.kms_decrypt,
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
    fn key_blocking(self: &Arc<Self>, id: KeyId) -> Result<Arc<OpenedKey>> {
        if let Some(key) = self.cached(&id) {
            bump(&self.metrics.cache_hits);
            return Ok(key);
        }
        bump(&self.metrics.cache_misses);
        if let Some(e) = self.recent_load_failure(&id) {
            return Err(e);
        }
        // The whole single-flight call sits inside the blocking section: moka's waiters block
        // their thread too, and on a multi-thread runtime they must not hold a worker hostage.
        Bridge::blocking_section(|| {
            self.cache.try_get_with(id, || {
                bump(&self.metrics.bridge_waits);
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
    fn note_load_failure(&self, id: KeyId, e: &Error) {
        let transient = match e {
            Error::KmsTimeout { .. } => true,
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

    fn recent_load_failure(&self, id: &KeyId) -> Option<Error> {
        let failures = self.load_failures.lock().unwrap_or_else(|p| p.into_inner());
        let (at, e) = failures.get(id)?;
        (self.clock.now().duration_since(*at) < self.policy.refresh_retry).then(|| e.clone())
    }

    /// A write that found no usable key failed: if it timed out in the caller (the keyring
    /// runtime itself may be held up), record that as the scope's recent failure, as `rotate`
    /// does for failures it sees itself.
    fn note_write_failure(&self, scope: &Scope, e: Error) -> Error {
        if matches!(e, Error::KmsTimeout { .. }) && self.recent_failure(scope).is_none() {
            self.failures()
                .insert(scope.clone(), (self.clock.now(), e.clone()));
        }
        e
    }

    /// Refuse to start on a key table whose keys all need master keys this provider lacks.
    fn check_master_keys(self: &Arc<Self>) -> Result<()> {
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

    /// Open under an active key without touching reference counts, if the value's key is one.
    #[inline]
    fn open_hot(
        &self,
        envelope: &format::Envelope<'_>,
        label: &Label,
        scope: Option<&Scope>,
    ) -> Option<Result<Vec<u8>>> {
        self.with_active(|active| {
            let key = active.by_id.get(&envelope.key_id())?;
            bump(&self.metrics.cache_hits);
            Some(key.data_in(scope).and_then(|c| c.open(envelope, label)))
        })
    }

    /// The opened key for `id` if it is in memory: an active key, or one in the shared cache.
    fn cached(&self, id: &KeyId) -> Option<Arc<OpenedKey>> {
        if let Some(key) = self.active.load().by_id.get(id) {
            return Some(key.clone());
        }
        self.cache.get(id)
    }

    fn note_timeout(&self, e: Error) -> Error {
        if matches!(e, Error::KmsTimeout { .. }) {
            bump(&self.metrics.bridge_timeouts);
        }
        e
    }

    fn cached_index_set(&self, label: &Label) -> Option<Arc<IndexSet>> {
        self.index_sets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(label)
            .cloned()
    }

    /// Find `label`'s index keys in the key table, creating the first (or, after the live one
    /// was retired, the next) if there is no live one. One lookup per label at a time in this
    /// process, so concurrent first users make one KMS call; when two processes race to create
    /// it, the store lets one insert win and the other reads it.
    async fn resolve_index_set(self: Arc<Self>, label: Label) -> Result<Arc<IndexSet>> {
        let lock = self
            .index_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(label.clone())
            .or_default()
            .clone();
        let _serial = lock.lock().await;
        if let Some(set) = self.cached_index_set(&label) {
            return Ok(set);
        }
        let filter = KeyFilter {
            kind: Some(KeyKind::Index),
            scope: Some(label.to_string()),
            include_retired: true,
            ..KeyFilter::default()
        };
        let set = match IndexSet::of(&self.store.list(&filter).await?, &label) {
            Some(set) => set,
            None => match self.create_key(KeyKind::Index, label.as_str()).await {
                Ok(_) | Err(Error::Store(StoreError::Conflict(_))) => {
                    IndexSet::of(&self.store.list(&filter).await?, &label).ok_or_else(|| {
                        Error::Store(StoreError::Conflict(format!(
                            "index key for '{label}' was created and then vanished (retired or deleted at once by another process?)"
                        )))
                    })?
                }
                Err(e) => return Err(e),
            },
        };
        let set = Arc::new(set);
        self.index_sets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(label, set.clone());
        Ok(set)
    }

    /// Read the key table and bring this keyring in line with it: a data key an operator
    /// retired takes no more writes (the next write makes a new key), a deleted key leaves every
    /// cache, and each blind-index label's keys are read again.
    async fn refresh_key_states(self: Arc<Self>) -> Result<()> {
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

    /// Take `key` out of service as `scope`'s write key, because an operator retired it
    /// (`deleted` false: it stays readable) or deleted it.
    fn deactivate(self: &Arc<Self>, scope: &Scope, key: &Arc<OpenedKey>, deleted: bool) {
        let id = key.id();
        let mut removed = false;
        self.active.rcu(|current| {
            let mut next = ActiveSet::clone(current);
            let holds = |a: Option<&Arc<ActiveKey>>| a.is_some_and(|a| a.key.id() == id);
            removed = if *scope == self.default_scope {
                holds(next.default.as_ref()) && next.default.take().is_some()
            } else {
                holds(next.scoped.get(scope)) && next.scoped.remove(scope).is_some()
            };
            if removed {
                next.by_id.remove(&id);
            }
            next
        });
        if !removed {
            return;
        }
        self.generation.fetch_add(1, Ordering::Release);
        if deleted {
            self.cache.invalidate(&id);
            tracing::warn!(target: "envelope::keyring", scope = %scope, key_id = %id, "the active data key was deleted from the key table; the next write makes a new one");
        } else {
            self.cache.insert(id, key.clone());
            tracing::info!(target: "envelope::keyring", scope = %scope, key_id = %id, "the active data key was retired in the key table; the next write makes a new one");
        }
    }

    /// Start a key-table refresh in the background if one is due.
    fn schedule_key_refresh(self: &Arc<Self>) {
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
                Err(Error::KmsTimeout {
                    waited: timeout,
                    what: "reading the key table".into(),
                })
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
    fn tick(self: &Arc<Self>) {
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

async fn maintenance(inner: Weak<Inner>) {
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

fn kms_context(id: &KeyId, kind: KeyKind, scope: &str) -> EncryptionContext {
    EncryptionContext::new()
        .with(CTX_KEY_ID, id.to_hex())
        .with(CTX_KIND, kind.as_str())
        .with(CTX_SCOPE, scope)
}

/// The stored context must name the row's own id, kind and scope: a wrapped key copied onto
/// another row is refused here rather than opened under the wrong id, and a row whose scope was
/// edited (so that shredding by scope would miss it) does not open. The context itself is bound
/// into the wrapped key by the KMS, so it cannot be edited to match.
fn checked_context(record: &KeyRecord) -> Result<(EncryptionContext, Scope)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kms::local::LocalKms;
    use crate::store::MemoryKeyStore;

    fn label() -> Label {
        Label::new("users.ssn").unwrap()
    }

    fn keyring_with(policy: Policy, clock: Clock) -> (Keyring, Arc<MemoryKeyStore>) {
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        let cmk = kms.cmk_id().to_owned();
        let store = Arc::new(MemoryKeyStore::new());
        let k = Keyring::builder(kms, store.clone())
            .cmk(cmk)
            .policy(policy)
            .clock(clock)
            .build()
            .unwrap();
        (k, store)
    }

    #[test]
    fn rotates_by_use_count() {
        let policy = Policy {
            dek_max_uses: 10,
            ..Policy::default()
        };
        let (k, store) = keyring_with(policy, Clock::default());
        let mut per_key = HashMap::new();
        for _ in 0..35 {
            let blob = k.blocking().encrypt(&label(), b"v").unwrap();
            *per_key
                .entry(format::peek_key_id(&blob).unwrap())
                .or_insert(0) += 1;
        }
        // Each key serves exactly its quota: 10, 10, 10, 5.
        let mut counts: Vec<i32> = per_key.values().copied().collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![5, 10, 10, 10]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let rows = rt.block_on(store.list(&KeyFilter::all())).unwrap();
        // Every key made is in the table (the last one may be a prepared successor).
        assert_eq!(rows.len() as u64, k.metrics().kms_generate_data_key);
        assert_eq!(k.metrics().rotations, 4);
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out waiting for {what}");
    }

    #[test]
    fn rotates_by_age_and_prepares_the_successor_ahead() {
        let clock = Clock::default();
        let policy = Policy {
            dek_max_age: Duration::from_secs(100),
            ..Policy::default()
        };
        let (k, store) = keyring_with(policy, clock.clone());
        let first = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
        clock.advance(Duration::from_secs(50));
        k.tick();
        assert_eq!(k.metrics().kms_generate_data_key, 1);
        // Past 80 %: the tick prepares the successor in the background; writes stay on the
        // current key until its hard limit.
        clock.advance(Duration::from_secs(35));
        k.tick();
        wait_until("the successor", || k.metrics().kms_generate_data_key == 2);
        let same = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
        assert_eq!(first, same);
        // Past 100 %: the successor takes over with no KMS call, and the old key is retired.
        clock.advance(Duration::from_secs(20));
        k.tick();
        let next = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
        assert_ne!(first, next);
        assert_eq!(k.metrics().kms_generate_data_key, 2);
        assert_eq!(k.metrics().rotations, 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        wait_until("the old key's retirement", || {
            rt.block_on(store.get(&first))
                .unwrap()
                .unwrap()
                .retired_at
                .is_some()
        });
        // Old values stay readable.
        let blob = k.blocking().encrypt(&label(), b"x").unwrap();
        assert_eq!(rt.block_on(k.decrypt(&label(), &blob)).unwrap(), b"x");
    }

    #[test]
    fn policy_is_validated() {
        for p in [
            Policy {
                dek_max_uses: 0,
                ..Policy::default()
            },
            Policy {
                dek_max_uses: MAX_USES_CEILING + 1,
                ..Policy::default()
            },
            Policy {
                refresh_at_percent: 100,
                ..Policy::default()
            },
            Policy {
                cache_capacity: 0,
                ..Policy::default()
            },
            // Values that would overflow a deadline (`now + limit`) are refused, not a panic.
            Policy {
                kms_timeout: Duration::MAX,
                ..Policy::default()
            },
            Policy {
                dek_max_age: Duration::MAX,
                ..Policy::default()
            },
            Policy {
                cache_ttl: Duration::MAX,
                ..Policy::default()
            },
            Policy {
                refresh_retry: Duration::MAX,
                ..Policy::default()
            },
        ] {
            let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
            let cmk = kms.cmk_id().to_owned();
            let err = Keyring::builder(kms, MemoryKeyStore::new())
                .cmk(cmk)
                .policy(p)
                .build()
                .unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err}");
        }
        let p = Policy {
            dek_max_uses: 1 << 28,
            ..Policy::default()
        };
        assert_eq!(p.soft_uses(), (1u64 << 28) * 80 / 100);
    }

    #[test]
    fn copied_wrapped_key_is_refused() {
        let (k, store) = keyring_with(Policy::default(), Clock::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let blob_a = k.blocking().encrypt(&label(), b"a").unwrap();
        let a = format::peek_key_id(&blob_a).unwrap();
        let b = rt.block_on(k.rotate(&Scope::default())).unwrap();
        // Forge: give row B the wrapped key and context of row A.
        let ra = rt.block_on(store.get(&a)).unwrap().unwrap();
        let mut rb = rt.block_on(store.get(&b)).unwrap().unwrap();
        rt.block_on(store.delete(&b)).unwrap();
        rb.wrapped = ra.wrapped.clone();
        rb.kms_context = ra.kms_context.clone();
        rt.block_on(store.insert(&rb)).unwrap();
        // A fresh keyring over the same store (cold cache) must refuse row B.
        let kms2 = k.kms().clone();
        let k2 = Keyring::builder(kms2, store.clone())
            .cmk(k.cmk())
            .build()
            .unwrap();
        let mut forged = blob_a.clone();
        forged[format::KEY_ID_OFFSET..format::KEY_ID_OFFSET + 16].copy_from_slice(b.as_bytes());
        let err = k2.blocking().decrypt(&label(), &forged).unwrap_err();
        assert!(
            matches!(err, Error::Store(StoreError::Corrupt { .. })),
            "{err}"
        );
    }

    /// A provider over a local KMS that can be made to hang, block its thread, fail, or answer
    /// slowly, and counts the calls that reach it.
    struct Faulty {
        inner: LocalKms,
        mode: AtomicU64,
        /// What `call_budget` reports, in milliseconds (0: none).
        budget_ms: AtomicU64,
        generate_calls: AtomicU64,
        decrypt_calls: AtomicU64,
    }

    const OK: u64 = 0;
    const HANG: u64 = 1;
    const DOWN: u64 = 2;
    const SLOW: u64 = 3;
    const BLOCK_THREAD: u64 = 4;

    impl Faulty {
        fn new(inner: LocalKms) -> Arc<Self> {
            Arc::new(Faulty {
                inner,
                mode: AtomicU64::new(OK),
                budget_ms: AtomicU64::new(0),
                generate_calls: AtomicU64::new(0),
                decrypt_calls: AtomicU64::new(0),
            })
        }

        fn set(&self, mode: u64) {
            self.mode.store(mode, Ordering::SeqCst);
        }

        async fn fault(&self) -> std::result::Result<(), KmsError> {
            match self.mode.load(Ordering::SeqCst) {
                HANG => std::future::pending().await,
                DOWN => Err(KmsError::new("local", crate::KmsErrorKind::Unavailable)),
                SLOW => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(())
                }
                BLOCK_THREAD => {
                    std::thread::sleep(Duration::from_secs(5));
                    Ok(())
                }
                _ => Ok(()),
            }
        }
    }

    #[async_trait::async_trait]
    impl KmsProvider for Faulty {
        fn name(&self) -> &str {
            "local"
        }

        fn call_budget(&self) -> Option<Duration> {
            match self.budget_ms.load(Ordering::SeqCst) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            }
        }

        async fn generate_data_key(
            &self,
            cmk: &str,
            context: &EncryptionContext,
        ) -> std::result::Result<crate::GeneratedDataKey, KmsError> {
            self.generate_calls.fetch_add(1, Ordering::SeqCst);
            self.fault().await?;
            self.inner.generate_data_key(cmk, context).await
        }

        async fn decrypt(
            &self,
            cmk: &str,
            wrapped: &[u8],
            context: &EncryptionContext,
        ) -> std::result::Result<KeyMaterial, KmsError> {
            self.decrypt_calls.fetch_add(1, Ordering::SeqCst);
            self.fault().await?;
            self.inner.decrypt(cmk, wrapped, context).await
        }

        async fn encrypt(
            &self,
            cmk: &str,
            plaintext: &KeyMaterial,
            context: &EncryptionContext,
        ) -> std::result::Result<Vec<u8>, KmsError> {
            self.inner.encrypt(cmk, plaintext, context).await
        }
    }

    fn faulty_keyring(
        policy: Policy,
        clock: Clock,
        store: Arc<MemoryKeyStore>,
    ) -> (Keyring, Arc<Faulty>) {
        let kms = Faulty::new(LocalKms::from_key(
            KeyMaterial::from_slice(&[9; 32]).unwrap(),
        ));
        let cmk = kms.inner.cmk_id().to_owned();
        let k = Keyring::builder(kms.clone(), store)
            .cmk(cmk)
            .policy(policy)
            .clock(clock)
            .build()
            .unwrap();
        (k, kms)
    }

    fn quick() -> Policy {
        Policy {
            kms_timeout: Duration::from_millis(300),
            ..Policy::default()
        }
    }

    #[test]
    fn a_hung_kms_is_asked_once_then_writes_fail_fast() {
        let (k, kms) = faulty_keyring(quick(), Clock::default(), Arc::new(MemoryKeyStore::new()));
        kms.set(HANG);
        for _ in 0..3 {
            let err = k.blocking().encrypt(&label(), b"v").unwrap_err();
            assert!(matches!(err, Error::WriteKeyUnavailable { .. }), "{err}");
            assert!(err.to_string().contains("timed out"), "{err}");
        }
        assert_eq!(kms.generate_calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_hung_kms_is_asked_once_for_a_key_that_is_not_cached() {
        let store = Arc::new(MemoryKeyStore::new());
        let (writer, _) = faulty_keyring(quick(), Clock::default(), store.clone());
        let blob = writer.blocking().encrypt(&label(), b"v").unwrap();
        let (reader, kms) = faulty_keyring(quick(), Clock::default(), store);
        kms.set(HANG);
        for _ in 0..3 {
            let err = reader.blocking().decrypt(&label(), &blob).unwrap_err();
            assert!(matches!(err, Error::KmsTimeout { .. }), "{err}");
        }
        assert_eq!(kms.decrypt_calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_async_api_is_bounded_when_the_provider_blocks_its_thread() {
        let (k, kms) = faulty_keyring(quick(), Clock::default(), Arc::new(MemoryKeyStore::new()));
        kms.set(BLOCK_THREAD);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = Instant::now();
        let err = rt.block_on(k.encrypt(&label(), b"v")).unwrap_err();
        assert!(matches!(err, Error::WriteKeyUnavailable { .. }), "{err}");
        // Bounded by kms_timeout (300 ms, plus the bridge's grace), not by the provider's 5 s.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_age_limit_holds_without_the_maintenance_tick() {
        let clock = Clock::default();
        let policy = Policy {
            dek_max_age: Duration::from_secs(100),
            ..Policy::default()
        };
        let (k, _) = keyring_with(policy, clock.clone());
        let first = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
        clock.advance(Duration::from_secs(150)); // no tick
        let next = format::peek_key_id(&k.blocking().encrypt(&label(), b"a").unwrap()).unwrap();
        assert_ne!(first, next);
    }

    #[test]
    fn the_outgoing_key_stays_cached_through_an_outage() {
        let clock = Clock::default();
        let policy = Policy {
            dek_max_age: Duration::from_secs(100),
            cache_ttl: Duration::from_millis(500),
            ..Policy::default()
        };
        let (k, kms) = faulty_keyring(policy, clock.clone(), Arc::new(MemoryKeyStore::new()));
        let old = k.blocking().encrypt(&label(), b"recent").unwrap();
        // The key's own cache entry (made with the key) expires.
        std::thread::sleep(Duration::from_millis(700));
        k.inner.cache.run_pending_tasks();
        clock.advance(Duration::from_secs(85));
        k.tick();
        wait_until("the successor", || {
            kms.generate_calls.load(Ordering::SeqCst) == 2
        });
        wait_until("the successor to be stored", || {
            k.inner.has_pending(&Scope::default())
        });
        kms.set(DOWN);
        clock.advance(Duration::from_secs(20));
        k.tick();
        let new = k.blocking().encrypt(&label(), b"x").unwrap();
        assert_ne!(format::peek_key_id(&new), format::peek_key_id(&old));
        assert_eq!(k.blocking().decrypt(&label(), &old).unwrap(), b"recent");
        assert_eq!(kms.decrypt_calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn concurrent_first_users_of_a_blind_index_make_one_key() {
        let (k, kms) = faulty_keyring(
            Policy::default(),
            Clock::default(),
            Arc::new(MemoryKeyStore::new()),
        );
        kms.set(SLOW);
        let spec = BlindIndexSpec::new(
            Label::new("customers.email").unwrap(),
            crate::Normalizer::CaseFolded,
        );
        let indexes: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..32)
                .map(|_| s.spawn(|| k.blocking().blind_index(&spec, b"a@example.com").unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(indexes.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(kms.generate_calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn reads_can_require_a_scope() {
        let store = Arc::new(MemoryKeyStore::new());
        let (k, _) = faulty_keyring(Policy::default(), Clock::default(), store.clone());
        let tenant_a = Scope::new("tenant-a").unwrap();
        let tenant_b = Scope::new("tenant-b").unwrap();
        let blob = k
            .blocking()
            .encrypt_scoped(&tenant_a, &label(), b"a's")
            .unwrap();
        assert_eq!(
            k.blocking()
                .decrypt_scoped(&tenant_a, &label(), &blob)
                .unwrap(),
            b"a's"
        );
        let err = k
            .blocking()
            .decrypt_scoped(&tenant_b, &label(), &blob)
            .unwrap_err();
        assert!(matches!(err, Error::ScopeMismatch { .. }), "{err}");
        // A keyring scoped to tenant B, with a cold cache, refuses it too.
        let kms = k.kms().clone();
        let b = Keyring::builder(kms, store.clone())
            .cmk(k.cmk())
            .default_scope(tenant_b)
            .build()
            .unwrap();
        let err = b.blocking().decrypt(&label(), &blob).unwrap_err();
        assert!(matches!(err, Error::ScopeMismatch { .. }), "{err}");
        // An unscoped keyring reads any scope.
        let any = Keyring::builder(k.kms().clone(), store.clone())
            .cmk(k.cmk())
            .build()
            .unwrap();
        assert_eq!(any.blocking().decrypt(&label(), &blob).unwrap(), b"a's");

        // A key row whose scope was edited (so shredding by scope would miss it) does not open.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let id = format::peek_key_id(&blob).unwrap();
        let mut row = rt.block_on(store.get(&id)).unwrap().unwrap();
        rt.block_on(store.delete(&id)).unwrap();
        row.scope = "tenant-c".into();
        rt.block_on(store.insert(&row)).unwrap();
        let cold = Keyring::builder(k.kms().clone(), store)
            .cmk(k.cmk())
            .build()
            .unwrap();
        let err = cold.blocking().decrypt(&label(), &blob).unwrap_err();
        assert!(
            matches!(err, Error::Store(StoreError::Corrupt { .. })),
            "{err}"
        );
    }

    #[test]
    fn a_missing_master_key_stops_the_keyring_from_starting() {
        let store = Arc::new(MemoryKeyStore::new());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let first = LocalKms::open_or_create_for_development(&path).unwrap();
        let first_id = first.cmk_id().to_owned();
        let k = Keyring::builder(first, store.clone())
            .cmk(first_id.clone())
            .build()
            .unwrap();
        let blob = k.blocking().encrypt(&label(), b"v").unwrap();
        drop(k);
        let backup = dir.path().join("backup.key");
        std::fs::copy(&path, &backup).unwrap();
        // The volume is not mounted: the file is gone, and development mode makes a new key.
        std::fs::remove_file(&path).unwrap();
        let second = LocalKms::open_or_create_for_development(&path).unwrap();
        let second_id = second.cmk_id().to_owned();
        let err = Keyring::builder(second, store.clone())
            .cmk(second_id)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::MasterKeyMissing(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&first_id), "{msg}");
        assert!(msg.contains("master.key"), "{msg}");
        assert!(msg.contains("created just now"), "{msg}");
        // With the key restored, it starts and reads.
        let restored = LocalKms::open(&backup).unwrap();
        let k = Keyring::builder(restored, store)
            .cmk(first_id)
            .build()
            .unwrap();
        assert_eq!(k.blocking().decrypt(&label(), &blob).unwrap(), b"v");
    }

    #[test]
    fn a_provider_whose_retries_outlast_the_timeout_is_refused() {
        let kms = Faulty::new(LocalKms::from_key(KeyMaterial::generate().unwrap()));
        kms.budget_ms.store(30_000, Ordering::SeqCst);
        let err = Keyring::builder(kms, MemoryKeyStore::new())
            .cmk("c")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("kms_timeout"), "{err}");
    }

    #[test]
    fn blocking_inside_a_current_thread_runtime_with_a_multi_thread_handle_entered() {
        let store = Arc::new(MemoryKeyStore::new());
        let (writer, _) = faulty_keyring(Policy::default(), Clock::default(), store.clone());
        let blob = writer.blocking().encrypt(&label(), b"v").unwrap();
        let (reader, _) = faulty_keyring(Policy::default(), Clock::default(), store);
        let mt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let ct = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let opened = ct.block_on(async {
            let _entered = mt.handle().enter();
            reader.blocking().decrypt(&label(), &blob)
        });
        assert_eq!(opened.unwrap(), b"v");
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn key_of(blob: &[u8]) -> KeyId {
        format::peek_key_id(blob).unwrap()
    }

    #[test]
    fn a_data_key_retired_in_the_key_table_takes_no_more_writes_after_a_refresh() {
        let (k, store) = keyring_with(Policy::default(), Clock::default());
        let first = k.blocking().encrypt(&label(), b"one").unwrap();
        let old = key_of(&first);
        block_on(store.retire(&old, SystemTime::now())).unwrap();
        // Until the keyring reads the table it keeps writing under its key...
        assert_eq!(key_of(&k.blocking().encrypt(&label(), b"x").unwrap()), old);
        block_on(k.refresh_keys()).unwrap();
        // ...then the next write makes a new key, and the old one stays readable.
        let second = k.blocking().encrypt(&label(), b"two").unwrap();
        assert_ne!(key_of(&second), old);
        assert_eq!(k.blocking().decrypt(&label(), &first).unwrap(), b"one");
        let live = block_on(store.list(&KeyFilter::default())).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, key_of(&second));
    }

    #[test]
    fn retiring_the_active_keys_closes_them_and_keeps_them_readable() {
        let (k, store) = keyring_with(Policy::default(), Clock::default());
        let first = k.blocking().encrypt(&label(), b"one").unwrap();
        assert_eq!(block_on(k.retire_active_keys()).unwrap(), 1);
        assert!(
            block_on(store.list(&KeyFilter::default()))
                .unwrap()
                .is_empty()
        );
        assert_eq!(k.blocking().decrypt(&label(), &first).unwrap(), b"one");
        let second = k.blocking().encrypt(&label(), b"two").unwrap();
        assert_ne!(key_of(&second), key_of(&first));
    }

    #[test]
    fn a_key_deleted_from_the_key_table_leaves_every_cache() {
        let (k, store) = keyring_with(Policy::default(), Clock::default());
        let first = k.blocking().encrypt(&label(), b"one").unwrap();
        block_on(k.rotate(&Scope::default())).unwrap();
        let second = k.blocking().encrypt(&label(), b"two").unwrap();
        // Both keys are in memory: the old one in the cache, the new one active.
        for blob in [&first, &second] {
            assert!(block_on(store.delete(&key_of(blob))).unwrap());
            assert!(k.blocking().decrypt(&label(), blob).is_ok());
        }
        block_on(k.refresh_keys()).unwrap();
        for blob in [&first, &second] {
            let err = k.blocking().decrypt(&label(), blob).unwrap_err();
            assert!(
                matches!(err, Error::UnknownKey { key_id } if key_id == key_of(blob)),
                "{err:?}"
            );
        }
        // Writes go on under a new key.
        let third = k.blocking().encrypt(&label(), b"three").unwrap();
        assert_ne!(key_of(&third), key_of(&second));
        assert_eq!(k.blocking().decrypt(&label(), &third).unwrap(), b"three");
    }

    #[test]
    fn the_maintenance_task_reads_the_key_table_within_key_refresh() {
        let policy = Policy {
            key_refresh: Duration::from_secs(1),
            ..Policy::default()
        };
        let (k, store) = keyring_with(policy, Clock::default());
        let blob = k.blocking().encrypt(&label(), b"one").unwrap();
        block_on(store.delete(&key_of(&blob))).unwrap();
        let deleted = std::time::Instant::now();
        wait_until("the deleted key to be forgotten", || {
            matches!(
                k.blocking().decrypt(&label(), &blob),
                Err(Error::UnknownKey { .. })
            )
        });
        assert!(
            deleted.elapsed() < Duration::from_millis(2500),
            "{:?}",
            deleted.elapsed()
        );
    }

    #[test]
    fn a_blind_index_probes_every_key_of_its_label_while_it_is_rotated() {
        let (k, store) = keyring_with(Policy::default(), Clock::default());
        let spec = BlindIndexSpec::new(
            Label::new("customers.email").unwrap(),
            crate::Normalizer::CaseFolded,
        );
        let before = k.blocking().blind_index(&spec, b"a@example.com").unwrap();
        assert_eq!(
            k.blocking()
                .blind_index_probes(&spec, b"A@example.com ")
                .unwrap(),
            vec![before.clone()]
        );
        let index_keys = |store: &MemoryKeyStore| {
            block_on(store.list(&KeyFilter {
                kind: Some(KeyKind::Index),
                include_retired: true,
                ..KeyFilter::default()
            }))
            .unwrap()
        };
        let old = index_keys(&store)[0].id;
        // The rotation starts: the live key is retired, and the next user makes the next key.
        block_on(store.retire(&old, SystemTime::now())).unwrap();
        block_on(k.refresh_keys()).unwrap();
        let after = k.blocking().blind_index(&spec, b"a@example.com").unwrap();
        assert_ne!(after, before);
        assert_eq!(
            k.blocking()
                .blind_index_probes(&spec, b"a@example.com")
                .unwrap(),
            vec![after.clone(), before.clone()]
        );
        assert_eq!(index_keys(&store).len(), 2);
        // Another keyring on the same table agrees on both keys.
        let other = Keyring::builder(k.kms().clone(), store.clone())
            .cmk(k.cmk())
            .build()
            .unwrap();
        assert_eq!(
            other
                .blocking()
                .blind_index_probes(&spec, b"a@example.com")
                .unwrap(),
            vec![after.clone(), before]
        );
        // The rotation ends: the old key is deleted, and lookups probe the new key only.
        block_on(store.delete(&old)).unwrap();
        block_on(k.refresh_keys()).unwrap();
        assert_eq!(
            k.blocking()
                .blind_index_probes(&spec, b"a@example.com")
                .unwrap(),
            vec![after.clone()]
        );
        // A keyring that has not read the table yet still probes the old key (harmless: no row
        // uses it), until it does.
        assert_eq!(
            other
                .blocking()
                .blind_index_probes(&spec, b"a@example.com")
                .unwrap()
                .len(),
            2
        );
        block_on(other.refresh_keys()).unwrap();
        assert_eq!(
            other
                .blocking()
                .blind_index_probes(&spec, b"a@example.com")
                .unwrap(),
            vec![after]
        );
    }
}
