//! Index keys: which key computes a label's blind index, and which keys a lookup probes.

use super::*;

impl Inner {
    pub(super) fn cached_index_set(&self, label: &Label) -> Option<Arc<IndexSet>> {
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
    pub(super) async fn resolve_index_set(self: Arc<Self>, label: Label) -> Result<Arc<IndexSet>> {
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
}
