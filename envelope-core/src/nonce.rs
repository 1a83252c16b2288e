//! Where AES-GCM nonces come from: a ChaCha12 generator per thread (rand's `StdRng`), seeded from
//! the operating system, that can never hand the same stream to two processes.
//!
//! A user-space generator costs about 10 ns per nonce where the OS or aws-lc's RAND costs
//! 350-450 ns, but it is copied, state and all, by `fork()` and by a VM snapshot. So:
//!
//! - **fork**: a `pthread_atfork` child handler (the `forkguard` crate) bumps a counter; every
//!   nonce checks it (one relaxed atomic load) and a thread that sees it move reseeds from the OS
//!   before its next nonce. Threads started after the fork seed themselves when they first run.
//!   Parent and child therefore never share a nonce stream.
//! - **snapshot restore**: nothing tells user space, so every thread also reseeds from the OS
//!   after [`RESEED_AFTER`] nonces and whenever [`request_reseed`] was called since its last seed
//!   (every keyring's maintenance tick calls it once a second). Two clones of one snapshot can
//!   repeat a nonce only among the values they seal before that, and only if the kernel's own
//!   generator repeats too (Linux reseeds it on a VM generation change).
//!
//! [`fill`] also reports the id of the process the nonce was made in, cached per thread and
//! refreshed on fork, so the keyring can refuse to write in a forked child under data keys it
//! shares with its parent (the use-count bound is per process) at no cost per value.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::{StdRng, SysRng};
use rand::{Rng as _, SeedableRng as _};

use crate::error::{Error, Result};
use crate::format::NONCE_LEN;

/// A thread draws at most this many nonces from one seed.
pub(crate) const RESEED_AFTER: u32 = 1 << 12;

/// Bumped by [`request_reseed`]; a thread whose seed is older reseeds before its next nonce.
static RESEED_EPOCH: AtomicU64 = AtomicU64::new(0);

struct Source {
    rng: StdRng,
    fork: forkguard::Guard,
    /// Nonces left before the next reseed.
    left: u32,
    /// `RESEED_EPOCH` when this seed was drawn.
    epoch: u64,
    /// The process this thread runs in, as of the last seed.
    pid: u32,
}

impl Source {
    fn new() -> Result<Self> {
        Ok(Source {
            rng: seed()?,
            fork: forkguard::Guard::try_new().map_err(|e| {
                Error::System(crate::error::SystemError::ForkHandler(e.to_string()))
            })?,
            left: RESEED_AFTER,
            epoch: RESEED_EPOCH.load(Ordering::Relaxed),
            pid: std::process::id(),
        })
    }

    #[cold]
    #[inline(never)]
    fn reseed(&mut self, epoch: u64) -> Result<()> {
        self.rng = seed()?;
        self.left = RESEED_AFTER;
        self.epoch = epoch;
        self.pid = std::process::id();
        Ok(())
    }
}

fn seed() -> Result<StdRng> {
    StdRng::try_from_rng(&mut SysRng)
        .map_err(|e| Error::System(crate::error::SystemError::Random(e.to_string())))
}

thread_local! {
    static SOURCE: RefCell<Option<Source>> = const { RefCell::new(None) };
}

/// Fill `nonce` with fresh random bytes; returns the id of the process that made it.
///
/// # Errors
/// [`SystemError::Random`](crate::SystemError::Random) when the operating system's generator fails.
#[inline]
pub(crate) fn fill(nonce: &mut [u8; NONCE_LEN]) -> Result<u32> {
    SOURCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let source = match &mut *slot {
            Some(source) => source,
            empty => empty.insert(Source::new()?),
        };
        let epoch = RESEED_EPOCH.load(Ordering::Relaxed);
        // `detected_fork` must run every time: it is what notices the fork.
        if source.fork.detected_fork() || source.left == 0 || source.epoch != epoch {
            source.reseed(epoch)?;
        }
        source.left -= 1;
        source.rng.fill_bytes(nonce);
        Ok(source.pid)
    })
}

/// Make every thread reseed from the OS before its next nonce.
pub(crate) fn request_reseed() {
    RESEED_EPOCH.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_differ_and_name_this_process() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..(2 * RESEED_AFTER as usize + 10) {
            let mut n = [0u8; NONCE_LEN];
            assert_eq!(fill(&mut n).unwrap(), std::process::id());
            assert!(seen.insert(n), "a nonce repeated");
        }
    }

    #[test]
    fn a_reseed_request_reseeds_before_the_next_nonce() {
        let epoch_of_seed = || SOURCE.with(|cell| cell.borrow().as_ref().unwrap().epoch);
        let mut a = [0u8; NONCE_LEN];
        fill(&mut a).unwrap();
        let before = epoch_of_seed();
        request_reseed();
        let mut b = [0u8; NONCE_LEN];
        fill(&mut b).unwrap();
        // Other tests' keyrings may request reseeds too: the seed is at least this new.
        assert!(epoch_of_seed() > before);
        assert_ne!(a, b);
    }
}
