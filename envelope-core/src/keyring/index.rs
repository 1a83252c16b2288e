//! Index keys: which key computes a label's blind index, and which keys a lookup probes;
//! [`IndexKeys`], the sets known so far.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use super::Inner;
use super::cache::IndexSet;
use crate::error::{Error, Result, StoreError};
use crate::keys::{KeyKind, KeyRecord, Label};
use crate::store::KeyFilter;

/// Per blind-index label: its keys as last read, and the lock that serializes their lookup.
#[derive(Default)]
pub(super) struct IndexKeys {
    /// One index-key lookup or creation at a time per label: concurrent first users of a blind
    /// index wait for the one KMS call instead of each making a key.
    locks: Mutex<HashMap<Label, Arc<tokio::sync::Mutex<()>>>>,
    /// Per blind-index label: the key new indexes are made with, and every key a lookup probes.
    sets: RwLock<HashMap<Label, Arc<IndexSet>>>,
}

impl IndexKeys {
    pub(super) fn cached(&self, label: &Label) -> Option<Arc<IndexSet>> {
        self.sets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(label)
            .cloned()
    }

    fn lock(&self, label: &Label) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(label.clone())
            .or_default()
            .clone()
    }

    fn insert(&self, label: Label, set: Arc<IndexSet>) {
        self.sets
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(label, set);
    }

    /// Bring every known label's set in line with `records`, a fresh read of the key table.
    pub(super) fn reread(&self, records: &[KeyRecord]) {
        let mut sets = self.sets.write().unwrap_or_else(|p| p.into_inner());
        let labels: Vec<Label> = sets.keys().cloned().collect();
        for label in labels {
            match IndexSet::of(records, &label) {
                Some(set) => {
                    sets.insert(label, Arc::new(set));
                }
                // No live key: the next use makes one (or finds the one another process made).
                None => {
                    sets.remove(&label);
                }
            }
        }
    }
}

impl Inner {
    /// Find `label`'s index keys in the key table, creating the first (or, after the live one
    /// was retired, the next) if there is no live one. One lookup per label at a time in this
    /// process, so concurrent first users make one KMS call; when two processes race to create
    /// it, the store lets one insert win and the other reads it.
    pub(super) async fn resolve_index_set(self: Arc<Self>, label: Label) -> Result<Arc<IndexSet>> {
        let lock = self.index.lock(&label);
        let _serial = lock.lock().await;
        if let Some(set) = self.index.cached(&label) {
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
        self.index.insert(label, set.clone());
        Ok(set)
    }
}
