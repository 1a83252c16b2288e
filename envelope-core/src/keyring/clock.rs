//! The keyring's clock, which unit tests can move forward.

#[cfg(test)]
use std::sync::Arc;
#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

use crate::coarse_clock;

/// The keyring's clock: the coarse monotonic clock of `crate::coarse_clock` (one atomic load, read on
/// every write); in unit tests, plus an offset the test can advance.
#[derive(Clone, Default)]
pub(super) struct Clock {
    #[cfg(test)]
    pub(super) offset_ms: Arc<AtomicU64>,
}

impl Clock {
    #[inline]
    pub(super) fn now(&self) -> Instant {
        #[cfg(test)]
        {
            coarse_clock::now() + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
        }
        #[cfg(not(test))]
        {
            coarse_clock::now()
        }
    }

    /// [`Clock::now`] in the form the write path compares: see `coarse_clock::now_ms`.
    #[inline]
    pub(super) fn now_ms(&self) -> u64 {
        #[cfg(test)]
        {
            coarse_clock::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
        }
        #[cfg(not(test))]
        {
            coarse_clock::now_ms()
        }
    }

    #[cfg(test)]
    pub(super) fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}
