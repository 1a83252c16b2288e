//! The provider trait and what crosses it: the encryption context and a generated data key.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::KmsError;
use crate::keys::KeyMaterial;

/// Key/value pairs a wrapped key is bound to. The KMS refuses to unwrap under any other context.
///
/// The pairs are kept sorted, and [`EncryptionContext::canonical_json`] renders them as compact
/// JSON with sorted keys, so every call (and every process) sends byte-identical context.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace a pair.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The pairs, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compact JSON with keys sorted by their bytes, e.g. `{"a":"1","b":"2"}`.
    pub fn canonical_json(&self) -> String {
        // A BTreeMap<String, String> serializes in key order with no whitespace.
        serde_json::to_string(&self.0).unwrap_or_else(|_| unreachable_json())
    }

    /// Parse the canonical JSON form (any JSON object of string values is accepted).
    ///
    /// # Errors
    /// When the text is not a JSON object whose values are all strings.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json).map(EncryptionContext)
    }
}

// Serializing a map of strings cannot fail; keep the impossible branch out of the hot path.
#[cold]
fn unreachable_json() -> String {
    String::from("{}")
}

impl fmt::Debug for EncryptionContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Context pairs are names (key ids, scopes, labels), never secrets.
        f.debug_map().entries(self.0.iter()).finish()
    }
}

/// A new data key: the plaintext (for immediate local use, never stored) and its wrapped form
/// (for the key table).
pub struct GeneratedDataKey {
    /// The plaintext key; zeroized on drop.
    pub plaintext: KeyMaterial,
    /// The key wrapped under the CMK, opaque bytes.
    pub wrapped: Vec<u8>,
}

impl fmt::Debug for GeneratedDataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedDataKey")
            .field("plaintext", &self.plaintext)
            .field("wrapped", &format_args!("<{} bytes>", self.wrapped.len()))
            .finish()
    }
}

/// A key management service that holds master keys and wraps 32-byte data keys under them.
///
/// Implementations must bind every wrapped key to the exact [`EncryptionContext`] given, must
/// never log request or response bodies (a GenerateDataKey response holds a plaintext key), and
/// should classify failures with [`crate::KmsErrorKind`] so callers know whether to retry.
///
/// The futures must not block their thread (no `std::thread::sleep`, no synchronous I/O): they
/// run on the keyring's own runtime thread, and a blocked thread stalls every KMS call and the
/// keyring's maintenance. Callers are still bounded by [`crate::Policy::kms_timeout`], but a
/// provider that blocks turns every cache miss into that timeout.
#[async_trait]
pub trait KmsProvider: Send + Sync + 'static {
    /// A short name for logs, errors and the key table's `provider` column (`local`, `tencent`).
    fn name(&self) -> &str;

    /// The master key new data keys are made under when the keyring is not told another one
    /// ([`crate::KeyringBuilder::cmk`]): the local KMS's own key; `None`, the default, for a
    /// provider that holds many.
    fn default_cmk(&self) -> Option<&str> {
        None
    }

    /// The longest one call can take, every retry and back-off included, for a provider that
    /// bounds its own calls (`None`, the default, when it does not). The keyring refuses to
    /// start when this exceeds [`crate::Policy::kms_timeout`]: the provider's own typed error
    /// (throttled, timed out, key disabled) must reach the caller before the keyring's deadline
    /// cuts the call off.
    fn call_budget(&self) -> Option<Duration> {
        None
    }

    /// Whether this provider holds the master key `cmk`, for a provider that can tell without a
    /// network call (`None`, the default, when it cannot). The keyring uses it at start-up to
    /// refuse a master key that cannot read any key in the key table (a local master key file
    /// that went missing and was replaced by a new one).
    ///
    /// A provider that answers (`Some`) is also trusted to unwrap a key row under whatever
    /// master key the row names: it must hold only the master keys its operator gave it, never
    /// unwrap under one a caller names. One that answers `None` unwraps only under the master
    /// keys the keyring is configured with ([`crate::KeyringBuilder::trust_cmk`]).
    fn holds_cmk(&self, cmk: &str) -> Option<bool> {
        let _ = cmk;
        None
    }

    /// Where the provider's master keys come from (a file path, an environment variable), for
    /// error messages; `None` by default.
    fn master_key_origin(&self) -> Option<String> {
        None
    }

    /// Generate a fresh 32-byte data key under `cmk`, bound to `context`.
    async fn generate_data_key(
        &self,
        cmk: &str,
        context: &EncryptionContext,
    ) -> Result<GeneratedDataKey, KmsError>;

    /// Unwrap a key wrapped under `cmk` with `context`.
    async fn decrypt(
        &self,
        cmk: &str,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> Result<KeyMaterial, KmsError>;

    /// Wrap existing key material under `cmk`, bound to `context`.
    async fn encrypt(
        &self,
        cmk: &str,
        plaintext: &KeyMaterial,
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError>;

    /// Move a wrapped key from one CMK (and context) to another. The default unwraps and wraps
    /// again; providers with a server-side ReEncrypt override it so the key never leaves the KMS.
    async fn re_encrypt(
        &self,
        wrapped: &[u8],
        source_cmk: &str,
        source_context: &EncryptionContext,
        destination_cmk: &str,
        destination_context: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        let key = self.decrypt(source_cmk, wrapped, source_context).await?;
        self.encrypt(destination_cmk, &key, destination_context)
            .await
    }
}

/// A shared provider is a provider: `Keyring::builder(Arc::clone(&kms), ..)`.
#[async_trait]
impl<T: KmsProvider + ?Sized> KmsProvider for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn default_cmk(&self) -> Option<&str> {
        (**self).default_cmk()
    }

    fn call_budget(&self) -> Option<Duration> {
        (**self).call_budget()
    }

    fn holds_cmk(&self, cmk: &str) -> Option<bool> {
        (**self).holds_cmk(cmk)
    }

    fn master_key_origin(&self) -> Option<String> {
        (**self).master_key_origin()
    }

    async fn generate_data_key(
        &self,
        cmk: &str,
        context: &EncryptionContext,
    ) -> Result<GeneratedDataKey, KmsError> {
        (**self).generate_data_key(cmk, context).await
    }

    async fn decrypt(
        &self,
        cmk: &str,
        wrapped: &[u8],
        context: &EncryptionContext,
    ) -> Result<KeyMaterial, KmsError> {
        (**self).decrypt(cmk, wrapped, context).await
    }

    async fn encrypt(
        &self,
        cmk: &str,
        plaintext: &KeyMaterial,
        context: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        (**self).encrypt(cmk, plaintext, context).await
    }

    async fn re_encrypt(
        &self,
        wrapped: &[u8],
        source_cmk: &str,
        source_context: &EncryptionContext,
        destination_cmk: &str,
        destination_context: &EncryptionContext,
    ) -> Result<Vec<u8>, KmsError> {
        (**self)
            .re_encrypt(
                wrapped,
                source_cmk,
                source_context,
                destination_cmk,
                destination_context,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_is_sorted_and_compact() {
        let ctx = EncryptionContext::new()
            .with("table", "users")
            .with("column", "ssn")
            .with("a\"b", "é");
        assert_eq!(
            ctx.canonical_json(),
            r#"{"a\"b":"é","column":"ssn","table":"users"}"#
        );
        let back = EncryptionContext::from_json(&ctx.canonical_json()).unwrap();
        assert_eq!(back, ctx);
        assert!(EncryptionContext::from_json(r#"{"a":1}"#).is_err());
    }
}
