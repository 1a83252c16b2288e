//! The key store: where wrapped keys live (the key table), and an in-memory store for tests.
//!
//! envelope-sqlx and envelope-diesel implement [`KeyStore`] over the `envelope_keys` table on
//! PostgreSQL, MySQL/MariaDB and SQLite. Values carry only a key id; the store maps it back to the
//! wrapped key and the master key it needs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::error::StoreError;
use crate::keys::{KeyId, KeyKind, KeyRecord};

/// Which rows [`KeyStore::list`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyFilter {
    /// Only rows of this kind.
    pub kind: Option<KeyKind>,
    /// Only rows of this scope.
    pub scope: Option<String>,
    /// Only rows wrapped under this CMK.
    pub cmk_id: Option<String>,
    /// Include rows whose `retired_at` is set.
    pub include_retired: bool,
}

impl KeyFilter {
    /// Every row, retired or not.
    pub fn all() -> Self {
        KeyFilter {
            include_retired: true,
            ..Self::default()
        }
    }

    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &KeyRecord) -> bool {
        self.kind.is_none_or(|k| k == record.kind)
            && self.scope.as_deref().is_none_or(|s| s == record.scope)
            && self.cmk_id.as_deref().is_none_or(|c| c == record.cmk_id)
            && (self.include_retired || record.retired_at.is_none())
    }
}

/// Storage for the key table.
///
/// Contract (every implementation runs the same tests):
/// - `insert` fails with [`StoreError::Conflict`] when the id exists, or when the row is an index
///   key and a non-retired index key with the same scope exists (two processes racing to create a
///   blind-index key must end up with one);
/// - `list` returns rows ordered by `created_at`, then id;
/// - `retire` is idempotent and keeps the first retirement time;
/// - `rewrap` replaces the wrapped bytes only if they still equal `expected_wrapped`
///   (compare-and-set), otherwise [`StoreError::Conflict`];
/// - `delete` removes the row (crypto-shredding every value under it) and says whether it existed.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// Add a row.
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// The row with this id.
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// The rows that pass `filter`.
    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError>;
    /// Stop new writes under a key.
    async fn retire(&self, id: &KeyId, at: SystemTime) -> Result<(), StoreError>;
    /// Replace a row's wrapped key (after a CMK change), if it still holds `expected_wrapped`.
    async fn rewrap(
        &self,
        id: &KeyId,
        expected_wrapped: &[u8],
        provider: &str,
        cmk_id: &str,
        wrapped: &[u8],
    ) -> Result<(), StoreError>;
    /// Delete a row.
    async fn delete(&self, id: &KeyId) -> Result<bool, StoreError>;
}

/// A shared store is a store: `Keyring::builder(kms, Arc::clone(&store))`.
#[async_trait]
impl<T: KeyStore + ?Sized> KeyStore for std::sync::Arc<T> {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        (**self).insert(record).await
    }
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        (**self).get(id).await
    }
    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        (**self).list(filter).await
    }
    async fn retire(&self, id: &KeyId, at: SystemTime) -> Result<(), StoreError> {
        (**self).retire(id, at).await
    }
    async fn rewrap(
        &self,
        id: &KeyId,
        expected_wrapped: &[u8],
        provider: &str,
        cmk_id: &str,
        wrapped: &[u8],
    ) -> Result<(), StoreError> {
        (**self)
            .rewrap(id, expected_wrapped, provider, cmk_id, wrapped)
            .await
    }
    async fn delete(&self, id: &KeyId) -> Result<bool, StoreError> {
        (**self).delete(id).await
    }
}

/// A key store in memory, for unit tests and throwaway examples. Everything is lost when the
/// process exits, and with it every value sealed under these keys.
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    rows: Mutex<HashMap<KeyId, KeyRecord>>,
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, KeyRecord>> {
        // A panic while holding this lock cannot leave a row half-written (each operation is a
        // single map call), so a poisoned lock is still consistent.
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut rows = self.rows();
        if rows.contains_key(&record.id) {
            return Err(StoreError::Conflict(format!(
                "key {} already exists",
                record.id
            )));
        }
        if record.kind == KeyKind::Index
            && rows.values().any(|r| {
                r.kind == KeyKind::Index && r.scope == record.scope && r.retired_at.is_none()
            })
        {
            return Err(StoreError::Conflict(format!(
                "a live index key for '{}' already exists",
                record.scope
            )));
        }
        rows.insert(record.id, record.clone());
        Ok(())
    }

    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.rows().get(id).cloned())
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let mut out: Vec<KeyRecord> = self
            .rows()
            .values()
            .filter(|r| filter.matches(r))
            .cloned()
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn retire(&self, id: &KeyId, at: SystemTime) -> Result<(), StoreError> {
        let mut rows = self.rows();
        let row = rows.get_mut(id).ok_or(StoreError::NotFound(*id))?;
        row.retired_at.get_or_insert(at);
        Ok(())
    }

    async fn rewrap(
        &self,
        id: &KeyId,
        expected_wrapped: &[u8],
        provider: &str,
        cmk_id: &str,
        wrapped: &[u8],
    ) -> Result<(), StoreError> {
        let mut rows = self.rows();
        let row = rows.get_mut(id).ok_or(StoreError::NotFound(*id))?;
        if row.wrapped != expected_wrapped {
            return Err(StoreError::Conflict(format!(
                "key {id} was rewrapped concurrently"
            )));
        }
        row.provider = provider.to_owned();
        row.cmk_id = cmk_id.to_owned();
        row.wrapped = wrapped.to_vec();
        Ok(())
    }

    async fn delete(&self, id: &KeyId) -> Result<bool, StoreError> {
        Ok(self.rows().remove(id).is_some())
    }
}

// The store contract (envelope-tests `store_contract`) runs against MemoryKeyStore in
// tests/tests/store_memory.rs, and against every database store.
