//! How column types find their keyring: diesel's `FromSql` and sqlx's `Decode` take no context.
//!
//! [`current`] resolves, in order:
//! 1. a task-local override set by [`Keyring::install_for`] (async code, per tenant or per test);
//! 2. a thread-local override set by [`Keyring::enter`] (sync diesel, `spawn_blocking`);
//! 3. the process default set by [`Keyring::install_default`].

use std::cell::RefCell;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::RwLock;

use super::Keyring;
use crate::error::{Error, Misuse, Result};

tokio::task_local! {
    static TASK_KEYRING: Keyring;
}

thread_local! {
    /// The thread's overrides, innermost last, each with the id of the guard that installed it.
    static THREAD_KEYRING: RefCell<Vec<(u64, Keyring)>> = const { RefCell::new(Vec::new()) };
    static NEXT_GUARD: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

static DEFAULT_KEYRING: RwLock<Option<Keyring>> = RwLock::new(None);

/// The keyring that applies here: task-local, then thread-local, then the process default.
///
/// # Errors
/// [`Misuse::NoKeyring`] when none is installed.
pub fn current() -> Result<Keyring> {
    if let Ok(k) = TASK_KEYRING.try_with(Keyring::clone) {
        return Ok(k);
    }
    if let Some(k) = THREAD_KEYRING.with(|s| s.borrow().last().map(|(_, k)| k.clone())) {
        return Ok(k);
    }
    DEFAULT_KEYRING
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .ok_or(Error::Misuse(Misuse::NoKeyring))
}

/// Removes its thread-local keyring when dropped, so the one entered before it applies again.
/// Guards dropped out of order remove exactly their own keyring. Not `Send`: it belongs to the
/// thread that made it.
#[must_use = "the keyring is only in effect while the guard lives"]
pub struct KeyringGuard {
    id: u64,
    _not_send: PhantomData<*const ()>,
}

impl Drop for KeyringGuard {
    fn drop(&mut self) {
        THREAD_KEYRING.with(|s| {
            let mut stack = s.borrow_mut();
            if let Some(at) = stack.iter().rposition(|(id, _)| *id == self.id) {
                stack.remove(at);
            }
        });
    }
}

impl std::fmt::Debug for KeyringGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyringGuard")
    }
}

impl Keyring {
    /// Make this the process-wide default keyring; returns the one it replaces.
    pub fn install_default(&self) -> Option<Keyring> {
        DEFAULT_KEYRING
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .replace(self.clone())
    }

    /// Remove the process-wide default keyring; returns it.
    pub fn uninstall_default() -> Option<Keyring> {
        DEFAULT_KEYRING
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Run `fut` with this keyring as the task-local override (visible inside sqlx `Decode` and
    /// diesel-async `FromSql`, which run in the caller's task). The returned future owns a
    /// handle to the keyring, so it can be spawned.
    pub fn install_for<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> + use<F> {
        TASK_KEYRING.scope(self.clone(), fut)
    }

    /// Make this keyring the thread-local override until the guard drops (for sync diesel on a
    /// plain thread or in `spawn_blocking`, where task-locals are not visible). Guards nest.
    pub fn enter(&self) -> KeyringGuard {
        let id = NEXT_GUARD.with(|n| {
            let id = n.get();
            n.set(id.wrapping_add(1));
            id
        });
        THREAD_KEYRING.with(|s| s.borrow_mut().push((id, self.clone())));
        KeyringGuard {
            id,
            _not_send: PhantomData,
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::{KeyMaterial, LocalKms, MemoryKeyStore};

    fn keyring() -> Keyring {
        let kms = LocalKms::from_key(KeyMaterial::generate().unwrap());
        Keyring::builder(kms, MemoryKeyStore::new())
            .build()
            .unwrap()
    }

    fn current_cmk() -> Option<String> {
        THREAD_KEYRING.with(|s| s.borrow().last().map(|(_, k)| k.cmk().to_owned()))
    }

    #[test]
    fn guards_dropped_out_of_order_remove_their_own_keyring() {
        let (a, b) = (keyring(), keyring());
        let guard_a = a.enter();
        let guard_b = b.enter();
        assert_eq!(current_cmk().as_deref(), Some(b.cmk()));
        // Dropping the outer guard first must not take the inner keyring with it.
        drop(guard_a);
        assert_eq!(current_cmk().as_deref(), Some(b.cmk()));
        drop(guard_b);
        assert_eq!(current_cmk(), None);
    }
}
