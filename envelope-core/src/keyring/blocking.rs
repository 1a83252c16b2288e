//! [`Blocking`]: the keyring for synchronous callers.

use std::sync::Arc;
use std::time::Instant;

use super::Keyring;
use super::cache::IndexSet;
use super::hot::{exhausted, write_unavailable};
use super::rotation::Rotation;
use crate::blind::BlindIndexSpec;
use crate::bridge::Bridge;
use crate::error::{Error, Result};
use crate::format;
use crate::keys::{Label, Scope};

/// A [`Keyring`]'s operations for synchronous callers ([`Keyring::blocking`]): the column
/// types' codecs, sync diesel, plain threads. A cached key costs no I/O; a key that must be
/// made or loaded is waited for through the keyring's own runtime thread, bounded by
/// [`Policy::kms_timeout`](super::Policy::kms_timeout), which is safe on plain threads, multi-thread tokio workers,
/// current-thread runtimes and `spawn_blocking`.
#[derive(Clone, Copy, Debug)]
pub struct Blocking<'a> {
    pub(super) keyring: &'a Keyring,
}

impl Blocking<'_> {
    /// [`Keyring::encrypt`]. Never waits
    /// for the KMS in steady state; when a new data key is needed it waits through the bridge.
    ///
    /// # Errors
    /// As [`Keyring::encrypt`], plus [`Unavailable::Timeout`](crate::Unavailable::Timeout).
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
            self.keyring.inner.metrics.bridge_wait();
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
    /// As [`Keyring::decrypt`], plus [`Unavailable::Timeout`](crate::Unavailable::Timeout).
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
    /// As [`Keyring::blind_index`], plus [`Unavailable::Timeout`](crate::Unavailable::Timeout).
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

    /// [`Keyring::retire_active_keys`].
    ///
    /// # Errors
    /// As [`Keyring::retire_active_keys`], plus
    /// [`Unavailable::Timeout`](crate::Unavailable::Timeout).
    pub fn retire_active_keys(&self) -> Result<usize> {
        let inner = self.keyring.inner.clone();
        Bridge::blocking_section(|| {
            self.keyring
                .inner
                .bridge
                .wait("retiring the active data keys", inner.retire_active())
        })
        .map_err(|e| self.keyring.inner.note_timeout(e))
    }

    fn index_set(&self, label: &Label) -> Result<Arc<IndexSet>> {
        if let Some(set) = self.keyring.inner.index.cached(label) {
            return Ok(set);
        }
        self.keyring.inner.metrics.bridge_wait();
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
