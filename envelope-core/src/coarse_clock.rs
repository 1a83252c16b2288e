//! A coarse monotonic clock for the write path: one relaxed atomic load per read.
//!
//! Every write checks its data key's age, and `Instant::now()` (a vDSO call, ~20 ns here) would
//! add several percent to sealing a 64-byte value. Instead a thread of its own (`envelope-clock`,
//! started by the first keyring, one per process) advances a millisecond counter every
//! [`RESOLUTION`]. It depends on no runtime, so a provider that blocks the keyring's runtime
//! thread cannot stop key ages from advancing. Readers see time at most about one resolution
//! late, which is nothing against key lifetimes of minutes to days.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the clock thread advances the counter.
pub(crate) const RESOLUTION: Duration = Duration::from_millis(20);

struct Coarse {
    base: Instant,
    elapsed_ms: AtomicU64,
    /// The process whose thread advances `elapsed_ms`. A forked child inherits the counter but
    /// not the thread: its first keyring starts one of its own (see [`start`]).
    ticking_in: AtomicU32,
}

static COARSE: OnceLock<Coarse> = OnceLock::new();

fn coarse() -> &'static Coarse {
    COARSE.get_or_init(|| {
        let coarse = Coarse {
            base: Instant::now(),
            elapsed_ms: AtomicU64::new(0),
            ticking_in: AtomicU32::new(0),
        };
        if let Err(e) = spawn_ticker() {
            // Without the thread the clock would stand still: fall back to reading the OS
            // clock on every call (see `now`), slower but correct.
            tracing::warn!(target: "envelope::keyring", error = %e, "cannot start the coarse clock thread; reading the system clock on every write");
            coarse.elapsed_ms.store(u64::MAX, Ordering::Relaxed);
        } else {
            coarse
                .ticking_in
                .store(std::process::id(), Ordering::Relaxed);
        }
        coarse
    })
}

fn spawn_ticker() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("envelope-clock".into())
        .spawn(|| {
            loop {
                std::thread::sleep(RESOLUTION);
                if let Some(c) = COARSE.get() {
                    let ms = u64::try_from(c.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
                    c.elapsed_ms.store(ms, Ordering::Relaxed);
                }
            }
        })
        .map(drop)
}

/// Start the clock thread now (the keyring builder calls it), so the first write does not. In a
/// forked child of a process whose clock was running, start the child's own thread: the
/// inherited counter would otherwise stand still, and key ages with it.
pub(crate) fn start() {
    let c = coarse();
    let me = std::process::id();
    let ticking_in = c.ticking_in.load(Ordering::Relaxed);
    if ticking_in == 0 || ticking_in == me {
        return;
    }
    if c.ticking_in
        .compare_exchange(ticking_in, me, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
        && let Err(e) = spawn_ticker()
    {
        tracing::warn!(target: "envelope::keyring", error = %e, "cannot start the coarse clock thread in this forked process; reading the system clock on every write");
        c.elapsed_ms.store(u64::MAX, Ordering::Relaxed);
    }
}

/// The current time, at most about one [`RESOLUTION`] behind `Instant::now()`.
#[inline]
pub(crate) fn now() -> Instant {
    coarse().base + Duration::from_millis(now_ms())
}

/// [`now`] as milliseconds since a fixed, process-wide instant: the cheapest form to compare.
#[inline]
pub(crate) fn now_ms() -> u64 {
    let c = coarse();
    match c.elapsed_ms.load(Ordering::Relaxed) {
        u64::MAX => u64::try_from(c.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1),
        ms => ms,
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_and_stays_close_to_the_system_clock() {
        start();
        let a = now();
        std::thread::sleep(RESOLUTION * 5);
        let b = now();
        assert!(b > a);
        let lag = Instant::now().duration_since(now());
        assert!(lag < Duration::from_secs(1), "{lag:?}");
    }
}
