//! What the key cache holds: opened keys, the active key of each scope, index-key sets.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use crate::blind::IndexKey;
use crate::cipher::DataCipher;
use crate::error::{Error, Result};
use crate::keys::{KeyId, KeyIdHash, KeyKind, KeyMaterial, KeyRecord, Label, Scope};

/// An opened key in the cache, and the scope the key table (and its KMS context) gives it.
/// Always behind an `Arc`, so the size difference between the variants (the AES key schedule is
/// large) costs nothing.
pub(crate) struct OpenedKey {
    pub(super) scope: Scope,
    pub(super) body: KeyBody,
    /// A moment at which the key's row was known to be in the key table: before the read that
    /// loaded it, or after the insert that made it. A key-table read that starts later and does
    /// not find the row means the row was deleted (shredded). The precise clock, not the
    /// keyring's coarse one: the order of two moments a millisecond apart matters here.
    pub(super) stamp: Instant,
}

#[allow(clippy::large_enum_variant)]
pub(super) enum KeyBody {
    Data(DataCipher),
    Index(IndexKey),
}

impl OpenedKey {
    pub(super) fn new(
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

    pub(super) fn id(&self) -> KeyId {
        match &self.body {
            KeyBody::Data(c) => c.id(),
            KeyBody::Index(k) => k.id(),
        }
    }

    pub(super) fn data(&self) -> Result<&DataCipher> {
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
    pub(super) fn data_in(&self, scope: Option<&Scope>) -> Result<&DataCipher> {
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

    pub(super) fn index(&self) -> Result<&IndexKey> {
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
pub(super) struct ActiveKey {
    pub(super) key: Arc<OpenedKey>,
    pub(super) uses: AtomicU64,
    /// From here on a successor is prepared (`refresh_at_percent` of `dek_max_age`).
    pub(super) soft_deadline_ms: u64,
    /// From here on the key takes no writes (`dek_max_age`). Checked on every write, so the age
    /// limit holds even when the maintenance tick is held up.
    pub(super) hard_deadline_ms: u64,
    /// Set while a refresh runs and after it prepared a successor; cleared after a failure.
    pub(super) refresh_in_flight: AtomicBool,
    /// Milliseconds since the keyring's epoch before which no refresh is tried (back-off).
    pub(super) refresh_not_before_ms: AtomicU64,
}

/// A snapshot of the active keys.
#[derive(Default, Clone)]
pub(super) struct ActiveSet {
    /// The default scope's key, apart so the common case hashes nothing.
    pub(super) default: Option<Arc<ActiveKey>>,
    /// Every other scope's key.
    pub(super) scoped: HashMap<Scope, Arc<ActiveKey>>,
    /// The same keys by id: reads of recent values (the hot set) find their key here without
    /// touching the shared cache. Holds nothing the maps above do not already keep alive.
    pub(super) by_id: HashMap<KeyId, Arc<OpenedKey>, KeyIdHash>,
}

impl ActiveSet {
    pub(super) fn get(&self, scope: &Scope, default_scope: &Scope) -> Option<&Arc<ActiveKey>> {
        if scope == default_scope {
            self.default.as_ref()
        } else {
            self.scoped.get(scope)
        }
    }

    pub(super) fn iter(&self, default_scope: &Scope) -> Vec<(Scope, Arc<ActiveKey>)> {
        self.default
            .iter()
            .map(|a| (default_scope.clone(), a.clone()))
            .chain(self.scoped.iter().map(|(s, a)| (s.clone(), a.clone())))
            .collect()
    }
}

/// A blind-index label's keys, as the key table last showed them.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct IndexSet {
    /// The live (not retired) key: new indexes are made with it.
    pub(super) write: KeyId,
    /// Every key of the label, `write` first, then the others newest first: a lookup probes
    /// them all, so rows indexed under an older key are found while `envelope rotate --index`
    /// recomputes them.
    pub(super) probes: Vec<KeyId>,
}

impl IndexSet {
    /// The set of `label`'s index keys among `records`; `None` when none of them is live.
    pub(super) fn of(records: &[KeyRecord], label: &Label) -> Option<IndexSet> {
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
