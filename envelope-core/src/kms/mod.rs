//! The KMS providers, the key URIs that name them, and the limits of one KMS call.
//!
//! A provider wraps and unwraps 32-byte keys under a customer master key (CMK) that never leaves
//! the KMS. Each network provider is a sibling module behind its own cargo feature; the embedded
//! default is [`LocalKms`](crate::LocalKms). [`KmsProvider`] is the one trait
//! of this crate that outsiders are meant to implement.

use std::time::Duration;

#[cfg(feature = "kms-aws")]
pub mod aws;
#[cfg(any(feature = "kms-tencent", feature = "kms-vault"))]
mod http;
pub(crate) mod local;
#[cfg(feature = "kms-tencent")]
pub mod tencent;
#[cfg(feature = "kms-vault")]
pub mod vault;

pub(crate) mod provider;
mod uri;

// Public at the crate root only (one path per item); these names serve inside the crate.
pub(crate) use provider::{EncryptionContext, GeneratedDataKey, KmsProvider};
pub use uri::{Connected, KeyUri};

/// Whether `host` (a URL's host, IPv6 without brackets) is a loopback address: `127.0.0.0/8`,
/// `::1` or `localhost`. Plain http is allowed only to such hosts.
#[cfg_attr(
    not(any(feature = "kms-tencent", feature = "kms-vault", feature = "kms-aws")),
    allow(dead_code)
)]
pub(crate) fn is_loopback_host(host: &str) -> bool {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}
/// How long a network provider waits and how often it tries: the limits of one KMS call, the
/// same for Tencent, AWS and Vault (`TencentConfig::limits`, `AwsConfig::limits`,
/// `VaultConfig::limits`).
///
/// With the defaults one call takes at most 3 x 2.5 s + (100 ms + 200 ms) x 1.5 = 7.95 s
/// ([`KmsProvider::call_budget`]), inside the keyring's default `kms_timeout` of 10 s with room
/// for the key-store read. The keyring refuses to start when a provider's budget exceeds its
/// `kms_timeout`: raise one, or lower the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// Time allowed to connect (part of `request_timeout`, not added to it). Default 1.5 s.
    pub connect_timeout: Duration,
    /// Time allowed for one attempt, connecting and reading the whole response included.
    /// Default 2.5 s.
    pub request_timeout: Duration,
    /// Attempts per call, retries included (at least 1). Default 3.
    pub max_attempts: u32,
    /// The first retry waits about this long, each later one twice as long. Tencent and Vault
    /// jitter each wait between 50 % and 150 %; the AWS SDK uses full jitter up to the doubled
    /// wait. Default 100 ms.
    pub backoff: Duration,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            connect_timeout: Duration::from_millis(1500),
            request_timeout: Duration::from_millis(2500),
            max_attempts: 3,
            backoff: Duration::from_millis(100),
        }
    }
}
