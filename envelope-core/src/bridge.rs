//! The bridge between synchronous column codecs and the asynchronous KMS and key store.
//!
//! diesel's `ToSql`/`FromSql` and sqlx's `Encode`/`Decode` are synchronous, yet a cache miss
//! needs network I/O. The keyring owns a current-thread tokio runtime on a dedicated thread
//! (`envelope-kms`); a synchronous caller hands the work to it and waits on a channel with a
//! timeout. This is safe from a plain thread, a multi-thread tokio worker (the wait runs inside
//! `block_in_place`), a current-thread runtime (that runtime stalls for the call, but the work
//! runs elsewhere), and `spawn_blocking`. The one unsupported case, a KMS served by the very
//! current-thread runtime that is waiting, ends in [`Unavailable::Timeout`](crate::Unavailable::Timeout), never a hang.

use std::cell::Cell;
use std::future::Future;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

thread_local! {
    static ON_KMS_THREAD: Cell<bool> = const { Cell::new(false) };
    /// Set on a thread where `block_in_place` turned out not to be allowed although a
    /// multi-thread runtime's handle is current (that handle was entered inside a current-thread
    /// runtime): later blocking sections on this thread block directly.
    static NO_BLOCK_IN_PLACE: Cell<bool> = const { Cell::new(false) };
}

/// How much longer than `kms_timeout` the bridge lets a task run and a caller wait: the work
/// bounds itself by `kms_timeout` and reports its own error (recording a failure, for example),
/// so the bridge's own cut-off must come later.
const GRACE: Duration = Duration::from_millis(250);

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
        .map_err(|e| thread_error(format!("{name} runtime"), e))?;
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
        .map_err(|e| thread_error(format!("{name} thread"), e))?;
    Ok((handle, RuntimeGuard { shutdown: Some(tx) }))
}

fn thread_error(what: String, e: std::io::Error) -> Error {
    Error::System(crate::error::SystemError::Thread {
        what: what.into(),
        source: std::sync::Arc::new(e),
    })
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
    /// [`Unavailable::ShutDown`](crate::Unavailable::ShutDown) when the runtime has stopped.
    pub async fn run<F>(&self, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(fut)
            .await
            .map_err(|_| Error::Unavailable(crate::error::Unavailable::ShutDown))
    }
}

/// A handle to the keyring's runtime plus the wait policy.
#[derive(Clone, Debug)]
pub(crate) struct Bridge {
    handle: Handle,
    timeout: Duration,
    /// The process whose thread runs the runtime: in a forked child that thread is gone.
    pid: u32,
}

impl Bridge {
    pub(crate) fn start(timeout: Duration) -> Result<(Bridge, RuntimeGuard)> {
        let (handle, guard) = runtime_thread("envelope-kms", true)?;
        let pid = std::process::id();
        Ok((
            Bridge {
                handle,
                timeout,
                pid,
            },
            guard,
        ))
    }

    /// Fail fast in a forked child, whose copy of the runtime has no thread to run it. One
    /// system call, on the slow path only.
    fn check_process(&self) -> Result<()> {
        if std::process::id() == self.pid {
            Ok(())
        } else {
            Err(Error::Misuse(crate::error::Misuse::ForkedProcess {
                built_in: self.pid,
            }))
        }
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
            return Err(Error::Misuse(crate::error::Misuse::BridgeReentrant));
        }
        self.check_process()?;
        let started = Instant::now();
        let timeout = self.timeout;
        let (tx, rx) = mpsc::sync_channel(1);
        self.handle.spawn(async move {
            // The task times out too, so abandoned work does not pile up on the runtime.
            let result = tokio::time::timeout(timeout + GRACE, fut).await;
            let _ = tx.send(result);
        });
        // The caller's own bound: it holds even when the runtime thread is blocked (a provider
        // that blocks), where the task's timer cannot fire.
        match rx.recv_timeout(timeout + 2 * GRACE) {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(Error::Unavailable(crate::error::Unavailable::Timeout {
                    waited: started.elapsed(),
                    what: what.into(),
                }))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Error::Unavailable(crate::error::Unavailable::ShutDown))
            }
        }
    }

    /// Run `f`, which may block in [`Bridge::wait`] or on a cache load, in a way that is safe for
    /// the calling context: inside `block_in_place` on a multi-thread tokio worker (so the
    /// runtime moves its other tasks off this thread), directly everywhere else.
    pub(crate) fn blocking_section<R>(f: impl FnOnce() -> R) -> R {
        let multi_thread = matches!(
            Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(RuntimeFlavor::MultiThread)
        );
        if !multi_thread || NO_BLOCK_IN_PLACE.with(Cell::get) {
            return f();
        }
        // Under `panic = "abort"` the probe below cannot be caught: it would abort the process
        // where a current-thread runtime has a multi-thread handle entered. Run `f` directly
        // instead: a key load then holds this worker thread for its duration (cache misses
        // only), and nothing else changes.
        if cfg!(panic = "abort") {
            return f();
        }
        // A multi-thread runtime's handle is current, which is almost always because this is one
        // of its workers. But a handle can also be entered inside a current-thread runtime, where
        // `block_in_place` refuses (it panics before running `f`, and tokio offers no way to ask
        // first): then run `f` directly, and remember not to try again on this thread.
        let mut f = Some(f);
        let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio::task::block_in_place(|| f.take().map(|f| f()))
        }));
        match (attempt, f.take()) {
            (Ok(Some(result)), _) => result,
            // Refused before `f` ran.
            (_, Some(f)) => {
                NO_BLOCK_IN_PLACE.with(|flag| flag.set(true));
                f()
            }
            // `f` ran and panicked itself: let that panic go on.
            (Err(panic), None) => std::panic::resume_unwind(panic),
            // `Ok(None)` would mean the closure ran with `f` already taken: `f` is taken only
            // there, once.
            (Ok(None), None) => unreachable!("block_in_place ran its closure twice"),
        }
    }

    /// Run `fut` on the keyring runtime and await it from any executor. The wait is bounded by
    /// the timeout on the caller's side too: it happens on the runtime's blocking pool (a thread
    /// of its own, not the runtime thread), so a provider or key store that blocks the runtime
    /// thread cannot hang the caller.
    pub(crate) async fn run<T, F>(&self, what: &'static str, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        self.check_process()?;
        let bridge = self.clone();
        self.run_blocking(move || bridge.wait(what, fut)).await
    }

    /// Run a blocking closure on the keyring runtime's blocking pool and await it.
    pub(crate) async fn run_blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        self.check_process()?;
        match self.handle.spawn_blocking(f).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable(crate::error::Unavailable::ShutDown)),
        }
    }
}
