//! The limits a keyring enforces: [`Policy`] and its checks.

use std::time::Duration;

use crate::error::{Error, Misuse, Result};

/// The most values one data key may seal, whatever the policy says: 2^31, half the 2^32 bound
/// NIST SP 800-38D sets for random 96-bit nonces.
pub const MAX_USES_CEILING: u64 = 1 << 31;

/// The longest `dek_max_age` and `cache_ttl` a policy may set.
pub(super) const MAX_AGE_LIMIT: Duration = Duration::from_secs(366 * 24 * 3600);
/// How many failed key loads a keyring remembers at once.
pub(super) const MAX_REMEMBERED_LOAD_FAILURES: usize = 1024;
/// The longest `kms_timeout` and `refresh_retry` a policy may set.
pub(super) const MAX_WAIT_LIMIT: Duration = Duration::from_secs(3600);

/// Limits and cache settings. The defaults suit most applications; change a field with
/// `Policy { dek_max_age: Duration::from_secs(3600), ..Policy::default() }`.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// A data key takes no new writes after this age (default 24 h).
    pub dek_max_age: Duration,
    /// A data key takes no new writes after this many values (default 2^28; at most
    /// [`MAX_USES_CEILING`]). At 2^28 random nonces the chance of any repeat is below 2^-40.
    pub dek_max_uses: u64,
    /// Percent of either limit at which a replacement is made in the background (default 80).
    pub refresh_at_percent: u8,
    /// How many opened keys the cache holds (default 10,000).
    pub cache_capacity: u64,
    /// How long an opened key stays cached after loading (default 1 h): the window in which a
    /// key deleted or disabled in the KMS can still be used by this process.
    pub cache_ttl: Duration,
    /// How long a call may wait for the KMS and key store (default 10 s, at most one hour). It
    /// bounds every call, synchronous or async, even when a provider blocks its thread.
    pub kms_timeout: Duration,
    /// After a failed attempt to make or load a key (the KMS or key store failed or did not
    /// answer within `kms_timeout`), callers that need the same key fail at once with the same
    /// error for this long before it is tried again (default 5 s).
    pub refresh_retry: Duration,
    /// How often the keyring reads the key table for changes an operator made (default 60 s, at
    /// most one hour): within this bound plus about a second, it stops writing under a data key
    /// retired with `envelope keys retire`, drops a key deleted with `envelope keys shred` from
    /// every cache (reads of its values then fail with [`Error::UnknownKey`]), and learns a blind
    /// index's new key during `envelope rotate --index`. [`Keyring::refresh_keys`](crate::Keyring::refresh_keys) does it
    /// at once.
    pub key_refresh: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            dek_max_age: Duration::from_secs(24 * 3600),
            dek_max_uses: 1 << 28,
            refresh_at_percent: 80,
            cache_capacity: 10_000,
            cache_ttl: Duration::from_secs(3600),
            kms_timeout: Duration::from_secs(10),
            refresh_retry: Duration::from_secs(5),
            key_refresh: Duration::from_secs(60),
        }
    }
}

impl Policy {
    pub(super) fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, problem: &'static str| {
            Err(Error::Misuse(Misuse::Policy {
                field,
                problem: problem.into(),
            }))
        };
        if self.dek_max_uses == 0 || self.dek_max_uses > MAX_USES_CEILING {
            return bad("dek_max_uses", "must be between 1 and 2^31");
        }
        if self.dek_max_age.is_zero() {
            return bad("dek_max_age", "must be positive");
        }
        if !(1..=99).contains(&self.refresh_at_percent) {
            return bad("refresh_at_percent", "must be between 1 and 99");
        }
        if self.cache_capacity == 0 {
            return bad("cache_capacity", "must be at least 1");
        }
        if self.kms_timeout.is_zero() {
            return bad("kms_timeout", "must be positive");
        }
        if self.cache_ttl.is_zero() {
            return bad("cache_ttl", "must be positive");
        }
        // Upper bounds keep every deadline computation (`now + limit`) far from overflow, and
        // anything longer is a mistake: a key, a cached key or a wait that outlives a deploy.
        if self.dek_max_age > MAX_AGE_LIMIT {
            return bad("dek_max_age", "must be at most 366 days");
        }
        if self.cache_ttl > MAX_AGE_LIMIT {
            return bad("cache_ttl", "must be at most 366 days");
        }
        if self.kms_timeout > MAX_WAIT_LIMIT {
            return bad("kms_timeout", "must be at most one hour");
        }
        if self.refresh_retry > MAX_WAIT_LIMIT {
            return bad("refresh_retry", "must be at most one hour");
        }
        if self.key_refresh.is_zero() || self.key_refresh > MAX_WAIT_LIMIT {
            return bad("key_refresh", "must be positive and at most one hour");
        }
        Ok(())
    }

    pub(super) fn soft_uses(&self) -> u64 {
        self.dek_max_uses / 100 * u64::from(self.refresh_at_percent)
            + self.dek_max_uses % 100 * u64::from(self.refresh_at_percent) / 100
    }

    pub(super) fn soft_age(&self) -> Duration {
        self.dek_max_age * u32::from(self.refresh_at_percent) / 100
    }
}
