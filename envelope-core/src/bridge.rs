//! The bridge between synchronous column codecs and the asynchronous KMS and key store.
//!
//! diesel's `ToSql`/`FromSql` and sqlx's `Encode`/`Decode` are synchronous, yet a cache miss
//! needs network I/O. The keyring owns a current-thread tokio runtime on a dedicated thread
//! (`envelope-kms`); a synchronous caller hands the work to it and waits on a channel with a
//! timeout. This is safe from a plain thread, a multi-thread tokio worker (the wait runs inside
//! `block_in_place`), a current-thread runtime (that runtime stalls for the call, but the work
//! runs elsewhere), and `spawn_blocking`. The one unsupported case, a KMS served by the very
//! current-thread runtime that is waiting, ends in [`Error::KmsTimeout`], never a hang.

use std::cell::Cell;
use std::future::Future;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

thread_local! {
    static ON_KMS_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Owns the keyring's runtime thread; dropping it shuts the runtime down without blocking.
pub(crate) struct RuntimeGuard {
    shutdown: Option<oneshot::Sender<()>>,
}

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            // The runtime thread ends its block_on, then shuts down with a short grace period.
            // We do not join it: this drop may run inside async code.
            let _ = tx.send(());
        }
    }
}

/// Start a current-thread runtime driven by a thread of its own. `kms_thread` marks the thread
/// so that blocking bridge calls made on it fail instead of deadlocking.
fn runtime_thread(name: &str, kms_thread: bool) -> Result<(Handle, RuntimeGuard)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(format!("{name}-blocking"))
        .build()
        .map_err(|e| Error::Config(format!("cannot start the {name} runtime: {e}").into()))?;
    let handle = runtime.handle().clone();
    let (tx, rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if kms_thread {
                ON_KMS_THREAD.with(|f| f.set(true));
            }
            runtime.block_on(async {
                let _ = rx.await;
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(|e| Error::Config(format!("cannot start the {name} thread: {e}").into()))?;
    Ok((handle, RuntimeGuard { shutdown: Some(tx) }))
}

/// A tokio runtime on a thread of its own, for I/O that must never depend on the caller's
/// runtime: a connection registered with a current-thread runtime cannot make progress while
/// that runtime's only thread waits for it. The key stores of envelope-sqlx and
/// envelope-diesel keep their connections here. Cheap to clone; the thread stops when the last
/// clone drops.
#[derive(Clone)]
pub struct IoRuntime {
    handle: Handle,
    _guard: std::sync::Arc<RuntimeGuard>,
}

impl std::fmt::Debug for IoRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoRuntime")
    }
}

impl IoRuntime {
    /// Start one; `name` names its thread.
    ///
    /// # Errors
    /// [`Error::Config`] when the runtime or thread cannot start.
    pub fn start(name: &str) -> Result<IoRuntime> {
        let (handle, guard) = runtime_thread(name, false)?;
        Ok(IoRuntime {
            handle,
            _guard: std::sync::Arc::new(guard),
        })
    }

    /// Its handle, to enter its context (for example to build a connection pool in it).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Run `fut` on this runtime and await it from any executor.
    ///
    /// # Errors
    /// [`Error::KeyringShutDown`] when the runtime has stopped.
    pub async fn run<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(fut)
            .await
            .map_err(|_| Error::KeyringShutDown)
    }
}

/// A handle to the keyring's runtime plus the wait policy.
#[derive(Clone, Debug)]
pub(crate) struct Bridge {
    handle: Handle,
    timeout: Duration,
}

impl Bridge {
    pub(crate) fn start(timeout: Duration) -> Result<(Bridge, RuntimeGuard)> {
        let (handle, guard) = runtime_thread("envelope-kms", true)?;
        Ok((Bridge { handle, timeout }, guard))
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Run `fut` on the keyring runtime and wait for its result from synchronous code.
    pub(crate) fn wait<T, F>(&self, what: &'static str, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        if ON_KMS_THREAD.with(Cell::get) {
            return Err(Error::BridgeReentrant);
        }
        let started = Instant::now();
        let timeout = self.timeout;
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            // The task times out too, so abandoned work does not pile up on the runtime.
            let result = tokio::time::timeout(timeout, fut).await;
            let _ = tx.send(result);
        });
        match rx.recv_timeout(timeout + Duration::from_millis(250)) {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::KmsTimeout {
                waited: started.elapsed(),
                what: what.into(),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::KeyringShutDown),
        }
    }

    /// Run `f`, which may block in [`Bridge::wait`] or on a cache load, in a way that is safe for
    /// the calling context: inside `block_in_place` on a multi-thread tokio worker (so the
    /// runtime moves its other tasks off this thread), directly everywhere else.
    pub(crate) fn blocking_section<R>(f: impl FnOnce() -> R) -> R {
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
            _ => f(),
        }
    }

    /// Run `fut` on the keyring runtime and await it from any executor.
    pub(crate) async fn run<T, F>(&self, what: &'static str, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let timeout = self.timeout;
        let started = Instant::now();
        let task = self
            .handle
            .spawn(async move { tokio::time::timeout(timeout, fut).await });
        match task.await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::KmsTimeout {
                waited: started.elapsed(),
                what: what.into(),
            }),
            Err(_) => Err(Error::KeyringShutDown),
        }
    }

    /// Run a blocking closure on the keyring runtime's blocking pool and await it.
    pub(crate) async fn run_blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        match self.handle.spawn_blocking(f).await {
            Ok(result) => result,
            Err(_) => Err(Error::KeyringShutDown),
        }
    }
}
