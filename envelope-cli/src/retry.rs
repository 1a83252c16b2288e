//! The one retry policy: back off from 200 ms, doubling up to 10 s, for as long as the
//! operator's `--patience` lasts. Callers decide what is worth retrying; this decides how.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The first wait.
const FIRST: Duration = Duration::from_millis(200);
/// The longest wait.
const LONGEST: Duration = Duration::from_secs(10);

/// The waits between attempts at one operation.
pub(crate) struct Backoff {
    started: Instant,
    delay: Duration,
    patience: Duration,
}

impl Backoff {
    /// Attempts for up to `patience`, counted from now.
    pub(crate) fn new(patience: Duration) -> Backoff {
        Backoff {
            started: Instant::now(),
            delay: FIRST,
            patience,
        }
    }

    /// Whether the patience has run out.
    pub(crate) fn spent(&self) -> bool {
        self.started.elapsed() >= self.patience
    }

    /// Say on stderr why the last attempt failed, and wait before the next one.
    pub(crate) async fn wait(&mut self, why: &(dyn fmt::Display + Sync)) {
        eprintln!("envelope: {why}; retrying in {:?}", self.delay);
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(LONGEST);
    }
}

/// Run a KMS or key-table call again while it fails with an error envelope-core calls
/// retryable ([`envelope_core::Error::is_retryable`]), for up to `patience`.
pub(crate) async fn retrying<T, F, Fut>(
    what: &str,
    patience: Duration,
    mut f: F,
) -> Result<T, envelope_core::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, envelope_core::Error>>,
{
    let mut backoff = Backoff::new(patience);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && !backoff.spent() => {
                backoff.wait(&format!("{what}: {e}")).await;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_retryable_error_is_retried_with_doubling_waits_until_patience_runs_out() {
        let started = tokio::time::Instant::now();
        let mut calls = Vec::new();
        let r: Result<(), _> = retrying("calling", Duration::from_secs(1), || {
            calls.push(started.elapsed().as_millis());
            async {
                Err(envelope_core::Error::Kms(envelope_core::KmsError::new(
                    "test",
                    envelope_core::KmsErrorKind::Throttled,
                )))
            }
        })
        .await;
        assert!(r.is_err());
        // Attempts at 0, then after 200, 400 and 800 ms; the fourth failure is past 1 s.
        assert_eq!(calls, [0, 200, 600, 1400]);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_on_an_error_that_is_not_retryable_at_once() {
        let mut calls = 0;
        let r: Result<(), _> = retrying("calling", Duration::from_secs(60), || {
            calls += 1;
            async {
                Err(envelope_core::Error::Config(
                    envelope_core::ConfigError::new("kms", "wrong"),
                ))
            }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
