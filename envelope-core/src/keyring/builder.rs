//! [`KeyringBuilder`]: checks the configuration and starts a keyring.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::clock::Clock;
use super::hot::ActiveKeys;
use super::index::IndexKeys;
use super::loading::Loader;
use super::maintenance::{self, Maintenance};
use super::policy::Policy;
use super::rotation::Rotations;
use super::trust::TrustedCmks;
use super::{Inner, Keyring};
use crate::bridge::Bridge;
use crate::coarse_clock;
use crate::error::{Error, Misuse, Result};
use crate::keys::{KeyIdHash, Scope};
use crate::kms::KmsProvider;
use crate::store::KeyStore;
use crate::telemetry::{Metrics, TracedStore};

/// Builds a [`Keyring`].
pub struct KeyringBuilder {
    pub(super) kms: Arc<dyn KmsProvider>,
    pub(super) readers: Vec<Arc<dyn KmsProvider>>,
    pub(super) cmk: Option<String>,
    /// Master keys trusted besides `cmk`: (provider name, CMK id).
    pub(super) trusted: Vec<(String, String)>,
    pub(super) store: Arc<dyn KeyStore>,
    pub(super) policy: Policy,
    pub(super) default_scope: Scope,
    pub(super) scoped: bool,
    pub(super) clock: Clock,
}

impl KeyringBuilder {
    /// Make new data keys under the master key `cmk` instead of the provider's own
    /// ([`KmsProvider::default_cmk`]). Required for a provider that holds many master keys and
    /// names none (an `AwsKms`, a `TencentKms` or a `VaultKms` built by hand).
    ///
    /// The keyring unwraps only keys whose row names a master key it trusts: this one, those
    /// given to [`KeyringBuilder::trust_cmk`] and [`KeyringBuilder::also_read`], and any that a
    /// provider answering [`KmsProvider::holds_cmk`] holds (the local KMS's key files). A row's
    /// `cmk_id` is not evidence by itself: whoever can write the key table can write it too.
    pub fn cmk(mut self, cmk: impl Into<String>) -> Self {
        self.cmk = Some(cmk.into());
        self
    }

    /// Also unwrap keys that the key table records under master key `cmk` of this keyring's
    /// provider (the one given to [`Keyring::builder`]). New keys are still made under
    /// [`KeyringBuilder::cmk`].
    ///
    /// Needed for the master keys a key row names that are not the keyring's own CMK:
    ///
    /// - **a move to another master key** (`envelope keys rewrap --to URI`): deploy every
    ///   application trusting the destination *before* the rewrap starts, or each key it moves
    ///   becomes unreadable to them; once the applications write under the destination, trust
    ///   the old master key for as long as any row names it (`envelope keys list`);
    /// - **another spelling** of the same master key: the key table records the CMK id exactly
    ///   as it was given (an AWS alias, key id or key ARN; a Tencent `alias/NAME` or KeyId), and
    ///   ids are compared as written, so a keyring configured by KeyId must trust the alias its
    ///   older keys were made through, and the reverse.
    ///
    /// A key row naming any other master key fails with a
    /// [`KmsErrorKind::InvalidCiphertext`](crate::KmsErrorKind::InvalidCiphertext) error before
    /// any KMS call: it is what a row edited to hold a key wrapped under another master key (one
    /// these credentials may use) looks like.
    pub fn trust_cmk(mut self, cmk: impl Into<String>) -> Self {
        let provider = self.kms.name().to_owned();
        self.trusted.push((provider, cmk.into()));
        self
    }

    /// As [`KeyringBuilder::trust_cmk`], for the provider named `provider`
    /// ([`KmsProvider::name`]): one given to [`KeyringBuilder::also_read_with`] (which names no
    /// master key), or a second master key of one given to [`KeyringBuilder::also_read`].
    /// [`KeyringBuilder::build`] fails when no provider of that name was given.
    pub fn trust_cmk_of(mut self, provider: impl Into<String>, cmk: impl Into<String>) -> Self {
        self.trusted.push((provider.into(), cmk.into()));
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

    /// Also unwrap keys made by another KMS under its master key `reader.cmk`
    /// ([`KeyUri::connect`](crate::kms::KeyUri::connect) gives both): a key record names the
    /// provider that wrapped it, and the keyring unwraps each key with the provider of that
    /// name. New keys are always made with the provider given to [`Keyring::builder`].
    ///
    /// This is how an application keeps reading while `envelope keys rewrap` moves its keys
    /// from one KMS to another (Tencent to AWS, local to Vault): give it both for the time of
    /// the move, from before the rewrap starts. Keys of that provider under any other master
    /// key are refused unless trusted with [`KeyringBuilder::trust_cmk_of`]. One provider per
    /// name: two Vault servers cannot be read side by side.
    pub fn also_read(mut self, reader: crate::kms::Connected) -> Self {
        self.trusted
            .push((reader.kms.name().to_owned(), reader.cmk.clone()));
        self.readers.push(reader.kms);
        self
    }

    /// Also unwrap keys made by `kms`, as [`KeyringBuilder::also_read`], for a provider that
    /// needs no master key named: one that answers [`KmsProvider::holds_cmk`] (a
    /// [`LocalKms`](crate::LocalKms) unwraps under the key files it was given, and only those).
    /// A Tencent, AWS or Vault provider holds no list of its own: use
    /// [`KeyringBuilder::also_read`], or name its master keys with
    /// [`KeyringBuilder::trust_cmk_of`]; without either, every key of that provider is refused.
    pub fn also_read_with(mut self, kms: impl KmsProvider) -> Self {
        self.readers.push(Arc::new(kms));
        self
    }

    #[cfg(test)]
    pub(super) fn clock(mut self, clock: Clock) -> Self {
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
    /// [`Misuse::Policy`] for an invalid policy;
    /// [`Misuse::Builder`] for no or an empty CMK id (to make keys
    /// under, or to trust), two providers of one name, a trusted CMK of a provider the keyring
    /// was not given, or a provider whose retry budget exceeds [`Policy::kms_timeout`];
    /// [`SystemError::Thread`](crate::SystemError::Thread) when the runtime thread cannot start;
    /// [`Error::MasterKeyMissing`] when the key table's keys need master keys this provider does
    /// not hold; a key-store error while reading the key table for that check.
    pub fn build(self) -> Result<Keyring> {
        self.policy.validate()?;
        let cmk = match (self.cmk, self.kms.default_cmk()) {
            (Some(cmk), _) => cmk,
            (None, Some(own)) => own.to_owned(),
            (None, None) => {
                return Err(Error::Misuse(Misuse::Builder(
                    format!(
                        "the '{}' KMS provider names no master key of its own: give the keyring one with KeyringBuilder::cmk",
                        self.kms.name()
                    )
                    .into(),
                )));
            }
        };
        if cmk.is_empty() {
            return Err(Error::Misuse(Misuse::Builder(
                "the CMK id must not be empty".into(),
            )));
        }
        let mut names = HashSet::new();
        for kms in std::iter::once(&self.kms).chain(&self.readers) {
            if !names.insert(kms.name().to_owned()) {
                return Err(Error::Misuse(Misuse::Builder(
                    format!(
                        "two KMS providers named '{}' were given to one keyring: a key record names its provider only by name, so only one of each can be read",
                        kms.name()
                    )
                    .into(),
                )));
            }
            if let Some(budget) = kms.call_budget()
                && budget > self.policy.kms_timeout
            {
                return Err(Error::Misuse(Misuse::Builder(
                    format!(
                        "the '{}' KMS provider may spend up to {budget:?} on one call (all attempts and back-off), more than Policy::kms_timeout ({:?}): its own errors would never surface; lower its timeouts or attempts, or raise kms_timeout",
                        kms.name(),
                        self.policy.kms_timeout
                    )
                    .into(),
                )));
            }
        }
        let mut trusted = TrustedCmks::default();
        trusted.add(self.kms.name(), &cmk);
        for (provider, cmk) in &self.trusted {
            if cmk.is_empty() {
                return Err(Error::Misuse(Misuse::Builder(
                    format!("a trusted CMK id of the '{provider}' KMS provider is empty").into(),
                )));
            }
            if !names.contains(provider) {
                return Err(Error::Misuse(Misuse::Builder(
                    format!(
                        "CMK {cmk} is trusted for the '{provider}' KMS provider, but the keyring was given no provider of that name: add it with KeyringBuilder::also_read"
                    )
                    .into(),
                )));
            }
            trusted.add(provider, cmk);
        }
        let read_scope = self.scoped.then(|| self.default_scope.clone());
        let first_key_refresh = coarse_clock::ms(self.policy.key_refresh);
        coarse_clock::start();
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
            store: Arc::new(TracedStore(self.store)),
            cmk,
            trusted,
            active: ActiveKeys::new(self.policy.soft_uses()),
            policy: self.policy,
            default_scope: self.default_scope,
            read_scope,
            cache,
            migration_windows: RwLock::default(),
            metrics: Metrics::new(),
            bridge,
            epoch: Instant::now(),
            clock: self.clock,
            rotations: Rotations::default(),
            loads: Loader::default(),
            index: IndexKeys::default(),
            maintenance: Maintenance::new(first_key_refresh),
        });
        inner
            .bridge
            .handle()
            .spawn(maintenance::run(Arc::downgrade(&inner)));
        let keyring = Keyring {
            inner,
            _runtime: Arc::new(guard),
        };
        keyring.inner.check_master_keys()?;
        Ok(keyring)
    }
}
